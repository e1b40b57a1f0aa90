//! The etcd v3 backend of [`Store`].

use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions, GetOptions,
    PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use tonic::Code;

use super::{
    Compare, KeyValue, LeaseId, Listing, Op, Store, StoreError, TxnOutcome, WatchBatch, WatchEvent,
    WatchStream,
};

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// How long one request may take before the store counts as unreachable.
    pub request_timeout: Duration,
    /// How long a TCP connect to one member may take.
    pub connect_timeout: Duration,
    /// etcd user and password, when etcd's auth is on.
    pub user: Option<(String, String)>,
}

impl EtcdConfig {
    /// Parses Docker's `--cluster-store` form: `etcd://HOST:PORT[,HOST:PORT…]` (each member may
    /// also repeat the scheme: `etcd://a:2379,etcd://b:2379`).
    pub fn from_cluster_store(url: &str) -> Result<Self, StoreError> {
        let invalid = |reason: &str| StoreError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url.strip_prefix("etcd://").ok_or_else(|| {
            invalid("only etcd is supported: use etcd://HOST:PORT[,HOST:PORT...]")
        })?;
        let mut endpoints = Vec::new();
        for member in rest.split(',') {
            let member = member
                .strip_prefix("etcd://")
                .unwrap_or(member)
                .trim_end_matches('/');
            if member.is_empty() {
                return Err(invalid("empty member address"));
            }
            let (host, port) = member
                .rsplit_once(':')
                .ok_or_else(|| invalid(&format!("{member:?} has no port (HOST:PORT)")))?;
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(invalid(&format!("{member:?} is not HOST:PORT")));
            }
            endpoints.push(member.to_string());
        }
        Ok(EtcdConfig {
            endpoints,
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            user: None,
        })
    }

    fn describe(&self) -> String {
        format!("etcd://{}", self.endpoints.join(","))
    }
}

/// A connected etcd client. The connection is lazy: building it never fails because etcd is
/// down; requests do, after `request_timeout`, with [`StoreError::Unreachable`].
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    config: EtcdConfig,
}

impl EtcdStore {
    pub async fn connect(config: EtcdConfig) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &config.user {
            options = options.with_user(user, password);
        }
        let urls: Vec<String> = config
            .endpoints
            .iter()
            .map(|e| format!("http://{e}"))
            .collect();
        let started = Instant::now();
        let client =
            tokio::time::timeout(config.request_timeout, Client::connect(urls, Some(options)))
                .await
                .map_err(|_| unreachable(&config, started, "timed out".into()))?
                .map_err(|e| map_err(&config, started, e))?;
        Ok(EtcdStore { client, config })
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// Runs one request with the configured deadline, mapping failures to `StoreError`.
    async fn call<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        match tokio::time::timeout(self.config.request_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_err(&self.config, started, e)),
            Err(_) => Err(unreachable(
                &self.config,
                started,
                "request timed out".into(),
            )),
        }
    }
}

fn unreachable(config: &EtcdConfig, started: Instant, cause: String) -> StoreError {
    StoreError::Unreachable {
        endpoints: config.describe(),
        waited: started.elapsed(),
        cause,
    }
}

fn map_err(config: &EtcdConfig, started: Instant, e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                unreachable(config, started, status.message().to_string())
            }
            _ if status.message().contains("lease not found") => StoreError::LeaseNotFound(0),
            _ => StoreError::Rejected(format!("{}: {}", status.code(), status.message())),
        },
        E::TransportError(t) => unreachable(config, started, t.to_string()),
        E::IoError(io) => unreachable(config, started, io.to_string()),
        E::LeaseKeepAliveError(m) if m.contains("lease not found") => StoreError::LeaseNotFound(0),
        other => StoreError::Rejected(other.to_string()),
    }
}

fn to_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

fn to_compare(c: Compare) -> EtcdCompare {
    match c {
        Compare::Absent(k) => EtcdCompare::create_revision(k, CompareOp::Equal, 0),
        Compare::CreateRevision(k, r) => EtcdCompare::create_revision(k, CompareOp::Equal, r),
        Compare::ModRevision(k, r) => EtcdCompare::mod_revision(k, CompareOp::Equal, r),
        // etcd compares every key of a range; an empty range compares as a key with all
        // revisions 0. So "create revision == 0 over the prefix" holds exactly when it is empty.
        Compare::PrefixEmpty(p) => {
            EtcdCompare::create_revision(p, CompareOp::Equal, 0).with_prefix()
        }
        Compare::PrefixUnchangedSince(p, rev) => {
            EtcdCompare::mod_revision(p, CompareOp::Less, rev + 1).with_prefix()
        }
    }
}

