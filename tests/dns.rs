//! Names across hosts: vxnet's name server (169.254.53.53 in every network's sandbox), asked
//! by containers in the lab with glibc's resolver (`getent`, through the resolv.conf `vxnet
//! run` gives them) and with hand-made packets from their namespaces.

mod common;

use std::time::Duration;

use common::dns::*;
use common::TestLab;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_find_each_other_by_name_alias_and_network_on_any_host() {
    let lab = TestLab::up(3).await;
    lab.network("n1", "10.0.30.0/24");
    internal_network(&lab, "n2", "10.0.31.0/24");
    let run = |host: &str, name: &str, net: &str, alias: Option<&str>| {
        let mut args = vec!["run", "-d", "--name", name, "--net", net];
        if let Some(a) = alias {
            args.extend(["--alias", a]);
        }
        args.extend(["--", "sleep", "3600"]);
        lab.vx(host, &args);
        lab.overlay_ip(host, name)
    };
    let c3 = run("vm3", "c3", "n1", Some("db"));
    let c3b = run("vm3", "c3b", "n1", Some("db"));
    let s3 = run("vm3", "s3", "n2", None);
    run("vm2", "c2", "n1", None);
    run("vm2", "i2", "n2", None);

    // What a program in the container does: glibc's resolver, through its resolv.conf.
    let resolv = lab.vx("vm2", &["exec", "c2", "--", "cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 169.254.53.53"), "{resolv}");
    let (ok, out) = getent(&lab, "vm2", "c2", &["hosts", "c3"]);
    assert!(
        ok && out.starts_with(&format!("{c3} ")),
        "c3 from vm2: {out}"
    );
    let (ok, out) = getent(&lab, "vm2", "c2", &["hosts", "C3.N1"]);
    assert!(
        ok && out.starts_with(&format!("{c3} ")),
        "C3.N1 from vm2: {out}"
    );
    let (ok, out) = getent(&lab, "vm2", "c2", &["ahostsv4", "db"]);
    assert!(ok && out.contains(&c3) && out.contains(&c3b), "db: {out}");
    let (ok, out) = getent(&lab, "vm2", "c2", &["hosts", &c3]);
    assert!(ok && out.contains("c3.n1"), "reverse of {c3}: {out}");

    // The same, packet by packet.
    let ns = lab.container_ns("vm2", "c2");
    let m = ask(&ns, "c3.", RecordType::A);
    assert_eq!(a_records(&m), vec![ip(&c3)]);
    assert!(m.answers.iter().all(|r| r.ttl == 0), "TTL 0: {m:?}");
    let first = a_records(&ask(&ns, "db.", RecordType::A));
    let second = a_records(&ask(&ns, "db.", RecordType::A));
    assert_eq!(first.len(), 2);
    assert_ne!(first, second, "several holders: the order turns per answer");
    let aaaa = ask(&ns, "c3.", RecordType::AAAA);
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(aaaa.answers.is_empty(), "no IPv6: {aaaa:?}");
    assert_eq!(
        a_records(&ask_tcp(&ns, "c3.n1.", RecordType::A)),
        vec![ip(&c3)]
    );

    // Scoped: n2 is not c2's network, and n1 is not i2's (n2 is --internal).
    let other = ask(&ns, "s3.n2.", RecordType::A);
    assert!(
        a_records(&other).is_empty(),
        "s3.n2 seen from n1: {other:?}"
    );
    let (ok, _) = getent(&lab, "vm2", "c2", &["hosts", "s3"]);
    assert!(!ok, "s3 resolved from n1");
    let ins = lab.container_ns("vm2", "i2");
    assert_eq!(a_records(&ask(&ins, "s3.", RecordType::A)), vec![ip(&s3)]);
    assert!(
        a_records(&ask(&ins, "c3.", RecordType::A)).is_empty(),
        "c3 seen from n2"
    );

    // A container on both networks sees both; when its first network goes, its route to the
    // name server moves to the next interface.
    run("vm2", "m2", "n1", None);
    lab.vx(
        "vm2",
        &["network", "connect", "--alias", "both", "n2", "m2"],
    );
    let m2 = lab.container_ns("vm2", "m2");
    assert_eq!(a_records(&ask(&m2, "s3.", RecordType::A)), vec![ip(&s3)]);
    assert_eq!(a_records(&ask(&m2, "c3.", RecordType::A)), vec![ip(&c3)]);
    lab.vx("vm2", &["network", "disconnect", "n1", "m2"]);
    assert_eq!(a_records(&ask(&m2, "s3.n2.", RecordType::A)), vec![ip(&s3)]);
    assert!(
        a_records(&ask(&m2, "c3.", RecordType::A)).is_empty(),
        "n1 is no longer m2's"
    );
    assert_eq!(
        a_records(&ask(&ins, "both.", RecordType::A)).len(),
        1,
        "m2's alias on n2"
    );

    // A new container: resolvable on vm2 as soon as its endpoint reaches vm2's view.
    let c3c = run("vm3", "c3c", "n1", None);
    wait_for(Duration::from_secs(10), "c3c resolvable on vm2", || {
        a_records(&ask(&ns, "c3c.n1.", RecordType::A)) == vec![ip(&c3c)]
    });
    // Removed: gone from the name server with its endpoint.
    lab.vx("vm3", &["rm", "-f", "c3"]);
    wait_for(Duration::from_secs(10), "c3 gone on vm2", || {
        ask(&ns, "c3.n1.", RecordType::A).metadata.response_code == ResponseCode::NXDomain
    });
    assert_eq!(a_records(&ask(&ns, "db.", RecordType::A)), vec![ip(&c3b)]);
    // A dead host: its containers' names go when its lease does.
    assert!(lab.lab.stop_daemon("vm3").unwrap());
    wait_for(Duration::from_secs(60), "vm3's names gone on vm2", || {
        ask(&ns, "c3b.n1.", RecordType::A).metadata.response_code == ResponseCode::NXDomain
    });

    // `lab down` ends the containers too, though each runs in a mount namespace of its own.
    // Bound from the lab dir's hosts/…: how mountinfo names a mount of a lab host's.
    let hosts = format!("/{}/hosts/", lab.lab.name());
    drop(ns);
    drop(ins);
    drop(m2);
    lab.lab.down().expect("lab down");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("mountinfo")).is_ok_and(|m| m.contains(&hosts))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.is_empty(),
        "processes left in the lab's hosts: {left:?}"
    );
}

