//! Containers this host runs: their records, kept in memory and in the state directory (one
//! JSON file each, replaced whole: write, then rename) so that a restarted daemon finds them again.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::model::{EndpointId, Id, Mac, NetworkId, PublishedPort};
use crate::node::write_replacing;
use crate::sync::lock;

/// Where a container's process is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum ContainerState {
    /// Network set up, process not started yet.
    Created,
    /// The process runs. `start_time` (clock ticks since boot, from /proc/PID/stat) tells this
    /// process from a later one that got the same PID.
    Running { pid: u32, start_time: u64 },
    /// The process is gone; its endpoints have been removed.
    Exited { at: String },
    /// Attached by a CNI runtime (containerd, Podman, …) to a network namespace the runtime
    /// made: no process is ours to watch, so the namespace is watched instead, and its
    /// endpoints go when it does. `netns_inode` tells it from a later namespace at the same
    /// path (`/proc/PID/ns/net` of a reused PID).
    Cni {
        container_id: String,
        netns_inode: u64,
    },
}

/// One network interface of a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network_id: NetworkId,
    pub network_name: String,
    pub endpoint_id: EndpointId,
    /// The interface name inside the container (eth0, eth1, …).
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: Mac,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// Whether the container's default route goes out of this interface (only when the
    /// container has no gateway bridge interface).
    #[serde(default)]
    pub default_route: bool,
    /// The endpoint's DNS aliases on this network (`--alias`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Whether the route to the name server (169.254.53.53) goes out of this interface: the
    /// container's first overlay interface, which its resolv.conf reaches it through. Absent
    /// in records from before it was kept: then eth0's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_route: Option<bool>,
}

impl Attachment {
    /// See [`Attachment::dns_route`].
    pub fn carries_dns_route(&self) -> bool {
        self.dns_route.unwrap_or(self.ifname == "eth0")
    }
}

/// The container's interface on this host's gateway bridge (Docker's docker_gwbridge): its
/// way out of the overlay, NAT'd, and where published ports arrive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayAttachment {
    pub ifname: String,
    pub host_ifname: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: Mac,
    pub gateway: Ipv4Addr,
}

impl ContainerRecord {
    /// What a record read back from disk must be before it is used (the file may have been
    /// edited or damaged): named after its ID, with interfaces the kernel can be given.
    fn check(&self, path: &Path) -> Result<(), String> {
        if path.file_stem().and_then(|s| s.to_str()) != Some(self.id.as_str()) {
            return Err(format!(
                "the record's ID {} is not its file's name",
                self.id
            ));
        }
        let ifname_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 15
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        for a in &self.attachments {
            crate::validate::check_mac(a.mac).map_err(|e| e.to_string())?;
            if a.prefix_len > 32 || !ifname_ok(&a.ifname) {
                return Err(format!(
                    "attachment {} of {} is malformed",
                    a.ifname, a.network_id
                ));
            }
        }
        if let Some(g) = &self.gateway_attachment {
            crate::validate::check_mac(g.mac).map_err(|e| e.to_string())?;
            if g.prefix_len > 32 || !ifname_ok(&g.ifname) || !ifname_ok(&g.host_ifname) {
                return Err(format!("gateway attachment {} is malformed", g.ifname));
            }
        }
        Ok(())
    }
}

impl Attachment {
    /// The sandbox-side veth's name: "veth" + 7 characters of the endpoint ID (15 max).
    pub fn host_ifname(&self) -> String {
        format!("veth{}", self.endpoint_id.prefix(7))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: Id,
    pub name: String,
    pub hostname: String,
    pub command: Vec<String>,
    /// The container's network namespace, bind-mounted under the run dir.
    pub netns: PathBuf,
    pub created: String,
    #[serde(flatten)]
    pub state: ContainerState,
    pub attachments: Vec<Attachment>,
    /// Remove the container (record and namespace) when its process exits (`run --rm`).
    pub auto_remove: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_attachment: Option<GatewayAttachment>,
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
    /// Attachments this host lost while it was away (its lease expired and another host
    /// took the address): the interface was removed, so no address ever has two owners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    /// `resolv.conf` and `hosts` written for the container (pointing at vxnet's name
    /// server), which `run` and `exec` mount over /etc's in the container's mount namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etc_dir: Option<PathBuf>,
}

/// Why a new record could not be stored.
#[derive(Debug)]
pub enum Refused {
    NameInUse,
    PortInUse { port: PublishedPort, by: String },
}

/// Where a container's network namespace is, and for a CNI runtime's, which one it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsRef {
    pub path: PathBuf,
    pub cni_inode: Option<u64>,
}

impl NetnsRef {
    /// Opens the namespace; `None` when a CNI runtime's namespace is gone (its path now
    /// names nothing, or another namespace: never program a stranger's).
    pub fn open(&self) -> std::io::Result<Option<crate::netns::NetNs>> {
        match self.cni_inode {
            Some(inode) => crate::netns::NetNs::reopen_foreign(&self.path, inode),
            None => crate::netns::NetNs::open(&self.path).map(Some),
        }
    }
}

impl ContainerRecord {
    pub fn netns_ref(&self) -> NetnsRef {
        NetnsRef {
            path: self.netns.clone(),
            cni_inode: match self.state {
                ContainerState::Cni { netns_inode, .. } => Some(netns_inode),
                _ => None,
            },
        }
    }

