//! The API's trust boundaries: what a daemon may do to state that is not its own host's.

mod common;

use std::time::{Duration, Instant};

use hyper::StatusCode;
use vxnet::api::client::Client;
use vxnet::cluster::{EndpointCreate, NetworkCreate};

async fn wait_listed(client: &Client, name: &str) {
    let started = Instant::now();
    while !client
        .network_ls()
        .await
        .unwrap()
        .iter()
        .any(|n| n.name == name)
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_endpoint_delete_is_refused_unless_forced() {
    let c = common::cluster(2).await;
    c.client(0)
        .network_create(&NetworkCreate {
            name: "shared".into(),
            subnet: Some("10.0.7.0/24".parse().unwrap()),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_listed(&c.client(1), "shared").await;
    let theirs = c
        .client(1)
        .endpoint_create(
            "shared",
            &EndpointCreate {
                name: Some("theirs".into()),
                ip: None,
                aliases: Vec::new(),
            },
        )
        .await
        .unwrap();
    let owner = c.client(1).info().await.unwrap().node;

    let before = c.store_state().unwrap();
    let err = c
        .client(0)
        .endpoint_delete("shared", theirs.id.as_str())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&owner.name), "owner not named: {msg}");
    assert!(msg.contains("force=true"), "no way to force given: {msg}");
    assert_eq!(
        c.store_state().unwrap(),
        before,
        "a refused delete wrote something"
    );

    c.client(0)
        .endpoint_delete_opts("shared", theirs.id.as_str(), true)
        .await
        .unwrap();
    let keys = c.store_keys().unwrap();
    assert!(
        !keys.iter().any(|k| k.contains(theirs.id.as_str())),
        "forced delete left the endpoint: {keys:?}"
    );
    assert!(
        !keys
            .iter()
            .any(|k| k.ends_with(&format!("/{}", theirs.ip)) && k.contains("addr")),
        "forced delete left the address claim: {keys:?}"
    );
    println!("HOSTILE|foreign_endpoint_delete|refused 409 naming {}, forced delete removed endpoint and address", owner.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dir_is_0700_and_its_records_0600() {
    use std::os::unix::fs::PermissionsExt;
    let c = common::cluster(1).await;
    // Registered: the node ID and the lease file have been written by now.
    assert!(c.client(0).info().await.unwrap().registered);
    let state = c.daemon_spec(0).dir.join("state");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, "state dir {}", state.display());
    let mut records = Vec::new();
    let mut dirs = vec![state.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().is_some_and(|n| n != "daemon.lock") {
                records.push(p);
            }
        }
    }
    assert!(!records.is_empty(), "the daemon wrote no record file");
    for r in &records {
        assert_eq!(mode(r), 0o600, "{}", r.display());
    }
    let socket = c.daemon_spec(0).dir.join("run/vxnet.sock");
    assert_eq!(mode(&socket), 0o660, "API socket {}", socket.display());
    println!(
        "HOSTILE|file_modes|state dir 0700, {} record file(s) 0600, API socket 0660",
        records.len()
    );
}
