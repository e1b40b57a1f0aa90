//! `vxnet lab host-init`: the process that *is* a lab host (one of the seed's VMs).
//!
//! `lab up` starts it inside the host's network namespace. It makes the host's own mount and
//! UTS namespaces, sets them up as a VM would have them, reports "ready" on stdout and then
//! just holds them until SIGTERM. Every other process of that host (etcd, the daemon,
//! `lab exec`) enters its namespaces through `/proc/PID/ns/{net,uts,mnt}`.
//!
//! It must run before anything starts a thread: unsharing the mount namespace applies to the
//! calling thread only, so the CLI calls [`run`] before it builds its async runtime.

use std::io::Write;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{SigSet, Signal};

use super::sys;

/// What a host is made of.
#[derive(Clone, Debug)]
pub struct HostInit {
    /// The lab directory (for messages; it also names the process in `ps`).
    pub lab_dir: PathBuf,
    pub hostname: String,
    /// (path inside the host, directory of the lab it is bound from)
    pub private_dirs: Vec<(PathBuf, PathBuf)>,
}

/// The first line a host-init writes on stdout once its namespaces are ready.
pub const READY: &str = "ready";

/// Parses `INSIDE=SOURCE` (as `--private` takes it).
pub fn parse_private(s: &str) -> Result<(PathBuf, PathBuf), String> {
    let (inside, source) = s
        .split_once('=')
        .ok_or_else(|| format!("--private {s:?}: use INSIDE=SOURCE"))?;
    let (inside, source) = (PathBuf::from(inside), PathBuf::from(source));
    if !inside.is_absolute() || !source.is_absolute() {
        return Err(format!("--private {s:?}: both paths must be absolute"));
    }
    Ok((inside, source))
}

