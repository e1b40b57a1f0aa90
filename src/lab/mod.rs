//! The lab: the seed's hosts simulated on one machine, inside network namespaces this
//! process creates. Nothing here touches the machine's root namespace: etcd and the daemons
//! run inside the lab's namespaces and are stopped by PID.
//!
//! `LocalCluster` is the control-plane lab: one private namespace holding etcd and N daemons
//! (each with its own state dir and socket), used by the tests, the benchmarks and `lab demo`.
//!
//! [`Lab`] (`hosts.rs`, `vxnet lab up/exec/status/down`) is the real lab: the seed's VMs as
//! hosts with their own network, mount and UTS namespaces on a shared switch, etcd on vm1
//! and a daemon on each other host, all outliving the process that started them.

pub mod cni;
pub mod demo;
pub mod docker;
pub mod etcd;
pub mod host_init;
pub mod hosts;
pub mod pki;
pub mod process;
pub mod sys;

pub use docker::{DockerOptions, TEST_IMAGE};
pub use hosts::{DownReport, Host, Lab, LabGuard, LabNameGuard, LabOptions};

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::api::client::Client;
use crate::netns::{self, NetNs};
use etcd::EtcdServer;
use process::{ChildGuard, ScratchDir};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{program} not found on PATH: install Debian's {package} (apt-get install {package})")]
    MissingProgram {
        program: &'static str,
        package: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    ProcessFailed { what: String, detail: String },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("the lab needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN to create namespaces): run it with sudo")]
    NotRoot,
    #[error("lab {name} is already up: `vxnet lab down --name {name}` first")]
    AlreadyUp { name: String },
    #[error("no lab named {name} is up: `vxnet lab up --name {name}` starts one")]
    NotUp { name: String },
    #[error("lab {name} is still starting or was left half-made (its `lab up` did not finish): `vxnet lab down --name {name}` removes what there is")]
    HalfMade { name: String },
    #[error("lab {lab} has no host {host}: its hosts are {hosts}")]
    UnknownHost {
        lab: String,
        host: String,
        hosts: String,
    },
    #[error("host {host} of lab {lab} is down (its init process is gone{detail}): `vxnet lab down --name {lab}`, then `vxnet lab up --name {lab}`")]
    HostDown {
        lab: String,
        host: String,
        /// What the init's log ended with, if anything: why it went.
        detail: String,
    },
    #[error("invalid lab option: {0}")]
    InvalidOption(String),
    #[error(
        "lab state file {path} is unreadable: {detail}. `vxnet lab down` still removes the lab"
    )]
    State { path: PathBuf, detail: String },
}

impl LabError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        LabError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A `vxnet daemon` process in a lab namespace.
#[derive(Debug)]
pub struct DaemonProcess {
    process: ChildGuard,
    pub name: String,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub advertise: IpAddr,
}

/// How to start one daemon.
#[derive(Clone, Debug)]
pub struct DaemonSpec {
    pub binary: PathBuf,
    pub name: String,
    pub cluster_store: String,
    pub advertise: IpAddr,
    /// The daemon's state dir, run dir and socket go under here.
    pub dir: PathBuf,
    pub store_prefix: String,
    pub lease_ttl_secs: u64,
    pub die_with_parent: bool,
    /// More arguments (e.g. `--cluster-store-opt kv.cacertfile=…`).
    pub extra_args: Vec<String>,
    /// More environment (e.g. `VXNET_ETCD_USER`).
    pub env: Vec<(String, String)>,
}

impl DaemonProcess {
    /// Starts the daemon inside `ns` and waits until it is registered and synced.
    pub async fn start(ns: &NetNs, spec: &DaemonSpec) -> Result<Self, LabError> {
        let mut daemon = Self::spawn(ns, spec)?;
        daemon.wait_ready(Duration::from_secs(15)).await?;
        Ok(daemon)
    }

