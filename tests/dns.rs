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
}
