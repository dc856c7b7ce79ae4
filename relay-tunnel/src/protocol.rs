//! The tunnel wire contract (see docs/PROTOCOL.md): ALPN names, the registration exchange that
//! precedes HTTP/2 on an inbound carrier, and the metadata of a session stream.
//!
//! Everything here is a pure function over buffers or strings, so it is tested and fuzzed
//! without sockets.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::first_bytes::Expect;

/// ALPN of an inbound carrier, version 1: the agent dials, then the DMZ is the HTTP/2 client.
pub const ALPN_INBOUND_V1: &[u8] = b"relay-inbound/1";

/// ALPN of an outbound carrier, version 1: the agent dials and is the HTTP/2 client; each
/// stream asks the DMZ to dial a partner `host:port`.
pub const ALPN_OUTBOUND_V1: &[u8] = b"relay-outbound/1";

/// Largest registration or registration answer accepted, in bytes (after the length prefix).
pub const MAX_MESSAGE_LEN: usize = 256 * 1024;

/// Header carrying the partner's address as the DMZ sees it (after PROXY protocol).
pub const HEADER_PARTNER: &str = "relay-partner";
/// Header carrying the DMZ address the partner connected to.
pub const HEADER_LOCAL: &str = "relay-local";
/// Header carrying the session id the DMZ chose.
pub const HEADER_SESSION: &str = "relay-session";
/// Header of an outbound session: the agent's name for it (`[[outbound]]` name or `proxy`),
/// used as the `service` label on the DMZ.
pub const HEADER_SERVICE: &str = "relay-service";
/// Header of an outbound session: how long the agent lets the DMZ dial, in milliseconds (the
/// DMZ dials within the smaller of this and its own `limits.connect_timeout`, so it answers
/// before the agent gives up and tries another node).
pub const HEADER_CONNECT_TIMEOUT: &str = "relay-connect-timeout-ms";
/// Header of an outbound session: backup destinations (`host:port`, comma-separated), dialed in
/// order when the request's own destination cannot be reached.
pub const HEADER_BACKUP: &str = "relay-backup";
/// Most backup destinations one outbound session may name.
pub const MAX_BACKUPS: usize = 8;
/// Header of a 200 answer to an outbound session: the destination the DMZ reached.
pub const HEADER_DIALED: &str = "relay-dialed";
/// Header of a non-200 answer: one line saying why the session was refused.
pub const HEADER_REASON: &str = "relay-reason";

/// The `relay-reason` text of an answer, empty when absent or not text.
pub fn reason(headers: &http::HeaderMap) -> String {
    headers
        .get(HEADER_REASON)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// One `[[inbound]]` service as the agent declares it to the DMZ.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDecl {
    /// Service name: a letter, then `[A-Za-z0-9._-]`, 64 characters at most.
    pub name: String,
    /// Public listen address, `IP:PORT` or `IP:FIRST-LAST`.
    pub listen: String,
    /// Partner source networks allowed; empty means any.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Whether the DMZ expects a PROXY protocol header from a trusted proxy on this port.
    #[serde(default)]
    pub accept_proxy: bool,
    /// The protocol partners must speak first, checked by the DMZ before any stream opens.
    #[serde(default, skip_serializing_if = "Expect::is_any")]
    pub expect: Expect,
    /// TLS server names routed to this service on a listen address several services share
    /// (exact, `*.` one-label wildcards, `*` for the default); empty: the address is its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni: Vec<String>,
}

/// The first message of an inbound carrier, agent to DMZ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// A random id the agent process picks at start, the same on all its tunnels, so the DMZ
    /// can tell two processes that share one certificate apart.
    pub instance: String,
    /// The services this tunnel connection serves.
    pub services: Vec<ServiceDecl>,
}

/// The DMZ's verdict on one declared service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceVerdict {
    /// The service name, as declared.
    pub name: String,
    /// Whether the DMZ serves it through this tunnel.
    pub accepted: bool,
    /// Why it was rejected; absent when accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ServiceVerdict {
    /// The verdict on service `name`: accepted, or rejected with the reason.
    pub fn of(name: &str, result: Result<(), String>) -> Self {
        Self {
            name: name.to_owned(),
            accepted: result.is_ok(),
            reason: result.err(),
        }
    }
}

