//! The real lab: the seed's VMs as namespaces on this machine (`vxnet lab up/exec/status/down`).
//!
//! A lab NAME lives in `/run/vxnet-lab/NAME/`:
//!
//! ```text
//! lab.json                 every host, address, PID (with its start time) and log
//! netns/switch             network namespace holding bridge br0 (the seed's private network)
//! netns/vm1 … netns/vmN    each host's network namespace: lo, eth0 = 192.0.2.(4+K)/24
//! hosts/vmK/fs/…           each host's private directories (/var/lib/vxnet, …)
//! logs/vmK-init.log, vm1-etcd.log, vmK-daemon.log, vmK-dockerd.log (`lab docker`),
//!   vmK-containerd.log (`Lab::start_containerd`)
//! docker/vxnet-bb.tar      the test image's root filesystem (`lab docker`, Podman, ctr)
//! ```
//!
//! Each host is held by a `vxnet lab host-init` process (see `host_init.rs`) that owns the
//! host's mount and UTS namespaces: its own `/run` (a tmpfs), its own private directories
//! bound from the lab dir, hostname vmK. etcd runs on vm1, `vxnet daemon` on vm2…vmN, each
//! started by setns into its host's init's namespaces; they outlive the `lab up` process and
//! are stopped by `lab down`, by PID and only after checking the PID's start time.
//!
//! Nothing is created in the machine's root network namespace: the veth pairs are created
//! from inside the switch namespace with their peer directly in the host's namespace.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use nix::mount::{umount2, MntFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::etcd::{find_program, EtcdServerTls, Member, PrefixUser, CLIENT_PORT, PEER_PORT};
use super::host_init::READY;
use super::sys::{self, HostNamespaces, ProcRecord};
use super::{require_root, LabError};
use crate::api::client::Client;
use crate::netns::{self, NetNs};

/// Where labs live (one directory per lab name).
pub const DEFAULT_ROOT: &str = "/run/vxnet-lab";
pub const DEFAULT_NAME: &str = "lab";
pub const DEFAULT_HOSTS: usize = 3;
/// The underlay (the seed used 172.28.128.0/24; this is TEST-NET-1, never routed).
pub const DEFAULT_UNDERLAY: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(192, 0, 2, 0), 24) {
    Ok(n) => n,
    Err(_) => panic!("a /24 is a valid prefix"),
};
/// Directories each host has to itself (bound from `hosts/vmK/fs/…` in the lab dir).
/// `/run` is always private too (a tmpfs per host). The last seven are the CNI runtimes'
/// (`cni.rs`): CNI configurations and plugins, IPAM state and result caches, containerd's
/// root, Podman's storage, configuration and short-name cache; each host's are its own, and
/// none of the machine's is read or written.
pub const DEFAULT_PRIVATE_DIRS: &[&str] = &[
    "/var/lib/vxnet",
    "/var/lib/etcd",
    "/var/lib/docker",
    "/etc/docker",
    "/etc/cni",
    "/opt/cni/bin",
    "/var/lib/cni",
    "/var/lib/containerd",
    "/var/lib/containers",
    "/etc/containers",
    "/var/cache/containers",
];
/// The "outside" address (a documentation network, RFC 5737) every lab host can reach.
pub const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The lab's "upstream" resolver address, also in the outside namespace: every host's
/// /etc/resolv.conf names it, as a VM's names its network's resolver. Nothing answers there
/// unless a test or an operator starts a resolver on it (`lab exec outside …`).
pub const OUTSIDE_RESOLVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
/// The outside network, routed on-link from every host.
pub const OUTSIDE_NET: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(203, 0, 113, 0), 24) {
    Ok(n) => n,
    Err(_) => panic!("203.0.113.0/24 is a valid network"),
};

/// The bridge in the switch namespace.
pub const BRIDGE: &str = "br0";
pub const UNDERLAY_MTU: u32 = 1500;
/// The daemon's socket, as seen inside a host.
pub const HOST_SOCKET: &str = "/run/vxnet/vxnet.sock";
/// etcd's data directory inside vm1 (a private directory of the host); member K of a
/// multi-member cluster uses `…/lab-etcdK`.
const ETCD_DATA_DIR: &str = "/var/lib/etcd/lab";
/// Member K of a multi-member etcd listens on 2379 + K·100 (clients) and 2380 + K·100 (peers).
pub const ETCD_PORT_STEP: u16 = 100;
/// The most etcd members a lab runs.
pub const MAX_ETCD_MEMBERS: usize = 5;
pub(super) const STATE_FILE: &str = "lab.json";
const MAX_NAME: usize = 32;

/// How to build a lab.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Lab name: letters, digits, `-`, `_`, `.` (not starting with `.`).
    pub name: String,
    /// Number of hosts (vm1 runs etcd, vm2…vmN a daemon each).
    pub hosts: usize,
    /// vmK gets the (4+K)th address of this network (vm1 .5, vm2 .6, …).
    pub underlay: Ipv4Net,
    /// The `vxnet` binary the hosts' init processes and daemons run.
    pub binary: PathBuf,
    /// Parent of the lab directory (default `/run/vxnet-lab`).
    pub root: PathBuf,
    /// Directories (absolute, not under /run) each host gets to itself.
    pub private_dirs: Vec<PathBuf>,
    /// How long etcd and each daemon may take to become ready.
    pub ready_timeout: Duration,
    /// etcd members on vm1 (1, 3 or 5): one cluster on vm1's address, member K on client port
    /// 2379 + K·100 and peer port 2380 + K·100; the daemons are given every member.
    pub etcd_members: usize,
    /// The daemons serve Docker's plugin protocols (at the host's
    /// /run/docker/plugins/vxnet.sock) for engines of this kind.
    pub docker_scope: crate::docker::Scope,
    /// The production setting: etcd serves clients over TLS with client certificates
    /// (`--client-cert-auth`) and etcd's auth on; each daemon presents its host's certificate
    /// and logs in as user `vxnet`, which may touch only the store prefix.
    pub secure_store: bool,
    /// More `vxnet daemon` arguments for every daemon host (after the lab's own).
    pub daemon_args: Vec<String>,
}

