//! Remote endpoints, programmed on the sandbox's `vxlan1` as static entries: an FDB entry
//! (the container's MAC -> its host's VTEP, `bridge fdb replace ... dst VTEP self
//! permanent`) and a permanent neighbour (its IP -> MAC, `ip neigh replace ... nud
//! permanent`) from which `vxlan1`'s ARP proxy answers locally.
//!
//! Adds and removals are batched, many requests per `sendmsg` on a socket of their own (the
//! kernel's rate, as `bridge -batch`), where one awaited request through the async handle
//! costs a round trip through the runtime each.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use std::os::fd::AsFd;

use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::links::collect;
use super::{DataplaneError, Sandbox, VXLAN_NAME};
use crate::model::Mac;

/// A remote endpoint: its overlay IP and MAC, and the underlay address of its host's VTEP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub vtep: Ipv4Addr,
}

fn fdb_object(s: &Sandbox, p: &Peer) -> String {
    format!(
        "FDB entry {} -> {} on {VXLAN_NAME} in sandbox {}",
        p.mac,
        p.vtep,
        s.name()
    )
}

fn neigh_object(s: &Sandbox, p: &Peer) -> String {
    format!(
        "neighbour {} -> {} on {VXLAN_NAME} in sandbox {}",
        p.ip,
        p.mac,
        s.name()
    )
}

/// Peers per `sendmsg`: two messages each, about 50 bytes a message, well inside the
/// socket's default send buffer (a larger send is refused with EMSGSIZE).
const PEERS_PER_SEND: usize = 1024;

/// Adds (or updates: "replace" semantics) the FDB and neighbour entries of `peers`.
/// Repeating it is harmless; a peer whose VTEP changed is moved.
///
/// Batched: the kernel handles every message of one `sendmsg` in order before the call
/// returns, so a thousand peers cost one system call plus the kernel's own work (the rate
/// of `bridge -batch`), where one request per entry through the async handle costs a
/// channel hop, a send, a receive and a wake-up each. Only the last message asks for an
/// ACK; a refused one is answered with an error all the same, and the final ACK says
/// every earlier message has been handled.
pub async fn add_peers(sandbox: &Sandbox, peers: &[Peer]) -> Result<(), DataplaneError> {
    run_batches(sandbox, peers, BatchOp::Add).await
}

/// Removes the entries of `peers`; entries already gone are fine. Batched like
/// [`add_peers`], no lookups: the FDB delete names the peer's VTEP (NDA_DST), and the
/// kernel removes only that destination of the MAC (a delete whose destination matches
/// none answers 0 and removes nothing), so a MAC since added at another VTEP stays; the
/// neighbour is keyed by the overlay IP, which the caller no longer wants (plans are keyed
/// by IP: a peer that moved is replaced, never removed).
pub async fn remove_peers(sandbox: &Sandbox, peers: &[Peer]) -> Result<(), DataplaneError> {
    run_batches(sandbox, peers, BatchOp::Remove).await
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BatchOp {
    Add,
    Remove,
}

async fn run_batches(sandbox: &Sandbox, peers: &[Peer], op: BatchOp) -> Result<(), DataplaneError> {
    if peers.is_empty() {
        return Ok(());
    }
    let name = sandbox.name().to_string();
    let socket_error = |source: std::io::Error| DataplaneError::Socket {
        what: format!("{VXLAN_NAME} in sandbox {name}"),
        source,
    };
    let ns = sandbox
        .ns()
        .as_fd()
        .try_clone_to_owned()
        .map_err(socket_error)?;
    let vx = sandbox.vxlan_index();
    let peers = peers.to_vec();
    let outcome = tokio::task::spawn_blocking(move || {
        // The socket must be opened inside the sandbox; the rest may run anywhere.
        let socket = crate::netns::run_in(ns.as_fd(), batch_socket)?;
        Ok::<_, std::io::Error>(
            peers
                .chunks(PEERS_PER_SEND)
                .try_for_each(|chunk| send_batch(&socket, vx, chunk, op)),
        )
    })
    .await;
    let action = match op {
        BatchOp::Add => "add",
        BatchOp::Remove => "remove",
    };
    let refused = |peer: &Peer, fdb: bool, e: rtnetlink::Error| {
        let object = match fdb {
            true => fdb_object(sandbox, peer),
            false => neigh_object(sandbox, peer),
        };
        DataplaneError::netlink(action, object, &e)
    };
    match outcome {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(BatchError::Refused { peer, fdb, error }))) => {
            Err(refused(&peer, fdb, rtnetlink::Error::NetlinkError(*error)))
        }
        Ok(Ok(Err(BatchError::Io(e)))) | Ok(Err(e)) => Err(socket_error(e)),
        Ok(Ok(Err(BatchError::Timeout))) => Err(DataplaneError::Timeout {
            action,
            object: format!("peers on {VXLAN_NAME} in sandbox {}", sandbox.name()),
        }),
        Err(join) => Err(socket_error(std::io::Error::other(join.to_string()))),
    }
}

