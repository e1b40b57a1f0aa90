//! Serves the API on the daemon's unix socket.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};

use super::types::{EndpointInfo, ErrorBody, Info, NetworkInspect, RejectedRecordInfo};
use crate::cluster::LeaseSource;
use crate::cluster::{Cluster, EndpointCreate, NetworkCreate};
use crate::container::{ConnectRequest, ContainerService, CreateRequest, StartRequest};
use crate::error::{Error, ErrorKind};
use crate::model::{Network, Node, SCOPE_GLOBAL};
use crate::node::Membership;
use crate::reconcile::{Reconciler, ResyncReport};
use crate::registry::ContainerRecord;
use crate::view::{ClusterView, SharedView};

/// Request bodies are small JSON documents; anything larger is refused before parsing.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a write waits for the daemon's own view to show it before answering.
const READ_YOUR_WRITES: Duration = Duration::from_secs(2);

/// What the handlers share.
pub struct ApiState {
    pub cluster: Arc<Cluster>,
    pub containers: Arc<ContainerService>,
    pub reconciler: Arc<Reconciler>,
    pub view: SharedView,
    pub membership: Arc<Membership>,
    pub node: Node,
    /// Served with `--docker-plugin`: its call counts show in `vxnet info`.
    pub docker_plugin: Option<Arc<crate::docker::plugin::DockerPlugin>>,
    /// When this host's view last changed (for lag in `vxnet node ls`).
    pub change_clock: Arc<crate::health::ChangeClock>,
    /// The cluster events of the view's watch (`GET /v1/events`).
    pub events: Arc<crate::events::EventHub>,
}

type AppState = Arc<ApiState>;

/// An error answer: status from the error's kind, body `{"message": ...}`.
pub struct ApiError(StatusCode, String);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match e.kind() {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, format!("invalid request body: {}", r.body_text()))
    }
}

impl From<crate::health::HealthError> for ApiError {
    fn from(e: crate::health::HealthError) -> Self {
        use crate::health::HealthError as H;
        let status = match &e {
            H::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            H::NoSuchNode(_) => StatusCode::NOT_FOUND,
            H::Ambiguous(_) => StatusCode::BAD_REQUEST,
            H::Alive(_) => StatusCode::CONFLICT,
        };
        ApiError(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { message: self.1 })).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/info", get(info))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{reference}", axum::routing::delete(remove_node))
        .route("/v1/networks", get(list_networks).post(create_network))
        .route(
            "/v1/networks/{reference}",
            get(inspect_network).delete(remove_network),
        )
        .route(
            "/v1/networks/{reference}/endpoints",
            axum::routing::post(create_endpoint),
        )
        .route(
            "/v1/networks/{reference}/endpoints/{endpoint}",
            delete(delete_endpoint),
        )
        .route(
            "/v1/containers",
            get(list_containers).post(create_container),
        )
        .route(
            "/v1/containers/{container}",
            get(get_container).delete(remove_container),
        )
        .route(
            "/v1/containers/{container}/start",
            axum::routing::post(start_container),
        )
        .route(
            "/v1/containers/{container}/stop",
            axum::routing::post(stop_container),
        )
        .route(
            "/v1/containers/{container}/networks",
            axum::routing::post(connect_container),
        )
        .route(
            "/v1/containers/{container}/networks/{network}",
            delete(disconnect_container),
        )
        .route("/v1/reconcile", axum::routing::post(reconcile))
        .route("/v1/doctor", get(doctor))
        .route("/v1/cni/add", axum::routing::post(cni_add))
        .route("/v1/cni/del", axum::routing::post(cni_del))
        .route("/v1/cni/check", axum::routing::post(cni_check))
        .route("/v1/cni/gc", axum::routing::post(cni_gc))
        .route("/v1/cni/status", get(cni_status))
        .route("/v1/events", get(events))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such API route: see docs/api.md".into(),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Runs `f` on the view, which must have been listed at least once.
fn with_synced<R>(state: &ApiState, f: impl FnOnce(&ClusterView) -> ApiResult<R>) -> ApiResult<R> {
    state.view.with(|view| {
        if view.revision == 0 {
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "this daemon has not synced with the cluster store yet; check `vxnet info` and etcd"
                    .into(),
            ));
        }
        f(view)
    })
}

async fn node_statuses(state: &ApiState) -> Result<Vec<crate::health::NodeStatus>, ApiError> {
    crate::health::cluster_status(
        state.cluster.store().as_ref(),
        state.cluster.keys(),
        &state.view,
        &state.node.id,
        &state.change_clock,
    )
    .await
    .map_err(|e| crate::health::HealthError::from(e).into())
}

