//! Prometheus metrics (`vxnet daemon --metrics-addr IP:PORT`, docs/metrics.md).
//!
//! Two halves. This file holds what is counted as it happens — store requests, peer
//! programming, reconcile runs, CNI requests, the watch's last sign of life — in
//! process-wide instruments behind a few narrow calls (`store_request`, `peers_programmed`,
//! …) that the store, the reconciler and the API make. It uses nothing of vxnet, so the
//! lowest layers (the store) can call it. `collect.rs` reads at scrape time what the daemon
//! already keeps (the view's sizes and refusals, the name server's and the Docker plugin's
//! counters, failing networks) rather than counting it a second time; `serve.rs` is the
//! listener.
//!
//! Process-wide rather than passed around: one daemon runs per process, and a handle
//! threaded through every constructor would touch every module for no gain. Tests that
//! run several daemons run them as processes.

pub mod collect;
pub mod serve;

use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// One store operation, as the `op` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreOp {
    Get,
    List,
    Txn,
    GrantLease,
    LeaseTtl,
    KeepAlive,
    RevokeLease,
    Watch,
}

impl StoreOp {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Get => "get",
            StoreOp::List => "list",
            StoreOp::Txn => "txn",
            StoreOp::GrantLease => "grant_lease",
            StoreOp::LeaseTtl => "lease_ttl",
            StoreOp::KeepAlive => "keep_alive",
            StoreOp::RevokeLease => "revoke_lease",
            StoreOp::Watch => "watch",
        }
    }
}

/// How a network was reconciled: `full` reads the kernel back and fixes everything (start-up,
/// `vxnet reconcile`, a failed network's retry); `peers` applies the FDB/neighbour changes a
/// watch event brought.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReconcileKind {
    Full,
    Peers,
}

