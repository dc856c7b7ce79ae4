//! The DMZ node's config: raw TOML structs, then a checked [`DmzConfig`].

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use relay_tunnel::config::{self as cfg, AddrRule, ConfigError, ConnectRule};
use relay_tunnel::expiry::Expiry;
use relay_tunnel::protocol::{ALPN_INBOUND_V1, ALPN_OUTBOUND_V1};
use relay_tunnel::tls;
use serde::Deserialize;

use crate::rights::{Fallback, Rights, Rules};

/// Default `[limits]` values.
pub mod defaults {
    use std::time::Duration;
    /// `limits.max_sessions`.
    pub const MAX_SESSIONS: usize = 10_000;
    /// `limits.source_burst` when `limits.source_rate` is set without it: two seconds' worth.
    pub const SOURCE_BURST_SECONDS: u32 = 2;
    /// `limits.memory_budget_mib`.
    pub const MEMORY_BUDGET_MIB: u64 = 2048;
    /// `limits.handshake_timeout`.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// `limits.connect_timeout`.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
    /// `limits.setup_timeout`.
    pub const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
    /// `limits.half_closed_timeout`.
    pub const HALF_CLOSED_TIMEOUT: Duration = Duration::from_secs(30);
    /// `limits.idle_timeout`.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
    /// `limits.proxy_header_timeout`.
    pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
    /// `limits.first_bytes_timeout`.
    pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(5);
    /// `limits.drain_delay`.
    pub const DRAIN_DELAY: Duration = Duration::from_secs(5);
    /// `limits.drain_timeout`.
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    /// `tunnel.keepalive`.
    pub const KEEPALIVE: Duration = Duration::from_secs(5);
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    tunnel: RawTunnel,
    admin: Option<relay_tunnel::admin::RawAdmin>,
    #[serde(default)]
    public: RawPublic,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    limits: RawLimits,
    sandbox: Option<relay_tunnel::sandbox::RawSandbox>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    listen: String,
    cert: String,
    key: String,
    ca: String,
    agents: Option<Vec<String>>,
    keepalive: Option<String>,
    crl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPublic {
    bind: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    listen_allow: Vec<String>,
    #[serde(default)]
    connect_allow: Vec<String>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    /// `"global"` or `"deny"`: what identities without their own table get.
    default: Option<String>,
    /// `[policy.agents."ID"]`: an identity's own rules.
    #[serde(default)]
    agents: std::collections::BTreeMap<String, RawRules>,
}

/// `[policy.agents."ID"]`: absent keys mean "nothing", not the global lists.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    #[serde(default)]
    listen_allow: Vec<String>,
    #[serde(default)]
    connect_allow: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_sessions: Option<usize>,
    max_sessions_per_service: Option<usize>,
    max_sessions_per_source: Option<u32>,
    source_rate: Option<u32>,
    source_burst: Option<u32>,
    memory_budget_mib: Option<u64>,
    handshake_timeout: Option<String>,
    connect_timeout: Option<String>,
    setup_timeout: Option<String>,
    idle_timeout: Option<String>,
    half_closed_timeout: Option<String>,
    drain_delay: Option<String>,
    proxy_header_timeout: Option<String>,
    first_bytes_timeout: Option<String>,
    drain_timeout: Option<String>,
}

/// A checked DMZ config: every address parsed, every file loaded.
#[derive(Debug, Clone)]
pub struct DmzConfig {
    /// Where agents dial.
    pub tunnel_listen: SocketAddr,
    /// TLS of the tunnel listener.
    pub tls: Arc<rustls::ServerConfig>,
    /// The agent certificate verifier (the same one `tls` uses), to re-check live tunnels
    /// after a reload.
    pub verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// The file this config was loaded from, read again on reload.
    pub source: Option<std::path::PathBuf>,
    /// Agent identities allowed; `None` admits any certificate the CA signed.
    pub agents: Option<Vec<String>>,
    /// PING interval; a tunnel silent for two intervals is dead.
    pub keepalive: Duration,
    /// Admin endpoint address.
    pub admin_listen: Option<SocketAddr>,
    /// Who may use the admin endpoint (`admin.token_file`, `admin.metrics_open`).
    pub admin_access: relay_tunnel::admin::Access,
    /// How long before a TLS file or an agent certificate stops working the log warns.
    pub expiry_warning: Duration,
    /// When the tunnel certificate, the CA and the CRL stop working.
    pub expiries: Vec<Expiry>,
    /// Replaces the address part of every service's listen address.
    pub public_bind: Option<IpAddr>,
    /// What each agent identity may open, join and have dialed (`policy.listen_allow`,
    /// `policy.connect_allow`, `policy.agents`, `policy.default`).
    pub rights: Rights,
    /// Peers whose PROXY protocol header is believed (on `accept_proxy` services).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Partner networks refused on every service.
    pub deny: Vec<ipnet::IpNet>,
    /// Session and timeout limits.
    pub limits: Limits,
    /// `[sandbox]`.
    pub sandbox: relay_tunnel::sandbox::Settings,
    /// The files this config names (certificates, key, CA, CRL, admin files), read again on
    /// reload.
    pub files: Vec<std::path::PathBuf>,
}

