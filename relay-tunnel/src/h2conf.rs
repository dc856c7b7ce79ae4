//! HTTP/2 settings of the tunnel, on purpose rather than by default (see docs/DECISIONS.md).

use std::time::Duration;

/// Receive window of one stream: what one session may have in flight in each direction.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Receive window of a whole tunnel connection. As large as HTTP/2 allows, so that sessions
/// whose reader stalls (each holding up to [`STREAM_WINDOW`]) never starve the others
/// (hyperium/h2#573); memory stays bounded by sessions x stream window.
pub const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// Largest DATA frame we accept: the HTTP/2 default, set on purpose. Larger frames (64 KiB,
/// 1 MiB) were measured slower and costlier in CPU per GiB (docs/PERFORMANCE.md).
pub const MAX_FRAME_SIZE: u32 = 16 * 1024;
/// Concurrent sessions one tunnel connection carries.
pub const MAX_CONCURRENT_STREAMS: u32 = 16 * 1024;
/// Largest header block accepted: session metadata is a few hundred bytes.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Bytes a stream may queue in HTTP/2 for sending: what its pump may read ahead of the
/// connection. 256 KiB keeps a fast link busy (docs/PERFORMANCE.md) and a slow one's memory
/// short; it does not delay other streams, which HTTP/2 serves one frame each in turn.
pub const MAX_SEND_BUFFER: usize = 256 * 1024;
/// Streams a peer may open and reset before we accept them; more is a reset flood
/// (CVE-2023-44487, "rapid reset") and ends the connection with GOAWAY.
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 64;
/// Streams we may reset because the peer misbehaved before the connection is cut with
/// GOAWAY (a peer provoking errors on purpose).
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;
/// Copy buffer for reading a TCP socket into a stream: one DATA frame, one TLS record.
pub const READ_BUFFER: usize = 16 * 1024;
/// How long an answer may take beyond the connect timeout it covers (tunnel round trips).
pub const ANSWER_MARGIN: Duration = Duration::from_secs(2);

/// HTTP/2 client settings (the DMZ on an inbound carrier, the agent on an outbound one).
pub fn client() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .enable_push(false);
    b
}

/// HTTP/2 server settings (the agent on an inbound carrier, the DMZ on an outbound one).
pub fn server() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    b
}
