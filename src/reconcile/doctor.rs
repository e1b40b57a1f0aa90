//! `vxnet doctor`: this host's kernel state checked against what the reconciler would
//! program, changing nothing.
//!
//! The wanted side comes from the reconciler's own functions (`local_attachments`,
//! `plugin_ports`, `desired_peers`, `sandbox_spec`, `endpoint_spec`, `ruleset`, the
//! sandbox naming), and the kernel is read with the data plane's and the firewall's
//! readers (`inspect_sandbox`, `list_endpoint_links`, `list_peer_entries`,
//! `list_gateway_endpoints`, `check_container_end`, `firewall::read_table`): there is no
//! second model of the desired state to drift from the one that programs it. Only the
//! comparisons are doctor's own, and they are pure (`diff_*`, unit-tested below).
//!
//! Why the daemon checks and not the CLI: only the daemon has the view, the records of this
//! host's containers and the plugin's ports, and the netlink handles in its namespace.
//!
//! A change in flight (a container starting, a watch event not yet applied) can show as a
//! difference for the moment it takes to program; a second run tells a real one apart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::{sandbox_name, PeerMap, Reconciler};
use crate::dataplane::{self, links, PeerEntries};
use crate::error::Error;
use crate::firewall::{self, TableShape};
use crate::model::{Mac, Network, NetworkId};
use crate::registry::ContainerState;

/// The fix for nearly everything: one full resync puts it back.
const RECONCILE: &str = "run `vxnet reconcile`";

/// Which part of the host's state a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Area {
    /// A network's sandbox namespace, its br0 and vxlan1.
    Sandbox,
    /// A container's veth: the sandbox end on br0, the container end's MAC and address.
    Interface,
    /// A remote endpoint's FDB entry on vxlan1 (its MAC -> its host's VTEP).
    Fdb,
    /// A remote endpoint's permanent neighbour on vxlan1 (its IP -> its MAC).
    Neighbour,
    /// The gateway bridge and the containers' eth1 on it.
    Gateway,
    /// The `inet vxnet` nftables table: chains, rule counts, sets.
    Firewall,
}

impl std::fmt::Display for Area {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Area::Sandbox => "sandbox",
            Area::Interface => "interface",
            Area::Fdb => "fdb",
            Area::Neighbour => "neighbour",
            Area::Gateway => "gateway",
            Area::Firewall => "firewall",
        })
    }
}

/// How the kernel differs from what is wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Difference {
    /// Wanted, not in the kernel.
    Missing,
    /// In the kernel, not wanted.
    Unexpected,
    /// In the kernel with another value than wanted.
    Wrong,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Difference::Missing => "missing",
            Difference::Unexpected => "unexpected",
            Difference::Wrong => "wrong",
        })
    }
}

/// One difference between the kernel and the store (with this host's records).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub area: Area,
    /// The network it belongs to, as `name (short id)`, when it belongs to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// What was checked, e.g. `FDB entry 02:42:0a:00:04:03` or `sandbox 1-3f2a…`.
    pub object: String,
    pub difference: Difference,
    /// What the store (or this host's records) wants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub want: Option<String>,
    /// What the kernel has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub have: Option<String>,
    /// What to do about it.
    pub fix: String,
}

/// How much was compared, so that "no difference" says something.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checked {
    /// Networks this host serves (a local container or plugin port on them).
    pub networks: usize,
    pub sandboxes: usize,
    /// Container interfaces (sandbox end and container end).
    pub interfaces: usize,
    pub fdb_entries: usize,
    pub neighbours: usize,
    /// Containers' eth1 on the gateway bridge.
    pub gateway_interfaces: usize,
    /// Whether the gateway bridge was checked (some container here needs it).
    pub gateway_bridge: bool,
    /// CNI containers' routes in the host namespace (via their gateway-bridge address).
    #[serde(default)]
    pub container_routes: usize,
    pub firewall_chains: usize,
    pub firewall_set_elements: usize,
}

/// What `GET /v1/doctor` answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorReport {
    /// The view's revision the check used.
    pub revision: i64,
    pub checked: Checked,
    pub findings: Vec<Finding>,
    /// What could not be checked, and why (not differences).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

