//! Certificates for relay's mutual-TLS tunnel: a development PKI (a CA, the DMZ's server
//! certificate, one client certificate per agent) and a small API that tests use to make
//! their own PKIs, good and bad.
//!
//! The agent identity the DMZ checks is the first DNS or URI SAN of the agent's certificate.
#![forbid(unsafe_code)]

mod ca;
mod dev;
mod error;
mod issue;
mod layout;
mod leaf;
mod name;
mod output;

pub use ca::{CA_DAYS, Ca};
pub use dev::{DEV_CA_NAME, DevOptions, DevPki, default_agents, default_dmz_names, write_dev_pki};
pub use error::Error;
pub use issue::{IssueOptions, issue_from_dir, load_ca};
pub use layout::{CA_STEM, DMZ_STEM, MAX_DAYS, cert_path, key_path};
pub use leaf::{DEFAULT_DAYS, Leaf, LeafSpec, Usage, validity};
pub use name::{check_agent_name, check_dmz_name};
