//! The messages of Docker's legacy remote plugin protocol (network driver and IPAM driver),
//! as an engine sends them: JSON bodies with Docker's field names. Unknown fields are
//! ignored (newer engines add some); missing optional ones take their defaults.
//! shared/notes/docker-plugin-requests.json holds one captured request per call.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The media type every call accepts and every answer carries.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// The option (`docker network create -o` / `--ipam-opt`) naming the vxnet network.
pub const OPT_NETWORK: &str = "vxnet.network";
/// Docker's generic driver options (`-o KEY=VALUE`) inside `CreateNetwork.Options`.
pub const OPT_GENERIC: &str = "com.docker.network.generic";
/// Docker's MTU option for network drivers.
pub const OPT_MTU: &str = "com.docker.network.driver.mtu";
/// `RequestAddress.Options` key saying what the address is for.
pub const OPT_ADDRESS_TYPE: &str = "RequestAddressType";
/// ... and its value for a network's gateway.
pub const ADDRESS_TYPE_GATEWAY: &str = "com.docker.network.gateway";

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ActivateResponse {
    pub implements: Vec<&'static str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CapabilitiesResponse {
    pub scope: &'static str,
    pub connectivity_scope: &'static str,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamData {
    #[serde(default, deserialize_with = "null_as_default")]
    pub address_space: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub pool: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub gateway: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub aux_addresses: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateNetworkRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub options: BTreeMap<String, Value>,
    #[serde(default, rename = "IPv4Data", deserialize_with = "null_as_default")]
    pub ipv4_data: Option<Vec<IpamData>>,
    #[serde(default, rename = "IPv6Data", deserialize_with = "null_as_default")]
    pub ipv6_data: Option<Vec<IpamData>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointInterface {
    #[serde(default, deserialize_with = "null_as_default")]
    pub address: String,
    #[serde(default, rename = "AddressIPv6", deserialize_with = "null_as_default")]
    pub address_ipv6: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub mac_address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateEndpointRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub interface: Option<EndpointInterface>,
}

/// Empty: the address and MAC Docker chose are accepted as they are (echoing them back is
/// refused by the engine).
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateEndpointResponse {
    pub interface: BTreeMap<String, String>,
}

/// DeleteEndpoint, EndpointOperInfo, Leave, Revoke/ProgramExternalConnectivity.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct OperInfoResponse {
    pub value: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct JoinRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub sandbox_key: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct InterfaceName {
    pub src_name: String,
    pub dst_prefix: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct JoinResponse {
    pub interface_name: InterfaceName,
    /// Set only for internal networks: no gateway bridge (Docker's docker_gwbridge) for them.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub disable_gateway_service: bool,
    /// Routes Docker adds in the container for this interface (the name server's address).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub static_routes: Vec<StaticRoute>,
}

/// libnetwork's remote-driver route: `RouteType` 1 (connected) is "via this interface".
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct StaticRoute {
    pub destination: String,
    pub route_type: u8,
}

impl StaticRoute {
    pub const CONNECTED: u8 = 1;
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddressSpacesResponse {
    pub local_default_address_space: &'static str,
    pub global_default_address_space: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamCapabilitiesResponse {
    #[serde(rename = "RequiresMACAddress")]
    pub requires_mac_address: bool,
    pub requires_request_replay: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestPoolRequest {
    #[serde(default, deserialize_with = "null_as_default")]
    pub address_space: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub pool: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub sub_pool: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub options: BTreeMap<String, String>,
    #[serde(default, rename = "V6", deserialize_with = "null_as_default")]
    pub v6: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestPoolResponse {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub pool: String,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PoolRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestAddressRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub address: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestAddressResponse {
    /// CIDR form: `10.0.4.2/24`.
    pub address: String,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ReleaseAddressRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub address: String,
}

/// Go encodes nil maps, slices and pointers as `null`: read those as the empty value.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An empty success answer.
#[derive(Debug, Default, Serialize)]
pub struct Empty {}

/// Docker's error answer.
#[derive(Debug, Serialize)]
pub struct ErrResponse {
    #[serde(rename = "Err")]
    pub err: String,
}

/// The string value of a generic option (`-o` values arrive as strings; be lenient with
/// numbers and booleans someone sends through the API).
pub fn option_str(map: &BTreeMap<String, Value>, key: &str) -> Option<String> {
    match map.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPTURED: &str = include_str!("../../tests/data/docker-plugin-requests.json");

    fn captured(call: &str) -> Value {
        let all: Value = serde_json::from_str(CAPTURED).expect("captured requests parse");
        all[call]["req"].clone()
    }

    #[test]
    fn captured_requests_parse() {
        let r: CreateNetworkRequest =
            serde_json::from_value(captured("/NetworkDriver.CreateNetwork")).unwrap();
        assert_eq!(r.network_id.len(), 64);
        let v4 = r.ipv4_data.unwrap();
        assert_eq!(v4[0].pool, "10.0.7.0/24");
        assert_eq!(v4[0].gateway, "10.0.7.1/24");
        let r: CreateEndpointRequest =
            serde_json::from_value(captured("/NetworkDriver.CreateEndpoint")).unwrap();
        let i = r.interface.unwrap();
        assert_eq!(i.address, "10.0.7.50/24");
        assert_eq!(i.mac_address, "02:42:0a:00:07:32");
        let r: JoinRequest = serde_json::from_value(captured("/NetworkDriver.Join")).unwrap();
        assert!(r.sandbox_key.starts_with("/var/run/docker/netns/"));
        let r: RequestPoolRequest =
            serde_json::from_value(captured("/IpamDriver.RequestPool")).unwrap();
        assert_eq!(r.pool, "10.0.6.0/24");
        let r: RequestAddressRequest =
            serde_json::from_value(captured("/IpamDriver.RequestAddress")).unwrap();
        assert_eq!(
            r.options.get(OPT_ADDRESS_TYPE).map(String::as_str),
            Some(ADDRESS_TYPE_GATEWAY)
        );
        for call in [
            "/NetworkDriver.DeleteEndpoint",
            "/NetworkDriver.Leave",
            "/NetworkDriver.EndpointOperInfo",
            "/NetworkDriver.RevokeExternalConnectivity",
            "/NetworkDriver.ProgramExternalConnectivity",
        ] {
            let r: EndpointRequest = serde_json::from_value(captured(call)).unwrap();
            assert_eq!(r.endpoint_id.len(), 64, "{call}");
        }
        let _: ReleaseAddressRequest =
            serde_json::from_value(captured("/IpamDriver.ReleaseAddress")).unwrap();
        let _: PoolRequest = serde_json::from_value(captured("/IpamDriver.ReleasePool")).unwrap();
        let _: NetworkRequest =
            serde_json::from_value(captured("/NetworkDriver.DeleteNetwork")).unwrap();
    }

    #[test]
    fn go_nulls_read_as_empty() {
        let r: RequestAddressRequest =
            serde_json::from_str(r#"{"PoolID":"vxnet:10.0.4.0/24","Address":"","Options":null}"#)
                .unwrap();
        assert!(r.options.is_empty());
        let r: CreateNetworkRequest = serde_json::from_str(
            r#"{"NetworkID":"x","Options":null,"IPv4Data":null,"IPv6Data":null}"#,
        )
        .unwrap();
        assert!(r.options.is_empty() && r.ipv4_data.is_none());
    }

    #[test]
    fn answers_use_dockers_field_names() {
        let join = JoinResponse {
            interface_name: InterfaceName {
                src_name: "vxd0123456789".into(),
                dst_prefix: "eth",
            },
            disable_gateway_service: false,
            static_routes: vec![StaticRoute {
                destination: "169.254.53.53/32".into(),
                route_type: StaticRoute::CONNECTED,
            }],
        };
        assert_eq!(
            serde_json::to_value(&join).unwrap(),
            serde_json::json!({"InterfaceName": {"SrcName": "vxd0123456789", "DstPrefix": "eth"},
                "StaticRoutes": [{"Destination": "169.254.53.53/32", "RouteType": 1}]})
        );
        assert_eq!(
            serde_json::to_value(CreateEndpointResponse::default()).unwrap(),
            serde_json::json!({"Interface": {}})
        );
        assert_eq!(
            serde_json::to_value(IpamCapabilitiesResponse {
                requires_mac_address: false,
                requires_request_replay: false
            })
            .unwrap(),
            serde_json::json!({"RequiresMACAddress": false, "RequiresRequestReplay": false})
        );
    }
}
