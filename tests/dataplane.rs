//! The data plane against the real kernel.
//!
//! Each test builds two simulated hosts as anonymous network namespaces joined by a veth
//! underlay (192.0.2.0/24, MTU 1500), and containers as further anonymous namespaces. Nothing
//! is created in the machine's root namespace: the "host" handle given to `ensure_sandbox`
//! lives in a simulated host. Named sandboxes are bind-mounted under a scratch run dir that
//! a guard unmounts and removes even when the test fails. `ip`, `bridge`, `ss` and `ping`
//! (run inside the namespaces) are the independent oracle.

#[path = "support/oracle.rs"]
mod oracle;

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::Instant;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use oracle::{assert_same, check, eventually_pings, json, ok, pings, run};
use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth};
use serde_json::{json, Value};
use vxnet::dataplane::{
    add_peers, ensure_endpoint, ensure_sandbox, find_underlay, list_endpoint_links, list_peers,
    list_sandboxes, remove_endpoint, remove_peers, remove_sandbox, sandbox_path, DataplaneError,
    EndpointSpec, Peer, Sandbox, SandboxSpec, Underlay,
};
use vxnet::lab::process::ScratchDir;
use vxnet::model::Mac;
use vxnet::netns::NetNs;

const SUBNET_GW: &str = "10.0.4.1/24";
const MTU: u32 = 1450;
const PORT: u16 = 4789;

/// Unmounts every sandbox left under the run dirs (success or panic), before the scratch
/// dir itself is removed: a mounted namespace file would make that removal fail.
struct RunDirGuard {
    dir: ScratchDir,
}

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        for host in ["a", "b"] {
            let run = self.dir.path().join(host);
            for name in list_sandboxes(&run) {
                let _ = NetNs::remove_named(&sandbox_path(&run, &name));
            }
        }
    }
}

struct Host {
    ns: NetNs,
    handle: Handle,
    underlay: Underlay,
    run_dir: PathBuf,
}

struct Lab {
    a: Host,
    b: Host,
    // Dropped last (fields drop in order): the hosts' handles go first.
    _guard: RunDirGuard,
}

async fn link_up(h: &Handle, name: &str) {
    check(vxnet::netns::set_link_up(h, name).await, name);
}

async fn index_of(h: &Handle, name: &str) -> u32 {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    let link = check(links.try_next().await, name);
    link.unwrap_or_else(|| panic!("{name} missing"))
        .header
        .index
}

impl Lab {
    async fn new() -> Lab {
        let guard = RunDirGuard {
            dir: check(ScratchDir::new("vxnet-dataplane"), "scratch dir"),
        };
        let ns_a = check(NetNs::new_anonymous(), "host a");
        let ns_b = check(NetNs::new_anonymous(), "host b");
        let ha = check(ns_a.netlink(), "netlink a");
        let hb = check(ns_b.netlink(), "netlink b");
        // The underlay: ul0 in host a, its peer ul0 created directly in host b.
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name("ul0".to_string())
            .mtu(1500)
            .setns_by_fd(ns_b.as_fd().as_raw_fd())
            .build();
        let veth = LinkVeth::new("ul0", "ul0")
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .mtu(1500)
            .build();
        check(ha.link().add(veth).execute().await, "underlay veth");
        let mut hosts = Vec::new();
        for (ns, h, ip, dir) in [(ns_a, ha, 1u8, "a"), (ns_b, hb, 2u8, "b")] {
            let addr = Ipv4Addr::new(192, 0, 2, ip);
            link_up(&h, "lo").await;
            link_up(&h, "ul0").await;
            let idx = index_of(&h, "ul0").await;
            check(
                h.address().add(idx, addr.into(), 24).execute().await,
                "underlay address",
            );
            let underlay = check(find_underlay(&h, addr).await, "find_underlay");
            hosts.push(Host {
                ns,
                handle: h,
                underlay,
                run_dir: guard.dir.path().join(dir),
            });
        }
        let b = hosts.pop().unwrap();
        let a = hosts.pop().unwrap();
        Lab {
            a,
            b,
            _guard: guard,
        }
    }

