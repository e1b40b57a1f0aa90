//! Real CNI clients inside lab hosts: containerd 1.6 (`ctr run --cni`) and Podman 4.3 (CNI
//! backend), the two runtimes vxnet's CNI plugin is tested against, with nothing of them left
//! after `lab down`.
//!
//! Everything either runtime reads or writes is the host's own: the CNI configurations
//! (`/etc/cni/net.d`), plugins (`/opt/cni/bin`, then the machine's reference plugins in
//! `/usr/lib/cni`), IPAM state and result caches (`/var/lib/cni`), containerd's root, Podman's
//! storage and configuration are private directories of every lab host (bound from
//! `hosts/vmK/fs/…`, see `DEFAULT_PRIVATE_DIRS`); containerd's state and socket, runc's
//! state, Podman's run root, locks and network namespaces (`/run/netns/netns-<uuid>`) are in
//! the host's private `/run`. Before any of it is used, the host is checked to really have
//! those directories to itself (a lab made with other private directories would otherwise
//! write into the machine's).
//!
//! - containerd gets a configuration of its own (`--config /run/containerd-lab/config.toml`):
//!   not the machine's `/etc/containerd/config.toml`, and not the paths of the containerd that
//!   dockerd starts on the same host (`/run/docker/containerd`, root
//!   `/var/lib/docker/containerd`); its `opt` directory is moved from `/opt/containerd` (the
//!   machine's) into its root; the CRI plugin is off (no kubelet here).
//! - ctr uses the containerd namespace `vxnet-lab-LAB-HOST`, whose default cgroup for a
//!   container is `/vxnet-lab-LAB-HOST/ID`: the host's cgroup parent, as for Docker
//!   (`docker.rs`), which is how `lab down` finds and kills the containers, whatever started
//!   them. `ctr run --rootfs` gives a container no environment: [`Lab::ctr_run`] sets PATH.
//! - Podman is configured by files of the host (`/etc/containers/containers.conf`,
//!   `storage.conf`, `policy.json`, written by `lab up`; its short-name cache in
//!   `/var/cache/containers` is private too): runc (crun fails here: "cgroups in
//!   hybrid mode not supported"), cgroupfs, file events and file locks (Podman's default
//!   locks are a shared-memory segment in the machine's `/dev/shm`, which outlives the lab
//!   and is shared with every other Podman of the machine), ulimits this machine's hard limits
//!   allow, NET_RAW (busybox ping opens a raw socket; Docker grants it by default, Podman
//!   does not). Podman has no configurable cgroup parent: [`Host::podman_run`] passes
//!   `--cgroup-parent`. A container started without it (`lab exec vm2 -- podman run …`)
//!   lands in `/libpod_parent`; `lab down` finds it through its OCI configuration (see
//!   `StrayCgroups`). [`Host::podman`] also sets TMPDIR: Podman creates a probe file in
//!   `/var/tmp` (the machine's) on every `run` otherwise; `lab exec … podman` does not get it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::docker::run;
use super::etcd::find_program;
use super::hosts::{daemon_stdio, record, LabState};
use super::sys::{self, ProcRecord, StopOutcome};
use super::{Host, Lab, LabError};

/// The role of the lab's containerd in `lab.json`.
pub const ROLE: &str = "containerd";
/// containerd's state directory inside a host (dockerd's containerd uses
/// `/run/docker/containerd`).
pub const CONTAINERD_STATE: &str = "/run/containerd-lab";
/// containerd's socket inside a host (`ctr -a`).
pub const CONTAINERD_SOCKET: &str = "/run/containerd-lab/containerd.sock";
const CONTAINERD_CONFIG: &str = "/run/containerd-lab/config.toml";
const CONTAINERD_ROOT: &str = "/var/lib/containerd";
/// Where CNI configurations are read from (ctr: the first file by name; Podman: every one).
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// The plugin directory searched first (then the reference plugins in `/usr/lib/cni`).
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// The reference plugins (Debian's containernetworking-plugins).
pub const CNI_REFERENCE_DIR: &str = "/usr/lib/cni";
const CNI_STATE_DIR: &str = "/var/lib/cni";
/// The busybox root filesystem of ctr's containers, inside a host (see [`Lab::cni_rootfs`]).
pub const CNI_ROOTFS: &str = "/var/lib/containerd/vxnet-bb";
/// vxnet's name server address on each network: what the ctr containers' resolv.conf names
/// (ctr writes no resolv.conf of its own).
pub const NAME_SERVER: &str = "169.254.53.53";
const PODMAN_DIR: &str = "/var/lib/containers";
const PODMAN_ROOT: &str = "/var/lib/containers/storage";
const PODMAN_RUNROOT: &str = "/run/containers/storage";
const PODMAN_TMP: &str = "/run/libpod";
/// Podman's temporary files and copies of images (default `/var/tmp`, the machine's).
const PODMAN_COPY_TMP: &str = "/var/lib/containers/tmp";
const PODMAN_CONF_DIR: &str = "/etc/containers";
/// Podman's short-name alias cache (and its lock).
const PODMAN_CACHE_DIR: &str = "/var/cache/containers";
pub const CONTAINERS_CONF: &str = "/etc/containers/containers.conf";
pub const CONTAINERS_STORAGE_CONF: &str = "/etc/containers/storage.conf";
/// Podman's storage driver: overlay works on the lab dir's tmpfs (as dockerd's overlay2).
const PODMAN_DRIVER: &str = "overlay";
/// The containerd namespace for lab names that are not valid containerd identifiers.
const FALLBACK_NAMESPACE: &str = "vxnet-lab";
/// Where Podman puts containers started without `--cgroup-parent` (with cgroupfs).
const PODMAN_DEFAULT_PARENT: &str = "/libpod_parent";

