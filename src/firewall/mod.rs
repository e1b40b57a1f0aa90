//! vxnet's host firewall: one nftables table, `inet vxnet`, that vxnet owns and replaces
//! whole, and nothing anywhere else (no iptables, no other table is read or touched).
//!
//! The table filters VXLAN to the cluster's member VTEPs, keeps containers off the tunnel
//! and the cluster store, and gives the gateway bridge (`vxnet_gwbridge`) its NAT and
//! isolation, as `nft list table inet vxnet` prints it (docs/architecture.md says why):
//!
//! ```text
//! table inet vxnet {
//!     set vteps {
//!         type ipv4_addr
//!         elements = { 192.0.2.6, 192.0.2.7 }
//!     }
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ip saddr 172.18.0.0/16 oifname != "vxnet_gwbridge" masquerade
//!     }
//!     chain prerouting {
//!         type nat hook prerouting priority dstnat; policy accept;
//!         fib daddr type local tcp dport 8080 dnat ip to 172.18.0.2:80
//!     }
//!     chain output {
//!         type nat hook output priority dstnat; policy accept;
//!         ip daddr != 127.0.0.0/8 fib daddr type local tcp dport 8080 dnat ip to 172.18.0.2:80
//!     }
//!     chain forward {
//!         type filter hook forward priority filter; policy accept;
//!         iifname "vxnet_gwbridge" oifname "vxnet_gwbridge" drop
//!         udp dport 4789 drop
//!         ip daddr 192.0.2.5 tcp dport 2379 drop
//!         ip daddr 192.0.2.5 tcp dport 2380 drop
//!         oifname "vxnet_gwbridge" ct state established,related accept
//!         oifname "vxnet_gwbridge" ct status dnat accept
//!         oifname "vxnet_gwbridge" drop
//!         ip daddr @vteps tcp dport 9473 drop             (--metrics-addr's port, if any)
//!     }
//!     chain input {
//!         type filter hook input priority filter; policy accept;
//!         udp dport 4789 ip saddr != @vteps counter packets 0 bytes 0 drop
//!         iifname "vxnet_gwbridge" udp dport 4789 drop
//!         iifname "vxnet_gwbridge" ip daddr 192.0.2.5 tcp dport 2379 drop
//!         iifname "vxnet_gwbridge" ip daddr 192.0.2.5 tcp dport 2380 drop
//!         iifname "vxnet_gwbridge" tcp dport 9473 drop    (--metrics-addr's port, if any)
//!         (the same for "docker_gwbridge")
//!     }
//! }
//! ```
//!
//! Backends sit behind the [`Firewall`] trait (as in netavark); [`Nftables`] programs the
//! kernel over nf_tables netlink (libnftnl + libmnl), in the calling thread's network
//! namespace: run it on a thread made for that namespace (`NetNs::run`), never on a tokio
//! worker that has been moved into another one.

mod nftables;
mod readback;

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

pub use nftables::Nftables;
pub use readback::{desired_shape, read_table, TableShape};

/// The table vxnet owns (family `inet`).
pub const TABLE: &str = "vxnet";
/// The named set of member VTEPs in that table.
pub const VTEP_SET: &str = "vteps";
/// Docker's gateway bridge: Docker's containers on vxnet networks come in through it.
pub const DOCKER_BRIDGE: &str = "docker_gwbridge";

/// Longest interface name the kernel accepts (IFNAMSIZ less the NUL).
const IFNAME_MAX: usize = 15;

pub use crate::model::Proto;

/// A published port: `<proto> <host_port>` on any of this host's addresses is DNATed to
/// `<container_ip>:<container_port>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortMapping {
    pub proto: Proto,
    pub host_port: u16,
    pub container_ip: Ipv4Addr,
    pub container_port: u16,
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {}:{}",
            self.proto, self.host_port, self.container_ip, self.container_port
        )
    }
}

