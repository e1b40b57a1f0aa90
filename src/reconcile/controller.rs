//! The controller loop: the peer sync from every view change, the full resync, and the
//! per-network retries with backoff (one failing network never stalls the others).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::peers::{apply_plan, plan_peers};
use super::report::{NetworkError, NetworkResync, ResyncReport};
use super::{sandbox_name, Reconciler};
use crate::backoff::Backoff;
use crate::dataplane;
use crate::error::Error;
use crate::metrics::{self, ReconcileKind};
use crate::model::NetworkId;
use crate::sync::lock;

/// A network whose last reconcile failed: it is retried alone, with backoff, while every
/// other network goes on converging.
pub(super) struct Failure {
    error: String,
    attempts: u32,
    retry_at: tokio::time::Instant,
    backoff: Backoff,
}

/// The first retry of a failed network comes after 50..100 ms; later ones after at most
/// 2.5..5 s (exponential, jittered: hosts failing alike do not retry in lockstep).
pub(super) const RETRY_MIN: Duration = Duration::from_millis(50);
pub(super) const RETRY_MAX: Duration = Duration::from_millis(2500);

impl Reconciler {
    /// Brings every programmed sandbox's peers in line with the view. Incremental: only the
    /// addresses the view reports changed since the last sync are looked at (a burst of
    /// watch events costs its own size, not the size of the view), unless the view asks for
    /// everything (a re-list, a node change). A network whose programming fails is handed to
    /// its own retry (a full reconcile of that network, with backoff) and the others go on;
    /// networks waiting for their retry are skipped here.
    pub async fn sync_peers(&self) {
        let changes = self.view.take_peer_changes();
        let failing: HashSet<NetworkId> = lock(&self.failing).keys().cloned().collect();
        for (id, slot) in self.slots() {
            if failing.contains(&id) {
                continue;
            }
            let mut programmed = slot.lock().await;
            let Some(p) = programmed.as_mut() else {
                continue;
            };
            let plan = self
                .view
                .with(|v| plan_peers(v, &self.node_id, &id, &p.peers, &changes));
            if plan.is_empty() {
                continue;
            }
            let applied = apply_plan(&p.sandbox, &plan).await;
            metrics::reconcile_run(id.as_str(), ReconcileKind::Peers, applied.is_err());
            match applied {
                Ok(()) => plan.record(&mut p.peers),
                // What was programmed is unknown now: the retry reads the kernel back.
                Err(e) => self.network_failed(&id, &e),
            }
        }
    }

    /// Records a failed reconcile of `net` and schedules its retry. Logged when the error
    /// changes, not on every attempt.
    pub(super) fn network_failed(&self, net: &NetworkId, e: &Error) {
        let error = e.to_string();
        let mut failing = lock(&self.failing);
        let f = failing.entry(net.clone()).or_insert_with(|| Failure {
            error: String::new(),
            attempts: 0,
            retry_at: tokio::time::Instant::now(),
            backoff: Backoff::new(RETRY_MIN, RETRY_MAX),
        });
        f.attempts += 1;
        f.retry_at = tokio::time::Instant::now() + f.backoff.next_pause();
        if f.error != error {
            tracing::warn!(network = %net.short(), error = %error, attempts = f.attempts,
                "programming this network failed; retrying it alone with backoff");
            f.error = error;
        }
        drop(failing);
        self.failures_changed.notify_one();
    }

    pub(super) fn network_recovered(&self, net: &NetworkId) {
        if let Some(f) = lock(&self.failing).remove(net) {
            tracing::info!(network = %net.short(), attempts = f.attempts,
                "network programmed again");
        }
    }

    /// The networks whose programming is failing, for `vxnet info`.
    pub fn network_errors(&self) -> Vec<NetworkError> {
        let now = tokio::time::Instant::now();
        let mut out: Vec<NetworkError> = lock(&self.failing)
            .iter()
            .map(|(id, f)| NetworkError {
                network: id.to_string(),
                error: f.error.clone(),
                attempts: f.attempts,
                retry_in_ms: f.retry_at.saturating_duration_since(now).as_millis() as u64,
            })
            .collect();
        out.sort_by(|a, b| a.network.cmp(&b.network));
        out
    }

