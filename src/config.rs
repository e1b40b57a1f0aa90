//! The daemon's settings: command-line flags and `/etc/vxnet/daemon.json`, merged the way
//! dockerd merges its flags and `daemon.json`.
//!
//! - The file's keys are the flags' long names (`cluster-store`, `lease-ttl`, …); list flags
//!   (`cluster-store-opt`) take a JSON array, booleans a JSON boolean.
//! - A key set both in the file and on the command line (or through the flag's environment
//!   variable) is an error, as in dockerd: which one the operator meant is not guessed.
//! - Unknown keys and values of the wrong type or form are errors naming the key.
//! - A missing file at the default path means "no file"; a missing file given with
//!   `--config-file` is an error.
//!
//! [`Settings::resolve`] turns the merged settings into the daemon's [`DaemonConfig`].
//! On SIGHUP the daemon reads the file again ([`reload_plan`]): what can change at run time
//! is applied, anything else is reported as needing a restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::daemon::{parse_advertise, DaemonConfig};

pub const DEFAULT_CONFIG_FILE: &str = "/etc/vxnet/daemon.json";
/// Files larger than this are refused before parsing (a daemon.json is a few hundred bytes).
const MAX_FILE: u64 = 1024 * 1024;

/// Every daemon setting, as a flag and as a key of daemon.json. `None`: not given here.
#[derive(Args, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Where the cluster store is: etcd://HOST:PORT[,HOST:PORT…]
    #[arg(long, env = "VXNET_CLUSTER_STORE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_store: Option<String>,
    /// How peers reach this host: IP[:PORT] of its underlay interface (the VXLAN endpoint).
    #[arg(long, env = "VXNET_CLUSTER_ADVERTISE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_advertise: Option<String>,
    /// This host's name in the cluster [default: the hostname]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Persistent state (node ID, lease, containers) [default: /var/lib/vxnet]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Runtime state (namespaces, pid files) [default: /run/vxnet]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_dir: Option<PathBuf>,
    /// The API socket [default: /run/vxnet/vxnet.sock]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Key prefix in the cluster store (several clusters can share one etcd) [default: /vxnet/]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_prefix: Option<String>,
    /// Seconds without a keep-alive after which this host counts as dead [default: 15]
    #[arg(long, value_name = "SECONDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<u64>,
    /// etcd credentials as USER:PASSWORD (when etcd's auth is on).
    #[arg(long, env = "VXNET_ETCD_USER", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd_user: Option<String>,
    /// Store option KEY=VALUE, repeatable: kv.cacertfile=PATH (TLS to etcd, trusting this CA),
    /// kv.certfile=PATH and kv.keyfile=PATH (this host's client certificate).
    #[arg(long = "cluster-store-opt", value_name = "KEY=VALUE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_store_opt: Option<Vec<String>>,
    /// Subnet of this host's gateway bridge (containers' eth1, NAT'd); pick one that does not
    /// collide with your networks [default: 172.18.0.0/16]
    #[arg(long, value_name = "CIDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_bridge_subnet: Option<String>,
    /// Let this group use the API socket too (it is root-only, mode 0660, otherwise).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// Serve Docker's network and IPAM plugin protocols: `docker network create -d vxnet`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_plugin: Option<bool>,
    /// Where the plugin listens (Docker finds plugins by socket in /run/docker/plugins)
    /// [default: /run/docker/plugins/vxnet.sock]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_plugin_socket: Option<PathBuf>,
    /// The Docker engines' kind: local (no --cluster-store: run `docker network create` on
    /// every host) or global (engines started with --cluster-store: create once)
    /// [default: local]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_scope: Option<String>,
    /// The local Docker engine's API, where Docker containers' names and network aliases
    /// are learned for the name server [default: unix:///var/run/docker.sock]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_host: Option<String>,
    /// Container network namespaces kept ready ahead of `run` (each saves a create 1-2 ms;
    /// 0 makes every one on demand) [default: 2]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_pool: Option<usize>,
    /// Serve containers' names on 169.254.53.53 in every network (`--dns=false`: off)
    /// [default: true]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<bool>,
    /// The resolvers names outside vxnet's networks are forwarded to (re-read on change)
    /// [default: /etc/resolv.conf]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolv_conf: Option<PathBuf>,
    /// Serve Prometheus metrics on IP:PORT at /metrics (off unless given; no authentication:
    /// listen where only your monitoring reaches)
    #[arg(long, value_name = "IP:PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    /// Log level (error, warn, info, debug, trace, or a tracing filter such as
    /// `info,vxnet::reconcile=debug`); changes on reload [default: $RUST_LOG, else info]
    #[arg(long, short = 'l')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Log format: text or json (one JSON object per line) [default: text]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
}

