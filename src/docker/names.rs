//! Docker containers' names and `--network-alias`es, learned from the local engine's API.
//!
//! The remote-driver protocol gives the plugin no container name (CreateEndpoint and Join
//! carry IDs only), so a Docker endpoint is stored under its short ID. This watcher reads the
//! engine's `network connect` events, inspects the container, and writes its name and aliases
//! into the endpoint's record (one etcd transaction per change), so that every host's name
//! server answers for it. On start, and whenever the event stream is re-opened, it goes over
//! every running container once, so that nothing connected meanwhile is missed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;

use super::PluginState;
use crate::backoff::Backoff;
use crate::cluster::Cluster;
use crate::model::Id;

/// The engine's API as the watcher uses it (1.41: Docker 20.10 and later answer it).
const API: &str = "/v1.41";
/// The largest inspect answer read (a container's JSON is a few KiB).
const MAX_ANSWER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot reach the Docker engine at {socket}: {source} (is dockerd running? --docker-host names its socket)")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("the Docker engine's answer to {path} was {status}")]
    Status { path: String, status: StatusCode },
    #[error("talking to the Docker engine failed: {0}")]
    Protocol(String),
}

#[derive(Debug, Deserialize)]
struct Inspect {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "NetworkSettings", default)]
    network_settings: Option<NetworkSettings>,
}

#[derive(Debug, Deserialize)]
struct NetworkSettings {
    #[serde(rename = "Networks", default)]
    networks: BTreeMap<String, EndpointSettings>,
}

#[derive(Debug, Deserialize)]
struct EndpointSettings {
    #[serde(rename = "EndpointID", default)]
    endpoint_id: String,
    #[serde(rename = "Aliases", default)]
    aliases: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct Listed {
    #[serde(rename = "Id")]
    id: String,
}

#[derive(Debug, Deserialize)]
struct Event {
    #[serde(rename = "Action", default)]
    action: String,
    #[serde(rename = "Actor", default)]
    actor: Option<Actor>,
}

#[derive(Debug, Deserialize)]
struct Actor {
    #[serde(rename = "Attributes", default)]
    attributes: BTreeMap<String, String>,
}

pub struct NameWatcher {
    socket: PathBuf,
    cluster: Arc<Cluster>,
    state: Arc<PluginState>,
}

impl NameWatcher {
    pub fn new(socket: PathBuf, cluster: Arc<Cluster>, state: Arc<PluginState>) -> Self {
        NameWatcher {
            socket,
            cluster,
            state,
        }
    }

    /// Runs until the daemon stops: follows the engine's events, catching up after each
    /// reconnect; waits (with backoff) while the engine is away.
    pub async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut warned = false;
        loop {
            match self.follow().await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "cannot learn Docker containers' names yet; retrying");
                        warned = true;
                    }
                }
            }
            backoff.wait().await;
        }
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, EngineError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| EngineError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| EngineError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn get(&self, path: &str) -> Result<hyper::Response<hyper::body::Incoming>, EngineError> {
        let mut sender = self.connect().await?;
        let req = Request::get(format!("{API}{path}"))
            .header("Host", "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|e| EngineError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| EngineError::Protocol(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(EngineError::Status {
                path: path.to_string(),
                status: resp.status(),
            });
        }
        Ok(resp)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, EngineError> {
        let body = http_body_util::Limited::new(self.get(path).await?.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| EngineError::Protocol(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|e| EngineError::Protocol(format!("{path}: {e}")))
    }

    /// Opens the event stream, then catches up on every running container, then applies
    /// each `connect` as it comes. Returns when the stream ends.
    async fn follow(&self) -> Result<(), EngineError> {
        let filters = r#"{"type":["network"],"event":["connect"]}"#;
        let events = self
            .get(&format!("/events?filters={}", percent(filters)))
            .await?;
        for c in self.get_json::<Vec<Listed>>("/containers/json").await? {
            self.learn(&c.id).await;
        }
        let mut body = events.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| EngineError::Protocol(e.to_string()))?;
            let Some(chunk) = frame.data_ref() else {
                continue;
            };
            pending.extend_from_slice(chunk);
            // One JSON object per event; a chunk may hold several or part of one.
            let mut stream = serde_json::Deserializer::from_slice(&pending).into_iter::<Event>();
            let mut used = 0;
            let mut containers = Vec::new();
            while let Some(ev) = stream.next() {
                match ev {
                    Ok(ev) => {
                        used = stream.byte_offset();
                        if ev.action == "connect" {
                            if let Some(c) = ev
                                .actor
                                .and_then(|a| a.attributes.get("container").cloned())
                            {
                                containers.push(c);
                            }
                        }
                    }
                    Err(e) if e.is_eof() => break,
                    Err(e) => return Err(EngineError::Protocol(format!("event stream: {e}"))),
                }
            }
            pending.drain(..used);
            if pending.len() > MAX_ANSWER {
                return Err(EngineError::Protocol("an event larger than 1 MiB".into()));
            }
            for c in containers {
                self.learn(&c).await;
            }
        }
        Ok(())
    }

    /// Writes container `id`'s name and aliases into the records of its endpoints that this
    /// host's plugin made.
    async fn learn(&self, id: &str) {
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) || id.is_empty() || id.len() > 64 {
            return;
        }
        let inspect: Inspect = match self.get_json(&format!("/containers/{id}/json")).await {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(container = id, error = %e, "cannot inspect a Docker container");
                return;
            }
        };
        let name = inspect.name.trim_start_matches('/').to_string();
        for settings in inspect
            .network_settings
            .map(|n| n.networks.into_values())
            .into_iter()
            .flatten()
        {
            let Some(rec) = self.state.endpoints.get(&settings.endpoint_id) else {
                continue; // another driver's network
            };
            let mut aliases: Vec<String> = settings
                .aliases
                .unwrap_or_default()
                .into_iter()
                .filter(|a| a != &name)
                .filter(|a| crate::validate::validate_alias(a).is_ok())
                .collect();
            aliases.sort();
            aliases.dedup();
            aliases.truncate(crate::validate::MAX_ALIASES);
            let ep: Id = rec.endpoint.id.clone();
            match self
                .cluster
                .set_endpoint_names(&rec.endpoint.network_id, &ep, &name, &aliases)
                .await
            {
                Ok(true) => {
                    tracing::info!(
                        endpoint = ep.short(),
                        name,
                        ?aliases,
                        "Docker container's names stored"
                    )
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(endpoint = ep.short(), error = %e, "cannot store a Docker container's names")
                }
            }
        }
    }
}

/// Percent-encodes a query value (the filter JSON).
fn percent(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
