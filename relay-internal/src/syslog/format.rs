//! Audit records as RFC 5424 syslog messages, framed by octet counting (RFC 6587 §3.4.1) for
//! TCP and TLS. Pure functions over buffers.
//!
//! ```text
//! 493 <134>1 2026-12-03T18:05:42.859789Z vm relay-internal 12859 session [meta sequenceId="4"][relay@32473 session="b2ba0d79e636d458" service="echo" direction="inbound" partner="127.0.0.9:41331" dmz="127.0.0.1:15076" duration_ms="2" bytes_partner_to_target="2992" bytes_target_to_partner="2992" outcome="ok"] session session=b2ba0d79e636d458 service=echo ...
//! ```

use std::fmt::Write as _;
use std::str::FromStr;

use relay_tunnel::audit::AuditRecord;

/// The SD-ID of the record's fields. 32473 is the private enterprise number that RFC 5612
/// reserves for documentation: a placeholder until the project registers its own.
pub const SD_ID: &str = "relay@32473";
/// APP-NAME of every record.
pub const APP_NAME: &str = "relay-internal";
/// MSGID of a session's record.
pub const MSGID_SESSION: &str = "session";
/// MSGID of a partner the DMZ refused (a record with `at_ms`).
pub const MSGID_REFUSED: &str = "refused";

/// Severity `informational`: a session that ended well.
const SEVERITY_INFO: u8 = 6;
/// Severity `notice`: a session that failed, or a partner the DMZ refused.
const SEVERITY_NOTICE: u8 = 5;
/// Longest HOSTNAME (RFC 5424 §6.2.4).
const MAX_HOSTNAME: usize = 255;
/// Longest PARAM-NAME (RFC 5424 §6.3.3).
const MAX_PARAM_NAME: usize = 32;
/// The UTF-8 byte order mark that starts a MSG holding non-ASCII text (RFC 5424 §6.4).
const BOM: &str = "\u{feff}";

/// A syslog facility (RFC 5424 §6.2.1), by name in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facility(u8);

/// The facilities an operator may name, with their codes.
const FACILITIES: [(&str, u8); 20] = [
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

impl Facility {
    /// The numeric code.
    pub fn code(self) -> u8 {
        self.0
    }
}

/// `local0`: a facility left to local use, so that the records do not mix with the host's own.
impl Default for Facility {
    fn default() -> Self {
        Self(16)
    }
}

impl FromStr for Facility {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FACILITIES
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, code)| Self(*code))
            .ok_or_else(|| {
                let names: Vec<&str> = FACILITIES.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown facility {s:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// The parts of the header that are the same in every record of this process.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The facility.
    pub facility: Facility,
    /// HOSTNAME: this host's name, or `-`.
    pub hostname: String,
    /// PROCID: this process's id.
    pub procid: u32,
}

impl Origin {
    /// This host and process.
    pub fn here(facility: Facility) -> Self {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Self {
            facility,
            hostname: hostname(&name),
            procid: std::process::id(),
        }
    }
}

/// A HOSTNAME field from `name`: printable ASCII without spaces, at most 255 characters;
/// `-` (nothing known) when none is left.
pub fn hostname(name: &str) -> String {
    let clean: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_HOSTNAME)
        .collect();
    if clean.is_empty() { "-".into() } else { clean }
}

/// Appends `record` to `out` as one octet-counted RFC 5424 message: `LEN SP MSG`.
pub fn frame(record: &AuditRecord, origin: &Origin, out: &mut Vec<u8>) {
    let message = message(record, origin);
    out.extend_from_slice(message.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(message.as_bytes());
}

/// `record` as an RFC 5424 message: the header, `[meta sequenceId]`, the fields as
/// `[relay@32473 ...]`, then a MSG with the record's message and its fields as `key=value`
/// (read by collectors and SIEMs that show MSG only).
pub fn message(record: &AuditRecord, origin: &Origin) -> String {
    let refused = record.field("at_ms").is_some();
    let severity = if !refused && record.field("outcome") == Some("ok") {
        SEVERITY_INFO
    } else {
        SEVERITY_NOTICE
    };
    let pri = u16::from(origin.facility.code()) * 8 + u16::from(severity);
    let time = humantime::format_rfc3339_micros(record.time);
    let msgid = if refused {
        MSGID_REFUSED
    } else {
        MSGID_SESSION
    };
    let mut m = String::with_capacity(512);
    let _ = write!(
        m,
        "<{pri}>1 {time} {} {APP_NAME} {} {msgid} [meta sequenceId=\"{}\"][{SD_ID}",
        origin.hostname, origin.procid, record.sequence
    );
    for (name, value) in &record.fields {
        let name = param_name(name);
        if name.is_empty() {
            continue;
        }
        let _ = write!(m, " {name}=\"");
        escape_param(value, &mut m);
        m.push('"');
    }
    m.push_str("] ");
    let start = m.len();
    m.push_str(&record.message);
    for (name, value) in &record.fields {
        let _ = write!(m, " {name}=");
        logfmt_value(value, &mut m);
    }
    if !m[start..].is_ascii() {
        m.insert_str(start, BOM);
    }
    m
}

/// A PARAM-NAME: printable ASCII but `=`, space, `]` and `"`; 32 characters at most.
fn param_name(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '=' | ']' | '"'))
        .take(MAX_PARAM_NAME)
        .collect()
}

