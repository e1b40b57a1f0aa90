//! `vxnet doctor` on the lab: healthy hosts pass; damage injected with iproute2 and nft
//! behind the daemon's back (an FDB entry, a neighbour, a network's sandbox, the VTEP set,
//! the gateway bridge, the table and a rule in it, container veths) is named object by
//! object with exit 1, and passes again after `vxnet reconcile`; a host with no network
//! passes, and so does one with hostile records in the store; no daemon, or one that has
//! not read the store, is exit 2 with a message.

mod common;

use common::{wait_until, TestLab};
use serde_json::Value;

/// `vxnet doctor --format json` on `host`: (exit code, report, or null when it printed none).
fn doctor(lab: &TestLab, host: &str) -> (i32, Value) {
    let out = lab.sh(host, &["vxnet", "doctor", "--format", "json"]);
    let code = out.status.code().unwrap_or(-1);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (code, report)
}

/// `vxnet doctor` as text on `host`: (exit code, stdout, stderr).
fn doctor_text(lab: &TestLab, host: &str) -> (i32, String, String) {
    let out = lab.sh(host, &["vxnet", "doctor"]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn info(lab: &TestLab, host: &str) -> Value {
    serde_json::from_str(&lab.vx(host, &["info", "--format", "json"])).unwrap()
}

fn findings(report: &Value) -> Vec<Value> {
    report["findings"].as_array().cloned().unwrap_or_default()
}

/// The finding of `area` whose object contains `object`, with its difference.
fn find<'a>(report: &'a Value, area: &str, object: &str) -> Option<&'a Value> {
    report["findings"]
        .as_array()?
        .iter()
        .find(|f| f["area"] == area && f["object"].as_str().is_some_and(|o| o.contains(object)))
}

fn assert_healthy(lab: &TestLab, host: &str, when: &str) {
    let (code, report) = doctor(lab, host);
    assert_eq!(code, 0, "{when}: doctor on {host} found {report:#}");
    assert!(findings(&report).is_empty(), "{when}: {report:#}");
}

fn reconcile(lab: &TestLab, host: &str) {
    lab.vx(host, &["reconcile"]);
}