/// Everything the `inet vxnet` table says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// The gateway bridge, e.g. "vxnet_gwbridge".
    pub bridge: String,
    /// The bridge's subnet, e.g. 172.18.0.0/16: its sources are masqueraded leaving the host.
    pub subnet: ipnet::Ipv4Net,
    pub ports: Vec<PortMapping>,
    /// The VXLAN UDP port: only members may send to it, no container may.
    pub vxlan_port: u16,
    /// Every cluster member's VTEP (this host's included): the only sources whose VXLAN
    /// datagrams this host accepts.
    pub vteps: Vec<Ipv4Addr>,
    /// The cluster store's members (client address and port): containers reach neither this
    /// port nor the peer port after it.
    pub store: Vec<SocketAddrV4>,
    /// TCP ports of vxnet's own services on the hosts (the metrics listener): containers
    /// reach them neither on this host (any of its addresses) nor on a member VTEP.
    pub host_services: Vec<u16>,
}

impl Ruleset {
    /// Checks what the kernel would otherwise refuse half-way or accept wrongly: the bridge
    /// name, ports 0 and a host port published twice.
    pub fn validate(&self) -> Result<(), FirewallError> {
        let invalid = |reason: String| Err(FirewallError::InvalidRuleset { reason });
        if self.bridge.is_empty() || self.bridge.len() > IFNAME_MAX {
            return invalid(format!(
                "bridge name {:?} must be 1 to {IFNAME_MAX} bytes long",
                self.bridge
            ));
        }
        if self
            .bridge
            .bytes()
            .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
        {
            return invalid(format!(
                "bridge name {:?} is not a valid interface name (no NUL, '/' or spaces)",
                self.bridge
            ));
        }
        let mut seen = HashSet::new();
        for p in &self.ports {
            if p.host_port == 0 || p.container_port == 0 {
                return invalid(format!("port mapping {p}: port 0 cannot be published"));
            }
            if !seen.insert((p.proto, p.host_port)) {
                return invalid(format!(
                    "host port {} {} is published twice: unpublish one of them",
                    p.proto, p.host_port
                ));
            }
        }
        Ok(())
    }

    /// The port mappings in the order their rules are installed: by protocol, then host port,
    /// so the same set of mappings always gives the same table whatever order it came in.
    pub fn sorted_ports(&self) -> Vec<&PortMapping> {
        let mut ports: Vec<&PortMapping> = self.ports.iter().collect();
        ports.sort_by_key(|p| (p.proto, p.host_port));
        ports
    }
}

/// A firewall backend. Implementations act on the calling thread's network namespace.
pub trait Firewall: Send + Sync {
    /// Atomically replaces the whole `inet vxnet` table with what `ruleset` says (one batch:
    /// add table, delete table, add table + chains + rules; never a moment without rules, and
    /// applying the same ruleset again gives the identical table).
    fn apply(&self, ruleset: &Ruleset) -> Result<(), FirewallError>;
    /// Deletes the `inet vxnet` table if present (idempotent).
    fn remove(&self) -> Result<(), FirewallError>;
    /// Replaces the `inet vxnet_dns` table of a network's sandbox namespace (call it on a
    /// thread in that namespace): per source address, at most `guard.rate` queries a second
    /// reach the name server's socket; the rest are dropped before they queue there.
    fn guard_dns(&self, guard: &DnsGuard) -> Result<(), FirewallError>;
}

/// The table in each sandbox namespace that keeps one container's flood of DNS queries from
/// filling the socket every container of that network shares.
pub const DNS_TABLE: &str = "vxnet_dns";

/// What [`Firewall::guard_dns`] programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsGuard {
    pub listen: Ipv4Addr,
    pub port: u16,
    /// Queries per second per source address (UDP), with as many again as a burst.
    pub rate: u32,
    /// Source addresses tracked at once (a full table lets further new sources through to
    /// the server, which drops those that are no local endpoint).
    pub sources: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("invalid firewall ruleset: {reason}")]
    InvalidRuleset { reason: String },
    #[error(
        "cannot open a netfilter netlink socket: {source} (vxnet needs CAP_NET_ADMIN in this \
         network namespace: run the daemon as root)"
    )]
    Socket { source: io::Error },
    #[error("cannot send the nftables batch for table inet {TABLE} to the kernel: {source}")]
    Send { source: io::Error },
    #[error(
        "cannot read the kernel's answer to the nftables batch for table inet {TABLE}: {source}"
    )]
    Receive { source: io::Error },
    #[error(
        "no answer from the kernel to the nftables batch for table inet {TABLE} after {secs} s \
         (the table is unchanged if the batch was not applied; run `nft list table inet {TABLE}` \
         to see what is there)"
    )]
    Timeout { secs: u64 },
    #[error(
        "the kernel refused the nftables batch for table inet {TABLE} at {what}: {source}; \
         nothing was changed (the batch is all or nothing). {hint}"
    )]
    Rejected {
        what: String,
        source: io::Error,
        hint: &'static str,
    },
}

