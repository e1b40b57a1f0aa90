//! Cluster operations: create and remove networks, create and delete endpoints. Each one is
//! an etcd transaction whose compares make it safe against every other host doing the same
//! at the same moment; a lost race is retried on fresh data or reported, never papered over.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::ipam::{self, AddressPool};
use crate::model::{self, Endpoint, Id, Mac, Network, NetworkId, NodeId, DRIVER_OVERLAY};
use crate::store::Keys;
use crate::store::{Compare, KeyValue, LeaseId, Op, Store, StoreError};
use crate::sync::lock;

/// How often a transaction that lost a race is retried on fresh data before giving up.
const MAX_ATTEMPTS: usize = 32;
/// Address claims race every host attaching to the same network at once; each lost race
/// costs one read and one transaction (about a millisecond), so allow more of them.
const MAX_ALLOCATION_ATTEMPTS: usize = 256;

/// The lowest MTU an overlay may have: IPv6's minimum, so nothing in a container breaks.
pub const MTU_MIN: u32 = 1280;
/// The highest overlay MTU accepted at create time (jumbo underlay minus VXLAN's 50 bytes).
/// Each host also checks it against its own underlay when it builds the network.
pub const MTU_MAX: u32 = 9000 - 50;

/// What `network create` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    pub name: String,
    #[serde(default)]
    pub driver: Option<String>,
    /// The first free 10.x.y.0/24 when absent (Docker's default pool).
    #[serde(default)]
    pub subnet: Option<Ipv4Net>,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub ip_range: Option<Ipv4Net>,
    #[serde(default)]
    pub vni: Option<u32>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// No way out of the overlay for its containers (no gateway bridge interface).
    #[serde(default)]
    pub internal: bool,
}

/// What creating an endpoint asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointCreate {
    /// Shown in `network inspect`; defaults to the endpoint ID's short form.
    #[serde(default)]
    pub name: Option<String>,
    /// A specific address; otherwise the next free one.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// More names for the endpoint in the network's DNS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
}

/// A network as read from the store, with the revisions the compares need.
#[derive(Clone, Debug)]
pub struct StoredNetwork {
    pub network: Network,
    pub create_revision: i64,
    pub mod_revision: i64,
}

/// The result of a write: the value and the store revision that made it visible.
#[derive(Clone, Debug)]
pub struct Written<T> {
    pub value: T,
    pub revision: i64,
}

/// What reclaiming a local endpoint found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reclaim {
    /// Written again under the current lease.
    Claimed,
    /// Already held under the current lease: nothing to do.
    AlreadyHeld,
    /// Another endpoint (this ID) holds the address now.
    TakenBy(String),
    /// The network was removed meanwhile.
    NetworkGone,
}

/// Where this node's lease comes from; endpoints are written with it.
pub trait LeaseSource: Send + Sync {
    fn current_lease(&self) -> Option<LeaseId>;
}

/// Cluster operations on behalf of one node.
pub struct Cluster {
    store: Arc<dyn Store>,
    keys: Keys,
    node_id: NodeId,
    lease: Arc<dyn LeaseSource>,
    /// Addresses this daemon is trying to claim right now, so that its own concurrent
    /// requests pick different candidates instead of colliding with each other in etcd.
    in_flight: Mutex<HashSet<(NetworkId, Ipv4Addr)>>,
}

/// Releases an in-flight address reservation however the attempt ends.
struct Reservation<'a> {
    set: &'a Mutex<HashSet<(NetworkId, Ipv4Addr)>>,
    key: (NetworkId, Ipv4Addr),
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(self.set).remove(&self.key);
    }
}

/// Docker's rule for network and container names.
pub fn validate_name(what: &str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid {what} name {name:?}: use 1 to 128 characters [a-zA-Z0-9][a-zA-Z0-9_.-]"
        )))
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, Error> {
    serde_json::from_slice(&kv.value).map_err(|e| Error::Corrupt {
        key: kv.key.clone(),
        reason: e.to_string(),
    })
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail (no maps with non-string keys, no I/O).
    serde_json::to_vec(v).unwrap_or_default()
}

