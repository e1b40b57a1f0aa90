//! The plugin's logic: each Docker call mapped onto vxnet's cluster operations and data
//! plane. Transport (HTTP over the plugin socket, `{"Err": …}` answers) is in `server.rs`.
//!
//! How Docker's objects map onto vxnet's:
//! - a Docker network is bound to one vxnet network. Global scope: CreateNetwork (sent only
//!   to the host that ran `docker network create`) creates the vxnet network with Docker's
//!   own network ID, so every other host resolves that ID from the store. Local scope: each
//!   host's CreateNetwork binds its own Docker network to the vxnet network named by
//!   `-o vxnet.network=NAME` (creating it if no host has yet).
//! - a Docker endpoint is a vxnet endpoint with Docker's endpoint ID, address and MAC,
//!   leased to this node like any other, so remote hosts program it from the same watch.
//! - vxnet's IPAM driver reserves addresses cluster-wide at RequestAddress (before Docker
//!   creates the endpoint); CreateEndpoint adopts the reservation in one transaction.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::Ipv4Net;

use super::protocol::*;
use super::state::{EndpointRecord, NetworkBinding, PluginState, Reservation};
use super::CallStats;
use super::Scope;
use crate::cluster::{self, Cluster, EndpointCreate, NetworkCreate, StoredNetwork};
use crate::dataplane::HandoffSpec;
use crate::error::Error;
use crate::ipam;
use crate::model::{self, Endpoint, EndpointId, Id, Mac, NetworkId};
use crate::netns::NetNs;
use crate::reconcile::Reconciler;
use crate::sync::lock;
use crate::view::SharedView;

/// The address space vxnet's IPAM driver reports (both defaults): how CreateNetwork tells
/// that Docker took the network's addresses from vxnet.
pub const ADDRESS_SPACE: &str = "vxnet";
const POOL_PREFIX: &str = "vxnet:";

pub struct DockerPlugin {
    scope: Scope,
    cluster: Arc<Cluster>,
    view: SharedView,
    reconciler: Arc<Reconciler>,
    state: Arc<PluginState>,
    /// This host's own network namespace: where Docker picks up the interface of a Join.
    runtime_ns: NetNs,
    /// Ports still being removed after a Leave, by Docker endpoint ID. Leave answers before
    /// the veth is gone: deleting one waits for an RCU grace period (15–20 ms here), which
    /// would sit on the path of every `docker stop` and `docker run --rm`. A later Join or
    /// DeleteEndpoint of the same endpoint waits for the removal first.
    leaving: std::sync::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Count and time of each call served, for `vxnet info`.
    calls: std::sync::Mutex<BTreeMap<String, CallStats>>,
}

fn io_error(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(format!("saving the plugin's {what}"), e)
}

/// Docker's IDs are 64 lowercase hex characters, like vxnet's.
fn docker_id(what: &str, s: &str) -> Result<Id, Error> {
    Id::from_str(s).map_err(|_| Error::invalid(format!("{what} {s:?} is not a Docker ID")))
}

fn short(s: &str) -> &str {
    &s[..s.len().min(Id::SHORT_LEN)]
}

/// `10.0.4.2/24` (Docker's form) into address and prefix.
fn parse_cidr(what: &str, s: &str) -> Result<Ipv4Net, Error> {
    Ipv4Net::from_str(s)
        .map_err(|_| Error::invalid(format!("{what} {s:?} is not an IPv4 address/prefix")))
}

fn pool_id(subnet: Ipv4Net) -> String {
    format!("{POOL_PREFIX}{subnet}")
}

fn parse_pool_id(s: &str) -> Result<Ipv4Net, Error> {
    s.strip_prefix(POOL_PREFIX)
        .and_then(|p| Ipv4Net::from_str(p).ok())
        .ok_or_else(|| {
            Error::invalid(format!(
                "pool {s:?} was not handed out by vxnet's IPAM driver (pools look like {POOL_PREFIX}10.0.4.0/24)"
            ))
        })
}