/// Runs `argv` in a lab host's own network namespace, asserting success.
fn on_host(lab: &TestLab, host: &str, argv: &[&str]) {
    let out = lab.sh(host, argv);
    assert!(
        out.status.success(),
        "{argv:?} on {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes a network's sandbox on `host` as `dataplane::remove_sandbox` would, behind the
/// daemon's back: its links (veths, br0, vxlan1), then the namespace's mount and file.
fn remove_sandbox(lab: &TestLab, host: &str, net_id: &str) {
    let path = format!("/run/vxnet/netns/1-{}", &net_id[..10]);
    let script = format!(
        "for l in $(nsenter --net={path} ip -o link show | awk -F': ' '{{print $2}}' | cut -d@ -f1); do \
           [ \"$l\" = lo ] || nsenter --net={path} ip link del \"$l\" || exit 1; \
         done; umount {path} && rm {path}"
    );
    on_host(lab, host, &["sh", "-c", &script]);
}

struct World {
    lab: TestLab,
    net: String,
    /// vm3's container: address and MAC (a peer in vm2's sandbox).
    c3_ip: String,
    c3_mac: String,
}

async fn world() -> World {
    let lab = TestLab::up(3).await;
    // A host with no network yet: nothing to differ, and the firewall is still checked.
    wait_until(|| doctor(&lab, "vm2").0 == 0);
    let (_, empty) = doctor(&lab, "vm2");
    assert_eq!(empty["checked"]["networks"], 0, "{empty:#}");
    assert!(
        empty["checked"]["firewall_chains"].as_u64() > Some(0),
        "{empty:#}"
    );
    let net = lab.network("doc-net", "10.0.40.0/24");
    let c2 = lab.container("vm2", "c2", "doc-net");
    let c3_ip = lab.container("vm3", "c3", "doc-net");
    let c3_mac = lab.ps_entry("vm3", "c3")["attachments"][0]["mac"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(lab.pings("vm2", "c2", &c3_ip));
    assert!(lab.pings("vm3", "c3", &c2));
    // A watch event may still be on its way: a bound, not a timing assertion.
    for host in ["vm2", "vm3"] {
        wait_until(|| doctor(&lab, host).0 == 0);
    }
    World {
        lab,
        net,
        c3_ip,
        c3_mac,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_each_injected_difference_and_passes_after_reconcile() {
    let w = world().await;
    let lab = &w.lab;
    let (_, healthy) = doctor(lab, "vm2");
    let checked = &healthy["checked"];
    assert_eq!(checked["networks"], 1, "{healthy:#}");
    assert_eq!(checked["sandboxes"], 1, "{healthy:#}");
    assert_eq!(checked["interfaces"], 1, "{healthy:#}");
    assert_eq!(checked["fdb_entries"], 1, "vm3's container: {healthy:#}");
    assert_eq!(checked["gateway_bridge"], true, "{healthy:#}");
    let (code, text, _) = doctor_text(lab, "vm2");
    assert_eq!(code, 0);
    println!("$ vxnet doctor   # on vm2, healthy\n{text}");
    assert!(
        text.starts_with(
            "no differences: checked 1 network, 1 sandbox, 1 container interface, 1 FDB entry"
        ),
        "{text}"
    );

    // (1) One FDB entry in vm2's sandbox: vm3's container.
    lab.in_sandbox(
        "vm2",
        &w.net,
        &[
            "bridge",
            "fdb",
            "del",
            &w.c3_mac,
            "dev",
            "vxlan1",
            "dst",
            "192.0.2.7",
            "self",
        ],
    );
    let (code, report) = doctor(lab, "vm2");
    assert_eq!(code, 1, "{report:#}");
    let fdb = find(&report, "fdb", &w.c3_mac).unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(fdb["difference"], "missing");
    assert!(fdb["want"].as_str().unwrap().contains("192.0.2.7"), "{fdb}");
    assert!(
        fdb["network"].as_str().unwrap().starts_with("doc-net ("),
        "{fdb}"
    );
    assert!(
        fdb["fix"].as_str().unwrap().contains("vxnet reconcile"),
        "{fdb}"
    );
    assert_eq!(findings(&report).len(), 1, "only the FDB entry: {report:#}");
    let (code, text, _) = doctor_text(lab, "vm2");
    assert_eq!(code, 1);
    assert!(
        text.contains(&format!("FDB entry {} is missing", w.c3_mac)),
        "{text}"
    );
    assert!(text.contains("fix: run `vxnet reconcile`"), "{text}");
    assert!(text.contains("1 difference: checked"), "{text}");
    reconcile(lab, "vm2");
    assert_healthy(lab, "vm2", "after reconcile of the FDB entry");

    // The neighbour half of the same peer.
    lab.in_sandbox(
        "vm2",
        &w.net,
        &["ip", "neigh", "del", &w.c3_ip, "dev", "vxlan1"],
    );
    let (code, report) = doctor(lab, "vm2");
    assert_eq!(code, 1, "{report:#}");
    let neigh = find(&report, "neighbour", &w.c3_ip).unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(neigh["difference"], "missing");
    reconcile(lab, "vm2");
    assert_healthy(lab, "vm2", "after reconcile of the neighbour");

    // (2) vm3's sandbox of the network, removed.
    remove_sandbox(lab, "vm3", &w.net);
    let (code, report) = doctor(lab, "vm3");
    assert_eq!(code, 1, "{report:#}");
    let sandbox = format!("sandbox 1-{}", &w.net[..10]);
    let sb = find(&report, "sandbox", &sandbox).unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(sb["difference"], "missing");
    reconcile(lab, "vm3");
    assert_healthy(lab, "vm3", "after reconcile of the sandbox");
    assert!(lab.pings("vm3", "c3", &lab.overlay_ip("vm2", "c2")));

    // (3) The VTEP set of vm2's table, flushed.
    on_host(
        lab,
        "vm2",
        &["nft", "flush", "set", "inet", "vxnet", "vteps"],
    );
    let (code, report) = doctor(lab, "vm2");
    assert_eq!(code, 1, "{report:#}");
    let set = find(&report, "firewall", "set vteps").unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(set["difference"], "wrong");
    let want = set["want"].as_str().unwrap();
    assert!(
        want.contains("192.0.2.6") && want.contains("192.0.2.7"),
        "{set}"
    );
    assert_eq!(set["have"], "no elements");
    reconcile(lab, "vm2");
    assert_healthy(lab, "vm2", "after reconcile of the VTEP set");

    // All three at once, and a neighbour with them: each is named.
    lab.in_sandbox(
        "vm2",
        &w.net,
        &[
            "bridge",
            "fdb",
            "del",
            &w.c3_mac,
            "dev",
            "vxlan1",
            "dst",
            "192.0.2.7",
            "self",
        ],
    );
    lab.in_sandbox(
        "vm2",
        &w.net,
        &["ip", "neigh", "del", &w.c3_ip, "dev", "vxlan1"],
    );
    on_host(
        lab,
        "vm2",
        &["nft", "flush", "set", "inet", "vxnet", "vteps"],
    );
    remove_sandbox(lab, "vm3", &w.net);
    let (code, report) = doctor(lab, "vm2");
    assert_eq!(code, 1, "{report:#}");
    assert!(find(&report, "fdb", &w.c3_mac).is_some(), "{report:#}");
    assert!(find(&report, "neighbour", &w.c3_ip).is_some(), "{report:#}");
    assert!(
        find(&report, "firewall", "set vteps").is_some(),
        "{report:#}"
    );
    assert_eq!(findings(&report).len(), 3, "{report:#}");
    let (code, report) = doctor(lab, "vm3");
    assert_eq!(code, 1, "{report:#}");
    assert!(find(&report, "sandbox", &sandbox).is_some(), "{report:#}");
    // As a person reads it (docs/faults.md shows this output).
    for host in ["vm2", "vm3"] {
        let (code, text, _) = doctor_text(lab, host);
        assert_eq!(code, 1, "{text}");
        println!("$ vxnet doctor   # on {host}\n{text}");
    }
    reconcile(lab, "vm2");
    reconcile(lab, "vm3");
    assert_healthy(lab, "vm2", "after reconcile of everything");
    assert_healthy(lab, "vm3", "after reconcile of everything");
    let (code, text, _) = doctor_text(lab, "vm3");
    println!("$ vxnet doctor; echo $?   # on vm3 after reconcile\n{text}{code}");
    assert!(lab.pings("vm2", "c2", &w.c3_ip));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_finds_the_gateway_bridge_the_table_and_veths_and_exits_2_without_a_daemon() {
    let w = world().await;
    let lab = &w.lab;

    on_host(lab, "vm2", &["ip", "link", "del", "vxnet_gwbridge"]);
    let (code, report) = doctor(lab, "vm2");
    assert_eq!(code, 1, "{report:#}");
    let gw = find(&report, "gateway", "gateway bridge vxnet_gwbridge")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(gw["difference"], "missing");
    reconcile(lab, "vm2");
    assert_healthy(lab, "vm2", "after reconcile of the gateway bridge");

    // The table: a rule added by hand, then the whole table gone.
    on_host(
        lab,
        "vm2",
        &["nft", "add", "rule", "inet", "vxnet", "forward", "accept"],
    );
    let (code, report) = doctor(lab, "vm2");
    assert_eq!(code, 1, "{report:#}");
    let chain = find(&report, "firewall", "chain forward").unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(chain["difference"], "wrong");
    assert_eq!(findings(&report).len(), 1, "{report:#}");
    on_host(lab, "vm2", &["nft", "delete", "table", "inet", "vxnet"]);
    let (code, report) = doctor(lab, "vm2");
    assert_eq!(code, 1, "{report:#}");
    let table =
        find(&report, "firewall", "table inet vxnet").unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(table["difference"], "missing");
    reconcile(lab, "vm2");
    assert_healthy(lab, "vm2", "after reconcile of the table");

    // A container's veth deleted in vm2's sandbox (its container end goes with it), and a
    // stray veth added there.
    let veth = lab
        .in_sandbox("vm2", &w.net, &["ip", "-o", "link", "show", "type", "veth"])
        .split(": ")
        .nth(1)
        .and_then(|n| n.split('@').next())
        .unwrap_or_default()
        .to_string();
    assert!(veth.starts_with("veth"), "{veth:?}");
    lab.in_sandbox("vm2", &w.net, &["ip", "link", "del", &veth]);
    lab.in_sandbox(
        "vm2",
        &w.net,
        &[
            "sh",
            "-c",
            "ip link add strayA type veth peer name strayB && ip link set strayA master br0",
        ],
    );
    let (code, report) = doctor(lab, "vm2");
    assert_eq!(code, 1, "{report:#}");
    let gone = find(&report, "interface", &veth).unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(gone["difference"], "missing");
    assert!(
        gone["want"].as_str().unwrap().contains("container c2"),
        "{gone}"
    );
    let stray = find(&report, "interface", "strayA").unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(stray["difference"], "unexpected");
    let end = find(&report, "interface", "eth0 of container endpoint")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(end["difference"], "wrong");
    reconcile(lab, "vm2");
    assert_healthy(lab, "vm2", "after reconcile of the veths");
    assert!(lab.pings("vm2", "c2", &w.c3_ip));

    // vxlan1 deleted: named, and the entries on it are reported as not checked.
    lab.in_sandbox("vm2", &w.net, &["ip", "link", "del", "vxlan1"]);
    let (code, report) = doctor(lab, "vm2");
    assert_eq!(code, 1, "{report:#}");
    let vx = find(&report, "sandbox", "vxlan1 in sandbox").unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(vx["difference"], "missing");
    assert!(
        report["skipped"][0]
            .as_str()
            .unwrap()
            .contains("interfaces and peers"),
        "{report:#}"
    );
    reconcile(lab, "vm2");
    assert_healthy(lab, "vm2", "after reconcile of vxlan1");
    assert!(lab.pings("vm2", "c2", &w.c3_ip));

    // Hostile records in the store (as anyone with etcd access could write them) never
    // reach the wanted state: the view refuses them, so doctor neither reports nor trips
    // over them.
    let prefix = info(lab, "vm2")["store_prefix"]
        .as_str()
        .unwrap()
        .to_string();
    let vm3 = info(lab, "vm3")["node"]["id"].as_str().unwrap().to_string();
    let hostile = [
        ("01:00:5e:00:00:01", "10.0.40.200"),
        ("02:42:0a:00:28:c9", "10.0.99.5"),
        ("02:42:0a:00:28:01", "10.0.40.1"),
    ];
    for (mac, ip) in hostile {
        let id = vxnet::model::Id::random();
        let body = serde_json::json!({"id": id.as_str(), "network_id": w.net, "name": "evil",
            "node_id": vm3, "ip": ip, "mac": mac, "created": ""});
        lab.etcd_put(
            &format!("{prefix}endpoints/{}/{id}", w.net),
            &body.to_string(),
        );
    }
    lab.etcd_put(
        &format!("{prefix}endpoints/{}/{}", w.net, vxnet::model::Id::random()),
        "{\"id\": ",
    );
    wait_until(|| info(lab, "vm2")["records_rejected"].as_u64() >= Some(4));
    assert_healthy(lab, "vm2", "with hostile records in the store");

    // No daemon: the check cannot run, which is neither healthy nor a difference.
    assert!(lab.lab.stop_daemon("vm3").unwrap());
    let (code, stdout, stderr) = doctor_text(lab, "vm3");
    assert_eq!(code, 2, "{stdout}{stderr}");
    println!("$ vxnet doctor; echo $?   # daemon stopped\n{stderr}{code}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("the check could not run"), "{stderr}");
    assert!(stderr.contains("Is `vxnet daemon` running?"), "{stderr}");
    // A daemon that has not read the store (started while etcd is away) has nothing to
    // compare with: exit 2 too, until it has.
    lab.lab.stop_all_etcd().unwrap();
    lab.lab.start_daemon("vm3").await.unwrap();
    let (code, stdout, stderr) = doctor_text(lab, "vm3");
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("has not read the cluster store yet"),
        "{stderr}"
    );
    lab.lab.start_all_etcd().await.unwrap();
    wait_until(|| doctor(lab, "vm3").0 == 0);
    let out = lab.sh("vm2", &["vxnet", "doctor", "--format", "yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use json"));
}
