//! The cluster-wide health view: `vxnet node ls` across hosts that are ready, frozen
//! (SIGSTOP: its lease still held, its view behind), dead (SIGKILL: its lease runs out) and
//! stopped cleanly, and hostile health records written straight into etcd.

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

fn node<'a>(list: &'a [Value], name: &str) -> Option<&'a Value> {
    list.iter().find(|n| n["name"] == name)
}

fn state_of(lab: &TestLab, on: &str, name: &str) -> String {
    node(&nodes(lab, on), name)
        .and_then(|n| n["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

fn daemon_pid(lab: &TestLab, host: &str) -> i32 {
    let h = lab.lab.host(host).unwrap();
    let rec = h
        .processes()
        .iter()
        .find(|p| p.role == "daemon")
        .expect("a daemon on this host");
    rec.pid as i32
}

/// Sends SIGCONT when dropped: a failed assertion must not leave a frozen daemon behind.
struct Thaw(i32);
impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

fn etcd_put(lab: &TestLab, key: &str, value: &str) {
    let store = lab.lab.cluster_store().replace("etcd://", "http://");
    let out = lab.sh(
        "vm1",
        &["etcdctl", "--endpoints", &store, "put", key, value],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ls_shows_ready_lagging_down_and_stopped_hosts() {
    let lab = TestLab::up(5).await;
    // Every host sees every other as ready, itself marked.
    wait_until(|| {
        let list = nodes(&lab, "vm2");
        list.len() == 4 && list.iter().all(|n| n["state"] == "ready")
    });
    let list = nodes(&lab, "vm2");
    let me = node(&list, "vm2").unwrap();
    assert_eq!(me["self"], true);
    assert_eq!(
        me["address"],
        lab.lab.host("vm2").unwrap().addr().to_string()
    );
    assert_eq!(me["lag"], 0);
    assert!(me["report"]["kernel"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));
    assert!(me["uptime_secs"].as_u64().is_some());
    let table = lab.vx("vm2", &["node", "ls"]);
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains(" * ") && l.contains("vm2")),
        "{table}"
    );

    // vm3 frozen (its lease stays until the TTL), vm4 killed, vm5 stopped cleanly.
    let frozen = daemon_pid(&lab, "vm3");
    let _thaw = Thaw(frozen);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(frozen),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon_pid(&lab, "vm4")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(lab.lab.stop_daemon("vm5").unwrap());
    // A change the frozen host cannot program.
    lab.vx(
        "vm2",
        &["network", "create", "--subnet", "10.77.0.0/24", "lagnet"],
    );

    wait_until(|| state_of(&lab, "vm2", "vm3") == "lagging");
    let list = nodes(&lab, "vm2");
    let vm3 = node(&list, "vm3").unwrap();
    assert!(vm3["lag"].as_i64().unwrap() >= 1, "{vm3}");
    assert_eq!(vm3["alive"], true);
    assert!(
        vm3["reason"].as_str().unwrap().contains("programmed up to"),
        "{vm3}"
    );
    assert_eq!(state_of(&lab, "vm2", "vm5"), "stopped");
    // The others have programmed it: no lag anywhere else.
    assert_eq!(node(&list, "vm2").unwrap()["lag"], 0);

    // The killed host's lease runs out: down, with when it was last seen.
    wait_until(|| state_of(&lab, "vm2", "vm4") == "down");
    let list = nodes(&lab, "vm2");
    let vm4 = node(&list, "vm4").unwrap();
    assert_eq!(vm4["alive"], false);
    assert!(vm4["last_seen_secs"].as_u64().unwrap() >= 5, "{vm4}");
    assert!(vm4["uptime_secs"].is_null(), "{vm4}");

    // Thawed, the frozen host catches up (or registers again) and is ready.
    drop(_thaw);
    wait_until(|| state_of(&lab, "vm2", "vm3") == "ready");
    // And another host sees the same picture.
    wait_until(|| {
        let list = nodes(&lab, "vm3");
        state_of(&lab, "vm3", "vm4") == "down"
            && node(&list, "vm2").is_some_and(|n| n["state"] == "ready")
    });

    // A dead host can be forgotten; a live one cannot.
    let err = lab.vx_err("vm2", &["node", "rm", "vm3"]);
    assert!(err.contains("alive"), "{err}");
    assert_eq!(lab.vx("vm2", &["node", "rm", "vm4"]).trim(), "vm4");
    wait_until(|| state_of(&lab, "vm2", "vm4") == "absent");
    let err = lab.vx_err("vm2", &["node", "rm", "no-such-host"]);
    assert!(err.contains("no node"), "{err}");
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
    etcd_put(&lab, &format!("{prefix}{a}"), "{not json");
    etcd_put(&lab, &format!("{prefix}../../nodes/x"), "{}");
    let forged = serde_json::json!({
        "node_id": a.to_string(), "name": "\u{1b}[31mred\u{1b}[0m", "address": "192.0.2.99",
        "state": "running", "programmed_revision": 1, "desired_revision": 1, "networks": 0,
        "local_endpoints": 0, "version": "0", "kernel": "0",
        "started": "2026-01-01T00:00:00Z", "updated": "2026-01-01T00:00:00Z"
    });
    etcd_put(&lab, &format!("{prefix}{b}"), &forged.to_string());
    let c = vxnet::model::Id::random();
    let mut escaped = forged.clone();
    escaped["node_id"] = Value::String(c.to_string());
    etcd_put(&lab, &format!("{prefix}{c}"), &escaped.to_string());

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
}
