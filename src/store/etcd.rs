//! The etcd v3 backend of [`Store`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions,
    GetOptions, Identity, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use tonic::Code;

use crate::metrics::{self, StoreOp};

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
    /// TLS to etcd (`kv.cacertfile` and friends); `None`: plain `http://`.
    pub tls: Option<EtcdTls>,
}

/// TLS material for the store connection, from Docker's `--cluster-store-opt kv.*` options.
/// The files are read when the options are parsed: a missing one is a start-up error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// `kv.cacertfile`: the CA that signed etcd's server certificate.
    pub ca_file: PathBuf,
    pub ca_pem: Vec<u8>,
    /// `kv.certfile` and `kv.keyfile`: this host's client certificate and its key.
    pub client: Option<ClientCert>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    pub cert_file: PathBuf,
    pub cert_pem: Vec<u8>,
    pub key_file: PathBuf,
    pub key_pem: Vec<u8>,
}

/// The `--cluster-store-opt` keys vxnet understands.
pub const STORE_OPT_KEYS: [&str; 3] = ["kv.cacertfile", "kv.certfile", "kv.keyfile"];

/// Parses repeated `--cluster-store-opt KEY=VALUE` options (Docker's form) into the TLS
/// settings: `None` when no option is given. Each file must exist and hold PEM.
pub fn parse_store_opts(opts: &[String]) -> Result<Option<EtcdTls>, StoreError> {
    let invalid = |opt: &str, reason: String| StoreError::InvalidOption {
        opt: opt.to_string(),
        reason,
    };
    let mut files: [Option<(PathBuf, Vec<u8>)>; 3] = [None, None, None];
    for opt in opts {
        let (key, value) = opt.split_once('=').ok_or_else(|| {
            invalid(
                opt,
                "use KEY=VALUE, e.g. kv.cacertfile=/etc/vxnet/ca.pem".into(),
            )
        })?;
        let slot = STORE_OPT_KEYS
            .iter()
            .position(|k| *k == key)
            .ok_or_else(|| {
                invalid(
                    opt,
                    format!("unknown key {key:?}; known: {}", STORE_OPT_KEYS.join(", ")),
                )
            })?;
        if files[slot].is_some() {
            return Err(invalid(opt, format!("{key} is given twice")));
        }
        if value.is_empty() {
            return Err(invalid(opt, format!("{key} needs a file path")));
        }
        let path = PathBuf::from(value);
        files[slot] = Some((path.clone(), read_pem(opt, key, &path)?));
    }
    let [ca, cert, key] = files;
    let client = match (cert, key) {
        (None, None) => None,
        (Some((cert_file, cert_pem)), Some((key_file, key_pem))) => Some(ClientCert {
            cert_file,
            cert_pem,
            key_file,
            key_pem,
        }),
        (Some((path, _)), None) => {
            return Err(invalid(
                &format!("kv.certfile={}", path.display()),
                "a client certificate needs its key: add --cluster-store-opt kv.keyfile=PATH"
                    .into(),
            ))
        }
        (None, Some((path, _))) => {
            return Err(invalid(
                &format!("kv.keyfile={}", path.display()),
                "a client key needs its certificate: add --cluster-store-opt kv.certfile=PATH"
                    .into(),
            ))
        }
    };
    match ca {
        Some((ca_file, ca_pem)) => Ok(Some(EtcdTls {
            ca_file,
            ca_pem,
            client,
        })),
        None if client.is_some() => Err(invalid(
            "kv.certfile",
            "TLS needs the CA that signed etcd's certificate: add --cluster-store-opt kv.cacertfile=PATH".into(),
        )),
        None => Ok(None),
    }
}

