//! One local container's interface: a veth pair with one end on the sandbox's `br0` and
//! the other, `eth0`, in the container's namespace.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};

use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::links::{self, call, collect};
use super::sandbox::fix_link;
use super::{DataplaneError, Sandbox};
use crate::model::Mac;
use crate::netns::NetNs;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// The sandbox-side veth: "veth" + 7 hex characters of the endpoint ID.
    pub host_ifname: String,
    /// Usually "eth0".
    pub container_ifname: String,
    pub address: ipnet::Ipv4Net,
    pub mac: Mac,
    pub mtu: u32,
    /// The container's default route goes via this address when set.
    pub default_gateway: Option<Ipv4Addr>,
    /// A /32 reached straight out of this interface (the name server's address on br0),
    /// whatever the default route is.
    pub host_route: Option<Ipv4Addr>,
}

pub(crate) const CONTAINER: &str = "the container namespace";

pub(crate) fn validate_ifname(what: &'static str, name: &str) -> Result<(), DataplaneError> {
    // IFNAMSIZ is 16 with the terminating NUL; '/' and whitespace are refused by the kernel.
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains(char::is_whitespace)
        || name == "."
        || name == ".."
    {
        return Err(DataplaneError::InvalidSpec {
            what,
            detail: format!(
                "{name:?} is not a valid interface name (1 to 15 characters, no '/' or spaces)"
            ),
        });
    }
    Ok(())
}

pub(crate) fn is_veth(l: &LinkMessage) -> bool {
    links::kind(l) == Some(&InfoKind::Veth)
}

/// Two veths are each other's peer when each one's IFLA_LINK is the other's index.
fn are_peers(a: &LinkMessage, b: &LinkMessage) -> bool {
    is_veth(a)
        && is_veth(b)
        && links::link_attr(a) == Some(b.header.index)
        && links::link_attr(b) == Some(a.header.index)
}

/// Gets or creates the container's interface and brings both ends to `spec`. Safe to
/// repeat. A sandbox-side veth whose peer is not `container_ifname` in `container` (e.g. the
/// container was re-created with a new namespace) is rebuilt; a `container_ifname` in the
/// container that is not our peer is reported, not deleted: it is not ours.
///
/// With `default_gateway: None` no default route is added, and a default route out of this
/// interface is removed: that is how `eth0` hands the default route over to the gateway
/// bridge's `eth1`.
pub async fn ensure_endpoint(
    sandbox: &Sandbox,
    container: &NetNs,
    spec: &EndpointSpec,
) -> Result<(), DataplaneError> {
    let ends = VethEnds {
        host_ifname: &spec.host_ifname,
        container_ifname: &spec.container_ifname,
        mac: spec.mac,
        mtu: spec.mtu,
    };
    let pair = ensure_bridged_pair(sandbox, container, &ends).await?;
    configure_container_end(
        &pair,
        spec.mtu,
        &spec.mac,
        spec.address,
        spec.default_gateway,
    )
    .await?;
    if let Some(dst) = spec.host_route {
        ensure_host_route(&pair, dst).await?;
    }
    Ok(())
}

/// A link-scope route to `dst` out of the container's end (added or replaced: safe to repeat).
async fn ensure_host_route(pair: &VethPair, dst: Ipv4Addr) -> Result<(), DataplaneError> {
    use rtnetlink::packet_route::route::RouteScope;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, 32)
        .output_interface(pair.container.header.index)
        .scope(RouteScope::Link)
        .build();
    call(
        "add a route to",
        || format!("{} ({dst}/32)", pair.container_object),
        pair.container_handle.route().add(route).replace().execute(),
    )
    .await
}

/// A port for a container another runtime runs (Docker, through the plugin): the veth's
/// sandbox end on br0, its other end left in the runtime's namespace (this host's) under
/// `runtime_ifname` with the MAC and MTU set, for the runtime to move into its container,
/// rename and address itself.
#[derive(Clone, Debug)]
pub struct HandoffSpec {
    pub sandbox_ifname: String,
    pub runtime_ifname: String,
    pub mac: Mac,
    pub mtu: u32,
}

