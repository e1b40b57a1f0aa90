//! Names that are not ours go to the host's own resolvers, as the host would ask them.
//!
//! The resolvers are the `nameserver` lines of the host's resolv.conf, read again when the
//! file changes (checked at most once a second). Forwarding runs in the daemon's own network
//! namespace, where the listening address does not exist: even a resolv.conf naming it
//! cannot send a query back to vxnet, and it is dropped from the list anyway.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::answer::{server_failure, Transport, MAX_TCP};
use super::LISTEN_ADDR;
use crate::sync::lock;

/// How long one resolver gets before the next is asked.
const PER_SERVER: Duration = Duration::from_secs(2);
/// resolv.conf's own limit (glibc's MAXNS).
const MAX_SERVERS: usize = 3;
const RECHECK: Duration = Duration::from_secs(1);

/// The host's resolvers, from its resolv.conf.
pub struct Upstreams {
    path: PathBuf,
    cached: Mutex<Cached>,
}

#[derive(Default)]
struct Cached {
    checked: Option<Instant>,
    stamp: Option<(SystemTime, u64)>,
    servers: Arc<[SocketAddr]>,
}

impl Upstreams {
    pub fn new(path: PathBuf) -> Self {
        Upstreams {
            path,
            cached: Mutex::new(Cached::default()),
        }
    }

    /// The current resolvers (re-read if the file changed since the last look).
    pub fn servers(&self) -> Arc<[SocketAddr]> {
        let mut c = lock(&self.cached);
        if c.checked.is_some_and(|t| t.elapsed() < RECHECK) {
            return c.servers.clone();
        }
        c.checked = Some(Instant::now());
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if stamp != c.stamp || c.stamp.is_none() {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            let servers: Arc<[SocketAddr]> = parse_resolv_conf(&text).into();
            if servers.is_empty() {
                tracing::warn!(path = %self.path.display(),
                    "no usable nameserver in the host's resolv.conf: names outside vxnet's networks get SERVFAIL");
            } else if servers != c.servers {
                tracing::info!(path = %self.path.display(), servers = ?servers,
                    "forwarding other names to the host's resolvers");
            }
            c.servers = servers;
            c.stamp = stamp;
        }
        c.servers.clone()
    }

    /// The host's `search` and `options` lines, for a container's own resolv.conf.
    pub fn search_and_options(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.lines()
            .map(str::trim)
            .filter(|l| l.starts_with("search ") || l.starts_with("options "))
            .map(str::to_string)
            .collect()
    }

    /// Asks the resolvers in turn; SERVFAIL for `id` if none answers.
    pub async fn forward(&self, query: &[u8], id: u16, transport: Transport) -> Vec<u8> {
        for server in self.servers().iter() {
            let asked = match transport {
                Transport::Udp => tokio::time::timeout(PER_SERVER, ask_udp(*server, query)).await,
                Transport::Tcp => tokio::time::timeout(PER_SERVER, ask_tcp(*server, query)).await,
            };
            match asked {
                Ok(Ok(answer)) => return answer,
                Ok(Err(e)) => tracing::debug!(%server, error = %e, "resolver failed"),
                Err(_) => tracing::debug!(%server, "resolver timed out"),
            }
        }
        server_failure(id)
    }
}

/// The `nameserver` lines: IPv4 and IPv6 addresses, at most three, never vxnet's own.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .filter(|ip| *ip != IpAddr::V4(LISTEN_ADDR) && !ip.is_unspecified())
        .map(|ip| SocketAddr::new(ip, 53))
        .take(MAX_SERVERS)
        .collect()
}

/// One UDP exchange from a fresh socket (a random source port per query), with an ID of
/// our own so that the answer is matched to this query only; the asker's ID is put back.
async fn ask_udp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().map_err(std::io::Error::other)?,
        SocketAddr::V6(_) => "[::]:0".parse().map_err(std::io::Error::other)?,
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(server).await?;
    let mut out = query.to_vec();
    let ours: u16 = rand::random();
    let theirs = set_id(&mut out, ours);
    sock.send(&out).await?;
    let mut buf = vec![0u8; MAX_TCP];
    loop {
        let n = sock.recv(&mut buf).await?;
        if n >= 12 && buf[0..2] == ours.to_be_bytes() {
            let mut answer = buf[..n].to_vec();
            set_id(&mut answer, theirs);
            return Ok(answer);
        }
    }
}

async fn ask_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await?;
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    stream.write_all(&out).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut answer).await?;
    Ok(answer)
}

/// Replaces a message's ID; returns the old one (messages shorter than a header are left).
fn set_id(msg: &mut [u8], id: u16) -> u16 {
    match msg.get_mut(0..2) {
        Some(head) => {
            let old = u16::from_be_bytes([head[0], head[1]]);
            head.copy_from_slice(&id.to_be_bytes());
            old
        }
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_gives_at_most_three_servers_and_never_vxnets_own() {
        let text = "# generated\nsearch example.org\nnameserver 169.254.53.53\n\
                    nameserver 203.0.113.53\nnameserver   ::1 \nnameserver bogus\n\
                    nameserver 0.0.0.0\nnameserver 10.1.1.1\nnameserver 10.2.2.2\n";
        let got = parse_resolv_conf(text);
        let want: Vec<SocketAddr> = ["203.0.113.53:53", "[::1]:53", "10.1.1.1:53"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_changed_resolv_conf_is_read_again() {
        let path = std::env::temp_dir().join(format!(
            "vxnet-resolv-{}",
            crate::model::Id::random().short()
        ));
        std::fs::write(&path, "nameserver 203.0.113.53\n").unwrap();
        let up = Upstreams::new(path.clone());
        assert_eq!(
            up.servers().to_vec(),
            vec!["203.0.113.53:53".parse().unwrap()]
        );
        std::fs::write(&path, "nameserver 203.0.113.54\nsearch lab\n").unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert_eq!(
            up.servers().to_vec(),
            vec!["203.0.113.54:53".parse().unwrap()]
        );
        assert_eq!(up.search_and_options(), vec!["search lab".to_string()]);
        std::fs::remove_file(&path).unwrap();
        std::thread::sleep(RECHECK + Duration::from_millis(50));
        assert!(
            up.servers().is_empty(),
            "a missing file: no resolvers, SERVFAIL"
        );
    }
}
