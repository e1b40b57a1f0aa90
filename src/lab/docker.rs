//! A real Docker engine (Debian's docker.io 20.10) inside lab hosts (`vxnet lab docker`): the
//! seed's own system, for end-to-end tests of vxnet's network plugin and as the baseline of
//! the benchmarks (Docker's legacy overlay driver with `--cluster-store`).
//!
//! Each dockerd runs in its host's network, mount and UTS namespaces, so everything it makes
//! is the host's: `docker0`, `docker_gwbridge` and the overlay sandboxes live in the host's
//! network namespace; its socket, pidfile, exec root, containerd and runc state live in the
//! host's private `/run`; images and containers in the host's private `/var/lib/docker`
//! (bound from `hosts/vmK/fs/var/lib/docker` in the lab dir); it reads the host's private
//! `/etc/docker`. It is started with:
//!
//! - `--iptables=false`: dockerd would otherwise set the FORWARD policy to DROP and add NAT
//!   rules (in the host's namespace only, but the vxnet daemon on the same host must not find
//!   Docker's rules in its way). The cost: containers on Docker's bridge networks (docker0,
//!   docker_gwbridge) get no NAT to the outside; container to container traffic, on a bridge
//!   or across hosts on an overlay, does not need it. dockerd may turn forwarding on: that
//!   sysctl is per network namespace, so it changes the lab host only (the vxnet daemon turns
//!   it on there too, for its gateway bridge).
//! - `--exec-opt native.cgroupdriver=cgroupfs --cgroup-parent /vxnet-lab-LAB-HOST`: cgroups
//!   are the one thing not private to a host (the host's `/sys/fs/cgroup` is the machine's
//!   hierarchies, bound in, with no cgroup namespace). Each host's containers get their own
//!   subtree, which is also how `lab down` finds their processes (they run in mount
//!   namespaces of their own, not the host's); the subtree is removed when the lab goes.
//!
//! What dockerd tries and cannot do here, harmlessly: `modprobe` (not installed; aufs is
//! skipped, overlay2 and vxlan are built into the kernel), setting
//! `net.ipv4.neigh.default.gc_thresh*` (those exist only in the machine's root network
//! namespace, so it cannot change them), and writing `default_pvid` of an overlay's bridge
//! (the host's /sys shows the host's namespace, not the overlay sandbox's).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::etcd::find_program;
use super::hosts::{daemon_stdio, record, HostState, LabState};
use super::sys::{self, ProcRecord, StopOutcome};
use super::{Host, Lab, LabError};

/// The image every lab host's dockerd gets (a busybox root filesystem; see
/// [`Lab::import_test_image`]).
pub const TEST_IMAGE: &str = "vxnet-bb";
/// dockerd's socket inside a host (`/var/run` is `/run`, so also the client's default).
pub const DOCKER_SOCKET: &str = "/run/docker.sock";
/// `DOCKER_HOST` for clients inside a host.
pub const DOCKER_HOST: &str = "unix:///run/docker.sock";
/// The port given in `--cluster-advertise` (nothing listens on it: only the address is used).
pub const CLUSTER_ADVERTISE_PORT: u16 = 2376;
/// The role of dockerd's record in `lab.json`.
pub const ROLE: &str = "dockerd";
const EXEC_ROOT: &str = "/run/docker";
const PIDFILE: &str = "/run/docker.pid";
const DATA_ROOT: &str = "/var/lib/docker";
/// Prefix of the cgroup of a host's containers (`/vxnet-lab-LAB-HOST`, one flat directory
/// per host in each hierarchy: removing it never races with another host or lab creating
/// its own). Unique per lab and host, as host names are `vm` and digits.
const CGROUP_PREFIX: &str = "vxnet-lab";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How [`Lab::start_docker`] starts dockerd.
#[derive(Clone, Debug, Default)]
pub struct DockerOptions {
    /// Docker's legacy cluster mode: `--cluster-store etcd://VM1:2379` (the lab's etcd, first
    /// member) and `--cluster-advertise HOST:2376`. Needed for `docker network create -d
    /// overlay` without Swarm, and for global-scope plugin networks.
    pub cluster_store: bool,
    /// More dockerd arguments (`--mtu 1450`, `--debug`, …).
    pub extra_args: Vec<String>,
    /// How long dockerd may take to answer (default 30 s).
    pub ready_timeout: Option<Duration>,
}

