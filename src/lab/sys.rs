//! Low-level helpers of the lab: processes identified by PID *and* start time (so that a
//! recycled PID is never taken for one of ours), signals sent through pidfds, entering a
//! lab host's namespaces between fork and exec, and reading the mount table.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

/// A process the lab started, as recorded in `lab.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    /// `init` (the host's namespace holder), `etcd`, `daemon` or `dockerd`.
    pub role: String,
    pub pid: u32,
    /// Clock ticks after boot (`/proc/PID/stat` field 22): with the PID, unique for the
    /// machine's uptime.
    pub start_time: u64,
    pub argv: Vec<String>,
    pub log: PathBuf,
}

/// Start time and state from a `/proc/PID/stat` (procfs parses it: the command name may
/// hold spaces and parentheses).
fn parse_stat(stat: impl io::Read) -> Option<(u64, char)> {
    use procfs::FromRead;
    procfs::process::Stat::from_read(stat)
        .ok()
        .map(|s| (s.starttime, s.state))
}

/// Start time and state of `pid`, or `None` when there is no such process.
pub fn stat_of(pid: u32) -> Option<(u64, char)> {
    crate::container::process::stat(pid)
        .ok()
        .map(|s| (s.starttime, s.state))
}

/// The start time of `pid` (read right after spawning it: fork sets it, exec keeps it).
pub fn start_time(pid: u32) -> io::Result<u64> {
    stat_of(pid)
        .map(|(t, _)| t)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no process {pid}")))
}