const CONTAINERS_CONF_TEXT: &str = r#"# Written by vxnet's lab: Podman on a lab host.
[containers]
# Podman's defaults exceed this machine's hard limits.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
# Podman's defaults plus NET_RAW (busybox ping opens a raw socket).
default_capabilities = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"]
default_sysctls = ["net.ipv4.ping_group_range=0 0"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
network_config_dir = "/etc/cni/net.d"

[engine]
# crun fails here: "cgroups in hybrid mode not supported".
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
# Not the shared-memory segment in the machine's /dev/shm.
lock_type = "file"
tmp_dir = "/run/libpod"
image_copy_tmp_dir = "/var/lib/containers/tmp"
"#;

const STORAGE_CONF_TEXT: &str = r#"# Written by vxnet's lab: Podman's storage on a lab host.
[storage]
driver = "overlay"
graphroot = "/var/lib/containers/storage"
runroot = "/run/containers/storage"
"#;

/// `podman import` checks the signature policy; images here come from the lab's own tarball.
const POLICY_TEXT: &str = r#"{"default": [{"type": "insecureAcceptAnything"}]}
"#;

fn containerd_config() -> String {
    format!(
        r#"# Written by vxnet's lab: the lab's containerd on this host.
version = 2
root = "{CONTAINERD_ROOT}"
state = "{CONTAINERD_STATE}"
# CRI is the kubelet's; the other snapshotters only probe and complain.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{CONTAINERD_SOCKET}"

# Default /opt/containerd: the machine's.
[plugins."io.containerd.internal.v1.opt"]
  path = "{CONTAINERD_ROOT}/opt"
"#
    )
}

/// A program on PATH, or in Debian's sbin and bin directories (runc is in /usr/sbin, which
/// a non-login PATH may lack).
fn program(name: &'static str, package: &'static str) -> Result<PathBuf, LabError> {
    find_program(name)
        .or_else(|| {
            ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
        })
        .ok_or(LabError::MissingProgram {
            program: name,
            package,
        })
}

/// Whether `s` is a containerd identifier (namespace or container ID): alphanumeric runs
/// joined by single `.`, `_` or `-`, at most 76 characters.
fn is_identifier(s: &str) -> bool {
    let mut prev_sep = true;
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            prev_sep = false;
        } else if matches!(c, '.' | '_' | '-') && !prev_sep {
            prev_sep = true;
        } else {
            return false;
        }
    }
    !s.is_empty() && s.len() <= 76 && !prev_sep
}

/// The containerd namespace of a host's ctr: its cgroup parent's name, so that ctr's default
/// cgroup (`/NAMESPACE/ID`) is under the parent.
fn containerd_namespace(lab: &str, host: &str) -> String {
    let parent = super::docker::cgroup_parent(lab, host);
    let name = parent.trim_start_matches('/');
    if is_identifier(name) {
        name.to_string()
    } else {
        FALLBACK_NAMESPACE.to_string()
    }
}

/// The environment [`Host::command`] gives every command on a host: ctr and Podman find the
/// host's own containerd and configuration (also in `lab exec`).
pub(super) fn host_env(lab: &str, host: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CONTAINERD_ADDRESS", CONTAINERD_SOCKET.to_string()),
        ("CONTAINERD_NAMESPACE", containerd_namespace(lab, host)),
        ("CONTAINERS_CONF", CONTAINERS_CONF.to_string()),
        (
            "CONTAINERS_STORAGE_CONF",
            CONTAINERS_STORAGE_CONF.to_string(),
        ),
    ]
}

