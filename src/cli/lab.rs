//! `vxnet lab …`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use ipnet::Ipv4Net;

use crate::lab::host_init::{self, HostInit};
use crate::lab::hosts::{DEFAULT_HOSTS, DEFAULT_NAME, DEFAULT_UNDERLAY};
use crate::lab::{DockerOptions, Lab, LabOptions, TEST_IMAGE};

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Run the seed walk-through end to end in a lab of its own, printing each step; exit 0
    /// only if every step held. The lab is removed at the end.
    Demo {
        /// Lab name (default: demo-<pid>).
        #[arg(long)]
        name: Option<String>,
    },
    /// Start a lab: the seed's VMs as namespaces on one switch; etcd on vm1, a vxnet daemon
    /// on vm2…vmN. Returns once every daemon is registered; the lab runs until `lab down`.
    Up {
        /// Number of hosts (vm1…vmN).
        #[arg(long, default_value_t = DEFAULT_HOSTS)]
        hosts: usize,
        #[command(flatten)]
        name: NameArg,
        /// The hosts' network: vmK gets its (4+K)th address (vm1 .5, vm2 .6, …).
        #[arg(long, default_value_t = DEFAULT_UNDERLAY)]
        underlay: Ipv4Net,
        /// etcd members on vm1 (1, 3 or 5): one cluster, member K on ports 2379+100·K
        /// (clients) and 2380+100·K (peers); the daemons are given every member.
        #[arg(long, default_value_t = 1)]
        etcd_members: usize,
        /// The kind of Docker engine the daemons' plugin serves: local, or global for engines
        /// started with --cluster-store (`vxnet lab docker --cluster-store`).
        #[arg(long, default_value = "local")]
        docker_scope: crate::docker::Scope,
        /// The production setting: etcd over TLS with client certificates and etcd's auth
        /// on (a PKI of the lab's own under its directory, user `vxnet` limited to /vxnet/).
        #[arg(long)]
        secure_store: bool,
    },
    /// Stop a lab's processes and remove its namespaces and files (safe to repeat).
    Down {
        #[command(flatten)]
        name: NameArg,
    },
    /// Show a lab's hosts, addresses and processes; exit 1 if any of them is not running.
    Status {
        #[command(flatten)]
        name: NameArg,
        /// Output format: `json` for scripts.
        #[arg(long)]
        format: Option<String>,
    },
    /// Run a command on a lab host (its network, mount and UTS namespaces), with VXNET_HOST
    /// set to that host's daemon: `vxnet lab exec vm2 -- vxnet network ls`.
    Exec {
        #[command(flatten)]
        name: NameArg,
        /// vm1, vm2, …
        host: String,
        /// The command and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<OsString>,
    },
    /// Start a Docker engine (dockerd) on lab hosts and import the test image (vxnet-bb, a
    /// busybox root filesystem) into each; `vxnet lab exec vm2 -- docker ps` then talks to
    /// vm2's engine. Already running engines are kept. `lab down` stops them.
    Docker {
        #[command(flatten)]
        name: NameArg,
        /// Docker's legacy cluster mode on the lab's etcd (`--cluster-store etcd://VM1:2379
        /// --cluster-advertise HOST:2376`): overlay networks without Swarm.
        #[arg(long)]
        cluster_store: bool,
        /// Hosts to start it on (default: every daemon host, vm2…vmN).
        hosts: Vec<String>,
    },
    /// (internal) The process holding one lab host's namespaces; started by `lab up`.
    #[command(hide = true)]
    HostInit(HostInitArgs),
}

#[derive(Args, Debug)]
pub struct NameArg {
    /// The lab's name (several labs can run at once).
    #[arg(long = "name", default_value = DEFAULT_NAME)]
    name: String,
}

#[derive(Args, Debug)]
pub struct HostInitArgs {
    /// The lab this host belongs to (names the process in `ps`).
    #[arg(long)]
    lab_dir: PathBuf,
    #[arg(long)]
    hostname: String,
    /// INSIDE=SOURCE: bind SOURCE on INSIDE in the host's mount namespace.
    #[arg(long = "private", value_parser = host_init::parse_private)]
    private: Vec<(PathBuf, PathBuf)>,
}

