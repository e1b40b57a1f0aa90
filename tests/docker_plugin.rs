//! vxnet's Docker plugin at the protocol level, on the lab: each host's daemon serves the
//! plugin socket in the host's /run/docker/plugins, and this test speaks to it exactly as an
//! engine does (the calls and bodies of shared/notes/docker-plugin-requests.json), then does
//! what the engine does with a Join's interface (move it into a namespace, rename, address)
//! with iproute2. tests/docker_engine.rs does the same with real Docker engines.

mod common;

use std::path::PathBuf;

use common::{wait_until, TestLab};
use serde_json::{json, Value};
use vxnet::api::client::Client;
use vxnet::docker::Scope;
use vxnet::model::Id;

/// A plugin client for one lab host.
struct Plugin {
    client: Client,
}

impl Plugin {
    fn on(lab: &TestLab, host: &str) -> Plugin {
        let h = lab.lab.host(host).unwrap();
        let socket = PathBuf::from(format!(
            "/proc/{}/root{}",
            h.init_pid(),
            vxnet::docker::DEFAULT_SOCKET
        ));
        Plugin {
            client: Client::from_socket(socket),
        }
    }

    /// One call: (HTTP status, body).
    async fn call_raw(&self, call: &str, body: &[u8]) -> (u16, Value) {
        let (status, bytes) = self
            .client
            .raw(
                hyper::Method::POST,
                &format!("/{call}"),
                Some(body.to_vec()),
            )
            .await
            .unwrap_or_else(|e| panic!("{call}: {e}"));
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{call} answered non-JSON {bytes:?}: {e}"));
        (status.as_u16(), v)
    }

    /// A call that must succeed.
    async fn call(&self, call: &str, body: Value) -> Value {
        let (status, v) = self.call_raw(call, body.to_string().as_bytes()).await;
        assert!(
            status == 200 && v.get("Err").is_none(),
            "{call} failed: {status} {v}"
        );
        v
    }

    /// A call that must fail with Docker's `{"Err": …}`; returns the message.
    async fn call_err(&self, call: &str, body: Value) -> String {
        let (status, v) = self.call_raw(call, body.to_string().as_bytes()).await;
        assert_ne!(status, 200, "{call} should have failed: {v}");
        v["Err"]
            .as_str()
            .unwrap_or_else(|| panic!("{call}: no Err in {v}"))
            .to_string()
    }

    async fn request_address(&self, pool: &str) -> String {
        let v = self
            .call(
                "IpamDriver.RequestAddress",
                json!({"PoolID": pool, "Address": "", "Options": {}}),
            )
            .await;
        v["Address"].as_str().unwrap().to_string()
    }

    /// CreateEndpoint + Join, as for `docker run`: returns the interface's host-side name.
    async fn endpoint(&self, net: &str, ep: &str, cidr: &str) -> String {
        let v = self
            .call(
                "NetworkDriver.CreateEndpoint",
                json!({"NetworkID": net, "EndpointID": ep,
                       "Interface": {"Address": cidr, "AddressIPv6": "", "MacAddress": ""},
                       "Options": {}}),
            )
            .await;
        assert_eq!(v, json!({"Interface": {}}));
        let v = self
            .call(
                "NetworkDriver.Join",
                json!({"NetworkID": net, "EndpointID": ep,
                       "SandboxKey": "/var/run/docker/netns/x", "Options": {}}),
            )
            .await;
        assert_eq!(v["InterfaceName"]["DstPrefix"], "eth");
        assert!(v.get("Gateway").is_none(), "{v}");
        v["InterfaceName"]["SrcName"].as_str().unwrap().to_string()
    }

    async fn remove_endpoint(&self, net: &str, ep: &str) {
        let b = json!({"NetworkID": net, "EndpointID": ep});
        self.call("NetworkDriver.Leave", b.clone()).await;
        self.call("NetworkDriver.DeleteEndpoint", b).await;
    }
}

