//! Containers on this host: `vxnet run`'s sandboxes (a network and UTS namespace running one
//! command, not an image-based container).
//!
//! The split of work: the daemon makes the container's network namespace, claims its
//! addresses cluster-wide and programs its interfaces (through the reconciler); the CLI then
//! starts the command inside that namespace, keeping the user's terminal, and tells the
//! daemon its PID. The daemon holds a pidfd and, the moment the process exits, removes its
//! endpoints everywhere.

mod cni;
pub mod nspool;
pub mod process;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::cluster::{self, Cluster, EndpointCreate, StoredNetwork};
use crate::error::Error;
use crate::model::{self, Id, Mac, PublishedPort};
use crate::netns::NetNs;
use crate::reconcile::Reconciler;
use crate::registry::{
    Attachment, ContainerRecord, ContainerState, GatewayAttachment, Refused, Registry,
};
use crate::sync;
use crate::view::SharedView;
use nspool::{NamespacePool, Ready};
use process::ProcessHandle;

/// How long a created container waits for its process before it is cleaned up (the CLI
/// that created it died before starting the command).
const START_DEADLINE: Duration = Duration::from_secs(30);

/// `POST /v1/containers`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    #[serde(default)]
    pub name: Option<String>,
    pub network: String,
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub auto_remove: bool,
    /// Ports to publish on this host's addresses (`-p 8080:80/tcp`).
    #[serde(default)]
    pub publish: Vec<PublishedPort>,
    /// More names for the container on its network's DNS (`--alias`).
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// `POST /v1/containers/{c}/start`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub pid: u32,
}

/// `POST /v1/containers/{c}/networks`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    pub network: String,
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// More names for the container on this network's DNS (`--alias`).
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// How [`ContainerService::attach`] attaches a container to a network.
#[derive(Clone, Copy)]
struct AttachOptions<'a> {
    /// The address asked for; the network's next free one when `None`.
    ip: Option<Ipv4Addr>,
    aliases: &'a [String],
    /// Whether the container's default route goes out of this interface.
    default_route: bool,
    /// The interface's name in the container; the next free `ethN` when `None`.
    ifname: Option<&'a str>,
}

/// A gateway-bridge address picked and not yet in a saved record.
struct GatewayPick<'a> {
    set: &'a SyncMutex<std::collections::HashSet<Ipv4Addr>>,
    ip: Ipv4Addr,
}

impl Drop for GatewayPick<'_> {
    fn drop(&mut self) {
        sync::lock(self.set).remove(&self.ip);
    }
}

pub struct ContainerService {
    cluster: Arc<Cluster>,
    view: SharedView,
    reconciler: Arc<Reconciler>,
    registry: Arc<Registry>,
    netns_dir: PathBuf,
    /// Per container, the resolv.conf and hosts its mount namespace sees as /etc's.
    etc_root: PathBuf,
    pool: Arc<NamespacePool>,
    processes: SyncMutex<HashMap<Id, Arc<ProcessHandle>>>,
    /// One lock per container: its state changes (start, exit, stop, connect…) never interleave.
    locks: SyncMutex<HashMap<Id, Arc<Mutex<()>>>>,
    /// Gateway-bridge addresses are host-local and picked from the records: these are picked
    /// and not recorded yet, so concurrent creates never pick the same one.
    gateway_picked: SyncMutex<std::collections::HashSet<Ipv4Addr>>,
    /// One lock per CNI container ID: a runtime's ADD, DEL and GC of one container never
    /// interleave (its record may not exist yet, so the record lock cannot serve).
    cni_locks: SyncMutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// Removes container namespaces (named by a short container ID) that no record owns: a
/// crash leaves the namespaces kept ready, or one made just before its record was saved.
/// Sandboxes (`1-…`) are the reconciler's.
fn remove_unowned_namespaces(dir: &std::path::Path, registry: &Registry) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let owned: std::collections::HashSet<PathBuf> =
        registry.list().into_iter().map(|r| r.netns).collect();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_container = name
            .to_str()
            .is_some_and(|n| n.len() == Id::SHORT_LEN && Id::looks_like_prefix(n));
        let path = entry.path();
        if !is_container || owned.contains(&path) {
            continue;
        }
        match NetNs::remove_named(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed a namespace no container owns")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a namespace no container owns")
            }
        }
    }
}

fn hostname_ok(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-')
}

impl ContainerService {
    pub fn new(
        cluster: Arc<Cluster>,
        view: SharedView,
        reconciler: Arc<Reconciler>,
        registry: Arc<Registry>,
        run_dir: PathBuf,
        netns_pool: usize,
    ) -> Arc<Self> {
        let netns_dir = run_dir.join("netns");
        remove_unowned_namespaces(&netns_dir, &registry);
        Arc::new(ContainerService {
            cluster,
            view,
            reconciler,
            registry,
            pool: NamespacePool::new(netns_dir.clone(), netns_pool),
            netns_dir,
            etc_root: run_dir.join("containers"),
            processes: SyncMutex::new(HashMap::new()),
            locks: SyncMutex::new(HashMap::new()),
            gateway_picked: SyncMutex::new(std::collections::HashSet::new()),
            cni_locks: SyncMutex::new(HashMap::new()),
        })
    }

