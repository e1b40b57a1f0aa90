//! The per-network overlay sandbox: a named namespace with `br0` and `vxlan1`, laid out as
//! libnetwork lays out its `1-<network id>` namespaces.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::packet_route::link::{InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVxlan};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVxlan};

use super::links::{self, call};
use super::{DataplaneError, Underlay};
use crate::model::Mac;
use crate::netns::NetNs;

pub const BRIDGE_NAME: &str = "br0";
pub const VXLAN_NAME: &str = "vxlan1";
/// The VXLAN header, outer UDP, IPv4 and Ethernet headers: what the overlay MTU gives up.
const VXLAN_OVERHEAD: u32 = 50;
const MAX_VNI: u32 = (1 << 24) - 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSpec {
    /// `1-<first 10 characters of the network ID>`, like Docker's `1-ec3ea5fa4f`.
    pub name: String,
    pub vni: u32,
    /// The subnet's gateway, put on `br0` (e.g. 10.0.4.1/24).
    pub gateway: Ipv4Net,
    /// Of `br0`, `vxlan1` and the endpoints: 1450 on a 1500 underlay.
    pub mtu: u32,
    /// 4789.
    pub vxlan_port: u16,
    /// The local VTEP: its address is `vxlan1`'s source, its interface `vxlan1`'s lower device.
    pub underlay: Underlay,
    /// One more address for `br0`, as a /32: where the network's name server listens.
    pub service_address: Option<Ipv4Addr>,
}

/// An ensured sandbox: its namespace, a netlink handle inside it, and its two devices.
#[derive(Debug)]
pub struct Sandbox {
    name: String,
    ns: NetNs,
    handle: Handle,
    bridge_index: u32,
    vxlan_index: u32,
    vxlan_created: bool,
}

impl Sandbox {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
    pub fn bridge_index(&self) -> u32 {
        self.bridge_index
    }
    pub fn vxlan_index(&self) -> u32 {
        self.vxlan_index
    }
    /// True when this `ensure_sandbox` created (or had to re-create) `vxlan1`: its FDB and
    /// neighbour entries are then empty, and every peer must be added again.
    pub fn vxlan_created(&self) -> bool {
        self.vxlan_created
    }
}

/// Sandbox namespaces are named `1-…` (Docker's form); anything else under the run dir's
/// `netns/` (container namespaces) is not a sandbox.
pub const SANDBOX_PREFIX: &str = "1-";

/// Where the sandbox called `name` is bind-mounted: `<run_dir>/netns/<name>`.
pub fn sandbox_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("netns").join(name)
}

/// Gets or creates the sandbox and brings it to `spec`; see the module doc for the layout.
/// Safe to repeat: what matches the spec is left alone (same interfaces, same indexes).
///
/// `host` is a handle in the namespace that holds the underlay: `vxlan1` is created there
/// and then moved into the sandbox, so that its UDP socket stays in the host namespace
/// while the device itself lives in the sandbox.
pub async fn ensure_sandbox(
    host: &Handle,
    run_dir: &Path,
    spec: &SandboxSpec,
) -> Result<Sandbox, DataplaneError> {
    validate(spec)?;
    let path = sandbox_path(run_dir, &spec.name);
    let ns = open_or_create(&path)?;
    let handle = ns.netlink().map_err(|source| DataplaneError::Namespace {
        action: "open a netlink socket in",
        what: format!("the sandbox namespace {}", path.display()),
        source,
        hint: "check that the process runs as root",
    })?;
    let label = format!("sandbox {}", spec.name);

    let lo = links::link_by_name(&handle, "lo", &label)
        .await?
        .ok_or_else(|| DataplaneError::Vanished {
            object: format!("lo in {label}"),
        })?;
    if !links::is_up(&lo) {
        links::set_up(&handle, lo.header.index, &format!("lo in {label}")).await?;
    }

    let bridge_index = ensure_bridge(&handle, spec, &label).await?;
    let (vxlan_index, vxlan_created) =
        ensure_vxlan(host, &ns, &handle, bridge_index, spec, &label).await?;
    Ok(Sandbox {
        name: spec.name.clone(),
        ns,
        handle,
        bridge_index,
        vxlan_index,
        vxlan_created,
    })
}

