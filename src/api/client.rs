//! A client of the daemon's API over its unix socket: what the CLI and the tests use.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use super::types::{ErrorBody, Info, NetworkInspect};
use crate::cluster::{EndpointCreate, NetworkCreate};
use crate::container::{ConnectRequest, CreateRequest, StartRequest};
use crate::events::{EventFilter, StreamLine};
use crate::model::{Endpoint, Network};
use crate::reconcile::ResyncReport;
use crate::registry::ContainerRecord;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid daemon address {0:?}: use unix:///path/to/vxnet.sock")]
    InvalidHost(String),
    #[error("cannot connect to the vxnet daemon at unix://{socket}: {source}. Is `vxnet daemon` running? (-H or VXNET_HOST choose another socket)")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("Error response from daemon: {message}")]
    Api { status: StatusCode, message: String },
    #[error("talking to the vxnet daemon failed: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The HTTP status of an API error answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// One daemon's API.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// `host` is `unix:///path` or a plain path.
    pub fn new(host: &str) -> Result<Self, ClientError> {
        let path = host.strip_prefix("unix://").unwrap_or(host);
        if path.is_empty()
            || !path.starts_with('/')
            || host.contains("://") && !host.starts_with("unix://")
        {
            return Err(ClientError::InvalidHost(host.to_string()));
        }
        Ok(Client {
            socket: PathBuf::from(path),
        })
    }

    /// A client of the daemon listening on `socket`.
    pub fn from_socket(socket: PathBuf) -> Self {
        Client { socket }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; a body is sent as JSON. Returns the status and raw body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// Sends one request and returns the answer as it starts (its body still to be read).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "vxnet");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (status, bytes) = self.raw(method, path, body).await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api { status, message });
        }
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("unexpected answer ({status}): {e}")))
    }

    pub async fn info(&self) -> Result<Info, ClientError> {
        self.call(Method::GET, "/v1/info", None::<&()>).await
    }

    /// Every host of the cluster with its health (`vxnet node ls`).
    pub async fn node_ls(&self) -> Result<Vec<crate::health::NodeStatus>, ClientError> {
        self.call(Method::GET, "/v1/nodes", None::<&()>).await
    }

    /// Forgets a host that is gone (`vxnet node rm`).
    pub async fn node_rm(&self, reference: &str) -> Result<crate::health::NodeStatus, ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/nodes/{}", escape(reference)),
            None::<&()>,
        )
        .await
    }

    pub async fn network_ls(&self) -> Result<Vec<Network>, ClientError> {
        self.call(Method::GET, "/v1/networks", None::<&()>).await
    }

    pub async fn network_create(&self, req: &NetworkCreate) -> Result<Network, ClientError> {
        self.call(Method::POST, "/v1/networks", Some(req)).await
    }

    pub async fn network_inspect(&self, reference: &str) -> Result<NetworkInspect, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/networks/{}", escape(reference)),
            None::<&()>,
        )
        .await
    }

    pub async fn network_rm(&self, reference: &str) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/networks/{}", escape(reference)),
            None::<&()>,
        )
        .await
    }

    pub async fn endpoint_create(
        &self,
        network: &str,
        req: &EndpointCreate,
    ) -> Result<Endpoint, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/networks/{}/endpoints", escape(network)),
            Some(req),
        )
        .await
    }

    pub async fn endpoint_delete(&self, network: &str, endpoint: &str) -> Result<(), ClientError> {
        self.endpoint_delete_opts(network, endpoint, false).await
    }

    /// With `force`, deletes another host's endpoint too (see docs/api.md).
    pub async fn endpoint_delete_opts(
        &self,
        network: &str,
        endpoint: &str,
        force: bool,
    ) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &format!(
                "/v1/networks/{}/endpoints/{}{}",
                escape(network),
                escape(endpoint),
                if force { "?force=true" } else { "" }
            ),
            None::<&()>,
        )
        .await
    }
}

impl Client {
    pub async fn containers(&self) -> Result<Vec<ContainerRecord>, ClientError> {
        self.call(Method::GET, "/v1/containers", None::<&()>).await
    }

    pub async fn container(&self, reference: &str) -> Result<ContainerRecord, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/containers/{}", escape(reference)),
            None::<&()>,
        )
        .await
    }

    pub async fn container_create(
        &self,
        req: &CreateRequest,
    ) -> Result<ContainerRecord, ClientError> {
        self.call(Method::POST, "/v1/containers", Some(req)).await
    }

    pub async fn container_start(
        &self,
        reference: &str,
        pid: u32,
    ) -> Result<ContainerRecord, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/containers/{}/start", escape(reference)),
            Some(&StartRequest { pid }),
        )
        .await
    }

    pub async fn container_stop(
        &self,
        reference: &str,
        grace_secs: u64,
    ) -> Result<ContainerRecord, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/containers/{}/stop?t={grace_secs}", escape(reference)),
            None::<&()>,
        )
        .await
    }

    pub async fn container_rm(&self, reference: &str, force: bool) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/containers/{}?force={force}", escape(reference)),
            None::<&()>,
        )
        .await
    }

    pub async fn network_connect(
        &self,
        container: &str,
        req: &ConnectRequest,
    ) -> Result<ContainerRecord, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/containers/{}/networks", escape(container)),
            Some(req),
        )
        .await
    }

    pub async fn network_disconnect(
        &self,
        container: &str,
        network: &str,
    ) -> Result<ContainerRecord, ClientError> {
        self.call(
            Method::DELETE,
            &format!(
                "/v1/containers/{}/networks/{}",
                escape(container),
                escape(network)
            ),
            None::<&()>,
        )
        .await
    }

    pub async fn reconcile(&self) -> Result<ResyncReport, ClientError> {
        self.call(Method::POST, "/v1/reconcile", None::<&()>).await
    }

    /// This host's kernel state checked against the store; changes nothing.
    pub async fn doctor(&self) -> Result<super::types::DoctorReport, ClientError> {
        self.call(Method::GET, "/v1/doctor", None::<&()>).await
    }

    /// `GET /v1/events`: the cluster events `filter` selects, read line by line.
    pub async fn events(&self, filter: &EventFilter) -> Result<EventStream, ClientError> {
        let query: Vec<String> = filter
            .query_pairs()
            .iter()
            .map(|(k, v)| format!("{k}={}", escape(v)))
            .collect();
        let resp = self
            .send(
                Method::GET,
                &format!("/v1/events?{}", query.join("&")),
                None,
            )
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Protocol(e.to_string()))?
                .to_bytes();
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api { status, message });
        }
        Ok(EventStream {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }
}

/// The lines of an event stream, as they arrive.
pub struct EventStream {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl EventStream {
    /// The next line; `None` when the daemon ended the stream.
    pub async fn next(&mut self) -> Result<Option<StreamLine>, ClientError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                // The daemon's heartbeat on a quiet stream.
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line).map(Some).map_err(|e| {
                    ClientError::Protocol(format!(
                        "unreadable event from the daemon ({e}): {}",
                        String::from_utf8_lossy(&line).trim_end()
                    ))
                });
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(ClientError::Protocol(e.to_string())),
                None if self.buf.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                None => {
                    return Err(ClientError::Protocol(
                        "the event stream ended in the middle of a line".into(),
                    ))
                }
            }
        }
    }
}

/// Percent-encodes a path segment (names may hold characters a URI path cannot).
fn escape(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