impl LabOptions {
    pub fn new(name: &str, binary: PathBuf) -> Self {
        LabOptions {
            name: name.to_string(),
            hosts: DEFAULT_HOSTS,
            underlay: DEFAULT_UNDERLAY,
            binary,
            root: PathBuf::from(DEFAULT_ROOT),
            private_dirs: DEFAULT_PRIVATE_DIRS.iter().map(PathBuf::from).collect(),
            ready_timeout: Duration::from_secs(30),
            etcd_members: 1,
            docker_scope: crate::docker::Scope::Local,
            secure_store: false,
            daemon_args: Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), LabError> {
        validate_name(&self.name)?;
        if self.hosts == 0 {
            return Err(LabError::InvalidOption(
                "--hosts must be at least 1 (vm1 runs etcd)".into(),
            ));
        }
        if self.etcd_members == 0
            || self.etcd_members > MAX_ETCD_MEMBERS
            || self.etcd_members.is_multiple_of(2)
        {
            return Err(LabError::InvalidOption(format!(
                "--etcd-members {}: use 1, 3 or 5 (an odd number keeps a majority after a failure)",
                self.etcd_members
            )));
        }
        if host_addr(self.underlay, self.hosts).is_none() {
            return Err(LabError::InvalidOption(format!(
                "underlay {} has no room for {} hosts (vmK gets its (4+K)th address): \
                 use a larger network or fewer hosts",
                self.underlay, self.hosts
            )));
        }
        for d in &self.private_dirs {
            let s = d.to_string_lossy();
            if !d.is_absolute()
                || d.starts_with("/run")
                || d == Path::new("/")
                || s.contains('=')
                || d.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(LabError::InvalidOption(format!(
                    "private directory {s:?}: give an absolute path without `..` or `=`, \
                     not / and not under /run (each host's /run is already private)"
                )));
            }
        }
        if self.secure_store {
            for needed in [VM1_PKI, DAEMON_PKI] {
                if !self
                    .private_dirs
                    .iter()
                    .any(|d| Path::new(needed).starts_with(d))
                {
                    return Err(LabError::InvalidOption(format!(
                        "--secure-store puts each host's certificates in {needed}, which is not one of the hosts' private directories: keep the default ones"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(LabError::InvalidOption(format!(
            "lab name {name:?}: use 1 to {MAX_NAME} letters, digits, `-`, `_` or `.` (not a leading `.`)"
        )))
    }
}

/// The underlay address of host vmK (K from 1): the network's (4+K)th address, if the
/// network holds it (and it is not the broadcast address).
pub fn host_addr(underlay: Ipv4Net, k: usize) -> Option<Ipv4Addr> {
    let net = u32::from(underlay.network()) as u64;
    let bcast = u32::from(underlay.broadcast()) as u64;
    let a = net + 4 + k as u64;
    (k >= 1 && a < bcast).then(|| Ipv4Addr::from(a as u32))
}

/// A lab as recorded in `lab.json` (written after every step of `lab up`, so that `lab down`
/// finds everything even after a crash half-way).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub dir: PathBuf,
    pub underlay: Ipv4Net,
    pub binary: PathBuf,
    /// Set once `lab up` has finished; a lab without it is half-made.
    pub complete: bool,
    pub switch_netns: PathBuf,
    pub bridge: String,
    pub hosts: Vec<HostState>,
    /// The "outside" world: a namespace on the switch holding OUTSIDE_ADDR, reachable from
    /// the hosts but with no route to anything behind them (so only NAT'd traffic returns).
    #[serde(default)]
    pub outside_netns: Option<PathBuf>,
    /// Client port of each etcd member on vm1 (member K is vm1's K-th process); empty in a
    /// lab recorded before members were configurable, meaning one member on 2379.
    #[serde(default)]
    pub etcd_ports: Vec<u16>,
    /// Set by `lab up --secure-store`: where the lab's PKI and passwords are.
    #[serde(default)]
    pub secure_store: Option<SecureStore>,
}

/// What a `--secure-store` lab needs after `lab up` (restarting a daemon needs its password,
/// which is kept out of argv and so out of the recorded command line).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecureStore {
    /// The lab's PKI (`pki/` in the lab dir, 0700): the CA, etcd's and each host's
    /// certificate, `root.password` and `vxnet.password` (0600).
    pub pki_dir: PathBuf,
    /// The etcd user the daemons log in as.
    pub user: String,
}

/// The store prefix the lab's daemons use (the daemon's default) and the `vxnet` user's
/// only permission.
const SECURE_PREFIX: &str = crate::store::keys::DEFAULT_PREFIX;
/// Where a host sees its certificates (inside a private dir of the host: the lab dir under
/// the machine's /run is hidden by each host's own /run).
const VM1_PKI: &str = "/var/lib/etcd/pki";
const DAEMON_PKI: &str = "/var/lib/vxnet/pki";
/// In a secure lab, member K answers `/health` in plain HTTP on 127.0.0.1:2381 + K·100 only
/// (etcd's metrics listener): the client port wants a client certificate.
const METRICS_PORT_OFFSET: u16 = 2;

impl SecureStore {
    /// `USER:PASSWORD` for `VXNET_ETCD_USER`.
    pub fn credentials(&self) -> Result<String, LabError> {
        let path = self.pki_dir.join(format!("{}.password", self.user));
        let pw = std::fs::read_to_string(&path).map_err(|e| LabError::io(&path, e))?;
        Ok(format!("{}:{}", self.user, pw.trim()))
    }

    /// The `--cluster-store-opt` arguments of a daemon (paths as seen inside its host).
    pub fn daemon_args(host: &str) -> Vec<String> {
        vec![
            "--cluster-store-opt".into(),
            format!("kv.cacertfile={DAEMON_PKI}/ca.pem"),
            "--cluster-store-opt".into(),
            format!("kv.certfile={DAEMON_PKI}/{host}.pem"),
            "--cluster-store-opt".into(),
            format!("kv.keyfile={DAEMON_PKI}/{host}-key.pem"),
        ]
    }

    /// etcdctl's TLS arguments on vm1 (its own client certificate, CN `etcdctl`).
    pub fn vm1_etcdctl_args() -> Vec<String> {
        vec![
            "--cacert".into(),
            format!("{VM1_PKI}/ca.pem"),
            "--cert".into(),
            format!("{VM1_PKI}/etcdctl.pem"),
            "--key".into(),
            format!("{VM1_PKI}/etcdctl-key.pem"),
        ]
    }
}

fn random_password() -> String {
    (0..24)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn pki_err(e: super::pki::PkiError) -> LabError {
    LabError::ProcessFailed {
        what: "making the lab's PKI".into(),
        detail: e.to_string(),
    }
}

/// Copies `files` (by name) from the PKI dir into `dest` (made 0700), keeping modes.
fn install_pki(pki: &Path, dest: &Path, files: &[String]) -> Result<(), LabError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dest)
        .map_err(|e| LabError::io(dest, e))?;
    for f in files {
        let to = dest.join(f);
        std::fs::copy(pki.join(f), &to).map_err(|e| LabError::io(&to, e))?;
    }
    Ok(())
}

/// The etcd members of a lab of `n` members. One member keeps the seed's layout (name vm1,
/// 2379/2380, data in /var/lib/etcd/lab).
fn etcd_members(n: usize) -> Vec<(Member, PathBuf)> {
    if n == 1 {
        let m = Member {
            name: "vm1".into(),
            client_port: CLIENT_PORT,
            peer_port: PEER_PORT,
        };
        return vec![(m, PathBuf::from(ETCD_DATA_DIR))];
    }
    (0..n)
        .map(|k| {
            let step = ETCD_PORT_STEP * k as u16;
            let m = Member {
                name: format!("etcd{k}"),
                client_port: CLIENT_PORT + step,
                peer_port: PEER_PORT + step,
            };
            (m, PathBuf::from(format!("{ETCD_DATA_DIR}-etcd{k}")))
        })
        .collect()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostState {
    pub name: String,
    pub addr: Ipv4Addr,
    pub netns: PathBuf,
    /// The host's init (namespace holder).
    pub init: Option<ProcRecord>,
    /// etcd (vm1) or the daemon (vm2…), and dockerd once `lab docker` started it.
    pub processes: Vec<ProcRecord>,
}

impl LabState {
    pub(super) fn save(&self) -> Result<(), LabError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| LabError::State {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        std::fs::write(&tmp, text).map_err(|e| LabError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| LabError::io(&path, e))
    }

    /// Holds the lab's state lock (a `flock` on `lab.lock`) until the file is dropped:
    /// whoever changes `lab.json` after `lab up` (restarts, `lab docker`, several at once,
    /// from several processes) reads, changes and saves it under this lock.
    pub(super) fn lock(dir: &Path) -> Result<std::fs::File, LabError> {
        let path = dir.join("lab.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LabError::io(&path, e))?;
        // SAFETY: flock(2) on an fd we own; it blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(LabError::io(&path, std::io::Error::last_os_error()));
        }
        Ok(file)
    }

    /// The state in `dir`, or `None` when there is no state file.
    pub(super) fn load(dir: &Path) -> Result<Option<LabState>, LabError> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| LabError::State {
                    path,
                    detail: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LabError::io(&path, e)),
        }
    }
}

/// A lab that is up.
#[derive(Debug)]
pub struct Lab {
    state: LabState,
    hosts: Vec<Host>,
}

/// One host of a lab (one of the seed's VMs).
#[derive(Clone, Debug)]
pub struct Host {
    lab: String,
    name: String,
    addr: Ipv4Addr,
    netns: PathBuf,
    init: ProcRecord,
    processes: Vec<ProcRecord>,
    /// Where the lab's `vxnet` binary is: first on PATH inside the host, as if installed there.
    bin_dir: Option<PathBuf>,
}

impl Host {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of the lab the host belongs to.
    pub fn lab(&self) -> &str {
        &self.lab
    }

    /// The host's underlay address (on its `eth0`).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// PID of the process holding the host's namespaces.
    pub fn init_pid(&self) -> u32 {
        self.init.pid
    }

    pub fn init(&self) -> &ProcRecord {
        &self.init
    }

    /// etcd (vm1) or the daemon (vm2…), as started by `lab up`.
    pub fn processes(&self) -> &[ProcRecord] {
        &self.processes
    }

    /// The host's daemon socket as reachable from outside the host: through the init's root
    /// (`/proc/PID/root/run/vxnet/vxnet.sock`), which resolves in the host's mount namespace.
    pub fn socket_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{HOST_SOCKET}", self.init.pid))
    }

    /// A client of the host's daemon.
    pub fn client(&self) -> Client {
        Client::from_socket(self.socket_path())
    }

    /// The file of the host's network namespace (for `nsenter --net=…`).
    pub fn netns_path(&self) -> &Path {
        &self.netns
    }

    /// The host's network namespace (for netlink or sockets from this process).
    pub fn netns(&self) -> Result<NetNs, LabError> {
        NetNs::open(&self.netns).map_err(|e| LabError::io(&self.netns, e))
    }

    /// A command that runs on this host: in its network, mount and UTS namespaces, with
    /// `VXNET_HOST` pointing at the host's daemon, `DOCKER_HOST` at the host's dockerd (if
    /// `lab docker` started one), ctr and Podman at the host's own (see `cni.rs`) and the
    /// lab's `vxnet` first on PATH.
    /// Fails if the host's init is gone.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command, LabError> {
        let mut cmd = Command::new(program);
        cmd.env("VXNET_HOST", format!("unix://{HOST_SOCKET}"))
            .env("DOCKER_HOST", super::docker::DOCKER_HOST)
            .envs(super::cni::host_env(&self.lab, &self.name));
        if let Some(dir) = &self.bin_dir {
            let path =
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
            let mut joined = dir.clone().into_os_string();
            joined.push(":");
            joined.push(path);
            cmd.env("PATH", joined);
        }
        self.enter(&mut cmd, false)?;
        Ok(cmd)
    }

