//! Name server benchmark on a three-host lab (run with `cargo bench --bench dns`; needs root):
//!
//! - query latency: a container on vm2 asks for the address of a container on vm3 (vxnet's
//!   name server at 169.254.53.53, in vm2's sandbox of the network), against, in the same run
//!   and interleaved query by query: Docker's embedded DNS (127.0.0.11 in a Docker container
//!   on a Docker bridge network on vm2, asked for a container on the same engine) and
//!   aardvark-dns (Podman's, Debian's package, started in vm2's sandbox of the same network
//!   with a config file holding the same name, listening on the network's gateway address,
//!   so its queries take the same path from the same container);
//! - queries per second: vxnet's daemon on vm2 pinned to one core, 48 containers asking as
//!   fast as they can (each is held to the per-container limit, 2,000/s), load generators
//!   pinned to the other core: answers per second, and per CPU second of the daemon;
//! - create → resolvable: a container created on vm3 (API request) until a container on vm2
//!   gets its address for `name.network`, asking every 200 µs; from the create request and
//!   from vm3's answer;
//! - memory: vm2's daemon RSS before and after 50,000 remote endpoints (each a name) arrive in
//!   a network vm2 has no container on (so nothing but the view and the name index holds
//!   them), then after each of them gets one alias (50,000 more names, nothing else new).
//!   They are written to etcd as 20 other hosts would (a lease each), from vm1's namespace.

#[path = "support/mod.rs"]
mod support;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use support::{Figure, Ratio, Summary};
use vxnet::container::CreateRequest;
use vxnet::lab::{DockerOptions, Lab, LabGuard, LabOptions, TEST_IMAGE};
use vxnet::model::{Endpoint, Id, Mac, Node};
use vxnet::netns::NetNs;
use vxnet::store::etcd::{EtcdConfig, EtcdStore};
use vxnet::store::{Keys, Op, Store};

fn main() {
    support::block_on(bench());
}

const FAKE_NODES: usize = 20;

/// Writes `k` endpoints of 20 fake hosts into network `net` (from a thread in `ns`, where
/// etcd listens), each with one alias when `alias`; the same IDs every time, so a second call
/// re-puts them. Returns the fake hosts' leases (revoke them to remove everything).
fn write_names(
    ns: &NetNs,
    url: &str,
    net: &Id,
    k: usize,
    alias: bool,
    leases: Vec<i64>,
) -> Vec<i64> {
    let (url, net) = (url.to_string(), net.clone());
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(async move {
            let store = EtcdStore::connect(EtcdConfig::from_cluster_store(&url).expect("url"))
                .await
                .expect("etcd client");
            let keys = Keys::new(vxnet::store::keys::DEFAULT_PREFIX);
            let leases = if leases.is_empty() {
                futures::future::try_join_all(
                    (0..FAKE_NODES).map(|_| store.grant_lease(Duration::from_secs(600))),
                )
                .await
                .expect("leases")
            } else {
                leases
            };
            let id = |kind: u64, i: usize| -> Id {
                format!(
                    "{:016x}{:032x}{:016x}",
                    0xd115_0000_0000_0000u64 | kind,
                    i,
                    0
                )
                .parse()
                .expect("id")
            };
            let nodes: Vec<Op> = (0..FAKE_NODES)
                .map(|n| {
                    let node = Node {
                        id: id(1, n),
                        name: format!("fake{n}"),
                        advertise_addr: std::net::IpAddr::V4(Ipv4Addr::new(
                            198,
                            51,
                            100,
                            10 + n as u8,
                        )),
                        advertise_port: None,
                        started: String::new(),
                        version: "bench".into(),
                    };
                    Op::put_leased(
                        keys.node(&node.id),
                        serde_json::to_vec(&node).expect("json"),
                        leases[n],
                    )
                })
                .collect();
            store.txn(vec![], nodes, vec![]).await.expect("nodes");
            let base = u32::from(Ipv4Addr::new(10, 128, 0, 10));
            let ops: Vec<Vec<Op>> = (0..k)
                .collect::<Vec<_>>()
                .chunks(64)
                .map(|chunk| {
                    chunk
                        .iter()
                        .flat_map(|&i| {
                            let ip = Ipv4Addr::from(base + i as u32);
                            let n = i % FAKE_NODES;
                            let ep = Endpoint {
                                id: id(2, i),
                                network_id: net.clone(),
                                name: format!("host-{i}"),
                                node_id: id(1, n),
                                ip,
                                mac: Mac::from_ipv4(ip),
                                created: String::new(),
                                aliases: if alias {
                                    vec![format!("svc-{i}")]
                                } else {
                                    vec![]
                                },
                            };
                            [
                                Op::put_leased(
                                    keys.endpoint(&net, &ep.id),
                                    serde_json::to_vec(&ep).expect("json"),
                                    leases[n],
                                ),
                                Op::put_leased(keys.addr(&net, ip), ep.id.as_str(), leases[n]),
                            ]
                        })
                        .collect()
                })
                .collect();
            use futures::{StreamExt, TryStreamExt};
            futures::stream::iter(ops)
                .map(|ops| store.txn(vec![], ops, vec![]))
                .buffer_unordered(16)
                .try_collect::<Vec<_>>()
                .await
                .expect("endpoint writes");
            leases
        }))
    })
    .expect("writer thread")
}

