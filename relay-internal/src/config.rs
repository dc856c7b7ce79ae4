//! The agent's config: raw TOML structs, then a checked [`AgentConfig`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use relay_tunnel::config::{self as cfg, ConfigError, ListenSpec, TargetSpec};
use relay_tunnel::expiry::Expiry;
use relay_tunnel::first_bytes::{Expect, NamePattern};
use relay_tunnel::protocol::{self, ALPN_INBOUND_V1, ALPN_OUTBOUND_V1, ServiceDecl};
use relay_tunnel::tls;
use rustls::pki_types::ServerName;
use serde::Deserialize;

/// Default values of optional keys.
pub mod defaults {
    use std::time::Duration;
    /// `connections`.
    pub const CONNECTIONS: usize = 2;
    /// `keepalive`.
    pub const KEEPALIVE: Duration = Duration::from_secs(5);
    /// `limits.max_sessions`.
    pub const MAX_SESSIONS: usize = 10_000;
    /// `limits.connect_timeout`.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// `limits.half_closed_timeout`.
    pub const HALF_CLOSED_TIMEOUT: Duration = Duration::from_secs(30);
    /// `limits.idle_timeout`.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
    /// `limits.drain_timeout`.
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    /// `inbound.health.interval`.
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
    /// `inbound.health.timeout`.
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
    /// `inbound.health.fall`.
    pub const HEALTH_FALL: u32 = 3;
    /// `inbound.health.rise`.
    pub const HEALTH_RISE: u32 = 2;
    /// `inbound.health.hold_down`: least time between a withdrawal and the next declaration.
    pub const HEALTH_HOLD_DOWN: Duration = Duration::from_secs(10);
    /// `inbound.health.request`.
    pub const HEALTH_REQUEST: &str = "GET /";
    /// `inbound.health.status`.
    pub const HEALTH_STATUS: u16 = 200;
}

/// Most tunnel connections per DMZ node.
const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    dmz: Vec<String>,
    server_name: Option<String>,
    connections: Option<usize>,
    keepalive: Option<String>,
    tls: RawTls,
    admin: Option<relay_tunnel::admin::RawAdmin>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    inbound: Vec<RawInbound>,
    #[serde(default)]
    outbound: Vec<RawOutbound>,
    outbound_proxy: Option<RawProxy>,
    audit: Option<crate::syslog::RawAudit>,
    sandbox: Option<relay_tunnel::sandbox::RawSandbox>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
    ca: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_sessions: Option<usize>,
    connect_timeout: Option<String>,
    idle_timeout: Option<String>,
    half_closed_timeout: Option<String>,
    drain_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    name: String,
    listen: String,
    target: RawTargets,
    #[serde(default)]
    via: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    name: String,
    listen: String,
    target: RawTargets,
    balance: Option<String>,
    health: Option<RawHealth>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    accept_proxy: bool,
    proxy_protocol: Option<String>,
    expect: Option<String>,
    #[serde(default)]
    sni: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    fall: Option<u32>,
    rise: Option<u32>,
    hold_down: Option<String>,
    ca: Option<String>,
    server_name: Option<String>,
    request: Option<String>,
    status: Option<u16>,
}

/// `target`: one address or a list of them.
#[derive(Debug)]
struct RawTargets(Vec<String>, bool);

