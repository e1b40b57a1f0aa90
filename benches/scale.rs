//! Control-plane programming rate (issue 7, case 6; run with `cargo bench --bench scale`;
//! needs root): K remote endpoints appear in the store, written by a load generator as other
//! hosts would (20 fake nodes, each with its own lease, node key and endpoints with their
//! address claims), and the time until vm2's sandbox holds all K FDB entries and all K
//! permanent neighbours is measured; against the same K entries loaded by `bridge -batch`
//! and `ip -batch` into a namespace with the same br0 + vxlan1 layout, in the same run (the
//! kernel's own rate). Then the fake hosts' leases are revoked (as when hosts die) and the
//! time until the kernel holds none of them is measured. The daemon's RSS is read idle,
//! with K known, and after the removal.
//!
//! Streaming, the first measure is bounded below by the generator's own writes (etcd takes
//! about as long to store K endpoints as the kernel to load them). So each K is also loaded
//! as a burst: vm2's daemon is frozen (SIGSTOP) while the K are written and thawed
//! (SIGCONT) once etcd holds them all; thaw → kernel holds all K is the daemon's own
//! programming time (watch delivery, decoding, planning, netlink), the figure the target's
//! ratio is taken on. A daemon meets such a burst when a network with K endpoints is
//! re-listed, or after a stall.
//!
//! `VXNET_SCALE_K` (comma-separated, default `10000,50000`) picks the sizes.
//!
//! Completion is detected by polling a sample of the entries with single-entry netlink GETs
//! every 20 ms (cheap), then confirming with a full dump of both tables (a 50k-entry dump
//! costs tens of milliseconds, so it is not the poll). The time taken is at the end of the
//! confirming dump: an upper bound, late by at most one poll period plus one dump.

#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use serde::Serialize;
use vxnet::container::CreateRequest;
use vxnet::lab::{Lab, LabGuard, LabOptions};
use vxnet::model::{Endpoint, Id, Mac, Node};
use vxnet::netns::NetNs;
use vxnet::store::etcd::{EtcdConfig, EtcdStore};
use vxnet::store::{Keys, Op, Store};

const FAKE_NODES: usize = 20;
/// Endpoints per transaction: 2 puts each (endpoint + address claim), within etcd's default
/// 128 operations per transaction.
const PER_TXN: usize = 64;
const TXNS_IN_FLIGHT: usize = 32;
const POLL: Duration = Duration::from_millis(20);
const LIMIT: Duration = Duration::from_secs(600);

fn main() {
    support::block_on(bench());
}

/// The i-th fake endpoint: IP, MAC, VTEP (the same in the store and in the baseline).
fn entry(i: usize) -> (Ipv4Addr, Mac, Ipv4Addr) {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 65, 0, 0)) + i as u32);
    let vtep = Ipv4Addr::new(198, 51, 100, 10 + (i % FAKE_NODES) as u8);
    (ip, Mac::from_ipv4(ip), vtep)
}

fn sizes() -> Vec<usize> {
    std::env::var("VXNET_SCALE_K")
        .ok()
        .map(|s| s.split(',').filter_map(|k| k.trim().parse().ok()).collect())
        .unwrap_or_else(|| match std::env::var_os("VXNET_BENCH_QUICK") {
            Some(_) => vec![1_000],
            None => vec![10_000, 50_000],
        })
}

#[derive(Serialize)]
struct Case {
    k: usize,
    /// Store writes by the generator, first write to last answer.
    generator_write_ms: f64,
    /// First write until vm2's kernel holds all K FDB + K neighbour entries.
    vxnet_program_ms: f64,
    vxnet_entries_per_s: f64,
    /// `bridge -batch` + `ip -batch` of the same entries (the kernel's own rate).
    baseline_ms: f64,
    baseline_bridge_ms: f64,
    baseline_ip_ms: f64,
    baseline_entries_per_s: f64,
    /// vxnet (streaming) / baseline.
    ratio: f64,
    /// Burst: the K written while the daemon was frozen; thaw until the kernel holds all K.
    vxnet_burst_ms: f64,
    vxnet_burst_entries_per_s: f64,
    /// burst / baseline (target: at most 1.5 at K = 10,000).
    burst_ratio: f64,
    /// Leases revoked until the kernel holds none of the K.
    vxnet_remove_ms: f64,
    rss_before_kib: u64,
    rss_with_k_kib: u64,
    rss_after_remove_kib: u64,
}