/// `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Partner sessions in flight at most, over all services.
    pub max_sessions: usize,
    /// Sessions in flight at most per service.
    pub max_sessions_per_service: usize,
    /// Sessions in flight at most per partner address; `None` (the default): no limit, since
    /// behind a load balancer without PROXY protocol every partner has the balancer's address.
    pub max_sessions_per_source: Option<u32>,
    /// New connections per second per partner address (token bucket rate); `None`: no limit.
    pub source_rate: Option<u32>,
    /// New connections a partner address may open at once (token bucket size).
    pub source_burst: u32,
    /// Resident memory beyond which no new session is accepted; `None`: no budget.
    pub memory_budget: Option<u64>,
    /// Time an agent has for the TLS handshake and its registration.
    pub handshake_timeout: Duration,
    /// Time to dial an outbound destination.
    pub connect_timeout: Duration,
    /// Time an agent has to answer a new session (it connects its target meanwhile).
    pub setup_timeout: Duration,
    /// A session with no byte moving either way for this long is closed.
    pub idle_timeout: Duration,
    /// One direction of a session ended and the other moved no byte for this long: closed.
    pub half_closed_timeout: Duration,
    /// Time in-flight sessions get to finish on shutdown.
    pub drain_timeout: Duration,
    /// Time a trusted proxy has to send the PROXY header.
    pub proxy_header_timeout: Duration,
    /// Time a partner of a gated or SNI-routed service has to send the bytes its check needs.
    pub first_bytes_timeout: Duration,
    /// Time between turning `/readyz` to 503 and closing the public listeners on shutdown,
    /// so a load balancer stops sending partners first.
    pub drain_delay: Duration,
}

impl Limits {
    /// The defaults, for unit tests.
    #[cfg(test)]
    pub fn for_tests() -> Self {
        Self {
            max_sessions: defaults::MAX_SESSIONS,
            max_sessions_per_service: defaults::MAX_SESSIONS,
            max_sessions_per_source: None,
            source_rate: None,
            source_burst: 1,
            memory_budget: None,
            handshake_timeout: defaults::HANDSHAKE_TIMEOUT,
            connect_timeout: defaults::CONNECT_TIMEOUT,
            setup_timeout: defaults::SETUP_TIMEOUT,
            idle_timeout: defaults::IDLE_TIMEOUT,
            half_closed_timeout: defaults::HALF_CLOSED_TIMEOUT,
            drain_timeout: defaults::DRAIN_TIMEOUT,
            proxy_header_timeout: defaults::PROXY_HEADER_TIMEOUT,
            first_bytes_timeout: defaults::FIRST_BYTES_TIMEOUT,
            drain_delay: defaults::DRAIN_DELAY,
        }
    }

    /// The time limits of one session.
    pub fn pump(&self) -> relay_tunnel::pump::PumpLimits {
        relay_tunnel::pump::PumpLimits {
            idle_timeout: self.idle_timeout,
            half_closed_timeout: self.half_closed_timeout,
        }
    }
}

impl DmzConfig {
    /// Reads and checks the config at `path`; relative paths are taken from its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let raw: Raw = cfg::read_toml(path, AGENT_CONFIG)?;
        let mut config = check(raw, &cfg::base_dir(path))?;
        config.source = Some(path.to_owned());
        Ok(config)
    }
}

/// The default memory budget: 2 GiB, or three quarters of the container's memory limit
/// (cgroup v2 `memory.max`) when that is lower, so the budget refuses sessions before the
/// kernel kills the process.
/// An agent's config, recognised by keys a DMZ config never has.
const AGENT_CONFIG: cfg::OtherConfig = cfg::OtherConfig {
    binary: "relay-internal",
    keys: &[
        "dmz",
        "server_name",
        "tls",
        "inbound",
        "outbound",
        "outbound_proxy",
    ],
};