    /// Writes the container's resolv.conf (vxnet's name server, the host's search and
    /// options lines) and hosts (localhost, its own name); `None` when DNS is off.
    fn write_etc(&self, record: &ContainerRecord) -> Result<Option<PathBuf>, Error> {
        let Some(dns) = self.reconciler.dns() else {
            return Ok(None);
        };
        let dir = self.etc_root.join(record.id.short());
        let failed = |e| Error::io(format!("writing {}", dir.display()), e);
        std::fs::create_dir_all(&dir).map_err(failed)?;
        let mut hosts =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        if let Some(eth0) = record.attachments.first() {
            hosts.push_str(&format!("{}\t{}", eth0.ip, record.hostname));
            if record.name != record.hostname {
                hosts.push_str(&format!(" {}", record.name));
            }
            hosts.push('\n');
        }
        // Replaced whole, never edited in place: a mount of the old file keeps the old one.
        crate::node::write_replacing(
            &dir.join("resolv.conf"),
            dns.resolv_conf_for_containers().as_bytes(),
        )
        .map_err(failed)?;
        crate::node::write_replacing(&dir.join("hosts"), hosts.as_bytes()).map_err(failed)?;
        for f in ["resolv.conf", "hosts"] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))
                .map_err(failed)?;
        }
        Ok(Some(dir))
    }

    fn remove_etc(&self, record: &ContainerRecord) {
        let Some(dir) = &record.etc_dir else {
            return;
        };
        // Only ever a directory this service made (a record from disk could name any path).
        if dir.parent() != Some(self.etc_root.as_path()) {
            return;
        }
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the container's resolv.conf and hosts")
            }
            _ => {}
        }
    }

    /// Removes the namespaces kept ready for containers (a clean stop).
    pub fn drain_namespace_pool(&self) {
        self.pool.drain();
    }

    fn lock_for(&self, id: &Id) -> Arc<Mutex<()>> {
        sync::lock(&self.locks)
            .entry(id.clone())
            .or_default()
            .clone()
    }

    fn find(&self, reference: &str) -> Result<ContainerRecord, Error> {
        self.registry
            .find(reference)
            .ok_or_else(|| Error::ContainerNotFound(reference.to_string()))
    }

    pub fn get(&self, reference: &str) -> Result<ContainerRecord, Error> {
        self.find(reference)
    }

    pub fn list(&self) -> Vec<ContainerRecord> {
        self.registry.list()
    }

    async fn resolve_network(&self, reference: &str) -> Result<StoredNetwork, Error> {
        match self.view.with(|v| v.resolve_network(reference).cloned()) {
            Ok(n) => Ok(n),
            Err(_) => {
                let (networks, _) = self.cluster.read_networks().await?;
                Ok(cluster::resolve(&networks, reference)?.clone())
            }
        }
    }

    /// Claims an address on `network` and programs the interface `ifname` in the container.
    /// On any failure nothing is left: the claim is released again.
    async fn attach(
        &self,
        record: &ContainerRecord,
        ns: &NetNs,
        stored: &StoredNetwork,
        how: AttachOptions<'_>,
    ) -> Result<Attachment, Error> {
        let AttachOptions {
            ip,
            aliases,
            default_route,
            ifname,
        } = how;
        let net = &stored.network;
        if record.attachments.iter().any(|a| a.network_id == net.id) {
            return Err(Error::AlreadyConnected {
                container: record.name.clone(),
                network: net.name.clone(),
            });
        }
        let mtu = self.reconciler.mtu_for(net).await?;
        let known = self
            .view
            .with(|v| (v.revision > 0).then(|| v.known_addresses(&net.id)));
        let req = EndpointCreate {
            name: Some(record.name.clone()),
            ip,
            aliases: aliases.to_vec(),
        };
        let endpoint = self
            .cluster
            .create_endpoint(stored, req, known)
            .await?
            .value;
        tracing::debug!(ip = %endpoint.ip, "address claimed");
        let taken = |n: &String| {
            record.attachments.iter().any(|a| &a.ifname == n)
                || record
                    .gateway_attachment
                    .as_ref()
                    .is_some_and(|g| &g.ifname == n)
        };
        let ifname = match ifname {
            Some(n) if taken(&n.to_string()) => {
                self.release_endpoint(&net.id, &endpoint.id).await;
                return Err(Error::conflict(format!(
                    "container {} already has an interface {n}: choose another interface name",
                    record.name
                )));
            }
            Some(n) => n.to_string(),
            None => (0..)
                .map(|i| format!("eth{i}"))
                .find(|n| !taken(n))
                .unwrap_or_else(|| "eth0".into()),
        };
        let att = Attachment {
            network_id: net.id.clone(),
            network_name: net.name.clone(),
            endpoint_id: endpoint.id.clone(),
            ifname,
            ip: endpoint.ip,
            prefix_len: net.subnet.prefix_len(),
            mac: endpoint.mac,
            gateway: net.gateway,
            mtu,
            default_route,
            aliases: aliases.to_vec(),
            // The first overlay interface is the one resolv.conf's server is reached through.
            dns_route: Some(!record.attachments.iter().any(Attachment::carries_dns_route)),
        };
        if let Err(e) = self.reconciler.attach(ns, net, &att).await {
            self.release(&att).await;
            return Err(e);
        }
        Ok(att)
    }

    /// Gives the container its interface on the gateway bridge (eth1): a host-local address,
    /// MAC from the IP, the default route. The address stays in `gateway_picked` until the
    /// caller has saved the record holding it (`GatewayPick` drops it then).
    async fn make_gateway(
        &self,
        record: &ContainerRecord,
        ns: &NetNs,
        ifname: &str,
    ) -> Result<(GatewayAttachment, GatewayPick<'_>), Error> {
        let cfg = self.reconciler.gateway_config();
        let pool = crate::ipam::AddressPool::new(cfg.subnet, Some(cfg.gateway()), None)?;
        let pick = {
            let mut picked = sync::lock(&self.gateway_picked);
            let mut used: std::collections::HashSet<Ipv4Addr> = self
                .registry
                .list()
                .iter()
                .filter_map(|r| r.gateway_attachment.as_ref().map(|g| g.ip))
                .collect();
            used.extend(picked.iter().copied());
            let ip = pool.next_free(&used, None).ok_or_else(|| {
                Error::conflict(format!(
                    "no address left on the gateway bridge {} ({}): use a larger --gateway-bridge-subnet",
                    cfg.bridge, cfg.subnet
                ))
            })?;
            picked.insert(ip);
            GatewayPick {
                set: &self.gateway_picked,
                ip,
            }
        };
        let ip = pick.ip;
        let gw = GatewayAttachment {
            ifname: ifname.to_string(),
            host_ifname: format!("gw{}", record.id.prefix(7)),
            ip,
            prefix_len: cfg.subnet.prefix_len(),
            mac: Mac::from_ipv4(ip),
            gateway: cfg.gateway(),
        };
        if let Err(e) = self.reconciler.attach_gateway(ns, &gw).await {
            let _ = self.reconciler.detach_gateway(&gw).await;
            return Err(e);
        }
        Ok((gw, pick))
    }

    /// Removes an attachment's interface and its endpoint in the store. Best effort: used on
    /// the way out, where a failure is logged, not returned.
    async fn release(&self, att: &Attachment) {
        let (_, detached) = tokio::join!(
            self.release_endpoint(&att.network_id, &att.endpoint_id),
            self.reconciler.detach(att)
        );
        if let Err(e) = detached {
            tracing::warn!(endpoint = %att.endpoint_id.short(), error = %e, "cannot remove interface");
        }
    }

    /// The container's network namespace, which must still be there.
    fn open_netns(&self, record: &ContainerRecord) -> Result<NetNs, Error> {
        record
            .netns_ref()
            .open()
            .map_err(|e| Error::io(format!("namespace of {}", record.name), e))?
            .ok_or_else(|| Error::ContainerNotRunning(record.name.clone()))
    }

    /// Deletes an endpoint in the store; best effort, as [`Self::release`].
    async fn release_endpoint(&self, net: &model::NetworkId, endpoint: &model::EndpointId) {
        if let Err(e) = self.cluster.delete_endpoint(net, endpoint).await {
            if !matches!(e, Error::EndpointNotFound(_)) {
                tracing::warn!(endpoint = %endpoint.short(), error = %e, "cannot delete endpoint");
            }
        }
    }

    /// Removes a container's namespace if it is one this service made: a CNI runtime's
    /// belongs to the runtime (and a record from disk could name any path).
    fn remove_own_netns(&self, record: &ContainerRecord) {
        if record.netns.parent() != Some(self.netns_dir.as_path())
            || record.cni_container_id().is_some()
        {
            return;
        }
        if let Err(e) = NetNs::remove_named(&record.netns) {
            tracing::warn!(netns = %record.netns.display(), error = %e, "cannot remove namespace");
        }
    }

    /// Creates a container: its namespace, its first network attachment. Its process is
    /// started by the caller, who then calls `start` with the PID.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<ContainerRecord, Error> {
        // Checked before a namespace is taken; the defaults (the short ID) are always valid.
        if let Some(name) = &req.name {
            cluster::validate_name("container", name)?;
        }
        crate::validate::check_aliases(&req.aliases)?;
        if let Some(h) = req.hostname.as_ref().filter(|h| !hostname_ok(h)) {
            return Err(Error::invalid(format!(
                "invalid hostname {h:?}: use 1 to 63 letters, digits and '-'"
            )));
        }
        // The namespace (and with it the container's ID) comes first, usually ready-made.
        let ready = self.pool.take().await?;
        let made = self.create_in(req, ready).await;
        self.pool.refill();
        made
    }

    async fn create_in(
        self: &Arc<Self>,
        req: CreateRequest,
        ready: Ready,
    ) -> Result<ContainerRecord, Error> {
        let id = ready.id.clone();
        let name = req.name.clone().unwrap_or_else(|| id.short().to_string());
        let hostname = req
            .hostname
            .clone()
            .unwrap_or_else(|| id.short().to_string());
        let netns = self.netns_dir.join(id.short());
        let mut record = ContainerRecord {
            id: id.clone(),
            name: name.clone(),
            hostname,
            command: req.command.clone(),
            netns: netns.clone(),
            created: model::now_rfc3339(),
            state: ContainerState::Created,
            attachments: vec![],
            auto_remove: req.auto_remove,
            gateway_attachment: None,
            ports: vec![],
            conflicts: vec![],
            etc_dir: None,
        };
        record.ports = req.publish.clone();
        if let Err(e) = check_host_ports(&req.publish, self.reconciler.store_endpoints()).await {
            self.pool.give_back(ready);
            return Err(e);
        }
        let refused = match self.registry.insert_new(record.clone()) {
            Ok(Ok(())) => None,
            Ok(Err(Refused::NameInUse)) => Some(Error::ContainerNameInUse(name)),
            Ok(Err(Refused::PortInUse { port, by })) => Some(Error::PortInUse {
                port: port.to_string(),
                by,
            }),
            Err(e) => Some(Error::io("saving container record", e)),
        };
        if let Some(e) = refused {
            self.pool.give_back(ready);
            return Err(e);
        }
        let ns = ready.ns;
        let lock = self.lock_for(&id);
        let _guard = lock.lock().await;
        let t0 = std::time::Instant::now();
        let lap = |step: &str| {
            tracing::debug!(
                step,
                at_us = t0.elapsed().as_micros() as u64,
                "container create"
            )
        };
        let made = async {
            let stored = self.resolve_network(&req.network).await?;
            let internal = stored.network.internal;
            if internal && !req.publish.is_empty() {
                return Err(Error::invalid(format!(
                    "network {} is internal: nothing from outside reaches its containers, so -p cannot publish ports",
                    stored.network.name
                )));
            }
            lap("namespace");
            // eth0 (an etcd transaction, then the sandbox's veth) and eth1 (host-local) at
            // once: the gateway bridge's work fits in the wait for etcd.
            let (att, gw) = tokio::join!(
                // The overlay carries the default route only when there is no gateway bridge.
                self.attach(
                    &record,
                    &ns,
                    &stored,
                    AttachOptions {
                        ip: req.ip,
                        aliases: &req.aliases,
                        default_route: internal,
                        ifname: None,
                    }
                ),
                async {
                    match internal {
                        true => Ok((None, None)),
                        false => self
                            .make_gateway(&record, &ns, "eth1")
                            .await
                            .map(|(g, pick)| (Some(g), Some(pick))),
                    }
                }
            );
            lap("eth0 and eth1");
            // Whatever was made goes into the record first, so a failure of the other undoes it.
            let att = att.map(|a| record.attachments.push(a));
            if att.is_ok() {
                record.etc_dir = self.write_etc(&record)?;
            }
            let _pick = gw.map(|(g, pick)| {
                record.gateway_attachment = g;
                pick
            });
            att?;
            let _pick = _pick?;
            // One record write for both interfaces; a crash before it leaves a `created`
            // record, which the next start finishes, and an endpoint no record owns, which it
            // releases.
            self.registry
                .put(record.clone())
                .map_err(|e| Error::io("saving container record", e))?;
            lap("record");
            if !record.ports.is_empty() {
                self.reconciler.sync_firewall().await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = made {
            // Nothing half-made: undo whatever part was done.
            for att in std::mem::take(&mut record.attachments) {
                self.release(&att).await;
            }
            if let Some(gw) = record.gateway_attachment.take() {
                let _ = self.reconciler.detach_gateway(&gw).await;
            }
            let _ = NetNs::remove_named(&netns);
            self.remove_etc(&record);
            let _ = self.registry.remove(&id);
            if !record.ports.is_empty() {
                let _ = self.reconciler.sync_firewall().await;
            }
            return Err(e);
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(START_DEADLINE).await;
            if me
                .registry
                .get(&id)
                .is_some_and(|r| r.state == ContainerState::Created)
            {
                tracing::warn!(container = %id.short(), "no process started in time; cleaning up");
                me.finish(&id).await;
            }
        });
        Ok(record)
    }

    /// Records the container's process (started by the CLI inside the container's
    /// namespace) and watches it.
    pub async fn start(
        self: &Arc<Self>,
        reference: &str,
        pid: u32,
    ) -> Result<ContainerRecord, Error> {
        let record = self.find(reference)?;
        let lock = self.lock_for(&record.id);
        let _guard = lock.lock().await;
        let mut record = self.find(reference)?;
        if record.state != ContainerState::Created {
            return Err(Error::conflict(format!(
                "container {} was already started",
                record.name
            )));
        }
        // Only a process inside the container's own namespace may stand for it.
        let inside = process::in_netns(pid, &record.netns)
            .map_err(|e| Error::invalid(format!("process {pid}: {e}")))?;
        if !inside {
            return Err(Error::invalid(format!(
                "process {pid} is not in container {}'s network namespace",
                record.name
            )));
        }
        let start_time =
            process::start_time(pid).map_err(|e| Error::io(format!("process {pid}"), e))?;
        let handle =
            Arc::new(ProcessHandle::open(pid).map_err(|e| Error::io(format!("process {pid}"), e))?);
        record.state = ContainerState::Running { pid, start_time };
        self.registry
            .put(record.clone())
            .map_err(|e| Error::io("saving container record", e))?;
        self.watch(record.id.clone(), handle);
        Ok(record)
    }

    fn watch(self: &Arc<Self>, id: Id, handle: Arc<ProcessHandle>) {
        sync::lock(&self.processes).insert(id.clone(), handle.clone());
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = handle.exited().await {
                tracing::warn!(container = %id.short(), error = %e, "cannot watch the container's process");
                return;
            }
            me.finish(&id).await;
        });
    }

    /// The process is gone: remove its endpoints (here and, through the store, everywhere),
    /// mark it exited, and remove it entirely if it was `--rm`. Safe to call twice.
    async fn finish(&self, id: &Id) {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let Some(mut record) = self.registry.get(id) else {
            return;
        };
        if matches!(record.state, ContainerState::Exited { .. }) {
            return;
        }
        sync::lock(&self.processes).remove(id);
        let was_cni = record.cni_container_id().is_some();
        // Mark it exited first, so that `release` sees its attachments as no longer live.
        record.state = ContainerState::Exited {
            at: model::now_rfc3339(),
        };
        let attachments = std::mem::take(&mut record.attachments);
        let gateway = record.gateway_attachment.take();
        let had_ports = !record.ports.is_empty();
        if let Err(e) = self.registry.put(record.clone()) {
            tracing::warn!(container = %id.short(), error = %e, "cannot save container record");
        }
        // All at once: each device deletion waits for an RCU grace period, and the store's
        // delete for a round trip; none depends on another.
        let routed = was_cni && gateway.is_some();
        let overlay = futures::future::join_all(attachments.iter().map(|att| async move {
            self.release(att).await;
            if routed {
                if let Err(e) = self.reconciler.unroute_container(att.ip).await {
                    tracing::warn!(container = %id.short(), error = %e, "cannot remove the route to the container; the next resync does");
                }
            }
        }));
        let way_out = async {
            if let Some(gw) = &gateway {
                if let Err(e) = self.reconciler.detach_gateway(gw).await {
                    tracing::warn!(container = %id.short(), error = %e, "cannot remove the gateway interface");
                }
            }
        };
        tokio::join!(overlay, way_out);
        // An exited container publishes nothing.
        if had_ports {
            if let Err(e) = self.reconciler.sync_firewall().await {
                tracing::warn!(error = %e, "cannot unpublish the container's ports");
            }
        }
        // The namespace has no use without its process (nothing can be exec'd into it).
        self.remove_own_netns(&record);
        self.remove_etc(&record);
        if record.auto_remove {
            self.discard(&record);
        }
        tracing::info!(container = %record.name, "container exited; endpoints removed");
    }

    fn discard(&self, record: &ContainerRecord) {
        self.remove_own_netns(record);
        self.remove_etc(record);
        if let Err(e) = self.registry.remove(&record.id) {
            tracing::warn!(container = %record.id.short(), error = %e, "cannot remove record");
        }
        sync::lock(&self.locks).remove(&record.id);
    }

    fn handle(&self, id: &Id) -> Option<Arc<ProcessHandle>> {
        sync::lock(&self.processes).get(id).cloned()
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once the container is cleaned up.
    pub async fn stop(&self, reference: &str, grace: Duration) -> Result<ContainerRecord, Error> {
        let record = self.find(reference)?;
        if let Some(handle) = self.handle(&record.id) {
            handle
                .signal(libc::SIGTERM)
                .map_err(|e| Error::io(format!("signalling {}", record.name), e))?;
            if tokio::time::timeout(grace, handle.exited()).await.is_err() {
                handle
                    .signal(libc::SIGKILL)
                    .map_err(|e| Error::io(format!("killing {}", record.name), e))?;
                let _ = handle.exited().await;
            }
        }
        self.finish(&record.id).await;
        self.registry
            .get(&record.id)
            .ok_or_else(|| Error::ContainerNotFound(reference.to_string()))
    }

    /// Removes a container; a running one only with `force` (it is killed first).
    pub async fn remove(&self, reference: &str, force: bool) -> Result<(), Error> {
        let record = self.find(reference)?;
        if matches!(record.state, ContainerState::Running { .. }) {
            if !force {
                return Err(Error::ContainerRunning(record.name));
            }
            self.stop(reference, Duration::ZERO).await?;
        } else {
            self.finish(&record.id).await;
        }
        if let Some(r) = self.registry.get(&record.id) {
            self.discard(&r);
        }
        Ok(())
    }

    /// Attaches a running (or created) container to another network.
    pub async fn connect(
        &self,
        reference: &str,
        req: ConnectRequest,
    ) -> Result<ContainerRecord, Error> {
        let record = self.find(reference)?;
        let lock = self.lock_for(&record.id);
        let _guard = lock.lock().await;
        let mut record = self.find(reference)?;
        if matches!(record.state, ContainerState::Exited { .. }) {
            return Err(Error::ContainerNotRunning(record.name));
        }
        let ns = self.open_netns(&record)?;
        let stored = self.resolve_network(&req.network).await?;
        let att = self
            .attach(
                &record,
                &ns,
                &stored,
                AttachOptions {
                    ip: req.ip,
                    aliases: &req.aliases,
                    default_route: false,
                    ifname: None,
                },
            )
            .await?;
        record.attachments.push(att.clone());
        if let Err(e) = self.registry.put(record.clone()) {
            self.release(&att).await;
            return Err(Error::io("saving container record", e));
        }
        Ok(record)
    }

    /// Detaches a container from one network.
    pub async fn disconnect(
        &self,
        reference: &str,
        network: &str,
    ) -> Result<ContainerRecord, Error> {
        let record = self.find(reference)?;
        let lock = self.lock_for(&record.id);
        let _guard = lock.lock().await;
        let record = self.find(reference)?;
        let pos = record
            .attachments
            .iter()
            .position(|a| a.network_name == network || a.network_id.as_str().starts_with(network))
            .ok_or_else(|| Error::NotConnected {
                container: record.name.clone(),
                network: network.to_string(),
            })?;
        self.detach_at(record, pos).await
    }

    /// Removes attachment `pos` of `record` (the record saved first), releases it, and
    /// hands the name server's route to the next overlay interface when it was this one's.
    /// The caller holds the container's lock.
    pub(super) async fn detach_at(
        &self,
        mut record: ContainerRecord,
        pos: usize,
    ) -> Result<ContainerRecord, Error> {
        let att = record.attachments.remove(pos);
        // The name server's route leaves with its interface: the next overlay interface
        // takes it over.
        let heir = match att.carries_dns_route() {
            true => record.attachments.first_mut().map(|next| {
                next.dns_route = Some(true);
                next.clone()
            }),
            false => None,
        };
        self.registry
            .put(record.clone())
            .map_err(|e| Error::io("saving container record", e))?;
        self.release(&att).await;
        // A CNI container's overlay addresses are routed via its gateway interface.
        if record.cni_container_id().is_some() && record.gateway_attachment.is_some() {
            if let Err(e) = self.reconciler.unroute_container(att.ip).await {
                tracing::warn!(container = %record.name, error = %e,
                    "cannot remove the route to the container; the next resync does");
            }
        }
        if let Some(next) = heir {
            let routed = async {
                let ns = self.open_netns(&record)?;
                let net = self
                    .resolve_network(next.network_id.as_str())
                    .await?
                    .network;
                self.reconciler.attach(&ns, &net, &next).await
            };
            if let Err(e) = routed.await {
                tracing::warn!(container = %record.name, error = %e,
                    "cannot move the name server's route to the next interface; the next resync does");
            }
        }
        Ok(record)
    }

    /// Claims every live local endpoint again under the node's current lease: after the
    /// node's lease expired (a host back from a long absence, or cut off from etcd for longer
    /// than the TTL), etcd has dropped its endpoints and addresses. An address that another
    /// host took meanwhile is not fought over: that interface is removed from the container
    /// and the container is marked in conflict.
    pub async fn reclaim_all(&self) {
        let me = self.cluster.node_id().clone();
        for record in self.registry.list() {
            if matches!(record.state, ContainerState::Exited { .. }) {
                continue;
            }
            for att in &record.attachments {
                let endpoint = crate::model::Endpoint {
                    id: att.endpoint_id.clone(),
                    network_id: att.network_id.clone(),
                    name: record.name.clone(),
                    node_id: me.clone(),
                    ip: att.ip,
                    mac: att.mac,
                    created: record.created.clone(),
                    aliases: att.aliases.clone(),
                };
                let outcome = match self.resolve_network(att.network_id.as_str()).await {
                    Ok(stored) => self.cluster.reclaim_endpoint(&stored, &endpoint).await,
                    Err(Error::NetworkNotFound(_)) => Ok(cluster::Reclaim::NetworkGone),
                    Err(e) => Err(e),
                };
                let lost = match outcome {
                    Ok(cluster::Reclaim::Claimed) => {
                        tracing::info!(container = %record.name, ip = %att.ip, "address claimed again");
                        continue;
                    }
                    Ok(cluster::Reclaim::AlreadyHeld) => continue,
                    Ok(cluster::Reclaim::TakenBy(other)) => format!(
                        "address {} on network {} was taken by endpoint {} while this host was away; {} was removed",
                        att.ip,
                        att.network_name,
                        &other[..other.len().min(12)],
                        att.ifname
                    ),
                    Ok(cluster::Reclaim::NetworkGone) => format!(
                        "network {} was removed while this host was away; {} was removed",
                        att.network_name, att.ifname
                    ),
                    Err(e) => {
                        tracing::warn!(container = %record.name, error = %e, "cannot claim the address again; will retry");
                        continue;
                    }
                };
                tracing::warn!(container = %record.name, "{lost}");
                if let Err(e) = self.reconciler.detach(att).await {
                    tracing::warn!(container = %record.name, error = %e, "cannot remove the lost interface");
                }
                let lock = self.lock_for(&record.id);
                let _guard = lock.lock().await;
                if let Some(mut now) = self.registry.get(&record.id) {
                    now.attachments.retain(|a| a.endpoint_id != att.endpoint_id);
                    now.conflicts.push(lost);
                    if let Err(e) = self.registry.put(now) {
                        tracing::warn!(container = %record.name, error = %e, "cannot save container record");
                    }
                }
            }
        }
    }

    /// After a daemon restart: re-watch containers whose process still runs (same PID and
    /// start time), clean up those whose process is gone or never started.
    ///
    /// Then releases this node's endpoints that no container here owns and that predate
    /// `started` (this daemon's start): what a crash between claiming an address and
    /// recording it leaves behind. `also_owned` are endpoints owned by something else on this
    /// host (Docker's containers, through the plugin). (Endpoints made through the raw
    /// endpoint API have no local owner, so they are released when their daemon restarts.)
    pub async fn recover(
        self: &Arc<Self>,
        also_owned: &std::collections::HashSet<model::EndpointId>,
    ) {
        for record in self.registry.list() {
            match record.state {
                ContainerState::Running { pid, start_time } => {
                    let alive = process::start_time(pid).is_ok_and(|t| t == start_time);
                    match ProcessHandle::open(pid) {
                        Ok(h) if alive => self.watch(record.id.clone(), Arc::new(h)),
                        _ => self.finish(&record.id).await,
                    }
                }
                ContainerState::Created => self.finish(&record.id).await,
                ContainerState::Exited { .. } => {}
                // Gone while the daemon was down (no DEL will come for it): released now;
                // the namespace watch keeps an eye on the others.
                ContainerState::Cni { .. } => {
                    if matches!(record.netns_ref().open(), Ok(None)) {
                        tracing::info!(container = %record.name, "its CNI namespace went while the daemon was down; releasing");
                        self.finish(&record.id).await;
                    }
                }
            }
        }
        let owned: std::collections::HashSet<model::EndpointId> = self
            .registry
            .list()
            .iter()
            .flat_map(|r| r.attachments.iter().map(|a| a.endpoint_id.clone()))
            .chain(also_owned.iter().cloned())
            .collect();
        // Orphans are this node's endpoints that an earlier run wrote (at or before this
        // run's first listing: store revisions, not clocks, which may jump) and that no
        // container here owns. Read from the store for their revisions.
        let orphans = match self.view.first_listed() {
            Some(start) => {
                let keys = self.cluster.keys().clone();
                match self.cluster.store().list(&keys.all_endpoints()).await {
                    Ok(listing) => orphaned_endpoints(
                        &keys,
                        &listing.kvs,
                        self.cluster.node_id(),
                        start,
                        &owned,
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list endpoints to release orphans; they stay until the next start");
                        Vec::new()
                    }
                }
            }
            None => Vec::new(),
        };
        for (net, ep) in orphans {
            match self.cluster.delete_endpoint(&net, &ep).await {
                Ok(w) => tracing::info!(endpoint = %ep.short(), ip = %w.value.ip,
                    "released an address no container here owns (left by a crash)"),
                Err(Error::EndpointNotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(endpoint = %ep.short(), error = %e, "cannot release orphaned endpoint")
                }
            }
        }
        self.pool.refill();
    }
}