/// `dockerd` (`/usr/sbin/dockerd` as Debian installs it, else on PATH).
fn dockerd_program() -> Result<PathBuf, LabError> {
    let debian = Path::new("/usr/sbin/dockerd");
    if debian.is_file() {
        return Ok(debian.to_path_buf());
    }
    find_program("dockerd").ok_or(LabError::MissingProgram {
        program: "dockerd",
        package: "docker.io",
    })
}

/// The docker client: Debian's 20.10 client (`/usr/bin/docker`, same API version as its
/// dockerd) when installed, else whatever `docker` is on PATH (newer clients negotiate down).
fn docker_client() -> Result<PathBuf, LabError> {
    let debian = Path::new("/usr/bin/docker");
    if debian.is_file() {
        return Ok(debian.to_path_buf());
    }
    find_program("docker").ok_or(LabError::MissingProgram {
        program: "docker",
        package: "docker.io",
    })
}

impl Host {
    /// A `docker -H unix:///run/docker.sock` command on this host, talking to the host's own
    /// dockerd (started by [`Lab::start_docker`]).
    pub fn docker(&self) -> Result<Command, LabError> {
        let mut cmd = self.command(docker_client()?)?;
        cmd.arg("-H").arg(DOCKER_HOST);
        Ok(cmd)
    }

    /// The host's dockerd socket as reachable from outside the host (through the init's root).
    pub fn docker_socket_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{DOCKER_SOCKET}", self.init_pid()))
    }
}

/// The cgroup parent of `host`'s containers (Docker's, containerd's and Podman's alike).
pub(super) fn cgroup_parent(lab: &str, host: &str) -> String {
    format!("/{CGROUP_PREFIX}-{lab}-{host}")
}

