//! Agent connections not yet authenticated and registered: a bound in all, so that clients
//! without a certificate cannot hold unbounded memory, and a bound per source, so that one
//! host's slow clients cannot take the whole first bound and keep real agents out for a
//! `limits.handshake_timeout` at a time.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Pending agent connections in all; more wait in the kernel backlog. Each holds a few KiB for
/// at most `limits.handshake_timeout`.
pub const MAX_PENDING: usize = 2048;

/// Pending agent connections from one source (an IPv4 address, an IPv6 /64); more are closed
/// at once. Real agents complete their handshake in milliseconds: even many agent processes
/// behind one NAT address, all redialing together, stay well below this.
pub const MAX_PENDING_PER_SOURCE: usize = 64;

/// The pending agent connections of a node.
#[derive(Debug)]
pub struct Pending {
    all: Arc<Semaphore>,
    by_source: Mutex<HashMap<IpAddr, usize>>,
}

/// One pending connection, counted until dropped.
#[derive(Debug)]
pub struct Slot {
    _all: OwnedSemaphorePermit,
    pending: Arc<Pending>,
    source: IpAddr,
}

impl Pending {
    /// No pending connection yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            all: Arc::new(Semaphore::new(MAX_PENDING)),
            by_source: Mutex::default(),
        })
    }

    /// Waits until the overall bound has room for one more connection.
    pub async fn room(&self) -> OwnedSemaphorePermit {
        self.all
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Counts a connection from `peer` under `room`; `None` if its source already has
    /// [`MAX_PENDING_PER_SOURCE`] (`room` is then given back).
    pub fn take(self: &Arc<Self>, room: OwnedSemaphorePermit, peer: IpAddr) -> Option<Slot> {
        let source = source_of(peer);
        let mut by_source = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = by_source.entry(source).or_default();
        if *n >= MAX_PENDING_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Slot {
            _all: room,
            pending: self.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_source = self
            .pending
            .by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// The source a connection counts against: its IPv4 address (also when written as an
/// IPv4-mapped IPv6 address), or the /64 of its IPv6 address (one host's usual share).
fn source_of(peer: IpAddr) -> IpAddr {
    match peer.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_source_gets_its_share_and_others_still_get_in() {
        let pending = Pending::new();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..MAX_PENDING_PER_SOURCE {
            held.push(
                pending
                    .take(pending.room().await, a)
                    .expect("within the share"),
            );
        }
        assert!(
            pending.take(pending.room().await, a).is_none(),
            "one too many"
        );
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(
            pending.take(pending.room().await, mapped).is_none(),
            "the same IPv4 source, written as IPv6"
        );
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(
            pending.take(pending.room().await, b).is_some(),
            "another source"
        );
        assert_eq!(
            pending.all.available_permits(),
            MAX_PENDING - MAX_PENDING_PER_SOURCE,
            "refused and ended connections give their room back"
        );
        drop(held.pop());
        assert!(
            pending.take(pending.room().await, a).is_some(),
            "a slot freed"
        );
    }

    #[tokio::test]
    async fn an_ipv6_host_counts_as_its_64() {
        let pending = Pending::new();
        let mut held = Vec::new();
        for i in 0..MAX_PENDING_PER_SOURCE {
            let ip: IpAddr = format!("2001:db8:0:1::{:x}", i + 1).parse().unwrap();
            held.push(
                pending
                    .take(pending.room().await, ip)
                    .expect("within the share"),
            );
        }
        let same_64: IpAddr = "2001:db8:0:1:ffff::1".parse().unwrap();
        assert!(pending.take(pending.room().await, same_64).is_none());
        let other_64: IpAddr = "2001:db8:0:2::1".parse().unwrap();
        assert!(pending.take(pending.room().await, other_64).is_some());
    }
}
