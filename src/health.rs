//! The cluster-wide health view: every daemon publishes a report of itself under
//! `health/<node-id>` ([`spawn_publisher`]), and any daemon reads them all back for
//! `vxnet node ls` ([`cluster_status`]).
//!
//! The report carries no lease, unlike the node key: a host that dies loses its node key when
//! its lease runs out, and its last report stays to show it `down` (with when it was last
//! seen) until an operator removes it with `vxnet node rm`.
//!
//! Lag is measured in store revisions, against the reader's own view: a host whose programmed
//! revision is below the revision of the last change the reader saw to nodes, networks or
//! endpoints has not programmed that change yet. Writes of health reports do not count as
//! changes (see `ClusterView::desired_revision`), so the reports do not chase each other.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::model::{Node, NodeId};
use crate::node::Membership;
use crate::reconcile::Reconciler;
use crate::store::{Compare, Keys, Op, Store, StoreError};
use crate::view::SharedView;

/// A report is written at least this often, and soon after each change it reflects.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(10);
/// A live host whose report is older than this has stopped reporting (frozen, overloaded,
/// cut off from the store).
pub const STALE_AFTER: Duration = Duration::from_secs(35);
/// How long after a change a host may take to program it before it counts as lagging.
pub const LAG_GRACE: Duration = Duration::from_secs(5);
/// Changes are gathered this long before a report goes out (a burst makes one write).
const DEBOUNCE: Duration = Duration::from_millis(200);
/// Reports larger than this are refused unread (a real one is well under 4 KiB).
const MAX_REPORT: usize = 64 * 1024;
/// At most this many network errors are published per host.
const MAX_ERRORS: usize = 32;

/// What the daemon says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reported {
    Running,
    /// Stopped cleanly (its containers stay connected; nothing is reconciled until it is back).
    Stopped,
}

/// One host's report, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub node_id: String,
    pub name: String,
    pub address: String,
    pub state: Reported,
    /// The revision its data plane is programmed up to (at most `desired_revision`).
    pub programmed_revision: i64,
    /// The last data-plane change its view has seen.
    pub desired_revision: i64,
    /// Networks with a sandbox on this host.
    pub networks: usize,
    pub local_endpoints: usize,
    /// Networks whose programming is failing here (each retried alone).
    #[serde(default)]
    pub network_errors: Vec<NetworkProblem>,
    /// Records in the store this host refused.
    #[serde(default)]
    pub skipped_records: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    pub version: String,
    pub kernel: String,
    /// RFC 3339.
    pub started: String,
    /// RFC 3339: when this report was written (by the host's clock).
    pub updated: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkProblem {
    pub network: String,
    pub error: String,
}

/// A host as `vxnet node ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: String,
    pub name: String,
    pub address: String,
    /// ready, degraded, lagging, unresponsive, stopped, down or unknown (see `docs/faults.md`).
    pub state: String,
    /// Why the state is what it is, when it is not `ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether its node key (and lease) is in the store.
    pub alive: bool,
    /// Revisions behind this daemon's view (none without a report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    /// Seconds since its last report (by this host's clock; none without a report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_secs: Option<u64>,
    /// Seconds since its daemon started (none when not running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_secs: Option<u64>,
    pub errors: usize,
    /// The daemon answering this request runs on this host.
    #[serde(rename = "self")]
    pub is_self: bool,
    /// The report itself (none yet, or unreadable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<HealthReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no node {0:?}: `vxnet node ls` lists them")]
    NoSuchNode(String),
    #[error("{0:?} names more than one node: give the node ID")]
    Ambiguous(String),
    #[error("node {0} is alive (its lease is held): stop its daemon, or wait for its lease to run out, before removing it")]
    Alive(String),
}

/// When this host's view last saw a data-plane change: a host behind it is lagging only once
/// it had `LAG_GRACE` to catch up.
#[derive(Default)]
pub struct ChangeClock {
    last: Mutex<Option<(i64, Instant)>>,
}

impl ChangeClock {
    fn observe(&self, desired: i64) {
        if let Ok(mut last) = self.last.lock() {
            match *last {
                Some((rev, _)) if rev == desired => {}
                _ => *last = Some((desired, Instant::now())),
            }
        }
    }

    /// True when the change at `desired` was seen more than `LAG_GRACE` ago.
    fn settled(&self, desired: i64) -> bool {
        self.observe(desired);
        self.last
            .lock()
            .ok()
            .and_then(|l| *l)
            .is_none_or(|(_, at)| at.elapsed() >= LAG_GRACE)
    }
}

