//! Small netlink helpers shared by the data-plane modules: links by name or address, the
//! attribute accessors the "ensure" logic compares against, and the few link changes it
//! makes (up, master, MTU, addresses). Errors name the object and the namespace.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures::{Stream, TryStreamExt};
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoPortData, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec};

use super::{DataplaneError, NETLINK_TIMEOUT};

/// The host interface that carries the VXLAN traffic: the one holding the advertise address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Underlay {
    pub ifindex: u32,
    pub name: String,
    pub mtu: u32,
    pub addr: Ipv4Addr,
}

/// Finds the interface holding `addr` in `host`'s namespace (its index, name and MTU).
pub async fn find_underlay(host: &Handle, addr: Ipv4Addr) -> Result<Underlay, DataplaneError> {
    let addrs: Vec<AddressMessage> = collect(
        "list the addresses of",
        || "the host namespace".to_string(),
        || host.address().get().execute(),
    )
    .await?;
    let ifindex = addrs
        .iter()
        .filter(|a| a.header.family == AddressFamily::Inet)
        .find(|a| ipv4_of(a) == Some(addr))
        .map(|a| a.header.index)
        .ok_or(DataplaneError::UnderlayNotFound { addr })?;
    let object = || format!("the underlay interface (index {ifindex}) in the host namespace");
    let link = link_by_index(host, ifindex, "the host namespace")
        .await?
        .ok_or_else(|| DataplaneError::Vanished { object: object() })?;
    Ok(Underlay {
        ifindex,
        name: name(&link).unwrap_or_default().to_string(),
        mtu: mtu(&link).unwrap_or(1500),
        addr,
    })
}

/// The IPv4 address of an address message: IFA_LOCAL, which differs from IFA_ADDRESS only
/// on point-to-point links (where IFA_ADDRESS is the far end).
pub(crate) fn ipv4_of(a: &AddressMessage) -> Option<Ipv4Addr> {
    let mut address = None;
    for attr in &a.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V4(ip)) => return Some(*ip),
            AddressAttribute::Address(IpAddr::V4(ip)) => address = Some(*ip),
            _ => {}
        }
    }
    address
}

/// The link called `name`, or `None`. `ns` names the namespace for error messages.
pub async fn link_by_name(
    h: &Handle,
    name: &str,
    ns: &str,
) -> Result<Option<LinkMessage>, DataplaneError> {
    let got = collect(
        "look up",
        || format!("link {name} in {ns}"),
        || h.link().get().match_name(name.to_string()).execute(),
    )
    .await;
    not_found_is_none(got)
}

/// The link with index `index`, or `None`.
pub async fn link_by_index(
    h: &Handle,
    index: u32,
    ns: &str,
) -> Result<Option<LinkMessage>, DataplaneError> {
    let got = collect(
        "look up",
        || format!("link index {index} in {ns}"),
        || h.link().get().match_index(index).execute(),
    )
    .await;
    not_found_is_none(got)
}

/// The index of the link called `name`, or `None`.
pub async fn link_index(h: &Handle, name: &str, ns: &str) -> Result<Option<u32>, DataplaneError> {
    Ok(link_by_name(h, name, ns).await?.map(|l| l.header.index))
}

/// Every link in the namespace.
pub async fn all_links(h: &Handle, ns: &str) -> Result<Vec<LinkMessage>, DataplaneError> {
    collect(
        "list the links of",
        || ns.to_string(),
        || h.link().get().execute(),
    )
    .await
}

