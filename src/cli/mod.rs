//! The `vxnet` command line: parses arguments, talks to the daemon's API, prints like Docker.
//! This is the binary's edge, so errors are `anyhow` here and typed everywhere below.

mod container;
mod daemon;
mod doctor;
mod events;
mod lab;
mod network;
mod node;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::api::client::Client;
use crate::api::DEFAULT_SOCKET;

#[derive(Parser, Debug)]
#[command(
    name = "vxnet",
    version,
    about = "Multi-host container networking over kernel VXLAN, with etcd as the cluster store"
)]
pub struct Cli {
    /// Daemon socket to talk to.
    #[arg(short = 'H', long = "host", env = "VXNET_HOST", global = true,
          default_value = concat!("unix://", "/run/vxnet/vxnet.sock"))]
    host: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum FirewallCommand {
    /// Remove vxnet's `inet vxnet` table from this network namespace now (for instance after
    /// a daemon was killed, or before uninstalling). Works without a daemon; a running daemon
    /// puts the table back with its next change.
    Remove,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the per-host agent (the counterpart of `dockerd --cluster-store …`).
    Daemon(Box<daemon::DaemonArgs>),
    /// Manage networks.
    #[command(subcommand)]
    Network(network::NetworkCommand),
    /// The cluster's hosts and their health.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Run a command in a new container (network + UTS namespace) on a network.
    Run(container::RunArgs),
    /// Run a command inside a running container.
    Exec(container::ExecArgs),
    /// List this host's containers.
    Ps(container::PsArgs),
    /// Stop containers (SIGTERM, then SIGKILL after -t seconds).
    Stop {
        /// Seconds to wait before killing.
        #[arg(short = 't', long = "time", default_value_t = 10)]
        time: u64,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Remove containers.
    Rm {
        /// Stop running containers first (SIGKILL).
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Re-read this host's kernel state and fix whatever differs from the store (what
    /// `vxnet doctor` reports); prints what was done as JSON.
    Reconcile,
    /// Check this host's kernel state against the store, changing nothing: each difference
    /// with what to do. Exit 0: it matches, 1: differences, 2: the check could not run.
    Doctor {
        /// Output format: `json` for scripts.
        #[arg(long)]
        format: Option<String>,
    },
    /// vxnet's nftables table on this host.
    #[command(subcommand)]
    Firewall(FirewallCommand),
    /// Internal: the first program of a `vxnet run` container. Waits until `run` has
    /// registered this PID with the daemon, then becomes the user's command.
    #[command(hide = true)]
    ContainerInit(container::InitArgs),
    /// Show this host's daemon, its node and the cluster it sees.
    Info {
        /// Output format: `json` for scripts.
        #[arg(long)]
        format: Option<String>,
    },
    /// Stream the cluster's changes (networks, endpoints, nodes, refused records).
    Events(events::EventsArgs),
    /// The lab: the seed's hosts simulated in network namespaces on this machine.
    #[command(subcommand)]
    Lab(lab::LabCommand),
}

/// Parses the command line, runs it, and turns failures into a message and exit code 1.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Rust starts every program with SIGPIPE ignored. The daemon keeps it so (a client that
    // hangs up must not kill it); every other command gets the default back: `vxnet … | head`
    // ends quietly instead of panicking on a closed stdout, and the command a container
    // runs (exec'd by container-init) does not inherit an ignored SIGPIPE, as under Docker.
    if !matches!(cli.command, Command::Daemon(_)) {
        // SAFETY: no other thread exists yet, and SIG_DFL installs no handler code.
        unsafe {
            let _ = nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            );
        }
    }
    // A lab host's init unshares its mount namespace, which must happen while this process
    // has a single thread: before the runtime exists.
    if let Command::Lab(lab::LabCommand::HostInit(args)) = &cli.command {
        return lab::host_init(args);
    }
    // Becomes the container's command by exec: no runtime, no threads.
    if let Command::ContainerInit(args) = &cli.command {
        return container::container_init(args);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vxnet: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let _ = DEFAULT_SOCKET; // the default above spells the same path
    match cli.command {
        Command::Daemon(args) => daemon::run(*args).await,
        Command::Network(cmd) => network::run(&client(&cli.host)?, cmd).await,
        Command::Node(cmd) => node::run(&client(&cli.host)?, cmd).await,
        Command::Info { format } => info(&client(&cli.host)?, format.as_deref()).await,
        Command::Run(args) => container::run(&client(&cli.host)?, args).await,
        Command::Exec(args) => container::exec(&client(&cli.host)?, args).await,
        Command::Ps(args) => container::ps(&client(&cli.host)?, args).await,
        Command::Stop { time, containers } => {
            container::stop(&client(&cli.host)?, time, &containers).await
        }
        Command::Rm { force, containers } => {
            container::rm(&client(&cli.host)?, force, &containers).await
        }
        Command::ContainerInit(_) => Ok(ExitCode::FAILURE),
        Command::Firewall(FirewallCommand::Remove) => {
            use crate::firewall::Firewall;
            tokio::task::spawn_blocking(|| crate::firewall::Nftables.remove()).await??;
            println!("table inet {} removed", crate::firewall::TABLE);
            Ok(ExitCode::SUCCESS)
        }
        Command::Reconcile => {
            let report = client(&cli.host)?.reconcile().await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            // Every other network was fixed; the failed ones are retried by the daemon.
            let mut failed = false;
            for n in report.failed() {
                failed = true;
                eprintln!(
                    "network {} ({}) not reconciled: {}",
                    n.name.as_deref().unwrap_or("?"),
                    n.network,
                    n.error.as_deref().unwrap_or("")
                );
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Events(args) => events::run(&client(&cli.host)?, args).await,
        Command::Doctor { format } => Ok(doctor::run(&cli.host, format.as_deref()).await),
        Command::Lab(cmd) => lab::run(cmd).await,
    }
}

fn client(host: &str) -> anyhow::Result<Client> {
    Ok(Client::new(host)?)
}

async fn info(client: &Client, format: Option<&str>) -> anyhow::Result<ExitCode> {
    let info = client.info().await?;
    match format {
        Some("json") => println!("{}", serde_json::to_string_pretty(&info)?),
        Some(other) => anyhow::bail!("unknown --format {other:?}: use json"),
        None => {
            println!(
                "Node:            {} ({})",
                info.node.name,
                info.node.id.short()
            );
            println!("Advertise:       {}", info.node.advertise_addr);
            println!("Cluster store:   {}", info.cluster_store);
            println!("Store prefix:    {}", info.store_prefix);
            println!(
                "Registered:      {}",
                if info.registered { "yes" } else { "no" }
            );
            if let Some(e) = &info.store_error {
                println!("Store error:     {e}");
            }
            println!("View revision:   {}", info.view_revision);
            println!("Networks:        {}", info.networks);
            println!("Endpoints:       {}", info.endpoints);
            println!("Nodes:           {}", info.nodes.len());
            for n in &info.nodes {
                println!("  {}  {}  {}", n.id.short(), n.name, n.advertise_addr);
            }
            if !info.network_errors.is_empty() {
                println!("Network errors (each network retried alone):");
                for e in &info.network_errors {
                    println!(
                        "  {}  {} (attempt {}, next in {} ms)",
                        e.network.get(..12).unwrap_or(&e.network),
                        e.error,
                        e.attempts,
                        e.retry_in_ms
                    );
                }
            }
            if let Some(d) = &info.dns {
                println!(
                    "DNS:             {} ({} names; forwarding to {})",
                    d.listen,
                    d.names,
                    if d.upstreams.is_empty() {
                        "nothing: no nameserver in resolv.conf".to_string()
                    } else {
                        d.upstreams.join(", ")
                    }
                );
                println!(
                    "  answered {}, forwarded {}, unknown source {}, rate-limited {}, shed {}",
                    d.answered, d.forwarded, d.unknown_source, d.rate_limited, d.forwards_shed
                );
            }
            println!("Records rejected: {}", info.records_rejected);
            for r in &info.rejected_records {
                println!("  {} ({}): {}", r.key, r.kind, r.reason);
            }
            if !info.docker_plugin_calls.is_empty() {
                println!("Docker plugin calls (count, average, max):");
                for (call, s) in &info.docker_plugin_calls {
                    println!(
                        "  {call:<34} {:>7}  {:>8.2} ms  {:>8.2} ms",
                        s.count,
                        s.total_us as f64 / s.count.max(1) as f64 / 1e3,
                        s.max_us as f64 / 1e3
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `f` for each name, printing the name on success and the error otherwise (Docker's
/// way for multi-argument verbs); exit 1 if any failed.
pub(crate) async fn for_each<F, Fut>(names: &[String], f: F) -> anyhow::Result<ExitCode>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::api::client::ClientError>>,
{
    let mut ok = true;
    for n in names {
        match f(n.clone()).await {
            Ok(()) => println!("{n}"),
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