/// A PARAM-VALUE: `"`, `\` and `]` escaped with `\` (RFC 5424 §6.3.3).
fn escape_param(value: &str, out: &mut String) {
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// A value in MSG: bare when it is plain, else quoted with `"` and `\` escaped.
fn logfmt_value(value: &str, out: &mut String) {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '"' | '=' | '\\'));
    if plain {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn record(fields: &[(&'static str, &str)]) -> AuditRecord {
        AuditRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_micros(1_738_317_600_123_456),
            sequence: 7,
            message: "session".into(),
            fields: fields.iter().map(|(n, v)| (*n, (*v).to_owned())).collect(),
        }
    }

    fn origin() -> Origin {
        Origin {
            facility: Facility::default(),
            hostname: "engine-host".into(),
            procid: 4242,
        }
    }

    #[test]
    fn a_session_record() {
        let r = record(&[
            ("session", "9f2c"),
            ("service", "as2"),
            ("direction", "inbound"),
            ("partner", "198.51.100.7:50123"),
            ("bytes_partner_to_target", "1000"),
            ("outcome", "ok"),
        ]);
        assert_eq!(
            message(&r, &origin()),
            "<134>1 2025-01-31T10:00:00.123456Z engine-host relay-internal 4242 session \
             [meta sequenceId=\"7\"][relay@32473 session=\"9f2c\" service=\"as2\" direction=\"inbound\" \
             partner=\"198.51.100.7:50123\" bytes_partner_to_target=\"1000\" outcome=\"ok\"] \
             session session=9f2c service=as2 direction=inbound partner=198.51.100.7:50123 \
             bytes_partner_to_target=1000 outcome=ok"
        );
    }

    #[test]
    fn severity_and_msgid_follow_the_outcome() {
        let o = origin();
        let failed = message(&record(&[("outcome", "target_refused")]), &o);
        assert!(failed.starts_with("<133>1 "), "{failed}");
        assert!(failed.contains(" session [meta"), "{failed}");
        let mut refused = record(&[("at_ms", "1738317600000"), ("outcome", "source_denied")]);
        refused.message = "session refused by the DMZ".into();
        let refused = message(&refused, &o);
        assert!(refused.starts_with("<133>1 "), "{refused}");
        assert!(refused.contains(" refused [meta"), "{refused}");
        assert!(
            refused.ends_with(
                "] session refused by the DMZ at_ms=1738317600000 outcome=source_denied"
            ),
            "{refused}"
        );
        let auth = Origin {
            facility: "auth".parse().unwrap(),
            ..o
        };
        assert!(message(&record(&[("outcome", "ok")]), &auth).starts_with("<38>1 "));
    }

    #[test]
    fn values_are_escaped() {
        let r = record(&[
            ("service", "a\"b\\c]d e"),
            ("bad=name]", "x"),
            ("=", "gone"),
        ]);
        let m = message(&r, &origin());
        assert!(
            m.contains(r#"[relay@32473 service="a\"b\\c\]d e" badname="x"]"#),
            "{m}"
        );
        assert!(
            m.ends_with(r#"session service="a\"b\\c]d e" bad=name]=x ==gone"#),
            "{m}"
        );
        let r = record(&[("partner", "é")]);
        let m = message(&r, &origin());
        assert!(m.contains("] \u{feff}session partner=é"), "{m}");
    }

    #[test]
    fn frames_count_octets() {
        let r = record(&[("partner", "é")]);
        let mut out = b"previous".to_vec();
        frame(&r, &origin(), &mut out);
        let text = std::str::from_utf8(&out[8..]).unwrap();
        let (len, msg) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len());
        assert_eq!(msg, message(&r, &origin()));
    }

    /// The PARAM-NAME and PARAM-VALUE pairs of `[relay@32473 ...]` in `message`, unescaped
    /// as RFC 5424 §6.3.3 says a receiver does.
    fn parse_params(message: &str) -> Vec<(String, String)> {
        let start = message.find("[relay@32473").expect("SD element") + "[relay@32473".len();
        let mut chars = message[start..].chars();
        let mut params = Vec::new();
        loop {
            match chars.next() {
                Some(']') => return params,
                Some(' ') => {}
                other => panic!("unexpected {other:?} in {message}"),
            }
            let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
            assert_eq!(chars.next(), Some('"'), "{message}");
            let mut value = String::new();
            loop {
                match chars.next().expect("a closing quote") {
                    '\\' => value.push(chars.next().expect("an escaped character")),
                    '"' => break,
                    c => value.push(c),
                }
            }
            params.push((name, value));
        }
    }

    proptest::proptest! {
        #[test]
        fn any_values_round_trip(values in proptest::collection::vec(".*", 1..6)) {
            const NAMES: [&str; 6] = ["session", "service", "partner", "dmz", "dialed", "outcome"];
            let fields: Vec<(&'static str, &str)> =
                NAMES.iter().copied().zip(values.iter().map(String::as_str)).collect();
            let r = record(&fields);
            let mut framed = Vec::new();
            frame(&r, &origin(), &mut framed);
            let text = std::str::from_utf8(&framed).expect("utf-8");
            let (len, msg) = text.split_once(' ').expect("a length");
            proptest::prop_assert_eq!(len.parse::<usize>().unwrap(), msg.len());
            let want: Vec<(String, String)> =
                fields.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
            proptest::prop_assert_eq!(parse_params(msg), want);
        }
    }

    #[test]
    fn hostname_is_printable_ascii_or_nil() {
        assert_eq!(hostname("engine-1.example.net\n"), "engine-1.example.net");
        assert_eq!(hostname("a b"), "ab");
        assert_eq!(hostname(""), "-");
        assert_eq!(hostname(&"x".repeat(300)).len(), 255);
    }

    #[test]
    fn facilities_by_name() {
        assert_eq!("local0".parse::<Facility>().unwrap().code(), 16);
        assert_eq!("local7".parse::<Facility>().unwrap().code(), 23);
        assert_eq!("kern".parse::<Facility>().unwrap().code(), 0);
        assert!("LOCAL0".parse::<Facility>().is_err());
    }
}
