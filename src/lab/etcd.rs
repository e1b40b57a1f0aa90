//! An etcd server started from the installed `etcd` binary inside a lab namespace.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::process::ChildGuard;
use super::LabError;
use crate::netns::NetNs;

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;

/// Finds a program on PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The arguments of a single-member etcd named `name`: clients on port 2379 of every address
/// in `listen` (advertised on `advertise`), peers on `advertise`:2380, data in `data_dir`.
pub fn server_args(
    name: &str,
    listen: &[Ipv4Addr],
    advertise: Ipv4Addr,
    data_dir: &Path,
) -> Vec<std::ffi::OsString> {
    let member = Member {
        name: name.to_string(),
        client_port: CLIENT_PORT,
        peer_port: PEER_PORT,
    };
    let cluster = member.initial_cluster_entry(advertise);
    member.args(listen, advertise, &cluster, data_dir)
}

/// One member of an etcd cluster whose members share one address (the lab's vm1), told
/// apart by their ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
}

impl Member {
    /// `NAME=http://ADDR:PEER`, one entry of `--initial-cluster`.
    pub fn initial_cluster_entry(&self, advertise: Ipv4Addr) -> String {
        format!("{}=http://{advertise}:{}", self.name, self.peer_port)
    }

    /// The member's arguments: clients on its client port of every address in `listen`
    /// (advertised on `advertise`), peers on `advertise`:its peer port, `initial_cluster`
    /// naming every member, data in `data_dir`.
    pub fn args(
        &self,
        listen: &[Ipv4Addr],
        advertise: Ipv4Addr,
        initial_cluster: &str,
        data_dir: &Path,
    ) -> Vec<std::ffi::OsString> {
        let listen_clients: Vec<String> = listen
            .iter()
            .map(|a| format!("http://{a}:{}", self.client_port))
            .collect();
        let client = format!("http://{advertise}:{}", self.client_port);
        let peer = format!("http://{advertise}:{}", self.peer_port);
        [
            "--name",
            &self.name,
            "--listen-client-urls",
            &listen_clients.join(","),
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            initial_cluster,
            "--initial-cluster-state",
            "new",
            // Docker 20.10's legacy cluster store speaks etcd's v2 API.
            "--enable-v2=true",
            "--data-dir",
        ]
        .iter()
        .map(|s| s.into())
        .chain(std::iter::once(data_dir.as_os_str().to_owned()))
        .collect()
    }
}

/// A running single-member etcd, stopped by PID on drop.
#[derive(Debug)]
pub struct EtcdServer {
    process: ChildGuard,
    addr: Ipv4Addr,
    etcdctl: Option<PathBuf>,
}

impl EtcdServer {
    /// Starts etcd listening on `addr` inside `ns`, with its data in `dir`, and waits until
    /// it accepts connections.
    pub fn start(
        ns: &NetNs,
        addr: Ipv4Addr,
        dir: &Path,
        die_with_parent: bool,
    ) -> Result<Self, LabError> {
        let etcd = find_program("etcd").ok_or(LabError::MissingProgram {
            program: "etcd",
            package: "etcd-server",
        })?;
        std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
        let mut cmd = Command::new(etcd);
        cmd.args(server_args("etcd0", &[addr], addr, &dir.join("data")));
        ns.command(&mut cmd).map_err(|e| LabError::io(dir, e))?;
        let log = dir.join("etcd.log");
        let process = ChildGuard::spawn("etcd", cmd, &log, die_with_parent)
            .map_err(|e| LabError::io(&log, e))?;
        let mut server = EtcdServer {
            process,
            addr,
            etcdctl: find_program("etcdctl"),
        };
        server.wait_ready(ns, Duration::from_secs(15))?;
        Ok(server)
    }

    fn wait_ready(&mut self, ns: &NetNs, limit: Duration) -> Result<(), LabError> {
        let started = Instant::now();
        let target = SocketAddr::from((self.addr, CLIENT_PORT));
        loop {
            if let Some(status) = self.process.exited() {
                return Err(LabError::ProcessFailed {
                    what: "etcd".into(),
                    detail: format!("exited with {status}:\n{}", self.process.log_tail(15)),
                });
            }
            let up = ns
                .run(|| TcpStream::connect_timeout(&target, Duration::from_millis(200)).map(|_| ()))
                .is_ok();
            if up {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(LabError::ProcessFailed {
                    what: "etcd".into(),
                    detail: format!(
                        "not accepting connections on {target} after {limit:?}:\n{}",
                        self.process.log_tail(15)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `etcd://ADDR:2379`, as daemons take it.
    pub fn cluster_store_url(&self) -> String {
        format!("etcd://{}:{CLIENT_PORT}", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Runs `etcdctl` (an independent client) against this server from inside `ns`.
    pub fn etcdctl(&self, ns: &NetNs, args: &[&str]) -> Result<Output, LabError> {
        let bin = self.etcdctl.clone().ok_or(LabError::MissingProgram {
            program: "etcdctl",
            package: "etcd-client",
        })?;
        let mut cmd = Command::new(bin);
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(format!("http://{}:{CLIENT_PORT}", self.addr))
            .args(args);
        ns.command(&mut cmd)
            .map_err(|e| LabError::io(Path::new("etcdctl"), e))?;
        cmd.output()
            .map_err(|e| LabError::io(Path::new("etcdctl"), e))
    }

    pub fn stop(&mut self) {
        self.process.stop(Duration::from_secs(5));
    }
}