    /// The CNI runtime's container ID, for a container a CNI runtime attached.
    pub fn cni_container_id(&self) -> Option<&str> {
        match &self.state {
            ContainerState::Cni { container_id, .. } => Some(container_id),
            _ => None,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self.state {
            ContainerState::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }
}

/// The records of this host's containers.
pub struct Registry {
    dir: PathBuf,
    records: Mutex<BTreeMap<Id, ContainerRecord>>,
}

impl Registry {
    /// Loads every record in `dir` (created if missing). Unreadable files are skipped with a
    /// warning rather than stopping the daemon.
    pub fn load(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut records = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                match std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        serde_json::from_slice::<ContainerRecord>(&b).map_err(|e| e.to_string())
                    })
                    .and_then(|r| r.check(&path).map(|()| r))
                {
                    Ok(r) => {
                        records.insert(r.id.clone(), r);
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "skipping unreadable container record")
                    }
                }
            }
        }
        Ok(Registry {
            dir: dir.to_path_buf(),
            records: Mutex::new(records),
        })
    }

    fn path(&self, id: &Id) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Id, ContainerRecord>> {
        lock(&self.records)
    }

    /// Stores (or replaces) a record, on disk first.
    pub fn put(&self, record: ContainerRecord) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
        write_replacing(&self.path(&record.id), &bytes)?;
        self.lock().insert(record.id.clone(), record);
        Ok(())
    }

    /// Stores a new record unless its name is taken or one of its ports is already
    /// published by a live container (checked and inserted atomically).
    pub fn insert_new(&self, record: ContainerRecord) -> std::io::Result<Result<(), Refused>> {
        let mut records = self.lock();
        if records.values().any(|r| r.name == record.name) {
            return Ok(Err(Refused::NameInUse));
        }
        for r in records.values() {
            if matches!(r.state, ContainerState::Exited { .. }) {
                continue;
            }
            if let Some(p) = r.ports.iter().find(|p| {
                record
                    .ports
                    .iter()
                    .any(|q| q.host_port == p.host_port && q.proto == p.proto)
            }) {
                return Ok(Err(Refused::PortInUse {
                    port: *p,
                    by: r.name.clone(),
                }));
            }
        }
        let bytes = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
        write_replacing(&self.path(&record.id), &bytes)?;
        records.insert(record.id.clone(), record);
        Ok(Ok(()))
    }

    pub fn remove(&self, id: &Id) -> std::io::Result<()> {
        self.lock().remove(id);
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn get(&self, id: &Id) -> Option<ContainerRecord> {
        self.lock().get(id).cloned()
    }

    /// The networks of the container that has endpoint `endpoint`, if one here has it.
    pub fn container_networks(&self, endpoint: &EndpointId) -> Option<Vec<NetworkId>> {
        let records = self.lock();
        let record = records
            .values()
            .find(|r| r.attachments.iter().any(|a| &a.endpoint_id == endpoint))?;
        Some(
            record
                .attachments
                .iter()
                .map(|a| a.network_id.clone())
                .collect(),
        )
    }

    pub fn list(&self) -> Vec<ContainerRecord> {
        self.lock().values().cloned().collect()
    }

    /// Finds a container by full ID, name, or unique ID prefix (Docker's order).
    pub fn find(&self, reference: &str) -> Option<ContainerRecord> {
        let records = self.lock();
        if let Some(r) = records
            .values()
            .find(|r| r.id.as_str() == reference || r.name == reference)
        {
            return Some(r.clone());
        }
        if !Id::looks_like_prefix(reference) {
            return None;
        }
        let mut matches = records
            .values()
            .filter(|r| r.id.as_str().starts_with(reference));
        match (matches.next(), matches.next()) {
            (Some(r), None) => Some(r.clone()),
            _ => None,
        }
    }
}

/// vxnet's own containers: the name server's scope for their endpoints.
impl crate::dns::ContainerScope for Registry {
    fn networks_of(&self, endpoint: &EndpointId) -> Option<Vec<NetworkId>> {
        self.container_networks(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mac: Mac) -> ContainerRecord {
        let ip = Ipv4Addr::new(10, 0, 4, 2);
        ContainerRecord {
            id: Id::random(),
            name: "c".into(),
            hostname: "c".into(),
            command: vec!["true".into()],
            netns: PathBuf::from("/nonexistent"),
            created: String::new(),
            state: ContainerState::Created,
            attachments: vec![Attachment {
                network_id: Id::random(),
                network_name: "n".into(),
                endpoint_id: Id::random(),
                ifname: "eth0".into(),
                ip,
                prefix_len: 24,
                mac,
                gateway: Ipv4Addr::new(10, 0, 4, 1),
                mtu: 1450,
                default_route: false,
                aliases: Vec::new(),
                dns_route: None,
            }],
            auto_remove: false,
            gateway_attachment: None,
            ports: Vec::new(),
            conflicts: Vec::new(),
            etc_dir: None,
        }
    }

    #[test]
    fn damaged_records_on_disk_are_skipped_and_good_ones_kept() {
        let dir = std::env::temp_dir().join(format!("vxnet-unit-records-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let good = record(Mac::from_ipv4(Ipv4Addr::new(10, 0, 4, 2)));
        let write = |name: String, r: &ContainerRecord| {
            std::fs::write(dir.join(name), serde_json::to_vec(r).unwrap()).unwrap()
        };
        write(format!("{}.json", good.id), &good);
        let multicast = record(Mac([1, 0, 0x5e, 0, 0, 1]));
        write(format!("{}.json", multicast.id), &multicast);
        // A record under another record's name.
        let misnamed = record(Mac::from_ipv4(Ipv4Addr::new(10, 0, 4, 3)));
        write(format!("{}.json", Id::random()), &misnamed);
        std::fs::write(dir.join("short.json"), br#"{"id":"abc"}"#).unwrap();
        let registry = Registry::load(&dir).unwrap();
        let ids: Vec<Id> = registry.list().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![good.id.clone()]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
