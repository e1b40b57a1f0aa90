//! Overlay benchmark on a three-host lab (run with `cargo bench --bench overlay`; needs root):
//!
//! - attach latency: the network part of `vxnet run` — the create request until the daemon
//!   answers, which it does once the container's eth0 is up with its address and route — for
//!   the first container of the network on a host (which also makes the sandbox) and in the
//!   steady state, and the whole `vxnet run --rm --net … -- true` command; against the
//!   kernel's floor measured in the same run (a new namespace plus a veth created straight
//!   into it, addressed, up, routed, over rtnetlink);
//! - remote convergence: attach on vm3 until a container on vm2 gets its first ping reply,
//!   pinging every 1 ms; measured from the create request (which includes vm3's own attach)
//!   and from vm3's answer (the container is up there: how long until the other hosts reach
//!   it, the figure comparable with etcd's watch delivery, which the target is taken on).
//!   The pinging container's ARP retransmit time is set to 1 ms (a sysctl
//!   inside that bench-made namespace) so that a probe sent before the entry existed is
//!   retried within the millisecond instead of after the kernel's default second.

#[path = "support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::{Pinger, Ratio, Summary};
use vxnet::container::CreateRequest;
use vxnet::lab::{Lab, LabGuard, LabOptions};
use vxnet::netns::NetNs;

fn main() {
    support::block_on(bench());
}

async fn bench() {
    let runs = support::runs(100);
    let name = format!("bench-{}", std::process::id());
    let lab = LabGuard::new(
        Lab::up(LabOptions::new(
            &name,
            PathBuf::from(env!("CARGO_BIN_EXE_vxnet")),
        ))
        .await
        .unwrap_or_else(|e| panic!("cannot start the bench lab: {e}")),
    );
    let vm2 = lab.host("vm2").expect("vm2").client();
    let vm3 = lab.host("vm3").expect("vm3").client();
    vm2.network_create(&vxnet::cluster::NetworkCreate {
        name: "bench".into(),
        subnet: Some("10.9.0.0/16".parse().expect("subnet")),
        ..Default::default()
    })
    .await
    .expect("network create");
    while vm3.network_inspect("bench").await.is_err() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // First attach on a host: the network's sandbox (br0, vxlan1 moved in) is made with it.
    let mut first = Vec::with_capacity(runs / 4);
    for i in 0..(runs / 4).max(5) {
        let req = CreateRequest {
            name: Some(format!("f{i}")),
            network: "bench".into(),
            ..Default::default()
        };
        let started = Instant::now();
        let c = vm2.container_create(&req).await.expect("create");
        first.push(started.elapsed());
        vm2.container_rm(c.id.as_str(), true).await.expect("rm");
    }

    // From here on each host keeps one container, so the sandboxes stay: the steady state.
    let pinger_ns = vm2
        .container_create(&CreateRequest {
            name: Some("pinger".into()),
            network: "bench".into(),
            ..Default::default()
        })
        .await
        .expect("pinger");
    vm3.container_create(&CreateRequest {
        name: Some("anchor".into()),
        network: "bench".into(),
        ..Default::default()
    })
    .await
    .expect("anchor");

    // Attach latency through the API on vm2.
    let mut attach = Vec::with_capacity(runs);
    for i in 0..runs {
        let req = CreateRequest {
            name: Some(format!("a{i}")),
            network: "bench".into(),
            ..Default::default()
        };
        let started = Instant::now();
        let c = vm2.container_create(&req).await.expect("create");
        attach.push(started.elapsed());
        vm2.container_rm(c.id.as_str(), true).await.expect("rm");
    }

    // The whole `vxnet run --rm` command on vm2 (CLI process, namespace, command, clean-up).
    let mut whole = Vec::with_capacity(runs / 4);
    for _ in 0..(runs / 4).max(5) {
        let mut cmd = lab
            .host("vm2")
            .expect("vm2")
            .command("vxnet")
            .expect("command");
        cmd.args(["run", "--rm", "--net", "bench", "--", "true"]);
        let started = Instant::now();
        let status = cmd.status().expect("vxnet run");
        whole.push(started.elapsed());
        assert!(status.success());
    }

    // The kernel's floor for the same work, in namespaces this process makes.
    let floor = kernel_floor(runs).await;

    // Remote convergence: a container on vm2 pings each new container on vm3.
    // The container's namespace lives in vm2's private /run: reach it through vm2's root.
    let ns_path = PathBuf::from(format!(
        "/proc/{}/root{}",
        lab.host("vm2").expect("vm2").init_pid(),
        pinger_ns.netns.display()
    ));
    let ns = NetNs::open(&ns_path).expect("pinger namespace");
    let mut converge = Vec::with_capacity(runs);
    let mut after_attach = Vec::with_capacity(runs);
    for i in 0..runs {
        let req = CreateRequest {
            name: Some(format!("r{i}")),
            network: "bench".into(),
            ..Default::default()
        };
        let started = Instant::now();
        let create = tokio::spawn({
            let vm3 = vm3.clone();
            async move { vm3.container_create(&req).await }
        });
        // The address the next container gets is not known until it is created; wait for it
        // (the create request answers in milliseconds), then ping until the first reply.
        let c = create.await.expect("join").expect("create on vm3");
        let answered = started.elapsed();
        let ip = c.attachments[0].ip;
        let reply = ping_until_reply(&ns, ip, started).expect("pinger thread");
        converge.push(reply);
        after_attach.push(reply.saturating_sub(answered));
        vm3.container_rm(c.id.as_str(), true).await.expect("rm");
    }

    let summaries = vec![
        Summary::of("vxnet: attach (create request → eth0 up, API)", &attach),
        Summary::of("vxnet: first attach on a host (makes the sandbox)", &first),
        Summary::of("kernel floor: netns + veth into it + addr/up/route", &floor),
        Summary::of(
            "vxnet: `vxnet run --rm --net … -- true` (whole command)",
            &whole,
        ),
        Summary::of(
            "vxnet: remote convergence (attach on vm3 → first reply on vm2)",
            &converge,
        ),
        Summary::of(
            "vxnet: remote convergence after the attach (vm3 answered → first reply on vm2)",
            &after_attach,
        ),
    ];
    let ratios = vec![Ratio::of(&summaries[0], &summaries[2])];
    support::report("overlay", "overlay", summaries, ratios);
}