#[derive(Serialize)]
struct ScaleReport {
    machine: support::Machine,
    rss_idle_kib: u64,
    cases: Vec<Case>,
}

async fn bench() {
    let name = format!("bench-scale-{}", std::process::id());
    let mut opts = LabOptions::new(&name, PathBuf::from(env!("CARGO_BIN_EXE_vxnet")));
    // vm1 runs etcd, vm2 the daemon under test: no other daemon competes for the two cores.
    opts.hosts = 2;
    let lab = LabGuard::new(
        Lab::up(opts)
            .await
            .unwrap_or_else(|e| panic!("cannot start the bench lab: {e}")),
    );
    let vm2 = lab.host("vm2").expect("vm2");
    let client = vm2.client();
    let net = client
        .network_create(&vxnet::cluster::NetworkCreate {
            name: "scale".into(),
            subnet: Some("10.64.0.0/14".parse().expect("subnet")),
            ..Default::default()
        })
        .await
        .expect("network create");
    // A local container, so that vm2 has the network's sandbox. A container created through
    // the API without a process is cleaned up after 30 s (and the sandbox with its last
    // one), so a fresh one is made before each phase below: phases take under 30 s.
    let anchors = std::sync::atomic::AtomicUsize::new(0);
    let anchor = || async {
        let i = anchors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        client
            .container_create(&CreateRequest {
                name: Some(format!("anchor{i}")),
                network: "scale".into(),
                ..Default::default()
            })
            .await
            .expect("anchor container");
    };
    anchor().await;
    let daemon_pid = vm2
        .processes()
        .iter()
        .find(|p| p.role == "daemon")
        .expect("vm2's daemon record")
        .pid;
    let sandbox_path = PathBuf::from(format!(
        "/proc/{}/root/run/vxnet/netns/1-{}",
        vm2.init_pid(),
        &net.id.as_str()[..10]
    ));
    let sandbox = NetNs::open(&sandbox_path).expect("vm2's sandbox");
    let sh = sandbox.netlink().expect("netlink in the sandbox");
    let vx = link_index(&sh, "vxlan1").await;

    let generator = Generator::start(
        lab.host("vm1").expect("vm1").netns().expect("vm1 netns"),
        &lab.cluster_store(),
        net.id.clone(),
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_kib(daemon_pid);
    let mut cases = Vec::new();
    for (run, k) in sizes().into_iter().enumerate() {
        anchor().await;
        let rss_before = rss_kib(daemon_pid);
        let started = Instant::now();
        let write = generator.load(run, k);
        let done = wait_for(&sh, vx, k, true, started).await;
        let write = write.await.expect("generator");
        let rss_with_k = rss_kib(daemon_pid);

        anchor().await;
        let started = Instant::now();
        generator.remove().await.expect("generator");
        let removed = wait_for(&sh, vx, k, false, started).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_after = rss_kib(daemon_pid);

        anchor().await;
        let frozen = Frozen::stop(daemon_pid);
        generator.load(run + 1000, k).await.expect("generator");
        let started = Instant::now();
        drop(frozen);
        let burst = wait_for(&sh, vx, k, true, started).await;
        anchor().await;
        generator.remove().await.expect("generator");
        wait_for(&sh, vx, k, false, Instant::now()).await;

        let (bridge, ip) = baseline(k).await;
        let base = bridge + ip;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let rate = |d: Duration| k as f64 / d.as_secs_f64();
        // Printed as soon as known: a later size that fails must not lose this one.
        println!(
            "K={k}: vxnet {:.0} ms, baseline {:.0} ms (ratio {:.2}), generator {:.0} ms, \
             removal {:.0} ms, burst {:.0} ms (ratio {:.2}), RSS {rss_before}/{rss_with_k}/{rss_after} KiB",
            ms(done),
            ms(base),
            done.as_secs_f64() / base.as_secs_f64(),
            ms(write),
            ms(removed),
            ms(burst),
            burst.as_secs_f64() / base.as_secs_f64(),
        );
        cases.push(Case {
            k,
            generator_write_ms: ms(write),
            vxnet_program_ms: ms(done),
            vxnet_entries_per_s: rate(done),
            baseline_ms: ms(base),
            baseline_bridge_ms: ms(bridge),
            baseline_ip_ms: ms(ip),
            baseline_entries_per_s: rate(base),
            ratio: done.as_secs_f64() / base.as_secs_f64(),
            vxnet_burst_ms: ms(burst),
            vxnet_burst_entries_per_s: rate(burst),
            burst_ratio: burst.as_secs_f64() / base.as_secs_f64(),
            vxnet_remove_ms: ms(removed),
            rss_before_kib: rss_before,
            rss_with_k_kib: rss_with_k,
            rss_after_remove_kib: rss_after,
        });
    }
    generator.stop();

    println!("\nscale: remote endpoints programmed on vm2 (each K once; 2-core machine, noisy)");
    println!("daemon RSS idle: {} KiB", rss_idle);
    println!(
        "| K | generator writes ms | vxnet streaming ms | ratio | vxnet burst ms | burst endpoints/s | \
         baseline ms (bridge+ip) | baseline endpoints/s | burst ratio | removal ms | RSS before / with K / after KiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for c in &cases {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} ({:.0}+{:.0}) | {:.0} | {:.2} | {:.0} | {} / {} / {} |",
            c.k,
            c.generator_write_ms,
            c.vxnet_program_ms,
            c.ratio,
            c.vxnet_burst_ms,
            c.vxnet_burst_entries_per_s,
            c.baseline_ms,
            c.baseline_bridge_ms,
            c.baseline_ip_ms,
            c.baseline_entries_per_s,
            c.burst_ratio,
            c.vxnet_remove_ms,
            c.rss_before_kib,
            c.rss_with_k_kib,
            c.rss_after_remove_kib
        );
    }
    support::write_result(
        "scale",
        &ScaleReport {
            machine: support::Machine::here(),
            rss_idle_kib: rss_idle,
            cases,
        },
    );
    if let Err(e) = lab.down() {
        eprintln!("lab down: {e}");
    }
}

