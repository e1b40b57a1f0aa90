//! `vxnet lab up --secure-store`: etcd on vm1 over TLS with client certificates and etcd's
//! auth, the daemons logged in as a user limited to the store prefix — the production setting
//! of docs/security.md, in the lab. Oracles: `vxnet info`, pings, and etcdctl from vm2.
//!
//! Each refused case prints `HOSTILE|<case>|<outcome>` once its assertions held.

mod common;

use common::{wait_until, TestLab};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_store_lab_works_and_refuses_clients_without_certificate_or_password() {
    let lab = TestLab::up_with(3, |o| o.secure_store = true).await;
    for host in ["vm2", "vm3"] {
        let info: serde_json::Value =
            serde_json::from_str(&lab.vx(host, &["info", "--format", "json"])).unwrap();
        assert_eq!(info["registered"], true, "{info}");
        assert!(
            info["cluster_store"].as_str().unwrap().ends_with("(TLS)"),
            "{info}"
        );
    }
    lab.network("sec", "10.0.61.0/24");
    let c3 = lab.container("vm3", "c3", "sec");
    lab.container("vm2", "c2", "sec");
    wait_until(|| lab.pings("vm2", "c2", &c3));

    let pki = "/var/lib/vxnet/pki";
    let (ca, cert, key) = (
        format!("{pki}/ca.pem"),
        format!("{pki}/vm2.pem"),
        format!("{pki}/vm2-key.pem"),
    );
    let password = std::fs::read_to_string(lab.lab.dir().join("pki/vxnet.password"))
        .unwrap()
        .trim()
        .to_string();
    let etcdctl = |extra: &[&str]| {
        let mut argv = vec!["etcdctl", "--dial-timeout", "2s", "--command-timeout", "3s"];
        argv.extend_from_slice(extra);
        argv.extend_from_slice(&["get", "/vxnet/", "--prefix", "--keys-only"]);
        lab.sh("vm2", &argv)
    };
    let https = "--endpoints=https://192.0.2.5:2379";
    let good_user = format!("--user=vxnet:{password}");
    let (cacert, certf, keyf) = (
        format!("--cacert={ca}"),
        format!("--cert={cert}"),
        format!("--key={key}"),
    );
    // The positive control: certificate and password.
    let ok = etcdctl(&[https, &cacert, &certf, &keyf, &good_user]);
    assert!(
        ok.status.success() && String::from_utf8_lossy(&ok.stdout).contains("/vxnet/networks/"),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let plain = etcdctl(&["--endpoints=http://192.0.2.5:2379"]);
    assert!(!plain.status.success(), "plain HTTP was served");
    println!("HOSTILE|secure store: a plain-HTTP client of etcd|refused");
    let no_cert = etcdctl(&[https, &cacert, &good_user]);
    assert!(
        !no_cert.status.success(),
        "no client certificate was accepted"
    );
    println!("HOSTILE|secure store: a TLS client without a client certificate|refused");
    let bad_pw = etcdctl(&[https, &cacert, &certf, &keyf, "--user=vxnet:wrong"]);
    assert!(!bad_pw.status.success(), "a wrong password was accepted");
    println!("HOSTILE|secure store: a client certificate with a wrong password|refused");
    let no_user = etcdctl(&[https, &cacert, &certf, &keyf]);
    assert!(
        !no_user.status.success() || String::from_utf8_lossy(&no_user.stdout).trim().is_empty(),
        "a certificate alone read the keys"
    );
    println!("HOSTILE|secure store: a client certificate without a user|reads nothing");
}