fn validate(spec: &SandboxSpec) -> Result<(), DataplaneError> {
    let invalid = |what, detail: String| Err(DataplaneError::InvalidSpec { what, detail });
    if spec.name.is_empty() || spec.name.contains('/') || spec.name.starts_with('.') {
        return invalid(
            "sandbox name",
            format!("{:?} must be a plain file name", spec.name),
        );
    }
    if spec.vni == 0 || spec.vni > MAX_VNI {
        return invalid("VNI", format!("{} is outside 1..={MAX_VNI}", spec.vni));
    }
    if spec.mtu < 68 || spec.mtu.saturating_add(VXLAN_OVERHEAD) > spec.underlay.mtu {
        return invalid(
            "MTU",
            format!(
                "{} must be at least 68 and leave {VXLAN_OVERHEAD} bytes of the underlay {}'s \
                 MTU {} for the VXLAN headers",
                spec.mtu, spec.underlay.name, spec.underlay.mtu
            ),
        );
    }
    Ok(())
}

fn is_namespace(path: &Path) -> io::Result<bool> {
    match nix::sys::statfs::statfs(path) {
        Ok(fs) => Ok(fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC),
        Err(nix::Error::ENOENT) => Ok(false),
        Err(e) => Err(io::Error::from_raw_os_error(e as i32)),
    }
}

fn open_or_create(path: &Path) -> Result<NetNs, DataplaneError> {
    let ns_err = |action, source| DataplaneError::Namespace {
        action,
        what: format!("the sandbox namespace {}", path.display()),
        source,
        hint: "check that the run directory is writable and that the process runs as root",
    };
    // Twice at most: a second round only follows losing a creation race to someone else.
    for _ in 0..2 {
        if is_namespace(path).map_err(|e| ns_err("inspect", e))? {
            return NetNs::open(path).map_err(|e| ns_err("open", e));
        }
        // A plain file here is the mount point of a creation that died before its bind
        // mount: clear it so that create_named (which insists on a fresh file) can run.
        if path.exists() {
            NetNs::remove_named(path).map_err(|e| ns_err("clear a stale mount point for", e))?;
        }
        match NetNs::create_named(path) {
            Ok(ns) => return Ok(ns),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(ns_err("create", e)),
        }
    }
    Err(ns_err(
        "create",
        io::Error::other("it keeps appearing and disappearing (concurrent create and remove?)"),
    ))
}

/// `br0`'s MAC: 02:42 + the gateway's IP, as endpoints get theirs. Fixed rather than left
/// to the kernel, which would give the bridge its lowest port's MAC and change it whenever
/// `vxlan1` is re-created, leaving every container with a stale ARP entry for its gateway.
/// The same on every host is harmless: no gateway frame ever crosses the overlay.
pub fn bridge_mac(gateway: Ipv4Net) -> Mac {
    Mac::from_ipv4(gateway.addr())
}

async fn ensure_bridge(h: &Handle, spec: &SandboxSpec, label: &str) -> Result<u32, DataplaneError> {
    let object = format!("{BRIDGE_NAME} in {label}");
    let mac = bridge_mac(spec.gateway);
    let mut found = links::link_by_name(h, BRIDGE_NAME, label).await?;
    if let Some(l) = &found {
        if links::kind(l) != Some(&InfoKind::Bridge) {
            // Everything in the sandbox is ours: a non-bridge under this name is debris.
            links::delete_link(h, l.header.index, &object).await?;
            found = None;
        }
    }
    let br = match found {
        Some(l) => l,
        None => {
            let add = h
                .link()
                .add(
                    LinkBridge::new(BRIDGE_NAME)
                        .mtu(spec.mtu)
                        .address(mac.0.to_vec())
                        .up()
                        .build(),
                )
                .execute();
            match call("create", || object.clone(), add).await {
                Err(e) if e.errno() == Some(libc::EEXIST) => {}
                other => other?,
            }
            links::link_by_name(h, BRIDGE_NAME, label)
                .await?
                .ok_or_else(|| DataplaneError::Vanished {
                    object: object.clone(),
                })?
        }
    };
    fix_link(h, &br, Some(spec.mtu), None, Some(&mac.0), &object).await?;
    let mut addresses = vec![spec.gateway];
    addresses.extend(spec.service_address.map(Ipv4Net::from));
    links::ensure_ipv4_addresses(h, br.header.index, &addresses, &object).await?;
    Ok(br.header.index)
}