fn default_memory_budget() -> u64 {
    let default = defaults::MEMORY_BUDGET_MIB * 1024 * 1024;
    std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(default, |limit| default.min(limit / 4 * 3))
}

/// Parses one rule set: `TABLE.listen_allow` and `TABLE.connect_allow`.
fn rules(err: &mut ConfigError, table: &str, listen: &[String], connect: &[String]) -> Rules {
    let listen_allow = err.parse_each::<AddrRule>(&format!("{table}.listen_allow"), listen);
    let connect_allow = err.parse_each::<ConnectRule>(&format!("{table}.connect_allow"), connect);
    Rules {
        listen_allow,
        connect_allow,
    }
}

fn duration(err: &mut ConfigError, key: &str, raw: &Option<String>, default: Duration) -> Duration {
    match raw {
        Some(s) => err.check(key, cfg::parse_duration(s)).unwrap_or(default),
        None => default,
    }
}

fn check(raw: Raw, base: &Path) -> Result<DmzConfig, ConfigError> {
    let mut err = ConfigError::default();
    let files = [&raw.tunnel.cert, &raw.tunnel.key, &raw.tunnel.ca]
        .into_iter()
        .chain(&raw.tunnel.crl)
        .map(|f| cfg::resolve(base, f))
        .chain(relay_tunnel::admin::RawAdmin::files(
            raw.admin.as_ref(),
            base,
        ))
        .collect();
    let sandbox = relay_tunnel::sandbox::RawSandbox::check(raw.sandbox.as_ref(), &mut err);
    let tunnel_listen = err.check(
        "tunnel.listen",
        raw.tunnel
            .listen
            .parse::<SocketAddr>()
            .map_err(|_| format!("invalid socket address {:?}", raw.tunnel.listen)),
    );
    let creds = cfg::credentials(
        &mut err,
        "tunnel",
        &cfg::resolve(base, &raw.tunnel.cert),
        &cfg::resolve(base, &raw.tunnel.key),
    );
    let roots = err.check(
        "tunnel.ca",
        tls::load_roots(&cfg::resolve(base, &raw.tunnel.ca)),
    );
    cfg::missing_pki_hint(
        &mut err,
        &[
            &cfg::resolve(base, &raw.tunnel.cert),
            &cfg::resolve(base, &raw.tunnel.key),
            &cfg::resolve(base, &raw.tunnel.ca),
        ],
    );
    let crls = match &raw.tunnel.crl {
        Some(path) => err.check("tunnel.crl", tls::load_crls(&cfg::resolve(base, path))),
        None => Some(Vec::new()),
    };
    let verifier = match (roots, crls) {
        (Some(roots), Some(crls)) => err.check("tunnel.ca", tls::client_verifier(roots, crls)),
        _ => None,
    };
    let tls = match (creds, &verifier) {
        (Some(creds), Some(verifier)) => err.check(
            "tunnel.key",
            tls::server_config(
                &creds,
                verifier.clone(),
                &[ALPN_INBOUND_V1, ALPN_OUTBOUND_V1],
            ),
        ),
        _ => None,
    };
    if let Some(agents) = &raw.tunnel.agents {
        for (i, a) in agents.iter().enumerate() {
            if a.is_empty() {
                err.push(format_args!("tunnel.agents[{i}]"), "empty agent identity");
            }
        }
    }
    let keepalive = duration(
        &mut err,
        "tunnel.keepalive",
        &raw.tunnel.keepalive,
        defaults::KEEPALIVE,
    );
    let (admin_listen, admin_access) =
        relay_tunnel::admin::RawAdmin::check(raw.admin.as_ref(), &mut err, base);
    let expiry_warning =
        relay_tunnel::admin::RawAdmin::expiry_warning(raw.admin.as_ref(), &mut err);
    let expiries = [
        Expiry::of_certificate_file("tunnel.cert", &cfg::resolve(base, &raw.tunnel.cert)),
        Expiry::of_certificate_file("tunnel.ca", &cfg::resolve(base, &raw.tunnel.ca)),
        raw.tunnel
            .crl
            .as_ref()
            .and_then(|crl| Expiry::of_crl_file("tunnel.crl", &cfg::resolve(base, crl))),
    ]
    .into_iter()
    .flatten()
    .collect();
    let public_bind = raw.public.bind.as_ref().and_then(|b| {
        err.check(
            "public.bind",
            b.parse::<IpAddr>()
                .map_err(|_| format!("invalid IP address {b:?}")),
        )
    });
    let global = rules(
        &mut err,
        "policy",
        &raw.policy.listen_allow,
        &raw.policy.connect_allow,
    );
    let mut agent_rules = std::collections::BTreeMap::new();
    for (agent, r) in &raw.policy.agents {
        let key = format!("policy.agents.{agent:?}");
        if agent.is_empty() {
            err.push(&key, "empty agent identity");
        } else if let Some(allowed) = &raw.tunnel.agents
            && !allowed.contains(agent)
        {
            err.push(
                &key,
                format_args!("{agent:?} is not in tunnel.agents, so it can never connect"),
            );
        }
        let own = rules(&mut err, &key, &r.listen_allow, &r.connect_allow);
        agent_rules.insert(agent.clone(), own);
    }
    let fallback = match raw.policy.default.as_deref() {
        None | Some("global") => Fallback::Global,
        Some("deny") => Fallback::Deny,
        Some(other) => {
            err.push(
                "policy.default",
                format_args!("unknown value {other:?} (expected \"global\" or \"deny\")"),
            );
            Fallback::Global
        }
    };
    let rights = Rights {
        global,
        agents: agent_rules,
        fallback,
    };
    let deny = cfg::parse_networks(&mut err, "policy.deny", &raw.policy.deny);
    let trusted_proxies = cfg::parse_networks(
        &mut err,
        "policy.trusted_proxies",
        &raw.policy.trusted_proxies,
    );
    let l = &raw.limits;
    let max_sessions = l.max_sessions.unwrap_or(defaults::MAX_SESSIONS);
    if max_sessions == 0 {
        err.push("limits.max_sessions", "must be at least 1");
    }
    for (key, value) in [
        (
            "limits.max_sessions_per_service",
            l.max_sessions_per_service.map(|v| v as u64),
        ),
        (
            "limits.max_sessions_per_source",
            l.max_sessions_per_source.map(u64::from),
        ),
        ("limits.source_rate", l.source_rate.map(u64::from)),
        ("limits.source_burst", l.source_burst.map(u64::from)),
    ] {
        if value == Some(0) {
            err.push(key, "must be at least 1");
        }
    }
    let limits = Limits {
        max_sessions,
        max_sessions_per_service: l.max_sessions_per_service.unwrap_or(max_sessions),
        max_sessions_per_source: l.max_sessions_per_source,
        source_rate: l.source_rate,
        source_burst: l.source_burst.unwrap_or_else(|| {
            l.source_rate
                .unwrap_or(1)
                .saturating_mul(defaults::SOURCE_BURST_SECONDS)
        }),
        memory_budget: match l.memory_budget_mib {
            Some(0) => None,
            Some(mib) => Some(mib * 1024 * 1024),
            None => Some(default_memory_budget()),
        },
        handshake_timeout: duration(
            &mut err,
            "limits.handshake_timeout",
            &l.handshake_timeout,
            defaults::HANDSHAKE_TIMEOUT,
        ),
        connect_timeout: duration(
            &mut err,
            "limits.connect_timeout",
            &l.connect_timeout,
            defaults::CONNECT_TIMEOUT,
        ),
        setup_timeout: duration(
            &mut err,
            "limits.setup_timeout",
            &l.setup_timeout,
            defaults::SETUP_TIMEOUT,
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
        proxy_header_timeout: duration(
            &mut err,
            "limits.proxy_header_timeout",
            &l.proxy_header_timeout,
            defaults::PROXY_HEADER_TIMEOUT,
        ),
        first_bytes_timeout: duration(
            &mut err,
            "limits.first_bytes_timeout",
            &l.first_bytes_timeout,
            defaults::FIRST_BYTES_TIMEOUT,
        ),
        drain_delay: match &l.drain_delay {
            Some(s) => err
                .check(
                    "limits.drain_delay",
                    humantime::parse_duration(s)
                        .map_err(|e| format!("invalid duration {s:?}: {e}")),
                )
                .unwrap_or(defaults::DRAIN_DELAY),
            None => defaults::DRAIN_DELAY,
        },
        drain_timeout: duration(
            &mut err,
            "limits.drain_timeout",
            &l.drain_timeout,
            defaults::DRAIN_TIMEOUT,
        ),
    };
    err.into_result(|| DmzConfig {
        tunnel_listen: tunnel_listen.expect("checked"),
        tls: tls.expect("checked"),
        verifier: verifier.expect("checked"),
        source: None,
        agents: raw.tunnel.agents,
        keepalive,
        admin_listen,
        admin_access,
        expiry_warning,
        expiries,
        public_bind,
        rights,
        trusted_proxies,
        deny,
        limits,
        sandbox,
        files,
    })
}
