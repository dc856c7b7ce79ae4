//! Metric names (one place, `relay_` prefix, base units) and their descriptions.
//!
//! Labels are low-cardinality: service, direction, result, reason, agent identity, DMZ node.
//! Never a partner address.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Gauge: tunnel connections up, labelled `agent` (DMZ side) or `dmz` (agent side).
pub const TUNNELS_CONNECTED: &str = "relay_tunnels_connected";
/// Counter: tunnel connection attempts by `result`.
pub const TUNNEL_CONNECTS: &str = "relay_tunnel_connects_total";
/// Counter: reconnects after a tunnel was lost, by `dmz` (agent side).
pub const TUNNEL_RECONNECTS: &str = "relay_tunnel_reconnects_total";
/// Histogram: HTTP/2 PING round-trip time.
pub const TUNNEL_RTT: &str = "relay_tunnel_rtt_seconds";
/// Gauge: sessions in flight by `service` and `direction`.
pub const SESSIONS_ACTIVE: &str = "relay_sessions_active";
/// Counter: sessions ended by `service`, `direction` and `result`.
pub const SESSIONS_TOTAL: &str = "relay_sessions_total";
/// Histogram: partner accept to first byte forwardable, by `direction`.
pub const SESSION_SETUP: &str = "relay_session_setup_seconds";
/// Histogram: session lifetime.
pub const SESSION_DURATION: &str = "relay_session_duration_seconds";
/// Counter: bytes relayed by `service` and `direction` (`partner_to_target`, `target_to_partner`).
pub const BYTES: &str = "relay_bytes_total";
/// Gauge: 1 while a service's public listener is bound, by `service` (DMZ).
pub const LISTENER_OPEN: &str = "relay_listener_open";
/// Counter: connections or requests refused before a session began, by `reason`.
pub const REJECTIONS: &str = "relay_rejections_total";
/// Counter: service registrations by `result` (`accepted`, `rejected`).
pub const REGISTRATIONS: &str = "relay_registrations_total";
/// Counter: admin requests refused for want of a valid credential, by `reason` (`missing`,
/// `invalid`: the token; `no_client_certificate`: with `admin.tls.client_ca`).
pub const ADMIN_REJECTIONS: &str = "relay_admin_rejections_total";
/// Counter: config reloads by `result` (`ok`, `error`).
pub const CONFIG_RELOADS: &str = "relay_config_reloads_total";
/// Gauge: always 1, labelled with the `version` and the `binary` (`relay-dmz`,
/// `relay-internal`).
pub const BUILD_INFO: &str = "relay_build_info";
/// Gauge: 1 where a part of the process's sandbox is in force, 0 where it is not, labelled
/// `part` (`landlock`, `seccomp`).
pub const SANDBOX_ENFORCED: &str = "relay_sandbox_enforced";
/// Gauge: the Unix time after which a TLS file of the node's config stops working (the
/// earliest notAfter of the certificates in it; a CRL's nextUpdate), labelled `file` with its
/// config key (`tunnel.cert`, `tunnel.ca`, `tunnel.crl` on the DMZ; `tls.cert`, `tls.ca` on
/// the agent).
pub const CERT_EXPIRY: &str = "relay_cert_expiry_timestamp_seconds";
/// Gauge (DMZ): the notAfter of each agent's certificate as a Unix time, labelled `agent`;
/// set when a tunnel of that agent comes up.
pub const AGENT_CERT_EXPIRY: &str = "relay_agent_cert_expiry_timestamp_seconds";

/// Gauge (agent): 1 while a target of a service is healthy, 0 once `fall` checks failed;
/// labelled `service` and `target` (an address from the agent's own config).
pub const TARGET_UP: &str = "relay_target_up";
/// Counter (agent): health checks of targets by `service`, `target` and `result`
/// (`ok`, `failed`; passive failures of a session's connect count as `passive_failed`).
pub const HEALTH_CHECKS: &str = "relay_health_checks_total";
/// Gauge (agent): 1 while a service is declared to the DMZ nodes, 0 while it is withdrawn
/// because no target of it is healthy; labelled `service`.
pub const SERVICE_DECLARED: &str = "relay_service_declared";
/// Counter (agent): withdrawals of a service for want of a healthy target, by `service`.
pub const WITHDRAWALS: &str = "relay_service_withdrawals_total";
/// Counter (agent): target connects of inbound sessions that failed and moved on to the next
/// target, by `service` and `target`.
pub const TARGET_FAILOVERS: &str = "relay_target_failovers_total";