/// Runs a prepared command and fails with its output when it fails.
pub(super) fn run(cmd: &mut Command, what: &str) -> Result<std::process::Output, LabError> {
    let out = cmd.output().map_err(|e| LabError::ProcessFailed {
        what: what.to_string(),
        detail: format!("cannot run {:?}: {e}", cmd.get_program()),
    })?;
    if !out.status.success() {
        return Err(LabError::ProcessFailed {
            what: what.to_string(),
            detail: format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(out)
}

impl Lab {
    /// The dockerd arguments for host `i`.
    fn dockerd_args(&self, i: usize, opts: &DockerOptions) -> Result<Vec<String>, LabError> {
        let h = &self.hosts()[i];
        let mut args: Vec<String> = [
            "-H",
            DOCKER_HOST,
            "--data-root",
            DATA_ROOT,
            "--exec-root",
            EXEC_ROOT,
            "--pidfile",
            PIDFILE,
            "--iptables=false",
            "--storage-driver",
            "overlay2",
            "--exec-opt",
            "native.cgroupdriver=cgroupfs",
            "--cgroup-parent",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        args.push(cgroup_parent(self.name(), h.name()));
        if opts.cluster_store {
            // Docker's store client takes one etcd endpoint (a multi-member lab: member 0).
            let first = self.etcd_endpoints().first().copied().ok_or_else(|| {
                LabError::InvalidOption("the lab has no etcd endpoint for --cluster-store".into())
            })?;
            args.extend([
                "--cluster-store".to_string(),
                format!("etcd://{first}"),
                "--cluster-advertise".to_string(),
                format!("{}:{CLUSTER_ADVERTISE_PORT}", h.addr()),
            ]);
        }
        args.extend(opts.extra_args.iter().cloned());
        Ok(args)
    }

    /// Starts dockerd on `host` (vm2…) in the background and waits until it answers on its
    /// socket. It is recorded in `lab.json` (role `dockerd`) and stopped by `lab down` with
    /// the containers it started. If the host's dockerd already runs, only waits for it.
    /// Several hosts may be started at once (also from several processes).
    pub async fn start_docker(&self, host: &str, opts: &DockerOptions) -> Result<(), LabError> {
        let i = self.daemon_host_for(host, "Docker")?;
        let program = dockerd_program()?;
        let h = &self.hosts()[i];
        let log = self.dir().join("logs").join(format!("{host}-dockerd.log"));
        let child = {
            // No await while the lock is held: it blocks the thread.
            let lock = LabState::lock(self.dir())?;
            let mut state = self.current_state()?;
            let hs: &mut HostState = &mut state.hosts[i];
            if let Some(running) = hs.processes.iter().find(|p| p.role == ROLE && p.is_alive()) {
                let pid = running.pid;
                drop(lock);
                return self.wait_docker(h, None, pid, &log, opts).await;
            }
            hs.processes.retain(|p| p.role != ROLE);
            // A dockerd killed before left its pidfile; were its PID reused by now, the new
            // dockerd would refuse to start.
            let pidfile = PathBuf::from(format!("/proc/{}/root{PIDFILE}", h.init_pid()));
            match std::fs::remove_file(&pidfile) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LabError::io(&pidfile, e)),
            }
            let mut cmd = Command::new(&program);
            cmd.args(self.dockerd_args(i, opts)?);
            daemon_stdio(&mut cmd, self.name(), &log)?;
            // DOCKER_* settings of the caller (DOCKER_HOST, DOCKER_TMPDIR, …) are not the
            // host's.
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("DOCKER_") {
                    cmd.env_remove(&key);
                }
            }
            h.enter(&mut cmd, true)?;
            let child = cmd.spawn().map_err(|e| LabError::io(&program, e))?;
            hs.processes.push(record(ROLE, &child, &cmd, &log)?);
            state.save()?;
            child
        };
        let pid = child.id();
        self.wait_docker(h, Some(child), pid, &log, opts).await
    }

    async fn wait_docker(
        &self,
        h: &Host,
        mut child: Option<Child>,
        pid: u32,
        log: &Path,
        opts: &DockerOptions,
    ) -> Result<(), LabError> {
        let what = format!("dockerd on {} (PID {pid})", h.name());
        let limit = opts.ready_timeout.unwrap_or(Duration::from_secs(30));
        let socket = h.docker_socket_path();
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
            if ping(&socket).await {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(LabError::ProcessFailed {
                    what,
                    detail: format!(
                        "no answer on {DOCKER_SOCKET} after {limit:?}; its log ({}) ends with:\n{}",
                        log.display(),
                        sys::log_tail(log, 15)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the dockerd of `host`: first the containers it runs (SIGKILL: a lab host's
    /// containers hold no data worth a graceful stop), then dockerd itself (SIGTERM; SIGKILL
    /// after 15 s), then any containerd or shim it left behind; removes the host's container
    /// cgroups and dockerd's record. Whether dockerd was running.
    pub fn stop_docker(&self, host: &str) -> Result<bool, LabError> {
        let i = self.daemon_host_for(host, "Docker")?;
        let h = &self.hosts()[i];
        let recs: Vec<ProcRecord> = self.current_state()?.hosts[i]
            .processes
            .iter()
            .filter(|p| p.role == ROLE)
            .cloned()
            .collect();
        // Only Docker's own: containerd's and Podman's containers share the host's cgroup
        // parent.
        let mut stuck = kill_cgroups(&docker_container_dirs(self.name(), host)).stuck;
        let refs: Vec<&ProcRecord> = recs.iter().collect();
        let out = sys::stop(&refs, Duration::from_secs(15));
        stuck.extend(out.stuck);
        // containerd dies with dockerd (it is started with a parent-death signal); shims do
        // not, and are children of the machine's init by now. Only the host's own are taken,
        // and not those of the lab's own containerd (`Lab::start_containerd`) on the host.
        if let Some(mnt) = sys::ns_inode(Path::new(&format!("/proc/{}/ns/mnt", h.init_pid()))) {
            let leftovers: Vec<ProcRecord> = sys::processes_in_mount_ns(&[mnt], &[h.init_pid()])
                .into_iter()
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                        .is_ok_and(|c| c.starts_with("containerd"))
                        && !super::cni::is_lab_containerd(p.pid)
                })
                .collect();
            let refs: Vec<&ProcRecord> = leftovers.iter().collect();
            stuck.extend(sys::stop(&refs, Duration::from_secs(5)).stuck);
        }
        remove_cgroups(self.name(), &[host]);
        if !stuck.is_empty() {
            return Err(LabError::ProcessFailed {
                what: format!("stopping Docker on {host}"),
                detail: format!("still running after SIGKILL: {}", stuck.join(", ")),
            });
        }
        // Only the records stopped here go: a dockerd started meanwhile keeps its own.
        let _lock = LabState::lock(self.dir())?;
        let mut state = self.current_state()?;
        state.hosts[i].processes.retain(|p| !recs.contains(p));
        state.save()?;
        Ok(out.stopped > 0)
    }

    /// Imports [`TEST_IMAGE`] into `host`'s dockerd unless it has it: a root filesystem of
    /// busybox (every applet linked in /bin), `/etc/passwd` and `/etc/group`, with `CMD
    /// ["/bin/sh"]`. The tarball is built once per lab (`docker/vxnet-bb.tar` in the lab dir).
    pub fn import_test_image(&self, host: &str) -> Result<(), LabError> {
        let h = self.host(host)?;
        let mut inspect = h.docker()?;
        inspect
            .args(["image", "inspect", "--format", "{{.Id}}", TEST_IMAGE])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if inspect.status().is_ok_and(|s| s.success()) {
            return Ok(());
        }
        let tar = self.test_image_tar()?;
        let file = std::fs::File::open(&tar).map_err(|e| LabError::io(&tar, e))?;
        let mut import = h.docker()?;
        // Through stdin: the lab dir is under the machine's /run, which the host does not see.
        import
            .args(["import", "-c", r#"CMD ["/bin/sh"]"#, "-", TEST_IMAGE])
            .stdin(file);
        run(
            &mut import,
            &format!("docker import {TEST_IMAGE} on {host}"),
        )?;
        Ok(())
    }

    /// The test image's root filesystem as a tarball, built on first use.
    pub(super) fn test_image_tar(&self) -> Result<PathBuf, LabError> {
        let dir = self.dir().join("docker");
        let tar = dir.join(format!("{TEST_IMAGE}.tar"));
        if tar.is_file() {
            return Ok(tar);
        }
        let busybox = find_program("busybox").ok_or(LabError::MissingProgram {
            program: "busybox",
            package: "busybox-static",
        })?;
        let tar_program = find_program("tar").ok_or(LabError::MissingProgram {
            program: "tar",
            package: "tar",
        })?;
        // Built aside under a unique name and renamed into place: concurrent imports on
        // several hosts each get a whole tarball.
        let unique = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        let root = dir.join(format!("rootfs-{unique}"));
        let tmp = dir.join(format!("{TEST_IMAGE}.tar.{unique}"));
        let built = build_rootfs(&busybox, &root).and_then(|()| {
            let mut cmd = Command::new(&tar_program);
            cmd.arg("-C")
                .arg(&root)
                .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
                .arg(&tmp)
                .arg(".");
            run(&mut cmd, "tar of the test image's root filesystem").map(|_| ())
        });
        let _ = std::fs::remove_dir_all(&root);
        built?;
        std::fs::rename(&tmp, &tar).map_err(|e| LabError::io(&tar, e))?;
        Ok(tar)
    }
}

/// A static busybox, a link per applet, and the files a container expects.
fn build_rootfs(busybox: &Path, root: &Path) -> Result<(), LabError> {
    use std::os::unix::fs::PermissionsExt;
    // A static busybox is needed: the image holds no libc. Debian's busybox-static replaces
    // the dynamic busybox at /bin/busybox.
    let head = std::fs::read(busybox).map_err(|e| LabError::io(busybox, e))?;
    if has_interpreter(&head) {
        return Err(LabError::MissingProgram {
            program: "busybox (statically linked)",
            package: "busybox-static",
        });
    }
    let bin = root.join("bin");
    for d in ["bin", "etc", "tmp", "root", "proc", "sys", "dev", "var/www"] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(|e| LabError::io(&p, e))?;
    }
    let tmp = root.join("tmp");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))
        .map_err(|e| LabError::io(&tmp, e))?;
    let target = bin.join("busybox");
    std::fs::write(&target, &head).map_err(|e| LabError::io(&target, e))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| LabError::io(&target, e))?;
    let list = run(
        Command::new(busybox).arg("--list"),
        "busybox --list (the applets to link)",
    )?;
    let applets: BTreeSet<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_string)
        .collect();
    for a in &applets {
        let link = bin.join(a);
        std::os::unix::fs::symlink("busybox", &link).map_err(|e| LabError::io(&link, e))?;
    }
    for (name, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ] {
        let p = root.join(name);
        std::fs::write(&p, text).map_err(|e| LabError::io(&p, e))?;
    }
    Ok(())
}

/// Whether an ELF64 executable names a program interpreter (is dynamically linked). A
/// file too short or not ELF64 counts as dynamic: it cannot be shown to be static.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    // "\x7fELF", ELFCLASS64, little-endian.
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return true;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return true;
    };
    (0..phnum as usize).any(|i| {
        let at = phoff as usize + i * phentsize as usize;
        u32_at(at).is_none_or(|t| t == PT_INTERP)
    })
}