fn read_pem(opt: &str, key: &str, path: &Path) -> Result<Vec<u8>, StoreError> {
    let invalid = |reason: String| StoreError::InvalidOption {
        opt: opt.to_string(),
        reason,
    };
    let pem = std::fs::read(path)
        .map_err(|e| invalid(format!("cannot read {key} {}: {e}", path.display())))?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(invalid(format!(
            "{key} {} is not a PEM file (no -----BEGIN line)",
            path.display()
        )));
    }
    Ok(pem)
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
            tls: None,
        })
    }

    fn describe(&self) -> String {
        let tls = if self.tls.is_some() { " (TLS)" } else { "" };
        format!("{}{tls}", self.members())
    }

    /// `etcd://A,B`: the members, as given.
    fn members(&self) -> String {
        format!("etcd://{}", self.endpoints.join(","))
    }

    fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }

    fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &self.user {
            options = options.with_user(user, password);
        }
        if let Some(tls) = self.tls_options() {
            options = options.with_tls(tls);
        }
        options
    }

    fn tls_options(&self) -> Option<TlsOptions> {
        let tls = self.tls.as_ref()?;
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
        if let Some(c) = &tls.client {
            t = t.identity(Identity::from_pem(&c.cert_pem, &c.key_pem));
        }
        Some(t)
    }
}

/// A watch this long without a message asks etcd for a progress answer.
const PROGRESS_AFTER: Duration = Duration::from_secs(5);

/// gRPC's default 4 MB cap on one answer is reached by a listing (or a lagging watch's
/// batch) of about 10,000 endpoints; the view must be able to hold far more.
const MAX_RESPONSE_BYTES: usize = 1 << 30;

/// An etcd client. The connection is lazy: building it never fails because etcd is down,
/// refuses the TLS handshake or the credentials; requests do (after `request_timeout` at
/// most), and each request after a failed connect tries again.
#[derive(Clone)]
pub struct EtcdStore {
    client: Arc<tokio::sync::OnceCell<Client>>,
    config: EtcdConfig,
}

