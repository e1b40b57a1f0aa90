//! The name server: every container on a vxnet network finds the others by name, on any host.
//!
//! It answers from the watch-fed view (no store traffic of its own): a container's name, its
//! aliases, `name.network`, and the reverse (PTR) of overlay addresses, for the networks the
//! asking container is on and no others. Everything else goes to the host's resolvers.
//!
//! Where containers find it: one fixed link-local address, [`LISTEN_ADDR`], on `br0` of every
//! network's sandbox. A container reaches it through its overlay interface, so the one
//! address serves every network on every host, and a single engine-wide setting (Docker's
//! daemon.json `"dns": ["169.254.53.53"]`) is enough. The sandbox the query arrives in tells
//! the network; the source address tells the endpoint, which must be one of this host's.
//!
//! - `answer.rs`: one query → an answer, a forward or nothing (pure; hostile packets are tests).
//! - `forward.rs`: the host's resolvers, from its resolv.conf.
//! - `limit.rs`: a token bucket per asking endpoint.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::{AbortHandle, JoinSet};

pub mod answer;
pub mod forward;
pub mod limit;

pub use answer::{Asker, Decision, Transport};
use forward::Upstreams;
use limit::Limiter;

use crate::model::{EndpointId, NetworkId, NodeId};
use crate::netns::NetNs;
use crate::view::SharedView;

/// Where the name server listens in every sandbox (a /32 on br0). Link-local, so it is never
/// routed off the host, and outside every subnet a network can be given.
pub const LISTEN_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 53, 53);
pub const PORT: u16 = 53;

/// Forwards in flight at once, for all networks: the rest get SERVFAIL at once.
const MAX_FORWARDS: usize = 512;
/// TCP connections open at once per network.
const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP connection idle this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The largest query read over UDP; longer datagrams are cut and so refused as malformed.
const UDP_BUFFER: usize = 4096;
/// The socket's queue: a second of every container's allowed rate, so a burst the limit lets
/// through (or a pause of the daemon) does not crowd out other containers' queries.
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// Sets a socket's receive buffer, past net.core.rmem_max (the daemon has CAP_NET_ADMIN);
/// the kernel's default stays if neither option is allowed.
fn receive_buffer(sock: &std::net::UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd;
    let size = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket this function borrows, with a c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// The networks of the container that owns a local endpoint: the names it may see.
pub trait ContainerScope: Send + Sync {
    /// `None` when this source does not know the endpoint.
    fn networks_of(&self, endpoint: &EndpointId) -> Option<Vec<NetworkId>>;
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "cannot listen for DNS on {LISTEN_ADDR}:{PORT} in the sandbox of network {network}: \
         {source} (is another name server bound there?)"
    )]
    Listen {
        network: String,
        #[source]
        source: io::Error,
    },
}

/// What the name server has done since the daemon started (`vxnet info`).
#[derive(Debug, Default)]
pub struct DnsStats {
    pub answered: AtomicU64,
    pub forwarded: AtomicU64,
    /// Queries from an address that is no local endpoint of that network.
    pub unknown_source: AtomicU64,
    /// Queries over an endpoint's rate.
    pub rate_limited: AtomicU64,
    /// Forwards refused because too many were in flight.
    pub forwards_shed: AtomicU64,
}

/// The name server as `vxnet info` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsInfo {
    pub listen: String,
    /// Where other names go (the host's resolv.conf).
    pub upstreams: Vec<String>,
    /// (network, name) entries in the index.
    pub names: usize,
    pub answered: u64,
    pub forwarded: u64,
    pub unknown_source: u64,
    pub rate_limited: u64,
    pub forwards_shed: u64,
}

pub struct DnsServer {
    view: SharedView,
    node: NodeId,
    scopes: RwLock<Vec<Arc<dyn ContainerScope>>>,
    upstreams: Upstreams,
    limiter: Limiter,
    forwards: Arc<Semaphore>,
    turn: AtomicUsize,
    stats: DnsStats,
}

/// One network's sockets: closed when dropped (with the sandbox they live in).
pub struct Listener {
    tasks: Vec<AbortHandle>,
    /// The sandbox namespace the sockets were opened in (its inode).
    ns_inode: u64,
}

