//! Request and response bodies of the API (beyond the model types themselves).

use serde::{Deserialize, Serialize};

use crate::model::{Endpoint, Network, Node};

/// `GET /v1/doctor`: defined beside the reconciler that computes it (the API sits above the
/// reconciler and the layering runs one way), served as is.
pub use crate::reconcile::doctor::{Area, Checked, Difference, DoctorReport, Finding};

/// Every error answer: `{"message": "..."}` with a 4xx/5xx status, as Docker's API does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
}

/// An endpoint as `network inspect` shows it: with the name and address of its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    #[serde(flatten)]
    pub endpoint: Endpoint,
    /// The host's node name, when its node key is known (absent while the host is away).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_addr: Option<std::net::IpAddr>,
}

/// `GET /v1/networks/{ref}`: the network and its endpoints on every host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInspect {
    #[serde(flatten)]
    pub network: Network,
    pub scope: String,
    pub endpoints: Vec<EndpointInfo>,
}

/// `GET /v1/info`: this daemon and what it sees of the cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Info {
    pub version: String,
    pub node: Node,
    pub cluster_store: String,
    pub store_prefix: String,
    /// Whether this node currently holds a live lease in the store.
    pub registered: bool,
    /// The store revision the daemon's view has reached (0: not synced yet).
    pub view_revision: i64,
    /// Registered, and the view has caught up with this node's own registration: the
    /// daemon sees itself and every host registered before it.
    pub synced: bool,
    pub nodes: Vec<Node>,
    pub networks: usize,
    pub endpoints: usize,
    /// The last error talking to the cluster store (TLS, credentials, unreachable), while
    /// the daemon keeps retrying; absent once it gets through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// Records in the store this daemon refused (malformed, contradicting their network or
    /// another record), with the reason; none of them is programmed. At most
    /// [`Info::REJECTED_SHOWN`] are listed; `records_rejected` counts every refusal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected_records: Vec<RejectedRecordInfo>,
    #[serde(default)]
    pub records_rejected: u64,
    /// Networks whose kernel programming is failing on this host, each retried alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_errors: Vec<crate::reconcile::NetworkError>,
    /// Docker plugin calls served since the daemon started, by call (with `--docker-plugin`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub docker_plugin_calls: std::collections::BTreeMap<String, CallStats>,
    /// The name server (absent with `--dns=false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<crate::dns::DnsInfo>,
}

impl Info {
    pub const REJECTED_SHOWN: usize = 100;
}

/// A refused store record, as `vxnet info` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedRecordInfo {
    pub key: String,
    pub kind: String,
    pub reason: String,
    pub mod_revision: i64,
}

pub use crate::docker::CallStats;
