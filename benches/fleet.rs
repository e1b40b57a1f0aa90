//! Many containers on one host (run with `cargo bench --bench fleet`; needs root and Debian's
//! docker.io): N containers (200; `VXNET_FLEET=N` to change) started on vm2, for vxnet
//! (`vxnet run -d`) and for Docker's own legacy overlay (`docker run -d`, engines with
//! `--cluster-store` on the lab's etcd, the seed's system), in the same run:
//!
//! - the time to start them all (8 at a time, as a deployment script would);
//! - the time until every one answers a ping from a container on vm3 (started when the
//!   first start is issued);
//! - CPU seconds and RSS of vm2's control plane (vxnet's daemon; dockerd + containerd);
//! - etcd requests per container (from etcd's own /metrics: gRPC calls handled for vxnet's v3
//!   client, v2 store reads + writes for Docker's).

#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use support::{Figure, Machine, Ratio, Summary};
use vxnet::lab::{Lab, TEST_IMAGE};
use vxnet::netns::NetNs;

const PARALLEL: usize = 8;

fn main() {
    support::block_on(bench());
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    containers: usize,
    summaries: Vec<Summary>,
    ratios: Vec<Ratio>,
    figures: Vec<Figure>,
}

/// CPU seconds (user + system) and RSS (MiB) of a process.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, s)| s).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (ticks(11) + ticks(12)) / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, rss_kb / 1024.0)
}

fn role_pid(lab: &Lab, host: &str, role: &str) -> u32 {
    let state = lab.current_state().expect("lab state");
    state
        .hosts
        .iter()
        .find(|h| h.name == host)
        .and_then(|h| h.processes.iter().find(|p| p.role == role))
        .map(|p| p.pid)
        .unwrap_or_else(|| panic!("no {role} on {host}"))
}

/// containerd started by vm2's dockerd (its child).
fn child_named(parent: u32, comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (name, rest) = stat.split_once(") ")?;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent && name.ends_with(&format!("({comm}"))).then_some(pid)
    })
}

/// etcd's counters of requests served, read from its /metrics inside vm1's namespace.
fn etcd_requests(lab: &Lab) -> (f64, f64) {
    let vm1 = lab.host("vm1").expect("vm1").netns().expect("vm1 netns");
    let addr: SocketAddr = lab.etcd_endpoints()[0];
    let text = vm1
        .run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .expect("etcd metrics");
    let sum = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let v3 = sum("grpc_server_handled_total");
    let v2 = sum("etcd_debugging_store_reads_total") + sum("etcd_debugging_store_writes_total");
    (v3, v2)
}

/// What one `docker run -d` phase measured.
struct Phase {
    started: Duration,
    reachable: Duration,
    cpu: f64,
    rss: f64,
    etcd_v3: f64,
    etcd_v2: f64,
}

/// Starts `n` containers on Docker network `net` on vm2 and waits until each answers a ping
/// from `probe` (a namespace on vm3); `usage` gives the control plane's CPU and RSS.
fn docker_phase(
    lab: &Lab,
    n: usize,
    net: &str,
    prefix: &str,
    probe: &NetNs,
    usage: &dyn Fn() -> (f64, f64),
) -> Phase {
    let (cpu0, _) = usage();
    let (v3_0, v2_0) = etcd_requests(lab);
    let started = Instant::now();
    run_all(
        lab,
        (0..n)
            .map(|i| {
                [
                    "run",
                    "-d",
                    "--name",
                    &format!("{prefix}{i}"),
                    "--net",
                    net,
                    TEST_IMAGE,
                    "sleep",
                    "3600",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            })
            .collect(),
        true,
    );
    let started_all = started.elapsed();
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let format = format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}");
    let mut args = vec!["inspect", "-f", format.as_str()];
    args.extend(names.iter().map(String::as_str));
    let ips: Vec<Ipv4Addr> = support::docker(lab, "vm2", &args)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(ips.len(), n);
    all_reachable(probe, ips);
    let reachable = started.elapsed();
    let (cpu1, rss) = usage();
    let (v3_1, v2_1) = etcd_requests(lab);
    Phase {
        started: started_all,
        reachable,
        cpu: cpu1 - cpu0,
        rss,
        etcd_v3: (v3_1 - v3_0) / n as f64,
        etcd_v2: (v2_1 - v2_0) / n as f64,
    }
}