/// Gets or creates a hand-off port. Only for the moment of hand-over: once the runtime has
/// moved its end away, running this again would see an unpaired sandbox end and rebuild it.
pub async fn ensure_handoff_endpoint(
    sandbox: &Sandbox,
    runtime: &NetNs,
    spec: &HandoffSpec,
) -> Result<(), DataplaneError> {
    let ends = VethEnds {
        host_ifname: &spec.sandbox_ifname,
        container_ifname: &spec.runtime_ifname,
        mac: spec.mac,
        mtu: spec.mtu,
    };
    ensure_bridged_pair(sandbox, runtime, &ends).await?;
    // The runtime's end was made with its MAC and MTU and is left down: the runtime renames
    // it inside the container, which needs it down.
    Ok(())
}

/// A veth pair with one end on the sandbox's br0 (up, MTU set) and the other in `other`.
async fn ensure_bridged_pair(
    sandbox: &Sandbox,
    other: &NetNs,
    ends: &VethEnds<'_>,
) -> Result<VethPair, DataplaneError> {
    let sb = sandbox.handle();
    let label = format!("sandbox {}", sandbox.name());
    // Everything in a sandbox is ours: a stale device under the veth's name is debris.
    let pair = ensure_veth_pair(sb, &label, sandbox.bridge_index(), other, ends, true).await?;
    fix_link(
        sb,
        &pair.host,
        Some(ends.mtu),
        Some(sandbox.bridge_index()),
        None,
        &pair.host_object,
    )
    .await?;
    Ok(pair)
}

/// The container's end of a veth pair: MTU, MAC, exactly this address, and the default route
/// through it (or none through it).
pub(crate) async fn configure_container_end(
    pair: &VethPair,
    mtu: u32,
    mac: &crate::model::Mac,
    address: ipnet::Ipv4Net,
    default_gateway: Option<Ipv4Addr>,
) -> Result<(), DataplaneError> {
    let ch = &pair.container_handle;
    fix_link(
        ch,
        &pair.container,
        Some(mtu),
        None,
        Some(&mac.0),
        &pair.container_object,
    )
    .await?;
    let index = pair.container.header.index;
    if pair.created {
        // A link made just now has no address and no route: add them without reading back.
        add_fresh_address_and_route(ch, index, address, default_gateway, &pair.container_object)
            .await
    } else {
        links::ensure_ipv4_address(ch, index, address, &pair.container_object).await?;
        ensure_default_route(ch, index, default_gateway, &pair.container_object).await
    }
}

async fn add_fresh_address_and_route(
    ch: &Handle,
    index: u32,
    address: ipnet::Ipv4Net,
    default_gateway: Option<Ipv4Addr>,
    object: &str,
) -> Result<(), DataplaneError> {
    let add = ch
        .address()
        .add(
            index,
            std::net::IpAddr::V4(address.addr()),
            address.prefix_len(),
        )
        .execute();
    call("add an address to", || format!("{object} ({address})"), add).await?;
    if let Some(gw) = default_gateway {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .build();
        call(
            "set the default route of",
            || format!("{object} (via {gw})"),
            ch.route().add(route).replace().execute(),
        )
        .await?;
    }
    Ok(())
}

/// What a veth pair between a bridge and a container is made of.
pub(crate) struct VethEnds<'a> {
    pub host_ifname: &'a str,
    pub container_ifname: &'a str,
    pub mac: Mac,
    pub mtu: u32,
}

/// Both ends of an existing veth pair, as the kernel reported them, with a netlink handle in
/// the container's namespace and the names used in errors.
pub(crate) struct VethPair {
    pub host: LinkMessage,
    pub container: LinkMessage,
    pub container_handle: Handle,
    pub host_object: String,
    pub container_object: String,
    /// Made by this call (so it has no address or route yet), not found.
    pub created: bool,
}

