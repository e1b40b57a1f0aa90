//! vxnet's Docker plugin with real Docker engines (Debian's docker.io 20.10), one per lab
//! host, each finding the plugin at its host's /run/docker/plugins/vxnet.sock by itself.
//! Both modes: global scope (engines with `--cluster-store`, the seed's set-up: one `docker
//! network create`) and local scope (engines without a cluster store: the same command on
//! every host). Oracles: the docker client, busybox ping inside the containers, and vxnet's
//! own view of the network.

mod common;

use std::collections::BTreeSet;

use common::{wait_until, TestLab};
use vxnet::docker::Scope;
use vxnet::lab::{DockerOptions, TEST_IMAGE};

const NET: &str = "my-net";
const SUBNET: &str = "10.0.4.0/24";
/// The README's command, for either scope.
const CREATE: &[&str] = &[
    "network",
    "create",
    "-d",
    "vxnet",
    "--ipam-driver",
    "vxnet",
    "--subnet",
    SUBNET,
    "-o",
    "vxnet.network=my-net",
    NET,
];

async fn lab(scope: Scope) -> TestLab {
    let lab = TestLab::up_with(3, |o| o.docker_scope = scope).await;
    let opts = DockerOptions {
        cluster_store: scope == Scope::Global,
        ..Default::default()
    };
    lab.start_docker(&["vm2", "vm3"], &opts).await;
    lab
}

fn run(lab: &TestLab, host: &str, name: &str) -> String {
    lab.docker_ok(
        host,
        &[
            "run", "-d", "--name", name, "--net", NET, TEST_IMAGE, "sleep", "600",
        ],
    );
    ip_of(lab, host, name)
}

fn ip_of(lab: &TestLab, host: &str, name: &str) -> String {
    lab.docker_ok(
        host,
        &[
            "inspect",
            "-f",
            "{{(index .NetworkSettings.Networks \"my-net\").IPAddress}}",
            name,
        ],
    )
}

fn docker_pings(lab: &TestLab, host: &str, name: &str, ip: &str) -> bool {
    lab.docker(host, &["exec", name, "ping", "-c", "1", "-W", "2", ip])
        .status
        .success()
}

/// The addresses vxnet knows on the network (from `host`'s view).
fn vxnet_ips(lab: &TestLab, host: &str) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&lab.vx(host, &["network", "inspect", NET])).unwrap();
    let v = if v.is_array() { v[0].clone() } else { v };
    v["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["ip"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Everything the issue asks of both modes, once the network exists on both hosts.
fn scenario(lab: &TestLab) {
    let a = run(lab, "vm2", "c2");
    let b = run(lab, "vm3", "c3");
    assert_ne!(a, b);
    // The seed's layout: eth0 on the overlay with MTU 1450, eth1 on Docker's gateway bridge.
    let links = lab.docker_ok("vm2", &["exec", "c2", "ip", "addr"]);
    assert!(
        links.contains("eth0") && links.contains("mtu 1450") && links.contains(&a),
        "{links}"
    );
    assert!(links.contains("eth1"), "{links}");
    assert!(docker_pings(lab, "vm2", "c2", &b), "vm2 -> vm3");
    assert!(docker_pings(lab, "vm3", "c3", &a), "vm3 -> vm2");

    // A `vxnet run` container on vm3 reaches the Docker container on vm2.
    lab.vx(
        "vm3",
        &[
            "run", "--rm", "--net", NET, "--", "ping", "-c", "1", "-W", "2", &a,
        ],
    );

    // docker rm -f removes the endpoint everywhere.
    lab.docker_ok("vm2", &["rm", "-f", "c2"]);
    wait_until(|| !vxnet_ips(lab, "vm3").contains(&a));
    assert!(!docker_pings(lab, "vm3", "c3", &a));

    // 2 hosts x 20 containers started at once: 40 distinct addresses, all known to vxnet.
    let mut names = Vec::new();
    let mut children = Vec::new();
    for host in ["vm2", "vm3"] {
        for i in 0..20 {
            let name = format!("{host}-n{i}");
            let mut cmd = lab.lab.host(host).unwrap().docker().unwrap();
            cmd.args([
                "run", "-d", "--name", &name, "--net", NET, TEST_IMAGE, "sleep", "600",
            ]);
            cmd.stdout(std::process::Stdio::null());
            children.push((name.clone(), cmd.spawn().unwrap()));
            names.push((host, name));
        }
    }
    for (name, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "docker run {name}: {out:?}");
    }
    let ips: Vec<String> = names.iter().map(|(h, n)| ip_of(lab, h, n)).collect();
    let distinct: BTreeSet<&String> = ips.iter().collect();
    assert_eq!(distinct.len(), 40, "addresses handed out twice: {ips:?}");
    assert!(!distinct.contains(&b));
    wait_until(|| vxnet_ips(lab, "vm2").len() == 41);
    // The last one started on vm2 reaches the first one started on vm3.
    assert!(docker_pings(lab, "vm2", "vm2-n19", &ips[20]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_scope_engines_with_a_cluster_store() {
    let lab = lab(Scope::Global).await;
    lab.docker_ok("vm2", CREATE);
    // Created once, on vm2: vm3's engine lists it, and vxnet knows it on vm3.
    wait_until(|| lab.docker_ok("vm3", &["network", "ls"]).contains(NET));
    assert!(lab.vx("vm3", &["network", "ls"]).contains(NET));
    scenario(&lab);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_scope_engines_without_a_cluster_store() {
    let lab = lab(Scope::Local).await;
    lab.docker_ok("vm2", CREATE);
    lab.docker_ok("vm3", CREATE);
    let ls = lab.vx("vm2", &["network", "ls"]);
    assert_eq!(ls.matches(NET).count(), 1, "one vxnet network: {ls}");
    scenario(&lab);
    // Without --ipam-driver vxnet each engine would hand out the same addresses: refused,
    // with what to do.
    let out = lab.docker(
        "vm2",
        &[
            "network",
            "create",
            "-d",
            "vxnet",
            "--subnet",
            "10.0.5.0/24",
            "other",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--ipam-driver vxnet"),
        "{err}"
    );
}