/// Brings an existing link to the wanted MTU, master and MAC, and up, in one request (and
/// none when it already matches).
pub(crate) async fn fix_link(
    h: &Handle,
    link: &LinkMessage,
    mtu: Option<u32>,
    master: Option<u32>,
    mac: Option<&[u8]>,
    object: &str,
) -> Result<bool, DataplaneError> {
    let mut msg = LinkUnspec::new_with_index(link.header.index);
    let mut changed = false;
    if let Some(mtu) = mtu.filter(|m| links::mtu(link) != Some(*m)) {
        msg = msg.mtu(mtu);
        changed = true;
    }
    if let Some(master) = master.filter(|m| links::master(link) != Some(*m)) {
        msg = msg.controller(master);
        changed = true;
    }
    if let Some(mac) = mac.filter(|m| links::hw_address(link) != Some(*m)) {
        msg = msg.address(mac.to_vec());
        changed = true;
    }
    if !links::is_up(link) {
        msg = msg.up();
        changed = true;
    }
    if changed {
        links::change_link(h, msg.build(), "reconfigure", object).await?;
    }
    Ok(changed)
}

/// Why an existing `vxlan1` cannot be kept, or `None` when it matches the spec. VNI, port,
/// local address and lower device cannot be changed on a live VXLAN device, and neither
/// can the ARP proxy flag, so any difference here means re-creating it.
fn vxlan_mismatch(l: &LinkMessage, spec: &SandboxSpec) -> Option<String> {
    if links::kind(l) != Some(&InfoKind::Vxlan) {
        return Some(format!("it is a {}", links::kind_name(l)));
    }
    let Some(InfoData::Vxlan(info)) = links::info_data(l) else {
        return Some("the kernel reports no VXLAN settings for it".into());
    };
    let want = [
        InfoVxlan::Id(spec.vni),
        InfoVxlan::Port(spec.vxlan_port),
        InfoVxlan::Local(spec.underlay.addr),
        InfoVxlan::Link(spec.underlay.ifindex),
        InfoVxlan::Learning(false),
        InfoVxlan::Proxy(true),
    ];
    want.into_iter()
        .find(|w| !info.contains(w))
        .map(|w| format!("it lacks {w:?}"))
}

fn port_learning(l: &LinkMessage) -> Option<bool> {
    match links::port_data(l)? {
        InfoPortData::BridgePort(attrs) => attrs.iter().find_map(|a| match a {
            InfoBridgePort::Learning(on) => Some(*on),
            _ => None,
        }),
        _ => None,
    }
}

async fn ensure_vxlan(
    host: &Handle,
    ns: &NetNs,
    h: &Handle,
    bridge: u32,
    spec: &SandboxSpec,
    label: &str,
) -> Result<(u32, bool), DataplaneError> {
    let object = format!("{VXLAN_NAME} (VNI {}) in {label}", spec.vni);
    let mut found = links::link_by_name(h, VXLAN_NAME, label).await?;
    if let Some(l) = &found {
        if let Some(why) = vxlan_mismatch(l, spec) {
            tracing::info!("re-creating {object}: {why}");
            links::delete_link(h, l.header.index, &object).await?;
            found = None;
        }
    }
    let created = found.is_none();
    let vx = match found {
        Some(l) => l,
        None => {
            create_vxlan_in_host_and_move(host, ns, h, spec, label, &object).await?;
            links::link_by_name(h, VXLAN_NAME, label)
                .await?
                .ok_or_else(|| DataplaneError::Vanished {
                    object: object.clone(),
                })?
        }
    };
    fix_link(h, &vx, Some(spec.mtu), Some(bridge), None, &object).await?;
    // Checked after enslaving: port settings only exist once vxlan1 is a port. Learning off
    // because remote MACs come from the cluster store as static entries; a learned entry
    // (e.g. from a spoofed or stale frame) would otherwise shadow them.
    if created || links::master(&vx) != Some(bridge) || port_learning(&vx) != Some(false) {
        let port = LinkBridgePort::new(vx.header.index).learning(false).build();
        call(
            "turn off bridge-port learning on",
            || object.clone(),
            h.link().set_port(port).execute(),
        )
        .await?;
    }
    Ok((vx.header.index, created))
}