/// A Docker container on a vxnet network (Docker 20.10 engines, `--dns 169.254.53.53`: the
/// one engine-wide setting) and `vxnet run` containers find each other by name across hosts,
/// both ways; Docker's own names (container name, `--network-alias`) are learned from the
/// engine's API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_containers_and_vxnet_run_containers_resolve_each_other_across_hosts() {
    use vxnet::lab::{DockerOptions, TEST_IMAGE};
    let lab = TestLab::up(3).await;
    let opts = DockerOptions {
        extra_args: vec!["--dns".into(), vxnet::dns::LISTEN_ADDR.to_string()],
        ..Default::default()
    };
    lab.start_docker(&["vm2", "vm3"], &opts).await;
    for h in ["vm2", "vm3"] {
        lab.docker_ok(
            h,
            &[
                "network",
                "create",
                "-d",
                "vxnet",
                "--ipam-driver",
                "vxnet",
                "--subnet",
                "10.0.33.0/24",
                "-o",
                "vxnet.network=dnet",
                "dnet",
            ],
        );
    }
    lab.docker_ok(
        "vm3",
        &[
            "run",
            "-d",
            "--name",
            "w3",
            "--network-alias",
            "api",
            "--net",
            "dnet",
            TEST_IMAGE,
            "sleep",
            "600",
        ],
    );
    let w3 = lab.docker_ok(
        "vm3",
        &[
            "inspect",
            "-f",
            "{{(index .NetworkSettings.Networks \"dnet\").IPAddress}}",
            "w3",
        ],
    );
    lab.docker_ok(
        "vm2",
        &[
            "run", "-d", "--name", "d2", "--net", "dnet", TEST_IMAGE, "sleep", "600",
        ],
    );
    lab.vx(
        "vm2",
        &[
            "run", "-d", "--name", "v2", "--net", "dnet", "--", "sleep", "3600",
        ],
    );
    let v3 = {
        lab.vx(
            "vm3",
            &[
                "run", "-d", "--name", "v3", "--net", "dnet", "--", "sleep", "3600",
            ],
        );
        lab.overlay_ip("vm3", "v3")
    };

    // vxnet run → Docker: the Docker container's name and alias, once vm3 has learned them.
    let v2 = lab.container_ns("vm2", "v2");
    for name in ["w3.", "api.", "w3.dnet."] {
        wait_for(Duration::from_secs(20), &format!("{name} from v2"), || {
            a_records(&ask(&v2, name, RecordType::A)) == vec![ip(&w3)]
        });
    }
    let (ok, out) = getent(&lab, "vm2", "v2", &["hosts", "w3"]);
    assert!(
        ok && out.starts_with(&format!("{w3} ")),
        "w3 from v2: {out}"
    );

    // Docker → vxnet run, and Docker → Docker across hosts, through Docker's embedded DNS
    // (127.0.0.11), which asks vxnet's for what it does not know.
    for (name, want) in [("v3", &v3), ("w3", &w3), ("api", &w3)] {
        let out = lab.docker("vm2", &["exec", "d2", "nslookup", name]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(want.as_str()),
            "nslookup {name} in d2: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
