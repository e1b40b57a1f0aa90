//! `vxnet daemon --metrics-addr`: the daemons of a lab serve `/metrics`, scraped from inside
//! each host's namespace and parsed by an independent OpenMetrics parser (Python's
//! `prometheus_client`, scripts/deps.sh installs it); the series must be there with their
//! labels and follow what happens in the cluster: a network, containers on two hosts, a
//! `vxnet reconcile`, a name lookup, a bad record written into etcd.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;

use common::cni::Call;
use common::{wait_until, TestLab};
use serde_json::Value;

const PORT: u16 = 9473;

/// One sample as the parser gives it.
#[derive(Debug, Clone)]
struct Sample {
    family: String,
    name: String,
    labels: serde_json::Map<String, Value>,
    value: f64,
}

struct Scrape {
    samples: Vec<Sample>,
    /// Every family the text declares (with or without samples), with its type.
    families: std::collections::BTreeMap<String, String>,
}

impl Scrape {
    /// The value of the sample `name` whose labels include `labels`, if exactly one matches.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut m = self.samples.iter().filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).and_then(Value::as_str) == Some(*v))
        });
        match (m.next(), m.next()) {
            (Some(s), None) => Some(s.value),
            _ => None,
        }
    }

    /// Like `get`, but the series must exist.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no single series {name}{labels:?} in the scrape"))
    }

    fn family_type(&self, family: &str) -> Option<&str> {
        self.families.get(family).map(String::as_str)
    }
}

/// An HTTP GET of `/metrics` from inside `host`'s namespace; the status line, headers and
/// body are checked, the body parsed by Python's OpenMetrics parser.
fn scrape(lab: &TestLab, host: &str) -> Scrape {
    let h = lab.lab.host(host).unwrap();
    let to = SocketAddr::from((h.addr(), PORT));
    let ns = h.netns().unwrap();
    let response = ns
        .run(move || {
            let mut s =
                std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2))?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: vxnet\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok::<_, std::io::Error>(out)
        })
        .unwrap_or_else(|e| panic!("cannot scrape {host} at {to}: {e}"));
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {response}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let scrape = parse(body);
    // docs/metrics.md's sample scrape is copied from one of these.
    if let Ok(dir) = std::env::var("VXNET_METRICS_SAMPLE_DIR") {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = std::fs::write(
            std::path::Path::new(&dir).join(format!("{n:03}-{host}.txt")),
            body,
        );
    }
    scrape
}

/// The parser: `prometheus_client.openmetrics.parser` (strict: it refuses a text without
/// `# EOF`, a counter sample without `_total`, a bad label…).
fn parse(text: &str) -> Scrape {
    const PY: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {"families": {}, "samples": []}
for f in text_string_to_metric_families(sys.stdin.read()):
    out["families"][f.name] = f.type
    for s in f.samples:
        out["samples"].append({"family": f.name, "name": s.name,
                               "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", PY])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (with python3-prometheus-client: scripts/deps.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let families = parsed["families"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let samples = parsed["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Sample {
            family: s["family"].as_str().unwrap().to_string(),
            name: s["name"].as_str().unwrap().to_string(),
            labels: s["labels"].as_object().unwrap().clone(),
            value: s["value"].as_f64().unwrap(),
        })
        .collect();
    Scrape { samples, families }
}

/// Whether a TCP connection from inside `ns` to `to` is accepted (within 2 s).
fn connects(ns: &vxnet::netns::NetNs, to: &str) -> bool {
    let to: SocketAddr = to.parse().unwrap();
    ns.run(move || std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2)))
        .is_ok()
}

fn info(lab: &TestLab, host: &str) -> Value {
    serde_json::from_str(&lab.vx(host, &["info", "--format", "json"])).unwrap()
}