    fn spec(&self, host: &Host, name: &str, vni: u32) -> SandboxSpec {
        SandboxSpec {
            name: name.to_string(),
            vni,
            gateway: SUBNET_GW.parse().unwrap(),
            mtu: MTU,
            vxlan_port: PORT,
            underlay: host.underlay.clone(),
            service_address: None,
        }
    }
}

fn network_name() -> String {
    format!("1-{:010x}", rand::random::<u64>() & 0xff_ffff_ffff)
}

fn endpoint(ip: Ipv4Addr) -> EndpointSpec {
    EndpointSpec {
        host_ifname: format!("veth{:07x}", rand::random::<u32>() & 0xfff_ffff),
        container_ifname: "eth0".into(),
        address: Ipv4Net::new(ip, 24).unwrap(),
        mac: Mac::from_ipv4(ip),
        mtu: MTU,
        default_gateway: Some(Ipv4Addr::new(10, 0, 4, 1)),
        host_route: None,
    }
}

// The oracle: iproute2 run inside a namespace.

/// The settings that matter, per link, as `ip -d -j link` and `ip -j addr` report them;
/// timers, counters and carrier left out, indexes kept (equal indexes: nothing was
/// re-created).
fn snapshot(ns: &NetNs) -> Value {
    let links = json(ns, &["ip", "-d", "-j", "link", "show"]);
    let addrs = json(ns, &["ip", "-4", "-j", "addr", "show"]);
    let routes = json(ns, &["ip", "-4", "-j", "route", "show"]);
    let mut out = serde_json::Map::new();
    for l in links.as_array().unwrap() {
        let name = l["ifname"].as_str().unwrap().to_string();
        let mut flags: Vec<String> = l["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            // Carrier follows the admin state asynchronously (linkwatch): configuration only.
            .filter(|f| f != "NO-CARRIER" && f != "LOWER_UP")
            .collect();
        flags.sort();
        let info = &l["linkinfo"];
        let data = &info["info_data"];
        let addr: Vec<String> = addrs
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["ifname"] == l["ifname"])
            .flat_map(|a| a["addr_info"].as_array().unwrap().clone())
            .map(|i| format!("{}/{}", i["local"].as_str().unwrap(), i["prefixlen"]))
            .collect();
        out.insert(
            name,
            json!({
                "ifindex": l["ifindex"], "mtu": l["mtu"], "flags": flags,
                "master": l["master"], "address": l["address"],
                "kind": info["info_kind"],
                "vxlan": if info["info_kind"] == "vxlan" {
                    json!([data["id"], data["local"], data["link_index"], data["link"],
                           data["port"], data["learning"], data["proxy"]])
                } else { Value::Null },
                "port_learning": info["info_slave_data"]["learning"],
                "addrs": addr,
            }),
        );
    }
    out.insert("routes".into(), routes);
    Value::Object(out)
}

fn sandbox_ns(host: &Host, name: &str) -> NetNs {
    check(
        NetNs::open(&sandbox_path(&host.run_dir, name)),
        "open sandbox",
    )
}

/// Whether the oracle (`bridge fdb show dev vxlan1` in `ns`) lists `mac`'s permanent
/// entry on the VXLAN device itself at `vtep`; with the listing, to show when it does not.
fn fdb_has(ns: &NetNs, mac: &str, vtep: &str) -> (bool, String) {
    let fdb = ok(ns, &["bridge", "fdb", "show", "dev", "vxlan1"]);
    let entry = format!("{mac} dst {vtep} ");
    let found = fdb
        .lines()
        .any(|l| l.starts_with(&entry) && l.ends_with("self permanent"));
    (found, fdb)
}