/// libnetwork's way: create the VXLAN device in the host namespace (where its UDP socket
/// must live, next to the underlay) under a temporary name, then move it into the sandbox
/// and rename it `vxlan1` in the same request.
async fn create_vxlan_in_host_and_move(
    host: &Handle,
    ns: &NetNs,
    sb: &Handle,
    spec: &SandboxSpec,
    label: &str,
    object: &str,
) -> Result<(), DataplaneError> {
    // Derived from the VNI: unique on this host (the kernel allows one VXLAN device per VNI
    // and port), and recognisable when a crash left it behind between create and move, or
    // a failed rename left it in the sandbox; either would hold the VNI.
    let tmp = format!("vxtmp-{:06x}", spec.vni);
    let host_label = "the host namespace";
    delete_leftover(host, &tmp, host_label).await?;
    delete_leftover(sb, &tmp, label).await?;

    let msg = LinkVxlan::new(&tmp, spec.vni)
        .port(spec.vxlan_port)
        .local(spec.underlay.addr)
        .dev(spec.underlay.ifindex)
        .learning(false)
        .proxy(true)
        .mtu(spec.mtu)
        .build();
    match call(
        "create",
        || object.to_string(),
        host.link().add(msg).execute(),
    )
    .await
    {
        Err(e) if e.errno() == Some(libc::EEXIST) => {
            return Err(DataplaneError::VniInUse {
                vni: spec.vni,
                port: spec.vxlan_port,
            })
        }
        other => other?,
    }
    let tmp_index = links::link_index(host, &tmp, host_label)
        .await?
        .ok_or_else(|| DataplaneError::Vanished {
            object: format!("{tmp} in {host_label}"),
        })?;
    let mv = LinkUnspec::new_with_index(tmp_index)
        .setns_by_fd(ns.as_fd().as_raw_fd())
        .name(VXLAN_NAME)
        .build();
    if let Err(e) = links::change_link(host, mv, "move into its sandbox", object).await {
        // By name, not index: once moved, the index may name another host device.
        let _ = delete_leftover(host, &tmp, host_label).await;
        let _ = delete_leftover(sb, &tmp, label).await;
        return Err(e);
    }
    Ok(())
}

/// Deletes our temporary VXLAN device `tmp` from a namespace if it is there.
async fn delete_leftover(h: &Handle, tmp: &str, ns_label: &str) -> Result<(), DataplaneError> {
    let Some(old) = links::link_by_name(h, tmp, ns_label).await? else {
        return Ok(());
    };
    if links::kind(&old) != Some(&InfoKind::Vxlan) {
        return Err(DataplaneError::NameTaken {
            object: format!("{tmp} in {ns_label}"),
            found: links::kind_name(&old),
        });
    }
    let object = format!("leftover temporary VXLAN device {tmp} in {ns_label}");
    links::delete_link(h, old.header.index, &object).await
}

/// What [`inspect_sandbox`] found, changing nothing.
#[derive(Debug)]
pub struct SandboxInspection {
    /// Whether the namespace exists at its path.
    pub namespace: bool,
    /// The sandbox, when its namespace holds both `br0` and `vxlan1` (of any settings): what
    /// the readers (`list_endpoint_links`, `list_peer_entries`) need.
    pub sandbox: Option<Sandbox>,
    /// Each way `br0` or `vxlan1` differs from the spec.
    pub problems: Vec<SandboxProblem>,
}

/// One way a sandbox device differs from its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxProblem {
    /// `br0` or `vxlan1`.
    pub device: &'static str,
    /// The device is not there at all (`what` then says "missing").
    pub missing: bool,
    pub what: String,
}

const MISSING: &str = "missing";

