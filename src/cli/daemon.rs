//! `vxnet daemon`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::daemon::{parse_advertise, DaemonConfig};
use crate::store::keys::DEFAULT_PREFIX;

#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Where the cluster store is: etcd://HOST:PORT[,HOST:PORT…]
    #[arg(long, env = "VXNET_CLUSTER_STORE")]
    cluster_store: String,
    /// How peers reach this host: IP[:PORT] of its underlay interface (the VXLAN endpoint).
    #[arg(long, env = "VXNET_CLUSTER_ADVERTISE")]
    cluster_advertise: String,
    /// This host's name in the cluster (default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// Persistent state (node ID, lease).
    #[arg(long, default_value = "/var/lib/vxnet")]
    state_dir: PathBuf,
    /// Runtime state (namespaces, pid files).
    #[arg(long, default_value = "/run/vxnet")]
    run_dir: PathBuf,
    /// The API socket.
    #[arg(long, default_value = crate::api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Key prefix in the cluster store (several clusters can share one etcd).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    store_prefix: String,
    /// Seconds without a keep-alive after which this host counts as dead.
    #[arg(long, default_value_t = 15)]
    lease_ttl: u64,
    /// etcd credentials as USER:PASSWORD (when etcd's auth is on).
    #[arg(long, env = "VXNET_ETCD_USER", hide_env_values = true)]
    etcd_user: Option<String>,
    /// Store option KEY=VALUE, repeatable: kv.cacertfile=PATH (TLS to etcd, trusting this CA),
    /// kv.certfile=PATH and kv.keyfile=PATH (this host's client certificate).
    #[arg(long = "cluster-store-opt", value_name = "KEY=VALUE")]
    cluster_store_opt: Vec<String>,
    /// Subnet of this host's gateway bridge (containers' eth1, NAT'd); pick one that does not
    /// collide with your networks.
    #[arg(long, default_value = crate::reconcile::GatewayConfig::DEFAULT_SUBNET)]
    gateway_bridge_subnet: ipnet::Ipv4Net,
    /// Let this group use the API socket too (it is root-only, mode 0660, otherwise).
    #[arg(long)]
    socket_group: Option<String>,
    /// Serve Docker's network and IPAM plugin protocols: `docker network create -d vxnet`.
    #[arg(long)]
    docker_plugin: bool,
    /// Where the plugin listens (Docker finds plugins by socket in /run/docker/plugins).
    #[arg(long, default_value = crate::docker::DEFAULT_SOCKET, requires = "docker_plugin")]
    docker_plugin_socket: PathBuf,
    /// The Docker engines' kind: local (no --cluster-store: run `docker network create` on
    /// every host) or global (engines started with --cluster-store: create once).
    #[arg(long, default_value = "local", requires = "docker_plugin")]
    docker_scope: crate::docker::Scope,
    /// The local Docker engine's API, where Docker containers' names and network aliases
    /// are learned for the name server.
    #[arg(
        long,
        default_value = "unix:///var/run/docker.sock",
        requires = "docker_plugin"
    )]
    docker_host: String,
    /// Container network namespaces kept ready ahead of `run` (each saves a create 1-2 ms;
    /// 0 makes every one on demand).
    #[arg(long, default_value_t = crate::container::nspool::DEFAULT_SIZE)]
    netns_pool: usize,
    /// Serve containers' names on 169.254.53.53 in every network (`--dns=false`: off).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    dns: bool,
    /// The resolvers names outside vxnet's networks are forwarded to (re-read on change).
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Serve Prometheus metrics on http://IP:PORT/metrics (off unless given). No
    /// authentication: bind an address only the monitoring system reaches.
    #[arg(long, value_name = "IP:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
}

pub async fn run(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();

    let (advertise_addr, advertise_port) = parse_advertise(&args.cluster_advertise)?;
    let node_name = match args.node_name {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .context("cannot read the hostname: give --node-name")?
            .to_string_lossy()
            .into_owned(),
    };
    let etcd_user = match args.etcd_user {
        Some(s) => {
            let (u, p) = s
                .split_once(':')
                .filter(|(u, _)| !u.is_empty())
                .context("--etcd-user must be USER:PASSWORD")?;
            Some((u.to_string(), p.to_string()))
        }
        None => None,
    };
    let config = DaemonConfig {
        cluster_store: args.cluster_store,
        advertise_addr,
        advertise_port,
        node_name,
        state_dir: args.state_dir,
        run_dir: args.run_dir,
        socket: args.socket,
        store_prefix: args.store_prefix,
        lease_ttl: Duration::from_secs(args.lease_ttl),
        etcd_user,
        store_opts: args.cluster_store_opt,
        gateway_subnet: args.gateway_bridge_subnet,
        socket_group: args.socket_group,
        docker_plugin: args.docker_plugin.then_some(crate::docker::PluginConfig {
            socket: args.docker_plugin_socket,
            scope: args.docker_scope,
            engine: PathBuf::from(
                args.docker_host
                    .strip_prefix("unix://")
                    .unwrap_or(&args.docker_host),
            ),
        }),
        netns_pool: args.netns_pool,
        dns: args.dns.then_some(args.resolv_conf),
        metrics_addr: args.metrics_addr,
    };
    crate::daemon::run(config, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Registers the SIGTERM/SIGINT handlers now, not when the returned future is first polled:
/// the daemon programs the kernel before it starts serving, and a signal in that window
/// must still mean a clean stop (rules removed), not the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = signal(SignalKind::terminate())
        .and_then(|term| signal(SignalKind::interrupt()).map(|int| (term, int)));
    async move {
        let Ok((mut term, mut int)) = handlers else {
            // Without signal handlers the daemon still stops on SIGKILL; keep serving.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
    }
}
