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
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::container::record::{Attachment, ContainerState, Registry};
use crate::dataplane::{self, EndpointSpec, Peer, Sandbox, SandboxSpec, Underlay};
use crate::error::Error;
use crate::model::{Network, NetworkId, NodeId};
use crate::netns::NetNs;
use crate::view::{ClusterView, SharedView};

/// VXLAN's UDP port (IANA); the same on every host of a cluster.
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN over IPv4 adds 50 bytes: outer Ethernet 14, IPv4 20, UDP 8, VXLAN 8.
pub const VXLAN_OVERHEAD: u32 = 50;

/// The name of a network's sandbox namespace: Docker's `1-` + 10 characters of the ID.
pub fn sandbox_name(net: &NetworkId) -> String {
    format!("{}{}", dataplane::SANDBOX_PREFIX, &net.as_str()[..10])
}

/// What a full resync found and fixed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ResyncReport {
    pub sandboxes: usize,
    pub sandboxes_removed: usize,
    pub endpoints_repaired: usize,
    pub stray_links_removed: usize,
    pub peers_added: usize,
    pub peers_removed: usize,
}

struct Programmed {
    sandbox: Sandbox,
    peers: BTreeSet<Peer>,
    /// This host's endpoints in the sandbox (sandbox-side veth names): when the last one
    /// goes, so does the sandbox.
    endpoints: BTreeSet<String>,
}

pub struct Reconciler {
    host: rtnetlink::Handle,
    run_dir: PathBuf,
    advertise: IpAddr,
    node_id: NodeId,
    view: SharedView,
    registry: Arc<Registry>,
    state: Mutex<HashMap<NetworkId, Programmed>>,
    underlay: Mutex<Option<Underlay>>,
}

