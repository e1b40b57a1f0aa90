//! The per-host agent: wires the store, the membership, the watch-fed view and the API
//! together, and runs until SIGINT/SIGTERM.
//!
//! A clean stop leaves the node's lease to run out rather than revoking it: containers keep
//! running while the daemon is away, and a daemon back within the TTL picks the lease up again.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;

use crate::api::server::{router, ApiState};
use crate::cluster::Cluster;
use crate::container::ContainerService;
use crate::docker::{DockerPlugin, PluginState};
use crate::model::{self, Node};
use crate::node::{load_or_create_node_id, spawn_membership};
use crate::reconcile::{GatewayConfig, LocalHost, Reconciler};
use crate::registry::Registry;
use crate::store::etcd::{parse_store_opts, EtcdConfig, EtcdStore};
use crate::store::{Keys, Store, StoreError};
use crate::view::spawn_watcher;

/// How long readiness waits for the node's registration before it is announced anyway.
const READY_WITHOUT_STORE: Duration = Duration::from_secs(30);

/// Everything `vxnet daemon` is configured with.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub cluster_store: String,
    pub advertise_addr: IpAddr,
    pub advertise_port: Option<u16>,
    pub node_name: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub socket: PathBuf,
    pub store_prefix: String,
    pub lease_ttl: Duration,
    pub etcd_user: Option<(String, String)>,
    /// `--cluster-store-opt KEY=VALUE` (Docker's): `kv.cacertfile`, `kv.certfile`, `kv.keyfile`.
    pub store_opts: Vec<String>,
    /// The gateway bridge's subnet (eth1 of every non-internal container).
    pub gateway_subnet: ipnet::Ipv4Net,
    /// The group that may use the API socket besides root (mode 0660, owner root).
    pub socket_group: Option<String>,
    /// Serve Docker's network and IPAM plugin protocols (`--docker-plugin`).
    pub docker_plugin: Option<crate::docker::PluginConfig>,
    /// Container namespaces kept ready ahead of creates (`--netns-pool`; 0: none).
    pub netns_pool: usize,
    /// Serve names, forwarding the rest to the resolvers in this resolv.conf (`--dns`).
    pub dns: Option<PathBuf>,
    /// Serve Prometheus metrics on `GET /metrics` here (`--metrics-addr`; off by default).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another vxnet daemon already uses state directory {0}: give each daemon its own --state-dir")]
    StateDirLocked(PathBuf),
    #[error("socket {0} is in use by a running daemon: give each daemon its own --socket")]
    SocketInUse(PathBuf),
    #[error("invalid --cluster-advertise {0:?}: use IP or IP:PORT (an address of this host)")]
    InvalidAdvertise(String),
    #[error("group {0:?} does not exist: create it or drop --socket-group")]
    UnknownGroup(String),
    #[error("--lease-ttl must be between 2 s and 3600 s, not {0:?}")]
    InvalidTtl(Duration),
    #[error("cannot serve metrics on --metrics-addr {addr}: {source}; give a free port on an address of this host")]
    MetricsAddr {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Parses `IP` or `IP:PORT` (IPv6 as `[::1]:PORT`).
pub fn parse_advertise(s: &str) -> Result<(IpAddr, Option<u16>), DaemonError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    Err(DaemonError::InvalidAdvertise(s.to_string()))
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(
    config: DaemonConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    if config.lease_ttl < Duration::from_secs(2) || config.lease_ttl > Duration::from_secs(3600) {
        return Err(DaemonError::InvalidTtl(config.lease_ttl));
    }
    for dir in [&config.state_dir, &config.run_dir] {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    // The state dir holds the node ID, the lease and container records: root's only, and
    // tightened if an older run or an operator left it looser.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(&config.state_dir))?;
    }
    let lock_path = config.state_dir.join("daemon.lock");
    let lock_file = std::fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| DaemonError::StateDirLocked(config.state_dir.clone()))?;

    let mut etcd = EtcdConfig::from_cluster_store(&config.cluster_store)?;
    let store_endpoints = store_addresses(&etcd.endpoints);
    etcd.user = config.etcd_user.clone();
    etcd.tls = parse_store_opts(&config.store_opts)?;
    let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(etcd).await?);
    let keys = Keys::new(&config.store_prefix);
    let node_id = load_or_create_node_id(&config.state_dir).map_err(io_err(&config.state_dir))?;
    let node = Node {
        id: node_id.clone(),
        name: config.node_name.clone(),
        advertise_addr: config.advertise_addr,
        advertise_port: config.advertise_port,
        started: model::now_rfc3339(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };

    let listener = bind_socket(&config.socket, config.socket_group.as_deref()).await?;
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some((
            crate::metrics::serve::bind(addr)
                .await
                .map_err(|source| DaemonError::MetricsAddr { addr, source })?,
            addr,
        )),
        None => None,
    };
    let membership = spawn_membership(
        store.clone(),
        keys.clone(),
        node.clone(),
        config.lease_ttl,
        config.state_dir.clone(),
    );
    let events = Arc::new(crate::events::EventHub::new());
    let view = spawn_watcher(store.clone(), keys.clone(), events.clone());
    let cluster = Arc::new(Cluster::new(
        store.clone(),
        keys,
        node_id.clone(),
        membership.clone(),
    ));
    let (connection, host_netlink, _) =
        rtnetlink::new_connection().map_err(io_err(Path::new("netlink")))?;
    tokio::spawn(connection);
    let containers_dir = config.state_dir.join("containers");
    let registry = Arc::new(Registry::load(&containers_dir).map_err(io_err(&containers_dir))?);
    // Loaded even with the plugin off: ports made for Docker containers in an earlier run
    // must not be swept as strays.
    let plugin_dir = config.state_dir.join("docker");
    let plugin_state = Arc::new(PluginState::load(&plugin_dir).map_err(io_err(&plugin_dir))?);
    let dns = config.dns.as_ref().map(|resolv_conf| {
        let dns = crate::dns::DnsServer::new(view.clone(), node_id.clone(), resolv_conf.clone());
        dns.add_scope(registry.clone());
        dns.add_scope(plugin_state.clone());
        dns
    });
    let mut reconciler = Reconciler::new(
        host_netlink,
        LocalHost {
            run_dir: config.run_dir.clone(),
            advertise: config.advertise_addr,
            node_id,
            gateway: GatewayConfig {
                bridge: GatewayConfig::DEFAULT_BRIDGE.to_string(),
                subnet: config.gateway_subnet,
            },
        },
        view.clone(),
        registry.clone(),
        Arc::new(crate::firewall::Nftables),
    )
    .with_plugin_ports(plugin_state.clone())
    .with_store_endpoints(store_endpoints)
    .with_host_services(config.metrics_addr.map(|a| a.port()).into_iter().collect());
    if let Some(dns) = dns {
        reconciler = reconciler.with_dns(dns);
    }
    let reconciler = Arc::new(reconciler);
    let containers = ContainerService::new(
        cluster.clone(),
        view.clone(),
        reconciler.clone(),
        registry,
        config.run_dir.clone(),
        config.netns_pool,
    );
    let (plugin, plugin_server) = match &config.docker_plugin {
        Some(pc) => {
            let plugin = Arc::new(
                DockerPlugin::new(
                    pc.scope,
                    cluster.clone(),
                    view.clone(),
                    reconciler.clone(),
                    plugin_state.clone(),
                )
                .map_err(io_err(Path::new("/proc/self/ns/net")))?,
            );
            let listener = bind_socket(&pc.socket, None).await?;
            tracing::info!(socket = %pc.socket.display(), scope = %pc.scope,
                "serving Docker's network and IPAM plugin protocols");
            if reconciler.dns().is_some() {
                let names = crate::docker::names::NameWatcher::new(
                    pc.engine.clone(),
                    cluster.clone(),
                    plugin_state.clone(),
                );
                tokio::spawn(names.run());
            }
            let app = crate::docker::server::router(plugin.clone());
            let server = tokio::spawn(async move { axum::serve(listener, app).await });
            (Some(plugin), Some(server))
        }
        None => (None, None),
    };
    let health = crate::health::spawn_publisher(crate::health::Sources {
        store: store.clone(),
        keys: Keys::new(&config.store_prefix),
        node: node.clone(),
        membership: membership.clone(),
        view: view.clone(),
        reconciler: reconciler.clone(),
    });
    let change_clock = health.clock.clone();
    tokio::spawn(reconciler.clone().run());
    tokio::spawn(reconciler.clone().follow_members());
    tokio::spawn(start_up_resync(
        view.clone(),
        containers.clone(),
        reconciler.clone(),
        membership.clone(),
        plugin_state.clone(),
        plugin.clone(),
    ));
    let metrics_server = metrics_listener.map(|(listener, addr)| {
        let registry = crate::metrics::registry(crate::metrics::collect::DaemonCollector {
            node_id: node.id.clone(),
            view: view.clone(),
            reconciler: reconciler.clone(),
            membership: membership.clone(),
            docker_plugin: plugin.clone(),
        });
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
        crate::metrics::serve::spawn(listener, registry)
    });
    let firewall_owner = reconciler.clone();
    let membership_for_ready = membership.clone();
    let stop_events = events.clone();
    let pool_owner = containers.clone();
    let app = router(Arc::new(ApiState {
        cluster,
        containers,
        reconciler,
        view,
        membership,
        node: node.clone(),
        docker_plugin: plugin,
        change_clock,
        events,
    }));
    // Ready for systemd (Type=notify) once this node is registered: engines ordered after
    // vxnet then find their plugin, and the API answers with the cluster in view. With the
    // store out of reach at boot, ready anyway after READY_WITHOUT_STORE (the daemon serves
    // and keeps retrying, and this host's containers keep their networking): otherwise
    // systemd would fail the unit at its start timeout and hold Docker back until then.
    let mut registered = membership_for_ready.registered();
    let ready_name = node.name.clone();
    let ready_membership = membership_for_ready.clone();
    tokio::spawn(async move {
        use crate::systemd::{notify, Notice};
        notify(&[Notice::Status("registering in the cluster store")]);
        let in_time = tokio::time::timeout(READY_WITHOUT_STORE, registered.wait_for(|r| *r)).await;
        match in_time {
            Ok(Ok(_)) => notify(&[
                Notice::Ready,
                Notice::Status(&format!("serving as node {ready_name}")),
            ]),
            Ok(Err(_)) => {}
            Err(_) => {
                let why = ready_membership
                    .store_error()
                    .unwrap_or_else(|| "no answer yet".into());
                tracing::warn!(error = %why, "not registered in the cluster store yet; telling systemd the daemon is ready anyway (it serves and keeps retrying)");
                notify(&[
                    Notice::Ready,
                    Notice::Status(&format!("serving, not registered yet: {why}")),
                ]);
            }
        }
    });
    tracing::info!(
        socket = %config.socket.display(),
        store = %store.describe(),
        advertise = %config.advertise_addr,
        "vxnet daemon serving"
    );
    // Event streams end first, or the graceful shutdown would wait on their readers.
    let shutdown = async move {
        shutdown.await;
        stop_events.close();
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(&config.socket);
    if let Some(server) = metrics_server {
        server.abort();
    }
    if let (Some(server), Some(pc)) = (plugin_server, &config.docker_plugin) {
        server.abort();
        let _ = std::fs::remove_file(&pc.socket);
    }
    pool_owner.drain_namespace_pool();
    health.publish_stopped().await;
    // A clean stop leaves no rule of ours behind (a restart programs them again).
    if let Err(e) = firewall_owner.remove_firewall().await {
        tracing::warn!(error = %e, "cannot remove vxnet's nftables table");
    }
    served.map_err(io_err(&config.socket))?;
    tracing::info!("vxnet daemon stopped");
    Ok(())
}