    /// Starts the daemon inside `ns` without waiting for it (see [`DaemonProcess::wait_ready`]).
    pub fn spawn(ns: &NetNs, spec: &DaemonSpec) -> Result<Self, LabError> {
        let state_dir = spec.dir.join("state");
        let run_dir = spec.dir.join("run");
        let socket = run_dir.join("vxnet.sock");
        std::fs::create_dir_all(&spec.dir).map_err(|e| LabError::io(&spec.dir, e))?;
        let mut cmd = Command::new(&spec.binary);
        cmd.arg("daemon")
            .arg("--cluster-store")
            .arg(&spec.cluster_store)
            .arg("--cluster-advertise")
            .arg(spec.advertise.to_string())
            .arg("--node-name")
            .arg(&spec.name)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--socket")
            .arg(&socket)
            .arg("--store-prefix")
            .arg(&spec.store_prefix)
            .arg("--lease-ttl")
            .arg(spec.lease_ttl_secs.to_string())
            .args(&spec.extra_args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("VXNET_LAB_LOG").unwrap_or_else(|_| "info".into()),
            );
        ns.command(&mut cmd)
            .map_err(|e| LabError::io(&spec.binary, e))?;
        let log = spec.dir.join("daemon.log");
        let process = ChildGuard::spawn(&spec.name, cmd, &log, spec.die_with_parent)
            .map_err(|e| LabError::io(&spec.binary, e))?;
        Ok(DaemonProcess {
            process,
            name: spec.name.clone(),
            socket,
            state_dir,
            advertise: spec.advertise,
        })
    }