async fn list_nodes(
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<crate::health::NodeStatus>>> {
    Ok(Json(node_statuses(&state).await?))
}

async fn remove_node(
    State(state): State<AppState>,
    Path(reference): Path<String>,
) -> ApiResult<Json<crate::health::NodeStatus>> {
    let statuses = node_statuses(&state).await?;
    Ok(Json(
        crate::health::remove_node(
            state.cluster.store().as_ref(),
            state.cluster.keys(),
            &statuses,
            &reference,
        )
        .await?,
    ))
}

async fn info(State(state): State<AppState>) -> ApiResult<Json<Info>> {
    // Read before the view's lock is taken: it reads the view itself.
    let dns = state.reconciler.dns().map(|d| d.info());
    Ok(Json(state.view.with(|view| {
        Info {
            version: env!("CARGO_PKG_VERSION").to_string(),
            node: state.node.clone(),
            cluster_store: state.cluster.store().describe(),
            store_prefix: state.cluster.keys().prefix().to_string(),
            registered: state.membership.current_lease().is_some(),
            synced: state.membership.current_lease().is_some()
                && view.revision >= state.membership.registered_at()
                && view.revision > 0,
            view_revision: view.revision,
            nodes: view.nodes.values().cloned().collect(),
            networks: view.networks.len(),
            endpoints: view.endpoints.values().map(|e| e.len()).sum(),
            store_error: state.membership.store_error(),
            rejected_records: view
                .rejected()
                .iter()
                .take(Info::REJECTED_SHOWN)
                .map(|(key, r)| RejectedRecordInfo {
                    key: key.clone(),
                    kind: r.kind.to_string(),
                    reason: r.reason.to_string(),
                    mod_revision: r.mod_revision,
                })
                .collect(),
            records_rejected: view.rejections(),
            network_errors: state.reconciler.network_errors(),
            docker_plugin_calls: state
                .docker_plugin
                .as_ref()
                .map(|p| p.call_stats())
                .unwrap_or_default(),
            dns,
        }
    })))
}

/// Streams cluster events as newline-delimited JSON (see `crate::events`).
async fn events(
    State(state): State<AppState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Response> {
    use crate::events::{decode_query, ndjson, EventFilter};
    let pairs = decode_query(query.as_deref().unwrap_or(""));
    let filter = EventFilter::from_query(&pairs, std::time::SystemTime::now())
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let sub = state.events.subscribe(filter.since);
    let body = axum::body::Body::from_stream(ndjson(sub, filter));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response())
}

async fn list_networks(State(state): State<AppState>) -> ApiResult<Json<Vec<Network>>> {
    let mut nets: Vec<Network> = with_synced(&state, |view| {
        Ok(view.networks.values().map(|n| n.network.clone()).collect())
    })?;
    nets.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(nets))
}

fn inspect(view: &ClusterView, reference: &str) -> ApiResult<NetworkInspect> {
    let stored = view.resolve_network(reference)?;
    let endpoints = view
        .endpoints_of(&stored.network.id)
        .map(|e| {
            let node = view.nodes.get(&e.node_id);
            EndpointInfo {
                endpoint: e.clone(),
                node_name: node.map(|n| n.name.clone()),
                node_addr: node.map(|n| n.advertise_addr),
            }
        })
        .collect();
    Ok(NetworkInspect {
        network: stored.network.clone(),
        scope: SCOPE_GLOBAL.to_string(),
        endpoints,
    })
}

async fn inspect_network(
    State(state): State<AppState>,
    Path(reference): Path<String>,
) -> ApiResult<Json<NetworkInspect>> {
    Ok(Json(with_synced(&state, |view| inspect(view, &reference))?))
}

async fn create_network(
    State(state): State<AppState>,
    body: Result<Json<NetworkCreate>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Network>)> {
    let Json(req) = body?;
    let known = with_synced(&state, |v| Ok(v.known_networks())).ok();
    let written = state.cluster.create_network(req, known).await?;
    state
        .view
        .wait_for(written.revision, READ_YOUR_WRITES)
        .await;
    Ok((StatusCode::CREATED, Json(written.value)))
}

