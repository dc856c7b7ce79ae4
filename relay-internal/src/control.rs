//! The agent's end of the control stream of an inbound carrier: it re-registers after a
//! reload and when a service is withdrawn or declared again, announces its drain, and writes
//! the audit records of partners the DMZ refused.

use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Request, Response};
use relay_tunnel::control::{self, Reader};
use relay_tunnel::protocol::{AgentMessage, DmzMessage};
use tokio::sync::watch;

use crate::{Agent, Settings};

/// Serves the control stream DMZ node `dmz` opened on tunnel connection `index`.
pub async fn serve(
    agent: Arc<Agent>,
    dmz: String,
    index: usize,
    (mut changes, mut declarations): (watch::Receiver<Arc<Settings>>, watch::Receiver<u64>),
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let mut send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => return tracing::debug!(error = %e, "control stream gone before it started"),
    };
    let mut reader = Reader::new(request.into_body());
    let mut drained = false;
    // Held until the DMZ confirms the drain (or this stream ends): the agent keeps its tunnels
    // open until then, so that sessions the DMZ opened before reading the drain are refused
    // rather than lost.
    let mut unconfirmed = Some(agent.drain_unconfirmed.token());
    loop {
        let sent = tokio::select! {
            _ = agent.drain.cancelled(), if !drained => {
                drained = true;
                control::send(&mut send, &AgentMessage::Drain)
            }
            changed = changes.changed(), if !drained => {
                if changed.is_err() {
                    return;
                }
                changes.borrow_and_update();
                let services = agent.declared();
                control::send(&mut send, &AgentMessage::Register { services })
            }
            // A service withdrawn (no healthy target) or back: the full list, as after a reload.
            changed = declarations.changed(), if !drained => {
                if changed.is_err() {
                    return;
                }
                declarations.borrow_and_update();
                let services = agent.declared();
                control::send(&mut send, &AgentMessage::Register { services })
            }
            message = reader.next::<DmzMessage>() => match message {
                Ok(Some(DmzMessage::Registered { services })) => {
                    agent.record_verdicts(&dmz, &services, false, index);
                    Ok(())
                }
                Ok(Some(DmzMessage::Drained)) => {
                    drop(unconfirmed.take());
                    Ok(())
                }
                Ok(Some(DmzMessage::Refused(r))) => {
                    tracing::info!(
                        target: "relay::audit",
                        session = %r.session,
                        service = %r.service,
                        direction = relay_tunnel::metrics::INBOUND,
                        partner = %r.partner,
                        dmz = %dmz,
                        at_ms = r.at_ms,
                        duration_ms = 0u64,
                        bytes_partner_to_target = 0u64,
                        bytes_target_to_partner = 0u64,
                        outcome = %r.reason,
                        "session refused by the DMZ"
                    );
                    Ok(())
                }
                Ok(None) => return,
                Err(e) => return tracing::debug!(error = %e, "control stream ended"),
            },
        };
        if let Err(e) = sent {
            return tracing::debug!(error = %e, "control stream ended");
        }
    }
}
