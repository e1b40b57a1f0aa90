//! Shared set-up for the end-to-end tests: a real etcd and real daemons in a private
//! network namespace (see `vxnet::lab::LocalCluster`), gone when the test ends.
#![allow(dead_code)]

use std::path::PathBuf;

use vxnet::lab::{LocalCluster, LocalClusterOptions};

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vxnet"))
}

pub async fn cluster(daemons: usize) -> LocalCluster {
    cluster_with(LocalClusterOptions::new(daemons, binary())).await
}

pub async fn cluster_with(opts: LocalClusterOptions) -> LocalCluster {
    match LocalCluster::start(opts).await {
        Ok(c) => c,
        Err(e) => panic!("cannot start the test cluster: {e}"),
    }
}
