//! Config building blocks both binaries use: reading TOML, collecting every problem with its
//! key path, durations, addresses with port ranges, and address rules.
//!
//! Each binary parses its raw `serde` structs (unknown keys rejected) and turns them into a
//! checked config with these helpers; libraries never see TOML.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::DeserializeOwned;

/// Every problem found in a config file, one line each: `key.path: reason`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The problems, in the order found.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// Records one problem at `key`.
    pub fn push(&mut self, key: impl fmt::Display, reason: impl fmt::Display) {
        self.problems.push(format!("{key}: {reason}"));
    }

    /// `Ok(value)` if no problem was found.
    pub fn into_result<T>(self, value: impl FnOnce() -> T) -> Result<T, ConfigError> {
        if self.problems.is_empty() {
            Ok(value())
        } else {
            Err(self)
        }
    }

    /// Parses `raw` with `parse`, recording a problem at `key` on failure.
    pub fn check<T, E: fmt::Display>(
        &mut self,
        key: impl fmt::Display,
        parsed: Result<T, E>,
    ) -> Option<T> {
        parsed.map_err(|e| self.push(key, e)).ok()
    }

    /// Each of `items` parsed; one that fails is recorded at `key[i]` and left out.
    pub fn parse_each<T>(&mut self, key: &str, items: &[String]) -> Vec<T>
    where
        T: std::str::FromStr,
        T::Err: fmt::Display,
    {
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| self.check(format_args!("{key}[{i}]"), item.parse::<T>()))
            .collect()
    }
}

/// The other binary's config, recognised by top-level keys only it has, so that a config given
/// to the wrong binary is named as such instead of as a list of unknown keys.
#[derive(Debug, Clone, Copy)]
pub struct OtherConfig {
    /// The binary that reads such a config (`relay-internal`).
    pub binary: &'static str,
    /// Top-level keys only that binary's config has.
    pub keys: &'static [&'static str],
}

/// Reads and parses a TOML file into raw config structs.
pub fn read_toml<T: DeserializeOwned>(path: &Path, other: OtherConfig) -> Result<T, ConfigError> {
    let mut err = ConfigError::default();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            err.push(path.display(), format!("cannot read config: {e}"));
            return Err(err);
        }
    };
    let located = |e: &toml::de::Error| {
        e.span()
            .map(|span| {
                let line = text[..span.start].matches('\n').count() + 1;
                format!("{} line {line}", path.display())
            })
            .unwrap_or_else(|| path.display().to_string())
    };
    let de = match toml::Deserializer::parse(&text) {
        Ok(de) => de,
        Err(e) => {
            err.push(located(&e), e.message());
            return Err(err);
        }
    };
    // The key path (`tunnel.bogus`, `inbound[1]`) says where a problem is; the line helps too.
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let at = located(&inner);
        if key == "." || key.is_empty() {
            err.push(at, inner.message());
        } else {
            err.push(format!("{key} ({at})"), inner.message());
        }
        if let Some(found) = other_config_keys(&text, other) {
            err.push(
                path.display(),
                format_args!(
                    "this looks like a {} config (it has {found}); check it with `{} check`",
                    other.binary, other.binary
                ),
            );
        }
        err
    })
}

/// The top-level keys of `text` that only `other`'s config has, quoted, if any.
fn other_config_keys(text: &str, other: OtherConfig) -> Option<String> {
    let table: toml::Table = text.parse().ok()?;
    let found: Vec<String> = other
        .keys
        .iter()
        .filter(|k| table.contains_key(**k))
        .map(|k| format!("`{k}`"))
        .collect();
    (!found.is_empty()).then(|| found.join(", "))
}