/// Pings `ip` from inside `ns` every millisecond until a reply; returns the time since
/// `started`. Runs on a thread of its own inside the namespace.
fn ping_until_reply(ns: &NetNs, ip: Ipv4Addr, started: Instant) -> std::io::Result<Duration> {
    ns.run(|| {
        // Retry ARP every millisecond (see the module comment).
        std::fs::write("/proc/sys/net/ipv4/neigh/eth0/retrans_time_ms", "1")?;
        let mut pinger = Pinger::open(Duration::from_millis(1))?;
        let deadline = started + Duration::from_secs(10);
        while Instant::now() < deadline {
            if pinger.ping_once(ip) {
                return Ok(started.elapsed());
            }
        }
        Err(std::io::Error::other(format!(
            "no reply from {ip} within 10 s"
        )))
    })
}

/// New namespace, a veth pair created with one end directly inside it, address, up, default
/// route: the least any attach has to do in the kernel.
async fn kernel_floor(runs: usize) -> Vec<Duration> {
    use futures::TryStreamExt;
    use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
    use std::os::fd::{AsFd, AsRawFd};

    let host = NetNs::new_anonymous().expect("scratch namespace");
    let h = host.netlink().expect("netlink");
    let mut out = Vec::with_capacity(runs);
    for i in 0..runs {
        let started = Instant::now();
        let c = NetNs::new_anonymous().expect("container namespace");
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name("eth0")
            .mtu(1450)
            .setns_by_fd(c.as_fd().as_raw_fd())
            .build();
        let msg = LinkVeth::new(&format!("vf{i}"), "eth0")
            .set_info_data(rtnetlink::packet_route::link::InfoData::Veth(
                rtnetlink::packet_route::link::InfoVeth::Peer(peer),
            ))
            .mtu(1450)
            .up()
            .build();
        h.link().add(msg).execute().await.expect("veth");
        let ch = c.netlink().expect("netlink");
        let link = ch
            .link()
            .get()
            .match_name("eth0".to_string())
            .execute()
            .try_next()
            .await
            .expect("get")
            .expect("eth0");
        let idx = link.header.index;
        ch.address()
            .add(idx, Ipv4Addr::new(10, 99, 0, 2).into(), 24)
            .execute()
            .await
            .expect("addr");
        ch.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .expect("up");
        ch.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(Ipv4Addr::new(10, 99, 0, 1))
                    .build(),
            )
            .execute()
            .await
            .expect("route");
        out.push(started.elapsed());
    }
    out
}