impl DoctorReport {
    /// True when the kernel matches.
    pub fn healthy(&self) -> bool {
        self.findings.is_empty()
    }
}

fn finding(
    area: Area,
    network: Option<&str>,
    object: String,
    difference: Difference,
    want: Option<String>,
    have: Option<String>,
) -> Finding {
    Finding {
        area,
        network: network.map(str::to_string),
        object,
        difference,
        want,
        have,
        fix: RECONCILE.to_string(),
    }
}

/// One network's remote endpoints: `want` (from `desired_peers`) against the entries on
/// vxlan1, each kind on its own (a peer needs both halves to carry traffic).
pub fn diff_peers(network: &str, want: &PeerMap, have: &PeerEntries) -> Vec<Finding> {
    let net = Some(network);
    let mut out = Vec::new();
    let mut wanted: Vec<_> = want.values().collect();
    wanted.sort();
    for p in &wanted {
        let fdb = format!("FDB entry {}", p.mac);
        match have.fdb.get(&p.mac) {
            Some(vteps) if vteps.contains(&p.vtep) => {}
            Some(vteps) => out.push(finding(
                Area::Fdb,
                net,
                fdb,
                Difference::Wrong,
                Some(format!("dst {} (endpoint {})", p.vtep, p.ip)),
                Some(format!("dst {}", join(vteps))),
            )),
            None => out.push(finding(
                Area::Fdb,
                net,
                fdb,
                Difference::Missing,
                Some(format!("dst {} (endpoint {})", p.vtep, p.ip)),
                None,
            )),
        }
        let neigh = format!("neighbour {}", p.ip);
        match have.neighbours.get(&p.ip) {
            Some(mac) if *mac == p.mac => {}
            Some(mac) => out.push(finding(
                Area::Neighbour,
                net,
                neigh,
                Difference::Wrong,
                Some(format!("lladdr {}", p.mac)),
                Some(format!("lladdr {mac}")),
            )),
            None => out.push(finding(
                Area::Neighbour,
                net,
                neigh,
                Difference::Missing,
                Some(format!("lladdr {}", p.mac)),
                None,
            )),
        }
    }
    let by_mac: HashMap<Mac, Ipv4Addr> = want.values().map(|p| (p.mac, p.vtep)).collect();
    let mut extra_fdb: Vec<_> = have
        .fdb
        .iter()
        .flat_map(|(mac, vteps)| vteps.iter().map(move |v| (*mac, *v)))
        .filter(|(mac, vtep)| match by_mac.get(mac) {
            // A wanted MAC with one more destination: traffic is sent there too.
            Some(want) => want != vtep && wanted_dst_present(have, mac, *want),
            None => true,
        })
        .collect();
    extra_fdb.sort();
    for (mac, vtep) in extra_fdb {
        out.push(finding(
            Area::Fdb,
            net,
            format!("FDB entry {mac}"),
            Difference::Unexpected,
            None,
            Some(format!("dst {vtep}")),
        ));
    }
    let mut extra_neigh: Vec<_> = have
        .neighbours
        .iter()
        .filter(|(ip, _)| !want.contains_key(ip))
        .collect();
    extra_neigh.sort();
    for (ip, mac) in extra_neigh {
        out.push(finding(
            Area::Neighbour,
            net,
            format!("neighbour {ip}"),
            Difference::Unexpected,
            None,
            Some(format!("lladdr {mac}")),
        ));
    }
    out
}

/// Whether the wanted destination of `mac` is there (else the other one is reported as the
/// wrong value, not also as unexpected).
fn wanted_dst_present(have: &PeerEntries, mac: &Mac, want: Ipv4Addr) -> bool {
    have.fdb.get(mac).is_some_and(|v| v.contains(&want))
}

