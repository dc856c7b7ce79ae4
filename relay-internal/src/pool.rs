//! Outbound carriers by DMZ node, and the choice of node for a new outbound session: least
//! active sessions first, ties taken round robin.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

/// One outbound tunnel connection (the agent is the HTTP/2 client).
#[derive(Debug)]
pub struct OutCarrier {
    /// Unique id.
    pub id: u64,
    /// Opens session streams.
    pub send: h2::client::SendRequest<Bytes>,
    /// Sessions it carries now.
    pub active: AtomicUsize,
    /// The shard it runs on: its sessions' pumps run there too.
    pub runtime: tokio::runtime::Handle,
}

#[derive(Debug, Default)]
struct NodeSlot {
    carriers: Mutex<Vec<Arc<OutCarrier>>>,
    active: AtomicUsize,
}

/// Outbound carriers of every configured DMZ node.
#[derive(Debug)]
pub struct Pool {
    nodes: Vec<NodeSlot>,
    rr: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A session counted against its node and carrier until dropped.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Pool>,
    node: usize,
    carrier: Arc<OutCarrier>,
}

impl Lease {
    /// The node index.
    pub fn node(&self) -> usize {
        self.node
    }

    /// The carrier.
    pub fn carrier(&self) -> &OutCarrier {
        &self.carrier
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.carrier.active.fetch_sub(1, Ordering::Relaxed);
        self.pool.nodes[self.node]
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// A pool for `nodes` DMZ nodes.
    pub fn new(nodes: usize) -> Arc<Self> {
        Arc::new(Self {
            nodes: (0..nodes).map(|_| NodeSlot::default()).collect(),
            rr: AtomicUsize::new(0),
        })
    }

    /// Adds a carrier of node `node`.
    pub fn add(&self, node: usize, carrier: Arc<OutCarrier>) {
        lock(&self.nodes[node].carriers).push(carrier);
    }

    /// Removes a carrier of node `node`.
    pub fn remove(&self, node: usize, id: u64) {
        lock(&self.nodes[node].carriers).retain(|c| c.id != id);
    }

    /// The nodes to try for a new session, best first, each with its least busy carrier;
    /// only nodes in `via` when it is not empty. Each returned lease counts the session.
    pub fn plan(self: &Arc<Self>, via: &[usize]) -> Vec<Lease> {
        let n = self.nodes.len();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<usize> = (0..n)
            .map(|i| (start + i) % n)
            .filter(|i| via.is_empty() || via.contains(i))
            .collect();
        order.sort_by_key(|&i| self.nodes[i].active.load(Ordering::Relaxed));
        order
            .into_iter()
            .filter_map(|node| {
                let carrier = lock(&self.nodes[node].carriers)
                    .iter()
                    .min_by_key(|c| c.active.load(Ordering::Relaxed))
                    .cloned()?;
                Some((node, carrier))
            })
            .map(|(node, carrier)| {
                carrier.active.fetch_add(1, Ordering::Relaxed);
                self.nodes[node].active.fetch_add(1, Ordering::Relaxed);
                Lease {
                    pool: self.clone(),
                    node,
                    carrier,
                }
            })
            .collect()
    }
}