/// Finds a network by full ID, exact name, or unique ID prefix (Docker's order).
pub fn resolve<'a, I>(networks: I, reference: &str) -> Result<&'a StoredNetwork, Error>
where
    I: IntoIterator<Item = &'a StoredNetwork> + Clone,
{
    if let Some(n) = networks
        .clone()
        .into_iter()
        .find(|n| n.network.id.as_str() == reference)
    {
        return Ok(n);
    }
    if let Some(n) = networks
        .clone()
        .into_iter()
        .find(|n| n.network.name == reference)
    {
        return Ok(n);
    }
    if Id::looks_like_prefix(reference) {
        let mut matches = networks
            .into_iter()
            .filter(|n| n.network.id.as_str().starts_with(reference));
        if let Some(first) = matches.next() {
            if matches.next().is_some() {
                return Err(Error::AmbiguousNetwork(reference.to_string()));
            }
            return Ok(first);
        }
    }
    Err(Error::NetworkNotFound(reference.to_string()))
}

/// Checks a create request against the existing networks: the name is free, the subnet
/// (given, or the first free /24) overlaps none, the VNI (given, or the lowest free) is free.
fn plan_network(
    req: &NetworkCreate,
    existing: &[StoredNetwork],
) -> Result<(AddressPool, u32), Error> {
    if existing.iter().any(|n| n.network.name == req.name) {
        return Err(Error::NetworkNameInUse(req.name.clone()));
    }
    let subnet = match req.subnet {
        Some(s) => s,
        None => ipam::first_free_subnet(existing.iter().map(|n| n.network.subnet))
            .ok_or_else(|| Error::conflict("no free /24 left in 10.0.0.0/8: give --subnet"))?,
    };
    let pool = AddressPool::new(subnet, req.gateway, req.ip_range)?;
    if let Some(o) = existing
        .iter()
        .find(|n| ipam::overlaps(n.network.subnet, pool.subnet))
    {
        return Err(Error::SubnetOverlap {
            subnet: pool.subnet,
            other: o.network.name.clone(),
            other_subnet: o.network.subnet,
        });
    }
    let vni = match req.vni {
        Some(v) => {
            if let Some(o) = existing.iter().find(|n| n.network.vni == v) {
                return Err(Error::VniInUse(v, o.network.name.clone()));
            }
            v
        }
        None => {
            let used: HashSet<u32> = existing.iter().map(|n| n.network.vni).collect();
            ipam::next_free_vni(&used).ok_or(Error::VnisExhausted(ipam::VNI_MIN, ipam::VNI_MAX))?
        }
    };
    Ok((pool, vni))
}

/// The networks a caller already knows (from its watch-fed view) and the store revision they
/// are current at: the first attempt of a create checks against them instead of reading.
#[derive(Clone, Debug)]
pub struct KnownNetworks {
    pub networks: Vec<StoredNetwork>,
    pub revision: i64,
}

/// The addresses a caller already knows to be claimed in one network, and the cursor.
#[derive(Clone, Debug, Default)]
pub struct KnownAddresses {
    pub taken: HashSet<Ipv4Addr>,
    pub cursor: Option<Ipv4Addr>,
}

impl Cluster {
    pub fn new(
        store: Arc<dyn Store>,
        keys: Keys,
        node_id: NodeId,
        lease: Arc<dyn LeaseSource>,
    ) -> Self {
        Cluster {
            store,
            keys,
            node_id,
            lease,
            in_flight: Mutex::new(HashSet::new()),
        }
    }

    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Every network, read from the store (linearizable), with the read's revision.
    pub async fn read_networks(&self) -> Result<(Vec<StoredNetwork>, i64), Error> {
        let listing = self.store.list(&self.keys.networks()).await?;
        let mut out = Vec::with_capacity(listing.kvs.len());
        for kv in &listing.kvs {
            // One unreadable record (written by anyone who reached etcd) must not stop the
            // creation or removal of every other network: it is skipped here as the view
            // skips it (which reports it in `vxnet info`). Its name and VNI keys, if any,
            // still hold those values, so a new network cannot take them.
            match parse_json(kv) {
                Ok(network) => out.push(StoredNetwork {
                    network,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                }),
                Err(e) => tracing::debug!(error = %e, "skipping an unreadable network record"),
            }
        }
        Ok((out, listing.revision))
    }

