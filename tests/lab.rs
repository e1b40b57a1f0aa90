//! The real lab (`vxnet lab up/exec/status/down`): the seed's three VMs as namespaces.
//! Every lab here has a unique name (`t-<pid>-<n>`) and is downed by a guard, also when an
//! assertion fails. The checks use independent oracles: `ip`, `ping`, `etcdctl`,
//! /proc/self/mountinfo and a scan of /proc.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vxnet::lab::{Host, Lab, LabError, LabGuard, LabNameGuard, LabOptions};

fn lab_name() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "t-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn lab_dir(name: &str) -> PathBuf {
    Path::new("/run/vxnet-lab").join(name)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// `vxnet ARGS…` (the CLI, as a user runs it).
fn vxnet(args: &[&str]) -> Output {
    Command::new(common::binary())
        .args(args)
        .output()
        .expect("run vxnet")
}

/// Runs `args` on `host` through the library's host command.
fn on(host: &Host, args: &[&str]) -> Output {
    host.command(args[0])
        .expect("host command")
        .args(&args[1..])
        .output()
        .expect("run on host")
}

async fn up(name: &str) -> LabGuard {
    match Lab::up(LabOptions::new(name, common::binary())).await {
        Ok(lab) => LabGuard::new(lab),
        Err(e) => panic!("lab up {name}: {e}"),
    }
}

/// (device, inode) of each of the lab's network namespaces, read while it is up.
fn lab_netns(lab: &Lab) -> Vec<(u64, u64)> {
    std::iter::once(lab.switch_netns_path().to_path_buf())
        .chain(lab.hosts().iter().map(|h| h.netns_path().to_path_buf()))
        .map(|p| {
            let m = std::fs::metadata(&p).expect("netns file");
            (m.dev(), m.ino())
        })
        .collect()
}

/// Nothing of lab `name` is left: no file, no mount, no process naming its directory, no
/// process inside one of its network namespaces.
fn assert_gone(name: &str, netns: &[(u64, u64)]) {
    let dir = lab_dir(name);
    let dir_s = dir.display().to_string();
    assert!(!dir.exists(), "{dir_s} still exists");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mountinfo.lines() {
        assert!(
            !line.contains(&format!("{dir_s}/")) && !line.contains(&format!("{dir_s} ")),
            "mount left: {line}"
        );
    }
    for e in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let names_dir = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .any(|a| a == dir_s || a.contains(&format!("{dir_s}/")));
        assert!(
            !names_dir,
            "process {pid} left running: {}",
            text(&cmdline).replace('\0', " ")
        );
        if let Ok(m) = std::fs::metadata(e.path().join("ns/net")) {
            assert!(
                !netns.contains(&(m.dev(), m.ino())),
                "process {pid} still in a lab namespace: {}",
                text(&cmdline).replace('\0', " ")
            );
        }
    }
}

