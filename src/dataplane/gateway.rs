//! The gateway bridge: Docker's `docker_gwbridge`. Overlay containers reach the world not
//! through the overlay but through a second interface, `eth1`, on a bridge in the HOST
//! namespace (NAT'd by nftables rules kept elsewhere). Their default route goes via the
//! bridge's address on `eth1`; the overlay subnet stays on `eth0`.
//!
//! Unlike a sandbox, the host namespace is not all ours: a device under one of our names
//! that is not the kind we make is reported, never deleted.

use std::io::{self, Read, Seek, Write};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::{InfoBridgePort, InfoKind, InfoPortData, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort};

use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};
use rtnetlink::RouteMessageBuilder;

use super::endpoint::{
    configure_container_end, ensure_veth_pair, is_veth, route_gateway, route_table,
    validate_ifname, VethEnds,
};
use super::links::{self, call, collect};
use super::sandbox::{bridge_mac, fix_link};
use super::DataplaneError;
use crate::model::Mac;
use crate::netns::NetNs;

const HOST: &str = "the host namespace";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayBridgeSpec {
    /// e.g. "vxnet_gwbridge".
    pub name: String,
    /// The bridge's address, the containers' default gateway: e.g. 172.18.0.1/16.
    pub address: Ipv4Net,
    /// 1500: the gateway path is not encapsulated.
    pub mtu: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayEndpointSpec {
    /// The host-side veth: "gw" + 7 hex characters of the endpoint ID.
    pub host_ifname: String,
    /// Usually "eth1".
    pub container_ifname: String,
    /// e.g. 172.18.0.2/16.
    pub address: Ipv4Net,
    pub mac: Mac,
    pub mtu: u32,
    /// The bridge's address (172.18.0.1): the container's default route goes via it.
    pub default_gateway: Ipv4Addr,
}

fn invalid(what: &'static str, detail: String) -> DataplaneError {
    DataplaneError::InvalidSpec { what, detail }
}

fn validate_mtu(mtu: u32) -> Result<(), DataplaneError> {
    // 68 is IPv4's minimum; 65535 the largest a veth or bridge takes.
    if !(68..=65535).contains(&mtu) {
        return Err(invalid("MTU", format!("{mtu} is outside 68..=65535")));
    }
    Ok(())
}

fn is_bridge(l: &LinkMessage) -> bool {
    links::kind(l) == Some(&InfoKind::Bridge)
}

/// Gets or creates the gateway bridge in the host namespace and brings it to `spec`: MAC
/// 02:42 + its IP (fixed, so that containers never hold a stale ARP entry for their
/// gateway: left to the kernel, a bridge takes a port's MAC and changes it as ports come
/// and go), `spec.address` as its only IPv4 address, `spec.mtu`, up. Drift is repaired in
/// place; a device of another kind under the name is reported. Returns its ifindex.
pub async fn ensure_gateway_bridge(
    host: &Handle,
    spec: &GatewayBridgeSpec,
) -> Result<u32, DataplaneError> {
    validate_ifname("gateway bridge name", &spec.name)?;
    validate_mtu(spec.mtu)?;
    let object = format!("{} in {HOST}", spec.name);
    let mac = bridge_mac(spec.address);
    let br = match links::link_by_name(host, &spec.name, HOST).await? {
        Some(l) if is_bridge(&l) => l,
        Some(l) => {
            return Err(DataplaneError::NameTaken {
                object,
                found: format!("a {}, not a bridge", links::kind_name(&l)),
            })
        }
        None => {
            let msg = LinkBridge::new(&spec.name)
                .mtu(spec.mtu)
                .address(mac.0.to_vec())
                .up()
                .build();
            match call("create", || object.clone(), host.link().add(msg).execute()).await {
                // Lost a race with another caller: take theirs (checked below).
                Err(e) if e.errno() == Some(libc::EEXIST) => {}
                other => other?,
            }
            let l = links::link_by_name(host, &spec.name, HOST)
                .await?
                .ok_or_else(|| DataplaneError::Vanished {
                    object: object.clone(),
                })?;
            if !is_bridge(&l) {
                return Err(DataplaneError::NameTaken {
                    object,
                    found: format!("a {}, not a bridge", links::kind_name(&l)),
                });
            }
            l
        }
    };
    fix_link(host, &br, Some(spec.mtu), None, Some(&mac.0), &object).await?;
    links::ensure_ipv4_address(host, br.header.index, spec.address, &object).await?;
    Ok(br.header.index)
}

/// Deletes the gateway bridge (its ports are released, not deleted). Missing is fine; a
/// device of another kind under the name is reported, not deleted.
pub async fn remove_gateway_bridge(host: &Handle, name: &str) -> Result<(), DataplaneError> {
    let object = format!("{name} in {HOST}");
    match links::link_by_name(host, name, HOST).await? {
        None => Ok(()),
        Some(l) if is_bridge(&l) => links::delete_link(host, l.header.index, &object).await,
        Some(l) => Err(DataplaneError::NameTaken {
            object,
            found: format!("a {}, not a bridge", links::kind_name(&l)),
        }),
    }
}

fn port_isolated(l: &LinkMessage) -> Option<bool> {
    match links::port_data(l)? {
        InfoPortData::BridgePort(attrs) => attrs.iter().find_map(|a| match a {
            InfoBridgePort::Isolated(on) => Some(*on),
            _ => None,
        }),
        _ => None,
    }
}

/// Gets or creates the container's gateway interface: a veth with its host end on the
/// gateway bridge (index `bridge_index`) as an ISOLATED port, and its peer created directly
/// in `container` as `container_ifname` with `spec`'s MAC, MTU and address, up, plus the
/// container's default route via `default_gateway` on it (replacing any other default
/// route, e.g. one via the overlay's `eth0`). Safe to repeat; partial state is repaired.
///
/// Isolated ports reach only non-isolated ones (the bridge itself, hence the host and its
/// NAT), never each other: containers cannot talk to each other over the gateway bridge
/// (Docker's `enable_icc=false` on `docker_gwbridge`), which would otherwise bypass the
/// overlay's network boundaries.
pub async fn ensure_gateway_endpoint(
    host: &Handle,
    bridge_index: u32,
    container: &NetNs,
    spec: &GatewayEndpointSpec,
) -> Result<(), DataplaneError> {
    validate_mtu(spec.mtu)?;
    // A gateway outside the interface's subnet cannot be reached on it: the kernel would
    // refuse the route (ENETUNREACH) only after the veth was made.
    if !spec.address.contains(&spec.default_gateway) || spec.address.addr() == spec.default_gateway
    {
        return Err(invalid(
            "gateway endpoint address",
            format!(
                "the default gateway {} must be another address in {}",
                spec.default_gateway, spec.address
            ),
        ));
    }
    let ends = VethEnds {
        host_ifname: &spec.host_ifname,
        container_ifname: &spec.container_ifname,
        mac: spec.mac,
        mtu: spec.mtu,
    };
    let pair = ensure_veth_pair(host, HOST, bridge_index, container, &ends, false).await?;
    fix_link(
        host,
        &pair.host,
        Some(spec.mtu),
        Some(bridge_index),
        None,
        &pair.host_object,
    )
    .await?;
    // Before the container end comes up (next), so no frame crosses an unisolated port.
    // Port settings exist only once the veth is a port: a port just (re-)attached reads as
    // unisolated whatever the message said.
    if links::master(&pair.host) != Some(bridge_index) || port_isolated(&pair.host) != Some(true) {
        let port = LinkBridgePort::new(pair.host.header.index)
            .isolated(true)
            .build();
        call(
            "isolate the bridge port",
            || pair.host_object.clone(),
            host.link().set_port(port).execute(),
        )
        .await?;
    }
    configure_container_end(
        &pair,
        spec.mtu,
        &spec.mac,
        spec.address,
        Some(spec.default_gateway),
    )
    .await
}

/// Deletes the gateway veth (its container end, and the container's default route with
/// it). Missing is fine; a device that is not a veth is reported, not deleted.
pub async fn remove_gateway_endpoint(
    host: &Handle,
    host_ifname: &str,
) -> Result<(), DataplaneError> {
    let object = format!("{host_ifname} in {HOST}");
    match links::link_by_name(host, host_ifname, HOST).await? {
        None => Ok(()),
        Some(l) if is_veth(&l) => links::delete_link(host, l.header.index, &object).await,
        Some(l) => Err(DataplaneError::NameTaken {
            object,
            found: format!("a {}, not a veth", links::kind_name(&l)),
        }),
    }
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// The host-side names of the containers' interfaces on the gateway bridge (sorted).
pub async fn list_gateway_endpoints(
    host: &Handle,
    bridge_index: u32,
) -> Result<Vec<String>, DataplaneError> {
    super::endpoint::veth_ports(host, bridge_index, "the host namespace").await
}

/// Turns on IPv4 forwarding in the network namespace of the CALLING THREAD: /proc/sys/net
/// resolves to the opener's namespace, so a thread that `setns`'d elsewhere changes that
/// namespace, not the process's. The daemon calls it from its own (host) namespace. Returns
/// whether it changed anything. Needed for the gateway bridge's traffic to leave the host.
pub fn enable_ipv4_forwarding() -> io::Result<bool> {
    // One open for both: the namespace is fixed at open, so the check and the write cannot
    // straddle a namespace change.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(IP_FORWARD)?;
    let mut now = String::new();
    f.read_to_string(&mut now)?;
    if now.trim() == "1" {
        return Ok(false);
    }
    // Back to offset 0: with kernel.sysctl_writes_strict=1 (the default) a write at a
    // non-zero position to a numeric sysctl is silently ignored (and reports success).
    f.rewind()?;
    f.write_all(b"1\n")?;
    Ok(true)
}

/// The routing protocol number of vxnet's routes in the host namespace (rtnetlink `proto`;
/// unassigned in iproute2's rt_protos), so that a resync tells its own from the operator's.
pub const ROUTE_PROTOCOL: u8 = 86;

fn route_destination(r: &RouteMessage) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

/// Routes a container's overlay address (`dst`/32) via its gateway-bridge address `via` in
/// the host namespace. A CNI runtime's `portmap` plugin, chained after vxnet's, DNATs
/// published ports to the container's address on its CNI interface, the overlay one, which
/// only the sandbox routes to; this route brings that traffic in over the gateway bridge
/// instead (where the firewall lets DNAT'd traffic, and nothing else, pass). Safe to repeat.
pub async fn ensure_container_route(
    host: &Handle,
    bridge_index: u32,
    dst: Ipv4Addr,
    via: Ipv4Addr,
) -> Result<(), DataplaneError> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, 32)
        .gateway(via)
        .output_interface(bridge_index)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .build();
    call(
        "add a route to",
        || format!("{dst}/32 via {via} in {HOST}"),
        host.route().add(route).replace().execute(),
    )
    .await
}

