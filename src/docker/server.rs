//! The plugin's transport: HTTP over a unix socket, every call a POST to `/<Interface>.<Call>`
//! with a JSON body (often without a Content-Type, sometimes empty). Failures are answered
//! `{"Err": "…"}`, which Docker shows to the user; nothing a request carries can panic the
//! daemon.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::plugin::{DockerPlugin, ADDRESS_SPACE};
use super::protocol::*;
use super::MAX_BODY;
use crate::error::Error;

pub fn router(plugin: Arc<DockerPlugin>) -> Router {
    Router::new()
        .fallback(dispatch)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(plugin)
}

fn answer<T: Serialize>(status: StatusCode, body: &T) -> Response {
    // These answers are plain structs: serializing them cannot fail.
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], bytes).into_response()
}

fn failure(status: StatusCode, message: String) -> Response {
    answer(status, &ErrResponse { err: message })
}

/// The request, or the 400 answer saying what is wrong with it.
fn parse<T: DeserializeOwned>(call: &str, body: &Bytes) -> Result<T, Box<Response>> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        Box::new(failure(
            StatusCode::BAD_REQUEST,
            format!("invalid {call} request: {e}"),
        ))
    })
}

fn reply<T: Serialize>(call: &str, r: Result<T, Error>) -> Response {
    match r {
        Ok(v) => answer(StatusCode::OK, &v),
        Err(e) => {
            tracing::warn!(call, error = %e, "Docker plugin call failed");
            failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

async fn dispatch(
    State(plugin): State<Arc<DockerPlugin>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let call = uri.path().trim_start_matches('/');
    if method != Method::POST {
        return failure(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{call}: plugin calls are POSTs"),
        );
    }
    let started = std::time::Instant::now();
    let response = handle(&plugin, call, &body).await;
    if response.status() != StatusCode::NOT_FOUND {
        plugin.count_call(call, started.elapsed());
    }
    tracing::debug!(call, status = %response.status(), elapsed_us = started.elapsed().as_micros() as u64, "Docker plugin call");
    response
}

async fn handle(plugin: &DockerPlugin, call: &str, body: &Bytes) -> Response {
    macro_rules! with {
        ($req:ty, $f:expr) => {
            match parse::<$req>(call, body) {
                Ok(req) => reply(call, $f(req).await),
                Err(resp) => *resp,
            }
        };
    }
    match call {
        "Plugin.Activate" => answer(
            StatusCode::OK,
            &ActivateResponse {
                implements: vec!["NetworkDriver", "IpamDriver"],
            },
        ),
        "NetworkDriver.GetCapabilities" => answer(StatusCode::OK, &plugin.capabilities()),
        "NetworkDriver.CreateNetwork" => {
            with!(CreateNetworkRequest, |r| plugin.create_network(r))
        }
        "NetworkDriver.DeleteNetwork" => with!(NetworkRequest, |r| plugin.delete_network(r)),
        "NetworkDriver.CreateEndpoint" => {
            with!(CreateEndpointRequest, |r| plugin.create_endpoint(r))
        }
        "NetworkDriver.DeleteEndpoint" => {
            with!(EndpointRequest, |r| plugin.delete_endpoint(r))
        }
        "NetworkDriver.EndpointOperInfo" => match parse::<EndpointRequest>(call, body) {
            Ok(req) => answer(StatusCode::OK, &plugin.endpoint_info(req)),
            Err(resp) => *resp,
        },
        "NetworkDriver.Join" => with!(JoinRequest, |r| plugin.join(r)),
        "NetworkDriver.Leave" => with!(EndpointRequest, |r| plugin.leave(r)),
        // vxnet learns hosts from its own store, and Docker's gateway bridge (not vxnet)
        // carries published ports for plugin networks.
        "NetworkDriver.DiscoverNew"
        | "NetworkDriver.DiscoverDelete"
        | "NetworkDriver.ProgramExternalConnectivity"
        | "NetworkDriver.RevokeExternalConnectivity" => answer(StatusCode::OK, &Empty {}),
        "NetworkDriver.AllocateNetwork" | "NetworkDriver.FreeNetwork" => failure(
            StatusCode::NOT_IMPLEMENTED,
            format!("{call} is not supported: vxnet is a standalone (non-swarm) network plugin"),
        ),
        "IpamDriver.GetCapabilities" => answer(
            StatusCode::OK,
            &IpamCapabilitiesResponse {
                requires_mac_address: false,
                requires_request_replay: false,
            },
        ),
        "IpamDriver.GetDefaultAddressSpaces" => answer(
            StatusCode::OK,
            &AddressSpacesResponse {
                local_default_address_space: ADDRESS_SPACE,
                global_default_address_space: ADDRESS_SPACE,
            },
        ),
        "IpamDriver.RequestPool" => with!(RequestPoolRequest, |r| plugin.request_pool(r)),
        "IpamDriver.ReleasePool" => match parse::<PoolRequest>(call, body) {
            // Pools are the networks' subnets, nothing is held per pool.
            Ok(_) => answer(StatusCode::OK, &Empty {}),
            Err(resp) => *resp,
        },
        "IpamDriver.RequestAddress" => {
            with!(RequestAddressRequest, |r| plugin.request_address(r))
        }
        "IpamDriver.ReleaseAddress" => {
            with!(ReleaseAddressRequest, |r| plugin.release_address(r))
        }
        _ => failure(
            StatusCode::NOT_FOUND,
            format!("{call}: not a call of the NetworkDriver or IpamDriver protocols"),
        ),
    }
}
