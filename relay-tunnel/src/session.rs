//! The sessions a node is relaying now: what `GET /sessions` lists and what
//! `DELETE /sessions/{id}` cuts. A session enters the table when its bytes start to flow and
//! leaves it when its pump ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

/// The HTTP/2 error code a pump resets its stream with when an operator killed the session, so
/// that the other side records `killed` too. Outside the codes RFC 9113 defines; a peer that
/// does not know it treats it as a reset.
pub const KILLED_CODE: u32 = 0x100;

/// The result label of a session an operator killed (on the side that killed it, and on the
/// other side, which sees its stream reset with [`KILLED_CODE`]).
pub const KILLED: &str = "killed";

/// Shards of the table, so that sessions starting on different threads rarely share a lock.
const SHARDS: usize = 16;

/// What a session's pump moved so far, and whether it was killed.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes from the partner toward the target.
    pub to_target: AtomicU64,
    /// Bytes from the target toward the partner.
    pub to_partner: AtomicU64,
    /// Set by [`Table::kill`] before it cancels the session's stop token.
    pub killed: AtomicBool,
}

/// A session being relayed, as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    /// The session id (the same on the DMZ and the agent).
    pub id: String,
    /// The service name.
    pub service: String,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The partner's address (inbound), or the address dialed in the partner network
    /// (outbound).
    pub partner: String,
    /// Where the other end of the tunnel is: the agent identity (DMZ) or the DMZ node (agent).
    pub via: String,
    /// When its bytes started to flow, RFC 3339.
    pub started: String,
    /// Seconds since then.
    pub seconds: u64,
    /// Bytes from the partner toward the target so far.
    pub bytes_partner_to_target: u64,
    /// Bytes from the target toward the partner so far.
    pub bytes_target_to_partner: u64,
}

struct Entry {
    service: String,
    direction: &'static str,
    partner: String,
    via: String,
    started: SystemTime,
    progress: Arc<Progress>,
    stop: CancellationToken,
}

/// The sessions of a node.
pub struct Table {
    shards: Vec<Mutex<HashMap<String, Entry>>>,
    /// Every session's stop token is a child of this one (the node's end-of-drain reset).
    root: CancellationToken,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("len", &self.len()).finish()
    }
}

fn shard_of(id: &str) -> usize {
    // Ids are random hex: their last character spreads them evenly.
    id.bytes().last().map_or(0, |b| usize::from(b) % SHARDS)
}

/// A session in the table; dropping it takes the session out.
#[derive(Debug)]
pub struct Registered {
    table: Arc<Table>,
    id: String,
    /// The session's byte counts, advanced by its pump.
    pub progress: Arc<Progress>,
    /// Cancelled to stop the session: by the node's drain deadline or by [`Table::kill`].
    pub stop: CancellationToken,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.table.shards[shard_of(&self.id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// What [`Table::kill`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Kill {
    /// The session was stopped; both sides are being reset.
    Killed,
    /// No session with that id is being relayed here.
    NotFound,
    /// Not a session id (16 hexadecimal digits).
    Malformed,
}

/// Whether `id` has the form of a session id.
pub fn well_formed(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Table {
    /// An empty table whose sessions stop when `root` is cancelled.
    pub fn new(root: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            root,
        })
    }

    /// Enters a session; it stays listed until the returned guard is dropped.
    pub fn add(
        self: &Arc<Self>,
        id: &str,
        service: &str,
        direction: &'static str,
        partner: String,
        via: String,
    ) -> Registered {
        let progress = Arc::new(Progress::default());
        let stop = self.root.child_token();
        let entry = Entry {
            service: service.to_owned(),
            direction,
            partner,
            via,
            started: SystemTime::now(),
            progress: progress.clone(),
            stop: stop.clone(),
        };
        self.shards[shard_of(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), entry);
        Registered {
            table: self.clone(),
            id: id.to_owned(),
            progress,
            stop,
        }
    }

    /// Stops session `id` (its pump resets both sides, and it ends with the result
    /// [`KILLED`]).
    pub fn kill(&self, id: &str) -> Kill {
        if !well_formed(id) {
            return Kill::Malformed;
        }
        let shard = self.shards[shard_of(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(entry) = shard.get(id) else {
            return Kill::NotFound;
        };
        entry.progress.killed.store(true, Ordering::Relaxed);
        entry.stop.cancel();
        Kill::Killed
    }

    /// Every session now, oldest first.
    pub fn list(&self) -> Vec<Listed> {
        let now = SystemTime::now();
        let mut all: Vec<(SystemTime, Listed)> = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            all.extend(shard.iter().map(|(id, e)| {
                (
                    e.started,
                    Listed {
                        id: id.clone(),
                        service: e.service.clone(),
                        direction: e.direction,
                        partner: e.partner.clone(),
                        via: e.via.clone(),
                        started: humantime::format_rfc3339_seconds(e.started).to_string(),
                        seconds: now.duration_since(e.started).map_or(0, |d| d.as_secs()),
                        bytes_partner_to_target: e.progress.to_target.load(Ordering::Relaxed),
                        bytes_target_to_partner: e.progress.to_partner.load(Ordering::Relaxed),
                    },
                )
            }));
        }
        all.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        all.into_iter().map(|(_, l)| l).collect()
    }

    /// Sessions now, by service and direction.
    pub fn active(&self) -> HashMap<(String, &'static str), usize> {
        let mut counts = HashMap::new();
        for shard in &self.shards {
            for e in shard.lock().unwrap_or_else(|p| p.into_inner()).values() {
                *counts.entry((e.service.clone(), e.direction)).or_default() += 1;
            }
        }
        counts
    }

    /// How many sessions are listed.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether no session is listed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_listed_until_dropped_and_killed_by_id() {
        let root = CancellationToken::new();
        let table = Table::new(root.clone());
        let a = table.add(
            "00000000000000a1",
            "sftp",
            "inbound",
            "192.0.2.7:5000".into(),
            "engine-1".into(),
        );
        let b = table.add(
            "00000000000000b2",
            "as2",
            "outbound",
            "198.51.100.1:443".into(),
            "engine-1".into(),
        );
        a.progress.to_target.fetch_add(10, Ordering::Relaxed);
        let listed = table.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(
            listed
                .iter()
                .find(|l| l.service == "sftp")
                .unwrap()
                .bytes_partner_to_target,
            10
        );
        assert_eq!(table.active()[&("as2".to_owned(), "outbound")], 1);

        assert_eq!(table.kill("not-an-id"), Kill::Malformed);
        assert_eq!(table.kill("00000000000000ff"), Kill::NotFound);
        assert_eq!(table.kill("00000000000000a1"), Kill::Killed);
        assert!(a.stop.is_cancelled() && !b.stop.is_cancelled());
        assert!(a.progress.killed.load(Ordering::Relaxed));
        drop(a);
        assert_eq!(table.len(), 1);
        // The node's drain deadline stops every session.
        root.cancel();
        assert!(b.stop.is_cancelled() && !b.progress.killed.load(Ordering::Relaxed));
        drop(b);
        assert!(table.is_empty());
    }
}