/// Reads a sandbox back against `spec` without changing anything (`vxnet doctor`): the
/// same comparisons `ensure_sandbox` makes before it repairs, reported instead of fixed.
pub async fn inspect_sandbox(
    run_dir: &Path,
    spec: &SandboxSpec,
) -> Result<SandboxInspection, DataplaneError> {
    let path = sandbox_path(run_dir, &spec.name);
    let ns_err = |action, source| DataplaneError::Namespace {
        action,
        what: format!("the sandbox namespace {}", path.display()),
        source,
        hint: "check that the process runs as root",
    };
    let mut out = SandboxInspection {
        namespace: false,
        sandbox: None,
        problems: Vec::new(),
    };
    if !is_namespace(&path).map_err(|e| ns_err("inspect", e))? {
        return Ok(out);
    }
    out.namespace = true;
    let ns = NetNs::open(&path).map_err(|e| ns_err("open", e))?;
    let handle = ns
        .netlink()
        .map_err(|e| ns_err("open a netlink socket in", e))?;
    let label = format!("sandbox {}", spec.name);
    let mut problem = |device, what: String| {
        out.problems.push(SandboxProblem {
            device,
            missing: false,
            what,
        })
    };

    let bridge = links::link_by_name(&handle, BRIDGE_NAME, &label).await?;
    match &bridge {
        None => problem(BRIDGE_NAME, MISSING.into()),
        Some(l) if links::kind(l) != Some(&InfoKind::Bridge) => problem(
            BRIDGE_NAME,
            format!("is a {}, not a bridge", links::kind_name(l)),
        ),
        Some(l) => {
            if !links::is_up(l) {
                problem(BRIDGE_NAME, "is down".into());
            }
            if links::mtu(l) != Some(spec.mtu) {
                problem(
                    BRIDGE_NAME,
                    format!("has MTU {:?}, wants {}", links::mtu(l), spec.mtu),
                );
            }
            let mut wanted = vec![spec.gateway];
            wanted.extend(spec.service_address.map(Ipv4Net::from));
            let have = links::ipv4_addresses(&handle, l.header.index, &label).await?;
            for want in wanted.iter().filter(|w| !have.contains(w)) {
                problem(BRIDGE_NAME, format!("lacks its address {want}"));
            }
        }
    }
    let vxlan = links::link_by_name(&handle, VXLAN_NAME, &label).await?;
    match (&vxlan, &bridge) {
        (None, _) => problem(VXLAN_NAME, MISSING.into()),
        (Some(l), _) if vxlan_mismatch(l, spec).is_some() => {
            problem(VXLAN_NAME, vxlan_mismatch(l, spec).unwrap_or_default())
        }
        (Some(l), br) => {
            if br.as_ref().map(|b| b.header.index) != links::master(l) {
                problem(VXLAN_NAME, format!("is not a port of {BRIDGE_NAME}"));
            } else if port_learning(l) != Some(false) {
                problem(
                    VXLAN_NAME,
                    "learns MACs (bridge-port learning is on)".into(),
                );
            }
            if !links::is_up(l) {
                problem(VXLAN_NAME, "is down".into());
            }
            if links::mtu(l) != Some(spec.mtu) {
                problem(
                    VXLAN_NAME,
                    format!("has MTU {:?}, wants {}", links::mtu(l), spec.mtu),
                );
            }
        }
    }
    for p in &mut out.problems {
        p.missing = p.what == MISSING;
    }
    if let (Some(br), Some(vx)) = (bridge, vxlan) {
        out.sandbox = Some(Sandbox {
            name: spec.name.clone(),
            ns,
            handle,
            bridge_index: br.header.index,
            vxlan_index: vx.header.index,
            vxlan_created: false,
        });
    }
    Ok(out)
}

/// Removes the sandbox: deletes its links, then unmounts and unlinks the namespace file.
/// Missing is fine. The links are deleted explicitly because the namespace outlives the
/// unmount while anything still holds it (a `Sandbox` value, its netlink socket, a process),
/// and even then dies asynchronously; until `vxlan1` is gone its VNI cannot be used again.
pub async fn remove_sandbox(run_dir: &Path, name: &str) -> Result<(), DataplaneError> {
    let path = sandbox_path(run_dir, name);
    let ns_err = |action, source| DataplaneError::Namespace {
        action,
        what: format!("the sandbox namespace {}", path.display()),
        source,
        hint: "check that the process runs as root",
    };
    if is_namespace(&path).map_err(|e| ns_err("inspect", e))? {
        let ns = NetNs::open(&path).map_err(|e| ns_err("open", e))?;
        let h = ns
            .netlink()
            .map_err(|e| ns_err("open a netlink socket in", e))?;
        let label = format!("sandbox {name}");
        for l in links::all_links(&h, &label).await? {
            let lname = links::name(&l).unwrap_or_default();
            if lname != "lo" {
                links::delete_link(&h, l.header.index, &format!("{lname} in {label}")).await?;
            }
        }
    }
    NetNs::remove_named(&path).map_err(|e| ns_err("unmount and remove", e))
}

/// The names of the sandboxes under `run_dir` (sorted).
pub fn list_sandboxes(run_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(run_dir.join("netns")) else {
        return Vec::new();
    };
    // Container namespaces share the directory (as in Docker's /var/run/docker/netns);
    // sandboxes are the ones named `1-…`.
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(SANDBOX_PREFIX))
        .collect();
    names.sort();
    names
}