/// The directory relative config paths are resolved against.
pub fn base_dir(config_path: &Path) -> PathBuf {
    config_path
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Resolves a path from the config relative to the config file's directory.
pub fn resolve(base: &Path, path: &str) -> PathBuf {
    base.join(path)
}

/// Loads a certificate chain and key, recording a problem at `TABLE.cert` and at `TABLE.key`
/// (each file is checked, so both are reported when both are wrong).
pub fn credentials(
    err: &mut ConfigError,
    table: &str,
    cert: &Path,
    key: &Path,
) -> Option<crate::tls::Credentials> {
    let chain = err.check(format_args!("{table}.cert"), crate::tls::load_certs(cert));
    let private = err.check(format_args!("{table}.key"), crate::tls::load_key(key));
    Some(crate::tls::Credentials::from_parts(
        chain?, private?, cert, key,
    ))
}

/// Names the command that makes a development PKI when certificate files of the config are
/// missing from a directory that holds no CA either (nothing of a PKI is there yet): the
/// usual first run of an example config. One line, however many files are missing.
pub fn missing_pki_hint(err: &mut ConfigError, files: &[&Path]) {
    let missing: Vec<&Path> = files.iter().copied().filter(|f| !f.exists()).collect();
    let Some(dir) = missing.first().and_then(|f| f.parent()) else {
        return;
    };
    if dir.join("ca.pem").exists()
        || !missing
            .iter()
            .all(|f| f.extension() == Some("pem".as_ref()))
    {
        return;
    }
    let default_agents = ["engine-1", "engine-2"];
    let mut command = format!("relay-certs dev --out {}", dir.display());
    for f in &missing {
        let stem = f.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let agent = !stem.ends_with("-key") && stem != "ca" && stem != "dmz";
        if agent && !default_agents.contains(&stem) {
            command.push_str(&format!(" --agent {stem}"));
        }
    }
    err.push(
        "hint",
        format_args!(
            "{} has no certificates yet; for a development PKI (never for production) run: {command}",
            dir.display()
        ),
    );
}

/// Parses a duration such as `"10s"` or `"500ms"`; zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("invalid duration {s:?}: must be greater than zero"));
    }
    Ok(d)
}

/// An inclusive range of ports; a single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// How many ports the range holds.
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Whether the range holds no port (never true for a parsed range).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Whether the whole of `other` lies in the range.
    pub fn covers(&self, other: &PortRange) -> bool {
        self.first <= other.first && other.last <= self.last
    }

    /// Whether the two ranges share a port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// The ports, first to last.
    pub fn iter(&self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            p.parse::<u16>().map_err(|_| format!("invalid port {p:?}"))
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if first > last {
            return Err(format!(
                "invalid port range {s:?}: first port is above last"
            ));
        }
        Ok(Self { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Splits `HOST:PORTS` or `[V6]:PORTS` at the last colon outside brackets.
fn split_host_ports(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, ports) = rest.split_once("]:")?;
        Some((host, ports))
    } else {
        let (host, ports) = s.rsplit_once(':')?;
        (!host.contains(':')).then_some((host, ports))
    }
}

/// A listen address: an IP and a port or port range (`0.0.0.0:8443`, `[::]:50000-50099`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenSpec {
    /// The address to bind.
    pub ip: IpAddr,
    /// The ports to bind.
    pub ports: PortRange,
}

impl ListenSpec {
    /// The socket addresses to bind, with `ip` replaced by `bind` when given.
    pub fn addrs(&self, bind: Option<IpAddr>) -> impl Iterator<Item = SocketAddr> + '_ {
        let ip = bind.unwrap_or(self.ip);
        self.ports.iter().map(move |port| SocketAddr::new(ip, port))
    }
}

impl FromStr for ListenSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid socket address {s:?} (expected IP:PORT or IP:FIRST-LAST)");
        let (host, ports) = split_host_ports(s).ok_or_else(bad)?;
        let ip = host.parse().map_err(|_| bad())?;
        let ports: PortRange = ports.parse().map_err(|_| bad())?;
        if ports.first == 0 {
            return Err(format!(
                "invalid socket address {s:?}: port 0 cannot be served"
            ));
        }
        Ok(Self { ip, ports })
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.ports),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.ports),
        }
    }
}

/// A target: host name or IP and a port or port range (`b2bi.internal:8443`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// Host name or IP address.
    pub host: String,
    /// Port or port range.
    pub ports: PortRange,
}

