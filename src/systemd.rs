//! The service manager's side of a `Type=notify` unit: readiness, reload and stop, and the
//! status line `systemctl status vxnet` shows, sent to `$NOTIFY_SOCKET` (sd_notify(3)'s
//! datagram protocol). Without that variable (the daemon run by hand, in the lab) every call
//! does nothing.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

const SOCKET_VAR: &str = "NOTIFY_SOCKET";

/// One state change for the service manager.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice<'a> {
    /// Registered in the cluster and serving the API: units ordered after vxnet may start.
    Ready,
    /// Re-reading the configuration (`READY=1` follows once done).
    Reloading,
    /// A clean stop has begun.
    Stopping,
    /// A line for `systemctl status`.
    Status(&'a str),
}

impl Notice<'_> {
    fn line(&self) -> String {
        match self {
            Notice::Ready => "READY=1".to_string(),
            Notice::Reloading => {
                // systemd >= 253 checks that a reload notification carries the monotonic
                // time it started at; older ones ignore the field.
                let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
                    .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
                    .unwrap_or(0);
                format!("RELOADING=1\nMONOTONIC_USEC={now}")
            }
            Notice::Stopping => "STOPPING=1".to_string(),
            // A status is one line: a newline would start a field of its own.
            Notice::Status(s) => format!("STATUS={}", s.replace('\n', " ")),
        }
    }
}

/// Sends `notices` in one datagram. Failures are logged, not returned: the service manager
/// being away must not stop the daemon.
pub fn notify(notices: &[Notice<'_>]) {
    let Some(target) = std::env::var_os(SOCKET_VAR) else {
        return;
    };
    let message = notices
        .iter()
        .map(Notice::line)
        .collect::<Vec<_>>()
        .join("\n");
    if let Err(e) = send(&target, message.as_bytes()) {
        tracing::debug!(socket = ?target, error = %e, "cannot notify the service manager");
    }
}

fn send(target: &std::ffi::OsStr, message: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = target.as_bytes();
    // '@' names a socket in the abstract namespace (systemd's own form for it).
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(message, &addr)?;
    } else {
        socket.send_to(message, PathBuf::from(target))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_follow_sd_notify() {
        assert_eq!(Notice::Ready.line(), "READY=1");
        assert_eq!(Notice::Stopping.line(), "STOPPING=1");
        assert_eq!(Notice::Status("a\nb").line(), "STATUS=a b");
        assert!(Notice::Reloading
            .line()
            .starts_with("RELOADING=1\nMONOTONIC_USEC="));
    }

    #[test]
    fn sends_one_datagram_to_a_path() {
        let dir = std::env::temp_dir().join(format!("vxnet-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), b"READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