/// Gets or creates a veth pair whose `host_ifname` end is in `h`'s namespace (`label`) and
/// whose `container_ifname` end is in `container`. Only existence and pairing are settled
/// here; callers bring the ends to their settings. A `container_ifname` that is not our
/// peer is reported (not ours). A `host_ifname` that is not paired with it is deleted and
/// the pair rebuilt when it is a veth (the leftover of a container re-created with a new
/// namespace) or when `host_side_all_ours`; otherwise it is reported.
pub(crate) async fn ensure_veth_pair(
    h: &Handle,
    label: &str,
    bridge: u32,
    container: &NetNs,
    ends: &VethEnds<'_>,
    host_side_all_ours: bool,
) -> Result<VethPair, DataplaneError> {
    validate_ifname("host-side interface name", ends.host_ifname)?;
    validate_ifname("container interface name", ends.container_ifname)?;
    let host_object = format!("{} in {label}", ends.host_ifname);
    let container_object = format!("{} in {CONTAINER}", ends.container_ifname);
    let ch = container
        .netlink()
        .map_err(|source| DataplaneError::Namespace {
            action: "open a netlink socket in",
            what: CONTAINER.to_string(),
            source,
            hint: "check that the container's namespace still exists",
        })?;

    // Optimistic: a new container's interface does not exist yet, so make it first; only a
    // name already taken (EEXIST, e.g. a repair of an existing pair) takes the get-or-create
    // path below. Saves two lookups on every attach.
    let mut created = match create_veth(h, bridge, container, ends, &host_object).await {
        Ok(()) => true,
        Err(e) if e.errno() == Some(libc::EEXIST) => false,
        Err(e) => return Err(e),
    };
    let mut host_side = links::link_by_name(h, ends.host_ifname, label).await?;
    let mut cont_side = links::link_by_name(&ch, ends.container_ifname, CONTAINER).await?;
    let paired = matches!((&host_side, &cont_side), (Some(a), Some(b)) if are_peers(a, b));
    if !paired {
        if let Some(c) = &cont_side {
            return Err(DataplaneError::NameTaken {
                object: container_object,
                found: format!(
                    "a {} that is not the peer of {host_object}",
                    links::kind_name(c)
                ),
            });
        }
        if let Some(l) = &host_side {
            if !host_side_all_ours && !is_veth(l) {
                return Err(DataplaneError::NameTaken {
                    object: host_object,
                    found: format!("a {}, not a veth", links::kind_name(l)),
                });
            }
            links::delete_link(h, l.header.index, &host_object).await?;
        }
        create_veth(h, bridge, container, ends, &host_object).await?;
        created = true;
        host_side = links::link_by_name(h, ends.host_ifname, label).await?;
        cont_side = links::link_by_name(&ch, ends.container_ifname, CONTAINER).await?;
    }
    let (Some(host), Some(cont)) = (host_side, cont_side) else {
        return Err(DataplaneError::Vanished {
            object: format!("the veth pair {host_object} / {container_object}"),
        });
    };
    Ok(VethPair {
        host,
        container: cont,
        container_handle: ch,
        host_object,
        container_object,
        created,
    })
}

/// One request: the veth with its host end on `bridge` and up, and its peer created
/// directly inside the container's namespace (IFLA_NET_NS_FD in the peer's message) with
/// its final name, MAC and MTU. Moving a device between namespaces afterwards costs about
/// 16 ms (an RCU grace period); creating it in place costs under 1 ms. The peer cannot be
/// brought up in the same request: the kernel configures it before linking the pair, and
/// veth_open refuses (ENOTCONN) an end without a peer; `fix_link` brings it up next.
async fn create_veth(
    h: &Handle,
    bridge: u32,
    container: &NetNs,
    ends: &VethEnds<'_>,
    object: &str,
) -> Result<(), DataplaneError> {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(ends.container_ifname.to_string())
        .address(ends.mac.0.to_vec())
        .mtu(ends.mtu)
        .setns_by_fd(container.as_fd().as_raw_fd())
        .build();
    let msg = LinkVeth::new(ends.host_ifname, ends.container_ifname)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .mtu(ends.mtu)
        .controller(bridge)
        .up()
        .build();
    call(
        "create the veth pair",
        || format!("{object} / {} in {CONTAINER}", ends.container_ifname),
        h.link().add(msg).execute(),
    )
    .await
}

pub(crate) fn route_gateway(r: &RouteMessage) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

pub(crate) fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

