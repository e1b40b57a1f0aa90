//! Shared set-up for the end-to-end tests: a real etcd and real daemons in a private
//! network namespace (see `vxnet::lab::LocalCluster`), gone when the test ends.
#![allow(dead_code)]

pub mod cni;
pub mod dns;

use std::path::PathBuf;

use vxnet::lab::{LocalCluster, LocalClusterOptions};

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vxnet"))
}

pub async fn cluster(daemons: usize) -> LocalCluster {
    cluster_with(LocalClusterOptions::new(daemons, binary())).await
}

pub async fn cluster_with(opts: LocalClusterOptions) -> LocalCluster {
    match LocalCluster::start(opts).await {
        Ok(c) => c,
        Err(e) => panic!("cannot start the test cluster: {e}"),
    }
}

use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};

use vxnet::lab::{Lab, LabGuard, LabOptions};

/// A lab of the seed's hosts for one test: unique name, removed when dropped (even when the
/// test fails).
pub struct TestLab {
    pub lab: LabGuard,
}

static LABS: AtomicUsize = AtomicUsize::new(0);

impl TestLab {
    pub async fn up(hosts: usize) -> TestLab {
        Self::up_with(hosts, |_| {}).await
    }

    /// A lab of `hosts` hosts with other options changed by `tweak` (name and binary are set).
    pub async fn up_with(hosts: usize, tweak: impl FnOnce(&mut LabOptions)) -> TestLab {
        let name = format!(
            "t{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let mut opts = LabOptions::new(&name, binary());
        opts.hosts = hosts;
        tweak(&mut opts);
        match Lab::up(opts).await {
            Ok(lab) => TestLab {
                lab: LabGuard::new(lab),
            },
            Err(e) => panic!("cannot start lab {name}: {e}"),
        }
    }

    /// Runs a program on a lab host (its namespaces; `vxnet` on PATH, VXNET_HOST set).
    pub fn sh(&self, host: &str, argv: &[&str]) -> Output {
        let mut cmd = self.lab.host(host).unwrap().command(argv[0]).unwrap();
        cmd.args(&argv[1..]);
        cmd.output().unwrap()
    }

    /// `etcdctl ARGS` on vm1 against the lab's etcd, asserting success; returns stdout.
    /// Records written this way come from "anyone who reached etcd", not from a daemon.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let store = self.lab.cluster_store().replace("etcd://", "http://");
        let mut argv = vec!["etcdctl", "--endpoints", &store];
        argv.extend_from_slice(args);
        let out = self.sh("vm1", &argv);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Puts `value` at `key` straight into the lab's etcd (see `etcdctl`).
    pub fn etcd_put(&self, key: &str, value: &str) {
        self.etcdctl(&["put", key, value]);
    }

    /// `vxnet ARGS` on a host, asserting success; returns stdout.
    pub fn vx(&self, host: &str, args: &[&str]) -> String {
        let mut argv = vec!["vxnet"];
        argv.extend_from_slice(args);
        let out = self.sh(host, &argv);
        assert!(
            out.status.success(),
            "vxnet {args:?} on {host} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `vxnet ARGS` on a host, asserting failure; returns stderr.
    pub fn vx_err(&self, host: &str, args: &[&str]) -> String {
        let mut argv = vec!["vxnet"];
        argv.extend_from_slice(args);
        let out = self.sh(host, &argv);
        assert!(
            !out.status.success(),
            "vxnet {args:?} on {host} should have failed"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Creates a network on vm2 and waits until every daemon host lists it.
    pub fn network(&self, name: &str, subnet: &str) -> String {
        let id = self
            .vx("vm2", &["network", "create", "--subnet", subnet, name])
            .trim()
            .to_string();
        for h in self.lab.hosts().iter().skip(1) {
            wait_until(|| {
                self.vx(h.name(), &["network", "ls", "-q", "--no-trunc"])
                    .contains(&id)
            });
        }
        id
    }

    /// Starts a detached container running `sleep`; returns its overlay address.
    pub fn container(&self, host: &str, name: &str, net: &str) -> String {
        self.vx(
            host,
            &[
                "run", "-d", "--name", name, "--net", net, "--", "sleep", "3600",
            ],
        );
        self.overlay_ip(host, name)
    }

    /// Container `name` on `host` as `vxnet ps --format json` shows it.
    pub fn ps_entry(&self, host: &str, name: &str) -> serde_json::Value {
        let ps = self.vx(host, &["ps", "--format", "json"]);
        let v: serde_json::Value = serde_json::from_str(&ps).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} not running on {host}: {ps}"))
            .clone()
    }

    /// The address of container `name`'s first overlay interface.
    pub fn overlay_ip(&self, host: &str, name: &str) -> String {
        self.ps_entry(host, name)["attachments"][0]["ip"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Whether container `name` on `host` gets a reply from `ip`.
    pub fn pings(&self, host: &str, name: &str, ip: &str) -> bool {
        self.sh(
            host,
            &[
                "vxnet", "exec", name, "--", "ping", "-c", "1", "-W", "2", ip,
            ],
        )
        .status
        .success()
    }

    /// Runs `argv` inside a network's sandbox namespace on a host (iproute2 as the oracle).
    pub fn in_sandbox(&self, host: &str, network_id: &str, argv: &[&str]) -> String {
        let ns = format!("--net=/run/vxnet/netns/1-{}", &network_id[..10]);
        let mut full = vec!["nsenter", ns.as_str()];
        full.extend_from_slice(argv);
        let out = self.sh(host, &full);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Polls `f` every 20 ms for up to 30 s; panics if it never holds. (A bound against hangs,
/// not a timing assertion: generous, as the suite runs tests two at a time on two cores,
/// and a daemon restarted while the CNI runtimes' tests run was seen to need over 10 s.)
pub fn wait_until(mut f: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !f() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "condition never held"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl TestLab {
    /// A container's network namespace, opened from outside its host (through the host's
    /// root: the namespace file lives in the host's private /run).
    pub fn container_ns(&self, host: &str, name: &str) -> vxnet::netns::NetNs {
        let c = self.ps_entry(host, name);
        let path = format!(
            "/proc/{}/root{}",
            self.lab.host(host).unwrap().init_pid(),
            c["netns"].as_str().unwrap()
        );
        vxnet::netns::NetNs::open(std::path::Path::new(&path)).unwrap()
    }
}

/// Connects from inside `ns` to `to` and returns what the server sent, or the error.
pub fn tcp_fetch(ns: &vxnet::netns::NetNs, to: std::net::SocketAddr) -> std::io::Result<String> {
    use std::io::Read;
    ns.run(move || {
        let mut s = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

/// A one-connection TCP server inside `ns`, on its own thread: answers the peer's address.
/// Returns once listening; join the handle for the peer address it saw.
pub fn tcp_echo_peer(
    ns: &vxnet::netns::NetNs,
    bind: std::net::SocketAddr,
) -> std::thread::JoinHandle<std::io::Result<std::net::SocketAddr>> {
    use std::io::Write;
    use std::os::fd::AsFd;
    let listener = ns
        .run(move || std::net::TcpListener::bind(bind))
        .unwrap_or_else(|e| panic!("cannot listen on {bind}: {e}"));
    let _ = ns.as_fd();
    std::thread::spawn(move || {
        listener.set_nonblocking(false)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        listener.set_nonblocking(true)?;
        loop {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    s.set_nonblocking(false)?;
                    writeln!(s, "{peer}")?;
                    return Ok(peer);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no connection",
                        ));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
    })
}

impl TestLab {
    /// `docker ARGS` on a host, against that host's own dockerd.
    pub fn docker(&self, host: &str, args: &[&str]) -> Output {
        let mut cmd = self.lab.host(host).unwrap().docker().unwrap();
        cmd.args(args);
        cmd.output().unwrap()
    }

    /// `docker ARGS` on a host, asserting success; returns stdout, trimmed.
    pub fn docker_ok(&self, host: &str, args: &[&str]) -> String {
        let out = self.docker(host, args);
        assert!(
            out.status.success(),
            "docker {args:?} on {host} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Starts dockerd on `hosts` (at once) and imports the test image into each.
    pub async fn start_docker(&self, hosts: &[&str], opts: &vxnet::lab::DockerOptions) {
        let started =
            futures::future::join_all(hosts.iter().map(|h| self.lab.start_docker(h, opts))).await;
        for (h, r) in hosts.iter().zip(started) {
            if let Err(e) = r {
                panic!("dockerd on {h}: {e}");
            }
        }
        for h in hosts {
            if let Err(e) = self.lab.import_test_image(h) {
                panic!("test image on {h}: {e}");
            }
        }
    }
}

/// The root network namespace's links ("index: name"), read with `ip -o link` (read-only):
/// the tests compare it before and after to show the lab added nothing there.
pub fn root_links() -> std::collections::BTreeSet<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split(": ");
            Some(format!("{}: {}", f.next()?, f.next()?))
        })
        .collect()
}