/// vm2's daemon (started by this bench's lab) stopped until dropped: continued even when
/// the bench fails, so that the lab's teardown finds it running.
struct Frozen(nix::unistd::Pid);

impl Frozen {
    fn stop(pid: u32) -> Frozen {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP the daemon");
        let frozen = Frozen(pid);
        // The stop is delivered asynchronously: the burst starts only once it has taken.
        while vxnet::lab::sys::stat_of(pid.as_raw() as u32).map(|(_, s)| s) != Some('T') {
            std::thread::sleep(Duration::from_millis(1));
        }
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

async fn link_index(h: &rtnetlink::Handle, name: &str) -> u32 {
    h.link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .expect("link get")
        .expect("link")
        .header
        .index
}

/// Waits until the kernel holds all K entries (`present`) or none of them; returns the time
/// since `started`.
async fn wait_for(
    h: &rtnetlink::Handle,
    vx: u32,
    k: usize,
    present: bool,
    started: Instant,
) -> Duration {
    // Evenly spread samples plus the last entries written.
    let mut sample: Vec<usize> = (0..32).map(|s| s * k / 32).collect();
    sample.extend(k.saturating_sub(8)..k);
    loop {
        assert!(
            started.elapsed() < LIMIT,
            "vm2 did not converge to {} of {k} entries within {LIMIT:?}",
            if present { "all" } else { "none" }
        );
        let mut pending = Vec::new();
        for &i in &sample {
            let (ip, mac, _) = entry(i);
            let fdb = get_one(h, fdb_query(vx, &mac)).await.is_some();
            let neigh = get_one(h, neigh_query(vx, ip)).await.is_some();
            if if present {
                !(fdb && neigh)
            } else {
                fdb || neigh
            } {
                pending.push(i);
            }
        }
        sample = pending;
        if sample.is_empty() {
            let (fdb, neigh) = count(h, vx).await;
            let done = if present {
                fdb >= k && neigh >= k
            } else {
                fdb == 0 && neigh == 0
            };
            if done {
                return started.elapsed();
            }
            // Still short: the dump is the poll from here on.
        }
        tokio::time::sleep(POLL).await;
    }
}

fn fdb_query(vx: u32, mac: &Mac) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = vx;
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    m
}

fn neigh_query(vx: u32, ip: Ipv4Addr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = vx;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    m
}

async fn get_one(h: &rtnetlink::Handle, msg: NeighbourMessage) -> Option<NeighbourMessage> {
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(msg));
    req.header.flags = NLM_F_REQUEST;
    let mut responses = h.clone().request(req).ok()?;
    let mut found = None;
    while let Some(m) = responses.next().await {
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) = m.payload {
            found = Some(n);
        }
    }
    found
}