pub(crate) fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// The container's default route: via `gateway` out of `index`, or, with no gateway, none
/// out of `index` (a default route of another interface is left alone).
pub(crate) async fn ensure_default_route(
    ch: &Handle,
    index: u32,
    gateway: Option<Ipv4Addr>,
    object: &str,
) -> Result<(), DataplaneError> {
    let routes: Vec<RouteMessage> = collect(
        "list the routes of",
        || CONTAINER.to_string(),
        || {
            ch.route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
        },
    )
    .await?;
    let defaults: Vec<RouteMessage> = routes
        .into_iter()
        .filter(|r| {
            r.header.address_family == AddressFamily::Inet
                && r.header.destination_prefix_length == 0
                && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
        })
        .collect();
    match gateway {
        Some(gw) => {
            if defaults
                .iter()
                .any(|r| route_gateway(r) == Some(gw) && route_oif(r) == Some(index))
            {
                return Ok(());
            }
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gw)
                .output_interface(index)
                .build();
            call(
                "set the default route of",
                || format!("{object} (via {gw})"),
                ch.route().add(route).replace().execute(),
            )
            .await
        }
        None => {
            for r in defaults.into_iter().filter(|r| route_oif(r) == Some(index)) {
                match call(
                    "remove the default route of",
                    || object.to_string(),
                    ch.route().del(r).execute(),
                )
                .await
                {
                    Err(e) if e.errno() == Some(libc::ESRCH) => {}
                    other => other?,
                }
            }
            Ok(())
        }
    }
}

/// Deletes the endpoint's veth pair (its container end goes with it). Missing is fine.
pub async fn remove_endpoint(sandbox: &Sandbox, host_ifname: &str) -> Result<(), DataplaneError> {
    let label = format!("sandbox {}", sandbox.name());
    match links::link_by_name(sandbox.handle(), host_ifname, &label).await? {
        Some(l) => {
            links::delete_link(
                sandbox.handle(),
                l.header.index,
                &format!("{host_ifname} in {label}"),
            )
            .await
        }
        None => Ok(()),
    }
}

/// The names of the veths enslaved to the sandbox's `br0` (sorted): the local endpoints.
pub async fn list_endpoint_links(sandbox: &Sandbox) -> Result<Vec<String>, DataplaneError> {
    let label = format!("sandbox {}", sandbox.name());
    veth_ports(sandbox.handle(), sandbox.bridge_index(), &label).await
}

/// The names of the veths enslaved to bridge `bridge` (sorted).
pub(crate) async fn veth_ports(
    h: &Handle,
    bridge: u32,
    label: &str,
) -> Result<Vec<String>, DataplaneError> {
    let mut names: Vec<String> = links::all_links(h, label)
        .await?
        .iter()
        .filter(|l| is_veth(l) && links::master(l) == Some(bridge))
        .filter_map(|l| links::name(l).map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

/// CHECK of a container interface, read only: `ifname` in `container` is a veth, up, with
/// `mac` and `address`. `Some(what is wrong)` when it is not.
pub async fn check_container_end(
    container: &NetNs,
    ifname: &str,
    mac: Mac,
    address: ipnet::Ipv4Net,
) -> Result<Option<String>, DataplaneError> {
    let h = container
        .netlink()
        .map_err(|source| DataplaneError::Namespace {
            action: "enter",
            what: format!(
                "the container namespace {}",
                container
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            source,
            hint: "check that the container's namespace still exists",
        })?;
    let Some(link) = links::link_by_name(&h, ifname, CONTAINER).await? else {
        return Ok(Some(format!("the container has no interface {ifname}")));
    };
    if !is_veth(&link) {
        return Ok(Some(format!(
            "{ifname} is a {}, not vxnet's veth",
            links::kind_name(&link)
        )));
    }
    if links::hw_address(&link) != Some(&mac.0[..]) {
        return Ok(Some(format!("{ifname} does not have its MAC {mac}")));
    }
    if !links::is_up(&link) {
        return Ok(Some(format!("{ifname} is down")));
    }
    let index = link.header.index;
    let addresses: Vec<rtnetlink::packet_route::address::AddressMessage> = collect(
        "list the addresses of",
        || format!("{ifname} in {CONTAINER}"),
        || h.address().get().set_link_index_filter(index).execute(),
    )
    .await?;
    let has = addresses.iter().any(|a| {
        links::ipv4_of(a) == Some(address.addr()) && a.header.prefix_len == address.prefix_len()
    });
    Ok((!has).then(|| format!("{ifname} does not have its address {address}")))
}