/// The seed's topology through the CLI: `lab up` returns and its processes stay; the hosts
/// reach each other, have their own hostname and /run; etcd answers on vm1; a network made
/// on vm2 shows on vm3; `lab down` (twice) leaves nothing, and the root namespace never
/// gained a link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lab_is_the_seeds_three_vms() {
    let name = lab_name();
    let links_before = common::root_links();
    let bin = common::binary();
    let bin = bin.to_str().unwrap();
    let started = Instant::now();
    let out = vxnet(&["lab", "up", "--name", &name]);
    let _guard = LabNameGuard::new(&name);
    assert!(out.status.success(), "{}", show(&out));
    eprintln!("lab up (3 hosts, CLI) took {:?}", started.elapsed());
    let stdout = text(&out.stdout);
    for want in [
        "vm1",
        "192.0.2.5",
        "vm2",
        "192.0.2.6",
        "vm3",
        "192.0.2.7",
        "etcd",
    ] {
        assert!(
            stdout.contains(want),
            "lab up output lacks {want}:\n{stdout}"
        );
    }

    // The CLI has exited; the lab's processes outlive it.
    let lab = Lab::open(&name).unwrap();
    assert!(lab.is_alive(), "{:?}", lab.state());
    assert_eq!(lab.hosts().len(), 3);
    let netns = lab_netns(&lab);
    assert_eq!(
        common::root_links(),
        links_before,
        "the root namespace gained or lost a link"
    );

    let (vm1, vm2, vm3) = (
        lab.host("vm1").unwrap(),
        lab.host("vm2").unwrap(),
        lab.host("vm3").unwrap(),
    );
    assert_eq!(vm3.addr().to_string(), "192.0.2.7");

    // vm2 pings vm3 over the switch.
    let ping = on(vm2, &["ping", "-c", "1", "-W", "3", "192.0.2.7"]);
    assert!(ping.status.success(), "{}", show(&ping));
    let ipaddr = on(vm3, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(
        text(&ipaddr.stdout).contains("192.0.2.7/24"),
        "{}",
        show(&ipaddr)
    );
    // The host has its own sysfs: /sys/class/net shows its devices, not the machine's.
    let mtu = on(vm3, &["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(text(&mtu.stdout).trim(), "1500", "{}", show(&mtu));
    let devs = on(vm3, &["ls", "/sys/class/net"]);
    let devs: BTreeSet<String> = text(&devs.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(devs, BTreeSet::from(["eth0".to_string(), "lo".to_string()]));
    let cg = on(
        vm3,
        &["sh", "-c", "grep -c ' /sys/fs/cgroup' /proc/self/mountinfo"],
    );
    let machine_cg = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(" /sys/fs/cgroup"))
        .count();
    assert_eq!(
        text(&cg.stdout).trim(),
        machine_cg.to_string(),
        "cgroup mounts kept"
    );

    // Own hostnames.
    for h in [vm1, vm2, vm3] {
        let out = on(h, &["hostname"]);
        assert_eq!(text(&out.stdout).trim(), h.name(), "{}", show(&out));
    }
    // Own /run: a file written in vm2's /run is seen neither on vm3 nor on the machine.
    let probe = format!("/run/vxnet-lab-probe-{name}");
    let w = on(
        vm2,
        &["sh", "-c", &format!("echo hi > {probe} && cat {probe}")],
    );
    assert_eq!(text(&w.stdout).trim(), "hi", "{}", show(&w));
    assert!(!on(vm3, &["test", "-e", &probe]).status.success());
    assert!(!Path::new(&probe).exists(), "{probe} leaked to the machine");
    // …and its own /var/lib/vxnet (the daemon's state dir).
    let ls2 = on(vm2, &["cat", "/var/lib/vxnet/node-id"]);
    let ls3 = on(vm3, &["cat", "/var/lib/vxnet/node-id"]);
    assert!(ls2.status.success() && ls3.status.success());
    assert_ne!(ls2.stdout, ls3.stdout, "vm2 and vm3 share a node ID");

    // etcd on vm1, asked with etcdctl on vm1.
    let health = vxnet(&[
        "lab",
        "exec",
        "--name",
        &name,
        "vm1",
        "--",
        "etcdctl",
        "--endpoints",
        "http://192.0.2.5:2379",
        "endpoint",
        "health",
    ]);
    assert!(health.status.success(), "{}", show(&health));
    // (etcdctl 3.4 prints the verdict on stderr.)
    assert!(
        show(&health).contains("http://192.0.2.5:2379 is healthy"),
        "{}",
        show(&health)
    );

    // The daemons' sockets are reachable from outside the hosts; node names come from the
    // hosts' hostnames.
    let info = vm2.client().info().await.unwrap();
    assert!(info.registered);
    assert_eq!(info.node.name, "vm2");
    assert_eq!(info.nodes.len(), 2);

    // The seed's network create on vm2, network ls on vm3, each through `lab exec`.
    let create = vxnet(&[
        "lab",
        "exec",
        "--name",
        &name,
        "vm2",
        "--",
        bin,
        "network",
        "create",
        "--subnet",
        "10.0.4.0/24",
        "my-net",
    ]);
    assert!(create.status.success(), "{}", show(&create));
    let mut listed = String::new();
    for _ in 0..100 {
        let ls = vxnet(&[
            "lab", "exec", "--name", &name, "vm3", "--", bin, "network", "ls",
        ]);
        assert!(ls.status.success(), "{}", show(&ls));
        listed = text(&ls.stdout);
        if listed.contains("my-net") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        listed.contains("my-net") && listed.contains("global"),
        "{listed}"
    );

    // Exit codes pass through `lab exec`.
    let code = vxnet(&[
        "lab", "exec", "--name", &name, "vm3", "--", "sh", "-c", "exit 7",
    ]);
    assert_eq!(code.status.code(), Some(7));
    let missing = vxnet(&[
        "lab",
        "exec",
        "--name",
        &name,
        "vm3",
        "--",
        "no-such-command-x",
    ]);
    assert_eq!(missing.status.code(), Some(127), "{}", show(&missing));
    assert!(
        text(&missing.stderr).contains("no-such-command-x: command not found on vm3"),
        "{}",
        show(&missing)
    );

    // `lab status` lists every process as running.
    let status = vxnet(&["lab", "status", "--name", &name]);
    assert!(status.status.success(), "{}", show(&status));
    assert_eq!(text(&status.stdout).matches("running").count(), 6);

    assert_eq!(
        common::root_links(),
        links_before,
        "the root namespace gained or lost a link"
    );

    let down = vxnet(&["lab", "down", "--name", &name]);
    assert!(down.status.success(), "{}", show(&down));
    assert!(
        text(&down.stdout).contains("6 process(es) stopped"),
        "{}",
        show(&down)
    );
    assert_gone(&name, &netns);
    let again = vxnet(&["lab", "down", "--name", &name]);
    assert!(again.status.success(), "{}", show(&again));
    assert!(text(&again.stdout).contains("not up"), "{}", show(&again));
    assert_eq!(
        common::root_links(),
        links_before,
        "the root namespace's links changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_up_fails_clearly_and_keeps_the_first() {
    let name = lab_name();
    let lab = up(&name).await;
    let err = Lab::up(LabOptions::new(&name, common::binary()))
        .await
        .unwrap_err();
    assert!(matches!(err, LabError::AlreadyUp { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&format!(
            "lab {name} is already up: `vxnet lab down --name {name}` first"
        )),
        "{err}"
    );
    // The CLI says the same, with exit status 1.
    let out = vxnet(&["lab", "up", "--name", &name]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is already up"),
        "{}",
        show(&out)
    );

    // The first lab is intact.
    assert!(lab.is_alive());
    let reopened = Lab::open(&name).unwrap();
    assert_eq!(reopened.state().hosts.len(), 3);
    let ping = on(
        lab.host("vm3").unwrap(),
        &["ping", "-c", "1", "-W", "3", "192.0.2.6"],
    );
    assert!(ping.status.success(), "{}", show(&ping));
    assert!(
        lab.host("vm3")
            .unwrap()
            .client()
            .info()
            .await
            .unwrap()
            .registered
    );

    let netns = lab_netns(&lab);
    let report = lab.down().unwrap();
    assert_eq!(report.stopped, 6);
    assert!(report.stuck.is_empty() && report.strangers.is_empty());
    assert_gone(&name, &netns);
    assert!(!Lab::down_by_name(&name).unwrap().existed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_after_kill_9_still_cleans_up() {
    let name = lab_name();
    let lab = up(&name).await;
    let netns = lab_netns(&lab);
    let pids: Vec<u32> = lab
        .hosts()
        .iter()
        .flat_map(|h| std::iter::once(h.init()).chain(h.processes()))
        .map(|p| p.pid)
        .collect();
    assert_eq!(pids.len(), 6);
    for pid in &pids {
        let k = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(k.success());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while lab
        .hosts()
        .iter()
        .any(|h| h.init().is_alive() || h.processes().iter().any(|p| p.is_alive()))
    {
        assert!(Instant::now() < deadline, "processes survived kill -9");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The crashed lab is still known: status says dead, exec says the host is down.
    let status = vxnet(&["lab", "status", "--name", &name]);
    assert_eq!(status.status.code(), Some(1), "{}", show(&status));
    assert_eq!(
        text(&status.stdout).matches("dead").count(),
        6,
        "{}",
        show(&status)
    );
    let err = lab.host("vm2").unwrap().command("true").unwrap_err();
    assert!(matches!(err, LabError::HostDown { .. }), "{err}");
    let exec = vxnet(&["lab", "exec", "--name", &name, "vm2", "--", "true"]);
    assert_eq!(exec.status.code(), Some(1));
    assert!(text(&exec.stderr).contains("is down"), "{}", show(&exec));

    let report = lab.down().unwrap();
    assert!(report.existed);
    assert_eq!((report.stopped, report.gone), (0, 6));
    assert_gone(&name, &netns);
}

#[test]
fn missing_etcd_is_a_clear_error_and_leaves_nothing() {
    let name = lab_name();
    let _guard = LabNameGuard::new(&name);
    let out = Command::new(common::binary())
        .args(["lab", "up", "--name", &name])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("etcd not found on PATH") && err.contains("apt-get install etcd-server"),
        "{err}"
    );
    assert_gone(&name, &[]);
}

fn fake_etcd(script: &str) -> (common_tmp::TempDir, String) {
    let dir = common_tmp::TempDir::new();
    let path = dir.0.join("etcd");
    std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let search = format!(
        "{}:{}",
        dir.0.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (dir, search)
}

mod common_tmp {
    pub struct TempDir(pub std::path::PathBuf);
    impl TempDir {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(format!(
                "vxnet-labtest-{}-{:08x}",
                std::process::id(),
                rand_u32()
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn rand_u32() -> u32 {
        use std::time::{SystemTime, UNIX_EPOCH};
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    }
}

/// etcd failing after the namespaces and hosts exist: `lab up` reports etcd's own words and
/// removes everything it made.
#[test]
fn failure_half_way_leaves_nothing_behind() {
    let name = lab_name();
    let _guard = LabNameGuard::new(&name);
    let (_tmp, path) = fake_etcd("echo 'fake etcd: disk on fire' >&2\nexit 3");
    let out = Command::new(common::binary())
        .args(["lab", "up", "--name", &name])
        .env("PATH", path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("etcd on vm1 failed") && err.contains("fake etcd: disk on fire"),
        "{err}"
    );
    assert_gone(&name, &[]);
}

/// Ctrl-C while `lab up` waits (here for an etcd that never answers) removes what was made.
#[test]
fn interrupted_up_leaves_nothing_behind() {
    let name = lab_name();
    let _guard = LabNameGuard::new(&name);
    let (_tmp, path) = fake_etcd("exec sleep 600");
    let child = Command::new(common::binary())
        .args(["lab", "up", "--name", &name])
        .env("PATH", path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the fake etcd runs (recorded in lab.json), then interrupt.
    let state = lab_dir(&name).join("lab.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = std::fs::read_to_string(&state).unwrap_or_default();
        if s.contains("\"role\": \"etcd\"") {
            break;
        }
        assert!(Instant::now() < deadline, "etcd never started: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let netns: Vec<(u64, u64)> = std::fs::read_dir(lab_dir(&name).join("netns"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(text(&out.stderr).contains("interrupted"), "{}", show(&out));
    assert_gone(&name, &netns);
}