/// Where a setting came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flags,
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flags => f.write_str("the command line"),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("configuration file {path} is larger than {MAX_FILE} bytes: is it the right file?")]
    TooLarge { path: PathBuf },
    #[error("configuration file {path} is not valid JSON: {reason}")]
    NotJson { path: PathBuf, reason: String },
    #[error("configuration file {path} must hold a JSON object ({{\"cluster-store\": \"etcd://…\", …}})")]
    NotObject { path: PathBuf },
    #[error("configuration file {path}: unknown key {key:?}: the keys are the daemon's flag names without `--` (see `vxnet daemon --help`)")]
    UnknownKey { path: PathBuf, key: String },
    #[error("configuration file {path}: key {key:?}: {reason}")]
    BadType {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("these keys are given both as flags and in {path}: {keys}; remove one of each pair (dockerd's rule: which one was meant is not guessed)")]
    Conflict { path: PathBuf, keys: String },
    #[error("{key} (from {origin}): {reason}")]
    Invalid {
        key: &'static str,
        origin: Source,
        reason: String,
    },
    #[error("no cluster store configured: set \"cluster-store\" in {file} (or give --cluster-store), e.g. \"etcd://192.0.2.10:2379\"")]
    NoClusterStore { file: String },
    #[error("no advertise address configured: set \"cluster-advertise\" in {file} (or give --cluster-advertise) to this host's underlay address")]
    NoAdvertise { file: String },
}

/// The flags' names whose values are never printed (in conflicts, `--validate`).
const SECRET_KEYS: &[&str] = &["etcd-user"];

impl Settings {
    /// Reads a daemon.json. `required`: the path was given explicitly, so a missing file is
    /// an error; otherwise a missing file is an empty one.
    pub fn from_file(path: &Path, required: bool) -> Result<Settings, ConfigError> {
        let read_err = |error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Settings::default())
            }
            Err(e) => return Err(read_err(e)),
        };
        if meta.len() > MAX_FILE {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Settings::from_json(path, &text)
    }

    /// Parses daemon.json text (`path` is for messages).
    pub fn from_json(path: &Path, text: &str) -> Result<Settings, ConfigError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ConfigError::NotJson {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let serde_json::Value::Object(map) = &value else {
            return Err(ConfigError::NotObject {
                path: path.to_path_buf(),
            });
        };
        // Unknown keys first, by name: serde's message for them lists every field.
        let known = Settings::keys();
        if let Some(key) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ConfigError::UnknownKey {
                path: path.to_path_buf(),
                key: key.clone(),
            });
        }
        serde_path_to_error::deserialize(value).map_err(|e| ConfigError::BadType {
            path: path.to_path_buf(),
            key: e.path().to_string(),
            reason: e.into_inner().to_string(),
        })
    }

    /// Every key the file may hold (the long flag names).
    pub fn keys() -> Vec<&'static str> {
        vec![
            "cluster-store",
            "cluster-advertise",
            "node-name",
            "state-dir",
            "run-dir",
            "socket",
            "store-prefix",
            "lease-ttl",
            "etcd-user",
            "cluster-store-opt",
            "gateway-bridge-subnet",
            "socket-group",
            "docker-plugin",
            "docker-plugin-socket",
            "docker-scope",
            "docker-host",
            "netns-pool",
            "dns",
            "resolv-conf",
            "metrics-addr",
            "log-level",
            "log-format",
        ]
    }

    /// The settings given, by key, as JSON values (secrets included: callers mask them).
    fn given(&self) -> BTreeMap<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map.into_iter().collect(),
            _ => BTreeMap::new(),
        }
    }

    /// The given settings as a JSON object, secrets masked (`vxnet daemon --validate`).
    pub fn to_masked_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (k, v) in self.given() {
            let shown = if SECRET_KEYS.contains(&k.as_str()) {
                serde_json::Value::String("********".into())
            } else {
                v
            };
            map.insert(k, shown);
        }
        serde_json::Value::Object(map)
    }

    /// Flags and file together; a key in both is an error (dockerd's rule).
    pub fn merge(flags: &Settings, file: &Settings, path: &Path) -> Result<Settings, ConfigError> {
        let (f, d) = (flags.given(), file.given());
        let both: Vec<String> = f
            .iter()
            .filter_map(|(k, fv)| {
                let dv = d.get(k)?;
                Some(if SECRET_KEYS.contains(&k.as_str()) {
                    format!("{k} (values not shown)")
                } else {
                    format!("{k} (flag: {fv}, file: {dv})")
                })
            })
            .collect();
        if !both.is_empty() {
            return Err(ConfigError::Conflict {
                path: path.to_path_buf(),
                keys: both.join(", "),
            });
        }
        let mut merged = d;
        merged.extend(f);
        // Both halves came from Settings values: the union deserializes again.
        serde_json::from_value(serde_json::Value::Object(merged.into_iter().collect())).map_err(
            |e| ConfigError::BadType {
                path: path.to_path_buf(),
                key: String::new(),
                reason: e.to_string(),
            },
        )
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// What the logger is set up with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// A tracing filter directive (`info`, `info,vxnet::view=debug`).
    pub level: String,
    pub format: LogFormat,
}