/// Runs `commands` (argv on vm2), `PARALLEL` at a time; panics on a failure.
fn run_all(lab: &Lab, commands: Vec<Vec<String>>, docker: bool) {
    let host = lab.host("vm2").expect("vm2");
    for chunk in commands.chunks(PARALLEL) {
        let children: Vec<_> = chunk
            .iter()
            .map(|argv| {
                let mut cmd: Command = if docker {
                    host.docker().expect("docker")
                } else {
                    host.command(&argv[0]).expect("command")
                };
                let args = if docker { &argv[..] } else { &argv[1..] };
                cmd.args(args)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("spawn")
            })
            .collect();
        for mut c in children {
            assert!(c.wait().expect("wait").success(), "a start failed");
        }
    }
}

/// Pings every address from inside `ns` until each has answered once; returns when all have.
fn all_reachable(ns: &NetNs, ips: Vec<Ipv4Addr>) {
    ns.run(move || {
        let mut pinger = support::Pinger::open(Duration::from_millis(20))?;
        let mut left = ips;
        let deadline = Instant::now() + Duration::from_secs(120);
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
    .expect("reachability");
}

async fn bench() {
    let n: usize = std::env::var("VXNET_FLEET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::var_os("VXNET_BENCH_QUICK").is_some() {
            20
        } else {
            200
        });
    let lab = support::docker_lab("bench-fleet", 3).await;
    let vm2 = lab.host("vm2").expect("vm2").client();
    let vm3 = lab.host("vm3").expect("vm3").client();
    vm2.network_create(&vxnet::cluster::NetworkCreate {
        name: "fleet".into(),
        subnet: Some("10.20.0.0/16".parse().expect("subnet")),
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
            "10.21.0.0/16",
            "dfleet",
        ],
    );
    support::docker(
        &lab,
        "vm2",
        &[
            "network",
            "create",
            "-d",
            "vxnet",
            "--ipam-driver",
            "vxnet",
            "--subnet",
            "10.22.0.0/16",
            "-o",
            "vxnet.network=pfleet",
            "pfleet",
        ],
    );
    while vm3.network_inspect("fleet").await.is_err() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let vm3_root = format!("/proc/{}/root", lab.host("vm3").expect("vm3").init_pid());
    let probe = vm3
        .container_create(&vxnet::container::CreateRequest {
            name: Some("probe".into()),
            network: "fleet".into(),
            ..Default::default()
        })
        .await
        .expect("vxnet probe");
    let probe_ns = NetNs::open(&PathBuf::from(format!(
        "{vm3_root}{}",
        probe.netns.display()
    )))
    .expect("probe ns");
    support::docker(
        &lab,
        "vm3",
        &[
            "run", "-d", "--name", "dprobe", "--net", "dfleet", TEST_IMAGE, "sleep", "3600",
        ],
    );
    let dprobe_pid = support::docker(&lab, "vm3", &["inspect", "-f", "{{.State.Pid}}", "dprobe"]);
    let dprobe_ns =
        NetNs::open(&PathBuf::from(format!("/proc/{dprobe_pid}/ns/net"))).expect("docker probe ns");
    support::docker(
        &lab,
        "vm3",
        &[
            "run", "-d", "--name", "pprobe", "--net", "pfleet", TEST_IMAGE, "sleep", "3600",
        ],
    );
    let pprobe_pid = support::docker(&lab, "vm3", &["inspect", "-f", "{{.State.Pid}}", "pprobe"]);
    let pprobe_ns =
        NetNs::open(&PathBuf::from(format!("/proc/{pprobe_pid}/ns/net"))).expect("plugin probe ns");

    let daemon = role_pid(&lab, "vm2", "daemon");
    let dockerd = role_pid(&lab, "vm2", "dockerd");
    let containerd = child_named(dockerd, "containerd");
    let docker_usage = || {
        let (c1, r1) = usage(dockerd);
        let (c2, r2) = containerd.map(usage).unwrap_or((0.0, 0.0));
        (c1 + c2, r1 + r2)
    };
    let mut figures = Vec::new();
    let (_, rss_idle) = usage(daemon);
    figures.push(Figure {
        case: "vxnet daemon RSS, idle".into(),
        value: rss_idle,
        unit: "MiB".into(),
    });

    // vxnet.
    let (cpu0, _) = usage(daemon);
    let (v3_0, _) = etcd_requests(&lab);
    let started = Instant::now();
    run_all(
        &lab,
        (0..n)
            .map(|i| {
                [
                    "vxnet",
                    "run",
                    "-d",
                    "--name",
                    &format!("v{i}"),
                    "--net",
                    "fleet",
                    "--",
                    "sleep",
                    "3600",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect()
            })
            .collect(),
        false,
    );
    let vx_started = started.elapsed();
    let ips: Vec<Ipv4Addr> = vm2
        .containers()
        .await
        .expect("ps")
        .iter()
        .filter_map(|c| c.attachments.first().map(|a| a.ip))
        .collect();
    assert_eq!(ips.len(), n);
    all_reachable(&probe_ns, ips);
    let vx_reachable = started.elapsed();
    let (cpu1, vx_rss) = usage(daemon);
    let (v3_1, _) = etcd_requests(&lab);

    // Docker's overlay, then vxnet through its Docker plugin: the same engine and image.
    let overlay = docker_phase(&lab, n, "dfleet", "d", &dprobe_ns, &docker_usage);
    let plugin = docker_phase(&lab, n, "pfleet", "p", &pprobe_ns, &|| {
        let (c, r) = docker_usage();
        let (c2, r2) = usage(daemon);
        (c + c2, r + r2)
    });
    let (dk_started, dk_reachable) = (overlay.started, overlay.reachable);

    let one = |case: String, d: Duration| Summary::of(&case, &[d]);
    let summaries = vec![
        one(
            format!("vxnet run: start {n} containers on vm2"),
            vx_started,
        ),
        one(
            format!("Docker overlay: start {n} containers on vm2"),
            dk_started,
        ),
        one(
            format!("vxnet run: {n} started, all reachable from vm3"),
            vx_reachable,
        ),
        one(
            format!("Docker overlay: {n} started, all reachable from vm3"),
            dk_reachable,
        ),
        one(
            format!("vxnet Docker plugin: start {n} containers on vm2"),
            plugin.started,
        ),
        one(
            format!("vxnet Docker plugin: {n} started, all reachable from vm3"),
            plugin.reachable,
        ),
    ];
    let ratios = vec![
        Ratio::of(&summaries[4], &summaries[1]),
        Ratio::of(&summaries[5], &summaries[3]),
        Ratio::of(&summaries[0], &summaries[1]),
        Ratio::of(&summaries[2], &summaries[3]),
    ];
    let per = |v: f64| v / n as f64;
    figures.extend([
        Figure {
            case: format!("vxnet daemon RSS with {n} local containers"),
            value: vx_rss,
            unit: "MiB".into(),
        },
        Figure {
            case: format!("Docker overlay: dockerd + containerd RSS after {n} containers"),
            value: overlay.rss,
            unit: "MiB".into(),
        },
        Figure {
            case: format!("vxnet plugin: dockerd + containerd + vxnet RSS after {n} more"),
            value: plugin.rss,
            unit: "MiB".into(),
        },
        Figure {
            case: format!("vxnet run: vxnet daemon CPU for {n} starts"),
            value: cpu1 - cpu0,
            unit: "s".into(),
        },
        Figure {
            case: format!("Docker overlay: dockerd + containerd CPU for {n} starts"),
            value: overlay.cpu,
            unit: "s".into(),
        },
        Figure {
            case: format!("vxnet plugin: dockerd + containerd + vxnet CPU for {n} starts"),
            value: plugin.cpu,
            unit: "s".into(),
        },
        Figure {
            case: "vxnet run: etcd requests per container (v3 gRPC)".into(),
            value: per(v3_1 - v3_0),
            unit: "requests".into(),
        },
        Figure {
            case: "Docker overlay: etcd requests per container (v2 reads + writes, v3)".into(),
            value: overlay.etcd_v2 + overlay.etcd_v3,
            unit: "requests".into(),
        },
        Figure {
            case: "vxnet plugin: etcd requests per container (v3 gRPC + v2)".into(),
            value: plugin.etcd_v3 + plugin.etcd_v2,
            unit: "requests".into(),
        },
    ]);
    support::print_table(&format!("{n} containers on one host"), &summaries, &ratios);
    support::print_figures(&figures);
    support::write_result(
        "fleet",
        &Report {
            machine: Machine::here(),
            containers: n,
            summaries,
            ratios,
            figures,
        },
    );
}