/// The DMZ's answer to a [`Registration`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationAnswer {
    /// One verdict per declared service, in the declared order.
    pub services: Vec<ServiceVerdict>,
    /// Set when the DMZ refuses this agent identity as a whole (not in `tunnel.agents`, no
    /// rights on the node): why, for the agent's log. The DMZ closes the connection after it,
    /// and `services` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

impl RegistrationAnswer {
    /// The verdicts on a registration the DMZ took.
    pub fn verdicts(services: Vec<ServiceVerdict>) -> Self {
        Self {
            services,
            refused: None,
        }
    }
}

/// The path of the control stream the DMZ opens on each inbound carrier (a POST whose request
/// body carries DMZ messages and whose response body carries agent messages).
pub const CONTROL_PATH: &str = "/relay/v1/control";

/// A message from the agent on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentMessage {
    /// Replaces the services this tunnel serves (after a reload).
    Register {
        /// The new service list.
        services: Vec<ServiceDecl>,
    },
    /// The agent is shutting down: send it no new session; sessions in flight continue.
    Drain,
}

/// A message from the DMZ on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DmzMessage {
    /// The verdicts on an [`AgentMessage::Register`].
    Registered {
        /// One verdict per declared service.
        services: Vec<ServiceVerdict>,
    },
    /// A partner connection the DMZ refused before any agent saw it, for the agent's audit
    /// trail (the DMZ keeps no record).
    Refused(RefusedSession),
    /// The answer to [`AgentMessage::Drain`]: the DMZ opens no more sessions on this
    /// connection, and every one it opened before was sent ahead of this message.
    Drained,
}

/// A partner connection refused by the DMZ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefusedSession {
    /// Session id the DMZ assigned.
    pub session: String,
    /// The service whose port the partner reached.
    pub service: String,
    /// The partner's address.
    pub partner: String,
    /// Why: `source_denied`, `limit`, `no_agent`, ...
    pub reason: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// A message that cannot be framed or parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    /// The length prefix announces more than [`MAX_MESSAGE_LEN`].
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_LEN}")]
    TooLong(usize),
    /// The body is not the expected JSON document.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Frames a message: 4-byte big-endian length, then the JSON body.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let body = serde_json::to_vec(message).expect("protocol messages always serialize");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads a length prefix; returns the body length to read next.
pub fn decode_len(prefix: [u8; 4]) -> Result<usize, MessageError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_MESSAGE_LEN {
        return Err(MessageError::TooLong(len));
    }
    Ok(len)
}

/// Parses a message body.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, MessageError> {
    serde_json::from_slice(body).map_err(|e| MessageError::Malformed(e.to_string()))
}

/// Reads one framed message from `io`.
pub async fn read_message<T, R>(io: &mut R) -> Result<T, ReadMessageError>
where
    T: for<'a> Deserialize<'a>,
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let len = decode_len(prefix)?;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    Ok(decode(&body)?)
}

/// Writes one framed message to `io`.
pub async fn write_message<T, W>(io: &mut W, message: &T) -> std::io::Result<()>
where
    T: Serialize,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    io.write_all(&encode(message)).await?;
    io.flush().await
}

/// Failure to read a framed message.
#[derive(Debug, thiserror::Error)]
pub enum ReadMessageError {
    /// The connection failed or closed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The bytes were not a valid message.
    #[error(transparent)]
    Message(#[from] MessageError),
}

/// Whether `name` is a valid service name: a letter, then `[A-Za-z0-9._-]`, 1 to 64 characters
/// in all, so it fits in a metric label and in the host part of a CONNECT authority, and is
/// never mistaken for an address.
pub fn valid_service_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The CONNECT authority of an inbound session: the service and the public port the partner
/// reached (which selects the target port of a range service). Never an address.
pub fn session_authority(service: &str, public_port: u16) -> String {
    format!("{service}:{public_port}")
}

/// Splits a session authority into service name and public port.
pub fn parse_session_authority(authority: &str) -> Option<(&str, u16)> {
    let (service, port) = authority.rsplit_once(':')?;
    if !valid_service_name(service) {
        return None;
    }
    Some((service, port.parse().ok()?))
}

/// Splits an outbound CONNECT authority `host:port` (`[v6]:port` for IPv6) into host and port.
pub fn parse_destination(authority: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        host.parse::<std::net::Ipv6Addr>().ok()?;
        (host, port)
    } else {
        let (host, port) = authority.rsplit_once(':')?;
        if host.contains(':') {
            return None;
        }
        (host, port)
    };
    let port: u16 = port.parse().ok()?;
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    (host_ok && port != 0).then(|| (host.to_ascii_lowercase(), port))
}

