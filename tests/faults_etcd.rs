//! Fault injection against the cluster store, on the real lab: etcd stopped under traffic,
//! a daemon started while etcd is away, and the leader of a three-member etcd killed.
//!
//! Each test prints its figures as `FAULT|<name>|<what happened>|<figure>` lines on stdout.
//! Timings are measured and printed, never asserted (only a 10 s bound against hangs).

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{wait_until, TestLab};

/// A bound against hangs, not a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(10);

fn fault(name: &str, what: &str, figure: impl std::fmt::Display) {
    println!("FAULT|{name}|{what}|{figure}");
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// Polls `f` every 20 ms until it holds; returns how long that took. Panics after 10 s.
fn time_until(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < HANG_GUARD, "{what}: never happened");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// A continuous ping from container `from` on `host` to `ip`: `count` probes 50 ms apart.
fn start_ping(lab: &TestLab, host: &str, from: &str, ip: &str, count: u32) -> Child {
    lab.lab
        .host(host)
        .unwrap()
        .command("vxnet")
        .unwrap()
        .args(["exec", from, "--", "ping", "-n", "-i", "0.05", "-W", "1"])
        .args(["-c", &count.to_string(), ip])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for the ping; returns (transmitted, received).
fn ping_result(ping: Child) -> (u32, u32) {
    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| {
            panic!(
                "no ping summary: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

/// `vxnet ARGS` on a host: (success, stdout + stderr, how long it took).
fn timed(lab: &TestLab, host: &str, args: &[&str]) -> (bool, String, Duration) {
    let mut argv = vec!["vxnet"];
    argv.extend_from_slice(args);
    let started = Instant::now();
    let out = lab.sh(host, &argv);
    let took = started.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, took)
}

fn lists_network(lab: &TestLab, host: &str, name: &str) -> bool {
    lab.vx(host, &["network", "ls"])
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(name))
}

/// etcd stopped for a few seconds under traffic: the data plane does not notice, writes fail
/// fast and clearly, reads are served from the view, and the cluster converges once etcd is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_traffic_fails_writes_fast_and_converges_after() {
    const NAME: &str = "etcd-outage";
    let lab = TestLab::up(3).await;
    lab.network("outage", "10.0.40.0/24");
    lab.container("vm2", "c2", "outage");
    let ip3 = lab.container("vm3", "c3", "outage");
    wait_until(|| lab.pings("vm2", "c2", &ip3));

    // 240 probes, 50 ms apart: about 12 s, spanning the outage and the return.
    let ping = start_ping(&lab, "vm2", "c2", &ip3, 240);
    std::thread::sleep(Duration::from_millis(500));

    let down_at = Instant::now();
    assert!(lab.lab.stop_etcd(0).unwrap(), "etcd was not running");
    fault(
        NAME,
        "etcd stopped (SIGTERM, exit waited for)",
        ms(down_at.elapsed()),
    );

    let (ok, text, took) = timed(
        &lab,
        "vm2",
        &["network", "create", "--subnet", "10.0.41.0/24", "during"],
    );
    assert!(!ok, "network create succeeded with etcd down: {text}");
    assert!(text.contains("cluster store unreachable"), "{text}");
    eprintln!("network create during the outage: {text}");
    fault(
        NAME,
        "network create fails (cluster store unreachable)",
        ms(took),
    );

    let (ok, text, took) = timed(
        &lab,
        "vm3",
        &[
            "run", "-d", "--name", "c4", "--net", "outage", "--", "sleep", "3600",
        ],
    );
    assert!(!ok, "run succeeded with etcd down: {text}");
    assert!(text.contains("cluster store unreachable"), "{text}");
    fault(
        NAME,
        "vxnet run fails (cluster store unreachable)",
        ms(took),
    );

    let started = Instant::now();
    let ls = lab.vx("vm3", &["network", "ls"]);
    assert!(ls.contains("outage"), "{ls}");
    fault(
        NAME,
        "network ls answers from the view",
        ms(started.elapsed()),
    );

    // Keep etcd away for 3 s in all.
    if let Some(rest) = Duration::from_secs(3).checked_sub(down_at.elapsed()) {
        std::thread::sleep(rest);
    }
    lab.lab.start_etcd(0).await.unwrap();
    let back = Instant::now();
    fault(
        NAME,
        "etcd away (stop to listening again)",
        ms(down_at.elapsed()),
    );
    std::thread::scope(|s| {
        let healthy = s.spawn(|| time_until("etcd healthy", || lab.lab.etcd_is_healthy(0)));
        converge_after_return(&lab, back);
        let healthy = healthy.join().unwrap();
        fault(NAME, "etcd healthy again (after listening)", ms(healthy));
    });

    let (sent, received) = ping_result(ping);
    fault(
        NAME,
        "continuous ping c2->c3 across the outage (lost/sent)",
        format!("{}/{sent}", sent - received),
    );
    assert_eq!(
        sent, received,
        "the data plane lost packets while etcd was away"
    );
}

/// After etcd's return (`back`): a network made on vm2 shows on vm3, a new container on vm3
/// is reachable from c2.
fn converge_after_return(lab: &TestLab, back: Instant) {
    const NAME: &str = "etcd-outage";

    // A write on vm2 (retried until the daemon reaches etcd again), seen on vm3.
    let mut attempts = 0;
    let create_ok = time_until("network create after etcd's return", || {
        attempts += 1;
        timed(
            lab,
            "vm2",
            &["network", "create", "--subnet", "10.0.42.0/24", "after"],
        )
        .0
    });
    fault(
        NAME,
        &format!("network create succeeds after etcd's return ({attempts} attempts)"),
        ms(create_ok),
    );
    time_until("the new network on vm3", || {
        lists_network(lab, "vm3", "after")
    });
    fault(
        NAME,
        "new network listed on vm3 after etcd's return",
        ms(back.elapsed()),
    );
    let ip4 = lab.container("vm3", "c4", "outage");
    time_until("c2 reaches the new container", || {
        lab.pings("vm2", "c2", &ip4)
    });
    fault(
        NAME,
        "new container on vm3 reachable from c2 after etcd's return",
        ms(back.elapsed()),
    );
}

/// A daemon started while etcd is down serves its API unregistered, then registers and syncs
/// by itself once etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_while_etcd_is_down_registers_once_it_returns() {
    const NAME: &str = "daemon-start-etcd-down";
    let lab = TestLab::up(3).await;
    lab.network("before", "10.0.43.0/24");

    assert!(lab.lab.stop_etcd(0).unwrap());
    assert!(lab.lab.stop_daemon("vm3").unwrap());
    let started = Instant::now();
    lab.lab.start_daemon("vm3").await.unwrap();
    fault(
        NAME,
        "daemon answers its API with etcd down",
        ms(started.elapsed()),
    );
    let info = lab.vx("vm3", &["info"]);
    assert!(
        info.lines()
            .any(|l| l.contains("egistered") && l.trim_end().ends_with("no")),
        "{info}"
    );
    // What it cannot know yet it does not invent.
    let (ok, text, took) = timed(
        &lab,
        "vm3",
        &["network", "create", "--subnet", "10.0.44.0/24", "during"],
    );
    assert!(!ok, "{text}");
    eprintln!("create on the unregistered daemon ({took:?}): {text}");

    lab.lab.start_etcd(0).await.unwrap();
    let back = Instant::now();
    let mut registered = Duration::ZERO;
    let synced = time_until("vm3 registered and synced", || {
        let (ok, text, _) = timed(&lab, "vm3", &["info", "--format", "json"]);
        let Ok(info) = serde_json::from_str::<serde_json::Value>(&text) else {
            return false;
        };
        let reg = ok && info["registered"] == true;
        if reg && registered.is_zero() {
            registered = back.elapsed();
        }
        reg && info["synced"] == true
    });
    fault(NAME, "registered after etcd's return", ms(registered));
    fault(
        NAME,
        "registered and synced after etcd's return",
        ms(synced),
    );
    assert!(lists_network(&lab, "vm3", "before"));
    let info = lab.vx("vm3", &["info"]);
    assert!(
        info.lines()
            .any(|l| l.contains("egistered") && l.trim_end().ends_with("yes")),
        "{info}"
    );
    // And it takes part: a network made on it shows on vm2, its containers reach vm2's.
    lab.vx(
        "vm3",
        &["network", "create", "--subnet", "10.0.45.0/24", "after"],
    );
    time_until("vm2 lists vm3's network", || {
        lists_network(&lab, "vm2", "after")
    });
    lab.container("vm2", "a2", "after");
    let ip = lab.container("vm3", "a3", "after");
    wait_until(|| lab.pings("vm2", "a2", &ip));
    // lab down still stops everything once: the restarted daemon and etcd are recorded.
    let state = lab.lab.current_state().unwrap();
    assert!(state
        .hosts
        .iter()
        .flat_map(|h| &h.processes)
        .all(|p| p.is_alive()));
}

/// Three etcd members; the leader is killed (-9): writes go on through the others, the write
/// is seen on the other host, and traffic is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_of_three_fails_over() {
    const NAME: &str = "etcd-leader-kill";
    let lab = TestLab::up_with(3, |o| o.etcd_members = 3).await;
    assert_eq!(lab.lab.etcd_member_count(), 3);
    lab.network("ha", "10.0.46.0/24");
    lab.container("vm2", "c2", "ha");
    let ip3 = lab.container("vm3", "c3", "ha");
    wait_until(|| lab.pings("vm2", "c2", &ip3));
    let leader = lab.lab.etcd_leader().unwrap().expect("a leader");
    eprintln!("etcd leader: member {leader}");

    let ping = start_ping(&lab, "vm2", "c2", &ip3, 120);
    std::thread::sleep(Duration::from_millis(500));
    assert!(lab.lab.kill_etcd(leader).unwrap());
    let killed = Instant::now();
    std::thread::scope(|s| {
        let elected = s.spawn(|| {
            time_until(
                "a new leader",
                || matches!(lab.lab.etcd_leader(), Ok(Some(l)) if l != leader),
            )
        });
        let mut attempts = 0;
        let mut failures = Vec::new();
        let created = time_until("network create after the leader's death", || {
            attempts += 1;
            let (ok, text, took) = timed(
                &lab,
                "vm2",
                &[
                    "network",
                    "create",
                    "--subnet",
                    "10.0.47.0/24",
                    "after-kill",
                ],
            );
            if !ok {
                failures.push(format!("{took:?}: {}", text.trim()));
            }
            ok
        });
        eprintln!("failed attempts: {failures:#?}");
        fault(
            NAME,
            &format!("network create succeeds after kill -9 of the leader ({attempts} attempts)"),
            ms(created),
        );
        time_until("vm3 lists the network", || {
            lists_network(&lab, "vm3", "after-kill")
        });
        fault(
            NAME,
            "network listed on vm3 after the kill",
            ms(killed.elapsed()),
        );
        let elected = elected.join().unwrap();
        fault(NAME, "new etcd leader reported after the kill", ms(elected));
    });

    let (sent, received) = ping_result(ping);
    fault(
        NAME,
        "continuous ping c2->c3 across the failover (lost/sent)",
        format!("{}/{sent}", sent - received),
    );
    assert_eq!(
        sent, received,
        "the data plane lost packets during the failover"
    );

    // The killed member comes back with its data and rejoins.
    lab.lab.start_etcd(leader).await.unwrap();
    lab.lab.wait_etcd_healthy(leader, HANG_GUARD).await.unwrap();
}