async fn remove_network(
    State(state): State<AppState>,
    Path(reference): Path<String>,
) -> ApiResult<StatusCode> {
    let written = state.cluster.remove_network(&reference).await?;
    state
        .view
        .wait_for(written.revision, READ_YOUR_WRITES)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_endpoint(
    State(state): State<AppState>,
    Path(reference): Path<String>,
    body: Result<Json<EndpointCreate>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<crate::model::Endpoint>)> {
    let Json(req) = body?;
    let network = match state.view.with(|v| v.resolve_network(&reference).cloned()) {
        Ok(n) => n,
        // Not in this daemon's view (yet): ask the store itself before saying no.
        Err(_) => {
            let (networks, _) = state.cluster.read_networks().await?;
            crate::cluster::resolve(&networks, &reference)?.clone()
        }
    };
    let known = state
        .view
        .with(|v| (v.revision > 0).then(|| v.known_addresses(&network.network.id)));
    let written = state.cluster.create_endpoint(&network, req, known).await?;
    state
        .view
        .wait_for(written.revision, READ_YOUR_WRITES)
        .await;
    Ok((StatusCode::CREATED, Json(written.value)))
}

async fn delete_endpoint(
    State(state): State<AppState>,
    Path((reference, endpoint)): Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<RemoveQuery>,
) -> ApiResult<StatusCode> {
    let network = state
        .view
        .with(|v| v.resolve_network(&reference).cloned())?;
    let id = view_endpoint_id(&state, &network.network.id, &endpoint)?;
    // Another host's endpoint is its daemon's to release; force is the operator's override.
    let owner = (!q.force.unwrap_or(false)).then_some(&state.node.id);
    let written = match state
        .cluster
        .delete_endpoint_of(&network.network.id, &id, owner)
        .await
    {
        Err(Error::ForeignEndpoint { endpoint, owner }) => {
            let named = state.view.with(|v| {
                v.nodes
                    .values()
                    .find(|n| n.id.to_string() == owner)
                    .map(|n| format!("{} ({owner})", n.name))
            });
            return Err(Error::ForeignEndpoint {
                endpoint,
                owner: named.unwrap_or(owner),
            }
            .into());
        }
        r => r?,
    };
    state
        .view
        .wait_for(written.revision, READ_YOUR_WRITES)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Finds an endpoint of a network by full ID, name or unique ID prefix.
fn view_endpoint_id(
    state: &ApiState,
    net: &crate::model::NetworkId,
    reference: &str,
) -> ApiResult<crate::model::EndpointId> {
    state.view.with(|v| {
        let eps: Vec<_> = v.endpoints_of(net).collect();
        if let Some(e) = eps
            .iter()
            .find(|e| e.id.as_str() == reference || e.name == reference)
        {
            return Ok(e.id.clone());
        }
        let mut m = eps.iter().filter(|e| e.id.as_str().starts_with(reference));
        match (m.next(), m.next()) {
            (Some(e), None) if !reference.is_empty() => Ok(e.id.clone()),
            _ => Err(Error::EndpointNotFound(reference.to_string()).into()),
        }
    })
}

async fn list_containers(State(state): State<AppState>) -> Json<Vec<ContainerRecord>> {
    Json(state.containers.list())
}

async fn get_container(
    State(state): State<AppState>,
    Path(container): Path<String>,
) -> ApiResult<Json<ContainerRecord>> {
    Ok(Json(state.containers.get(&container)?))
}

async fn create_container(
    State(state): State<AppState>,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<ContainerRecord>)> {
    let Json(req) = body?;
    let record = state.containers.create(req).await?;
    Ok((StatusCode::CREATED, Json(record)))
}

async fn start_container(
    State(state): State<AppState>,
    Path(container): Path<String>,
    body: Result<Json<StartRequest>, JsonRejection>,
) -> ApiResult<Json<ContainerRecord>> {
    let Json(req) = body?;
    Ok(Json(state.containers.start(&container, req.pid).await?))
}

#[derive(serde::Deserialize)]
struct StopQuery {
    /// Seconds to wait after SIGTERM before SIGKILL (Docker's `-t`, default 10).
    t: Option<u64>,
}

async fn stop_container(
    State(state): State<AppState>,
    Path(container): Path<String>,
    axum::extract::Query(q): axum::extract::Query<StopQuery>,
) -> ApiResult<Json<ContainerRecord>> {
    let grace = Duration::from_secs(q.t.unwrap_or(10).min(3600));
    Ok(Json(state.containers.stop(&container, grace).await?))
}

#[derive(serde::Deserialize)]
struct RemoveQuery {
    force: Option<bool>,
}

async fn remove_container(
    State(state): State<AppState>,
    Path(container): Path<String>,
    axum::extract::Query(q): axum::extract::Query<RemoveQuery>,
) -> ApiResult<StatusCode> {
    state
        .containers
        .remove(&container, q.force.unwrap_or(false))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn connect_container(
    State(state): State<AppState>,
    Path(container): Path<String>,
    body: Result<Json<ConnectRequest>, JsonRejection>,
) -> ApiResult<Json<ContainerRecord>> {
    let Json(req) = body?;
    Ok(Json(state.containers.connect(&container, req).await?))
}

async fn disconnect_container(
    State(state): State<AppState>,
    Path((container, network)): Path<(String, String)>,
) -> ApiResult<Json<ContainerRecord>> {
    Ok(Json(
        state.containers.disconnect(&container, &network).await?,
    ))
}

async fn reconcile(State(state): State<AppState>) -> ApiResult<Json<ResyncReport>> {
    Ok(Json(state.reconciler.resync().await?))
}

/// Read only: this host's kernel state against the store (`vxnet doctor`).
async fn doctor(State(state): State<AppState>) -> ApiResult<Json<super::types::DoctorReport>> {
    Ok(Json(state.reconciler.doctor().await?))
}

// The CNI plugin's calls (`vxnet-cni`, src/cni/): see docs/api.md.

/// Serves one CNI request and counts it by command and outcome (docs/metrics.md).
async fn cni_counted<T>(
    command: &'static str,
    serve: impl std::future::Future<Output = ApiResult<T>>,
) -> ApiResult<T> {
    let served = serve.await;
    let result = match &served {
        Ok(_) => "ok",
        Err(ApiError(status, _)) => match *status {
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::CONFLICT => "conflict",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable",
            s if s.is_client_error() => "invalid",
            _ => "internal",
        },
    };
    crate::metrics::cni_request(command, result);
    served
}

async fn cni_add(
    State(state): State<AppState>,
    body: Result<Json<crate::cni::requests::AddRequest>, JsonRejection>,
) -> ApiResult<Json<crate::cni::requests::Attachment>> {
    cni_counted("add", async {
        let Json(req) = body?;
        Ok(Json(state.containers.cni_add(req).await?))
    })
    .await
}

async fn cni_del(
    State(state): State<AppState>,
    body: Result<Json<crate::cni::requests::AttachmentRef>, JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    cni_counted("del", async {
        let Json(req) = body?;
        state.containers.cni_del(req).await?;
        Ok(Json(serde_json::json!({})))
    })
    .await
}

async fn cni_check(
    State(state): State<AppState>,
    body: Result<Json<crate::cni::requests::AttachmentRef>, JsonRejection>,
) -> ApiResult<Json<crate::cni::requests::Attachment>> {
    cni_counted("check", async {
        let Json(req) = body?;
        Ok(Json(state.containers.cni_check(req).await?))
    })
    .await
}

async fn cni_gc(
    State(state): State<AppState>,
    body: Result<Json<crate::cni::requests::GcRequest>, JsonRejection>,
) -> ApiResult<Json<crate::cni::requests::GcReport>> {
    cni_counted("gc", async {
        let Json(req) = body?;
        Ok(Json(
            state.containers.cni_gc(&req.network, &req.valid).await?,
        ))
    })
    .await
}

#[derive(serde::Deserialize)]
struct StatusQuery {
    network: String,
}

/// How long STATUS waits for the store to answer before saying it cannot serve ADD.
const STATUS_PROBE: Duration = Duration::from_secs(2);

/// Whether an ADD on `network` would be served now: the daemon is synced and registered,
/// the store answers (an ADD claims its address there), and the network exists.
async fn cni_status(
    State(state): State<AppState>,
    q: axum::extract::Query<StatusQuery>,
) -> Json<crate::cni::requests::Status> {
    let status = cni_readiness(state, q).await;
    let result = if status.ready { "ready" } else { "not_ready" };
    crate::metrics::cni_request("status", result);
    status
}

async fn cni_readiness(
    state: AppState,
    axum::extract::Query(q): axum::extract::Query<StatusQuery>,
) -> Json<crate::cni::requests::Status> {
    use crate::cni::requests::Status;
    let not = |reason: String| {
        Json(Status {
            ready: false,
            reason: Some(reason),
        })
    };
    let Some(lease) = state.membership.current_lease() else {
        return not(
            "this daemon is not registered in the cluster store; check `vxnet info` and etcd"
                .into(),
        );
    };
    let probe = tokio::time::timeout(STATUS_PROBE, state.cluster.store().lease_ttl(lease)).await;
    match probe {
        Err(_) => {
            return not(format!(
                "the cluster store did not answer within {}s; check etcd ({})",
                STATUS_PROBE.as_secs(),
                state.cluster.store().describe()
            ))
        }
        Ok(Err(e)) => return not(format!("the cluster store is unreachable: {e}")),
        Ok(Ok(None)) => {
            return not(
                "this daemon's lease in the cluster store expired; it is registering again".into(),
            )
        }
        Ok(Ok(Some(_))) => {}
    }
    let known = state.view.with(|v| {
        (v.revision > 0).then(|| {
            v.resolve_network(&q.network)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    });
    match known {
        None => not("this daemon has not synced with the cluster store yet".into()),
        Some(Err(e)) => not(e),
        Some(Ok(())) => Json(Status {
            ready: true,
            reason: None,
        }),
    }
}
