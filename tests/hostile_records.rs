//! Hostile records in the cluster store, and a network whose kernel programming fails: each
//! must stay alone. Records are written straight into the lab's etcd with etcdctl, as anyone
//! who reached etcd could; the outcome is read back with `vxnet info`, pings and iproute2.
//!
//! Each case prints `HOSTILE|<case>|<outcome>` once its assertions held
//! (`scripts/security-table` collects them into docs/security.md).

mod common;

use common::{wait_until, TestLab};
use serde_json::{json, Value};
use vxnet::model::{Id, Mac};

fn info(lab: &TestLab, host: &str) -> Value {
    serde_json::from_str(&lab.vx(host, &["info", "--format", "json"])).unwrap()
}

fn inspect(lab: &TestLab, net: &str) -> Value {
    let out = lab.vx("vm2", &["network", "inspect", net]);
    let v: Value = serde_json::from_str(&out).unwrap();
    match v {
        Value::Array(mut a) => a.remove(0),
        v => v,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_refused_reported_and_every_other_network_stays_reachable() {
    let lab = TestLab::up(3).await;
    let n1 = lab.network("n1", "10.0.41.0/24");
    lab.network("n2", "10.0.42.0/24");
    lab.container("vm2", "c2a", "n1");
    let c3a = lab.container("vm3", "c3a", "n1");
    let vm3_node = info(&lab, "vm3")["node"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let prefix = info(&lab, "vm2")["store_prefix"]
        .as_str()
        .unwrap()
        .to_string();

    // A well-formed remote endpoint of n1, changed one way per case.
    let endpoint = |ip: &str, mac: Option<&str>| {
        let id = Id::random();
        let mac = mac
            .map(str::to_string)
            .unwrap_or_else(|| Mac::from_ipv4(ip.parse().unwrap()).to_string());
        let body = json!({"id": id.as_str(), "network_id": n1, "name": "evil",
            "node_id": vm3_node, "ip": ip, "mac": mac, "created": ""});
        (format!("{prefix}endpoints/{n1}/{id}"), body)
    };
    let mut cases: Vec<(&str, String, String, &str)> = Vec::new();
    let (k, b) = endpoint("10.0.41.200", Some("01:00:5e:00:00:01"));
    cases.push(("multicast MAC", k, b.to_string(), "multicast"));
    let (k, b) = endpoint("10.0.41.201", Some("00:00:00:00:00:00"));
    cases.push(("all-zero MAC", k, b.to_string(), "all zero"));
    let (k, b) = endpoint("10.0.99.5", None);
    cases.push(("address outside the subnet", k, b.to_string(), "outside"));
    let (k, b) = endpoint("10.0.41.1", None);
    cases.push(("the gateway's address", k, b.to_string(), "gateway"));
    let (k, b) = endpoint(&c3a, None);
    cases.push((
        "an address another endpoint owns",
        k,
        b.to_string(),
        "already belongs",
    ));
    let (_, b) = endpoint("10.0.41.202", None);
    cases.push((
        "a short, non-hex ID in the key",
        format!("{prefix}endpoints/{n1}/xyz"),
        b.to_string(),
        "64-character",
    ));
    let (_, b) = endpoint("10.0.41.203", None);
    cases.push((
        "key and body naming different endpoints",
        format!("{prefix}endpoints/{n1}/{}", Id::random()),
        b.to_string(),
        "does not match",
    ));
    let (k, _) = endpoint("10.0.41.204", None);
    cases.push(("invalid JSON", k, "{\"id\": ".to_string(), "not a readable"));
    let (k, mut b) = endpoint("10.0.41.205", None);
    b["encrypted"] = json!(true);
    cases.push((
        "a record from a newer schema (extra field)",
        k,
        b.to_string(),
        "does not know: encrypted",
    ));
    for (_, key, value, _) in &cases {
        lab.etcd_put(key, value);
    }

    // After the bad records: a new container on n2 on vm3 is reachable from vm2, and n1's
    // own good endpoints still are.
    let c3b = lab.container("vm3", "c3b", "n2");
    lab.container("vm2", "c2b", "n2");
    wait_until(|| lab.pings("vm2", "c2b", &c3b));
    assert!(lab.pings("vm2", "c2a", &c3a), "n1 broke");

    for host in ["vm2", "vm3"] {
        wait_until(|| {
            info(&lab, host)["rejected_records"]
                .as_array()
                .map(Vec::len)
                >= Some(cases.len())
        });
        let i = info(&lab, host);
        let rejected = i["rejected_records"].as_array().unwrap();
        for (case, key, _, reason) in &cases {
            let r = rejected
                .iter()
                .find(|r| r["key"] == *key)
                .unwrap_or_else(|| panic!("{case}: {key} not reported on {host}: {rejected:?}"));
            let why = r["reason"].as_str().unwrap();
            assert!(why.contains(reason), "{case} on {host}: {why}");
        }
        assert!(i["records_rejected"].as_u64().unwrap() >= cases.len() as u64);
        assert!(
            i["network_errors"].as_array().is_none_or(Vec::is_empty),
            "{i}"
        );
    }
    // None of them reached vm2's kernel, and inspect shows only the real endpoints.
    let fdb = lab.in_sandbox("vm2", &n1, &["bridge", "fdb", "show", "dev", "vxlan1"]);
    assert!(
        !fdb.contains("01:00:5e:00:00:01") && !fdb.contains("02:42:0a:00:63:05"),
        "{fdb}"
    );
    let eps = inspect(&lab, "n1")["endpoints"].as_array().unwrap().len();
    assert_eq!(eps, 2, "inspect lists a refused record");
    // The resync succeeds whole.
    let out = lab.sh("vm2", &["vxnet", "reconcile"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (case, _, _, reason) in &cases {
        println!("HOSTILE|store record: {case}|refused on every host (\"{reason}\"), listed in vxnet info; other networks reachable, vxnet reconcile succeeds");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_whose_kernel_programming_fails_fails_alone_and_recovers() {
    let lab = TestLab::up(3).await;
    let n1 = lab.network("n1", "10.0.51.0/24");
    lab.network("n2", "10.0.52.0/24");
    lab.container("vm2", "c2a", "n1");
    lab.container("vm3", "c3a", "n1");
    lab.container("vm2", "c2b", "n2");
    let vni = inspect(&lab, "n1")["vni"].as_u64().unwrap().to_string();

    // Break n1 on vm2: its VXLAN device deleted, and its VNI taken on the port by a device
    // of someone else's, so the sandbox cannot be repaired.
    lab.in_sandbox("vm2", &n1, &["ip", "link", "del", "vxlan1"]);
    let squat = lab.sh(
        "vm2",
        &[
            "ip",
            "link",
            "add",
            "vxsquat",
            "type",
            "vxlan",
            "id",
            &vni,
            "dstport",
            "4789",
            "local",
            "192.0.2.6",
            "dev",
            "eth0",
        ],
    );
    assert!(
        squat.status.success(),
        "{}",
        String::from_utf8_lossy(&squat.stderr)
    );
    // A change in n1 makes vm2 program it, which fails.
    let c3a2 = lab.container("vm3", "c3a2", "n1");
    wait_until(|| {
        info(&lab, "vm2")["network_errors"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["network"] == n1))
    });

    // Meanwhile n2 converges as usual.
    let c3b = lab.container("vm3", "c3b", "n2");
    wait_until(|| lab.pings("vm2", "c2b", &c3b));
    // `vxnet reconcile` reports n1 alone as failed and fixes the rest.
    let out = lab.sh("vm2", &["vxnet", "reconcile"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "reconcile should report n1");
    assert!(stderr.contains(&n1) && stderr.contains("n1"), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let nets = report["networks"].as_array().unwrap();
    assert!(
        nets.iter()
            .any(|n| n["name"] == "n2" && n["error"].is_null()),
        "{report}"
    );
    // Still failing, on its own schedule, after several attempts.
    wait_until(|| {
        info(&lab, "vm2")["network_errors"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["network"] == n1).cloned())
            .is_some_and(|e| e["attempts"].as_u64() >= Some(3))
    });
    assert!(lab.pings("vm2", "c2b", &c3b));
    println!("HOSTILE|kernel programming of one network fails (its VNI taken on the host)|that network retried alone with backoff and shown in vxnet info; a container created meanwhile in another network reachable; vxnet reconcile exits 1 naming only it");

    // The squatter goes: n1 recovers by itself.
    let del = lab.sh("vm2", &["ip", "link", "del", "vxsquat"]);
    assert!(del.status.success());
    wait_until(|| lab.pings("vm2", "c2a", &c3a2));
    wait_until(|| {
        info(&lab, "vm2")["network_errors"]
            .as_array()
            .is_none_or(Vec::is_empty)
    });
    println!(
        "HOSTILE|that network's cause removed|it recovers by itself on the next retry (no restart)"
    );
}

/// An unreadable network record must not stop the creation, listing or removal of every
/// other network (it once made each of them fail with "corrupt record").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_network_record_blocks_no_other_network() {
    let lab = TestLab::up(3).await;
    let keep = lab.network("keep", "10.0.51.0/24");
    let prefix = info(&lab, "vm2")["store_prefix"]
        .as_str()
        .unwrap()
        .to_string();
    let bad = Id::random();
    lab.etcd_put(&format!("{prefix}networks/{bad}"), "{\"id\": ");
    wait_until(|| {
        info(&lab, "vm3")["rejected_records"]
            .as_array()
            .is_some_and(|r| {
                r.iter()
                    .any(|r| r["key"] == format!("{prefix}networks/{bad}"))
            })
    });
    let fresh = lab.network("fresh", "10.0.52.0/24");
    assert!(lab.vx("vm3", &["network", "ls"]).contains("fresh"));
    lab.vx("vm3", &["network", "rm", "fresh"]);
    lab.vx("vm2", &["network", "rm", &keep]);
    let left = lab.vx("vm2", &["network", "ls", "-q", "--no-trunc"]);
    assert!(!left.contains(&keep) && !left.contains(&fresh), "{left}");
    println!("HOSTILE|store record: an unreadable network record|refused by the view; every other network can still be created, listed and removed");
}