/// What the publisher reads from the rest of the daemon.
pub struct Sources {
    pub store: Arc<dyn Store>,
    pub keys: Keys,
    pub node: Node,
    pub membership: Arc<Membership>,
    pub view: SharedView,
    pub reconciler: Arc<Reconciler>,
}

/// The publisher's handle: the change clock for readers, and the clean-stop report.
pub struct Publisher {
    sources: Arc<Sources>,
    pub clock: Arc<ChangeClock>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts publishing this host's report; the status line for systemd goes out with each.
pub fn spawn_publisher(sources: Sources) -> Publisher {
    let sources = Arc::new(sources);
    let clock = Arc::new(ChangeClock::default());
    let task = tokio::spawn(publish_loop(sources.clone(), clock.clone()));
    Publisher {
        sources,
        clock,
        task,
    }
}

impl Publisher {
    /// Stops the periodic reports and writes a last one saying the daemon stopped cleanly.
    pub async fn publish_stopped(&self) {
        self.task.abort();
        let report = build_report(&self.sources, Reported::Stopped);
        let put = write_report(&self.sources, &report);
        match tokio::time::timeout(Duration::from_secs(2), put).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot publish the stop in this host's health report")
            }
            Err(_) => tracing::warn!(
                "cluster store too slow: this host's health report does not say it stopped"
            ),
        }
    }
}

async fn publish_loop(sources: Arc<Sources>, clock: Arc<ChangeClock>) {
    let mut revisions = sources.view.subscribe();
    let mut registered = sources.membership.registered();
    let mut last: Option<HealthReport> = None;
    let mut written_at = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until((written_at + PUBLISH_EVERY).into()) => {}
            r = revisions.changed() => {
                if r.is_err() {
                    return;
                }
                tokio::time::sleep(DEBOUNCE).await;
            }
            r = registered.changed() => {
                if r.is_err() {
                    return;
                }
            }
        }
        if !*registered.borrow_and_update() {
            continue;
        }
        let report = build_report(&sources, Reported::Running);
        clock.observe(report.desired_revision);
        let due = written_at.elapsed() >= PUBLISH_EVERY;
        let changed = last.as_ref().is_none_or(|l| !same_but_time(l, &report));
        if !(due || changed) {
            continue;
        }
        crate::systemd::notify(&[crate::systemd::Notice::Status(&status_line(&report))]);
        match write_report(&sources, &report).await {
            Ok(()) => {
                last = Some(report);
                written_at = Instant::now();
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot publish this host's health report; retrying");
                // Try again at the next tick rather than in a tight loop.
                written_at = Instant::now();
            }
        }
    }
}

fn same_but_time(a: &HealthReport, b: &HealthReport) -> bool {
    let mut b = b.clone();
    b.updated = a.updated.clone();
    *a == b
}

/// The line `systemctl status vxnet` shows.
fn status_line(r: &HealthReport) -> String {
    let mut s = format!(
        "serving: {} network(s) here, {} local endpoint(s)",
        r.networks, r.local_endpoints
    );
    if !r.network_errors.is_empty() {
        s.push_str(&format!("; {} network(s) failing", r.network_errors.len()));
    }
    if let Some(e) = &r.store_error {
        s.push_str(&format!("; store: {e}"));
    }
    s
}

