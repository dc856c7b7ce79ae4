//! The control stream of an inbound carrier: the DMZ opens it right after the HTTP/2
//! handshake; the agent re-registers or announces its drain on it, and the DMZ forwards the
//! audit records of partners it refused before any agent saw them.

use std::sync::Arc;

use http::{Method, Request, StatusCode};
use relay_tunnel::control::{self, Reader};
use relay_tunnel::metrics as m;
use relay_tunnel::protocol::{AgentMessage, CONTROL_PATH, DmzMessage};
use tokio::sync::mpsc;

use crate::Node;
use crate::partner;
use crate::registry::Carrier;

/// Messages queued for one agent's control stream; more are dropped (and counted).
pub const QUEUE: usize = 256;

/// Runs the control stream of `carrier` until it ends; returns why.
pub async fn run(
    node: &Arc<Node>,
    carrier: &Arc<Carrier>,
    mut outbox: mpsc::Receiver<DmzMessage>,
) -> String {
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("https://relay{CONTROL_PATH}"))
        .body(())
        .expect("static request");
    let opened = async {
        let mut send_request = carrier.send.clone().ready().await?;
        let (response, send) = send_request.send_request(request, false)?;
        Ok::<_, h2::Error>((response.await?, send))
    };
    let (response, mut send) =
        match tokio::time::timeout(node.tunnel.handshake_timeout, opened).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return format!("control stream: {e}"),
            Err(_) => return "control stream: no answer".into(),
        };
    if response.status() != StatusCode::OK {
        return format!("control stream refused with {}", response.status());
    }
    let mut reader = Reader::new(response.into_body());
    loop {
        tokio::select! {
            message = reader.next::<AgentMessage>() => match message {
                Ok(Some(AgentMessage::Register { services })) => {
                    let (answer, start) = node.registry.update(carrier, &services);
                    for v in &answer.services {
                        let result = if v.accepted { "accepted" } else { "rejected" };
                        metrics::counter!(m::REGISTRATIONS, "result" => result).increment(1);
                        if let Some(reason) = &v.reason {
                            tracing::warn!(service = %v.name, %reason, "service rejected");
                        }
                    }
                    for listener in start {
                        node.listeners.spawn(partner::serve(listener, node.clone()));
                    }
                    tracing::info!(services = answer.services.iter().filter(|v| v.accepted).count(), "agent re-registered");
                    if let Err(e) = control::send(&mut send, &DmzMessage::Registered { services: answer.services }) {
                        return e.to_string();
                    }
                }
                Ok(Some(AgentMessage::Drain)) => {
                    tracing::info!("agent draining: no new sessions through this tunnel");
                    node.registry.remove(carrier);
                    if let Err(e) = control::send(&mut send, &DmzMessage::Drained) {
                        return e.to_string();
                    }
                }
                Ok(None) => return "control stream closed by the agent".into(),
                Err(e) => return e.to_string(),
            },
            Some(message) = outbox.recv() => {
                if let Err(e) = control::send(&mut send, &message) {
                    return e.to_string();
                }
            }
        }
    }
}
