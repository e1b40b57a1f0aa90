//! The daemon's in-memory view of the cluster, kept current by one prefix watch.
//!
//! The watcher lists the prefix once, then watches from the list's revision + 1. When the
//! watch breaks it resumes from the last revision it applied; when that revision has been
//! compacted away it re-lists (flannel does the same). It never polls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use std::net::Ipv4Addr;

use crate::cluster::{KnownAddresses, KnownNetworks, StoredNetwork};
use crate::error::Error;
use crate::model::{Endpoint, EndpointId, NetworkId, Node, NodeId};
use crate::store::keys::KeyKind;
use crate::store::{KeyValue, Keys, Store, StoreError, WatchEvent};

/// What the daemon knows of the cluster at one store revision.
#[derive(Debug, Default, Clone)]
pub struct ClusterView {
    pub networks: BTreeMap<NetworkId, StoredNetwork>,
    /// Endpoints by network, then by endpoint ID.
    pub endpoints: BTreeMap<NetworkId, BTreeMap<EndpointId, Endpoint>>,
    pub nodes: BTreeMap<NodeId, Node>,
    /// Each network's IPAM cursor (the last address handed out).
    pub cursors: BTreeMap<NetworkId, Ipv4Addr>,
    /// The store revision this view reflects (0 until the first list).
    pub revision: i64,
    /// Each network's endpoints by overlay address: the reconciler looks a changed address
    /// up here instead of scanning the network. IPAM keeps addresses unique per network.
    by_ip: HashMap<NetworkId, HashMap<Ipv4Addr, EndpointId>>,
    /// What changed for remote-endpoint programming since the reconciler last took it.
    peer_changes: PeerChanges,
}

/// What changed, since the last [`SharedView::take_peer_changes`], in what decides a host's
/// FDB/neighbour entries: lets the reconciler apply a burst of endpoint events without
/// recomputing every network from the whole view.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerChanges {
    /// Recompute everything: the view was (re-)listed, or a node appeared, went or moved
    /// its VTEP (which touches every endpoint of that node).
    pub all: bool,
    /// Per network, the overlay addresses whose endpoint appeared, changed or went.
    pub addrs: HashMap<NetworkId, HashSet<Ipv4Addr>>,
}

impl PeerChanges {
    fn touch(&mut self, net: &NetworkId, ip: Ipv4Addr) {
        if self.all {
            return;
        }
        match self.addrs.get_mut(net) {
            Some(set) => {
                set.insert(ip);
            }
            None => {
                self.addrs.insert(net.clone(), HashSet::from([ip]));
            }
        }
    }
}

impl ClusterView {
    /// Builds a view from a full listing of the prefix.
    pub fn from_kvs(keys: &Keys, kvs: &[KeyValue], revision: i64) -> Self {
        let mut view = ClusterView::default();
        for kv in kvs {
            view.put(keys, kv);
        }
        view.revision = revision;
        view.peer_changes = PeerChanges {
            all: true,
            addrs: HashMap::new(),
        };
        view
    }

    /// Applies one watch event. Records that do not parse are skipped with a warning: a
    /// stray or newer-format key must not stop the daemon.
    pub fn apply(&mut self, keys: &Keys, event: &WatchEvent) {
        match event {
            WatchEvent::Put(kv) => self.put(keys, kv),
            WatchEvent::Delete { key, .. } => match keys.classify(key) {
                KeyKind::Node(id) => {
                    if self.nodes.remove(&id).is_some() {
                        self.peer_changes.all = true;
                    }
                }
                KeyKind::Network(id) => {
                    self.networks.remove(&id);
                }
                KeyKind::Endpoint(net, id) => self.remove_endpoint(&net, &id),
                KeyKind::Cursor(net) => {
                    self.cursors.remove(&net);
                }
                KeyKind::Other => {}
            },
        }
    }