/// vxnet's permanent FDB entries and permanent neighbours on `vx` (a full dump of each table).
async fn count(h: &rtnetlink::Handle, vx: u32) -> (usize, usize) {
    let mut counts = [0usize; 2];
    for (i, family) in [AddressFamily::Bridge, AddressFamily::Inet]
        .into_iter()
        .enumerate()
    {
        let mut dump = h.neighbours().get().set_address_family(family).execute();
        while let Some(n) = dump.try_next().await.expect("neighbour dump") {
            // On the bridge side only vxnet's own (`self`) entries: the bridge's entry for
            // vxlan1's own MAC (`master br0 permanent`) is never removed, and counting it
            // made "none left" wait until the sandbox itself went.
            let ours =
                family != AddressFamily::Bridge || n.header.flags.contains(NeighbourFlags::Own);
            if n.header.ifindex == vx && n.header.state == NeighbourState::Permanent && ours {
                counts[i] += 1;
            }
        }
    }
    (counts[0], counts[1])
}

/// The same K entries loaded by iproute2's batch mode into a fresh namespace with vxnet's
/// sandbox layout; returns the `bridge -batch` and `ip -batch` times.
async fn baseline(k: usize) -> (Duration, Duration) {
    let ns = NetNs::new_anonymous().expect("baseline namespace");
    let run = |args: &[&str]| {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        ns.command(&mut cmd).expect("setns");
        let started = Instant::now();
        let out = cmd.output().expect("iproute2");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        started.elapsed()
    };
    run(&["ip", "link", "add", "br0", "type", "bridge"]);
    run(&[
        "ip",
        "link",
        "add",
        "vxlan1",
        "type",
        "vxlan",
        "id",
        "4242",
        "dstport",
        "4789",
        "local",
        "192.0.2.6",
        "nolearning",
        "proxy",
    ]);
    run(&["ip", "link", "set", "vxlan1", "master", "br0", "up"]);
    run(&["ip", "link", "set", "br0", "up"]);
    run(&["bridge", "link", "set", "dev", "vxlan1", "learning", "off"]);
    let dir = std::env::temp_dir().join(format!("vxnet-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("batch dir");
    let fdb_file = dir.join("fdb.batch");
    let neigh_file = dir.join("neigh.batch");
    {
        let mut fdb = std::io::BufWriter::new(std::fs::File::create(&fdb_file).expect("fdb"));
        let mut neigh = std::io::BufWriter::new(std::fs::File::create(&neigh_file).expect("neigh"));
        for i in 0..k {
            let (ip, mac, vtep) = entry(i);
            writeln!(
                fdb,
                "fdb replace {mac} dev vxlan1 dst {vtep} self permanent"
            )
            .expect("w");
            writeln!(
                neigh,
                "neigh replace {ip} lladdr {mac} dev vxlan1 nud permanent"
            )
            .expect("w");
        }
        fdb.flush().expect("flush");
        neigh.flush().expect("flush");
    }
    let bridge = run(&["bridge", "-batch", fdb_file.to_str().expect("path")]);
    let ip = run(&["ip", "-batch", neigh_file.to_str().expect("path")]);
    // Checked with iproute2 itself: the oracle's own view of what it loaded.
    let lines = |args: &[&str], pat: &str| {
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        ns.command(&mut cmd).expect("setns");
        let out = cmd.output().expect("iproute2");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(pat))
            .count()
    };
    let f = lines(
        &["bridge", "fdb", "show", "dev", "vxlan1"],
        " self permanent",
    );
    let n = lines(&["ip", "neigh", "show", "dev", "vxlan1"], "PERMANENT");
    assert_eq!((f, n), (k, k), "the baseline did not load every entry");
    let _ = std::fs::remove_dir_all(&dir);
    (bridge, ip)
}

enum Job {
    Load {
        run: usize,
        k: usize,
        done: tokio::sync::oneshot::Sender<Duration>,
    },
    Remove {
        done: tokio::sync::oneshot::Sender<()>,
    },
}

/// The load generator: a thread inside vm1's network namespace (where the lab's etcd
/// listens), with its own runtime and one etcd client, writing as other hosts would.
struct Generator {
    jobs: std::sync::mpsc::Sender<Job>,
    thread: std::thread::JoinHandle<()>,
}

impl Generator {
    fn start(ns: NetNs, url: &str, net: Id) -> Generator {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let url = url.to_string();
        let thread = std::thread::spawn(move || {
            ns.run(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(generate(&url, net, rx));
                Ok(())
            })
            .expect("generator thread");
        });
        Generator { jobs: tx, thread }
    }

    fn load(&self, run: usize, k: usize) -> tokio::sync::oneshot::Receiver<Duration> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job::Load { run, k, done })
            .expect("generator gone");
        rx
    }

    fn remove(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (done, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job::Remove { done })
            .expect("generator gone");
        rx
    }

    fn stop(self) {
        drop(self.jobs);
        let _ = self.thread.join();
    }
}