/// Joins a host and port into a CONNECT authority, bracketing IPv6 addresses.
pub fn destination_authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Session metadata the DMZ sends with each inbound stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMeta {
    /// The partner's address (after PROXY protocol).
    pub partner: SocketAddr,
    /// The DMZ address the partner connected to.
    pub local: SocketAddr,
    /// The session id.
    pub session: String,
}

impl SessionMeta {
    /// Reads the metadata headers; `None` if any is missing or malformed.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let get = |name: &str| headers.get(name)?.to_str().ok();
        let session = get(HEADER_SESSION)?;
        if session.is_empty()
            || session.len() > 64
            || !session.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return None;
        }
        Some(Self {
            partner: get(HEADER_PARTNER)?.parse().ok()?,
            local: get(HEADER_LOCAL)?.parse().ok()?,
            session: session.to_owned(),
        })
    }

    /// Writes the metadata headers.
    pub fn to_headers(&self, headers: &mut http::HeaderMap) {
        let mut put = |name: &'static str, value: String| {
            if let Ok(value) = http::HeaderValue::try_from(value) {
                headers.insert(name, value);
            }
        };
        put(HEADER_PARTNER, self.partner.to_string());
        put(HEADER_LOCAL, self.local.to_string());
        put(HEADER_SESSION, self.session.clone());
    }
}

/// A new random session id: 16 lowercase hex digits.
pub fn new_session_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// Why an agent refused a session, as an HTTP status of the CONNECT answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The stream names no service of the agent, or a port outside it (404).
    UnknownService,
    /// The request is not a well-formed session request (400).
    BadRequest,
    /// The target refused or failed the connection (502).
    TargetRefused,
    /// The target did not answer within the connect timeout (504).
    TargetTimeout,
    /// The agent is draining or at its session limit (503).
    Unavailable,
    /// The DMZ policy does not allow the destination (403, outbound only).
    PolicyDenied,
}

impl Refusal {
    /// The status code sent for this refusal.
    pub fn status(self) -> http::StatusCode {
        match self {
            Refusal::UnknownService => http::StatusCode::NOT_FOUND,
            Refusal::BadRequest => http::StatusCode::BAD_REQUEST,
            Refusal::TargetRefused => http::StatusCode::BAD_GATEWAY,
            Refusal::TargetTimeout => http::StatusCode::GATEWAY_TIMEOUT,
            Refusal::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
            Refusal::PolicyDenied => http::StatusCode::FORBIDDEN,
        }
    }

    /// The refusal a status code stands for; `None` for 200 and unknown codes.
    pub fn from_status(status: http::StatusCode) -> Option<Self> {
        Some(match status.as_u16() {
            404 => Refusal::UnknownService,
            400 => Refusal::BadRequest,
            502 => Refusal::TargetRefused,
            504 => Refusal::TargetTimeout,
            503 => Refusal::Unavailable,
            403 => Refusal::PolicyDenied,
            _ => return None,
        })
    }

    /// The refusal a non-200 session answer stands for (an unknown status counts as 400), and
    /// its `relay-reason` text (empty when absent).
    pub fn of_answer<B>(answer: &http::Response<B>) -> (Self, String) {
        let refusal = Self::from_status(answer.status()).unwrap_or(Refusal::BadRequest);
        (refusal, reason(answer.headers()))
    }