impl Listener {
    /// Whether this listener's sockets live in `ns` (a re-created sandbox needs new ones).
    pub fn is_in(&self, ns: &NetNs) -> bool {
        ns.inode().is_ok_and(|i| i == self.ns_inode)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("ns_inode", &self.ns_inode)
            .finish()
    }
}

impl DnsServer {
    /// A name server answering from `view` for this host's (`node`) endpoints, forwarding
    /// the rest to the resolvers in `resolv_conf`.
    pub fn new(view: SharedView, node: NodeId, resolv_conf: PathBuf) -> Arc<Self> {
        Arc::new(DnsServer {
            view,
            node,
            scopes: RwLock::new(Vec::new()),
            upstreams: Upstreams::new(resolv_conf),
            limiter: Limiter::new(limit::PER_SOURCE_RATE, limit::PER_SOURCE_BURST),
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
            turn: AtomicUsize::new(0),
            stats: DnsStats::default(),
        })
    }

    /// Adds a source of container scopes (vxnet's registry, the Docker plugin's endpoints).
    pub fn add_scope(&self, scope: Arc<dyn ContainerScope>) {
        match self.scopes.write() {
            Ok(mut s) => s.push(scope),
            Err(poisoned) => poisoned.into_inner().push(scope),
        }
    }

    pub fn info(&self) -> DnsInfo {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsInfo {
            listen: format!("{LISTEN_ADDR}:{PORT}"),
            upstreams: self
                .upstreams
                .servers()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            names: self.view.with(|v| v.name_count()),
            answered: n(&self.stats.answered),
            forwarded: n(&self.stats.forwarded),
            unknown_source: n(&self.stats.unknown_source),
            rate_limited: n(&self.stats.rate_limited),
            forwards_shed: n(&self.stats.forwards_shed),
        }
    }

