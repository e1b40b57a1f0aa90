//! The cluster store: a small key-value interface with transactions, leases and a watch.
//!
//! Everything above this module talks to [`Store`]; only `etcd.rs` knows etcd's client.
//! The interface is deliberately the subset of etcd v3 that vxnet needs, so that another
//! backend (an embedded single-host store, say) has a narrow contract to meet.

pub mod etcd;
pub mod keys;
mod tls_probe;

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub use keys::Keys;

/// A stored key with the revisions etcd keeps for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A consistent read of a prefix: the keys and the store revision they were read at.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    pub revision: i64,
}

/// A lease ID (etcd's i64).
pub type LeaseId = i64;

/// A condition of a transaction. All conditions of one transaction must hold for its
/// success branch to run.
#[derive(Clone, Debug)]
pub enum Compare {
    /// The key does not exist (its create revision is 0).
    Absent(String),
    /// The key exists with exactly this create revision (the same incarnation of the key).
    CreateRevision(String, i64),
    /// The key was last written at exactly this revision (nobody changed it since we read it).
    ModRevision(String, i64),
    /// No key under this prefix exists.
    PrefixEmpty(String),
    /// No key under this prefix was created or changed after this revision. (Deletions are
    /// not seen; use it where only additions could invalidate what was read.)
    PrefixUnchangedSince(String, i64),
}

/// A write (or read) inside a transaction.
#[derive(Clone, Debug)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete(String),
    DeletePrefix(String),
    Get(String),
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    pub fn put_leased(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: LeaseId) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        }
    }
}

/// What a transaction did.
#[derive(Clone, Debug)]
pub struct TxnOutcome {
    /// True when every compare held and the success ops ran.
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: i64,
    /// For each `Op::Get` of the branch that ran, in order: the key, if it exists.
    pub gets: Vec<Option<KeyValue>>,
}

/// A change seen by the watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, mod_revision: i64 },
}

/// The events of one store revision (or several), in order.
#[derive(Clone, Debug)]
pub struct WatchBatch {
    pub events: Vec<WatchEvent>,
    /// The store revision the watcher has seen up to (inclusive).
    pub revision: i64,
}

pub type WatchStream = BoxStream<'static, Result<WatchBatch, StoreError>>;

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cluster store unreachable: no answer from {endpoints} after {waited:.1?} ({cause}); \
         check that etcd is running there and reachable from this host"
    )]
    Unreachable {
        endpoints: String,
        waited: Duration,
        cause: String,
    },
    #[error("cluster store rejected the request: {0}")]
    Rejected(String),
    #[error("watch start revision {requested} was compacted (oldest kept: {compact_revision}); re-list needed")]
    Compacted {
        requested: i64,
        compact_revision: i64,
    },
    #[error("lease {0:x} has expired or does not exist")]
    LeaseNotFound(LeaseId),
    #[error("invalid cluster store address {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("invalid --cluster-store-opt {opt:?}: {reason}")]
    InvalidOption { opt: String, reason: String },
    #[error("TLS handshake with {endpoints} failed: {cause}; {hint}")]
    Tls {
        endpoints: String,
        cause: String,
        hint: String,
    },
    #[error("{endpoints} rejected the credentials for user {user:?} ({cause}); check --etcd-user USER:PASSWORD")]
    BadCredentials {
        endpoints: String,
        user: String,
        cause: String,
    },
    #[error("{endpoints} requires authentication ({cause}); give --etcd-user USER:PASSWORD")]
    AuthRequired { endpoints: String, cause: String },
}

impl StoreError {
    /// A short fixed word for the kind of failure: the `kind` label of the store error metric.
    pub fn kind_label(&self) -> &'static str {
        match self {
            StoreError::Unreachable { .. } => "unreachable",
            StoreError::Rejected(_) => "rejected",
            StoreError::Compacted { .. } => "compacted",
            StoreError::LeaseNotFound(_) => "lease_not_found",
            StoreError::InvalidUrl { .. } | StoreError::InvalidOption { .. } => "invalid_config",
            StoreError::Tls { .. } => "tls",
            StoreError::BadCredentials { .. } => "bad_credentials",
            StoreError::AuthRequired { .. } => "auth_required",
        }
    }
}

/// The cluster store interface. Implementations are cheap to clone behind an `Arc`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// One key, read linearizably.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key under `prefix`, with the revision of the read.
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError>;
    /// Runs `success` if every compare holds, else `failure`; atomically.
    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<TxnOutcome, StoreError>;
    /// A new lease that expires `ttl` after its last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Remaining time to live of a lease, `None` if it is gone.
    async fn lease_ttl(&self, lease: LeaseId) -> Result<Option<Duration>, StoreError>;
    /// Refreshes a lease once; `LeaseNotFound` if it already expired.
    async fn keep_alive_once(&self, lease: LeaseId) -> Result<Duration, StoreError>;
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Every change under `prefix` from revision `from` on (inclusive).
    async fn watch(&self, prefix: &str, from: i64) -> Result<WatchStream, StoreError>;
    /// Who this store is (for messages): e.g. "etcd://127.0.0.1:2379".
    fn describe(&self) -> String;
}
