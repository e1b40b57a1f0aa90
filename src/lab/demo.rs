//! `vxnet lab demo`: the seed walk-through on the control-plane lab, step by step, each
//! step checked. etcd and two daemons run in a private namespace and are gone afterwards.

use std::path::PathBuf;

use super::{LabError, LocalCluster, LocalClusterOptions};
use crate::api::client::Client;
use crate::cluster::{EndpointCreate, NetworkCreate};
use crate::format::network_table;

struct Steps {
    total: usize,
    done: usize,
    failed: usize,
}

impl Steps {
    fn step(&mut self, title: &str) {
        self.done += 1;
        println!("\n==> [{}/{}] {title}", self.done, self.total);
    }
    fn check(&mut self, ok: bool, what: &str) {
        if ok {
            println!("    ok: {what}");
        } else {
            println!("    FAILED: {what}");
            self.failed += 1;
        }
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// Runs the walk-through; `Ok(true)` when every step held.
pub async fn run(binary: PathBuf) -> Result<bool, LabError> {
    let mut s = Steps {
        total: 7,
        done: 0,
        failed: 0,
    };
    s.step("start etcd (the seed's vm1) and two vxnet daemons (vm2, vm3) in a private namespace");
    let cluster = LocalCluster::start(LocalClusterOptions {
        die_with_parent: true,
        ..LocalClusterOptions::new(2, binary)
    })
    .await?;
    let health = cluster.etcd.etcdctl(&cluster.ns, &["endpoint", "health"])?;
    print!("{}", indent(&String::from_utf8_lossy(&health.stdout)));
    s.check(health.status.success(), "etcdctl endpoint health");
    for d in &cluster.daemons {
        println!(
            "    vxnet daemon --cluster-store {} --cluster-advertise {}   # {}",
            cluster.etcd.cluster_store_url(),
            d.advertise,
            d.name
        );
    }
    let (vm2, vm3) = (cluster.client(0), cluster.client(1));

    s.step("vm2: vxnet network create --driver overlay --subnet 10.0.4.0/24 my-net");
    let created = vm2
        .network_create(&NetworkCreate {
            name: "my-net".into(),
            subnet: Some(
                "10.0.4.0/24"
                    .parse()
                    .map_err(|_| LabError::Netlink("subnet".into()))?,
            ),
            ..Default::default()
        })
        .await;
    match &created {
        Ok(n) => println!("    {}", n.id),
        Err(e) => println!("    {e}"),
    }
    s.check(created.is_ok(), "network created");

    s.step("vm3: vxnet network ls (the network arrived through etcd)");
    let listed = vm3.network_ls().await.unwrap_or_default();
    print!("{}", indent(&network_table(&listed, false)));
    s.check(
        listed
            .iter()
            .any(|n| n.name == "my-net" && n.driver == "overlay"),
        "my-net listed on vm3 with driver overlay, scope global",
    );

    s.step("an address for a container on vm2 and one on vm3 (cluster-wide IPAM)");
    let ep2 = attach(&vm2, "c2").await;
    let ep3 = attach(&vm3, "c3").await;
    s.check(
        ep2.is_some() && ep3.is_some() && ep2 != ep3,
        "distinct addresses, MAC derived from the IP (02:42 + address)",
    );

    s.step("vm3: vxnet network inspect my-net (endpoints of every host)");
    match vm3.network_inspect("my-net").await {
        Ok(i) => {
            println!(
                "    subnet {}  gateway {}  VNI {}  endpoints:",
                i.network.subnet, i.network.gateway, i.network.vni
            );
            for e in &i.endpoints {
                println!(
                    "      {:<4} {:<12} {}  on {}",
                    e.endpoint.name,
                    e.endpoint.ip,
                    e.endpoint.mac,
                    e.node_name.as_deref().unwrap_or("?")
                );
            }
            s.check(i.endpoints.len() == 2, "both hosts' endpoints shown");
        }
        Err(e) => s.check(false, &e.to_string()),
    }

    s.step("vm2: vxnet network rm my-net while containers are attached");
    let refused = vm2.network_rm("my-net").await;
    if let Err(e) = &refused {
        println!("    {e}");
    }
    s.check(refused.is_err(), "removal refused while endpoints exist");

    s.step("detach both, then vm2: vxnet network rm my-net; vm3: vxnet network ls");
    let mut detached = true;
    for (c, name) in [(&vm2, "c2"), (&vm3, "c3")] {
        detached &= c.endpoint_delete("my-net", name).await.is_ok();
    }
    let removed = vm2.network_rm("my-net").await.is_ok();
    let after = vm3.network_ls().await.unwrap_or_default();
    print!("{}", indent(&network_table(&after, false)));
    s.check(
        detached && removed && after.is_empty(),
        "network gone on every host",
    );

    drop(cluster);
    let ok = s.failed == 0;
    println!(
        "\n{}",
        if ok {
            "vxnet lab demo: PASS (every step held; lab removed)".to_string()
        } else {
            format!(
                "vxnet lab demo: FAIL ({} check(s) failed; lab removed)",
                s.failed
            )
        }
    );
    Ok(ok)
}

async fn attach(client: &Client, name: &str) -> Option<std::net::Ipv4Addr> {
    match client
        .endpoint_create(
            "my-net",
            &EndpointCreate {
                name: Some(name.into()),
                ip: None,
            },
        )
        .await
    {
        Ok(ep) => {
            println!("    {name}: {} {}", ep.ip, ep.mac);
            Some(ep.ip)
        }
        Err(e) => {
            println!("    {name}: {e}");
            None
        }
    }
}