    pub(super) fn enter(&self, cmd: &mut Command, new_session: bool) -> Result<(), LabError> {
        let proc_dir = PathBuf::from(format!("/proc/{}", self.init.pid));
        let ns = HostNamespaces::open(&self.init)
            .map_err(|e| LabError::io(&proc_dir, e))?
            .ok_or_else(|| LabError::HostDown {
                lab: self.lab.clone(),
                host: self.name.clone(),
                detail: log_tail(&self.init.log)
                    .map(|t| format!("; its log {} ends: {t}", self.init.log.display()))
                    .unwrap_or_default(),
            })?;
        ns.apply(cmd, new_session);
        Ok(())
    }

    /// Whether the host's init and every process `lab up` started on it still run.
    pub fn is_alive(&self) -> bool {
        self.init.is_alive() && self.processes.iter().all(ProcRecord::is_alive)
    }
}

/// The last few lines of a lab process's log, joined with " | " (None if empty or unreadable).
fn log_tail(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    (!tail.is_empty()).then_some(tail)
}

/// What `lab down` did.
#[derive(Debug, Default)]
pub struct DownReport {
    /// Whether there was anything of the lab to remove.
    pub existed: bool,
    /// Processes of the lab that were running and were stopped.
    pub stopped: usize,
    /// Recorded processes already gone.
    pub gone: usize,
    /// Processes that survived SIGKILL ("role PID").
    pub stuck: Vec<String>,
    /// Processes still inside the lab's network namespaces after everything running inside its
    /// hosts (their mount namespaces) was stopped: entered from outside (e.g. with
    /// `nsenter`), so not the lab's to kill; only reported. The namespaces live until they exit.
    pub strangers: Vec<u32>,
}

impl Lab {
    /// Builds a lab: namespaces, switch, hosts, etcd on vm1 and a daemon on each other host.
    /// Returns when etcd is healthy and every daemon is registered and synced. On any error,
    /// everything made so far is removed again before the error is returned.
    pub async fn up(opts: LabOptions) -> Result<Lab, LabError> {
        require_root()?;
        opts.validate()?;
        let etcd_bin = find_program("etcd").ok_or(LabError::MissingProgram {
            program: "etcd",
            package: "etcd-server",
        })?;
        if !opts.binary.is_file() {
            return Err(LabError::InvalidOption(format!(
                "vxnet binary {} not found",
                opts.binary.display()
            )));
        }
        std::fs::create_dir_all(&opts.root).map_err(|e| LabError::io(&opts.root, e))?;
        let dir = opts.root.join(&opts.name);
        // Creating the directory is what claims the name: a second `lab up` stops here
        // without touching the first lab.
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(LabError::AlreadyUp { name: opts.name });
            }
            Err(e) => return Err(LabError::io(&dir, e)),
        }
        // From here on, an error, a panic or a cancelled future removes what was made.
        let mut guard = UpGuard {
            dir: dir.clone(),
            armed: true,
        };
        let lab = build(&opts, &dir, &etcd_bin).await?;
        guard.armed = false;
        Ok(lab)
    }

    /// Opens the lab `name` under the default root.
    pub fn open(name: &str) -> Result<Lab, LabError> {
        Self::open_in(Path::new(DEFAULT_ROOT), name)
    }

    /// Opens the lab `name` under `root`.
    pub fn open_in(root: &Path, name: &str) -> Result<Lab, LabError> {
        validate_name(name)?;
        let dir = root.join(name);
        if !dir.is_dir() {
            return Err(LabError::NotUp { name: name.into() });
        }
        let state =
            LabState::load(&dir)?.ok_or_else(|| LabError::HalfMade { name: name.into() })?;
        Self::from_state(state)
    }

    fn from_state(state: LabState) -> Result<Lab, LabError> {
        if !state.complete {
            return Err(LabError::HalfMade { name: state.name });
        }
        let mut hosts = Vec::with_capacity(state.hosts.len());
        for h in &state.hosts {
            let init = h.init.clone().ok_or_else(|| LabError::HalfMade {
                name: state.name.clone(),
            })?;
            hosts.push(Host {
                lab: state.name.clone(),
                name: h.name.clone(),
                addr: h.addr,
                netns: h.netns.clone(),
                init,
                processes: h.processes.clone(),
                bin_dir: state.binary.parent().map(Path::to_path_buf),
            });
        }
        Ok(Lab { state, hosts })
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The lab's directory (`/run/vxnet-lab/NAME`).
    pub fn dir(&self) -> &Path {
        &self.state.dir
    }

    pub fn underlay(&self) -> Ipv4Net {
        self.state.underlay
    }

    /// What `lab.json` holds.
    pub fn state(&self) -> &LabState {
        &self.state
    }

    /// vm1, vm2, …
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, name: &str) -> Result<&Host, LabError> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| LabError::UnknownHost {
                lab: self.state.name.clone(),
                host: name.to_string(),
                hosts: self
                    .hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// `etcd://VM1:2379[,VM1:2479…]`: the cluster store the daemons use (every member).
    pub fn cluster_store(&self) -> String {
        let members: Vec<String> = self
            .etcd_endpoints()
            .iter()
            .map(ToString::to_string)
            .collect();
        format!("etcd://{}", members.join(","))
    }

    /// Each etcd member's client address (member K at index K).
    pub fn etcd_endpoints(&self) -> Vec<SocketAddr> {
        let vm1 = self.hosts[0].addr;
        if self.state.etcd_ports.is_empty() {
            return vec![SocketAddr::from((vm1, CLIENT_PORT))];
        }
        self.state
            .etcd_ports
            .iter()
            .map(|p| SocketAddr::from((vm1, *p)))
            .collect()
    }

    /// The outside namespace (holding OUTSIDE_ADDR), for tests of traffic leaving the overlay.
    pub fn outside(&self) -> Result<NetNs, LabError> {
        let path =
            self.state.outside_netns.as_ref().ok_or_else(|| {
                LabError::InvalidOption("this lab has no outside namespace".into())
            })?;
        NetNs::open(path).map_err(|e| LabError::io(path, e))
    }

    /// The switch's network namespace file.
    pub fn switch_netns_path(&self) -> &Path {
        &self.state.switch_netns
    }

    /// Whether every process of the lab still runs.
    pub fn is_alive(&self) -> bool {
        self.hosts.iter().all(Host::is_alive)
    }

    /// Stops every process the lab started and removes its namespaces and files.
    pub fn down(self) -> Result<DownReport, LabError> {
        teardown(&self.state.dir)
    }

    /// `lab down` by name (default root): safe to repeat, and on a half-made or crashed lab.
    pub fn down_by_name(name: &str) -> Result<DownReport, LabError> {
        Self::down_in(Path::new(DEFAULT_ROOT), name)
    }

    pub fn down_in(root: &Path, name: &str) -> Result<DownReport, LabError> {
        validate_name(name)?;
        teardown(&root.join(name))
    }
}

