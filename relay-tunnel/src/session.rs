//! The sessions a node is relaying now: what `GET /sessions` lists and what
//! `DELETE /sessions/{id}` cuts. A session enters the table when its bytes start to flow and
//! leaves it when its pump ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Notify;

/// The HTTP/2 error code a pump resets its stream with when an operator killed the session, so
/// that the other side records `killed` too. Outside the codes RFC 9113 defines; a peer that
/// does not know it treats it as a reset.
pub const KILLED_CODE: u32 = 0x100;

/// The result label of a session an operator killed (on the side that killed it, and on the
/// other side, which sees its stream reset with [`KILLED_CODE`]).
pub const KILLED: &str = "killed";

/// Shards of the table, so that sessions starting on different threads rarely share a lock.
const SHARDS: usize = 16;

/// One session as its pump and the table see it: where it goes, what it moved so far, and
/// whether an operator killed it. One allocation per session, shared by both.
#[derive(Debug, Default)]
pub struct Progress {
    service: Box<str>,
    direction: &'static str,
    partner: Box<str>,
    via: Box<str>,
    started: Option<SystemTime>,
    /// Bytes from the partner toward the target.
    pub to_target: AtomicU64,
    /// Bytes from the target toward the partner.
    pub to_partner: AtomicU64,
    /// Set by [`Table::kill`] before it wakes the pump.
    pub killed: AtomicBool,
    /// Wakes the pump of a killed session.
    pub kill: Notify,
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

/// The sessions of a node, by id (16 hexadecimal digits, kept as the number they spell).
#[derive(Debug)]
pub struct Table {
    shards: Vec<Mutex<HashMap<u64, Arc<Progress>>>>,
}

/// A session in the table; dropping it takes the session out.
#[derive(Debug)]
pub struct Registered {
    table: Arc<Table>,
    /// `None` for an id that is not 16 hexadecimal digits (from a misbehaving peer): such a
    /// session is relayed and counted, but not listed.
    id: Option<u64>,
    /// The session's entry, advanced by its pump.
    pub progress: Arc<Progress>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.table.shard(id).remove(&id);
        }
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

/// The number a session id spells, if it is one (16 hexadecimal digits).
fn parse_id(id: &str) -> Option<u64> {
    if id.len() != 16 {
        return None;
    }
    u64::from_str_radix(id, 16).ok()
}

impl Table {
    /// An empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        })
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Progress>>> {
        // Ids are random: their low bits spread them evenly.
        self.shards[(id as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Enters a session; it stays listed until the returned guard is dropped.
    pub fn add(
        self: &Arc<Self>,
        id: &str,
        service: &str,
        direction: &'static str,
        partner: &str,
        via: &str,
    ) -> Registered {
        let progress = Arc::new(Progress {
            service: service.into(),
            direction,
            partner: partner.into(),
            via: via.into(),
            started: Some(SystemTime::now()),
            ..Default::default()
        });
        let id = parse_id(id);
        if let Some(id) = id {
            self.shard(id).insert(id, progress.clone());
        }
        Registered {
            table: self.clone(),
            id,
            progress,
        }
    }

    /// Stops session `id`: its pump resets both sides, and it ends with the result
    /// [`KILLED`].
    pub fn kill(&self, id: &str) -> Kill {
        let Some(id) = parse_id(id) else {
            return Kill::Malformed;
        };
        let Some(progress) = self.shard(id).get(&id).cloned() else {
            return Kill::NotFound;
        };
        progress.killed.store(true, Ordering::Relaxed);
        // A permit if the pump is not waiting yet: it stops as soon as it looks.
        progress.kill.notify_one();
        Kill::Killed
    }

    /// Every session now, oldest first.
    pub fn list(&self) -> Vec<Listed> {
        let now = SystemTime::now();
        let mut all: Vec<(SystemTime, Listed)> = Vec::new();
        for i in 0..SHARDS {
            let shard = self.shard(i as u64);
            all.extend(shard.iter().map(|(id, p)| {
                let started = p.started.unwrap_or(now);
                (
                    started,
                    Listed {
                        id: format!("{id:016x}"),
                        service: p.service.to_string(),
                        direction: p.direction,
                        partner: p.partner.to_string(),
                        via: p.via.to_string(),
                        started: humantime::format_rfc3339_seconds(started).to_string(),
                        seconds: now.duration_since(started).map_or(0, |d| d.as_secs()),
                        bytes_partner_to_target: p.to_target.load(Ordering::Relaxed),
                        bytes_target_to_partner: p.to_partner.load(Ordering::Relaxed),
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
        for i in 0..SHARDS {
            for p in self.shard(i as u64).values() {
                *counts
                    .entry((p.service.to_string(), p.direction))
                    .or_default() += 1;
            }
        }
        counts
    }

    /// How many sessions are listed.
    pub fn len(&self) -> usize {
        (0..SHARDS).map(|i| self.shard(i as u64).len()).sum()
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
        let table = Table::new();
        let a = table.add(
            "00000000000000a1",
            "sftp",
            "inbound",
            "192.0.2.7:5000",
            "engine-1",
        );
        let b = table.add(
            "00000000000000b2",
            "as2",
            "outbound",
            "198.51.100.1:443",
            "engine-1",
        );
        // From a misbehaving peer: relayed and counted, not listed.
        let odd = table.add("not-hex", "as2", "outbound", "-", "engine-1");
        a.progress.to_target.fetch_add(10, Ordering::Relaxed);
        let listed = table.list();
        assert_eq!(listed.len(), 2);
        let sftp = listed.iter().find(|l| l.service == "sftp").unwrap();
        assert_eq!(
            (sftp.id.as_str(), sftp.bytes_partner_to_target),
            ("00000000000000a1", 10)
        );
        assert_eq!(table.active()[&("as2".to_owned(), "outbound")], 1);

        assert_eq!(table.kill("not-an-id"), Kill::Malformed);
        assert_eq!(table.kill("00000000000000ff"), Kill::NotFound);
        assert_eq!(table.kill("00000000000000a1"), Kill::Killed);
        assert!(a.progress.killed.load(Ordering::Relaxed));
        assert!(!b.progress.killed.load(Ordering::Relaxed));
        drop((a, odd));
        assert_eq!(table.len(), 1);
        drop(b);
        assert!(table.is_empty());
    }
}
