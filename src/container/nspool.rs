//! Container network namespaces made ahead of need.
//!
//! A new named namespace with its loopback up and a netlink socket open costs 1–2 ms here
//! (unshare, a bind mount, a thread to open the socket): a third of an attach. The pool
//! keeps a few ready, each already named after the container ID it will serve, and tops
//! itself up in the background once a create is done, so a create usually finds one.
//!
//! A clean stop removes the ready ones (`drain`); after a crash, the next start removes
//! every container namespace no record owns (`ContainerService::new`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::Error;
use crate::model::Id;
use crate::netns::NetNs;
use crate::sync::lock;

/// How many namespaces the daemon keeps ready unless told otherwise (`--netns-pool`).
pub const DEFAULT_SIZE: usize = 2;

/// A namespace ready for a container: named `<dir>/<id.short()>`, lo up, netlink open.
pub struct Ready {
    pub id: Id,
    pub ns: NetNs,
}

pub struct NamespacePool {
    dir: PathBuf,
    size: usize,
    ready: Mutex<Vec<Ready>>,
    filling: AtomicBool,
}

impl NamespacePool {
    pub fn new(dir: PathBuf, size: usize) -> Arc<Self> {
        Arc::new(NamespacePool {
            dir,
            size,
            ready: Mutex::new(Vec::new()),
            filling: AtomicBool::new(false),
        })
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, Vec<Ready>> {
        lock(&self.ready)
    }

    /// A ready namespace, or one made now when none is left.
    pub async fn take(&self) -> Result<Ready, Error> {
        let pooled = self.ready().pop();
        match pooled {
            Some(r) => Ok(r),
            None => make(&self.dir).await,
        }
    }

    /// Returns an unused namespace (its create was refused before using it).
    pub fn give_back(&self, r: Ready) {
        let mut ready = self.ready();
        if ready.len() < self.size {
            ready.push(r);
        } else {
            drop(ready);
            remove(&r);
        }
    }

    /// Tops the pool up in the background, unless that is already under way.
    pub fn refill(self: &Arc<Self>) {
        if self.size == 0 || self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            loop {
                while pool.ready().len() < pool.size {
                    match make(&pool.dir).await {
                        Ok(r) => pool.ready().push(r),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot make a namespace ahead of need; creates make their own");
                            pool.filling.store(false, Ordering::Release);
                            return;
                        }
                    }
                }
                pool.filling.store(false, Ordering::Release);
                // A take between the last check and the store above found `filling` set and
                // left the top-up to this task: look again.
                if pool.ready().len() >= pool.size || pool.filling.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        });
    }

    /// Removes every ready namespace (a clean stop).
    pub fn drain(&self) {
        let all = std::mem::take(&mut *self.ready());
        for r in &all {
            remove(r);
        }
    }
}

fn remove(r: &Ready) {
    if let Some(path) = r.ns.path() {
        if let Err(e) = NetNs::remove_named(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove an unused namespace");
        }
    }
}

/// A new namespace for a container to be: named after a fresh ID, lo up, netlink open.
async fn make(dir: &Path) -> Result<Ready, Error> {
    let id = Id::random();
    let path = dir.join(id.short());
    let ns = {
        let target = path.clone();
        // create_named waits for a thread of its own (unshare, mount): not on a worker.
        tokio::task::spawn_blocking(move || NetNs::create_named(&target))
            .await
            .map_err(|e| Error::io("namespace worker", std::io::Error::other(e)))?
            .map_err(|e| Error::io(format!("creating namespace {}", path.display()), e))?
    };
    let up = async {
        let h = ns
            .netlink()
            .map_err(|e| Error::io("netlink in the container namespace", e))?;
        crate::netns::set_link_up(&h, "lo")
            .await
            .map_err(|e| Error::io("bringing lo up", std::io::Error::other(e.to_string())))
    };
    match up.await {
        Ok(()) => Ok(Ready { id, ns }),
        Err(e) => {
            let _ = NetNs::remove_named(&path);
            Err(e)
        }
    }
}