fn to_op(op: Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            TxnOp::put(key, value, opts)
        }
        Op::Delete(k) => TxnOp::delete(k, None),
        Op::DeletePrefix(p) => TxnOp::delete(p, Some(DeleteOptions::new().with_prefix())),
        Op::Get(k) => TxnOp::get(k, None),
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self.call(kv.get(key, None)).await?;
        Ok(resp.kvs().first().map(to_kv))
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self
            .call(kv.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        Ok(Listing {
            kvs: resp.kvs().iter().map(to_kv).collect(),
            revision: resp.header().map_or(0, |h| h.revision()),
        })
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<TxnOutcome, StoreError> {
        let txn = Txn::new()
            .when(compares.into_iter().map(to_compare).collect::<Vec<_>>())
            .and_then(success.into_iter().map(to_op).collect::<Vec<_>>())
            .or_else(failure.into_iter().map(to_op).collect::<Vec<_>>());
        let mut kv = self.client.kv_client();
        let resp = self.call(kv.txn(txn)).await?;
        let gets = resp
            .op_responses()
            .iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(to_kv)),
                _ => None,
            })
            .collect();
        Ok(TxnOutcome {
            succeeded: resp.succeeded(),
            revision: resp.header().map_or(0, |h| h.revision()),
            gets,
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut lease = self.client.lease_client();
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self.call(lease.grant(secs, None)).await?;
        Ok(resp.id())
    }

    async fn lease_ttl(&self, id: LeaseId) -> Result<Option<Duration>, StoreError> {
        let mut lease = self.client.lease_client();
        let resp = self.call(lease.time_to_live(id, None)).await?;
        // etcd answers -1 for a lease that does not exist (expired or revoked).
        Ok((resp.ttl() > 0).then(|| Duration::from_secs(resp.ttl() as u64)))
    }

    async fn keep_alive_once(&self, id: LeaseId) -> Result<Duration, StoreError> {
        let mut lease = self.client.lease_client();
        let refresh = async move {
            let (mut keeper, mut stream) = lease.keep_alive(id).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(stream.message().await?.map(|r| r.ttl()))
        };
        match self.call(refresh).await {
            Ok(Some(ttl)) if ttl > 0 => Ok(Duration::from_secs(ttl as u64)),
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => Err(StoreError::LeaseNotFound(id)),
            Err(e) => Err(e),
        }
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut lease = self.client.lease_client();
        match self.call(lease.revoke(id)).await {
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<WatchStream, StoreError> {
        let mut watch = self.client.watch_client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let stream = self.call(watch.watch(prefix, Some(opts))).await?;
        let config = self.config.clone();
        let batches = futures::stream::unfold(Some(stream), move |state| {
            let config = config.clone();
            async move {
                let mut stream = state?;
                loop {
                    let started = Instant::now();
                    let msg = match stream.message().await {
                        Ok(Some(msg)) => msg,
                        Ok(None) => {
                            let e = unreachable(&config, started, "watch stream closed".into());
                            return Some((Err(e), None));
                        }
                        Err(e) => return Some((Err(map_err(&config, started, e)), None)),
                    };
                    if msg.canceled() {
                        let e = if msg.compact_revision() > 0 {
                            StoreError::Compacted {
                                requested: from,
                                compact_revision: msg.compact_revision(),
                            }
                        } else {
                            StoreError::Rejected(format!("watch canceled: {}", msg.cancel_reason()))
                        };
                        return Some((Err(e), None));
                    }
                    let mut revision = msg.header().map_or(0, |h| h.revision());
                    let mut events = Vec::with_capacity(msg.events().len());
                    for ev in msg.events() {
                        let Some(kv) = ev.kv() else { continue };
                        revision = revision.max(kv.mod_revision());
                        events.push(match ev.event_type() {
                            etcd_client::EventType::Put => WatchEvent::Put(to_kv(kv)),
                            etcd_client::EventType::Delete => WatchEvent::Delete {
                                key: String::from_utf8_lossy(kv.key()).into_owned(),
                                mod_revision: kv.mod_revision(),
                            },
                        });
                    }
                    if msg.created() && events.is_empty() {
                        continue;
                    }
                    return Some((Ok(WatchBatch { events, revision }), Some(stream)));
                }
            }
        });
        Ok(batches.boxed())
    }

    fn describe(&self) -> String {
        self.config.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_cluster_store_urls() {
        let c = EtcdConfig::from_cluster_store("etcd://192.0.2.5:2379").unwrap();
        assert_eq!(c.endpoints, vec!["192.0.2.5:2379"]);
        let c = EtcdConfig::from_cluster_store("etcd://a:1,b:2,etcd://c:3/").unwrap();
        assert_eq!(c.endpoints, vec!["a:1", "b:2", "c:3"]);
        for bad in [
            "consul://a:1",
            "etcd://",
            "etcd://a",
            "etcd://a:0",
            "etcd://a:x",
            "etcd://a:1,",
        ] {
            let err = EtcdConfig::from_cluster_store(bad).unwrap_err();
            assert!(matches!(err, StoreError::InvalidUrl { .. }), "{bad}: {err}");
        }
    }
}
