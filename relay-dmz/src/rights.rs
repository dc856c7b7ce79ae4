//! What each agent identity may ask of the node: the listen addresses it may open or join, and
//! the destinations it may have dialed. An identity with its own `[policy.agents."ID"]` table
//! gets exactly that table; the others get the global rules, or nothing under
//! `policy.default = "deny"`.

use std::collections::BTreeMap;
use std::fmt;

use relay_tunnel::config::{AddrRule, ConnectRule, ListenSpec};

/// One set of rules: the global one or an identity's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Listen addresses that may be opened or joined.
    pub listen_allow: Vec<AddrRule>,
    /// Outbound destinations that may be dialed; empty: none.
    pub connect_allow: Vec<ConnectRule>,
}

/// What identities without their own table get (`policy.default`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Fallback {
    /// The global `policy.listen_allow` and `policy.connect_allow` (`"global"`, the default).
    #[default]
    Global,
    /// Nothing at all (`"deny"`).
    Deny,
}

/// Every identity's rights on this node, replaced as a whole on reload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rights {
    /// `policy.listen_allow` and `policy.connect_allow`.
    pub global: Rules,
    /// `[policy.agents."ID"]` tables, by identity.
    pub agents: BTreeMap<String, Rules>,
    /// `policy.default`.
    pub fallback: Fallback,
}

/// The rules that apply to one identity, and where they come from (for messages).
#[derive(Debug, Clone, Copy)]
pub struct Applied<'a> {
    agent: &'a str,
    rules: Option<&'a Rules>,
    own: bool,
}

/// A declaration the identity has no right to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAllowed {
    /// Outside the identity's listen rules.
    #[error("listen address {listen} is not allowed for agent {agent:?} by {rules}")]
    Listen {
        /// The declared address.
        listen: ListenSpec,
        /// The identity.
        agent: String,
        /// The rule set used, as its config key.
        rules: String,
    },
    /// The identity has no rules at all.
    #[error(
        "agent {agent:?} has no rights on this node: policy.default is \"deny\" and there is no [policy.agents.{agent:?}] table"
    )]
    NoRules {
        /// The identity.
        agent: String,
    },
}

impl Rights {
    /// The rules that apply to `agent`.
    pub fn of<'a>(&'a self, agent: &'a str) -> Applied<'a> {
        match self.agents.get(agent) {
            Some(rules) => Applied {
                agent,
                rules: Some(rules),
                own: true,
            },
            None => Applied {
                agent,
                rules: (self.fallback == Fallback::Global).then_some(&self.global),
                own: false,
            },
        }
    }
}

impl Applied<'_> {
    /// `Ok` if the identity may open or join a service on `listen`.
    pub fn may_listen(&self, listen: &ListenSpec) -> Result<(), NotAllowed> {
        let Some(rules) = self.rules else {
            return Err(NotAllowed::NoRules {
                agent: self.agent.to_owned(),
            });
        };
        if rules.listen_allow.iter().any(|r| r.covers(listen)) {
            return Ok(());
        }
        Err(NotAllowed::Listen {
            listen: *listen,
            agent: self.agent.to_owned(),
            rules: self.rules_key("listen_allow"),
        })
    }

    /// `Ok` unless the identity has no rules at all (`policy.default = "deny"` and no table of
    /// its own): such an identity is refused as a whole.
    pub fn any_rights(&self) -> Result<(), NotAllowed> {
        match self.rules {
            Some(_) => Ok(()),
            None => Err(NotAllowed::NoRules {
                agent: self.agent.to_owned(),
            }),
        }
    }

    /// The destinations the identity may have dialed; empty when it may dial none.
    pub fn connect_allow(&self) -> &[ConnectRule] {
        self.rules.map_or(&[], |r| &r.connect_allow)
    }

    /// The config key of rule list `list` (`listen_allow`, `connect_allow`) in force, for
    /// messages.
    pub fn rules_key(&self, list: &str) -> String {
        match (self.own, self.rules) {
            (true, _) => format!("policy.agents.{:?}.{list}", self.agent),
            (false, Some(_)) => format!(
                "policy.{list} (no [policy.agents.{:?}] table: the global rules)",
                self.agent
            ),
            (false, None) => "policy.default = \"deny\"".to_owned(),
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fallback::Global => "global",
            Fallback::Deny => "deny",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(listen: &[&str], connect: &[&str]) -> Rules {
        Rules {
            listen_allow: listen.iter().map(|r| r.parse().unwrap()).collect(),
            connect_allow: connect.iter().map(|r| r.parse().unwrap()).collect(),
        }
    }

    fn spec(s: &str) -> ListenSpec {
        s.parse().unwrap()
    }

    #[test]
    fn an_identitys_own_table_replaces_the_global_rules() {
        let mut rights = Rights {
            global: rules(&["0.0.0.0:8000-8999"], &["partner.example.com:443"]),
            ..Rights::default()
        };
        rights
            .agents
            .insert("billing".into(), rules(&["0.0.0.0:9443"], &[]));

        let other = rights.of("engine-1");
        assert!(other.may_listen(&spec("0.0.0.0:8443")).is_ok());
        assert_eq!(other.connect_allow().len(), 1);

        let billing = rights.of("billing");
        assert!(billing.may_listen(&spec("0.0.0.0:9443")).is_ok());
        assert_eq!(
            billing
                .may_listen(&spec("0.0.0.0:8443"))
                .unwrap_err()
                .to_string(),
            "listen address 0.0.0.0:8443 is not allowed for agent \"billing\" by \
             policy.agents.\"billing\".listen_allow"
        );
        assert!(
            billing.connect_allow().is_empty(),
            "absent keys mean nothing"
        );
    }

    #[test]
    fn default_deny_leaves_identities_without_a_table_nothing() {
        let rights = Rights {
            global: rules(&["0.0.0.0:*"], &["partner.example.com:443"]),
            fallback: Fallback::Deny,
            ..Rights::default()
        };
        let applied = rights.of("engine-9");
        assert!(applied.connect_allow().is_empty());
        assert_eq!(
            applied.may_listen(&spec("0.0.0.0:8443")).unwrap_err(),
            NotAllowed::NoRules {
                agent: "engine-9".into()
            }
        );
        assert_eq!(
            applied.rules_key("connect_allow"),
            "policy.default = \"deny\""
        );
    }

    #[test]
    fn the_global_rules_are_named_as_such() {
        let rights = Rights {
            global: rules(&["0.0.0.0:8000"], &[]),
            ..Rights::default()
        };
        assert_eq!(
            rights
                .of("engine-1")
                .may_listen(&spec("0.0.0.0:9000"))
                .unwrap_err()
                .to_string(),
            "listen address 0.0.0.0:9000 is not allowed for agent \"engine-1\" by \
             policy.listen_allow (no [policy.agents.\"engine-1\"] table: the global rules)"
        );
    }
}