/// GET /_ping on dockerd's socket: "OK" once it serves its API.
async fn ping(socket: &Path) -> bool {
    let attempt = async {
        let mut s = tokio::net::UnixStream::connect(socket).await?;
        s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            .await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        Ok::<bool, std::io::Error>(answer.starts_with("HTTP/1.0 200") && answer.ends_with("OK"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}

/// Each of the machine's cgroup hierarchies (the directories under /sys/fs/cgroup).
pub(super) fn hierarchies() -> Vec<PathBuf> {
    std::fs::read_dir(CGROUP_ROOT)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// The cgroup `rel` (`/a/b`, as runc's cgroupsPath names it) and every cgroup below it, in
/// each hierarchy, each listed before its parent.
pub(super) fn cgroup_tree(rel: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.filter_map(|e| e.ok()) {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let rel = rel.trim_start_matches('/');
    let mut out = Vec::new();
    // The root of a hierarchy holds every process of the machine: never a container's.
    if rel.is_empty() {
        return out;
    }
    for h in hierarchies() {
        let top = h.join(rel);
        if top.is_dir() {
            walk(&top, &mut out);
        }
    }
    out
}

/// The container cgroups of `hosts` of `lab`, in every hierarchy, each listed before its
/// parent.
fn cgroup_dirs(lab: &str, hosts: &[&str]) -> Vec<PathBuf> {
    hosts
        .iter()
        .flat_map(|host| cgroup_tree(&cgroup_parent(lab, host)))
        .collect()
}

/// The cgroups of Docker's containers on `host` (named by their 64-hex-digit IDs, right
/// below the host's cgroup parent).
fn docker_container_dirs(lab: &str, host: &str) -> Vec<PathBuf> {
    let parent = cgroup_parent(lab, host);
    let mut ids = BTreeSet::new();
    for h in hierarchies() {
        if let Ok(entries) = std::fs::read_dir(h.join(parent.trim_start_matches('/'))) {
            for e in entries.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                    ids.insert(name);
                }
            }
        }
    }
    ids.iter()
        .flat_map(|id| cgroup_tree(&format!("{parent}/{id}")))
        .collect()
}

/// Kills (SIGKILL) every process in the cgroup directories `dirs`.
pub(super) fn kill_cgroups(dirs: &[PathBuf]) -> StopOutcome {
    let mut pids = BTreeSet::new();
    for d in dirs {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    let recs: Vec<ProcRecord> = pids
        .into_iter()
        .filter_map(|pid| {
            let (start_time, _) = sys::stat_of(pid)?;
            Some(ProcRecord {
                role: "container".into(),
                pid,
                start_time,
                argv: vec![],
                log: PathBuf::new(),
            })
        })
        .collect();
    let refs: Vec<&ProcRecord> = recs.iter().collect();
    sys::stop_with(&refs, libc::SIGKILL, Duration::from_secs(5))
}

/// Kills (SIGKILL) every process in the container cgroups of `hosts` of `lab`.
pub fn stop_containers(lab: &str, hosts: &[&str]) -> StopOutcome {
    kill_cgroups(&cgroup_dirs(lab, hosts))
}

/// Every host of a lab: any may have run containers under its cgroup parent (dockerd's,
/// the lab's containerd's, Podman's), recorded or not (`lab exec … podman run`).
fn container_hosts(state: &LabState) -> Vec<&str> {
    state.hosts.iter().map(|h| h.name.as_str()).collect()
}

/// [`stop_containers`] for `lab down`.
pub(super) fn stop_containers_of_lab(state: &LabState) -> StopOutcome {
    stop_containers(&state.name, &container_hosts(state))
}

/// [`remove_cgroups`] for `lab down`.
pub(super) fn remove_cgroups_of_lab(state: &LabState) {
    remove_cgroups(&state.name, &container_hosts(state))
}

/// Removes the (empty) container cgroups of `hosts` of `lab`. Best effort: a cgroup that
/// still holds a process stays.
pub fn remove_cgroups(lab: &str, hosts: &[&str]) {
    for d in cgroup_dirs(lab, hosts) {
        let _ = std::fs::remove_dir(&d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        assert!(has_interpreter(b"#!/bin/sh\n"));
        assert!(has_interpreter(b""));
        // The test binary itself is dynamically linked (Rust's default on glibc).
        let me = std::fs::read("/proc/self/exe").unwrap();
        assert!(has_interpreter(&me));
    }
}