impl EtcdStore {
    /// Checks the configuration (the TLS material must parse) without any network I/O.
    pub async fn connect(config: EtcdConfig) -> Result<Self, StoreError> {
        if let Some(tls) = config.tls_options() {
            for url in config.urls() {
                let endpoint =
                    tonic::transport::Endpoint::from_shared(url.clone()).map_err(|e| {
                        StoreError::InvalidUrl {
                            url: url.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| StoreError::InvalidOption {
                        opt: "kv.cacertfile/kv.certfile/kv.keyfile".into(),
                        reason: format!("unusable TLS material: {}", chain(&e)),
                    })?;
            }
        }
        Ok(EtcdStore {
            client: Arc::new(tokio::sync::OnceCell::new()),
            config,
        })
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// The client, connecting (and authenticating, with a user) on first use.
    async fn client(&self) -> Result<Client, StoreError> {
        let config = &self.config;
        let client = self
            .client
            .get_or_try_init(|| async {
                let started = Instant::now();
                tokio::time::timeout(
                    config.request_timeout,
                    Client::connect(config.urls(), Some(config.connect_options())),
                )
                .await
                .map_err(|_| unreachable(config, started, "connect timed out".into()))?
                .map_err(|e| map_err(config, started, e))
            })
            .await;
        match client {
            Ok(c) => Ok(c.clone()),
            Err(e) => Err(self.diagnose(e).await),
        }
    }

    /// Over TLS, an "unreachable" etcd may be one that refused our certificate (or whose
    /// certificate we refused): one handshake of our own tells which.
    async fn diagnose(&self, e: StoreError) -> StoreError {
        let (StoreError::Unreachable { .. }, Some(tls)) = (&e, &self.config.tls) else {
            return e;
        };
        for endpoint in &self.config.endpoints {
            if let Some(cause) =
                super::tls_probe::probe(endpoint, tls, Duration::from_secs(1)).await
            {
                return tls_error(&self.config, &cause).unwrap_or_else(|| StoreError::Tls {
                    endpoints: self.config.members(),
                    cause,
                    hint: "check kv.cacertfile, kv.certfile and kv.keyfile".into(),
                });
            }
        }
        e
    }

    /// Runs a request with up to `ATTEMPTS` tries within the configured deadline: an etcd
    /// member going away (a killed leader, a reset connection, a proposal dropped by an
    /// election) costs one try, not the request. Only "unreachable" failures are retried.
    /// A retried transaction may already have been applied by the try that timed out; the
    /// callers' compares make that visible (they find their own write) and they treat it as
    /// done.
    async fn call_retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        const ATTEMPTS: u32 = 3;
        let started = Instant::now();
        let per_try = self.config.request_timeout / ATTEMPTS;
        let mut last = None;
        for n in 0..ATTEMPTS {
            let client = match self.client().await {
                Ok(c) => c,
                Err(e) => return Err(e),
            };
            let tried = Instant::now();
            let e = match tokio::time::timeout(per_try, attempt(client)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => map_err(&self.config, started, e),
                Err(_) => unreachable(&self.config, started, "request timed out".into()),
            };
            if !matches!(e, StoreError::Unreachable { .. }) {
                return Err(self.diagnose(e).await);
            }
            last = Some(e);
            // A refused connection fails at once: pause a little before the next try, so that
            // three tries span a moment rather than a microsecond.
            if n + 1 < ATTEMPTS && tried.elapsed() < Duration::from_millis(100) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let e = match last {
            Some(StoreError::Unreachable { cause, .. }) => {
                unreachable(&self.config, started, cause)
            }
            Some(e) => e,
            None => unreachable(&self.config, started, "no attempt made".into()),
        };
        Err(self.diagnose(e).await)
    }

    /// Runs one request with the configured deadline, mapping failures to `StoreError`.
    async fn call<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        let e = match tokio::time::timeout(self.config.request_timeout, fut).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => map_err(&self.config, started, e),
            Err(_) => unreachable(&self.config, started, "request timed out".into()),
        };
        Err(self.diagnose(e).await)
    }
}

/// An error and its sources, joined: transport errors keep the useful part (the TLS alert,
/// the certificate problem) several sources down.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A TLS failure, told apart from an unreachable etcd by what the TLS stack said.
fn tls_error(config: &EtcdConfig, cause: &str) -> Option<StoreError> {
    let lower = cause.to_ascii_lowercase();
    let hint = if lower.contains("certificaterequired")
        || lower.contains("certificate required")
        || lower.contains("badcertificate")
        || lower.contains("bad certificate")
        || lower.contains("unknownca")
    {
        match config.tls.as_ref().and_then(|t| t.client.as_ref()) {
            None => "etcd requires a client certificate: give --cluster-store-opt kv.certfile=PATH and kv.keyfile=PATH",
            Some(_) => "etcd does not accept this client certificate: check kv.certfile/kv.keyfile (signed by a CA etcd trusts via --trusted-ca-file?)",
        }
    } else if lower.contains("invalid peer certificate") || lower.contains("unknownissuer") {
        "etcd's certificate is not trusted (or not valid for the address): check kv.cacertfile and the SANs of etcd's certificate"
    } else if lower.contains("invalidcontenttype")
        || lower.contains("corrupt message")
        || lower.contains("invalid content type")
    {
        "etcd does not speak TLS there: drop the kv.* options, or serve etcd with --cert-file/--key-file"
    } else if config.tls.is_some() && (lower.contains("tls") || lower.contains("handshake")) {
        "check kv.cacertfile, kv.certfile and kv.keyfile"
    } else {
        return None;
    };
    Some(StoreError::Tls {
        endpoints: config.members(),
        cause: cause.to_string(),
        hint: hint.to_string(),
    })
}

fn unreachable(config: &EtcdConfig, started: Instant, cause: String) -> StoreError {
    StoreError::Unreachable {
        endpoints: config.describe(),
        waited: started.elapsed(),
        cause,
    }
}

/// A failure of the connection rather than an answer from etcd: tonic reports some transport
/// errors (a refused certificate, under load) as `Unknown` with the transport error as source.
fn is_transport(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
    ) || std::error::Error::source(status).is_some()
}

