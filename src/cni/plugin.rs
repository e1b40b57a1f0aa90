//! The `vxnet-cni` executable: reads the runtime's `CNI_*` environment and the network
//! configuration on stdin, asks the local daemon, and prints a CNI result or error. It
//! holds no state (the daemon's records are the state), so every invocation stands alone.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::ExitCode;

use hyper::{Method, StatusCode};

use super::requests::{AddRequest, Attachment, AttachmentRef, GcReport, GcRequest, Status};
use super::spec::{
    self, CniError, CniResult, Command, Dns, Environment, ErrorCode, Interface, IpConfig, NetConf,
    Route,
};
use crate::api::client::{Client, ClientError};

/// A network configuration is small; more than this on stdin is not one.
const MAX_STDIN: u64 = 1024 * 1024;
/// A plugin error outside the spec's own codes (the spec leaves 100 and up to plugins):
/// the attachment conflicts with another (an interface or a name already taken).
const CODE_CONFLICT: u32 = 100;
/// CHECK found the attachment, but not as `prevResult` describes it.
const CODE_PREV_RESULT_MISMATCH: u32 = 101;

/// What went wrong, as the runtime is told: the spec's error shape with its code.
pub struct Failure {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl From<CniError> for Failure {
    fn from(e: CniError) -> Self {
        Failure {
            code: e.code as u32,
            msg: e.msg,
            details: e.details,
        }
    }
}

impl Failure {
    fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Failure {
            code: code as u32,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// A daemon answer (or no answer) as the runtime should read it. `not_found` is the
    /// code of a 404 for this command (an unknown network for ADD, an unknown container
    /// for CHECK).
    fn from_client(e: ClientError, not_found: ErrorCode) -> Self {
        match &e {
            ClientError::Connect { socket, source } => Failure::new(
                ErrorCode::TryAgainLater,
                format!(
                    "cannot reach the vxnet daemon at {}: {source}; start `vxnet daemon` on this host, or set \"socket\" in the network configuration to where it listens",
                    socket.display()
                ),
            ),
            ClientError::Api { status, message } => {
                let code = match *status {
                    StatusCode::NOT_FOUND => not_found as u32,
                    StatusCode::CONFLICT => CODE_CONFLICT,
                    StatusCode::SERVICE_UNAVAILABLE => ErrorCode::TryAgainLater as u32,
                    s if s.is_client_error() => ErrorCode::InvalidConfig as u32,
                    _ => ErrorCode::Io as u32,
                };
                Failure {
                    code,
                    msg: format!("vxnet: {message}"),
                    details: format!("the daemon answered {status}"),
                }
            }
            _ => Failure::new(ErrorCode::Io, e.to_string()),
        }
    }

    fn to_json(&self, version: &str) -> serde_json::Value {
        let mut v = serde_json::json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = serde_json::Value::String(self.details.clone());
        }
        v
    }
}

/// The plugin's entry point.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN + 1).read_to_end(&mut stdin);
    // Errors are answered in the config's version when it has one the plugin speaks.
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| spec::SUPPORTED_VERSIONS[spec::SUPPORTED_VERSIONS.len() - 1].into());
    let outcome = match read {
        Ok(n) if n as u64 > MAX_STDIN => Err(Failure::new(
            ErrorCode::Decode,
            format!("the network configuration on stdin is larger than {MAX_STDIN} bytes: not a configuration"),
        )),
        Ok(_) => run(&stdin, |k| std::env::var(k).ok()),
        Err(e) => Err(Failure::new(
            ErrorCode::Io,
            format!("cannot read the network configuration on stdin: {e}"),
        )),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(answer)) => {
            let _ = writeln!(out, "{answer}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(f) => {
            let _ = writeln!(out, "{}", f.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

/// Runs one invocation: `Some(JSON)` to print on success (ADD, CHECK's nothing is `None`).
pub fn run(
    stdin: &[u8],
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<serde_json::Value>, Failure> {
    let command = Command::parse(&env("CNI_COMMAND").unwrap_or_default())?;
    if command == Command::Version {
        let asked = serde_json::from_slice::<serde_json::Value>(stdin)
            .ok()
            .and_then(|v| v["cniVersion"].as_str().map(str::to_string));
        return Ok(Some(spec::version_answer(asked.as_deref())));
    }
    let conf = NetConf::parse(stdin)?;
    let environment = Environment::read(command, env)?;
    let socket = conf
        .socket
        .clone()
        .unwrap_or_else(|| crate::api::DEFAULT_SOCKET.to_string());
    let client = Client::new(&socket).map_err(|e| {
        Failure::new(
            ErrorCode::InvalidConfig,
            format!("\"socket\" in the configuration: {e}"),
        )
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(ErrorCode::Io, format!("cannot start: {e}")))?;
    runtime.block_on(async {
        match command {
            Command::Add => add(&client, &conf, &environment).await.map(Some),
            Command::Del => del(&client, &conf, &environment).await.map(|()| None),
            Command::Check => check(&client, &conf, &environment).await.map(|()| None),
            Command::Status => status(&client, &conf).await.map(|()| None),
            Command::Gc => gc(&client, &conf).await.map(|()| None),
            Command::Version => Ok(None),
        }
    })
}

async fn post<T: serde::de::DeserializeOwned>(
    client: &Client,
    path: &str,
    body: &impl serde::Serialize,
    not_found: ErrorCode,
) -> Result<T, Failure> {
    let body = serde_json::to_vec(body).map_err(|e| Failure::new(ErrorCode::Io, e.to_string()))?;
    let (status, bytes) = client
        .raw(Method::POST, path, Some(body))
        .await
        .map_err(|e| Failure::from_client(e, not_found))?;
    decode(status, &bytes, not_found)
}

fn decode<T: serde::de::DeserializeOwned>(
    status: StatusCode,
    bytes: &[u8],
    not_found: ErrorCode,
) -> Result<T, Failure> {
    if !status.is_success() {
        let message = serde_json::from_slice::<crate::api::types::ErrorBody>(bytes)
            .map(|b| b.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
        return Err(Failure::from_client(
            ClientError::Api { status, message },
            not_found,
        ));
    }
    let bytes = if bytes.is_empty() { b"null" } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| {
        Failure::new(
            ErrorCode::Io,
            format!("unexpected answer from the vxnet daemon ({status}): {e}"),
        )
    })
}

/// The result ADD prints for `a`, in the config's version.
pub fn result_of(a: &Attachment, conf: &NetConf) -> CniResult {
    let mtu = |m: u32| conf.is_1_1().then_some(m);
    let sandbox = Some(a.netns.display().to_string());
    let mut interfaces = vec![Interface {
        name: a.ifname.clone(),
        mac: Some(a.mac.clone()),
        mtu: mtu(a.mtu),
        sandbox: sandbox.clone(),
    }];
    let mut ips = vec![IpConfig {
        address: format!("{}/{}", a.ip, a.prefix_len),
        gateway: Some(a.gateway),
        interface: Some(0),
    }];
    if let Some(g) = &a.gateway_interface {
        interfaces.push(Interface {
            name: g.ifname.clone(),
            mac: Some(g.mac.clone()),
            mtu: mtu(crate::reconcile::GatewayConfig::MTU),
            sandbox,
        });
        ips.push(IpConfig {
            address: format!("{}/{}", g.ip, g.prefix_len),
            gateway: Some(g.gateway),
            interface: Some(1),
        });
    }
    let mut routes = Vec::new();
    if let Some(gw) = a.default_gateway {
        routes.push(Route {
            dst: "0.0.0.0/0".into(),
            gw: Some(gw),
        });
    }
    if let Some(ns) = a.nameserver {
        routes.push(Route {
            dst: format!("{ns}/32"),
            gw: None,
        });
    }
    CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces,
        ips,
        routes,
        dns: Dns {
            nameservers: a.nameserver.iter().map(Ipv4Addr::to_string).collect(),
            domain: None,
            search: a.search.clone(),
            options: vec![],
        },
    }
}

/// The address the `ips` capability asks for (`10.0.4.7` or `10.0.4.7/24`).
fn requested_ip(conf: &NetConf) -> Result<Option<Ipv4Addr>, Failure> {
    let Some(first) = conf.runtime_config.ips.first() else {
        return Ok(None);
    };
    let addr = first.split('/').next().unwrap_or_default();
    addr.parse().map(Some).map_err(|_| {
        Failure::new(
            ErrorCode::InvalidConfig,
            format!("runtimeConfig.ips {first:?} is not an IPv4 address: vxnet networks are IPv4"),
        )
    })
}

async fn add(
    client: &Client,
    conf: &NetConf,
    env: &Environment,
) -> Result<serde_json::Value, Failure> {
    let network = conf.network()?.to_string();
    let netns = env
        .netns
        .clone()
        .ok_or_else(|| Failure::new(ErrorCode::InvalidEnvironment, "CNI_NETNS is not set"))?;
    // Podman keys aliases by the network's name as it knows it (the conflist's).
    let aliases = conf
        .runtime_config
        .aliases
        .get(&conf.name)
        .or_else(|| conf.runtime_config.aliases.get(&network))
        .cloned()
        .unwrap_or_default()
        .into_iter()
        // Podman adds the short container ID as an alias; the name is already the name.
        .filter(|a| Some(a) != env.args.get("K8S_POD_NAME"))
        .collect();
    let req = AddRequest {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns,
        network,
        name: env.args.get("K8S_POD_NAME").cloned(),
        aliases,
        ip: requested_ip(conf)?,
        gateway_ifname: conf.gateway_interface.clone(),
    };
    let a: Attachment = post(client, "/v1/cni/add", &req, ErrorCode::InvalidConfig).await?;
    serde_json::to_value(result_of(&a, conf))
        .map_err(|e| Failure::new(ErrorCode::Io, e.to_string()))
}

fn attachment_ref(conf: &NetConf, env: &Environment) -> Result<AttachmentRef, Failure> {
    Ok(AttachmentRef {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        network: conf.network()?.to_string(),
        netns: env.netns.clone(),
    })
}

async fn del(client: &Client, conf: &NetConf, env: &Environment) -> Result<(), Failure> {
    let r = attachment_ref(conf, env)?;
    let _: serde_json::Value = post(client, "/v1/cni/del", &r, ErrorCode::InvalidConfig).await?;
    Ok(())
}

async fn check(client: &Client, conf: &NetConf, env: &Environment) -> Result<(), Failure> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        Failure::new(
            ErrorCode::InvalidConfig,
            "CHECK needs prevResult (the result of the ADD) in the configuration",
        )
    })?;
    let prev = CniResult::from_prev(prev)?;
    let r = attachment_ref(conf, env)?;
    let a: Attachment = post(client, "/v1/cni/check", &r, ErrorCode::UnknownContainer).await?;
    let mismatch = |what: String| Failure {
        code: CODE_PREV_RESULT_MISMATCH,
        msg: format!("vxnet: the attachment does not match prevResult: {what}"),
        details: String::new(),
    };
    let ours = prev
        .interfaces
        .iter()
        .position(|i| i.name == a.ifname)
        .ok_or_else(|| mismatch(format!("prevResult lists no interface {}", a.ifname)))?;
    let iface = &prev.interfaces[ours];
    if let Some(m) = iface
        .mac
        .as_deref()
        .filter(|m| !m.eq_ignore_ascii_case(&a.mac))
    {
        return Err(mismatch(format!(
            "{} has MAC {}, prevResult says {m}",
            a.ifname, a.mac
        )));
    }
    let address = format!("{}/{}", a.ip, a.prefix_len);
    let listed = prev
        .ips
        .iter()
        .any(|ip| ip.address == address && ip.interface.is_none_or(|i| i == ours));
    if !listed {
        return Err(mismatch(format!(
            "{} has {address}, which prevResult does not list",
            a.ifname
        )));
    }
    Ok(())
}

async fn status(client: &Client, conf: &NetConf) -> Result<(), Failure> {
    let network = conf.network()?;
    let path = format!("/v1/cni/status?network={}", query_escape(network));
    let not_available = |msg: String| Failure::new(ErrorCode::NotAvailable, msg);
    let (code, bytes) = client
        .raw(Method::GET, &path, None)
        .await
        .map_err(|e| not_available(e.to_string()))?;
    let s: Status =
        decode(code, &bytes, ErrorCode::NotAvailable).map_err(|f| not_available(f.msg))?;
    match s.ready {
        true => Ok(()),
        false => Err(not_available(format!(
            "vxnet: {}",
            s.reason
                .unwrap_or_else(|| "the daemon cannot serve ADD now".into())
        ))),
    }
}

async fn gc(client: &Client, conf: &NetConf) -> Result<(), Failure> {
    let valid = conf
        .valid_attachments
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|a| (a.container_id, a.ifname))
        .collect();
    let req = GcRequest {
        network: conf.network()?.to_string(),
        valid,
    };
    let _: GcReport = post(client, "/v1/cni/gc", &req, ErrorCode::InvalidConfig).await?;
    Ok(())
}

fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
