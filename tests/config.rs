//! `/etc/vxnet/daemon.json`: keys as the flags' names, flags and file together (a key in both
//! is an error), bad keys and values as start-up errors naming the key, JSON logs, and
//! reloads on SIGHUP (the log level applied, other keys reported as needing a restart, a
//! broken file leaving the daemon as it was).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{binary, wait_until, TestLab};
use serde_json::Value;

/// A directory of this test's own, removed when dropped.
struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("vxnet-config-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `vxnet daemon ARGS` (no namespaces needed: `--validate` starts nothing).
fn daemon(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .arg("daemon")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn validate(file: &Path, flags: &[&str]) -> (i32, String, String) {
    let mut args = vec!["--config-file", file.to_str().unwrap(), "--validate"];
    args.extend_from_slice(flags);
    daemon(&args)
}

#[test]
fn precedence_conflicts_and_bad_keys() {
    let dir = Dir::new("validate");
    let f = dir.write(
        "daemon.json",
        r#"{"cluster-store": "etcd://192.0.2.5:2379", "lease-ttl": 20,
            "etcd-user": "vxnet:s3cret", "cluster-store-opt": []}"#,
    );
    // The file and the flags combine; the password is never printed.
    let (code, out, err) = validate(&f, &["--cluster-advertise", "192.0.2.6"]);
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(out.split_once('\n').unwrap().1).unwrap();
    assert_eq!(shown["cluster-store"], "etcd://192.0.2.5:2379");
    assert_eq!(shown["cluster-advertise"], "192.0.2.6");
    assert_eq!(shown["lease-ttl"], 20);
    assert!(!out.contains("s3cret"), "{out}");

    // A key in both places is an error naming it (dockerd's rule), secrets not shown.
    let (code, _, err) = validate(
        &f,
        &["--cluster-advertise", "192.0.2.6", "--lease-ttl", "30"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("lease-ttl (flag: 30, file: 20)"), "{err}");
    let (code, _, err) = validate(&f, &["--cluster-advertise", "x", "--etcd-user", "a:other"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("etcd-user") && !err.contains("s3cret") && !err.contains("other"),
        "{err}"
    );

    // Unknown keys, wrong types, bad values: each names its key.
    for (text, key) in [
        (r#"{"cluster-stor": "etcd://a:1"}"#, "\"cluster-stor\""),
        (r#"{"lease-ttl": "twenty"}"#, "\"lease-ttl\""),
        (r#"{"docker-plugin": "yes"}"#, "\"docker-plugin\""),
        (
            r#"{"cluster-store-opt": "kv.certfile=/x"}"#,
            "\"cluster-store-opt\"",
        ),
        (
            r#"{"cluster-store": "etcd://a:1", "cluster-advertise": "192.0.2.6", "gateway-bridge-subnet": "10.0.0.0/40"}"#,
            "gateway-bridge-subnet",
        ),
        (
            r#"{"cluster-store": "etcd://a:1", "cluster-advertise": "192.0.2.6", "lease-ttl": 1}"#,
            "lease-ttl",
        ),
        (
            r#"{"cluster-store": "etcd://a:1", "cluster-advertise": "not-an-ip"}"#,
            "cluster-advertise",
        ),
        (
            r#"{"cluster-store": "etcd://a:1", "cluster-advertise": "192.0.2.6", "metrics-addr": "9323"}"#,
            "metrics-addr",
        ),
        (
            r#"{"cluster-store": "etcd://a:1", "cluster-advertise": "192.0.2.6", "log-format": "xml"}"#,
            "log-format",
        ),
    ] {
        let bad = dir.write("bad.json", text);
        let (code, _, err) = validate(&bad, &[]);
        assert_eq!(code, 1, "{text}");
        assert!(err.contains(key), "{text}: {err}");
        assert!(err.contains("bad.json"), "{text}: the file is named: {err}");
    }
    let (code, _, err) = validate(&dir.0.join("missing.json"), &[]);
    assert_eq!(code, 1);
    assert!(err.contains("missing.json"), "{err}");

    // systemd's ExecCondition: 1 (skip) without a cluster store, 255 (fail) when invalid.
    let empty = dir.write("empty.json", "{}");
    let check = |file: &Path| {
        daemon(&[
            "--config-file",
            file.to_str().unwrap(),
            "--check-configured",
        ])
        .0
    };
    assert_eq!(check(&empty), 1);
    assert_eq!(check(&dir.write("bad.json", r#"{"lease-ttl": []}"#)), 255);
    let ok = dir.write(
        "ok.json",
        r#"{"cluster-store": "etcd://192.0.2.5:2379", "cluster-advertise": "192.0.2.6"}"#,
    );
    assert_eq!(check(&ok), 0);
}

fn daemon_log(lab: &TestLab, host: &str) -> PathBuf {
    lab.lab
        .current_state()
        .unwrap()
        .hosts
        .iter()
        .find(|h| h.name == host)
        .and_then(|h| h.processes.iter().find(|p| p.role == "daemon"))
        .map(|p| p.log.clone())
        .expect("the daemon's log")
}

fn daemon_pid(lab: &TestLab, host: &str) -> nix::unistd::Pid {
    let state = lab.lab.current_state().unwrap();
    let h = state.hosts.iter().find(|h| h.name == host).unwrap();
    let p = h.processes.iter().find(|p| p.role == "daemon").unwrap();
    nix::unistd::Pid::from_raw(p.pid as i32)
}

/// The daemon's JSON log lines (every line must be one).
fn json_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn logged(log: &Path, message: &str, field: (&str, &str)) -> bool {
    json_lines(log)
        .iter()
        .any(|l| l["message"] == message && l[field.0] == field.1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_from_the_file_and_reloads_on_sighup() {
    let dir = Dir::new("reload");
    let file = dir.write(
        "daemon.json",
        r#"{"node-name": "from-file", "log-format": "json", "log-level": "info", "lease-ttl": 20}"#,
    );
    let file_arg = file.to_string_lossy().into_owned();
    let lab = TestLab::up_with(2, |o| {
        o.daemon_args = vec!["--config-file".into(), file_arg.clone()];
    })
    .await;
    let info: Value = serde_json::from_str(&lab.vx("vm2", &["info", "--format", "json"])).unwrap();
    assert_eq!(info["node"]["name"], "from-file");
    let log = daemon_log(&lab, "vm2");
    wait_until(|| logged(&log, "vxnet daemon serving", ("level", "INFO")));

    // Reload: the log level changes now; lease-ttl takes a restart, and says so.
    dir.write(
        "daemon.json",
        r#"{"node-name": "from-file", "log-format": "json", "log-level": "debug", "lease-ttl": 30}"#,
    );
    nix::sys::signal::kill(daemon_pid(&lab, "vm2"), nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_until(|| {
        logged(
            &log,
            "configuration reloaded: applied",
            ("key", "log-level"),
        )
    });
    wait_until(|| {
        json_lines(&log).iter().any(|l| {
            l["key"] == "lease-ttl" && l["message"].as_str().unwrap_or("").contains("restart")
        })
    });
    // Debug lines now appear (the view's and the reconciler's chatter).
    lab.vx(
        "vm2",
        &["network", "create", "--subnet", "10.66.0.0/24", "cfgnet"],
    );
    wait_until(|| json_lines(&log).iter().any(|l| l["level"] == "DEBUG"));

    // A broken file changes nothing: logged, and the daemon serves on.
    dir.write("daemon.json", r#"{"node-name": "#);
    nix::sys::signal::kill(daemon_pid(&lab, "vm2"), nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_until(|| {
        json_lines(&log).iter().any(|l| {
            l["level"] == "ERROR" && l["message"].as_str().unwrap_or("").contains("not reloaded")
        })
    });
    let info: Value = serde_json::from_str(&lab.vx("vm2", &["info", "--format", "json"])).unwrap();
    assert_eq!(info["node"]["name"], "from-file");

    // A bad key is a start-up error naming it: the daemon does not start.
    dir.write(
        "daemon.json",
        r#"{"node-name": "from-file", "leese-ttl": 30}"#,
    );
    assert!(lab.lab.stop_daemon("vm2").unwrap());
    assert!(lab.lab.start_daemon("vm2").await.is_err());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("unknown key \\\"leese-ttl\\\"")
            || text.contains("unknown key \"leese-ttl\""),
        "{text}"
    );
}

/// systemd's readiness without the store: the daemon serves and retries, and after a bounded
/// wait it says READY=1 anyway, with the reason in its status, rather than let systemd fail
/// the unit at its start timeout (and hold Docker back until then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_store_the_daemon_is_ready_after_a_while_and_says_why() {
    use std::os::unix::net::UnixDatagram;
    let lab = TestLab::up(1).await; // vm1 runs etcd; this daemon is pointed past it
    let dir = Dir::new("notify");
    let sock = dir.0.join("notify.sock");
    let listener = UnixDatagram::bind(&sock).unwrap();
    listener
        .set_read_timeout(Some(std::time::Duration::from_secs(90)))
        .unwrap();
    let host = lab.lab.host("vm1").unwrap();
    let mut cmd = host.command(binary()).unwrap();
    cmd.args([
        "daemon",
        "--cluster-store",
        "etcd://192.0.2.5:1",
        "--cluster-advertise",
    ])
    .arg(host.addr().to_string())
    .arg("--state-dir")
    .arg(dir.0.join("state"))
    .arg("--run-dir")
    .arg(dir.0.join("run"))
    .arg("--socket")
    .arg(dir.0.join("d.sock"))
    .arg("--config-file")
    .arg(dir.write("empty.json", "{}"))
    .env("NOTIFY_SOCKET", &sock)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let child = cmd.spawn().unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = listener.recv(&mut buf).expect("no READY=1 within 90 s");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(msg.clone());
        if msg.lines().any(|l| l == "READY=1") {
            assert!(
                msg.contains("STATUS=serving, not registered yet"),
                "{seen:?}"
            );
            break;
        }
    }
    assert!(
        seen[0].contains("STATUS=registering in the cluster store"),
        "the first notice says what it waits for: {seen:?}"
    );
}
