//! Many hosts (run with `cargo bench --bench mesh`; needs root and Debian's docker.io): H
//! simulated hosts (lab namespaces, 20 by default: `VXNET_MESH_HOSTS`) × C containers each
//! (20: `VXNET_MESH_PER_HOST`), for vxnet (`vxnet run -d`) and for Docker's legacy overlay
//! (one dockerd per host with `--cluster-store` on the lab's etcd, the seed's system), in
//! the same run: the time from the first start until the full mesh is reachable — every
//! host's first container has had a ping answer from every container on every other host.
//! Starts run 8 at a time across the hosts. Probes give up after 120 s (20 s in quick mode;
//! `VXNET_MESH_DEADLINE_S`): a system that has not reached the full mesh by then is reported
//! with the probe → container pairs that did answer.
//!
//! The ARP step is pinned. Every lab host shares this one kernel, whose ARP table is a single
//! table for all namespaces, capped by the root namespace's `gc_thresh3` (1,024 here; the
//! bench must not raise it), and entries younger than 5 s cannot be collected. A full mesh
//! resolved by ARP needs two dynamic entries per probe–target pair (20 × 380 × 2 = 15,200 at
//! 20 × 20): sends fail with ENOBUFS. So before probing, the bench gives every probe a
//! permanent neighbour entry for each target and every target one for each probe (permanent
//! entries are outside that cap). What the pings then test is the overlay's forwarding —
//! each FDB entry sends the frame to the right host — which is what converges; ARP through
//! the overlay is tested elsewhere (tests/). The time this takes is inside the measured
//! window, the same for vxnet and Docker, and reported on its own ("bench set-up").

#[path = "support/mod.rs"]
mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::neighbour::NeighbourState;
use support::{Figure, Ratio, Summary};
use vxnet::lab::TEST_IMAGE;
use vxnet::model::Mac;
use vxnet::netns::NetNs;

const PARALLEL: usize = 8;
/// Namespaces given their pinned neighbours at once.
const PIN_PARALLEL: usize = 16;

/// One container of the mesh: its host (index), overlay address and MAC, and the file of
/// its network namespace.
struct Member {
    host: usize,
    ip: Ipv4Addr,
    mac: Mac,
    netns: PathBuf,
}

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

/// Adds permanent neighbour entries for `peers` on the overlay interface (the one with the
/// member's MAC) in `member`'s namespace.
async fn pin(member: &Member, peers: Vec<(Ipv4Addr, Mac)>) {
    let ns = NetNs::open(&member.netns).expect("member namespace");
    let h = ns.netlink().expect("netlink in a member");
    let mut links = h.link().get().execute();
    let mut index = None;
    while let Some(l) = links.try_next().await.expect("link dump") {
        if l.attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Address(m) if m.as_slice() == member.mac.0))
        {
            index = Some(l.header.index);
        }
    }
    let index = index.expect("the member's overlay interface");
    for (ip, mac) in peers {
        h.neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .expect("pin a neighbour");
    }
}

/// Pins, in every member, the neighbours its pings need: a probe (`probes[h]`, one per
/// host) every member of the other hosts, every member the probes of the other hosts.
async fn pin_all(members: &[Member], probes: &[usize]) {
    futures::stream::iter(members.iter().enumerate())
        .for_each_concurrent(PIN_PARALLEL, |(i, m)| {
            let mut peers: Vec<(Ipv4Addr, Mac)> = probes
                .iter()
                .map(|&p| &members[p])
                .filter(|p| p.host != m.host)
                .map(|p| (p.ip, p.mac))
                .collect();
            if probes.contains(&i) {
                peers.extend(
                    members
                        .iter()
                        .enumerate()
                        .filter(|(j, t)| t.host != m.host && !probes.contains(j))
                        .map(|(_, t)| (t.ip, t.mac)),
                );
            }
            pin(m, peers)
        })
        .await;
}

/// How long the probes keep trying: far beyond what either system needs when it converges
/// (seconds), so that one that does not is reported rather than waited for. Quick runs (a
/// smoke test) give up sooner.
fn probe_deadline() -> Duration {
    Duration::from_secs(env_or("VXNET_MESH_DEADLINE_S", 20, 120) as u64)
}