/// This node's endpoints that were written at or before `start` (the revision of this run's
/// first listing) and that no container here owns.
fn orphaned_endpoints(
    keys: &crate::store::Keys,
    kvs: &[crate::store::KeyValue],
    me: &model::NodeId,
    start: i64,
    owned: &std::collections::HashSet<model::EndpointId>,
) -> Vec<(model::NetworkId, model::EndpointId)> {
    use crate::store::keys::KeyKind;
    kvs.iter()
        .filter(|kv| kv.create_revision <= start)
        .filter_map(|kv| match keys.classify(&kv.key) {
            KeyKind::Endpoint(net, id) => Some((net, id, kv)),
            _ => None,
        })
        .filter(|(_, id, _)| !owned.contains(id))
        .filter(|(_, _, kv)| {
            crate::validate::parse::<model::Endpoint>(
                crate::validate::RecordKind::Endpoint,
                &kv.value,
            )
            .is_ok_and(|e| &e.node_id == me)
        })
        .map(|(net, id, _)| (net, id))
        .collect()
}

/// Refuses host ports that would hand a container the tunnel or the control plane (the VXLAN
/// port, the store's client and peer ports) or that another program already holds: DNAT would
/// silently steal that program's traffic.
async fn check_host_ports(
    publish: &[model::PublishedPort],
    store: &[std::net::SocketAddrV4],
) -> Result<(), Error> {
    use crate::model::Proto;
    for p in publish {
        let spec = format!("{}/{}", p.host_port, p.proto);
        if p.proto == Proto::Udp && p.host_port == crate::reconcile::VXLAN_PORT {
            return Err(Error::invalid(format!(
                "host port {spec} is the VXLAN port of the overlay: pick another"
            )));
        }
        if p.proto == Proto::Tcp
            && store
                .iter()
                .any(|s| p.host_port == s.port() || Some(p.host_port) == s.port().checked_add(1))
        {
            return Err(Error::invalid(format!(
                "host port {spec} is a cluster store (etcd) client or peer port: pick another"
            )));
        }
    }
    let ports: Vec<(Proto, u16)> = publish.iter().map(|p| (p.proto, p.host_port)).collect();
    // A blocking-pool thread is always in the daemon's own (the host's) namespace.
    let busy = tokio::task::spawn_blocking(move || {
        ports.into_iter().find(|&(proto, port)| {
            let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
            let bound = match proto {
                Proto::Tcp => std::net::TcpListener::bind(addr).map(drop),
                Proto::Udp => std::net::UdpSocket::bind(addr).map(drop),
            };
            matches!(bound, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
        })
    })
    .await
    .map_err(|e| Error::io("checking host ports", std::io::Error::other(e.to_string())))?;
    if let Some((proto, port)) = busy {
        return Err(Error::invalid(format!(
            "host port {port}/{proto} is in use on this host (by another program): pick another"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod orphan_tests {
    use super::*;
    use crate::model::{Endpoint, Id, Mac};
    use crate::store::{KeyValue, Keys};

    fn kv(keys: &Keys, node: &Id, created: &str, create_revision: i64) -> (Id, KeyValue) {
        let ip = std::net::Ipv4Addr::new(10, 0, 4, 2);
        let ep = Endpoint {
            id: Id::random(),
            network_id: Id::random(),
            name: "e".into(),
            node_id: node.clone(),
            ip,
            mac: Mac::from_ipv4(ip),
            created: created.into(),
            aliases: Vec::new(),
        };
        let kv = KeyValue {
            key: keys.endpoint(&ep.network_id, &ep.id),
            value: serde_json::to_vec(&ep).unwrap_or_default(),
            create_revision,
            mod_revision: create_revision,
            lease: 0,
        };
        (ep.id, kv)
    }

    /// Ownership goes by store revision: a record written after this run's first listing is
    /// this run's, whatever its timestamp says (a clock that jumped back), and one written
    /// before is an earlier run's, whatever the clock says now.
    #[test]
    fn orphans_are_told_by_revision_not_by_clock() {
        let keys = Keys::new("/t/");
        let me = Id::random();
        let other = Id::random();
        let (old, old_kv) = kv(&keys, &me, "2999-01-01T00:00:00.000000Z", 5);
        let (new, new_kv) = kv(&keys, &me, "1970-01-01T00:00:00.000000Z", 11);
        let (owned, owned_kv) = kv(&keys, &me, "", 3);
        let (_, foreign_kv) = kv(&keys, &other, "", 4);
        let found = orphaned_endpoints(
            &keys,
            &[old_kv, new_kv, owned_kv, foreign_kv],
            &me,
            10,
            &std::collections::HashSet::from([owned]),
        );
        let ids: Vec<Id> = found.into_iter().map(|(_, id)| id).collect();
        assert_eq!(ids, vec![old]);
        assert!(!ids.contains(&new));
    }
}
