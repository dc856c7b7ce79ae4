//! Small targets for tests and the demo: echo, a tagged echo, and a one-page HTTP server.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A target task, aborted on drop.
pub struct Target {
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Echoes every byte back; on EOF from the client it finishes writing and closes
/// (so half-close passes through end to end).
pub async fn echo() -> Target {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Target { addr, task }
}

/// Writes one `tag` byte to every connection, so a client knows which target answered, then
/// echoes like [`echo`].
pub async fn tagged_echo(tag: u8) -> Target {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind tagged echo");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if s.write_all(&[tag]).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Target { addr, task }
}

/// Serves a fixed HTTP/1.1 page to every request (keep-alive), for demos and HTTP tests.
pub async fn http(body: &'static str) -> Target {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    serve_http(listener, body)
}

/// Serves a fixed HTTP/1.1 page on `listener`.
pub fn serve_http(listener: TcpListener, body: &'static str) -> Target {
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut pending = Vec::new();
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                        pending.drain(..end + 4);
                        let close = head.contains("connection: close");
                        let response = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{body}",
                            body.len(),
                            if close { "connection: close\r\n" } else { "" }
                        );
                        if s.write_all(response.as_bytes()).await.is_err() || close {
                            return;
                        }
                    }
                }
            });
        }
    });
    Target { addr, task }
}
