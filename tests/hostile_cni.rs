//! What a CNI runtime (or whoever can run `vxnet-cni` as root) might hand the plugin to make
//! the daemon program something that is not the container's: the host's own namespace, one
//! of vxnet's, a file that is no namespace, names that break out of their field. Each case
//! prints a `HOSTILE|…` line once its assertions held (scripts/security-table collects them).

mod common;

use common::cni::{conf, Call};
use common::TestLab;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_cannot_point_the_plugin_at_the_host_or_at_vxnet() {
    let lab = TestLab::up(3).await;
    let net_id = lab.network("hn", "10.0.42.0/24");
    let ns = lab.runtime_netns("vm2", "victim");
    let base = conf("1.1.0", "hn");
    // One real attachment, so that the network's sandbox exists to be pointed at.
    assert!(lab.cni("vm2", &Call::new("ADD", "real", &ns), &base).ok);
    let sandbox = format!("/run/vxnet/netns/1-{}", &net_id[..10]);
    let links = |host: &str| lab.sh(host, &["ip", "-o", "link"]).stdout;
    let host_links = links("vm2");
    let sandbox_links = lab.in_sandbox("vm2", &net_id, &["ip", "-o", "link"]);
    for (what, netns) in [
        (
            "the daemon's own namespace (/proc/self/ns/net)",
            "/proc/self/ns/net",
        ),
        ("PID 1's namespace", "/proc/1/ns/net"),
        ("the network's sandbox", sandbox.as_str()),
        ("a plain file", "/etc/hostname"),
        ("a path that names nothing", "/run/netns/missing"),
        ("a relative path", "run/netns/victim"),
    ] {
        let out = lab.cni("vm2", &Call::new("ADD", "hostile", netns), &base);
        let code = out.code();
        let v = out.json();
        println!(
            "HOSTILE|CNI ADD with CNI_NETNS = {what}|refused, CNI error {code}: {}",
            v["msg"].as_str().unwrap_or_default().replace('|', "/")
        );
    }
    assert_eq!(links("vm2"), host_links, "nothing made in the host");
    assert_eq!(
        lab.in_sandbox("vm2", &net_id, &["ip", "-o", "link"]),
        sandbox_links,
        "nothing made in the sandbox"
    );
    println!("HOSTILE|CNI ADDs above: the host's and the sandbox's interfaces|unchanged");
    for (what, id, ifname) in [
        ("a container ID with a path in it", "../x", "eth0"),
        ("an interface name with a path in it", "x", "eth0/../../x"),
        ("a 16-character interface name", "x", "a-very-long-name"),
        ("the gateway interface's own name", "x", "vxgw0"),
    ] {
        let mut call = Call::new("ADD", id, &ns);
        call.ifname = ifname;
        let out = lab.cni("vm2", &call, &base);
        println!(
            "HOSTILE|CNI ADD with {what}|refused, CNI error {}",
            out.code()
        );
    }
    let mut bad_alias = base.clone();
    bad_alias["runtimeConfig"] = json!({ "aliases": { "hn": ["not a name!"] } });
    let out = lab.cni("vm2", &Call::new("ADD", "alias", &ns), &bad_alias);
    println!(
        "HOSTILE|CNI ADD with an alias that is no DNS name|refused, CNI error {}",
        out.code()
    );
    // A second ADD of another container into the same namespace and interface name.
    let out = lab.cni("vm2", &Call::new("ADD", "squatter", &ns), &base);
    println!(
        "HOSTILE|CNI ADD of another container ID into an interface that exists|refused, CNI error {}",
        out.code()
    );
    let ps = lab.vx("vm2", &["ps", "-q"]);
    assert_eq!(ps.lines().count(), 1, "only the real attachment: {ps}");
    let oversized =
        json!({ "cniVersion": "1.1.0", "name": "hn", "type": "vxnet", "pad": "x".repeat(2 << 20) });
    let out = lab.cni("vm2", &Call::new("ADD", "big", &ns), &oversized);
    println!(
        "HOSTILE|CNI config of 2 MiB on stdin|refused, CNI error {}",
        out.code()
    );
}