/// Everything the daemon runs with, resolved and checked.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub daemon: DaemonConfig,
    pub log: LogConfig,
}

/// The settings of one start: the command line's, the file's and where the file is.
#[derive(Clone, Debug)]
pub struct Layers {
    pub flags: Settings,
    pub file: Settings,
    pub path: PathBuf,
    /// The path was given (`--config-file`): a missing file is an error, at start and reload.
    pub required: bool,
}

impl Layers {
    /// Reads the file (when present) and checks it against the flags.
    pub fn load(flags: Settings, path: Option<&Path>) -> Result<(Layers, Settings), ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        let file = Settings::from_file(&path, required)?;
        let merged = Settings::merge(&flags, &file, &path)?;
        Ok((
            Layers {
                flags,
                file,
                path,
                required,
            },
            merged,
        ))
    }

    /// Turns merged settings into the daemon's configuration; every value checked, every
    /// error naming its key and where it came from.
    pub fn resolve(&self, s: &Settings) -> Result<Resolved, ConfigError> {
        let file_hint = self.path.display().to_string();
        let from_file = self.file.given();
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            key,
            origin: if from_file.contains_key(key) {
                Source::File(self.path.clone())
            } else {
                Source::Flags
            },
            reason,
        };
        let cluster_store = s
            .cluster_store
            .clone()
            .filter(|c| !c.trim().is_empty())
            .ok_or_else(|| ConfigError::NoClusterStore {
                file: file_hint.clone(),
            })?;
        crate::store::etcd::EtcdConfig::from_cluster_store(&cluster_store)
            .map_err(|e| invalid("cluster-store", e.to_string()))?;
        let advertise = s
            .cluster_advertise
            .clone()
            .ok_or(ConfigError::NoAdvertise { file: file_hint })?;
        let (advertise_addr, advertise_port) = parse_advertise(&advertise).map_err(|_| {
            invalid(
                "cluster-advertise",
                format!("{advertise:?} is not IP or IP:PORT (an address of this host)"),
            )
        })?;
        let node_name = match &s.node_name {
            Some(n) if n.trim().is_empty() => {
                return Err(invalid("node-name", "must not be empty".into()))
            }
            Some(n) => n.clone(),
            None => nix::unistd::gethostname()
                .map_err(|e| {
                    invalid(
                        "node-name",
                        format!("not given and the hostname cannot be read ({e}): give one"),
                    )
                })?
                .to_string_lossy()
                .into_owned(),
        };
        let etcd_user = match &s.etcd_user {
            Some(u) => Some(
                u.split_once(':')
                    .filter(|(user, _)| !user.is_empty())
                    .map(|(user, pass)| (user.to_string(), pass.to_string()))
                    .ok_or_else(|| invalid("etcd-user", "must be USER:PASSWORD".into()))?,
            ),
            None => None,
        };
        let lease_ttl = Duration::from_secs(s.lease_ttl.unwrap_or(15));
        if !(2..=3600).contains(&lease_ttl.as_secs()) {
            return Err(invalid(
                "lease-ttl",
                format!("{} s: use 2 to 3600 seconds", lease_ttl.as_secs()),
            ));
        }
        let store_opts = s.cluster_store_opt.clone().unwrap_or_default();
        crate::store::etcd::parse_store_opts(&store_opts)
            .map_err(|e| invalid("cluster-store-opt", e.to_string()))?;
        let subnet_text = s
            .gateway_bridge_subnet
            .clone()
            .unwrap_or_else(|| crate::reconcile::GatewayConfig::DEFAULT_SUBNET.to_string());
        let gateway_subnet: ipnet::Ipv4Net = subnet_text.parse().map_err(|_| {
            invalid(
                "gateway-bridge-subnet",
                format!("{subnet_text:?} is not an IPv4 CIDR such as 172.18.0.0/16"),
            )
        })?;
        let scope_text = s.docker_scope.clone().unwrap_or_else(|| "local".into());
        let scope: crate::docker::Scope = scope_text
            .parse()
            .map_err(|e: String| invalid("docker-scope", e))?;
        let docker_plugin = s.docker_plugin.unwrap_or(false);
        for (key, given) in [
            ("docker-plugin-socket", s.docker_plugin_socket.is_some()),
            ("docker-scope", s.docker_scope.is_some()),
            ("docker-host", s.docker_host.is_some()),
        ] {
            if given && !docker_plugin {
                return Err(invalid(
                    key,
                    "only means something with docker-plugin on: set docker-plugin too, or drop it"
                        .into(),
                ));
            }
        }
        let docker_host = s
            .docker_host
            .clone()
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        let engine = match docker_host.strip_prefix("unix://") {
            Some(p) => PathBuf::from(p),
            None if docker_host.starts_with('/') => PathBuf::from(&docker_host),
            None => {
                return Err(invalid(
                    "docker-host",
                    format!("{docker_host:?}: give the engine's socket as unix:///PATH"),
                ))
            }
        };
        let metrics_addr = match &s.metrics_addr {
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "metrics-addr",
                    format!("{a:?} is not IP:PORT (e.g. 192.0.2.10:9323)"),
                )
            })?),
            None => None,
        };
        let log = LogConfig {
            level: resolve_log_level(s).map_err(|reason| invalid("log-level", reason))?,
            format: match s.log_format.as_deref() {
                None | Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    return Err(invalid(
                        "log-format",
                        format!("{other:?}: use text or json"),
                    ))
                }
            },
        };
        let daemon = DaemonConfig {
            cluster_store,
            advertise_addr,
            advertise_port,
            node_name,
            state_dir: s
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("/var/lib/vxnet")),
            run_dir: s
                .run_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("/run/vxnet")),
            socket: s
                .socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(crate::api::DEFAULT_SOCKET)),
            store_prefix: s
                .store_prefix
                .clone()
                .unwrap_or_else(|| crate::store::keys::DEFAULT_PREFIX.to_string()),
            lease_ttl,
            etcd_user,
            store_opts,
            gateway_subnet,
            socket_group: s.socket_group.clone(),
            docker_plugin: docker_plugin.then(|| crate::docker::PluginConfig {
                socket: s
                    .docker_plugin_socket
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(crate::docker::DEFAULT_SOCKET)),
                scope,
                engine,
            }),
            netns_pool: s
                .netns_pool
                .unwrap_or(crate::container::nspool::DEFAULT_SIZE),
            dns: s.dns.unwrap_or(true).then(|| {
                s.resolv_conf
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/etc/resolv.conf"))
            }),
            metrics_addr,
        };
        Ok(Resolved { daemon, log })
    }
}