    /// Creates a global network. Name, subnet and VNI are unique cluster-wide: the
    /// transaction fails if any network was added after the checks read the list.
    /// `known` (optional) lets the first attempt skip reading the network list; the
    /// transaction's compare still catches anything added after its revision.
    pub async fn create_network(
        &self,
        req: NetworkCreate,
        known: Option<KnownNetworks>,
    ) -> Result<Written<Network>, Error> {
        self.create_network_with_id(req, known, None).await
    }

    /// `create_network` with the ID chosen by the caller (the Docker plugin gives a global
    /// network Docker's own network ID, so every host resolves Docker's ID directly).
    pub async fn create_network_with_id(
        &self,
        req: NetworkCreate,
        known: Option<KnownNetworks>,
        id: Option<NetworkId>,
    ) -> Result<Written<Network>, Error> {
        validate_name("network", &req.name)?;
        let driver = req
            .driver
            .clone()
            .unwrap_or_else(|| DRIVER_OVERLAY.to_string());
        if driver != DRIVER_OVERLAY {
            return Err(Error::invalid(format!(
                "driver {driver:?} is not supported: vxnet networks use --driver overlay"
            )));
        }
        if req.subnet.is_none() && (req.gateway.is_some() || req.ip_range.is_some()) {
            return Err(Error::invalid("--gateway and --ip-range need --subnet"));
        }
        if let Some(subnet) = req.subnet {
            AddressPool::new(subnet, req.gateway, req.ip_range)?;
        }
        if let Some(vni) = req.vni {
            ipam::validate_vni(vni)?;
        }
        if let Some(mtu) = req.mtu {
            if !(MTU_MIN..=MTU_MAX).contains(&mtu) {
                return Err(Error::invalid(format!(
                    "MTU {mtu} is out of range: use {MTU_MIN}..{MTU_MAX} \
                     (at most the underlay's MTU minus 50)"
                )));
            }
        }
        for key in req.labels.keys() {
            if key.is_empty() || key.contains('=') {
                return Err(Error::invalid(format!(
                    "invalid label key {key:?}: use key=value"
                )));
            }
        }

        let mut known = known;
        for _ in 0..MAX_ATTEMPTS {
            let from_view = known.is_some();
            let (existing, read_rev) = match known.take() {
                Some(k) => (k.networks, k.revision),
                None => self.read_networks().await?,
            };
            let (pool, vni) = match plan_network(&req, &existing) {
                Ok(planned) => planned,
                // The caller's view may lag: confirm a refusal on fresh data before giving it.
                Err(_) if from_view => continue,
                Err(e) => return Err(e),
            };
            if let Some(id) = &id {
                if let Some(n) = existing.iter().find(|n| &n.network.id == id) {
                    return Err(Error::conflict(format!(
                        "network ID {} already exists (network {})",
                        id.short(),
                        n.network.name
                    )));
                }
            }
            let network = Network {
                id: id.clone().unwrap_or_else(Id::random),
                name: req.name.clone(),
                driver: driver.clone(),
                subnet: pool.subnet,
                gateway: pool.gateway,
                ip_range: req.ip_range,
                vni,
                mtu: req.mtu,
                labels: req.labels.clone(),
                internal: req.internal,
                created: model::now_rfc3339(),
                created_by: self.node_id.clone(),
            };
            let name_key = self.keys.network_name(&network.name);
            let vni_key = self.keys.vni(vni);
            let outcome = self
                .store
                .txn(
                    vec![
                        Compare::PrefixUnchangedSince(self.keys.networks(), read_rev),
                        Compare::Absent(self.keys.network(&network.id)),
                        Compare::Absent(name_key.clone()),
                        Compare::Absent(vni_key.clone()),
                    ],
                    vec![
                        Op::put(self.keys.network(&network.id), to_json(&network)),
                        Op::put(name_key.clone(), network.id.as_str()),
                        Op::put(vni_key.clone(), network.id.as_str()),
                    ],
                    vec![Op::Get(name_key), Op::Get(vni_key)],
                )
                .await?;
            if outcome.succeeded {
                return Ok(Written {
                    value: network,
                    revision: outcome.revision,
                });
            }
            // The name already pointing at this very network (a random ID nobody else has)
            // means an earlier try that timed out was applied after all: done.
            if let Some(Some(kv)) = outcome.gets.first() {
                if kv.value == network.id.as_str().as_bytes() {
                    return Ok(Written {
                        value: network,
                        revision: kv.mod_revision,
                    });
                }
            }
            // Someone else wrote first. A name or an explicit VNI taken by them is final;
            // anything else (another network added) means re-read and check again.
            if outcome.gets.first().is_some_and(|g| g.is_some()) {
                return Err(Error::NetworkNameInUse(req.name));
            }
            if let (Some(v), Some(Some(kv))) = (req.vni, outcome.gets.get(1)) {
                return Err(Error::VniInUse(
                    v,
                    String::from_utf8_lossy(&kv.value).into_owned(),
                ));
            }
        }
        Err(Error::Contention(format!("network create {}", req.name)))
    }