/// Stopping and starting a lab's processes (fault injection).
///
/// These act on `lab.json`, the lab's record: a stop signals a process only if its PID and
/// start time still match the record (through a pidfd); a start runs the recorded argv again
/// in the same host (etcd with the same data directory and flags) and replaces the record
/// with the new PID and start time, so `lab down` stops every process exactly once and never
/// a stranger. The `Lab` value keeps the records it was opened with (`Host::processes`);
/// [`Lab::current_state`] reads the current ones.
impl Lab {
    /// The lab's record as it is now on disk.
    pub fn current_state(&self) -> Result<LabState, LabError> {
        LabState::load(&self.state.dir)?.ok_or_else(|| LabError::State {
            path: self.state.dir.join(STATE_FILE),
            detail: "missing".into(),
        })
    }

    /// Number of etcd members (on vm1).
    pub fn etcd_member_count(&self) -> usize {
        self.etcd_endpoints().len()
    }

    fn etcd_index(&self, member: usize) -> Result<usize, LabError> {
        let n = self.etcd_member_count();
        if member >= n {
            return Err(LabError::InvalidOption(format!(
                "etcd member {member}: this lab has {n} (0..{n})"
            )));
        }
        Ok(member)
    }

    fn daemon_host(&self, host: &str) -> Result<usize, LabError> {
        self.daemon_host_for(host, "the vxnet daemon")
    }

    /// The index of `host` if `what` (the daemon, a container runtime) may run there: vm2…,
    /// as vm1's processes are its etcd members, by index (stop_etcd, start_all_etcd).
    pub(super) fn daemon_host_for(&self, host: &str, what: &str) -> Result<usize, LabError> {
        self.host(host)?;
        let i = self.hosts.iter().position(|h| h.name == host).unwrap_or(0);
        if i == 0 {
            return Err(LabError::InvalidOption(format!(
                "{host} runs etcd: {what} runs on the daemon hosts (vm2…)"
            )));
        }
        Ok(i)
    }

    /// Sends `signal` to process `index` of host `host` (if it is still the recorded one) and
    /// waits until it has exited (SIGKILL after 5 s). Whether it was running.
    fn signal_process(&self, host: usize, index: usize, signal: i32) -> Result<bool, LabError> {
        let state = self.current_state()?;
        let rec = state.hosts[host].processes.get(index).ok_or_else(|| {
            LabError::InvalidOption(format!("{} has no process {index}", self.hosts[host].name))
        })?;
        let out = sys::stop_with(&[rec], signal, Duration::from_secs(5));
        if let Some(stuck) = out.stuck.first() {
            return Err(LabError::ProcessFailed {
                what: format!("stopping {stuck}"),
                detail: "it survived SIGKILL".into(),
            });
        }
        Ok(out.stopped == 1)
    }

    /// Starts process `index` of host `host` again from its recorded argv (appending to its
    /// log) and records the new process. Refuses if the recorded one still runs.
    fn restart_process(&self, host: usize, index: usize) -> Result<Child, LabError> {
        let _lock = LabState::lock(&self.state.dir)?;
        let mut state = self.current_state()?;
        let rec = state.hosts[host]
            .processes
            .get(index)
            .cloned()
            .ok_or_else(|| {
                LabError::InvalidOption(format!("{} has no process {index}", self.hosts[host].name))
            })?;
        if rec.is_alive() {
            return Err(LabError::InvalidOption(format!(
                "{} {} on {} is still running (PID {})",
                rec.role, index, self.hosts[host].name, rec.pid
            )));
        }
        let (program, args) = rec.argv.split_first().ok_or_else(|| LabError::State {
            path: self.state.dir.join(STATE_FILE),
            detail: format!("{} on {} has no argv", rec.role, self.hosts[host].name),
        })?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        if rec.role == "daemon" {
            cmd.env(
                "RUST_LOG",
                std::env::var("VXNET_LAB_LOG").unwrap_or_else(|_| "info".into()),
            );
        }
        daemon_stdio(&mut cmd, &self.state.name, &rec.log)?;
        if let (Some(secure), "daemon") = (&state.secure_store, rec.role.as_str()) {
            cmd.env("VXNET_ETCD_USER", secure.credentials()?);
        }
        self.hosts[host].enter(&mut cmd, true)?;
        let child = cmd
            .spawn()
            .map_err(|e| LabError::io(Path::new(program), e))?;
        state.hosts[host].processes[index] = record(&rec.role, &child, &cmd, &rec.log)?;
        state.save()?;
        Ok(child)
    }

    /// Stops etcd member `member` (SIGTERM; SIGKILL after 5 s) and waits until it has exited.
    /// Whether it was running.
    pub fn stop_etcd(&self, member: usize) -> Result<bool, LabError> {
        self.signal_process(0, self.etcd_index(member)?, libc::SIGTERM)
    }

    /// kill -9 of etcd member `member` (a crash); waits until it has exited.
    pub fn kill_etcd(&self, member: usize) -> Result<bool, LabError> {
        self.signal_process(0, self.etcd_index(member)?, libc::SIGKILL)
    }

    /// Stops every etcd member (all at once, as a power cut of vm1's etcd would).
    pub fn stop_all_etcd(&self) -> Result<(), LabError> {
        let state = self.current_state()?;
        let recs: Vec<&ProcRecord> = state.hosts[0].processes.iter().collect();
        let out = sys::stop(&recs, Duration::from_secs(5));
        match out.stuck.first() {
            Some(stuck) => Err(LabError::ProcessFailed {
                what: format!("stopping {stuck}"),
                detail: "it survived SIGKILL".into(),
            }),
            None => Ok(()),
        }
    }