/// Waits until a fresh scrape of `host` satisfies `f`, and returns that scrape.
fn scrape_until(lab: &TestLab, host: &str, f: impl Fn(&Scrape) -> bool) -> Scrape {
    let mut last = None;
    wait_until(|| {
        let s = scrape(lab, host);
        let ok = f(&s);
        last = Some(s);
        ok
    });
    last.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_parsed_and_follow_the_cluster() {
    let addr = format!("0.0.0.0:{PORT}");
    let lab = TestLab::up_with(3, |o| {
        o.daemon_args = vec!["--metrics-addr".into(), addr.clone()];
    })
    .await;

    // Before anything: registered, listed, both hosts seen, no network.
    let before = scrape_until(&lab, "vm2", |s| {
        s.get("vxnet_registered", &[]) == Some(1.0)
            && s.get("vxnet_view_revision", &[]).is_some_and(|r| r > 0.0)
            && s.get("vxnet_nodes", &[]) == Some(2.0)
    });
    assert_eq!(before.value("vxnet_networks", &[]), 0.0);
    assert_eq!(
        before.family_type("vxnet_store_request_duration_seconds"),
        Some("histogram")
    );
    assert_eq!(before.family_type("vxnet_reconcile_runs"), Some("counter"));
    assert_eq!(before.family_type("vxnet_watch_lag_seconds"), Some("gauge"));
    assert!(before.value("vxnet_watch_lag_seconds", &[]) >= 0.0);
    for kind in ["node", "network", "endpoint"] {
        assert_eq!(
            before.value("vxnet_store_records_rejected_total", &[("kind", kind)]),
            0.0
        );
    }
    let txns_before = before
        .get(
            "vxnet_store_request_duration_seconds_count",
            &[("op", "txn")],
        )
        .unwrap_or(0.0);
    // Every daemon lists the store at start-up: the list histogram has counted it.
    assert!(
        before.value(
            "vxnet_store_request_duration_seconds_count",
            &[("op", "list")]
        ) >= 1.0
    );

    // A network and a container on each host.
    let n1 = lab.network("n1", "10.0.61.0/24");
    lab.container("vm2", "c2", "n1");
    lab.container("vm3", "c3", "n1");
    let short = &n1[..12];
    let net = [("network", "n1"), ("network_id", short)];
    for (host, other) in [("vm2", "vm3"), ("vm3", "vm2")] {
        let s = scrape_until(&lab, host, |s| {
            s.get("vxnet_endpoints", &[("location", "remote")]) == Some(1.0)
        });
        assert_eq!(s.value("vxnet_networks", &[]), 1.0, "{host}");
        assert_eq!(s.value("vxnet_nodes", &[]), 2.0, "{host}");
        assert_eq!(
            s.value("vxnet_endpoints", &[("location", "local")]),
            1.0,
            "{host} ({other} has the other)"
        );
    }
    // vm2's c2 came first: c3's arrival was programmed on vm2 as a peer update.
    let s = scrape_until(&lab, "vm2", |s| {
        s.get(
            "vxnet_reconcile_runs_total",
            &[net[0], net[1], ("kind", "peers")],
        )
        .is_some_and(|n| n >= 1.0)
    });
    assert!(s.value("vxnet_peer_programming_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(
        s.value(
            "vxnet_reconcile_errors_total",
            &[net[0], net[1], ("kind", "peers")]
        ),
        0.0
    );
    assert_eq!(s.value("vxnet_reconcile_failing_networks", &[]), 0.0);
    // The create and the attach were transactions of vm2's.
    assert!(
        s.value(
            "vxnet_store_request_duration_seconds_count",
            &[("op", "txn")]
        ) > txns_before,
        "txn count did not rise from {txns_before}"
    );
    let full_before = s
        .get(
            "vxnet_reconcile_runs_total",
            &[net[0], net[1], ("kind", "full")],
        )
        .unwrap_or(0.0);

    // No container reaches a metrics listener (no authentication there): neither its own
    // host's on any address, nor another member's. A port of the host that vxnet does not
    // guard is reachable from the same container, so the probe itself works.
    let c2 = lab.container_ns("vm2", "c2");
    let open = common::tcp_echo_peer(
        &lab.lab.host("vm2").unwrap().netns().unwrap(),
        "0.0.0.0:9474".parse().unwrap(),
    );
    assert!(
        connects(&c2, "172.18.0.1:9474"),
        "the probe's control failed"
    );
    // The echo server may find the probe gone already: its answer does not matter.
    let _ = open.join();
    for to in ["192.0.2.6:9473", "172.18.0.1:9473", "192.0.2.7:9473"] {
        assert!(
            !connects(&c2, to),
            "a container reached the metrics listener at {to}"
        );
    }
    let table = lab.sh("vm2", &["nft", "list", "table", "inet", "vxnet"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains(&format!("iifname \"vxnet_gwbridge\" tcp dport {PORT} drop")),
        "{table}"
    );
    assert!(
        table.contains(&format!("ip daddr @vteps tcp dport {PORT} drop")),
        "{table}"
    );

    // `vxnet reconcile` is a full reconcile of every network with something here.
    lab.vx("vm2", &["reconcile"]);
    let s = scrape(&lab, "vm2");
    assert!(
        s.value(
            "vxnet_reconcile_runs_total",
            &[net[0], net[1], ("kind", "full")]
        ) > full_before
    );

    // A name lookup in c2 is answered by vm2's name server.
    let answered = s.value("vxnet_dns_queries_total", &[("result", "answered")]);
    let (ok, out) = common::dns::getent(&lab, "vm2", "c2", &["hosts", "c3"]);
    assert!(ok, "c3 not resolved in c2: {out}");
    let s = scrape(&lab, "vm2");
    assert!(s.value("vxnet_dns_queries_total", &[("result", "answered")]) > answered);
    assert!(s.value("vxnet_dns_names", &[]) >= 2.0);

    // The CNI plugin's calls: a STATUS served ready, an ADD refused (no such network).
    let ready = common::cni::conf("1.1.0", "n1");
    assert!(lab.cni("vm2", &Call::new("STATUS", "", ""), &ready).ok);
    let ns = lab.runtime_netns("vm2", "m1");
    let refused = lab.cni(
        "vm2",
        &Call::new("ADD", "m1", &ns),
        &common::cni::conf("1.1.0", "nonet"),
    );
    assert!(!refused.ok, "{refused:?}");
    let s = scrape(&lab, "vm2");
    assert_eq!(
        s.value(
            "vxnet_cni_requests_total",
            &[("command", "status"), ("result", "ready")]
        ),
        1.0
    );
    let add_failures: f64 = s
        .samples
        .iter()
        .filter(|x| {
            x.name == "vxnet_cni_requests_total"
                && x.labels["command"] == "add"
                && x.labels["result"] != "ok"
        })
        .map(|x| x.value)
        .sum();
    assert_eq!(add_failures, 1.0);
    assert_eq!(
        s.get(
            "vxnet_cni_requests_total",
            &[("command", "add"), ("result", "ok")]
        ),
        None
    );

    // A bad network record written straight into etcd: refused, and counted, on both hosts.
    let prefix = info(&lab, "vm2")["store_prefix"]
        .as_str()
        .unwrap()
        .to_string();
    let key = format!("{prefix}networks/{}", vxnet::model::Id::random());
    lab.etcd_put(&key, "{\"id\": ");
    for host in ["vm2", "vm3"] {
        let s = scrape_until(&lab, host, |s| {
            s.get("vxnet_store_records_rejected_total", &[("kind", "network")]) >= Some(1.0)
        });
        assert_eq!(
            s.value("vxnet_store_records_refused", &[("kind", "network")]),
            1.0
        );
        assert_eq!(
            s.value("vxnet_store_records_refused", &[("kind", "endpoint")]),
            0.0
        );
        // Still one good network: the bad record did not become one.
        assert_eq!(s.value("vxnet_networks", &[]), 1.0);
    }

    // The record deleted: no longer refused, still counted.
    lab.etcdctl(&["del", &key]);
    let s = scrape_until(&lab, "vm2", |s| {
        s.get("vxnet_store_records_refused", &[("kind", "network")]) == Some(0.0)
    });
    assert!(s.value("vxnet_store_records_rejected_total", &[("kind", "network")]) >= 1.0);

    // Removing the containers and the network takes n1's reconcile series with it.
    lab.vx("vm2", &["rm", "-f", "c2"]);
    lab.vx("vm3", &["rm", "-f", "c3"]);
    lab.vx("vm2", &["network", "rm", "n1"]);
    let s = scrape_until(&lab, "vm2", |s| s.get("vxnet_networks", &[]) == Some(0.0));
    assert!(s
        .samples
        .iter()
        .all(|x| !(x.family == "vxnet_reconcile_runs" && x.labels.get("network").is_some())));
    assert_eq!(s.value("vxnet_endpoints", &[("location", "local")]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_port_in_use_stops_the_daemon_with_a_clear_error() {
    let addr = format!("0.0.0.0:{PORT}");
    let lab = TestLab::up_with(3, |o| {
        o.daemon_args = vec!["--metrics-addr".into(), addr.clone()];
    })
    .await;
    // A second daemon on vm2 (own state, socket and run dir) asking for the same port.
    let store = lab.lab.cluster_store();
    let out = lab.sh(
        "vm2",
        &[
            "vxnet",
            "daemon",
            "--cluster-store",
            &store,
            "--cluster-advertise",
            "192.0.2.6",
            "--state-dir",
            "/run/vxnet-metrics-second/state",
            "--run-dir",
            "/run/vxnet-metrics-second/run",
            "--socket",
            "/run/vxnet-metrics-second/vxnet.sock",
            "--dns=false",
            "--metrics-addr",
            &addr,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a second daemon on a taken port started: {stderr}"
    );
    assert!(
        stderr.contains(&format!("cannot serve metrics on --metrics-addr {addr}"))
            && stderr.contains("in use"),
        "{stderr}"
    );
    // And an address that is not this host's.
    let out = lab.sh(
        "vm2",
        &[
            "vxnet",
            "daemon",
            "--cluster-store",
            &store,
            "--cluster-advertise",
            "192.0.2.6",
            "--state-dir",
            "/run/vxnet-metrics-third/state",
            "--run-dir",
            "/run/vxnet-metrics-third/run",
            "--socket",
            "/run/vxnet-metrics-third/vxnet.sock",
            "--dns=false",
            "--metrics-addr",
            "198.51.100.9:9473",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot serve metrics on --metrics-addr 198.51.100.9:9473"),
        "{stderr}"
    );
    // The first daemon still serves.
    assert_eq!(scrape(&lab, "vm2").value("vxnet_registered", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_shows_in_store_errors_and_watch_lag() {
    let addr = format!("0.0.0.0:{PORT}");
    let lab = TestLab::up_with(3, |o| {
        o.daemon_args = vec!["--metrics-addr".into(), addr.clone()];
    })
    .await;
    scrape_until(&lab, "vm2", |s| s.get("vxnet_registered", &[]) == Some(1.0));
    let unreachable = |s: &Scrape| -> f64 {
        s.samples
            .iter()
            .filter(|x| {
                x.name == "vxnet_store_request_errors_total" && x.labels["kind"] == "unreachable"
            })
            .map(|x| x.value)
            .sum()
    };
    let before = unreachable(&scrape(&lab, "vm2"));

    assert!(lab.lab.stop_etcd(0).unwrap(), "etcd was not running");
    // A write fails (the store cannot be reached) and is counted by operation and kind.
    lab.vx_err(
        "vm2",
        &["network", "create", "--subnet", "10.0.62.0/24", "n2"],
    );
    let s = scrape(&lab, "vm2");
    assert!(unreachable(&s) > before, "no unreachable error counted");
    // The watch hears nothing: its lag grows past the progress interval (5 s) and on.
    let s = scrape_until(&lab, "vm2", |s| {
        s.get("vxnet_watch_lag_seconds", &[])
            .is_some_and(|l| l > 8.0)
    });
    // The view still answers: the scrape is served from it.
    assert_eq!(s.value("vxnet_nodes", &[]), 2.0);

    lab.lab.start_etcd(0).await.unwrap();
    // Back: the watch delivers again, so the lag falls back under the progress interval.
    scrape_until(&lab, "vm2", |s| {
        s.get("vxnet_watch_lag_seconds", &[])
            .is_some_and(|l| l < 5.5)
            && s.get("vxnet_registered", &[]) == Some(1.0)
    });
    lab.vx(
        "vm2",
        &["network", "create", "--subnet", "10.0.62.0/24", "n2"],
    );
}
