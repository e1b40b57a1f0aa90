//! Real CNI runtimes on vxnet: containerd 1.6 (`ctr run --cni`) on vm3 and Podman 4.3 (CNI
//! backend) on vm4 join the same vxnet network as a Docker container on vm2 and a `vxnet run`
//! container, each through its own path (CNI plugin, Docker plugin, vxnet's API). Every pair
//! pings and resolves the other across hosts; containerd's leak (a task killed without DEL)
//! is cleaned up; a Podman `-p` port, through the chained `portmap`, answers from another
//! host; `tuning` is applied after vxnet in the chain.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::dns::wait_for;
use common::TestLab;
use serde_json::Value;
use vxnet::lab::{DockerOptions, TEST_IMAGE};

const CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "shared",
  "plugins": [
    { "type": "vxnet", "network": "shared", "capabilities": { "aliases": true } },
    { "type": "portmap", "capabilities": { "portMappings": true } },
    { "type": "tuning", "sysctl": { "net.ipv4.conf.eth0.accept_local": "1" } }
  ]
}"#;

/// Runs a command with one argument in one container, whichever runtime runs it.
type InContainer<'a> = Box<dyn Fn(&str) -> Output + 'a>;

/// A fresh `ctr task exec --exec-id` (one that failed half-way may linger under its ID).
fn exec_id() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!(
        "x{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The vxnet view of container `name` on `host` (`vxnet ps`): its overlay address.
fn cni_ip(lab: &TestLab, host: &str, name: &str) -> String {
    let mut ip = None;
    wait_for(
        Duration::from_secs(10),
        &format!("{name} on {host}"),
        || {
            let ps: Value =
                serde_json::from_str(&lab.vx(host, &["ps", "--format", "json"])).unwrap();
            ip = ps
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .map(|c| c["attachments"][0]["ip"].as_str().unwrap().to_string());
            ip.is_some()
        },
    );
    ip.unwrap()
}

fn log_tail(lab: &TestLab, host: &str) -> String {
    let log = lab
        .lab
        .dir()
        .join("logs")
        .join(format!("{host}-daemon.log"));
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

fn listed_on(lab: &TestLab, host: &str, ip: &str) -> bool {
    let v: Value = serde_json::from_str(&lab.vx(host, &["network", "inspect", "shared"])).unwrap();
    v[0]["endpoints"]
        .as_array()
        .is_some_and(|eps| eps.iter().any(|e| e["ip"] == ip))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_podman_docker_and_vxnet_run_share_one_network() {
    let lab = TestLab::up(4).await;
    lab.network("shared", "10.0.50.0/24");
    let plugin = Path::new(env!("CARGO_BIN_EXE_vxnet-cni"));

    // vm2: Docker through vxnet's Docker plugin, and a `vxnet run` container.
    let opts = DockerOptions {
        extra_args: vec!["--dns".into(), vxnet::dns::LISTEN_ADDR.to_string()],
        ..Default::default()
    };
    lab.start_docker(&["vm2"], &opts).await;
    lab.docker_ok(
        "vm2",
        &[
            "network",
            "create",
            "-d",
            "vxnet",
            "--ipam-driver",
            "vxnet",
            "--subnet",
            "10.0.50.0/24",
            "-o",
            "vxnet.network=shared",
            "shared",
        ],
    );
    lab.docker_ok(
        "vm2",
        &[
            "run", "-d", "--name", "d2", "--net", "shared", TEST_IMAGE, "sleep", "600",
        ],
    );
    let d2 = lab.docker_ok(
        "vm2",
        &[
            "inspect",
            "-f",
            "{{(index .NetworkSettings.Networks \"shared\").IPAddress}}",
            "d2",
        ],
    );
    let v2 = lab.container("vm2", "v2", "shared");

    // vm3: containerd, `ctr run --cni` with vxnet first in the conflist.
    let l = &lab.lab;
    l.start_containerd("vm3").await.expect("containerd on vm3");
    l.install_cni(
        "vm3",
        &[("vxnet", plugin)],
        &[("10-shared.conflist", CONFLIST)],
    )
    .expect("CNI on vm3");
    let ctr = |args: &[&str]| {
        let mut cmd = l.host("vm3").unwrap().ctr().unwrap();
        cmd.args(args);
        cmd.output().unwrap()
    };
    let ctr_run = |id: &str, flags: &[&str], argv: &[&str]| {
        l.ctr_run("vm3", id, flags, argv).unwrap().output().unwrap()
    };
    ok(&ctr_run("c3", &["-d"], &["sleep", "600"]), "ctr run c3");
    let c3_name = format!("{}-c3", l.host("vm3").unwrap().containerd_namespace());
    let c3 = cni_ip(&lab, "vm3", &c3_name);

    // vm4: Podman, the same conflist (a Podman network named `shared`).
    l.install_cni(
        "vm4",
        &[("vxnet", plugin)],
        &[("shared.conflist", CONFLIST)],
    )
    .expect("CNI on vm4");
    l.import_podman_image("vm4").expect("image on vm4");
    let podman = |args: &[&str]| {
        let mut cmd = l.host("vm4").unwrap().podman().unwrap();
        cmd.args(args);
        cmd.output().unwrap()
    };
    let mut run = l.host("vm4").unwrap().podman_run().unwrap();
    run.args([
        "-d",
        "--name",
        "p4",
        "--network",
        "shared",
        "--network-alias",
        "web",
        "-p",
        "8089:80",
        TEST_IMAGE,
        "sh",
        "-c",
        "echo from-p4 | nc -l -p 80; sleep 600",
    ]);
    ok(&run.output().unwrap(), "podman run p4");
    let p4 = cni_ip(&lab, "vm4", "p4");

    // Every pair pings the other, across hosts, whoever attached it.
    let ping_from: [(&str, InContainer); 4] = [
        (
            "d2",
            Box::new(|ip: &str| {
                lab.docker("vm2", &["exec", "d2", "ping", "-c", "1", "-W", "2", ip])
            }),
        ),
        (
            "v2",
            Box::new(|ip: &str| {
                lab.sh(
                    "vm2",
                    &[
                        "vxnet", "exec", "v2", "--", "ping", "-c", "1", "-W", "2", ip,
                    ],
                )
            }),
        ),
        (
            "c3",
            Box::new(|ip: &str| {
                ctr(&[
                    "task",
                    "exec",
                    "--exec-id",
                    &exec_id(),
                    "c3",
                    "ping",
                    "-c",
                    "1",
                    "-W",
                    "2",
                    ip,
                ])
            }),
        ),
        (
            "p4",
            Box::new(|ip: &str| podman(&["exec", "p4", "ping", "-c", "1", "-W", "2", ip])),
        ),
    ];
    let ips = [("d2", &d2), ("v2", &v2), ("c3", &c3), ("p4", &p4)];
    for (from, ping) in &ping_from {
        for (to, ip) in ips.iter().filter(|(to, _)| to != from) {
            wait_for(
                Duration::from_secs(10),
                &format!("{from} pings {to} ({ip})"),
                || ping(ip).status.success(),
            );
        }
    }

    // ... and resolves it by name: vxnet's name server, asked through each runtime's own
    // resolv.conf (Podman's from the CNI result's dns, ctr's from the image, Docker's
    // embedded DNS forwarding to it).
    let names = [
        ("d2", "d2", &d2),
        ("v2", "v2", &v2),
        ("c3", c3_name.as_str(), &c3),
        ("p4", "p4", &p4),
        ("p4", "web", &p4),
    ];
    let lookup_from: [(&str, InContainer); 4] = [
        (
            "d2",
            Box::new(|n: &str| lab.docker("vm2", &["exec", "d2", "nslookup", n])),
        ),
        (
            "v2",
            Box::new(|n: &str| lab.sh("vm2", &["vxnet", "exec", "v2", "--", "getent", "hosts", n])),
        ),
        (
            "c3",
            Box::new(|n: &str| {
                ctr(&["task", "exec", "--exec-id", &exec_id(), "c3", "nslookup", n])
            }),
        ),
        (
            "p4",
            Box::new(|n: &str| podman(&["exec", "p4", "nslookup", n])),
        ),
    ];
    for (from, lookup) in &lookup_from {
        for (owner, name, ip) in names.iter().filter(|(owner, _, _)| owner != from) {
            let started = std::time::Instant::now();
            loop {
                let out = lookup(name);
                if out.status.success()
                    && String::from_utf8_lossy(&out.stdout).contains(ip.as_str())
                {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "{from} resolves {name} ({owner}, {ip}): {out:?}\nvm2's daemon log ends:\n{}",
                    log_tail(&lab, "vm2")
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    // tuning ran after vxnet on the interface vxnet made.
    let tuned = podman(&[
        "exec",
        "p4",
        "cat",
        "/proc/sys/net/ipv4/conf/eth0/accept_local",
    ]);
    assert_eq!(ok(&tuned, "tuning's sysctl"), "1");

    // A published port of Podman's (`-p 8089:80`, through portmap) answers from vm2.
    let vm4 = l.host("vm4").unwrap().addr();
    let vm2_ns = l.host("vm2").unwrap().netns().unwrap();
    wait_for(
        Duration::from_secs(10),
        "p4's published port from vm2",
        || common::tcp_fetch(&vm2_ns, (vm4, 8089).into()).is_ok_and(|got| got.contains("from-p4")),
    );

    // `ctr run --rm`: ADD, then DEL with an empty CNI_NETNS; nothing is left.
    let once = ctr_run(
        "c3once",
        &["--rm"],
        &["sh", "-c", "ip -o -4 addr show eth0"],
    );
    assert!(
        ok(&once, "ctr run --rm").contains("10.0.50."),
        "c3once had its address"
    );
    let left = lab.vx("vm3", &["ps", "-a"]);
    assert!(!left.contains("c3once"), "DEL released it: {left}");

    // containerd's leak: a task killed without DEL. vxnet notices its namespace is gone.
    ok(&ctr(&["task", "kill", "-s", "KILL", "c3"]), "ctr task kill");
    wait_for(
        Duration::from_secs(15),
        "c3 released, seen from vm2",
        || !listed_on(&lab, "vm2", &c3),
    );
    assert!(!lab.vx("vm3", &["ps"]).contains(&c3_name));
    let _ = ctr(&["task", "rm", "c3"]);
    let _ = ctr(&["container", "rm", "c3"]);

    // Podman's own teardown (DEL with prevResult) releases p4 everywhere.
    ok(&podman(&["rm", "-f", "p4"]), "podman rm");
    wait_for(
        Duration::from_secs(15),
        "p4 released, seen from vm2",
        || !listed_on(&lab, "vm2", &p4),
    );
}