    /// The metric label of this outcome.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::UnknownService => "unknown_service",
            Refusal::BadRequest => "bad_request",
            Refusal::TargetRefused => "target_refused",
            Refusal::TargetTimeout => "target_timeout",
            Refusal::Unavailable => "unavailable",
            Refusal::PolicyDenied => "policy_denied",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_round_trips() {
        let reg = Registration {
            instance: "a1".into(),
            services: vec![ServiceDecl {
                name: "as2".into(),
                listen: "0.0.0.0:8443".into(),
                allow: vec!["198.51.100.0/24".into()],
                accept_proxy: true,
                ..Default::default()
            }],
        };
        let framed = encode(&reg);
        let len = decode_len(framed[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, framed.len() - 4);
        assert_eq!(decode::<Registration>(&framed[4..]).unwrap(), reg);
    }

    #[test]
    fn control_messages_round_trip() {
        let messages = [
            AgentMessage::Drain,
            AgentMessage::Register { services: vec![] },
        ];
        for m in messages {
            let framed = encode(&m);
            assert_eq!(decode::<AgentMessage>(&framed[4..]).unwrap(), m);
        }
        let refused = DmzMessage::Refused(RefusedSession {
            session: "00ff".into(),
            service: "as2".into(),
            partner: "198.51.100.7:4000".into(),
            reason: "source_denied".into(),
            at_ms: 1,
        });
        assert_eq!(
            decode::<DmzMessage>(&encode(&refused)[4..]).unwrap(),
            refused
        );
        assert!(decode::<AgentMessage>(br#"{"type":"shell","cmd":"x"}"#).is_err());
    }

    #[test]
    fn oversized_and_malformed_messages_are_refused() {
        assert_eq!(
            decode_len(u32::MAX.to_be_bytes()),
            Err(MessageError::TooLong(u32::MAX as usize))
        );
        assert!(
            decode::<Registration>(b"{\"instance\":\"a\",\"services\":[],\"extra\":1}").is_err()
        );
        assert!(decode::<Registration>(b"\xff\x00").is_err());
    }

    #[test]
    fn service_names_are_restricted() {
        assert!(valid_service_name("ftp-data_1.x"));
        assert!(!valid_service_name(""));
        assert!(!valid_service_name("a b"));
        assert!(!valid_service_name("10.0.0.1"));
        assert!(!valid_service_name("-x"));
        assert!(!valid_service_name(&"a".repeat(65)));
    }

    #[test]
    fn authorities_name_a_service_and_a_port() {
        assert_eq!(
            parse_session_authority(&session_authority("as2", 8443)),
            Some(("as2", 8443))
        );
        assert_eq!(parse_session_authority("10.0.0.1:22"), None);
        assert_eq!(parse_session_authority("[::1]:22"), None);
        assert_eq!(parse_session_authority("as2"), None);
        assert_eq!(parse_session_authority("as2:99999"), None);
    }

    #[test]
    fn destinations_parse_names_and_addresses() {
        assert_eq!(
            parse_destination("Partner.Example.com:443"),
            Some(("partner.example.com".into(), 443))
        );
        assert_eq!(
            parse_destination("[2001:db8::1]:22"),
            Some(("2001:db8::1".into(), 22))
        );
        assert_eq!(
            parse_destination(&destination_authority("2001:db8::1", 22)),
            Some(("2001:db8::1".into(), 22))
        );
        for bad in [
            "",
            "host",
            "host:0",
            ":80",
            "a b:80",
            "[nothex]:80",
            "2001:db8::1:22",
            "h:99999",
        ] {
            assert_eq!(parse_destination(bad), None, "{bad}");
        }
    }

    #[test]
    fn metadata_round_trips_and_rejects_garbage() {
        let meta = SessionMeta {
            partner: "198.51.100.7:40000".parse().unwrap(),
            local: "[::1]:8443".parse().unwrap(),
            session: new_session_id(),
        };
        let mut headers = http::HeaderMap::new();
        meta.to_headers(&mut headers);
        assert_eq!(SessionMeta::from_headers(&headers), Some(meta));
        headers.insert(HEADER_SESSION, http::HeaderValue::from_static("../x"));
        assert_eq!(SessionMeta::from_headers(&headers), None);
    }

    #[test]
    fn refusals_map_to_statuses_and_back() {
        for r in [
            Refusal::UnknownService,
            Refusal::BadRequest,
            Refusal::TargetRefused,
            Refusal::TargetTimeout,
            Refusal::Unavailable,
            Refusal::PolicyDenied,
        ] {
            assert_eq!(Refusal::from_status(r.status()), Some(r));
        }
    }
}