/// `lab host-init`: runs before any thread exists (it unshares the mount namespace).
pub fn host_init(args: &HostInitArgs) -> ExitCode {
    ExitCode::from(host_init::run(&HostInit {
        lab_dir: args.lab_dir.clone(),
        hostname: args.hostname.clone(),
        private_dirs: args.private.clone(),
    }))
}

pub async fn run(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LabCommand::Demo { name } => {
            let ok = crate::lab::demo::run(std::env::current_exe()?, name).await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        LabCommand::Up {
            hosts,
            name,
            underlay,
            etcd_members,
            docker_scope,
            secure_store,
        } => {
            up(
                hosts,
                name.name,
                underlay,
                etcd_members,
                docker_scope,
                secure_store,
            )
            .await
        }
        LabCommand::Down { name } => down(&name.name),
        LabCommand::Status { name, format } => status(&name.name, format.as_deref()),
        LabCommand::Exec {
            name,
            host,
            command,
        } => exec(&name.name, &host, command).await,
        LabCommand::Docker {
            name,
            cluster_store,
            hosts,
        } => docker(&name.name, cluster_store, hosts).await,
        LabCommand::HostInit(_) => {
            anyhow::bail!("`vxnet lab host-init` is started by `vxnet lab up`, not by hand")
        }
    }
}

async fn up(
    hosts: usize,
    name: String,
    underlay: Ipv4Net,
    etcd_members: usize,
    docker_scope: crate::docker::Scope,
    secure_store: bool,
) -> anyhow::Result<ExitCode> {
    let binary = std::env::current_exe().context("cannot find the vxnet binary itself")?;
    let opts = LabOptions {
        hosts,
        etcd_members,
        docker_scope,
        secure_store,
        underlay: underlay.trunc(),
        ..LabOptions::new(&name, binary)
    };
    let started = Instant::now();
    // Ctrl-C while starting: dropping the future removes what was made so far.
    let lab = tokio::select! {
        r = Lab::up(opts) => r?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted: lab {name} was not started (nothing left behind)"),
    };
    println!(
        "lab {} is up in {:.1}s: {} hosts on {} (switch {} in {})",
        lab.name(),
        started.elapsed().as_secs_f64(),
        lab.hosts().len(),
        lab.underlay(),
        crate::lab::hosts::BRIDGE,
        lab.switch_netns_path().display(),
    );
    print_hosts(&lab);
    let flag = if name == DEFAULT_NAME {
        String::new()
    } else {
        format!(" --name {name}")
    };
    println!("\n  vxnet lab exec{flag} vm2 -- vxnet network ls");
    println!("  vxnet lab status{flag}");
    println!("  vxnet lab down{flag}");
    Ok(ExitCode::SUCCESS)
}

fn print_hosts(lab: &Lab) -> bool {
    let mut all_alive = true;
    println!(
        "{:<6} {:<16} {:<8} {:<8} {:<8} LOG / SOCKET",
        "HOST", "ADDRESS", "PROCESS", "PID", "STATE"
    );
    for h in lab.hosts() {
        let procs = std::iter::once(h.init()).chain(h.processes());
        for p in procs {
            let alive = p.is_alive();
            all_alive &= alive;
            let extra = if p.role == "init" {
                if h.processes().iter().any(|p| p.role == "daemon") {
                    h.socket_path().display().to_string()
                } else {
                    String::new()
                }
            } else {
                p.log.display().to_string()
            };
            println!(
                "{:<6} {:<16} {:<8} {:<8} {:<8} {}",
                h.name(),
                h.addr().to_string(),
                p.role,
                p.pid,
                if alive { "running" } else { "dead" },
                extra
            );
        }
    }
    all_alive
}

