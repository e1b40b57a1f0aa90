//! A real Docker engine (Debian's docker.io 20.10) inside lab hosts (`vxnet lab docker`):
//! Docker's own legacy overlay across hosts through the lab's etcd (the seed's system, the
//! benchmarks' baseline), and nothing of it left after `lab down`. Oracles: the docker client,
//! busybox ping inside the containers, `ip` in the root namespace, /proc and the cgroup tree.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::TestLab;
use vxnet::lab::sys::{self, ProcRecord};
use vxnet::lab::{DockerOptions, LabError, TEST_IMAGE};

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

/// Polls `f` every 100 ms for up to `limit`; panics with `what` if it never holds. (A bound
/// against hangs: Docker's overlay learns of remote endpoints through gossip.)
fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < limit, "{what}: never held in {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A process as it runs now (PID and start time), to check later that it is gone.
fn running(pid: u32, role: &str) -> ProcRecord {
    let (start_time, _) = sys::stat_of(pid).unwrap_or_else(|| panic!("{role} {pid} not running"));
    ProcRecord {
        role: role.into(),
        pid,
        start_time,
        argv: vec![],
        log: Default::default(),
    }
}

/// containerd and its shims: the processes in `host`'s mount namespace named containerd….
fn containerd_processes(t: &TestLab, host: &str) -> Vec<ProcRecord> {
    let init = t.lab.host(host).unwrap().init_pid();
    let mnt = sys::ns_inode(Path::new(&format!("/proc/{init}/ns/mnt"))).unwrap();
    sys::processes_in_mount_ns(&[mnt], &[init])
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                .is_ok_and(|c| c.starts_with("containerd"))
        })
        .collect()
}

/// Cgroup directories of the lab's containers (`/sys/fs/cgroup/*/vxnet-lab-LAB-*`).
fn lab_cgroups(lab: &str) -> Vec<String> {
    let prefix = format!("vxnet-lab-{lab}-");
    let mut found = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        if let Ok(dir) = std::fs::read_dir(h.path()) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    found.push(e.path().display().to_string());
                }
            }
        }
    }
    found
}

fn container_ip(t: &TestLab, host: &str, name: &str, net: &str) -> String {
    let format = format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}");
    t.docker_ok(host, &["inspect", "-f", &format, name])
}

fn container_pid(t: &TestLab, host: &str, name: &str) -> u32 {
    t.docker_ok(host, &["inspect", "-f", "{{.State.Pid}}", name])
        .parse()
        .unwrap()
}

