//! Who may use the admin endpoint: the bearer token (`admin.token_file`), `/metrics` left open
//! (`admin.metrics_open`), HTTPS and client certificates (`admin.tls`), and the guard that
//! applies them to each request (replaced on reload).

use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::ConfigError;
use crate::ratelog::RateLimit;

/// Fewest bytes a token may have.
pub const MIN_TOKEN_LEN: usize = 16;

/// The admin endpoint's bearer token, read from `admin.token_file`. `Debug` shows none of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<[u8]>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads a token file: its content without surrounding whitespace, at least
    /// [`MIN_TOKEN_LEN`] visible ASCII characters.
    pub fn read(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let token = bytes.trim_ascii();
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "{}: the token has {} characters; at least {MIN_TOKEN_LEN} are needed",
                path.display(),
                token.len()
            ));
        }
        if !token.iter().all(u8::is_ascii_graphic) {
            return Err(format!(
                "{}: the token may hold only visible ASCII characters (no spaces)",
                path.display()
            ));
        }
        Ok(Self(token.into()))
    }

    /// Whether `offered` is this token, compared in constant time.
    fn matches(&self, offered: &[u8]) -> bool {
        subtle::ConstantTimeEq::ct_eq(&self.0[..], offered).into()
    }
}

/// Who may use the admin endpoint beyond `/livez` and `/readyz`.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Required as `Authorization: Bearer TOKEN`; without one the endpoint is open.
    pub token: Option<Token>,
    /// `/metrics` answers without the token.
    pub metrics_open: bool,
    /// HTTPS (`admin.tls`), with client certificates when `admin.tls.client_ca` is set.
    pub tls: Option<AdminTls>,
}

/// The `[admin]` table of both binaries' configs, as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    listen: String,
    token_file: Option<String>,
    metrics_open: Option<bool>,
    expiry_warning: Option<String>,
    tls: Option<RawAdminTls>,
}

/// `[admin.tls]`: HTTPS on the admin endpoint, with client certificates when `client_ca` is set.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminTls {
    cert: String,
    key: String,
    client_ca: Option<String>,
}

impl RawAdmin {
    /// The admin address and access rules of an `[admin]` table (none: no endpoint, open
    /// rules); a problem goes to `err` under its key, paths are relative to `base`.
    pub fn check(
        raw: Option<&Self>,
        err: &mut ConfigError,
        base: &Path,
    ) -> (Option<std::net::SocketAddr>, Access) {
        let Some(raw) = raw else {
            return (None, Access::default());
        };
        let listen = err.check(
            "admin.listen",
            raw.listen
                .parse::<std::net::SocketAddr>()
                .map_err(|_| format!("invalid socket address {:?}", raw.listen)),
        );
        let mut access =
            Access::from_config(err, base, raw.token_file.as_deref(), raw.metrics_open);
        if let Some(tls) = &raw.tls {
            access.tls = tls.check(err, base);
        }
        (listen, access)
    }

    /// The files an `[admin]` table names (token, HTTPS certificate, key and client CA), which
    /// a reload reads again.
    pub fn files(raw: Option<&Self>, base: &Path) -> Vec<std::path::PathBuf> {
        let Some(raw) = raw else {
            return Vec::new();
        };
        let tls = raw.tls.iter().flat_map(|t| {
            [Some(&t.cert), Some(&t.key), t.client_ca.as_ref()]
                .into_iter()
                .flatten()
        });
        raw.token_file
            .iter()
            .chain(tls)
            .map(|f| crate::config::resolve(base, f))
            .collect()
    }

    /// `admin.expiry_warning`: how long before a certificate or the CRL stops working the log
    /// warns about it (default [`crate::expiry::DEFAULT_WARNING`], also without `[admin]`).
    pub fn expiry_warning(raw: Option<&Self>, err: &mut ConfigError) -> Duration {
        let Some(text) = raw.and_then(|r| r.expiry_warning.as_deref()) else {
            return crate::expiry::DEFAULT_WARNING;
        };
        err.check(
            "admin.expiry_warning",
            humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}")),
        )
        .unwrap_or(crate::expiry::DEFAULT_WARNING)
    }
}

