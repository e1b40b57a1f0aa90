//! The data plane: kernel programming over netlink for the overlay (libnetwork's layout).
//!
//! Per network and host, a sandbox network namespace holds `br0` (the subnet's gateway
//! address) and `vxlan1` (the VXLAN device, enslaved to `br0`). Each local container gets a
//! veth pair: one end on `br0`, the other its `eth0`. Remote containers are reached through
//! static entries on `vxlan1`: an FDB entry (MAC -> remote VTEP) and a permanent neighbour
//! (IP -> MAC) that `vxlan1`'s ARP proxy answers from, so no broadcast ever crosses the
//! underlay.
//!
//! Every operation is an "ensure": running it again changes nothing, and a drifted object
//! (down, wrong master, wrong MTU, missing address) is fixed in place rather than rebuilt.
//! Everything goes through rtnetlink; nothing here runs `ip` or `bridge`.

mod endpoint;
mod gateway;
pub mod links;
mod peers;
mod sandbox;

use std::io;
use std::time::Duration;

pub use endpoint::{
    check_container_end, ensure_endpoint, ensure_handoff_endpoint, list_endpoint_links,
    remove_endpoint, EndpointSpec, HandoffSpec,
};
pub use gateway::{
    enable_ipv4_forwarding, ensure_container_route, ensure_gateway_bridge, ensure_gateway_endpoint,
    list_container_routes, list_gateway_endpoints, remove_container_route, remove_gateway_bridge,
    remove_gateway_endpoint, GatewayBridgeSpec, GatewayEndpointSpec,
};
pub use links::{find_underlay, Underlay};
pub use peers::{add_peers, list_peer_entries, list_peers, remove_peers, Peer, PeerEntries};
pub use sandbox::{
    bridge_mac, ensure_sandbox, inspect_sandbox, list_sandboxes, remove_sandbox, sandbox_path,
    Sandbox, SandboxInspection, SandboxProblem, SandboxSpec, BRIDGE_NAME, SANDBOX_PREFIX,
    VXLAN_NAME,
};

/// How long one netlink request may go unanswered. The kernel answers in microseconds; a
/// request still waiting after this lost its reply (e.g. a receive-buffer overrun), and
/// waiting on would hang the caller forever.
pub(crate) const NETLINK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "no interface in the host namespace holds {addr}: the advertise address must be \
         assigned to the underlay interface (check `ip -4 addr`), or advertise one that is"
    )]
    UnderlayNotFound { addr: std::net::Ipv4Addr },

    /// The kernel refused a netlink request.
    #[error("cannot {action} {object}: {cause}; {hint}")]
    Netlink {
        action: &'static str,
        object: String,
        /// errno's text, plus the kernel's own explanation (extended ACK) when it gave one.
        cause: String,
        hint: &'static str,
        errno: Option<i32>,
    },

    #[error(
        "no answer from the kernel within {}s to {action} {object}: the netlink reply was \
         lost or the kernel is stuck; retry, and check `dmesg` if it persists",
        NETLINK_TIMEOUT.as_secs()
    )]
    Timeout {
        action: &'static str,
        object: String,
    },

    #[error("cannot {action} {what}: {source}; {hint}")]
    Namespace {
        action: &'static str,
        /// e.g. "the sandbox namespace /run/vxnet/netns/1-ec3ea5fa4f".
        what: String,
        #[source]
        source: io::Error,
        hint: &'static str,
    },

    #[error(
        "VNI {vni} (UDP port {port}) is already used by another VXLAN device on this host \
         (Docker's own overlay, another network's sandbox, or a leftover device; `ip -d link \
         show type vxlan` finds it, in any namespace made on this host): re-create the vxnet \
         network with another --vni, or remove that device"
    )]
    VniInUse { vni: u32, port: u16 },

    #[error(
        "{object} exists and is not ours to replace ({found}): remove it or choose another name"
    )]
    NameTaken { object: String, found: String },

    #[error("{object} was created but the kernel does not list it: retry")]
    Vanished { object: String },

    #[error("invalid {what}: {detail}")]
    InvalidSpec { what: &'static str, detail: String },

    /// A batch socket (many requests per system call) could not be opened or used.
    #[error("netlink socket for {what}: {source}; retry")]
    Socket {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl DataplaneError {
    /// The errno of a refused netlink request (positive, e.g. `libc::EEXIST`).
    pub fn errno(&self) -> Option<i32> {
        match self {
            DataplaneError::Netlink { errno, .. } => *errno,
            _ => None,
        }
    }

    pub(crate) fn netlink(
        action: &'static str,
        object: impl Into<String>,
        err: &rtnetlink::Error,
    ) -> Self {
        let errno = links::errno(err);
        let mut cause = match errno {
            Some(e) => io::Error::from_raw_os_error(e).to_string(),
            None => err.to_string(),
        };
        if let Some(msg) = links::extack_message(err) {
            cause = format!("{cause} ({msg})");
        }
        DataplaneError::Netlink {
            action,
            object: object.into(),
            cause,
            hint: hint_for(errno),
            errno,
        }
    }
}

fn hint_for(errno: Option<i32>) -> &'static str {
    match errno {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "vxnet needs CAP_NET_ADMIN in the namespace: run it as root"
        }
        Some(libc::ENODEV) | Some(libc::ENOENT) => {
            "it disappeared while being configured (removed concurrently?): run the operation again"
        }
        Some(libc::EEXIST) | Some(libc::EBUSY) => {
            "something else holds that name or resource: inspect the namespace with `ip -d link`"
        }
        Some(libc::EINVAL) | Some(libc::ERANGE) | Some(libc::EOPNOTSUPP) => {
            "the kernel rejected the settings: check the MTU, VNI, port and addresses in the spec"
        }
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => {
            "the kernel is short of memory or a table is full: retry with a smaller batch"
        }
        _ => "retry; if it persists, inspect the namespace with `ip -d link` and `bridge fdb`",
    }
}