fn map_err(config: &EtcdConfig, started: Instant, e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(status) => match status.code() {
            _ if is_transport(&status) => {
                // The message, then what lies under it (tonic's Display of a status is Debug-like).
                let mut cause = status.message().to_string();
                if let Some(source) = std::error::Error::source(&status) {
                    let under = chain(source);
                    if !cause.contains(&under) {
                        cause = format!("{cause}: {under}");
                    }
                }
                tls_error(config, &cause).unwrap_or_else(|| unreachable(config, started, cause))
            }
            _ if status.message().contains("authentication failed") => match &config.user {
                Some((user, _)) => StoreError::BadCredentials {
                    endpoints: config.describe(),
                    user: user.clone(),
                    cause: status.message().to_string(),
                },
                None => StoreError::AuthRequired {
                    endpoints: config.describe(),
                    cause: status.message().to_string(),
                },
            },
            _ if config.user.is_none()
                && (status.message().contains("user name is empty")
                    || status.code() == Code::PermissionDenied
                    || status.code() == Code::Unauthenticated) =>
            {
                StoreError::AuthRequired {
                    endpoints: config.describe(),
                    cause: status.message().to_string(),
                }
            }
            _ if status.message().contains("lease not found") => StoreError::LeaseNotFound(0),
            _ => StoreError::Rejected(format!("{}: {}", status.code(), status.message())),
        },
        E::TransportError(t) => {
            let cause = chain(&t);
            tls_error(config, &cause).unwrap_or_else(|| unreachable(config, started, cause))
        }
        E::IoError(io) => {
            let cause = chain(&io);
            tls_error(config, &cause).unwrap_or_else(|| unreachable(config, started, cause))
        }
        E::LeaseKeepAliveError(m) if m.contains("lease not found") => StoreError::LeaseNotFound(0),
        other => StoreError::Rejected(other.to_string()),
    }
}

