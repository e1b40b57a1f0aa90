//! The real CNI clients inside lab hosts: containerd 1.6 (`ctr run --cni`) and Podman 4.3 (CNI
//! backend) on one network made of the reference plugins, and nothing of them left after
//! `lab down`. Oracles: ctr, podman, busybox ip and ping inside the containers, /proc, the
//! cgroup tree, the machine's /run/netns and root namespace.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use common::TestLab;
use vxnet::lab::sys::{self, ProcRecord};
use vxnet::lab::{DockerOptions, Host, TEST_IMAGE};

const NET: &str = "labnet";
/// Only reference plugins: a bridge in vm2's network namespace, host-local addresses.
const CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "labnet",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni-lab0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.88.7.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}"#;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(mut cmd: Command) -> String {
    let out: Output = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_string()
}

fn with(mut cmd: Command, args: &[&str]) -> Command {
    cmd.args(args);
    cmd
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

/// The processes in `host`'s mount namespace whose command name starts with `comm`.
fn host_processes(host: &Host, comm: &str) -> Vec<ProcRecord> {
    let init = host.init_pid();
    let mnt = sys::ns_inode(Path::new(&format!("/proc/{init}/ns/mnt"))).unwrap();
    sys::processes_in_mount_ns(&[mnt], &[init])
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                .is_ok_and(|c| c.starts_with(comm))
        })
        .map(|p| ProcRecord {
            role: comm.into(),
            ..p
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

/// The hierarchies holding cgroup `rel` (`a/b`).
fn cgroup_exists(rel: &str) -> Vec<String> {
    std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|h| h.path().join(rel))
        .filter(|p| p.is_dir())
        .map(|p| p.display().to_string())
        .collect()
}

/// The machine's named network namespaces.
fn machine_netns() -> BTreeSet<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The machine's own directories of the CNI runtimes (each lab host has private ones in
/// their place): what they hold and when they last changed.
fn machine_dirs() -> Vec<(String, Vec<String>, Option<std::time::SystemTime>)> {
    [
        "/etc/cni",
        "/etc/cni/net.d",
        "/opt/cni/bin",
        "/var/lib/cni",
        "/var/lib/containerd",
        "/var/lib/containers",
        "/etc/containers",
        "/var/cache/containers",
        "/opt",
    ]
    .iter()
    .map(|d| {
        let mut entries: Vec<String> = std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        entries.sort();
        let modified = std::fs::metadata(d).and_then(|m| m.modified()).ok();
        (d.to_string(), entries, modified)
    })
    .collect()
}

/// The IPv4 address on a container's eth0, from `ip -4 -o addr` run inside it.
fn eth0_addr(out: &str) -> String {
    let addr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no inet address in {out:?}"));
    addr.split('/').next().unwrap().to_string()
}

fn ctr(host: &Host, args: &[&str]) -> String {
    ok(with(host.ctr().unwrap(), args))
}

fn podman(host: &Host, args: &[&str]) -> String {
    ok(with(host.podman().unwrap(), args))
}

fn ctr_addr(host: &Host, id: &str) -> String {
    let exec = format!("addr-{id}");
    eth0_addr(&ctr(
        host,
        &[
            "task",
            "exec",
            "--exec-id",
            &exec,
            id,
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "eth0",
        ],
    ))
}

fn ctr_pid(host: &Host, id: &str) -> u32 {
    let ls = ctr(host, &["task", "ls"]);
    ls.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f[1].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no task {id}: {ls}"))
}

fn podman_addr(host: &Host, name: &str) -> String {
    let addr = eth0_addr(&podman(
        host,
        &["exec", name, "ip", "-4", "-o", "addr", "show", "eth0"],
    ));
    let format = format!("{{{{.NetworkSettings.Networks.{NET}.IPAddress}}}}");
    assert_eq!(podman(host, &["inspect", "-f", &format, name]), addr);
    addr
}

fn podman_pid(host: &Host, name: &str) -> u32 {
    podman(host, &["inspect", "-f", "{{.State.Pid}}", name])
        .parse()
        .unwrap()
}

fn ctr_pings(host: &Host, id: &str, ip: &str) -> bool {
    let exec = format!("ping-{id}-{}", ip.replace('.', "-"));
    with(
        host.ctr().unwrap(),
        &[
            "task",
            "exec",
            "--exec-id",
            &exec,
            id,
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            ip,
        ],
    )
    .output()
    .unwrap()
    .status
    .success()
}

fn podman_pings(host: &Host, name: &str, ip: &str) -> bool {
    with(
        host.podman().unwrap(),
        &["exec", name, "ping", "-c", "1", "-W", "2", ip],
    )
    .output()
    .unwrap()
    .status
    .success()
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_and_podman_share_a_cni_network_and_lab_down_leaves_nothing() {
    let links_before = common::root_links();
    let netns_before = machine_netns();
    let libpod_parent_before = cgroup_exists("libpod_parent");
    let t = TestLab::up(3).await;
    // After `lab up`, which makes missing mount points for the private directories.
    let dirs_before = machine_dirs();
    let name = t.lab.name().to_string();
    let dir = t.lab.dir().to_path_buf();
    let vm2 = t.lab.host("vm2").unwrap().clone();

    t.lab.start_containerd("vm2").await.unwrap();
    t.lab
        .install_cni("vm2", &[], &[("10-labnet.conflist", CONFLIST)])
        .unwrap();
    t.lab.import_podman_image("vm2").unwrap();

    // c1 and p1 are removed by their clients before `lab down`; c2 and p2 are left running
    // for it, and so is p3, started as `lab exec vm2 -- podman run …` would (no cgroup
    // parent: Podman puts it in /libpod_parent).
    for id in ["c1", "c2"] {
        ok(t.lab
            .ctr_run("vm2", id, &["-d"], &["sleep", "600"])
            .unwrap());
    }
    for c in ["p1", "p2"] {
        ok(with(
            vm2.podman_run().unwrap(),
            &[
                "-d",
                "--name",
                c,
                "--network",
                NET,
                TEST_IMAGE,
                "sleep",
                "600",
            ],
        ));
    }
    let p3 = podman(
        &vm2,
        &[
            "run",
            "-d",
            "--name",
            "p3",
            "--network",
            NET,
            TEST_IMAGE,
            "sleep",
            "600",
        ],
    );

    let addrs = [
        ctr_addr(&vm2, "c1"),
        ctr_addr(&vm2, "c2"),
        podman_addr(&vm2, "p1"),
        podman_addr(&vm2, "p2"),
        podman_addr(&vm2, "p3"),
    ];
    let distinct: BTreeSet<&String> = addrs.iter().collect();
    assert_eq!(distinct.len(), addrs.len(), "{addrs:?}");
    assert!(addrs.iter().all(|a| a.starts_with("10.88.7.")), "{addrs:?}");
    assert!(ctr_pings(&vm2, "c1", &addrs[2]), "c1 cannot ping p1");
    assert!(podman_pings(&vm2, "p1", &addrs[0]), "p1 cannot ping c1");
    assert!(ctr_pings(&vm2, "c2", &addrs[4]), "c2 cannot ping p3");
    // ctr writes no resolv.conf: the root filesystem's names vxnet's name server.
    let resolv = ctr(
        &vm2,
        &[
            "task",
            "exec",
            "--exec-id",
            "resolv",
            "c1",
            "cat",
            "/etc/resolv.conf",
        ],
    );
    assert_eq!(resolv, "nameserver 169.254.53.53");
    // Podman's network namespaces are in the host's /run, not the machine's.
    let host_netns = std::fs::read_dir(format!("/proc/{}/root/run/netns", vm2.init_pid()))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("netns-"))
        .count();
    assert_eq!(host_netns, 3);
    assert_eq!(machine_netns(), netns_before);
    assert_eq!(
        common::root_links(),
        links_before,
        "new links in the root namespace"
    );

    // Everything the runtimes run, to check afterwards by PID and start time.
    let state = t.lab.current_state().unwrap();
    let mut ours: Vec<ProcRecord> = state.hosts[1]
        .processes
        .iter()
        .filter(|p| p.role == "containerd")
        .cloned()
        .collect();
    assert_eq!(ours.len(), 1, "{:?}", state.hosts[1].processes);
    let shims = host_processes(&vm2, "containerd-shim");
    assert_eq!(shims.len(), 2, "one shim per ctr container: {shims:?}");
    // Not those of `podman exec` sessions (gone once each has written its exit code).
    let conmons: Vec<ProcRecord> = host_processes(&vm2, "conmon")
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{}/cmdline", p.pid)).is_ok_and(|c| {
                !c.split(|b| *b == 0)
                    .any(|a| a == b"-e" || a.starts_with(b"--exec"))
            })
        })
        .collect();
    assert_eq!(
        conmons.len(),
        3,
        "one conmon per Podman container: {conmons:?}"
    );
    ours.extend(shims);
    ours.extend(conmons);
    let c1 = running(ctr_pid(&vm2, "c1"), "c1");
    let p1 = running(podman_pid(&vm2, "p1"), "p1");
    let p1_id = podman(&vm2, &["inspect", "-f", "{{.Id}}", "p1"]);
    ours.push(running(ctr_pid(&vm2, "c2"), "c2"));
    ours.push(running(podman_pid(&vm2, "p2"), "p2"));
    ours.push(running(podman_pid(&vm2, "p3"), "p3"));
    let parent = format!("vxnet-lab-{name}-vm2");
    assert!(!cgroup_exists(&format!("{parent}/c1")).is_empty());
    assert!(!cgroup_exists(&format!("{parent}/libpod-{p1_id}")).is_empty());
    assert!(!cgroup_exists(&format!("{parent}/conmon")).is_empty());
    let p3_cgroup = format!("libpod_parent/libpod-{p3}");
    assert!(!cgroup_exists(&p3_cgroup).is_empty());

    // Removed by their clients.
    ctr(&vm2, &["task", "kill", "-s", "SIGKILL", "c1"]);
    ctr(&vm2, &["task", "rm", "-f", "c1"]);
    ctr(&vm2, &["container", "rm", "c1"]);
    podman(&vm2, &["rm", "-f", "-t", "0", "p1"]);
    assert!(!c1.is_alive() && !p1.is_alive());
    assert_eq!(cgroup_exists(&format!("{parent}/c1")), Vec::<String>::new());
    assert_eq!(
        cgroup_exists(&format!("{parent}/libpod-{p1_id}")),
        Vec::<String>::new()
    );
    // Podman's DEL gave p1's address back (ctr 1.6 calls DEL only for `ctr run --rm`).
    let ipam = format!("/proc/{}/root/var/lib/cni/networks/{NET}", vm2.init_pid());
    assert!(!Path::new(&ipam).join(&addrs[2]).exists());
    assert!(Path::new(&ipam).join(&addrs[3]).exists());

    let TestLab { lab } = t;
    let report = lab.down().unwrap();
    assert!(report.stuck.is_empty(), "{report:?}");
    let left: Vec<&ProcRecord> = ours.iter().filter(|p| p.is_alive()).collect();
    assert!(left.is_empty(), "still running after lab down: {left:?}");
    assert_eq!(lab_cgroups(&name), Vec::<String>::new());
    assert_eq!(cgroup_exists(&p3_cgroup), Vec::<String>::new());
    if libpod_parent_before.is_empty() {
        assert_eq!(cgroup_exists("libpod_parent"), Vec::<String>::new());
    }
    assert_eq!(machine_netns(), netns_before);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.display().to_string();
    assert!(!mounts.contains(&dir), "mounts left under {dir}:\n{mounts}");
    assert_eq!(
        common::root_links(),
        links_before,
        "links left in the root namespace"
    );
    assert_eq!(
        machine_dirs(),
        dirs_before,
        "the machine's runtime directories changed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_containerd_and_podman_on_one_host_are_stopped_apart() {
    let t = TestLab::up(3).await;
    let name = t.lab.name().to_string();
    let vm3 = t.lab.host("vm3").unwrap().clone();
    t.start_docker(&["vm3"], &DockerOptions::default()).await;
    t.lab.start_containerd("vm3").await.unwrap();
    // Again: the running containerd is kept.
    t.lab.start_containerd("vm3").await.unwrap();
    let containerd: Vec<ProcRecord> = t.lab.current_state().unwrap().hosts[2]
        .processes
        .iter()
        .filter(|p| p.role == "containerd")
        .cloned()
        .collect();
    assert_eq!(containerd.len(), 1);
    assert!(t.lab.start_containerd("vm1").await.is_err());
    t.lab
        .install_cni("vm3", &[], &[("10-labnet.conflist", CONFLIST)])
        .unwrap();
    t.lab.import_podman_image("vm3").unwrap();

    let docker_id = t.docker_ok(
        "vm3",
        &["run", "-d", "--net", "none", TEST_IMAGE, "sleep", "600"],
    );
    let docker_pid = t.docker_ok("vm3", &["inspect", "-f", "{{.State.Pid}}", &docker_id]);
    let d = running(docker_pid.parse().unwrap(), "docker container");
    ok(t.lab
        .ctr_run("vm3", "c1", &["-d"], &["sleep", "600"])
        .unwrap());
    let c = running(ctr_pid(&vm3, "c1"), "c1");
    ok(with(
        vm3.podman_run().unwrap(),
        &[
            "-d",
            "--name",
            "p1",
            "--network",
            NET,
            TEST_IMAGE,
            "sleep",
            "600",
        ],
    ));
    let p = running(podman_pid(&vm3, "p1"), "p1");
    let shims: Vec<ProcRecord> = host_processes(&vm3, "containerd-shim")
        .into_iter()
        .filter(|s| {
            std::fs::read(format!("/proc/{}/cmdline", s.pid))
                .is_ok_and(|c| text(&c).contains("/run/containerd-lab/"))
        })
        .collect();
    assert_eq!(shims.len(), 1, "{shims:?}");

    assert!(t.lab.stop_docker("vm3").unwrap());
    assert!(!d.is_alive(), "Docker's container survived stop_docker");
    assert!(
        c.is_alive() && p.is_alive(),
        "stop_docker took others' containers"
    );
    assert!(containerd[0].is_alive() && shims[0].is_alive());
    ctr(&vm3, &["version"]);

    assert!(t.lab.stop_containerd("vm3").unwrap());
    assert!(!c.is_alive() && !containerd[0].is_alive() && !shims[0].is_alive());
    assert!(p.is_alive(), "stop_containerd took Podman's container");
    assert_eq!(
        cgroup_exists(&format!("vxnet-lab-{name}-vm3/c1")),
        Vec::<String>::new()
    );
    assert!(t.lab.current_state().unwrap().hosts[2]
        .processes
        .iter()
        .all(|p| p.role != "containerd"));
    assert!(!t.lab.stop_containerd("vm3").unwrap());

    // Started again on the same root: the container is still known, its task gone.
    t.lab.start_containerd("vm3").await.unwrap();
    ctr(&vm3, &["container", "rm", "c1"]);
    ok(t.lab.ctr_run("vm3", "c2", &["--rm"], &["true"]).unwrap());

    let TestLab { lab } = t;
    let report = lab.down().unwrap();
    assert!(report.stuck.is_empty(), "{report:?}");
    assert!(!p.is_alive());
    assert_eq!(lab_cgroups(&name), Vec::<String>::new());
}