impl ProcRecord {
    /// Whether the recorded process still runs: same PID, same start time, not a zombie.
    pub fn is_alive(&self) -> bool {
        matches!(stat_of(self.pid), Some((t, s)) if t == self.start_time && s != 'Z' && s != 'X')
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a PID and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_signal(fd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a pidfd we own, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pidfd on the recorded process, or `None` when it is gone (or the PID now belongs to
/// another process). Race-free: the pidfd is opened first, then the start time is checked;
/// a process that already ran when we recorded it cannot be one created after the open.
fn open_ours(rec: &ProcRecord) -> Option<OwnedFd> {
    let fd = pidfd_open(rec.pid).ok()?;
    rec.is_alive().then_some(fd)
}

/// Reaps `pid` if it is our child and has exited (a no-op otherwise).
fn reap(pid: u32) {
    // SAFETY: waitpid(2) on one PID with WNOHANG; ECHILD for processes that are not ours.
    unsafe {
        libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG);
    }
}

/// Waits until every pidfd's process has exited or `limit` passed; returns those still running.
fn wait_exit(mut left: Vec<(usize, OwnedFd)>, limit: Duration) -> Vec<(usize, OwnedFd)> {
    let deadline = Instant::now() + limit;
    while !left.is_empty() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let mut fds: Vec<libc::pollfd> = left
            .iter()
            .map(|(_, fd)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = (deadline - now).as_millis().min(100) as libc::c_int;
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        let exited: Vec<bool> = fds.iter().map(|p| p.revents != 0).collect();
        let mut i = 0;
        left.retain(|_| {
            let keep = !exited[i];
            i += 1;
            keep
        });
    }
    left
}

/// What [`stop`] did.
#[derive(Debug, Default)]
pub struct StopOutcome {
    /// Processes that were running and were stopped.
    pub stopped: usize,
    /// Processes already gone (or whose PID now belongs to someone else: left alone).
    pub gone: usize,
    /// Processes that outlived SIGKILL (e.g. stuck in the kernel), as "role PID".
    pub stuck: Vec<String>,
}

/// Stops the recorded processes: SIGTERM, up to `grace` to exit, then SIGKILL. Only
/// processes whose PID and start time still match the record are signalled.
pub fn stop(records: &[&ProcRecord], grace: Duration) -> StopOutcome {
    stop_with(records, libc::SIGTERM, grace)
}

/// Like [`stop`], but the first signal is `signal` (e.g. SIGKILL for a crash).
pub fn stop_with(records: &[&ProcRecord], signal: i32, grace: Duration) -> StopOutcome {
    let mut out = StopOutcome::default();
    let mut running = Vec::new();
    for (i, rec) in records.iter().enumerate() {
        match open_ours(rec) {
            Some(fd) if pidfd_signal(&fd, signal).is_ok() => running.push((i, fd)),
            _ => out.gone += 1,
        }
    }
    out.stopped = running.len();
    let left = wait_exit(running, grace);
    for (_, fd) in &left {
        let _ = pidfd_signal(fd, libc::SIGKILL);
    }
    let left = wait_exit(left, Duration::from_secs(5));
    out.stuck = left
        .iter()
        .map(|(i, _)| format!("{} {}", records[*i].role, records[*i].pid))
        .collect();
    for rec in records {
        reap(rec.pid);
    }
    out
}

/// The namespaces of a running lab host, opened through its init (holder) process.
pub struct HostNamespaces {
    net: OwnedFd,
    uts: OwnedFd,
    mnt: OwnedFd,
}

impl HostNamespaces {
    /// Opens `/proc/PID/ns/{net,uts,mnt}` of the recorded init process, through one open
    /// `/proc/PID` directory so that a recycled PID cannot slip in between the check and the
    /// opens. `None` when the process is gone.
    pub fn open(init: &ProcRecord) -> io::Result<Option<Self>> {
        let dir = match File::open(format!("/proc/{}", init.pid)) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let open = |path: &str| -> io::Result<OwnedFd> {
            openat(
                dir.as_fd(),
                path,
                OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io::Error::from_raw_os_error(e as i32))
        };
        let stat = match open("stat") {
            Ok(fd) => File::from(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) => return Err(e),
        };
        match parse_stat(stat) {
            Some((t, s)) if t == init.start_time && s != 'Z' && s != 'X' => {}
            _ => return Ok(None),
        }
        let ns = |kind: &str| match open(&format!("ns/{kind}")) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
            other => other.map(Some),
        };
        match (ns("net")?, ns("uts")?, ns("mnt")?) {
            (Some(net), Some(uts), Some(mnt)) => Ok(Some(HostNamespaces { net, uts, mnt })),
            _ => Ok(None),
        }
    }

    /// Makes `cmd` start inside these namespaces (setns between fork and exec: the forked
    /// child is single-threaded, which entering a mount namespace requires). The child keeps
    /// the caller's working directory when that path exists inside the host, else `/`. With
    /// `new_session`, it also leaves the caller's session (no terminal signals reach it).
    pub fn apply(self, cmd: &mut Command, new_session: bool) {
        let cwd = std::env::current_dir()
            .ok()
            .and_then(|d| CString::new(d.into_os_string().as_bytes()).ok());
        let HostNamespaces { net, uts, mnt } = self;
        // SAFETY: the closure only makes async-signal-safe system calls (setns, chdir,
        // setsid) on fds and a C string prepared before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for (fd, kind) in [
                    (&net, libc::CLONE_NEWNET),
                    (&uts, libc::CLONE_NEWUTS),
                    (&mnt, libc::CLONE_NEWNS),
                ] {
                    if libc::setns(fd.as_raw_fd(), kind) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // Entering a mount namespace moves the working directory to its root.
                if let Some(dir) = &cwd {
                    if libc::chdir(dir.as_ptr()) != 0 {
                        libc::chdir(c"/".as_ptr());
                    }
                }
                if new_session && libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Makes `cmd` leave the caller's session (a daemon: no terminal signals, no SIGHUP).
pub fn new_session(cmd: &mut Command) {
    // SAFETY: setsid(2) is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(OsStr::from_bytes(&out))
}

/// The mount points of the calling thread's mount namespace, in mount order.
pub fn mount_points() -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/thread-self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .collect())
}

/// Mount points at or below `dir`, deepest first (the order to unmount them in).
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = mount_points()?
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    v.dedup();
    Ok(v)
}

/// The (device, inode) of a namespace file (`/proc/PID/ns/net`, a bind-mounted netns, …):
/// equal for two files exactly when they are the same namespace.
pub fn ns_inode(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// PIDs of the processes whose network namespace is one of `inodes` (see [`ns_inode`]).
pub fn processes_in_netns(inodes: &[(u64, u64)]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            ns_inode(Path::new(&format!("/proc/{pid}/ns/net")))
                .is_some_and(|ino| inodes.contains(&ino))
        })
        .collect()
}

