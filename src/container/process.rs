//! Watching and signalling a container's process without being its parent.
//!
//! The CLI starts the process (so it keeps the user's terminal); the daemon is told its PID
//! and holds a pidfd to it: a pidfd names one process, never a later one that reuses the PID,
//! becomes readable when the process exits, and signals only that process.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tokio::io::unix::AsyncFd;

/// A process held by a pidfd.
pub struct ProcessHandle {
    fd: AsyncFd<OwnedFd>,
    pid: u32,
}

impl ProcessHandle {
    /// Opens a pidfd for `pid`. Fails with ESRCH if the process is gone.
    pub fn open(pid: u32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        // SAFETY: an OwnedFd keeps the same open descriptor for its whole life, and the
        // AsyncFd owns it from here on.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(ProcessHandle { fd, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` to this process (not to whoever has its PID later).
    pub fn signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            // Already exited: nothing to signal, which is what the caller wanted.
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    /// Resolves when the process has exited.
    pub async fn exited(&self) -> io::Result<()> {
        let _ready = self.fd.readable().await?;
        Ok(())
    }

    /// True if the process has already exited.
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & libc::POLLIN != 0
    }
}

/// The process's start time (clock ticks since boot, field 22 of /proc/PID/stat).
pub fn start_time(pid: u32) -> io::Result<u64> {
    stat(pid).map(|s| s.starttime)
}

/// `/proc/PID/stat`, parsed by procfs; a missing process is `NotFound`.
pub fn stat(pid: u32) -> io::Result<procfs::process::Stat> {
    let pid = i32::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("no PID {pid}")))?;
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .map_err(|e| match e {
            procfs::ProcError::NotFound(_) => {
                io::Error::new(io::ErrorKind::NotFound, format!("no process {pid}"))
            }
            e => io::Error::other(e.to_string()),
        })
}

/// (device, inode) of a namespace file: equal for two paths naming the same namespace.
pub fn ns_id(path: &Path) -> io::Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Whether `pid` lives in the network namespace bind-mounted at `netns`.
pub fn in_netns(pid: u32, netns: &Path) -> io::Result<bool> {
    Ok(ns_id(Path::new(&format!("/proc/{pid}/ns/net")))? == ns_id(netns)?)
}