fn write(path: &Path, text: &str) -> Result<(), LabError> {
    std::fs::write(path, text).map_err(|e| LabError::io(path, e))
}

fn create_dir(path: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(path).map_err(|e| LabError::io(path, e))
}

/// Writes Podman's configuration and the CNI directories into a new host's private
/// directories (`fs`: the host's `hosts/vmK/fs`), if they are private in this lab: then
/// `lab exec vmK -- podman …` works as on a host with Podman installed.
pub(super) fn write_host_config(fs: &Path, private_dirs: &[PathBuf]) -> Result<(), LabError> {
    let private = |d: &str| private_dirs.iter().any(|p| p == Path::new(d));
    let inside = |d: &str| fs.join(d.trim_start_matches('/'));
    if private("/etc/cni") {
        create_dir(&inside(CNI_CONF_DIR))?;
    }
    if private(PODMAN_CONF_DIR) && private(PODMAN_DIR) {
        write(&inside(CONTAINERS_CONF), CONTAINERS_CONF_TEXT)?;
        write(&inside(CONTAINERS_STORAGE_CONF), STORAGE_CONF_TEXT)?;
        write(&inside("/etc/containers/policy.json"), POLICY_TEXT)?;
        create_dir(&inside(PODMAN_COPY_TMP))?;
    }
    Ok(())
}

impl Host {
    /// `path` (inside the host) as reachable from outside: through the init's root.
    fn outside(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.init_pid()))
    }

    /// Fails unless each of `dirs` is a mount point in the host (one of its private
    /// directories): `what` would otherwise write into the machine's.
    fn require_private(&self, dirs: &[&str], what: &str) -> Result<(), LabError> {
        let table = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.init_pid()))
            .ok()
            .filter(|_| self.init().is_alive())
            .ok_or_else(|| LabError::HostDown {
                lab: self.lab().to_string(),
                host: self.name().to_string(),
                detail: String::new(),
            })?;
        let points: Vec<&str> = table.lines().filter_map(|l| l.split(' ').nth(4)).collect();
        match dirs.iter().find(|d| !points.contains(d)) {
            None => Ok(()),
            Some(d) => Err(LabError::InvalidOption(format!(
                "{d} is not a private directory of {} (the lab was made without it): {what} \
                 would write into the machine's {d}; keep the default private directories",
                self.name()
            ))),
        }
    }

    /// The cgroup parent of the host's containers (`/vxnet-lab-LAB-HOST`), for
    /// `ctr run --cgroup PARENT/ID` and `podman run --cgroup-parent PARENT`.
    pub fn cgroup_parent(&self) -> String {
        super::docker::cgroup_parent(self.lab(), self.name())
    }

    /// The host's containerd namespace for ctr (`vxnet-lab-LAB-HOST`).
    pub fn containerd_namespace(&self) -> String {
        containerd_namespace(self.lab(), self.name())
    }

    /// The host's containerd socket as reachable from outside the host.
    pub fn containerd_socket_path(&self) -> PathBuf {
        self.outside(CONTAINERD_SOCKET)
    }

    /// A `ctr -a /run/containerd-lab/containerd.sock -n vxnet-lab-LAB-HOST` command on this
    /// host, talking to the host's containerd (started by [`Lab::start_containerd`]).
    pub fn ctr(&self) -> Result<Command, LabError> {
        let mut cmd = self.command(program("ctr", "containerd")?)?;
        cmd.args(["-a", CONTAINERD_SOCKET, "-n"])
            .arg(self.containerd_namespace());
        Ok(cmd)
    }

    /// A `podman` command on this host with the host's storage (`--root`, `--runroot`,
    /// overlay), runc, cgroupfs and its CNI configuration directory. The host's
    /// containers.conf (written by `lab up`) gives the rest. Containers it runs should be
    /// given `--cgroup-parent` [`Host::cgroup_parent`] ([`Host::podman_run`] does).
    pub fn podman(&self) -> Result<Command, LabError> {
        self.require_private(
            &[PODMAN_DIR, PODMAN_CONF_DIR, PODMAN_CACHE_DIR, CNI_STATE_DIR],
            "podman",
        )?;
        let mut cmd = self.command(program("podman", "podman")?)?;
        // The caller's Podman settings (CONTAINER_HOST, CONTAINERS_REGISTRIES_CONF, …) are
        // not the host's.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if (k.starts_with("CONTAINERS_") || k.starts_with("CONTAINER_"))
                && k != "CONTAINERS_CONF"
                && k != "CONTAINERS_STORAGE_CONF"
            {
                cmd.env_remove(&key);
            }
        }
        // Podman probes and stages files in TMPDIR, /var/tmp (the machine's) by default.
        cmd.env("TMPDIR", PODMAN_COPY_TMP);
        cmd.args([
            "--root",
            PODMAN_ROOT,
            "--runroot",
            PODMAN_RUNROOT,
            "--storage-driver",
            PODMAN_DRIVER,
            "--cgroup-manager",
            "cgroupfs",
            "--runtime",
            "runc",
            "--tmpdir",
            PODMAN_TMP,
            "--events-backend",
            "file",
            "--network-config-dir",
            CNI_CONF_DIR,
        ]);
        Ok(cmd)
    }

    /// `podman … run --cgroup-parent /vxnet-lab-LAB-HOST`: add the run options, the image and
    /// the command. The container and its conmon (`PARENT/conmon`) are then under the host's
    /// cgroup parent.
    pub fn podman_run(&self) -> Result<Command, LabError> {
        let mut cmd = self.podman()?;
        cmd.arg("run")
            .arg("--cgroup-parent")
            .arg(self.cgroup_parent());
        Ok(cmd)
    }
}