/// The processes (other than `except`) for which `pick(pid)` holds, as guests to stop.
fn guests_where(except: &[u32], pick: impl Fn(u32) -> bool) -> Vec<ProcRecord> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| !except.contains(pid))
        .filter(|pid| pick(*pid))
        .filter_map(|pid| {
            let (start_time, _) = stat_of(pid)?;
            Some(ProcRecord {
                role: "guest".into(),
                pid,
                start_time,
                argv: vec![],
                log: PathBuf::new(),
            })
        })
        .collect()
}

/// The processes (other than `except`) whose mount namespace is one of `inodes`: everything
/// running inside a lab host, whoever started it there.
pub fn processes_in_mount_ns(inodes: &[(u64, u64)], except: &[u32]) -> Vec<ProcRecord> {
    guests_where(except, |pid| {
        ns_inode(Path::new(&format!("/proc/{pid}/ns/mnt"))).is_some_and(|ino| inodes.contains(&ino))
    })
}

/// Processes whose mount table holds a mount bound from below `source` (field 4 of
/// mountinfo, the mount's root within its filesystem): a lab host's private directories are
/// bound that way in its mount namespace only, so this finds everything running in it and in
/// any mount namespace made from it later (`vxnet run` containers unshare their own).
pub fn processes_with_mounts_from(source: &Path, except: &[u32]) -> Vec<ProcRecord> {
    let source = within_filesystem(source);
    let Some(source) = source.to_str() else {
        return Vec::new();
    };
    let prefix = format!("{}/", source.trim_end_matches('/'));
    guests_where(except, |pid| {
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).is_ok_and(|m| {
            m.lines()
                .filter_map(|l| l.split(' ').nth(3))
                .any(|root| root.starts_with(&prefix))
        })
    })
}

/// `path` as mountinfo's root field names it: relative to the root of the filesystem holding
/// it (on a machine whose /run is a tmpfs, /run/x is /x there).
fn within_filesystem(path: &Path) -> PathBuf {
    let table = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
    let best = table
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let root = f.nth(3)?;
            let point = f.next()?;
            path.strip_prefix(point)
                .ok()
                .map(|rest| (point.len(), root, rest))
        })
        .max_by_key(|(len, _, _)| *len);
    match best {
        Some((_, root, rest)) => Path::new(root).join(rest),
        None => path.to_path_buf(),
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        // A whole line as kernel 6.x writes it (52 fields), with a hostile command name.
        let line = format!(
            "4242 (a) b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1234 5{}",
            " 0".repeat(28)
        );
        assert_eq!(parse_stat(line.as_bytes()), Some((987654, 'S')));
        assert_eq!(parse_stat(&b"garbage"[..]), None);
    }

    #[test]
    fn our_own_start_time_is_stable() {
        let me = std::process::id();
        let t = start_time(me).unwrap();
        assert_eq!(start_time(me).unwrap(), t);
        let rec = ProcRecord {
            role: "test".into(),
            pid: me,
            start_time: t,
            argv: vec![],
            log: PathBuf::new(),
        };
        assert!(rec.is_alive());
        assert!(!ProcRecord {
            start_time: t + 1,
            ..rec
        }
        .is_alive());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape("/end\\"), PathBuf::from("/end\\"));
    }
}
