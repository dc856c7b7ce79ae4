//! The agent registry and listener gating: which agent tunnels serve which service, and the
//! public listeners that exist only while at least one of them is connected.
//!
//! Registration is two-step so a listener never accepts before a tunnel can carry its
//! sessions: [`Registry::reserve`] checks the declared services and binds new listeners (the
//! kernel queues early partners in the backlog), then [`Registry::activate`] adds the tunnel
//! once its HTTP/2 connection is up, and the caller starts accepting. Closing is synchronous:
//! when the last tunnel of a service goes, its sockets are closed before `remove` returns, so
//! a partner's connect is refused at once and an agent that comes back can bind again.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use ipnet::IpNet;
use relay_tunnel::config::ListenSpec;
use relay_tunnel::metrics as m;
use relay_tunnel::net::bind_reuse;
use relay_tunnel::protocol::{
    self, DmzMessage, Registration, RegistrationAnswer, ServiceDecl, ServiceVerdict,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::rights::{NotAllowed, Rights};
use relay_tunnel::first_bytes::{self, Expect, NamePattern};

/// Why a declared service is not served through a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum Declined {
    /// A name, address or `allow` entry that does not parse, or a name declared twice.
    #[error("{0}")]
    Invalid(String),
    /// Outside the declaring identity's rights.
    #[error(transparent)]
    NotAllowed(#[from] NotAllowed),
    /// Disagrees with the service as others serve it, or overlaps another service.
    #[error("{0}")]
    Conflict(String),
    /// The public socket cannot be bound.
    #[error("{0}")]
    Bind(String),
    /// The node is shutting down.
    #[error("the DMZ node is shutting down")]
    ShuttingDown,
    /// The tunnel is draining.
    #[error("tunnel is draining")]
    Draining,
}

impl Declined {
    /// The `reason` label of `relay_rejections_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Declined::Invalid(_) => "service_invalid",
            Declined::NotAllowed(_) => "service_not_allowed",
            Declined::Conflict(_) => "service_conflict",
            Declined::Bind(_) => "service_bind",
            Declined::ShuttingDown | Declined::Draining => "shutting_down",
        }
    }
}

/// The verdict on one declaration, counted by reason when declined.
fn verdict(name: &str, result: Result<(), Declined>) -> ServiceVerdict {
    ServiceVerdict::of(
        name,
        result.map_err(|e| {
            metrics::counter!(m::REJECTIONS, "reason" => e.label()).increment(1);
            e.to_string()
        }),
    )
}

/// One tunnel connection of an agent that has registered.
#[derive(Debug)]
pub struct Carrier {
    /// Unique id of this tunnel connection.
    pub id: u64,
    /// The agent identity from its certificate.
    pub agent: String,
    /// The agent process's instance id.
    pub instance: String,
    /// Opens session streams on this tunnel.
    pub send: h2::client::SendRequest<Bytes>,
    /// Sessions placed on this tunnel and not ended, those still opening included (see
    /// [`Busy`]).
    pub active: AtomicUsize,
    /// Messages for the agent's control stream (audit records of refused partners).
    pub control: tokio::sync::mpsc::Sender<DmzMessage>,
    /// The shard this tunnel connection runs on: its sessions' pumps run there too.
    pub runtime: tokio::runtime::Handle,
    /// Set when the tunnel leaves the registry (its agent drains, or it is gone). Session
    /// streams are opened under this lock, so none is opened after the agent's drain was
    /// answered (`drained` is sent after [`Registry::remove`]).
    pub retired: std::sync::Mutex<bool>,
}

/// Counts a session on its tunnel, from the moment the tunnel is chosen until dropped. Counted
/// before the agent answers, so that sessions opened in a burst spread over the tunnels.
pub struct Busy(Arc<Carrier>);

