//! The `vxnet` command line as a user runs it: output formats, exit codes, error messages.

mod common;

use std::process::{Command, Output};

use vxnet::lab::LocalCluster;

fn vxnet(c: &LocalCluster, daemon: usize, args: &[&str]) -> Output {
    Command::new(common::binary())
        .arg("-H")
        .arg(format!("unix://{}", c.daemons[daemon].socket.display()))
        .args(args)
        .output()
        .expect("run vxnet")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_verbs_print_like_docker() {
    let c = common::cluster(2).await;
    let out = vxnet(
        &c,
        0,
        &[
            "network",
            "create",
            "--driver",
            "overlay",
            "--subnet",
            "10.0.4.0/24",
            "--label",
            "team=a",
            "my-net",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    assert_eq!(id.len(), 64, "create prints the full ID: {id}");

    // `network ls` on the other daemon: Docker's columns, the 12-character ID.
    let mut listed = String::new();
    for _ in 0..200 {
        listed = text(&vxnet(&c, 1, &["network", "ls"]).stdout);
        if listed.contains("my-net") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NETWORK", "ID", "NAME", "DRIVER", "SCOPE"]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        [&id[..12], "my-net", "overlay", "global"]
    );

    let json = vxnet(&c, 1, &["network", "ls", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v[0]["name"], "my-net");
    assert_eq!(v[0]["labels"]["team"], "a");
    assert_eq!(
        text(&vxnet(&c, 1, &["network", "ls", "-q"]).stdout).trim(),
        &id[..12]
    );

    let inspect = vxnet(&c, 1, &["network", "inspect", "my-net"]);
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v[0]["subnet"], "10.0.4.0/24");
    assert_eq!(v[0]["gateway"], "10.0.4.1");
    assert_eq!(v[0]["scope"], "global");
    assert!(v[0]["vni"].as_u64().unwrap() >= 256);
    assert!(v[0]["created"].as_str().unwrap().ends_with('Z'));

    let missing = vxnet(&c, 1, &["network", "inspect", "my-net", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("network nope not found"));
    let v: serde_json::Value = serde_json::from_slice(&missing.stdout).unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        1,
        "found ones are still printed"
    );

    let rm = vxnet(&c, 1, &["network", "rm", "my-net"]);
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert_eq!(text(&rm.stdout).trim(), "my-net");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_errors_are_clear_and_exit_1() {
    let c = common::cluster(1).await;
    let before = c.store_state().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["network", "create", "--subnet", "10.0.4.0/33", "x"],
            "invalid --subnet \"10.0.4.0/33\"",
        ),
        (
            &[
                "network",
                "create",
                "--subnet",
                "10.0.4.0/24",
                "--gateway",
                "10.0.4",
                "x",
            ],
            "invalid --gateway",
        ),
        (
            &["network", "create", "--gateway", "10.0.4.1", "x"],
            "--gateway and --ip-range need --subnet",
        ),
        (
            &["network", "rm", "nope"],
            "Error response from daemon: network nope not found",
        ),
        (&["network", "ls", "--format", "yaml"], "unknown --format"),
    ];
    for (args, message) in cases {
        let out = vxnet(&c, 0, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            text(&out.stderr).contains(message),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(c.store_state().unwrap(), before);

    let out = Command::new(common::binary())
        .args(["-H", "unix:///nonexistent/vxnet.sock", "network", "ls"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr)
        .contains("cannot connect to the vxnet daemon at unix:///nonexistent/vxnet.sock"));
    let out = Command::new(common::binary())
        .args(["-H", "tcp://1.2.3.4:2375", "network", "ls"])
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("invalid daemon address"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn daemon_refuses_bad_flags_before_starting() {
    let dir = vxnet::lab::process::ScratchDir::new("vxnet-cli-test").unwrap();
    let run = |store: &str, advertise: &str| {
        Command::new(common::binary())
            .args([
                "daemon",
                "--cluster-store",
                store,
                "--cluster-advertise",
                advertise,
            ])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .output()
            .unwrap()
    };
    let out = run("consul://127.0.0.1:8500", "192.0.2.6");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("only etcd is supported"),
        "{}",
        text(&out.stderr)
    );
    let out = run("etcd://127.0.0.1", "192.0.2.6");
    assert!(
        text(&out.stderr).contains("has no port"),
        "{}",
        text(&out.stderr)
    );
    let out = run("etcd://127.0.0.1:2379", "eth0:2376x");
    assert!(
        text(&out.stderr).contains("cluster-advertise (from the command line)"),
        "{}",
        text(&out.stderr)
    );
    let out = Command::new(common::binary())
        .args([
            "daemon",
            "--cluster-store",
            "etcd://127.0.0.1:1",
            "--cluster-advertise",
            "192.0.2.6",
        ])
        .args(["--socket-group", "no-such-group-vxnet"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("group \"no-such-group-vxnet\" does not exist"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !dir.path().join("s.sock").exists(),
        "a refused daemon took the socket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_socket_is_root_only_or_shared_with_the_group_given() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let c = common::cluster(1).await;
    let meta = std::fs::metadata(&c.daemons[0].socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.uid(), 0);

    // A daemon with --socket-group: the socket's group is that group's (Debian's `daemon`).
    // This daemon never reaches its store; it only has to bind its socket.
    let Some(group) = nix::unistd::Group::from_name("daemon").ok().flatten() else {
        panic!("group `daemon` missing on this machine");
    };
    let dir = vxnet::lab::process::ScratchDir::new("vxnet-sock-test").unwrap();
    let socket = dir.path().join("g.sock");
    let mut cmd = Command::new(common::binary());
    cmd.args([
        "daemon",
        "--cluster-store",
        "etcd://127.0.0.1:1",
        "--cluster-advertise",
        "192.0.2.6",
    ])
    .args(["--socket-group", "daemon"])
    .arg("--state-dir")
    .arg(dir.path().join("state"))
    .arg("--run-dir")
    .arg(dir.path().join("run"))
    .arg("--socket")
    .arg(&socket);
    // Inside the test cluster's private namespace, like every daemon of the tests.
    c.ns.command(&mut cmd).unwrap();
    let log = dir.path().join("d.log");
    let guard = vxnet::lab::process::ChildGuard::spawn("grouped", cmd, &log, true).unwrap();
    common::wait_until(|| socket.exists());
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.gid(), group.gid.as_raw());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    drop(guard);
}

/// Rust ignores SIGPIPE in its programs; a container's command (exec'd by container-init)
/// must not inherit that, or `yes | head` in a container behaves unlike everywhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_containers_command_gets_the_default_sigpipe() {
    let lab = common::TestLab::up(2).await;
    lab.network("pipes", "10.88.0.0/24");
    let out = lab.vx(
        "vm2",
        &[
            "run",
            "--rm",
            "--net",
            "pipes",
            "--",
            "grep",
            "SigIgn",
            "/proc/self/status",
        ],
    );
    let mask = out
        .split_whitespace()
        .nth(1)
        .and_then(|m| u64::from_str_radix(m, 16).ok())
        .unwrap_or_else(|| panic!("no SigIgn line: {out}"));
    assert_eq!(
        mask & (1 << (libc::SIGPIPE - 1)),
        0,
        "SIGPIPE ignored: {out}"
    );
}