/// Does with the Join's interface what Docker does: moves it into the container's namespace
/// (here a named namespace on the host), names it eth0, addresses it, brings it up.
fn adopt(lab: &TestLab, host: &str, ns: &str, src: &str, cidr: &str) {
    for argv in [
        vec!["ip", "netns", "add", ns],
        vec!["ip", "link", "set", src, "netns", ns],
        vec!["ip", "-n", ns, "link", "set", src, "name", "eth0"],
        vec!["ip", "-n", ns, "addr", "add", cidr, "dev", "eth0"],
        vec!["ip", "-n", ns, "link", "set", "eth0", "up"],
        vec!["ip", "-n", ns, "link", "set", "lo", "up"],
    ] {
        let out = lab.sh(host, &argv);
        assert!(
            out.status.success(),
            "{argv:?} on {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn ns_pings(lab: &TestLab, host: &str, ns: &str, ip: &str) -> bool {
    lab.sh(
        host,
        &["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", ip],
    )
    .status
    .success()
}

fn addr(cidr: &str) -> &str {
    cidr.split('/').next().unwrap()
}

fn docker_id() -> String {
    Id::random().to_string()
}

fn endpoint_ips(lab: &TestLab, host: &str, net: &str) -> Vec<String> {
    let out = lab.vx(host, &["network", "inspect", net]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let v = if v.is_array() { v[0].clone() } else { v };
    let mut ips: Vec<String> = v["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["ip"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ips.sort();
    ips
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_scope_one_create_serves_every_host() {
    let lab = TestLab::up_with(3, |o| o.docker_scope = Scope::Global).await;
    let (p2, p3) = (Plugin::on(&lab, "vm2"), Plugin::on(&lab, "vm3"));

    let v = p2.call("Plugin.Activate", Value::Null).await;
    assert_eq!(v["Implements"], json!(["NetworkDriver", "IpamDriver"]));
    // Activate and GetCapabilities come with empty bodies.
    let (status, v) = p3.call_raw("NetworkDriver.GetCapabilities", b"").await;
    assert_eq!((status, &v["Scope"]), (200, &json!("global")), "{v}");

    // docker network create -d vxnet --ipam-driver vxnet --subnet 10.0.4.0/24 (on vm2 only)
    let pool = p2
        .call(
            "IpamDriver.RequestPool",
            json!({"AddressSpace": "vxnet", "Pool": "10.0.4.0/24", "SubPool": "", "Options": {}, "V6": false}),
        )
        .await;
    let pool_id = pool["PoolID"].as_str().unwrap().to_string();
    let gw = p2
        .call(
            "IpamDriver.RequestAddress",
            json!({"PoolID": pool_id, "Address": "",
                   "Options": {"RequestAddressType": "com.docker.network.gateway"}}),
        )
        .await;
    assert_eq!(gw["Address"], "10.0.4.1/24");
    let net = docker_id();
    p2.call(
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": net,
               "Options": {"com.docker.network.enable_ipv6": false,
                           "com.docker.network.generic": {"vxnet.network": "dnet"}},
               "IPv4Data": [{"AddressSpace": "vxnet", "Gateway": "10.0.4.1/24", "Pool": "10.0.4.0/24"}],
               "IPv6Data": []}),
    )
    .await;
    // The vxnet network carries Docker's ID: vm3 knows it without any CreateNetwork.
    wait_until(|| {
        lab.vx("vm3", &["network", "ls", "-q", "--no-trunc"])
            .contains(&net)
    });

    // One container on each host; addresses from the cluster-wide IPAM never collide.
    let a = p2.request_address(&pool_id).await;
    let b = p3.request_address(&pool_id).await;
    assert_ne!(a, b);
    let (e2, e3) = (docker_id(), docker_id());
    let src2 = p2.endpoint(&net, &e2, &a).await;
    let src3 = p3.endpoint(&net, &e3, &b).await;
    adopt(&lab, "vm2", "c2", &src2, &a);
    adopt(&lab, "vm3", "c3", &src3, &b);
    let mtu = lab.sh("vm2", &["ip", "-n", "c2", "link", "show", "eth0"]);
    assert!(
        String::from_utf8_lossy(&mtu.stdout).contains("mtu 1450"),
        "{mtu:?}"
    );
    assert!(ns_pings(&lab, "vm2", "c2", addr(&b)), "vm2 -> vm3");
    assert!(ns_pings(&lab, "vm3", "c3", addr(&a)), "vm3 -> vm2");
    // A `vxnet run` container on the same network reaches Docker's.
    lab.vx(
        "vm3",
        &[
            "run", "-d", "--name", "v3", "--net", "dnet", "--", "sleep", "600",
        ],
    );
    assert!(
        lab.pings("vm3", "v3", addr(&a)),
        "vxnet run -> plugin endpoint"
    );

    // A daemon restart (Docker does not repeat anything): the endpoints stay, and the
    // plugin still knows them.
    lab.lab.stop_daemon("vm2").unwrap();
    lab.lab.start_daemon("vm2").await.unwrap();
    // (The restarted daemon answers before it has synced: `network ls` fails until then.)
    wait_until(|| {
        let ls = lab.sh("vm2", &["vxnet", "network", "ls"]);
        ls.status.success()
            && String::from_utf8_lossy(&ls.stdout).contains("dnet")
            && endpoint_ips(&lab, "vm2", &net).len() == 3
    });
    assert!(ns_pings(&lab, "vm3", "c3", addr(&a)), "after vm2's restart");
    let info = p2
        .call(
            "NetworkDriver.EndpointOperInfo",
            json!({"NetworkID": net, "EndpointID": e2}),
        )
        .await;
    assert_eq!(info["Value"]["vxnet.ip"], addr(&a), "{info}");

    // docker rm -f on vm2: Leave, DeleteEndpoint, ReleaseAddress; gone on vm3 too. Leave
    // answers before its port is deleted; DeleteEndpoint waits for that deletion.
    // (A second port on vm2 keeps the sandbox, so that the port's own removal is seen.)
    lab.vx(
        "vm2",
        &[
            "run", "-d", "--name", "v2", "--net", "dnet", "--", "sleep", "600",
        ],
    );
    let port = info["Value"]["vxnet.sandbox_port"]
        .as_str()
        .unwrap()
        .to_string();
    let links = || lab.in_sandbox("vm2", &net, &["ip", "-br", "link"]);
    assert!(links().contains(&port), "{}", links());
    p2.remove_endpoint(&net, &e2).await;
    let left = links();
    assert!(
        left.contains("br0") && !left.contains(&port),
        "{port} still in the sandbox: {left}"
    );
    let calls = lab.vx("vm2", &["info", "--format", "json"]);
    assert!(calls.contains("\"NetworkDriver.Leave\""), "{calls}");
    p2.call(
        "IpamDriver.ReleaseAddress",
        json!({"PoolID": pool_id, "Address": addr(&a)}),
    )
    .await;
    wait_until(|| !endpoint_ips(&lab, "vm3", &net).contains(&addr(&a).to_string()));
    assert!(!ns_pings(&lab, "vm3", "c3", addr(&a)));

    // Refusals come back as Docker's {"Err": …}, never a hang or a crash.
    let e = p2
        .call_err(
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": docker_id(), "EndpointID": docker_id(),
                   "Interface": {"Address": "10.0.4.77/24"}}),
        )
        .await;
    assert!(e.contains("not found"), "{e}");
    let e = p2
        .call_err(
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": net, "EndpointID": docker_id(),
                   "Interface": {"Address": b.clone()}}),
        )
        .await;
    assert!(e.contains("already in use"), "{e}");
    let (status, v) = p2.call_raw("NetworkDriver.Join", b"{not json").await;
    assert_eq!(status, 400, "{v}");
    assert!(v["Err"].as_str().unwrap().contains("invalid"), "{v}");
    let (status, v) = p2.call_raw("NetworkDriver.Frobnicate", b"{}").await;
    assert_eq!(status, 404, "{v}");
    let e = p2
        .call_err("NetworkDriver.AllocateNetwork", json!({}))
        .await;
    assert!(e.contains("not supported"), "{e}");
    let e = p2
        .call_err(
            "IpamDriver.RequestAddress",
            json!({"PoolID": "somebody-else:10.0.4.0/24"}),
        )
        .await;
    assert!(e.contains("vxnet's IPAM"), "{e}");

    // docker network rm on vm3 (not the creator): refused while vxnet's container is
    // attached, then the vxnet network goes with it.
    p3.remove_endpoint(&net, &e3).await;
    let e = p3
        .call_err("NetworkDriver.DeleteNetwork", json!({"NetworkID": net}))
        .await;
    assert!(e.contains("active endpoint"), "{e}");
    lab.vx("vm3", &["rm", "-f", "v3"]);
    lab.vx("vm2", &["rm", "-f", "v2"]);
    p3.call("NetworkDriver.DeleteNetwork", json!({"NetworkID": net}))
        .await;
    wait_until(|| !lab.vx("vm2", &["network", "ls"]).contains("dnet"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_scope_binds_each_hosts_network_by_name() {
    let lab = TestLab::up(3).await;
    let (p2, p3) = (Plugin::on(&lab, "vm2"), Plugin::on(&lab, "vm3"));
    let v = p2.call("NetworkDriver.GetCapabilities", Value::Null).await;
    assert_eq!(v["Scope"], "local");

    let create = |net: &str, space: &str| {
        json!({"NetworkID": net,
               "Options": {"com.docker.network.generic": {"vxnet.network": "shared"}},
               "IPv4Data": [{"AddressSpace": space, "Gateway": "10.0.6.1/24", "Pool": "10.0.6.0/24"}]})
    };
    // Docker's default IPAM would hand out the same addresses on every host: refused.
    let e = p2
        .call_err(
            "NetworkDriver.CreateNetwork",
            create(&docker_id(), "LocalDefault"),
        )
        .await;
    assert!(e.contains("--ipam-driver vxnet"), "{e}");

    // `docker network create` on each host: two Docker IDs, one vxnet network.
    let pool = p2
        .call(
            "IpamDriver.RequestPool",
            json!({"AddressSpace": "vxnet", "Pool": "10.0.6.0/24"}),
        )
        .await;
    let pool_id = pool["PoolID"].as_str().unwrap().to_string();
    let (n2, n3) = (docker_id(), docker_id());
    p2.call("NetworkDriver.CreateNetwork", create(&n2, "vxnet"))
        .await;
    p3.call("NetworkDriver.CreateNetwork", create(&n3, "vxnet"))
        .await;
    let ls = lab.vx("vm2", &["network", "ls"]);
    assert_eq!(ls.matches("shared").count(), 1, "{ls}");
    // A different subnet under the same name is refused with what to use instead.
    let e = p3
        .call_err(
            "NetworkDriver.CreateNetwork",
            json!({"NetworkID": docker_id(),
                   "Options": {"com.docker.network.generic": {"vxnet.network": "shared"}},
                   "IPv4Data": [{"AddressSpace": "vxnet", "Pool": "10.0.7.0/24"}]}),
        )
        .await;
    assert!(e.contains("use --subnet 10.0.6.0/24"), "{e}");

    let a = p2.request_address(&pool_id).await;
    let b = p3.request_address(&pool_id).await;
    let (e2, e3) = (docker_id(), docker_id());
    let src2 = p2.endpoint(&n2, &e2, &a).await;
    let src3 = p3.endpoint(&n3, &e3, &b).await;
    adopt(&lab, "vm2", "c2", &src2, &a);
    adopt(&lab, "vm3", "c3", &src3, &b);
    assert!(ns_pings(&lab, "vm2", "c2", addr(&b)), "vm2 -> vm3");
    assert!(ns_pings(&lab, "vm3", "c3", addr(&a)), "vm3 -> vm2");

    // An endpoint on vm3 may not use vm2's Docker network ID: it is not bound there.
    let e = p3
        .call_err(
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": n2, "EndpointID": docker_id(),
                   "Interface": {"Address": "10.0.6.99/24"}}),
        )
        .await;
    assert!(e.contains("docker network create"), "{e}");

    // Removing the Docker network on vm2 unbinds it there; the vxnet network stays for vm3.
    p2.remove_endpoint(&n2, &e2).await;
    p2.call(
        "IpamDriver.ReleaseAddress",
        json!({"PoolID": pool_id, "Address": addr(&a)}),
    )
    .await;
    p2.call("NetworkDriver.DeleteNetwork", json!({"NetworkID": n2}))
        .await;
    assert!(lab.vx("vm3", &["network", "ls"]).contains("shared"));
    p3.remove_endpoint(&n3, &e3).await;
    assert_eq!(endpoint_ips(&lab, "vm2", "shared"), Vec::<String>::new());
}
