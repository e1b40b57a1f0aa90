//! Containers a CNI runtime (containerd, Podman, …) attaches through `vxnet-cni`: the same
//! records, addresses and interfaces as `vxnet run`'s, in a network namespace the runtime
//! made. One record per CNI container ID, with one attachment per ADD (`CNI_IFNAME`) and
//! one gateway-bridge interface shared by them.
//!
//! Runtimes do not always say when a container is gone (containerd leaks an attachment
//! when a task is killed without DEL), so the namespace is watched: once its path names
//! nothing, or another namespace, the container's endpoints are released everywhere.

use std::sync::Arc;
use std::time::Duration;

use super::{AttachOptions, ContainerService, Mutex};
use crate::cluster;
use crate::cni::requests::{
    AddRequest, Attachment as CniAttachment, AttachmentRef, GatewayInterface, GcReport,
    DEFAULT_GATEWAY_IFNAME,
};
use crate::cni::spec::{valid_container_id, valid_ifname};
use crate::error::Error;
use crate::model::{self, Id};
use crate::netns::NetNs;
use crate::registry::{Attachment, ContainerRecord, ContainerState, Refused};
use crate::sync;

/// How often the runtimes' namespaces are looked at (an open and an fstat each).
const NAMESPACE_WATCH: Duration = Duration::from_secs(1);

impl ContainerService {
    fn cni_lock(&self, container_id: &str) -> Arc<Mutex<()>> {
        let mut locks = sync::lock(&self.cni_locks);
        // Locks nobody holds or waits for are dropped, so the map does not grow with every
        // container a runtime ever ran.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(container_id.to_string()).or_default().clone()
    }

    fn find_cni(&self, container_id: &str) -> Option<ContainerRecord> {
        self.registry
            .list()
            .into_iter()
            .find(|r| r.cni_container_id() == Some(container_id))
    }

