//! Daemon faults on the lab: restarts (clean and kill -9) under traffic, half-done work left
//! by a crash, and a host that returns after its lease expired.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_until, TestLab};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Starts a continuous ping (every 20 ms, for `count` packets) from a container; returns the
/// running `vxnet exec` process.
fn ping_in_background(lab: &TestLab, host: &str, container: &str, ip: &str, count: u32) -> Child {
    let mut cmd = lab.lab.host(host).unwrap().command("vxnet").unwrap();
    cmd.args([
        "exec", container, "--", "ping", "-i", "0.02", "-W", "1", "-c",
    ])
    .arg(count.to_string())
    .arg(ip)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

/// The "N% packet loss" figure of a finished ping.
fn loss(child: Child) -> (String, String) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let loss = text
        .split(',')
        .find(|p| p.contains("packet loss"))
        .map(|p| p.trim().to_string())
        .unwrap_or_else(|| format!("no summary: {text}{}", String::from_utf8_lossy(&out.stderr)));
    (loss, text)
}

/// The daemon of `host` as `lab up` recorded it.
fn daemon_record(lab: &TestLab, host: &str) -> vxnet::lab::sys::ProcRecord {
    lab.lab
        .host(host)
        .unwrap()
        .processes()
        .iter()
        .find(|p| p.role == "daemon")
        .unwrap()
        .clone()
}

/// Starts a daemon on `host` again with the command line `lab up` used, logging next to the
/// lab's own logs (`<lab dir>/logs/<host>-restarted.log`).
fn restart_daemon(lab: &TestLab, host: &str) -> Child {
    let rec = daemon_record(lab, host);
    let log = lab
        .lab
        .dir()
        .join("logs")
        .join(format!("{host}-restarted.log"));
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let mut cmd: Command = lab.lab.host(host).unwrap().command(&rec.argv[0]).unwrap();
    cmd.args(&rec.argv[1..])
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    cmd.spawn().unwrap()
}

/// What a restarted daemon logged, for failure messages.
fn restarted_log(lab: &TestLab, host: &str) -> String {
    std::fs::read_to_string(
        lab.lab
            .dir()
            .join("logs")
            .join(format!("{host}-restarted.log")),
    )
    .unwrap_or_default()
}