    /// The host's `search`/`options` lines, for the resolv.conf of a container.
    pub fn resolv_conf_for_containers(&self) -> String {
        let mut text = format!(
            "# written by vxnet: its name server answers for the container's networks\n\
             nameserver {LISTEN_ADDR}\n"
        );
        for line in self.upstreams.search_and_options() {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }

    /// The host's search domains (resolv.conf's `search` line), which containers get too.
    pub fn search_domains(&self) -> Vec<String> {
        self.upstreams
            .search_and_options()
            .iter()
            .filter_map(|l| l.strip_prefix("search "))
            .flat_map(|l| l.split_whitespace().map(str::to_string))
            .collect()
    }

    /// Opens the UDP and TCP sockets of network `net` in its sandbox `ns` (which must have
    /// [`LISTEN_ADDR`] on br0) and serves them until the returned listener is dropped.
    pub fn listen(self: &Arc<Self>, net: &NetworkId, ns: &NetNs) -> Result<Listener, DnsError> {
        let failed = |source| DnsError::Listen {
            network: net.short().to_string(),
            source,
        };
        let addr = SocketAddr::from((LISTEN_ADDR, PORT));
        let (udp, tcp) = ns
            .run(|| {
                let udp = std::net::UdpSocket::bind(addr)?;
                udp.set_nonblocking(true)?;
                receive_buffer(&udp, UDP_RECEIVE_BUFFER);
                let tcp = std::net::TcpListener::bind(addr)?;
                tcp.set_nonblocking(true)?;
                Ok((udp, tcp))
            })
            .map_err(failed)?;
        let udp = Arc::new(UdpSocket::from_std(udp).map_err(failed)?);
        let tcp = TcpListener::from_std(tcp).map_err(failed)?;
        let ns_inode = ns.inode().map_err(failed)?;
        let udp_task = tokio::spawn(self.clone().serve_udp(net.clone(), udp));
        let tcp_task = tokio::spawn(self.clone().serve_tcp(net.clone(), tcp));
        Ok(Listener {
            tasks: vec![udp_task.abort_handle(), tcp_task.abort_handle()],
            ns_inode,
        })
    }

    /// The networks whose names `endpoint` may see: its container's, or its own alone.
    fn scope_of(&self, net: &NetworkId, endpoint: &EndpointId) -> Vec<NetworkId> {
        let scopes = match self.scopes.read() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        scopes
            .iter()
            .find_map(|s| s.networks_of(endpoint).filter(|nets| nets.contains(net)))
            .unwrap_or_else(|| vec![net.clone()])
    }

    fn decide(
        &self,
        net: &NetworkId,
        src: Ipv4Addr,
        packet: &[u8],
        transport: Transport,
    ) -> Decision {
        let asker = self.view.with(|v| {
            v.endpoint_at(net, src)
                .filter(|ep| ep.node_id == self.node)
                .map(|ep| ep.id.clone())
        });
        let Some(asker) = asker else {
            self.stats.unknown_source.fetch_add(1, Ordering::Relaxed);
            return Decision::Drop;
        };
        if !self.limiter.allow(&asker) {
            self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Decision::Drop;
        }
        let scope = self.scope_of(net, &asker);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let decision = self.view.with(|v| {
            let Some(endpoint) = v.endpoints.get(net).and_then(|eps| eps.get(&asker)) else {
                return Decision::Drop;
            };
            let asker = Asker {
                endpoint,
                scope: &scope,
            };
            answer::decide(v, &asker, packet, transport, turn)
        });
        match &decision {
            Decision::Answer(_) => self.stats.answered.fetch_add(1, Ordering::Relaxed),
            Decision::Forward { .. } => self.stats.forwarded.fetch_add(1, Ordering::Relaxed),
            Decision::Drop => 0,
        };
        decision
    }

    async fn serve_udp(self: Arc<Self>, net: NetworkId, sock: Arc<UdpSocket>) {
        let mut buf = vec![0u8; UDP_BUFFER];
        loop {
            let (n, src) = match sock.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!(network = net.short(), error = %e, "DNS receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let SocketAddr::V4(src) = src else {
                continue;
            };
            match self.decide(&net, *src.ip(), &buf[..n], Transport::Udp) {
                Decision::Answer(bytes) => {
                    let _ = sock.send_to(&bytes, src).await;
                }
                Decision::Forward { id } => match self.forwards.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (me, sock, query) = (self.clone(), sock.clone(), buf[..n].to_vec());
                        tokio::spawn(async move {
                            let answer = me.upstreams.forward(&query, id, Transport::Udp).await;
                            let _ = sock.send_to(&answer, src).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        self.stats.forwards_shed.fetch_add(1, Ordering::Relaxed);
                        let _ = sock.send_to(&answer::server_failure(id), src).await;
                    }
                },
                Decision::Drop => {}
            }
        }
    }

    async fn serve_tcp(self: Arc<Self>, net: NetworkId, listener: TcpListener) {
        // Dropped with this task: every connection it holds goes with it.
        let mut connections = JoinSet::new();
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!(network = net.short(), error = %e, "DNS accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let SocketAddr::V4(peer) = peer else {
                continue;
            };
            while connections.try_join_next().is_some() {}
            if connections.len() >= MAX_TCP_CONNECTIONS {
                continue; // dropping the stream closes it
            }
            let me = self.clone();
            let net = net.clone();
            connections.spawn(async move {
                let _ = me.serve_connection(&net, stream, *peer.ip()).await;
            });
        }
    }

    async fn serve_connection(
        &self,
        net: &NetworkId,
        mut stream: TcpStream,
        peer: Ipv4Addr,
    ) -> io::Result<()> {
        let idle = |e| io::Error::new(io::ErrorKind::TimedOut, e);
        loop {
            let mut len = [0u8; 2];
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len))
                .await
                .map_err(idle)??;
            let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
                .await
                .map_err(idle)??;
            let answer = match self.decide(net, peer, &query, Transport::Tcp) {
                Decision::Answer(bytes) => bytes,
                Decision::Forward { id } => match self.forwards.clone().try_acquire_owned() {
                    Ok(_permit) => self.upstreams.forward(&query, id, Transport::Tcp).await,
                    Err(_) => {
                        self.stats.forwards_shed.fetch_add(1, Ordering::Relaxed);
                        answer::server_failure(id)
                    }
                },
                Decision::Drop => return Ok(()),
            };
            let Ok(len) = u16::try_from(answer.len()) else {
                return Ok(());
            };
            let mut out = Vec::with_capacity(answer.len() + 2);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&answer);
            tokio::time::timeout(TCP_IDLE, stream.write_all(&out))
                .await
                .map_err(idle)??;
        }
    }
}