fn udp_listeners(ns: &NetNs, port: u16) -> String {
    ok(ns, &["ss", "-Hlun", &format!("sport = :{port}")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_has_the_libnetwork_layout() {
    let lab = Lab::new().await;
    let name = network_name();
    let spec = lab.spec(&lab.a, &name, 4097);
    let started = Instant::now();
    let sb = check(
        ensure_sandbox(&lab.a.handle, &lab.a.run_dir, &spec).await,
        "ensure_sandbox",
    );
    println!("ensure_sandbox (create): {:?}", started.elapsed());
    assert!(sb.vxlan_created());
    assert_eq!(list_sandboxes(&lab.a.run_dir), vec![name.clone()]);

    let ns = sandbox_ns(&lab.a, &name);
    let snap = snapshot(&ns);
    println!("{snap:#}");
    let br = &snap["br0"];
    assert_eq!(br["kind"], "bridge");
    assert_eq!(br["mtu"], MTU);
    assert_eq!(br["addrs"], json!([SUBNET_GW]));
    assert!(br["flags"].as_array().unwrap().contains(&json!("UP")));
    assert_eq!(br["ifindex"], sb.bridge_index());

    let vx = &snap["vxlan1"];
    assert_eq!(vx["kind"], "vxlan");
    assert_eq!(vx["ifindex"], sb.vxlan_index());
    assert_eq!(vx["mtu"], MTU);
    assert_eq!(vx["master"], "br0");
    assert!(vx["flags"].as_array().unwrap().contains(&json!("UP")));
    let d = vx["vxlan"].as_array().unwrap();
    assert_eq!(d[0], 4097, "VNI");
    assert_eq!(d[1], "192.0.2.1", "local");
    // The lower device is in the host namespace, but ip resolves its index among the
    // sandbox's links (showing whichever sandbox link has that index, or "ifN").
    let dev = d[2].as_u64().or_else(|| {
        let shown = d[3].as_str()?;
        match shown.strip_prefix("if") {
            Some(n) if n.parse::<u64>().is_ok() => n.parse().ok(),
            _ => snap[shown]["ifindex"].as_u64(),
        }
    });
    assert_eq!(dev, Some(u64::from(lab.a.underlay.ifindex)), "dev: {d:?}");
    assert_eq!(d[4], PORT);
    assert_eq!(d[5], false, "learning");
    assert_eq!(d[6], true, "proxy");
    assert_eq!(vx["port_learning"], false, "bridge-port learning");
    let bridge_link = ok(&ns, &["bridge", "-d", "link", "show", "dev", "vxlan1"]);
    assert!(bridge_link.contains("learning off"), "{bridge_link}");
    assert!(snap["lo"]["flags"]
        .as_array()
        .unwrap()
        .contains(&json!("UP")));

    // libnetwork's layout: the VXLAN socket lives in the host, the device in the sandbox,
    // and no temporary device is left in the host.
    assert!(udp_listeners(&lab.a.ns, PORT).contains("4789"));
    assert_eq!(udp_listeners(&ns, PORT), "");
    let host_links = ok(&lab.a.ns, &["ip", "-o", "link", "show"]);
    assert!(!host_links.contains("vxtmp"), "{host_links}");
    assert!(!host_links.contains("vxlan"), "{host_links}");

    // Wrong specs are refused before anything is touched.
    let mut bad = spec.clone();
    bad.mtu = 1480;
    let err = ensure_sandbox(&lab.a.handle, &lab.a.run_dir, &bad)
        .await
        .unwrap_err();
    assert!(matches!(err, DataplaneError::InvalidSpec { .. }), "{err}");
    // A second sandbox with the same VNI on the same host is refused by the kernel.
    let other = lab.spec(&lab.a, &network_name(), 4097);
    let err = ensure_sandbox(&lab.a.handle, &lab.a.run_dir, &other)
        .await
        .unwrap_err();
    println!("same VNI twice: {err}");
    assert!(matches!(err, DataplaneError::VniInUse { .. }), "{err}");
    check(remove_sandbox(&lab.a.run_dir, &other.name).await, "remove");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensuring_twice_changes_nothing() {
    let lab = Lab::new().await;
    let name = network_name();
    let spec = lab.spec(&lab.a, &name, 4098);
    let sb = check(
        ensure_sandbox(&lab.a.handle, &lab.a.run_dir, &spec).await,
        "ensure_sandbox",
    );
    let container = check(NetNs::new_anonymous(), "container");
    let ep = endpoint(Ipv4Addr::new(10, 0, 4, 2));
    let started = Instant::now();
    check(
        ensure_endpoint(&sb, &container, &ep).await,
        "ensure_endpoint",
    );
    println!("ensure_endpoint (create): {:?}", started.elapsed());
    let ns = sandbox_ns(&lab.a, &name);
    let before = (snapshot(&ns), snapshot(&container), snapshot(&lab.a.ns));
    let eth0 = &before.1["eth0"];
    assert_eq!(eth0["address"], "02:42:0a:00:04:02");
    assert_eq!(eth0["mtu"], MTU);
    assert_eq!(eth0["addrs"], json!(["10.0.4.2/24"]));
    let routes = before.1["routes"].to_string();
    assert!(
        routes.contains("\"dst\":\"default\"") && routes.contains("10.0.4.1"),
        "{routes}"
    );
    assert_eq!(before.0[&ep.host_ifname]["master"], "br0");

    for round in 0..2 {
        let started = Instant::now();
        let again = check(
            ensure_sandbox(&lab.a.handle, &lab.a.run_dir, &spec).await,
            "ensure_sandbox again",
        );
        println!("ensure_sandbox (existing): {:?}", started.elapsed());
        assert!(!again.vxlan_created());
        assert_eq!(again.vxlan_index(), sb.vxlan_index());
        let started = Instant::now();
        check(
            ensure_endpoint(&again, &container, &ep).await,
            "ensure_endpoint again",
        );
        println!("ensure_endpoint (existing): {:?}", started.elapsed());
        let after = (snapshot(&ns), snapshot(&container), snapshot(&lab.a.ns));
        assert_same(&before.0, &after.0, &format!("sandbox (round {round})"));
        assert_same(&before.1, &after.1, &format!("container (round {round})"));
        assert_same(&before.2, &after.2, &format!("host (round {round})"));
    }
    assert_eq!(
        check(list_endpoint_links(&sb).await, "list_endpoint_links"),
        vec![ep.host_ifname.clone()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_repairs_drift_in_place() {
    let lab = Lab::new().await;
    let name = network_name();
    let spec = lab.spec(&lab.a, &name, 4099);
    let sb = check(
        ensure_sandbox(&lab.a.handle, &lab.a.run_dir, &spec).await,
        "ensure_sandbox",
    );
    let container = check(NetNs::new_anonymous(), "container");
    let ep = endpoint(Ipv4Addr::new(10, 0, 4, 2));
    check(
        ensure_endpoint(&sb, &container, &ep).await,
        "ensure_endpoint",
    );
    let ns = sandbox_ns(&lab.a, &name);
    let before = (snapshot(&ns), snapshot(&container));

    // Drift by hand, with iproute2: addresses gone, devices down, detached, wrong MTU,
    // learning back on, a foreign address, the container's MAC changed.
    let veth = ep.host_ifname.as_str();
    for cmd in [
        vec!["ip", "addr", "flush", "dev", "br0"],
        vec!["ip", "addr", "add", "10.9.9.9/24", "dev", "br0"],
        vec!["ip", "link", "set", "br0", "mtu", "1400"],
        vec!["bridge", "link", "set", "dev", "vxlan1", "learning", "on"],
        vec!["ip", "link", "set", "vxlan1", "down"],
        vec!["ip", "link", "set", veth, "nomaster"],
        vec!["ip", "link", "set", veth, "down"],
    ] {
        ok(&ns, &cmd);
    }
    for cmd in [
        vec!["ip", "link", "set", "eth0", "down"],
        vec!["ip", "addr", "flush", "dev", "eth0"],
        vec!["ip", "link", "set", "eth0", "address", "02:42:01:02:03:04"],
        vec!["ip", "link", "set", "eth0", "mtu", "1300"],
    ] {
        ok(&container, &cmd);
    }
    assert_ne!(snapshot(&ns), before.0);
    assert_ne!(snapshot(&container), before.1);

    let again = check(
        ensure_sandbox(&lab.a.handle, &lab.a.run_dir, &spec).await,
        "ensure_sandbox repair",
    );
    assert!(!again.vxlan_created(), "repair must not re-create vxlan1");
    check(
        ensure_endpoint(&again, &container, &ep).await,
        "ensure_endpoint repair",
    );
    // Same interfaces (same indexes), same settings as before the drift.
    assert_same(&before.0, &snapshot(&ns), "sandbox after repair");
    assert_same(&before.1, &snapshot(&container), "container after repair");

    // vxlan1 deleted by hand: re-created (its entries are gone, so the caller is told).
    ok(&ns, &["ip", "link", "del", "vxlan1"]);
    let again = check(
        ensure_sandbox(&lab.a.handle, &lab.a.run_dir, &spec).await,
        "ensure_sandbox after vxlan1 was deleted",
    );
    assert!(again.vxlan_created());
    let snap = snapshot(&ns);
    assert_eq!(snap["vxlan1"]["vxlan"], before.0["vxlan1"]["vxlan"]);
    assert_eq!(snap["vxlan1"]["master"], "br0");
    assert_eq!(snap["vxlan1"]["port_learning"], false);
    assert_eq!(snap["br0"], before.0["br0"], "br0 untouched");

    // A changed VNI cannot be applied to a live device: vxlan1 is re-created with it, and
    // the old VNI is free again.
    let moved = lab.spec(&lab.a, &name, 5000);
    let again = check(
        ensure_sandbox(&lab.a.handle, &lab.a.run_dir, &moved).await,
        "ensure_sandbox with a new VNI",
    );
    assert!(again.vxlan_created());
    assert_eq!(snapshot(&ns)["vxlan1"]["vxlan"][0], 5000);
    let back = check(
        ensure_sandbox(&lab.a.handle, &lab.a.run_dir, &spec).await,
        "ensure_sandbox back to the old VNI",
    );
    assert_eq!(snapshot(&ns)["vxlan1"]["vxlan"][0], 4099);

    // The container's eth0 deleted by hand (its sandbox end goes with it): re-created.
    ok(&container, &["ip", "link", "del", "eth0"]);
    check(
        ensure_endpoint(&back, &container, &ep).await,
        "ensure_endpoint after eth0 was deleted",
    );
    let c = snapshot(&container);
    assert_eq!(c["eth0"]["addrs"], json!(["10.0.4.2/24"]));
    assert_eq!(c["routes"], before.1["routes"]);
    assert_eq!(
        check(list_endpoint_links(&back).await, "list"),
        vec![ep.host_ifname.clone()]
    );

    // A container interface that is not our veth's peer is reported, not deleted.
    let other = check(NetNs::new_anonymous(), "container 2");
    let oh = check(other.netlink(), "netlink");
    check(
        oh.link()
            .add(LinkVeth::new("eth0", "spare0").build())
            .execute()
            .await,
        "foreign eth0",
    );
    let mut ep2 = endpoint(Ipv4Addr::new(10, 0, 4, 3));
    ep2.default_gateway = None;
    let err = ensure_endpoint(&back, &other, &ep2).await.unwrap_err();
    assert!(matches!(err, DataplaneError::NameTaken { .. }), "{err}");
    println!("foreign eth0: {err}");
    assert!(ok(&other, &["ip", "link", "show", "eth0"]).contains("eth0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_clears_a_temporary_device_left_by_a_crash() {
    let lab = Lab::new().await;
    // What a crash between "create in the host" and "move into the sandbox" leaves: a
    // VXLAN device holding the VNI in the host namespace.
    ok(
        &lab.a.ns,
        &[
            "ip",
            "link",
            "add",
            "vxtmp-001005",
            "type",
            "vxlan",
            "id",
            "4101",
            "dstport",
            "4789",
            "local",
            "192.0.2.1",
            "dev",
            "ul0",
            "nolearning",
            "proxy",
        ],
    );
    let name = network_name();
    let sb = check(
        ensure_sandbox(
            &lab.a.handle,
            &lab.a.run_dir,
            &lab.spec(&lab.a, &name, 4101),
        )
        .await,
        "ensure_sandbox over a leftover",
    );
    assert!(sb.vxlan_created());
    assert!(!ok(&lab.a.ns, &["ip", "-o", "link", "show"]).contains("vxtmp"));
    let vx = &snapshot(&sandbox_ns(&lab.a, &name))["vxlan1"];
    assert_eq!(vx["vxlan"][0], 4101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_on_two_hosts_ping_across_the_overlay() {
    let lab = Lab::new().await;
    let name = network_name();
    let (ip_a, ip_b) = (Ipv4Addr::new(10, 0, 4, 2), Ipv4Addr::new(10, 0, 4, 3));
    let mut sandboxes = Vec::new();
    let mut containers = Vec::new();
    for (host, ip) in [(&lab.a, ip_a), (&lab.b, ip_b)] {
        let spec = lab.spec(host, &name, 4100);
        let sb = check(
            ensure_sandbox(&host.handle, &host.run_dir, &spec).await,
            "ensure_sandbox",
        );
        let c = check(NetNs::new_anonymous(), "container");
        check(
            ensure_endpoint(&sb, &c, &endpoint(ip)).await,
            "ensure_endpoint",
        );
        sandboxes.push(sb);
        containers.push(c);
    }
    let (sb_a, sb_b) = (&sandboxes[0], &sandboxes[1]);
    let (c_a, c_b) = (&containers[0], &containers[1]);
    let peer_b = Peer {
        ip: ip_b,
        mac: Mac::from_ipv4(ip_b),
        vtep: lab.b.underlay.addr,
    };
    let peer_a = Peer {
        ip: ip_a,
        mac: Mac::from_ipv4(ip_a),
        vtep: lab.a.underlay.addr,
    };

    // The gateway (br0) answers locally; the remote container does not until peered.
    assert!(eventually_pings(c_a, Ipv4Addr::new(10, 0, 4, 1)));
    assert!(!pings(c_a, ip_b), "reached host b without any peer entry");

    check(add_peers(sb_a, &[peer_b]).await, "add_peers a");
    check(add_peers(sb_b, &[peer_a]).await, "add_peers b");
    assert!(
        eventually_pings(c_a, ip_b),
        "a cannot ping b over the overlay"
    );
    assert!(
        eventually_pings(c_b, ip_a),
        "b cannot ping a over the overlay"
    );
    assert_eq!(check(list_peers(sb_a).await, "list a"), vec![peer_b]);
    assert_eq!(check(list_peers(sb_b).await, "list b"), vec![peer_a]);
    // The oracle agrees on what is programmed.
    let a_ns = sandbox_ns(&lab.a, &name);
    let (found, fdb) = fdb_has(&a_ns, "02:42:0a:00:04:03", "192.0.2.2");
    assert!(found, "{fdb}");
    let neigh = ok(&a_ns, &["ip", "neigh", "show", "dev", "vxlan1"]);
    assert!(
        neigh.contains("10.0.4.3 lladdr 02:42:0a:00:04:03 PERMANENT"),
        "{neigh}"
    );
    // Adding again is harmless.
    check(add_peers(sb_a, &[peer_b]).await, "add_peers a again");
    assert_eq!(check(list_peers(sb_a).await, "list a"), vec![peer_b]);

    check(remove_peers(sb_a, &[peer_b]).await, "remove_peers a");
    assert!(!pings(c_a, ip_b), "a still reaches b after remove_peers");
    assert_eq!(check(list_peers(sb_a).await, "list a"), vec![]);
    assert_eq!(ok(&a_ns, &["ip", "neigh", "show", "dev", "vxlan1"]), "");
    check(remove_peers(sb_a, &[peer_b]).await, "remove_peers a again");

    check(
        add_peers(sb_a, &[peer_b]).await,
        "add_peers a after removal",
    );
    assert!(
        eventually_pings(c_a, ip_b),
        "a cannot ping b after re-adding"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_peers_removes_only_the_named_vtep_and_cleans_half_entries() {
    let lab = Lab::new().await;
    let name = network_name();
    let sb = check(
        ensure_sandbox(
            &lab.a.handle,
            &lab.a.run_dir,
            &lab.spec(&lab.a, &name, 4101),
        )
        .await,
        "ensure_sandbox",
    );
    let ip = Ipv4Addr::new(10, 0, 4, 9);
    let old = Peer {
        ip,
        mac: Mac::from_ipv4(ip),
        vtep: Ipv4Addr::new(192, 0, 2, 50),
    };
    let moved = Peer {
        vtep: Ipv4Addr::new(192, 0, 2, 51),
        ..old
    };
    check(add_peers(&sb, &[old]).await, "add old");
    check(add_peers(&sb, &[moved]).await, "add moved");
    assert_eq!(check(list_peers(&sb).await, "list"), vec![moved]);
    // A removal naming the old VTEP leaves the MAC's FDB entry at the new one (the kernel
    // deletes only the destination named); the IP's neighbour goes, since the caller no
    // longer wants that IP (the reconciler replaces a moved peer, it never removes it).
    let ns = sandbox_ns(&lab.a, &name);
    check(remove_peers(&sb, &[old]).await, "remove old");
    let (found, fdb) = fdb_has(&ns, "02:42:0a:00:04:09", "192.0.2.51");
    assert!(found, "{fdb}");
    assert_eq!(ok(&ns, &["ip", "neigh", "show", "dev", "vxlan1"]), "");
    check(add_peers(&sb, &[moved]).await, "add moved again");
    check(remove_peers(&sb, &[moved]).await, "remove moved");
    assert_eq!(check(list_peers(&sb).await, "list"), vec![]);
    let fdb = ok(&ns, &["bridge", "fdb", "show", "dev", "vxlan1"]);
    assert!(!fdb.contains("02:42:0a:00:04:09"), "{fdb}");

    // A neighbour without its FDB entry (a half-added peer) is cleaned up by remove_peers.
    ok(
        &ns,
        &[
            "ip",
            "neigh",
            "replace",
            "10.0.4.9",
            "lladdr",
            "02:42:0a:00:04:09",
            "dev",
            "vxlan1",
            "nud",
            "permanent",
        ],
    );
    check(remove_peers(&sb, &[old]).await, "remove half entry");
    assert_eq!(ok(&ns, &["ip", "neigh", "show", "dev", "vxlan1"]), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_is_idempotent_and_complete() {
    let lab = Lab::new().await;
    let name = network_name();
    let spec = lab.spec(&lab.a, &name, 4102);
    let sb = check(
        ensure_sandbox(&lab.a.handle, &lab.a.run_dir, &spec).await,
        "ensure_sandbox",
    );
    let container = check(NetNs::new_anonymous(), "container");
    let ep = endpoint(Ipv4Addr::new(10, 0, 4, 2));
    check(
        ensure_endpoint(&sb, &container, &ep).await,
        "ensure_endpoint",
    );

    for _ in 0..2 {
        check(
            remove_endpoint(&sb, &ep.host_ifname).await,
            "remove_endpoint",
        );
    }
    assert_eq!(
        check(list_endpoint_links(&sb).await, "list"),
        Vec::<String>::new()
    );
    let ns = sandbox_ns(&lab.a, &name);
    assert!(!ok(&ns, &["ip", "-o", "link", "show"]).contains("veth"));
    assert!(!run(&container, &["ip", "link", "show", "eth0"])
        .status
        .success());

    let path = sandbox_path(&lab.a.run_dir, &name);
    // `sb` (and `ns`) still hold the namespace open: removal must release the VNI anyway.
    for _ in 0..2 {
        check(
            remove_sandbox(&lab.a.run_dir, &name).await,
            "remove_sandbox",
        );
    }
    assert!(!path.exists(), "{} still exists", path.display());
    let mounts = check(std::fs::read_to_string("/proc/self/mountinfo"), "mountinfo");
    assert!(!mounts.contains(path.to_str().unwrap()), "still mounted");
    assert!(list_sandboxes(&lab.a.run_dir).is_empty());
    assert_eq!(
        udp_listeners(&lab.a.ns, PORT),
        "",
        "the VXLAN socket outlived its sandbox"
    );
    drop(sb);

    // Same name and VNI right away: nothing of the old sandbox is in the way.
    let sb = check(
        ensure_sandbox(&lab.a.handle, &lab.a.run_dir, &spec).await,
        "ensure_sandbox after removal",
    );
    assert!(sb.vxlan_created());
    check(
        remove_sandbox(&lab.a.run_dir, &name).await,
        "remove_sandbox",
    );
    check(
        remove_sandbox(&lab.a.run_dir, "1-never-made").await,
        "remove missing",
    );
}

fn batch(n: u32) -> Vec<Peer> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + i);
            Peer {
                ip,
                mac: Mac::from_ipv4(ip),
                vtep: Ipv4Addr::new(198, 51, 100, 1 + (i % 200) as u8),
            }
        })
        .collect()
}

fn count_lines(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_peers_is_programmed_and_read_back() {
    // VXNET_PEERS_BATCH=50000 measures a bigger batch by hand.
    let n: u32 = std::env::var("VXNET_PEERS_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let lab = Lab::new().await;
    let name = network_name();
    let sb: Sandbox = check(
        ensure_sandbox(
            &lab.a.handle,
            &lab.a.run_dir,
            &lab.spec(&lab.a, &name, 4103),
        )
        .await,
        "ensure_sandbox",
    );
    let ns = sandbox_ns(&lab.a, &name);
    let mut peers = batch(n);

    let started = Instant::now();
    check(add_peers(&sb, &peers).await, "add_peers");
    let took = started.elapsed();
    println!(
        "add_peers: {n} peers in {took:?} ({:.0} peers/s, {:.1} µs per netlink entry)",
        f64::from(n) / took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / f64::from(2 * n)
    );
    let started = Instant::now();
    let listed = check(list_peers(&sb).await, "list_peers");
    println!(
        "list_peers: {} peers in {:?}",
        listed.len(),
        started.elapsed()
    );
    peers.sort();
    assert_eq!(listed, peers);
    let fdb = ok(&ns, &["bridge", "fdb", "show", "dev", "vxlan1"]);
    assert_eq!(count_lines(&fdb, "self permanent"), n as usize);
    let neigh = ok(
        &ns,
        &["ip", "neigh", "show", "dev", "vxlan1", "nud", "permanent"],
    );
    assert_eq!(count_lines(&neigh, "lladdr"), n as usize);

    // Replace semantics: half the peers move to other VTEPs; nothing is duplicated.
    for p in peers.iter_mut().step_by(2) {
        p.vtep = Ipv4Addr::new(203, 0, 113, 7);
    }
    let started = Instant::now();
    check(add_peers(&sb, &peers).await, "add_peers (moves)");
    println!("add_peers (replace all {n}): {:?}", started.elapsed());
    assert_eq!(check(list_peers(&sb).await, "list_peers"), peers);
    let fdb = ok(&ns, &["bridge", "fdb", "show", "dev", "vxlan1"]);
    assert_eq!(count_lines(&fdb, "self permanent"), n as usize);
    assert_eq!(count_lines(&fdb, "dst 203.0.113.7"), n as usize / 2);

    let started = Instant::now();
    check(remove_peers(&sb, &peers).await, "remove_peers");
    println!("remove_peers: {n} peers in {:?}", started.elapsed());
    assert_eq!(check(list_peers(&sb).await, "list_peers"), vec![]);
    let fdb = ok(&ns, &["bridge", "fdb", "show", "dev", "vxlan1"]);
    assert_eq!(count_lines(&fdb, "self permanent"), 0, "{fdb}");
    assert_eq!(ok(&ns, &["ip", "neigh", "show", "dev", "vxlan1"]), "");
}