    fn put(&mut self, keys: &Keys, kv: &KeyValue) {
        fn parse<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Option<T> {
            match serde_json::from_slice(&kv.value) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping unreadable record");
                    None
                }
            }
        }
        match keys.classify(&kv.key) {
            KeyKind::Node(id) => {
                if let Some(node) = parse::<Node>(kv) {
                    let same_vtep = self
                        .nodes
                        .get(&id)
                        .is_some_and(|old| old.advertise_addr == node.advertise_addr);
                    if !same_vtep {
                        self.peer_changes.all = true;
                    }
                    self.nodes.insert(id, node);
                }
            }
            KeyKind::Network(id) => {
                if let Some(network) = parse(kv) {
                    self.networks.insert(
                        id,
                        StoredNetwork {
                            network,
                            create_revision: kv.create_revision,
                            mod_revision: kv.mod_revision,
                        },
                    );
                }
            }
            KeyKind::Endpoint(net, id) => {
                if let Some(ep) = parse(kv) {
                    self.put_endpoint(net, id, ep);
                }
            }
            KeyKind::Cursor(net) => {
                let ip = std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|s| s.parse().ok());
                if let Some(ip) = ip {
                    self.cursors.insert(net, ip);
                }
            }
            KeyKind::Other => {}
        }
    }

    fn put_endpoint(&mut self, net: NetworkId, id: EndpointId, mut ep: Endpoint) {
        // Share the IDs' text with the keys already held (the same values): at tens of
        // thousands of endpoints, three copies of 64-character IDs each add up.
        if ep.id == id {
            ep.id = id.clone();
        }
        if let Some((known, _)) = self.nodes.get_key_value(&ep.node_id) {
            ep.node_id = known.clone();
        }
        let net = match self.networks.get_key_value(&net) {
            Some((known, _)) => known.clone(),
            None => net,
        };
        if ep.network_id == net {
            ep.network_id = net.clone();
        }
        self.peer_changes.touch(&net, ep.ip);
        let by_ip = self.by_ip.entry(net.clone()).or_default();
        by_ip.insert(ep.ip, id.clone());
        let old = self
            .endpoints
            .entry(net.clone())
            .or_default()
            .insert(id.clone(), ep);
        if let Some(old) = old {
            self.forget_ip(&net, &id, old.ip);
        }
    }

    fn remove_endpoint(&mut self, net: &NetworkId, id: &EndpointId) {
        let Some(eps) = self.endpoints.get_mut(net) else {
            return;
        };
        let Some(old) = eps.remove(id) else {
            return;
        };
        if eps.is_empty() {
            self.endpoints.remove(net);
        }
        self.forget_ip(net, id, old.ip);
    }

    /// Drops endpoint `id`'s former address `ip` from the index, unless `id` was re-put
    /// with the same address or the address now belongs to another endpoint.
    fn forget_ip(&mut self, net: &NetworkId, id: &EndpointId, ip: Ipv4Addr) {
        let current = self
            .endpoints
            .get(net)
            .and_then(|eps| eps.get(id))
            .map(|e| e.ip);
        if current == Some(ip) {
            return;
        }
        self.peer_changes.touch(net, ip);
        if let Some(by_ip) = self.by_ip.get_mut(net) {
            if by_ip.get(&ip) == Some(id) {
                by_ip.remove(&ip);
            }
            if by_ip.is_empty() {
                self.by_ip.remove(net);
            }
        }
    }

    /// The endpoint holding `ip` in `net`, if any.
    pub fn endpoint_at(&self, net: &NetworkId, ip: Ipv4Addr) -> Option<&Endpoint> {
        let id = self.by_ip.get(net)?.get(&ip)?;
        self.endpoints.get(net)?.get(id)
    }

    /// Takes what changed for peer programming since the last call.
    pub fn take_peer_changes(&mut self) -> PeerChanges {
        std::mem::take(&mut self.peer_changes)
    }

    /// What this view knows of every network, for a create's first attempt.
    pub fn known_networks(&self) -> KnownNetworks {
        KnownNetworks {
            networks: self.networks.values().cloned().collect(),
            revision: self.revision,
        }
    }

    /// What this view knows of one network's claimed addresses, for an attach's first attempt.
    pub fn known_addresses(&self, net: &NetworkId) -> KnownAddresses {
        KnownAddresses {
            taken: self.endpoints_of(net).map(|e| e.ip).collect(),
            cursor: self.cursors.get(net).copied(),
        }
    }

    pub fn resolve_network(&self, reference: &str) -> Result<&StoredNetwork, Error> {
        crate::cluster::resolve(self.networks.values(), reference)
    }

    pub fn endpoints_of(&self, net: &NetworkId) -> impl Iterator<Item = &Endpoint> {
        self.endpoints
            .get(net)
            .into_iter()
            .flat_map(|eps| eps.values())
    }
}