impl FirewallError {
    /// What to do about a refusal, by errno.
    pub(crate) fn hint(errno: Option<i32>) -> &'static str {
        match errno {
            Some(libc::EPERM) | Some(libc::EACCES) => {
                "vxnet needs CAP_NET_ADMIN in this network namespace: run the daemon as root"
            }
            Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) | Some(libc::EAFNOSUPPORT) => {
                "the kernel lacks an nf_tables feature this table needs (nat chains, masquerade, \
                 fib, dnat): build the kernel with CONFIG_NF_TABLES_INET, CONFIG_NFT_NAT, \
                 CONFIG_NFT_MASQ and CONFIG_NFT_FIB_INET, or load those modules"
            }
            Some(libc::EBUSY) => {
                "something else holds the table (another vxnet daemon in this namespace?): \
                 stop it and try again"
            }
            Some(libc::ENOBUFS) | Some(libc::ENOMEM) => {
                "the kernel ran out of memory for the batch: publish fewer ports or retry"
            }
            _ => {
                "this is likely a vxnet bug in the rule encoding: please report it with the ruleset"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(bridge: &str, ports: Vec<PortMapping>) -> Ruleset {
        Ruleset {
            bridge: bridge.to_string(),
            subnet: "172.18.0.0/16".parse().unwrap(),
            ports,
            vxlan_port: 4789,
            vteps: vec![],
            store: vec![],
            host_services: vec![],
        }
    }

    fn pm(proto: Proto, host_port: u16, container_port: u16) -> PortMapping {
        PortMapping {
            proto,
            host_port,
            container_ip: Ipv4Addr::new(172, 18, 0, 2),
            container_port,
        }
    }

    #[test]
    fn bridge_names_are_checked() {
        assert!(rs("vxnet_gwbridge", vec![]).validate().is_ok());
        assert!(rs("", vec![]).validate().is_err());
        assert!(rs("a_name_too_long_", vec![]).validate().is_err());
        assert!(rs("a/b", vec![]).validate().is_err());
        assert!(rs("a b", vec![]).validate().is_err());
    }

    #[test]
    fn ports_are_checked() {
        assert!(rs("br", vec![pm(Proto::Tcp, 0, 80)]).validate().is_err());
        assert!(rs("br", vec![pm(Proto::Tcp, 80, 0)]).validate().is_err());
        let twice = rs("br", vec![pm(Proto::Tcp, 80, 80), pm(Proto::Tcp, 80, 81)]);
        let e = twice.validate().unwrap_err().to_string();
        assert!(e.contains("tcp 80 is published twice"), "{e}");
        // The same number over both protocols is two different ports.
        let both = rs("br", vec![pm(Proto::Tcp, 53, 53), pm(Proto::Udp, 53, 53)]);
        assert!(both.validate().is_ok());
    }

    #[test]
    fn rule_order_does_not_depend_on_input_order() {
        let a = rs(
            "br",
            vec![
                pm(Proto::Udp, 1, 1),
                pm(Proto::Tcp, 9, 9),
                pm(Proto::Tcp, 2, 2),
            ],
        );
        let order: Vec<_> = a
            .sorted_ports()
            .iter()
            .map(|p| (p.proto, p.host_port))
            .collect();
        assert_eq!(
            order,
            vec![(Proto::Tcp, 2), (Proto::Tcp, 9), (Proto::Udp, 1)]
        );
    }
}