fn pings(t: &TestLab, host: &str, name: &str, ip: &str) -> bool {
    t.docker(host, &["exec", name, "ping", "-c", "1", "-W", "1", ip])
        .status
        .success()
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_overlay_with_cluster_store_spans_hosts_and_lab_down_leaves_nothing() {
    let links_before = common::root_links();
    let t = TestLab::up(3).await;
    let name = t.lab.name().to_string();
    let dir = t.lab.dir().to_path_buf();
    let opts = DockerOptions {
        cluster_store: true,
        ..DockerOptions::default()
    };
    t.start_docker(&["vm2", "vm3"], &opts).await;

    t.docker_ok("vm2", &["run", "--rm", "--net", "none", TEST_IMAGE, "true"]);
    // Docker's bridge is the host's, not the machine's.
    let vm2_links = text(&t.sh("vm2", &["ip", "-o", "link"]).stdout);
    assert!(vm2_links.contains("docker0"), "{vm2_links}");

    t.docker_ok(
        "vm2",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.0.9.0/24",
            "ovl",
        ],
    );
    eventually(Duration::from_secs(30), "vm3 lists ovl", || {
        t.docker_ok(
            "vm3",
            &[
                "network",
                "ls",
                "--format",
                "{{.Name}} {{.Driver}} {{.Scope}}",
            ],
        )
        .lines()
        .any(|l| l == "ovl overlay global")
    });
    for (host, c) in [("vm2", "c2"), ("vm3", "c3")] {
        t.docker_ok(
            host,
            &[
                "run", "-d", "--net", "ovl", "--name", c, TEST_IMAGE, "sleep", "600",
            ],
        );
    }
    let ip2 = container_ip(&t, "vm2", "c2", "ovl");
    let ip3 = container_ip(&t, "vm3", "c3", "ovl");
    assert!(ip2.starts_with("10.0.9.") && ip3.starts_with("10.0.9.") && ip2 != ip3);
    eventually(Duration::from_secs(30), "c3 on vm3 pings c2 on vm2", || {
        pings(&t, "vm3", "c3", &ip2)
    });
    assert!(pings(&t, "vm2", "c2", &ip3), "c2 on vm2 cannot ping c3");
    assert_eq!(
        common::root_links(),
        links_before,
        "new links in the root namespace"
    );

    // Everything Docker runs, to check afterwards by PID and start time.
    let state = t.lab.current_state().unwrap();
    let mut ours: Vec<ProcRecord> = state
        .hosts
        .iter()
        .flat_map(|h| h.processes.iter())
        .filter(|p| p.role == "dockerd")
        .cloned()
        .collect();
    assert_eq!(ours.len(), 2, "{ours:?}");
    ours.push(running(container_pid(&t, "vm2", "c2"), "container"));
    ours.push(running(container_pid(&t, "vm3", "c3"), "container"));
    for host in ["vm2", "vm3"] {
        let c = containerd_processes(&t, host);
        // containerd and one shim per running container.
        assert!(c.len() >= 2, "{host}: {c:?}");
        ours.extend(c);
    }
    assert!(!lab_cgroups(&name).is_empty());

    let TestLab { lab } = t;
    let started = Instant::now();
    let report = lab.down().unwrap();
    assert!(report.stuck.is_empty(), "{report:?}");
    let left: Vec<&ProcRecord> = ours.iter().filter(|p| p.is_alive()).collect();
    assert!(left.is_empty(), "still running after lab down: {left:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "lab down took {:?}",
        started.elapsed()
    );
    assert_eq!(lab_cgroups(&name), Vec::<String>::new());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.display().to_string();
    assert!(!mounts.contains(&dir), "mounts left under {dir}:\n{mounts}");
    assert_eq!(
        common::root_links(),
        links_before,
        "links left in the root namespace"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lab_docker_cli_exec_and_stop_docker() {
    let t = TestLab::up(3).await;
    let name = t.lab.name().to_string();
    let vxnet = |args: &[&str]| {
        Command::new(common::binary())
            .args(args)
            .output()
            .expect("run vxnet")
    };

    let out = vxnet(&["lab", "docker", "--name", &name, "vm2"]);
    assert!(out.status.success(), "{}", show(&out));
    // Plain `docker` in `lab exec` finds the host's engine (DOCKER_HOST is set).
    let out = vxnet(&[
        "lab", "exec", "--name", &name, "vm2", "--", "docker", "run", "--rm", "--net", "none",
        TEST_IMAGE, "true",
    ]);
    assert!(out.status.success(), "{}", show(&out));
    // vm3 has no engine: its client does not reach vm2's.
    let out = vxnet(&["lab", "exec", "--name", &name, "vm3", "--", "docker", "ps"]);
    assert!(!out.status.success(), "{}", show(&out));
    let dockerd = |t: &TestLab| {
        t.lab.current_state().unwrap().hosts[1]
            .processes
            .iter()
            .find(|p| p.role == "dockerd")
            .cloned()
    };
    let first = dockerd(&t).expect("dockerd recorded on vm2");
    // Again: the running engine is kept.
    let out = vxnet(&["lab", "docker", "--name", &name, "vm2"]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(dockerd(&t).unwrap().pid, first.pid);
    let out = vxnet(&["lab", "status", "--name", &name]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(text(&out.stdout).contains("dockerd"), "{}", show(&out));

    match t.lab.start_docker("vm1", &DockerOptions::default()).await {
        Err(LabError::InvalidOption(m)) => assert!(m.contains("etcd"), "{m}"),
        other => panic!("dockerd on vm1: {other:?}"),
    }

    t.docker_ok(
        "vm2",
        &["run", "-d", "--name", "sleeper", TEST_IMAGE, "sleep", "600"],
    );
    let container = running(container_pid(&t, "vm2", "sleeper"), "container");
    let containerd = containerd_processes(&t, "vm2");
    assert!(t.lab.stop_docker("vm2").unwrap());
    assert!(!first.is_alive() && !container.is_alive());
    assert!(containerd.iter().all(|p| !p.is_alive()), "{containerd:?}");
    assert!(
        dockerd(&t).is_none(),
        "the stopped dockerd is still recorded"
    );
    assert_eq!(lab_cgroups(&name), Vec::<String>::new());
    // A stopped engine is not a dead lab process.
    let out = vxnet(&["lab", "status", "--name", &name]);
    assert!(out.status.success(), "{}", show(&out));

    // Started again: same data root (the image is still there).
    t.lab
        .start_docker("vm2", &DockerOptions::default())
        .await
        .unwrap();
    t.docker_ok("vm2", &["run", "--rm", "--net", "none", TEST_IMAGE, "true"]);
}
