//! Pieces shared by `relay-dmz` and `relay-internal`: TLS setup and identity checks, the tunnel
//! protocol (ALPN roles, stream metadata, registration messages), HTTP/2 settings, the byte
//! pump, config building blocks, metric names and telemetry setup.
// One `unsafe` function, `net::bytes_acked` (reads `TCP_INFO`); see docs/DECISIONS.md.
#![deny(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod expiry;
pub mod first_bytes;
pub mod h2conf;
pub mod keepalive;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod proxyproto;
pub mod pump;
pub mod ratelog;
pub mod sandbox;
pub mod session;
pub mod shards;
pub mod signals;
pub mod telemetry;
pub mod tls;