/// The vxnet network a Docker CreateNetwork makes.
fn create_request(
    name: &str,
    subnet: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    mtu: Option<u32>,
) -> NetworkCreate {
    NetworkCreate {
        name: name.to_string(),
        subnet: Some(subnet),
        gateway,
        mtu,
        ..Default::default()
    }
}

impl DockerPlugin {
    pub fn new(
        scope: Scope,
        cluster: Arc<Cluster>,
        view: SharedView,
        reconciler: Arc<Reconciler>,
        state: Arc<PluginState>,
    ) -> std::io::Result<Self> {
        Ok(DockerPlugin {
            scope,
            cluster,
            view,
            reconciler,
            state,
            runtime_ns: NetNs::open(std::path::Path::new("/proc/self/ns/net"))?,
            leaving: std::sync::Mutex::new(HashMap::new()),
            calls: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// Counts one served call (only calls of the protocol: the server does not count
    /// unknown paths, so the table stays bounded whatever is sent).
    pub fn count_call(&self, call: &str, elapsed: std::time::Duration) {
        let us = elapsed.as_micros() as u64;
        let mut calls = lock(&self.calls);
        let stats = match calls.get_mut(call) {
            Some(s) => s,
            None => calls.entry(call.to_string()).or_default(),
        };
        stats.count += 1;
        stats.total_us += us;
        stats.max_us = stats.max_us.max(us);
    }

    /// The calls served since the daemon started.
    pub fn call_stats(&self) -> BTreeMap<String, CallStats> {
        lock(&self.calls).clone()
    }

    /// Waits until a port removal started by a Leave of `endpoint` is over.
    async fn settle_leave(&self, endpoint: &str) {
        let pending = lock(&self.leaving).remove(endpoint);
        if let Some(task) = pending {
            let _ = task.await;
        }
    }

    /// A network by vxnet ID: from the view, or from the store when the view lags.
    async fn network_by_id(&self, id: &NetworkId) -> Result<Option<StoredNetwork>, Error> {
        if let Some(n) = self.view.with(|v| v.networks.get(id).cloned()) {
            return Ok(Some(n));
        }
        let (networks, _) = self.cluster.read_networks().await?;
        Ok(networks.into_iter().find(|n| &n.network.id == id))
    }

    /// A network matching `pred`, from the store (fresh: used where a stale answer would
    /// create a duplicate).
    async fn find_network(
        &self,
        pred: impl Fn(&StoredNetwork) -> bool,
    ) -> Result<Option<StoredNetwork>, Error> {
        if let Some(n) = self
            .view
            .with(|v| v.networks.values().find(|n| pred(n)).cloned())
        {
            return Ok(Some(n));
        }
        let (networks, _) = self.cluster.read_networks().await?;
        Ok(networks.into_iter().find(|n| pred(n)))
    }

    /// The vxnet network a Docker network stands for on this host.
    async fn network_for(&self, docker_network: &str) -> Result<StoredNetwork, Error> {
        let binding = self.state.networks.get(docker_network);
        let id = match (&binding, self.scope) {
            (Some(b), _) => b.network_id.clone(),
            // Global scope: the network carries Docker's ID (made by whichever host ran
            // `docker network create`).
            (None, Scope::Global) => docker_id("network ID", docker_network)?,
            (None, Scope::Local) => {
                return Err(Error::NetworkNotFound(format!(
                    "for Docker network {} (this host's vxnet daemon never saw its \
                     CreateNetwork; remove it and create it again with `docker network create -d vxnet …`)",
                    short(docker_network)
                )))
            }
        };
        self.network_by_id(&id).await?.ok_or_else(|| {
            Error::NetworkNotFound(format!(
                "{} (Docker network {}: removed from vxnet meanwhile?)",
                binding
                    .map(|b| b.network_name)
                    .unwrap_or_else(|| id.short().to_string()),
                short(docker_network)
            ))
        })
    }

    // ---- NetworkDriver ------------------------------------------------------------------

    pub fn capabilities(&self) -> CapabilitiesResponse {
        CapabilitiesResponse {
            scope: self.scope.as_str(),
            connectivity_scope: "global",
        }
    }

    pub async fn create_network(&self, req: CreateNetworkRequest) -> Result<Empty, Error> {
        if req.ipv6_data.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(Error::invalid(
                "vxnet networks are IPv4 only: create the network without --ipv6",
            ));
        }
        let v4 = req.ipv4_data.unwrap_or_default();
        let [data] = v4.as_slice() else {
            return Err(Error::invalid(format!(
                "a vxnet network has exactly one IPv4 subnet, not {}: give one --subnet",
                v4.len()
            )));
        };
        let subnet = parse_cidr("subnet", &data.pool)?;
        let subnet = Ipv4Net::new(subnet.network(), subnet.prefix_len())
            .map_err(|e| Error::invalid(e.to_string()))?;
        let gateway = match data.gateway.as_str() {
            "" => None,
            g => Some(parse_cidr("gateway", g)?.addr()),
        };
        let generic = match req.options.get(OPT_GENERIC) {
            Some(serde_json::Value::Object(m)) => m.clone().into_iter().collect(),
            _ => BTreeMap::new(),
        };
        for key in generic.keys().filter(|k| k.starts_with("vxnet.")) {
            if key != OPT_NETWORK {
                return Err(Error::invalid(format!(
                    "unknown option {key:?}: vxnet's driver takes -o {OPT_NETWORK}=NAME"
                )));
            }
        }
        let name = option_str(&generic, OPT_NETWORK);
        let mtu = match option_str(&generic, OPT_MTU) {
            Some(m) => Some(
                m.parse::<u32>()
                    .map_err(|_| Error::invalid(format!("-o {OPT_MTU}={m:?} is not a number")))?,
            ),
            None => None,
        };
        let docker_net = req.network_id;
        let binding = match self.scope {
            Scope::Global => {
                self.create_global(&docker_net, name, subnet, gateway, mtu)
                    .await?
            }
            Scope::Local => {
                if data.address_space != ADDRESS_SPACE {
                    return Err(Error::invalid(
                        "in local scope every host allocates for itself, so addresses must come \
                         from vxnet's cluster-wide IPAM: add --ipam-driver vxnet",
                    ));
                }
                self.bind_local(&docker_net, name, subnet, gateway, mtu)
                    .await?
            }
        };
        tracing::info!(docker_network = short(&docker_net), network = %binding.network_name,
            created = binding.created_by_docker, "Docker network bound");
        self.state
            .networks
            .put(&docker_net, binding)
            .map_err(io_error("network binding"))?;
        Ok(Empty {})
    }

    async fn create_global(
        &self,
        docker_net: &str,
        name: Option<String>,
        subnet: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        mtu: Option<u32>,
    ) -> Result<NetworkBinding, Error> {
        let id = docker_id("network ID", docker_net)?;
        let binding = |n: &model::Network| NetworkBinding {
            docker_id: docker_net.to_string(),
            network_id: n.id.clone(),
            network_name: n.name.clone(),
            created_by_docker: true,
        };
        // Docker repeating a CreateNetwork that was applied: nothing more to do.
        if let Some(n) = self.network_by_id(&id).await? {
            return Ok(binding(&n.network));
        }
        let name = name.unwrap_or_else(|| format!("docker-{}", id.short()));
        match self
            .cluster
            .create_network_with_id(create_request(&name, subnet, gateway, mtu), None, Some(id))
            .await
        {
            Ok(w) => Ok(binding(&w.value)),
            Err(Error::NetworkNameInUse(_)) => Err(Error::conflict(format!(
                "vxnet network {name} already exists: in global scope the plugin makes the vxnet \
                 network itself; pick another -o {OPT_NETWORK}, or run the daemons with \
                 --docker-scope local to bind Docker networks to existing vxnet networks"
            ))),
            Err(e) => Err(e),
        }
    }

    async fn bind_local(
        &self,
        docker_net: &str,
        name: Option<String>,
        subnet: Ipv4Net,
        gateway: Option<Ipv4Addr>,
        mtu: Option<u32>,
    ) -> Result<NetworkBinding, Error> {
        // Two hosts may create the same vxnet network at once: the loser finds the winner's.
        for _ in 0..3 {
            let existing = match &name {
                Some(n) => self.find_network(|s| &s.network.name == n).await?,
                None => self.find_network(|s| s.network.subnet == subnet).await?,
            };
            if let Some(s) = existing {
                let n = &s.network;
                if n.subnet != subnet {
                    return Err(Error::conflict(format!(
                        "vxnet network {} has subnet {}, not {subnet}: use --subnet {}",
                        n.name, n.subnet, n.subnet
                    )));
                }
                if gateway.is_some_and(|g| g != n.gateway) {
                    return Err(Error::conflict(format!(
                        "vxnet network {} has gateway {}: use --gateway {} or leave it out",
                        n.name, n.gateway, n.gateway
                    )));
                }
                return Ok(NetworkBinding {
                    docker_id: docker_net.to_string(),
                    network_id: n.id.clone(),
                    network_name: n.name.clone(),
                    created_by_docker: false,
                });
            }
            let name = name
                .clone()
                .unwrap_or_else(|| format!("docker-{}", short(docker_net)));
            let req = create_request(&name, subnet, gateway, mtu);
            match self.cluster.create_network(req, None).await {
                Ok(w) => {
                    return Ok(NetworkBinding {
                        docker_id: docker_net.to_string(),
                        network_id: w.value.id.clone(),
                        network_name: w.value.name,
                        created_by_docker: true,
                    })
                }
                Err(Error::NetworkNameInUse(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Contention(format!(
            "binding Docker network {}",
            short(docker_net)
        )))
    }

    pub async fn delete_network(&self, req: NetworkRequest) -> Result<Empty, Error> {
        let docker_net = req.network_id;
        let binding = self.state.networks.get(&docker_net);
        // Global scope: the vxnet network goes with the Docker network (Docker sends this
        // only to the host that ran `docker network rm`, maybe not the creating one). Local
        // scope: other hosts may still use it; `vxnet network rm` removes it.
        if self.scope == Scope::Global {
            let id = binding
                .as_ref()
                .filter(|b| b.created_by_docker)
                .map(|b| b.network_id.clone())
                .or_else(|| Id::from_str(&docker_net).ok());
            if let Some(id) = id {
                match self.cluster.remove_network(id.as_str()).await {
                    Ok(_) | Err(Error::NetworkNotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.state
            .networks
            .remove(&docker_net)
            .map_err(io_error("network binding"))?;
        Ok(Empty {})
    }

    pub async fn create_endpoint(
        &self,
        req: CreateEndpointRequest,
    ) -> Result<CreateEndpointResponse, Error> {
        let id = docker_id("endpoint ID", &req.endpoint_id)?;
        let iface = req.interface.unwrap_or_default();
        if !iface.address_ipv6.is_empty() {
            return Err(Error::invalid("vxnet networks are IPv4 only"));
        }
        if iface.address.is_empty() {
            return Err(Error::invalid(
                "the endpoint has no IPv4 address: the network needs an IPAM driver (--ipam-driver vxnet)",
            ));
        }
        let address = parse_cidr("address", &iface.address)?;
        let stored = self.network_for(&req.network_id).await?;
        let net = &stored.network;
        if !net.subnet.contains(&address.addr()) || address.prefix_len() != net.subnet.prefix_len()
        {
            return Err(Error::invalid(format!(
                "address {address} is not in network {}'s subnet {}",
                net.name, net.subnet
            )));
        }
        let ip = address.addr();
        let mac = match iface.mac_address.as_str() {
            "" => Mac::from_ipv4(ip),
            m => Mac::from_str(m).map_err(Error::invalid)?,
        };
        if let Some(rec) = self.state.endpoints.get(id.as_str()) {
            if rec.endpoint.ip == ip {
                return Ok(CreateEndpointResponse::default());
            }
            return Err(Error::conflict(format!(
                "endpoint {} already exists with address {}",
                id.short(),
                rec.endpoint.ip
            )));
        }
        let reservation_key = Reservation::key(&net.id, ip);
        let endpoint = match self.state.reservations.get(&reservation_key) {
            Some(r) => {
                let endpoint = Endpoint {
                    id: id.clone(),
                    network_id: net.id.clone(),
                    name: id.short().to_string(),
                    node_id: self.cluster.node_id().clone(),
                    ip,
                    mac,
                    created: model::now_rfc3339(),
                    aliases: Vec::new(),
                };
                let w = self
                    .cluster
                    .adopt_reservation(&stored, &r.reservation, &endpoint)
                    .await?;
                self.state
                    .reservations
                    .remove(&reservation_key)
                    .map_err(io_error("address reservation"))?;
                w.value
            }
            // Docker's own IPAM (global scope) chose the address: claim it now.
            None => {
                let req = EndpointCreate {
                    name: None,
                    ip: Some(ip),
                    aliases: Vec::new(),
                };
                self.cluster
                    .create_endpoint_as(&stored, req, None, Some((id.clone(), mac)))
                    .await?
                    .value
            }
        };
        let record = EndpointRecord {
            sandbox_ifname: format!("veth{}", id.prefix(7)),
            runtime_ifname: format!("vxd{}", id.prefix(10)),
            joined: false,
            endpoint,
            sandbox_key: None,
        };
        if let Err(e) = self.state.endpoints.put(id.as_str(), record) {
            let _ = self.cluster.delete_endpoint(&net.id, &id).await;
            return Err(io_error("endpoint")(e));
        }
        tracing::info!(endpoint = id.short(), network = %net.name, %ip, "Docker endpoint created");
        Ok(CreateEndpointResponse::default())
    }

    fn record(&self, endpoint: &str) -> Result<EndpointRecord, Error> {
        self.state.endpoints.get(endpoint).ok_or_else(|| {
            Error::EndpointNotFound(format!(
                "{} (not created through this host's plugin)",
                short(endpoint)
            ))
        })
    }

    pub async fn join(&self, req: JoinRequest) -> Result<JoinResponse, Error> {
        self.settle_leave(&req.endpoint_id).await;
        let mut rec = self.record(&req.endpoint_id)?;
        let stored = self
            .network_by_id(&rec.endpoint.network_id)
            .await?
            .ok_or_else(|| Error::NetworkNotFound(rec.endpoint.network_id.short().to_string()))?;
        let net = &stored.network;
        let spec = HandoffSpec {
            sandbox_ifname: rec.sandbox_ifname.clone(),
            runtime_ifname: rec.runtime_ifname.clone(),
            mac: rec.endpoint.mac,
            mtu: self.reconciler.mtu_for(net).await?,
        };
        self.reconciler
            .attach_handoff(&self.runtime_ns, net, &spec)
            .await?;
        rec.joined = true;
        let sandbox_key = (!req.sandbox_key.is_empty()).then(|| req.sandbox_key.clone());
        // One route per container: a second interface with the same /32 would make
        // Docker's route add fail with "file exists" and the join with it.
        let routed_already = sandbox_key.is_some()
            && self.state.endpoints.list().iter().any(|r| {
                r.joined && r.sandbox_key == sandbox_key && r.endpoint.id != rec.endpoint.id
            });
        rec.sandbox_key = sandbox_key;
        let static_routes = match self.reconciler.dns() {
            Some(_) if !routed_already => vec![StaticRoute {
                destination: format!("{}/32", crate::dns::LISTEN_ADDR),
                route_type: StaticRoute::CONNECTED,
            }],
            _ => Vec::new(),
        };
        let src_name = rec.runtime_ifname.clone();
        if let Err(e) = self.state.endpoints.put(&req.endpoint_id, rec) {
            let _ = self
                .reconciler
                .detach_handoff(&net.id, &spec.sandbox_ifname)
                .await;
            return Err(io_error("endpoint")(e));
        }
        Ok(JoinResponse {
            interface_name: InterfaceName {
                src_name,
                dst_prefix: "eth",
            },
            // No gateway of ours: Docker then gives the container its docker_gwbridge
            // interface and default route, as with its own overlay (the seed's eth1).
            disable_gateway_service: net.internal,
            static_routes,
        })
    }

    pub async fn leave(&self, req: EndpointRequest) -> Result<Empty, Error> {
        let mut rec = self.record(&req.endpoint_id)?;
        let (net, port) = (rec.endpoint.network_id.clone(), rec.sandbox_ifname.clone());
        rec.joined = false;
        self.state
            .endpoints
            .put(&req.endpoint_id, rec)
            .map_err(io_error("endpoint"))?;
        // Removed in the background (see `leaving`); a failure is retried by DeleteEndpoint.
        let reconciler = self.reconciler.clone();
        let removal = tokio::spawn(async move {
            if let Err(e) = reconciler.detach_handoff(&net, &port).await {
                tracing::warn!(port, error = %e, "cannot remove a left endpoint's port yet; DeleteEndpoint retries");
            }
        });
        let mut leaving = lock(&self.leaving);
        leaving.retain(|_, task| !task.is_finished());
        leaving.insert(req.endpoint_id, removal);
        Ok(Empty {})
    }

    pub async fn delete_endpoint(&self, req: EndpointRequest) -> Result<Empty, Error> {
        self.settle_leave(&req.endpoint_id).await;
        // Unknown: already deleted (Docker retrying), nothing to do.
        let Some(rec) = self.state.endpoints.get(&req.endpoint_id) else {
            return Ok(Empty {});
        };
        let ep = &rec.endpoint;
        self.reconciler
            .detach_handoff(&ep.network_id, &rec.sandbox_ifname)
            .await?;
        match self.cluster.delete_endpoint(&ep.network_id, &ep.id).await {
            Ok(_) | Err(Error::EndpointNotFound(_)) => {}
            Err(e) => return Err(e),
        }
        self.state
            .endpoints
            .remove(&req.endpoint_id)
            .map_err(io_error("endpoint"))?;
        tracing::info!(endpoint = ep.id.short(), ip = %ep.ip, "Docker endpoint deleted");
        Ok(Empty {})
    }

    pub fn endpoint_info(&self, req: EndpointRequest) -> OperInfoResponse {
        let mut value = BTreeMap::new();
        if let Some(rec) = self.state.endpoints.get(&req.endpoint_id) {
            value.insert(
                "vxnet.network_id".into(),
                rec.endpoint.network_id.to_string(),
            );
            value.insert("vxnet.ip".into(), rec.endpoint.ip.to_string());
            value.insert("vxnet.sandbox_port".into(), rec.sandbox_ifname);
        }
        OperInfoResponse { value }
    }

    // ---- IpamDriver ---------------------------------------------------------------------

    pub async fn request_pool(
        &self,
        req: RequestPoolRequest,
    ) -> Result<RequestPoolResponse, Error> {
        if req.v6 {
            return Err(Error::invalid("vxnet's IPAM is IPv4 only"));
        }
        if !req.sub_pool.is_empty() {
            return Err(Error::invalid(
                "--ip-range is not supported by vxnet's IPAM driver: give the range to the vxnet \
                 network instead (`vxnet network create --ip-range`)",
            ));
        }
        for key in req.options.keys().filter(|k| k.starts_with("vxnet.")) {
            if key != OPT_NETWORK {
                return Err(Error::invalid(format!(
                    "unknown IPAM option {key:?}: vxnet's IPAM takes --ipam-opt {OPT_NETWORK}=NAME"
                )));
            }
        }
        let named = match req.options.get(OPT_NETWORK) {
            Some(name) => Some(
                self.find_network(|s| &s.network.name == name)
                    .await?
                    .ok_or_else(|| Error::NetworkNotFound(name.clone()))?,
            ),
            None => None,
        };
        let subnet = match (req.pool.as_str(), &named) {
            ("", Some(n)) => n.network.subnet,
            ("", None) => {
                let used: Vec<Ipv4Net> = self
                    .view
                    .with(|v| v.networks.values().map(|n| n.network.subnet).collect());
                ipam::first_free_subnet(used.iter().copied()).ok_or_else(|| {
                    Error::conflict("no free /24 left in 10.0.0.0/8: give --subnet")
                })?
            }
            (pool, _) => {
                let p = parse_cidr("subnet", pool)?;
                Ipv4Net::new(p.network(), p.prefix_len())
                    .map_err(|e| Error::invalid(e.to_string()))?
            }
        };
        if let Some(n) = &named {
            if n.network.subnet != subnet {
                return Err(Error::conflict(format!(
                    "vxnet network {} has subnet {}, not {subnet}",
                    n.network.name, n.network.subnet
                )));
            }
        }
        ipam::validate_subnet(subnet)?;
        // A different network's overlapping subnet fails now rather than at CreateNetwork.
        if let Some(o) = self.view.with(|v| {
            v.networks
                .values()
                .find(|n| n.network.subnet != subnet && ipam::overlaps(n.network.subnet, subnet))
                .map(|n| (n.network.name.clone(), n.network.subnet))
        }) {
            return Err(Error::SubnetOverlap {
                subnet,
                other: o.0,
                other_subnet: o.1,
            });
        }
        Ok(RequestPoolResponse {
            pool_id: pool_id(subnet),
            pool: subnet.to_string(),
            data: BTreeMap::new(),
        })
    }

    /// The network whose subnet a pool is.
    async fn network_of_pool(&self, pool: Ipv4Net) -> Result<Option<StoredNetwork>, Error> {
        self.find_network(|s| s.network.subnet == pool).await
    }

    pub async fn request_address(
        &self,
        req: RequestAddressRequest,
    ) -> Result<RequestAddressResponse, Error> {
        let pool = parse_pool_id(&req.pool_id)?;
        let requested = match req.address.as_str() {
            "" => None,
            a => Some(
                Ipv4Addr::from_str(a)
                    .or_else(|_| parse_cidr("address", a).map(|n| n.addr()))
                    .map_err(|_| Error::invalid(format!("address {a:?} is not an IPv4 address")))?,
            ),
        };
        if let Some(ip) = requested {
            if !pool.contains(&ip) {
                return Err(Error::invalid(format!("address {ip} is not in {pool}")));
            }
        }
        let cidr = |ip: Ipv4Addr| format!("{ip}/{}", pool.prefix_len());
        let network = self.network_of_pool(pool).await?;
        let gateway_request =
            req.options.get(OPT_ADDRESS_TYPE).map(String::as_str) == Some(ADDRESS_TYPE_GATEWAY);
        if gateway_request {
            // The gateway is br0's address in every host's sandbox: never claimed.
            let gw = match (&network, requested) {
                (Some(n), Some(ip)) if ip != n.network.gateway => {
                    return Err(Error::conflict(format!(
                        "vxnet network {} has gateway {}: use --gateway {} or leave it out",
                        n.network.name, n.network.gateway, n.network.gateway
                    )))
                }
                (Some(n), _) => n.network.gateway,
                (None, Some(ip)) => ip,
                (None, None) => Ipv4Addr::from(u32::from(pool.network()) + 1),
            };
            return Ok(RequestAddressResponse {
                address: cidr(gw),
                data: BTreeMap::new(),
            });
        }
        let stored = network.ok_or_else(|| {
            Error::NetworkNotFound(format!(
                "with subnet {pool} (create the Docker network with -d vxnet first)"
            ))
        })?;
        let net_id = stored.network.id.clone();
        let mut known = self
            .view
            .with(|v| (v.revision > 0).then(|| v.known_addresses(&net_id)));
        // This host's own reservations are not endpoints yet, so the view does not show them.
        if let Some(k) = known.as_mut() {
            k.taken.extend(
                self.state
                    .reservations
                    .list()
                    .iter()
                    .filter(|r| r.network_id == net_id)
                    .map(|r| r.ip),
            );
        }
        let (ip, reservation) = self
            .cluster
            .reserve_address(&stored, requested, known)
            .await?;
        let record = Reservation {
            network_id: net_id.clone(),
            ip,
            reservation: reservation.clone(),
        };
        if let Err(e) = self
            .state
            .reservations
            .put(&Reservation::key(&net_id, ip), record)
        {
            let _ = self
                .cluster
                .release_reservation(&net_id, ip, &reservation)
                .await;
            return Err(io_error("address reservation")(e));
        }
        Ok(RequestAddressResponse {
            address: cidr(ip),
            data: BTreeMap::new(),
        })
    }

    pub async fn release_address(&self, req: ReleaseAddressRequest) -> Result<Empty, Error> {
        let pool = parse_pool_id(&req.pool_id)?;
        let ip = Ipv4Addr::from_str(&req.address)
            .or_else(|_| parse_cidr("address", &req.address).map(|n| n.addr()))
            .map_err(|_| {
                Error::invalid(format!("address {:?} is not an IPv4 address", req.address))
            })?;
        let Some(stored) = self.network_of_pool(pool).await? else {
            return Ok(Empty {});
        };
        let key = Reservation::key(&stored.network.id, ip);
        // An address an endpoint adopted was released with the endpoint (DeleteEndpoint).
        if let Some(r) = self.state.reservations.get(&key) {
            self.cluster
                .release_reservation(&r.network_id, ip, &r.reservation)
                .await?;
            self.state
                .reservations
                .remove(&key)
                .map_err(io_error("address reservation"))?;
        }
        Ok(Empty {})
    }

    // ---- Restarts and lease expiry ------------------------------------------------------

    /// The vxnet endpoints Docker containers on this host own (a restarted daemon must not
    /// release them as orphans).
    pub fn owned_endpoints(state: &PluginState) -> HashSet<EndpointId> {
        state
            .endpoints
            .list()
            .into_iter()
            .map(|r| r.endpoint.id)
            .collect()
    }

    /// Claims every Docker endpoint of this host again under the node's current lease (after
    /// the lease expired). An address another host took meanwhile is not fought over: the
    /// endpoint's port is removed and the loss logged (Docker still lists the container;
    /// `docker network disconnect`/`connect` gives it a new address).
    pub async fn reclaim_all(&self) {
        for rec in self.state.endpoints.list() {
            let ep = &rec.endpoint;
            let outcome = match self.network_by_id(&ep.network_id).await {
                Ok(Some(stored)) => self.cluster.reclaim_endpoint(&stored, ep).await,
                Ok(None) => Ok(cluster::Reclaim::NetworkGone),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(cluster::Reclaim::Claimed) => {
                    tracing::info!(endpoint = ep.id.short(), ip = %ep.ip, "Docker endpoint's address claimed again")
                }
                Ok(cluster::Reclaim::AlreadyHeld) => {}
                Ok(lost) => {
                    tracing::warn!(endpoint = ep.id.short(), ip = %ep.ip, ?lost,
                        "Docker endpoint lost its address while this host was away; its interface was removed");
                    if let Err(e) = self
                        .reconciler
                        .detach_handoff(&ep.network_id, &rec.sandbox_ifname)
                        .await
                    {
                        tracing::warn!(endpoint = ep.id.short(), error = %e, "cannot remove the lost interface");
                    }
                }
                Err(e) => {
                    tracing::warn!(endpoint = ep.id.short(), error = %e, "cannot claim the address again; will retry")
                }
            }
        }
    }
}