fn not_found_is_none(
    got: Result<Vec<LinkMessage>, DataplaneError>,
) -> Result<Option<LinkMessage>, DataplaneError> {
    match got {
        Ok(mut links) => Ok(links.pop()),
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Applies `msg` (built with `LinkUnspec::new_with_index`) to an existing link: what
/// `ip link set` does (RTM_NEWLINK without NLM_F_CREATE).
pub async fn change_link(
    h: &Handle,
    msg: LinkMessage,
    action: &'static str,
    object: &str,
) -> Result<(), DataplaneError> {
    call(
        action,
        || object.to_string(),
        h.link().change(msg).execute(),
    )
    .await
}

pub async fn set_up(h: &Handle, index: u32, object: &str) -> Result<(), DataplaneError> {
    let msg = LinkUnspec::new_with_index(index).up().build();
    change_link(h, msg, "bring up", object).await
}

pub async fn set_master(
    h: &Handle,
    index: u32,
    master: u32,
    object: &str,
) -> Result<(), DataplaneError> {
    let msg = LinkUnspec::new_with_index(index).controller(master).build();
    change_link(h, msg, "attach to its bridge", object).await
}

pub async fn set_mtu(h: &Handle, index: u32, mtu: u32, object: &str) -> Result<(), DataplaneError> {
    let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
    change_link(h, msg, "set the MTU of", object).await
}

/// Deletes a link; one that is already gone is fine.
pub async fn delete_link(h: &Handle, index: u32, object: &str) -> Result<(), DataplaneError> {
    match call(
        "delete",
        || object.to_string(),
        h.link().del(index).execute(),
    )
    .await
    {
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(()),
        other => other,
    }
}

/// Makes `want` the only IPv4 address of link `index`: adds it when missing and removes
/// any other IPv4 address (a stale gateway or container address would answer for an IP the
/// cluster has given to someone else). Returns whether anything changed.
pub async fn ensure_ipv4_address(
    h: &Handle,
    index: u32,
    want: Ipv4Net,
    object: &str,
) -> Result<bool, DataplaneError> {
    ensure_ipv4_addresses(h, index, &[want], object).await
}

/// [`ensure_ipv4_address`] for a link that holds several addresses (br0: the gateway and
/// the name server's).
pub async fn ensure_ipv4_addresses(
    h: &Handle,
    index: u32,
    wanted: &[Ipv4Net],
    object: &str,
) -> Result<bool, DataplaneError> {
    let current: Vec<AddressMessage> = collect(
        "list the addresses of",
        || object.to_string(),
        || h.address().get().set_link_index_filter(index).execute(),
    )
    .await?;
    let mut have = vec![false; wanted.len()];
    let mut changed = false;
    for a in current
        .into_iter()
        .filter(|a| a.header.family == AddressFamily::Inet)
    {
        let pos = wanted.iter().position(|want| {
            ipv4_of(&a) == Some(want.addr()) && a.header.prefix_len == want.prefix_len()
        });
        if let Some(pos) = pos {
            have[pos] = true;
            continue;
        }
        let del = h.address().del(a).execute();
        match call("remove a stale address from", || object.to_string(), del).await {
            Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => {}
            other => other?,
        }
        changed = true;
    }
    for (want, _) in wanted.iter().zip(have).filter(|(_, have)| !have) {
        let add = h
            .address()
            .add(index, IpAddr::V4(want.addr()), want.prefix_len())
            .execute();
        match call("add an address to", || format!("{object} ({want})"), add).await {
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            other => other?,
        }
        changed = true;
    }
    Ok(changed)
}

/// The IPv4 addresses (with prefix) of link `index`, read only.
pub async fn ipv4_addresses(
    h: &Handle,
    index: u32,
    ns: &str,
) -> Result<Vec<Ipv4Net>, DataplaneError> {
    let current: Vec<AddressMessage> = collect(
        "list the addresses of",
        || format!("link {index} in {ns}"),
        || h.address().get().set_link_index_filter(index).execute(),
    )
    .await?;
    Ok(current
        .iter()
        .filter(|a| a.header.family == AddressFamily::Inet)
        .filter_map(|a| Ipv4Net::new(ipv4_of(a)?, a.header.prefix_len).ok())
        .collect())
}

// Attribute accessors: the "ensure" logic compares what the kernel reports with the spec.

pub fn name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

pub fn mtu(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// The index of the bridge (or bond) this link is enslaved to; `None` when it has none.
pub fn master(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(m) if *m != 0 => Some(*m),
        _ => None,
    })
}

/// IFLA_LINK: a veth's peer index (in the peer's namespace), a VXLAN's lower device.
pub fn link_attr(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

pub fn hw_address(l: &LinkMessage) -> Option<&[u8]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

pub fn is_up(l: &LinkMessage) -> bool {
    l.header.flags.contains(LinkFlags::Up)
}

fn link_info(l: &LinkMessage) -> &[LinkInfo] {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(i) => Some(i.as_slice()),
            _ => None,
        })
        .unwrap_or(&[])
}

pub fn kind(l: &LinkMessage) -> Option<&InfoKind> {
    link_info(l).iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k),
        _ => None,
    })
}

pub fn info_data(l: &LinkMessage) -> Option<&InfoData> {
    link_info(l).iter().find_map(|i| match i {
        LinkInfo::Data(d) => Some(d),
        _ => None,
    })
}

/// Settings of this link as a port of its master (IFLA_INFO_SLAVE_DATA).
pub fn port_data(l: &LinkMessage) -> Option<&InfoPortData> {
    link_info(l).iter().find_map(|i| match i {
        LinkInfo::PortData(d) => Some(d),
        _ => None,
    })
}

pub fn kind_name(l: &LinkMessage) -> String {
    match kind(l) {
        Some(k) => k.to_string(),
        None => "device without a kind".to_string(),
    }
}

// Request plumbing: every request gets a deadline and an error that names its object.

