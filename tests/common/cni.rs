//! Running `vxnet-cni` on a lab host as a CNI runtime would: `CNI_*` in the environment, the
//! network configuration on stdin, a result or an error as JSON on stdout.

use std::io::Write;
use std::process::Stdio;

use serde_json::Value;

use super::TestLab;

/// What one plugin invocation gave back.
#[derive(Debug)]
pub struct Invocation {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Invocation {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The error code of a failed invocation (the spec's shape: code, msg).
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected a failure: {self:?}");
        let v = self.json();
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "no msg: {v}"
        );
        v["code"].as_u64().unwrap_or_else(|| panic!("no code: {v}"))
    }
}

/// The `CNI_*` variables of one call.
#[derive(Clone, Debug, Default)]
pub struct Call<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
    pub args: &'a str,
}

impl<'a> Call<'a> {
    pub fn new(command: &'a str, container_id: &'a str, netns: &'a str) -> Self {
        Call {
            command,
            container_id,
            netns,
            ifname: "eth0",
            args: "",
        }
    }
}

impl TestLab {
    /// Runs `vxnet-cni` on `host` (the lab's build, first on the host's PATH).
    pub fn cni(&self, host: &str, call: &Call<'_>, stdin: &Value) -> Invocation {
        let mut cmd = self.lab.host(host).unwrap().command("vxnet-cni").unwrap();
        cmd.env("CNI_COMMAND", call.command)
            .env("CNI_CONTAINERID", call.container_id)
            .env("CNI_NETNS", call.netns)
            .env("CNI_IFNAME", call.ifname)
            .env("CNI_ARGS", call.args)
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("vxnet-cni starts");
        let body = stdin.to_string();
        if let Some(mut input) = child.stdin.take() {
            // A plugin that stops reading (an oversized config) closes its end early.
            match input.write_all(body.as_bytes()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                other => other.expect("stdin"),
            }
        }
        let out = child.wait_with_output().expect("vxnet-cni ends");
        Invocation {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// A network namespace on `host` as a runtime makes one (`ip netns add`, in the host's
    /// private /run/netns); its path there.
    pub fn runtime_netns(&self, host: &str, name: &str) -> String {
        let out = self.sh(host, &["ip", "netns", "add", name]);
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        format!("/run/netns/{name}")
    }

    /// Runs `argv` inside runtime namespace `name` on `host`.
    pub fn in_runtime_netns(&self, host: &str, name: &str, argv: &[&str]) -> std::process::Output {
        let mut full = vec!["ip", "netns", "exec", name];
        full.extend_from_slice(argv);
        self.sh(host, &full)
    }
}

/// The configuration a runtime passes for a conflist with vxnet as its only plugin.
pub fn conf(version: &str, network: &str) -> Value {
    serde_json::json!({ "cniVersion": version, "name": network, "type": "vxnet" })
}
