//! `relay-dmz` binary: the command line is shared with `relay-internal` (see
//! `relay_tunnel::cli`); this file only wires the DMZ's config and run function.

use std::process::ExitCode;

use relay_dmz::{DmzConfig, Listeners};

fn main() -> ExitCode {
    relay_tunnel::cli::main(
        "relay-dmz",
        "relay DMZ node: public listeners gated by agent tunnels",
        "127.0.0.1:9090",
        DmzConfig::load,
        |config| (config.sandbox, config.sandbox_rules()),
        |config, shutdown| async move {
            let listeners = Listeners::bind(&config)
                .await
                .map_err(|e| format!("binding the tunnel and admin listeners: {e}"))?;
            relay_dmz::run(config, listeners, shutdown).await?;
            Ok(())
        },
    )
}
