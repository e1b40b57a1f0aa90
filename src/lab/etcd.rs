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
    server_args_with(name, listen, advertise, data_dir, None)
}

/// TLS on etcd's client port (peers stay plain: a single member has none).
#[derive(Clone, Debug)]
pub struct EtcdServerTls {
    /// The CA that signed `cert` (etcdctl trusts it).
    pub ca: PathBuf,
    /// etcd's server certificate and key (`--cert-file`, `--key-file`).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `--client-cert-auth`: clients must present a certificate signed by `ca`.
    pub client_cert_auth: bool,
    /// The client certificate and key etcdctl presents (needed with `client_cert_auth`).
    pub etcdctl_cert: Option<(PathBuf, PathBuf)>,
}

/// [`server_args`], optionally serving clients over TLS.
pub fn server_args_with(
    name: &str,
    listen: &[Ipv4Addr],
    advertise: Ipv4Addr,
    data_dir: &Path,
    tls: Option<&EtcdServerTls>,
) -> Vec<std::ffi::OsString> {
    let member = Member {
        name: name.to_string(),
        client_port: CLIENT_PORT,
        peer_port: PEER_PORT,
    };
    let cluster = member.initial_cluster_entry(advertise);
    member.args_with(listen, advertise, &cluster, data_dir, tls)
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
        self.args_with(listen, advertise, initial_cluster, data_dir, None)
    }

    /// [`Member::args`], optionally serving clients over TLS (peers stay plain).
    pub fn args_with(
        &self,
        listen: &[Ipv4Addr],
        advertise: Ipv4Addr,
        initial_cluster: &str,
        data_dir: &Path,
        tls: Option<&EtcdServerTls>,
    ) -> Vec<std::ffi::OsString> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let listen_clients: Vec<String> = listen
            .iter()
            .map(|a| format!("{scheme}://{a}:{}", self.client_port))
            .collect();
        let client = format!("{scheme}://{advertise}:{}", self.client_port);
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
        .chain(tls.into_iter().flat_map(|t| {
            let mut args: Vec<std::ffi::OsString> = vec![
                "--cert-file".into(),
                t.cert.clone().into(),
                "--key-file".into(),
                t.key.clone().into(),
            ];
            if t.client_cert_auth {
                args.extend([
                    "--client-cert-auth".into(),
                    "--trusted-ca-file".into(),
                    t.ca.clone().into(),
                ]);
            }
            args
        }))
        .collect()
    }
}

/// A running single-member etcd, stopped by PID on drop.
#[derive(Debug)]
pub struct EtcdServer {
    process: ChildGuard,
    addr: Ipv4Addr,
    etcdctl: Option<PathBuf>,
    tls: Option<EtcdServerTls>,
    /// `USER:PASSWORD` etcdctl authenticates with, once auth is on.
    etcdctl_user: Option<String>,
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
        Self::start_with(ns, addr, dir, die_with_parent, None)
    }

    /// [`EtcdServer::start`], serving clients over TLS when `tls` is given.
    pub fn start_with(
        ns: &NetNs,
        addr: Ipv4Addr,
        dir: &Path,
        die_with_parent: bool,
        tls: Option<EtcdServerTls>,
    ) -> Result<Self, LabError> {
        let etcd = find_program("etcd").ok_or(LabError::MissingProgram {
            program: "etcd",
            package: "etcd-server",
        })?;
        std::fs::create_dir_all(dir).map_err(|e| LabError::io(dir, e))?;
        let mut cmd = Command::new(etcd);
        cmd.args(server_args_with(
            "etcd0",
            &[addr],
            addr,
            &dir.join("data"),
            tls.as_ref(),
        ));
        ns.command(&mut cmd).map_err(|e| LabError::io(dir, e))?;
        let log = dir.join("etcd.log");
        let process = ChildGuard::spawn("etcd", cmd, &log, die_with_parent)
            .map_err(|e| LabError::io(&log, e))?;
        let mut server = EtcdServer {
            process,
            addr,
            etcdctl: find_program("etcdctl"),
            tls,
            etcdctl_user: None,
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(format!("{scheme}://{}:{CLIENT_PORT}", self.addr));
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert").arg(&tls.ca);
            if let Some((cert, key)) = &tls.etcdctl_cert {
                cmd.arg("--cert").arg(cert).arg("--key").arg(key);
            }
        }
        if let Some(user) = &self.etcdctl_user {
            cmd.arg("--user").arg(user);
        }
        cmd.args(args);
        ns.command(&mut cmd)
            .map_err(|e| LabError::io(Path::new("etcdctl"), e))?;
        cmd.output()
            .map_err(|e| LabError::io(Path::new("etcdctl"), e))
    }

    /// Turns etcd's auth on with user `root` and `password` (root may do anything); etcdctl
    /// authenticates as root from then on.
    pub fn enable_auth(&mut self, ns: &NetNs, password: &str) -> Result<(), LabError> {
        enable_auth(|args| self.etcdctl(ns, args), password, &[])?;
        self.etcdctl_user = Some(format!("root:{password}"));
        Ok(())
    }

    pub fn stop(&mut self) {
        self.process.stop(Duration::from_secs(5));
    }
}

/// A user that may read and write one key prefix only.
#[derive(Clone, Debug)]
pub struct PrefixUser<'a> {
    pub name: &'a str,
    pub password: &'a str,
    pub prefix: &'a str,
}

/// Turns etcd's auth on through `etcdctl` (which runs etcdctl with these arguments, as
/// root-less client before and as whoever it likes after): user `root` with `root_password`,
/// then each of `users` with a role of its own granting read and write on its prefix only.
/// The users are made before `auth enable`, as etcd takes anonymous requests until then.
pub fn enable_auth(
    mut etcdctl: impl FnMut(&[&str]) -> Result<Output, LabError>,
    root_password: &str,
    users: &[PrefixUser<'_>],
) -> Result<(), LabError> {
    let root = format!("root:{root_password}");
    let mut steps: Vec<Vec<String>> = vec![vec!["user".into(), "add".into(), root]];
    for u in users {
        let role = u.name.to_string();
        steps.push(vec!["role".into(), "add".into(), role.clone()]);
        steps.push(vec![
            "role".into(),
            "grant-permission".into(),
            role.clone(),
            "readwrite".into(),
            u.prefix.into(),
            "--prefix=true".into(),
        ]);
        steps.push(vec![
            "user".into(),
            "add".into(),
            format!("{}:{}", u.name, u.password),
        ]);
        steps.push(vec![
            "user".into(),
            "grant-role".into(),
            u.name.into(),
            role,
        ]);
    }
    steps.push(vec!["auth".into(), "enable".into()]);
    for step in &steps {
        let args: Vec<&str> = step.iter().map(String::as_str).collect();
        let out = etcdctl(&args)?;
        if !out.status.success() {
            return Err(LabError::ProcessFailed {
                // The third word may be a password: only the subcommand is named.
                what: format!("etcdctl {}", args[..2].join(" ")),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
    }
    Ok(())
}