impl FromStr for TargetSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid target {s:?} (expected HOST:PORT or HOST:FIRST-LAST)");
        let (host, ports) = split_host_ports(s).ok_or_else(bad)?;
        let ports: PortRange = ports.parse().map_err(|_| bad())?;
        if host.is_empty() {
            return Err(format!("invalid target {s:?}: the host is empty"));
        }
        if ports.first == 0 {
            return Err(format!("invalid target {s:?}: port 0 cannot be dialed"));
        }
        Ok(Self {
            host: host.to_owned(),
            ports,
        })
    }
}

impl TargetSpec {
    /// The `host:port` to dial for `port` of the range (same offset from the first port).
    pub fn authority_for_offset(&self, offset: u16) -> Option<(String, u16)> {
        let port = self.ports.first.checked_add(offset)?;
        self.ports.contains(port).then(|| (self.host.clone(), port))
    }
}

/// An address rule `ADDR_OR_CIDR:PORTS` where PORTS is a port, a range or `*`
/// (`0.0.0.0:8000-8999`, `127.0.0.0/8:1024-65535`, `[::/0]:*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrRule {
    /// The network; a bare address is a single-address network.
    pub net: IpNet,
    /// The ports; `*` is 0-65535.
    pub ports: PortRange,
}

impl FromStr for AddrRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid address rule {s:?} (expected ADDR_OR_CIDR:PORT, :FIRST-LAST or :*)")
        };
        let (host, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (net, ports) = rest.split_once("]:").ok_or_else(bad)?;
            (net, ports)
        } else {
            s.rsplit_once(':').ok_or_else(bad)?
        };
        let net = match host.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => IpNet::from(host.parse::<IpAddr>().map_err(|_| bad())?),
        };
        let ports = if ports == "*" {
            PortRange {
                first: 0,
                last: u16::MAX,
            }
        } else {
            ports.parse().map_err(|_| bad())?
        };
        Ok(Self { net, ports })
    }
}

impl AddrRule {
    /// Whether the rule admits every address of `spec`.
    pub fn covers(&self, spec: &ListenSpec) -> bool {
        self.net.contains(&spec.ip) && self.ports.covers(&spec.ports)
    }
}

/// An outbound destination rule of `policy.connect_allow`: a host name pattern
/// (`partner.example.com`, `*.example.com`) or a network (`203.0.113.0/24`, `[2001:db8::/32]`),
/// then `:PORT`, `:FIRST-LAST` or `:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectRule {
    /// A host name, exact or `*.` suffix wildcard (lowercase).
    Name {
        /// The pattern.
        pattern: String,
        /// The ports.
        ports: PortRange,
    },
    /// Addresses inside a network.
    Net(AddrRule),
}

impl FromStr for ConnectRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(rule) = s.parse::<AddrRule>() {
            return Ok(ConnectRule::Net(rule));
        }
        let bad = || {
            format!(
                "invalid destination rule {s:?} (expected HOST:PORTS or CIDR:PORTS; PORTS is a port, FIRST-LAST or *)"
            )
        };
        let (host, ports) = s.rsplit_once(':').ok_or_else(bad)?;
        let ports = if ports == "*" {
            PortRange {
                first: 0,
                last: u16::MAX,
            }
        } else {
            ports.parse().map_err(|_| bad())?
        };
        let name = host.strip_prefix("*.").unwrap_or(host);
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            && !name.starts_with('.')
            && name.parse::<IpAddr>().is_err();
        if !valid {
            return Err(bad());
        }
        Ok(ConnectRule::Name {
            pattern: host.to_ascii_lowercase(),
            ports,
        })
    }
}

impl ConnectRule {
    /// Whether the rule admits host name `host` (lowercase) on `port`.
    pub fn admits_name(&self, host: &str, port: u16) -> bool {
        match self {
            ConnectRule::Name { pattern, ports } => {
                ports.contains(port)
                    && match pattern.strip_prefix("*.") {
                        Some(suffix) => {
                            host.len() > suffix.len() + 1
                                && host.ends_with(suffix)
                                && host[..host.len() - suffix.len()].ends_with('.')
                        }
                        None => host == pattern,
                    }
            }
            ConnectRule::Net(_) => false,
        }
    }

