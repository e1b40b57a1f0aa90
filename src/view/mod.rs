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

use crate::backoff::Backoff;
use crate::cluster::{KnownAddresses, KnownNetworks, StoredNetwork};
use crate::error::Error;
use crate::events::{Change, EventHub};
use crate::model::{Endpoint, EndpointId, Network, NetworkId, Node, NodeId};
use crate::store::keys::KeyKind;
use crate::store::{KeyValue, Keys, Store, StoreError, WatchEvent};
use crate::validate::{self, RecordKind, Rejection};

mod changes;
mod names;
pub use names::answers_to;
use names::NameIndex;

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
    /// The revision of the last change to what the data plane is programmed from (nodes,
    /// networks, endpoints): unlike `revision`, writes elsewhere under the prefix (hosts'
    /// health reports, IPAM cursors) do not move it. A host whose programmed revision is
    /// below another's desired revision lags behind it.
    pub desired_revision: i64,
    /// Each network's endpoints by overlay address: the reconciler looks a changed address
    /// up here instead of scanning the network. IPAM keeps addresses unique per network.
    by_ip: HashMap<NetworkId, HashMap<Ipv4Addr, EndpointId>>,
    /// Each network's endpoints by DNS name and alias (the name server's lookups).
    names: NameIndex,
    /// What changed for remote-endpoint programming since the reconciler last took it.
    peer_changes: PeerChanges,
    /// Records in the store that failed admission (see `validate`), by key: none of them is
    /// in the view. A rejected re-put of a record leaves its last accepted version in place.
    rejected: BTreeMap<String, RejectedRecord>,
    /// How many times a record was refused since the daemon started, by kind.
    rejections: BTreeMap<RecordKind, u64>,
    /// The cluster events derived from what was applied (recorded for the daemon's watcher).
    changes: changes::ChangeLog,
}