impl Busy {
    /// Counts a session on `carrier`.
    pub fn new(carrier: &Arc<Carrier>) -> Self {
        carrier.active.fetch_add(1, Ordering::Relaxed);
        Self(carrier.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a service admits partners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerPolicy {
    /// Partner source networks allowed; empty admits any.
    pub allow: Vec<IpNet>,
    /// Whether connections must start with a PROXY header from a trusted proxy.
    pub accept_proxy: bool,
    /// The protocol partners must speak first.
    pub expect: Expect,
    /// The TLS server names routed to the service; empty: the address is the service's own.
    pub sni: Vec<NamePattern>,
}

/// One service reachable through a listener, with its admission rules.
#[derive(Debug, Clone)]
pub struct Route {
    /// The service name.
    pub service: String,
    /// Its rules, from the most recent registration.
    pub policy: Arc<ListenerPolicy>,
}

/// The bound public sockets of one listen address, shared by its accept loop and the
/// registry: one service's, or those of several services routed by SNI.
#[derive(Debug)]
pub struct PublicListener {
    /// The service name, or the listen address when services share it by SNI (for logs and
    /// the metrics of partners no service took).
    pub service: String,
    /// First public port of the service, to map ports of a range.
    sockets: Mutex<Option<Vec<TcpListener>>>,
    next: AtomicUsize,
    /// Cancelled when the listener closes, to wake its accept loop.
    pub closed: CancellationToken,
    /// The services on this address.
    routes: Mutex<Arc<Vec<Route>>>,
    /// Whether its accept loop runs.
    accepting: std::sync::atomic::AtomicBool,
}

impl PublicListener {
    /// Polls every socket of the service for a partner connection, fairly.
    /// `Ready(None)` once the listener is closed.
    pub fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<(TcpStream, SocketAddr)>>> {
        let guard = lock(&self.sockets);
        let Some(sockets) = guard.as_ref() else {
            return Poll::Ready(None);
        };
        let start = self.next.load(Ordering::Relaxed);
        for i in 0..sockets.len() {
            let idx = (start + i) % sockets.len();
            if let Poll::Ready(r) = sockets[idx].poll_accept(cx) {
                self.next.store(idx + 1, Ordering::Relaxed);
                return Poll::Ready(Some(r));
            }
        }
        Poll::Pending
    }

    /// The services on this address and their rules, as they are now.
    pub fn routes(&self) -> Arc<Vec<Route>> {
        lock(&self.routes).clone()
    }

    /// Sets the rules of `service`, adding its route if it has none.
    fn set_route(&self, service: &str, policy: ListenerPolicy) {
        let mut routes = lock(&self.routes);
        let mut new: Vec<Route> = routes
            .iter()
            .filter(|r| r.service != service)
            .cloned()
            .collect();
        new.push(Route {
            service: service.to_owned(),
            policy: Arc::new(policy),
        });
        *routes = Arc::new(new);
    }

    /// Takes `service`'s route away; closes the sockets when it was the last one.
    fn remove_route(&self, service: &str) {
        let mut routes = lock(&self.routes);
        let new: Vec<Route> = routes
            .iter()
            .filter(|r| r.service != service)
            .cloned()
            .collect();
        let last = new.is_empty();
        *routes = Arc::new(new);
        drop(routes);
        if last {
            self.close();
        }
    }

    fn close(&self) {
        // Dropping the sockets closes them now; the accept loop notices through `closed`.
        lock(&self.sockets).take();
        self.closed.cancel();
    }
}

struct Service {
    spec: ListenSpec,
    bind_ip: IpAddr,
    carriers: Vec<Arc<Carrier>>,
    pending: usize,
    listener: Arc<PublicListener>,
    accepting: bool,
}

#[derive(Default)]
struct Inner {
    services: HashMap<String, Service>,
    carrier_services: HashMap<u64, Vec<String>>,
    /// Services whose listener closed because their agents withdrew them (no healthy
    /// target), until one declares them again.
    withdrawn: std::collections::BTreeSet<String>,
    rr: usize,
    closed: bool,
}

/// One service as `/status` shows it.
#[derive(Debug)]
pub struct ServiceRow {
    /// The service name.
    pub name: String,
    /// Its public address as declared (`IP:PORT` or `IP:FIRST-LAST`); empty when withdrawn.
    pub listen: String,
    /// Whether its listener accepts partners now.
    pub open: bool,
    /// Closed because its agents withdrew it (no healthy target).
    pub withdrawn: bool,
    /// The tunnels serving it: id and agent identity.
    pub carriers: Vec<(u64, String)>,
}

/// Services, the tunnels serving them, and their public listeners.
pub struct Registry {
    inner: Mutex<Inner>,
    public_bind: Option<IpAddr>,
    rights: std::sync::RwLock<Arc<Rights>>,
    proxies_trusted: std::sync::atomic::AtomicBool,
    next_id: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data (every update is one step).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Services accepted for a tunnel that is not yet carrying sessions. Dropping it without
/// [`Registry::activate`] gives the services back.
pub struct Reservation {
    registry: Arc<Registry>,
    services: Vec<String>,
    active: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.active {
            return;
        }
        let mut inner = lock(&self.registry.inner);
        for name in &self.services {
            if let Some(s) = inner.services.get_mut(name) {
                s.pending -= 1;
            }
            close_if_unused(&mut inner, name);
        }
    }
}

/// Adds `carrier` to an admitted service (taking back its pending slot); returns the listener if
/// its accept loop must start now.
fn attach(inner: &mut Inner, name: &str, carrier: &Arc<Carrier>) -> Option<Arc<PublicListener>> {
    let s = inner.services.get_mut(name)?;
    s.pending -= 1;
    s.carriers.push(carrier.clone());
    if s.accepting {
        return None;
    }
    s.accepting = true;
    metrics::gauge!(m::LISTENER_OPEN, "service" => name.to_owned()).set(1.0);
    // Services sharing an address by SNI share one accept loop.
    let started = s.listener.accepting.swap(true, Ordering::Relaxed);
    (!started).then(|| s.listener.clone())
}

/// Orders the tunnels of one agent process for a new session: the least busy first, then one
/// on the shard `here`.
fn placement_key(carrier: &Carrier, here: &tokio::runtime::Handle) -> (usize, bool) {
    (
        carrier.active.load(Ordering::Relaxed),
        carrier.runtime.id() != here.id(),
    )
}

/// Closes the listener of `name` if no tunnel serves or reserves it; returns whether it did.
fn close_if_unused(inner: &mut Inner, name: &str) -> bool {
    let unused = inner
        .services
        .get(name)
        .is_some_and(|s| s.carriers.is_empty() && s.pending == 0);
    if unused && let Some(s) = inner.services.remove(name) {
        s.listener.remove_route(name);
        metrics::gauge!(m::LISTENER_OPEN, "service" => name.to_owned()).set(0.0);
        tracing::info!(service = name, listen = %s.spec, "no agent serves it any more: public listener closed");
        return true;
    }
    false
}

/// For an SNI service `name` on `spec`: the listener the other SNI services on that address
/// share, if any, after checking that none of them claims one of its names and that they
/// agree on `accept_proxy` (the PROXY header is read before the ClientHello).
fn check_names(
    inner: &Inner,
    name: &str,
    bind_ip: IpAddr,
    spec: &ListenSpec,
    policy: &ListenerPolicy,
) -> Result<Option<Arc<PublicListener>>, Declined> {
    let mut shared = None;
    for (other_name, other) in &inner.services {
        if other_name == name || other.bind_ip != bind_ip || other.spec != *spec {
            continue;
        }
        let routes = other.listener.routes();
        let Some(route) = routes.iter().find(|r| &r.service == other_name) else {
            continue;
        };
        if route.policy.sni.is_empty() {
            continue;
        }
        if let Some(p) = first_bytes::overlap(&policy.sni, &route.policy.sni) {
            return Err(Declined::Conflict(format!(
                "sni: {p} is already routed to service {other_name:?} on {spec}"
            )));
        }
        if route.policy.accept_proxy != policy.accept_proxy {
            return Err(Declined::Conflict(format!(
                "accept_proxy differs from service {other_name:?}, which shares {spec} by SNI"
            )));
        }
        shared = Some(other.listener.clone());
    }
    Ok(shared)
}

impl Registry {
    /// An empty registry for a node binding `public_bind` (when set) under `rights`.
    pub fn new(
        public_bind: Option<IpAddr>,
        rights: Arc<Rights>,
        proxies_trusted: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::default(),
            public_bind,
            rights: std::sync::RwLock::new(rights),
            proxies_trusted: proxies_trusted.into(),
            next_id: AtomicU64::new(1),
        })
    }

    /// Replaces the identities' rights, and whether any proxy is trusted, for registrations
    /// from now on; takes each tunnel out of the services its identity lost the right to
    /// (closing listeners no one else serves; sessions running go on). Returns, per tunnel
    /// that lost services, the carrier and the verdicts to tell its agent.
    pub fn set_policy(
        &self,
        rights: Arc<Rights>,
        proxies_trusted: bool,
    ) -> Vec<(Arc<Carrier>, Vec<ServiceVerdict>)> {
        *self.rights.write().unwrap_or_else(|p| p.into_inner()) = rights.clone();
        self.proxies_trusted
            .store(proxies_trusted, Ordering::Relaxed);
        let mut inner = lock(&self.inner);
        let mut lost: Vec<(Arc<Carrier>, Vec<ServiceVerdict>)> = Vec::new();
        let mut emptied = Vec::new();
        for (name, service) in inner.services.iter_mut() {
            service.carriers.retain(|c| {
                let Err(e) = rights.of(&c.agent).may_listen(&service.spec) else {
                    return true;
                };
                tracing::warn!(agent = %c.agent, service = %name, reason = %e, "agent's right to the service revoked by a reload: withdrawn");
                let v = verdict(name, Err(Declined::NotAllowed(e)));
                match lost.iter_mut().find(|(l, _)| l.id == c.id) {
                    Some((_, verdicts)) => verdicts.push(v),
                    None => lost.push((c.clone(), vec![v])),
                }
                false
            });
            emptied.push(name.clone());
        }
        for (carrier, verdicts) in &lost {
            if let Some(names) = inner.carrier_services.get_mut(&carrier.id) {
                names.retain(|n| !verdicts.iter().any(|v| &v.name == n));
            }
        }
        for name in emptied {
            close_if_unused(&mut inner, &name);
        }
        lost
    }

    /// Services closed because their agents withdrew them (no healthy target), not open again.
    pub fn withdrawn(&self) -> Vec<String> {
        let inner = lock(&self.inner);
        inner
            .withdrawn
            .iter()
            .filter(|name| !inner.services.contains_key(*name))
            .cloned()
            .collect()
    }

    /// Every service a tunnel serves or reserves, and every withdrawn one, for `/status`.
    pub fn service_rows(&self) -> Vec<ServiceRow> {
        let inner = lock(&self.inner);
        let mut rows: Vec<ServiceRow> = inner
            .services
            .iter()
            .map(|(name, s)| ServiceRow {
                name: name.clone(),
                listen: s.spec.to_string(),
                open: s.accepting,
                withdrawn: false,
                carriers: s.carriers.iter().map(|c| (c.id, c.agent.clone())).collect(),
            })
            .collect();
        rows.extend(
            inner
                .withdrawn
                .iter()
                .filter(|name| !inner.services.contains_key(*name))
                .map(|name| ServiceRow {
                    name: name.clone(),
                    listen: String::new(),
                    open: false,
                    withdrawn: true,
                    carriers: Vec::new(),
                }),
        );
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        rows
    }

    /// Whether tunnel `carrier` is in the registry (registered and not drained or gone).
    pub fn serves(&self, carrier: u64) -> bool {
        lock(&self.inner).carrier_services.contains_key(&carrier)
    }

    /// The services each tunnel serves, by tunnel id.
    pub fn services_of(&self, carrier: u64) -> Vec<String> {
        lock(&self.inner)
            .carrier_services
            .get(&carrier)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether at least one public listener accepts partners now.
    pub fn any_open(&self) -> bool {
        lock(&self.inner).services.values().any(|s| s.accepting)
    }

    /// A new tunnel id.
    pub fn next_carrier_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Checks each declared service, binds the listeners of services not yet open, and holds
    /// the accepted ones for this tunnel.
    pub fn reserve(
        self: &Arc<Self>,
        agent: &str,
        reg: &Registration,
    ) -> (RegistrationAnswer, Reservation) {
        let mut inner = lock(&self.inner);
        let mut verdicts = Vec::with_capacity(reg.services.len());
        let mut accepted = Vec::new();
        for (i, decl) in reg.services.iter().enumerate() {
            let duplicate = reg.services[..i].iter().any(|d| d.name == decl.name);
            let result = if duplicate {
                Err(Declined::Invalid(format!(
                    "service {:?} is declared twice",
                    decl.name
                )))
            } else if inner.closed {
                Err(Declined::ShuttingDown)
            } else {
                self.admit(&mut inner, agent, decl)
            };
            if result.is_ok() {
                accepted.push(decl.name.clone());
            }
            verdicts.push(verdict(&decl.name, result));
        }
        let reservation = Reservation {
            registry: self.clone(),
            services: accepted,
            active: false,
        };
        (RegistrationAnswer::verdicts(verdicts), reservation)
    }

    fn admit(&self, inner: &mut Inner, agent: &str, decl: &ServiceDecl) -> Result<(), Declined> {
        if !protocol::valid_service_name(&decl.name) {
            return Err(Declined::Invalid(format!(
                "invalid service name {:?}: a letter, then letters, digits, '.', '_' or '-', 64 at most",
                decl.name
            )));
        }
        let spec: ListenSpec = decl.listen.parse().map_err(Declined::Invalid)?;
        if decl.accept_proxy && !self.proxies_trusted.load(Ordering::Relaxed) {
            return Err(Declined::Invalid(
                "accept_proxy: this DMZ node trusts no proxy (policy.trusted_proxies is empty)"
                    .into(),
            ));
        }
        let allow = decl
            .allow
            .iter()
            .map(|a| {
                a.parse::<IpNet>()
                    .or_else(|_| a.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| Declined::Invalid(format!("allow: invalid network {a:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sni = decl
            .sni
            .iter()
            .map(|n| {
                n.parse::<NamePattern>()
                    .map_err(|e| Declined::Invalid(format!("sni: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !sni.is_empty() && (decl.expect != Expect::Tls || spec.ports.len() > 1) {
            return Err(Declined::Invalid(
                "sni: SNI routing needs expect = \"tls\" and a single port".into(),
            ));
        }
        // Opening a service and joining one both need the declaring identity's own right:
        // another identity serving it already gives none.
        self.rights
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .of(agent)
            .may_listen(&spec)?;
        let policy = ListenerPolicy {
            allow,
            accept_proxy: decl.accept_proxy,
            expect: decl.expect,
            sni,
        };
        if !policy.sni.is_empty()
            && let Some(existing) = inner.services.get(&decl.name)
            && existing.spec == spec
        {
            check_names(inner, &decl.name, existing.bind_ip, &spec, &policy)?;
        }
        if let Some(existing) = inner.services.get_mut(&decl.name) {
            if existing.spec != spec {
                let agents: Vec<&str> =
                    existing.carriers.iter().map(|c| c.agent.as_str()).collect();
                return Err(Declined::Conflict(format!(
                    "service {:?} is already served on {} (agents {:?}); this declaration asks for {spec}",
                    decl.name, existing.spec, agents
                )));
            }
            // The same agent may change its partner policy (a reload); another agent must
            // agree with it, or it could open a service to partners its owner refused.
            let others: Vec<&str> = existing
                .carriers
                .iter()
                .map(|c| c.agent.as_str())
                .filter(|a| *a != agent)
                .collect();
            let current = existing.listener.routes();
            let same = current
                .iter()
                .any(|r| r.service == decl.name && *r.policy == policy);
            if !others.is_empty() && !same {
                return Err(Declined::Conflict(format!(
                    "service {:?}: allow/accept_proxy/expect/sni differ from what agents {others:?} declared",
                    decl.name
                )));
            }
            // A service on an address it shares by SNI cannot drop its names (a reload of its
            // agent): the address would have a service no name leads to.
            if policy.sni.is_empty()
                && let Some(other) = current.iter().find(|r| r.service != decl.name)
            {
                return Err(Declined::Conflict(format!(
                    "service {:?} shares {spec} with service {:?} by SNI: it needs an sni list",
                    decl.name, other.service
                )));
            }
            existing.pending += 1;
            existing.listener.set_route(&decl.name, policy);
            return Ok(());
        }
        let bind_ip = self.public_bind.unwrap_or(spec.ip);
        // An SNI service joins the listener of the others routed by SNI on its address.
        let shared = if policy.sni.is_empty() {
            None
        } else {
            check_names(inner, &decl.name, bind_ip, &spec, &policy)?
        };
        let listener = match shared {
            Some(shared) => {
                shared.set_route(&decl.name, policy);
                tracing::info!(service = %decl.name, listen = %spec, agent, "service added to a listener shared by SNI");
                shared
            }
            None => self.bind(inner, &decl.name, agent, bind_ip, &spec, policy)?,
        };
        inner.services.insert(
            decl.name.clone(),
            Service {
                spec,
                bind_ip,
                carriers: Vec::new(),
                pending: 1,
                listener,
                accepting: false,
            },
        );
        Ok(())
    }

    /// Binds the public sockets of a new listener for service `name` on `spec`, after
    /// checking that its ports overlap no other service's.
    fn bind(
        &self,
        inner: &Inner,
        name: &str,
        agent: &str,
        bind_ip: IpAddr,
        spec: &ListenSpec,
        policy: ListenerPolicy,
    ) -> Result<Arc<PublicListener>, Declined> {
        for (other_name, other) in &inner.services {
            let same_ip = other.bind_ip == bind_ip
                || other.bind_ip.is_unspecified()
                || bind_ip.is_unspecified();
            if same_ip && other.spec.ports.overlaps(&spec.ports) {
                return Err(Declined::Conflict(format!(
                    "ports {} overlap service {other_name:?} on {}",
                    spec.ports, other.spec
                )));
            }
        }
        let sockets = spec
            .addrs(Some(bind_ip))
            .map(|addr| {
                bind_reuse(addr).map_err(|e| Declined::Bind(format!("cannot bind {addr}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(service = %name, listen = %spec, bind = %bind_ip, agent, "public listener bound");
        // An address shared by SNI is named by its address: no one service stands for it.
        let label = if policy.sni.is_empty() {
            name.to_owned()
        } else {
            spec.to_string()
        };
        Ok(Arc::new(PublicListener {
            service: label,
            sockets: Mutex::new(Some(sockets)),
            next: AtomicUsize::new(0),
            closed: CancellationToken::new(),
            routes: Mutex::new(Arc::new(vec![Route {
                service: name.to_owned(),
                policy: Arc::new(policy),
            }])),
            accepting: false.into(),
        }))
    }

    /// Adds a tunnel to the services it reserved; returns the listeners whose accept loops the
    /// caller must start now.
    pub fn activate(
        &self,
        mut reservation: Reservation,
        carrier: &Arc<Carrier>,
    ) -> Vec<Arc<PublicListener>> {
        let mut inner = lock(&self.inner);
        reservation.active = true;
        let names = std::mem::take(&mut reservation.services);
        let start = names
            .iter()
            .filter_map(|name| attach(&mut inner, name, carrier))
            .collect();
        inner.carrier_services.insert(carrier.id, names);
        start
    }

    /// Replaces the services of an active tunnel (re-registration after an agent reload):
    /// new services are admitted and opened, dropped ones released. Returns the verdicts and
    /// the listeners whose accept loops the caller must start.
    pub fn update(
        &self,
        carrier: &Arc<Carrier>,
        decls: &[ServiceDecl],
    ) -> (RegistrationAnswer, Vec<Arc<PublicListener>>) {
        let mut inner = lock(&self.inner);
        let Some(old) = inner.carrier_services.get(&carrier.id).cloned() else {
            let verdicts = decls
                .iter()
                .map(|d| verdict(&d.name, Err(Declined::Draining)))
                .collect();
            return (RegistrationAnswer::verdicts(verdicts), Vec::new());
        };
        // Release what is dropped or moved first, so a moved service can be admitted again.
        let keep = |name: &str, inner: &Inner| {
            decls.iter().any(|d| {
                d.name == name
                    && inner
                        .services
                        .get(name)
                        .is_some_and(|s| d.listen.parse::<ListenSpec>().is_ok_and(|l| l == s.spec))
            })
        };
        let kept: Vec<String> = old.iter().filter(|n| keep(n, &inner)).cloned().collect();
        for name in old.iter().filter(|n| !kept.contains(n)) {
            if let Some(s) = inner.services.get_mut(name) {
                s.carriers.retain(|c| c.id != carrier.id);
            }
            let withdrawn = !decls.iter().any(|d| &d.name == name);
            if close_if_unused(&mut inner, name) && withdrawn {
                inner.withdrawn.insert(name.clone());
            }
        }
        let mut verdicts = Vec::new();
        let mut names = Vec::new();
        let mut start = Vec::new();
        for (i, decl) in decls.iter().enumerate() {
            let result = if decls[..i].iter().any(|d| d.name == decl.name) {
                Err(Declined::Invalid(format!(
                    "service {:?} is declared twice",
                    decl.name
                )))
            } else if kept.contains(&decl.name) {
                self.admit(&mut inner, &carrier.agent, decl).map(|()| {
                    // Already attached: admit only refreshed the allow list and took a slot.
                    if let Some(s) = inner.services.get_mut(&decl.name) {
                        s.pending -= 1;
                    }
                })
            } else if inner.closed {
                Err(Declined::ShuttingDown)
            } else {
                self.admit(&mut inner, &carrier.agent, decl)
                    .map(|()| start.extend(attach(&mut inner, &decl.name, carrier)))
            };
            if result.is_ok() {
                inner.withdrawn.remove(&decl.name);
                names.push(decl.name.clone());
            }
            verdicts.push(verdict(&decl.name, result));
        }
        // A kept service whose new declaration was refused is released too.
        for name in kept.iter().filter(|n| !names.contains(n)) {
            if let Some(s) = inner.services.get_mut(name) {
                s.carriers.retain(|c| c.id != carrier.id);
            }
            close_if_unused(&mut inner, name);
        }
        inner.carrier_services.insert(carrier.id, names);
        (RegistrationAnswer::verdicts(verdicts), start)
    }

    /// A tunnel of this service, chosen round robin, to carry an audit record.
    pub fn any_carrier(&self, service: &str) -> Option<Arc<Carrier>> {
        let mut inner = lock(&self.inner);
        inner.rr = inner.rr.wrapping_add(1);
        let rr = inner.rr;
        let s = inner.services.get(service)?;
        s.carriers.get(rr % s.carriers.len().max(1)).cloned()
    }

    /// Removes a tunnel (gone, or draining: it takes no new session); closes the listeners it
    /// was the last to serve.
    pub fn remove(&self, carrier: &Carrier) {
        *lock(&carrier.retired) = true;
        let mut inner = lock(&self.inner);
        let Some(names) = inner.carrier_services.remove(&carrier.id) else {
            return;
        };
        for name in &names {
            if let Some(s) = inner.services.get_mut(name) {
                s.carriers.retain(|c| c.id != carrier.id);
            }
            close_if_unused(&mut inner, name);
        }
    }

    /// The tunnels to try for a new session of `service`, best first: one per agent process,
    /// its least busy tunnel (on a tie, one running on `here`, the caller's shard, so that the
    /// session need not move), the processes ordered by the sessions on that tunnel, ties
    /// taken in turn.
    pub fn candidates(&self, service: &str, here: &tokio::runtime::Handle) -> Vec<Arc<Carrier>> {
        let mut inner = lock(&self.inner);
        inner.rr = inner.rr.wrapping_add(1);
        let rr = inner.rr;
        let Some(s) = inner.services.get(service) else {
            return Vec::new();
        };
        let n = s.carriers.len();
        let mut best: Vec<Arc<Carrier>> = Vec::new();
        for i in 0..n {
            let c = &s.carriers[(rr + i) % n];
            match best.iter_mut().find(|b| b.instance == c.instance) {
                Some(b) if placement_key(c, here) < placement_key(b, here) => *b = c.clone(),
                Some(_) => {}
                None => best.push(c.clone()),
            }
        }
        best.sort_by_key(|c| c.active.load(Ordering::Relaxed));
        best
    }

    /// How many tunnels are registered.
    pub fn tunnels(&self) -> usize {
        lock(&self.inner).carrier_services.len()
    }

    /// Closes every public listener and refuses new registrations (shutdown).
    pub fn close_all(&self) {
        let mut inner = lock(&self.inner);
        inner.closed = true;
        for (name, s) in inner.services.drain() {
            s.listener.close();
            metrics::gauge!(m::LISTENER_OPEN, "service" => name.clone()).set(0.0);
            tracing::info!(service = %name, "shutting down: public listener closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use relay_tunnel::protocol::ServiceDecl;
    use relay_tunnel::shards::Shards;

    use super::*;

    /// A sender of a live HTTP/2 connection over an in-memory pipe (the tests never use it).
    async fn send_request() -> h2::client::SendRequest<Bytes> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            if let Ok(mut conn) = h2::server::handshake(server).await {
                while conn.accept().await.is_some() {}
            }
        });
        let (send, conn) = h2::client::handshake(client)
            .await
            .expect("HTTP/2 handshake over a pipe");
        tokio::spawn(conn);
        send
    }

    #[tokio::test]
    async fn candidates_share_sessions_between_processes_and_prefer_the_callers_shard() {
        // A DMZ with 4 shards; agent process a has its two tunnels on shards 0 and 1, process
        // b on shards 2 and 3. Sessions are accepted on shard 0.
        let shards = Shards::start("test-shard", 4).unwrap();
        let shard = |i: usize| shards.handles().by_index(i).handle().clone();
        let rights = crate::rights::Rights {
            global: crate::rights::Rules {
                listen_allow: vec!["127.0.0.1:*".parse().unwrap()],
                connect_allow: Vec::new(),
            },
            ..Default::default()
        };
        let registry = Registry::new(None, Arc::new(rights), false);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let send = send_request().await;
        let (control, _inbox) = tokio::sync::mpsc::channel(1);
        let mut tunnels = Vec::new();
        for (instance, on) in [("a", 0), ("a", 1), ("b", 2), ("b", 3)] {
            let registration = Registration {
                instance: instance.into(),
                services: vec![ServiceDecl {
                    name: "svc".into(),
                    listen: format!("127.0.0.1:{port}"),
                    allow: Vec::new(),
                    accept_proxy: false,
                    ..Default::default()
                }],
            };
            let (answer, reservation) = registry.reserve(instance, &registration);
            assert!(answer.services[0].accepted, "{answer:?}");
            let carrier = Arc::new(Carrier {
                id: registry.next_carrier_id(),
                agent: instance.into(),
                instance: instance.into(),
                send: send.clone(),
                active: AtomicUsize::new(0),
                control: control.clone(),
                runtime: shard(on),
                retired: Default::default(),
            });
            registry.activate(reservation, &carrier);
            tunnels.push(carrier);
        }
        let here = shard(0);
        let first_of = |rounds: usize| {
            let mut first = HashMap::<String, usize>::new();
            for _ in 0..rounds {
                let c = registry.candidates("svc", &here);
                assert_eq!(c.len(), 2, "one tunnel per process");
                assert_ne!(c[0].instance, c[1].instance);
                if let Some(a) = c.iter().find(|c| c.instance == "a") {
                    assert_eq!(
                        a.runtime.id(),
                        here.id(),
                        "process a's tunnel on the caller's shard, when no busier"
                    );
                }
                *first.entry(c[0].instance.clone()).or_default() += 1;
            }
            first
        };

        // All idle: the processes take turns, whatever shard their tunnels run on.
        let first = first_of(10);
        assert!(
            first.get("a").copied().unwrap_or(0) >= 4 && first.get("b").copied().unwrap_or(0) >= 4,
            "idle processes must take turns: {first:?}"
        );

        // A session counts from the moment its tunnel is chosen: the next one, opened before
        // the first is answered, goes to the idle sibling, even off the caller's shard.
        let _opening = Busy::new(&tunnels[0]);
        let c = registry.candidates("svc", &here);
        let a = c.iter().find(|c| c.instance == "a").unwrap();
        assert_eq!(a.id, tunnels[1].id, "process a's idle tunnel (shard 1)");

        // A busier process comes second; a session that ends no longer counts.
        let opening = Busy::new(&tunnels[1]);
        for _ in 0..4 {
            assert_eq!(registry.candidates("svc", &here)[0].instance, "b");
        }
        drop(opening);
        let c = registry.candidates("svc", &here);
        let a = c.iter().find(|c| c.instance == "a").unwrap();
        assert_eq!(a.id, tunnels[1].id, "the ended session no longer counts");
    }
}