/// The store members the firewall keeps containers away from. Only IP literals: resolving a
/// name here would pin whatever it resolved to at start-up, so a name is skipped (logged).
fn store_addresses(endpoints: &[String]) -> Vec<std::net::SocketAddrV4> {
    let mut out = Vec::new();
    for e in endpoints {
        match e.parse::<std::net::SocketAddr>() {
            Ok(std::net::SocketAddr::V4(a)) => out.push(a),
            _ => tracing::warn!(member = %e,
                "cluster store member is not an IPv4 literal: the firewall cannot keep \
                 containers away from it (give --cluster-store as IP:PORT to protect it)"),
        }
    }
    out
}

/// Once the view has been listed: pick up the containers of a previous run, then make the
/// kernel match (sandboxes, interfaces, peers) — the same code path as any later resync.
async fn start_up_resync(
    view: crate::view::SharedView,
    containers: Arc<ContainerService>,
    reconciler: Arc<Reconciler>,
    membership: Arc<crate::node::Membership>,
    plugin_state: Arc<PluginState>,
    plugin: Option<Arc<DockerPlugin>>,
) {
    while !view.wait_for(1, Duration::from_secs(3600)).await {}
    containers
        .recover(&DockerPlugin::owned_endpoints(&plugin_state))
        .await;
    containers.watch_cni_namespaces();
    // From now on, every new lease (the first, and any after an expiry) re-claims this host's
    // endpoints under it.
    let mut leases = membership.leases();
    let reclaimer = containers.clone();
    tokio::spawn(async move {
        loop {
            if leases.borrow_and_update().is_some() {
                reclaimer.reclaim_all().await;
                if let Some(plugin) = &plugin {
                    plugin.reclaim_all().await;
                }
            }
            if leases.changed().await.is_err() {
                return;
            }
        }
    });
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match reconciler.resync().await {
            Ok(report) => {
                // A network that failed is retried on its own by the reconciler.
                for n in report.failed() {
                    tracing::warn!(network = %n.network, error = ?n.error,
                        "network not reconciled at start-up; retrying it alone");
                }
                tracing::info!(?report, "kernel state reconciled");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "start-up resync of the gateway bridge or firewall failed; retrying");
                backoff.wait().await;
            }
        }
    }
}

/// Binds the API socket, root-only (0660). A stale socket file from a crashed daemon is
/// replaced; a live one is an error.
async fn bind_socket(path: &Path, group: Option<&str>) -> Result<UnixListener, DaemonError> {
    // Resolve the group first: a typo must stop the daemon before it takes the socket.
    let gid = match group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| DaemonError::UnknownGroup(name.to_string()))?
                .gid,
        ),
        None => None,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    // A stale socket of a crashed daemon is replaced by the rename below; a live one is not.
    if path.exists() && tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(DaemonError::SocketInUse(path.to_path_buf()));
    }
    // Bound under a temporary name and renamed into place once its mode and group are set:
    // the final path never exists with the umask's looser mode, not even briefly.
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    let listener = UnixListener::bind(&tmp).map_err(io_err(&tmp))?;
    let placed = (|| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
            .map_err(io_err(&tmp))?;
        if let Some(gid) = gid {
            nix::unistd::chown(&tmp, Some(nix::unistd::Uid::from_raw(0)), Some(gid)).map_err(
                |e| DaemonError::Io {
                    path: tmp.clone(),
                    source: std::io::Error::from_raw_os_error(e as i32),
                },
            )?;
        }
        std::fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}