fn revoke(ns: &NetNs, url: &str, leases: Vec<i64>) {
    let url = url.to_string();
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let store = EtcdStore::connect(EtcdConfig::from_cluster_store(&url).expect("url"))
                .await
                .expect("etcd client");
            for l in leases {
                let _ = store.revoke_lease(l).await;
            }
        });
        Ok(())
    })
    .expect("revoke thread");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits until vm2's name index holds `n` entries (bounded: 120 s).
async fn wait_names(client: &vxnet::api::client::Client, n: usize) {
    let t0 = Instant::now();
    loop {
        let names = client
            .info()
            .await
            .ok()
            .and_then(|i| i.dns)
            .map_or(0, |d| d.names);
        if names >= n {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "vm2 holds {names} of {n} names"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn quick() -> bool {
    std::env::var_os("VXNET_BENCH_QUICK").is_some()
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Message::new(
        id,
        hickory_proto::op::MessageType::Query,
        hickory_proto::op::OpCode::Query,
    );
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    q.to_vec().expect("query")
}

fn first_a(answer: &[u8]) -> Option<Ipv4Addr> {
    let m = Message::from_vec(answer).ok()?;
    m.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

/// A UDP socket opened inside `ns`, connected to `server`.
fn socket_in(ns: &NetNs, server: SocketAddr) -> UdpSocket {
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(server)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    })
    .unwrap_or_else(|e| panic!("socket to {server}: {e}"))
}

/// One query and its answer; the time it took, or None if there was no right answer.
fn timed(s: &UdpSocket, id: u16, name: &str, want: Ipv4Addr, buf: &mut [u8]) -> Option<Duration> {
    let q = query(id, name);
    let t0 = Instant::now();
    s.send(&q).ok()?;
    loop {
        let n = s.recv(buf).ok()?;
        if n >= 2 && buf[..2] == id.to_be_bytes() {
            let took = t0.elapsed();
            return (first_a(&buf[..n]) == Some(want)).then_some(took);
        }
    }
}

fn sh(lab: &Lab, host: &str, argv: &[&str]) -> String {
    let out = lab
        .host(host)
        .expect("host")
        .command(argv[0])
        .expect("command")
        .args(&argv[1..])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{argv:?} on {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Starts `vxnet run -d --name NAME --net bench -- sleep 3600` on `host`; its address and
/// its network namespace (reached through the host's root).
fn container(lab: &Lab, host: &str, name: &str) -> (Ipv4Addr, NetNs) {
    sh(
        lab,
        host,
        &[
            "vxnet", "run", "-d", "--name", name, "--net", "bench", "--", "sleep", "3600",
        ],
    );
    let ps: serde_json::Value =
        serde_json::from_str(&sh(lab, host, &["vxnet", "ps", "--format", "json"])).expect("ps");
    let c = ps
        .as_array()
        .expect("ps list")
        .iter()
        .find(|c| c["name"] == name)
        .expect("container listed")
        .clone();
    let ip = c["attachments"][0]["ip"]
        .as_str()
        .expect("ip")
        .parse()
        .expect("ip");
    let path = format!(
        "/proc/{}/root{}",
        lab.host(host).expect("host").init_pid(),
        c["netns"].as_str().expect("netns")
    );
    (
        ip,
        NetNs::open(std::path::Path::new(&path)).expect("container netns"),
    )
}

/// aardvark-dns, started by this bench in a namespace; stopped (by the PID it wrote) on drop.
struct Aardvark {
    dir: PathBuf,
}

impl Aardvark {
    const PROGRAM: &'static str = "/usr/lib/podman/aardvark-dns";

    fn start(ns: &NetNs, listen: Ipv4Addr, name: &str, ip: Ipv4Addr) -> Aardvark {
        let dir = std::env::temp_dir().join(format!("vxnet-bench-aardvark-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("aardvark config dir");
        let id = format!("{:064x}", rand::random::<u128>());
        // Its format: the listening addresses, then `ID IPv4s IPv6s NAMES` per container.
        std::fs::write(dir.join("bench"), format!("{listen}\n{id} {ip}  {name}\n"))
            .expect("aardvark config");
        let mut cmd = Command::new(Self::PROGRAM);
        cmd.arg("--config").arg(&dir).args(["-p", "53", "run"]);
        ns.command(&mut cmd).expect("enter the namespace");
        // `run` forks: the parent exits once the server listens; the server writes its PID.
        let status = cmd
            .status()
            .expect("aardvark-dns (apt-get install aardvark-dns)");
        assert!(status.success(), "aardvark-dns run: {status}");
        Aardvark { dir }
    }
}

impl Drop for Aardvark {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.join("aardvark.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            let is_ours = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.contains("aardvark-dns") && c.contains(&*self.dir.to_string_lossy())
            });
            if is_ours {
                // SAFETY: kill(2) on a PID this bench started (checked by its command line).
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let t0 = Instant::now();
                while std::path::Path::new(&format!("/proc/{pid}")).exists()
                    && t0.elapsed() < Duration::from_secs(5)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Pins every thread of process `pid` to `cpu`.
fn pin(pid: u32, cpu: usize) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            pin_tid(tid, cpu);
        }
    }
}

fn pin_tid(tid: i32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity take it
    // by pointer with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn unpin(pid: u32) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            // SAFETY: as in pin_tid.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for c in 0..cores {
                    libc::CPU_SET(c, &mut set);
                }
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
        }
    }
}

/// utime + stime of process `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

async fn bench() {
    let runs = support::runs(if quick() { 100 } else { 2000 });
    let name = format!("bench-dns-{}", std::process::id());
    let lab = LabGuard::new(
        Lab::up(LabOptions::new(
            &name,
            PathBuf::from(env!("CARGO_BIN_EXE_vxnet")),
        ))
        .await
        .unwrap_or_else(|e| panic!("cannot start the bench lab: {e}")),
    );
    lab.start_docker("vm2", &DockerOptions::default())
        .await
        .expect("dockerd on vm2");
    lab.import_test_image("vm2").expect("test image");
    let vm2 = lab.host("vm2").expect("vm2");
    let vm3 = lab.host("vm3").expect("vm3").client();
    let net = vm2
        .client()
        .network_create(&vxnet::cluster::NetworkCreate {
            name: "bench".into(),
            subnet: Some("10.20.0.0/16".parse().expect("subnet")),
            ..Default::default()
        })
        .await
        .expect("network create");
    while vm3.network_inspect("bench").await.is_err() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (target, _) = container(&lab, "vm3", "target");
    let (_, client) = container(&lab, "vm2", "client");

    // Docker's embedded DNS, on the same engine.
    let docker = |args: &[&str]| support::docker(&lab, "vm2", args);
    docker(&["network", "create", "dbr"]);
    for n in ["dtarget", "dclient"] {
        docker(&[
            "run", "-d", "--name", n, "--net", "dbr", TEST_IMAGE, "sleep", "3600",
        ]);
    }
    let dtarget: Ipv4Addr = docker(&[
        "inspect",
        "-f",
        "{{(index .NetworkSettings.Networks \"dbr\").IPAddress}}",
        "dtarget",
    ])
    .parse()
    .expect("dtarget address");
    let dpid = docker(&["inspect", "-f", "{{.State.Pid}}", "dclient"]);
    let dclient =
        NetNs::open(std::path::Path::new(&format!("/proc/{dpid}/ns/net"))).expect("dclient netns");

    // aardvark-dns in vm2's sandbox of the network, on its gateway address.
    let sandbox = NetNs::open(std::path::Path::new(&format!(
        "/proc/{}/root/run/vxnet/netns/1-{}",
        vm2.init_pid(),
        &net.id.as_str()[..10]
    )))
    .expect("vm2's sandbox");
    let _aardvark = Aardvark::start(&sandbox, net.gateway, "target", target);

    // Latency, the three interleaved query by query.
    let ours = socket_in(&client, SocketAddr::from((vxnet::dns::LISTEN_ADDR, 53)));
    let theirs = socket_in(&dclient, SocketAddr::from(([127, 0, 0, 11], 53)));
    let podman = socket_in(&client, SocketAddr::from((net.gateway, 53)));
    let (mut v, mut d, mut a) = (Vec::new(), Vec::new(), Vec::new());
    let mut buf = vec![0u8; 4096];
    for i in 0..(runs + 50) {
        let id = i as u16;
        let (x, y, z) = (
            timed(&ours, id, "target.", target, &mut buf),
            timed(&theirs, id, "dtarget.", dtarget, &mut buf),
            timed(&podman, id, "target.", target, &mut buf),
        );
        if i < 50 {
            continue; // warm-up: caches, first forwards, ARP
        }
        v.extend(x);
        d.extend(y);
        a.extend(z);
    }
    assert!(v.len() == runs, "vxnet answered {} of {runs}", v.len());
    let lat_v = Summary::of(
        "vxnet: A of a container on another host (vm2 → 169.254.53.53)",
        &v,
    );
    let lat_d = Summary::of(
        "Docker's embedded DNS: A of a container on the same engine (127.0.0.11)",
        &d,
    );
    let lat_a = Summary::of(
        "aardvark-dns: A of the same name, same client, in the same sandbox",
        &a,
    );

    // Create on vm3 → resolvable on vm2.
    let converge_runs = if quick() { 10 } else { 100 };
    let mut from_request = Vec::new();
    let mut from_answer = Vec::new();
    for i in 0..converge_runs {
        let name = format!("r{i}");
        let poller = {
            let client = NetNs::open(client.path().expect("path")).expect("client netns");
            let want = format!("{name}.bench.");
            std::thread::spawn(move || -> Option<(Instant, Ipv4Addr)> {
                let s = socket_in(&client, SocketAddr::from((vxnet::dns::LISTEN_ADDR, 53)));
                s.set_read_timeout(Some(Duration::from_millis(100))).ok()?;
                let mut buf = vec![0u8; 4096];
                let t0 = Instant::now();
                let mut id = 0u16;
                while t0.elapsed() < Duration::from_secs(10) {
                    id = id.wrapping_add(1);
                    s.send(&query(id, &want)).ok()?;
                    if let Ok(n) = s.recv(&mut buf) {
                        if let Some(ip) = first_a(&buf[..n]) {
                            return Some((Instant::now(), ip));
                        }
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                None
            })
        };
        let started = Instant::now();
        let made = vm3
            .container_create(&CreateRequest {
                name: Some(name.clone()),
                network: "bench".into(),
                ..Default::default()
            })
            .await
            .expect("create");
        let answered = Instant::now();
        let (seen, ip) = poller.join().expect("poller").expect("never resolvable");
        assert_eq!(ip, made.attachments[0].ip);
        from_request.push(seen.duration_since(started));
        from_answer.push(seen.saturating_duration_since(answered));
        vm3.container_rm(made.id.as_str(), true).await.expect("rm");
    }
    let conv_req = Summary::of(
        "vxnet: create on vm3 (request) → resolvable on vm2",
        &from_request,
    );
    let conv_ans = Summary::of(
        "vxnet: create on vm3 (answered) → resolvable on vm2",
        &from_answer,
    );

    // Queries per second on one core.
    let clients = if quick() { 8 } else { 48 };
    let mut loaders = Vec::new();
    for i in 0..clients {
        loaders.push(container(&lab, "vm2", &format!("q{i}")).1);
    }
    let daemon_pid = vm2
        .processes()
        .iter()
        .find(|p| p.role == "daemon")
        .expect("vm2's daemon")
        .pid;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (daemon_cpu, load_cpu) = (cores.saturating_sub(1), 0);
    pin(daemon_pid, daemon_cpu);
    let window = Duration::from_secs(if quick() { 1 } else { 5 });
    let cpu0 = cpu_seconds(daemon_pid);
    let t0 = Instant::now();
    let answered: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = loaders
            .iter()
            .map(|ns| {
                s.spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    pin_tid(unsafe { libc::gettid() }, load_cpu);
                    let sock = socket_in(ns, SocketAddr::from((vxnet::dns::LISTEN_ADDR, 53)));
                    sock.set_nonblocking(true).ok();
                    let q = query(7, "target.");
                    let mut buf = [0u8; 1024];
                    let mut got = 0u64;
                    let mut outstanding = 0u32;
                    let start = Instant::now();
                    while start.elapsed() < window {
                        while outstanding < 4 && sock.send(&q).is_ok() {
                            outstanding += 1;
                        }
                        let mut any = false;
                        while sock.recv(&mut buf).is_ok() {
                            got += 1;
                            outstanding = outstanding.saturating_sub(1);
                            any = true;
                        }
                        if !any {
                            // Nothing back: the limit dropped some; send afresh after a pause.
                            std::thread::sleep(Duration::from_micros(200));
                            outstanding = 0;
                        }
                    }
                    got
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(daemon_pid) - cpu0;
    unpin(daemon_pid);
    let qps = answered as f64 / wall;
    let figures = vec![
        Figure {
            case: format!(
                "vxnet: answers per second, daemon on one core, {clients} asking containers"
            ),
            value: qps.round(),
            unit: "queries/s".into(),
        },
        Figure {
            case: "vxnet: the daemon's CPU during that load".into(),
            value: (cpu / wall * 100.0).round(),
            unit: "% of one core".into(),
        },
        Figure {
            case: "vxnet: answers per CPU second of the daemon".into(),
            value: (answered as f64 / cpu.max(1e-9)).round(),
            unit: "queries/s".into(),
        },
    ];
    support::print_figures(&figures);

    // Memory: 50,000 names, then 50,000 more (one alias each).
    let k = if quick() { 5_000 } else { 50_000 };
    let names_net = vm2
        .client()
        .network_create(&vxnet::cluster::NetworkCreate {
            name: "names".into(),
            subnet: Some("10.128.0.0/14".parse().expect("subnet")),
            ..Default::default()
        })
        .await
        .expect("network create");
    let vm1 = lab.host("vm1").expect("vm1").netns().expect("vm1 netns");
    let url = lab.cluster_store();
    let vm2_api = vm2.client();
    let before = vm2_api
        .info()
        .await
        .ok()
        .and_then(|i| i.dns)
        .map_or(0, |d| d.names);
    // The daemon hands freed memory back once its watch has been quiet for a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss0 = rss_kib(daemon_pid);
    let leases = write_names(&vm1, &url, &names_net.id, k, false, Vec::new());
    wait_names(&vm2_api, before + k).await;
    // The daemon hands freed memory back once its watch has been quiet for a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss1 = rss_kib(daemon_pid);
    let leases = write_names(&vm1, &url, &names_net.id, k, true, leases);
    wait_names(&vm2_api, before + 2 * k).await;
    // The daemon hands freed memory back once its watch has been quiet for a second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss2 = rss_kib(daemon_pid);
    revoke(&vm1, &url, leases);
    let mb = |kib: u64| (kib as f64 / 1024.0 * 10.0).round() / 10.0;
    let memory = vec![
        Figure {
            case: format!("vxnet: daemon RSS growth, {k} remote endpoints (each a name) arrive"),
            value: mb(rss1.saturating_sub(rss0)),
            unit: "MB".into(),
        },
        Figure {
            case: format!("vxnet: daemon RSS growth, {k} more names (one alias on each)"),
            value: mb(rss2.saturating_sub(rss1)),
            unit: "MB".into(),
        },
    ];
    support::print_figures(&memory);
    let mut figures = figures;
    figures.extend(memory);

    let ratios = vec![Ratio::of(&lat_v, &lat_d), Ratio::of(&lat_v, &lat_a)];
    let summaries = vec![lat_v, lat_d, lat_a, conv_req, conv_ans];
    support::print_table("dns", &summaries, &ratios);
    #[derive(serde::Serialize)]
    struct Report {
        machine: support::Machine,
        summaries: Vec<Summary>,
        ratios: Vec<Ratio>,
        figures: Vec<Figure>,
    }
    support::write_result(
        "dns",
        &Report {
            machine: support::Machine::here(),
            summaries,
            ratios,
            figures,
        },
    );
}
