//! iproute2 (and friends) as an independent oracle, run inside a namespace the test made.
//! Shared by the kernel-level tests (`#[path = "support/oracle.rs"] mod oracle;`).
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::process::{Command, Output};

use serde_json::Value;
use vxnet::netns::NetNs;

/// The value, or a panic naming what failed.
pub fn check<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Runs `args` inside `ns`.
pub fn run(ns: &NetNs, args: &[&str]) -> Output {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]);
    check(ns.command(&mut cmd), "setns for a command");
    check(cmd.output(), args[0])
}

/// Runs `args` inside `ns`, asserting success; returns stdout.
pub fn ok(ns: &NetNs, args: &[&str]) -> String {
    let out = run(ns, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a `-j` command inside `ns` and parses its JSON.
pub fn json(ns: &NetNs, args: &[&str]) -> Value {
    let text = ok(ns, args);
    check(serde_json::from_str(&text), &format!("{args:?} JSON"))
}

pub fn assert_same(before: &Value, after: &Value, what: &str) {
    assert!(
        before == after,
        "{what} changed:\nbefore: {before:#}\nafter:  {after:#}"
    );
}

/// One ping with a one-second wait.
pub fn pings(ns: &NetNs, ip: Ipv4Addr) -> bool {
    run(ns, &["ping", "-c", "1", "-W", "1", &ip.to_string()])
        .status
        .success()
}

/// Up to three single pings: the first may be spent on ARP (answered by vxlan1's proxy on
/// the overlay) or on a bridge port reaching the forwarding state.
pub fn eventually_pings(ns: &NetNs, ip: Ipv4Addr) -> bool {
    (0..3).any(|_| pings(ns, ip))
}
