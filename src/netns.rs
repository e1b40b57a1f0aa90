//! Network namespaces from a multi-threaded (tokio) program, without forking.
//!
//! A thread's network namespace decides where the sockets it opens live, and new threads
//! inherit their creator's. So every `setns`/`unshare` here happens on a short-lived
//! `std::thread` made for that one job: never on a tokio worker or blocking-pool thread,
//! which would carry the namespace into unrelated work. Netlink sockets are opened on such a
//! thread and then driven from the runtime.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// A network namespace, kept alive by an open file descriptor (and, for a named one, by a
/// bind mount that outlives this process).
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    path: Option<PathBuf>,
    /// One netlink socket per namespace value: opening one costs a thread (setns), and an
    /// attach uses it for lo, eth0 and eth1.
    netlink: std::sync::OnceLock<rtnetlink::Handle>,
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Runs `f` on a new thread that first enters `ns`. The thread ends with `f`.
pub fn run_in<F, R>(ns: BorrowedFd<'_>, f: F) -> io::Result<R>
where
    F: FnOnce() -> io::Result<R> + Send,
    R: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(ns, CloneFlags::CLONE_NEWNET).map_err(nix_io)?;
            f()
        })
        .join()
        .map_err(|_| io::Error::other("namespace worker thread panicked"))?
    })
}

impl NetNs {
    /// A new namespace that lives as long as this value (and any process started in it).
    pub fn new_anonymous() -> io::Result<Self> {
        let fd = std::thread::spawn(|| -> io::Result<OwnedFd> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(nix_io)?;
            Ok(File::open("/proc/thread-self/ns/net")?.into())
        })
        .join()
        .map_err(|_| io::Error::other("namespace worker thread panicked"))??;
        Ok(NetNs {
            fd,
            path: None,
            netlink: std::sync::OnceLock::new(),
        })
    }

    /// A new namespace bind-mounted at `path` (like `ip netns add`), so that it outlives
    /// this process and other processes can enter it by path. Fails if `path` exists.
    pub fn create_named(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        let target = path.to_path_buf();
        let made = std::thread::spawn(move || -> io::Result<OwnedFd> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(nix_io)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(nix_io)?;
            Ok(File::open("/proc/thread-self/ns/net")?.into())
        })
        .join()
        .map_err(|_| io::Error::other("namespace worker thread panicked"))?;
        match made {
            Ok(fd) => Ok(NetNs {
                fd,
                path: Some(path.to_path_buf()),
                netlink: std::sync::OnceLock::new(),
            }),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(e)
            }
        }
    }

    /// Opens a named namespace made earlier (by this process or another).
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd: OwnedFd = File::open(path)?.into();
        Ok(NetNs {
            fd,
            path: Some(path.to_path_buf()),
            netlink: std::sync::OnceLock::new(),
        })
    }

    /// Opens a network namespace that another program made and names by `path` (a CNI
    /// runtime's `/proc/PID/ns/net` or `/run/netns/…`), refusing anything else: a plain file,
    /// or another kind of namespace, would otherwise fail later in a confusing way.
    pub fn open_foreign(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        // NS_GET_NSTYPE (_IO(0xb7, 0x3)): the kind of namespace an nsfs file is.
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: the ioctl takes no argument and only reads the fd's inode.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a namespace ({e})", path.display()),
            ));
        }
        if kind != libc::CLONE_NEWNET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is a namespace, but not a network namespace",
                    path.display()
                ),
            ));
        }
        Ok(NetNs {
            fd: file.into(),
            path: Some(path.to_path_buf()),
            netlink: std::sync::OnceLock::new(),
        })
    }

    /// [`NetNs::open_foreign`], if `path` still names the namespace whose inode was `inode`:
    /// `None` once it is gone (its process exited and its PID, or its file, went or was
    /// reused by another namespace).
    pub fn reopen_foreign(path: &Path, inode: u64) -> io::Result<Option<Self>> {
        match Self::open_foreign(path) {
            Ok(ns) if ns.inode()? == inode => Ok(Some(ns)),
            Ok(_) => Ok(None),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::InvalidInput
                ) || e.raw_os_error() == Some(libc::ESRCH) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Unmounts and removes a named namespace's file. Missing is fine (safe to repeat).
    pub fn remove_named(path: &Path) -> io::Result<()> {
        match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(nix_io(e)),
        }
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The namespace's inode: two values with one inode are one namespace.
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(File::from(self.fd.try_clone()?).metadata()?.ino())
    }

    /// Runs `f` on a fresh thread inside this namespace.
    pub fn run<F, R>(&self, f: F) -> io::Result<R>
    where
        F: FnOnce() -> io::Result<R> + Send,
        R: Send,
    {
        run_in(self.fd.as_fd(), f)
    }

    /// A netlink (rtnetlink) handle whose socket lives in this namespace. Its connection is
    /// driven by a task on the current tokio runtime (the first caller's); later calls share
    /// the socket.
    pub fn netlink(&self) -> io::Result<rtnetlink::Handle> {
        if let Some(h) = self.netlink.get() {
            return Ok(h.clone());
        }
        let raw = self.run(|| {
            let socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
            // The kernel's reason for a refusal ("A VXLAN device with the specified VNI
            // already exists") rides in the error as an extended ACK; capped ACKs keep
            // it from following a full copy of each request.
            socket.set_ext_ack(true)?;
            socket.set_cap_ack(true)?;
            Ok(socket.into_raw_fd())
        })?;
        // SAFETY: `raw` is the netlink socket just created on the worker thread; nothing else
        // owns it. TokioSocket registers it with the current runtime's reactor.
        let socket = unsafe { netlink_sys::TokioSocket::from_raw_fd(raw) };
        let (conn, handle, _) = rtnetlink::from_socket(socket);
        tokio::spawn(conn);
        // Two first callers at once each made a socket: keep one, the other's closes with
        // its handle.
        Ok(self.netlink.get_or_init(|| handle).clone())
    }

    /// Makes `cmd` start inside this namespace (setns between fork and exec).
    pub fn command(&self, cmd: &mut Command) -> io::Result<()> {
        let fd = self.fd.try_clone()?;
        // SAFETY: the closure only calls setns(2), which is async-signal-safe, on an fd the
        // child inherited; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Brings a link up by name (e.g. `lo` in a fresh namespace).
pub async fn set_link_up(handle: &rtnetlink::Handle, name: &str) -> Result<(), rtnetlink::Error> {
    use futures::TryStreamExt;
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    if let Some(link) = links.try_next().await? {
        handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(link.header.index)
                    .up()
                    .build(),
            )
            .execute()
            .await?;
    }
    Ok(())
}
