//! The gateway bridge: eth1 with NAT for traffic leaving the overlay, published ports, ICC off,
//! internal networks, and nftables state owned and cleaned up by vxnet — all inside the lab.

mod common;

use std::net::{Ipv4Addr, SocketAddr};

use common::{tcp_echo_peer, tcp_fetch, wait_until, TestLab};
use vxnet::lab::hosts::OUTSIDE_ADDR;

fn nft_ruleset(lab: &TestLab, host: &str) -> String {
    String::from_utf8_lossy(&lab.sh(host, &["nft", "list", "ruleset"]).stdout).into_owned()
}

fn root_ruleset() -> String {
    let out = std::process::Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn root_state() -> (String, String, String) {
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout)
        .lines()
        // Other tests running in parallel create and remove their own veths in namespaces;
        // only names matter here (a root-namespace link of ours would show up by name).
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .filter(|n| n.starts_with("vxnet") || n.starts_with("gw") || n.starts_with("veth"))
        .collect::<Vec<_>>()
        .join(",");
    (
        root_ruleset(),
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        links,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_traffic_is_masqueraded_to_the_hosts_underlay_address() {
    let root_before = root_state();
    let lab = TestLab::up(3).await;
    lab.network("web", "10.0.4.0/24");
    lab.container("vm2", "client", "web");
    let addrs = lab.vx("vm2", &["exec", "client", "--", "ip", "-o", "-4", "addr"]);
    assert!(
        addrs.contains("eth0") && addrs.contains("10.0.4."),
        "{addrs}"
    );
    assert!(
        addrs.contains("eth1") && addrs.contains("172.18."),
        "{addrs}"
    );
    let routes = lab.vx("vm2", &["exec", "client", "--", "ip", "route"]);
    assert!(
        routes.contains("default via 172.18.0.1 dev eth1"),
        "{routes}"
    );
    assert!(routes.contains("10.0.4.0/24 dev eth0"), "{routes}");

    let outside = lab.lab.outside().unwrap();
    let server = tcp_echo_peer(&outside, SocketAddr::from((OUTSIDE_ADDR, 7000)));
    let answer = tcp_fetch(
        &lab.container_ns("vm2", "client"),
        SocketAddr::from((OUTSIDE_ADDR, 7000)),
    )
    .expect("container reaches the outside");
    let peer = server.join().unwrap().unwrap();
    assert_eq!(
        peer.ip(),
        Ipv4Addr::new(192, 0, 2, 6),
        "source was not NAT'd to vm2's underlay"
    );
    assert!(answer.starts_with("192.0.2.6:"), "{answer}");

    // Everything happened inside the lab: the machine's own ruleset, forwarding switch and
    // links are as they were.
    assert_eq!(root_state(), root_before);
    assert!(nft_ruleset(&lab, "vm2").contains("table inet vxnet"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_port_answers_from_another_host_and_goes_with_the_container() {
    let lab = TestLab::up(3).await;
    lab.network("pub", "10.0.5.0/24");
    lab.vx(
        "vm3",
        &[
            "run", "-d", "--name", "srv", "-p", "8080:80", "--net", "pub", "--", "sleep", "3600",
        ],
    );
    let ps = lab.vx("vm3", &["ps"]);
    assert!(ps.contains("0.0.0.0:8080->80/tcp"), "{ps}");
    // The server runs inside the container's namespace (a thread of this test).
    let server = tcp_echo_peer(
        &lab.container_ns("vm3", "srv"),
        SocketAddr::from(([0, 0, 0, 0], 80)),
    );
    let vm2 = lab.lab.host("vm2").unwrap().netns().unwrap();
    let answer = tcp_fetch(&vm2, SocketAddr::from((Ipv4Addr::new(192, 0, 2, 7), 8080)))
        .expect("published port answers from vm2's underlay");
    assert!(answer.starts_with("192.0.2.6:"), "{answer}");
    server.join().unwrap().unwrap();

    // The same port again on that host: a clear error, nothing made.
    let err = lab.vx_err(
        "vm3",
        &[
            "run", "-d", "--name", "dup", "-p", "8080:81", "--net", "pub", "--", "sleep", "1",
        ],
    );
    assert!(
        err.contains("port 8080:80/tcp is already published on this host by container srv"),
        "{err}"
    );
    // Another host may publish it.
    lab.vx(
        "vm2",
        &[
            "run", "-d", "--name", "other", "-p", "8080:80", "--net", "pub", "--", "sleep", "3600",
        ],
    );

    // Unpublished when the container exits.
    lab.vx("vm3", &["stop", "-t", "1", "srv"]);
    let rules = nft_ruleset(&lab, "vm3");
    assert!(!rules.contains("dport 8080"), "{rules}");
    assert!(tcp_fetch(&vm2, SocketAddr::from((Ipv4Addr::new(192, 0, 2, 7), 8080))).is_err());
    let err = lab.vx_err("vm3", &["run", "--net", "pub", "-p", "80", "--", "true"]);
    assert!(err.contains("invalid port mapping \"80\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_on_one_host_cannot_reach_each_other_over_the_gateway_bridge() {
    let lab = TestLab::up(2).await;
    lab.network("icc", "10.0.6.0/24");
    lab.container("vm2", "a", "icc");
    lab.container("vm2", "b", "icc");
    let eth1 = |c: &str| {
        let out = lab.vx(
            "vm2",
            &["exec", c, "--", "ip", "-o", "-4", "addr", "show", "eth1"],
        );
        out.split_whitespace()
            .find(|w| w.starts_with("172.18."))
            .and_then(|w| w.split('/').next())
            .unwrap()
            .to_string()
    };
    let b_gw = eth1("b");
    assert!(
        lab.pings("vm2", "a", "172.18.0.1"),
        "the bridge itself answers"
    );
    assert!(
        !lab.pings("vm2", "a", &b_gw),
        "a reached b over the gateway bridge"
    );
    // Over their overlay they still talk.
    let b_overlay = lab.vx(
        "vm2",
        &["exec", "b", "--", "ip", "-o", "-4", "addr", "show", "eth0"],
    );
    let b_overlay = b_overlay
        .split_whitespace()
        .find(|w| w.starts_with("10.0.6."))
        .unwrap();
    assert!(lab.pings("vm2", "a", b_overlay.split('/').next().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_networks_container_has_no_eth1_and_no_way_out() {
    let lab = TestLab::up(3).await;
    lab.vx(
        "vm2",
        &[
            "network",
            "create",
            "--internal",
            "--subnet",
            "10.0.7.0/24",
            "private",
        ],
    );
    wait_until(|| lab.vx("vm3", &["network", "ls"]).contains("private"));
    lab.container("vm2", "p2", "private");
    let p3 = lab.container("vm3", "p3", "private");
    let links = lab.vx("vm2", &["exec", "p2", "--", "ip", "-o", "link"]);
    assert!(!links.contains("eth1"), "{links}");
    assert!(lab.pings("vm2", "p2", &p3), "the overlay itself works");
    let outside = lab.lab.outside().unwrap();
    let _server = tcp_echo_peer(&outside, SocketAddr::from((OUTSIDE_ADDR, 7001)));
    assert!(tcp_fetch(
        &lab.container_ns("vm2", "p2"),
        SocketAddr::from((OUTSIDE_ADDR, 7001))
    )
    .is_err());
    let err = lab.vx_err(
        "vm2",
        &["run", "--net", "private", "-p", "80:80", "--", "true"],
    );
    assert!(err.contains("network private is internal"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nftables_table_is_removed_on_clean_shutdown_and_not_duplicated_on_restart() {
    let lab = TestLab::up(2).await;
    lab.network("fw", "10.0.8.0/24");
    lab.vx(
        "vm2",
        &[
            "run", "-d", "--name", "s", "-p", "9000:90", "--net", "fw", "--", "sleep", "3600",
        ],
    );
    let before = nft_ruleset(&lab, "vm2");
    assert!(
        before.contains("table inet vxnet") && before.contains("dport 9000"),
        "{before}"
    );
    lab.vx("vm2", &["reconcile"]);
    lab.vx("vm2", &["reconcile"]);
    assert_eq!(
        nft_ruleset(&lab, "vm2"),
        before,
        "a resync changed (or duplicated) the rules"
    );

    // Clean stop of vm2's daemon (SIGTERM): nothing of vxnet stays in vm2's ruleset.
    let host = lab.lab.host("vm2").unwrap();
    let daemon = host
        .processes()
        .iter()
        .find(|p| p.role == "daemon")
        .unwrap()
        .clone();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_until(|| {
        !std::path::Path::new(&format!("/proc/{}", daemon.pid)).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", daemon.pid))
                .map_or(true, |s| s.contains(") Z "))
    });
    let after = nft_ruleset(&lab, "vm2");
    assert!(!after.contains("vxnet"), "{after}");

    // Started again (same command line): the rules come back once, not twice.
    let mut cmd = host.command(&daemon.argv[0]).unwrap();
    cmd.args(&daemon.argv[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut restarted = cmd.spawn().unwrap();
    wait_until(|| nft_ruleset(&lab, "vm2").contains("dport 9000"));
    assert_eq!(nft_ruleset(&lab, "vm2"), before);
    // And a second clean stop cleans up again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(restarted.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // Stopped by its own handler (exit 0), not by the signal's default action, which would
    // leave the table behind.
    let status = restarted.wait().unwrap();
    assert!(status.success(), "the restarted daemon ended with {status}");
    assert!(!nft_ruleset(&lab, "vm2").contains("vxnet"));

    // Left behind by a daemon killed with -9, the table goes when asked (no daemon needed).
    let mut again = host.command(&daemon.argv[0]).unwrap();
    again
        .args(&daemon.argv[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut again = again.spawn().unwrap();
    wait_until(|| nft_ruleset(&lab, "vm2").contains("dport 9000"));
    again.kill().unwrap();
    again.wait().unwrap();
    assert!(nft_ruleset(&lab, "vm2").contains("table inet vxnet"));
    let out = lab.vx("vm2", &["firewall", "remove"]);
    assert!(out.contains("removed"), "{out}");
    assert!(!nft_ruleset(&lab, "vm2").contains("vxnet"));
    lab.vx("vm2", &["firewall", "remove"]);
}
