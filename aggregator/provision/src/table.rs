//! The servers a provisioner knows, in memory: what answers `get` and `list` (the
//! proxy calls `get` on every request), and the change signal behind live views.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use kcloud_core::server::Server;
use kcloud_core::signal::Signal;
use kcloud_core::{Error, Result};

/// `(owner, name)`.
pub type Key = (String, String);

/// What a provisioner keeps per server beside the server itself.
pub trait Entry: Send {
    /// The server as the API shows it.
    fn server(&self) -> Server;
    /// Its incarnation: a server deleted and created again under the same name is
    /// another one.
    fn id(&self) -> &str;
}

/// Servers by owner and name. Every change that readers care about bumps the signal.
pub struct ServerTable<E> {
    entries: Mutex<BTreeMap<Key, E>>,
    changed: Signal,
}

impl<E> Default for ServerTable<E> {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            changed: Signal::default(),
        }
    }
}

impl<E: Entry> ServerTable<E> {
    /// The entries, for changes the methods below do not cover. Call
    /// [`ServerTable::notify`] after a change readers care about.
    pub fn lock(&self) -> MutexGuard<'_, BTreeMap<Key, E>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn notify(&self) {
        self.changed.notify();
    }

    /// Wakes after a server appears, changes status or goes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Applies `f` to the entry of `owner/name`, if there is one.
    pub fn with<T>(&self, owner: &str, name: &str, f: impl FnOnce(&mut E) -> T) -> Option<T> {
        self.lock()
            .get_mut(&(owner.to_owned(), name.to_owned()))
            .map(f)
    }

    /// [`ServerTable::with`], or 404 when there is no such server.
    pub fn find<T>(&self, owner: &str, name: &str, f: impl FnOnce(&mut E) -> T) -> Result<T> {
        self.with(owner, name, f)
            .ok_or_else(|| Error::NotFound(format!("no server {owner}/{name}")))
    }

    pub fn get(&self, owner: &str, name: &str) -> Option<Server> {
        self.lock()
            .get(&(owner.to_owned(), name.to_owned()))
            .map(E::server)
    }

    /// One owner's servers, or everyone's, by owner and name.
    pub fn list(&self, owner: Option<&str>) -> Vec<Server> {
        self.lock()
            .iter()
            .filter(|((o, _), _)| owner.is_none_or(|want| o == want))
            .map(|(_, e)| e.server())
            .collect()
    }

    /// Adds a new server; a name in use is `Conflict`.
    pub fn insert_new(&self, key: Key, entry: E) -> Result<()> {
        {
            let mut entries = self.lock();
            if entries.contains_key(&key) {
                return Err(Error::Conflict(format!(
                    "server name {:?} is already in use",
                    key.1
                )));
            }
            entries.insert(key, entry);
        }
        self.notify();
        Ok(())
    }

    /// Adds or replaces a server found at start.
    pub fn insert(&self, key: Key, entry: E) {
        self.lock().insert(key, entry);
        self.notify();
    }

    /// Applies `f` to the entry if it is still incarnation `id`; `None` if it is not.
    /// Readers are woken when `f` says it changed something (`true`).
    pub fn update<T>(&self, key: &Key, id: &str, f: impl FnOnce(&mut E) -> (bool, T)) -> Option<T> {
        let mut entries = self.lock();
        let e = entries.get_mut(key).filter(|e| e.id() == id)?;
        let (changed, out) = f(e);
        drop(entries);
        if changed {
            self.notify();
        }
        Some(out)
    }

    /// Removes the entry if it is still incarnation `id`.
    pub fn forget(&self, key: &Key, id: &str) -> Option<E> {
        let mut entries = self.lock();
        if entries.get(key).is_none_or(|e| e.id() != id) {
            return None;
        }
        let gone = entries.remove(key);
        drop(entries);
        self.notify();
        gone
    }
}