impl<'de> Deserialize<'de> for RawTargets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawTargets;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an address HOST:PORT or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawTargets, E> {
                Ok(RawTargets(vec![v.to_owned()], false))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawTargets, A::Error> {
                let mut all = Vec::new();
                while let Some(one) = seq.next_element::<String>()? {
                    all.push(one);
                }
                Ok(RawTargets(all, true))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl RawTargets {
    /// The key of entry `j`: `target` for a single address, `target[j]` in a list.
    fn key(&self, base: &str, j: usize) -> String {
        if self.1 {
            format!("{base}[{j}]")
        } else {
            base.to_owned()
        }
    }
}

/// A DMZ node to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmzNode {
    /// `host:port` as configured; also the node's name in logs and metrics.
    pub addr: String,
    /// The name the node's certificate must carry.
    pub server_name: ServerName<'static>,
}

/// An `[[inbound]]` service: partners reach `listen` on the DMZ, the agent connects `target`.
#[derive(Debug, Clone)]
pub struct InboundService {
    /// Service name.
    pub name: String,
    /// Public listen address on the DMZ nodes.
    pub listen: ListenSpec,
    /// Where sessions go, in the configured order; a range maps port for port.
    pub targets: Vec<TargetSpec>,
    /// How sessions are spread over `targets`.
    pub balance: Balance,
    /// Active health checks, if configured.
    pub health: Option<HealthCheck>,
    /// Partner networks allowed, as declared to the DMZ.
    pub allow: Vec<String>,
    /// Whether the DMZ expects a PROXY header on this port.
    pub accept_proxy: bool,
    /// PROXY protocol header (with the partner address) to send to the target first.
    pub proxy_protocol: Option<relay_tunnel::proxyproto::Version>,
    /// The protocol partners must speak first (checked by the DMZ).
    pub expect: Expect,
    /// TLS server names routed to this service on a shared listen address.
    pub sni: Vec<NamePattern>,
}

impl InboundService {
    /// The declaration pushed to the DMZ.
    pub fn decl(&self) -> ServiceDecl {
        ServiceDecl {
            name: self.name.clone(),
            listen: self.listen.to_string(),
            allow: self.allow.clone(),
            accept_proxy: self.accept_proxy,
            expect: self.expect,
            sni: self.sni.iter().map(ToString::to_string).collect(),
        }
    }
}

/// `balance`: how an inbound service's sessions are spread over its targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Always the first healthy target in the configured order.
    First,
    /// Each healthy target in turn.
    RoundRobin,
    /// The healthy target with the fewest sessions in flight.
    LeastSessions,
}

/// `[inbound.health]`: active checks of every target of a service.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// What a check does.
    pub kind: CheckKind,
    /// Time between two checks of a target.
    pub interval: Duration,
    /// Time one check may take.
    pub timeout: Duration,
    /// Failures in a row (checks or session connects) that take a target out.
    pub fall: u32,
    /// Good checks in a row that bring a target back.
    pub rise: u32,
    /// Least time between a withdrawal of the service and its next declaration.
    pub hold_down: Duration,
}

/// `inbound.health.kind`.
#[derive(Clone)]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// A TLS handshake, verified against `ca` or not verified at all.
    Tls {
        /// Client config of the handshake.
        config: Arc<rustls::ClientConfig>,
        /// The name sent and checked; default the target's host.
        server_name: Option<ServerName<'static>>,
        /// Whether the certificate is verified (a `ca` is set).
        verified: bool,
    },
    /// An HTTP/1.1 request line; the answer's status must be `status`.
    Http {
        /// Method and path, as `GET /health`.
        request: String,
        /// Expected status code.
        status: u16,
    },
}

impl std::fmt::Debug for CheckKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckKind::Tcp => f.write_str("Tcp"),
            CheckKind::Tls {
                server_name,
                verified,
                ..
            } => write!(
                f,
                "Tls {{ server_name: {server_name:?}, verified: {verified} }}"
            ),
            CheckKind::Http { request, status } => write!(f, "Http {{ {request:?} -> {status} }}"),
        }
    }
}

impl CheckKind {
    /// The metric and log name of this kind.
    pub fn label(&self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Tls { .. } => "tls",
            CheckKind::Http { .. } => "http",
        }
    }
}

