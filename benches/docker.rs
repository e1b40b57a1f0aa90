//! Docker engines on a three-host lab (run with `cargo bench --bench docker`; needs root and
//! Debian's docker.io): `docker run --rm --net X vxnet-bb true` on vm2, for
//!
//! - `--net none`: the container start itself, the baseline;
//! - `--net <vxnet network>`: vxnet's plugin (`-d vxnet --ipam-driver vxnet`);
//! - `--net <Docker overlay>`: Docker 20.10's own legacy overlay on the same engines, with
//!   `--cluster-store` on the lab's etcd (the seed's system).
//!
//! - `--net <Docker bridge network>`: Docker's per-network work with its cheapest driver.
//!
//! Each network first gets one container (measured apart: the first on a host also builds the
//! network's sandbox), then one long-running container per network stays on vm2 so that the
//! measured runs are the steady state. Cases are interleaved run by run so that noise on this
//! shared machine hits them alike. Besides each case against `none`, the result holds what
//! each network adds over `none` and the ratio of the two additions.
//!
//! What vxnet itself adds is also read from the daemon: the time its plugin spent answering
//! Docker's calls during each vxnet run (`vxnet info`'s per-call totals, read before and after
//! the run). A vxnet network's end-to-end addition is mostly Docker's own per-network work —
//! the sandbox, and eth1 on docker_gwbridge, which Docker's overlay does too — so the
//! issue's target (vxnet adds at most 1/10 of what Docker's overlay adds over `none`) is
//! taken on that time, and the end-to-end ratios are reported beside it.

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{Ratio, Summary};
use vxnet::api::client::Client;
use vxnet::lab::{Lab, TEST_IMAGE};

fn main() {
    support::block_on(bench());
}

fn timed_run(lab: &Lab, net: &str) -> Duration {
    let started = Instant::now();
    support::docker(
        lab,
        "vm2",
        &["run", "--rm", "--net", net, TEST_IMAGE, "true"],
    );
    started.elapsed()
}

/// Total time vm2's plugin has spent answering Docker's calls.
async fn plugin_time(client: &Client) -> Duration {
    let info = client.info().await.expect("vm2 info");
    Duration::from_micros(info.docker_plugin_calls.values().map(|c| c.total_us).sum())
}

/// p50 and p99 of `case` minus those of `baseline`, as the ratio of two such additions.
fn added(case: &Summary, baseline: &Summary, other: &Summary) -> Ratio {
    Ratio {
        case: format!("{} − {}", case.case, baseline.case),
        baseline: format!("{} − {}", other.case, baseline.case),
        p50_ratio: (case.p50_us - baseline.p50_us) / (other.p50_us - baseline.p50_us),
        p99_ratio: (case.p99_us - baseline.p99_us) / (other.p99_us - baseline.p99_us),
    }
}

async fn bench() {
    let runs = support::runs(20);
    let lab = support::docker_lab("bench-docker", 3).await;
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
            "10.8.0.0/16",
            "-o",
            "vxnet.network=vx",
            "vx",
        ],
    );
    support::docker(
        &lab,
        "vm2",
        &[
            "network",
            "create",
            "-d",
            "overlay",
            "--subnet",
            "10.7.0.0/16",
            "ov",
        ],
    );
    // A user-defined bridge network: Docker's own per-network work (sandbox, embedded DNS,
    // gateway bridge for non-bridge drivers aside) with the cheapest driver, so that what the
    // two overlay drivers add on top of it can be told apart from what Docker adds anyway.
    support::docker(
        &lab,
        "vm2",
        &["network", "create", "--subnet", "10.6.0.0/16", "br"],
    );
    let cases = [
        ("--net none", "none"),
        ("--net vxnet", "vx"),
        ("--net Docker overlay", "ov"),
        ("--net Docker bridge", "br"),
    ];

    // The first container of each network on the host (builds its sandbox), then anchors.
    let first: Vec<Summary> = cases[1..]
        .iter()
        .map(|(label, net)| {
            Summary::of(&format!("first {label} on a host"), &[timed_run(&lab, net)])
        })
        .collect();
    for (_, net) in &cases[1..] {
        support::docker(
            &lab,
            "vm2",
            &[
                "run",
                "-d",
                "--name",
                &format!("anchor-{net}"),
                "--net",
                net,
                TEST_IMAGE,
                "sleep",
                "3600",
            ],
        );
    }
    let _ = timed_run(&lab, "none");

    let vm2 = lab.host("vm2").expect("vm2").client();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); cases.len()];
    let mut in_plugin = Vec::with_capacity(runs);
    for _ in 0..runs {
        for (i, (_, net)) in cases.iter().enumerate() {
            let before = plugin_time(&vm2).await;
            samples[i].push(timed_run(&lab, net));
            if *net == "vx" {
                // DeleteEndpoint and ReleaseAddress come before `docker run --rm` returns.
                in_plugin.push(plugin_time(&vm2).await.saturating_sub(before));
            }
        }
    }
    let mut summaries: Vec<Summary> = cases
        .iter()
        .zip(&samples)
        .map(|((label, _), s)| Summary::of(&format!("docker run --rm {label}"), s))
        .collect();
    let plugin = Summary::of(
        "vxnet plugin: its calls' time per docker run --rm --net vxnet",
        &in_plugin,
    );
    let ratios = vec![
        Ratio::of(&summaries[1], &summaries[0]),
        Ratio::of(&summaries[2], &summaries[0]),
        Ratio::of(&summaries[1], &summaries[2]),
        added(&summaries[1], &summaries[0], &summaries[2]),
        added(&summaries[1], &summaries[3], &summaries[2]),
        Ratio {
            case: plugin.case.clone(),
            baseline: format!("{} − {}", summaries[2].case, summaries[0].case),
            p50_ratio: plugin.p50_us / (summaries[2].p50_us - summaries[0].p50_us),
            p99_ratio: plugin.p99_us / (summaries[2].p99_us - summaries[0].p99_us),
        },
    ];
    summaries.push(plugin);
    summaries.extend(first);
    support::report(
        "docker",
        "docker run latency on vm2 (Docker 20.10 engines with --cluster-store on the lab's etcd)",
        summaries,
        ratios,
    );
}