    /// Removes a network, refusing while any endpoint (on any host) is attached. The
    /// transaction compares the endpoint prefix as empty, so an attach racing the removal
    /// either lands first (and the removal fails) or finds the network gone.
    pub async fn remove_network(&self, reference: &str) -> Result<Written<Network>, Error> {
        for _ in 0..MAX_ATTEMPTS {
            let (networks, _) = self.read_networks().await?;
            let stored = resolve(&networks, reference)?.clone();
            let net = &stored.network;
            let endpoints_prefix = self.keys.endpoints(&net.id);
            let outcome = self
                .store
                .txn(
                    vec![
                        Compare::ModRevision(self.keys.network(&net.id), stored.mod_revision),
                        Compare::PrefixEmpty(endpoints_prefix.clone()),
                    ],
                    vec![
                        Op::Delete(self.keys.network(&net.id)),
                        Op::Delete(self.keys.network_name(&net.name)),
                        Op::Delete(self.keys.vni(net.vni)),
                        Op::DeletePrefix(self.keys.ipam(&net.id)),
                    ],
                    vec![Op::Get(self.keys.network(&net.id))],
                )
                .await?;
            if outcome.succeeded {
                return Ok(Written {
                    value: stored.network,
                    revision: outcome.revision,
                });
            }
            // Gone already: an earlier try that timed out was applied after all.
            if outcome.gets.first().is_some_and(|g| g.is_none()) {
                return Ok(Written {
                    value: stored.network,
                    revision: outcome.revision,
                });
            }
            let endpoints = self.read_endpoints(&net.id).await?;
            if !endpoints.is_empty() {
                let list = endpoints
                    .iter()
                    .take(5)
                    .map(|e| format!("{} {}", e.name, e.ip))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Error::NetworkInUse {
                    name: net.name.clone(),
                    count: endpoints.len(),
                    list: if endpoints.len() > 5 {
                        format!("{list}, ...")
                    } else {
                        list
                    },
                });
            }
        }
        Err(Error::Contention(format!("network rm {reference}")))
    }

    /// The endpoints of one network, read from the store.
    pub async fn read_endpoints(&self, net: &NetworkId) -> Result<Vec<Endpoint>, Error> {
        let listing = self.store.list(&self.keys.endpoints(net)).await?;
        listing.kvs.iter().map(parse_json).collect()
    }

    /// Attaches a new endpoint of this node to a network, claiming an address. The address
    /// key is created only if absent, so two hosts can never both hold one address.
    pub async fn create_endpoint(
        &self,
        network: &StoredNetwork,
        req: EndpointCreate,
        known: Option<KnownAddresses>,
    ) -> Result<Written<Endpoint>, Error> {
        self.create_endpoint_as(network, req, known, None).await
    }

    /// `create_endpoint` with the endpoint's ID and MAC chosen by the caller (Docker chooses
    /// both for the containers it runs).
    pub async fn create_endpoint_as(
        &self,
        network: &StoredNetwork,
        req: EndpointCreate,
        known: Option<KnownAddresses>,
        identity: Option<(model::EndpointId, Mac)>,
    ) -> Result<Written<Endpoint>, Error> {
        let lease = self.lease.current_lease().ok_or(Error::NotRegistered)?;
        if let Some(name) = &req.name {
            validate_name("endpoint", name)?;
        }
        crate::validate::check_aliases(&req.aliases)?;
        let (id, mac) = match identity {
            Some((id, mac)) => (id, Some(mac)),
            None => (Id::random(), None),
        };
        let name = req.name.clone().unwrap_or_else(|| id.short().to_string());
        let created = model::now_rfc3339();
        let endpoint_at = |ip: Ipv4Addr| Endpoint {
            id: id.clone(),
            network_id: network.network.id.clone(),
            name: name.clone(),
            node_id: self.node_id.clone(),
            ip,
            mac: mac.unwrap_or_else(|| Mac::from_ipv4(ip)),
            created: created.clone(),
            aliases: req.aliases.clone(),
        };
        let claimed = self
            .allocate(network, req.ip, known, &id, |ip| {
                self.claim_puts(network, &endpoint_at(ip), lease)
            })
            .await?;
        Ok(Written {
            value: endpoint_at(claimed.value),
            revision: claimed.revision,
        })
    }

    /// Reserves an address for an endpoint that does not exist yet (Docker asks its IPAM
    /// driver for the address before it creates the endpoint). The claim is held by a fresh
    /// reservation ID under this node's lease until [`Cluster::adopt_reservation`] hands it
    /// to the endpoint or [`Cluster::release_reservation`] frees it.
    pub async fn reserve_address(
        &self,
        network: &StoredNetwork,
        ip: Option<Ipv4Addr>,
        known: Option<KnownAddresses>,
    ) -> Result<(Ipv4Addr, Id), Error> {
        let lease = self.lease.current_lease().ok_or(Error::NotRegistered)?;
        let reservation = Id::random();
        let net = &network.network.id;
        let claimed = self
            .allocate(network, ip, known, &reservation, |ip| {
                vec![Op::put_leased(
                    self.keys.addr(net, ip),
                    reservation.as_str(),
                    lease,
                )]
            })
            .await?;
        Ok((claimed.value, reservation))
    }

    /// Turns a reservation into `endpoint` (same address) in one transaction: the address
    /// must still be held by `reservation`.
    pub async fn adopt_reservation(
        &self,
        network: &StoredNetwork,
        reservation: &Id,
        endpoint: &Endpoint,
    ) -> Result<Written<Endpoint>, Error> {
        let lease = self.lease.current_lease().ok_or(Error::NotRegistered)?;
        let net_key = self.keys.network(&network.network.id);
        let addr_key = self.keys.addr(&network.network.id, endpoint.ip);
        for _ in 0..MAX_ATTEMPTS {
            let held = self.store.get(&addr_key).await?;
            let revision = match held {
                Some(kv) if kv.value == reservation.as_str().as_bytes() => kv.mod_revision,
                // An earlier try that timed out was applied after all.
                Some(kv) if kv.value == endpoint.id.as_str().as_bytes() => {
                    return Ok(Written {
                        value: endpoint.clone(),
                        revision: kv.mod_revision,
                    })
                }
                _ => {
                    return Err(Error::conflict(format!(
                        "address {} on network {} is no longer reserved for this endpoint \
                         (its reservation expired or was released): request a new address",
                        endpoint.ip, network.network.name
                    )))
                }
            };
            let outcome = self
                .store
                .txn(
                    vec![
                        Compare::CreateRevision(net_key.clone(), network.create_revision),
                        Compare::ModRevision(addr_key.clone(), revision),
                    ],
                    self.claim_puts(network, endpoint, lease),
                    vec![Op::Get(net_key.clone())],
                )
                .await
                .map_err(|e| match e {
                    StoreError::LeaseNotFound(_) => Error::NotRegistered,
                    e => Error::Store(e),
                })?;
            if outcome.succeeded {
                return Ok(Written {
                    value: endpoint.clone(),
                    revision: outcome.revision,
                });
            }
            if !matches!(outcome.gets.first(), Some(Some(kv)) if kv.create_revision == network.create_revision)
            {
                return Err(Error::NetworkNotFound(network.network.name.clone()));
            }
        }
        Err(Error::Contention(format!("adopting {}", endpoint.ip)))
    }

    /// Frees an address still held by `reservation`. Whatever else holds it (an endpoint
    /// that adopted it, or another owner after the reservation expired) is left alone.
    /// Whether the reservation was released.
    pub async fn release_reservation(
        &self,
        net: &NetworkId,
        ip: Ipv4Addr,
        reservation: &Id,
    ) -> Result<bool, Error> {
        let addr_key = self.keys.addr(net, ip);
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&addr_key).await? else {
                return Ok(false);
            };
            if kv.value != reservation.as_str().as_bytes() {
                return Ok(false);
            }
            let outcome = self
                .store
                .txn(
                    vec![Compare::ModRevision(addr_key.clone(), kv.mod_revision)],
                    vec![Op::Delete(addr_key.clone())],
                    vec![],
                )
                .await?;
            if outcome.succeeded {
                return Ok(true);
            }
        }
        Err(Error::Contention(format!("releasing {ip}")))
    }

    /// Claims an address on `network` for `owner`: `requested`, or the next free one (racing
    /// every other host; a lost race re-reads and tries again). `claim` gives the writes that
    /// hold address `ip` (the address key, valued `owner`, first); the allocation cursor
    /// follows on dynamic picks. Returns the address and the revision that made it visible.
    async fn allocate(
        &self,
        network: &StoredNetwork,
        requested: Option<Ipv4Addr>,
        known: Option<KnownAddresses>,
        owner: &Id,
        claim: impl Fn(Ipv4Addr) -> Vec<Op>,
    ) -> Result<Written<Ipv4Addr>, Error> {
        let net = &network.network;
        let pool = AddressPool::new(net.subnet, Some(net.gateway), net.ip_range)?;
        if let Some(ip) = requested {
            pool.check_requested(ip)?;
        }
        let mut lost_races = 0usize;
        let mut known = known;
        for _ in 0..MAX_ALLOCATION_ATTEMPTS {
            let ip = match requested {
                Some(ip) => ip,
                None => {
                    // The caller's view on the first attempt; after that read fresh: after a
                    // lost race, what others took since is exactly what must be skipped.
                    let from_view = known.is_some();
                    let KnownAddresses { taken, cursor } = match known.take() {
                        Some(k) => k,
                        None => self.read_addresses(&net.id).await?,
                    };
                    let mut busy = taken.clone();
                    busy.extend(
                        lock(&self.in_flight)
                            .iter()
                            .filter(|(n, _)| n == &net.id)
                            .map(|(_, ip)| *ip),
                    );
                    // After lost races, spread out: pick at random among the next few free
                    // addresses instead of the very next one every other host is trying too.
                    let spread = (lost_races * 2).clamp(1, 16);
                    let candidates: Vec<Ipv4Addr> =
                        pool.free_after(&busy, cursor).take(spread).collect();
                    match candidates.len() {
                        // Confirm "exhausted" on fresh data before saying it.
                        0 if from_view => continue,
                        0 if busy.len() > taken.len() => {
                            // Only our own in-flight claims are in the way: they may fail.
                            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                            continue;
                        }
                        0 => {
                            return Err(Error::SubnetExhausted {
                                network: net.name.clone(),
                                range: pool.range,
                                capacity: pool.dynamic_capacity(),
                            })
                        }
                        n => candidates[rand::random_range(0..n)],
                    }
                }
            };
            let _reservation = self.reserve(&net.id, ip);
            let mut puts = claim(ip);
            if requested.is_none() {
                puts.push(Op::put(self.keys.cursor(&net.id), ip.to_string()));
            }
            let outcome = self.claim_address(network, ip, puts).await?;
            if outcome.succeeded {
                return Ok(Written {
                    value: ip,
                    revision: outcome.revision,
                });
            }
            match (outcome.gets.first(), outcome.gets.get(1)) {
                // The address held by this very owner: an earlier try that timed out was
                // applied after all.
                (_, Some(Some(addr))) if addr.value == owner.as_str().as_bytes() => {
                    return Ok(Written {
                        value: ip,
                        revision: addr.mod_revision,
                    });
                }
                (Some(Some(kv)), _) if kv.create_revision == network.create_revision => {}
                _ => return Err(Error::NetworkNotFound(net.name.clone())),
            }
            if requested.is_some() {
                return Err(Error::AddressInUse {
                    ip,
                    network: net.name.clone(),
                });
            }
            // Another host took this address first: re-read what is taken and try again.
            lost_races += 1;
        }
        Err(Error::Contention(format!(
            "address allocation on {}",
            net.name
        )))
    }

    fn reserve(&self, net: &NetworkId, ip: Ipv4Addr) -> Reservation<'_> {
        let key = (net.clone(), ip);
        lock(&self.in_flight).insert(key.clone());
        Reservation {
            set: &self.in_flight,
            key,
        }
    }

    /// The addresses claimed in a network and the allocation cursor.
    async fn read_addresses(&self, net: &NetworkId) -> Result<KnownAddresses, Error> {
        let listing = self.store.list(&self.keys.ipam(net)).await?;
        let addrs_prefix = self.keys.addrs(net);
        let cursor_key = self.keys.cursor(net);
        let mut taken = HashSet::with_capacity(listing.kvs.len());
        let mut cursor = None;
        for kv in &listing.kvs {
            if let Some(ip) = kv.key.strip_prefix(&addrs_prefix) {
                if let Ok(ip) = ip.parse() {
                    taken.insert(ip);
                }
            } else if kv.key == cursor_key {
                cursor = std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|s| s.parse().ok());
            }
        }
        Ok(KnownAddresses { taken, cursor })
    }

    /// The writes of an address claim: the address key and the endpoint, both leased.
    fn claim_puts(&self, network: &StoredNetwork, endpoint: &Endpoint, lease: LeaseId) -> Vec<Op> {
        let net = &network.network.id;
        vec![
            Op::put_leased(
                self.keys.addr(net, endpoint.ip),
                endpoint.id.as_str(),
                lease,
            ),
            Op::put_leased(
                self.keys.endpoint(net, &endpoint.id),
                to_json(endpoint),
                lease,
            ),
        ]
    }

    /// Makes the writes `puts` (which claim `ip`) only while the network is the same
    /// incarnation and nobody holds the address. When the compares fail, the outcome's gets
    /// hold the network key and the address key, in that order.
    async fn claim_address(
        &self,
        network: &StoredNetwork,
        ip: Ipv4Addr,
        puts: Vec<Op>,
    ) -> Result<crate::store::TxnOutcome, Error> {
        let net_key = self.keys.network(&network.network.id);
        let addr_key = self.keys.addr(&network.network.id, ip);
        self.store
            .txn(
                vec![
                    Compare::CreateRevision(net_key.clone(), network.create_revision),
                    Compare::Absent(addr_key.clone()),
                ],
                puts,
                vec![Op::Get(net_key), Op::Get(addr_key)],
            )
            .await
            .map_err(|e| match e {
                StoreError::LeaseNotFound(_) => Error::NotRegistered,
                e => Error::Store(e),
            })
    }

    /// Claims an existing local endpoint's address again under this node's current lease
    /// (after the old lease expired, or to move it to the new one). Never takes an address
    /// another endpoint holds: that is reported, not overwritten.
    pub async fn reclaim_endpoint(
        &self,
        network: &StoredNetwork,
        endpoint: &Endpoint,
    ) -> Result<Reclaim, Error> {
        let lease = self.lease.current_lease().ok_or(Error::NotRegistered)?;
        let addr_key = self.keys.addr(&network.network.id, endpoint.ip);
        for _ in 0..MAX_ATTEMPTS {
            let outcome = self
                .claim_address(
                    network,
                    endpoint.ip,
                    self.claim_puts(network, endpoint, lease),
                )
                .await?;
            if outcome.succeeded {
                return Ok(Reclaim::Claimed);
            }
            let (net, addr) = (outcome.gets.first(), outcome.gets.get(1));
            if !matches!(net, Some(Some(kv)) if kv.create_revision == network.create_revision) {
                return Ok(Reclaim::NetworkGone);
            }
            let Some(Some(addr)) = addr else { continue };
            if addr.value != endpoint.id.as_str().as_bytes() {
                return Ok(Reclaim::TakenBy(
                    String::from_utf8_lossy(&addr.value).into_owned(),
                ));
            }
            if addr.lease == lease {
                return Ok(Reclaim::AlreadyHeld);
            }
            // Still ours, under an older lease: move it to the current one.
            let moved = self
                .store
                .txn(
                    vec![Compare::ModRevision(addr_key.clone(), addr.mod_revision)],
                    self.claim_puts(network, endpoint, lease),
                    vec![],
                )
                .await?;
            if moved.succeeded {
                return Ok(Reclaim::Claimed);
            }
        }
        Err(Error::Contention(format!("reclaiming {}", endpoint.ip)))
    }

    /// Replaces the DNS name and aliases of one of this node's endpoints (Docker's container
    /// name, learned after the endpoint was made). Returns whether the record changed.
    pub async fn set_endpoint_names(
        &self,
        net: &NetworkId,
        id: &model::EndpointId,
        name: &str,
        aliases: &[String],
    ) -> Result<bool, Error> {
        validate_name("endpoint", name)?;
        crate::validate::check_aliases(aliases)?;
        let key = self.keys.endpoint(net, id);
        for _ in 0..MAX_ATTEMPTS {
            let Some(kv) = self.store.get(&key).await? else {
                return Err(Error::EndpointNotFound(id.short().to_string()));
            };
            let mut ep: Endpoint = parse_json(&kv)?;
            if ep.node_id != self.node_id {
                return Err(Error::ForeignEndpoint {
                    endpoint: id.short().to_string(),
                    owner: ep.node_id.short().to_string(),
                });
            }
            if ep.name == name && ep.aliases == aliases {
                return Ok(false);
            }
            ep.name = name.to_string();
            ep.aliases = aliases.to_vec();
            // Same lease: the record still goes with this node's.
            let outcome = self
                .store
                .txn(
                    vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                    vec![Op::put_leased(key.clone(), to_json(&ep), kv.lease)],
                    vec![],
                )
                .await?;
            if outcome.succeeded {
                return Ok(true);
            }
        }
        Err(Error::Contention(format!(
            "renaming endpoint {}",
            id.short()
        )))
    }

    /// Deletes an endpoint and releases its address, atomically.
    pub async fn delete_endpoint(
        &self,
        net: &NetworkId,
        id: &model::EndpointId,
    ) -> Result<Written<Endpoint>, Error> {
        self.delete_endpoint_of(net, id, None).await
    }

    /// Deletes an endpoint only if `owner` (when given) holds it; the mod-revision compare
    /// makes the ownership check and the delete one transaction.
    pub async fn delete_endpoint_of(
        &self,
        net: &NetworkId,
        id: &model::EndpointId,
        owner: Option<&model::NodeId>,
    ) -> Result<Written<Endpoint>, Error> {
        let key = self.keys.endpoint(net, id);
        for _ in 0..MAX_ATTEMPTS {
            let kv = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| Error::EndpointNotFound(id.to_string()))?;
            let endpoint: Endpoint = parse_json(&kv)?;
            if owner.is_some_and(|o| *o != endpoint.node_id) {
                return Err(Error::ForeignEndpoint {
                    endpoint: id.to_string(),
                    owner: endpoint.node_id.to_string(),
                });
            }
            let outcome = self
                .store
                .txn(
                    vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                    vec![
                        Op::Delete(key.clone()),
                        Op::Delete(self.keys.addr(net, endpoint.ip)),
                    ],
                    vec![Op::Get(key.clone())],
                )
                .await?;
            // Deleted now, or already by an earlier try that timed out but was applied.
            if outcome.succeeded || outcome.gets.first().is_some_and(|g| g.is_none()) {
                return Ok(Written {
                    value: endpoint,
                    revision: outcome.revision,
                });
            }
        }
        Err(Error::Contention(format!("endpoint delete {id}")))
    }
}