/// An `[[outbound]]` mapping: engines connect `listen`, a DMZ node dials `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundService {
    /// Name (metric label, audit record).
    pub name: String,
    /// Local listen address.
    pub listen: SocketAddr,
    /// Destination `host:port` the DMZ dials.
    pub target: String,
    /// Backup destinations, tried in order when `target` cannot be reached.
    pub backups: Vec<String>,
    /// Indexes into [`AgentConfig::dmz`] of the nodes allowed to carry it; empty: all.
    pub via: Vec<usize>,
}

impl AgentConfig {
    /// Whether any outbound entry point is configured (outbound carriers are kept only then).
    pub fn has_outbound(&self) -> bool {
        !self.outbound.is_empty() || self.outbound_proxy.is_some()
    }
}

/// `[limits]` of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sessions in flight at most.
    pub max_sessions: usize,
    /// Time to connect a target, and to connect and register with a DMZ node.
    pub connect_timeout: Duration,
    /// A session with no byte moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// One direction of a session ended and the other moved no byte for this long: closed.
    pub half_closed_timeout: Duration,
    /// Time in-flight sessions get to finish on shutdown.
    pub drain_timeout: Duration,
}

impl Limits {
    /// The time limits of one session.
    pub fn pump(&self) -> relay_tunnel::pump::PumpLimits {
        relay_tunnel::pump::PumpLimits {
            idle_timeout: self.idle_timeout,
            half_closed_timeout: self.half_closed_timeout,
        }
    }
}

/// A checked agent config.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// DMZ nodes, each dialed.
    pub dmz: Vec<DmzNode>,
    /// Tunnel connections per node.
    pub connections: usize,
    /// PING interval; a tunnel silent for two intervals is dead.
    pub keepalive: Duration,
    /// TLS of the dialer.
    pub tls: Arc<rustls::ClientConfig>,
    /// Admin endpoint address.
    pub admin_listen: Option<SocketAddr>,
    /// Who may use the admin endpoint (`admin.token_file`, `admin.metrics_open`).
    pub admin_access: relay_tunnel::admin::Access,
    /// How long before a TLS file stops working the log warns.
    pub expiry_warning: Duration,
    /// When the client certificate and the CA stop working.
    pub expiries: Vec<Expiry>,
    /// Limits and timeouts.
    pub limits: Limits,
    /// Inbound services.
    pub inbound: Vec<InboundService>,
    /// The file this config was loaded from, read again on reload.
    pub source: Option<std::path::PathBuf>,
    /// Outbound fixed mappings.
    pub outbound: Vec<OutboundService>,
    /// The HTTP CONNECT and SOCKS5 proxy address, if any.
    pub outbound_proxy: Option<SocketAddr>,
    /// TLS of the outbound carriers (same credentials, outbound ALPN).
    pub tls_outbound: Arc<rustls::ClientConfig>,
    /// Where audit records go as syslog (`[audit]`), besides the log.
    pub audit: Option<crate::syslog::SyslogConfig>,
    /// `[sandbox]`.
    pub sandbox: relay_tunnel::sandbox::Settings,
    /// The files this config names (certificates, keys, CAs, admin files), read again on
    /// reload.
    pub files: Vec<std::path::PathBuf>,
}

impl AgentConfig {
    /// The sandbox rules of the agent: reading its config and the files it names. Ports are
    /// not restricted: targets, health checks and DMZ nodes are dialed by name, and entry
    /// points are bound where the config says.
    pub fn sandbox_rules(&self) -> relay_tunnel::sandbox::Rules {
        relay_tunnel::sandbox::Rules {
            files: self
                .source
                .iter()
                .cloned()
                .chain(self.files.clone())
                .collect(),
            bind: None,
            connect: None,
        }
    }

    /// Reads and checks the config at `path`; relative paths are taken from its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let raw: Raw = cfg::read_toml(path, DMZ_CONFIG)?;
        let mut config = check(raw, &cfg::base_dir(path))?;
        config.source = Some(path.to_owned());
        Ok(config)
    }
}

