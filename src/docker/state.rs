//! What the plugin must remember across daemon restarts (Docker does not repeat Activate,
//! CreateNetwork or CreateEndpoint to a plugin that comes back): one JSON file per record in
//! the state directory, replaced whole (write, rename), kept in memory too. Network bindings
//! are fsynced: Docker's networks outlive a reboot. Endpoints and reservations are not: they
//! die with the machine (their containers and the node's lease do too), and an fsync per
//! plugin call would sit on every `docker run` on a disk.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::{Endpoint, Id, NetworkId};
use crate::node::{write_atomically, write_replacing};
use crate::sync::lock;

/// A Docker network (by Docker's ID) and the vxnet network it stands for on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkBinding {
    pub docker_id: String,
    pub network_id: NetworkId,
    pub network_name: String,
    /// Whether Docker's CreateNetwork made the vxnet network (global scope: then Docker's
    /// DeleteNetwork removes it again) or found it (local scope binds by name).
    pub created_by_docker: bool,
}

/// A Docker endpoint on this host: its vxnet endpoint and the port made for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub endpoint: Endpoint,
    /// The veth's end on the sandbox's br0.
    pub sandbox_ifname: String,
    /// The veth's other end, handed to Docker at Join (Docker's `SrcName`).
    pub runtime_ifname: String,
    /// Whether a Join made the port (and no Leave removed it since).
    pub joined: bool,
    /// The container's namespace as Docker named it at Join: the endpoints sharing one are
    /// one container's (the networks whose names it may see).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_key: Option<String>,
}

/// An address Docker's IPAM call reserved and no endpoint has adopted yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub network_id: NetworkId,
    pub ip: Ipv4Addr,
    pub reservation: Id,
}

impl Reservation {
    pub fn key(network: &NetworkId, ip: Ipv4Addr) -> String {
        format!("{network}_{ip}")
    }
}

/// Records of one kind, one file each (`<key>.json`) in one directory.
pub struct RecordDir<T> {
    dir: PathBuf,
    records: Mutex<BTreeMap<String, T>>,
    /// Writes are fsynced (they must survive a power loss).
    durable: bool,
}

impl<T: Clone + Serialize + DeserializeOwned> RecordDir<T> {
    /// Loads every record in `dir` (created if missing). An unreadable file is skipped with
    /// a warning: one bad file must not stop the daemon. `durable`: fsync every write.
    pub fn load(dir: &Path, durable: bool) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut records = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let (Some(stem), true) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().is_some_and(|e| e == "json"),
            ) else {
                continue;
            };
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => {
                    records.insert(stem.to_string(), r);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping unreadable plugin record")
                }
            }
        }
        Ok(RecordDir {
            dir: dir.to_path_buf(),
            records: Mutex::new(records),
            durable,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, T>> {
        lock(&self.records)
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// Stores (or replaces) a record, on disk first. Keys are IDs and addresses: no `/`.
    pub fn put(&self, key: &str, record: T) -> std::io::Result<()> {
        if key.is_empty() || key.contains('/') || key.starts_with('.') {
            return Err(std::io::Error::other(format!("invalid record key {key:?}")));
        }
        let bytes = serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?;
        let mut records = self.lock();
        if self.durable {
            write_atomically(&self.path(key), &bytes)?;
        } else {
            write_replacing(&self.path(key), &bytes)?;
        }
        records.insert(key.to_string(), record);
        Ok(())
    }

    pub fn remove(&self, key: &str) -> std::io::Result<Option<T>> {
        let mut records = self.lock();
        let old = records.remove(key);
        if old.is_some() {
            match std::fs::remove_file(self.path(key)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(old)
    }

    pub fn get(&self, key: &str) -> Option<T> {
        self.lock().get(key).cloned()
    }

    pub fn list(&self) -> Vec<T> {
        self.lock().values().cloned().collect()
    }

    /// Runs `f` over the records without copying them.
    pub fn with<R>(&self, f: impl FnOnce(&BTreeMap<String, T>) -> R) -> R {
        f(&self.lock())
    }
}

/// Everything the plugin keeps, under `<state-dir>/docker/`.
pub struct PluginState {
    pub networks: RecordDir<NetworkBinding>,
    pub endpoints: RecordDir<EndpointRecord>,
    pub reservations: RecordDir<Reservation>,
}

impl PluginState {
    pub fn load(dir: &Path) -> std::io::Result<Self> {
        Ok(PluginState {
            networks: RecordDir::load(&dir.join("networks"), true)?,
            endpoints: RecordDir::load(&dir.join("endpoints"), false)?,
            reservations: RecordDir::load(&dir.join("reservations"), false)?,
        })
    }
}

impl PluginState {
    /// The vxnet networks of the Docker container that joined `endpoint`, if it is one of
    /// this plugin's.
    pub fn container_networks(&self, endpoint: &Id) -> Option<Vec<NetworkId>> {
        self.endpoints.with(|all| {
            // Docker's endpoint ID is the record's key.
            let own = all.get(endpoint.as_str())?;
            let Some(key) = own.sandbox_key.as_ref() else {
                return Some(vec![own.endpoint.network_id.clone()]);
            };
            Some(
                all.values()
                    .filter(|r| r.joined && r.sandbox_key.as_ref() == Some(key))
                    .map(|r| r.endpoint.network_id.clone())
                    .collect(),
            )
        })
    }
}

/// Docker's containers: the name server's scope for their endpoints.
impl crate::dns::ContainerScope for PluginState {
    fn networks_of(&self, endpoint: &Id) -> Option<Vec<NetworkId>> {
        self.container_networks(endpoint)
    }
}

impl crate::reconcile::PluginPorts for PluginState {
    fn ports(&self) -> Vec<(NetworkId, String)> {
        self.endpoints
            .list()
            .into_iter()
            .filter(|r| r.joined)
            .map(|r| (r.endpoint.network_id, r.sandbox_ifname))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reload_and_bad_files_are_skipped() {
        let dir = std::env::temp_dir().join(format!("vxnet-plugin-state-{}", Id::random().short()));
        let net = Id::random();
        {
            let state = PluginState::load(&dir).unwrap();
            let r = Reservation {
                network_id: net.clone(),
                ip: Ipv4Addr::new(10, 0, 4, 2),
                reservation: Id::random(),
            };
            let key = Reservation::key(&net, r.ip);
            state.reservations.put(&key, r.clone()).unwrap();
            assert_eq!(state.reservations.get(&key), Some(r));
            assert!(state
                .reservations
                .put("../x", state.reservations.list()[0].clone())
                .is_err());
        }
        std::fs::write(dir.join("reservations/broken.json"), b"{").unwrap();
        let state = PluginState::load(&dir).unwrap();
        assert_eq!(state.reservations.list().len(), 1);
        let key = Reservation::key(&net, Ipv4Addr::new(10, 0, 4, 2));
        assert!(state.reservations.remove(&key).unwrap().is_some());
        assert!(state.reservations.remove(&key).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