fn wait_gone(pid: u32) {
    wait_until(|| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.contains(") Z ") || s.contains(") X "))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_restarts_lose_no_packet_and_change_nothing() {
    let lab = TestLab::up(3).await;
    lab.network("steady", "10.0.4.0/24");
    lab.container("vm2", "c2", "steady");
    let ip3 = lab.container("vm3", "c3", "steady");
    wait_until(|| lab.pings("vm2", "c2", &ip3));
    let fdb = |host: &str| lab.vx(host, &["network", "inspect", "steady"]);
    let before = (fdb("vm2"), fdb("vm3"));

    // 150 packets over ~3 s: vm3's daemon is killed -9, and vm2's stopped cleanly, meanwhile.
    let pinger = ping_in_background(&lab, "vm2", "c2", &ip3, 150);
    std::thread::sleep(Duration::from_millis(300));
    let vm3 = daemon_record(&lab, "vm3");
    kill(Pid::from_raw(vm3.pid as i32), Signal::SIGKILL).unwrap();
    wait_gone(vm3.pid);
    let mut vm3_again = restart_daemon(&lab, "vm3");
    let vm2 = daemon_record(&lab, "vm2");
    kill(Pid::from_raw(vm2.pid as i32), Signal::SIGTERM).unwrap();
    wait_gone(vm2.pid);
    let mut vm2_again = restart_daemon(&lab, "vm2");
    let (loss, text) = loss(pinger);
    println!("FAULT|daemon restart (kill -9 on vm3, clean on vm2) under ping|continuous ping c2->c3 across both restarts|{loss} of 150 packets");
    assert_eq!(loss, "0% packet loss", "{text}");

    // The restarted daemons took their containers back: same endpoints, still reachable,
    // and the exit of a container is still noticed.
    wait_until(|| lab.sh("vm3", &["vxnet", "info"]).status.success());
    wait_until(|| lab.sh("vm2", &["vxnet", "info"]).status.success());
    wait_until(|| (fdb("vm2"), fdb("vm3")) == before);
    assert!(lab.pings("vm2", "c2", &ip3));
    let report: serde_json::Value = serde_json::from_str(&lab.vx("vm3", &["reconcile"])).unwrap();
    assert_eq!(report["peers_added"], 0, "{report}");
    assert_eq!(report["sandboxes_removed"], 0, "{report}");
    lab.vx("vm3", &["stop", "-t", "1", "c3"]);
    wait_until(|| !fdb("vm2").contains(&ip3));

    for child in [&mut vm2_again, &mut vm3_again] {
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        child.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_claim_and_record_leaves_no_leaked_address() {
    let lab = TestLab::up(3).await;
    lab.network("leak", "10.0.5.0/24");
    lab.container("vm3", "keep", "leak");
    // An endpoint of vm3 in the store that no container of vm3 knows: what a daemon killed
    // right after claiming an address (before writing its record) leaves behind.
    let out = lab.vx("vm3", &["network", "inspect", "leak"]);
    assert!(out.contains("\"keep\""));
    let client = lab.lab.host("vm3").unwrap().client();
    let orphan = client
        .endpoint_create(
            "leak",
            &vxnet::cluster::EndpointCreate {
                name: Some("orphan".into()),
                ip: None,
                aliases: Vec::new(),
            },
        )
        .await
        .unwrap();
    let vm3 = daemon_record(&lab, "vm3");
    kill(Pid::from_raw(vm3.pid as i32), Signal::SIGKILL).unwrap();
    wait_gone(vm3.pid);
    let started = Instant::now();
    let mut again = restart_daemon(&lab, "vm3");
    let gone = || {
        !lab.vx("vm2", &["network", "inspect", "leak"])
            .contains(&orphan.ip.to_string())
    };
    while !gone() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "orphan {} still there; restarted vm3 daemon logged:\n{}",
            orphan.ip,
            restarted_log(&lab, "vm3")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "FAULT|daemon killed between address claim and record|orphaned endpoint released by the restarted daemon|{} ms",
        started.elapsed().as_millis()
    );
    let inspect = lab.vx("vm2", &["network", "inspect", "leak"]);
    assert!(
        inspect.contains("\"keep\""),
        "the real container's endpoint must stay: {inspect}"
    );
    kill(Pid::from_raw(again.id() as i32), Signal::SIGTERM).unwrap();
    again.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_back_after_its_lease_expired_reclaims_its_addresses_or_reports_a_conflict() {
    let lab = TestLab::up(3).await;
    lab.network("away", "10.0.6.0/24");
    lab.container("vm2", "c2", "away");
    let lost_ip = lab.container("vm3", "lost", "away");
    let kept_ip = lab.container("vm3", "kept", "away");
    wait_until(|| lab.pings("vm2", "c2", &kept_ip));

    // vm3's daemon dies and its lease expires (revoked here rather than waited out).
    let vm3 = daemon_record(&lab, "vm3");
    kill(Pid::from_raw(vm3.pid as i32), Signal::SIGKILL).unwrap();
    wait_gone(vm3.pid);
    let lease = String::from_utf8_lossy(&lab.sh("vm3", &["cat", "/var/lib/vxnet/lease"]).stdout)
        .trim()
        .to_string();
    let store = lab.lab.cluster_store().replace("etcd://", "http://");
    let revoke = lab.sh(
        "vm1",
        &["etcdctl", "--endpoints", &store, "lease", "revoke", &lease],
    );
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let inspect = || lab.vx("vm2", &["network", "inspect", "away"]);
    wait_until(|| !inspect().contains(&kept_ip) && !inspect().contains(&lost_ip));

    // Meanwhile a container on vm2 takes one of vm3's addresses.
    lab.vx(
        "vm2",
        &[
            "run", "-d", "--name", "thief", "--ip", &lost_ip, "--net", "away", "--", "sleep",
            "3600",
        ],
    );

    // vm3 comes back: the free address is claimed again, the taken one is reported.
    let started = Instant::now();
    let mut again = restart_daemon(&lab, "vm3");
    wait_until(|| inspect().contains(&kept_ip));
    println!(
        "FAULT|host back after its lease expired|address re-claimed; a taken one reported as conflict|{} ms",
        started.elapsed().as_millis()
    );
    wait_until(|| lab.vx("vm3", &["ps"]).contains("CONFLICT"));
    let ps = lab.vx("vm3", &["ps"]);
    let lost_line = ps.lines().find(|l| l.contains(" lost ")).unwrap();
    assert!(
        lost_line.contains(&format!("address {lost_ip} on network away was taken")),
        "{ps}"
    );
    // Never two owners: the address is listed once (the thief), and `lost` lost its eth0.
    assert_eq!(
        inspect().matches(&format!("\"{lost_ip}\"")).count(),
        1,
        "{}",
        inspect()
    );
    let links = lab.vx("vm3", &["exec", "lost", "--", "ip", "-o", "link"]);
    assert!(!links.contains("eth0"), "{links}");
    assert!(
        lab.pings("vm2", "c2", &kept_ip),
        "the re-claimed container is reachable again"
    );
    kill(Pid::from_raw(again.id() as i32), Signal::SIGTERM).unwrap();
    again.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hosts_endpoints_leave_every_other_host_after_the_default_lease_ttl() {
    let lab = TestLab::up(3).await;
    let net = lab.network("dead", "10.0.7.0/24");
    lab.container("vm2", "watcher", "dead");
    let ip = lab.container("vm3", "doomed", "dead");
    let neigh = || lab.in_sandbox("vm2", &net, &["ip", "neigh", "show", "dev", "vxlan1"]);
    wait_until(|| neigh().contains(&ip));

    // vm3's daemon dies for good; nobody touches its lease: it runs out (15 s by default).
    let vm3 = daemon_record(&lab, "vm3");
    kill(Pid::from_raw(vm3.pid as i32), Signal::SIGKILL).unwrap();
    wait_gone(vm3.pid);
    let started = Instant::now();
    while neigh().contains(&ip) {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "dead host's entries stayed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "FAULT|host dead for good (daemon kill -9, default 15 s lease)|its endpoints gone from the other hosts' FDB/neighbour tables and from inspect, addresses released|{} ms",
        started.elapsed().as_millis()
    );
    let inspect = lab.vx("vm2", &["network", "inspect", "dead"]);
    assert!(!inspect.contains(&ip), "{inspect}");
    let info: serde_json::Value =
        serde_json::from_str(&lab.vx("vm2", &["info", "--format", "json"])).unwrap();
    assert_eq!(info["nodes"].as_array().unwrap().len(), 1, "{info}");
    // The address is free again.
    lab.vx(
        "vm2",
        &[
            "run", "-d", "--name", "heir", "--ip", &ip, "--net", "dead", "--", "sleep", "60",
        ],
    );
}

/// The container-named namespaces (12 hex digits) in `host`'s /run/vxnet/netns.
fn container_namespaces(lab: &TestLab, host: &str) -> std::collections::BTreeSet<String> {
    let dir = format!(
        "/proc/{}/root/run/vxnet/netns",
        lab.lab.host(host).unwrap().init_pid()
    );
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() == 12 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_kept_ready_go_with_a_clean_stop_and_after_a_crash() {
    let lab = TestLab::up(2).await;
    lab.network("pool", "10.0.9.0/24");
    lab.container("vm2", "c", "pool");
    let owned = lab.ps_entry("vm2", "c")["netns"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    // The container's own namespace, and the pool (2 by default) topped up after its create.
    let pooled = |lab: &TestLab| {
        let mut all = container_namespaces(lab, "vm2");
        assert!(
            all.remove(&owned),
            "the container's namespace went: {all:?}"
        );
        all
    };
    wait_until(|| pooled(&lab).len() == 2);
    let before_crash = pooled(&lab);

    // kill -9 leaves the pool behind; the restarted daemon removes it and makes its own.
    let vm2 = daemon_record(&lab, "vm2");
    kill(Pid::from_raw(vm2.pid as i32), Signal::SIGKILL).unwrap();
    wait_gone(vm2.pid);
    assert_eq!(pooled(&lab), before_crash);
    let mut again = restart_daemon(&lab, "vm2");
    wait_until(|| {
        let now = pooled(&lab);
        now.len() == 2 && now.is_disjoint(&before_crash)
    });
    // The running container kept its record (and, checked by `pooled`, its namespace).
    wait_until(|| lab.sh("vm2", &["vxnet", "info"]).status.success());
    assert_eq!(
        lab.ps_entry("vm2", "c")["netns"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next(),
        Some(owned.as_str())
    );

    // A clean stop removes the pool and leaves the container's namespace.
    kill(Pid::from_raw(again.id() as i32), Signal::SIGTERM).unwrap();
    again.wait().unwrap();
    assert!(
        pooled(&lab).is_empty(),
        "a clean stop left {:?}; its log:\n{}",
        pooled(&lab),
        restarted_log(&lab, "vm2")
    );
}