/// A record the view refused, and why.
#[derive(Debug, Clone)]
pub struct RejectedRecord {
    pub kind: RecordKind,
    pub reason: Rejection,
    pub mod_revision: i64,
    /// Kept for refusals that another record's change can lift (an endpoint whose network
    /// had not arrived, or whose address another endpoint held).
    retry: Option<KeyValue>,
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
        // Networks and nodes before endpoints (the listing is sorted by key, which puts
        // endpoints first): an endpoint is checked against its network.
        let rank = |kv: &KeyValue| match keys.classify(&kv.key) {
            KeyKind::Network(_) => 0,
            KeyKind::Node(_) => 1,
            _ => 2,
        };
        let mut ordered: Vec<&KeyValue> = kvs.iter().collect();
        ordered.sort_by_key(|kv| rank(kv));
        for kv in ordered {
            view.put(keys, kv);
            if shapes_data_plane(&keys.classify(&kv.key)) {
                view.desired_revision = view.desired_revision.max(kv.mod_revision);
            }
        }
        view.revision = revision;
        view.peer_changes = PeerChanges {
            all: true,
            addrs: HashMap::new(),
        };
        view
    }

    /// Applies one watch event. Records that fail admission (`validate`) are refused,
    /// logged once and listed in [`ClusterView::rejected`]: a stray, hostile or
    /// newer-format record must not stop the daemon nor reach the kernel.
    pub fn apply(&mut self, keys: &Keys, event: &WatchEvent) {
        let (key, rev) = match event {
            WatchEvent::Put(kv) => (&kv.key, kv.mod_revision),
            WatchEvent::Delete { key, mod_revision } => (key, *mod_revision),
        };
        if shapes_data_plane(&keys.classify(key)) {
            self.desired_revision = self.desired_revision.max(rev);
        }
        match event {
            WatchEvent::Put(kv) => self.put(keys, kv),
            WatchEvent::Delete { key, mod_revision } => {
                self.rejected.remove(key);
                match keys.classify(key) {
                    KeyKind::Node(id) => {
                        if let Some(old) = self.nodes.remove(&id) {
                            self.peer_changes.all = true;
                            if self.recording_changes() {
                                self.node_removed(&old, *mod_revision);
                            }
                        }
                    }
                    KeyKind::Network(id) => {
                        if let Some(old) = self.networks.remove(&id) {
                            if self.recording_changes() {
                                self.network_removed(&old.network, *mod_revision);
                            }
                        }
                    }
                    KeyKind::Endpoint(net, id) => {
                        if let Some(old) = self.remove_endpoint(&net, &id) {
                            if self.recording_changes() {
                                self.endpoint_removed(&old, *mod_revision);
                            }
                            let ip = old.ip;
                            self.retry_rejected(keys, |r| {
                                matches!(r.reason, Rejection::AddressTaken { ip: taken, .. } if taken == ip)
                                    && r.retry.as_ref().is_some_and(|kv| {
                                        matches!(keys.classify(&kv.key),
                                            KeyKind::Endpoint(n, _) if n == net)
                                    })
                            });
                        }
                    }
                    KeyKind::Cursor(net) => {
                        self.cursors.remove(&net);
                    }
                    KeyKind::Malformed { .. } | KeyKind::Other => {}
                }
            }
        }
    }

    /// Records `kv` as refused. Logged when the key is refused for a new reason, not on
    /// every re-put of the same bad value.
    fn reject(&mut self, kind: RecordKind, kv: &KeyValue, reason: Rejection) {
        *self.rejections.entry(kind).or_default() += 1;
        let retry = matches!(
            reason,
            Rejection::UnknownNetwork { .. } | Rejection::AddressTaken { .. }
        )
        .then(|| kv.clone());
        let held = self.rejected.get(&kv.key);
        let known = held.is_some_and(|old| old.reason == reason);
        // Every refused store revision is an event; a retry of the same one is not.
        let seen = known && held.is_some_and(|old| old.mod_revision == kv.mod_revision);
        if !known {
            tracing::warn!(key = %kv.key, record = %kind, reason = %reason,
                "refusing a record from the cluster store");
        }
        if !seen && self.recording_changes() {
            self.record_rejected(&kv.key, kind, reason.to_string(), kv.mod_revision);
        }
        self.rejected.insert(
            kv.key.clone(),
            RejectedRecord {
                kind,
                reason,
                mod_revision: kv.mod_revision,
                retry,
            },
        );
    }

    /// Admits again the refused records `lift` picks, now that what refused them changed.
    fn retry_rejected(&mut self, keys: &Keys, lift: impl Fn(&RejectedRecord) -> bool) {
        let again: Vec<KeyValue> = self
            .rejected
            .values()
            .filter(|r| lift(r))
            .filter_map(|r| r.retry.clone())
            .collect();
        // Left listed while retried: admitted, `put` drops it; refused again for the same
        // reason, it is neither logged nor told as an event a second time.
        for kv in again {
            self.put(keys, &kv);
        }
    }

    /// The records refused so far, by key.
    pub fn rejected(&self) -> &BTreeMap<String, RejectedRecord> {
        &self.rejected
    }

    /// How many refusals there were since the daemon started (re-puts included).
    pub fn rejections(&self) -> u64 {
        self.rejections.values().sum()
    }

    /// The refusals since the daemon started, by kind of record (the metrics' series).
    pub fn rejections_by_kind(&self) -> &BTreeMap<RecordKind, u64> {
        &self.rejections
    }

    fn put(&mut self, keys: &Keys, kv: &KeyValue) {
        match keys.classify(&kv.key) {
            KeyKind::Node(id) => match self.admit_node(&id, kv) {
                Ok(node) => {
                    self.rejected.remove(&kv.key);
                    if self.recording_changes() {
                        let was = changes::Was::of(self.nodes.get(&id), &node);
                        self.node_put(was, &node, kv.mod_revision);
                    }
                    let same_vtep = self
                        .nodes
                        .get(&id)
                        .is_some_and(|old| old.advertise_addr == node.advertise_addr);
                    if !same_vtep {
                        self.peer_changes.all = true;
                    }
                    self.nodes.insert(id, node);
                }
                Err(why) => self.reject(RecordKind::Node, kv, why),
            },
            KeyKind::Network(id) => match self.admit_network(&id, kv) {
                Ok(network) => {
                    self.rejected.remove(&kv.key);
                    if self.recording_changes() {
                        let old = self.networks.get(&id).map(|n| &n.network);
                        let was = changes::Was::of(old, &network);
                        self.network_put(was, &network, kv.mod_revision);
                    }
                    self.networks.insert(
                        id.clone(),
                        StoredNetwork {
                            network,
                            create_revision: kv.create_revision,
                            mod_revision: kv.mod_revision,
                        },
                    );
                    self.retry_rejected(keys, |r| {
                        matches!(&r.reason, Rejection::UnknownNetwork { network } if network == id.as_str())
                    });
                }
                Err(why) => self.reject(RecordKind::Network, kv, why),
            },
            KeyKind::Endpoint(net, id) => match self.admit_endpoint(&net, &id, kv) {
                Ok(ep) => {
                    self.rejected.remove(&kv.key);
                    if self.recording_changes() {
                        let old = self.endpoints.get(&net).and_then(|e| e.get(&id));
                        let was = changes::Was::of(old, &ep);
                        self.endpoint_put(was, &ep, kv.mod_revision);
                    }
                    self.put_endpoint(net, id, ep);
                }
                Err(why) => self.reject(RecordKind::Endpoint, kv, why),
            },
            KeyKind::Cursor(net) => {
                let ip = std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|s| s.parse().ok());
                if let Some(ip) = ip {
                    self.cursors.insert(net, ip);
                }
            }
            KeyKind::Malformed { record, rest } => {
                let kind = match record {
                    "node" => RecordKind::Node,
                    "network" => RecordKind::Network,
                    _ => RecordKind::Endpoint,
                };
                let why = Rejection::BadKeyId {
                    what: "path",
                    value: rest,
                };
                self.reject(kind, kv, why);
            }
            KeyKind::Other => {}
        }
    }

    fn admit_node(&self, id: &NodeId, kv: &KeyValue) -> Result<Node, Rejection> {
        let node: Node = validate::parse(RecordKind::Node, &kv.value)?;
        validate::check_node(id, &node)?;
        Ok(node)
    }

    fn admit_network(&self, id: &NetworkId, kv: &KeyValue) -> Result<Network, Rejection> {
        let network: Network = validate::parse(RecordKind::Network, &kv.value)?;
        validate::check_network(id, &network)?;
        // Two networks on one VNI would be one broadcast domain on every host that has both.
        if let Some(other) = self
            .networks
            .values()
            .find(|n| n.network.vni == network.vni && &n.network.id != id)
        {
            return Err(Rejection::VniTaken {
                vni: network.vni,
                holder: other.network.id.short().to_string(),
            });
        }
        Ok(network)
    }

    fn admit_endpoint(
        &self,
        net: &NetworkId,
        id: &EndpointId,
        kv: &KeyValue,
    ) -> Result<Endpoint, Rejection> {
        let ep: Endpoint = validate::parse(RecordKind::Endpoint, &kv.value)?;
        let Some(stored) = self.networks.get(net) else {
            return Err(Rejection::UnknownNetwork {
                network: net.to_string(),
            });
        };
        validate::check_endpoint(net, id, &ep, &stored.network)?;
        if let Some(holder) = self.by_ip.get(net).and_then(|m| m.get(&ep.ip)) {
            if holder != id {
                return Err(Rejection::AddressTaken {
                    ip: ep.ip,
                    holder: holder.short().to_string(),
                });
            }
        }
        Ok(ep)
    }

    fn put_endpoint(&mut self, net: NetworkId, id: EndpointId, mut ep: Endpoint) {
        // Share the IDs' text with the keys already held (the same values): at tens of
        // thousands of endpoints, three copies of 64-character IDs each add up. A re-put
        // keeps the copy the map already holds as its key.
        let id = match self
            .endpoints
            .get(&net)
            .and_then(|eps| eps.get_key_value(&id))
        {
            Some((held, _)) => held.clone(),
            None => id,
        };
        if ep.id == id {
            ep.id = id.clone();
        }
        // Decoded lists grow by doubling: a one-alias list would keep room for four.
        ep.aliases.shrink_to_fit();
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
        let eps = self.endpoints.entry(net.clone()).or_default();
        let old = eps.insert(id.clone(), ep);
        if let Some(old) = &old {
            self.names.remove(&net, old);
        }
        if let Some(new) = eps.get(&id) {
            self.names.insert(&net, new);
        }
        if let Some(old) = old {
            self.forget_ip(&net, &id, old.ip);
        }
    }

    /// Removes an endpoint; returns it.
    fn remove_endpoint(&mut self, net: &NetworkId, id: &EndpointId) -> Option<Endpoint> {
        let eps = self.endpoints.get_mut(net)?;
        let old = eps.remove(id)?;
        if eps.is_empty() {
            self.endpoints.remove(net);
        }
        self.names.remove(net, &old);
        self.forget_ip(net, id, old.ip);
        Some(old)
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

    /// The endpoints of `net` answering to `name` (their name or an alias, in any ASCII
    /// case), in the order they were first seen.
    pub fn endpoints_named<'a>(
        &'a self,
        net: &NetworkId,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Endpoint> + 'a {
        let eps = self.endpoints.get(net);
        self.names
            .candidates(net, name)
            .iter()
            .filter_map(move |id| eps?.get(id))
            .filter(move |ep| answers_to(ep, name))
    }

    /// How many (network, name) entries the name index holds.
    pub fn name_count(&self) -> usize {
        self.names.entries()
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

/// Whether a key's records decide what a host programs (see `desired_revision`).
fn shapes_data_plane(kind: &KeyKind) -> bool {
    matches!(
        kind,
        KeyKind::Node(_) | KeyKind::Network(_) | KeyKind::Endpoint(..) | KeyKind::Malformed { .. }
    )
}

/// A shared, watch-fed view plus a channel announcing each revision it reaches.
#[derive(Clone)]
pub struct SharedView {
    inner: Arc<RwLock<ClusterView>>,
    revision: watch::Receiver<i64>,
    /// The revision of this run's first listing of the store: every record this run
    /// writes comes after it, every record an earlier run wrote is at or before it.
    first_listed: Arc<std::sync::OnceLock<i64>>,
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

    /// The revision of this run's first listing (none before it).
    pub fn first_listed(&self) -> Option<i64> {
        self.first_listed.get().copied()
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
            first_listed: Arc::new(std::sync::OnceLock::from(revision)),
        }
    }
}

