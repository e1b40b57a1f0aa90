//! `vxnet lab demo`: the seed walk-through (shared/seed/), step by step, on a lab of three
//! hosts: etcd on vm1, daemons on vm2 and vm3, an overlay network, a container on each, their
//! interfaces, the sandbox namespace, and a ping across hosts. Each step runs the commands a
//! user would type on that host, prints them with their output, and checks the result; the
//! lab is removed at the end whatever happened.

use std::path::PathBuf;
use std::process::Output;

use super::{Lab, LabError, LabGuard, LabOptions};

struct Demo {
    lab: LabGuard,
    step: usize,
    total: usize,
    failed: usize,
}

impl Demo {
    fn step(&mut self, title: &str) {
        self.step += 1;
        println!("\n==> [{}/{}] {title}", self.step, self.total);
    }

    fn check(&mut self, ok: bool, what: &str) {
        if ok {
            println!("    ok: {what}");
        } else {
            println!("    FAILED: {what}");
            self.failed += 1;
        }
    }

    /// Runs `argv` on `host` as a user at its shell would, echoing prompt, command and output.
    fn sh(&mut self, host: &str, argv: &[&str]) -> Result<Output, LabError> {
        let out = self.quiet(host, argv)?;
        self.echo(host, argv, &out);
        Ok(out)
    }

    /// Runs `argv` on `host` without printing anything.
    fn quiet(&self, host: &str, argv: &[&str]) -> Result<Output, LabError> {
        let mut cmd = self.lab.host(host)?.command(argv[0])?;
        cmd.args(&argv[1..]);
        cmd.output()
            .map_err(|e| LabError::io(std::path::Path::new(argv[0]), e))
    }

