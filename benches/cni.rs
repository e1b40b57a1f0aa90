//! CNI runtimes on a lab host (run with `cargo bench --bench cni`; needs root and Debian's
//! containerd, podman and containernetworking-plugins): on vm2, per runtime,
//!
//! - no network (`ctr run --rm` without `--cni`; `podman run --rm --network none`): the
//!   container start itself, the baseline;
//! - the vxnet plugin (`"type": "vxnet"`, a cluster-wide address from the daemon);
//! - the reference `bridge` + `host-local` conflist (single host, host-local addresses): the
//!   floor for a CNI main plugin.
//!
//! The issue's target is on what each network adds over none: vxnet's addition at most 1.2×
//! the bridge plugin's. Besides the runtimes, the plugins' own time: `vxnet-cni` ADD and DEL,
//! and `bridge` (with `host-local`) ADD and DEL, each invoked as a runtime does (a fresh
//! process, CNI_* in its environment, the config on stdin) on a fresh namespace. Cases are
//! interleaved run by run so that noise on this shared machine hits them alike.

#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Ratio, Summary};
use vxnet::lab::{Lab, LabGuard, LabOptions, TEST_IMAGE};

const VXNET: &str =
    r#"{"cniVersion":"1.0.0","name":"vx","plugins":[{"type":"vxnet","network":"vx"}]}"#;
