//! What a resync reports: totals, each network, and the networks that are failing.

/// What a full resync found and fixed: totals, and each network on its own.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ResyncReport {
    pub sandboxes: usize,
    pub sandboxes_removed: usize,
    pub endpoints_repaired: usize,
    pub stray_links_removed: usize,
    pub peers_added: usize,
    pub peers_removed: usize,
    #[serde(default)]
    pub gateway_endpoints: usize,
    #[serde(default)]
    pub published_ports: usize,
    /// Every network this host has or had a sandbox for, with what was done or what failed.
    #[serde(default)]
    pub networks: Vec<NetworkResync>,
}

impl ResyncReport {
    /// The networks whose reconcile failed (each is retried on its own with backoff).
    pub fn failed(&self) -> impl Iterator<Item = &NetworkResync> {
        self.networks.iter().filter(|n| n.error.is_some())
    }

    pub(super) fn add(&mut self, n: NetworkResync) {
        self.sandboxes += usize::from(n.sandbox_ensured);
        self.sandboxes_removed += usize::from(n.sandbox_removed);
        self.endpoints_repaired += n.endpoints_repaired;
        self.stray_links_removed += n.stray_links_removed;
        self.peers_added += n.peers_added;
        self.peers_removed += n.peers_removed;
        self.networks.push(n);
    }
}

/// One network's part of a resync.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct NetworkResync {
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub sandbox_ensured: bool,
    #[serde(default)]
    pub sandbox_removed: bool,
    #[serde(default)]
    pub endpoints_repaired: usize,
    #[serde(default)]
    pub stray_links_removed: usize,
    #[serde(default)]
    pub peers_added: usize,
    #[serde(default)]
    pub peers_removed: usize,
    /// Set when this network could not be brought in line; the others were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A network whose programming failed, as `vxnet info` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkError {
    pub network: String,
    pub error: String,
    /// Failed attempts in a row.
    pub attempts: u32,
    /// Milliseconds until the next attempt.
    pub retry_in_ms: u64,
}
