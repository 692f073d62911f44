//! Change signals for live views (the portal's event stream).
//!
//! Each owner of changing state (inventory, ledger, provisioner) holds one [`Signal`]
//! and bumps it after a change. Listeners get a `watch` receiver: bursts coalesce into
//! one wake-up, nobody can fall behind, and a listener re-reads the current state
//! through the owner's normal (per-viewer, redacting) read path, so no change is ever
//! carried with someone else's details in it.

use tokio::sync::watch;

/// A change counter. Cheap to bump; bumping with no listeners costs almost nothing.
#[derive(Debug)]
pub struct Signal(watch::Sender<u64>);

impl Default for Signal {
    fn default() -> Self {
        Self(watch::Sender::new(0))
    }
}

impl Signal {
    /// Records that something changed.
    pub fn notify(&self) {
        self.0.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver that wakes after the next [`Signal::notify`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bursts_coalesce_into_one_wake_up() {
        let s = Signal::default();
        let mut rx = s.subscribe();
        assert!(!rx.has_changed().unwrap());
        s.notify();
        s.notify();
        s.notify();
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 3);
        assert!(!rx.has_changed().unwrap(), "one wake-up for the burst");
    }
}
