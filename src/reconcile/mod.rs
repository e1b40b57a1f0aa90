//! The reconciler: the only writer of this host's overlay kernel state.
//!
//! Desired state comes from two places: the watch-fed view (networks, remote endpoints and
//! their hosts' VTEPs) and the container registry (this host's attachments). Actual state is
//! the kernel's: sandbox namespaces under the run dir, their br0/vxlan1, veths, FDB and
//! neighbour entries. The reconciler applies only the difference, so it can run at any time
//! (start-up after a crash, after someone deleted a link by hand) and converges without
//! tearing down what is already right.
//!
//! Shaped like a controller (kube-rs's): each network has its own slot and lock, and one
//! reconcile that is safe to repeat; a network that fails is retried alone with backoff.
//!
//! - `network.rs`: a network's slot, the attach/detach path (a container's own interface,
//!   programmed while its `run` waits) and `reconcile_network` (reads the kernel back).
//! - `controller.rs`: the peer sync from every view change, the full resync, the retries.
//! - `peers.rs`: remote endpoints as FDB/neighbour entries and the plan that gets there.
//! - `host.rs`: the gateway bridge and the nftables table in the host's namespace.
//! - `report.rs`: what a resync reports.
//! - `doctor.rs`: the kernel checked against the same desired state, changing nothing.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::Ipv4Net;
use tokio::sync::Mutex;

use crate::dataplane::{self, EndpointSpec, SandboxSpec, Underlay};
use crate::error::Error;
use crate::firewall::Firewall;
use crate::model::{Network, NetworkId, NodeId};
use crate::registry::{Attachment, ContainerState, NetnsRef, Registry};
use crate::view::{ClusterView, SharedView};

mod controller;
pub mod doctor;
mod host;
mod network;
mod peers;
mod report;

use controller::Failure;
use network::Slot;
pub use peers::{desired_peers, plan_peers, PeerMap, PeerPlan};
pub use report::{NetworkError, NetworkResync, ResyncReport};

/// VXLAN's UDP port (IANA); the same on every host of a cluster.
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN over IPv4 adds 50 bytes: outer Ethernet 14, IPv4 20, UDP 8, VXLAN 8.
pub const VXLAN_OVERHEAD: u32 = 50;

/// The name of a network's sandbox namespace: Docker's `1-` + 10 characters of the ID.
pub fn sandbox_name(net: &NetworkId) -> String {
    format!("{}{}", dataplane::SANDBOX_PREFIX, net.prefix(10))
}

/// This host's gateway bridge (Docker's docker_gwbridge): containers' way out of the overlay.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub bridge: String,
    pub subnet: Ipv4Net,
}

impl GatewayConfig {
    pub const DEFAULT_BRIDGE: &'static str = "vxnet_gwbridge";
    /// Docker's default; configurable because it collides with many corporate networks.
    pub const DEFAULT_SUBNET: &'static str = "172.18.0.0/16";
    /// The MTU of the bridge and of the containers' eth1: no encapsulation on this path.
    pub const MTU: u32 = 1500;

    /// The bridge's own address: the subnet's first host address.
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::from(u32::from(self.subnet.network()) + 1)
    }
}

/// What the reconciler needs to know about the host it runs on.
#[derive(Clone, Debug)]
pub struct LocalHost {
    pub run_dir: PathBuf,
    /// The underlay address (the VTEP); the underlay interface is the one holding it.
    pub advertise: IpAddr,
    pub node_id: NodeId,
    pub gateway: GatewayConfig,
}

/// Sandbox ports this host keeps for containers that vxnet's own records do not list (the
/// Docker plugin's): the reconciler never removes them as strays, and keeps their sandboxes.
pub trait PluginPorts: Send + Sync {
    /// (network, sandbox-side veth name) of every such port that should exist now.
    fn ports(&self) -> Vec<(NetworkId, String)>;
}