/// Every probe pings every address not on its own host until each has answered once (one
/// thread per probe, all at once), for at most [`probe_deadline`]. Returns how many
/// probe → container pairs never answered (0: the full mesh is reachable), printing a
/// sample of them.
fn mesh_reachable(members: &[Member], probes: &[usize]) -> usize {
    std::thread::scope(|s| {
        let threads: Vec<_> = probes
            .iter()
            .map(|&p| {
                let host = members[p].host;
                let ns = NetNs::open(&members[p].netns).expect("probe namespace");
                let targets: Vec<Ipv4Addr> = members
                    .iter()
                    .filter(|m| m.host != host)
                    .map(|m| m.ip)
                    .collect();
                s.spawn(move || {
                    ns.run(move || {
                        let mut pinger = support::Pinger::open(Duration::from_millis(20))?;
                        let mut left = targets;
                        let limit = probe_deadline();
                        let deadline = Instant::now() + limit;
                        while !left.is_empty() && Instant::now() < deadline {
                            left.retain(|ip| !pinger.ping_once(*ip));
                        }
                        if !left.is_empty() {
                            eprintln!(
                                "{} addresses never answered the probe on host {host} within \
                                 {limit:?}, among them {:?}",
                                left.len(),
                                &left[..left.len().min(5)]
                            );
                        }
                        Ok(left.len())
                    })
                    .expect("probe thread")
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("probe thread"))
            .sum()
    })
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
    let set_up = Instant::now();
    let mut members = Vec::new();
    let mut probes = Vec::new();
    for (k, h) in names.iter().enumerate() {
        let host = lab.host(h).expect("host");
        for c in host.client().containers().await.expect("ps") {
            let Some(a) = c.attachments.first() else {
                continue;
            };
            if c.name == "m0" {
                probes.push(members.len());
            }
            members.push(Member {
                host: k,
                ip: a.ip,
                mac: a.mac,
                netns: PathBuf::from(format!(
                    "/proc/{}/root{}",
                    host.init_pid(),
                    c.netns.display()
                )),
            });
        }
    }
    assert_eq!(members.len(), hosts * per_host);
    assert_eq!(probes.len(), hosts);
    pin_all(&members, &probes).await;
    let vx_set_up = set_up.elapsed();
    let vx_missing = mesh_reachable(&members, &probes);
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
    let set_up = Instant::now();
    let mut dmembers = Vec::new();
    let mut dprobes = Vec::new();
    let net = "(index .NetworkSettings.Networks \"dmesh\")";
    let fmt = format!("{{{{.State.Pid}}}} {{{{{net}.IPAddress}}}} {{{{{net}.MacAddress}}}}");
    for (k, h) in names.iter().enumerate() {
        let all: Vec<String> = (0..per_host).map(|i| format!("d{i}-{h}")).collect();
        let mut args = vec!["inspect", "-f", fmt.as_str()];
        args.extend(all.iter().map(String::as_str));
        for (i, l) in support::docker(&lab, h, &args).lines().enumerate() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [pid, ip, mac] = f[..] else {
                panic!("docker inspect {}: {l:?}", all[i]);
            };
            if i == 0 {
                dprobes.push(dmembers.len());
            }
            dmembers.push(Member {
                host: k,
                ip: ip.parse().expect("container address"),
                mac: mac.parse().expect("container MAC"),
                netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
            });
        }
    }
    assert_eq!(dmembers.len(), hosts * per_host);
    pin_all(&dmembers, &dprobes).await;
    let dk_set_up = set_up.elapsed();
    let dk_missing = mesh_reachable(&dmembers, &dprobes);
    let dk_mesh = t0.elapsed();
    if dk_missing > 0 {
        keep_dockerd_warnings(&lab, &names);
    }

    let n = hosts * per_host;
    let pairs = hosts * (n - per_host);
    let one = |case: String, d: Duration| Summary::of(&case, &[d]);
    let mut summaries = vec![
        one(
            format!("vxnet: {hosts} hosts × {per_host} started ({n})"),
            vx_started,
        ),
        one(
            format!("Docker overlay: {hosts} hosts × {per_host} started ({n})"),
            dk_started,
        ),
    ];
    let mut ratios = vec![Ratio::of(&summaries[0], &summaries[1])];
    // The reachability figures of a system exist only if it reached the full mesh.
    let reached = |system: &str, mesh: Duration, started: Duration, set_up: Duration| {
        vec![
            one(
                format!("{system}: {hosts} × {per_host} full mesh reachable"),
                mesh,
            ),
            one(
                format!("{system}: full mesh reachable after the last start"),
                mesh - started,
            ),
            one(
                format!("{system}: bench set-up inside that (listing, pinning neighbours)"),
                set_up,
            ),
            one(
                format!("{system}: full mesh reachable after the last start, less the set-up"),
                mesh - started - set_up,
            ),
        ]
    };
    let vx = (vx_missing == 0).then(|| reached("vxnet", vx_mesh, vx_started, vx_set_up));
    let dk = (dk_missing == 0).then(|| reached("Docker overlay", dk_mesh, dk_started, dk_set_up));
    if let (Some(vx), Some(dk)) = (&vx, &dk) {
        for i in [0, 1, 3] {
            ratios.push(Ratio::of(&vx[i], &dk[i]));
        }
    }
    summaries.extend(vx.into_iter().flatten());
    summaries.extend(dk.into_iter().flatten());
    let limit = probe_deadline();
    let figures = vec![
        Figure {
            case: format!("vxnet: probe → container pairs answered within {limit:?}"),
            value: (pairs - vx_missing) as f64,
            unit: format!("of {pairs}"),
        },
        Figure {
            case: format!("Docker overlay: probe → container pairs answered within {limit:?}"),
            value: (pairs - dk_missing) as f64,
            unit: format!("of {pairs}"),
        },
    ];
    support::print_table(
        &format!("{hosts} hosts × {per_host} containers, full mesh"),
        &summaries,
        &ratios,
    );
    support::print_figures(&figures);
    support::write_result(
        "mesh",
        &Report {
            machine: support::Machine::here(),
            summaries,
            ratios,
            figures,
        },
    );
}

/// Saves the warnings and errors of every host's dockerd (its log goes with the lab) to
/// `target/bench/mesh-dockerd.log`: what there is to know of why its overlay fell short.
fn keep_dockerd_warnings(lab: &vxnet::lab::Lab, hosts: &[String]) {
    let mut kept = String::new();
    for h in hosts {
        let log = lab.dir().join("logs").join(format!("{h}-dockerd.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("level=error") || l.contains("level=warn"))
            .collect();
        for l in &lines[lines.len().saturating_sub(200)..] {
            kept.push_str(&format!("{h}: {l}\n"));
        }
    }
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/mesh-dockerd.log");
    match std::fs::write(&path, kept) {
        Ok(()) => eprintln!("dockerd warnings and errors kept in {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}

#[derive(serde::Serialize)]
struct Report {
    machine: support::Machine,
    summaries: Vec<Summary>,
    ratios: Vec<Ratio>,
    figures: Vec<Figure>,
}