impl Reconciler {
    pub fn new(
        host: rtnetlink::Handle,
        run_dir: PathBuf,
        advertise: IpAddr,
        node_id: NodeId,
        view: SharedView,
        registry: Arc<Registry>,
    ) -> Self {
        Reconciler {
            host,
            run_dir,
            advertise,
            node_id,
            view,
            registry,
            state: Mutex::new(HashMap::new()),
            underlay: Mutex::new(None),
        }
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
    fn desired_peers(&self, view: &ClusterView, net: &NetworkId) -> BTreeSet<Peer> {
        view.endpoints_of(net)
            .filter(|e| e.node_id != self.node_id)
            .filter_map(|e| {
                let node = view.nodes.get(&e.node_id)?;
                let IpAddr::V4(vtep) = node.advertise_addr else {
                    return None;
                };
                Some(Peer {
                    ip: e.ip,
                    mac: e.mac,
                    vtep,
                })
            })
            .collect()
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
            // The first interface carries the default route (the gateway bridge will take it
            // over later); later ones reach only their own subnet.
            default_gateway: (att.ifname == "eth0").then_some(att.gateway),
        })
    }

    /// Gets the network's sandbox ready, creating it (with every current remote peer) if
    /// this host has none yet.
    async fn ensure_programmed<'a>(
        &self,
        state: &'a mut HashMap<NetworkId, Programmed>,
        net: &Network,
    ) -> Result<&'a mut Programmed, Error> {
        if !state.contains_key(&net.id) {
            let spec = self.sandbox_spec(net).await?;
            let sandbox = dataplane::ensure_sandbox(&self.host, &self.run_dir, &spec).await?;
            let peers = self.view.with(|v| self.desired_peers(v, &net.id));
            let list: Vec<Peer> = peers.iter().copied().collect();
            dataplane::add_peers(&sandbox, &list).await?;
            state.insert(
                net.id.clone(),
                Programmed {
                    sandbox,
                    peers,
                    endpoints: BTreeSet::new(),
                },
            );
        }
        state
            .get_mut(&net.id)
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
        let mut state = self.state.lock().await;
        let programmed = self.ensure_programmed(&mut state, net).await?;
        // Counted before the kernel work, so a failure half-way still gets cleaned up by detach.
        programmed.endpoints.insert(att.host_ifname());
        dataplane::ensure_endpoint(&programmed.sandbox, container, &Self::endpoint_spec(att)?)
            .await?;
        Ok(())
    }

    /// Removes one container interface; removes the sandbox when it served the last one.
    pub async fn detach(&self, att: &Attachment) -> Result<(), Error> {
        let mut state = self.state.lock().await;
        let last = match state.get_mut(&att.network_id) {
            Some(p) => {
                dataplane::remove_endpoint(&p.sandbox, &att.host_ifname()).await?;
                p.endpoints.remove(&att.host_ifname());
                p.endpoints.is_empty()
            }
            // Not programmed in this run (e.g. after a restart before a resync): the sandbox
            // may still exist on disk; remove it only if nothing else here uses it.
            None => !self.local_attachments().contains_key(&att.network_id),
        };
        if last {
            state.remove(&att.network_id);
            dataplane::remove_sandbox(&self.run_dir, &sandbox_name(&att.network_id)).await?;
        }
        Ok(())
    }

    /// Brings every programmed sandbox's peers in line with the view (incremental: the
    /// cache says what was programmed).
    pub async fn sync_peers(&self) -> Result<(), Error> {
        let mut state = self.state.lock().await;
        let desired: Vec<(NetworkId, BTreeSet<Peer>)> = self.view.with(|v| {
            state
                .keys()
                .map(|id| (id.clone(), self.desired_peers(v, id)))
                .collect()
        });
        for (id, want) in desired {
            let Some(p) = state.get_mut(&id) else {
                continue;
            };
            let stale: Vec<Peer> = p.peers.difference(&want).copied().collect();
            let fresh: Vec<Peer> = want.difference(&p.peers).copied().collect();
            if !stale.is_empty() {
                dataplane::remove_peers(&p.sandbox, &stale).await?;
            }
            if !fresh.is_empty() {
                dataplane::add_peers(&p.sandbox, &fresh).await?;
            }
            p.peers = want;
        }
        Ok(())
    }

    /// Full resync: reads the kernel back and fixes every difference. Safe to run any time.
    pub async fn resync(&self) -> Result<ResyncReport, Error> {
        let mut report = ResyncReport::default();
        let mut state = self.state.lock().await;
        let local = self.local_attachments();
        let networks: HashMap<NetworkId, Network> = self.view.with(|v| {
            v.networks
                .iter()
                .map(|(id, s)| (id.clone(), s.network.clone()))
                .collect()
        });
        // Sandboxes nobody here needs any more (their network is gone or has no local
        // attachment): remove them.
        let wanted: HashSet<String> = local
            .keys()
            .filter(|id| networks.contains_key(*id))
            .map(sandbox_name)
            .collect();
        for name in dataplane::list_sandboxes(&self.run_dir) {
            if !wanted.contains(&name) {
                dataplane::remove_sandbox(&self.run_dir, &name).await?;
                report.sandboxes_removed += 1;
            }
        }
        state.retain(|id, _| wanted.contains(&sandbox_name(id)));

        for (net_id, attachments) in &local {
            let Some(net) = networks.get(net_id) else {
                continue;
            };
            // Re-ensure the sandbox itself (repairs br0/vxlan1) even when cached.
            let spec = self.sandbox_spec(net).await?;
            let sandbox = dataplane::ensure_sandbox(&self.host, &self.run_dir, &spec).await?;
            report.sandboxes += 1;
            let mut ours = HashSet::new();
            for (netns, att) in attachments {
                ours.insert(att.host_ifname());
                match NetNs::open(netns) {
                    Ok(ns) => {
                        dataplane::ensure_endpoint(&sandbox, &ns, &Self::endpoint_spec(att)?)
                            .await?;
                        report.endpoints_repaired += 1;
                    }
                    Err(e) => tracing::warn!(netns = %netns.display(), error = %e,
                        "container namespace missing; its interface cannot be repaired"),
                }
            }
            for link in dataplane::list_endpoint_links(&sandbox).await? {
                if !ours.contains(&link) {
                    dataplane::remove_endpoint(&sandbox, &link).await?;
                    report.stray_links_removed += 1;
                }
            }
            let want = self.view.with(|v| self.desired_peers(v, net_id));
            let have: BTreeSet<Peer> = dataplane::list_peers(&sandbox).await?.into_iter().collect();
            let stale: Vec<Peer> = have.difference(&want).copied().collect();
            let fresh: Vec<Peer> = want.difference(&have).copied().collect();
            dataplane::remove_peers(&sandbox, &stale).await?;
            dataplane::add_peers(&sandbox, &fresh).await?;
            report.peers_removed += stale.len();
            report.peers_added += fresh.len();
            state.insert(
                net_id.clone(),
                Programmed {
                    sandbox,
                    peers: want,
                    endpoints: ours.into_iter().collect(),
                },
            );
        }
        Ok(report)
    }

    /// Follows the view: every new revision brings the peers up to date. A failed sync is
    /// retried (after a pause) even if no further change arrives. Runs forever.
    pub async fn run(self: Arc<Self>) {
        let mut revisions = self.view.subscribe();
        loop {
            if revisions.changed().await.is_err() {
                return;
            }
            while let Err(e) = self.sync_peers().await {
                tracing::warn!(error = %e, "programming remote endpoints failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    }
}
