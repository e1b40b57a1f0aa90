//! The gateway bridge (Docker's `docker_gwbridge`) against the real kernel.
//!
//! A simulated host is an anonymous network namespace (its netlink handle is the `host`
//! handle the library gets); containers are further anonymous namespaces. Nothing is made
//! in the machine's root namespace: no interface, route or sysctl. Anonymous namespaces
//! vanish with their last file descriptor, so a failing test leaves nothing behind; the one
//! sandbox (test 3) is bind-mounted under a scratch dir that a guard unmounts. `ip`,
//! `bridge` and `ping`, run inside the namespaces, are the independent oracle.

#[path = "support/oracle.rs"]
mod oracle;

use std::net::Ipv4Addr;
use std::time::Instant;

use ipnet::Ipv4Net;
use oracle::{assert_same, check, eventually_pings, json, ok, pings, run};
use rtnetlink::{Handle, LinkVeth};
use serde_json::{json, Value};
use vxnet::dataplane::{
    enable_ipv4_forwarding, ensure_endpoint, ensure_gateway_bridge, ensure_gateway_endpoint,
    ensure_sandbox, find_underlay, list_sandboxes, remove_gateway_bridge, remove_gateway_endpoint,
    sandbox_path, DataplaneError, EndpointSpec, GatewayBridgeSpec, GatewayEndpointSpec,
    SandboxSpec,
};
use vxnet::lab::process::ScratchDir;
use vxnet::model::Mac;
use vxnet::netns::NetNs;

const BRIDGE: &str = "vxnet_gwbridge";
const GW: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);

fn bridge_spec() -> GatewayBridgeSpec {
    GatewayBridgeSpec {
        name: BRIDGE.into(),
        address: Ipv4Net::new(GW, 16).unwrap(),
        mtu: 1500,
    }
}

fn gw_endpoint(ip: Ipv4Addr) -> GatewayEndpointSpec {
    GatewayEndpointSpec {
        host_ifname: format!("gw{:07x}", rand::random::<u32>() & 0xfff_ffff),
        container_ifname: "eth1".into(),
        address: Ipv4Net::new(ip, 16).unwrap(),
        mac: Mac::from_ipv4(ip),
        mtu: 1500,
        default_gateway: GW,
    }
}

/// A simulated host: its namespace and a netlink handle inside it.
struct Host {
    ns: NetNs,
    handle: Handle,
}

impl Host {
    async fn new() -> Host {
        let ns = check(NetNs::new_anonymous(), "host namespace");
        let handle = check(ns.netlink(), "host netlink");
        check(vxnet::netns::set_link_up(&handle, "lo").await, "lo up");
        Host { ns, handle }
    }
}

fn container() -> NetNs {
    check(NetNs::new_anonymous(), "container namespace")
}

// The oracle: iproute2 run inside a namespace.

/// The settings that matter, per link, as `ip -d -j link` / `ip -j addr` report them
/// (indexes kept: equal indexes mean nothing was re-created), plus the IPv4 routes.
fn snapshot(ns: &NetNs) -> Value {
    let links = json(ns, &["ip", "-d", "-j", "link", "show"]);
    let addrs = json(ns, &["ip", "-4", "-j", "addr", "show"]);
    let routes = json(ns, &["ip", "-4", "-j", "route", "show"]);
    let mut out = serde_json::Map::new();
    for l in links.as_array().unwrap() {
        let mut flags: Vec<String> = l["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            // Carrier follows the admin state asynchronously: configuration only.
            .filter(|f| f != "NO-CARRIER" && f != "LOWER_UP")
            .collect();
        flags.sort();
        let addr: Vec<String> = addrs
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["ifname"] == l["ifname"])
            .flat_map(|a| a["addr_info"].as_array().unwrap().clone())
            .map(|i| format!("{}/{}", i["local"].as_str().unwrap(), i["prefixlen"]))
            .collect();
        out.insert(
            l["ifname"].as_str().unwrap().to_string(),
            json!({
                "ifindex": l["ifindex"], "mtu": l["mtu"], "flags": flags,
                "master": l["master"], "address": l["address"],
                "kind": l["linkinfo"]["info_kind"],
                "isolated": l["linkinfo"]["info_slave_data"]["isolated"],
                "addrs": addr,
            }),
        );
    }
    out.insert("routes".into(), routes);
    Value::Object(out)
}

