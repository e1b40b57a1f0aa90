//! `vxnet events` in the lab: changes made on vm3 (a network, a container, its daemon's
//! stop and return) and a hostile record written straight into etcd, all seen from vm2's
//! daemon as a live stream, replayed with `--since`, as JSON and as text.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{wait_until, TestLab};
use serde_json::Value;
use vxnet::model::Id;

/// A `vxnet events` left running on a lab host; stopped by its PID when dropped.
struct Watcher {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    errors: Arc<Mutex<String>>,
}

impl Watcher {
    fn start(lab: &TestLab, host: &str, args: &[&str]) -> Watcher {
        let mut cmd = lab.lab.host(host).unwrap().command("vxnet").unwrap();
        cmd.arg("events")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("vxnet events starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let errors = Arc::new(Mutex::new(String::new()));
        let err_sink = errors.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            err_sink.lock().unwrap().push_str(&text);
        });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Watcher {
            child,
            lines,
            errors,
        }
    }

    /// Waits for it to end by itself; returns whether it exited 0, and its stderr.
    fn wait_exit(mut self) -> (bool, String) {
        let mut status = None;
        wait_until(|| {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        // Its stderr reader finishes with the process.
        let mut errors = String::new();
        wait_until(|| {
            errors = self.errors.lock().unwrap().clone();
            !errors.is_empty()
        });
        (status.unwrap().success(), errors)
    }

    /// Waits until a line's JSON matches `pick`; returns it.
    fn wait_for(&self, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        let started = std::time::Instant::now();
        wait_until(|| {
            found = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| pick(v));
            if found.is_none() && started.elapsed().as_secs() >= 29 {
                eprintln!("{what}: not seen; the stream so far:");
                for l in self.lines.lock().unwrap().iter() {
                    eprintln!("  {l}");
                }
            }
            found.is_some()
        });
        found.unwrap()
    }

    /// Interrupts it (Ctrl-C) and returns whether it exited 0.
    fn interrupt(mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let status = self.child.wait().unwrap();
        status.success()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Already reaped after `interrupt`; otherwise (a failed assertion) end our own child.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn is(v: &Value, kind: &str, action: &str) -> bool {
    v["type"] == kind && v["action"] == action
}

fn unix_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_hosts_changes_stream_replay_and_filter_as_json_and_text() {
    // A short lease, so vm3's leave comes soon after its daemon stops.
    let lab = TestLab::up_with(3, |o| {
        o.daemon_args = vec!["--lease-ttl".into(), "4".into()]
    })
    .await;
    let started = unix_now();
    // `--since` the test's start: whatever happens after it is replayed if the stream
    // connects late, so nothing below races the watcher's start.
    let live = Watcher::start(&lab, "vm2", &["--format", "json", "--since", &started]);

    // A network created on another host: name, subnet and its creator.
    let net = lab
        .vx(
            "vm3",
            &["network", "create", "--subnet", "10.0.77.0/24", "blue"],
        )
        .trim()
        .to_string();
    let created = live.wait_for("network create", |v| {
        is(v, "network", "create") && v["actor"]["id"] == net.as_str()
    });
    let attrs = &created["actor"]["attributes"];
    assert_eq!(attrs["name"], "blue");
    assert_eq!(attrs["subnet"], "10.0.77.0/24");
    assert_eq!(attrs["host"], "vm3");
    assert!(created["revision"].as_i64().unwrap() > 0, "{created}");
    assert!(
        humantime::parse_rfc3339(created["time"].as_str().unwrap()).is_ok(),
        "{created}"
    );

    // A container on vm3: its endpoint up, then down, with its host.
    let ip = lab.container("vm3", "c3", "blue");
    let up = live.wait_for("endpoint up", |v| {
        is(v, "endpoint", "up") && v["actor"]["attributes"]["name"] == "c3"
    });
    let attrs = &up["actor"]["attributes"];
    assert_eq!(attrs["host"], "vm3");
    assert_eq!(attrs["network"], "blue");
    assert_eq!(attrs["network_id"], net.as_str());
    assert_eq!(attrs["ip"], ip.as_str());
    lab.vx("vm3", &["rm", "-f", "c3"]);
    let down = live.wait_for("endpoint down", |v| {
        is(v, "endpoint", "down") && v["actor"]["attributes"]["name"] == "c3"
    });
    assert_eq!(down["actor"]["id"], up["actor"]["id"]);
    assert_eq!(down["actor"]["attributes"]["host"], "vm3");
    assert_eq!(down["actor"]["attributes"]["ip"], ip.as_str());

    // A hostile record put straight into etcd: refused, with the reason.
    let info: Value = serde_json::from_str(&lab.vx("vm2", &["info", "--format", "json"])).unwrap();
    let key = format!(
        "{}networks/{}",
        info["store_prefix"].as_str().unwrap(),
        Id::random()
    );
    lab.etcd_put(&key, "{\"oops\":");
    let rejected = live.wait_for("record rejected", |v| {
        is(v, "record", "rejected") && v["actor"]["id"] == key.as_str()
    });
    assert_eq!(rejected["actor"]["attributes"]["kind"], "network");
    let reason = rejected["actor"]["attributes"]["reason"].as_str().unwrap();
    assert!(reason.contains("not a readable network record"), "{reason}");

    // vm3's daemon stops: its node leaves when the lease runs out, and joins on return.
    let vm3_id = lab
        .lab
        .host("vm3")
        .unwrap()
        .client()
        .info()
        .await
        .unwrap()
        .node
        .id;
    assert!(lab.lab.stop_daemon("vm3").unwrap());
    let left = live.wait_for("node leave", |v| {
        is(v, "node", "leave") && v["actor"]["id"] == vm3_id.as_str()
    });
    assert_eq!(left["actor"]["attributes"]["name"], "vm3");
    lab.lab
        .start_daemon("vm3")
        .await
        .expect("vm3's daemon restarts");
    let joined = live.wait_for("node join", |v| {
        is(v, "node", "join")
            && v["actor"]["id"] == vm3_id.as_str()
            && v["revision"].as_i64() > left["revision"].as_i64()
    });
    assert_eq!(joined["actor"]["attributes"]["name"], "vm3");
    // Nothing in the stream is a gap notice, and Ctrl-C ends it with 0.
    assert!(
        !live
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("\"missed\"")),
        "a gap in an idle stream"
    );
    assert!(live.interrupt(), "vxnet events exits 0 on Ctrl-C");

    // `--since` replays the past, `--until` ends the stream: the same create, from the ring.
    let until = unix_now();
    let replay = json_lines(&lab.vx(
        "vm2",
        &[
            "events", "--format", "json", "--since", &started, "--until", &until,
        ],
    ));
    let again = replay
        .iter()
        .find(|v| is(v, "network", "create") && v["actor"]["id"] == net.as_str())
        .unwrap_or_else(|| panic!("no create in the replay: {replay:?}"));
    assert_eq!(again, &created);
    for kind in ["network", "endpoint", "node", "record"] {
        assert!(replay.iter().any(|v| v["type"] == kind), "no {kind} event");
    }

    // Filters are the daemon's: only vm3's node events, by name or by ID prefix.
    for node in ["vm3", vm3_id.prefix(12)] {
        let nodes = json_lines(&lab.vx(
            "vm2",
            &[
                "events",
                "--format",
                "json",
                "--since",
                &started,
                "--until",
                &until,
                "--filter",
                "type=node",
                "--filter",
                &format!("node={node}"),
            ],
        ));
        let actions: Vec<&str> = nodes
            .iter()
            .map(|v| v["action"].as_str().unwrap())
            .collect();
        assert!(
            actions.contains(&"leave") && actions.contains(&"join"),
            "{nodes:?}"
        );
        assert!(
            nodes.iter().all(|v| v["actor"]["id"] == vm3_id.as_str()),
            "{nodes:?}"
        );
    }
    let blue = json_lines(&lab.vx(
        "vm2",
        &[
            "events",
            "--format",
            "json",
            "--since",
            &started,
            "--until",
            &until,
            "-f",
            "network=blue",
            "-f",
            "event=up",
            "-f",
            "event=down",
        ],
    ));
    let actions: Vec<&str> = blue.iter().map(|v| v["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["up", "down"], "{blue:?}");

    // The text form: `TIME TYPE ACTION ID (k=v, …)`, like `docker events`.
    let text = lab.vx("vm2", &["events", "--since", &started, "--until", &until]);
    let line = text
        .lines()
        .find(|l| l.contains(" network create "))
        .unwrap_or_else(|| panic!("no create line: {text}"));
    let mut fields = line.splitn(5, ' ');
    let time = fields.next().unwrap();
    assert!(humantime::parse_rfc3339(time).is_ok(), "{line}");
    assert_eq!(fields.next(), Some("network"));
    assert_eq!(fields.next(), Some("create"));
    assert_eq!(fields.next(), Some(net.as_str()));
    let attrs = fields.next().unwrap();
    assert!(attrs.starts_with('(') && attrs.ends_with(')'), "{line}");
    let pairs: Vec<(&str, &str)> = attrs[1..attrs.len() - 1]
        .split(", ")
        .map(|kv| kv.split_once('=').unwrap())
        .collect();
    assert!(pairs.contains(&("name", "blue")), "{line}");
    assert!(pairs.contains(&("subnet", "10.0.77.0/24")), "{line}");
    assert!(pairs.contains(&("host", "vm3")), "{line}");
    assert_eq!(
        text.lines().count(),
        replay.len(),
        "one text line per event"
    );

    // Bad filters and times: errors that say what was wrong, before anything streams.
    let err = lab.vx_err("vm2", &["events", "--filter", "colour=red"]);
    assert!(err.contains("unknown filter key \"colour\""), "{err}");
    let err = lab.vx_err("vm2", &["events", "--filter", "type=container"]);
    assert!(err.contains("network, endpoint, node, record"), "{err}");
    let err = lab.vx_err("vm2", &["events", "--since", "yesterday"]);
    assert!(err.contains("--since") && err.contains("RFC 3339"), "{err}");
    let err = lab.vx_err("vm2", &["events", "--format", "yaml"]);
    assert!(err.contains("use json"), "{err}");
    // The daemon checks its query too (another client than the CLI).
    let (status, body) = lab
        .lab
        .host("vm2")
        .unwrap()
        .client()
        .raw(hyper::Method::GET, "/v1/events?colour=red", None)
        .await
        .unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("colour"));

    // A daemon that stops ends its streams (its graceful shutdown does not wait on them),
    // and the CLI says so instead of hanging or exiting 0.
    let on_vm3 = Watcher::start(&lab, "vm3", &["--format", "json"]);
    let mut n = 0;
    wait_until(|| {
        // Until the stream is connected, a create is not in it: make another.
        n += 1;
        lab.vx("vm2", &["network", "create", &format!("green{n}")]);
        !on_vm3.lines.lock().unwrap().is_empty()
    });
    assert!(lab.lab.stop_daemon("vm3").unwrap());
    let (ok, errors) = on_vm3.wait_exit();
    assert!(!ok, "a stream the daemon ended is not a success: {errors}");
    assert!(
        errors.contains("the daemon ended the event stream"),
        "{errors}"
    );
}

/// A watch that resumes at a compacted revision re-lists: what it missed is told as the
/// events it amounts to (the network made meanwhile created, the removed one gone), not
/// silently folded into the new state, and not the whole store replayed as creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_list_after_compaction_tells_what_the_watch_missed() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let lab = TestLab::up(3).await;
    let kept = lab.network("kept", "10.0.30.0/24");
    let before = lab.network("before", "10.0.31.0/24");
    let started = unix_now();
    let vm3 = lab
        .lab
        .host("vm3")
        .unwrap()
        .processes()
        .iter()
        .find(|p| p.role == "daemon")
        .unwrap()
        .pid;
    // As tests/faults_etcd.rs does: freeze vm3's daemon, restart etcd under it (its watch
    // connection dies), change the store and compact it past everything vm3 has seen.
    kill(Pid::from_raw(vm3 as i32), Signal::SIGSTOP).unwrap();
    struct Thaw(u32);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGCONT);
        }
    }
    let thaw = Thaw(vm3);
    assert!(lab.lab.stop_etcd(0).unwrap());
    lab.lab.start_etcd(0).await.unwrap();
    lab.lab
        .wait_etcd_healthy(0, std::time::Duration::from_secs(10))
        .await
        .unwrap();
    let mut after = String::new();
    wait_until(|| {
        let out = lab.sh(
            "vm2",
            &[
                "vxnet",
                "network",
                "create",
                "--subnet",
                "10.0.32.0/24",
                "after",
            ],
        );
        after = String::from_utf8_lossy(&out.stdout).trim().to_string();
        out.status.success()
    });
    lab.vx("vm2", &["network", "rm", "before"]);
    let status = lab.etcdctl(&["endpoint", "status", "-w", "json"]);
    let v: Value = serde_json::from_str(&status).unwrap();
    let revision = v[0]["Status"]["header"]["revision"].as_i64().unwrap();
    lab.etcdctl(&["compact", &revision.to_string()]);
    drop(thaw);

    let mut events = Vec::new();
    wait_until(|| {
        let until = unix_now();
        events = json_lines(&lab.vx(
            "vm3",
            &[
                "events", "--format", "json", "--since", &started, "--until", &until,
            ],
        ));
        events.iter().any(|v| is(v, "network", "rm"))
    });
    let networks: Vec<(&str, &str)> = events
        .iter()
        .filter(|v| v["type"] == "network")
        .map(|v| {
            (
                v["action"].as_str().unwrap(),
                v["actor"]["id"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(networks.contains(&("create", after.as_str())), "{events:?}");
    assert!(networks.contains(&("rm", before.as_str())), "{events:?}");
    // The unchanged network is state, not news.
    assert!(
        !networks.iter().any(|(_, id)| *id == kept.as_str()),
        "{events:?}"
    );
    // Both at the listing's revision: one re-list, not replayed watch events.
    let revisions: std::collections::BTreeSet<i64> = events
        .iter()
        .filter(|v| v["type"] == "network")
        .map(|v| v["revision"].as_i64().unwrap())
        .collect();
    assert_eq!(revisions.len(), 1, "{events:?}");
}