/// Counter (agent): audit records handed to the syslog collector (written to its connection).
pub const AUDIT_SENT: &str = "relay_audit_sent_total";
/// Counter (agent): audit records dropped because the syslog queue was full, or still unsent
/// at shutdown.
pub const AUDIT_DROPPED: &str = "relay_audit_dropped_total";
/// Gauge (agent): 1 while a connection to the syslog collector is up.
pub const AUDIT_CONNECTED: &str = "relay_audit_connected";

/// `relay_rejections_total` reasons of the DMZ, as docs/OPERATIONS.md lists them: each series
/// exists from the start at 0, so that `rate()` and alerts work before the first refusal.
pub const DMZ_REJECTION_REASONS: &[&str] = &[
    "tls_handshake",
    "pending_limit",
    "pending_evicted",
    "bad_alpn",
    "unknown_agent",
    "no_rights",
    "registration",
    "service_not_allowed",
    "service_conflict",
    "service_invalid",
    "service_bind",
    "shutting_down",
    "proxy_header",
    "source_denied",
    "protocol",
    "sni",
    "limit",
    "service_limit",
    "source_limit",
    "rate_limit",
    "memory",
    "policy_denied",
    "audit_dropped",
];
/// `relay_rejections_total` reasons of the agent.
pub const AGENT_REJECTION_REASONS: &[&str] =
    &["bad_request", "unknown_service", "bad_proxy_request"];
/// `relay_sessions_total` results every session can end with.
const COMMON_RESULTS: &[&str] = &[
    "ok",
    "idle",
    "half_closed",
    "drain_timeout",
    "internal_error",
    "reset",
    "killed",
];
/// `relay_sessions_total` results of the DMZ's inbound sessions beyond [`COMMON_RESULTS`].
pub const DMZ_INBOUND_RESULTS: &[&str] = &[
    "proxy_header",
    "source_denied",
    "limit",
    "protocol",
    "sni",
    "no_agent",
    "target_refused",
    "target_timeout",
    "error",
];
/// `relay_sessions_total` results of the agent's inbound sessions beyond [`COMMON_RESULTS`].
pub const AGENT_INBOUND_RESULTS: &[&str] = &["target_refused", "target_timeout", "unavailable"];
/// `relay_sessions_total` results of outbound sessions (both sides) beyond [`COMMON_RESULTS`].
pub const OUTBOUND_RESULTS: &[&str] = &[
    "bad_request",
    "policy_denied",
    "target_refused",
    "target_timeout",
    "unavailable",
];

/// Creates, at 0, the counters of `binary` (`relay-dmz` or `relay-internal`) whose label
/// values are known at start: rejections by reason, tunnel connects, registrations, reloads,
/// admin refusals, and the agent's audit records sent and dropped.
pub fn zero_counters(binary: &str) {
    let dmz = binary == "relay-dmz";
    let reasons = if dmz {
        DMZ_REJECTION_REASONS
    } else {
        AGENT_REJECTION_REASONS
    };
    for &reason in reasons {
        metrics::counter!(REJECTIONS, "reason" => reason).increment(0);
    }
    for result in ["ok", "error"] {
        metrics::counter!(CONFIG_RELOADS, "result" => result).increment(0);
    }
    for reason in ["missing", "invalid", "no_client_certificate"] {
        metrics::counter!(ADMIN_REJECTIONS, "reason" => reason).increment(0);
    }
    metrics::counter!(TUNNEL_CONNECTS, "result" => "ok").increment(0);
    if dmz {
        for result in ["accepted", "rejected"] {
            metrics::counter!(REGISTRATIONS, "result" => result).increment(0);
        }
    } else {
        metrics::counter!(TUNNEL_CONNECTS, "result" => "error").increment(0);
        metrics::counter!(AUDIT_SENT).increment(0);
        metrics::counter!(AUDIT_DROPPED).increment(0);
    }
}

/// Creates, at 0, `relay_sessions_total` of one service for every result it can end with:
/// the common ones and `specific`.
pub fn zero_sessions(service: &str, direction: &'static str, specific: &[&'static str]) {
    for &result in COMMON_RESULTS.iter().chain(specific) {
        metrics::counter!(SESSIONS_TOTAL, "service" => service.to_owned(), "direction" => direction, "result" => result)
            .increment(0);
    }
}