async fn docker(name: &str, cluster_store: bool, hosts: Vec<String>) -> anyhow::Result<ExitCode> {
    let lab = Lab::open(name)?;
    if cluster_store && lab.state().secure_store.is_some() {
        anyhow::bail!(
            "lab {name} was started with --secure-store, but Docker 20.10's legacy cluster store speaks etcd's v2 API, which cannot log in to a TLS + client-certificate + auth etcd: use `vxnet lab docker` without --cluster-store (local-scope engines), or a lab without --secure-store"
        );
    }
    let hosts = if hosts.is_empty() {
        lab.hosts()
            .iter()
            .skip(1)
            .map(|h| h.name().to_string())
            .collect()
    } else {
        hosts
    };
    let opts = DockerOptions {
        cluster_store,
        ..DockerOptions::default()
    };
    let started = Instant::now();
    futures::future::try_join_all(hosts.iter().map(|h| lab.start_docker(h, &opts))).await?;
    for h in &hosts {
        lab.import_test_image(h)?;
    }
    println!(
        "docker is up on {} in {:.1}s{} (image {TEST_IMAGE})",
        hosts.join(", "),
        started.elapsed().as_secs_f64(),
        if cluster_store {
            format!(", cluster store {}", lab.cluster_store())
        } else {
            String::new()
        }
    );
    let flag = if name == DEFAULT_NAME {
        String::new()
    } else {
        format!(" --name {name}")
    };
    if let Some(first) = hosts.first() {
        println!(
            "\n  vxnet lab exec{flag} {first} -- docker run --rm --net none {TEST_IMAGE} true"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn down(name: &str) -> anyhow::Result<ExitCode> {
    let report = Lab::down_by_name(name)?;
    if !report.existed {
        println!("lab {name} is not up (nothing to remove)");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "lab {name} removed: {} process(es) stopped, {} already gone",
        report.stopped, report.gone
    );
    let mut ok = true;
    if !report.stuck.is_empty() {
        ok = false;
        eprintln!(
            "warning: still running after SIGKILL: {}",
            report.stuck.join(", ")
        );
    }
    if !report.strangers.is_empty() {
        eprintln!(
            "warning: processes the lab did not start still run in its namespaces (not killed): {:?}",
            report.strangers
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn status(name: &str, format: Option<&str>) -> anyhow::Result<ExitCode> {
    let lab = Lab::open(name)?;
    let alive = match format {
        Some("json") => {
            let mut v = serde_json::to_value(lab.state())?;
            for (i, h) in lab.hosts().iter().enumerate() {
                v["hosts"][i]["socket"] = h.socket_path().display().to_string().into();
                v["hosts"][i]["init"]["alive"] = h.init().is_alive().into();
                for (j, p) in h.processes().iter().enumerate() {
                    v["hosts"][i]["processes"][j]["alive"] = p.is_alive().into();
                }
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
            lab.is_alive()
        }
        Some(other) => anyhow::bail!("unknown --format {other:?}: use json"),
        None => {
            println!(
                "lab {} ({}): {} hosts on {}, etcd at {}{}",
                lab.name(),
                lab.dir().display(),
                lab.hosts().len(),
                lab.underlay(),
                lab.cluster_store(),
                if lab.state().secure_store.is_some() {
                    " (store: TLS with client certificates + etcd auth, user vxnet)"
                } else {
                    " (store: plain HTTP, no auth)"
                }
            );
            print_hosts(&lab)
        }
    };
    Ok(if alive {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn exec(name: &str, host: &str, command: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let lab = Lab::open(name)?;
    let host = lab.host(host)?;
    let Some((program, args)) = command.split_first() else {
        anyhow::bail!("no command given: vxnet lab exec HOST -- CMD…");
    };
    let mut cmd = host.command(program)?;
    cmd.args(args);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // As a shell says it: 127 for a command that is not there.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "vxnet lab exec: {}: command not found on {}",
                program.to_string_lossy(),
                host.name()
            );
            return Ok(ExitCode::from(127));
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot run {program:?} on {}", host.name()))
        }
    };
    // Ctrl-C reaches the command (same process group); this process waits for its exit code.
    let ignore_interrupts = tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    ignore_interrupts.abort();
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}
