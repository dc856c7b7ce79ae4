//! HTTP/1.1 clients of the admin endpoint (`/livez`, `/readyz`, `/metrics`, `/reload`) and a
//! reader of metric samples; re-exported at the crate root.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET path` on an admin endpoint: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    Ok(status_and_body(&buf))
}

/// `POST path` with an empty body on an admin endpoint, the whole exchange within `limit`:
/// status code and body.
pub async fn http_post(addr: SocketAddr, path: &str, limit: Duration) -> io::Result<(u16, String)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, io::Error>(buf)
    };
    let buf = tokio::time::timeout(limit, exchange).await.map_err(|_| {
        io::Error::other(format!("POST {path} on {addr}: no answer within {limit:?}"))
    })??;
    Ok(status_and_body(&buf))
}

/// The status code (0 if unreadable) and body of an HTTP/1.1 response.
fn status_and_body(response: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The `/readyz` status code of an admin endpoint (0 when it does not answer).
pub async fn readyz(admin: SocketAddr) -> u16 {
    http_get(admin, "/readyz")
        .await
        .map(|(s, _)| s)
        .unwrap_or(0)
}

/// The `/metrics` text of an admin endpoint, or an empty string if it does not answer 200.
pub async fn metrics_text(admin: SocketAddr) -> String {
    match http_get(admin, "/metrics").await {
        Ok((200, body)) => body,
        _ => String::new(),
    }
}

/// The value of a metric sample line `name{labels} value` whose labels contain every `label`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|lab| l.contains(lab)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
