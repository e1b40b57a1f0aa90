//! Remote endpoints, programmed on the sandbox's `vxlan1` as static entries: an FDB entry
//! (the container's MAC -> its host's VTEP, `bridge fdb replace ... dst VTEP self
//! permanent`) and a permanent neighbour (its IP -> MAC, `ip neigh replace ... nud
//! permanent`) from which `vxlan1`'s ARP proxy answers locally.
//!
//! Requests are pipelined: one awaited request costs a round trip through the runtime
//! (about 1 ms), many in flight on the same socket cost 8-10 µs each.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use futures::{stream, StreamExt, TryStreamExt};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::Handle;

use super::links::{call, collect};
use super::{DataplaneError, Sandbox, VXLAN_NAME};
use crate::model::Mac;

/// How many peers are in flight at once. Enough to keep the socket busy; bounded so that a
/// 50,000-peer batch does not hold 100,000 pending requests in memory.
const IN_FLIGHT: usize = 256;

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

/// Adds (or updates: "replace" semantics) the FDB and neighbour entries of `peers`.
/// Repeating it is harmless; a peer whose VTEP changed is moved.
pub async fn add_peers(sandbox: &Sandbox, peers: &[Peer]) -> Result<(), DataplaneError> {
    let h = sandbox.handle();
    let vx = sandbox.vxlan_index();
    stream::iter(peers.iter().map(Ok))
        .try_for_each_concurrent(IN_FLIGHT, |p| async move {
            let fdb = h
                .neighbours()
                .add_bridge(vx, &p.mac.0)
                .flags(NeighbourFlags::Own)
                .destination(IpAddr::V4(p.vtep))
                .replace()
                .execute();
            let neigh = h
                .neighbours()
                .add(vx, IpAddr::V4(p.ip))
                .link_layer_address(&p.mac.0)
                .state(NeighbourState::Permanent)
                .replace()
                .execute();
            futures::try_join!(
                call("add", || fdb_object(sandbox, p), fdb),
                call("add", || neigh_object(sandbox, p), neigh),
            )
            .map(|_| ())
        })
        .await
}

/// Removes the entries of `peers`; entries already gone are fine.
///
/// Only what still belongs to the peer is removed: when its MAC has since been added again
/// at another VTEP (the container moved, and the add overtook this removal), the newer FDB
/// entry and the IP's neighbour stay. A neighbour left without its FDB entry (a peer
/// half-added before a failure) is removed.
pub async fn remove_peers(sandbox: &Sandbox, peers: &[Peer]) -> Result<(), DataplaneError> {
    stream::iter(peers.iter().map(Ok))
        .try_for_each_concurrent(IN_FLIGHT, |p| remove_one(sandbox, p))
        .await
}

async fn remove_one(sandbox: &Sandbox, p: &Peer) -> Result<(), DataplaneError> {
    let h = sandbox.handle();
    let vx = sandbox.vxlan_index();
    // Looked up first because the kernel cannot be asked to delete "MAC only if at this
    // VTEP": a VXLAN FDB delete whose NDA_DST matches no destination still answers 0.
    let fdb = get_fdb(h, vx, &p.mac)
        .await
        .map_err(|e| DataplaneError::netlink("look up", fdb_object(sandbox, p), &e))?;
    if let Some(fdb) = fdb {
        if neighbour_ipv4(&fdb) != Some(p.vtep) {
            return Ok(());
        }
        let mut del = bridge_message(vx, &p.mac);
        del.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                p.vtep,
            )));
        let del = h.neighbours().del(del).execute();
        match call("remove", || fdb_object(sandbox, p), del).await {
            Err(e) if e.errno() == Some(libc::ENOENT) => {}
            other => other?,
        }
    }
    let neigh = get_neighbour(h, vx, p.ip)
        .await
        .map_err(|e| DataplaneError::netlink("look up", neigh_object(sandbox, p), &e))?;
    if neigh.as_ref().and_then(neighbour_mac) != Some(p.mac) {
        return Ok(());
    }
    let mut del = NeighbourMessage::default();
    del.header.family = AddressFamily::Inet;
    del.header.ifindex = vx;
    del.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            p.ip,
        )));
    match call(
        "remove",
        || neigh_object(sandbox, p),
        h.neighbours().del(del).execute(),
    )
    .await
    {
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(()),
        other => other,
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

/// A single-entry RTM_GETNEIGH (not a dump: rtnetlink's request builder only dumps).
async fn get_one(
    h: &Handle,
    msg: NeighbourMessage,
) -> Result<Option<NeighbourMessage>, rtnetlink::Error> {
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(msg));
    req.header.flags = NLM_F_REQUEST;
    let mut responses = h.clone().request(req)?;
    let mut found = None;
    while let Some(m) = responses.next().await {
        match m.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => found = Some(n),
            NetlinkPayload::Error(e) if e.code.map(|c| c.get()) == Some(-libc::ENOENT) => {
                return Ok(None)
            }
            NetlinkPayload::Error(e) => return Err(rtnetlink::Error::NetlinkError(e)),
            _ => {}
        }
    }
    Ok(found)
}

async fn get_neighbour(
    h: &Handle,
    vx: u32,
    ip: Ipv4Addr,
) -> Result<Option<NeighbourMessage>, rtnetlink::Error> {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = vx;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    get_one(h, m).await
}

async fn get_fdb(
    h: &Handle,
    vx: u32,
    mac: &Mac,
) -> Result<Option<NeighbourMessage>, rtnetlink::Error> {
    get_one(h, bridge_message(vx, mac)).await
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

/// The peers programmed on `vxlan1` (sorted): static FDB entries with a destination,
/// joined by MAC with permanent neighbours. A half entry (one without the other) is left
/// out: it cannot carry traffic.
pub async fn list_peers(sandbox: &Sandbox) -> Result<Vec<Peer>, DataplaneError> {
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
    let vteps: HashMap<Mac, Ipv4Addr> = fdb
        .iter()
        .filter(|n| {
            n.header.ifindex == vx
                && n.header.flags.contains(NeighbourFlags::Own)
                && n.header.state == NeighbourState::Permanent
        })
        .filter_map(|n| Some((neighbour_mac(n)?, neighbour_ipv4(n)?)))
        .collect();
    let mut peers: Vec<Peer> = neighbours
        .iter()
        .filter(|n| n.header.ifindex == vx && n.header.state == NeighbourState::Permanent)
        .filter_map(|n| {
            let mac = neighbour_mac(n)?;
            Some(Peer {
                ip: neighbour_ipv4(n)?,
                mac,
                vtep: *vteps.get(&mac)?,
            })
        })
        .collect();
    peers.sort();
    Ok(peers)
}
