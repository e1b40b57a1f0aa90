//! Hostile health reports: records under `health/` written straight into etcd, as anyone
//! who reached it could. `vxnet node ls` shows them for what they are and trusts none.
//!
//! Each case prints `HOSTILE|<case>|<outcome>` once its assertions held
//! (`scripts/security-table` collects them into docs/security.md).

mod common;

use common::{wait_until, TestLab};
use serde_json::Value;

fn nodes(lab: &TestLab, on: &str) -> Vec<Value> {
    let out = lab.vx(on, &["node", "ls", "--format", "json"]);
    match serde_json::from_str(&out) {
        Ok(Value::Array(a)) => a,
        other => panic!("node ls --format json: {other:?} from {out}"),
    }
}

fn state_of(lab: &TestLab, on: &str, name: &str) -> String {
    nodes(lab, on)
        .iter()
        .find(|n| n["name"] == name)
        .and_then(|n| n["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_health_records_are_shown_not_trusted() {
    let lab = TestLab::up(2).await;
    wait_until(|| state_of(&lab, "vm2", "vm2") == "ready");
    let prefix = "/vxnet/health/";
    // Not JSON, a key that is not a node ID, a report naming another node than its key, and
    // a name with terminal escapes.
    let a = vxnet::model::Id::random();
    let b = vxnet::model::Id::random();
    lab.etcd_put(&format!("{prefix}{a}"), "{not json");
    lab.etcd_put(&format!("{prefix}../../nodes/x"), "{}");
    let forged = serde_json::json!({
        "node_id": a.to_string(), "name": "\u{1b}[31mred\u{1b}[0m", "address": "192.0.2.99",
        "state": "running", "programmed_revision": 1, "desired_revision": 1, "networks": 0,
        "local_endpoints": 0, "version": "0", "kernel": "0",
        "started": "2026-01-01T00:00:00Z", "updated": "2026-01-01T00:00:00Z"
    });
    lab.etcd_put(&format!("{prefix}{b}"), &forged.to_string());
    let c = vxnet::model::Id::random();
    let mut escaped = forged.clone();
    escaped["node_id"] = Value::String(c.to_string());
    lab.etcd_put(&format!("{prefix}{c}"), &escaped.to_string());

    let list = nodes(&lab, "vm2");
    let by_id = |id: &vxnet::model::Id| {
        list.iter()
            .find(|n| n["id"] == id.to_string())
            .unwrap_or_else(|| panic!("{id} missing from {list:?}"))
    };
    assert_eq!(by_id(&a)["state"], "unknown");
    assert!(by_id(&a)["reason"].as_str().unwrap().contains("unreadable"));
    assert_eq!(by_id(&b)["state"], "unknown");
    assert!(by_id(&b)["reason"]
        .as_str()
        .unwrap()
        .contains("another node"));
    // A report without a live node key is a host that is gone, whatever it claims.
    assert_eq!(by_id(&c)["state"], "down");
    assert!(list.iter().any(|n| n["reason"]
        .as_str()
        .is_some_and(|r| r.contains("does not hold a node ID"))));
    // The real host is unaffected, and the table prints no terminal escapes.
    assert_eq!(state_of(&lab, "vm2", "vm2"), "ready");
    let table = lab.vx("vm2", &["node", "ls"]);
    assert!(!table.contains('\u{1b}'), "{table:?}");
    assert!(table.contains("?[31mred?[0m"), "{table}");
    for case in [
        "a health report that is not JSON",
        "a health key that is not a node ID",
        "a health report naming another node than its key",
    ] {
        println!("HOSTILE|store record: {case}|listed by node ls as unknown with the reason; acted on by nobody");
    }
    println!("HOSTILE|store record: a health report for a node without a lease, claiming to run|shown down (the lease decides, not the report)");
    println!(
        "HOSTILE|store record: terminal escapes in a health report's name|printed as ? by node ls"
    );
}
