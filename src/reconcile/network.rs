//! One network on this host: its slot (what is programmed, behind the network's own lock),
//! the attach/detach path, and `reconcile_network`, the one reconcile of a network that is
//! safe to repeat.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use tokio::sync::Mutex;

use super::peers::{apply_plan, PeerMap, PeerPlan};
use super::report::NetworkResync;
use super::{sandbox_name, Reconciler};
use crate::dataplane::{self, Peer, Sandbox};
use crate::error::Error;
use crate::model::{Network, NetworkId};
use crate::netns::NetNs;
use crate::registry::Attachment;
use crate::sync::lock;

pub(super) struct Programmed {
    /// Shared so that a port can be removed without holding the state lock.
    pub(super) sandbox: Arc<Sandbox>,
    /// What this run has programmed (or, after a resync, read back and fixed).
    pub(super) peers: PeerMap,
    /// This host's endpoints in the sandbox (sandbox-side veth names): when the last one
    /// goes, so does the sandbox.
    pub(super) endpoints: BTreeSet<String>,
    /// The name server's sockets in the sandbox (none when DNS is off or could not listen;
    /// the network's next reconcile tries again).
    pub(super) dns: Option<crate::dns::Listener>,
}

/// One network's programmed state on this host (`None`: no sandbox). Each network has its
/// own lock, so kernel work in one network (a 50k-peer batch, a slow netlink answer) holds
/// up nothing in another; one network is never reconciled twice at once.
pub(super) type Slot = Arc<Mutex<Option<Programmed>>>;

impl Reconciler {
    /// The network's slot, made empty if it has none yet.
    pub(super) fn slot(&self, net: &NetworkId) -> Slot {
        lock(&self.state).entry(net.clone()).or_default().clone()
    }

    pub(super) fn slots(&self) -> Vec<(NetworkId, Slot)> {
        lock(&self.state)
            .iter()
            .map(|(id, slot)| (id.clone(), slot.clone()))
            .collect()
    }

    /// How many networks this host holds a sandbox slot for (its health report).
    pub fn programmed_networks(&self) -> usize {
        lock(&self.state).len()
    }

    /// Forgets an empty slot nobody else holds (a network this host no longer serves).
    pub(super) fn prune_slot(&self, net: &NetworkId) {
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
    pub(super) async fn ensure_programmed<'a>(
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
            let dns = self.dns_listener(&net.id, &sandbox, None);
            *slot = Some(Programmed {
                sandbox: Arc::new(sandbox),
                peers,
                endpoints: BTreeSet::new(),
                dns,
            });
        }
        slot.as_mut()
            .ok_or_else(|| Error::conflict("sandbox vanished while being programmed"))
    }

    /// The name server's sockets for a network's sandbox: `old` if they live in it, new ones
    /// otherwise. A failure to listen costs that network its names, not its traffic.
    fn dns_listener(
        &self,
        net: &NetworkId,
        sandbox: &Sandbox,
        old: Option<crate::dns::Listener>,
    ) -> Option<crate::dns::Listener> {
        let server = self.dns.get()?;
        if let Some(old) = old.filter(|l| l.is_in(sandbox.ns())) {
            return Some(old);
        }
        let guard = crate::firewall::DnsGuard {
            listen: crate::dns::LISTEN_ADDR,
            port: crate::dns::PORT,
            rate: crate::dns::limit::PER_SOURCE_RATE as u32,
            sources: 4096,
        };
        let firewall = self.firewall.clone();
        let guarded = sandbox
            .ns()
            .run(move || firewall.guard_dns(&guard).map_err(std::io::Error::other));
        if let Err(e) = guarded {
            // The server's own per-endpoint limit still holds; only the kernel queue is shared.
            tracing::warn!(network = net.short(), error = %e, "cannot program the name server's per-source limit");
        }
        match server.listen(net, sandbox.ns()) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(network = net.short(), error = %e, "name server not serving this network");
                None
            }
        }
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
        dataplane::ensure_endpoint(&programmed.sandbox, container, &self.endpoint_spec(att)?)
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

    pub(super) async fn remove_port(
        &self,
        net: &NetworkId,
        sandbox_ifname: &str,
    ) -> Result<(), Error> {
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

    /// Brings one network on this host in line with what is wanted, reading the kernel
    /// back: its sandbox (br0, vxlan1) with a veth per local container and an entry per
    /// remote endpoint when something here is attached to it, no sandbox otherwise. Safe to
    /// repeat; holds that network's lock only.
    pub(super) async fn reconcile_network(
        &self,
        net_id: &NetworkId,
    ) -> Result<NetworkResync, Error> {
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
            match netns.open() {
                Ok(Some(ns)) => {
                    dataplane::ensure_endpoint(&sandbox, &ns, &self.endpoint_spec(att)?).await?;
                    out.endpoints_repaired += 1;
                }
                // A CNI runtime's namespace that is gone: its attachment is released by the
                // container service's namespace watch, not repaired into whatever now holds
                // that path.
                Ok(None) => {}
                Err(e) => tracing::warn!(netns = %netns.path.display(), error = %e,
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
        let dns = programmed.take().and_then(|mut p| p.dns.take());
        let dns = self.dns_listener(net_id, &sandbox, dns);
        *programmed = Some(Programmed {
            sandbox: Arc::new(sandbox),
            peers: want,
            endpoints: ours.into_iter().collect(),
            dns,
        });
        Ok(out)
    }
}
