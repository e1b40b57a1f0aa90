//! The store connection secured: TLS with client certificates (`--cluster-store-opt kv.*`) and
//! etcd's user/password auth (`--etcd-user`), against a real etcd in the LocalCluster's private
//! namespace. Certificates are made per test with the `openssl` CLI.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vxnet::api::types::Info;
use vxnet::cluster::NetworkCreate;
use vxnet::lab::etcd::EtcdServerTls;
use vxnet::lab::process::ScratchDir;
use vxnet::lab::{DaemonProcess, LocalCluster, LocalClusterOptions};

/// A CA, etcd's server certificate (SAN IP 127.0.0.1) and a client certificate signed by it,
/// plus an unrelated CA.
struct Pki {
    dir: ScratchDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl not found: apt-get install openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

fn make_cert(dir: &Path, ca: &str, name: &str, ext: &str) {
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

impl Pki {
    fn new() -> Pki {
        let dir = ScratchDir::new("vxnet-pki").unwrap();
        let d = dir.path();
        make_ca(d, "ca");
        make_ca(d, "other-ca");
        make_cert(
            d,
            "ca",
            "server",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
        );
        make_cert(
            d,
            "ca",
            "client",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        );
        Pki { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// etcd serving TLS with this PKI's server certificate, requiring client certificates.
    fn etcd_tls(&self) -> EtcdServerTls {
        EtcdServerTls {
            ca: self.path("ca.pem"),
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_cert_auth: true,
            etcdctl_cert: Some((self.path("client.pem"), self.path("client.key"))),
        }
    }

    /// `--cluster-store-opt` arguments: the CA given, and the client certificate if `cert`.
    fn store_opts(&self, ca: &str, cert: bool) -> Vec<String> {
        let mut opts = vec![format!("kv.cacertfile={}", self.path(ca).display())];
        if cert {
            opts.push(format!("kv.certfile={}", self.path("client.pem").display()));
            opts.push(format!("kv.keyfile={}", self.path("client.key").display()));
        }
        opts.into_iter()
            .flat_map(|o| ["--cluster-store-opt".to_string(), o])
            .collect()
    }
}

fn net(name: &str, subnet: &str) -> NetworkCreate {
    NetworkCreate {
        name: name.into(),
        subnet: Some(subnet.parse().unwrap()),
        ..Default::default()
    }
}

/// Creates a network on daemon 0 and waits (up to 10 s) until daemon 1 lists it.
async fn create_on_0_visible_on_1(c: &LocalCluster) {
    let created = c
        .client(0)
        .network_create(&net("secure", "10.0.9.0/24"))
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let nets = c.client(1).network_ls().await.unwrap();
        if nets.iter().any(|n| n.id == created.id) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never visible");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts one more daemon (index `i`) with `extra_args`/`env` instead of the cluster's, which
/// is expected not to get through to etcd: waits until its `vxnet info` reports a store error
/// and returns that info. The daemon must still be running and serving its API.
async fn failing_daemon(
    c: &LocalCluster,
    i: usize,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
) -> (DaemonProcess, Info) {
    let mut spec = c.daemon_spec(i);
    spec.extra_args = extra_args;
    spec.env = env;
    let mut d = DaemonProcess::spawn(&c.ns, &spec).unwrap();
    let started = Instant::now();
    let info = loop {
        if let Some(status) = d.process().exited() {
            let log = d.process().log_tail(15);
            panic!("daemon {} exited with {status}: {log}", d.name);
        }
        if let Ok(info) = d.client().info().await {
            if info.store_error.is_some() {
                break info;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no store error reported: {}",
            d.process().log_tail(15)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!info.registered);
    // Still alive and serving: requests needing the store get a clear "not synced" answer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(d.process().exited().is_none(), "daemon stopped");
    let err = d.client().network_ls().await.unwrap_err().to_string();
    assert!(err.contains("not synced"), "{err}");
    (d, info)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_with_client_certificates_share_networks_over_tls() {
    let pki = Pki::new();
    let mut opts = LocalClusterOptions::new(2, common::binary());
    opts.etcd_tls = Some(pki.etcd_tls());
    opts.daemon_args = pki.store_opts("ca.pem", true);
    let c = common::cluster_with(opts).await;
    let info = c.client(0).info().await.unwrap();
    assert!(
        info.cluster_store.contains("(TLS)"),
        "{}",
        info.cluster_store
    );
    assert_eq!(info.store_error, None);
    create_on_0_visible_on_1(&c).await;
    // An independent client (etcdctl with the client certificate) sees the keys.
    assert!(c
        .store_keys()
        .unwrap()
        .iter()
        .any(|k| k.contains("networks/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_without_an_accepted_client_certificate_says_so_and_keeps_serving() {
    let pki = Pki::new();
    let mut opts = LocalClusterOptions::new(1, common::binary());
    opts.etcd_tls = Some(pki.etcd_tls());
    opts.daemon_args = pki.store_opts("ca.pem", true);
    let c = common::cluster_with(opts).await;

    // The right CA but no client certificate: etcd refuses the handshake.
    let (d, info) = failing_daemon(&c, 1, pki.store_opts("ca.pem", false), vec![]).await;
    let e = info.store_error.unwrap();
    eprintln!("without a client certificate: {e}");
    assert!(
        e.contains("TLS handshake with etcd://127.0.0.1:2379 failed"),
        "{e}"
    );
    assert!(e.contains("requires a client certificate"), "{e}");
    assert!(e.contains("kv.certfile"), "{e}");
    drop(d);

    // A CA that did not sign etcd's certificate.
    let (d, info) = failing_daemon(&c, 2, pki.store_opts("other-ca.pem", true), vec![]).await;
    let e = info.store_error.unwrap();
    eprintln!("with the wrong CA: {e}");
    assert!(e.contains("not trusted"), "{e}");
    assert!(e.contains("kv.cacertfile"), "{e}");
    drop(d);

    // No TLS at all against a TLS etcd.
    let (d, info) = failing_daemon(&c, 3, vec![], vec![]).await;
    eprintln!("plain HTTP against TLS: {}", info.store_error.unwrap());
    drop(d);

    // The good daemon was never disturbed.
    let info = c.client(0).info().await.unwrap();
    assert!(info.synced && info.store_error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_user_auth_right_password_works_wrong_one_is_named() {
    let mut opts = LocalClusterOptions::new(2, common::binary());
    opts.etcd_root_password = Some("s3cret-pw".into());
    // Through the environment, as an operator should (not visible in `ps`).
    opts.daemon_env = vec![("VXNET_ETCD_USER".into(), "root:s3cret-pw".into())];
    let c = common::cluster_with(opts).await;
    create_on_0_visible_on_1(&c).await;

    let (mut d, info) = failing_daemon(
        &c,
        2,
        vec![
            "--etcd-user".into(),
            "root:wrong".into(),
            "--log-format".into(),
            "json".into(),
        ],
        vec![],
    )
    .await;
    let e = info.store_error.unwrap();
    eprintln!("wrong password: {e}");
    assert!(
        e.contains("rejected the credentials for user \"root\""),
        "{e}"
    );
    assert!(!e.contains("wrong"), "the password must not be shown: {e}");
    // Its log is JSON, a line per event, and names the refusal without the password.
    let log = d.process().log_tail(10_000);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().any(|l| l["level"] == "WARN"), "{log}");
    assert!(
        !log.contains("wrong"),
        "the password must not be logged: {log}"
    );
    drop(d);

    let (_d, info) = failing_daemon(&c, 3, vec![], vec![]).await;
    let e = info.store_error.unwrap();
    eprintln!("no user: {e}");
    assert!(e.contains("requires authentication"), "{e}");
    assert!(e.contains("--etcd-user"), "{e}");
}

#[test]
fn bad_store_options_stop_the_daemon_at_startup_with_the_key_and_path() {
    let dir = ScratchDir::new("vxnet-badopts").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(common::binary())
            .args([
                "daemon",
                "--cluster-store",
                "etcd://127.0.0.1:1",
                "--cluster-advertise",
                "127.0.0.1",
                "--node-name",
                "t",
            ])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .arg("--socket")
            .arg(dir.path().join("vxnet.sock"))
            .args(args)
            .env_remove("VXNET_ETCD_USER")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--cluster-store-opt", "kv.bogus=1"]);
    assert!(e.contains("unknown key \"kv.bogus\""), "{e}");
    let e = run(&["--cluster-store-opt", "kv.cacertfile=/nonexistent/ca.pem"]);
    assert!(
        e.contains("kv.cacertfile") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
    let e = run(&["--etcd-user", "no-colon"]);
    assert!(e.contains("USER:PASSWORD"), "{e}");
}
