//! The CNI protocol as the spec (1.0.0, 1.1.0) words it: the runtime's environment, the
//! network configuration on stdin, and what goes back on stdout (a result, a version
//! answer or an error). Pure data and parsing; nothing here talks to the daemon.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];

/// The error codes of the spec (section "Error"), as far as this plugin returns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADD now.
    NotAvailable = 50,
}

/// An error as the spec's JSON shape: `{"cniVersion","code","msg","details"}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The JSON a runtime reads on stdout, in `version` (the config's, or the newest).
    pub fn to_json(&self, version: &str) -> serde_json::Value {
        let mut v = serde_json::json!({
            "cniVersion": version,
            "code": self.code as u32,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = serde_json::Value::String(self.details.clone());
        }
        v
    }
}

/// The operations of the spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!(
                        "unknown CNI_COMMAND {other:?}: use ADD, DEL, CHECK, VERSION, STATUS or GC"
                    ),
                ))
            }
        })
    }
}

/// What the runtime passes in `CNI_*` variables, checked for the command at hand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Environment {
    pub container_id: String,
    /// Empty on a DEL whose namespace is gone (containerd sends it empty).
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS`: `K=V;K=V`.
    pub args: BTreeMap<String, String>,
}

/// The longest interface name the kernel takes (IFNAMSIZ less the NUL).
const IFNAME_MAX: usize = 15;

/// The spec's rule for container IDs: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
pub fn valid_container_id(id: &str) -> bool {
    id.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The spec's rule for interface names: at most 15 bytes, not `.` or `..`, no `/`, `:` or
/// white space.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
}

impl Environment {
    /// Reads and checks the variables `command` needs; `get` is `std::env::var` in the
    /// plugin, a map in tests.
    pub fn read(command: Command, get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let missing = |var: &str| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("{var} is not set: the runtime must pass it for this command"),
            )
        };
        let mut env = Environment::default();
        let needs_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        if needs_attachment {
            env.container_id = get("CNI_CONTAINERID")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| missing("CNI_CONTAINERID"))?;
            if !valid_container_id(&env.container_id) {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!(
                        "CNI_CONTAINERID {:?} is not a valid container ID (letters, digits, '_', '.', '-', starting with a letter or digit)",
                        env.container_id
                    ),
                ));
            }
            env.ifname = get("CNI_IFNAME")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| missing("CNI_IFNAME"))?;
            if !valid_ifname(&env.ifname) {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!(
                        "CNI_IFNAME {:?} is not a valid interface name (1 to 15 characters, no '/', ':' or spaces)",
                        env.ifname
                    ),
                ));
            }
            env.netns = get("CNI_NETNS")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from);
            if env.netns.is_none() && command != Command::Del {
                return Err(missing("CNI_NETNS"));
            }
            if let Some(ns) = &env.netns {
                if !ns.is_absolute() {
                    return Err(CniError::new(
                        ErrorCode::InvalidEnvironment,
                        format!("CNI_NETNS {:?} must be an absolute path", ns.display()),
                    ));
                }
            }
        }
        if let Some(args) = get("CNI_ARGS") {
            for pair in args.split(';').filter(|p| !p.is_empty()) {
                let Some((k, v)) = pair.split_once('=') else {
                    return Err(CniError::new(
                        ErrorCode::InvalidEnvironment,
                        format!("CNI_ARGS item {pair:?} is not KEY=VALUE"),
                    ));
                };
                env.args.insert(k.to_string(), v.to_string());
            }
        }
        Ok(env)
    }
}

/// One `{containerID, ifname}` of GC's `cni.dev/valid-attachments`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The runtime's per-invocation settings for the capabilities the config declares.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct RuntimeConfig {
    /// `aliases` capability (Podman): more DNS names, per network name.
    #[serde(default)]
    pub aliases: BTreeMap<String, Vec<String>>,
    /// `ips` capability: a requested address (`10.0.4.7` or `10.0.4.7/24`).
    #[serde(default)]
    pub ips: Vec<String>,
}

/// The network configuration on stdin (this plugin's entry of a conflist, with the list's
/// `cniVersion` and `name` filled in by the runtime). Unknown fields are ignored, as other
/// plugins' conventions add their own.
#[derive(Clone, Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The vxnet network to join (name or ID); the conflist's `name` when absent.
    #[serde(default)]
    pub network: Option<String>,
    /// The daemon's API socket (default /run/vxnet/vxnet.sock).
    #[serde(default)]
    pub socket: Option<String>,
    /// The name of the container's interface on the gateway bridge (default `vxgw0`).
    #[serde(rename = "gatewayInterface", default)]
    pub gateway_interface: Option<String>,
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: RuntimeConfig,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

/// Compares two `MAJOR.MINOR.PATCH` versions.
fn version_key(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    let key = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(key)
}

impl NetConf {
    /// Parses stdin; a config this plugin cannot serve is an error with the spec's code.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                format!("cannot decode the network configuration on stdin: {e}"),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "CNI version {:?} is not supported: vxnet speaks {}; set \"cniVersion\" in the conflist",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        Ok(conf)
    }

    /// The vxnet network this config names.
    pub fn network(&self) -> Result<&str, CniError> {
        let n = self.network.as_deref().unwrap_or(&self.name);
        if n.is_empty() {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                "the configuration names no vxnet network: set \"network\" (or the conflist's \"name\")",
            ));
        }
        Ok(n)
    }

    /// Whether results carry 1.1's fields.
    pub fn is_1_1(&self) -> bool {
        version_key(&self.cni_version) >= version_key("1.1.0")
    }
}

/// `VERSION`'s answer.
pub fn version_answer(asked: Option<&str>) -> serde_json::Value {
    let newest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1];
    let version = asked.filter(|v| version_key(v).is_some()).unwrap_or(newest);
    serde_json::json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })
}

/// An interface of a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// 1.1.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR: `10.0.4.2/24`.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The success result of ADD (and the `prevResult` of DEL and CHECK).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// Reads a `prevResult`; one that does not parse is the runtime's error (code 6).
    pub fn from_prev(v: &serde_json::Value) -> Result<Self, CniError> {
        serde_json::from_value(v.clone())
            .map_err(|e| CniError::new(ErrorCode::Decode, format!("cannot decode prevResult: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn environment_is_checked_per_command() {
        let full = [
            ("CNI_CONTAINERID", "default-c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/proc/7/ns/net"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p1"),
        ];
        let e = Environment::read(Command::Add, env(&full)).expect("valid");
        assert_eq!(e.args.get("K8S_POD_NAME").map(String::as_str), Some("p1"));
        // containerd sends DEL with an empty CNI_NETNS.
        let del = [
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ];
        assert_eq!(
            Environment::read(Command::Del, env(&del)).map(|e| e.netns),
            Ok(None)
        );
        let err = Environment::read(Command::Add, env(&del)).expect_err("ADD needs a netns");
        assert_eq!(err.code, ErrorCode::InvalidEnvironment);
        for bad in ["-x", "a/b", "", "a b"] {
            let e = [
                ("CNI_CONTAINERID", bad),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/n"),
            ];
            assert!(Environment::read(Command::Add, env(&e)).is_err(), "{bad:?}");
        }
        for bad in ["..", "a/b", "toolongname12345", "a:b", "a b"] {
            let e = [
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", bad),
                ("CNI_NETNS", "/n"),
            ];
            assert!(Environment::read(Command::Add, env(&e)).is_err(), "{bad:?}");
        }
        let rel = [
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "n"),
        ];
        assert!(Environment::read(Command::Add, env(&rel)).is_err());
        // VERSION, STATUS and GC need none of them.
        assert!(Environment::read(Command::Gc, env(&[])).is_ok());
    }

    #[test]
    fn versions_outside_1_0_and_1_1_are_refused_with_code_1() {
        let conf = br#"{"cniVersion":"0.3.1","name":"n","type":"vxnet"}"#;
        let err = NetConf::parse(conf).expect_err("0.3.1 is not spoken");
        assert_eq!(err.code, ErrorCode::IncompatibleVersion);
        assert_eq!(err.to_json("1.1.0")["code"], 1);
        let err = NetConf::parse(b"{not json").expect_err("garbage");
        assert_eq!(err.code, ErrorCode::Decode);
        let ok =
            NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"vxnet"}"#).expect("1.1.0");
        assert!(ok.is_1_1());
        assert_eq!(ok.network(), Ok("n"));
    }

    #[test]
    fn version_answer_lists_both() {
        let v = version_answer(Some("1.0.0"));
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["1.0.0", "1.1.0"])
        );
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(version_answer(None)["cniVersion"], "1.1.0");
    }
}
