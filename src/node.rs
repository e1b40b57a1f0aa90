//! This host's membership in the cluster: a stable node ID kept in the state directory, and a
//! node key held alive by an etcd lease. Endpoints are written with the same lease, so when
//! a host dies and stops refreshing it, etcd removes its endpoints and addresses by itself.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::cluster::LeaseSource;
use crate::model::{Id, Node, NodeId};
use crate::store::Keys;
use crate::store::{LeaseId, Op, Store, StoreError};

const NODE_ID_FILE: &str = "node-id";
const LEASE_FILE: &str = "lease";

/// Reads this host's node ID from the state directory, creating it on first start.
pub fn load_or_create_node_id(state_dir: &Path) -> io::Result<NodeId> {
    let path = state_dir.join(NODE_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map_err(|e: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: {e}; remove the file to get a new node ID",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = Id::random();
            write_atomically(&path, id.as_str().as_bytes())?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

/// Writes a file by write-to-temporary + fsync + rename, so a crash leaves the old or the
/// new content, never half of one.
pub fn write_atomically(path: &Path, content: &[u8]) -> io::Result<()> {
    write_via_temporary(path, content, true)
}

/// Writes a file by write-to-temporary + rename, without fsync: a crash of this process
/// leaves the old or the new content (the page cache outlives the process), a power loss
/// may leave either or an empty file. For state that dies with the machine anyway (a
/// container's record: its process does not survive a reboot), where an fsync per write
/// would be most of an attach's cost on a disk.
pub fn write_replacing(path: &Path, content: &[u8]) -> io::Result<()> {
    write_via_temporary(path, content, false)
}

fn write_via_temporary(path: &Path, content: &[u8], fsync: bool) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // The mode only applies when the file is created: a leftover temporary of a crashed run
    // may be looser, so it goes first.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    {
        // Records name containers, addresses and the node's lease: readable by root only,
        // from the first byte on.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(content)?;
        if fsync {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, path)
}

/// The lease this node currently holds, shared with the cluster operations.
pub struct Membership {
    lease: RwLock<Option<LeaseId>>,
    registered: watch::Sender<bool>,
    /// The store revision at which this node's key was last written (0: never).
    registered_at: std::sync::atomic::AtomicI64,
    /// The lease after each (re-)registration: a new value means this node's endpoints may
    /// be gone from the store (the old lease expired) and must be claimed again.
    leases: watch::Sender<Option<LeaseId>>,
    /// The last error talking to the store (registration or keep-alive), cleared by the next
    /// success: `vxnet info` shows it.
    store_error: RwLock<Option<String>>,
}

impl LeaseSource for Membership {
    fn current_lease(&self) -> Option<LeaseId> {
        self.lease.read().ok().and_then(|l| *l)
    }
}

impl Membership {
    /// The store revision of this node's registration: a view at or past it has seen this
    /// node (and everything registered before it).
    pub fn registered_at(&self) -> i64 {
        self.registered_at
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// True while this node is registered under a live lease.
    pub fn registered(&self) -> watch::Receiver<bool> {
        self.registered.subscribe()
    }

    /// Changes whenever the node registers with a lease (the first time, and again after
    /// its lease expired).
    pub fn leases(&self) -> watch::Receiver<Option<LeaseId>> {
        self.leases.subscribe()
    }

    /// Why the last registration or keep-alive failed, if the last attempt did.
    pub fn store_error(&self) -> Option<String> {
        self.store_error.read().ok().and_then(|e| e.clone())
    }

    fn set_store_error(&self, error: Option<&StoreError>) {
        if let Ok(mut e) = self.store_error.write() {
            *e = error.map(|e| e.to_string());
        }
    }

    fn set(&self, lease: Option<LeaseId>) {
        if let Ok(mut l) = self.lease.write() {
            *l = lease;
        }
        self.registered.send_replace(lease.is_some());
        if lease.is_some() {
            self.leases.send_replace(lease);
        }
    }
}

/// Registers the node and keeps its lease alive, for as long as the runtime runs.
pub fn spawn_membership(
    store: Arc<dyn Store>,
    keys: Keys,
    node: Node,
    ttl: Duration,
    state_dir: PathBuf,
) -> Arc<Membership> {
    let (registered, _) = watch::channel(false);
    let membership = Arc::new(Membership {
        lease: RwLock::new(None),
        registered,
        registered_at: std::sync::atomic::AtomicI64::new(0),
        leases: watch::channel(None).0,
        store_error: RwLock::new(None),
    });
    tokio::spawn(keep_membership(
        store,
        keys,
        node,
        ttl,
        state_dir,
        membership.clone(),
    ));
    membership
}

async fn keep_membership(
    store: Arc<dyn Store>,
    keys: Keys,
    node: Node,
    ttl: Duration,
    state_dir: PathBuf,
    membership: Arc<Membership>,
) {
    let lease_path = state_dir.join(LEASE_FILE);
    let refresh_every = ttl / 3;
    // Pauses of 25..50 ms growing to 250..500 ms (view::MAX_BACKOFF), as the watcher's.
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(25), crate::view::MAX_BACKOFF / 2);
    loop {
        let lease = match register(&*store, &keys, &node, ttl, &lease_path).await {
            Ok((lease, revision)) => {
                backoff.reset();
                membership
                    .registered_at
                    .store(revision, std::sync::atomic::Ordering::Release);
                lease
            }
            Err(e) => {
                membership.set_store_error(Some(&e));
                tracing::warn!(error = %e, "cannot register this node in the cluster store; retrying");
                backoff.wait().await;
                continue;
            }
        };
        membership.set_store_error(None);
        membership.set(Some(lease));
        tracing::info!(node = %node.id.short(), lease = format!("{lease:x}"), "registered in the cluster store");
        let mut pause = refresh_every;
        loop {
            tokio::time::sleep(pause).await;
            pause = refresh_every;
            let refreshed = store.keep_alive_once(lease).await;
            membership.set_store_error(refreshed.as_ref().err());
            match refreshed {
                Ok(_) => {}
                Err(StoreError::LeaseNotFound(_)) => {
                    tracing::warn!(
                        lease = format!("{lease:x}"),
                        "node lease expired; registering again"
                    );
                    membership.set(None);
                    break;
                }
                // The lease survives while etcd is away (etcd extends leases across leader
                // changes and restarts); keep trying on the same lease, as often as the
                // watcher does, so it is refreshed soon after etcd's return.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot refresh the node lease");
                    pause = crate::view::MAX_BACKOFF.min(refresh_every);
                }
            }
        }
    }
}

/// Reuses the lease of a previous run if it is still alive (a restart within the TTL keeps
/// every endpoint in place), otherwise grants a new one; then writes the node key with it.
async fn register(
    store: &dyn Store,
    keys: &Keys,
    node: &Node,
    ttl: Duration,
    lease_path: &Path,
) -> Result<(LeaseId, i64), StoreError> {
    let previous = fs::read_to_string(lease_path)
        .ok()
        .and_then(|s| i64::from_str_radix(s.trim(), 16).ok());
    let mut lease = None;
    if let Some(old) = previous {
        if store.lease_ttl(old).await?.is_some() && store.keep_alive_once(old).await.is_ok() {
            lease = Some(old);
        }
    }
    let lease = match lease {
        Some(l) => l,
        None => {
            let l = store.grant_lease(ttl).await?;
            if let Err(e) = write_atomically(lease_path, format!("{l:x}").as_bytes()) {
                tracing::warn!(error = %e, path = %lease_path.display(), "cannot save the lease ID");
            }
            l
        }
    };
    let value = serde_json::to_vec(node).unwrap_or_default();
    let written = store
        .txn(
            vec![],
            vec![Op::put_leased(keys.node(&node.id), value, lease)],
            vec![],
        )
        .await?;
    Ok((lease, written.revision))
}