/// vxnet's container routes in the host namespace: (destination, gateway) pairs.
pub async fn list_container_routes(
    host: &Handle,
) -> Result<Vec<(Ipv4Addr, Ipv4Addr)>, DataplaneError> {
    Ok(container_route_messages(host)
        .await?
        .iter()
        .filter_map(|r| Some((route_destination(r)?, route_gateway(r)?)))
        .collect())
}

async fn container_route_messages(host: &Handle) -> Result<Vec<RouteMessage>, DataplaneError> {
    let routes: Vec<RouteMessage> = collect(
        "list the routes of",
        || HOST.to_string(),
        || {
            host.route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
        },
    )
    .await?;
    Ok(routes
        .into_iter()
        .filter(|r| {
            r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
                && r.header.destination_prefix_length == 32
                && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
        })
        .collect())
}

/// Removes vxnet's route to `dst`/32 (see [`ensure_container_route`]). Missing is fine; a
/// route of anyone else to that address is left alone.
pub async fn remove_container_route(host: &Handle, dst: Ipv4Addr) -> Result<(), DataplaneError> {
    for r in container_route_messages(host).await? {
        if route_destination(&r) != Some(dst) {
            continue;
        }
        match call(
            "remove the route to",
            || format!("{dst}/32 in {HOST}"),
            host.route().del(r).execute(),
        )
        .await
        {
            Err(e) if e.errno() == Some(libc::ESRCH) => {}
            other => other?,
        }
    }
    Ok(())
}