pub struct Reconciler {
    host: rtnetlink::Handle,
    run_dir: PathBuf,
    advertise: IpAddr,
    node_id: NodeId,
    view: SharedView,
    registry: Arc<Registry>,
    state: std::sync::Mutex<HashMap<NetworkId, Slot>>,
    failing: std::sync::Mutex<HashMap<NetworkId, Failure>>,
    /// Wakes the run loop when a failure is recorded elsewhere (a resync), so that its
    /// retry timer covers it.
    failures_changed: tokio::sync::Notify,
    /// The view revision the last peer sync started from: everything up to it is programmed
    /// (but for the networks in `failing`). Published in this host's health report.
    programmed_revision: std::sync::atomic::AtomicI64,
    underlay: Mutex<Option<Underlay>>,
    gateway: GatewayConfig,
    /// The gateway bridge's index once it exists (made with the first container that needs it).
    gateway_bridge: Mutex<Option<u32>>,
    /// Gateway interfaces made by `attach_gateway` and not yet removed (a container's record
    /// may not list its interface yet while its `run` is finishing).
    gateway_endpoints: std::sync::Mutex<HashSet<String>>,
    firewall: Arc<dyn Firewall>,
    /// Held while the nftables table is written, so applies happen one at a time and each
    /// writes the ruleset as of its turn. `true` once the table was removed for a clean stop:
    /// a sync still running then must not put it back.
    firewall_stopped: Arc<Mutex<bool>>,
    plugin_ports: Option<Arc<dyn PluginPorts>>,
    /// The cluster store's members (IP literals only): no container may reach them.
    store: Vec<std::net::SocketAddrV4>,
    /// TCP ports of this host's own services (the metrics listener): no container may reach them.
    host_services: Vec<u16>,
    /// The name server, when DNS is on: it listens in every sandbox this host programs.
    dns: std::sync::OnceLock<Arc<crate::dns::DnsServer>>,
}
impl Reconciler {
    pub fn new(
        host: rtnetlink::Handle,
        local: LocalHost,
        view: SharedView,
        registry: Arc<Registry>,
        firewall: Arc<dyn Firewall>,
    ) -> Self {
        Reconciler {
            host,
            run_dir: local.run_dir,
            advertise: local.advertise,
            node_id: local.node_id,
            view,
            registry,
            state: std::sync::Mutex::new(HashMap::new()),
            failing: std::sync::Mutex::new(HashMap::new()),
            failures_changed: tokio::sync::Notify::new(),
            programmed_revision: std::sync::atomic::AtomicI64::new(0),
            underlay: Mutex::new(None),
            gateway: local.gateway,
            gateway_bridge: Mutex::new(None),
            gateway_endpoints: std::sync::Mutex::new(HashSet::new()),
            firewall,
            firewall_stopped: Arc::new(Mutex::new(false)),
            plugin_ports: None,
            store: Vec::new(),
            host_services: Vec::new(),
            dns: std::sync::OnceLock::new(),
        }
    }

    /// Serves names in every sandbox from now on (set once, before the first attach: the
    /// sandbox's br0 gets the name server's address only when it is set).
    pub fn with_dns(self, dns: Arc<crate::dns::DnsServer>) -> Self {
        let _ = self.dns.set(dns);
        self
    }