    /// A runtime's namespace is a tenant's: never this host's own, nor one vxnet made (a
    /// sandbox, or a `vxnet run` container's).
    fn refuse_vxnet_namespace(&self, inode: u64) -> Result<(), Error> {
        use std::os::unix::fs::MetadataExt;
        let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino());
        if own.is_ok_and(|own| own == inode) {
            return Err(Error::invalid(
                "CNI_NETNS is this host's own network namespace: give the container's",
            ));
        }
        let ours = std::fs::read_dir(&self.netns_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == inode));
        if ours {
            return Err(Error::invalid(
                "CNI_NETNS is a namespace vxnet made (a network sandbox or a vxnet container): give the container's",
            ));
        }
        Ok(())
    }

    /// What a CNI result lists for `att` of `record`.
    fn describe(&self, record: &ContainerRecord, att: &Attachment) -> CniAttachment {
        let container_id = record.cni_container_id().unwrap_or_default().to_string();
        let gateway_interface = record
            .gateway_attachment
            .as_ref()
            .map(|g| GatewayInterface {
                ifname: g.ifname.clone(),
                mac: g.mac.to_string(),
                ip: g.ip,
                prefix_len: g.prefix_len,
                gateway: g.gateway,
            });
        let default_gateway = match &gateway_interface {
            Some(g) => Some(g.gateway),
            None => att.default_route.then_some(att.gateway),
        };
        let dns = self.reconciler.dns();
        CniAttachment {
            container_id,
            ifname: att.ifname.clone(),
            netns: record.netns.clone(),
            network: att.network_name.clone(),
            network_id: att.network_id.to_string(),
            endpoint_id: att.endpoint_id.to_string(),
            mac: att.mac.to_string(),
            mtu: att.mtu,
            ip: att.ip,
            prefix_len: att.prefix_len,
            gateway: att.gateway,
            gateway_interface,
            default_gateway,
            nameserver: dns.map(|_| crate::dns::LISTEN_ADDR),
            search: dns.map(|d| d.search_domains()).unwrap_or_default(),
        }
    }

    /// CNI ADD: claims an address on the network cluster-wide and makes `ifname` in the
    /// runtime's namespace, plus the gateway-bridge interface on the container's first
    /// non-internal network. Repeating an ADD that succeeded answers the same attachment.
    pub async fn cni_add(self: &Arc<Self>, req: AddRequest) -> Result<CniAttachment, Error> {
        if !valid_container_id(&req.container_id) {
            return Err(Error::invalid(format!(
                "invalid CNI container ID {:?}",
                req.container_id
            )));
        }
        let gateway_ifname = req
            .gateway_ifname
            .clone()
            .unwrap_or_else(|| DEFAULT_GATEWAY_IFNAME.to_string());
        for name in [&req.ifname, &gateway_ifname] {
            // Stricter than the spec: the container's record keeps only names of letters,
            // digits, '_' and '-' (a record read back with another is refused, and its
            // addresses would then be nobody's).
            let kept = name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid_ifname(name) || !kept {
                return Err(Error::invalid(format!(
                    "invalid interface name {name:?}: use 1 to 15 letters, digits, '_' or '-'"
                )));
            }
        }
        if req.ifname == gateway_ifname {
            return Err(Error::invalid(format!(
                "CNI_IFNAME {:?} is the gateway interface's name: set \"gatewayInterface\" in the conflist to another",
                req.ifname
            )));
        }
        crate::validate::check_aliases(&req.aliases)?;
        let stored = self.resolve_network(&req.network).await?;
        let ns = NetNs::open_foreign(&req.netns).map_err(|e| {
            Error::invalid(format!(
                "CNI_NETNS {}: {e}: the runtime must give the container's network namespace",
                req.netns.display()
            ))
        })?;
        let inode = ns
            .inode()
            .map_err(|e| Error::io(format!("namespace {}", req.netns.display()), e))?;
        self.refuse_vxnet_namespace(inode)?;
        let lock = self.cni_lock(&req.container_id);
        let _turn = lock.lock().await;
        match self.find_cni(&req.container_id) {
            // The same container ID in another namespace: the old one went without a DEL
            // and the watch has not seen it yet.
            Some(old) if old.netns_ref().cni_inode != Some(inode) => {
                self.finish(&old.id).await;
                self.cni_create(req, ns, inode, stored, gateway_ifname)
                    .await
            }
            Some(record) => {
                self.cni_connect(record, req, ns, stored, gateway_ifname)
                    .await
            }
            None => {
                self.cni_create(req, ns, inode, stored, gateway_ifname)
                    .await
            }
        }
    }

    /// The container's first ADD: its record, the attachment, the gateway interface.
    async fn cni_create(
        self: &Arc<Self>,
        req: AddRequest,
        ns: NetNs,
        inode: u64,
        stored: cluster::StoredNetwork,
        gateway_ifname: String,
    ) -> Result<CniAttachment, Error> {
        let id = Id::random();
        let name = req
            .name
            .clone()
            .filter(|n| cluster::validate_name("container", n).is_ok())
            .unwrap_or_else(|| req.container_id.clone());
        cluster::validate_name("container", &name)?;
        let mut record = ContainerRecord {
            id: id.clone(),
            name: name.clone(),
            hostname: name.clone(),
            command: vec![],
            netns: req.netns.clone(),
            created: model::now_rfc3339(),
            state: ContainerState::Cni {
                container_id: req.container_id.clone(),
                netns_inode: inode,
            },
            attachments: vec![],
            // Nothing is left of it once its last attachment goes.
            auto_remove: true,
            gateway_attachment: None,
            ports: vec![],
            conflicts: vec![],
            etc_dir: None,
        };
        match self.registry.insert_new(record.clone()) {
            Ok(Ok(())) => {}
            Ok(Err(Refused::NameInUse)) => {
                return Err(Error::conflict(format!(
                    "container name {name:?} is already in use on this host (it is the container's name on the network's DNS): remove that container, or give this one another name"
                )))
            }
            Ok(Err(Refused::PortInUse { .. })) => {
                return Err(Error::conflict("a published port is in use"))
            }
            Err(e) => return Err(Error::io("saving container record", e)),
        }
        let lock = self.lock_for(&id);
        let _guard = lock.lock().await;
        let internal = stored.network.internal;
        let made = async {
            let (att, gw) = tokio::join!(
                self.attach(
                    &record,
                    &ns,
                    &stored,
                    AttachOptions {
                        ip: req.ip,
                        aliases: &req.aliases,
                        default_route: internal,
                        ifname: Some(&req.ifname),
                    },
                ),
                async {
                    match internal {
                        true => Ok((None, None)),
                        false => self
                            .make_gateway(&record, &ns, &gateway_ifname)
                            .await
                            .map(|(g, pick)| (Some(g), Some(pick))),
                    }
                }
            );
            let att = att.map(|a| record.attachments.push(a));
            let _pick = gw.map(|(g, pick)| {
                record.gateway_attachment = g;
                pick
            });
            att?;
            let _pick = _pick?;
            self.registry
                .put(record.clone())
                .map_err(|e| Error::io("saving container record", e))?;
            self.route_published(&record).await
        }
        .await;
        if let Err(e) = made {
            for att in std::mem::take(&mut record.attachments) {
                self.release(&att).await;
                let _ = self.reconciler.unroute_container(att.ip).await;
            }
            if let Some(gw) = record.gateway_attachment.take() {
                let _ = self.reconciler.detach_gateway(&gw).await;
            }
            let _ = self.registry.remove(&id);
            return Err(e);
        }
        let Some(att) = record.attachments.first() else {
            return Err(Error::invalid("the attachment was not recorded"));
        };
        tracing::info!(container = %record.name, cni = %req.container_id, ip = %att.ip, network = %att.network_name, "CNI container attached");
        Ok(self.describe(&record, att))
    }

    /// A later ADD of the same container: another network (or the same one again).
    async fn cni_connect(
        self: &Arc<Self>,
        record: ContainerRecord,
        req: AddRequest,
        ns: NetNs,
        stored: cluster::StoredNetwork,
        gateway_ifname: String,
    ) -> Result<CniAttachment, Error> {
        let lock = self.lock_for(&record.id);
        let _guard = lock.lock().await;
        let mut record = self.find(record.id.as_str())?;
        if let Some(att) = record.attachments.iter().find(|a| a.ifname == req.ifname) {
            if att.network_id == stored.network.id {
                return Ok(self.describe(&record, att));
            }
            return Err(Error::conflict(format!(
                "interface {} of CNI container {} is attached to network {}: DEL it first",
                req.ifname, req.container_id, att.network_name
            )));
        }
        let internal = stored.network.internal;
        let needs_gateway = !internal && record.gateway_attachment.is_none();
        let att = self
            .attach(
                &record,
                &ns,
                &stored,
                AttachOptions {
                    ip: req.ip,
                    aliases: &req.aliases,
                    default_route: internal && record.gateway_attachment.is_none(),
                    ifname: Some(&req.ifname),
                },
            )
            .await?;
        record.attachments.push(att.clone());
        let made = async {
            let _pick = match needs_gateway {
                true => {
                    let (g, pick) = self.make_gateway(&record, &ns, &gateway_ifname).await?;
                    record.gateway_attachment = Some(g);
                    Some(pick)
                }
                false => None,
            };
            self.registry
                .put(record.clone())
                .map_err(|e| Error::io("saving container record", e))?;
            self.route_published(&record).await
        }
        .await;
        if let Err(e) = made {
            self.release(&att).await;
            let _ = self.reconciler.unroute_container(att.ip).await;
            if needs_gateway {
                if let Some(gw) = record.gateway_attachment.take() {
                    let _ = self.reconciler.detach_gateway(&gw).await;
                }
            }
            record
                .attachments
                .retain(|a| a.endpoint_id != att.endpoint_id);
            let _ = self.registry.put(record);
            return Err(e);
        }
        Ok(self.describe(&record, &att))
    }

    /// Routes each overlay address of a CNI container via its gateway interface (see
    /// `Reconciler::route_to_container`).
    async fn route_published(&self, record: &ContainerRecord) -> Result<(), Error> {
        let Some(gw) = &record.gateway_attachment else {
            return Ok(());
        };
        for att in &record.attachments {
            self.reconciler.route_to_container(att.ip, gw.ip).await?;
        }
        Ok(())
    }

    /// The record and the index of the attachment `r` names, if there is one on that
    /// network.
    fn find_cni_attachment(&self, r: &AttachmentRef) -> Option<(ContainerRecord, usize)> {
        let record = self.find_cni(&r.container_id)?;
        let pos = record.attachments.iter().position(|a| {
            a.ifname == r.ifname
                && (a.network_name == r.network || a.network_id.as_str().starts_with(&r.network))
        })?;
        Some((record, pos))
    }

    /// CNI DEL: releases the attachment (and the record with its last one). Nothing to
    /// release is success: DEL is repeated, and comes for ADDs that failed.
    pub async fn cni_del(&self, r: AttachmentRef) -> Result<(), Error> {
        let lock = self.cni_lock(&r.container_id);
        let _turn = lock.lock().await;
        self.cni_release(&r).await
    }

    async fn cni_release(&self, r: &AttachmentRef) -> Result<(), Error> {
        let Some((record, _)) = self.find_cni_attachment(r) else {
            return Ok(());
        };
        if record.attachments.len() == 1 {
            self.finish(&record.id).await;
            tracing::info!(container = %record.name, cni = %r.container_id, "CNI container detached");
            return Ok(());
        }
        let lock = self.lock_for(&record.id);
        let _guard = lock.lock().await;
        let Some((record, pos)) = self.find_cni_attachment(r) else {
            return Ok(());
        };
        self.detach_at(record, pos).await.map(drop)
    }

    /// CNI CHECK: the attachment is recorded, its namespace is the one ADD was given, and
    /// its interface there has its MAC and address.
    pub async fn cni_check(&self, r: AttachmentRef) -> Result<CniAttachment, Error> {
        let Some((record, pos)) = self.find_cni_attachment(&r) else {
            return Err(Error::ContainerNotFound(format!(
                "{} (interface {} on network {}: no such CNI attachment on this host)",
                r.container_id, r.ifname, r.network
            )));
        };
        let att = &record.attachments[pos];
        if let Some(given) = &r.netns {
            if given != &record.netns {
                return Err(Error::invalid(format!(
                    "CNI_NETNS {} is not the namespace ADD was given ({})",
                    given.display(),
                    record.netns.display()
                )));
            }
        }
        let ns = self.open_netns(&record)?;
        let address = ipnet::Ipv4Net::new(att.ip, att.prefix_len)
            .map_err(|e| Error::invalid(e.to_string()))?;
        if let Some(wrong) =
            crate::dataplane::check_container_end(&ns, &att.ifname, att.mac, address).await?
        {
            return Err(Error::conflict(wrong));
        }
        Ok(self.describe(&record, att))
    }

    /// CNI GC: releases every CNI attachment on `network` on this host that is not in
    /// `valid` (`(container ID, ifname)` pairs the runtime still uses).
    pub async fn cni_gc(
        &self,
        network: &str,
        valid: &[(String, String)],
    ) -> Result<GcReport, Error> {
        let mut report = GcReport::default();
        let stale: Vec<AttachmentRef> = self
            .registry
            .list()
            .iter()
            .filter_map(|r| Some((r.cni_container_id()?.to_string(), r)))
            .flat_map(|(cid, r)| {
                r.attachments
                    .iter()
                    .filter(|a| {
                        a.network_name == network || a.network_id.as_str().starts_with(network)
                    })
                    .filter(|a| !valid.iter().any(|(c, i)| c == &cid && i == &a.ifname))
                    .map(|a| AttachmentRef {
                        container_id: cid.clone(),
                        ifname: a.ifname.clone(),
                        network: a.network_id.to_string(),
                        netns: None,
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        for r in stale {
            self.cni_del(r.clone()).await?;
            report
                .released
                .push(format!("{}/{}", r.container_id, r.ifname));
        }
        if !report.released.is_empty() {
            tracing::info!(network, released = ?report.released, "CNI GC released attachments the runtime no longer has");
        }
        Ok(report)
    }

    /// Releases CNI containers whose namespace is gone, every [`NAMESPACE_WATCH`], for as
    /// long as the service lives.
    pub fn watch_cni_namespaces(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(NAMESPACE_WATCH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else {
                    return;
                };
                me.release_gone_namespaces().await;
            }
        });
    }

    async fn release_gone_namespaces(&self) {
        let gone: Vec<ContainerRecord> = self
            .registry
            .list()
            .into_iter()
            .filter(|r| r.cni_container_id().is_some())
            .filter(|r| matches!(r.netns_ref().open(), Ok(None)))
            .collect();
        for record in gone {
            let Some(cid) = record.cni_container_id().map(str::to_string) else {
                continue;
            };
            let lock = self.cni_lock(&cid);
            let _turn = lock.lock().await;
            // Looked at again under the lock: an ADD may have replaced it meanwhile.
            let still = self
                .registry
                .get(&record.id)
                .is_some_and(|r| matches!(r.netns_ref().open(), Ok(None)));
            if still {
                tracing::warn!(container = %record.name, cni = %cid,
                    "the CNI runtime's namespace is gone without a DEL; releasing its addresses");
                self.finish(&record.id).await;
            }
        }
    }
}