    fn echo(&self, host: &str, argv: &[&str], out: &Output) {
        println!("root@{host}:~# {}", argv.join(" "));
        for stream in [&out.stdout, &out.stderr] {
            for line in String::from_utf8_lossy(stream).lines() {
                println!("    {line}");
            }
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the walk-through; `Ok(true)` when every step held.
pub async fn run(binary: PathBuf, name: Option<String>) -> Result<bool, LabError> {
    let name = name.unwrap_or_else(|| format!("demo-{}", std::process::id()));
    println!(
        "==> [1/10] the seed's three VMs as namespaces: vm1 runs etcd, vm2 and vm3 a vxnet daemon"
    );
    let lab = Lab::up(LabOptions::new(&name, binary)).await?;
    for h in lab.hosts() {
        println!("    {}  {}", h.name(), h.addr());
    }
    let mut d = Demo {
        lab: LabGuard::new(lab),
        step: 1,
        total: 10,
        failed: 0,
    };
    let result = walk(&mut d).await;
    let failed = d.failed;
    // Removing the lab is part of the demo: report it, and fail if anything stayed.
    let report = d.lab.down();
    match &report {
        Ok(r) => println!("\nlab {name} removed ({} process(es) stopped)", r.stopped),
        Err(e) => println!("\nlab {name} could not be removed completely: {e}"),
    }
    result?;
    let ok = failed == 0 && report.is_ok();
    println!(
        "{}",
        if ok {
            "vxnet lab demo: PASS (every step held; lab removed)".to_string()
        } else {
            format!("vxnet lab demo: FAIL ({failed} check(s) failed)")
        }
    );
    Ok(ok)
}

async fn walk(d: &mut Demo) -> Result<(), LabError> {
    d.step("vm1: etcd is healthy (the seed's `etcdctl cluster-health`)");
    let store = d.lab.cluster_store().replace("etcd://", "http://");
    let out = d.sh(
        "vm1",
        &["etcdctl", "--endpoints", &store, "endpoint", "health"],
    )?;
    d.check(
        out.status.success() && text(&out).contains("is healthy"),
        "etcd healthy",
    );

    d.step("vm2, vm3: the daemons run with --cluster-store and --cluster-advertise");
    for (host, addr) in [("vm2", "192.0.2.6"), ("vm3", "192.0.2.7")] {
        println!(
            "    ({host} runs: vxnet daemon --cluster-store {} --cluster-advertise {addr})",
            d.lab.cluster_store()
        );
    }
    // vm3 registered after vm2 did; give vm2's watch a moment to bring it in.
    let sees_both = |o: &Output| {
        text(o).contains("Registered:      yes") && text(o).contains("Nodes:           2")
    };
    let mut out = d.quiet("vm2", &["vxnet", "info"])?;
    for _ in 0..100 {
        if sees_both(&out) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        out = d.quiet("vm2", &["vxnet", "info"])?;
    }
    d.echo("vm2", &["vxnet", "info"], &out);
    d.check(
        sees_both(&out),
        "vm2's daemon is registered and sees both daemons",
    );

    d.step("vm2: create the overlay network");
    let out = d.sh(
        "vm2",
        &[
            "vxnet",
            "network",
            "create",
            "--driver",
            "overlay",
            "--subnet",
            "10.0.4.0/24",
            "my-net",
        ],
    )?;
    d.check(out.status.success(), "network created");

    d.step("vm3: the network arrived through etcd");
    let out = d.sh("vm3", &["vxnet", "network", "ls"])?;
    let listed = text(&out);
    d.check(
        listed.lines().any(|l| {
            l.split_whitespace()
                .collect::<Vec<_>>()
                .ends_with(&["my-net", "overlay", "global"])
        }),
        "my-net listed on vm3: driver overlay, scope global",
    );

    d.step("a container on vm3 and one on vm2, on my-net");
    let c3 = d.sh(
        "vm3",
        &[
            "vxnet", "run", "-d", "--name", "c3", "--net", "my-net", "--", "sleep", "3600",
        ],
    )?;
    let c2 = d.sh(
        "vm2",
        &[
            "vxnet", "run", "-d", "--name", "c2", "--net", "my-net", "--", "sleep", "3600",
        ],
    )?;
    d.check(
        c3.status.success() && c2.status.success(),
        "both containers running",
    );

    d.step("inside the vm2 container: eth0 on the overlay (MTU 1450), eth1 on the NAT'd gateway bridge");
    let out = d.sh("vm2", &["vxnet", "exec", "c2", "--", "ip", "addr"])?;
    let addr = text(&out);
    let block = |name: &str| {
        addr.lines()
            .skip_while(|l| !l.contains(&format!(": {name}@")))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (eth0, eth1) = (block("eth0"), block("eth1"));
    d.check(
        eth0.contains("mtu 1450")
            && eth0.contains("inet 10.0.4.")
            && eth0.contains("link/ether 02:42:0a:00:04:"),
        "eth0: 10.0.4.x/24, mtu 1450, MAC 02:42:0a:00:04:xx",
    );
    d.check(
        eth1.contains("mtu 1500")
            && eth1.contains("inet 172.18.")
            && eth1.contains("link/ether 02:42:ac:12:"),
        "eth1: 172.18.x.x/16, mtu 1500, MAC 02:42:ac:12:xx:xx",
    );
    let out = d.sh("vm2", &["vxnet", "exec", "c2", "--", "ip", "route"])?;
    d.check(
        text(&out).contains("default via 172.18.0.1 dev eth1"),
        "default route via eth1; the overlay subnet via eth0",
    );

    d.step("vm3: the overlay sandbox namespace (br0 + vxlan1 + one veth per container)");
    let out = d.sh("vm3", &["ls", "/run/vxnet/netns"])?;
    let sandbox = text(&out)
        .split_whitespace()
        .find(|n| n.starts_with("1-"))
        .map(str::to_string);
    d.check(
        sandbox.is_some(),
        "a 1-<network id> sandbox next to the container's namespace",
    );
    if let Some(sb) = sandbox {
        let ns = format!("--net=/run/vxnet/netns/{sb}");
        let out = d.sh("vm3", &["nsenter", &ns, "ip", "-br", "addr"])?;
        let links = text(&out);
        d.check(
            links.contains("br0") && links.contains("10.0.4.1/24") && links.contains("vxlan1"),
            "br0 holds the gateway 10.0.4.1/24; vxlan1 is there",
        );
        let out = d.sh("vm3", &["nsenter", &ns, "bridge", "link"])?;
        let ports = text(&out);
        d.check(
            ports.contains("vxlan1") && ports.contains("master br0") && ports.contains("veth"),
            "vxlan1 and the container's veth are ports of br0",
        );
    }

    d.step("vm2's container pings vm3's container over VXLAN");
    let out = d.sh("vm3", &["vxnet", "ps"])?;
    let target = text(&out)
        .split(|c: char| c.is_whitespace() || c == ',')
        .find_map(|w| w.strip_prefix("my-net:").map(str::to_string));
    match target {
        Some(ip) => {
            let out = d.sh(
                "vm2",
                &[
                    "vxnet", "exec", "c2", "--", "ping", "-c", "3", "-W", "2", &ip,
                ],
            )?;
            d.check(
                out.status.success() && text(&out).contains(" 0% packet loss"),
                &format!("ping c2 -> c3 ({ip}): 0% packet loss"),
            );
            // What the seed's users expected: the name, from vxnet's name server.
            let out = d.sh(
                "vm2",
                &[
                    "vxnet", "exec", "c2", "--", "ping", "-c", "1", "-W", "2", "c3",
                ],
            )?;
            d.check(
                out.status.success() && text(&out).contains(&format!("({ip})")),
                &format!("ping c3 by name from c2: c3 resolves to {ip} and answers"),
            );
        }
        None => d.check(false, "c3's address shown by `vxnet ps` on vm3"),
    }
    let out = d.sh(
        "vm2",
        &[
            "vxnet",
            "exec",
            "c2",
            "--",
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "203.0.113.1",
        ],
    )?;
    d.check(
        out.status.success(),
        "c2 reaches the outside (203.0.113.1) through eth1 and NAT",
    );

    d.step("clean up: containers stopped, network removed");
    let a = d.sh("vm2", &["vxnet", "rm", "-f", "c2"])?;
    let b = d.sh("vm3", &["vxnet", "rm", "-f", "c3"])?;
    let c = d.sh("vm2", &["vxnet", "network", "rm", "my-net"])?;
    d.check(
        a.status.success() && b.status.success() && c.status.success(),
        "containers and network removed",
    );
    Ok(())
}
