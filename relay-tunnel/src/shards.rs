//! One single-threaded runtime per core, each running whole tunnel connections.
//!
//! A tunnel connection, its HTTP/2 connection task and the byte pumps of its sessions all run
//! on one shard, so the hand-offs between them (a pump queues a DATA frame and wakes the
//! connection task; the connection task receives one and wakes the pump) stay on one thread:
//! no cross-thread wake-ups, no contended locks. Different tunnel connections run on
//! different shards, so a process still uses every core. See docs/PERFORMANCE.md for the
//! measurements behind this.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The running shards; they stop when this is dropped (tasks still on them are dropped too).
#[derive(Debug)]
pub struct Shards {
    handles: ShardHandles,
    stop: CancellationToken,
}

/// Where to spawn work: cheap to clone.
#[derive(Debug, Clone)]
pub struct ShardHandles {
    shards: Arc<[Shard]>,
}

#[derive(Debug)]
struct Shard {
    handle: Handle,
    /// Tunnel connections placed here and not yet ended.
    load: Arc<AtomicUsize>,
}

/// Counts a tunnel connection on its shard until dropped.
#[derive(Debug)]
pub struct Placement {
    handle: Handle,
    load: Arc<AtomicUsize>,
}

impl Shards {
    /// Starts `count` shards (at least one), each a thread named `name-N`.
    pub fn start(name: &str, count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut shards = Vec::new();
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            shards.push(Shard {
                handle: runtime.handle().clone(),
                load: Arc::default(),
            });
            let stopped = stop.clone();
            let started = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || runtime.block_on(stopped.cancelled()));
            if let Err(e) = started {
                stop.cancel();
                return Err(e);
            }
        }
        Ok(Self {
            handles: ShardHandles {
                shards: shards.into(),
            },
            stop,
        })
    }

    /// One shard per core available to the process.
    pub fn per_core(name: &str) -> io::Result<Self> {
        Self::start(
            name,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        )
    }

    /// Handles to spawn on the shards.
    pub fn handles(&self) -> ShardHandles {
        self.handles.clone()
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ShardHandles {
    /// The shard with the fewest tunnel connections now (the first of them on a tie).
    pub fn least_loaded(&self) -> Placement {
        let shard = self
            .shards
            .iter()
            .min_by_key(|s| s.load.load(Ordering::Relaxed))
            .expect("there is at least one shard");
        Self::place(shard)
    }

    /// Shard `index` modulo the number of shards: a fixed spread, for connections whose
    /// indexes are known up front.
    pub fn by_index(&self, index: usize) -> Placement {
        Self::place(&self.shards[index % self.shards.len()])
    }

    fn place(shard: &Shard) -> Placement {
        shard.load.fetch_add(1, Ordering::Relaxed);
        Placement {
            handle: shard.handle.clone(),
            load: shard.load.clone(),
        }
    }

    /// How many shards there are.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Never true: there is at least one shard.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }
}

impl Placement {
    /// The runtime to spawn the connection on.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        self.load.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_loaded_spreads_and_takes_back_ended_connections() {
        let shards = Shards::start("test-shard", 2).unwrap();
        let h = shards.handles();
        let a = h.least_loaded();
        let b = h.least_loaded();
        assert_ne!(
            a.handle().id(),
            b.handle().id(),
            "two connections, two shards"
        );
        let c = h.least_loaded();
        assert_eq!(
            c.handle().id(),
            a.handle().id(),
            "a tie goes to the first shard"
        );
        drop(b);
        let d = h.least_loaded();
        let b_shard = h.by_index(1);
        assert_eq!(
            d.handle().id(),
            b_shard.handle().id(),
            "the shard that lost one gets the next"
        );
    }

    #[test]
    fn by_index_wraps_and_tasks_run_on_the_shard_thread() {
        let shards = Shards::start("test-shard", 3).unwrap();
        let h = shards.handles();
        assert_eq!(h.len(), 3);
        assert_eq!(h.by_index(4).handle().id(), h.by_index(1).handle().id());
        let (tx, rx) = std::sync::mpsc::channel();
        h.by_index(2).handle().spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        let name = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(name.as_deref(), Some("test-shard-2"));
    }

    #[test]
    fn dropping_the_shards_stops_their_threads() {
        let shards = Shards::start("test-shard", 1).unwrap();
        let placement = shards.handles().by_index(0);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // Held by a task that never ends: dropped when its runtime stops.
        placement.handle().spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(shards);
        assert!(matches!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        ));
    }
}