    /// The view revision this host's data plane is programmed up to (see `run`).
    pub fn programmed_revision(&self) -> i64 {
        self.programmed_revision
            .load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn dns(&self) -> Option<&Arc<crate::dns::DnsServer>> {
        self.dns.get()
    }

    /// Keeps `ports` (and their sandboxes) through resyncs and detaches.
    pub fn with_plugin_ports(mut self, ports: Arc<dyn PluginPorts>) -> Self {
        self.plugin_ports = Some(ports);
        self
    }

    /// The cluster store members that containers must not reach (client port and peer port).
    pub fn with_store_endpoints(mut self, store: Vec<std::net::SocketAddrV4>) -> Self {
        self.store = store;
        self
    }

    /// The TCP ports of vxnet's own host services (`--metrics-addr`) that containers must
    /// not reach, here or on another member host.
    pub fn with_host_services(mut self, ports: Vec<u16>) -> Self {
        self.host_services = ports;
        self
    }

    pub fn store_endpoints(&self) -> &[std::net::SocketAddrV4] {
        &self.store
    }

    /// The plugin's ports, by network.
    fn plugin_ports(&self) -> HashMap<NetworkId, Vec<String>> {
        let mut out: HashMap<NetworkId, Vec<String>> = HashMap::new();
        if let Some(p) = &self.plugin_ports {
            for (net, name) in p.ports() {
                out.entry(net).or_default().push(name);
            }
        }
        out
    }

    pub fn gateway_config(&self) -> &GatewayConfig {
        &self.gateway
    }

    /// The interface holding the advertise address (looked up once, again after a failure).
    async fn underlay(&self) -> Result<Underlay, Error> {
        let mut cached = self.underlay.lock().await;
        if let Some(u) = cached.as_ref() {
            return Ok(u.clone());
        }
        let IpAddr::V4(addr) = self.advertise else {
            return Err(Error::invalid(format!(
                "advertise address {} is IPv6: the overlay needs an IPv4 underlay for now",
                self.advertise
            )));
        };
        let u = dataplane::find_underlay(&self.host, addr).await?;
        *cached = Some(u.clone());
        Ok(u)
    }

    /// The overlay MTU on this host: the network's own, or the underlay's minus 50. A network
    /// MTU that does not fit this host's underlay is refused here, where it is known.
    pub async fn mtu_for(&self, net: &Network) -> Result<u32, Error> {
        let underlay = self.underlay().await?;
        let max = underlay.mtu.saturating_sub(VXLAN_OVERHEAD);
        match net.mtu {
            Some(m) if m > max => Err(Error::invalid(format!(
                "network {} has MTU {m}, but this host's underlay {} has MTU {} (at most {max} fits)",
                net.name, underlay.name, underlay.mtu
            ))),
            Some(m) => Ok(m),
            None => Ok(max),
        }
    }

    async fn sandbox_spec(&self, net: &Network) -> Result<SandboxSpec, Error> {
        let underlay = self.underlay().await?;
        let gateway = Ipv4Net::new(net.gateway, net.subnet.prefix_len())
            .map_err(|e| Error::invalid(e.to_string()))?;
        Ok(SandboxSpec {
            name: sandbox_name(&net.id),
            vni: net.vni,
            gateway,
            mtu: self.mtu_for(net).await?,
            vxlan_port: VXLAN_PORT,
            underlay,
            service_address: self.dns.get().map(|_| crate::dns::LISTEN_ADDR),
        })
    }

    /// The remote endpoints of one network, as FDB/neighbour entries.
    fn desired_peers(&self, view: &ClusterView, net: &NetworkId) -> PeerMap {
        desired_peers(view, &self.node_id, net)
    }

    /// Networks with at least one live local attachment, and those attachments.
    fn local_attachments(&self) -> HashMap<NetworkId, Vec<(NetnsRef, Attachment)>> {
        let mut out: HashMap<NetworkId, Vec<(NetnsRef, Attachment)>> = HashMap::new();
        for r in self.registry.list() {
            if matches!(r.state, ContainerState::Exited { .. }) {
                continue;
            }
            for a in &r.attachments {
                out.entry(a.network_id.clone())
                    .or_default()
                    .push((r.netns_ref(), a.clone()));
            }
        }
        out
    }

    fn endpoint_spec(&self, att: &Attachment) -> Result<EndpointSpec, Error> {
        Ok(EndpointSpec {
            host_ifname: att.host_ifname(),
            container_ifname: att.ifname.clone(),
            address: Ipv4Net::new(att.ip, att.prefix_len)
                .map_err(|e| Error::invalid(e.to_string()))?,
            mac: att.mac,
            mtu: att.mtu,
            // Only an overlay without a gateway bridge beside it carries the default route.
            default_gateway: att.default_route.then_some(att.gateway),
            // The name server is asked through the first interface (its resolv.conf says
            // where); the address is on br0 of every network's sandbox.
            host_route: (self.dns.get().is_some() && att.carries_dns_route())
                .then_some(crate::dns::LISTEN_ADDR),
        })
    }
}