/// Histogram buckets for latencies, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Histogram buckets for session durations, in seconds.
pub const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
];

/// Session direction label: partner to trading engine.
pub const INBOUND: &str = "inbound";
/// Session direction label: trading engine to partner.
pub const OUTBOUND: &str = "outbound";
/// Bytes direction label: from the partner toward the target.
pub const PARTNER_TO_TARGET: &str = "partner_to_target";
/// Bytes direction label: from the target toward the partner.
pub const TARGET_TO_PARTNER: &str = "target_to_partner";

/// Describes every metric once, and sets the build info gauge.
pub fn describe() {
    describe_gauge!(TUNNELS_CONNECTED, "Tunnel connections currently up.");
    describe_counter!(TUNNEL_CONNECTS, "Tunnel connection attempts, by result.");
    describe_counter!(
        TUNNEL_RECONNECTS,
        "Tunnel reconnects after a tunnel was lost."
    );
    describe_histogram!(
        TUNNEL_RTT,
        Unit::Seconds,
        "Round-trip time of tunnel keepalive PINGs."
    );
    describe_gauge!(SESSIONS_ACTIVE, "Sessions in flight.");
    describe_counter!(SESSIONS_TOTAL, "Sessions ended, by result.");
    describe_histogram!(
        SESSION_SETUP,
        Unit::Seconds,
        "Time from partner accept until the first byte can be forwarded."
    );
    describe_histogram!(SESSION_DURATION, Unit::Seconds, "Session lifetime.");
    describe_counter!(BYTES, Unit::Bytes, "Bytes relayed, by direction.");
    describe_gauge!(
        LISTENER_OPEN,
        "1 while the public listener of a service is bound."
    );
    describe_counter!(
        REJECTIONS,
        "Connections or requests refused before a session began."
    );
    describe_counter!(
        REGISTRATIONS,
        "Service registrations from agents, by result."
    );
    describe_counter!(
        ADMIN_REJECTIONS,
        "Admin requests refused for want of a valid token, by reason."
    );
    describe_counter!(
        CONFIG_RELOADS,
        "Config reloads (SIGHUP or POST /reload), by result."
    );
    describe_gauge!(TARGET_UP, "1 while a target passes its health checks.");
    describe_counter!(HEALTH_CHECKS, "Health checks of targets, by result.");
    describe_gauge!(
        SERVICE_DECLARED,
        "1 while a service is declared to the DMZ nodes, 0 while withdrawn."
    );
    describe_counter!(
        WITHDRAWALS,
        "Services withdrawn from the DMZ for want of a healthy target."
    );
    describe_counter!(
        TARGET_FAILOVERS,
        "Target connects that failed and moved on to the next target."
    );
    describe_counter!(
        AUDIT_SENT,
        "Audit records written to the syslog collector's connection."
    );
    describe_counter!(
        AUDIT_DROPPED,
        "Audit records dropped: the syslog queue was full, or they were unsent at shutdown."
    );
    describe_gauge!(
        AUDIT_CONNECTED,
        "1 while a connection to the syslog collector is up."
    );
    describe_gauge!(BUILD_INFO, "Build information; the value is always 1.");
    describe_gauge!(
        SANDBOX_ENFORCED,
        "1 where a part of the sandbox (landlock, seccomp) is in force."
    );
    describe_gauge!(
        CERT_EXPIRY,
        Unit::Seconds,
        "Unix time after which a TLS file of the config stops working (notAfter; a CRL's nextUpdate)."
    );
    describe_gauge!(
        AGENT_CERT_EXPIRY,
        Unit::Seconds,
        "Unix time at which a connected agent's certificate expires."
    );
}

/// Sets the build info gauge of `binary` (`relay-dmz` or `relay-internal`) and creates its
/// counters at 0 ([`zero_counters`]).
pub fn build_info(binary: &'static str) {
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "binary" => binary)
        .set(1.0);
    let applied = crate::sandbox::applied();
    for (part, on) in [
        ("landlock", applied.is_some_and(|a| a.landlock_enforced)),
        ("seccomp", applied.is_some_and(|a| a.seccomp_enforced)),
    ] {
        metrics::gauge!(SANDBOX_ENFORCED, "part" => part).set(if on { 1.0 } else { 0.0 });
    }
    zero_counters(binary);
}