/// A file name for a host's CNI directories: one path component.
fn check_file_name(name: &str) -> Result<(), LabError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(LabError::InvalidOption(format!(
            "CNI file name {name:?}: give a plain file name"
        )));
    }
    Ok(())
}

/// Replaces the contents of `dir` by `files` (name, contents, mode): each is written aside
/// and renamed into place (a plugin binary being executed cannot be rewritten in place), then
/// every other entry is removed.
fn replace_dir(dir: &Path, files: &[(String, Vec<u8>, u32)]) -> Result<(), LabError> {
    use std::os::unix::fs::PermissionsExt;
    create_dir(dir)?;
    let unique = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
    for (name, bytes, mode) in files {
        let tmp = dir.join(format!(".{name}.{unique}"));
        std::fs::write(&tmp, bytes).map_err(|e| LabError::io(&tmp, e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| LabError::io(&tmp, e))?;
        let to = dir.join(name);
        std::fs::rename(&tmp, &to).map_err(|e| LabError::io(&to, e))?;
    }
    let entries = std::fs::read_dir(dir).map_err(|e| LabError::io(dir, e))?;
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if files.iter().any(|(n, _, _)| *n == name) {
            continue;
        }
        let path = e.path();
        let removed = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| LabError::io(&path, e))?;
    }
    Ok(())
}