const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"br","plugins":[{"type":"bridge","bridge":"cnibr0","isGateway":true,"ipMasq":false,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/16"}]],"routes":[{"dst":"0.0.0.0/0"}]}}]}"#;

fn main() {
    support::block_on(bench());
}

fn must(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn timed(mut cmd: Command, what: &str) -> Duration {
    let started = Instant::now();
    must(&mut cmd, what);
    started.elapsed()
}

/// One plugin invocation as a runtime makes it; its wall time.
fn invoke(lab: &Lab, program: &str, env: &[(&str, &str)], conf: &str) -> Duration {
    let mut cmd = lab
        .host("vm2")
        .expect("vm2")
        .command(program)
        .expect("command");
    cmd.envs(env.iter().copied())
        .env("CNI_PATH", "/opt/cni/bin:/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("plugin starts");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf.as_bytes()).expect("stdin");
    }
    let out = child.wait_with_output().expect("plugin ends");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{program} {env:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    took
}

/// A single plugin's conf as the runtime derives it from a one-plugin conflist.
fn plugin_conf(conflist: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(conflist).expect("conflist");
    let mut p = v["plugins"][0].clone();
    p["cniVersion"] = v["cniVersion"].clone();
    p["name"] = v["name"].clone();
    p.to_string()
}

async fn bench() {
    // More runs than most benches: what a network adds is a difference of two noisy
    // 100–200 ms figures.
    let runs = support::runs(30);
    let name = format!("bench-cni-{}", std::process::id());
    let mut opts = LabOptions::new(&name, std::path::PathBuf::from(env!("CARGO_BIN_EXE_vxnet")));
    opts.hosts = 3;
    let lab = LabGuard::new(
        Lab::up(opts)
            .await
            .unwrap_or_else(|e| panic!("cannot start the bench lab: {e}")),
    );
    let vm2 = lab.host("vm2").expect("vm2");
    must(
        vm2.command("vxnet").expect("vxnet").args([
            "network",
            "create",
            "--subnet",
            "10.9.0.0/16",
            "vx",
        ]),
        "network create",
    );
    // A container that stays on vx on vm2, so that the measured runs are the steady state
    // (the first container of a network on a host builds its sandbox; the bridge plugin's
    // bridge likewise stays once made).
    must(
        vm2.command("vxnet").expect("vxnet").args([
            "run", "-d", "--name", "anchor", "--net", "vx", "--", "sleep", "3600",
        ]),
        "anchor container",
    );
    let plugin = Path::new(env!("CARGO_BIN_EXE_vxnet-cni"));
    lab.start_containerd("vm2").await.expect("containerd");
    lab.import_podman_image("vm2").expect("podman image");
    // Both conflists for Podman (chosen by name); ctr takes the first file by name, so its
    // cases reinstall the one they need (outside the timed part).
    let both = [("10-vx.conflist", VXNET), ("20-br.conflist", BRIDGE)];
    let only_br = [("10-br.conflist", BRIDGE)];
    let install = |confs: &[(&str, &str)]| {
        lab.install_cni("vm2", &[("vxnet", plugin)], confs)
            .expect("install CNI")
    };
    install(&both);

    let mut seq = 0usize;
    let mut ctr_case = |case: usize| -> Duration {
        seq += 1;
        let id = format!("b{seq}");
        let cmd = match case {
            0 => lab
                .ctr_run_without_network("vm2", &id, &["--rm"], &["true"])
                .expect("ctr run"),
            1 => {
                install(&both);
                lab.ctr_run("vm2", &id, &["--rm"], &["true"])
                    .expect("ctr run")
            }
            _ => {
                install(&only_br);
                lab.ctr_run("vm2", &id, &["--rm"], &["true"])
                    .expect("ctr run")
            }
        };
        timed(cmd, "ctr run --rm")
    };
    let podman_case = |net: &str| -> Duration {
        let mut cmd = vm2.podman_run().expect("podman");
        cmd.args(["--rm", "--network", net, TEST_IMAGE, "true"]);
        timed(cmd, "podman run --rm")
    };
    // Each first run builds what later runs reuse (vxnet's sandbox, the bridge).
    for case in 0..3 {
        ctr_case(case);
    }
    install(&both);
    for net in ["none", "vx", "br"] {
        podman_case(net);
    }

    let ctr_labels = [
        "ctr run --rm (no --cni)",
        "ctr run --rm --cni: vxnet",
        "ctr run --rm --cni: bridge + host-local",
    ];
    let podman_nets = [
        ("none", "podman run --rm --network none"),
        ("vx", "podman run --rm: vxnet"),
        ("br", "podman run --rm: bridge + host-local"),
    ];
    let mut ctr_samples: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    let mut podman_samples: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    let mut plugin_samples: Vec<Vec<Duration>> = vec![Vec::new(); 4];
    let vx_conf = plugin_conf(VXNET);
    let br_conf = plugin_conf(BRIDGE);
    for i in 0..runs {
        for (case, s) in ctr_samples.iter_mut().enumerate() {
            s.push(ctr_case(case));
        }
        install(&both);
        for (k, (net, _)) in podman_nets.iter().enumerate() {
            podman_samples[k].push(podman_case(net));
        }
        // The plugins alone, on a fresh namespace each.
        for (k, (program, conf)) in [("vxnet-cni", &vx_conf), ("/usr/lib/cni/bridge", &br_conf)]
            .into_iter()
            .enumerate()
        {
            let ns = format!("bcni{i}x{k}");
            must(
                vm2.command("ip").expect("ip").args(["netns", "add", &ns]),
                "ip netns add",
            );
            let path = format!("/run/netns/{ns}");
            let id = format!("p{i}x{k}");
            let env = |cmd: &'static str| {
                [
                    ("CNI_COMMAND", cmd),
                    ("CNI_CONTAINERID", id.as_str()),
                    ("CNI_NETNS", path.as_str()),
                    ("CNI_IFNAME", "eth0"),
                ]
            };
            plugin_samples[2 * k].push(invoke(&lab, program, &env("ADD"), conf));
            plugin_samples[2 * k + 1].push(invoke(&lab, program, &env("DEL"), conf));
            must(
                vm2.command("ip").expect("ip").args(["netns", "del", &ns]),
                "ip netns del",
            );
        }
    }

    let mut summaries: Vec<Summary> = ctr_labels
        .iter()
        .zip(&ctr_samples)
        .map(|(l, s)| Summary::of(l, s))
        .chain(
            podman_nets
                .iter()
                .zip(&podman_samples)
                .map(|((_, l), s)| Summary::of(l, s)),
        )
        .collect();
    let plugin_labels = [
        "vxnet-cni ADD (cluster-wide address, eth0 + vxgw0)",
        "vxnet-cni DEL",
        "bridge + host-local ADD",
        "bridge + host-local DEL",
    ];
    summaries.extend(
        plugin_labels
            .iter()
            .zip(&plugin_samples)
            .map(|(l, s)| Summary::of(l, s)),
    );
    // What each network adds over none, vxnet's against the bridge plugin's.
    let added = |vx: &Summary, br: &Summary, none: &Summary| Ratio {
        case: format!("{} − {}", vx.case, none.case),
        baseline: format!("{} − {}", br.case, none.case),
        p50_ratio: (vx.p50_us - none.p50_us) / (br.p50_us - none.p50_us),
        p99_ratio: (vx.p99_us - none.p99_us) / (br.p99_us - none.p99_us),
    };
    let ratios = vec![
        added(&summaries[1], &summaries[2], &summaries[0]),
        added(&summaries[4], &summaries[5], &summaries[3]),
        Ratio::of(&summaries[6], &summaries[8]),
        Ratio::of(&summaries[7], &summaries[9]),
    ];
    support::report(
        "cni",
        "CNI runtimes on vm2: containerd 1.6 (ctr) and Podman 4.3 with vxnet's plugin against the reference bridge plugin",
        summaries,
        ratios,
    );
}