/// A shared, watch-fed view plus a channel announcing each revision it reaches.
#[derive(Clone)]
pub struct SharedView {
    inner: Arc<RwLock<ClusterView>>,
    revision: watch::Receiver<i64>,
}

impl SharedView {
    /// Runs `f` on the current view without copying it.
    pub fn with<R>(&self, f: impl FnOnce(&ClusterView) -> R) -> R {
        match self.inner.read() {
            Ok(v) => f(&v),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    pub fn revision(&self) -> i64 {
        *self.revision.borrow()
    }

    /// Waits until the view has applied `revision` (read-your-writes for this daemon's own
    /// requests). Returns false if that did not happen within `limit`.
    pub async fn wait_for(&self, revision: i64, limit: Duration) -> bool {
        let mut rx = self.revision.clone();
        tokio::time::timeout(limit, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Takes what changed for peer programming since the last call (the reconciler is the
    /// one taker).
    pub fn take_peer_changes(&self) -> PeerChanges {
        match self.inner.write() {
            Ok(mut v) => v.take_peer_changes(),
            Err(poisoned) => poisoned.into_inner().take_peer_changes(),
        }
    }

    /// A receiver that changes whenever the view reaches a new revision.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.revision.clone()
    }

    /// A view that no watcher feeds, for unit tests of its readers.
    #[cfg(test)]
    pub(crate) fn fixed(view: ClusterView) -> SharedView {
        let revision = view.revision;
        SharedView {
            inner: Arc::new(RwLock::new(view)),
            revision: watch::channel(revision).1,
        }
    }
}

/// Starts the watcher task; returns the view it keeps current.
pub fn spawn_watcher(store: Arc<dyn Store>, keys: Keys) -> SharedView {
    let inner = Arc::new(RwLock::new(ClusterView::default()));
    let (tx, rx) = watch::channel(0i64);
    let view = SharedView {
        inner: inner.clone(),
        revision: rx,
    };
    tokio::spawn(run_watcher(store, keys, inner, tx));
    view
}

async fn run_watcher(
    store: Arc<dyn Store>,
    keys: Keys,
    view: Arc<RwLock<ClusterView>>,
    revision: watch::Sender<i64>,
) {
    let mut backoff = Backoff::new();
    let mut need_list = true;
    loop {
        if need_list {
            match store.list(keys.prefix()).await {
                Ok(listing) => {
                    let fresh = ClusterView::from_kvs(&keys, &listing.kvs, listing.revision);
                    let rev = fresh.revision;
                    if let Ok(mut v) = view.write() {
                        *v = fresh;
                    }
                    revision.send_replace(rev);
                    need_list = false;
                    backoff.reset();
                    tracing::debug!(revision = rev, "cluster view listed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the cluster store; retrying");
                    backoff.wait().await;
                    continue;
                }
            }
        }
        let from = *revision.borrow() + 1;
        let mut stream = match store.watch(keys.prefix(), from).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the cluster store; retrying");
                backoff.wait().await;
                continue;
            }
        };
        while let Some(batch) = stream.next().await {
            match batch {
                Ok(batch) => {
                    backoff.reset();
                    if let Ok(mut v) = view.write() {
                        for ev in &batch.events {
                            v.apply(&keys, ev);
                        }
                        v.revision = v.revision.max(batch.revision);
                    }
                    revision.send_if_modified(|r| {
                        let changed = batch.revision > *r;
                        *r = (*r).max(batch.revision);
                        changed
                    });
                }
                Err(StoreError::Compacted { .. }) => {
                    tracing::info!("watch revision compacted; re-listing the cluster store");
                    need_list = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cluster store watch broke; resuming");
                    backoff.wait().await;
                    break;
                }
            }
        }
    }
}

/// The longest pause between two attempts to reach the store. Short enough that the view
/// converges within about half a second of etcd's return; while etcd is away that is two
/// attempts a second (each fails at once on a refused connection, or after the request
/// timeout on a silent one): no busy loop.
pub const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Exponential backoff from 50 ms to [`MAX_BACKOFF`].
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(50))
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(50);
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
    }
}
