//! The operator's commands of both binaries: `status`, `sessions`, `kill`, `drain`, `resume`.
//! Each asks a running node's admin endpoint and prints tables (or the JSON with `--json`).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

mod show;

pub use show::{sessions, status, table};

/// How long one request may take, connect included (by default).
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read.
const MAX_ANSWER: u64 = 16 << 20;

/// Where the admin endpoint is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Target {
    /// `HOST:PORT` of the admin endpoint.
    pub admin: String,
    /// The bearer token, if the endpoint needs one.
    pub token: Option<String>,
    /// HTTPS, for an endpoint with `admin.tls`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Bound on connecting, and on each read and write.
    pub timeout: Duration,
}

/// How the command reaches an HTTPS admin endpoint (`admin.tls`).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// CA that signed the endpoint's certificate (`--cacert`); HTTPS when given.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (`--cert`, `--key`), for `admin.tls.client_ca`.
    pub cert: Option<PathBuf>,
    /// The client certificate's key.
    pub key: Option<PathBuf>,
}

impl TlsOptions {
    fn client_config(&self, uses_tls: bool) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
        let Some(ca) = &self.ca else {
            if uses_tls || self.cert.is_some() {
                return Err("the admin endpoint uses TLS (admin.tls): give the CA that signed its certificate with --cacert (and --cert and --key if it asks for client certificates)".into());
            }
            return Ok(None);
        };
        let roots = crate::tls::load_roots(ca).map_err(|e| e.to_string())?;
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let creds = crate::tls::Credentials::load(cert, key).map_err(|e| e.to_string())?;
                builder
                    .with_client_auth_cert(creds.chain().to_vec(), creds.key())
                    .map_err(|e| format!("--cert and --key: {e}"))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("--cert and --key go together".into()),
        };
        Ok(Some(Arc::new(config)))
    }
}