/// A process running now, as a record to signal (checked by start time when signalled).
fn running(pid: u32, role: &str) -> Option<ProcRecord> {
    let (start_time, _) = sys::stat_of(pid)?;
    Some(ProcRecord {
        role: role.into(),
        pid,
        start_time,
        argv: vec![],
        log: PathBuf::new(),
    })
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` is the lab's containerd or one of its shims (by their command lines:
/// `--config /run/containerd-lab/…`, `-address /run/containerd-lab/…`), not dockerd's.
pub(super) fn is_lab_containerd(pid: u32) -> bool {
    let prefix = format!("{CONTAINERD_STATE}/");
    cmdline(pid).iter().any(|a| a.starts_with(&prefix))
}

/// The lab containerd's shims on `h` (in the host's mount namespace).
fn shims(h: &Host) -> Vec<ProcRecord> {
    let Some(mnt) = sys::ns_inode(Path::new(&format!("/proc/{}/ns/mnt", h.init_pid()))) else {
        return Vec::new();
    };
    sys::processes_in_mount_ns(&[mnt], &[h.init_pid()])
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                .is_ok_and(|c| c.starts_with("containerd-shim"))
                && is_lab_containerd(p.pid)
        })
        .map(|p| ProcRecord {
            role: "containerd-shim".into(),
            ..p
        })
        .collect()
}

/// The processes whose parent is one of `parents` (a shim's children are its containers'
/// first processes; SIGKILL to one ends its whole PID namespace).
fn children_of(parents: &[ProcRecord]) -> Vec<ProcRecord> {
    let pids: Vec<u32> = parents
        .iter()
        .filter(|p| p.is_alive())
        .map(|p| p.pid)
        .collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            crate::container::process::stat(*pid).is_ok_and(|s| pids.contains(&(s.ppid as u32)))
        })
        .filter_map(|pid| running(pid, "container"))
        .collect()
}

/// `linux.cgroupsPath` of an OCI runtime configuration, if it names a cgroupfs path of the
/// container `id` (its last component holds the ID: never a shared cgroup, never a
/// hierarchy's root).
fn container_cgroup(config: &Path, id: &str) -> Option<String> {
    let text = std::fs::read(config).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let path = v["linux"]["cgroupsPath"].as_str()?;
    let last = path.rsplit('/').next()?;
    let ok = path.starts_with('/')
        && !path.contains(':')
        && !path.split('/').any(|c| c == "..")
        && last.contains(id);
    ok.then(|| path.to_string())
}

/// The cgroups (cgroupsPath) of the containers the lab's containerd on the host whose init
/// is `init_pid` has bundles for
/// (`/run/containerd-lab/io.containerd.runtime.v2.task/NAMESPACE/ID/config.json`).
fn containerd_cgroups(init_pid: u32) -> Vec<String> {
    let tasks = PathBuf::from(format!(
        "/proc/{init_pid}/root{CONTAINERD_STATE}/io.containerd.runtime.v2.task"
    ));
    let mut out = Vec::new();
    for ns in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
        for c in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            let id = c.file_name().to_string_lossy().into_owned();
            if let Some(cg) = container_cgroup(&c.path().join("config.json"), &id) {
                out.push(cg);
            }
        }
    }
    out
}

/// Cgroups of containers that the lab's containerd or Podman made on the lab's hosts, named by
/// the containers' OCI configurations: also those outside the hosts' cgroup parents (`lab
/// exec vm2 -- podman run …` without `--cgroup-parent` puts a container in
/// `/libpod_parent/libpod-ID` and its conmon in `/libpod_parent/conmon`).
#[derive(Debug, Default)]
pub(super) struct StrayCgroups {
    /// Each container's cgroup (its processes are killed, the cgroup removed).
    containers: Vec<String>,
    /// Podman's conmon cgroups beside them, and `/libpod_parent` (removed if empty).
    parents: Vec<String>,
}

impl StrayCgroups {
    /// Reads the containers' configurations: containerd's bundles in each live host's /run,
    /// Podman's in each host's storage in the lab dir (readable even when the host is gone).
    pub(super) fn find(state: &LabState) -> Self {
        let own: Vec<String> = state
            .hosts
            .iter()
            .map(|h| super::docker::cgroup_parent(&state.name, &h.name))
            .collect();
        let mut found = StrayCgroups::default();
        let mut add = |cg: String, podman: bool| {
            // The hosts' own parents are swept (and removed) whole already.
            if own.iter().any(|o| Path::new(&cg).starts_with(o)) || found.containers.contains(&cg) {
                return;
            }
            if let Some((parent, _)) = cg.rsplit_once('/').filter(|_| podman) {
                let conmon = format!("{parent}/conmon");
                if !found.parents.contains(&conmon) {
                    found.parents.push(conmon);
                }
                // Only Podman's default parent goes: one given with --cgroup-parent may be
                // anybody's.
                if parent == PODMAN_DEFAULT_PARENT && !found.parents.iter().any(|p| p == parent) {
                    found.parents.push(parent.to_string());
                }
            }
            found.containers.push(cg);
        };
        for h in &state.hosts {
            if let Some(init) = h.init.as_ref().filter(|i| i.is_alive()) {
                for cg in containerd_cgroups(init.pid) {
                    add(cg, false);
                }
            }
            let storage = state
                .dir
                .join("hosts")
                .join(&h.name)
                .join("fs")
                .join(PODMAN_ROOT.trim_start_matches('/'));
            for d in std::fs::read_dir(&storage).into_iter().flatten().flatten() {
                // overlay-containers, vfs-containers: one per storage driver.
                if !d.file_name().to_string_lossy().ends_with("-containers") {
                    continue;
                }
                for c in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                    let id = c.file_name().to_string_lossy().into_owned();
                    let config = c.path().join("userdata").join("config.json");
                    if let Some(cg) = container_cgroup(&config, &id) {
                        add(cg, true);
                    }
                }
            }
        }
        found
    }

    /// Kills (SIGKILL) every process in the containers' cgroups.
    pub(super) fn stop(&self) -> StopOutcome {
        let dirs: Vec<PathBuf> = self
            .containers
            .iter()
            .flat_map(|c| super::docker::cgroup_tree(c))
            .collect();
        super::docker::kill_cgroups(&dirs)
    }

    /// Removes the containers' cgroups, then the conmon cgroups and `/libpod_parent` if
    /// empty (Podman makes them again when it needs them). Best effort, like
    /// [`super::docker::remove_cgroups`]: a cgroup still in use stays.
    pub(super) fn remove(&self) {
        for c in &self.containers {
            for d in super::docker::cgroup_tree(c) {
                let _ = std::fs::remove_dir(&d);
            }
        }
        // Each directory alone (not what is below it: other containers').
        for p in &self.parents {
            for h in super::docker::hierarchies() {
                let _ = std::fs::remove_dir(h.join(p.trim_start_matches('/')));
            }
        }
    }
}