    /// Whether the rule admits address `addr`.
    pub fn admits_addr(&self, addr: SocketAddr) -> bool {
        match self {
            ConnectRule::Net(rule) => {
                rule.net.contains(&addr.ip()) && rule.ports.contains(addr.port())
            }
            ConnectRule::Name { .. } => false,
        }
    }
}

/// Parses a list of CIDR networks (a bare address is a /32 or /128), recording problems at
/// `key[i]`.
pub fn parse_networks(err: &mut ConfigError, key: &str, raw: &[String]) -> Vec<IpNet> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let parsed = s
                .parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!("invalid network {s:?} (expected CIDR such as 198.51.100.0/24)")
                });
            err.check(format_args!("{key}[{i}]"), parsed)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_what_is_wrong() {
        let t: TargetSpec = "b2bi.internal:8443".parse().unwrap();
        assert_eq!((t.host.as_str(), t.ports.len()), ("b2bi.internal", 1));
        assert_eq!(
            "127.0.0.1:0".parse::<TargetSpec>().unwrap_err(),
            "invalid target \"127.0.0.1:0\": port 0 cannot be dialed"
        );
        assert_eq!(
            ":80".parse::<TargetSpec>().unwrap_err(),
            "invalid target \":80\": the host is empty"
        );
        assert!(
            "host"
                .parse::<TargetSpec>()
                .unwrap_err()
                .contains("expected HOST:PORT"),
            "no port"
        );
    }

    #[test]
    fn both_credential_files_are_reported() {
        let mut err = ConfigError::default();
        let dir = Path::new("/nonexistent-relay-pki");
        let creds = credentials(
            &mut err,
            "tunnel",
            &dir.join("dmz.pem"),
            &dir.join("dmz-key.pem"),
        );
        assert!(creds.is_none());
        assert_eq!(err.problems.len(), 2, "{err}");
        assert!(err.problems[0].starts_with("tunnel.cert: /nonexistent-relay-pki/dmz.pem: "));
        assert!(err.problems[1].starts_with("tunnel.key: /nonexistent-relay-pki/dmz-key.pem: "));
    }

    #[test]
    fn missing_pki_names_the_command_once() {
        let dir = Path::new("/nonexistent-relay-pki/certs");
        let (cert, key, ca) = (
            dir.join("ops-7.pem"),
            dir.join("ops-7-key.pem"),
            dir.join("ca.pem"),
        );
        let mut err = ConfigError::default();
        missing_pki_hint(&mut err, &[&cert, &key, &ca]);
        assert_eq!(
            err.problems,
            [
                "hint: /nonexistent-relay-pki/certs has no certificates yet; for a development \
                 PKI (never for production) run: relay-certs dev --out \
                 /nonexistent-relay-pki/certs --agent ops-7"
            ]
        );

        // A directory that holds a CA is a PKI already: a missing file there is a mistake in
        // the config or the directory, not a first run.
        let pki = std::env::temp_dir().join(format!("relay-hint-{}", std::process::id()));
        std::fs::create_dir_all(&pki).unwrap();
        std::fs::write(pki.join("ca.pem"), "").unwrap();
        let mut err = ConfigError::default();
        missing_pki_hint(&mut err, &[&pki.join("dmz.pem"), &pki.join("ca.pem")]);
        std::fs::remove_dir_all(&pki).unwrap();
        assert!(err.problems.is_empty(), "{err}");
    }

    #[test]
    fn the_other_binarys_config_is_recognised() {
        let other = OtherConfig {
            binary: "relay-internal",
            keys: &["dmz", "tls", "inbound"],
        };
        let agent = "dmz = [\"a:1\"]\n[tls]\ncert = \"x\"\n";
        assert_eq!(
            other_config_keys(agent, other).as_deref(),
            Some("`dmz`, `tls`")
        );
        assert_eq!(other_config_keys("[tunnel]\nlisten = \"x\"\n", other), None);
        assert_eq!(other_config_keys("not toml [", other), None);
    }

    #[test]
    fn listen_specs_parse_ports_and_ranges() {
        let s: ListenSpec = "0.0.0.0:8443".parse().unwrap();
        assert_eq!(s.ports.len(), 1);
        let r: ListenSpec = "[::1]:50000-50099".parse().unwrap();
        assert_eq!(r.ports.len(), 100);
        assert_eq!(r.to_string(), "[::1]:50000-50099");
        let bind = "127.0.0.2".parse().ok();
        assert_eq!(s.addrs(bind).next().unwrap().to_string(), "127.0.0.2:8443");
        for bad in [
            "0.0.0.0:99999",
            "0.0.0.0",
            "host:80",
            "1.2.3.4:9-1",
            "1.2.3.4:0",
            "::1:80",
        ] {
            assert!(bad.parse::<ListenSpec>().is_err(), "{bad}");
        }
        assert_eq!(
            "0.0.0.0:99999".parse::<ListenSpec>().unwrap_err(),
            "invalid socket address \"0.0.0.0:99999\" (expected IP:PORT or IP:FIRST-LAST)"
        );
    }

    #[test]
    fn rules_cover_whole_ranges_only() {
        let rule: AddrRule = "0.0.0.0:8000-8999".parse().unwrap();
        assert!(rule.covers(&"0.0.0.0:8443".parse().unwrap()));
        assert!(!rule.covers(&"0.0.0.0:8990-9010".parse().unwrap()));
        assert!(!rule.covers(&"127.0.0.1:8443".parse().unwrap()));
        let cidr: AddrRule = "127.0.0.0/8:*".parse().unwrap();
        assert!(cidr.covers(&"127.0.0.9:1-65535".parse().unwrap()));
        let v6: AddrRule = "[::/0]:443".parse().unwrap();
        assert!(v6.covers(&"[::1]:443".parse().unwrap()));
        assert!("nonsense:1".parse::<AddrRule>().is_err());
    }

    #[test]
    fn connect_rules_match_names_wildcards_and_networks() {
        let exact: ConnectRule = "Partner.example.com:443".parse().unwrap();
        assert!(exact.admits_name("partner.example.com", 443));
        assert!(!exact.admits_name("partner.example.com", 80));
        assert!(!exact.admits_name("evil.partner.example.com", 443));
        let wild: ConnectRule = "*.example.com:*".parse().unwrap();
        assert!(wild.admits_name("a.example.com", 1));
        assert!(!wild.admits_name("example.com", 1));
        assert!(!wild.admits_name("badexample.com", 1));
        let net: ConnectRule = "203.0.113.0/24:*".parse().unwrap();
        assert!(net.admits_addr("203.0.113.9:22".parse().unwrap()));
        assert!(!net.admits_addr("10.0.0.1:22".parse().unwrap()));
        assert!(!net.admits_name("203.0.113.9", 22));
        let v6: ConnectRule = "[2001:db8::/32]:443".parse().unwrap();
        assert!(v6.admits_addr("[2001:db8::1]:443".parse().unwrap()));
        for bad in ["", "host", "host:x", ".x:1", "a b:1", "*.:1"] {
            assert!(bad.parse::<ConnectRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn targets_map_range_offsets() {
        let t: TargetSpec = "ftp.internal:50000-50099".parse().unwrap();
        assert_eq!(
            t.authority_for_offset(5),
            Some(("ftp.internal".into(), 50005))
        );
        assert_eq!(t.authority_for_offset(100), None);
        assert!("nohost".parse::<TargetSpec>().is_err());
        assert!(":80".parse::<TargetSpec>().is_err());
    }

    #[test]
    fn durations_are_humane_and_positive() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
    }

    #[test]
    fn problems_are_listed_with_keys() {
        let mut err = ConfigError::default();
        let nets = parse_networks(
            &mut err,
            "inbound[0].allow",
            &["10.0.0.0/8".into(), "x".into()],
        );
        assert_eq!(nets.len(), 1);
        assert_eq!(
            err.to_string(),
            "inbound[0].allow[1]: invalid network \"x\" (expected CIDR such as 198.51.100.0/24)"
        );
    }
}