impl Target {
    /// `--admin` and `--token-file` when given; else `admin.listen` and `admin.token_file` of
    /// the config file, when there is one; else `default_admin` and no token.
    pub fn resolve(
        admin: Option<String>,
        token_file: Option<PathBuf>,
        tls: &TlsOptions,
        config: Option<&Path>,
        default_admin: &str,
    ) -> Result<Self, String> {
        let table = match config {
            Some(path) => admin_table(path)?,
            _ => None,
        };
        let uses_tls = table.as_ref().is_some_and(|t| t.contains_key("tls"));
        let from_config = |key: &str| {
            table
                .as_ref()
                .and_then(|t| t.get(key))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        let admin = admin
            .or_else(|| from_config("listen"))
            .unwrap_or_else(|| default_admin.to_owned());
        // A URL works too: `http://HOST:PORT`, or `https://HOST:PORT` (with --cacert).
        let (admin, uses_tls) = match admin.split_once("://") {
            Some(("https", rest)) => (rest.trim_end_matches('/').to_owned(), true),
            Some(("http", rest)) => (rest.trim_end_matches('/').to_owned(), uses_tls),
            Some((scheme, _)) => return Err(format!("--admin {admin}: unknown scheme {scheme:?}")),
            None => (admin, uses_tls),
        };
        let token_file = token_file.or_else(|| {
            let file = from_config("token_file")?;
            let base = config?.parent().unwrap_or(Path::new("."));
            Some(crate::config::resolve(base, &file))
        });
        let token = match token_file {
            Some(path) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let tls = tls.client_config(uses_tls)?;
        Ok(Self {
            admin,
            token,
            tls,
            timeout: TIMEOUT,
        })
    }

    /// `METHOD path` on the admin endpoint: status code and body.
    pub fn request(&self, method: &str, path: &str) -> Result<(u16, String), String> {
        let addr = self
            .admin
            .to_socket_addrs()
            .map_err(|e| format!("{}: {e}", self.admin))?
            .next()
            .ok_or_else(|| format!("{}: no address", self.admin))?;
        let tcp = TcpStream::connect_timeout(&addr, self.timeout)
            .map_err(|e| format!("cannot reach the admin endpoint {addr}: {e}"))?;
        tcp.set_read_timeout(Some(self.timeout))
            .and_then(|()| tcp.set_write_timeout(Some(self.timeout)))
            .map_err(|e| e.to_string())?;
        let mut stream: Box<dyn ReadWrite> = match &self.tls {
            None => Box::new(tcp),
            Some(config) => {
                let host = self
                    .admin
                    .rsplit_once(':')
                    .map_or(self.admin.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let name = rustls_pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| format!("{host}: {e}"))?;
                let conn = rustls::ClientConnection::new(config.clone(), name)
                    .map_err(|e| e.to_string())?;
                Box::new(rustls::StreamOwned::new(conn, tcp))
            }
        };
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.admin
        )
        .map_err(|e| format!("{addr}: {e}"))?;
        let mut answer = Vec::new();
        stream
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .map_err(|e| format!("{addr}: {e}"))?;
        if answer.is_empty() && self.tls.is_none() {
            return Err(format!(
                "{addr}: no answer (an endpoint with admin.tls needs --cacert)"
            ));
        }
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
        if status == 401 {
            return Err(format!(
                "{addr}: 401 unauthorized: give the admin token with --token-file (or --config with admin.token_file)"
            ));
        }
        Ok((status, body.to_owned()))
    }

    /// `GET path` as JSON.
    fn json(&self, path: &str) -> Result<Value, String> {
        match self.request("GET", path)? {
            (200, body) => serde_json::from_str(&body)
                .map_err(|e| format!("{}{path}: not JSON: {e}", self.admin)),
            (status, body) => Err(format!("{}{path}: {status} {}", self.admin, body.trim())),
        }
    }
}

/// A plain or a TLS connection.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The `[admin]` table of a config file, if it has one.
fn admin_table(path: &Path) -> Result<Option<toml::Table>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut doc: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(match doc.remove("admin") {
        Some(toml::Value::Table(t)) => Some(t),
        _ => None,
    })
}

/// `kill ID`, `drain`, `resume`: one request whose answer is a line of text.
pub fn act(target: &Target, method: &str, path: &str) -> Result<String, String> {
    match target.request(method, path)? {
        (200, body) => Ok(body.trim().to_owned()),
        (404, _) if matches!(path, "/drain" | "/resume") => {
            Err("this binary has no drain/resume (the agent has)".into())
        }
        (status, body) => Err(format!("{status}: {}", body.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_address_and_token_come_from_the_config_unless_given() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "a-token-of-enough-length\n").unwrap();
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            "[admin]\nlisten = \"127.0.0.1:9999\"\ntoken_file = \"token\"\n",
        )
        .unwrap();
        let none = TlsOptions::default();
        let t = Target::resolve(None, None, &none, Some(&config), "127.0.0.1:9090").unwrap();
        assert_eq!(t.admin, "127.0.0.1:9999");
        assert_eq!(t.token.as_deref(), Some("a-token-of-enough-length"));
        let t = Target::resolve(
            Some("10.0.0.1:1".into()),
            None,
            &none,
            None,
            "127.0.0.1:9090",
        )
        .unwrap();
        assert_eq!((t.admin.as_str(), t.token), ("10.0.0.1:1", None));
        let t = Target::resolve(Some("http://10.0.0.1:1/".into()), None, &none, None, "x:1");
        assert_eq!(t.unwrap().admin, "10.0.0.1:1");
        let https = Target::resolve(Some("https://10.0.0.1:1".into()), None, &none, None, "x:1");
        assert!(https.unwrap_err().contains("--cacert"));
        let missing = Target::resolve(None, Some(dir.path().join("nope")), &none, None, "x:1");
        assert!(missing.unwrap_err().contains("nope"));
    }
}