fn join(addrs: &[Ipv4Addr]) -> String {
    addrs
        .iter()
        .map(Ipv4Addr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Port names wanted on a bridge against those on it. `label` names each wanted one (the
/// container it belongs to).
pub fn diff_ports(
    area: Area,
    network: Option<&str>,
    bridge: &str,
    want: &BTreeMap<String, String>,
    have: &[String],
) -> Vec<Finding> {
    let mut out = Vec::new();
    for (name, owner) in want {
        if !have.contains(name) {
            out.push(finding(
                area,
                network,
                format!("interface {name} on {bridge}"),
                Difference::Missing,
                Some(format!("veth of {owner}")),
                None,
            ));
        }
    }
    for name in have.iter().filter(|n| !want.contains_key(*n)) {
        out.push(finding(
            area,
            network,
            format!("interface {name} on {bridge}"),
            Difference::Unexpected,
            None,
            Some("a veth no container here owns".into()),
        ));
    }
    out
}

/// The CNI containers' routes in the host namespace (overlay address via its gateway-bridge
/// address, for a chained portmap): wanted against vxnet's routes there.
pub fn diff_routes(
    want: &HashMap<Ipv4Addr, Ipv4Addr>,
    have: &[(Ipv4Addr, Ipv4Addr)],
) -> Vec<Finding> {
    let mut out = Vec::new();
    let have_map: HashMap<Ipv4Addr, Ipv4Addr> = have.iter().copied().collect();
    let mut wanted: Vec<_> = want.iter().collect();
    wanted.sort();
    for (dst, via) in wanted {
        let object = format!("route to {dst}/32");
        match have_map.get(dst) {
            Some(h) if h == via => {}
            Some(h) => out.push(finding(
                Area::Gateway,
                None,
                object,
                Difference::Wrong,
                Some(format!("via {via}")),
                Some(format!("via {h}")),
            )),
            None => out.push(finding(
                Area::Gateway,
                None,
                object,
                Difference::Missing,
                Some(format!("via {via}")),
                None,
            )),
        }
    }
    let mut extra: Vec<_> = have.iter().filter(|(d, _)| !want.contains_key(d)).collect();
    extra.sort();
    for (dst, via) in extra {
        out.push(finding(
            Area::Gateway,
            None,
            format!("route to {dst}/32"),
            Difference::Unexpected,
            None,
            Some(format!("via {via}")),
        ));
    }
    out
}

/// The `inet vxnet` table: the shape `apply` would give it against the kernel's.
pub fn diff_table(want: &TableShape, have: Option<&TableShape>) -> Vec<Finding> {
    let table = format!("table inet {}", firewall::TABLE);
    let Some(have) = have else {
        return vec![finding(
            Area::Firewall,
            None,
            table,
            Difference::Missing,
            Some(format!(
                "{} chains, {} sets",
                want.chains.len(),
                want.sets.len()
            )),
            None,
        )];
    };
    let mut out = Vec::new();
    for (chain, rules) in &want.chains {
        let object = format!("chain {chain} of {table}");
        match have.chains.get(chain) {
            None => out.push(finding(
                Area::Firewall,
                None,
                object,
                Difference::Missing,
                Some(format!("{rules} rules")),
                None,
            )),
            Some(n) if n != rules => out.push(finding(
                Area::Firewall,
                None,
                object,
                Difference::Wrong,
                Some(format!("{rules} rules")),
                Some(format!("{n} rules")),
            )),
            Some(_) => {}
        }
    }
    for chain in have.chains.keys().filter(|c| !want.chains.contains_key(*c)) {
        out.push(finding(
            Area::Firewall,
            None,
            format!("chain {chain} of {table}"),
            Difference::Unexpected,
            None,
            Some(format!("{} rules", have.chains[chain])),
        ));
    }
    let empty = BTreeSet::new();
    for (set, elements) in &want.sets {
        let object = format!("set {set} of {table}");
        let Some(there) = have.sets.get(set) else {
            out.push(finding(
                Area::Firewall,
                None,
                object,
                Difference::Missing,
                Some(elements_text(elements)),
                None,
            ));
            continue;
        };
        // One finding per set, whole sets on both sides: a flushed set and one with a
        // stranger's element in it read alike, and the fix replaces the set whole anyway.
        if there != elements {
            out.push(finding(
                Area::Firewall,
                None,
                object,
                Difference::Wrong,
                Some(elements_text(elements)),
                Some(elements_text(there)),
            ));
        }
    }
    for set in have.sets.keys().filter(|s| !want.sets.contains_key(*s)) {
        out.push(finding(
            Area::Firewall,
            None,
            format!("set {set} of {table}"),
            Difference::Unexpected,
            None,
            Some(elements_text(have.sets.get(set).unwrap_or(&empty))),
        ));
    }
    out
}

fn elements_text(elements: &BTreeSet<Ipv4Addr>) -> String {
    if elements.is_empty() {
        return "no elements".into();
    }
    let list: Vec<String> = elements.iter().map(Ipv4Addr::to_string).collect();
    format!("{{ {} }}", list.join(", "))
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn network_label(net: &Network) -> String {
    format!("{} ({})", net.name, net.id.short())
}

impl Reconciler {
    /// Compares this host's kernel state with what a resync would program; changes nothing.
    pub async fn doctor(&self) -> Result<DoctorReport, Error> {
        let revision = self.view.revision();
        if revision < 1 {
            return Err(Error::NotSynced);
        }
        let mut report = DoctorReport {
            revision,
            ..Default::default()
        };
        self.doctor_networks(&mut report).await?;
        self.doctor_gateway(&mut report).await?;
        self.doctor_firewall(&mut report).await?;
        Ok(report)
    }

    /// Every network this host serves (its sandbox, container interfaces, peers), and every
    /// sandbox on disk that nothing here needs.
    async fn doctor_networks(&self, report: &mut DoctorReport) -> Result<(), Error> {
        let attachments = self.local_attachments();
        let plugin = self.plugin_ports();
        let owners: HashMap<String, String> = self
            .registry
            .list()
            .iter()
            .flat_map(|r| {
                r.attachments
                    .iter()
                    .map(move |a| (a.host_ifname(), format!("container {}", r.name)))
            })
            .collect();
        // What attach has made and the container's record does not list yet.
        let mut in_flight: HashMap<NetworkId, BTreeSet<String>> = HashMap::new();
        for (id, slot) in self.slots() {
            if let Some(p) = slot.lock().await.as_ref() {
                in_flight.insert(id, p.endpoints.clone());
            }
        }
        let mut served: BTreeSet<NetworkId> = attachments.keys().cloned().collect();
        served.extend(plugin.keys().cloned());
        served.extend(in_flight.keys().cloned());
        let networks: HashMap<NetworkId, Network> = self.view.with(|v| {
            v.networks
                .iter()
                .map(|(id, s)| (id.clone(), s.network.clone()))
                .collect()
        });
        let on_disk: BTreeSet<String> = dataplane::list_sandboxes(&self.run_dir)
            .into_iter()
            .collect();
        let mut needed_sandboxes = BTreeSet::new();
        for id in &served {
            let mut want: BTreeMap<String, String> = BTreeMap::new();
            for (_, a) in attachments.get(id).into_iter().flatten() {
                let owner = owners
                    .get(&a.host_ifname())
                    .cloned()
                    .unwrap_or_else(|| "a container".into());
                want.insert(a.host_ifname(), owner);
            }
            for p in plugin.get(id).into_iter().flatten() {
                want.insert(p.clone(), "a Docker endpoint".into());
            }
            for p in in_flight.get(id).into_iter().flatten() {
                want.entry(p.clone())
                    .or_insert_with(|| "a container being attached".into());
            }
            let Some(net) = networks.get(id) else {
                continue; // The network is gone: its sandbox, if any, is reported below.
            };
            if want.is_empty() {
                continue;
            }
            needed_sandboxes.insert(sandbox_name(id));
            report.checked.networks += 1;
            // One network that cannot be read (its MTU does not fit this host, a netlink
            // error) is a finding of its own; the others are still checked.
            if let Err(e) = self
                .doctor_network(report, net, &want, attachments.get(id))
                .await
            {
                let label = network_label(net);
                report.findings.push(Finding {
                    fix: "the error says what is wrong; `vxnet info` shows whether the \
                          reconciler fails on this network too"
                        .into(),
                    ..finding(
                        Area::Sandbox,
                        Some(&label),
                        format!("sandbox {}", sandbox_name(id)),
                        Difference::Wrong,
                        Some("a sandbox that can be read back".into()),
                        Some(format!("could not be checked: {e}")),
                    )
                });
            }
        }
        for name in on_disk.difference(&needed_sandboxes) {
            let network = networks
                .values()
                .find(|n| &sandbox_name(&n.id) == name)
                .map(network_label);
            report.findings.push(finding(
                Area::Sandbox,
                network.as_deref(),
                format!("sandbox {name}"),
                Difference::Unexpected,
                Some(match network {
                    Some(_) => "none: no container here is on this network".into(),
                    None => "none: no network in the store has this sandbox".into(),
                }),
                Some("a sandbox namespace".into()),
            ));
        }
        Ok(())
    }

    async fn doctor_network(
        &self,
        report: &mut DoctorReport,
        net: &Network,
        ports: &BTreeMap<String, String>,
        attachments: Option<&Vec<(crate::registry::NetnsRef, crate::registry::Attachment)>>,
    ) -> Result<(), Error> {
        let label = network_label(net);
        let name = sandbox_name(&net.id);
        let spec = self.sandbox_spec(net).await?;
        let found = dataplane::inspect_sandbox(&self.run_dir, &spec).await?;
        let want_peers = self.view.with(|v| self.desired_peers(v, &net.id));
        if !found.namespace {
            report.findings.push(finding(
                Area::Sandbox,
                Some(&label),
                format!("sandbox {name}"),
                Difference::Missing,
                Some(format!(
                    "a namespace with br0, vxlan1 (VNI {}), {} and {}",
                    net.vni,
                    plural(ports.len(), "container interface", "container interfaces"),
                    plural(want_peers.len(), "peer", "peers"),
                )),
                None,
            ));
            return Ok(());
        }
        report.checked.sandboxes += 1;
        for p in found.problems {
            let (difference, have) = match p.missing {
                true => (Difference::Missing, None),
                false => (Difference::Wrong, Some(p.what)),
            };
            report.findings.push(finding(
                Area::Sandbox,
                Some(&label),
                format!("{} in sandbox {name}", p.device),
                difference,
                None,
                have,
            ));
        }
        let Some(sandbox) = found.sandbox else {
            report.skipped.push(format!(
                "network {label}: its interfaces and peers (br0 or vxlan1 is missing)"
            ));
            return Ok(());
        };
        let links = dataplane::list_endpoint_links(&sandbox).await?;
        report.findings.extend(diff_ports(
            Area::Interface,
            Some(&label),
            &format!("br0 of sandbox {name}"),
            ports,
            &links,
        ));
        report.checked.interfaces += ports.len();
        for (netns, att) in attachments.into_iter().flatten() {
            let ns = match netns.open() {
                Ok(Some(ns)) => ns,
                // A CNI runtime's namespace that is gone: the namespace watch releases it.
                Ok(None) => continue,
                Err(e) => {
                    report.findings.push(Finding {
                        fix: "the container's namespace is gone, which a reconcile cannot \
                              repair: `vxnet rm -f` the container"
                            .into(),
                        ..finding(
                            Area::Interface,
                            Some(&label),
                            format!("namespace {}", netns.path.display()),
                            Difference::Missing,
                            Some(format!("{} of endpoint {}", att.ifname, att.ip)),
                            Some(e.to_string()),
                        )
                    });
                    continue;
                }
            };
            let spec = self.endpoint_spec(att)?;
            if let Some(problem) =
                dataplane::check_container_end(&ns, &att.ifname, att.mac, spec.address).await?
            {
                report.findings.push(finding(
                    Area::Interface,
                    Some(&label),
                    format!("{} of container endpoint {}", att.ifname, att.ip),
                    Difference::Wrong,
                    Some(format!("veth up with {} and {}", att.mac, spec.address)),
                    Some(problem),
                ));
            }
        }
        let have = dataplane::list_peer_entries(&sandbox).await?;
        report
            .findings
            .extend(diff_peers(&label, &want_peers, &have));
        report.checked.fdb_entries += want_peers.len();
        report.checked.neighbours += want_peers.len();
        Ok(())
    }

    /// The gateway bridge and every live container's eth1 on it.
    async fn doctor_gateway(&self, report: &mut DoctorReport) -> Result<(), Error> {
        let live: Vec<_> = self
            .registry
            .list()
            .into_iter()
            .filter(|r| !matches!(r.state, ContainerState::Exited { .. }))
            .filter(|r| r.gateway_attachment.is_some())
            .collect();
        let name = &self.gateway.bridge;
        let host = "the host namespace";
        let bridge = links::link_by_name(&self.host, name, host).await?;
        let mut want: BTreeMap<String, String> = live
            .iter()
            .filter_map(|r| {
                let gw = r.gateway_attachment.as_ref()?;
                Some((gw.host_ifname.clone(), format!("container {}", r.name)))
            })
            .collect();
        for p in crate::sync::lock(&self.gateway_endpoints).iter() {
            want.entry(p.clone())
                .or_insert_with(|| "a container being attached".into());
        }
        let object = format!("gateway bridge {name}");
        let index = match bridge {
            None if live.is_empty() => return Ok(()),
            None => {
                report.checked.gateway_bridge = true;
                report.findings.push(finding(
                    Area::Gateway,
                    None,
                    object,
                    Difference::Missing,
                    Some(format!(
                        "a bridge with {}/{} and {}",
                        self.gateway.gateway(),
                        self.gateway.subnet.prefix_len(),
                        plural(want.len(), "container interface", "container interfaces"),
                    )),
                    None,
                ));
                return Ok(());
            }
            Some(l)
                if links::kind(&l) != Some(&rtnetlink::packet_route::link::InfoKind::Bridge) =>
            {
                report.checked.gateway_bridge = true;
                report.findings.push(Finding {
                    fix: format!(
                        "a {} that is not vxnet's holds the name: remove it, then {RECONCILE}",
                        links::kind_name(&l)
                    ),
                    ..finding(
                        Area::Gateway,
                        None,
                        object,
                        Difference::Wrong,
                        Some("a bridge".into()),
                        Some(format!("a {}", links::kind_name(&l))),
                    )
                });
                return Ok(());
            }
            Some(l) => l.header.index,
        };
        report.checked.gateway_bridge = true;
        let address = Ipv4Net::new(self.gateway.gateway(), self.gateway.subnet.prefix_len())
            .map_err(|e| Error::invalid(e.to_string()))?;
        if !live.is_empty() {
            let have = links::ipv4_addresses(&self.host, index, host).await?;
            if !have.contains(&address) {
                report.findings.push(finding(
                    Area::Gateway,
                    None,
                    object.clone(),
                    Difference::Wrong,
                    Some(format!("address {address}")),
                    Some(format!(
                        "addresses {}",
                        have.iter()
                            .map(Ipv4Net::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                ));
            }
        }
        let routes = dataplane::list_container_routes(&self.host).await?;
        let wanted_routes = self.wanted_container_routes();
        report.checked.container_routes += wanted_routes.len();
        report.findings.extend(diff_routes(&wanted_routes, &routes));
        let ports = dataplane::list_gateway_endpoints(&self.host, index).await?;
        report
            .findings
            .extend(diff_ports(Area::Gateway, None, &object, &want, &ports));
        report.checked.gateway_interfaces += want.len();
        for r in &live {
            let Some(gw) = &r.gateway_attachment else {
                continue;
            };
            let Ok(Some(ns)) = r.netns_ref().open() else {
                continue; // Reported with the container's overlay interface, or released.
            };
            let spec = Self::gateway_spec(gw)?;
            if let Some(problem) =
                dataplane::check_container_end(&ns, &gw.ifname, gw.mac, spec.address).await?
            {
                report.findings.push(finding(
                    Area::Gateway,
                    None,
                    format!("{} of container {}", gw.ifname, r.name),
                    Difference::Wrong,
                    Some(format!("veth up with {} and {}", gw.mac, spec.address)),
                    Some(problem),
                ));
            }
        }
        Ok(())
    }

    /// The `inet vxnet` table against the shape the current ruleset gives it.
    async fn doctor_firewall(&self, report: &mut DoctorReport) -> Result<(), Error> {
        if *self.firewall_stopped.lock().await {
            report
                .skipped
                .push("the firewall: the daemon is stopping and has removed its table".into());
            return Ok(());
        }
        let want = firewall::desired_shape(&self.ruleset())?;
        // A blocking-pool thread is always in the daemon's own namespace (see on_firewall).
        let have = tokio::task::spawn_blocking(firewall::read_table)
            .await
            .map_err(|e| Error::io("firewall reader", std::io::Error::other(e.to_string())))??;
        report.checked.firewall_chains += want.chains.len();
        report.checked.firewall_set_elements +=
            want.sets.values().map(BTreeSet::len).sum::<usize>();
        report.findings.extend(diff_table(&want, have.as_ref()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Peer;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 4, last)
    }
    fn vtep(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, last)
    }
    fn peer(last: u8, host: u8) -> Peer {
        Peer {
            ip: ip(last),
            mac: Mac::from_ipv4(ip(last)),
            vtep: vtep(host),
        }
    }
    fn want(peers: &[Peer]) -> PeerMap {
        peers.iter().map(|p| (p.ip, *p)).collect()
    }
    fn entries(peers: &[Peer]) -> PeerEntries {
        let mut e = PeerEntries::default();
        for p in peers {
            e.fdb.entry(p.mac).or_default().push(p.vtep);
            e.neighbours.insert(p.ip, p.mac);
        }
        e
    }
    fn summary(f: &[Finding]) -> Vec<(Area, Difference, String)> {
        f.iter()
            .map(|f| (f.area, f.difference, f.object.clone()))
            .collect()
    }

    #[test]
    fn matching_peers_give_no_finding() {
        let p = [peer(3, 7), peer(4, 7)];
        assert!(diff_peers("n", &want(&p), &entries(&p)).is_empty());
    }

    #[test]
    fn a_deleted_fdb_entry_is_named_by_its_mac_and_the_neighbour_is_fine() {
        let p = [peer(3, 7), peer(4, 7)];
        let mut have = entries(&p);
        have.fdb.remove(&p[1].mac);
        let f = diff_peers("n", &want(&p), &have);
        assert_eq!(
            summary(&f),
            [(
                Area::Fdb,
                Difference::Missing,
                format!("FDB entry {}", p[1].mac)
            )]
        );
        assert_eq!(
            f[0].want.as_deref(),
            Some("dst 192.0.2.7 (endpoint 10.0.4.4)")
        );
        assert_eq!(f[0].fix, RECONCILE);
    }

    #[test]
    fn a_peer_at_the_wrong_vtep_is_wrong_not_missing_and_unexpected() {
        let p = [peer(3, 7)];
        let have = entries(&[peer(3, 8)]);
        let f = diff_peers("n", &want(&p), &have);
        assert_eq!(
            summary(&f),
            [(
                Area::Fdb,
                Difference::Wrong,
                format!("FDB entry {}", p[0].mac)
            )]
        );
        assert_eq!(f[0].have.as_deref(), Some("dst 192.0.2.8"));
    }

    #[test]
    fn stale_entries_and_neighbours_with_another_mac_are_reported() {
        let p = [peer(3, 7)];
        let mut have = entries(&[peer(3, 7), peer(9, 6)]);
        // A second destination for a wanted MAC: its frames also go there.
        have.fdb.entry(p[0].mac).or_default().push(vtep(5));
        let f = diff_peers("n", &want(&p), &have);
        assert_eq!(
            summary(&f),
            [
                (
                    Area::Fdb,
                    Difference::Unexpected,
                    format!("FDB entry {}", p[0].mac)
                ),
                (
                    Area::Fdb,
                    Difference::Unexpected,
                    format!("FDB entry {}", peer(9, 6).mac)
                ),
                (
                    Area::Neighbour,
                    Difference::Unexpected,
                    "neighbour 10.0.4.9".into()
                ),
            ]
        );
        let mut have = entries(&p);
        have.neighbours.insert(ip(3), Mac::from_ipv4(ip(99)));
        let f = diff_peers("n", &want(&p), &have);
        assert_eq!(
            summary(&f),
            [(
                Area::Neighbour,
                Difference::Wrong,
                "neighbour 10.0.4.3".into()
            )]
        );
    }

    #[test]
    fn ports_missing_and_stray() {
        let want: BTreeMap<String, String> =
            [("vethaaaaaaa".to_string(), "container c1".to_string())].into();
        assert!(
            diff_ports(Area::Interface, None, "br0", &want, &["vethaaaaaaa".into()]).is_empty()
        );
        let f = diff_ports(Area::Interface, None, "br0", &want, &["vethbbbbbbb".into()]);
        assert_eq!(
            summary(&f),
            [
                (
                    Area::Interface,
                    Difference::Missing,
                    "interface vethaaaaaaa on br0".into()
                ),
                (
                    Area::Interface,
                    Difference::Unexpected,
                    "interface vethbbbbbbb on br0".into()
                ),
            ]
        );
        assert_eq!(f[0].want.as_deref(), Some("veth of container c1"));
    }

    #[test]
    fn container_routes_missing_wrong_and_stray() {
        let gw = |last: u8| Ipv4Addr::new(172, 18, 0, last);
        let want: HashMap<Ipv4Addr, Ipv4Addr> = [(ip(3), gw(2)), (ip(4), gw(3))].into();
        assert!(diff_routes(&want, &[(ip(3), gw(2)), (ip(4), gw(3))]).is_empty());
        let f = diff_routes(&want, &[(ip(3), gw(9)), (ip(5), gw(4))]);
        assert_eq!(
            summary(&f),
            [
                (
                    Area::Gateway,
                    Difference::Wrong,
                    "route to 10.0.4.3/32".into()
                ),
                (
                    Area::Gateway,
                    Difference::Missing,
                    "route to 10.0.4.4/32".into()
                ),
                (
                    Area::Gateway,
                    Difference::Unexpected,
                    "route to 10.0.4.5/32".into()
                ),
            ]
        );
        assert_eq!(f[0].have.as_deref(), Some("via 172.18.0.9"));
    }

    fn shape(chains: &[(&str, usize)], vteps: &[u8]) -> TableShape {
        TableShape {
            chains: chains.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            sets: [(
                "vteps".to_string(),
                vteps.iter().map(|v| vtep(*v)).collect(),
            )]
            .into(),
        }
    }

    #[test]
    fn the_table_missing_a_flushed_set_and_a_changed_chain() {
        let want = shape(&[("input", 7), ("forward", 7)], &[6, 7]);
        assert!(diff_table(&want, Some(&want)).is_empty());
        assert_eq!(
            summary(&diff_table(&want, None)),
            [(
                Area::Firewall,
                Difference::Missing,
                "table inet vxnet".into()
            )]
        );
        let flushed = shape(&[("input", 7), ("forward", 7)], &[]);
        let f = diff_table(&want, Some(&flushed));
        assert_eq!(
            summary(&f),
            [(
                Area::Firewall,
                Difference::Wrong,
                "set vteps of table inet vxnet".into()
            )]
        );
        assert_eq!(f[0].want.as_deref(), Some("{ 192.0.2.6, 192.0.2.7 }"));
        assert_eq!(f[0].have.as_deref(), Some("no elements"));
        let edited = shape(&[("input", 6), ("extra", 1)], &[6, 7, 9]);
        assert_eq!(
            summary(&diff_table(&want, Some(&edited))),
            [
                (
                    Area::Firewall,
                    Difference::Missing,
                    "chain forward of table inet vxnet".into()
                ),
                (
                    Area::Firewall,
                    Difference::Wrong,
                    "chain input of table inet vxnet".into()
                ),
                (
                    Area::Firewall,
                    Difference::Unexpected,
                    "chain extra of table inet vxnet".into()
                ),
                (
                    Area::Firewall,
                    Difference::Wrong,
                    "set vteps of table inet vxnet".into()
                ),
            ]
        );
        let mut no_set = want.clone();
        no_set.sets.clear();
        assert_eq!(
            summary(&diff_table(&want, Some(&no_set))),
            [(
                Area::Firewall,
                Difference::Missing,
                "set vteps of table inet vxnet".into()
            )]
        );
    }
}
