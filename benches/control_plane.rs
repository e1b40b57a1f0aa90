//! Control-plane benchmark: `network create` on one host until visible on another, and one
//! address allocation, each against the raw etcd operation underneath it, measured in the
//! same run on the same etcd (run with `cargo bench --bench control_plane`; needs root).
//!
//! Baselines: "etcd put → watch event" (the floor of any watch-propagated change) and
//! "etcd CAS txn" (the floor of any allocation), both from a client inside the lab namespace.

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use support::{Ratio, Summary};
use vxnet::cluster::{EndpointCreate, NetworkCreate};
use vxnet::lab::{LocalCluster, LocalClusterOptions};
use vxnet::store::etcd::{EtcdConfig, EtcdStore};
use vxnet::store::{Compare, Op, Store};

fn main() {
    support::block_on(bench());
}

async fn bench() {
    let runs = support::runs(200);
    let cluster = LocalCluster::start(LocalClusterOptions::new(
        2,
        PathBuf::from(env!("CARGO_BIN_EXE_vxnet")),
    ))
    .await
    .unwrap_or_else(|e| panic!("cannot start the bench cluster: {e}"));
    let (a, b) = (cluster.client(0), cluster.client(1));

    // network create on host A → inspect answers on host B (polled back to back).
    let mut visible = Vec::with_capacity(runs);
    for i in 0..runs {
        let name = format!("bench{i}");
        let req = NetworkCreate {
            name: name.clone(),
            subnet: Some(
                format!("10.{}.{}.0/24", 100 + i / 256, i % 256)
                    .parse()
                    .unwrap(),
            ),
            ..Default::default()
        };
        let started = Instant::now();
        a.network_create(&req).await.expect("network create");
        while b.network_inspect(&name).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{name} never arrived"
            );
        }
        visible.push(started.elapsed());
    }

    // One address allocation on host A (request → answer).
    a.network_create(&NetworkCreate {
        name: "alloc".into(),
        subnet: Some("10.250.0.0/16".parse().unwrap()),
        ..Default::default()
    })
    .await
    .expect("network create");
    let mut alloc = Vec::with_capacity(runs);
    for i in 0..runs {
        let req = EndpointCreate {
            name: Some(format!("e{i}")),
            ip: None,
            aliases: Vec::new(),
        };
        let started = Instant::now();
        a.endpoint_create("alloc", &req).await.expect("allocate");
        alloc.push(started.elapsed());
    }

    // The raw etcd floors, from a client whose sockets live in the lab namespace.
    let url = cluster.etcd.cluster_store_url();
    let (watch_floor, txn_floor) = cluster
        .ns
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(rt.block_on(etcd_floors(&url, runs)))
        })
        .expect("baseline thread");

    let summaries = vec![
        Summary::of("vxnet: network create on A → visible on B", &visible),
        Summary::of("etcd: put → watch event (baseline)", &watch_floor),
        Summary::of("vxnet: one address allocation (API round trip)", &alloc),
        Summary::of("etcd: one CAS txn (baseline)", &txn_floor),
    ];
    let ratios = vec![
        Ratio::of(&summaries[0], &summaries[1]),
        Ratio::of(&summaries[2], &summaries[3]),
    ];
    support::report("control_plane", "control plane", summaries, ratios);
}

async fn etcd_floors(url: &str, runs: usize) -> (Vec<Duration>, Vec<Duration>) {
    let store = EtcdStore::connect(EtcdConfig::from_cluster_store(url).expect("url"))
        .await
        .expect("etcd client");
    let prefix = "/bench-floor/";
    let start_rev = store.list(prefix).await.expect("list").revision + 1;
    let mut events = store.watch(prefix, start_rev).await.expect("watch");
    let mut watch = Vec::with_capacity(runs);
    for i in 0..runs {
        let started = Instant::now();
        store
            .txn(vec![], vec![Op::put(format!("{prefix}w{i}"), "x")], vec![])
            .await
            .expect("put");
        events.next().await.expect("event").expect("event");
        watch.push(started.elapsed());
    }
    let mut txn = Vec::with_capacity(runs);
    for i in 0..runs {
        let key = format!("{prefix}c{i}");
        let started = Instant::now();
        store
            .txn(
                vec![Compare::Absent(key.clone())],
                vec![Op::put(key, "x")],
                vec![],
            )
            .await
            .expect("cas");
        txn.push(started.elapsed());
    }
    (watch, txn)
}