    /// Starts etcd member `member` again (same argv and data directory) and waits until it
    /// accepts connections on its client port. A member of a multi-member cluster serves
    /// only once a majority runs: [`Lab::wait_etcd_healthy`] waits for that.
    pub async fn start_etcd(&self, member: usize) -> Result<(), LabError> {
        let index = self.etcd_index(member)?;
        let mut child = self.restart_process(0, index)?;
        let target = self.etcd_endpoints()[index];
        let netns = self.hosts[0].netns.clone();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = self.current_state()?.hosts[0].processes[index].log.clone();
                return Err(exit_error(format!("etcd member {member}"), status, &log));
            }
            let ns = netns.clone();
            let up = tokio::task::spawn_blocking(move || {
                NetNs::open(&ns)
                    .and_then(|ns| {
                        ns.run(|| {
                            TcpStream::connect_timeout(&target, Duration::from_millis(200))
                                .map(|_| ())
                        })
                    })
                    .is_ok()
            })
            .await
            .unwrap_or(false);
            if up {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(LabError::ProcessFailed {
                    what: format!("etcd member {member}"),
                    detail: format!("not listening on {target} after 30 s"),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts every stopped etcd member again and waits until each is healthy.
    pub async fn start_all_etcd(&self) -> Result<(), LabError> {
        let state = self.current_state()?;
        for (member, rec) in state.hosts[0].processes.iter().enumerate() {
            if !rec.is_alive() {
                self.start_etcd(member).await?;
            }
        }
        for member in 0..self.etcd_member_count() {
            self.wait_etcd_healthy(member, Duration::from_secs(30))
                .await?;
        }
        Ok(())
    }

    /// Waits until etcd member `member` answers `/health` with true (it serves: a leader
    /// exists and it has caught up).
    pub async fn wait_etcd_healthy(&self, member: usize, limit: Duration) -> Result<(), LabError> {
        let target = health_addr(
            self.state.secure_store.is_some(),
            self.etcd_endpoints()[self.etcd_index(member)?],
        );
        let netns = self.hosts[0].netns.clone();
        let started = Instant::now();
        loop {
            let ns = netns.clone();
            if tokio::task::spawn_blocking(move || etcd_healthy(&ns, target))
                .await
                .unwrap_or(false)
            {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(LabError::ProcessFailed {
                    what: format!("etcd member {member}"),
                    detail: format!("not healthy on {target} after {limit:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether etcd member `member` answers `/health` with true right now.
    pub fn etcd_is_healthy(&self, member: usize) -> bool {
        self.etcd_endpoints().get(member).is_some_and(|t| {
            let t = health_addr(self.state.secure_store.is_some(), *t);
            etcd_healthy(&self.hosts[0].netns, t)
        })
    }

    /// The current leader among the etcd members (asked with `etcdctl endpoint status` on
    /// vm1); `None` when no running member reports one.
    pub fn etcd_leader(&self) -> Result<Option<usize>, LabError> {
        let endpoints = self.etcd_endpoints();
        let list: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
        let mut cmd = self.hosts[0].command("etcdctl")?;
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(list.join(","))
            .args([
                "--command-timeout",
                "1s",
                "endpoint",
                "status",
                "-w",
                "json",
            ]);
        let out = cmd
            .output()
            .map_err(|e| LabError::io(Path::new("etcdctl"), e))?;
        // Unreachable members are reported on stderr; the others are still listed.
        let statuses: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).unwrap_or_default();
        for st in &statuses {
            let own = &st["Status"]["header"]["member_id"];
            let leader = &st["Status"]["leader"];
            if !own.is_null() && own == leader {
                let ep = st["Endpoint"].as_str().unwrap_or_default();
                return Ok(list.iter().position(|l| l == ep));
            }
        }
        Ok(None)
    }

    /// Stops the daemon of `host` (SIGTERM, as `systemctl stop` would) and waits until it has
    /// exited. Whether it was running.
    pub fn stop_daemon(&self, host: &str) -> Result<bool, LabError> {
        let i = self.daemon_host(host)?;
        self.signal_process(i, 0, libc::SIGTERM)
    }

    /// Starts the daemon of `host` again with its recorded argv and waits until its API
    /// answers (registered in the cluster store or not: etcd may be away).
    pub async fn start_daemon(&self, host: &str) -> Result<(), LabError> {
        let i = self.daemon_host(host)?;
        let mut child = self.restart_process(i, 0)?;
        let log = self.current_state()?.hosts[i].processes[0].log.clone();
        wait_daemon(
            &mut child,
            &self.hosts[i].socket_path(),
            host,
            &log,
            Duration::from_secs(30),
            false,
        )
        .await
    }
}

/// Downs a lab when dropped (tests: no lab outlives a failed assertion).
#[derive(Debug)]
pub struct LabGuard {
    lab: Option<Lab>,
}

impl LabGuard {
    pub fn new(lab: Lab) -> Self {
        LabGuard { lab: Some(lab) }
    }

    /// Downs the lab now, reporting errors (instead of on drop, where they are only printed).
    pub fn down(mut self) -> Result<DownReport, LabError> {
        match self.lab.take() {
            Some(lab) => lab.down(),
            None => Ok(DownReport::default()),
        }
    }
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        // `lab` is only taken by `down(self)`, which consumes the guard.
        match &self.lab {
            Some(lab) => lab,
            None => unreachable!("LabGuard used after down"),
        }
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Some(lab) = self.lab.take() {
            let name = lab.name().to_string();
            if let Err(e) = lab.down() {
                eprintln!("lab {name}: down failed: {e}");
            }
        }
    }
}

/// Downs the lab of a name when dropped (for labs made by another process, e.g. `vxnet lab up`).
#[derive(Debug)]
pub struct LabNameGuard {
    root: PathBuf,
    name: String,
}

impl LabNameGuard {
    pub fn new(name: &str) -> Self {
        LabNameGuard {
            root: PathBuf::from(DEFAULT_ROOT),
            name: name.to_string(),
        }
    }
}

impl Drop for LabNameGuard {
    fn drop(&mut self) {
        if let Err(e) = Lab::down_in(&self.root, &self.name) {
            eprintln!("lab {}: down failed: {e}", self.name);
        }
    }
}

/// Removes a half-made lab unless disarmed (error, panic or cancellation of `lab up`).
struct UpGuard {
    dir: PathBuf,
    armed: bool,
}

impl Drop for UpGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = teardown(&self.dir) {
                eprintln!(
                    "removing the half-made lab {} failed: {e}",
                    self.dir.display()
                );
            }
        }
    }
}

fn netlink_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> LabError {
    let what = what.into();
    move |e| LabError::Netlink(format!("{what}: {e}"))
}

async fn link_index(h: &rtnetlink::Handle, name: &str, ns: &str) -> Result<u32, LabError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(l.header.index),
        Ok(None) => Err(LabError::Netlink(format!("no link {name} in {ns}"))),
        Err(e) => Err(LabError::Netlink(format!("looking up {name} in {ns}: {e}"))),
    }
}

/// The switch (bridge br0) and each host's eth0 on it, with its address.
async fn wire(state: &LabState, switch: &NetNs, hosts: &[NetNs]) -> Result<(), LabError> {
    let sw = switch
        .netlink()
        .map_err(|e| LabError::io(&state.switch_netns, e))?;
    netns::set_link_up(&sw, "lo")
        .await
        .map_err(netlink_err("switch: lo up"))?;
    sw.link()
        .add(LinkBridge::new(BRIDGE).mtu(UNDERLAY_MTU).up().build())
        .execute()
        .await
        .map_err(netlink_err(format!("switch: creating bridge {BRIDGE}")))?;
    let br = link_index(&sw, BRIDGE, "switch").await?;
    let prefix = state.underlay.prefix_len();
    for (h, ns) in state.hosts.iter().zip(hosts) {
        // The host end is created directly inside the host's namespace (no move step), the
        // switch end on the bridge, up.
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name("eth0")
            .mtu(UNDERLAY_MTU)
            .setns_by_fd(ns.as_fd().as_raw_fd())
            .build();
        sw.link()
            .add(
                LinkVeth::new(&h.name, "eth0")
                    .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                    .mtu(UNDERLAY_MTU)
                    .controller(br)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink_err(format!(
                "switch: veth {} / {}:eth0",
                h.name, h.name
            )))?;
        let hh = ns.netlink().map_err(|e| LabError::io(&h.netns, e))?;
        netns::set_link_up(&hh, "lo")
            .await
            .map_err(netlink_err(format!("{}: lo up", h.name)))?;
        let eth0 = link_index(&hh, "eth0", &h.name).await?;
        hh.address()
            .add(eth0, IpAddr::V4(h.addr), prefix)
            .execute()
            .await
            .map_err(netlink_err(format!(
                "{}: address {}/{prefix}",
                h.name, h.addr
            )))?;
        hh.link()
            .set(LinkUnspec::new_with_index(eth0).up().build())
            .execute()
            .await
            .map_err(netlink_err(format!("{}: eth0 up", h.name)))?;
    }
    Ok(())
}

/// A route to `net` straight out of `dev` (on-link: the switch is one L2 segment).
async fn on_link_route(
    h: &rtnetlink::Handle,
    net: Ipv4Net,
    dev: u32,
    who: &str,
) -> Result<(), LabError> {
    let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(net.network(), net.prefix_len())
        .output_interface(dev)
        .scope(rtnetlink::packet_route::route::RouteScope::Link)
        .build();
    match h.route().add(route).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(e) => Err(LabError::Netlink(format!(
            "{who}: route {net} dev {dev}: {e}"
        ))),
    }
}

/// The outside namespace on the switch: OUTSIDE_ADDR/24, an on-link route to the underlay
/// (its replies go to the hosts' own addresses only), and on each host an on-link route to
/// the outside network.
async fn wire_outside(
    state: &LabState,
    switch: &NetNs,
    outside: &NetNs,
    hosts: &[NetNs],
) -> Result<(), LabError> {
    let sw = switch
        .netlink()
        .map_err(|e| LabError::io(&state.switch_netns, e))?;
    let br = link_index(&sw, BRIDGE, "switch").await?;
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name("eth0")
        .mtu(UNDERLAY_MTU)
        .setns_by_fd(outside.as_fd().as_raw_fd())
        .build();
    sw.link()
        .add(
            LinkVeth::new("outside", "eth0")
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .mtu(UNDERLAY_MTU)
                .controller(br)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink_err("switch: veth outside / outside:eth0"))?;
    let oh = outside
        .netlink()
        .map_err(|e| LabError::io(Path::new("netns/outside"), e))?;
    netns::set_link_up(&oh, "lo")
        .await
        .map_err(netlink_err("outside: lo up"))?;
    let eth0 = link_index(&oh, "eth0", "outside").await?;
    oh.address()
        .add(eth0, IpAddr::V4(OUTSIDE_ADDR), OUTSIDE_NET.prefix_len())
        .execute()
        .await
        .map_err(netlink_err(format!("outside: address {OUTSIDE_ADDR}")))?;
    oh.address()
        .add(eth0, IpAddr::V4(OUTSIDE_RESOLVER), OUTSIDE_NET.prefix_len())
        .execute()
        .await
        .map_err(netlink_err(format!("outside: address {OUTSIDE_RESOLVER}")))?;
    oh.link()
        .set(LinkUnspec::new_with_index(eth0).up().build())
        .execute()
        .await
        .map_err(netlink_err("outside: eth0 up"))?;
    on_link_route(&oh, state.underlay, eth0, "outside").await?;
    for (h, ns) in state.hosts.iter().zip(hosts) {
        let hh = ns.netlink().map_err(|e| LabError::io(&h.netns, e))?;
        let dev = link_index(&hh, "eth0", &h.name).await?;
        on_link_route(&hh, OUTSIDE_NET, dev, &h.name).await?;
    }
    Ok(())
}

pub(super) fn record(
    role: &str,
    child: &Child,
    cmd: &Command,
    log: &Path,
) -> Result<ProcRecord, LabError> {
    let pid = child.id();
    let start_time =
        sys::start_time(pid).map_err(|e| LabError::io(Path::new(&format!("/proc/{pid}")), e))?;
    Ok(ProcRecord {
        role: role.to_string(),
        pid,
        start_time,
        argv: std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        log: log.to_path_buf(),
    })
}

fn log_file(path: &Path) -> Result<std::fs::File, LabError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| LabError::io(path, e))
}