fn build_report(s: &Sources, state: Reported) -> HealthReport {
    let (desired_revision, skipped_records, local_endpoints) = s.view.with(|v| {
        let local = v
            .endpoints
            .values()
            .flat_map(|eps| eps.values())
            .filter(|e| e.node_id == s.node.id)
            .count();
        (v.desired_revision, v.rejected().len(), local)
    });
    let network_errors = s
        .reconciler
        .network_errors()
        .into_iter()
        .take(MAX_ERRORS)
        .map(|e| NetworkProblem {
            network: e.network,
            error: e.error,
        })
        .collect();
    HealthReport {
        node_id: s.node.id.to_string(),
        name: s.node.name.clone(),
        address: s.node.advertise_addr.to_string(),
        state,
        // Capped at the last data-plane change: past it, a higher revision only counts other
        // hosts' reports, and publishing it would have every report chase the others.
        programmed_revision: s.reconciler.programmed_revision().min(desired_revision),
        desired_revision,
        networks: s.reconciler.programmed_networks(),
        local_endpoints,
        network_errors,
        skipped_records,
        store_error: s.membership.store_error(),
        version: s.node.version.clone(),
        kernel: kernel_release(),
        started: s.node.started.clone(),
        updated: crate::model::now_rfc3339(),
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

async fn write_report(s: &Sources, report: &HealthReport) -> Result<(), StoreError> {
    let value = serde_json::to_vec(report).unwrap_or_default();
    s.store
        .txn(
            vec![],
            vec![Op::put(s.keys.health(&s.node.id), value)],
            vec![],
        )
        .await
        .map(|_| ())
}

/// Every host: those with a node key, and those with only a report left.
pub async fn cluster_status(
    store: &dyn Store,
    keys: &Keys,
    view: &SharedView,
    me: &NodeId,
    clock: &ChangeClock,
) -> Result<Vec<NodeStatus>, StoreError> {
    let listing = store.list(&keys.healths()).await?;
    let (alive, desired) = view.with(|v| (v.nodes.clone(), v.desired_revision));
    let settled = clock.settled(desired);
    let now = SystemTime::now();
    let mut out = Vec::new();
    let mut reported = std::collections::HashSet::new();
    for kv in &listing.kvs {
        let Some(id) = kv.key.strip_prefix(&keys.healths()) else {
            continue;
        };
        let Ok(id) = id.parse::<NodeId>() else {
            out.push(unreadable(id, "its key does not hold a node ID"));
            continue;
        };
        reported.insert(id.clone());
        let report = read_report(&id, &kv.value);
        let node = alive.get(&id);
        out.push(match report {
            Ok(r) => status_of(&id, node, Some(r), desired, settled, now, me),
            Err(reason) => {
                let mut s = status_of(&id, node, None, desired, settled, now, me);
                s.state = "unknown".into();
                s.reason = Some(reason);
                s
            }
        });
    }
    for (id, node) in &alive {
        if !reported.contains(id) {
            out.push(status_of(id, Some(node), None, desired, settled, now, me));
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    Ok(out)
}

fn unreadable(key_rest: &str, reason: &str) -> NodeStatus {
    NodeStatus {
        id: key_rest.chars().take(64).collect(),
        name: String::new(),
        address: String::new(),
        state: "unknown".into(),
        reason: Some(format!("unreadable health record: {reason}")),
        alive: false,
        lag: None,
        last_seen_secs: None,
        uptime_secs: None,
        errors: 0,
        is_self: false,
        report: None,
    }
}

/// A stored report, checked: anyone who reaches etcd can write one.
fn read_report(id: &NodeId, value: &[u8]) -> Result<HealthReport, String> {
    if value.len() > MAX_REPORT {
        return Err(format!(
            "unreadable health record: {} bytes (at most {MAX_REPORT})",
            value.len()
        ));
    }
    let r: HealthReport =
        serde_json::from_slice(value).map_err(|e| format!("unreadable health record: {e}"))?;
    if r.node_id != id.as_str() {
        return Err("health record names another node than its key".into());
    }
    Ok(r)
}

fn parse_time(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

fn status_of(
    id: &NodeId,
    node: Option<&Node>,
    report: Option<HealthReport>,
    desired: i64,
    settled: bool,
    now: SystemTime,
    me: &NodeId,
) -> NodeStatus {
    let since =
        |t: &str| parse_time(t).map(|t| now.duration_since(t).unwrap_or_default().as_secs());
    let last_seen_secs = report.as_ref().and_then(|r| since(&r.updated));
    let lag = report
        .as_ref()
        .map(|r| (desired - r.programmed_revision).max(0));
    let errors = report
        .as_ref()
        .map(|r| r.network_errors.len() + usize::from(r.store_error.is_some()))
        .unwrap_or(0);
    let stale = last_seen_secs.is_some_and(|s| s > STALE_AFTER.as_secs());
    let (state, reason) = match (node, &report) {
        (_, Some(r)) if r.state == Reported::Stopped => (
            "stopped",
            Some("its daemon was stopped cleanly".to_string()),
        ),
        (None, Some(_)) => (
            "down",
            Some("its lease ran out: the host or its daemon is gone".to_string()),
        ),
        (None, None) => ("down", None),
        (Some(_), None) => (
            "unknown",
            Some("no health report yet (just started, or an older vxnet)".to_string()),
        ),
        (Some(_), Some(_)) if stale => (
            "unresponsive",
            Some(format!(
                "no report for {} s though its lease is held: frozen, overloaded or cut off",
                last_seen_secs.unwrap_or_default()
            )),
        ),
        (Some(_), Some(r)) if settled && lag.is_some_and(|l| l > 0) => (
            "lagging",
            Some(format!(
                "programmed up to revision {}, the cluster is at {desired}",
                r.programmed_revision
            )),
        ),
        (Some(_), Some(r)) if errors > 0 => (
            "degraded",
            Some(
                r.network_errors
                    .first()
                    .map(|e| format!("network {}: {}", e.network, e.error))
                    .or_else(|| r.store_error.clone())
                    .unwrap_or_default(),
            ),
        ),
        (Some(_), Some(_)) => ("ready", None),
    };
    let running = node.is_some()
        && report
            .as_ref()
            .is_some_and(|r| r.state == Reported::Running);
    NodeStatus {
        id: id.to_string(),
        name: node
            .map(|n| n.name.clone())
            .or_else(|| report.as_ref().map(|r| r.name.clone()))
            .unwrap_or_default(),
        address: node
            .map(|n| n.advertise_addr.to_string())
            .or_else(|| report.as_ref().map(|r| r.address.clone()))
            .unwrap_or_default(),
        state: state.to_string(),
        reason,
        alive: node.is_some(),
        lag,
        last_seen_secs,
        uptime_secs: running
            .then(|| report.as_ref().and_then(|r| since(&r.started)))
            .flatten(),
        errors,
        is_self: id == me,
        report,
    }
}

/// `vxnet node rm`: forgets a host that is gone (its report); a live one is refused.
pub async fn remove_node(
    store: &dyn Store,
    keys: &Keys,
    statuses: &[NodeStatus],
    reference: &str,
) -> Result<NodeStatus, HealthError> {
    let matches: Vec<&NodeStatus> = statuses
        .iter()
        .filter(|s| s.id == reference || s.name == reference)
        .collect();
    let matches = if matches.is_empty() {
        statuses
            .iter()
            .filter(|s| reference.len() >= 4 && s.id.starts_with(reference))
            .collect()
    } else {
        matches
    };
    let target = match matches.as_slice() {
        [one] => (*one).clone(),
        [] => return Err(HealthError::NoSuchNode(reference.to_string())),
        _ => return Err(HealthError::Ambiguous(reference.to_string())),
    };
    let Ok(id) = target.id.parse::<NodeId>() else {
        return Err(HealthError::NoSuchNode(reference.to_string()));
    };
    // Only while the node key is absent: a host that came back meanwhile keeps its report.
    let outcome = store
        .txn(
            vec![Compare::Absent(keys.node(&id))],
            vec![Op::Delete(keys.health(&id))],
            vec![],
        )
        .await?;
    if !outcome.succeeded {
        return Err(HealthError::Alive(target.name.clone()));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Id;

    fn report(id: &NodeId, programmed: i64, updated: SystemTime) -> HealthReport {
        HealthReport {
            node_id: id.to_string(),
            name: "vm3".into(),
            address: "192.0.2.7".into(),
            state: Reported::Running,
            programmed_revision: programmed,
            desired_revision: programmed,
            networks: 1,
            local_endpoints: 2,
            network_errors: vec![],
            skipped_records: 0,
            store_error: None,
            version: "0.1.0".into(),
            kernel: "6.1".into(),
            started: humantime::format_rfc3339(updated).to_string(),
            updated: humantime::format_rfc3339(updated).to_string(),
        }
    }

    fn node(id: &NodeId) -> Node {
        Node {
            id: id.clone(),
            name: "vm3".into(),
            advertise_addr: "192.0.2.7".parse().unwrap(),
            advertise_port: None,
            started: crate::model::now_rfc3339(),
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn states_follow_lease_report_and_lag() {
        let id = Id::random();
        let me = Id::random();
        let now = SystemTime::now();
        let n = node(&id);
        let fresh = report(&id, 10, now);
        let s =
            |node, r, desired, settled| status_of(&id, node, r, desired, settled, now, &me).state;
        assert_eq!(s(Some(&n), Some(fresh.clone()), 10, true), "ready");
        assert_eq!(s(Some(&n), Some(fresh.clone()), 12, false), "ready");
        assert_eq!(s(Some(&n), Some(fresh.clone()), 12, true), "lagging");
        assert_eq!(s(None, Some(fresh.clone()), 10, true), "down");
        let old = report(&id, 10, now - Duration::from_secs(60));
        assert_eq!(s(Some(&n), Some(old), 10, true), "unresponsive");
        let mut failing = fresh.clone();
        failing.network_errors.push(NetworkProblem {
            network: "blue".into(),
            error: "EBUSY".into(),
        });
        assert_eq!(s(Some(&n), Some(failing), 10, true), "degraded");
        let mut stopped = fresh;
        stopped.state = Reported::Stopped;
        assert_eq!(s(Some(&n), Some(stopped), 10, true), "stopped");
        assert_eq!(s(Some(&n), None, 10, true), "unknown");
    }

    #[test]
    fn hostile_reports_are_refused() {
        let id = Id::random();
        let other = Id::random();
        let r = serde_json::to_vec(&report(&other, 1, SystemTime::now())).unwrap();
        assert!(read_report(&id, &r).is_err());
        assert!(read_report(&id, b"{not json").is_err());
        assert!(read_report(&id, &vec![b' '; MAX_REPORT + 1]).is_err());
    }
}
