//! The cluster-wide health view: `vxnet node ls` across hosts that are ready, frozen
//! (SIGSTOP: its lease still held, its view behind), dead (SIGKILL: its lease runs out) and
//! stopped cleanly (hostile health records: tests/hostile_health.rs).

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
