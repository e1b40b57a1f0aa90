//! Trust boundaries, attacked from inside the lab: what a container (or the outside world)
//! tries against the tunnel, the control plane and unpublished ports, and what the host
//! firewall makes of it. Each case prints `HOSTILE|case|outcome` for docs/security.md.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::Duration;

use common::{tcp_echo_peer, tcp_fetch, wait_until, TestLab};
use vxnet::netns::NetNs;

const VM1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 5);
const VM3: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const ETCD_CLIENT_PORT: u16 = vxnet::lab::etcd::CLIENT_PORT;

fn nft_table(lab: &TestLab, host: &str) -> String {
    let out = lab.sh(host, &["nft", "list", "table", "inet", "vxnet"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The packet count of the input chain's VTEP filter rule.
fn vtep_drops(lab: &TestLab, host: &str) -> u64 {
    let table = nft_table(lab, host);
    let line = table
        .lines()
        .find(|l| l.contains("@vteps"))
        .unwrap_or_else(|| panic!("no VTEP filter rule in:\n{table}"));
    let after = line.split("counter packets ").nth(1).unwrap_or("");
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {line:?}"))
}

fn create_network(lab: &TestLab, name: &str, subnet: &str, internal: bool) -> u32 {
    let mut args = vec!["network", "create", "--subnet", subnet];
    if internal {
        args.push("--internal");
    }
    args.push(name);
    let id = lab.vx("vm2", &args).trim().to_string();
    wait_until(|| {
        lab.vx("vm3", &["network", "ls", "-q", "--no-trunc"])
            .contains(&id)
    });
    let inspect = lab.vx("vm2", &["network", "inspect", name]);
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    v[0]["vni"].as_u64().unwrap() as u32
}

/// Runs `argv` in `ns` (a process forked from a thread inside it inherits it).
fn run_in(ns: &NetNs, argv: &[&str]) -> String {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    let out = ns
        .run(move || {
            std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Gives the outside namespace an on-link route to the underlay (as a router next to the
/// hosts would have) and, when `gateway_subnet`, a route to the hosts' gateway subnet via vm3.
fn route_outside(lab: &TestLab, gateway_subnet: bool) -> NetNs {
    let outside = lab.lab.outside().unwrap();
    let links = run_in(&outside, &["ip", "-o", "link"]);
    let dev = links
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .find(|n| n != "lo")
        .expect("the outside namespace's link");
    run_in(
        &outside,
        &["ip", "route", "replace", "192.0.2.0/24", "dev", &dev],
    );
    if gateway_subnet {
        run_in(
            &outside,
            &[
                "ip",
                "route",
                "replace",
                "172.18.0.0/16",
                "via",
                "192.0.2.7",
            ],
        );
    }
    outside
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A VXLAN datagram's payload: the VXLAN header for `vni`, then an Ethernet/IPv4/UDP frame
/// from a spoofed `src` to `dst`:`dport` (dst's MAC as vxnet derives it).
fn vxlan_frame(vni: u32, src: Ipv4Addr, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x08, 0, 0, 0];
    f.extend_from_slice(&(vni << 8).to_be_bytes());
    let d = dst.octets();
    let s = src.octets();
    f.extend_from_slice(&[0x02, 0x42, d[0], d[1], d[2], d[3]]);
    f.extend_from_slice(&[0x02, 0x42, s[0], s[1], s[2], s[3]]);
    f.extend_from_slice(&[0x08, 0x00]);
    let udp_len = 8 + payload.len() as u16;
    let total = 20 + udp_len;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&s);
    ip.extend_from_slice(&d);
    let c = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

fn send_udp(ns: &NetNs, to: SocketAddrV4, data: Vec<u8>) {
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..3 {
            s.send_to(&data, to)?;
        }
        Ok(())
    })
    .unwrap();
}

/// Whether `sock` receives `want` within a bounded wait.
fn receives(sock: &UdpSocket, want: &[u8]) -> bool {
    let mut buf = [0u8; 2048];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == want => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

fn connects(ns: &NetNs, to: SocketAddr) -> bool {
    ns.run(move || Ok(TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_ok()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_from_a_non_member_or_a_container_is_dropped() {
    let lab = TestLab::up(3).await;
    create_network(&lab, "a", "10.0.20.0/24", false);
    let vni_b = create_network(&lab, "b", "10.0.21.0/24", true);
    lab.container("vm2", "attacker", "a");
    let target: Ipv4Addr = lab.container("vm3", "victim", "b").parse().unwrap();
    let victim = lab.container_ns("vm3", "victim");
    let sock = victim
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:9999")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        })
        .unwrap();
    let to = SocketAddrV4::new(VM3, 4789);
    let spoofed = Ipv4Addr::new(10, 0, 21, 99);

    let payload = b"from a container".to_vec();
    send_udp(
        &lab.container_ns("vm2", "attacker"),
        to,
        vxlan_frame(vni_b, spoofed, target, 9999, &payload),
    );
    let got = receives(&sock, &payload);
    println!(
        "HOSTILE|VXLAN injection from a container (net a, vm2) into internal net b on vm3|{}",
        if got { "delivered" } else { "dropped" }
    );
    assert!(
        !got,
        "a container injected a frame into an internal network"
    );

    // The same frame from a member VTEP arrives: the frame itself is right.
    let payload = b"from a member VTEP".to_vec();
    send_udp(
        &lab.lab.host("vm2").unwrap().netns().unwrap(),
        to,
        vxlan_frame(vni_b, spoofed, target, 9999, &payload),
    );
    let got = receives(&sock, &payload);
    println!(
        "HOSTILE|VXLAN from a member VTEP (vm2's host, control)|{}",
        if got { "delivered" } else { "dropped" }
    );
    assert!(
        got,
        "the positive control did not arrive: the test frame is wrong"
    );

    let before = vtep_drops(&lab, "vm3");
    let outside = route_outside(&lab, false);
    let payload = b"from outside".to_vec();
    send_udp(
        &outside,
        to,
        vxlan_frame(vni_b, spoofed, target, 9999, &payload),
    );
    let got = receives(&sock, &payload);
    let after = vtep_drops(&lab, "vm3");
    println!(
        "HOSTILE|VXLAN injection from a non-member (203.0.113.1)|{} (vm3 counted {} drops)",
        if got { "delivered" } else { "dropped" },
        after - before
    );
    assert!(!got, "a non-member injected a frame");
    assert!(after > before, "vm3's VTEP filter did not count the drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_cannot_reach_the_cluster_store() {
    let lab = TestLab::up(3).await;
    create_network(&lab, "a", "10.0.22.0/24", false);
    create_network(&lab, "i", "10.0.23.0/24", true);
    lab.container("vm2", "c", "a");
    lab.container("vm2", "ci", "i");
    lab.container("vm3", "c3", "a");
    let etcd = SocketAddr::from((VM1, ETCD_CLIENT_PORT));
    let host = lab.lab.host("vm2").unwrap().netns().unwrap();
    assert!(
        connects(&host, etcd),
        "etcd not reachable from vm2's host: test is wrong"
    );
    println!("HOSTILE|etcd client port from vm2's host (control)|connected");
    for (host, name) in [("vm2", "c"), ("vm2", "ci"), ("vm3", "c3")] {
        let got = connects(&lab.container_ns(host, name), etcd);
        println!(
            "HOSTILE|etcd client port on vm1 from container {name} on {host}|{}",
            if got { "connected" } else { "refused" }
        );
        assert!(!got, "container {name} on {host} reached etcd");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpublished_port_is_not_routable_from_outside() {
    let lab = TestLab::up(3).await;
    create_network(&lab, "p", "10.0.24.0/24", false);
    lab.vx(
        "vm3",
        &[
            "run", "-d", "--name", "srv", "-p", "8080:80", "--net", "p", "--", "sleep", "3600",
        ],
    );
    let addrs = lab.vx("vm3", &["exec", "srv", "--", "ip", "-o", "-4", "addr"]);
    let gw_ip: Ipv4Addr = addrs
        .split_whitespace()
        .find(|w| w.starts_with("172.18."))
        .and_then(|w| w.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no eth1 address in {addrs}"));
    let outside = route_outside(&lab, true);
    let srv = lab.container_ns("vm3", "srv");

    let server = tcp_echo_peer(&srv, SocketAddr::from(([0, 0, 0, 0], 80)));
    let published = tcp_fetch(&outside, SocketAddr::from((VM3, 8080)));
    println!(
        "HOSTILE|published port 8080 from outside (control)|{}",
        if published.is_ok() {
            "connected"
        } else {
            "refused"
        }
    );
    assert!(published.is_ok(), "{published:?}");
    server.join().unwrap().unwrap();

    let _server = tcp_echo_peer(&srv, SocketAddr::from(([0, 0, 0, 0], 81)));
    let got = connects(&outside, SocketAddr::from((gw_ip, 81)));
    println!(
        "HOSTILE|unpublished port {gw_ip}:81 routed from outside via vm3|{}",
        if got { "connected" } else { "refused" }
    );
    assert!(!got, "an unpublished port answered from outside");
}

/// Polls `f` every 100 ms for up to `limit`; panics if it never holds (a bound against
/// hangs: a node leaves the view only when its lease expires, longer than `wait_until`'s).
fn wait_long(limit: Duration, mut f: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !f() {
        assert!(started.elapsed() < limit, "condition never held");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn vtep_set(lab: &TestLab, host: &str) -> String {
    let out = lab.sh(host, &["nft", "list", "set", "inet", "vxnet", "vteps"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vtep_set_follows_membership() {
    let lab = TestLab::up(3).await;
    // No container anywhere: the filter is there from the daemon's start.
    wait_until(|| {
        let set = vtep_set(&lab, "vm2");
        set.contains("192.0.2.6") && set.contains("192.0.2.7")
    });
    println!("HOSTILE|VTEP set on vm2 with no container|vm2 and vm3 listed");
    assert!(lab.lab.stop_daemon("vm3").unwrap());
    wait_long(Duration::from_secs(120), || {
        !vtep_set(&lab, "vm2").contains("192.0.2.7")
    });
    println!("HOSTILE|vm3's daemon stopped, its lease expired|192.0.2.7 left vm2's set");
    lab.lab.start_daemon("vm3").await.unwrap();
    wait_long(Duration::from_secs(60), || {
        vtep_set(&lab, "vm2").contains("192.0.2.7")
    });
    println!("HOSTILE|vm3's daemon started again|192.0.2.7 back in vm2's set");
    assert!(vtep_set(&lab, "vm2").contains("192.0.2.6"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dangerous_host_ports_are_refused() {
    let lab = TestLab::up(3).await;
    create_network(&lab, "d", "10.0.25.0/24", false);
    let host = lab.lab.host("vm3").unwrap().netns().unwrap();
    let _taken = host
        .run(|| std::net::TcpListener::bind("0.0.0.0:8081"))
        .unwrap();
    let cases = [
        (
            "4789:80/udp",
            "host port 4789/udp is the VXLAN port of the overlay",
        ),
        (
            "2379:80",
            "host port 2379/tcp is a cluster store (etcd) client or peer port",
        ),
        (
            "2380:80",
            "host port 2380/tcp is a cluster store (etcd) client or peer port",
        ),
        (
            "8081:80",
            "host port 8081/tcp is in use on this host (by another program)",
        ),
    ];
    for (i, (publish, want)) in cases.iter().enumerate() {
        let name = format!("p{i}");
        let err = lab.vx_err(
            "vm3",
            &[
                "run", "-d", "--name", &name, "-p", publish, "--net", "d", "--", "sleep", "60",
            ],
        );
        println!("HOSTILE|vxnet run -p {publish}|refused: {}", err.trim());
        assert!(err.contains(want), "{err}");
    }
    let ps = lab.vx("vm3", &["ps", "-a"]);
    assert!(!ps.contains("p0") && !ps.contains("p3"), "{ps}");
    // The same port is fine once nothing holds it.
    drop(_taken);
    lab.vx(
        "vm3",
        &[
            "run", "-d", "--name", "ok", "-p", "8081:80", "--net", "d", "--", "sleep", "60",
        ],
    );
}