enum BatchError {
    Refused {
        peer: Peer,
        fdb: bool,
        error: Box<rtnetlink::packet_core::ErrorMessage>,
    },
    Io(std::io::Error),
    Timeout,
}

fn batch_socket() -> std::io::Result<netlink_sys::Socket> {
    let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    socket.set_ext_ack(true)?;
    // Errors carry only the header of the refused request, not a copy of it.
    socket.set_cap_ack(true)?;
    let tv = libc::timeval {
        tv_sec: super::NETLINK_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a timeval of the right size on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(socket)
}

/// A peer's FDB entry as a delete names it: its MAC's destination at its VTEP.
fn fdb_key(vx: u32, p: &Peer) -> NeighbourMessage {
    let mut m = bridge_message(vx, &p.mac);
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            p.vtep,
        )));
    m
}

/// A peer's neighbour as a delete names it: its overlay IP on `vxlan1`.
fn neigh_key(vx: u32, p: &Peer) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = vx;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            p.ip,
        )));
    m
}

fn fdb_message(vx: u32, p: &Peer) -> NeighbourMessage {
    let mut m = fdb_key(vx, p);
    m.header.state = NeighbourState::Permanent;
    m
}

fn neigh_message(vx: u32, p: &Peer) -> NeighbourMessage {
    let mut m = neigh_key(vx, p);
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(p.mac.0.to_vec()));
    m
}

/// One `sendmsg` carrying an FDB and a neighbour request per peer (sequence numbers 2i and
/// 2i+1 from 1), then the replies up to the final ACK. A removal of something already gone
/// (ENOENT) is not an error.
fn send_batch(
    socket: &netlink_sys::Socket,
    vx: u32,
    peers: &[Peer],
    op: BatchOp,
) -> Result<(), BatchError> {
    let count = peers.len() * 2;
    let mut buf = Vec::with_capacity(count * 64);
    for (i, p) in peers.iter().enumerate() {
        let msgs = match op {
            BatchOp::Add => [fdb_message(vx, p), neigh_message(vx, p)],
            BatchOp::Remove => [fdb_key(vx, p), neigh_key(vx, p)],
        };
        for (j, msg) in msgs.into_iter().enumerate() {
            let seq = (2 * i + j + 1) as u32;
            let mut req = match op {
                BatchOp::Add => {
                    let mut r = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(msg));
                    r.header.flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE;
                    r
                }
                BatchOp::Remove => {
                    let mut r = NetlinkMessage::from(RouteNetlinkMessage::DelNeighbour(msg));
                    r.header.flags = NLM_F_REQUEST;
                    r
                }
            };
            if seq as usize == count {
                req.header.flags |= NLM_F_ACK;
            }
            req.header.sequence_number = seq;
            req.finalize();
            let at = buf.len();
            buf.resize(at + req.buffer_len(), 0);
            req.serialize(&mut buf[at..]);
        }
    }
    socket.send(&buf, 0).map_err(BatchError::Io)?;
    let mut first_error = None;
    loop {
        let (data, _) = socket.recv_from_full().map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                BatchError::Timeout
            } else {
                BatchError::Io(e)
            }
        })?;
        let mut off = 0;
        while off + 16 <= data.len() {
            let len = u32::from_ne_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
                as usize;
            if len < 16 || off + len > data.len() {
                break;
            }
            let parsed = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..off + len]);
            off += (len + 3) & !3;
            let Ok(msg) = parsed else {
                continue;
            };
            let seq = msg.header.sequence_number as usize;
            if let NetlinkPayload::Error(e) = msg.payload {
                let done = seq == count;
                let gone =
                    op == BatchOp::Remove && e.code.map(|c| c.get().abs()) == Some(libc::ENOENT);
                if e.code.is_some() && !gone && first_error.is_none() && (1..=count).contains(&seq)
                {
                    first_error = Some(BatchError::Refused {
                        peer: peers[(seq - 1) / 2],
                        fdb: seq % 2 == 1,
                        error: Box::new(e),
                    });
                }
                if done {
                    return first_error.map_or(Ok(()), Err);
                }
            }
        }
    }
}

