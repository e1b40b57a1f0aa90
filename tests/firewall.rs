//! The `inet vxnet` nftables table, programmed over netlink, checked with `nft` as the oracle
//! and with real TCP traffic between namespaces. Everything happens in anonymous network
//! namespaces made by each test (gone when their fds close, pass or fail): nothing is added to
//! the machine's own namespace.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::time::{Duration, Instant};

use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};
use vxnet::firewall::{Firewall, FirewallError, Nftables, PortMapping, Proto, Ruleset};
use vxnet::netns::NetNs;

fn check<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Runs a program inside `ns`; panics with its output if it fails. Returns stdout.
fn run(ns: &NetNs, argv: &[&str]) -> String {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    check(ns.command(&mut cmd), "setns for a command");
    let out = check(cmd.output(), argv[0]);
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip …` inside `ns`, one command per line.
fn ip(ns: &NetNs, script: &str) {
    for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let argv: Vec<&str> = std::iter::once("ip")
            .chain(line.split_whitespace())
            .collect();
        run(ns, &argv);
    }
}

fn nft(ns: &NetNs, args: &str) -> String {
    let argv: Vec<&str> = std::iter::once("nft")
        .chain(args.split_whitespace())
        .collect();
    run(ns, &argv)
}

fn apply(ns: &NetNs, rs: &Ruleset) -> Result<(), FirewallError> {
    let rs = rs.clone();
    check(ns.run(move || Ok(Nftables.apply(&rs))), "apply thread")
}

fn remove(ns: &NetNs) -> Result<(), FirewallError> {
    check(ns.run(|| Ok(Nftables.remove())), "remove thread")
}

fn tcp(host_port: u16, ip: [u8; 4], container_port: u16) -> PortMapping {
    PortMapping {
        proto: Proto::Tcp,
        host_port,
        container_ip: Ipv4Addr::from(ip),
        container_port,
    }
}

fn ruleset(bridge: &str, ports: Vec<PortMapping>) -> Ruleset {
    Ruleset {
        bridge: bridge.to_string(),
        subnet: "172.18.0.0/16".parse().unwrap(),
        ports,
        vxlan_port: 4789,
        vteps: vec![Ipv4Addr::new(192, 0, 2, 5), Ipv4Addr::new(192, 0, 2, 6)],
        store: vec!["192.0.2.5:2379".parse().unwrap()],
        host_services: vec![],
    }
}

/// A fresh namespace with `lo` up.
fn netns(what: &str) -> NetNs {
    let ns = check(NetNs::new_anonymous(), what);
    ip(&ns, "link set lo up");
    ns
}

#[test]
fn apply_installs_the_table_and_replaces_it_whole() {
    let ns = netns("scratch");
    // Someone else's table, which vxnet must never touch.
    nft(&ns, "add table ip other");
    nft(
        &ns,
        "add chain ip other c { type filter hook input priority 0 ; }",
    );
    nft(&ns, "add rule ip other c tcp dport 22 accept");
    let other = nft(&ns, "list table ip other");

    let rs = ruleset(
        "vxnet_gwbridge",
        vec![
            tcp(8080, [172, 18, 0, 2], 80),
            PortMapping {
                proto: Proto::Udp,
                host_port: 5353,
                container_ip: Ipv4Addr::new(172, 18, 0, 3),
                container_port: 53,
            },
            tcp(8443, [172, 18, 0, 3], 443),
        ],
    );
    check(apply(&ns, &rs), "apply");
    // nft 1.0.6 (Debian 12) prints the output hook's dstnat priority as its number.
    let table = nft(&ns, "list table inet vxnet")
        .replace("hook output priority -100;", "hook output priority dstnat;");
    println!("{table}");
    let expected = "\
table inet vxnet {
	set vteps {
		type ipv4_addr
		elements = { 192.0.2.5, 192.0.2.6 }
	}

	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 172.18.0.0/16 oifname != \"vxnet_gwbridge\" masquerade
	}

	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local tcp dport 8080 dnat ip to 172.18.0.2:80
		fib daddr type local tcp dport 8443 dnat ip to 172.18.0.3:443
		fib daddr type local udp dport 5353 dnat ip to 172.18.0.3:53
	}

	chain output {
		type nat hook output priority dstnat; policy accept;
		ip daddr != 127.0.0.0/8 fib daddr type local tcp dport 8080 dnat ip to 172.18.0.2:80
		ip daddr != 127.0.0.0/8 fib daddr type local tcp dport 8443 dnat ip to 172.18.0.3:443
		ip daddr != 127.0.0.0/8 fib daddr type local udp dport 5353 dnat ip to 172.18.0.3:53
	}

	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname \"vxnet_gwbridge\" oifname \"vxnet_gwbridge\" drop
		udp dport 4789 drop
		ip daddr 192.0.2.5 tcp dport 2379 drop
		ip daddr 192.0.2.5 tcp dport 2380 drop
		oifname \"vxnet_gwbridge\" ct state established,related accept
		oifname \"vxnet_gwbridge\" ct status dnat accept
		oifname \"vxnet_gwbridge\" drop
	}

	chain input {
		type filter hook input priority filter; policy accept;
		udp dport 4789 ip saddr != @vteps counter packets 0 bytes 0 drop
		iifname \"vxnet_gwbridge\" udp dport 4789 drop
		iifname \"vxnet_gwbridge\" ip daddr 192.0.2.5 tcp dport 2379 drop
		iifname \"vxnet_gwbridge\" ip daddr 192.0.2.5 tcp dport 2380 drop
		iifname \"docker_gwbridge\" udp dport 4789 drop
		iifname \"docker_gwbridge\" ip daddr 192.0.2.5 tcp dport 2379 drop
		iifname \"docker_gwbridge\" ip daddr 192.0.2.5 tcp dport 2380 drop
	}
}
";
    assert_eq!(table, expected);

    // Again: byte-identical, nothing duplicated.
    let before = nft(&ns, "list ruleset");
    check(apply(&ns, &rs), "apply again");
    assert_eq!(nft(&ns, "list ruleset"), before);

    // One port fewer: exactly that rule goes, in both chains.
    let mut fewer = rs.clone();
    fewer.ports.remove(2);
    check(apply(&ns, &fewer), "apply with one port fewer");
    let now = nft(&ns, "list table inet vxnet")
        .replace("hook output priority -100;", "hook output priority dstnat;");
    let gone: Vec<&str> = expected
        .lines()
        .filter(|l| !now.lines().any(|n| n == *l))
        .collect();
    assert_eq!(
        gone,
        vec![
            "\t\tfib daddr type local tcp dport 8443 dnat ip to 172.18.0.3:443",
            "\t\tip daddr != 127.0.0.0/8 fib daddr type local tcp dport 8443 dnat ip to 172.18.0.3:443",
        ],
        "{now}"
    );
    assert_eq!(now.lines().count(), expected.lines().count() - 2);

    // Removed, twice; the foreign table stays as it was throughout.
    assert_eq!(nft(&ns, "list table ip other"), other);
    check(remove(&ns), "remove");
    check(remove(&ns), "remove again");
    let all = nft(&ns, "list ruleset");
    assert!(!all.contains("vxnet"), "{all}");
    assert_eq!(nft(&ns, "list table ip other"), other);
    assert_eq!(all, other, "only the foreign table is left");
}

#[test]
fn remove_without_a_table_and_apply_after_remove() {
    let ns = netns("scratch");
    check(remove(&ns), "remove with nothing there");
    assert_eq!(nft(&ns, "list ruleset"), "");
    let rs = ruleset("br-x", vec![]);
    check(apply(&ns, &rs), "apply");
    let table = nft(&ns, "list table inet vxnet");
    assert!(table.contains("oifname != \"br-x\" masquerade"), "{table}");
    assert!(!table.contains("dnat ip to"), "{table}");
    check(remove(&ns), "remove");
    assert_eq!(nft(&ns, "list ruleset"), "");
}

#[test]
fn invalid_rulesets_change_nothing() {
    let ns = netns("scratch");
    let good = ruleset("br0", vec![tcp(80, [172, 18, 0, 2], 80)]);
    check(apply(&ns, &good), "apply");
    let before = nft(&ns, "list ruleset");
    let twice = ruleset(
        "br0",
        vec![tcp(80, [172, 18, 0, 2], 80), tcp(80, [172, 18, 0, 3], 80)],
    );
    let e = apply(&ns, &twice).expect_err("a host port published twice");
    assert!(matches!(e, FirewallError::InvalidRuleset { .. }), "{e}");
    let long = ruleset("a_much_too_long_name", vec![]);
    assert!(apply(&ns, &long).is_err());
    assert_eq!(nft(&ns, "list ruleset"), before);
}

#[test]
fn large_rulesets_go_in_one_batch() {
    let ns = netns("scratch");
    for n in [0usize, 100, 2000] {
        let ports = (0..n)
            .map(|i| {
                tcp(
                    10000 + i as u16,
                    [172, 18, (i / 250) as u8, (i % 250) as u8 + 2],
                    80,
                )
            })
            .collect();
        let rs = ruleset("vxnet_gwbridge", ports);
        // First apply, then the replacing one (the table is there).
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            check(apply(&ns, &rs), "apply");
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "apply with {n} port mappings: min {:?} median {:?} max {:?}",
            times[0], times[2], times[4]
        );
        let listed = nft(&ns, "list table inet vxnet");
        assert_eq!(listed.matches("dnat ip to").count(), 2 * n);
    }
    check(remove(&ns), "remove");
}

// ---- behaviour: real traffic between namespaces ----

const BRIDGE: &str = "gw0";
const HOST_OUT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const C1: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const C2: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);

/// A veth pair: `a_name` in `a`, `b_name` created directly in `b`.
async fn veth(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) {
    let h = check(a.netlink(), "netlink");
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(b_name.to_string())
        .setns_by_fd(b.as_fd().as_raw_fd())
        .build();
    let link = LinkVeth::new(a_name, b_name)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    check(h.link().add(link).execute().await, "veth");
}

/// host: bridge gw0 (172.18.0.1/16) with one container per address in `containers` on it,
/// and ext0 (203.0.113.254/24) towards an "outside" namespace (203.0.113.1/24, no route to
/// 172.18/16). ip_forward is 1 in the host namespace only.
struct Topology {
    host: NetNs,
    outside: NetNs,
    containers: Vec<NetNs>,
}

fn topology(containers: &[Ipv4Addr]) -> Topology {
    let host = netns("host");
    let outside = netns("outside");
    let containers: Vec<NetNs> = containers.iter().map(|_| netns("container")).collect();
    let rt = check(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        "runtime",
    );
    rt.block_on(async {
        veth(&host, "ext0", &outside, "eth0").await;
        for (i, c) in containers.iter().enumerate() {
            veth(&host, &format!("c{i}"), c, "eth0").await;
        }
    });
    ip(
        &host,
        &format!(
            "link add {BRIDGE} type bridge
             addr add 172.18.0.1/16 dev {BRIDGE}
             link set {BRIDGE} up
             addr add {HOST_OUT}/24 dev ext0
             link set ext0 up"
        ),
    );
    for (i, (c, addr)) in containers.iter().zip(ADDRS.iter()).enumerate() {
        ip(&host, &format!("link set c{i} master {BRIDGE} up"));
        ip(
            c,
            &format!(
                "addr add {addr}/16 dev eth0
                 link set eth0 up
                 route add default via 172.18.0.1"
            ),
        );
    }
    ip(
        &outside,
        &format!("addr add {OUTSIDE}/24 dev eth0\nlink set eth0 up"),
    );
    run(&host, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    assert_eq!(
        run(&host, &["sysctl", "-n", "net.ipv4.ip_forward"]).trim(),
        "1"
    );
    Topology {
        host,
        outside,
        containers,
    }
}

const ADDRS: [Ipv4Addr; 2] = [C1, C2];

fn listen(ns: &NetNs, addr: SocketAddr) -> TcpListener {
    let l = check(ns.run(move || TcpListener::bind(addr)), "listen");
    check(l.set_nonblocking(true), "nonblocking");
    l
}

/// Connects from inside `ns`; the stream keeps working from any thread.
fn connect(ns: &NetNs, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    ns.run(move || TcpStream::connect_timeout(&to, timeout))
}

/// The connection `connect` just established (it is in the backlog already): its peer,
/// after a byte each way.
fn accept(l: &TcpListener, mut client: TcpStream) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut server, peer) = loop {
        match l.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    check(server.set_nonblocking(false), "blocking");
    check(
        server.set_read_timeout(Some(Duration::from_secs(5))),
        "timeout",
    );
    check(
        client.set_read_timeout(Some(Duration::from_secs(5))),
        "timeout",
    );
    check(client.write_all(b"q"), "client write");
    let mut b = [0u8; 1];
    check(server.read_exact(&mut b), "server read");
    check(server.write_all(b"a"), "server write");
    check(client.read_exact(&mut b), "client read");
    assert_eq!(&b, b"a");
    peer
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn masquerade_and_published_ports_carry_traffic() {
    let t = topology(&[C1]);
    let c = &t.containers[0];
    let out_listener = listen(&t.outside, sa(OUTSIDE, 7000));
    let c_listener = listen(c, sa(Ipv4Addr::UNSPECIFIED, 80));

    // Without the table: the outside has no route back to 172.18/16, and port 8080 on the
    // host is closed.
    let short = Duration::from_millis(700);
    assert!(connect(c, sa(OUTSIDE, 7000), short).is_err());
    assert!(connect(&t.outside, sa(HOST_OUT, 8080), short).is_err());

    let rs = ruleset(BRIDGE, vec![tcp(8080, C1.octets(), 80)]);
    check(apply(&t.host, &rs), "apply");

    // Container -> outside: masqueraded to the host's outside-facing address.
    let long = Duration::from_secs(5);
    let s = check(connect(c, sa(OUTSIDE, 7000), long), "container -> outside");
    let peer = accept(&out_listener, s);
    assert_eq!(peer.ip(), HOST_OUT, "the outside sees the host's address");

    // Outside -> host:8080 -> container:80 (prerouting), source kept.
    let s = check(
        connect(&t.outside, sa(HOST_OUT, 8080), long),
        "outside -> published port",
    );
    let peer = accept(&c_listener, s);
    assert_eq!(peer.ip(), OUTSIDE, "the container sees the real client");

    // The host itself -> its own address:8080 -> container:80 (output).
    let s = check(
        connect(&t.host, sa(HOST_OUT, 8080), long),
        "host -> published port",
    );
    let peer = accept(&c_listener, s);
    assert_eq!(peer.ip(), HOST_OUT);

    // Unpublished: closed again.
    check(
        apply(&t.host, &ruleset(BRIDGE, vec![])),
        "apply without ports",
    );
    assert!(connect(&t.outside, sa(HOST_OUT, 8080), short).is_err());
    check(remove(&t.host), "remove");
}

fn bridge_nf_call_iptables(ns: &NetNs) -> bool {
    check(
        ns.run(|| {
            Ok(
                std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
                    .map(|v| v.trim() == "1")
                    .unwrap_or(false),
            )
        }),
        "read bridge-nf-call-iptables",
    )
}

fn ping(from: &NetNs, to: Ipv4Addr) -> bool {
    let mut cmd = Command::new("ping");
    cmd.args(["-c", "1", "-W", "1", &to.to_string()]);
    check(from.command(&mut cmd), "setns for ping");
    check(cmd.output(), "ping").status.success()
}

#[test]
fn containers_on_the_bridge_cannot_reach_each_other() {
    let t = topology(&[C1, C2]);
    let (c1, c2) = (&t.containers[0], &t.containers[1]);
    if !bridge_nf_call_iptables(&t.host) {
        println!(
            "SKIPPED: bridged traffic does not traverse the forward hook here \
             (net.bridge.bridge-nf-call-iptables is not 1)"
        );
        return;
    }
    let l2 = listen(c2, sa(C2, 80));
    // Without the table they can.
    assert!(ping(c1, C2), "ping before apply");
    let s = check(connect(c1, sa(C2, 80), Duration::from_secs(5)), "c1 -> c2");
    accept(&l2, s);

    check(apply(&t.host, &ruleset(BRIDGE, vec![])), "apply");
    assert!(!ping(c1, C2), "ping c1 -> c2 must be dropped");
    let r = connect(c1, sa(C2, 80), Duration::from_millis(700));
    assert!(r.is_err(), "tcp c1 -> c2 must be dropped");
    // They still reach the gateway (input, not forward).
    assert!(ping(c1, Ipv4Addr::new(172, 18, 0, 1)), "ping the gateway");

    check(remove(&t.host), "remove");
    assert!(ping(c1, C2), "ping after remove");
}
