//! `relay-internal` binary: the command line is shared with `relay-dmz` (see
//! `relay_tunnel::cli`); this file only wires the agent's config and run function.

use std::process::ExitCode;

use relay_internal::AgentConfig;

fn main() -> ExitCode {
    relay_tunnel::cli::main(
        "relay-internal",
        "relay agent: dials the DMZ nodes and serves partner sessions",
        "127.0.0.1:9091",
        AgentConfig::load,
        |config| (config.sandbox, config.sandbox_rules()),
        |config, shutdown| async move {
            let admin = match config.admin_listen {
                Some(addr) => Some(
                    relay_tunnel::net::bind_reuse(addr)
                        .map_err(|e| format!("binding the admin listener {addr}: {e}"))?,
                ),
                None => None,
            };
            relay_internal::run(config, admin, shutdown).await?;
            Ok(())
        },
    )
}