fn step<T>(what: impl FnOnce() -> String, r: nix::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

/// Builds the host's mount and UTS namespaces around the calling (single-threaded) process.
fn setup(init: &HostInit) -> Result<(), String> {
    step(
        || "unshare(CLONE_NEWNS | CLONE_NEWUTS)".into(),
        unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS),
    )?;
    // First of all: nothing done below may propagate back to the machine's mounts (were `/`
    // shared, as under systemd, unmounting /run here would unmount it everywhere).
    step(
        || "making / MS_REC|MS_PRIVATE".into(),
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    step(
        || format!("sethostname({})", init.hostname),
        nix::unistd::sethostname(&init.hostname),
    )?;
    // The host's private directories, bound from the lab dir (which sits under the machine's
    // /run, so this comes before /run is replaced below).
    for (inside, source) in &init.private_dirs {
        if inside.starts_with("/run") {
            return Err(format!(
                "private directory {}: /run is already private to each host",
                inside.display()
            ));
        }
        // The mount point must exist; the directory is empty on the machine (the host's
        // contents live in the lab dir).
        std::fs::create_dir_all(inside)
            .map_err(|e| format!("creating mount point {}: {e}", inside.display()))?;
        step(
            || format!("binding {} on {}", source.display(), inside.display()),
            mount(
                Some(source.as_path()),
                inside.as_path(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            ),
        )?;
    }
    // A fresh /run, as a booted VM has. Detach what the machine had mounted under /run first
    // (other labs' namespace files, …), so that this host does not pin any of it.
    let under_run = sys::mounts_under(Path::new("/run"))
        .map_err(|e| format!("reading /proc/thread-self/mountinfo: {e}"))?;
    for m in under_run {
        match umount2(&m, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(format!("detaching {} in the host: {e}", m.display())),
        }
    }
    step(
        || "mounting a tmpfs on /run".into(),
        mount(
            Some("tmpfs"),
            "/run",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    )?;
    remount_sys()?;
    host_resolv_conf()?;
    for (dir, mode) in [("/run/lock", 0o1777), ("/run/vxnet", 0o755)] {
        std::fs::create_dir(dir).map_err(|e| format!("creating {dir}: {e}"))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|e| format!("chmod {dir}: {e}"))?;
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// The host's own resolv.conf, as a VM has: the lab's resolver in the outside namespace (not
/// the machine's, which the lab's hosts cannot reach).
fn host_resolv_conf() -> Result<(), String> {
    let text = format!(
        "# vxnet lab host: the lab's resolver, in the outside namespace\nnameserver {}\n",
        super::hosts::OUTSIDE_RESOLVER
    );
    let etc = Path::new("/etc/resolv.conf");
    // systemd-resolved's /etc/resolv.conf is a link into /run: this host's /run is its own
    // (fresh) one, so the link's target is written there and the machine's file is untouched.
    if let Ok(target) = std::fs::read_link(etc) {
        // Lexically: `../run/…` from /etc (the target need not exist here yet).
        let mut abs = PathBuf::from("/etc");
        for c in target.components() {
            match c {
                std::path::Component::ParentDir => {
                    abs.pop();
                }
                std::path::Component::CurDir => {}
                other => abs.push(other),
            }
        }
        let target = abs;
        if target.starts_with("/run") {
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
            return std::fs::write(&target, text)
                .map_err(|e| format!("writing {}: {e}", target.display()));
        }
    }
    let resolv = Path::new("/run/resolv.conf");
    std::fs::write(resolv, text).map_err(|e| format!("writing {}: {e}", resolv.display()))?;
    step(
        || "binding /run/resolv.conf on /etc/resolv.conf".into(),
        mount(
            Some(resolv),
            "/etc/resolv.conf",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
    )?;
    Ok(())
}

/// A sysfs of the host's own: the one inherited from the machine shows the *machine's*
/// network devices under /sys/class/net (sysfs shows the network namespace of whoever
/// mounted it). The new sysfs is built aside (on the host's fresh /run), the machine's
/// mounts under /sys (cgroups, …) are bound into it, then it replaces the old /sys.
fn remount_sys() -> Result<(), String> {
    let sys = Path::new("/sys");
    let aside = Path::new("/run/.vxnet-sys");
    let mounts = sys::mount_points().map_err(|e| format!("reading mountinfo: {e}"))?;
    // The mounts right below /sys (their own submounts come along with a recursive bind).
    let mut top: Vec<PathBuf> = Vec::new();
    for m in mounts
        .iter()
        .filter(|m| m.starts_with(sys) && m.as_path() != sys)
    {
        if !top.iter().any(|t| m.starts_with(t)) {
            top.push(m.clone());
        }
    }
    std::fs::create_dir(aside).map_err(|e| format!("creating {}: {e}", aside.display()))?;
    step(
        || "mounting the host's sysfs".into(),
        mount(
            Some("sysfs"),
            aside,
            Some("sysfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        ),
    )?;
    for m in &top {
        let Ok(rel) = m.strip_prefix(sys) else {
            continue;
        };
        let target = aside.join(rel);
        if !target.is_dir() {
            eprintln!(
                "host-init: {} has no mount point in the host's sysfs; not kept",
                m.display()
            );
            continue;
        }
        step(
            || format!("binding the machine's {} into the host's /sys", m.display()),
            mount(
                Some(m.as_path()),
                target.as_path(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            ),
        )?;
    }
    step(
        || "detaching the machine's /sys in the host".into(),
        umount2(sys, MntFlags::MNT_DETACH),
    )?;
    step(
        || "moving the host's sysfs to /sys".into(),
        mount(
            Some(aside),
            sys,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        ),
    )?;
    std::fs::remove_dir(aside).map_err(|e| format!("removing {}: {e}", aside.display()))?;
    Ok(())
}

/// Makes the host, reports on stdout, and holds the namespaces until SIGTERM or SIGINT.
/// Returns the exit code.
pub fn run(init: &HostInit) -> u8 {
    // Block the stop signals before anything else so that one sent early is not lost.
    let mut stop = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        stop.add(s);
    }
    let who = format!("host-init {} of {}", init.hostname, init.lab_dir.display());
    if let Err(e) = stop.thread_block() {
        return report(&who, Err(format!("blocking signals: {e}")));
    }
    let code = report(&who, setup(init));
    if code != 0 {
        return code;
    }
    loop {
        // sigwaitinfo rather than sigwait: the sender's PID goes into the log, which is what
        // tells an expected `lab down` from something else stopping a host.
        let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
        // SAFETY: `stop` is a valid, initialised sigset; `info` is written by the kernel.
        let sig = unsafe { libc::sigwaitinfo(stop.as_ref(), info.as_mut_ptr()) };
        if sig < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            eprintln!("{who}: sigwaitinfo: {e}");
            return 1;
        }
        // SAFETY: sigwaitinfo returned a signal, so the kernel filled `info` in.
        let sender = unsafe { info.assume_init().si_pid() };
        let name = Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string());
        let comm = std::fs::read_to_string(format!("/proc/{sender}/comm")).unwrap_or_default();
        eprintln!("{who}: {name} from PID {sender} ({})", comm.trim());
        if sig != libc::SIGHUP {
            return 0;
        }
    }
}

/// Writes "ready" or "error: …" on stdout (the pipe `lab up` reads) and then points stdout
/// at /dev/null so that `lab up` sees end-of-file.
fn report(who: &str, r: Result<(), String>) -> u8 {
    let (line, code) = match &r {
        Ok(()) => (READY.to_string(), 0),
        Err(e) => {
            eprintln!("{who}: {e}");
            (format!("error: {e}"), 1)
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    drop(out);
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fd 1 with an fd we own; stdout's buffer was flushed above.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
    code
}