impl ReconcileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReconcileKind::Full => "full",
            ReconcileKind::Peers => "peers",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpErrorLabels {
    op: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabels {
    command: &'static str,
    result: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

/// Runs and failures of one network's reconciles, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileCounts {
    pub runs: u64,
    pub errors: u64,
}

struct Instruments {
    store_duration: HistogramFamily<OpLabels>,
    store_errors: Family<OpErrorLabels, Counter>,
    peer_programming: Histogram,
    cni_requests: Family<CniLabels, Counter>,
    /// By network ID (full), then kind. Not a `Family`: the collector names each network
    /// from the view and drops the networks this host no longer programs (a `Family` cannot
    /// be listed), which bounds the series to the networks with something attached here.
    reconcile: Mutex<BTreeMap<String, BTreeMap<ReconcileKind, ReconcileCounts>>>,
    /// When the store's watch last delivered something (events or a progress answer).
    watch_alive: Mutex<Instant>,
}

/// 0.5 ms .. ~4 s: a store round trip on a LAN is about a millisecond, a retried one up to
/// the request timeout (3 s).
fn store_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

static METRICS: LazyLock<Instruments> = LazyLock::new(|| Instruments {
    store_duration: Family::new_with_constructor(store_buckets),
    store_errors: Family::default(),
    // 50 µs .. ~1.6 s: one netlink batch of FDB/neighbour entries takes tens of µs to ms.
    peer_programming: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
    cni_requests: Family::default(),
    reconcile: Mutex::new(BTreeMap::new()),
    watch_alive: Mutex::new(Instant::now()),
});

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding a counter's lock leaves the counter usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One store request done: its latency by operation, and its failure by kind (a short
/// fixed word from the store's error, e.g. `unreachable`, `rejected`).
pub fn store_request(op: StoreOp, elapsed: Duration, error_kind: Option<&'static str>) {
    let m = &*METRICS;
    m.store_duration
        .get_or_create(&OpLabels { op: op.as_str() })
        .observe(elapsed.as_secs_f64());
    if let Some(kind) = error_kind {
        m.store_errors
            .get_or_create(&OpErrorLabels {
                op: op.as_str(),
                kind,
            })
            .inc();
    }
}

/// One peer plan applied to the kernel (or tried): how long it took.
pub fn peers_programmed(elapsed: Duration) {
    METRICS.peer_programming.observe(elapsed.as_secs_f64());
}

/// One reconcile of network `network_id` done, failed or not.
pub fn reconcile_run(network_id: &str, kind: ReconcileKind, failed: bool) {
    let mut all = lock(&METRICS.reconcile);
    let per_kind = match all.get_mut(network_id) {
        Some(k) => k,
        None => all.entry(network_id.to_string()).or_default(),
    };
    let c = per_kind.entry(kind).or_default();
    c.runs += 1;
    if failed {
        c.errors += 1;
    }
}

/// The reconcile counts, by network ID and kind; networks `keep` refuses are dropped first
/// (a network gone from this host takes its series with it).
pub fn reconcile_counts(
    keep: impl Fn(&str) -> bool,
) -> BTreeMap<String, BTreeMap<ReconcileKind, ReconcileCounts>> {
    let mut all = lock(&METRICS.reconcile);
    all.retain(|id, _| keep(id));
    all.clone()
}

/// One request of the CNI plugin served: `result` is `ok` or the error's kind.
pub fn cni_request(command: &'static str, result: &'static str) {
    METRICS
        .cni_requests
        .get_or_create(&CniLabels { command, result })
        .inc();
}

/// The store's watch delivered something: it is alive and being read.
pub fn watch_alive() {
    *lock(&METRICS.watch_alive) = Instant::now();
}

/// How long ago the watch last delivered something (since start-up, before the first).
pub fn watch_silence() -> Duration {
    lock(&METRICS.watch_alive).elapsed()
}

/// Registers the instruments of this file under `vxnet_` (the collector adds the rest).
fn register_instruments(registry: &mut Registry) {
    let m = &*METRICS;
    registry.register_with_unit(
        "store_request_duration",
        "Cluster store requests by operation: latency, retries within one request included",
        Unit::Seconds,
        m.store_duration.clone(),
    );
    registry.register(
        "store_request_errors",
        "Cluster store requests that failed, by operation and kind of failure",
        m.store_errors.clone(),
    );
    registry.register_with_unit(
        "peer_programming_duration",
        "Time to apply one peer plan (FDB and neighbour entries of one network) to the kernel",
        Unit::Seconds,
        m.peer_programming.clone(),
    );
    registry.register(
        "cni_requests",
        "Requests of the CNI plugin (vxnet-cni) served, by command and result",
        m.cni_requests.clone(),
    );
}

/// A registry of every vxnet series: this file's instruments and `collector`'s.
pub fn registry(collector: collect::DaemonCollector) -> Registry {
    let mut registry = Registry::with_prefix("vxnet");
    register_instruments(&mut registry);
    registry.register_collector(Box::new(collector));
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruments_encode_with_units_and_labels() {
        store_request(StoreOp::Txn, Duration::from_millis(2), None);
        store_request(StoreOp::Txn, Duration::from_millis(3), Some("unreachable"));
        peers_programmed(Duration::from_micros(80));
        cni_request("add", "ok");
        let mut registry = Registry::with_prefix("vxnet");
        register_instruments(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("# TYPE vxnet_store_request_duration_seconds histogram"));
        assert!(text.contains("vxnet_store_request_duration_seconds_count{op=\"txn\"}"));
        assert!(text.contains("vxnet_store_request_errors_total{op=\"txn\",kind=\"unreachable\"}"));
        assert!(text.contains("vxnet_peer_programming_duration_seconds_count"));
        assert!(text.contains("vxnet_cni_requests_total{command=\"add\",result=\"ok\"}"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn reconcile_counts_drop_networks_no_longer_kept() {
        reconcile_run("net-a", ReconcileKind::Full, false);
        reconcile_run("net-a", ReconcileKind::Peers, true);
        reconcile_run("net-b", ReconcileKind::Full, false);
        let counts = reconcile_counts(|id| id != "net-b");
        let a = &counts["net-a"];
        assert_eq!(a[&ReconcileKind::Full].runs, 1);
        assert_eq!(
            a[&ReconcileKind::Peers],
            ReconcileCounts { runs: 1, errors: 1 }
        );
        assert!(!counts.contains_key("net-b"));
        assert!(!reconcile_counts(|_| true).contains_key("net-b"));
    }
}