/// A DMZ node's config, recognised by keys an agent's config never has.
const DMZ_CONFIG: cfg::OtherConfig = cfg::OtherConfig {
    binary: "relay-dmz",
    keys: &["tunnel", "policy", "public"],
};

/// Ports whose server speaks first (FTP, SMTP, POP3, IMAP, OFTP): a partner there sends
/// nothing until the server has, so a gate would cut every partner after the timeout.
const SERVER_FIRST_PORTS: [(u16, &str); 6] = [
    (21, "FTP"),
    (25, "SMTP"),
    (110, "POP3"),
    (143, "IMAP"),
    (587, "SMTP submission"),
    (3305, "OFTP"),
];

/// Checks `expect` and `sni` of `inbound[i]` (keys from `key`); returns them parsed.
fn gate(
    err: &mut ConfigError,
    key: &dyn Fn(&str) -> String,
    s: &RawInbound,
    listen: Option<&ListenSpec>,
    targets: Option<&[TargetSpec]>,
) -> (Expect, Vec<NamePattern>) {
    let mut expect = match &s.expect {
        Some(e) => err
            .check(key("expect"), e.parse::<Expect>())
            .unwrap_or_default(),
        None => Expect::Any,
    };
    let mut sni = Vec::new();
    for (j, name) in s.sni.iter().enumerate() {
        if let Some(p) = err.check(
            format_args!("{}[{j}]", key("sni")),
            name.parse::<NamePattern>(),
        ) {
            if sni.contains(&p) {
                err.push(
                    format_args!("{}[{j}]", key("sni")),
                    format_args!("{p} is listed twice"),
                );
            }
            sni.push(p);
        }
    }
    if !sni.is_empty() {
        match expect {
            Expect::Any => expect = Expect::Tls,
            Expect::Tls => {}
            other => err.push(
                key("sni"),
                format_args!("SNI routing reads the TLS ClientHello: it needs expect = \"tls\", not \"{other}\""),
            ),
        }
    }
    if expect.is_any() {
        return (expect, sni);
    }
    let what = if sni.is_empty() { "expect" } else { "sni" };
    if listen.is_some_and(|l| l.ports.len() > 1) {
        err.push(
            key(what),
            "a port range (FTP passive data ports) carries data in either direction first: it cannot be gated or routed",
        );
    }
    let ports = listen
        .map(|l| l.ports.first)
        .into_iter()
        .chain(targets.unwrap_or_default().iter().map(|t| t.ports.first));
    for port in ports {
        if let Some((_, proto)) = SERVER_FIRST_PORTS.iter().find(|(p, _)| *p == port) {
            err.push(
                key(what),
                format_args!("port {port} is {proto}, whose server speaks first: a partner sends nothing until it has, so a gate would cut every partner (leave expect unset)"),
            );
            break;
        }
    }
    (expect, sni)
}

/// Services on one listen address must all be routed by SNI, with no name claimed twice.
fn shared_addresses(err: &mut ConfigError, inbound: &[InboundService]) {
    for (i, a) in inbound.iter().enumerate() {
        for b in &inbound[..i] {
            if a.listen != b.listen {
                continue;
            }
            if a.sni.is_empty() || b.sni.is_empty() {
                err.push(
                    format_args!("inbound[{i}].listen"),
                    format_args!("{} is also the address of service {:?}: services share an address only when each has an sni list", a.listen, b.name),
                );
                break;
            } else if let Some(p) = relay_tunnel::first_bytes::overlap(&a.sni, &b.sni) {
                err.push(
                    format_args!("inbound[{i}].sni"),
                    format_args!("{p} is also routed to service {:?} on {}", b.name, a.listen),
                );
                break;
            }
        }
    }
}

fn duration(err: &mut ConfigError, key: &str, raw: &Option<String>, default: Duration) -> Duration {
    match raw {
        Some(s) => err.check(key, cfg::parse_duration(s)).unwrap_or(default),
        None => default,
    }
}

fn server_name(s: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(s.to_owned()).map_err(|_| format!("invalid server name {s:?}"))
}

