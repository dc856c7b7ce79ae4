//! What the DMZ node's sandbox allows: reading its config and the files it names, binding the
//! tunnel and admin ports and the ports `policy.listen_allow` can open, and connecting to the
//! ports `policy.connect_allow` can reach (none without outbound).

use relay_tunnel::config::{ConnectRule, PortRange};
use relay_tunnel::sandbox::{Rules, port_rule};

use crate::DmzConfig;

/// DNS over TCP, for names in `policy.connect_allow` whose answers do not fit a UDP datagram.
const DNS: PortRange = PortRange {
    first: 53,
    last: 53,
};

impl DmzConfig {
    /// The sandbox rules this config needs.
    pub fn sandbox_rules(&self) -> Rules {
        let rule_sets = || std::iter::once(&self.rights.global).chain(self.rights.agents.values());
        let single = |port| PortRange {
            first: port,
            last: port,
        };
        let bind = std::iter::once(self.tunnel_listen.port())
            .chain(self.admin_listen.map(|a| a.port()))
            .map(single)
            .chain(rule_sets().flat_map(|r| r.listen_allow.iter().map(|a| a.ports)))
            .collect();
        let mut names = false;
        let mut connect: Vec<PortRange> = rule_sets()
            .flat_map(|r| &r.connect_allow)
            .map(|c| match c {
                ConnectRule::Name { ports, .. } => {
                    names = true;
                    *ports
                }
                ConnectRule::Net(rule) => rule.ports,
            })
            .collect();
        if names {
            connect.push(DNS);
        }
        Rules {
            files: self
                .source
                .iter()
                .cloned()
                .chain(self.files.clone())
                .collect(),
            bind: port_rule(bind),
            connect: port_rule(connect),
        }
    }
}