impl Lab {
    /// Starts the lab's containerd on `host` (vm2…) in the background and waits until it
    /// answers `ctr version`. It is recorded in `lab.json` (role `containerd`, log
    /// `logs/vmK-containerd.log`) and stopped by `lab down` with its shims and containers. If
    /// the host's containerd already runs, only waits for it.
    pub async fn start_containerd(&self, host: &str) -> Result<(), LabError> {
        let i = self.daemon_host_for(host, "containerd")?;
        let h = &self.hosts()[i];
        h.require_private(
            &[CONTAINERD_ROOT, "/etc/cni", CNI_BIN_DIR, CNI_STATE_DIR],
            "containerd",
        )?;
        let containerd = program("containerd", "containerd")?;
        // Looked for here so that a missing one is named now, not in a failed `ctr run`.
        program("containerd-shim-runc-v2", "containerd")?;
        program("runc", "runc")?;
        let log = self
            .dir()
            .join("logs")
            .join(format!("{host}-containerd.log"));
        let child = {
            // No await while the lock is held: it blocks the thread.
            let lock = super::hosts::LabState::lock(self.dir())?;
            let mut state = self.current_state()?;
            let hs = &mut state.hosts[i];
            if let Some(running) = hs.processes.iter().find(|p| p.role == ROLE && p.is_alive()) {
                let pid = running.pid;
                drop(lock);
                return wait_containerd(h, None, pid, &log).await;
            }
            hs.processes.retain(|p| p.role != ROLE);
            let state_dir = h.outside(CONTAINERD_STATE);
            create_dir(&state_dir)?;
            write(&h.outside(CONTAINERD_CONFIG), &containerd_config())?;
            let mut cmd = Command::new(&containerd);
            cmd.arg("--config").arg(CONTAINERD_CONFIG);
            daemon_stdio(&mut cmd, self.name(), &log)?;
            // The caller's containerd settings are not the host's.
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("CONTAINERD_") {
                    cmd.env_remove(&key);
                }
            }
            h.enter(&mut cmd, true)?;
            let child = cmd.spawn().map_err(|e| LabError::io(&containerd, e))?;
            hs.processes.push(record(ROLE, &child, &cmd, &log)?);
            state.save()?;
            child
        };
        let pid = child.id();
        wait_containerd(h, Some(child), pid, &log).await
    }

    /// Stops the lab's containerd on `host`: first its containers (SIGKILL), then containerd
    /// (SIGTERM; SIGKILL after 5 s), then its shims; removes the containers' cgroups and
    /// containerd's record. Containers of dockerd or Podman on the host are left alone.
    /// Whether containerd was running.
    pub fn stop_containerd(&self, host: &str) -> Result<bool, LabError> {
        let i = self.daemon_host_for(host, "containerd")?;
        let h = &self.hosts()[i];
        let recs: Vec<ProcRecord> = self.current_state()?.hosts[i]
            .processes
            .iter()
            .filter(|p| p.role == ROLE)
            .cloned()
            .collect();
        let cgroups = containerd_cgroups(h.init_pid());
        let dirs: Vec<PathBuf> = cgroups
            .iter()
            .flat_map(|c| super::docker::cgroup_tree(c))
            .collect();
        let mut stuck = super::docker::kill_cgroups(&dirs).stuck;
        let inits = children_of(&shims(h));
        let refs: Vec<&ProcRecord> = inits.iter().collect();
        stuck.extend(sys::stop_with(&refs, libc::SIGKILL, Duration::from_secs(5)).stuck);
        let refs: Vec<&ProcRecord> = recs.iter().collect();
        let out = sys::stop(&refs, Duration::from_secs(5));
        stuck.extend(out.stuck);
        // Shims outlive containerd (they are the machine's init's children by now).
        let left = shims(h);
        let refs: Vec<&ProcRecord> = left.iter().collect();
        stuck.extend(sys::stop(&refs, Duration::from_secs(5)).stuck);
        for d in &dirs {
            let _ = std::fs::remove_dir(d);
        }
        if !stuck.is_empty() {
            return Err(LabError::ProcessFailed {
                what: format!("stopping containerd on {host}"),
                detail: format!("still running after SIGKILL: {}", stuck.join(", ")),
            });
        }
        // Only the records stopped here go: a containerd started meanwhile keeps its own.
        let _lock = super::hosts::LabState::lock(self.dir())?;
        let mut state = self.current_state()?;
        state.hosts[i].processes.retain(|p| !recs.contains(p));
        state.save()?;
        Ok(out.stopped > 0)
    }

    /// The busybox root filesystem for ctr's containers on `host`, as seen inside the host
    /// (`/var/lib/containerd/vxnet-bb`): the test image's tarball (built once per lab, see
    /// [`Lab::import_test_image`]) unpacked, with an `/etc/resolv.conf` naming vxnet's name
    /// server. Made on first use. Several containers may share it read-only (`ctr run
    /// --read-only`, as [`Lab::ctr_run`] does).
    pub fn cni_rootfs(&self, host: &str) -> Result<PathBuf, LabError> {
        let h = self.host(host)?;
        h.require_private(&[CONTAINERD_ROOT], "the ctr root filesystem")?;
        let target = h.outside(CNI_ROOTFS);
        if target.join("etc/resolv.conf").is_file() {
            return Ok(PathBuf::from(CNI_ROOTFS));
        }
        let tar = self.test_image_tar()?;
        let tar_program = program("tar", "tar")?;
        // Unpacked aside and renamed into place: concurrent callers each see a whole one.
        let unique = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        let tmp = h.outside(&format!("{CONTAINERD_ROOT}/.vxnet-bb-{unique}"));
        let built = create_dir(&tmp).and_then(|()| {
            let mut cmd = Command::new(&tar_program);
            cmd.arg("-C")
                .arg(&tmp)
                .args(["--numeric-owner", "-xf"])
                .arg(&tar);
            run(&mut cmd, "unpacking the ctr root filesystem")?;
            write(
                &tmp.join("etc/resolv.conf"),
                &format!("nameserver {NAME_SERVER}\n"),
            )?;
            write(
                &tmp.join("etc/hosts"),
                "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
            )?;
            std::fs::rename(&tmp, &target).map_err(|e| LabError::io(&target, e))
        });
        match built {
            Ok(()) => Ok(PathBuf::from(CNI_ROOTFS)),
            // Another caller's rename came first.
            Err(_) if target.join("etc/resolv.conf").is_file() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(PathBuf::from(CNI_ROOTFS))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// `ctr run --cni --rootfs --read-only … ROOTFS ID ARGV…` on `host`: container `id` on the
    /// host's CNI configuration (the first file in `/etc/cni/net.d`), in the shared busybox
    /// root filesystem ([`Lab::cni_rootfs`], read-only, with a tmpfs on /tmp), with PATH set
    /// (ctr gives a `--rootfs` container no environment) and in cgroup
    /// `/vxnet-lab-LAB-HOST/ID`. `flags` go before the root filesystem (`-d`, `--rm`, …).
    pub fn ctr_run(
        &self,
        host: &str,
        id: &str,
        flags: &[&str],
        argv: &[&str],
    ) -> Result<Command, LabError> {
        self.ctr_command(host, id, true, flags, argv)
    }

    /// [`Lab::ctr_run`] without `--cni`: the container gets only its loopback (the baseline
    /// of the CNI bench).
    pub fn ctr_run_without_network(
        &self,
        host: &str,
        id: &str,
        flags: &[&str],
        argv: &[&str],
    ) -> Result<Command, LabError> {
        self.ctr_command(host, id, false, flags, argv)
    }

    fn ctr_command(
        &self,
        host: &str,
        id: &str,
        cni: bool,
        flags: &[&str],
        argv: &[&str],
    ) -> Result<Command, LabError> {
        if !is_identifier(id) {
            return Err(LabError::InvalidOption(format!(
                "container ID {id:?}: use letters and digits joined by single `.`, `_` or `-`"
            )));
        }
        let h = self.host(host)?;
        let rootfs = self.cni_rootfs(host)?;
        let mut cmd = h.ctr()?;
        cmd.arg("run");
        if cni {
            cmd.arg("--cni");
        }
        cmd.args([
            "--rootfs",
            "--read-only",
            "--mount",
            "type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev",
            "--env",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "--cgroup",
        ])
        .arg(format!("{}/{id}", h.cgroup_parent()))
        .args(flags)
        .arg(rootfs)
        .arg(id)
        .args(argv);
        Ok(cmd)
    }

    /// Imports [`super::TEST_IMAGE`] (`vxnet-bb`, the busybox tarball of
    /// [`Lab::import_test_image`]) into `host`'s Podman storage unless it is there.
    pub fn import_podman_image(&self, host: &str) -> Result<(), LabError> {
        let h = self.host(host)?;
        let image = super::TEST_IMAGE;
        let mut exists = h.podman()?;
        exists
            .args(["image", "exists", image])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if exists.status().is_ok_and(|s| s.success()) {
            return Ok(());
        }
        let tar = self.test_image_tar()?;
        let file = std::fs::File::open(&tar).map_err(|e| LabError::io(&tar, e))?;
        let mut import = h.podman()?;
        // Through stdin: the lab dir is under the machine's /run, which the host does not see.
        import
            .args(["import", "-q", "-c", r#"CMD ["/bin/sh"]"#, "-", image])
            .stdin(file);
        run(&mut import, &format!("podman import {image} on {host}"))?;
        Ok(())
    }

    /// Makes `host`'s CNI setup exactly this: `/opt/cni/bin` holds `plugins` (file name, binary
    /// copied there, mode 0755) and `/etc/cni/net.d` holds `conflists` (file name, JSON);
    /// whatever else was in either is removed. ctr uses the first configuration by name,
    /// so the names give the order. The reference plugins stay available after
    /// `/opt/cni/bin` (both runtimes also search `/usr/lib/cni`).
    pub fn install_cni(
        &self,
        host: &str,
        plugins: &[(&str, &Path)],
        conflists: &[(&str, &str)],
    ) -> Result<(), LabError> {
        let h = self.host(host)?;
        h.require_private(&["/etc/cni", CNI_BIN_DIR], "installing CNI files")?;
        let mut bins = Vec::with_capacity(plugins.len());
        for (name, source) in plugins {
            check_file_name(name)?;
            let bytes = std::fs::read(source).map_err(|e| LabError::io(source, e))?;
            bins.push((name.to_string(), bytes, 0o755));
        }
        let mut confs = Vec::with_capacity(conflists.len());
        for (name, json) in conflists {
            check_file_name(name)?;
            confs.push((name.to_string(), json.as_bytes().to_vec(), 0o644));
        }
        replace_dir(&h.outside(CNI_BIN_DIR), &bins)?;
        replace_dir(&h.outside(CNI_CONF_DIR), &confs)
    }
}

/// Waits until the host's containerd answers `ctr version`.
async fn wait_containerd(
    h: &Host,
    mut child: Option<std::process::Child>,
    pid: u32,
    log: &Path,
) -> Result<(), LabError> {
    let what = format!("containerd on {} (PID {pid})", h.name());
    let limit = Duration::from_secs(30);
    let socket = h.containerd_socket_path();
    let started = Instant::now();
    loop {
        let exited = match child.as_mut() {
            Some(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
            None => sys::stat_of(pid).is_none().then(|| "exited".to_string()),
        };
        if let Some(status) = exited {
            return Err(LabError::ProcessFailed {
                what,
                detail: format!(
                    "{status}; its log ({}) ends with:\n{}",
                    log.display(),
                    sys::log_tail(log, 15)
                ),
            });
        }
        if socket.exists() {
            let mut version = h.ctr()?;
            version
                .args(["--connect-timeout", "2s", "version"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut version = tokio::process::Command::from(version);
            version.kill_on_drop(true);
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), version.status()).await
            {
                if s.success() {
                    return Ok(());
                }
            }
        }
        if started.elapsed() > limit {
            return Err(LabError::ProcessFailed {
                what,
                detail: format!(
                    "no answer on {CONTAINERD_SOCKET} after {limit:?}; its log ({}) ends with:\n{}",
                    log.display(),
                    sys::log_tail(log, 15)
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_identifiers() {
        for ok in ["vxnet-lab-t1-0-vm2", "a", "a.b_c-d", "c1"] {
            assert!(is_identifier(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a--b", "a/b", "..", "a b", &"x".repeat(77)] {
            assert!(!is_identifier(bad), "{bad}");
        }
        assert_eq!(containerd_namespace("lab", "vm2"), "vxnet-lab-lab-vm2");
        assert_eq!(containerd_namespace("x_", "vm2"), FALLBACK_NAMESPACE);
    }

    #[test]
    fn only_a_containers_own_cgroup_is_taken_from_its_config() {
        let dir = std::env::temp_dir().join(format!("vxnet-cni-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.json");
        let with = |path: &str| {
            std::fs::write(
                &config,
                serde_json::json!({"linux": {"cgroupsPath": path}}).to_string(),
            )
            .unwrap();
            container_cgroup(&config, "abc")
        };
        assert_eq!(
            with("/libpod_parent/libpod-abc").as_deref(),
            Some("/libpod_parent/libpod-abc")
        );
        assert_eq!(with("/ns/abc").as_deref(), Some("/ns/abc"));
        for bad in [
            "/",
            "",
            "/shared",
            "/x/../abc",
            "system.slice:libpod:abc",
            "ns/abc",
        ] {
            assert_eq!(with(bad), None, "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