/// Gives a lab process its stdio (none in, both outputs to `log`) and marks it as the lab's.
/// The caller's `VXNET_*` and `ETCD_*` variables are not passed on: the daemon and etcd read
/// settings from them (`VXNET_ETCD_USER`, `ETCD_DATA_DIR`, …), and a host is configured by
/// the lab alone.
pub(super) fn daemon_stdio(cmd: &mut Command, lab: &str, log: &Path) -> Result<(), LabError> {
    let out = log_file(log)?;
    let err = out.try_clone().map_err(|e| LabError::io(log, e))?;
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("VXNET_") || k.starts_with("ETCD_") {
            cmd.env_remove(&key);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("VXNET_LAB", lab);
    Ok(())
}

async fn build(opts: &LabOptions, dir: &Path, etcd_bin: &Path) -> Result<Lab, LabError> {
    let logs = dir.join("logs");
    for d in [dir.join("netns"), logs.clone()] {
        std::fs::create_dir_all(&d).map_err(|e| LabError::io(&d, e))?;
    }
    let mut hosts = Vec::with_capacity(opts.hosts);
    for k in 1..=opts.hosts {
        let name = format!("vm{k}");
        let addr = host_addr(opts.underlay, k).ok_or_else(|| {
            LabError::InvalidOption(format!("no address for {name} in {}", opts.underlay))
        })?;
        hosts.push(HostState {
            netns: dir.join("netns").join(&name),
            name,
            addr,
            init: None,
            processes: Vec::new(),
        });
    }
    let mut state = LabState {
        name: opts.name.clone(),
        dir: dir.to_path_buf(),
        underlay: opts.underlay,
        binary: opts.binary.clone(),
        complete: false,
        switch_netns: dir.join("netns").join("switch"),
        bridge: BRIDGE.to_string(),
        hosts,
        outside_netns: Some(dir.join("netns").join("outside")),
        etcd_ports: etcd_members(opts.etcd_members)
            .iter()
            .map(|(m, _)| m.client_port)
            .collect(),
        secure_store: opts.secure_store.then(|| SecureStore {
            pki_dir: dir.join("pki"),
            user: "vxnet".into(),
        }),
    };
    state.save()?;

    // The network: namespaces, the switch, each host's eth0.
    let switch = NetNs::create_named(&state.switch_netns)
        .map_err(|e| LabError::io(&state.switch_netns, e))?;
    let mut host_ns = Vec::with_capacity(state.hosts.len());
    for h in &state.hosts {
        host_ns.push(NetNs::create_named(&h.netns).map_err(|e| LabError::io(&h.netns, e))?);
    }
    wire(&state, &switch, &host_ns).await?;
    if let Some(path) = &state.outside_netns {
        let outside = NetNs::create_named(path).map_err(|e| LabError::io(path, e))?;
        wire_outside(&state, &switch, &outside, &host_ns).await?;
    }

    // Each host's init: its own mount and UTS namespaces.
    let mut inits = Vec::with_capacity(state.hosts.len());
    for (i, ns) in host_ns.iter().enumerate() {
        let h = &state.hosts[i];
        let fs = dir.join("hosts").join(&h.name).join("fs");
        let mut cmd = Command::new(&opts.binary);
        cmd.arg("lab")
            .arg("host-init")
            .arg("--lab-dir")
            .arg(dir)
            .arg("--hostname")
            .arg(&h.name);
        for inside in &opts.private_dirs {
            let source = fs.join(inside.strip_prefix("/").unwrap_or(inside));
            std::fs::create_dir_all(&source).map_err(|e| LabError::io(&source, e))?;
            cmd.arg("--private")
                .arg(format!("{}={}", inside.display(), source.display()));
        }
        super::cni::write_host_config(&fs, &opts.private_dirs)?;
        let log = logs.join(format!("{}-init.log", h.name));
        ns.command(&mut cmd)
            .map_err(|e| LabError::io(&h.netns, e))?;
        sys::new_session(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(&log)?)
            .env("VXNET_LAB", &opts.name);
        let child = cmd.spawn().map_err(|e| LabError::io(&opts.binary, e))?;
        state.hosts[i].init = Some(record("init", &child, &cmd, &log)?);
        state.save()?;
        inits.push((child, log));
    }
    for (i, (child, log)) in inits.iter_mut().enumerate() {
        wait_init(child, &state.hosts[i].name, log, opts.ready_timeout).await?;
    }
    drop(inits);
    let view = |state: &LabState| {
        Lab::from_state(LabState {
            complete: true,
            ..state.clone()
        })
    };

    // etcd on vm1: every member started first (a multi-member cluster serves only once a
    // majority runs), then each waited for.
    let vm1_addr = state.hosts[0].addr;
    let members = etcd_members(opts.etcd_members);
    let initial_cluster = members
        .iter()
        .map(|(m, _)| m.initial_cluster_entry(vm1_addr))
        .collect::<Vec<_>>()
        .join(",");
    let host_fs = |i: usize, inside: &str| {
        dir.join("hosts")
            .join(&state.hosts[i].name)
            .join("fs")
            .join(inside.trim_start_matches('/'))
    };
    let mut root_password = None;
    if let Some(secure) = &state.secure_store {
        let daemons: Vec<&str> = state.hosts[1..].iter().map(|h| h.name.as_str()).collect();
        let clients: Vec<&str> = std::iter::once("etcdctl").chain(daemons).collect();
        let pki = super::pki::make(&secure.pki_dir, &[vm1_addr], &clients).map_err(pki_err)?;
        let (root, vxnet) = (random_password(), random_password());
        for (user, pw) in [("root", &root), ("vxnet", &vxnet)] {
            super::pki::write_secret(&pki.dir.join(format!("{user}.password")), pw)
                .map_err(pki_err)?;
        }
        let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
        let files = |f: &[&Path]| f.iter().filter_map(|p| name(p)).collect::<Vec<_>>();
        let etcdctl = &pki.clients[0].1;
        install_pki(
            &pki.dir,
            &host_fs(0, VM1_PKI),
            &files(&[
                &pki.ca,
                &pki.server.cert,
                &pki.server.key,
                &etcdctl.cert,
                &etcdctl.key,
            ]),
        )?;
        for (i, (_, c)) in pki.clients.iter().enumerate().skip(1) {
            install_pki(
                &pki.dir,
                &host_fs(i, DAEMON_PKI),
                &files(&[&pki.ca, &c.cert, &c.key]),
            )?;
        }
        root_password = Some((root, vxnet));
    }
    let tls = state.secure_store.as_ref().map(|_| EtcdServerTls {
        ca: PathBuf::from(format!("{VM1_PKI}/ca.pem")),
        cert: PathBuf::from(format!("{VM1_PKI}/etcd.pem")),
        key: PathBuf::from(format!("{VM1_PKI}/etcd-key.pem")),
        client_cert_auth: true,
        etcdctl_cert: None,
    });
    let mut etcd_children = Vec::new();
    for (m, data_dir) in &members {
        let log_name = if members.len() == 1 {
            "vm1-etcd.log".to_string()
        } else {
            format!("vm1-{}.log", m.name)
        };
        let etcd_log = logs.join(log_name);
        let mut cmd = Command::new(etcd_bin);
        cmd.args(m.args_with(
            &[vm1_addr, Ipv4Addr::LOCALHOST],
            vm1_addr,
            &initial_cluster,
            data_dir,
            tls.as_ref(),
        ));
        if tls.is_some() {
            cmd.arg("--listen-metrics-urls").arg(format!(
                "http://127.0.0.1:{}",
                m.client_port + METRICS_PORT_OFFSET
            ));
        }
        daemon_stdio(&mut cmd, &opts.name, &etcd_log)?;
        view(&state)?.hosts[0].enter(&mut cmd, true)?;
        let child = cmd.spawn().map_err(|e| LabError::io(etcd_bin, e))?;
        state.hosts[0]
            .processes
            .push(record("etcd", &child, &cmd, &etcd_log)?);
        state.save()?;
        etcd_children.push((child, m.client_port, etcd_log));
    }
    let secure = state.secure_store.is_some();
    futures::future::try_join_all(etcd_children.iter_mut().map(|(child, port, log)| {
        wait_etcd(
            child,
            &state.hosts[0].netns,
            health_addr(secure, SocketAddr::from((vm1_addr, *port))),
            log,
            opts.ready_timeout,
        )
    }))
    .await?;
    drop(etcd_children);
    if let Some((root, vxnet)) = &root_password {
        let vm1 = view(&state)?;
        let endpoint = format!("https://127.0.0.1:{CLIENT_PORT}");
        super::etcd::enable_auth(
            |args| {
                let mut cmd = vm1.hosts[0].command("etcdctl")?;
                cmd.env("ETCDCTL_API", "3")
                    .arg("--endpoints")
                    .arg(&endpoint)
                    .args(SecureStore::vm1_etcdctl_args())
                    .args(args);
                cmd.output()
                    .map_err(|e| LabError::io(Path::new("etcdctl"), e))
            },
            root,
            &[PrefixUser {
                name: "vxnet",
                password: vxnet,
                prefix: SECURE_PREFIX,
            }],
        )?;
    }

    // A daemon on every other host, with the defaults a real host would have.
    let lab = view(&state)?;
    let store = lab.cluster_store();
    let mut daemons = Vec::new();
    for i in 1..state.hosts.len() {
        let (name, addr) = (state.hosts[i].name.clone(), state.hosts[i].addr);
        let log = logs.join(format!("{name}-daemon.log"));
        let mut cmd = Command::new(&opts.binary);
        cmd.arg("daemon")
            .arg("--cluster-store")
            .arg(&store)
            .arg("--cluster-advertise")
            .arg(addr.to_string())
            .arg("--docker-plugin")
            .arg("--docker-scope")
            .arg(opts.docker_scope.as_str())
            .args(&opts.daemon_args)
            .env(
                "RUST_LOG",
                std::env::var("VXNET_LAB_LOG").unwrap_or_else(|_| "info".into()),
            );
        daemon_stdio(&mut cmd, &opts.name, &log)?;
        if let Some(secure) = &state.secure_store {
            cmd.args(SecureStore::daemon_args(&name))
                .env("VXNET_ETCD_USER", secure.credentials()?);
        }
        lab.hosts[i].enter(&mut cmd, true)?;
        let child = cmd.spawn().map_err(|e| LabError::io(&opts.binary, e))?;
        state.hosts[i]
            .processes
            .push(record("daemon", &child, &cmd, &log)?);
        state.save()?;
        daemons.push((child, lab.hosts[i].socket_path(), name, log));
    }
    futures::future::try_join_all(daemons.iter_mut().map(|(child, socket, name, log)| {
        wait_daemon(child, socket, name, log, opts.ready_timeout, true)
    }))
    .await?;

    state.complete = true;
    state.save()?;
    Lab::from_state(state)
}

fn exit_error(what: String, status: std::process::ExitStatus, log: &Path) -> LabError {
    LabError::ProcessFailed {
        what,
        detail: format!(
            "exited with {status}; its log ({}) ends with:\n{}",
            log.display(),
            sys::log_tail(log, 15)
        ),
    }
}

/// Waits for a host init's report on its stdout ("ready" or "error: …").
async fn wait_init(
    child: &mut Child,
    host: &str,
    log: &Path,
    limit: Duration,
) -> Result<(), LabError> {
    let what = format!("vxnet lab host-init for {host}");
    let Some(out) = child.stdout.take() else {
        return Err(LabError::ProcessFailed {
            what,
            detail: "no stdout pipe".into(),
        });
    };
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(out))
        .map_err(|e| LabError::io(Path::new("host-init stdout"), e))?;
    let mut text = String::new();
    let read = tokio::time::timeout(limit, pipe.read_to_string(&mut text)).await;
    if text.lines().next() == Some(READY) {
        return Ok(());
    }
    if let Ok(Some(status)) = child.try_wait() {
        return Err(exit_error(what, status, log));
    }
    Err(LabError::ProcessFailed {
        what,
        detail: match read {
            Err(_) => format!("no report after {limit:?}"),
            Ok(_) => text.trim().to_string(),
        },
    })
}

