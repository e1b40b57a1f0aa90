//! Which networks' names a local endpoint may see: those of its container. vxnet's own
//! containers are in the registry; Docker's are in the plugin's endpoint records.

use crate::docker::PluginState;
use crate::model::{EndpointId, NetworkId};
use crate::registry::Registry;

use super::ContainerScope;

impl ContainerScope for Registry {
    fn networks_of(&self, endpoint: &EndpointId) -> Option<Vec<NetworkId>> {
        self.container_networks(endpoint)
    }
}

impl ContainerScope for PluginState {
    fn networks_of(&self, endpoint: &EndpointId) -> Option<Vec<NetworkId>> {
        self.container_networks(endpoint)
    }
}
