//! The CNI plugin (`vxnet-cni`) driven as the CNI spec says a runtime drives it, on lab
//! hosts: the spec's conformance points and the attachment's life
//! (leaks, GC, STATUS in a store outage, daemon restarts, a chained `portmap`).
//! tests/cni_runtimes.rs does the same with containerd and Podman themselves, and
//! tests/hostile_cni.rs with a runtime's hostile inputs.

mod common;

use std::time::Duration;

use common::cni::{conf, Call};
use common::dns::{getent, wait_for};
use common::TestLab;
use serde_json::{json, Value};

/// Whether `host` lists an endpoint with `ip` on `net` (`network inspect`, Docker's array).
fn listed_on(lab: &TestLab, host: &str, net: &str, ip: &str) -> bool {
    let v: Value = serde_json::from_str(&lab.vx(host, &["network", "inspect", net])).unwrap();
    v[0]["endpoints"]
        .as_array()
        .is_some_and(|eps| eps.iter().any(|e| e["ip"] == ip))
}

fn address(result: &Value, index: usize) -> String {
    let cidr = result["ips"][index]["address"].as_str().unwrap();
    cidr.split('/').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_speaks_cni_1_0_and_1_1_as_the_spec_says() {
    let lab = TestLab::up(3).await;
    lab.network("dbnet", "10.0.40.0/24");

    // VERSION: both versions, whatever the config's.
    for v in ["1.0.0", "1.1.0"] {
        let out = lab.cni(
            "vm2",
            &Call::new("VERSION", "", ""),
            &json!({ "cniVersion": v }),
        );
        assert!(out.ok, "{out:?}");
        let answer = out.json();
        assert_eq!(answer["supportedVersions"], json!(["1.0.0", "1.1.0"]));
        assert_eq!(answer["cniVersion"], v);
    }

    // ADD of the spec's example configuration ("dbnet"), as the runtime derives it for the
    // first plugin of the list, with vxnet in the bridge plugin's place: other plugins'
    // keys (bridge, keyA, ipam, dns) are ignored, the daemon does the IPAM.
    let ns1 = lab.runtime_netns("vm2", "cni-a");
    let example = json!({
        "cniVersion": "1.0.0",
        "name": "dbnet",
        "type": "vxnet",
        "bridge": "cni0",
        "keyA": ["some more", "plugin specific", "configuration"],
        "ipam": { "type": "host-local", "subnet": "10.1.0.0/16", "gateway": "10.1.0.1" },
        "dns": { "nameservers": ["10.1.0.1"] },
        "runtimeConfig": { "mac": "00:11:22:33:44:66" }
    });
    let add = Call::new("ADD", "example-1", &ns1);
    let out = lab.cni("vm2", &add, &example);
    assert!(out.ok, "ADD: {out:?}");
    let result = out.json();
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(result["interfaces"][0]["name"], "eth0");
    assert_eq!(result["interfaces"][0]["sandbox"], ns1.as_str());
    assert!(result["interfaces"][0]["mac"]
        .as_str()
        .is_some_and(|m| m.len() == 17));
    assert!(
        result["interfaces"][0].get("mtu").is_none(),
        "mtu is 1.1's: {result}"
    );
    assert_eq!(result["ips"][0]["interface"], 0);
    assert_eq!(result["ips"][0]["gateway"], "10.0.40.1");
    let ip1 = address(&result, 0);
    assert!(ip1.starts_with("10.0.40."), "{result}");
    assert_eq!(result["interfaces"][1]["name"], "vxgw0");
    assert_eq!(result["dns"]["nameservers"], json!(["169.254.53.53"]));
    let routes = result["routes"].as_array().unwrap();
    assert!(routes.iter().any(|r| r["dst"] == "0.0.0.0/0"), "{result}");
    // The kernel agrees (iproute2 as the oracle).
    let shown = lab.in_runtime_netns("vm2", "cni-a", &["ip", "-o", "addr", "show", "eth0"]);
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains(&format!("{ip1}/24")),
        "{shown:?}"
    );
    let mtu = lab.in_runtime_netns("vm2", "cni-a", &["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(String::from_utf8_lossy(&mtu.stdout).trim(), "1450");
    // The address is the cluster's: vm3 sees the endpoint.
    wait_for(Duration::from_secs(10), "the endpoint on vm3", || {
        listed_on(&lab, "vm3", "dbnet", &ip1)
    });
    // ADD again (a runtime retrying) answers the same attachment.
    let again = lab.cni("vm2", &add, &example);
    assert!(again.ok, "{again:?}");
    assert_eq!(address(&again.json(), 0), ip1);

    // 1.1.0: the same shape, with each interface's MTU.
    let ns2 = lab.runtime_netns("vm2", "cni-b");
    let out = lab.cni(
        "vm2",
        &Call::new("ADD", "example-2", &ns2),
        &conf("1.1.0", "dbnet"),
    );
    assert!(out.ok, "{out:?}");
    let result2 = out.json();
    assert_eq!(result2["cniVersion"], "1.1.0");
    assert_eq!(result2["interfaces"][0]["mtu"], 1450);
    assert_eq!(result2["interfaces"][1]["mtu"], 1500);

    // CHECK with prevResult: silent success; a prevResult that does not match, or none, or
    // an interface removed behind vxnet's back: errors.
    let mut checked = example.clone();
    checked["prevResult"] = result.clone();
    let check = Call::new("CHECK", "example-1", &ns1);
    let out = lab.cni("vm2", &check, &checked);
    assert!(out.ok && out.stdout.trim().is_empty(), "CHECK: {out:?}");
    let mut wrong = checked.clone();
    wrong["prevResult"]["interfaces"][0]["mac"] = json!("02:00:00:00:00:01");
    assert_eq!(lab.cni("vm2", &check, &wrong).code(), 101);
    assert_eq!(
        lab.cni("vm2", &check, &example).code(),
        7,
        "CHECK needs prevResult"
    );
    assert_eq!(
        lab.cni("vm2", &Call::new("CHECK", "nobody", &ns1), &checked)
            .code(),
        3,
        "an unknown container"
    );
    let mut checked2 = conf("1.1.0", "dbnet");
    checked2["prevResult"] = result2.clone();
    let check2 = Call::new("CHECK", "example-2", &ns2);
    assert!(lab.cni("vm2", &check2, &checked2).ok);
    let del = lab.in_runtime_netns("vm2", "cni-b", &["ip", "link", "del", "eth0"]);
    assert!(del.status.success(), "{del:?}");
    let broken = lab.cni("vm2", &check2, &checked2);
    assert!(
        !broken.ok && broken.json()["msg"].as_str().unwrap().contains("eth0"),
        "{broken:?}"
    );

    // Errors: JSON on stdout with the spec's codes, in the config's version.
    let e = lab.cni("vm2", &add, &conf("0.3.1", "dbnet"));
    assert_eq!(e.code(), 1, "an unsupported version");
    let garbage = lab.cni("vm2", &add, &json!("not a config"));
    assert_eq!(garbage.code(), 6, "stdin that is not a config");
    assert_eq!(
        lab.cni("vm2", &Call::new("ADD", "", &ns1), &example).code(),
        4,
        "no CNI_CONTAINERID"
    );
    assert_eq!(
        lab.cni("vm2", &Call::new("FROB", "x", &ns1), &example)
            .code(),
        4,
        "an unknown CNI_COMMAND"
    );
    let unknown = lab.cni(
        "vm2",
        &Call::new("ADD", "u1", &ns1),
        &conf("1.1.0", "nonet"),
    );
    assert_eq!(unknown.code(), 7, "an unknown network");
    assert!(unknown.json()["msg"].as_str().unwrap().contains("nonet"));
    assert_eq!(unknown.json()["cniVersion"], "1.1.0");
    let mut no_daemon = conf("1.1.0", "dbnet");
    no_daemon["socket"] = json!("/run/vxnet/nobody.sock");
    let e = lab.cni("vm2", &Call::new("ADD", "u2", &ns1), &no_daemon);
    assert_eq!(e.code(), 11, "no daemon: try again later");
    assert!(
        e.json()["msg"].as_str().unwrap().contains("vxnet daemon"),
        "{e:?}"
    );
    assert_eq!(
        lab.cni("vm2", &Call::new("STATUS", "", ""), &no_daemon)
            .code(),
        50,
        "STATUS without a daemon"
    );
    assert!(lab.cni("vm2", &Call::new("STATUS", "", ""), &example).ok);

    // DEL: with prevResult and an empty CNI_NETNS (containerd's), repeated, and for an
    // attachment that never was.
    let mut deleting = example.clone();
    deleting["prevResult"] = result.clone();
    for _ in 0..2 {
        let out = lab.cni("vm2", &Call::new("DEL", "example-1", ""), &deleting);
        assert!(out.ok && out.stdout.trim().is_empty(), "DEL: {out:?}");
    }
    assert!(
        lab.cni("vm2", &Call::new("DEL", "never-added", ""), &example)
            .ok
    );
    wait_for(Duration::from_secs(10), "the endpoint gone on vm3", || {
        !listed_on(&lab, "vm3", "dbnet", &ip1)
    });
    let left = lab.in_runtime_netns("vm2", "cni-a", &["ip", "-o", "link"]);
    let left = String::from_utf8_lossy(&left.stdout).into_owned();
    assert!(!left.contains("eth0") && !left.contains("vxgw0"), "{left}");
    let routes = String::from_utf8_lossy(&lab.sh("vm2", &["ip", "route"]).stdout).into_owned();
    assert!(
        !routes.contains(&ip1),
        "the published-port route went too: {routes}"
    );

    let ps = lab.vx("vm2", &["ps", "-q"]);
    assert_eq!(ps.lines().count(), 1, "only example-2 is attached: {ps}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_live_and_die_with_their_namespace_gc_status_and_restarts() {
    let lab = TestLab::up(3).await;
    lab.network("n1", "10.0.41.0/24");
    // 1.0.0: Debian's reference plugins (portmap, below) speak up to 1.0.0.
    let base = conf("1.0.0", "n1");
    let add = |id: &str, ns: &str, pod: &str| {
        let args = format!("IgnoreUnknown=1;K8S_POD_NAME={pod}");
        let mut call = Call::new("ADD", id, ns);
        call.args = &args;
        let mut c = base.clone();
        c["runtimeConfig"] = json!({ "aliases": { "n1": [format!("{pod}-alias")] } });
        let out = lab.cni("vm2", &call, &c);
        assert!(out.ok, "ADD {id}: {out:?}");
        address(&out.json(), 0)
    };
    let a = add("ctr-a", &lab.runtime_netns("vm2", "ns-a"), "pod-a");
    let b = add("ctr-b", &lab.runtime_netns("vm2", "ns-b"), "pod-b");
    let c = add("ctr-c", &lab.runtime_netns("vm2", "ns-c"), "pod-c");
    // A vxnet container on vm3 reaches them across hosts, by address and by name.
    let v3 = lab.container("vm3", "v3", "n1");
    assert!(lab.pings("vm3", "v3", &a), "v3 -> pod-a");
    let (ok, out) = getent(&lab, "vm3", "v3", &["hosts", "pod-b"]);
    assert!(
        ok && out.starts_with(&format!("{b} ")),
        "pod-b from vm3: {out}"
    );
    let (ok, out) = getent(&lab, "vm3", "v3", &["hosts", "pod-c-alias"]);
    assert!(
        ok && out.starts_with(&format!("{c} ")),
        "pod-c's alias from vm3: {out}"
    );
    let back = lab.in_runtime_netns("vm2", "ns-a", &["ping", "-c", "1", "-W", "2", &v3]);
    assert!(back.status.success(), "pod-a -> v3: {back:?}");

    // A namespace gone without DEL (containerd's leak): released everywhere by itself.
    assert!(lab
        .sh("vm2", &["ip", "netns", "del", "ns-a"])
        .status
        .success());
    wait_for(Duration::from_secs(15), "pod-a released on vm3", || {
        !listed_on(&lab, "vm3", "n1", &a)
    });
    assert!(!lab.vx("vm2", &["ps"]).contains("pod-a"));

    // GC: everything on n1 here that the runtime no longer lists goes.
    let mut gc = base.clone();
    gc["cni.dev/valid-attachments"] = json!([{ "containerID": "ctr-b", "ifname": "eth0" }]);
    let out = lab.cni("vm2", &Call::new("GC", "", ""), &gc);
    assert!(out.ok, "GC: {out:?}");
    wait_for(Duration::from_secs(10), "pod-c released on vm3", || {
        !listed_on(&lab, "vm3", "n1", &c)
    });
    assert!(listed_on(&lab, "vm3", "n1", &b), "pod-b was valid");

    // A published port through a chained portmap (the reference plugin, given vxnet's
    // result as prevResult, as a runtime chains it): answers from another host.
    // A one-shot server in ns-b (busybox's wget crashes on these hosts; a raw read is
    // enough).
    let mut server = lab
        .lab
        .host("vm2")
        .unwrap()
        .command("ip")
        .unwrap()
        .args([
            "netns",
            "exec",
            "ns-b",
            "sh",
            "-c",
            "echo published-b | busybox nc -l -p 80",
        ])
        .spawn()
        .expect("a server in ns-b");
    let mut chained = json!({
        "cniVersion": "1.0.0", "name": "n1", "type": "portmap",
        "capabilities": { "portMappings": true },
        "runtimeConfig": { "portMappings": [{ "hostPort": 8088, "containerPort": 80, "protocol": "tcp" }] },
    });
    let mut check_b = base.clone();
    let nsb = "/run/netns/ns-b".to_string();
    let again = lab.cni("vm2", &Call::new("ADD", "ctr-b", &nsb), &base);
    chained["prevResult"] = again.json();
    check_b["prevResult"] = again.json();
    let mut pm = lab
        .lab
        .host("vm2")
        .unwrap()
        .command("/usr/lib/cni/portmap")
        .unwrap();
    pm.env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "ctr-b")
        .env("CNI_NETNS", &nsb)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = pm.spawn().expect("portmap");
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input.write_all(chained.to_string().as_bytes()).unwrap();
    }
    let pm_out = child.wait_with_output().unwrap();
    assert!(
        pm_out.status.success(),
        "portmap ADD: {}",
        String::from_utf8_lossy(&pm_out.stdout)
    );
    let vm2 = lab.lab.host("vm2").unwrap().addr();
    let vm3_ns = lab.lab.host("vm3").unwrap().netns().unwrap();
    wait_for(
        Duration::from_secs(10),
        "the published port from vm3",
        || {
            common::tcp_fetch(&vm3_ns, (vm2, 8088).into())
                .is_ok_and(|got| got.contains("published-b"))
        },
    );
    let _ = server.kill();
    let _ = server.wait();

    // STATUS: 50 while the store is down (ADD could not claim an address), 0 again after.
    lab.lab.stop_etcd(0).expect("etcd stops");
    wait_for(Duration::from_secs(20), "STATUS says not available", || {
        let out = lab.cni("vm2", &Call::new("STATUS", "", ""), &base);
        !out.ok && out.code() == 50
    });
    let during = lab.cni(
        "vm2",
        &Call::new("ADD", "ctr-d", &lab.runtime_netns("vm2", "ns-d")),
        &base,
    );
    assert_eq!(during.code(), 11, "ADD in an outage: try again later");
    lab.lab.start_etcd(0).await.expect("etcd starts");
    wait_for(Duration::from_secs(30), "STATUS ready again", || {
        lab.cni("vm2", &Call::new("STATUS", "", ""), &base).ok
    });

    // A daemon restart keeps the attachment: known (CHECK passes) and reachable.
    assert!(lab.lab.stop_daemon("vm2").unwrap());
    lab.lab.start_daemon("vm2").await.expect("daemon restarts");
    wait_for(Duration::from_secs(20), "CHECK after the restart", || {
        lab.cni("vm2", &Call::new("CHECK", "ctr-b", &nsb), &check_b)
            .ok
    });
    assert!(
        lab.pings("vm3", "v3", &b),
        "v3 -> pod-b after vm2's restart"
    );
    // A namespace that goes while the daemon is down is released when it is back (vm3
    // stops listing it while vm2 is away anyway: a stopped daemon's endpoints leave with
    // its lease, and come back with the next one unless released).
    assert!(lab.lab.stop_daemon("vm2").unwrap());
    assert!(lab
        .sh("vm2", &["ip", "netns", "del", "ns-b"])
        .status
        .success());
    lab.lab.start_daemon("vm2").await.expect("daemon restarts");
    wait_for(Duration::from_secs(20), "pod-b released on vm2", || {
        !lab.vx("vm2", &["ps"]).contains("pod-b")
    });
    // (`ps` stops listing it once it is marked exited, a moment before its release.)
    wait_for(Duration::from_secs(10), "pod-b's route gone", || {
        !String::from_utf8_lossy(&lab.sh("vm2", &["ip", "route"]).stdout).contains(&b)
    });
    assert!(
        !listed_on(&lab, "vm3", "n1", &b),
        "pod-b is not claimed again"
    );
}