/// Awaits one netlink request with [`NETLINK_TIMEOUT`]; `object` is built only on failure.
pub(crate) async fn call<T, F>(
    action: &'static str,
    object: impl FnOnce() -> String,
    fut: F,
) -> Result<T, DataplaneError>
where
    F: Future<Output = Result<T, rtnetlink::Error>>,
{
    match tokio::time::timeout(NETLINK_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(DataplaneError::netlink(action, object(), &e)),
        Err(_) => Err(DataplaneError::Timeout {
            action,
            object: object(),
        }),
    }
}

/// Collects a dump (or a get) with [`NETLINK_TIMEOUT`] for the whole of it. `make` issues
/// the request, again after EBUSY: a netlink socket runs one dump at a time, so a dump
/// started while another is running on the same handle is refused, not queued.
pub(crate) async fn collect<T, S>(
    action: &'static str,
    object: impl FnOnce() -> String,
    make: impl Fn() -> S,
) -> Result<Vec<T>, DataplaneError>
where
    S: Stream<Item = Result<T, rtnetlink::Error>>,
{
    let deadline = tokio::time::Instant::now() + NETLINK_TIMEOUT;
    // 1..2 ms, growing to 25..50 ms: the kernel's EBUSY passes in milliseconds.
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(1), Duration::from_millis(25));
    loop {
        let pause = backoff.next_pause();
        match tokio::time::timeout_at(deadline, make().try_collect::<Vec<T>>()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e))
                if errno(&e) == Some(libc::EBUSY)
                    && tokio::time::Instant::now() + pause < deadline =>
            {
                tokio::time::sleep(pause).await;
            }
            Ok(Err(e)) => return Err(DataplaneError::netlink(action, object(), &e)),
            Err(_) => {
                return Err(DataplaneError::Timeout {
                    action,
                    object: object(),
                })
            }
        }
    }
}

/// The positive errno of a refused request.
pub(crate) fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().saturating_neg()),
        _ => None,
    }
}

/// The kernel's explanation of a refusal (extended ACK, NLMSGERR_ATTR_MSG), when the socket
/// asked for it (`NetNs::netlink` does). The error payload is the echoed request header,
/// then the request itself unless the socket set NETLINK_CAP_ACK, then the attributes; both
/// layouts are tried, and a candidate counts only if its attributes tile the rest exactly.
pub(crate) fn extack_message(err: &rtnetlink::Error) -> Option<String> {
    let rtnetlink::Error::NetlinkError(m) = err else {
        return None;
    };
    let buf = m.header.as_slice();
    let echoed_len = u32::from_ne_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
    [16, align4(echoed_len)]
        .into_iter()
        .find_map(|start| parse_extack(buf.get(start..)?))
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn parse_extack(mut attrs: &[u8]) -> Option<String> {
    const NLMSGERR_ATTR_MSG: u16 = 1;
    let mut msg = None;
    while !attrs.is_empty() {
        let len = u16::from_ne_bytes(attrs.get(0..2)?.try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(attrs.get(2..4)?.try_into().ok()?) & 0x3fff;
        if len < 4 {
            return None;
        }
        let value = attrs.get(4..len)?;
        if kind == NLMSGERR_ATTR_MSG {
            let text = value.split(|b| *b == 0).next()?;
            msg = Some(String::from_utf8_lossy(text).into_owned());
        }
        attrs = attrs.get(align4(len).min(attrs.len())..)?;
    }
    msg.filter(|m| !m.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extack_message_is_found_in_both_ack_layouts() {
        let text = b"A VXLAN device with the specified VNI already exists\0";
        let mut tlv = Vec::new();
        let len = (4 + text.len()) as u16;
        tlv.extend_from_slice(&len.to_ne_bytes());
        tlv.extend_from_slice(&1u16.to_ne_bytes());
        tlv.extend_from_slice(text);
        while tlv.len() % 4 != 0 {
            tlv.push(0);
        }
        // Capped: echoed header (claiming a 40-byte request) then the attributes.
        let mut capped = 40u32.to_ne_bytes().to_vec();
        capped.extend_from_slice(&[0u8; 12]);
        capped.extend_from_slice(&tlv);
        // Uncapped: the 40-byte request echoed in full, then the attributes.
        let mut full = 40u32.to_ne_bytes().to_vec();
        full.extend_from_slice(&[0xffu8; 36]);
        full.extend_from_slice(&tlv);
        for payload in [capped, full] {
            let mut m = rtnetlink::packet_core::ErrorMessage::default();
            m.code = std::num::NonZeroI32::new(-libc::EEXIST);
            m.header = payload;
            let err = rtnetlink::Error::NetlinkError(m);
            assert_eq!(errno(&err), Some(libc::EEXIST));
            assert_eq!(
                extack_message(&err).as_deref(),
                Some("A VXLAN device with the specified VNI already exists")
            );
        }
    }
}
