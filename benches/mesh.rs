//! Many hosts (run with `cargo bench --bench mesh`; needs root and Debian's docker.io): H
//! simulated hosts (lab namespaces, 20 by default: `VXNET_MESH_HOSTS`) × C containers each
//! (20: `VXNET_MESH_PER_HOST`), for vxnet (`vxnet run -d`) and for Docker's legacy overlay
//! (one dockerd per host with `--cluster-store` on the lab's etcd, the seed's system), in
//! the same run: the time from the first start until the full mesh is reachable — every
//! host's first container has had a ping answer from every container on every other host.
//! Starts run 8 at a time across the hosts.

#[path = "support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Ratio, Summary};
use vxnet::lab::TEST_IMAGE;
use vxnet::netns::NetNs;

const PARALLEL: usize = 8;

fn main() {
    support::block_on(bench());
}

fn env_or(name: &str, quick: usize, full: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::var_os("VXNET_BENCH_QUICK").is_some() {
            quick
        } else {
            full
        })
}

/// Runs every command, `PARALLEL` at a time; panics on a failure.
fn run_all(mut commands: Vec<Command>) {
    while !commands.is_empty() {
        let chunk: Vec<Command> = commands.drain(..commands.len().min(PARALLEL)).collect();
        let children: Vec<_> = chunk
            .into_iter()
            .map(|mut c| {
                c.stdout(std::process::Stdio::null());
                c.spawn().expect("spawn")
            })
            .collect();
        for mut c in children {
            assert!(c.wait().expect("wait").success(), "a start failed");
        }
    }
}

/// Every probe pings every address not on its own host until each has answered once (one
/// thread per probe, all at once).
fn mesh_reachable(probes: Vec<(usize, NetNs)>, ips: &[(usize, Ipv4Addr)]) {
    std::thread::scope(|s| {
        for (host, ns) in &probes {
            let targets: Vec<Ipv4Addr> = ips
                .iter()
                .filter(|(h, _)| h != host)
                .map(|(_, ip)| *ip)
                .collect();
            s.spawn(move || {
                ns.run(move || {
                    let mut pinger = support::Pinger::open(Duration::from_millis(20))?;
                    let mut left = targets;
                    let deadline = Instant::now() + Duration::from_secs(300);
                    while !left.is_empty() {
                        if Instant::now() > deadline {
                            return Err(std::io::Error::other(format!(
                                "{} never answered",
                                left.len()
                            )));
                        }
                        left.retain(|ip| !pinger.ping_once(*ip));
                    }
                    Ok(())
                })
                .expect("reachability")
            });
        }
    });
}

