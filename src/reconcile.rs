//! The reconciler: the only writer of this host's overlay kernel state.
//!
//! Desired state comes from two places: the watch-fed view (networks, remote endpoints and
//! their hosts' VTEPs) and the container registry (this host's attachments). Actual state is
//! the kernel's: sandbox namespaces under the run dir, their br0/vxlan1, veths, FDB and
//! neighbour entries. The reconciler applies only the difference, so it can run at any time
//! (start-up after a crash, after someone deleted a link by hand) and converges without
//! tearing down what is already right.
//!
//! Two paths share one lock: the attach/detach path (a container's own interface, programmed
//! while its `run` waits) and the peer sync (remote endpoints, programmed from every view
//! change). A full resync reads the kernel back instead of trusting the cache.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::backoff::Backoff;
use crate::container::record::{Attachment, ContainerState, GatewayAttachment, Registry};
use crate::dataplane::{self, EndpointSpec, Peer, Sandbox, SandboxSpec, Underlay};
use crate::error::Error;
use crate::firewall::{Firewall, PortMapping, Ruleset};
use crate::model::{Endpoint, Network, NetworkId, NodeId};
use crate::netns::NetNs;
use crate::sync::lock;
use crate::view::{ClusterView, PeerChanges, SharedView};

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

/// What a full resync found and fixed: totals, and each network on its own.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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

    fn add(&mut self, n: NetworkResync) {
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
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkError {
    pub network: String,
    pub error: String,
    /// Failed attempts in a row.
    pub attempts: u32,
    /// Milliseconds until the next attempt.
    pub retry_in_ms: u64,
}

/// Sandbox ports this host keeps for containers that vxnet's own records do not list (the
/// Docker plugin's): the reconciler never removes them as strays, and keeps their sandboxes.
pub trait PluginPorts: Send + Sync {
    /// (network, sandbox-side veth name) of every such port that should exist now.
    fn ports(&self) -> Vec<(NetworkId, String)>;
}

/// Remote endpoints of one network by overlay address: the kernel's own key for the
/// neighbour entry, and unique per network (IPAM).
pub type PeerMap = HashMap<Ipv4Addr, Peer>;

struct Programmed {
    /// Shared so that a port can be removed without holding the state lock.
    sandbox: Arc<Sandbox>,
    /// What this run has programmed (or, after a resync, read back and fixed).
    peers: PeerMap,
    /// This host's endpoints in the sandbox (sandbox-side veth names): when the last one
    /// goes, so does the sandbox.
    endpoints: BTreeSet<String>,
}

/// One network's programmed state on this host (`None`: no sandbox). Each network has its
/// own lock, so kernel work in one network (a 50k-peer batch, a slow netlink answer) holds
/// up nothing in another; one network is never reconciled twice at once.
type Slot = Arc<Mutex<Option<Programmed>>>;

/// A network whose last reconcile failed: it is retried alone, with backoff, while every
/// other network goes on converging.
struct Failure {
    error: String,
    attempts: u32,
    retry_at: tokio::time::Instant,
    backoff: Backoff,
}

/// The first retry of a failed network comes after 50..100 ms; later ones after at most
/// 2.5..5 s (exponential, jittered: hosts failing alike do not retry in lockstep).
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_millis(2500);

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
            underlay: Mutex::new(None),
            gateway: local.gateway,
            gateway_bridge: Mutex::new(None),
            gateway_endpoints: std::sync::Mutex::new(HashSet::new()),
            firewall,
            firewall_stopped: Arc::new(Mutex::new(false)),
            plugin_ports: None,
            store: Vec::new(),
        }
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

    /// The gateway bridge, made (with forwarding on and the NAT rules in place) if missing.
    async fn ensure_gateway_bridge(&self) -> Result<u32, Error> {
        let mut cached = self.gateway_bridge.lock().await;
        if let Some(index) = *cached {
            return Ok(index);
        }
        let address = Ipv4Net::new(self.gateway.gateway(), self.gateway.subnet.prefix_len())
            .map_err(|e| Error::invalid(e.to_string()))?;
        let spec = dataplane::GatewayBridgeSpec {
            name: self.gateway.bridge.clone(),
            address,
            mtu: GatewayConfig::MTU,
        };
        let index = dataplane::ensure_gateway_bridge(&self.host, &spec).await?;
        // Routing out of the bridge needs forwarding in this (the host's) namespace; this
        // runs on a runtime thread, which is always in the daemon's own namespace.
        dataplane::enable_ipv4_forwarding()
            .map_err(|e| Error::io("enabling IPv4 forwarding", e))?;
        *cached = Some(index);
        drop(cached);
        self.sync_firewall().await?;
        Ok(index)
    }

    /// Programs a container's eth1 on the gateway bridge, default route included.
    pub async fn attach_gateway(
        &self,
        container: &NetNs,
        gw: &GatewayAttachment,
    ) -> Result<(), Error> {
        let bridge = self.ensure_gateway_bridge().await?;
        lock(&self.gateway_endpoints).insert(gw.host_ifname.clone());
        dataplane::ensure_gateway_endpoint(&self.host, bridge, container, &Self::gateway_spec(gw)?)
            .await?;
        Ok(())
    }

    pub async fn detach_gateway(&self, gw: &GatewayAttachment) -> Result<(), Error> {
        dataplane::remove_gateway_endpoint(&self.host, &gw.host_ifname).await?;
        lock(&self.gateway_endpoints).remove(&gw.host_ifname);
        Ok(())
    }

    fn gateway_spec(gw: &GatewayAttachment) -> Result<dataplane::GatewayEndpointSpec, Error> {
        Ok(dataplane::GatewayEndpointSpec {
            host_ifname: gw.host_ifname.clone(),
            container_ifname: gw.ifname.clone(),
            address: Ipv4Net::new(gw.ip, gw.prefix_len)
                .map_err(|e| Error::invalid(e.to_string()))?,
            mac: gw.mac,
            mtu: GatewayConfig::MTU,
            default_gateway: gw.gateway,
        })
    }

    /// The firewall's desired state: masquerade for the gateway subnet, ICC off, and every
    /// live container's published ports.
    fn ruleset(&self) -> Ruleset {
        let mut ports = Vec::new();
        for r in self.registry.list() {
            if matches!(r.state, ContainerState::Exited { .. }) {
                continue;
            }
            let Some(gw) = &r.gateway_attachment else {
                continue;
            };
            for p in &r.ports {
                ports.push(PortMapping {
                    proto: p.proto,
                    host_port: p.host_port,
                    container_ip: gw.ip,
                    container_port: p.container_port,
                });
            }
        }
        ports.sort_by_key(|p| (p.proto, p.host_port));
        Ruleset {
            bridge: self.gateway.bridge.clone(),
            subnet: self.gateway.subnet,
            ports,
            vteps: self.vteps(),
            store: self.store.clone(),
        }
    }

    /// Every member's IPv4 VTEP in the view, this host's included, sorted.
    fn vteps(&self) -> Vec<Ipv4Addr> {
        let mut vteps: Vec<Ipv4Addr> = self.view.with(|v| {
            v.nodes
                .values()
                .filter_map(|n| match n.advertise_addr {
                    IpAddr::V4(a) => Some(a),
                    IpAddr::V6(_) => None,
                })
                .collect()
        });
        if let IpAddr::V4(me) = self.advertise {
            vteps.push(me);
        }
        vteps.sort();
        vteps.dedup();
        vteps
    }

    /// Keeps the firewall's VTEP set equal to the view's members: re-applies the table when
    /// that set changes (and once the view is first listed, so that a host with no container
    /// is protected too). Off the peer-sync path: membership changes are rare, view changes
    /// are not. Runs forever.
    pub async fn follow_members(self: Arc<Self>) {
        let mut revisions = self.view.subscribe();
        let mut applied: Option<Vec<Ipv4Addr>> = None;
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        loop {
            // Before the first listing the view knows no member: applying then would drop
            // every other host's VXLAN.
            if self.view.revision() >= 1 {
                let vteps = self.vteps();
                if applied.as_ref() != Some(&vteps) {
                    match self.sync_firewall().await {
                        Ok(_) => {
                            applied = Some(vteps);
                            backoff.reset();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "applying the firewall failed; retrying");
                            backoff.wait().await;
                            continue;
                        }
                    }
                }
            }
            if revisions.changed().await.is_err() {
                return;
            }
        }
    }

    /// Replaces vxnet's nftables table with the desired one (atomic, idempotent). Nothing is
    /// programmed before the view has been listed (its VTEP set would be incomplete).
    pub async fn sync_firewall(&self) -> Result<usize, Error> {
        if self.view.revision() < 1 {
            return Ok(0);
        }
        let turn = self.firewall_stopped.clone().lock_owned().await;
        if *turn {
            return Ok(0);
        }
        // Computed in this turn: an apply never writes a ruleset older than the last one.
        let ruleset = self.ruleset();
        let count = ruleset.ports.len();
        self.on_firewall(turn, move |f| f.apply(&ruleset)).await?;
        Ok(count)
    }

    /// Removes vxnet's nftables table (clean shutdown); later syncs leave it removed.
    pub async fn remove_firewall(&self) -> Result<(), Error> {
        let mut turn = self.firewall_stopped.clone().lock_owned().await;
        *turn = true;
        self.on_firewall(turn, |f| f.remove()).await
    }

    /// Runs `op` on a blocking-pool thread (a blocking netlink exchange; such a thread is
    /// always in the daemon's own namespace), holding `turn` until `op` is done: a caller
    /// that gives up waiting does not let the next apply, or the removal, start early.
    async fn on_firewall(
        &self,
        turn: tokio::sync::OwnedMutexGuard<bool>,
        op: impl FnOnce(&dyn Firewall) -> Result<(), crate::firewall::FirewallError> + Send + 'static,
    ) -> Result<(), Error> {
        let firewall = self.firewall.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            op(firewall.as_ref())
        })
        .await
        .map_err(|e| Error::io("firewall worker", std::io::Error::other(e.to_string())))??;
        Ok(())
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
        })
    }

    /// The remote endpoints of one network, as FDB/neighbour entries.
    fn desired_peers(&self, view: &ClusterView, net: &NetworkId) -> PeerMap {
        desired_peers(view, &self.node_id, net)
    }

    /// Networks with at least one live local attachment, and those attachments.
    fn local_attachments(&self) -> HashMap<NetworkId, Vec<(PathBuf, Attachment)>> {
        let mut out: HashMap<NetworkId, Vec<(PathBuf, Attachment)>> = HashMap::new();
        for r in self.registry.list() {
            if matches!(r.state, ContainerState::Exited { .. }) {
                continue;
            }
            for a in &r.attachments {
                out.entry(a.network_id.clone())
                    .or_default()
                    .push((r.netns.clone(), a.clone()));
            }
        }
        out
    }

    fn endpoint_spec(att: &Attachment) -> Result<EndpointSpec, Error> {
        Ok(EndpointSpec {
            host_ifname: att.host_ifname(),
            container_ifname: att.ifname.clone(),
            address: Ipv4Net::new(att.ip, att.prefix_len)
                .map_err(|e| Error::invalid(e.to_string()))?,
            mac: att.mac,
            mtu: att.mtu,
            // Only an overlay without a gateway bridge beside it carries the default route.
            default_gateway: att.default_route.then_some(att.gateway),
        })
    }

    /// The network's slot, made empty if it has none yet.
    fn slot(&self, net: &NetworkId) -> Slot {
        lock(&self.state).entry(net.clone()).or_default().clone()
    }

    fn slots(&self) -> Vec<(NetworkId, Slot)> {
        lock(&self.state)
            .iter()
            .map(|(id, slot)| (id.clone(), slot.clone()))
            .collect()
    }

    /// Forgets an empty slot nobody else holds (a network this host no longer serves).
    fn prune_slot(&self, net: &NetworkId) {
        let mut slots = lock(&self.state);
        let unused = slots.get(net).is_some_and(|slot| {
            Arc::strong_count(slot) == 1 && slot.try_lock().is_ok_and(|p| p.is_none())
        });
        if unused {
            slots.remove(net);
        }
    }

    /// Gets the network's sandbox ready, creating it (with every current remote peer) if
    /// this host has none yet.
    async fn ensure_programmed<'a>(
        &self,
        slot: &'a mut Option<Programmed>,
        net: &Network,
    ) -> Result<&'a mut Programmed, Error> {
        if slot.is_none() {
            let spec = self.sandbox_spec(net).await?;
            let sandbox = dataplane::ensure_sandbox(&self.host, &self.run_dir, &spec).await?;
            let peers = self.view.with(|v| self.desired_peers(v, &net.id));
            let list: Vec<Peer> = peers.values().copied().collect();
            dataplane::add_peers(&sandbox, &list).await?;
            *slot = Some(Programmed {
                sandbox: Arc::new(sandbox),
                peers,
                endpoints: BTreeSet::new(),
            });
        }
        slot.as_mut()
            .ok_or_else(|| Error::conflict("sandbox vanished while being programmed"))
    }

    /// Programs one container interface: the network's sandbox (made if missing), a veth
    /// whose container end is `att.ifname` with its address, MAC, MTU and routes.
    pub async fn attach(
        &self,
        container: &NetNs,
        net: &Network,
        att: &Attachment,
    ) -> Result<(), Error> {
        let slot = self.slot(&net.id);
        let mut programmed = slot.lock().await;
        let programmed = self.ensure_programmed(&mut programmed, net).await?;
        // Counted before the kernel work, so a failure half-way still gets cleaned up by detach.
        programmed.endpoints.insert(att.host_ifname());
        dataplane::ensure_endpoint(&programmed.sandbox, container, &Self::endpoint_spec(att)?)
            .await?;
        Ok(())
    }

    /// Removes one container interface; removes the sandbox when it served the last one.
    pub async fn detach(&self, att: &Attachment) -> Result<(), Error> {
        self.remove_port(&att.network_id, &att.host_ifname()).await
    }

    /// Makes a hand-off port for a container another runtime runs (see
    /// [`dataplane::HandoffSpec`]): the network's sandbox (made if missing) and a veth whose
    /// sandbox end is on br0 and whose other end waits in this host's namespace.
    pub async fn attach_handoff(
        &self,
        runtime: &NetNs,
        net: &Network,
        spec: &dataplane::HandoffSpec,
    ) -> Result<(), Error> {
        let slot = self.slot(&net.id);
        let mut programmed = slot.lock().await;
        let programmed = self.ensure_programmed(&mut programmed, net).await?;
        programmed.endpoints.insert(spec.sandbox_ifname.clone());
        dataplane::ensure_handoff_endpoint(&programmed.sandbox, runtime, spec).await?;
        Ok(())
    }

    /// Removes a hand-off port; removes the sandbox when it served the last one.
    pub async fn detach_handoff(&self, net: &NetworkId, sandbox_ifname: &str) -> Result<(), Error> {
        self.remove_port(net, sandbox_ifname).await
    }

    async fn remove_port(&self, net: &NetworkId, sandbox_ifname: &str) -> Result<(), Error> {
        let slot = self.slot(net);
        let mut programmed = slot.lock().await;
        let last = match programmed.as_mut() {
            Some(p) if p.endpoints.len() > 1 || !p.endpoints.contains(sandbox_ifname) => {
                // Not the sandbox's last port: delete the link without the lock. Deleting a
                // device waits for an RCU grace period (milliseconds to tens of them), which
                // must not hold up the network's other attaches and its peer sync.
                p.endpoints.remove(sandbox_ifname);
                let sandbox = p.sandbox.clone();
                drop(programmed);
                dataplane::remove_endpoint(&sandbox, sandbox_ifname).await?;
                return Ok(());
            }
            // The last port: the sandbox goes with it (under the lock, so that an attach
            // racing in makes a new sandbox rather than using the one being removed).
            Some(p) => {
                dataplane::remove_endpoint(&p.sandbox, sandbox_ifname).await?;
                p.endpoints.remove(sandbox_ifname);
                p.endpoints.is_empty()
            }
            // Not programmed in this run (a restart, before the start-up resync): the sandbox
            // may still exist on disk; remove it only if nothing else here uses it (else that
            // resync sweeps the port as a stray).
            None => {
                let others = self
                    .plugin_ports()
                    .get(net)
                    .is_some_and(|ports| ports.iter().any(|p| p != sandbox_ifname));
                !(self.local_attachments().contains_key(net) || others)
            }
        };
        if last {
            *programmed = None;
            dataplane::remove_sandbox(&self.run_dir, &sandbox_name(net)).await?;
        }
        drop(programmed);
        drop(slot);
        self.prune_slot(net);
        Ok(())
    }

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
            match apply_plan(&p.sandbox, &plan).await {
                Ok(()) => plan.record(&mut p.peers),
                // What was programmed is unknown now: the retry reads the kernel back.
                Err(e) => self.network_failed(&id, &e),
            }
        }
    }

    /// Records a failed reconcile of `net` and schedules its retry. Logged when the error
    /// changes, not on every attempt.
    fn network_failed(&self, net: &NetworkId, e: &Error) {
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

    fn network_recovered(&self, net: &NetworkId) {
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

    /// Brings one network on this host in line with what is wanted, reading the kernel
    /// back: its sandbox (br0, vxlan1) with a veth per local container and an entry per
    /// remote endpoint when something here is attached to it, no sandbox otherwise. Safe to
    /// repeat; holds that network's lock only.
    async fn reconcile_network(&self, net_id: &NetworkId) -> Result<NetworkResync, Error> {
        let mut out = NetworkResync {
            network: net_id.to_string(),
            ..Default::default()
        };
        let network = self
            .view
            .with(|v| v.networks.get(net_id).map(|s| s.network.clone()));
        out.name = network.as_ref().map(|n| n.name.clone());
        let attachments = self.local_attachments().remove(net_id).unwrap_or_default();
        let plugin = self.plugin_ports().remove(net_id).unwrap_or_default();
        let slot = self.slot(net_id);
        let mut programmed = slot.lock().await;
        // Ours: what the records say, plus what attach has made and its container has not
        // recorded yet (attach finished, the record is being written).
        let mut ours: HashSet<String> = programmed
            .as_ref()
            .map(|p| p.endpoints.iter().cloned().collect())
            .unwrap_or_default();
        ours.extend(attachments.iter().map(|(_, a)| a.host_ifname()));
        // The plugin's ports are kept as they are: their other ends belong to containers
        // of another runtime, so there is nothing here to repair them from.
        ours.extend(plugin.iter().cloned());
        let net = match network {
            Some(net) if !ours.is_empty() => net,
            // Nobody here needs it (the network is gone, or has no local attachment).
            _ => {
                *programmed = None;
                let name = sandbox_name(net_id);
                if dataplane::list_sandboxes(&self.run_dir).contains(&name) {
                    dataplane::remove_sandbox(&self.run_dir, &name).await?;
                    out.sandbox_removed = true;
                }
                drop(programmed);
                drop(slot);
                self.prune_slot(net_id);
                return Ok(out);
            }
        };
        // Re-ensure the sandbox itself (repairs br0/vxlan1) even when cached.
        let spec = self.sandbox_spec(&net).await?;
        let sandbox = dataplane::ensure_sandbox(&self.host, &self.run_dir, &spec).await?;
        out.sandbox_ensured = true;
        for (netns, att) in &attachments {
            match NetNs::open(netns) {
                Ok(ns) => {
                    dataplane::ensure_endpoint(&sandbox, &ns, &Self::endpoint_spec(att)?).await?;
                    out.endpoints_repaired += 1;
                }
                Err(e) => tracing::warn!(netns = %netns.display(), error = %e,
                    "container namespace missing; its interface cannot be repaired"),
            }
        }
        for link in dataplane::list_endpoint_links(&sandbox).await? {
            if !ours.contains(&link) {
                dataplane::remove_endpoint(&sandbox, &link).await?;
                out.stray_links_removed += 1;
            }
        }
        // Peers from the kernel, not the cache: after a failure half-way the cache is wrong.
        let want = self.view.with(|v| self.desired_peers(v, net_id));
        let have: PeerMap = dataplane::list_peers(&sandbox)
            .await?
            .into_iter()
            .map(|p| (p.ip, p))
            .collect();
        let plan = PeerPlan::diff(&have, &want);
        apply_plan(&sandbox, &plan).await?;
        out.peers_removed = plan.stale.len();
        out.peers_added = plan.fresh.len();
        *programmed = Some(Programmed {
            sandbox: Arc::new(sandbox),
            peers: want,
            endpoints: ours.into_iter().collect(),
        });
        Ok(out)
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
            match self.reconcile_network(id).await {
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

    /// The gateway bridge: every live container's eth1, strays removed.
    async fn resync_gateway(&self, report: &mut ResyncReport) -> Result<(), Error> {
        let live: Vec<_> = self
            .registry
            .list()
            .into_iter()
            .filter(|r| !matches!(r.state, ContainerState::Exited { .. }))
            .filter(|r| r.gateway_attachment.is_some())
            .collect();
        let bridge = match live.is_empty() {
            false => self.ensure_gateway_bridge().await?,
            // No container needs the bridge; if it exists from before, still sweep it.
            true => match *self.gateway_bridge.lock().await {
                Some(bridge) => bridge,
                None => return Ok(()),
            },
        };
        let mut ours: HashSet<String> = live
            .iter()
            .filter_map(|r| r.gateway_attachment.as_ref().map(|g| g.host_ifname.clone()))
            .collect();
        ours.extend(lock(&self.gateway_endpoints).iter().cloned());
        for link in dataplane::list_gateway_endpoints(&self.host, bridge).await? {
            if !ours.contains(&link) {
                dataplane::remove_gateway_endpoint(&self.host, &link).await?;
                report.stray_links_removed += 1;
            }
        }
        for r in &live {
            let Some(gw) = &r.gateway_attachment else {
                continue;
            };
            match NetNs::open(&r.netns) {
                Ok(ns) => {
                    dataplane::ensure_gateway_endpoint(
                        &self.host,
                        bridge,
                        &ns,
                        &Self::gateway_spec(gw)?,
                    )
                    .await?;
                    report.gateway_endpoints += 1;
                }
                Err(e) => tracing::warn!(netns = %r.netns.display(), error = %e,
                    "container namespace missing; its gateway interface cannot be repaired"),
            }
        }
        Ok(())
    }

    /// Retries every failed network whose pause is over, each with a full reconcile.
    async fn retry_due(&self) {
        let now = tokio::time::Instant::now();
        let due: Vec<NetworkId> = lock(&self.failing)
            .iter()
            .filter(|(_, f)| f.retry_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            match self.reconcile_network(&id).await {
                Ok(_) => self.network_recovered(&id),
                Err(e) => self.network_failed(&id, &e),
            }
        }
    }

    fn next_retry(&self) -> Option<tokio::time::Instant> {
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
                    self.sync_peers().await;
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

/// The FDB/neighbour entries `ep` needs on this host, if any: none for this host's own
/// endpoints, nor for one whose node is unknown (yet) or has no IPv4 VTEP.
fn peer_of(view: &ClusterView, me: &NodeId, ep: &Endpoint) -> Option<Peer> {
    if &ep.node_id == me {
        return None;
    }
    let IpAddr::V4(vtep) = view.nodes.get(&ep.node_id)?.advertise_addr else {
        return None;
    };
    Some(Peer {
        ip: ep.ip,
        mac: ep.mac,
        vtep,
    })
}

/// Every remote endpoint of `net`, from the whole view.
pub fn desired_peers(view: &ClusterView, me: &NodeId, net: &NetworkId) -> PeerMap {
    view.endpoints_of(net)
        .filter_map(|e| peer_of(view, me, e))
        .map(|p| (p.ip, p))
        .collect()
}

/// What to change in one sandbox: entries to remove, then entries to add (or replace).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PeerPlan {
    pub stale: Vec<Peer>,
    pub fresh: Vec<Peer>,
}

impl PeerPlan {
    pub fn is_empty(&self) -> bool {
        self.stale.is_empty() && self.fresh.is_empty()
    }

    /// `have` → `want`, address by address.
    pub fn diff(have: &PeerMap, want: &PeerMap) -> PeerPlan {
        let mut plan = PeerPlan::default();
        for (ip, old) in have {
            plan.step(Some(*old), want.get(ip).copied());
        }
        for (ip, new) in want {
            if !have.contains_key(ip) {
                plan.step(None, Some(*new));
            }
        }
        plan
    }

    fn step(&mut self, have: Option<Peer>, want: Option<Peer>) {
        if have == want {
            return;
        }
        if let Some(old) = have {
            // Same address and MAC at another VTEP (the container's host changed): the
            // add replaces both entries in place, so nothing is removed and no packet
            // finds the address missing meanwhile.
            if want.is_none_or(|new| new.mac != old.mac) {
                self.stale.push(old);
            }
        }
        if let Some(new) = want {
            self.fresh.push(new);
        }
    }

    /// Updates the record of what is programmed once the plan has been applied.
    pub fn record(&self, programmed: &mut PeerMap) {
        for p in &self.stale {
            if programmed.get(&p.ip) == Some(p) {
                programmed.remove(&p.ip);
            }
        }
        for p in &self.fresh {
            programmed.insert(p.ip, *p);
        }
    }
}

/// The plan that brings `programmed` (one network's) in line with the view: for the
/// addresses in `changes`, or for the whole network when `changes.all` is set.
pub fn plan_peers(
    view: &ClusterView,
    me: &NodeId,
    net: &NetworkId,
    programmed: &PeerMap,
    changes: &PeerChanges,
) -> PeerPlan {
    if changes.all {
        return PeerPlan::diff(programmed, &desired_peers(view, me, net));
    }
    let mut plan = PeerPlan::default();
    for ip in changes.addrs.get(net).into_iter().flatten() {
        let want = view
            .endpoint_at(net, *ip)
            .and_then(|e| peer_of(view, me, e));
        plan.step(programmed.get(ip).copied(), want);
    }
    plan
}

/// Removals first: an address whose MAC changed must lose its old entries before the new
/// ones go in (the removal checks what it deletes, but by MAC and address, not by owner).
async fn apply_plan(sandbox: &Sandbox, plan: &PeerPlan) -> Result<(), Error> {
    if !plan.stale.is_empty() {
        dataplane::remove_peers(sandbox, &plan.stale).await?;
    }
    if !plan.fresh.is_empty() {
        dataplane::add_peers(sandbox, &plan.fresh).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Id, Mac, Node};
    use crate::store::{KeyValue, Keys, WatchEvent};

    struct World {
        keys: Keys,
        view: ClusterView,
        net: NetworkId,
        nodes: Vec<NodeId>,
        me: NodeId,
        /// Endpoint IDs that exist, with their address.
        live: Vec<(Id, Ipv4Addr)>,
        seed: u64,
    }

    impl World {
        fn rand(&mut self, n: usize) -> usize {
            // A fixed LCG: the sequence (and so any failure) is the same on every run.
            self.seed = self
                .seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.seed >> 33) as usize) % n
        }

        fn put(&mut self, key: String, value: Vec<u8>) {
            let kv = KeyValue {
                key,
                value,
                create_revision: 1,
                mod_revision: 1,
                lease: 0,
            };
            self.view.apply(&self.keys, &WatchEvent::Put(kv));
        }

        fn put_node(&mut self, id: &NodeId, vtep: Ipv4Addr) {
            let node = Node {
                id: id.clone(),
                name: "n".into(),
                advertise_addr: IpAddr::V4(vtep),
                advertise_port: None,
                started: String::new(),
                version: String::new(),
            };
            let key = self.keys.node(id);
            self.put(key, serde_json::to_vec(&node).unwrap());
        }

        fn put_endpoint(&mut self, id: &Id, ip: Ipv4Addr, node: &NodeId) {
            let ep = Endpoint {
                id: id.clone(),
                network_id: self.net.clone(),
                name: "e".into(),
                node_id: node.clone(),
                ip,
                mac: Mac::from_ipv4(ip),
                created: String::new(),
            };
            let key = self.keys.endpoint(&self.net, id);
            self.put(key, serde_json::to_vec(&ep).unwrap());
        }

        fn delete(&mut self, key: String) {
            self.view.apply(
                &self.keys,
                &WatchEvent::Delete {
                    key,
                    mod_revision: 1,
                },
            );
        }

        fn free_ip(&mut self) -> Ipv4Addr {
            loop {
                let ip = Ipv4Addr::new(10, 0, 0, 2 + self.rand(60) as u8);
                if self.live.iter().all(|(_, l)| *l != ip) {
                    return ip;
                }
            }
        }

        /// One random change, as the watch would deliver it.
        fn step(&mut self) {
            let n = self.rand(self.nodes.len());
            let node = self.nodes[n].clone();
            match self.rand(10) {
                0..=3 if self.live.len() < 40 => {
                    let (id, ip) = (Id::random(), self.free_ip());
                    self.put_endpoint(&id, ip, &node);
                    self.live.push((id, ip));
                }
                0..=5 if !self.live.is_empty() => {
                    let i = self.rand(self.live.len());
                    let (id, _) = self.live.swap_remove(i);
                    let key = self.keys.endpoint(&self.net, &id);
                    self.delete(key);
                }
                // The endpoint's container moved to another host.
                6 if !self.live.is_empty() => {
                    let i = self.rand(self.live.len());
                    let (id, ip) = self.live[i].clone();
                    self.put_endpoint(&id, ip, &node);
                }
                // The endpoint was re-put with another address.
                7 if !self.live.is_empty() => {
                    let i = self.rand(self.live.len());
                    let ip = self.free_ip();
                    let id = self.live[i].0.clone();
                    self.put_endpoint(&id, ip, &node);
                    self.live[i].1 = ip;
                }
                // A host changed its VTEP, or went and came back.
                8 => {
                    let vtep = Ipv4Addr::new(192, 0, 2, 10 + self.rand(5) as u8);
                    self.put_node(&node, vtep);
                }
                9 => {
                    let key = self.keys.node(&node);
                    self.delete(key);
                }
                _ => {}
            }
        }
    }

    /// The incremental path (changed addresses only) must land where the full
    /// recomputation does, after every burst of adds, removes, moves, re-addressing and node
    /// changes.
    #[test]
    fn incremental_peer_sync_matches_full_recomputation() {
        let keys = Keys::new("/t/");
        let net = Id::random();
        let me = Id::random();
        let nodes = vec![me.clone(), Id::random(), Id::random(), Id::random()];
        let mut w = World {
            view: ClusterView::from_kvs(&keys, &[], 1),
            keys,
            net,
            nodes: nodes.clone(),
            me,
            live: Vec::new(),
            seed: 7,
        };
        for (i, n) in nodes.iter().enumerate() {
            w.put_node(n, Ipv4Addr::new(192, 0, 2, 10 + i as u8));
        }
        let mut programmed = PeerMap::new();
        let mut incremental_runs = 0;
        for round in 0..400 {
            let burst = 1 + w.rand(6);
            for _ in 0..burst {
                w.step();
            }
            let changes = w.view.take_peer_changes();
            incremental_runs += usize::from(!changes.all);
            let plan = plan_peers(&w.view, &w.me, &w.net, &programmed, &changes);
            // Applying the plan to a copy of the programmed set stands in for the kernel.
            plan.record(&mut programmed);
            let full = desired_peers(&w.view, &w.me, &w.net);
            assert_eq!(programmed, full, "round {round}");
        }
        assert!(
            incremental_runs > 100,
            "the incremental path was hardly exercised"
        );
    }

    #[test]
    fn a_move_to_another_host_replaces_without_removing() {
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        let at = |vtep: [u8; 4]| Peer {
            ip,
            mac: Mac::from_ipv4(ip),
            vtep: Ipv4Addr::from(vtep),
        };
        let have = PeerMap::from([(ip, at([192, 0, 2, 1]))]);
        let want = PeerMap::from([(ip, at([192, 0, 2, 2]))]);
        let plan = PeerPlan::diff(&have, &want);
        assert_eq!(plan.stale, vec![]);
        assert_eq!(plan.fresh, vec![at([192, 0, 2, 2])]);
        let gone = PeerPlan::diff(&have, &PeerMap::new());
        assert_eq!(gone.stale, vec![at([192, 0, 2, 1])]);
    }

    /// Records what reached it; `apply` waits for the test's go-ahead before it finishes.
    struct GatedFirewall {
        log: std::sync::Mutex<Vec<&'static str>>,
        entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl GatedFirewall {
        fn log(&self) -> Vec<&'static str> {
            self.log.lock().map(|l| l.clone()).unwrap_or_default()
        }
        fn note(&self, what: &'static str) {
            if let Ok(mut l) = self.log.lock() {
                l.push(what);
            }
        }
    }

    impl Firewall for GatedFirewall {
        fn apply(&self, _: &Ruleset) -> Result<(), crate::firewall::FirewallError> {
            self.note("apply started");
            let _ = self.entered.lock().map(|tx| tx.send(()));
            let _ = self.release.lock().map(|rx| rx.recv());
            self.note("apply done");
            Ok(())
        }
        fn remove(&self) -> Result<(), crate::firewall::FirewallError> {
            self.note("remove");
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_clean_stop_waits_for_a_running_firewall_apply_and_no_later_sync_undoes_it() {
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel();
        let firewall = Arc::new(GatedFirewall {
            log: Default::default(),
            entered: std::sync::Mutex::new(entered_tx),
            release: std::sync::Mutex::new(release_rx),
        });
        let dir = std::env::temp_dir().join(format!("vxnet-unit-firewall-{}", std::process::id()));
        let registry = Arc::new(Registry::load(&dir).expect("a registry in a fresh temp dir"));
        let (connection, handle, _) = rtnetlink::new_connection().expect("a netlink socket");
        tokio::spawn(connection);
        let reconciler = Arc::new(Reconciler::new(
            handle,
            LocalHost {
                run_dir: dir.clone(),
                advertise: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                node_id: Id::random(),
                gateway: GatewayConfig {
                    bridge: GatewayConfig::DEFAULT_BRIDGE.to_string(),
                    subnet: "172.18.0.0/16".parse().expect("a subnet"),
                },
            },
            // As if listed (revision 1): syncs now write the table.
            SharedView::fixed({
                let mut v = ClusterView::default();
                v.revision = 1;
                v
            }),
            registry,
            firewall.clone(),
        ));

        let sync = tokio::spawn({
            let r = reconciler.clone();
            async move { r.sync_firewall().await }
        });
        tokio::task::spawn_blocking(move || entered_rx.recv())
            .await
            .expect("the waiter")
            .expect("apply started");
        // Its caller gives up (a dropped request): the apply still finishes before the removal.
        sync.abort();
        let stop = tokio::spawn({
            let r = reconciler.clone();
            async move { r.remove_firewall().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(firewall.log(), ["apply started"], "removed during an apply");
        release_tx.send(()).expect("the apply is waiting");
        stop.await.expect("the stop task").expect("remove");
        // A sync that comes after the clean stop (a resync still running) changes nothing.
        assert_eq!(reconciler.sync_firewall().await.expect("a no-op sync"), 0);
        assert_eq!(firewall.log(), ["apply started", "apply done", "remove"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