/// Where etcd member `client` (its client address) answers `/health` in plain HTTP: its
/// client port, or in a secure lab its metrics listener on vm1's loopback.
fn health_addr(secure: bool, client: SocketAddr) -> SocketAddr {
    if secure {
        SocketAddr::from((Ipv4Addr::LOCALHOST, client.port() + METRICS_PORT_OFFSET))
    } else {
        client
    }
}

/// GET /health from inside `netns`: etcd answers `{"health":"true"}` once it serves.
fn etcd_healthy(netns: &Path, target: SocketAddr) -> bool {
    let Ok(ns) = NetNs::open(netns) else {
        return false;
    };
    ns.run(|| {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_millis(300))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer.contains("\"health\":\"true\""))
    })
    .unwrap_or(false)
}

async fn wait_etcd(
    child: &mut Child,
    netns: &Path,
    addr: SocketAddr,
    log: &Path,
    limit: Duration,
) -> Result<(), LabError> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(exit_error("etcd on vm1".into(), status, log));
        }
        let ns = netns.to_path_buf();
        if tokio::task::spawn_blocking(move || etcd_healthy(&ns, addr))
            .await
            .unwrap_or(false)
        {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(LabError::ProcessFailed {
                what: "etcd on vm1".into(),
                detail: format!(
                    "not healthy on {addr} after {limit:?}; its log ({}) ends with:\n{}",
                    log.display(),
                    sys::log_tail(log, 15)
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_daemon(
    child: &mut Child,
    socket: &Path,
    host: &str,
    log: &Path,
    limit: Duration,
    need_synced: bool,
) -> Result<(), LabError> {
    let what = format!("vxnet daemon on {host}");
    let client = Client::from_socket(socket.to_path_buf());
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(exit_error(what, status, log));
        }
        if let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(2), client.info()).await {
            if info.synced || !need_synced {
                return Ok(());
            }
        }
        if started.elapsed() > limit {
            return Err(LabError::ProcessFailed {
                what,
                detail: format!(
                    "not registered and synced after {limit:?} (socket {}); its log ({}) ends with:\n{}",
                    socket.display(),
                    log.display(),
                    sys::log_tail(log, 15)
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Removes a lab, whatever state it is in: stops the processes recorded in `lab.json` (after
/// checking each PID's start time), unmounts and deletes its namespace files, removes its
/// directory. Missing pieces are fine, so it can run twice or after a crash.
/// Everything running inside the lab's hosts: in a host's mount namespace, or in one made
/// from it (a `vxnet run` container's), which still holds the host's private directories.
fn lab_guests(dir: &Path, host_mnt: &[(u64, u64)], ours: &[u32]) -> Vec<ProcRecord> {
    let mut guests = sys::processes_in_mount_ns(host_mnt, ours);
    for g in sys::processes_with_mounts_from(&dir.join("hosts"), ours) {
        if !guests.iter().any(|p| p.pid == g.pid) {
            guests.push(g);
        }
    }
    guests
}

fn teardown(dir: &Path) -> Result<DownReport, LabError> {
    let mut report = DownReport::default();
    if std::fs::symlink_metadata(dir).is_err() {
        return Ok(report);
    }
    report.existed = true;
    // An unreadable state file cannot name processes; the rest is still removed.
    let state = LabState::load(dir).ok().flatten();
    let mut stray = super::cni::StrayCgroups::default();
    if let Some(state) = &state {
        // Found first: containerd's part of them is named in the hosts' /run, gone with the
        // hosts.
        stray = super::cni::StrayCgroups::find(state);
        // Containers first (Docker's, containerd's, Podman's): they run in mount namespaces
        // of their own (not the hosts'), so only their cgroups name them; their engines then
        // stop without waiting for them.
        let containers = super::docker::stop_containers_of_lab(state);
        report.stopped += containers.stopped;
        report.stuck.extend(containers.stuck);
        let strays = stray.stop();
        report.stopped += strays.stopped;
        report.stuck.extend(strays.stuck);
        let all: Vec<&ProcRecord> = state.hosts.iter().flat_map(|h| &h.processes).collect();
        let inits: Vec<&ProcRecord> = state.hosts.iter().filter_map(|h| h.init.as_ref()).collect();
        // Daemons first (while etcd still answers), then etcd, then whatever else runs inside
        // the hosts (containers started there, `lab exec` commands: a VM's shutdown ends them
        // too), then the hosts' inits.
        // An init that has not unshared its mount namespace yet (a lab torn down while it
        // was coming up) is still in ours, the machine's: sweeping that one would signal
        // every process of the machine, other labs' inits starting up among them.
        let own_mnt = sys::ns_inode(Path::new("/proc/thread-self/ns/mnt"));
        // Held open until the last sweep below: a namespace's inode number is reused by the
        // next namespace made once the last process in it is gone, and the inits are stopped
        // before the last sweep (which would then match another lab's host starting up).
        let held: Vec<(std::fs::File, (u64, u64))> = inits
            .iter()
            .filter(|p| p.is_alive())
            .filter_map(|p| {
                use std::os::unix::fs::MetadataExt;
                let f = std::fs::File::open(format!("/proc/{}/ns/mnt", p.pid)).ok()?;
                let m = f.metadata().ok()?;
                Some((f, (m.dev(), m.ino())))
            })
            .filter(|(_, m)| Some(*m) != own_mnt)
            .collect();
        let host_mnt: Vec<(u64, u64)> = held.iter().map(|(_, m)| *m).collect();
        let mut ours: Vec<u32> = all.iter().chain(inits.iter()).map(|p| p.pid).collect();
        ours.push(std::process::id());
        let mut phases: Vec<Vec<&ProcRecord>> = vec![
            all.iter().copied().filter(|p| p.role != "etcd").collect(),
            all.iter().copied().filter(|p| p.role == "etcd").collect(),
        ];
        let guests = lab_guests(dir, &host_mnt, &ours);
        phases.push(guests.iter().collect());
        phases.push(inits);
        for phase in phases {
            let out = sys::stop(&phase, Duration::from_secs(5));
            report.stopped += out.stopped;
            report.gone += out.gone;
            report.stuck.extend(out.stuck);
        }
        // A container (and its shim) that dockerd was starting while the passes above ran
        // escaped them: look again now that nothing can start any more.
        let late = super::docker::stop_containers_of_lab(state);
        report.stopped += late.stopped;
        report.stuck.extend(late.stuck);
        let late = stray.stop();
        report.stopped += late.stopped;
        report.stuck.extend(late.stuck);
        let late_guests = lab_guests(dir, &host_mnt, &ours);
        let out = sys::stop(
            &late_guests.iter().collect::<Vec<_>>(),
            Duration::from_secs(5),
        );
        report.stopped += out.stopped;
        report.stuck.extend(out.stuck);
        drop(held);
    }
    let netns_dir = dir.join("netns");
    let ns_files: Vec<PathBuf> = std::fs::read_dir(&netns_dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    let inodes: Vec<(u64, u64)> = ns_files.iter().filter_map(|p| sys::ns_inode(p)).collect();
    for m in sys::mounts_under(dir)
        .map_err(|e| LabError::io(Path::new("/proc/thread-self/mountinfo"), e))?
    {
        match umount2(&m, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => {
                return Err(LabError::io(
                    &m,
                    std::io::Error::from_raw_os_error(e as i32),
                ))
            }
        }
    }
    for f in &ns_files {
        NetNs::remove_named(f).map_err(|e| LabError::io(f, e))?;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(LabError::io(dir, e)),
    }
    if let Some(state) = &state {
        super::docker::remove_cgroups_of_lab(state);
    }
    stray.remove();
    report.strangers = sys::processes_in_netns(&inodes);
    Ok(report)
}