    /// Full resync: reads the kernel back and fixes every difference, network by network
    /// (a network that fails is reported, and retried alone with backoff), then the gateway
    /// bridge and the firewall, which are restored whatever any network does. Safe to run
    /// any time. An error is returned only for the host-wide part (gateway, firewall).
    pub async fn resync(&self) -> Result<ResyncReport, Error> {
        let mut report = ResyncReport::default();
        let mut networks: BTreeSet<NetworkId> = self.local_attachments().into_keys().collect();
        networks.extend(self.plugin_ports().into_keys());
        networks.extend(self.slots().into_iter().map(|(id, _)| id));
        // Sandboxes on disk: those of a known network are that network's to keep or remove;
        // any other is swept.
        let by_name: HashMap<String, NetworkId> = self.view.with(|v| {
            v.networks
                .keys()
                .chain(networks.iter())
                .map(|id| (sandbox_name(id), id.clone()))
                .collect()
        });
        let mut sweep_error = None;
        for name in dataplane::list_sandboxes(&self.run_dir) {
            match by_name.get(&name) {
                Some(id) => {
                    networks.insert(id.clone());
                }
                None => match dataplane::remove_sandbox(&self.run_dir, &name).await {
                    Ok(()) => report.sandboxes_removed += 1,
                    Err(e) => {
                        tracing::warn!(sandbox = %name, error = %e, "cannot remove a stale sandbox");
                        sweep_error = Some(e);
                    }
                },
            }
        }
        for id in &networks {
            let done = self.reconcile_network(id).await;
            metrics::reconcile_run(id.as_str(), ReconcileKind::Full, done.is_err());
            match done {
                Ok(done) => {
                    self.network_recovered(id);
                    report.add(done);
                }
                Err(e) => {
                    self.network_failed(id, &e);
                    report.add(NetworkResync {
                        network: id.to_string(),
                        name: self
                            .view
                            .with(|v| v.networks.get(id).map(|n| n.network.name.clone())),
                        error: Some(e.to_string()),
                        ..Default::default()
                    });
                }
            }
        }
        let gateway = self.resync_gateway(&mut report).await;
        // The firewall goes in even when the gateway bridge could not be repaired: NAT and
        // published ports must not wait for anything else.
        let firewall = self.sync_firewall().await;
        gateway?;
        report.published_ports = firewall?;
        if let Some(e) = sweep_error {
            return Err(e.into());
        }
        Ok(report)
    }

    /// Retries every failed network whose pause is over, each with a full reconcile.
    pub(super) async fn retry_due(&self) {
        let now = tokio::time::Instant::now();
        let due: Vec<NetworkId> = lock(&self.failing)
            .iter()
            .filter(|(_, f)| f.retry_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let done = self.reconcile_network(&id).await;
            metrics::reconcile_run(id.as_str(), ReconcileKind::Full, done.is_err());
            match done {
                Ok(_) => self.network_recovered(&id),
                Err(e) => self.network_failed(&id, &e),
            }
        }
    }

    pub(super) fn next_retry(&self) -> Option<tokio::time::Instant> {
        lock(&self.failing).values().map(|f| f.retry_at).min()
    }

    /// Follows the view: every new revision brings the peers up to date; failed networks
    /// are retried on their own schedule. Runs forever.
    pub async fn run(self: Arc<Self>) {
        let mut revisions = self.view.subscribe();
        loop {
            let retry = self.next_retry();
            tokio::select! {
                changed = revisions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let revision = *revisions.borrow_and_update();
                    self.sync_peers().await;
                    self.programmed_revision
                        .fetch_max(revision, std::sync::atomic::Ordering::AcqRel);
                }
                _ = async {
                    match retry {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => self.retry_due().await,
                // A failure recorded elsewhere: loop to recompute the timer.
                _ = self.failures_changed.notified() => {}
            }
        }
    }
}