/// `log-level`, else `RUST_LOG`, else `info`; checked as a tracing filter.
fn resolve_log_level(s: &Settings) -> Result<String, String> {
    let level = match &s.log_level {
        Some(l) => l.clone(),
        None => std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    };
    tracing_subscriber::EnvFilter::try_new(&level).map_err(|e| {
        format!("{level:?} is not a level or filter ({e}): use error, warn, info, debug or trace")
    })?;
    Ok(level)
}

/// The settings that a reload applies without a restart.
pub const RELOADABLE: &[&str] = &["log-level"];

/// What a reload found: the keys it can apply, and those that need a restart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// (key, old, new) applied at run time.
    pub apply: Vec<(String, String, String)>,
    /// Keys whose new value takes a restart (`systemctl restart vxnet`).
    pub restart: Vec<String>,
}

/// Compares the running settings with newly merged ones.
pub fn reload_plan(running: &Settings, new: &Settings) -> ReloadPlan {
    let (old, new) = (running.given(), new.given());
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut plan = ReloadPlan::default();
    for k in keys {
        let (o, n) = (old.get(k), new.get(k));
        if o == n {
            continue;
        }
        if RELOADABLE.contains(&k.as_str()) {
            let show = |v: Option<&serde_json::Value>| {
                v.map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                })
                .unwrap_or_else(|| "(default)".into())
            };
            plan.apply.push((k.clone(), show(o), show(n)));
        } else {
            plan.restart.push(k.clone());
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_json(Path::new("/etc/vxnet/daemon.json"), text)
    }

    #[test]
    fn keys_are_the_flag_names() {
        let s = file(
            r#"{"cluster-store": "etcd://192.0.2.5:2379", "lease-ttl": 20,
                "cluster-store-opt": ["kv.cacertfile=/ca.pem"], "docker-plugin": true}"#,
        )
        .unwrap();
        assert_eq!(s.cluster_store.as_deref(), Some("etcd://192.0.2.5:2379"));
        assert_eq!(s.lease_ttl, Some(20));
        assert_eq!(s.docker_plugin, Some(true));
        assert_eq!(s.given().len(), 4);
    }

    #[test]
    fn every_key_round_trips() {
        // A key list that drifts from the struct would refuse a key the flags accept.
        let mut map = serde_json::Map::new();
        for k in Settings::keys() {
            let v = match k {
                "lease-ttl" | "netns-pool" => serde_json::json!(3),
                "docker-plugin" | "dns" => serde_json::json!(true),
                "cluster-store-opt" => serde_json::json!(["a=b"]),
                _ => serde_json::json!("x"),
            };
            map.insert(k.to_string(), v);
        }
        let s = file(&serde_json::Value::Object(map).to_string()).unwrap();
        assert_eq!(s.given().len(), Settings::keys().len());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = file(r#"{"cluster-stor": "etcd://x:1"}"#).unwrap_err();
        assert!(e.to_string().contains("\"cluster-stor\""), "{e}");
        let e = file(r#"{"lease-ttl": "ten"}"#).unwrap_err();
        assert!(e.to_string().contains("\"lease-ttl\""), "{e}");
        let e = file(r#"["cluster-store"]"#).unwrap_err();
        assert!(matches!(e, ConfigError::NotObject { .. }), "{e}");
        let e = file("{").unwrap_err();
        assert!(matches!(e, ConfigError::NotJson { .. }), "{e}");
    }

    #[test]
    fn a_key_in_both_places_is_an_error_and_secrets_stay_hidden() {
        let flags = Settings {
            cluster_store: Some("etcd://a:1".into()),
            etcd_user: Some("vxnet:hunter2".into()),
            ..Default::default()
        };
        let f = file(r#"{"cluster-store": "etcd://b:1", "etcd-user": "vxnet:other"}"#).unwrap();
        let e = Settings::merge(&flags, &f, Path::new("/f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster-store"), "{e}");
        assert!(e.contains("etcd-user"), "{e}");
        assert!(!e.contains("hunter2") && !e.contains("other"), "{e}");
    }

    #[test]
    fn flags_and_file_combine() {
        let flags = Settings {
            cluster_advertise: Some("192.0.2.6".into()),
            ..Default::default()
        };
        let f = file(r#"{"cluster-store": "etcd://192.0.2.5:2379", "node-name": "vm2"}"#).unwrap();
        let merged = Settings::merge(&flags, &f, Path::new("/f")).unwrap();
        let layers = Layers {
            flags,
            file: f,
            path: PathBuf::from("/f"),
            required: true,
        };
        let r = layers.resolve(&merged).unwrap();
        assert_eq!(r.daemon.node_name, "vm2");
        assert_eq!(r.daemon.advertise_addr.to_string(), "192.0.2.6");
        assert_eq!(r.daemon.lease_ttl, Duration::from_secs(15));
    }

    #[test]
    fn resolve_names_the_key_and_its_source() {
        let f = file(
            r#"{"cluster-store": "etcd://192.0.2.5:2379", "cluster-advertise": "192.0.2.6",
                "gateway-bridge-subnet": "10.1.0.0/33"}"#,
        )
        .unwrap();
        let layers = Layers {
            flags: Settings::default(),
            file: f.clone(),
            path: PathBuf::from("/etc/vxnet/daemon.json"),
            required: false,
        };
        let e = layers.resolve(&f).unwrap_err().to_string();
        assert!(
            e.starts_with("gateway-bridge-subnet (from /etc/vxnet/daemon.json)"),
            "{e}"
        );
        let none = Settings::default();
        let e = layers.resolve(&none).unwrap_err();
        assert!(matches!(e, ConfigError::NoClusterStore { .. }), "{e}");
    }

    #[test]
    fn reload_applies_the_log_level_and_names_the_rest() {
        let old = file(r#"{"cluster-store": "etcd://a:1", "log-level": "info"}"#).unwrap();
        let new = file(r#"{"cluster-store": "etcd://b:1", "log-level": "debug"}"#).unwrap();
        let plan = reload_plan(&old, &new);
        assert_eq!(
            plan.apply,
            vec![("log-level".into(), "info".into(), "debug".into())]
        );
        assert_eq!(plan.restart, vec!["cluster-store".to_string()]);
        assert_eq!(reload_plan(&old, &old), ReloadPlan::default());
    }
}