/// An AF_BRIDGE message for `mac` on the VXLAN device itself (NTF_SELF), not on the
/// bridge's own forwarding table (NTF_MASTER).
fn bridge_message(vx: u32, mac: &Mac) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = vx;
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    m
}

fn neighbour_mac(n: &NeighbourMessage) -> Option<Mac> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => Some(Mac(b.as_slice().try_into().ok()?)),
        _ => None,
    })
}

/// AF_BRIDGE entries carry their destination as raw bytes (`NeighbourAddress::Other`).
fn neighbour_ipv4(n: &NeighbourMessage) -> Option<Ipv4Addr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            let octets: [u8; 4] = b.as_slice().try_into().ok()?;
            Some(Ipv4Addr::from(octets))
        }
        _ => None,
    })
}

/// The static entries on `vxlan1`, each kind on its own: FDB entries (MAC -> the VTEPs it
/// is sent to) and permanent neighbours (IP -> MAC). `list_peers` joins them; a check
/// (`vxnet doctor`) reads them apart, to say which half of a peer is missing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerEntries {
    pub fdb: HashMap<Mac, Vec<Ipv4Addr>>,
    pub neighbours: HashMap<Ipv4Addr, Mac>,
}

/// Reads the static FDB entries with a destination and the permanent neighbours of
/// `vxlan1` (read only).
pub async fn list_peer_entries(sandbox: &Sandbox) -> Result<PeerEntries, DataplaneError> {
    let h = sandbox.handle();
    let vx = sandbox.vxlan_index();
    let object = || format!("{VXLAN_NAME} in sandbox {}", sandbox.name());
    // One after the other: a netlink socket runs one dump at a time (EBUSY otherwise).
    let fdb = collect("list the FDB entries of", object, || {
        h.neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
    })
    .await?;
    let neighbours = collect("list the neighbours of", object, || {
        h.neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
    })
    .await?;
    let mut out = PeerEntries::default();
    for (mac, vtep) in fdb
        .iter()
        .filter(|n| {
            n.header.ifindex == vx
                && n.header.flags.contains(NeighbourFlags::Own)
                && n.header.state == NeighbourState::Permanent
        })
        .filter_map(|n| Some((neighbour_mac(n)?, neighbour_ipv4(n)?)))
    {
        out.fdb.entry(mac).or_default().push(vtep);
    }
    out.neighbours = neighbours
        .iter()
        .filter(|n| n.header.ifindex == vx && n.header.state == NeighbourState::Permanent)
        .filter_map(|n| Some((neighbour_ipv4(n)?, neighbour_mac(n)?)))
        .collect();
    Ok(out)
}

/// The peers programmed on `vxlan1` (sorted): static FDB entries with a destination,
/// joined by MAC with permanent neighbours. A half entry (one without the other) is left
/// out: it cannot carry traffic.
pub async fn list_peers(sandbox: &Sandbox) -> Result<Vec<Peer>, DataplaneError> {
    let entries = list_peer_entries(sandbox).await?;
    let mut peers: Vec<Peer> = entries
        .neighbours
        .iter()
        .filter_map(|(ip, mac)| {
            Some(Peer {
                ip: *ip,
                mac: *mac,
                // The last one listed, as before the entries were read apart.
                vtep: *entries.fdb.get(mac)?.last()?,
            })
        })
        .collect();
    peers.sort();
    Ok(peers)
}
