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

/// Where to spawn work: cheap to clone, round robin over the shards.
#[derive(Debug, Clone)]
pub struct ShardHandles {
    handles: Arc<[Handle]>,
    next: Arc<AtomicUsize>,
}

impl Shards {
    /// Starts `count` shards (at least one), each a thread named `name-N`.
    pub fn start(name: &str, count: usize) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
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
                handles: handles.into(),
                next: Arc::default(),
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
    /// The shard for the next tunnel connection.
    pub fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// How many shards there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Never true: there is at least one shard.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}
