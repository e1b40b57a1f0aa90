//! The control plane against a real etcd: global networks, cluster-wide IPAM, and errors.

mod common;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use vxnet::api::client::{Client, ClientError};
use vxnet::cluster::{EndpointCreate, NetworkCreate};
use vxnet::lab::LocalCluster;

fn net(name: &str, subnet: &str) -> NetworkCreate {
    NetworkCreate {
        name: name.into(),
        subnet: Some(subnet.parse().unwrap()),
        ..Default::default()
    }
}

fn ep(name: &str) -> EndpointCreate {
    EndpointCreate {
        name: Some(name.into()),
        ip: None,
        aliases: Vec::new(),
    }
}

fn ep_at(name: &str, ip: &str) -> EndpointCreate {
    EndpointCreate {
        name: Some(name.into()),
        ip: Some(ip.parse().unwrap()),
        aliases: Vec::new(),
    }
}

/// Waits (up to 10 s) until `client` lists a network called `name`; returns how long it took.
async fn wait_listed(client: &Client, name: &str) -> Duration {
    let started = Instant::now();
    loop {
        let nets = client.network_ls().await.unwrap();
        if nets.iter().any(|n| n.name == name) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_created_on_one_daemon_is_listed_on_every_daemon() {
    let c = common::cluster(3).await;
    let created = c
        .client(0)
        .network_create(&net("my-net", "10.0.4.0/24"))
        .await
        .unwrap();
    assert_eq!(created.id.as_str().len(), 64);
    assert_eq!(created.gateway, "10.0.4.1".parse::<Ipv4Addr>().unwrap());
    assert!(created.vni >= 256);
    // The creating daemon answers only once its own view has the network.
    let own = c.client(0).network_ls().await.unwrap();
    assert!(own.iter().any(|n| n.id == created.id));
    for i in 1..3 {
        let took = wait_listed(&c.client(i), "my-net").await;
        eprintln!("visible on daemon {i} after {took:?}");
        let inspected = c
            .client(i)
            .network_inspect(created.id.short())
            .await
            .unwrap();
        assert_eq!(inspected.network, created);
        assert_eq!(inspected.scope, "global");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_fifty_concurrent_requests_each_get_distinct_addresses() {
    let c = common::cluster(3).await;
    let created = c
        .client(0)
        .network_create(&net("ipam", "10.0.8.0/24"))
        .await
        .unwrap();
    for i in 1..3 {
        wait_listed(&c.client(i), "ipam").await;
    }
    let mut tasks = Vec::new();
    for d in 0..3 {
        for k in 0..50 {
            let client = c.client(d);
            tasks.push(tokio::spawn(async move {
                client
                    .endpoint_create("ipam", &ep(&format!("d{d}-c{k}")))
                    .await
            }));
        }
    }
    let mut ips = HashSet::new();
    let mut macs = HashSet::new();
    for t in tasks {
        let e = t.await.unwrap().unwrap();
        assert!(created.subnet.contains(&e.ip));
        assert_ne!(e.ip, created.gateway);
        assert_eq!(e.mac, vxnet::model::Mac::from_ipv4(e.ip));
        ips.insert(e.ip);
        macs.insert(e.mac);
    }
    assert_eq!(ips.len(), 150, "every request got its own address");
    assert_eq!(macs.len(), 150);
    // The store agrees (read with etcdctl, not through vxnet).
    let addr_keys = c
        .store_keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.contains("/addrs/"))
        .count();
    assert_eq!(addr_keys, 150);
    // Every daemon's inspect shows all 150, each with its host.
    let inspected = c.client(2).network_inspect("ipam").await.unwrap();
    assert_eq!(inspected.endpoints.len(), 150);
    assert!(inspected.endpoints.iter().all(|e| e.node_name.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_addresses_are_not_handed_out_again_at_once() {
    let c = common::cluster(1).await;
    let d = c.client(0);
    d.network_create(&net("reuse", "10.0.9.0/24"))
        .await
        .unwrap();
    let a = d.endpoint_create("reuse", &ep("a")).await.unwrap();
    let b = d.endpoint_create("reuse", &ep("b")).await.unwrap();
    d.endpoint_delete("reuse", "a").await.unwrap();
    let next = d.endpoint_create("reuse", &ep("c")).await.unwrap();
    assert_ne!(next.ip, a.ip, "a released address came straight back");
    assert!(u32::from(next.ip) > u32::from(b.ip));
    // A specific address can still be asked for, including a released one.
    let again = d
        .endpoint_create("reuse", &ep_at("d", &a.ip.to_string()))
        .await
        .unwrap();
    assert_eq!(again.ip, a.ip);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_rm_is_refused_while_endpoints_exist_on_any_host() {
    let c = common::cluster(2).await;
    c.client(0)
        .network_create(&net("busy", "10.0.5.0/24"))
        .await
        .unwrap();
    wait_listed(&c.client(1), "busy").await;
    c.client(1)
        .endpoint_create("busy", &ep("remote"))
        .await
        .unwrap();
    let before = c.store_state().unwrap();
    let err = c.client(0).network_rm("busy").await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT), "{err}");
    assert!(
        err.to_string()
            .contains("1 active endpoint(s) (remote 10.0.5.2)"),
        "{err}"
    );
    assert_eq!(
        c.store_state().unwrap(),
        before,
        "a refused rm wrote something"
    );
    c.client(1).endpoint_delete("busy", "remote").await.unwrap();
    c.client(0).network_rm("busy").await.unwrap();
    assert!(c.client(0).network_ls().await.unwrap().is_empty());
    // Nothing of the network is left in the store.
    assert!(c
        .store_keys()
        .unwrap()
        .iter()
        .all(|k| !k.contains("networks/") && !k.contains("ipam/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name_from_two_hosts_have_one_winner() {
    let c = common::cluster(2).await;
    for round in 0..5 {
        let name = format!("race{round}");
        let (a, b) = (c.client(0), c.client(1));
        let (n1, n2) = (name.clone(), name.clone());
        let r1 = tokio::spawn(async move {
            a.network_create(&net(&n1, &format!("10.1.{round}.0/24")))
                .await
        });
        let r2 = tokio::spawn(async move {
            b.network_create(&net(&n2, &format!("10.2.{round}.0/24")))
                .await
        });
        let (r1, r2) = (r1.await.unwrap(), r2.await.unwrap());
        assert!(
            r1.is_ok() != r2.is_ok(),
            "exactly one must win: {r1:?} {r2:?}"
        );
        let loser = r1.err().or(r2.err()).unwrap();
        assert!(loser.to_string().contains("already exists"), "{loser}");
    }
    // Overlapping subnets under different names: also one winner.
    let (a, b) = (c.client(0), c.client(1));
    let r1 = tokio::spawn(async move { a.network_create(&net("left", "10.3.0.0/16")).await });
    let r2 = tokio::spawn(async move { b.network_create(&net("right", "10.3.4.0/24")).await });
    let (r1, r2) = (r1.await.unwrap(), r2.await.unwrap());
    assert!(
        r1.is_ok() != r2.is_ok(),
        "overlapping subnets both created: {r1:?} {r2:?}"
    );
}

/// Each bad input gets its status and message, and the store revision does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let c = common::cluster(1).await;
    let d = c.client(0);
    d.network_create(&net("taken", "10.0.4.0/24"))
        .await
        .unwrap();
    let vni = d.network_inspect("taken").await.unwrap().network.vni;
    d.network_create(&net("tiny", "10.0.6.0/30")).await.unwrap();
    d.endpoint_create("tiny", &ep("only")).await.unwrap();
    d.endpoint_create("taken", &ep_at("fixed", "10.0.4.9"))
        .await
        .unwrap();

    let with = |f: &dyn Fn(&mut NetworkCreate)| {
        let mut r = net("fresh", "10.0.7.0/24");
        f(&mut r);
        r
    };
    let cases: Vec<(&str, StatusCode, &str, Result<(), ClientError>)> = vec![
        (
            "subnet overlapping another network's",
            StatusCode::CONFLICT,
            "overlaps subnet 10.0.4.0/24 of network taken",
            d.network_create(&with(&|r| {
                r.subnet = Some("10.0.4.128/25".parse().unwrap())
            }))
            .await
            .map(drop),
        ),
        (
            "gateway outside the subnet",
            StatusCode::BAD_REQUEST,
            "gateway 10.9.9.1 is not a usable address of subnet 10.0.7.0/24",
            d.network_create(&with(&|r| r.gateway = Some("10.9.9.1".parse().unwrap())))
                .await
                .map(drop),
        ),
        (
            "subnet with host bits",
            StatusCode::BAD_REQUEST,
            "did you mean 10.0.7.0/24",
            d.network_create(&with(&|r| r.subnet = Some("10.0.7.5/24".parse().unwrap())))
                .await
                .map(drop),
        ),
        (
            "duplicate name",
            StatusCode::CONFLICT,
            "network with name taken already exists",
            d.network_create(&with(&|r| r.name = "taken".into()))
                .await
                .map(drop),
        ),
        (
            "VNI in use",
            StatusCode::CONFLICT,
            "already used by network taken",
            d.network_create(&with(&|r| r.vni = Some(vni)))
                .await
                .map(drop),
        ),
        (
            "VNI out of range",
            StatusCode::BAD_REQUEST,
            "VNI 16777216 is out of range",
            d.network_create(&with(&|r| r.vni = Some(16_777_216)))
                .await
                .map(drop),
        ),
        (
            "MTU below 1280",
            StatusCode::BAD_REQUEST,
            "MTU 1000 is out of range",
            d.network_create(&with(&|r| r.mtu = Some(1000)))
                .await
                .map(drop),
        ),
        (
            "odd characters in a name",
            StatusCode::BAD_REQUEST,
            "invalid network name",
            d.network_create(&with(&|r| r.name = "../etc;rm -rf".into()))
                .await
                .map(drop),
        ),
        (
            "unsupported driver",
            StatusCode::BAD_REQUEST,
            "driver \"bridge\" is not supported",
            d.network_create(&with(&|r| r.driver = Some("bridge".into())))
                .await
                .map(drop),
        ),
        (
            "unknown network (inspect)",
            StatusCode::NOT_FOUND,
            "network nope not found",
            d.network_inspect("nope").await.map(drop),
        ),
        (
            "unknown network (rm)",
            StatusCode::NOT_FOUND,
            "network nope not found",
            d.network_rm("nope").await,
        ),
        (
            "unknown network (attach)",
            StatusCode::NOT_FOUND,
            "network nope not found",
            d.endpoint_create("nope", &ep("x")).await.map(drop),
        ),
        (
            "address outside the subnet",
            StatusCode::BAD_REQUEST,
            "address 10.0.5.3 is not in the network's subnet 10.0.4.0/24",
            d.endpoint_create("taken", &ep_at("x", "10.0.5.3"))
                .await
                .map(drop),
        ),
        (
            "address in use",
            StatusCode::CONFLICT,
            "address 10.0.4.9 is already in use on network taken",
            d.endpoint_create("taken", &ep_at("x", "10.0.4.9"))
                .await
                .map(drop),
        ),
        (
            "gateway address requested",
            StatusCode::CONFLICT,
            "is the network's gateway",
            d.endpoint_create("taken", &ep_at("x", "10.0.4.1"))
                .await
                .map(drop),
        ),
        (
            "subnet exhausted",
            StatusCode::CONFLICT,
            "no address left in 10.0.6.0/30 on network tiny",
            d.endpoint_create("tiny", &ep("x")).await.map(drop),
        ),
        (
            "unknown endpoint",
            StatusCode::NOT_FOUND,
            "endpoint ghost not found",
            d.endpoint_delete("taken", "ghost").await,
        ),
    ];
    let before = c.store_state().unwrap();
    for (what, status, message, result) in cases {
        let err = result.expect_err(what);
        assert_eq!(err.status(), Some(status), "{what}: {err}");
        assert!(err.to_string().contains(message), "{what}: {err}");
    }
    // Raw requests: malformed JSON, wrong types, unknown fields, oversized bodies, bad routes.
    // (what, method, path, body, expected status, expected message)
    type RawCase = (
        &'static str,
        Method,
        &'static str,
        Vec<u8>,
        StatusCode,
        &'static str,
    );
    let raw: Vec<RawCase> = vec![
        (
            "malformed JSON",
            Method::POST,
            "/v1/networks",
            b"{\"name\":".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid request body",
        ),
        (
            "invalid CIDR",
            Method::POST,
            "/v1/networks",
            br#"{"name":"x","subnet":"10.0.4.0/33"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid request body",
        ),
        (
            "wrong type",
            Method::POST,
            "/v1/networks",
            br#"{"name":7,"subnet":"10.0.7.0/24"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid request body",
        ),
        (
            "unknown field",
            Method::POST,
            "/v1/networks",
            br#"{"name":"x","subnet":"10.0.7.0/24","encrypted":true}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "unknown field `encrypted`",
        ),
        (
            "oversized body",
            Method::POST,
            "/v1/networks",
            vec![b' '; 200_000],
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid request body",
        ),
        (
            "bad endpoint body",
            Method::POST,
            "/v1/networks/taken/endpoints",
            br#"{"ip":"300.1.1.1"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid request body",
        ),
        (
            "unknown route",
            Method::GET,
            "/v2/whatever",
            vec![],
            StatusCode::NOT_FOUND,
            "no such API route",
        ),
        (
            "container: malformed JSON",
            Method::POST,
            "/v1/containers",
            b"[1,2".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid request body",
        ),
        (
            "container: unknown field",
            Method::POST,
            "/v1/containers",
            br#"{"network":"taken","privileged":true}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "unknown field `privileged`",
        ),
        (
            "container: bad port mapping",
            Method::POST,
            "/v1/containers",
            br#"{"network":"taken","publish":[{"host_port":70000,"container_port":80,"proto":"tcp"}]}"#
                .to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid request body",
        ),
        (
            "container: unknown network",
            Method::POST,
            "/v1/containers",
            br#"{"network":"nope"}"#.to_vec(),
            StatusCode::NOT_FOUND,
            "network nope not found",
        ),
        (
            "container: start of an unknown container",
            Method::POST,
            "/v1/containers/ghost/start",
            br#"{"pid":1}"#.to_vec(),
            StatusCode::NOT_FOUND,
            "no such container: ghost",
        ),
        (
            "container: odd characters in a name",
            Method::POST,
            "/v1/containers",
            br#"{"network":"taken","name":"a b;c"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid container name",
        ),
    ];
    for (what, method, path, body, status, message) in raw {
        let (got, bytes) = d.raw(method, path, Some(body)).await.unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(got, status, "{what}: {text}");
        let parsed: serde_json::Value = serde_json::from_slice(&bytes).expect("errors are JSON");
        assert!(
            parsed["message"].as_str().unwrap().contains(message),
            "{what}: {text}"
        );
    }
    assert_eq!(
        c.store_state().unwrap(),
        before,
        "a refused request wrote to the store"
    );
    // And the daemon still serves.
    assert_eq!(d.network_ls().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_unreachable_is_reported_with_the_endpoint_and_the_time_tried() {
    let mut c = common::cluster(1).await;
    let d = c.client(0);
    d.network_create(&net("kept", "10.0.4.0/24")).await.unwrap();
    c.etcd.stop();
    let started = Instant::now();
    let err = d
        .network_create(&net("new", "10.0.5.0/24"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    let msg = err.to_string();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE), "{msg}");
    assert!(msg.contains("cluster store unreachable"), "{msg}");
    assert!(msg.contains("etcd://127.0.0.1:2379"), "{msg}");
    assert!(msg.contains(" after "), "{msg}");
    eprintln!("failed after {took:?}: {msg}");
    // What the daemon already knows is still served.
    let nets = d.network_ls().await.unwrap();
    assert_eq!(nets.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hosts_endpoints_and_addresses_go_when_its_lease_expires() {
    let mut opts = vxnet::lab::LocalClusterOptions::new(2, common::binary());
    opts.lease_ttl_secs = 2;
    let mut c: LocalCluster = common::cluster_with(opts).await;
    c.client(0)
        .network_create(&net("lease", "10.0.4.0/24"))
        .await
        .unwrap();
    wait_listed(&c.client(1), "lease").await;
    c.client(1)
        .endpoint_create("lease", &ep("doomed"))
        .await
        .unwrap();
    c.client(0)
        .endpoint_create("lease", &ep("survivor"))
        .await
        .unwrap();
    assert_eq!(
        c.client(0)
            .network_inspect("lease")
            .await
            .unwrap()
            .endpoints
            .len(),
        2
    );
    // kill -9 the second host's daemon: nobody refreshes its lease any more.
    c.daemons[1]
        .process()
        .signal(nix::sys::signal::Signal::SIGKILL);
    let started = Instant::now();
    loop {
        let eps = c
            .client(0)
            .network_inspect("lease")
            .await
            .unwrap()
            .endpoints;
        if eps.len() == 1 {
            assert_eq!(eps[0].endpoint.name, "survivor");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "dead host's endpoint stayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("dead host's endpoint gone after {:?}", started.elapsed());
    let info = c.client(0).info().await.unwrap();
    assert_eq!(
        info.nodes.len(),
        1,
        "the dead node is gone from the node list"
    );
    let addrs: Vec<_> = c
        .store_keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.contains("/addrs/"))
        .collect();
    assert_eq!(
        addrs.len(),
        1,
        "the dead host's address was released: {addrs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_rm_racing_an_attach_never_deletes_a_network_with_an_endpoint() {
    let c = common::cluster(2).await;
    let mut rm_won = 0;
    let mut attach_won = 0;
    for round in 0..20 {
        let name = format!("race{round}");
        let created = c
            .client(0)
            .network_create(&net(&name, &format!("10.4.{round}.0/24")))
            .await
            .unwrap();
        wait_listed(&c.client(1), &name).await;
        let (a, b) = (c.client(0), c.client(1));
        let (n1, n2) = (name.clone(), name.clone());
        let rm = tokio::spawn(async move { a.network_rm(&n1).await });
        let attach = tokio::spawn(async move { b.endpoint_create(&n2, &ep("racer")).await });
        let (rm, attach) = (rm.await.unwrap(), attach.await.unwrap());
        let keys = c.store_keys().unwrap();
        let of_network: Vec<&String> = keys
            .iter()
            .filter(|k| k.contains(created.id.as_str()))
            .collect();
        match (rm.is_ok(), attach.is_ok()) {
            (true, false) => {
                rm_won += 1;
                assert!(
                    of_network.is_empty(),
                    "network removed but keys left: {of_network:?}"
                );
            }
            (false, true) => {
                attach_won += 1;
                let err = rm.unwrap_err();
                assert!(err.to_string().contains("active endpoint"), "{err}");
                assert!(
                    of_network.iter().any(|k| k.contains("/endpoints/")),
                    "{of_network:?}"
                );
            }
            other => {
                panic!("exactly one of rm and attach must win, got {other:?}: {rm:?} {attach:?}")
            }
        }
    }
    eprintln!("rm won {rm_won}, attach won {attach_won} of 20 races");
}
