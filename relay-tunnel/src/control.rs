//! Framed messages over an HTTP/2 stream (the control stream of an inbound carrier).

use bytes::{Buf, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::protocol::{self, MessageError};

/// Failure on a control stream.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The stream failed or was reset.
    #[error("control stream: {0}")]
    Stream(#[from] h2::Error),
    /// The peer sent a malformed message.
    #[error("control stream: {0}")]
    Message(#[from] MessageError),
}

/// Reads framed messages from a stream, returning flow-control credit as it parses.
#[derive(Debug)]
pub struct Reader {
    recv: h2::RecvStream,
    buf: BytesMut,
}

impl Reader {
    /// Reads messages from `recv`.
    pub fn new(recv: h2::RecvStream) -> Self {
        Self {
            recv,
            buf: BytesMut::new(),
        }
    }

    /// The next message; `Ok(None)` at the end of the stream.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ControlError> {
        loop {
            if self.buf.len() >= 4 {
                let len = protocol::decode_len(self.buf[..4].try_into().expect("4 bytes"))?;
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    let body = self.buf.split_to(len);
                    return Ok(Some(protocol::decode(&body)?));
                }
            }
            match self.recv.data().await {
                None => return Ok(None),
                Some(chunk) => {
                    let chunk = chunk?;
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
            }
        }
    }
}

/// Sends one framed message; control messages are small, so the stream's buffer takes them.
pub fn send<T: Serialize>(
    send: &mut h2::SendStream<Bytes>,
    message: &T,
) -> Result<(), ControlError> {
    send.send_data(Bytes::from(protocol::encode(message)), false)?;
    Ok(())
}