fn check(raw: Raw, base: &Path) -> Result<AgentConfig, ConfigError> {
    let mut err = ConfigError::default();
    let health_cas = raw
        .inbound
        .iter()
        .filter_map(|i| i.health.as_ref()?.ca.as_ref());
    let files = [&raw.tls.cert, &raw.tls.key, &raw.tls.ca]
        .into_iter()
        .chain(health_cas)
        .map(|f| cfg::resolve(base, f))
        .chain(relay_tunnel::admin::RawAdmin::files(
            raw.admin.as_ref(),
            base,
        ))
        .chain(raw.audit.as_ref().and_then(|a| a.ca(base)))
        .collect();
    let sandbox = relay_tunnel::sandbox::RawSandbox::check(raw.sandbox.as_ref(), &mut err);
    if raw.dmz.is_empty() {
        err.push("dmz", "at least one DMZ node address is required");
    }
    let explicit_name = raw
        .server_name
        .as_ref()
        .and_then(|s| err.check("server_name", server_name(s)));
    let mut dmz = Vec::new();
    for (i, addr) in raw.dmz.iter().enumerate() {
        let key = format!("dmz[{i}]");
        let Some((host, port)) = addr.rsplit_once(':') else {
            err.push(
                &key,
                format!("invalid address {addr:?} (expected HOST:PORT)"),
            );
            continue;
        };
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            err.push(
                &key,
                format!("invalid address {addr:?} (expected HOST:PORT)"),
            );
            continue;
        }
        if dmz.iter().any(|n: &DmzNode| &n.addr == addr) {
            err.push(&key, format!("{addr:?} is listed twice"));
            continue;
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = match &explicit_name {
            Some(n) => Some(n.clone()),
            None => err.check(
                &key,
                server_name(host).map_err(|e| format!("{e}; set server_name")),
            ),
        };
        if let Some(server_name) = name {
            dmz.push(DmzNode {
                addr: addr.clone(),
                server_name,
            });
        }
    }
    let connections = raw.connections.unwrap_or(defaults::CONNECTIONS);
    if !(1..=MAX_CONNECTIONS).contains(&connections) {
        err.push(
            "connections",
            format!("must be between 1 and {MAX_CONNECTIONS}"),
        );
    }
    let keepalive = duration(&mut err, "keepalive", &raw.keepalive, defaults::KEEPALIVE);
    let creds = cfg::credentials(
        &mut err,
        "tls",
        &cfg::resolve(base, &raw.tls.cert),
        &cfg::resolve(base, &raw.tls.key),
    );
    let roots = err.check("tls.ca", tls::load_roots(&cfg::resolve(base, &raw.tls.ca)));
    cfg::missing_pki_hint(
        &mut err,
        &[
            &cfg::resolve(base, &raw.tls.cert),
            &cfg::resolve(base, &raw.tls.key),
            &cfg::resolve(base, &raw.tls.ca),
        ],
    );
    let (tls, tls_outbound) = match (creds, roots) {
        (Some(creds), Some(roots)) => (
            err.check(
                "tls.key",
                tls::client_config(&creds, roots.clone(), &[ALPN_INBOUND_V1]),
            ),
            tls::client_config(&creds, roots, &[ALPN_OUTBOUND_V1]).ok(),
        ),
        _ => (None, None),
    };
    let (admin_listen, admin_access) =
        relay_tunnel::admin::RawAdmin::check(raw.admin.as_ref(), &mut err, base);
    let expiry_warning =
        relay_tunnel::admin::RawAdmin::expiry_warning(raw.admin.as_ref(), &mut err);
    let expiries = [
        Expiry::of_certificate_file("tls.cert", &cfg::resolve(base, &raw.tls.cert)),
        Expiry::of_certificate_file("tls.ca", &cfg::resolve(base, &raw.tls.ca)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let l = &raw.limits;
    let max_sessions = l.max_sessions.unwrap_or(defaults::MAX_SESSIONS);
    if max_sessions == 0 {
        err.push("limits.max_sessions", "must be at least 1");
    }
    let limits = Limits {
        max_sessions,
        connect_timeout: duration(
            &mut err,
            "limits.connect_timeout",
            &l.connect_timeout,
            defaults::CONNECT_TIMEOUT,
        ),
        half_closed_timeout: duration(
            &mut err,
            "limits.half_closed_timeout",
            &l.half_closed_timeout,
            defaults::HALF_CLOSED_TIMEOUT,
        ),
        idle_timeout: duration(
            &mut err,
            "limits.idle_timeout",
            &l.idle_timeout,
            defaults::IDLE_TIMEOUT,
        ),
        drain_timeout: duration(
            &mut err,
            "limits.drain_timeout",
            &l.drain_timeout,
            defaults::DRAIN_TIMEOUT,
        ),
    };
    let mut names = HashSet::new();
    let mut inbound = Vec::new();
    for (i, s) in raw.inbound.iter().enumerate() {
        let key = |field: &str| format!("inbound[{i}].{field}");
        if !protocol::valid_service_name(&s.name) {
            err.push(
                key("name"),
                format!("invalid service name {:?}: a letter, then letters, digits, '.', '_' or '-', 64 at most", s.name),
            );
        } else if !names.insert(s.name.clone()) {
            err.push(
                key("name"),
                format!("service {:?} is declared twice", s.name),
            );
        }
        let listen = err.check(key("listen"), s.listen.parse::<ListenSpec>());
        let targets = inbound_targets(&mut err, &key("target"), &s.target, listen.as_ref());
        let balance = match s.balance.as_deref() {
            None | Some("round_robin") => Some(Balance::RoundRobin),
            Some("first") => Some(Balance::First),
            Some("least_sessions") => Some(Balance::LeastSessions),
            Some(other) => {
                err.push(
                    key("balance"),
                    format!("unknown balance {other:?} (expected \"first\", \"round_robin\" or \"least_sessions\")"),
                );
                None
            }
        };
        let health = s
            .health
            .as_ref()
            .and_then(|h| health_check(&mut err, &key("health"), h, base));
        cfg::parse_networks(&mut err, &key("allow"), &s.allow);
        let proxy_protocol = match s.proxy_protocol.as_deref() {
            None => None,
            Some("v1") => Some(relay_tunnel::proxyproto::Version::V1),
            Some("v2") => Some(relay_tunnel::proxyproto::Version::V2),
            Some(other) => {
                err.push(
                    key("proxy_protocol"),
                    format!("unknown version {other:?} (expected \"v1\" or \"v2\")"),
                );
                None
            }
        };
        let (expect, sni) = gate(&mut err, &key, s, listen.as_ref(), targets.as_deref());
        if let (Some(listen), Some(targets), Some(balance)) = (listen, targets, balance) {
            inbound.push(InboundService {
                name: s.name.clone(),
                listen,
                targets,
                balance,
                health,
                allow: s.allow.clone(),
                accept_proxy: s.accept_proxy,
                proxy_protocol,
                expect,
                sni,
            });
        }
    }
    shared_addresses(&mut err, &inbound);
    let mut outbound = Vec::new();
    for (i, o) in raw.outbound.iter().enumerate() {
        let key = |field: &str| format!("outbound[{i}].{field}");
        if !protocol::valid_service_name(&o.name) {
            err.push(key("name"), format!("invalid name {:?}: a letter, then letters, digits, '.', '_' or '-', 64 at most", o.name));
        } else if !names.insert(o.name.clone()) {
            err.push(key("name"), format!("name {:?} is used twice", o.name));
        }
        let listen = err.check(
            key("listen"),
            o.listen
                .parse::<SocketAddr>()
                .map_err(|_| format!("invalid socket address {:?}", o.listen)),
        );
        let mut destinations = Vec::new();
        let mut all_valid = true;
        if o.target.0.is_empty() {
            err.push(key("target"), "at least one destination is required");
        }
        for (j, t) in o.target.0.iter().enumerate() {
            let k = o.target.key(&key("target"), j);
            match protocol::parse_destination(t)
                .map(|(h, p)| protocol::destination_authority(&h, p))
            {
                Some(d) if destinations.contains(&d) => {
                    err.push(k, format!("{t:?} is listed twice"));
                    all_valid = false;
                }
                Some(d) => destinations.push(d),
                None => {
                    err.push(k, format!("invalid destination {t:?} (expected HOST:PORT)"));
                    all_valid = false;
                }
            }
        }
        let target = (all_valid && !destinations.is_empty()).then(|| destinations.remove(0));
        let mut via = Vec::new();
        for (j, v) in o.via.iter().enumerate() {
            match raw.dmz.iter().position(|d| d == v) {
                Some(idx) => via.push(idx),
                None => err.push(
                    format!("outbound[{i}].via[{j}]"),
                    format!("{v:?} is not one of the dmz addresses"),
                ),
            }
        }
        if let (Some(listen), Some(target)) = (listen, target) {
            outbound.push(OutboundService {
                name: o.name.clone(),
                listen,
                target,
                backups: destinations,
                via,
            });
        }
    }
    let outbound_proxy = raw.outbound_proxy.as_ref().and_then(|p| {
        err.check(
            "outbound_proxy.listen",
            p.listen
                .parse::<SocketAddr>()
                .map_err(|_| format!("invalid socket address {:?}", p.listen)),
        )
    });
    let audit = raw
        .audit
        .as_ref()
        .and_then(|a| crate::syslog::check(a, &mut err, base));
    err.into_result(|| AgentConfig {
        audit,
        dmz,
        connections,
        keepalive,
        tls: tls.expect("checked"),
        tls_outbound: tls_outbound.expect("same material as tls"),
        outbound,
        outbound_proxy,
        source: None,
        admin_listen,
        admin_access,
        expiry_warning,
        expiries,
        limits,
        inbound,
        sandbox,
        files,
    })
}

/// The targets of `inbound[i]`: each valid, none twice, each range as large as `listen`'s.
fn inbound_targets(
    err: &mut ConfigError,
    base: &str,
    raw: &RawTargets,
    listen: Option<&ListenSpec>,
) -> Option<Vec<TargetSpec>> {
    if raw.0.is_empty() {
        err.push(base, "at least one target is required");
        return None;
    }
    let mut targets: Vec<TargetSpec> = Vec::new();
    let mut ok = true;
    for (j, text) in raw.0.iter().enumerate() {
        let key = raw.key(base, j);
        let Some(t) = err.check(&key, text.parse::<TargetSpec>()) else {
            ok = false;
            continue;
        };
        if targets
            .iter()
            .any(|o| o.host.eq_ignore_ascii_case(&t.host) && o.ports == t.ports)
        {
            err.push(&key, format!("{text:?} is listed twice"));
            ok = false;
            continue;
        }
        if let Some(l) = listen
            && l.ports.len() != t.ports.len()
        {
            err.push(
                &key,
                format!(
                    "port range {} has {} ports but listen {} has {}",
                    t.ports,
                    t.ports.len(),
                    l.ports,
                    l.ports.len()
                ),
            );
            ok = false;
        }
        targets.push(t);
    }
    ok.then_some(targets)
}

/// A checked `[inbound.health]` table, or `None` after reporting its problems.
fn health_check(
    err: &mut ConfigError,
    base: &str,
    raw: &RawHealth,
    dir: &Path,
) -> Option<HealthCheck> {
    let before = err.problems.len();
    let key = |field: &str| format!("{base}.{field}");
    let interval = duration(
        err,
        &key("interval"),
        &raw.interval,
        defaults::HEALTH_INTERVAL,
    );
    let timeout = duration(err, &key("timeout"), &raw.timeout, defaults::HEALTH_TIMEOUT);
    if timeout > interval {
        err.push(
            key("timeout"),
            format!("{timeout:?} is longer than the interval {interval:?}"),
        );
    }
    let hold_down = duration(
        err,
        &key("hold_down"),
        &raw.hold_down,
        defaults::HEALTH_HOLD_DOWN,
    );
    let fall = raw.fall.unwrap_or(defaults::HEALTH_FALL);
    let rise = raw.rise.unwrap_or(defaults::HEALTH_RISE);
    for (field, n) in [("fall", fall), ("rise", rise)] {
        if n == 0 {
            err.push(key(field), "must be at least 1");
        }
    }
    let only = |err: &mut ConfigError, field: &str, set: bool, kind: &str| {
        if set {
            err.push(key(field), format!("applies to kind = \"{kind}\" only"));
        }
    };
    let kind = match raw.kind.as_deref() {
        None => {
            err.push(
                key("kind"),
                "missing: \"tcp\", \"tls\" or \"http\" is required",
            );
            None
        }
        Some(k @ ("tcp" | "tls" | "http")) => {
            if k != "tls" {
                only(err, "ca", raw.ca.is_some(), "tls");
                only(err, "server_name", raw.server_name.is_some(), "tls");
            }
            if k != "http" {
                only(err, "request", raw.request.is_some(), "http");
                only(err, "status", raw.status.is_some(), "http");
            }
            match k {
                "tcp" => Some(CheckKind::Tcp),
                "tls" => health_tls(err, &key, raw, dir),
                _ => health_http(err, &key, raw),
            }
        }
        Some(other) => {
            err.push(
                key("kind"),
                format!("unknown kind {other:?} (expected \"tcp\", \"tls\" or \"http\")"),
            );
            None
        }
    };
    if err.problems.len() != before {
        return None;
    }
    Some(HealthCheck {
        kind: kind?,
        interval,
        timeout,
        fall,
        rise,
        hold_down,
    })
}

fn health_tls(
    err: &mut ConfigError,
    key: &dyn Fn(&str) -> String,
    raw: &RawHealth,
    dir: &Path,
) -> Option<CheckKind> {
    let server_name = match &raw.server_name {
        Some(s) => Some(err.check(key("server_name"), server_name(s))?),
        None => None,
    };
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .expect("the provider supports the default versions");
    let (config, verified) = match &raw.ca {
        Some(ca) => {
            let roots = err.check(key("ca"), tls::load_roots(&cfg::resolve(dir, ca)))?;
            (
                builder.with_root_certificates(roots).with_no_client_auth(),
                true,
            )
        }
        None => (
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(tls::AnyServerCert::new()))
                .with_no_client_auth(),
            false,
        ),
    };
    Some(CheckKind::Tls {
        config: Arc::new(config),
        server_name,
        verified,
    })
}

fn health_http(
    err: &mut ConfigError,
    key: &dyn Fn(&str) -> String,
    raw: &RawHealth,
) -> Option<CheckKind> {
    let request = raw
        .request
        .clone()
        .unwrap_or_else(|| defaults::HEALTH_REQUEST.to_owned());
    let valid = request.split(' ').count() == 2
        && request
            .split(' ')
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_graphic()))
        && request
            .split(' ')
            .nth(1)
            .is_some_and(|p| p.starts_with('/'));
    if !valid {
        err.push(
            key("request"),
            format!("invalid request line {request:?} (expected METHOD /PATH, as \"GET /health\")"),
        );
        return None;
    }
    let status = raw.status.unwrap_or(defaults::HEALTH_STATUS);
    if !(100..=599).contains(&status) {
        err.push(
            key("status"),
            format!("{status} is not an HTTP status code"),
        );
        return None;
    }
    Some(CheckKind::Http { request, status })
}
