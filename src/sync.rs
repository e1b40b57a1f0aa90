//! The one way the daemon takes a `std::sync::Mutex`.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, poisoned or not. A panic while it was held is a bug already reported by the
/// panic itself; the sets and maps these locks guard are whole after every statement, so
/// the daemon keeps using them instead of failing (or skipping) every later request.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
