//! What the CNI plugin asks of the daemon (`/v1/cni/…`, docs/api.md), and what it gets.
//! The plugin is a thin client: the daemon does the IPAM, the interfaces and the records.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The gateway-bridge interface's name unless the config says otherwise: not `eth1`, which
/// a runtime attaching a second network names its interface.
pub const DEFAULT_GATEWAY_IFNAME: &str = "vxgw0";

/// `POST /v1/cni/add`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    pub container_id: String,
    pub ifname: String,
    pub netns: PathBuf,
    pub network: String,
    /// The container's name on the network's DNS (`K8S_POD_NAME`, else the container ID).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub gateway_ifname: Option<String>,
}

/// `POST /v1/cni/del`, and `POST /v1/cni/check` (which also names the namespace).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRef {
    pub container_id: String,
    pub ifname: String,
    pub network: String,
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

/// `POST /v1/cni/gc`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    pub network: String,
    /// `(container ID, interface)` pairs the runtime still uses.
    pub valid: Vec<(String, String)>,
}

/// What GC released.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    /// `container-ID/ifname` of each released attachment.
    pub released: Vec<String>,
}

/// The container's interface on the gateway bridge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayInterface {
    pub ifname: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
}

/// One attachment as ADD made it (and CHECK found it): everything a CNI result lists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    pub netns: PathBuf,
    pub network: String,
    pub network_id: String,
    pub endpoint_id: String,
    pub mac: String,
    pub mtu: u32,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// Absent on an `--internal` network (the overlay is the only way, and goes nowhere
    /// else) or when the container already had one from an earlier ADD.
    #[serde(default)]
    pub gateway_interface: Option<GatewayInterface>,
    /// The default route's next hop and, when there is one, the name server's address.
    #[serde(default)]
    pub default_gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub nameserver: Option<Ipv4Addr>,
    #[serde(default)]
    pub search: Vec<String>,
}

/// `GET /v1/cni/status?network=…`: whether an ADD would be served now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub ready: bool,
    /// Why not, and what to do.
    #[serde(default)]
    pub reason: Option<String>,
}