impl RawAdminTls {
    /// The HTTPS settings: TLS 1.2 or 1.3, HTTP/1.1; with `client_ca`, a client certificate
    /// chaining to it is asked for, and required for everything but the probes.
    fn check(&self, err: &mut ConfigError, base: &Path) -> Option<AdminTls> {
        let resolve = |p: &str| crate::config::resolve(base, p);
        let chain = err.check(
            "admin.tls.cert",
            crate::tls::load_certs(&resolve(&self.cert)),
        );
        let key = err.check("admin.tls.key", crate::tls::load_key(&resolve(&self.key)));
        let verifier = match &self.client_ca {
            Some(ca) => {
                let roots =
                    err.check("admin.tls.client_ca", crate::tls::load_roots(&resolve(ca)))?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    crate::tls::provider(),
                )
                // The probes stay open to load balancers and kubelets, which have no certificate.
                .allow_unauthenticated()
                .build();
                Some(err.check("admin.tls.client_ca", verifier.map_err(|e| e.to_string()))?)
            }
            None => None,
        };
        let (chain, key) = (chain?, key?);
        let builder = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("the provider supports the default versions");
        let client_certificates = verifier.is_some();
        let builder = match verifier {
            Some(v) => builder.with_client_cert_verifier(v),
            None => builder.with_no_client_auth(),
        };
        let mut config = err.check(
            "admin.tls.key",
            builder
                .with_single_cert(chain, key)
                .map_err(|e| format!("certificate and key: {e}")),
        )?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(AdminTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            client_certificates,
        })
    }
}

/// HTTPS on the admin endpoint.
#[derive(Clone)]
pub struct AdminTls {
    pub(super) acceptor: tokio_rustls::TlsAcceptor,
    /// Whether requests beyond the probes need a verified client certificate.
    client_certificates: bool,
}

impl fmt::Debug for AdminTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminTls")
            .field("client_certificates", &self.client_certificates)
            .finish()
    }
}

impl Access {
    /// The `[admin]` keys `token_file` (relative to `base`) and `metrics_open`; a problem goes to
    /// `err` under its key.
    fn from_config(
        err: &mut ConfigError,
        base: &Path,
        token_file: Option<&str>,
        metrics_open: Option<bool>,
    ) -> Self {
        let token = token_file.and_then(|f| {
            err.check(
                "admin.token_file",
                Token::read(&crate::config::resolve(base, f)),
            )
        });
        if metrics_open.is_some() && token_file.is_none() {
            err.push(
                "admin.metrics_open",
                "only means something with admin.token_file (without it everything is open)",
            );
        }
        Self {
            token,
            metrics_open: metrics_open.unwrap_or(false),
            tls: None,
        }
    }
}

/// The access rules in force; a reload replaces them.
#[derive(Debug)]
pub struct Guard {
    access: RwLock<Access>,
    pub(super) log_limit: RateLimit,
}

impl Guard {
    /// Rules `access`, until [`Guard::set`].
    pub fn new(access: Access) -> Arc<Self> {
        Arc::new(Self {
            access: RwLock::new(access),
            log_limit: RateLimit::new(Duration::from_secs(10)),
        })
    }

    /// The rules in force.
    pub fn access(&self) -> Access {
        self.access
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the rules (on reload).
    pub fn set(&self, access: Access) {
        *self.access.write().unwrap_or_else(|p| p.into_inner()) = access;
    }

    /// Whether a request for `path` with `headers` may be answered; else the reason label.
    pub(super) fn allows(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        client_certified: bool,
    ) -> Result<(), &'static str> {
        if matches!(path, "/livez" | "/readyz") {
            return Ok(());
        }
        let access = self.access.read().unwrap_or_else(|p| p.into_inner());
        let open_metrics = path == "/metrics" && access.metrics_open;
        if !open_metrics
            && !client_certified
            && access.tls.as_ref().is_some_and(|t| t.client_certificates)
        {
            return Err("no_client_certificate");
        }
        let Some(token) = &access.token else {
            return Ok(());
        };
        if open_metrics {
            return Ok(());
        }
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err("missing");
        };
        let value = value.as_bytes();
        let offered = value
            .iter()
            .position(|&b| b == b' ')
            .map(|space| value.split_at(space))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer"))
            .map(|(_, rest)| rest.trim_ascii());
        match offered {
            Some(offered) if token.matches(offered) => Ok(()),
            _ => Err("invalid"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef-secret";

    fn token_file(content: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), content).expect("write");
        f
    }

