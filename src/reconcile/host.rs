//! What the reconciler keeps in the host's own namespace: the gateway bridge (eth1 of every
//! container) and vxnet's nftables table (NAT, published ports, the trust boundaries).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::Ipv4Net;

use super::controller::{RETRY_MAX, RETRY_MIN};
use super::report::ResyncReport;
use super::{GatewayConfig, Reconciler};
use crate::backoff::Backoff;
use crate::dataplane;
use crate::error::Error;
use crate::firewall::{Firewall, PortMapping, Ruleset};
use crate::netns::NetNs;
use crate::registry::{ContainerState, GatewayAttachment};
use crate::sync::lock;

impl Reconciler {
    /// The gateway bridge, made (with forwarding on and the NAT rules in place) if missing.
    pub(super) async fn ensure_gateway_bridge(&self) -> Result<u32, Error> {
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

    /// Routes a CNI container's overlay address via its gateway-bridge address in the host
    /// namespace (see [`dataplane::ensure_container_route`]: published ports of a chained
    /// `portmap` arrive that way).
    pub async fn route_to_container(&self, dst: Ipv4Addr, via: Ipv4Addr) -> Result<(), Error> {
        let bridge = self.ensure_gateway_bridge().await?;
        dataplane::ensure_container_route(&self.host, bridge, dst, via).await?;
        Ok(())
    }

    pub async fn unroute_container(&self, dst: Ipv4Addr) -> Result<(), Error> {
        dataplane::remove_container_route(&self.host, dst).await?;
        Ok(())
    }

    /// The container routes the records want: every live CNI container's overlay addresses
    /// via its gateway-bridge address.
    pub(super) fn wanted_container_routes(&self) -> std::collections::HashMap<Ipv4Addr, Ipv4Addr> {
        self.registry
            .list()
            .iter()
            .filter(|r| matches!(r.state, ContainerState::Cni { .. }))
            .filter_map(|r| r.gateway_attachment.as_ref().map(|g| (r, g.ip)))
            .flat_map(|(r, via)| r.attachments.iter().map(move |a| (a.ip, via)))
            .collect()
    }

    pub async fn detach_gateway(&self, gw: &GatewayAttachment) -> Result<(), Error> {
        dataplane::remove_gateway_endpoint(&self.host, &gw.host_ifname).await?;
        lock(&self.gateway_endpoints).remove(&gw.host_ifname);
        Ok(())
    }

    pub(super) fn gateway_spec(
        gw: &GatewayAttachment,
    ) -> Result<dataplane::GatewayEndpointSpec, Error> {
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
    pub(super) fn ruleset(&self) -> Ruleset {
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
            vxlan_port: super::VXLAN_PORT,
            vteps: self.vteps(),
            store: self.store.clone(),
            host_services: self.host_services.clone(),
        }
    }

    /// Every member's IPv4 VTEP in the view, this host's included, sorted.
    pub(super) fn vteps(&self) -> Vec<Ipv4Addr> {
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
    pub(super) async fn on_firewall(
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

    /// The gateway bridge: every live container's eth1, strays removed.
    pub(super) async fn resync_gateway(&self, report: &mut ResyncReport) -> Result<(), Error> {
        let live: Vec<_> = self
            .registry
            .list()
            .into_iter()
            .filter(|r| !matches!(r.state, ContainerState::Exited { .. }))
            .filter(|r| r.gateway_attachment.is_some())
            .collect();
        let bridge = match live.is_empty() {
            // Read back, not taken from the cache: someone may have deleted the bridge (its
            // old index then names nothing, and every port's repair failed with EINVAL).
            false => {
                *self.gateway_bridge.lock().await = None;
                self.ensure_gateway_bridge().await?
            }
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
            match r.netns_ref().open() {
                Ok(Some(ns)) => {
                    dataplane::ensure_gateway_endpoint(
                        &self.host,
                        bridge,
                        &ns,
                        &Self::gateway_spec(gw)?,
                    )
                    .await?;
                    report.gateway_endpoints += 1;
                }
                // A CNI runtime's namespace that is gone: released by the namespace watch.
                Ok(None) => {}
                Err(e) => tracing::warn!(netns = %r.netns.display(), error = %e,
                    "container namespace missing; its gateway interface cannot be repaired"),
            }
        }
        let wanted = self.wanted_container_routes();
        for (dst, via) in dataplane::list_container_routes(&self.host).await? {
            if wanted.get(&dst) != Some(&via) {
                dataplane::remove_container_route(&self.host, dst).await?;
            }
        }
        for (dst, via) in wanted {
            dataplane::ensure_container_route(&self.host, bridge, dst, via).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Id;
    use crate::reconcile::{GatewayConfig, LocalHost};
    use crate::registry::Registry;
    use crate::view::{ClusterView, SharedView};
    use std::net::{IpAddr, Ipv4Addr};

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
        fn guard_dns(
            &self,
            _: &crate::firewall::DnsGuard,
        ) -> Result<(), crate::firewall::FirewallError> {
            self.note("guard_dns");
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