fn routes(ns: &NetNs) -> Vec<String> {
    ok(ns, &["ip", "-4", "route", "show"])
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

/// The container's default routes, each as "default via GW dev IF" (protocol and metric
/// left out).
fn defaults(r: &[String]) -> Vec<String> {
    r.iter()
        .filter(|l| l.starts_with("default"))
        .map(|l| l.split(" proto").next().unwrap_or(l).to_string())
        .collect()
}

fn bridge_port(ns: &NetNs, dev: &str) -> String {
    ok(ns, &["bridge", "-d", "link", "show", "dev", dev])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_is_built_idempotent_and_repaired() {
    let host = Host::new().await;
    let spec = bridge_spec();
    let started = Instant::now();
    let index = check(ensure_gateway_bridge(&host.handle, &spec).await, "ensure");
    println!("ensure_gateway_bridge (create): {:?}", started.elapsed());

    let before = snapshot(&host.ns);
    println!("{before:#}");
    let br = &before[BRIDGE];
    assert_eq!(br["kind"], "bridge");
    assert_eq!(br["ifindex"], index);
    assert_eq!(br["address"], "02:42:ac:12:00:01");
    assert_eq!(br["mtu"], 1500);
    assert_eq!(br["addrs"], json!(["172.18.0.1/16"]));
    assert!(br["flags"].as_array().unwrap().contains(&json!("UP")));

    for round in 0..2 {
        let started = Instant::now();
        let again = check(ensure_gateway_bridge(&host.handle, &spec).await, "again");
        println!("ensure_gateway_bridge (existing): {:?}", started.elapsed());
        assert_eq!(again, index);
        assert_same(&before, &snapshot(&host.ns), &format!("round {round}"));
    }

    // Drift by hand: down, address gone, a foreign address, wrong MTU, wrong MAC.
    for cmd in [
        vec!["ip", "link", "set", BRIDGE, "down"],
        vec!["ip", "addr", "flush", "dev", BRIDGE],
        vec!["ip", "addr", "add", "10.9.9.9/24", "dev", BRIDGE],
        vec!["ip", "link", "set", BRIDGE, "mtu", "1400"],
        vec!["ip", "link", "set", BRIDGE, "address", "02:00:00:00:00:99"],
    ] {
        ok(&host.ns, &cmd);
    }
    assert_ne!(snapshot(&host.ns), before);
    let again = check(ensure_gateway_bridge(&host.handle, &spec).await, "repair");
    assert_eq!(again, index, "repaired in place, not re-created");
    assert_same(&before, &snapshot(&host.ns), "after repair");

    // Only an address drifted: just that is fixed.
    ok(
        &host.ns,
        &["ip", "addr", "del", "172.18.0.1/16", "dev", BRIDGE],
    );
    check(ensure_gateway_bridge(&host.handle, &spec).await, "re-add");
    assert_same(&before, &snapshot(&host.ns), "after the address came back");

    // The host namespace is not all ours: another device under the name is reported.
    let other = Host::new().await;
    check(
        other
            .handle
            .link()
            .add(LinkVeth::new(BRIDGE, "spare0").build())
            .execute()
            .await,
        "foreign device",
    );
    let err = ensure_gateway_bridge(&other.handle, &spec)
        .await
        .unwrap_err();
    println!("foreign device: {err}");
    assert!(matches!(err, DataplaneError::NameTaken { .. }), "{err}");
    let err = remove_gateway_bridge(&other.handle, BRIDGE)
        .await
        .unwrap_err();
    assert!(matches!(err, DataplaneError::NameTaken { .. }), "{err}");
    assert!(ok(&other.ns, &["ip", "-d", "link", "show", BRIDGE]).contains("veth"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_reach_the_gateway_but_not_each_other() {
    let host = Host::new().await;
    let bridge = check(
        ensure_gateway_bridge(&host.handle, &bridge_spec()).await,
        "bridge",
    );
    let (ip1, ip2) = (Ipv4Addr::new(172, 18, 0, 2), Ipv4Addr::new(172, 18, 0, 3));
    let (c1, c2) = (container(), container());
    let (ep1, ep2) = (gw_endpoint(ip1), gw_endpoint(ip2));
    for (c, ep) in [(&c1, &ep1), (&c2, &ep2)] {
        let started = Instant::now();
        check(
            ensure_gateway_endpoint(&host.handle, bridge, c, ep).await,
            "ensure_gateway_endpoint",
        );
        println!("ensure_gateway_endpoint (create): {:?}", started.elapsed());
    }

    for (c, ep, ip) in [(&c1, &ep1, ip1), (&c2, &ep2, ip2)] {
        let snap = snapshot(c);
        let eth1 = &snap["eth1"];
        assert_eq!(eth1["kind"], "veth");
        assert_eq!(eth1["address"], Mac::from_ipv4(ip).to_string());
        assert_eq!(eth1["mtu"], 1500);
        assert_eq!(eth1["addrs"], json!([format!("{ip}/16")]));
        assert!(eth1["flags"].as_array().unwrap().contains(&json!("UP")));
        let r = routes(c);
        assert_eq!(defaults(&r), ["default via 172.18.0.1 dev eth1"], "{r:?}");
        let port = &snapshot(&host.ns)[&ep.host_ifname];
        assert_eq!(port["master"], BRIDGE);
        assert_eq!(port["mtu"], 1500);
        assert_eq!(port["isolated"], true);
        let shown = bridge_port(&host.ns, &ep.host_ifname);
        assert!(shown.contains("isolated on"), "{shown}");
    }

    assert!(eventually_pings(&c1, GW), "c1 cannot reach the gateway");
    assert!(eventually_pings(&c2, GW), "c2 cannot reach the gateway");
    assert!(!pings(&c1, ip2), "isolated ports: c1 reached c2");
    assert!(!pings(&c2, ip1), "isolated ports: c2 reached c1");

    // Twice changes nothing, in the host or the containers.
    let before = (snapshot(&host.ns), snapshot(&c1), snapshot(&c2));
    for (c, ep) in [(&c1, &ep1), (&c2, &ep2)] {
        let started = Instant::now();
        check(
            ensure_gateway_endpoint(&host.handle, bridge, c, ep).await,
            "again",
        );
        println!(
            "ensure_gateway_endpoint (existing): {:?}",
            started.elapsed()
        );
    }
    assert_same(&before.0, &snapshot(&host.ns), "host");
    assert_same(&before.1, &snapshot(&c1), "c1");
    assert_same(&before.2, &snapshot(&c2), "c2");

    // The isolation is what keeps them apart: without it they do reach each other (so the
    // checks above can fail) ...
    for ep in [&ep1, &ep2] {
        ok(
            &host.ns,
            &[
                "bridge",
                "link",
                "set",
                "dev",
                &ep.host_ifname,
                "isolated",
                "off",
            ],
        );
        assert!(bridge_port(&host.ns, &ep.host_ifname).contains("isolated off"));
    }
    assert!(
        eventually_pings(&c1, ip2),
        "c1 cannot reach c2 even unisolated"
    );
    // ... and ensure puts it back.
    for (c, ep) in [(&c1, &ep1), (&c2, &ep2)] {
        check(
            ensure_gateway_endpoint(&host.handle, bridge, c, ep).await,
            "re-isolate",
        );
    }
    assert_same(&before.0, &snapshot(&host.ns), "host after re-isolating");
    assert!(!pings(&c1, ip2), "c1 reached c2 after re-isolating");

    // Partial state: detached from the bridge (which drops the port's settings), down,
    // address and default route gone, wrong MAC and MTU: repaired in place.
    let veth = ep1.host_ifname.as_str();
    ok(&host.ns, &["ip", "link", "set", veth, "nomaster"]);
    ok(&host.ns, &["ip", "link", "set", veth, "down"]);
    for cmd in [
        vec!["ip", "route", "del", "default"],
        vec!["ip", "addr", "flush", "dev", "eth1"],
        vec!["ip", "link", "set", "eth1", "down"],
        vec!["ip", "link", "set", "eth1", "address", "02:42:01:02:03:04"],
        vec!["ip", "link", "set", "eth1", "mtu", "1400"],
    ] {
        ok(&c1, &cmd);
    }
    assert_ne!(snapshot(&c1), before.1);
    check(
        ensure_gateway_endpoint(&host.handle, bridge, &c1, &ep1).await,
        "repair",
    );
    assert_same(&before.0, &snapshot(&host.ns), "host after repair");
    assert_same(&before.1, &snapshot(&c1), "c1 after repair");
    assert!(!pings(&c1, ip2), "c1 reached c2 after repair");
    assert!(
        eventually_pings(&c1, GW),
        "c1 lost the gateway after repair"
    );

    // eth1 deleted by hand (its host end goes with it): re-created.
    ok(&c2, &["ip", "link", "del", "eth1"]);
    check(
        ensure_gateway_endpoint(&host.handle, bridge, &c2, &ep2).await,
        "re-create",
    );
    let r = routes(&c2);
    assert_eq!(defaults(&r), ["default via 172.18.0.1 dev eth1"], "{r:?}");
    assert!(bridge_port(&host.ns, &ep2.host_ifname).contains("isolated on"));

    // A gateway outside the endpoint's subnet is refused before anything is made.
    let mut bad = gw_endpoint(Ipv4Addr::new(172, 18, 0, 9));
    bad.default_gateway = Ipv4Addr::new(10, 0, 0, 1);
    let c3 = container();
    let err = ensure_gateway_endpoint(&host.handle, bridge, &c3, &bad)
        .await
        .unwrap_err();
    assert!(matches!(err, DataplaneError::InvalidSpec { .. }), "{err}");
    assert!(!ok(&host.ns, &["ip", "-o", "link"]).contains(&bad.host_ifname));
}

/// Unmounts the sandbox left under the run dir (success or panic) before the scratch dir
/// itself is removed.
struct RunDirGuard {
    dir: ScratchDir,
}

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        for name in list_sandboxes(self.dir.path()) {
            let _ = NetNs::remove_named(&sandbox_path(self.dir.path(), &name));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_eth0_hands_the_default_route_to_eth1() {
    let guard = RunDirGuard {
        dir: check(ScratchDir::new("vxnet-gateway"), "scratch dir"),
    };
    let host = Host::new().await;
    // An underlay for the sandbox's vxlan1: a veth with both ends in the host.
    check(
        host.handle
            .link()
            .add(LinkVeth::new("ul0", "ul1").mtu(1500).build())
            .execute()
            .await,
        "underlay veth",
    );
    ok(
        &host.ns,
        &["ip", "addr", "add", "192.0.2.1/24", "dev", "ul0"],
    );
    ok(&host.ns, &["ip", "link", "set", "ul0", "up"]);
    let underlay = check(
        find_underlay(&host.handle, Ipv4Addr::new(192, 0, 2, 1)).await,
        "underlay",
    );
    let sb = check(
        ensure_sandbox(
            &host.handle,
            guard.dir.path(),
            &SandboxSpec {
                name: "1-0123456789".into(),
                vni: 4200,
                gateway: "10.0.4.1/24".parse().unwrap(),
                mtu: 1450,
                vxlan_port: 4789,
                underlay,
                service_address: None,
            },
        )
        .await,
        "ensure_sandbox",
    );
    let bridge = check(
        ensure_gateway_bridge(&host.handle, &bridge_spec()).await,
        "bridge",
    );

    let c = container();
    let ip = Ipv4Addr::new(10, 0, 4, 2);
    let mut eth0 = EndpointSpec {
        host_ifname: format!("veth{:07x}", rand::random::<u32>() & 0xfff_ffff),
        container_ifname: "eth0".into(),
        address: Ipv4Net::new(ip, 24).unwrap(),
        mac: Mac::from_ipv4(ip),
        mtu: 1450,
        default_gateway: None,
        host_route: None,
    };
    // With no gateway, eth0 gets no default route.
    check(
        ensure_endpoint(&sb, &c, &eth0).await,
        "eth0 without gateway",
    );
    let r = routes(&c);
    assert!(!r.iter().any(|l| l.starts_with("default")), "{r:?}");

    // An overlay with a gateway: eth0 holds the default route ...
    eth0.default_gateway = Some(Ipv4Addr::new(10, 0, 4, 1));
    check(ensure_endpoint(&sb, &c, &eth0).await, "eth0 with gateway");
    let r = routes(&c);
    assert_eq!(defaults(&r), ["default via 10.0.4.1 dev eth0"], "{r:?}");
    // ... until eth1 arrives and takes it over (replaced, not added next to it).
    let eth1 = gw_endpoint(Ipv4Addr::new(172, 18, 0, 2));
    check(
        ensure_gateway_endpoint(&host.handle, bridge, &c, &eth1).await,
        "eth1",
    );
    let r = routes(&c);
    assert_eq!(defaults(&r), ["default via 172.18.0.1 dev eth1"], "{r:?}");

    // eth0 with no gateway removes a default route of its own (here a second one left with
    // another metric) and leaves eth1's alone.
    ok(
        &c,
        &[
            "ip", "route", "add", "default", "via", "10.0.4.1", "dev", "eth0", "metric", "100",
        ],
    );
    eth0.default_gateway = None;
    for _ in 0..2 {
        check(ensure_endpoint(&sb, &c, &eth0).await, "eth0 handing over");
    }
    let r = routes(&c);
    println!("container routes: {r:#?}");
    assert_eq!(defaults(&r), ["default via 172.18.0.1 dev eth1"], "{r:?}");
    let on_eth0: Vec<&String> = r.iter().filter(|l| l.contains("dev eth0")).collect();
    assert_eq!(on_eth0.len(), 1, "{r:?}");
    assert!(
        on_eth0[0].starts_with("10.0.4.0/24 dev eth0 proto kernel scope link src 10.0.4.2"),
        "{r:?}"
    );
    assert!(
        r.iter()
            .any(|l| l.starts_with("172.18.0.0/16 dev eth1 proto kernel scope link src 172.18.0.2")),
        "{r:?}"
    );
    // Both paths work: the overlay's gateway over eth0, the gateway bridge over eth1.
    assert!(eventually_pings(&c, Ipv4Addr::new(10, 0, 4, 1)));
    assert!(eventually_pings(&c, GW));
    drop(sb);
}

fn read_ip_forward() -> String {
    check(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward"),
        "read ip_forward",
    )
    .trim()
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_is_idempotent_and_forwarding_stays_in_its_namespace() {
    let host = Host::new().await;
    let bridge = check(
        ensure_gateway_bridge(&host.handle, &bridge_spec()).await,
        "bridge",
    );
    let c = container();
    let ep = gw_endpoint(Ipv4Addr::new(172, 18, 0, 2));
    check(
        ensure_gateway_endpoint(&host.handle, bridge, &c, &ep).await,
        "endpoint",
    );
    for _ in 0..2 {
        check(
            remove_gateway_endpoint(&host.handle, &ep.host_ifname).await,
            "remove_gateway_endpoint",
        );
    }
    let links = ok(&host.ns, &["ip", "-o", "link"]);
    assert!(!links.contains(&ep.host_ifname), "{links}");
    assert!(!run(&c, &["ip", "link", "show", "eth1"]).status.success());
    assert_eq!(ok(&c, &["ip", "-4", "route", "show"]), "");

    for _ in 0..2 {
        check(
            remove_gateway_bridge(&host.handle, BRIDGE).await,
            "remove_gateway_bridge",
        );
    }
    let names: Vec<String> = json(&host.ns, &["ip", "-j", "link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["lo"]);
    assert_eq!(
        ok(&host.ns, &["ip", "-4", "addr", "show", "scope", "global"]),
        ""
    );

    // A device that is not a veth under an endpoint's name is not ours to delete.
    ok(
        &host.ns,
        &["ip", "link", "add", "gw0000000", "type", "bridge"],
    );
    let err = remove_gateway_endpoint(&host.handle, "gw0000000")
        .await
        .unwrap_err();
    assert!(matches!(err, DataplaneError::NameTaken { .. }), "{err}");

    // Forwarding: flipped in the host namespace (read back inside it, by another process),
    // never in the test process's own namespace.
    let own_before = read_ip_forward();
    // A new namespace may inherit the machine's value (devconf_inherit_init_net): start from 0.
    check(
        host.ns
            .run(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "0\n")),
        "reset ip_forward in the host namespace",
    );
    assert_eq!(
        ok(&host.ns, &["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
        "0"
    );
    let changed = check(host.ns.run(enable_ipv4_forwarding), "enable");
    assert!(changed);
    assert_eq!(
        ok(&host.ns, &["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
        "1"
    );
    assert!(!check(host.ns.run(enable_ipv4_forwarding), "enable again"));
    assert_eq!(
        ok(&host.ns, &["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
        "1"
    );
    assert_eq!(
        read_ip_forward(),
        own_before,
        "the test's own namespace changed"
    );
    // Another namespace made from the same (unchanged) parent is untouched too.
    let other = container();
    assert_eq!(
        ok(&other, &["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
        own_before
    );
}
