//! Agent connections not yet authenticated and registered: a bound in all, so that clients
//! without a certificate cannot hold unbounded memory, and a bound per source, so that one
//! host's slow clients cannot take the whole first bound and keep real agents out for a
//! `limits.handshake_timeout` at a time.
//!
//! A source at its bound does not lock out a real agent behind the same address (a NAT on the
//! inner firewall, a compromised host next to the agent): a new connection from it evicts that
//! source's oldest connection that has not yet sent its whole TLS ClientHello. A real agent
//! sends its ClientHello at once, so only connections that stall before it are evicted; a
//! source whose every connection is past its ClientHello is refused as before.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

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
    by_source: Mutex<HashMap<IpAddr, Source>>,
    next_id: AtomicU64,
}

/// The pending connections of one source.
#[derive(Debug, Default)]
struct Source {
    /// Counted against [`MAX_PENDING_PER_SOURCE`].
    count: usize,
    /// Those still before the end of their ClientHello, oldest first: the ones to evict.
    before_hello: VecDeque<(u64, CancellationToken)>,
}

/// One pending connection, counted until dropped (or evicted).
#[derive(Debug)]
pub struct Slot {
    _all: OwnedSemaphorePermit,
    pending: Arc<Pending>,
    source: IpAddr,
    id: u64,
    /// Cancelled when a newer connection from the same source took this slot's place.
    evicted: CancellationToken,
}

/// What [`Pending::take`] did for a new connection.
#[derive(Debug)]
pub enum Taken {
    /// Counted within its source's share.
    Slot(Slot),
    /// Counted, after evicting the source's oldest connection still before its ClientHello.
    Evicted(Slot),
    /// The source's share is full of connections past their ClientHello: refused.
    Full,
}

impl Pending {
    /// No pending connection yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            all: Arc::new(Semaphore::new(MAX_PENDING)),
            by_source: Mutex::default(),
            next_id: AtomicU64::new(0),
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

    /// Counts a connection from `peer` under `room`. A source at [`MAX_PENDING_PER_SOURCE`]
    /// gets its oldest connection still before its ClientHello evicted instead, or is
    /// refused (`room` is then given back) when it has none.
    pub fn take(self: &Arc<Self>, room: OwnedSemaphorePermit, peer: IpAddr) -> Taken {
        let source = source_of(peer);
        let mut by_source = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        let entry = by_source.entry(source).or_default();
        let mut evicted = false;
        if entry.count >= MAX_PENDING_PER_SOURCE {
            let Some((_, oldest)) = entry.before_hello.pop_front() else {
                return Taken::Full;
            };
            // Its slot no longer counts; its task ends when it sees the token.
            oldest.cancel();
            entry.count -= 1;
            evicted = true;
        }
        entry.count += 1;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        entry.before_hello.push_back((id, token.clone()));
        let slot = Slot {
            _all: room,
            pending: self.clone(),
            source,
            id,
            evicted: token,
        };
        if evicted {
            Taken::Evicted(slot)
        } else {
            Taken::Slot(slot)
        }
    }
}

impl Slot {
    /// Marks the connection past its ClientHello: it is no longer evicted for newer ones.
    pub fn hello_done(&self) {
        let mut by_source = self
            .pending
            .by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(source) = by_source.get_mut(&self.source) {
            source.before_hello.retain(|(id, _)| *id != self.id);
        }
    }

    /// Resolves when a newer connection from the same source evicted this one.
    pub fn evicted(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.evicted.cancelled()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_source = self
            .pending
            .by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(source) = by_source.get_mut(&self.source) else {
            return;
        };
        // An evicted slot was taken off its source's count when it was evicted.
        if !self.evicted.is_cancelled() {
            source.count -= 1;
            source.before_hello.retain(|(id, _)| *id != self.id);
        }
        if source.count == 0 {
            by_source.remove(&self.source);
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

    fn slot(taken: Taken) -> Slot {
        match taken {
            Taken::Slot(slot) => slot,
            other => panic!("expected a slot within the share, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_full_share_past_its_hellos_refuses_and_others_still_get_in() {
        let pending = Pending::new();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mut held = Vec::new();
        for _ in 0..MAX_PENDING_PER_SOURCE {
            let s = slot(pending.take(pending.room().await, a));
            s.hello_done();
            held.push(s);
        }
        assert!(matches!(pending.take(pending.room().await, a), Taken::Full));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(
            matches!(pending.take(pending.room().await, mapped), Taken::Full),
            "the same IPv4 source, written as IPv6"
        );
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let _b = slot(pending.take(pending.room().await, b));
        assert_eq!(
            pending.all.available_permits(),
            MAX_PENDING - MAX_PENDING_PER_SOURCE - 1,
            "refused connections give their room back"
        );
        drop(held.pop());
        let _a = slot(pending.take(pending.room().await, a));
    }

    #[tokio::test]
    async fn a_new_connection_evicts_the_oldest_still_before_its_hello() {
        let pending = Pending::new();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let mut held = Vec::new();
        for i in 0..MAX_PENDING_PER_SOURCE {
            let s = slot(pending.take(pending.room().await, a));
            if i == 0 {
                // The oldest finished its hello: it is not the one evicted.
                s.hello_done();
            }
            held.push(s);
        }
        let Taken::Evicted(newest) = pending.take(pending.room().await, a) else {
            panic!("expected an eviction");
        };
        assert!(!held[0].evicted.is_cancelled(), "past its hello: kept");
        tokio::time::timeout(std::time::Duration::from_secs(1), held[1].evicted())
            .await
            .expect("the oldest before its hello is evicted");
        // The evicted connection's end does not give its source a second slot.
        held.remove(1);
        newest.hello_done();
        let count = |p: &Pending| p.by_source.lock().unwrap()[&a].count;
        assert_eq!(count(&pending), MAX_PENDING_PER_SOURCE);
        // Every slot past its hello: the next one is refused.
        for s in &held {
            s.hello_done();
        }
        assert!(matches!(pending.take(pending.room().await, a), Taken::Full));
        drop(held);
        drop(newest);
        assert!(pending.by_source.lock().unwrap().is_empty());
        assert_eq!(pending.all.available_permits(), MAX_PENDING);
    }

    #[tokio::test]
    async fn an_ipv6_host_counts_as_its_64() {
        let pending = Pending::new();
        let mut held = Vec::new();
        for i in 0..MAX_PENDING_PER_SOURCE {
            let ip: IpAddr = format!("2001:db8:0:1::{:x}", i + 1).parse().unwrap();
            let s = slot(pending.take(pending.room().await, ip));
            s.hello_done();
            held.push(s);
        }
        let same_64: IpAddr = "2001:db8:0:1:ffff::1".parse().unwrap();
        assert!(matches!(
            pending.take(pending.room().await, same_64),
            Taken::Full
        ));
        let other_64: IpAddr = "2001:db8:0:2::1".parse().unwrap();
        let _other = slot(pending.take(pending.room().await, other_64));
    }
}