    fn headers(authorization: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(a) = authorization {
            h.insert(
                http::header::AUTHORIZATION,
                a.parse().expect("header value"),
            );
        }
        h
    }

    fn guard(metrics_open: bool) -> Arc<Guard> {
        let f = token_file(&format!("{TOKEN}\n"));
        Guard::new(Access {
            tls: None,
            token: Some(Token::read(f.path()).expect("token")),
            metrics_open,
        })
    }

    #[test]
    fn token_files_are_trimmed_and_checked() {
        let f = token_file(&format!("  {TOKEN}\r\n"));
        assert!(
            Token::read(f.path())
                .expect("token")
                .matches(TOKEN.as_bytes())
        );
        let short = token_file("too-short\n");
        let e = Token::read(short.path()).expect_err("short");
        assert!(e.contains("at least 16"), "{e}");
        let spaced = token_file("0123456789 abcdef");
        let e = Token::read(spaced.path()).expect_err("space");
        assert!(e.contains("visible ASCII"), "{e}");
        let e = Token::read(Path::new("/nonexistent/token")).expect_err("missing");
        assert!(e.contains("/nonexistent/token"), "{e}");
        assert_eq!(
            format!("{:?}", Token::read(f.path()).expect("token")),
            "Token(..)"
        );
    }

    #[test]
    fn probes_are_open_and_the_rest_needs_the_token() {
        let g = guard(false);
        for path in ["/livez", "/readyz"] {
            assert_eq!(g.allows(path, &headers(None), false), Ok(()), "{path}");
        }
        for path in ["/metrics", "/reload", "/nothing-here"] {
            assert_eq!(
                g.allows(path, &headers(None), false),
                Err("missing"),
                "{path}"
            );
            assert_eq!(
                g.allows(path, &headers(Some("Bearer wrong-token-0123456")), false),
                Err("invalid"),
                "{path}"
            );
            assert_eq!(
                g.allows(path, &headers(Some(&format!("Basic {TOKEN}"))), false),
                Err("invalid"),
                "{path}"
            );
            assert_eq!(
                g.allows(path, &headers(Some(&format!("bearer {TOKEN}"))), false),
                Ok(()),
                "{path}"
            );
        }
        let g = guard(true);
        assert_eq!(g.allows("/metrics", &headers(None), false), Ok(()));
        assert_eq!(g.allows("/reload", &headers(None), false), Err("missing"));
    }

    #[test]
    fn without_a_token_everything_is_open_and_a_reload_can_set_one() {
        let g = Guard::new(Access::default());
        assert_eq!(g.allows("/metrics", &headers(None), false), Ok(()));
        g.set(guard(false).access());
        assert_eq!(g.allows("/metrics", &headers(None), false), Err("missing"));
    }

    #[test]
    fn metrics_open_without_a_token_file_is_a_config_error() {
        let mut err = ConfigError::default();
        Access::from_config(&mut err, Path::new("/"), None, Some(true));
        let e = err.into_result(|| ()).expect_err("error").to_string();
        assert!(e.contains("admin.metrics_open"), "{e}");
        let mut err = ConfigError::default();
        Access::from_config(&mut err, Path::new("/"), Some("/nonexistent/token"), None);
        let e = err.into_result(|| ()).expect_err("error").to_string();
        assert!(
            e.contains("admin.token_file") && e.contains("/nonexistent/token"),
            "{e}"
        );
    }
}