async fn generate(url: &str, net: Id, jobs: std::sync::mpsc::Receiver<Job>) {
    let store = EtcdStore::connect(EtcdConfig::from_cluster_store(url).expect("url"))
        .await
        .expect("etcd client");
    let keys = Keys::new(vxnet::store::keys::DEFAULT_PREFIX);
    let mut leases = Vec::new();
    // Blocking receive is fine: this runtime has nothing else to do between jobs.
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Load { run, k, done } => {
                let started = Instant::now();
                leases = write_load(&store, &keys, &net, run, k).await;
                let _ = done.send(started.elapsed());
            }
            Job::Remove { done } => {
                futures::future::try_join_all(leases.drain(..).map(|l| store.revoke_lease(l)))
                    .await
                    .expect("revoke");
                let _ = done.send(());
            }
        }
    }
}

async fn write_load(store: &EtcdStore, keys: &Keys, net: &Id, run: usize, k: usize) -> Vec<i64> {
    let created = vxnet::model::now_rfc3339();
    let leases =
        futures::future::try_join_all((0..FAKE_NODES).map(|_| store.grant_lease(LIMIT * 2)))
            .await
            .expect("leases");
    let nodes: Vec<Id> = (0..FAKE_NODES).map(|n| fake_id(0xf00d, run, n)).collect();
    let ops: Vec<Op> = nodes
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let node = Node {
                id: id.clone(),
                name: format!("fake{n}"),
                advertise_addr: IpAddr::V4(entry(n).2),
                advertise_port: None,
                started: created.clone(),
                version: "bench".into(),
            };
            Op::put_leased(
                keys.node(id),
                serde_json::to_vec(&node).expect("json"),
                leases[n],
            )
        })
        .collect();
    store.txn(vec![], ops, vec![]).await.expect("nodes");
    let batches: Vec<Vec<Op>> = (0..k)
        .collect::<Vec<_>>()
        .chunks(PER_TXN)
        .map(|chunk| {
            chunk
                .iter()
                .flat_map(|&i| {
                    let (ip, mac, _) = entry(i);
                    let n = i % FAKE_NODES;
                    let ep = Endpoint {
                        id: fake_id(0xe9, run, i),
                        network_id: net.clone(),
                        name: format!("fake-{i}"),
                        node_id: nodes[n].clone(),
                        ip,
                        mac,
                        created: created.clone(),
                        aliases: Vec::new(),
                    };
                    [
                        Op::put_leased(
                            keys.endpoint(net, &ep.id),
                            serde_json::to_vec(&ep).expect("json"),
                            leases[n],
                        ),
                        Op::put_leased(keys.addr(net, ip), ep.id.as_str(), leases[n]),
                    ]
                })
                .collect()
        })
        .collect();
    futures::stream::iter(batches)
        .map(|ops| store.txn(vec![], ops, vec![]))
        .buffer_unordered(TXNS_IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await
        .expect("endpoint writes");
    leases
}

/// A valid 64-hex ID that no random ID collides with in practice: a fixed 16-hex tag.
fn fake_id(kind: u64, run: usize, i: usize) -> Id {
    format!(
        "{:016x}{:016x}{:032x}",
        0xfa4e_0000_0000_0000u64 | kind,
        run,
        i
    )
    .parse()
    .expect("fake id")
}
