//! Locking that survives poisoning.
//!
//! A thread that panicked while holding one of the agent's mutexes leaves data that is
//! still consistent: every critical section either finishes its update or changes
//! nothing the next holder relies on (a registry entry, a connection handle, a byte
//! tail). So the agent keeps going with the data rather than cascading the panic.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking the data even if a previous holder panicked.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