    /// Waits until the daemon answers, holds its lease and has listed the store.
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<(), LabError> {
        let client = self.client();
        let started = Instant::now();
        loop {
            if let Some(status) = self.process.exited() {
                return Err(LabError::ProcessFailed {
                    what: format!("vxnet daemon {}", self.name),
                    detail: format!("exited with {status}:\n{}", self.process.log_tail(15)),
                });
            }
            if let Ok(info) = client.info().await {
                if info.synced {
                    return Ok(());
                }
            }
            if started.elapsed() > limit {
                return Err(LabError::ProcessFailed {
                    what: format!("vxnet daemon {}", self.name),
                    detail: format!("not ready after {limit:?}:\n{}", self.process.log_tail(15)),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn client(&self) -> Client {
        Client::from_socket(self.socket.clone())
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn process(&mut self) -> &mut ChildGuard {
        &mut self.process
    }
}

/// etcd and N daemons in one private namespace (the control-plane lab).
pub struct LocalCluster {
    pub daemons: Vec<DaemonProcess>,
    pub etcd: EtcdServer,
    pub ns: NetNs,
    pub prefix: String,
    opts: LocalClusterOptions,
    // Dropped last: the processes above write into it until they stop.
    pub dir: ScratchDir,
}

/// Options of [`LocalCluster::start`].
#[derive(Clone, Debug)]
pub struct LocalClusterOptions {
    pub daemons: usize,
    /// The `vxnet` binary the daemons run.
    pub binary: PathBuf,
    pub lease_ttl_secs: u64,
    /// Kill etcd and the daemons if the starting thread ends (tests: no leaks on a crash).
    pub die_with_parent: bool,
    /// Serve etcd's clients over TLS (daemons then need `--cluster-store-opt kv.*` in
    /// `daemon_args`).
    pub etcd_tls: Option<etcd::EtcdServerTls>,
    /// Turn etcd's auth on, with user `root` and this password, before any daemon starts.
    pub etcd_root_password: Option<String>,
    /// Arguments given to every daemon (store options).
    pub daemon_args: Vec<String>,
    /// Environment given to every daemon (`VXNET_ETCD_USER`).
    pub daemon_env: Vec<(String, String)>,
}

impl LocalClusterOptions {
    pub fn new(daemons: usize, binary: PathBuf) -> Self {
        LocalClusterOptions {
            daemons,
            binary,
            lease_ttl_secs: 15,
            die_with_parent: true,
            etcd_tls: None,
            etcd_root_password: None,
            daemon_args: Vec::new(),
            daemon_env: Vec::new(),
        }
    }
}

/// Exits early with `NotRoot` when namespaces cannot be made.
pub fn require_root() -> Result<(), LabError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LabError::NotRoot);
    }
    Ok(())
}

impl LocalCluster {
    /// Loopback address of daemon `i` (0-based): 127.0.0.11, .12, …
    pub fn daemon_addr(i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11 + i as u8))
    }

    pub async fn start(opts: LocalClusterOptions) -> Result<Self, LabError> {
        require_root()?;
        let dir = ScratchDir::new("vxnet-local").map_err(|e| LabError::io(Path::new("/tmp"), e))?;
        let ns = NetNs::new_anonymous().map_err(|e| LabError::io(Path::new("netns"), e))?;
        let handle = ns
            .netlink()
            .map_err(|e| LabError::io(Path::new("netlink"), e))?;
        netns::set_link_up(&handle, "lo")
            .await
            .map_err(|e| LabError::Netlink(e.to_string()))?;
        let mut etcd = EtcdServer::start_with(
            &ns,
            Ipv4Addr::LOCALHOST,
            &dir.path().join("etcd"),
            opts.die_with_parent,
            opts.etcd_tls.clone(),
        )?;
        if let Some(password) = &opts.etcd_root_password {
            etcd.enable_auth(&ns, password)?;
        }
        let prefix = format!("/vxnet-{:08x}/", rand::random::<u32>());
        let mut cluster = LocalCluster {
            daemons: Vec::with_capacity(opts.daemons),
            etcd,
            ns,
            prefix,
            dir,
            opts,
        };
        for i in 0..cluster.opts.daemons {
            let spec = cluster.daemon_spec(i);
            let daemon = DaemonProcess::start(&cluster.ns, &spec).await?;
            cluster.daemons.push(daemon);
        }
        Ok(cluster)
    }

    /// How daemon `i` (0-based; vm{i+2}, at [`LocalCluster::daemon_addr`]) is started: tests
    /// may change it and start one more with [`DaemonProcess::spawn`] in [`LocalCluster::ns`].
    pub fn daemon_spec(&self, i: usize) -> DaemonSpec {
        let name = format!("vm{}", i + 2);
        DaemonSpec {
            binary: self.opts.binary.clone(),
            name: name.clone(),
            cluster_store: self.etcd.cluster_store_url(),
            advertise: Self::daemon_addr(i),
            dir: self.dir.path().join(&name),
            store_prefix: self.prefix.clone(),
            lease_ttl_secs: self.opts.lease_ttl_secs,
            die_with_parent: self.opts.die_with_parent,
            extra_args: self.opts.daemon_args.clone(),
            env: self.opts.daemon_env.clone(),
        }
    }

    pub fn client(&self, i: usize) -> Client {
        self.daemons[i].client()
    }

    /// Every key under the cluster's prefix but the hosts' health reports, each with its
    /// create and mod revisions and version, read with etcdctl: equal before and after a
    /// request means the request wrote nothing. (The store's revision itself moves with the
    /// reports every host writes in the background.)
    pub fn store_state(&self) -> Result<String, LabError> {
        let health = format!("{}health/", self.prefix);
        let after_health = format!("{}health0", self.prefix);
        let mut end = self.prefix.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let end = String::from_utf8_lossy(&end).into_owned();
        let mut state = String::new();
        for (from, to) in [
            (self.prefix.as_str(), health.as_str()),
            (&after_health, &end),
        ] {
            let out = self
                .etcd
                .etcdctl(&self.ns, &["get", from, to, "--keys-only", "-w", "json"])?;
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| LabError::ProcessFailed {
                    what: "etcdctl get".into(),
                    detail: format!("{e}: {}", String::from_utf8_lossy(&out.stderr)),
                })?;
            for kv in v["kvs"].as_array().into_iter().flatten() {
                state.push_str(&format!(
                    "{} {} {} {}\n",
                    kv["key"], kv["create_revision"], kv["mod_revision"], kv["version"]
                ));
            }
        }
        Ok(state)
    }

    /// Every key under the cluster's prefix, read with etcdctl.
    pub fn store_keys(&self) -> Result<Vec<String>, LabError> {
        let out = self
            .etcd
            .etcdctl(&self.ns, &["get", "--prefix", &self.prefix, "--keys-only"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }
}
