//! The overlay end to end on the lab (real etcd, real namespaces, kernel VXLAN): isolation,
//! full-mesh reachability, clean-up when a container goes, the reconciler, and bad input.

mod common;

use common::{wait_until, TestLab};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_networks_on_the_same_hosts_are_isolated() {
    let lab = TestLab::up(3).await;
    let a = lab.network("net-a", "10.0.4.0/24");
    let b = lab.network("net-b", "10.0.5.0/24");
    let a2 = lab.container("vm2", "a2", "net-a");
    let a3 = lab.container("vm3", "a3", "net-a");
    let b2 = lab.container("vm2", "b2", "net-b");
    let b3 = lab.container("vm3", "b3", "net-b");
    assert!(lab.pings("vm2", "a2", &a3), "same network across hosts");
    assert!(lab.pings("vm2", "b2", &b3), "same network across hosts");
    for (host, from, to) in [
        ("vm2", "a2", &b3),
        ("vm2", "a2", &b2),
        ("vm3", "b3", &a2),
        ("vm3", "a3", &b3),
    ] {
        assert!(
            !lab.pings(host, from, to),
            "{from} on {host} reached {to} on the other network"
        );
    }
    // Two sandboxes per host, each with its own VNI.
    let vni = |id: &str| lab.in_sandbox("vm2", id, &["ip", "-d", "link", "show", "vxlan1"]);
    let (va, vb) = (vni(&a), vni(&b));
    assert!(
        va.contains("vxlan id ") && vb.contains("vxlan id "),
        "{va}\n{vb}"
    );
    assert_ne!(
        va.split("vxlan id ")
            .nth(1)
            .map(|s| s.split_whitespace().next()),
        vb.split("vxlan id ")
            .nth(1)
            .map(|s| s.split_whitespace().next())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_ten_containers_each_all_reach_each_other() {
    let lab = TestLab::up(4).await;
    lab.network("mesh", "10.0.8.0/24");
    let mut all = Vec::new();
    for host in ["vm2", "vm3", "vm4"] {
        for i in 0..10 {
            let name = format!("{host}-c{i}");
            let ip = lab.container(host, &name, "mesh");
            all.push((host, name, ip));
        }
    }
    let ips: Vec<&str> = all.iter().map(|(_, _, ip)| ip.as_str()).collect();
    let mut distinct = ips.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 30);
    // Every container pings every other one: one shell loop per container, all in parallel.
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = all
            .iter()
            .map(|(host, name, own)| {
                let targets: Vec<&str> = ips.iter().copied().filter(|ip| ip != own).collect();
                let script = format!(
                    "for ip in {}; do ping -c 1 -W 2 $ip >/dev/null || echo $ip; done",
                    targets.join(" ")
                );
                let lab = &lab;
                s.spawn(move || {
                    let out = lab.sh(host, &["vxnet", "exec", name, "--", "sh", "-c", &script]);
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .map(|ip| format!("{name} on {host} -> {ip}"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "unreachable pairs: {failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containers_exit_removes_its_entries_on_the_other_hosts() {
    let lab = TestLab::up(3).await;
    let net = lab.network("exit", "10.0.6.0/24");
    lab.container("vm2", "watcher", "exit");
    let ip = lab.container("vm3", "leaver", "exit");
    let mac = {
        let o: Vec<u8> = ip.split('.').map(|p| p.parse().unwrap()).collect();
        format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
    };
    let fdb = || lab.in_sandbox("vm2", &net, &["bridge", "fdb", "show", "dev", "vxlan1"]);
    let neigh = || lab.in_sandbox("vm2", &net, &["ip", "neigh", "show", "dev", "vxlan1"]);
    wait_until(|| fdb().contains(&format!("{mac} dst 192.0.2.7")) && neigh().contains(&ip));
    assert!(lab.pings("vm2", "watcher", &ip));

    // kill -9 the container's process (not through vxnet): the daemon notices by itself.
    let pid = lab.ps_entry("vm3", "leaver")["pid"]
        .as_u64()
        .unwrap()
        .to_string();
    let started = std::time::Instant::now();
    assert!(lab.sh("vm3", &["kill", "-9", &pid]).status.success());
    wait_until(|| !fdb().contains(&mac) && !neigh().contains(&ip));
    eprintln!(
        "vm2 dropped the entries {:?} after the kill",
        started.elapsed()
    );
    let inspect = lab.vx("vm2", &["network", "inspect", "exit"]);
    assert!(!inspect.contains(&ip), "endpoint still listed: {inspect}");
    let ps = lab.vx("vm3", &["ps", "-a"]);
    assert!(ps.contains("Exited"), "{ps}");

    // A foreground `run` whose CLI is killed takes its command (and endpoint) with it.
    let mut cli = lab
        .lab
        .host("vm3")
        .unwrap()
        .command("vxnet")
        .unwrap()
        .args([
            "run", "--name", "fg", "--net", "exit", "--", "sleep", "3600",
        ])
        .spawn()
        .unwrap();
    wait_until(|| {
        lab.vx("vm3", &["ps"])
            .lines()
            .any(|l| l.contains(" fg ") && l.contains("Up (pid"))
    });
    let fg_ip = lab.overlay_ip("vm3", "fg");
    wait_until(|| neigh().contains(&fg_ip));
    cli.kill().unwrap();
    cli.wait().unwrap();
    wait_until(|| !neigh().contains(&fg_ip));
    wait_until(|| lab.vx("vm3", &["ps", "-a"]).contains("Exited"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_changes_nothing_when_run_twice_and_repairs_damage() {
    let lab = TestLab::up(3).await;
    let net = lab.network("rec", "10.0.7.0/24");
    let _ip2 = lab.container("vm2", "r2", "rec");
    let ip3 = lab.container("vm3", "r3", "rec");
    wait_until(|| lab.pings("vm2", "r2", &ip3));
    let snapshot = || {
        [
            lab.in_sandbox("vm2", &net, &["ip", "-o", "link"]),
            // The VXLAN device's own settings (its detailed line also holds running timers).
            lab.in_sandbox("vm2", &net, &["ip", "-d", "-o", "link", "show", "vxlan1"])
                .split("vxlan id")
                .nth(1)
                .and_then(|s| s.split("bridge_slave").next())
                .unwrap_or_default()
                .to_string(),
            lab.in_sandbox("vm2", &net, &["ip", "-o", "-4", "addr"]),
            lab.in_sandbox("vm2", &net, &["bridge", "fdb", "show", "dev", "vxlan1"]),
            lab.in_sandbox("vm2", &net, &["ip", "neigh", "show", "dev", "vxlan1"]),
            lab.vx("vm2", &["exec", "r2", "--", "ip", "-o", "-4", "addr"]),
        ]
        .join("\n")
        // Carrier flags settle asynchronously; they are not ours to compare.
        .replace("NO-CARRIER,", "")
        .replace(",LOWER_UP", "")
    };
    let before = snapshot();
    for _ in 0..2 {
        let report: serde_json::Value =
            serde_json::from_str(&lab.vx("vm2", &["reconcile"])).unwrap();
        for field in [
            "sandboxes_removed",
            "stray_links_removed",
            "peers_added",
            "peers_removed",
        ] {
            assert_eq!(report[field], 0, "{field} in {report}");
        }
        assert_eq!(
            snapshot(),
            before,
            "a resync changed kernel state that was right"
        );
    }

    // Someone deletes the VXLAN device and a peer entry by hand: a resync puts them back.
    lab.sh(
        "vm2",
        &[
            "nsenter",
            &format!("--net=/run/vxnet/netns/1-{}", &net[..10]),
            "ip",
            "link",
            "del",
            "vxlan1",
        ],
    );
    assert!(
        !lab.pings("vm2", "r2", &ip3),
        "traffic still flows without vxlan1?"
    );
    let report: serde_json::Value = serde_json::from_str(&lab.vx("vm2", &["reconcile"])).unwrap();
    assert_eq!(report["peers_added"], 1, "{report}");
    assert!(
        lab.pings("vm2", "r2", &ip3),
        "resync did not restore the overlay"
    );
    lab.sh(
        "vm2",
        &[
            "nsenter",
            &format!("--net=/run/vxnet/netns/1-{}", &net[..10]),
            "ip",
            "neigh",
            "del",
            &ip3,
            "dev",
            "vxlan1",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&lab.vx("vm2", &["reconcile"])).unwrap();
    assert_eq!(report["peers_added"], 1, "{report}");
    assert!(lab.pings("vm2", "r2", &ip3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_leaves_nothing_half_made() {
    let lab = TestLab::up(3).await;
    lab.network("bad", "10.0.9.0/24");
    let taken = lab.container("vm2", "first", "bad");
    let netns_before = lab.sh("vm3", &["ls", "/run/vxnet/netns"]).stdout;
    let inspect_before = lab.vx("vm3", &["network", "inspect", "bad"]);

    // An MTU the network allows but this host's underlay (1500) cannot carry.
    lab.vx(
        "vm2",
        &[
            "network",
            "create",
            "--subnet",
            "10.0.99.0/24",
            "--mtu",
            "2000",
            "jumbo",
        ],
    );
    wait_until(|| lab.vx("vm3", &["network", "ls"]).contains("jumbo"));
    let err = lab.vx_err("vm3", &["run", "--net", "jumbo", "--", "true"]);
    assert!(
        err.contains("has MTU 2000, but this host's underlay eth0 has MTU 1500"),
        "{err}"
    );
    let err = lab.vx_err("vm3", &["run", "--net", "nope", "--", "true"]);
    assert!(err.contains("network nope not found"), "{err}");
    let err = lab.vx_err(
        "vm3",
        &["run", "--net", "bad", "--ip", &taken, "--", "true"],
    );
    assert!(
        err.contains(&format!("address {taken} is already in use on network bad")),
        "{err}"
    );
    let err = lab.vx_err(
        "vm3",
        &["run", "--net", "bad", "--ip", "10.0.10.3", "--", "true"],
    );
    assert!(err.contains("is not in the network's subnet"), "{err}");
    let err = lab.vx_err(
        "vm3",
        &["run", "--net", "bad", "--name", "no/slash", "--", "true"],
    );
    assert!(err.contains("invalid container name"), "{err}");
    let err = lab.vx_err("vm3", &["run", "--net", "bad", "--", "/no/such/program"]);
    assert!(err.contains("cannot start \"/no/such/program\""), "{err}");
    let err = lab.vx_err(
        "vm2",
        &[
            "run", "-d", "--name", "first", "--net", "bad", "--", "sleep", "1",
        ],
    );
    assert!(err.contains("already in use on this host"), "{err}");

    // Nothing was left: no namespace, no container record, no endpoint anywhere. Besides
    // the sandboxes, vm3 holds only the namespaces its daemon keeps ready (each failed
    // create used one up, and the pool was topped up since).
    let listing = |out: Vec<u8>| -> (Vec<String>, usize) {
        let names: Vec<String> = String::from_utf8_lossy(&out)
            .lines()
            .map(str::to_string)
            .collect();
        let (sandboxes, others): (Vec<String>, Vec<String>) =
            names.into_iter().partition(|n| n.starts_with("1-"));
        (sandboxes, others.len())
    };
    let (sandboxes_before, _) = listing(netns_before);
    wait_until(|| {
        listing(lab.sh("vm3", &["ls", "/run/vxnet/netns"]).stdout)
            == (
                sandboxes_before.clone(),
                vxnet::container::nspool::DEFAULT_SIZE,
            )
    });
    assert!(lab.vx("vm3", &["ps", "-a", "-q"]).trim().is_empty());
    let inspect_after = lab.vx("vm3", &["network", "inspect", "bad"]);
    assert_eq!(inspect_after, inspect_before);

    // exec into a stopped container.
    lab.vx("vm2", &["stop", "-t", "1", "first"]);
    let err = lab.vx_err("vm2", &["exec", "first", "--", "true"]);
    assert!(err.contains("container first is not running"), "{err}");
    let err = lab.vx_err("vm2", &["exec", "ghost", "--", "true"]);
    assert!(err.contains("no such container: ghost"), "{err}");
    // The stopped container no longer holds an address: the network can go.
    lab.vx("vm2", &["network", "rm", "bad"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_connect_and_disconnect_add_and_remove_an_interface() {
    let lab = TestLab::up(3).await;
    lab.network("front", "10.0.11.0/24");
    lab.network("back", "10.0.12.0/24");
    lab.container("vm2", "app", "front");
    let db = lab.container("vm3", "db", "back");
    assert!(
        !lab.pings("vm2", "app", &db),
        "app reached back before being connected"
    );

    lab.vx("vm2", &["network", "connect", "back", "app"]);
    let addrs = lab.vx("vm2", &["exec", "app", "--", "ip", "-o", "-4", "addr"]);
    assert!(
        addrs.contains("eth0") && addrs.contains("10.0.11."),
        "{addrs}"
    );
    assert!(
        addrs.contains("eth2") && addrs.contains("10.0.12."),
        "{addrs}"
    );
    assert!(
        lab.pings("vm2", "app", &db),
        "connected container cannot reach back"
    );
    let err = lab.vx_err("vm2", &["network", "connect", "back", "app"]);
    assert!(err.contains("already connected"), "{err}");

    lab.vx("vm2", &["network", "disconnect", "back", "app"]);
    let addrs = lab.vx("vm2", &["exec", "app", "--", "ip", "-o", "-4", "addr"]);
    assert!(
        !addrs.contains("eth2") && !addrs.contains("10.0.12."),
        "{addrs}"
    );
    let inspect = lab.vx("vm3", &["network", "inspect", "back"]);
    assert!(
        !inspect.contains("\"app\""),
        "endpoint still listed: {inspect}"
    );
    assert!(!lab.pings("vm2", "app", &db));
    let err = lab.vx_err("vm2", &["network", "disconnect", "back", "app"]);
    assert!(err.contains("is not connected to network back"), "{err}");
}