/// Runs one store request, recording its latency and any failure (docs/metrics.md).
async fn timed<T>(
    op: StoreOp,
    request: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = request.await;
    let failure = result.as_ref().err().map(StoreError::kind_label);
    metrics::store_request(op, started.elapsed(), failure);
    result
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
        let resp = timed(
            StoreOp::Get,
            self.call_retrying(|c| {
                let mut kv = c.kv_client();
                let key = key.to_string();
                async move { kv.get(key, None).await }
            }),
        )
        .await?;
        Ok(resp.kvs().first().map(to_kv))
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let resp = timed(
            StoreOp::List,
            self.call_retrying(|c| {
                let mut kv = c.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
                let prefix = prefix.to_string();
                async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
            }),
        )
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
        let resp = timed(
            StoreOp::Txn,
            self.call_retrying(|c| {
                let mut kv = c.kv_client();
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            }),
        )
        .await?;
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
        timed(StoreOp::GrantLease, async {
            let mut lease = self.client().await?.lease_client();
            let secs = ttl.as_secs().max(1) as i64;
            let resp = self.call(lease.grant(secs, None)).await?;
            Ok(resp.id())
        })
        .await
    }

    async fn lease_ttl(&self, id: LeaseId) -> Result<Option<Duration>, StoreError> {
        timed(StoreOp::LeaseTtl, async {
            let mut lease = self.client().await?.lease_client();
            let resp = self.call(lease.time_to_live(id, None)).await?;
            // etcd answers -1 for a lease that does not exist (expired or revoked).
            Ok((resp.ttl() > 0).then(|| Duration::from_secs(resp.ttl() as u64)))
        })
        .await
    }

    async fn keep_alive_once(&self, id: LeaseId) -> Result<Duration, StoreError> {
        timed(StoreOp::KeepAlive, async {
            let mut lease = self.client().await?.lease_client();
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
        })
        .await
    }

    async fn revoke_lease(&self, id: LeaseId) -> Result<(), StoreError> {
        timed(StoreOp::RevokeLease, async {
            let mut lease = self.client().await?.lease_client();
            match self.call(lease.revoke(id)).await {
                Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn watch(&self, prefix: &str, from: i64) -> Result<WatchStream, StoreError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let stream = timed(StoreOp::Watch, async {
            let mut watch = self
                .client()
                .await?
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES);
            self.call(watch.watch(prefix, Some(opts))).await
        })
        .await?;
        let config = self.config.clone();
        let batches = futures::stream::unfold(Some(stream), move |state| {
            let config = config.clone();
            async move {
                let mut stream = state?;
                loop {
                    let started = Instant::now();
                    let next = match tokio::time::timeout(PROGRESS_AFTER, stream.message()).await {
                        Ok(next) => next,
                        // Quiet: ask etcd to confirm the watch is alive (the watch-lag metric).
                        Err(_) => match stream.request_progress().await {
                            Ok(()) => continue,
                            Err(e) => return Some((Err(map_err(&config, started, e)), None)),
                        },
                    };
                    let msg = match next {
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
                    metrics::watch_alive();
                    // The answer to a progress request (watch ID -1, no events) proves the
                    // stream alive and no more: etcd 3.4 may send it ahead of events still
                    // queued, so its revision must not move the view on.
                    if msg.watch_id() == -1 && msg.events().is_empty() {
                        continue;
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

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_cluster_store_opts() {
        let dir = crate::lab::process::ScratchDir::new("vxnet-opts").unwrap();
        let pem = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("-----BEGIN CERTIFICATE-----\n{name}\n")).unwrap();
            p.display().to_string()
        };
        let (ca, cert, key) = (pem("ca.pem"), pem("cert.pem"), pem("key.pem"));
        let not_pem = dir.path().join("junk.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        let missing = dir.path().join("missing.pem").display().to_string();

        // No options: plain http, exactly as before.
        assert_eq!(parse_store_opts(&[]).unwrap(), None);
        let mut config = EtcdConfig::from_cluster_store("etcd://a:1,b:2").unwrap();
        assert_eq!(config.urls(), vec!["http://a:1", "http://b:2"]);

        let tls = parse_store_opts(&opts(&[&format!("kv.cacertfile={ca}")]))
            .unwrap()
            .unwrap();
        assert_eq!(tls.ca_file.display().to_string(), ca);
        assert!(tls.client.is_none());
        config.tls = Some(tls);
        assert_eq!(config.urls(), vec!["https://a:1", "https://b:2"]);

        let tls = parse_store_opts(&opts(&[
            &format!("kv.keyfile={key}"),
            &format!("kv.cacertfile={ca}"),
            &format!("kv.certfile={cert}"),
        ]))
        .unwrap()
        .unwrap();
        let client = tls.client.unwrap();
        assert_eq!(client.cert_file.display().to_string(), cert);
        assert_eq!(client.key_file.display().to_string(), key);
        assert!(client.key_pem.starts_with(b"-----BEGIN"));

        let err = |list: &[&str]| match parse_store_opts(&opts(list)) {
            Err(e @ StoreError::InvalidOption { .. }) => e.to_string(),
            other => panic!("{list:?}: {other:?}"),
        };
        let e = err(&["kv.path=/x"]);
        assert!(
            e.contains("unknown key \"kv.path\"") && e.contains("kv.cacertfile"),
            "{e}"
        );
        let e = err(&["kv.cacertfile"]);
        assert!(e.contains("KEY=VALUE"), "{e}");
        let e = err(&["kv.cacertfile="]);
        assert!(e.contains("needs a file path"), "{e}");
        let e = err(&[&format!("kv.cacertfile={missing}")]);
        assert!(
            e.contains("cannot read kv.cacertfile") && e.contains(&missing),
            "{e}"
        );
        let e = err(&[&format!("kv.cacertfile={}", not_pem.display())]);
        assert!(e.contains("not a PEM file"), "{e}");
        let e = err(&[
            &format!("kv.cacertfile={ca}"),
            &format!("kv.certfile={cert}"),
        ]);
        assert!(
            e.contains("needs its key") && e.contains("kv.keyfile"),
            "{e}"
        );
        let e = err(&[&format!("kv.cacertfile={ca}"), &format!("kv.keyfile={key}")]);
        assert!(e.contains("needs its certificate"), "{e}");
        let e = err(&[&format!("kv.certfile={cert}"), &format!("kv.keyfile={key}")]);
        assert!(e.contains("add --cluster-store-opt kv.cacertfile"), "{e}");
        let e = err(&[
            &format!("kv.cacertfile={ca}"),
            &format!("kv.cacertfile={ca}"),
        ]);
        assert!(e.contains("given twice"), "{e}");
    }

    #[tokio::test]
    async fn unusable_tls_material_is_a_startup_error() {
        let mut config = EtcdConfig::from_cluster_store("etcd://127.0.0.1:1").unwrap();
        config.tls = Some(EtcdTls {
            ca_file: "ca.pem".into(),
            ca_pem: b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
                .to_vec(),
            client: None,
        });
        let Err(e) = EtcdStore::connect(config).await else {
            panic!("connected with a broken CA")
        };
        assert!(matches!(e, StoreError::InvalidOption { .. }), "{e}");
    }
}