async fn bench() {
    let hosts = env_or("VXNET_MESH_HOSTS", 4, 20);
    let per_host = env_or("VXNET_MESH_PER_HOST", 4, 20);
    let lab = support::docker_lab("bench-mesh", hosts + 1).await;
    let names: Vec<String> = (2..=hosts + 1).map(|k| format!("vm{k}")).collect();
    let first = lab.host("vm2").expect("vm2").client();
    first
        .network_create(&vxnet::cluster::NetworkCreate {
            name: "mesh".into(),
            subnet: Some("10.30.0.0/16".parse().expect("subnet")),
            ..Default::default()
        })
        .await
        .expect("vxnet network");
    support::docker(
        &lab,
        "vm2",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.31.0.0/16",
            "dmesh",
        ],
    );
    for h in &names {
        let c = lab.host(h).expect("host").client();
        while c.network_inspect("mesh").await.is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // vxnet: starts interleaved across hosts, as a fleet roll-out would.
    let t0 = Instant::now();
    let mut commands = Vec::new();
    for i in 0..per_host {
        for h in &names {
            let mut c = lab
                .host(h)
                .expect("host")
                .command("vxnet")
                .expect("command");
            c.args([
                "run",
                "-d",
                "--name",
                &format!("m{i}"),
                "--net",
                "mesh",
                "--",
                "sleep",
                "3600",
            ]);
            commands.push(c);
        }
    }
    run_all(commands);
    let vx_started = t0.elapsed();
    let mut ips = Vec::new();
    let mut probes = Vec::new();
    for (k, h) in names.iter().enumerate() {
        let host = lab.host(h).expect("host");
        let containers = host.client().containers().await.expect("ps");
        for c in &containers {
            if let Some(a) = c.attachments.first() {
                ips.push((k, a.ip));
            }
        }
        let probe = containers.iter().find(|c| c.name == "m0").expect("m0");
        let path = format!("/proc/{}/root{}", host.init_pid(), probe.netns.display());
        probes.push((k, NetNs::open(&PathBuf::from(path)).expect("probe ns")));
    }
    assert_eq!(ips.len(), hosts * per_host);
    mesh_reachable(probes, &ips);
    let vx_mesh = t0.elapsed();
    eprintln!("vxnet: {hosts} × {per_host} started in {vx_started:?}, full mesh in {vx_mesh:?}");

    // Docker's overlay, the same way.
    let t0 = Instant::now();
    let mut commands = Vec::new();
    // Endpoint names of a global network are cluster-wide: the host is in the name.
    for i in 0..per_host {
        for h in &names {
            let mut c = lab.host(h).expect("host").docker().expect("docker");
            c.args([
                "run",
                "-d",
                "--name",
                &format!("d{i}-{h}"),
                "--net",
                "dmesh",
                TEST_IMAGE,
                "sleep",
                "3600",
            ]);
            commands.push(c);
        }
    }
    run_all(commands);
    let dk_started = t0.elapsed();
    let mut dips = Vec::new();
    let mut dprobes = Vec::new();
    let fmt = "{{(index .NetworkSettings.Networks \"dmesh\").IPAddress}}";
    for (k, h) in names.iter().enumerate() {
        let all: Vec<String> = (0..per_host).map(|i| format!("d{i}-{h}")).collect();
        let mut args = vec!["inspect", "-f", fmt];
        args.extend(all.iter().map(String::as_str));
        for l in support::docker(&lab, h, &args).lines() {
            if let Ok(ip) = l.trim().parse() {
                dips.push((k, ip));
            }
        }
        let pid = support::docker(
            &lab,
            h,
            &["inspect", "-f", "{{.State.Pid}}", &format!("d0-{h}")],
        );
        let ns = NetNs::open(&PathBuf::from(format!("/proc/{pid}/ns/net"))).expect("probe ns");
        dprobes.push((k, ns));
    }
    assert_eq!(dips.len(), hosts * per_host);
    mesh_reachable(dprobes, &dips);
    let dk_mesh = t0.elapsed();

    let n = hosts * per_host;
    let one = |case: String, d: Duration| Summary::of(&case, &[d]);
    let summaries = vec![
        one(
            format!("vxnet: {hosts} hosts × {per_host} started ({n})"),
            vx_started,
        ),
        one(
            format!("Docker overlay: {hosts} hosts × {per_host} started ({n})"),
            dk_started,
        ),
        one(
            format!("vxnet: {hosts} × {per_host} full mesh reachable"),
            vx_mesh,
        ),
        one(
            format!("Docker overlay: {hosts} × {per_host} full mesh reachable"),
            dk_mesh,
        ),
    ];
    let mut summaries = summaries;
    summaries.push(one(
        "vxnet: full mesh reachable after the last start".to_string(),
        vx_mesh - vx_started,
    ));
    summaries.push(one(
        "Docker overlay: full mesh reachable after the last start".to_string(),
        dk_mesh - dk_started,
    ));
    let ratios = vec![
        Ratio::of(&summaries[0], &summaries[1]),
        Ratio::of(&summaries[2], &summaries[3]),
        Ratio::of(&summaries[4], &summaries[5]),
    ];
    support::report(
        "mesh",
        &format!("{hosts} hosts × {per_host} containers, full mesh"),
        summaries,
        ratios,
    );
}