/// A daemon whose watch resumes at a revision etcd has compacted away re-lists the store
/// instead of missing what happened meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resuming_at_a_compacted_revision_relists() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let lab = TestLab::up(3).await;
    lab.network("before", "10.0.20.0/24");
    let vm3 = lab
        .lab
        .host("vm3")
        .unwrap()
        .processes()
        .iter()
        .find(|p| p.role == "daemon")
        .unwrap()
        .pid;
    // Freeze vm3's daemon, restart etcd under it (its watch connection dies), then change the
    // store and compact it past everything vm3 has seen.
    kill(Pid::from_raw(vm3 as i32), Signal::SIGSTOP).unwrap();
    assert!(lab.lab.stop_etcd(0).unwrap());
    lab.lab.start_etcd(0).await.unwrap();
    lab.lab
        .wait_etcd_healthy(0, std::time::Duration::from_secs(10))
        .await
        .unwrap();
    wait_until(|| {
        lab.sh(
            "vm2",
            &[
                "vxnet",
                "network",
                "create",
                "--subnet",
                "10.0.21.0/24",
                "after",
            ],
        )
        .status
        .success()
    });
    lab.vx("vm2", &["network", "rm", "before"]);
    let store = lab.lab.cluster_store().replace("etcd://", "http://");
    let status = lab.sh(
        "vm1",
        &[
            "etcdctl",
            "--endpoints",
            &store,
            "endpoint",
            "status",
            "-w",
            "json",
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let revision = v[0]["Status"]["header"]["revision"].as_i64().unwrap();
    let compact = lab.sh(
        "vm1",
        &[
            "etcdctl",
            "--endpoints",
            &store,
            "compact",
            &revision.to_string(),
        ],
    );
    assert!(
        compact.status.success(),
        "{}",
        String::from_utf8_lossy(&compact.stderr)
    );
    let started = std::time::Instant::now();
    kill(Pid::from_raw(vm3 as i32), Signal::SIGCONT).unwrap();
    // vm3 sees the network made while it was away and no longer lists the removed one.
    wait_until(|| {
        let ls = lab.vx("vm3", &["network", "ls"]);
        ls.contains("after") && !ls.contains("before")
    });
    println!(
        "FAULT|watch resumed at a compacted revision|daemon re-listed the store and caught up|{} ms",
        started.elapsed().as_millis()
    );
    let log = std::fs::read_to_string(lab.lab.dir().join("logs").join("vm3-daemon.log"))
        .unwrap_or_default();
    assert!(
        log.contains("re-listing"),
        "no re-list in vm3's log:\n{log}"
    );
}