/// Starts the watcher task; returns the view it keeps current. What it applies is also
/// published to `events`.
pub fn spawn_watcher(store: Arc<dyn Store>, keys: Keys, events: Arc<EventHub>) -> SharedView {
    let inner = Arc::new(RwLock::new(ClusterView::default()));
    let (tx, rx) = watch::channel(0i64);
    let first_listed = Arc::new(std::sync::OnceLock::new());
    let view = SharedView {
        inner: inner.clone(),
        revision: rx,
        first_listed: first_listed.clone(),
    };
    tokio::spawn(run_watcher(store, keys, inner, tx, first_listed, events));
    view
}

async fn run_watcher(
    store: Arc<dyn Store>,
    keys: Keys,
    view: Arc<RwLock<ClusterView>>,
    revision: watch::Sender<i64>,
    first_listed: Arc<std::sync::OnceLock<i64>>,
    events: Arc<EventHub>,
) {
    // The view's changes of one batch; swapped with the view's empty list, so both buffers
    // are reused from batch to batch.
    let mut changes: Vec<Change> = Vec::new();
    // Jitter adds up to as much again: pauses of 25..50 ms growing to 250..500 ms.
    let mut backoff = Backoff::new(Duration::from_millis(25), MAX_BACKOFF / 2);
    let mut need_list = true;
    loop {
        if need_list {
            match store.list(keys.prefix()).await {
                Ok(listing) => {
                    let mut fresh = ClusterView::from_kvs(&keys, &listing.kvs, listing.revision);
                    fresh.record_changes(true);
                    let listed = listing.kvs.len();
                    drop(listing);
                    let rev = fresh.revision;
                    if let Ok(mut v) = view.write() {
                        // Counted since start-up: a re-list adds its refusals to the earlier ones.
                        for (kind, n) in &v.rejections {
                            *fresh.rejections.entry(*kind).or_default() += n;
                        }
                        // The first listing is the state events start from; a re-list after
                        // a compaction tells what the missed revisions changed.
                        if v.revision > 0 {
                            changes = v.changes_to(&fresh);
                        }
                        *v = fresh;
                    }
                    if !changes.is_empty() {
                        events.publish(changes.drain(..));
                    }
                    // Set before the revision is announced, so a reader woken by it sees it.
                    let _ = first_listed.set(rev);
                    revision.send_replace(rev);
                    need_list = false;
                    backoff.reset();
                    if listed >= TRIM_AFTER_EVENTS {
                        release_freed_memory();
                    }
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
        let mut since_trim = 0usize;
        loop {
            let batch = match tokio::time::timeout(QUIET, stream.next()).await {
                Ok(Some(batch)) => batch,
                Ok(None) => break,
                Err(_) => {
                    // The store went quiet after a burst: hand what decoding it freed back.
                    if since_trim >= TRIM_AFTER_EVENTS {
                        release_freed_memory();
                        since_trim = 0;
                    }
                    continue;
                }
            };
            match batch {
                Ok(batch) => {
                    backoff.reset();
                    since_trim += batch.events.len();
                    if let Ok(mut v) = view.write() {
                        for ev in &batch.events {
                            v.apply(&keys, ev);
                        }
                        v.revision = v.revision.max(batch.revision);
                        v.take_changes(&mut changes);
                    }
                    // Published outside the view's lock: readers of the view never wait
                    // on the event streams.
                    if !changes.is_empty() {
                        events.publish(changes.drain(..));
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

/// A watch this long without an event counts as quiet.
const QUIET: Duration = Duration::from_secs(1);
/// Events applied before a quiet store is worth a trim of the heap.
const TRIM_AFTER_EVENTS: usize = 4096;

/// Gives the allocator's free memory back to the system. A burst of tens of thousands of
/// events (a host with many containers joining, a re-list) leaves the decoding's buffers
/// freed but still counted in RSS, spread over the worker threads' arenas.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The longest pause between two attempts to reach the store. Short enough that the view
/// converges within about half a second of etcd's return; while etcd is away that is two
/// attempts a second (each fails at once on a refused connection, or after the request
/// timeout on a silent one): no busy loop.
pub const MAX_BACKOFF: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Id, Mac, Network};

    fn kv(key: String, value: Vec<u8>) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        }
    }

    fn network(subnet: &str, vni: u32) -> Network {
        let subnet: ipnet::Ipv4Net = subnet.parse().unwrap();
        Network {
            id: Id::random(),
            name: format!("n{vni}"),
            driver: "overlay".into(),
            subnet,
            gateway: Ipv4Addr::from(u32::from(subnet.network()) + 1),
            ip_range: None,
            vni,
            mtu: None,
            labels: Default::default(),
            internal: false,
            created: String::new(),
            created_by: Id::random(),
        }
    }

    fn endpoint(net: &Network, ip: [u8; 4], mac: Option<Mac>) -> Endpoint {
        let ip = Ipv4Addr::from(ip);
        Endpoint {
            id: Id::random(),
            network_id: net.id.clone(),
            name: "e".into(),
            node_id: Id::random(),
            ip,
            mac: mac.unwrap_or(Mac::from_ipv4(ip)),
            created: String::new(),
            aliases: Vec::new(),
        }
    }

    fn put_ep(keys: &Keys, ep: &Endpoint) -> WatchEvent {
        WatchEvent::Put(kv(
            keys.endpoint(&ep.network_id, &ep.id),
            serde_json::to_vec(ep).unwrap(),
        ))
    }

    #[test]
    fn a_listing_admits_endpoints_listed_before_their_network() {
        let keys = Keys::new("/t/");
        let net = network("10.0.4.0/24", 4096);
        let ep = endpoint(&net, [10, 0, 4, 2], None);
        // Sorted by key, as etcd lists them: endpoints/ before networks/.
        let kvs = vec![
            kv(
                keys.endpoint(&net.id, &ep.id),
                serde_json::to_vec(&ep).unwrap(),
            ),
            kv(keys.network(&net.id), serde_json::to_vec(&net).unwrap()),
        ];
        let view = ClusterView::from_kvs(&keys, &kvs, 2);
        assert_eq!(view.endpoints_of(&net.id).count(), 1);
        assert!(view.rejected().is_empty(), "{:?}", view.rejected());
    }

    #[test]
    fn bad_records_are_refused_and_listed_and_others_are_untouched() {
        let keys = Keys::new("/t/");
        let net = network("10.0.4.0/24", 4096);
        let mut view = ClusterView::from_kvs(
            &keys,
            &[kv(keys.network(&net.id), serde_json::to_vec(&net).unwrap())],
            1,
        );
        let good = endpoint(&net, [10, 0, 4, 2], None);
        let multicast = endpoint(&net, [10, 0, 4, 3], Some(Mac([1, 0, 0x5e, 0, 0, 1])));
        let outside = endpoint(&net, [10, 0, 5, 3], None);
        let gateway = endpoint(&net, [10, 0, 4, 1], None);
        let taken = endpoint(&net, [10, 0, 4, 2], None);
        for ep in [&good, &multicast, &outside, &gateway, &taken] {
            view.apply(&keys, &put_ep(&keys, ep));
        }
        view.apply(
            &keys,
            &WatchEvent::Put(kv(
                format!("{}abc", keys.endpoints(&net.id)),
                b"{}".to_vec(),
            )),
        );
        view.apply(
            &keys,
            &WatchEvent::Put(kv(keys.endpoint(&net.id, &Id::random()), b"{oops".to_vec())),
        );
        assert_eq!(
            view.endpoints_of(&net.id)
                .map(|e| e.id.clone())
                .collect::<Vec<_>>(),
            vec![good.id.clone()]
        );
        assert_eq!(view.rejected().len(), 6, "{:?}", view.rejected());
        let reason = |ep: &Endpoint| {
            view.rejected()[&keys.endpoint(&net.id, &ep.id)]
                .reason
                .to_string()
        };
        assert!(reason(&multicast).contains("multicast"));
        assert!(reason(&outside).contains("outside"));
        assert!(reason(&gateway).contains("gateway"));
        assert!(reason(&taken).contains("already belongs"));
        // The first holder goes: the second claimant of its address is admitted.
        view.apply(
            &keys,
            &WatchEvent::Delete {
                key: keys.endpoint(&net.id, &good.id),
                mod_revision: 2,
            },
        );
        assert_eq!(
            view.endpoint_at(&net.id, Ipv4Addr::new(10, 0, 4, 2))
                .map(|e| e.id.clone()),
            Some(taken.id.clone())
        );
        // A bad record's key deleted: no longer listed.
        view.apply(
            &keys,
            &WatchEvent::Delete {
                key: keys.endpoint(&net.id, &multicast.id),
                mod_revision: 3,
            },
        );
        assert_eq!(view.rejected().len(), 4);
        // A second network on the same VNI would share the first one's broadcast domain.
        let twin = network("10.0.9.0/24", 4096);
        view.apply(
            &keys,
            &WatchEvent::Put(kv(
                keys.network(&twin.id),
                serde_json::to_vec(&twin).unwrap(),
            )),
        );
        assert!(!view.networks.contains_key(&twin.id));
    }

    #[test]
    fn a_bad_re_put_keeps_the_last_accepted_version() {
        let keys = Keys::new("/t/");
        let net = network("10.0.4.0/24", 4096);
        let mut view = ClusterView::from_kvs(
            &keys,
            &[kv(keys.network(&net.id), serde_json::to_vec(&net).unwrap())],
            1,
        );
        let ep = endpoint(&net, [10, 0, 4, 2], None);
        view.apply(&keys, &put_ep(&keys, &ep));
        let mut bad = ep.clone();
        bad.mac = Mac([0; 6]);
        view.apply(&keys, &put_ep(&keys, &bad));
        assert_eq!(
            view.endpoint_at(&net.id, ep.ip).map(|e| e.mac),
            Some(ep.mac)
        );
        assert_eq!(view.rejected().len(), 1);
        assert_eq!(view.rejections(), 1);
    }

    #[test]
    fn names_follow_their_endpoints_through_re_puts_and_deletes() {
        let keys = Keys::new("/t/");
        let net = network("10.0.4.0/24", 4096);
        let mut view = ClusterView::from_kvs(
            &keys,
            &[kv(keys.network(&net.id), serde_json::to_vec(&net).unwrap())],
            1,
        );
        let names = |v: &ClusterView, n: &str| {
            v.endpoints_named(&net.id, n)
                .map(|e| e.ip)
                .collect::<Vec<_>>()
        };
        let mut a = endpoint(&net, [10, 0, 4, 2], None);
        a.name = "web1".into();
        a.aliases = vec!["web".into()];
        let mut b = endpoint(&net, [10, 0, 4, 3], None);
        b.name = "web2".into();
        b.aliases = vec!["Web".into()];
        view.apply(&keys, &put_ep(&keys, &a));
        view.apply(&keys, &put_ep(&keys, &b));
        assert_eq!(names(&view, "WEB"), vec![a.ip, b.ip]);
        assert_eq!(names(&view, "web1"), vec![a.ip]);
        // Re-put without the alias: the old name goes, the new one comes.
        a.aliases = vec!["api".into()];
        view.apply(&keys, &put_ep(&keys, &a));
        assert_eq!(names(&view, "web"), vec![b.ip]);
        assert_eq!(names(&view, "api"), vec![a.ip]);
        view.apply(
            &keys,
            &WatchEvent::Delete {
                key: keys.endpoint(&net.id, &b.id),
                mod_revision: 5,
            },
        );
        assert!(names(&view, "web").is_empty());
        assert!(names(&view, "web2").is_empty());
        assert_eq!(view.name_count(), 2, "web1 and api");
    }
}
