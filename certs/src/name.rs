//! Which agent and DMZ names the command line accepts.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::Error;

/// Agent names that would make `NAME.pem` or `NAME-key.pem` collide with the CA or DMZ files.
const RESERVED: [&str; 4] = ["ca", "ca-key", "dmz", "dmz-key"];

/// Checks an agent name: a DNS host name (labels of `[A-Za-z0-9-]`, joined by dots), since it
/// becomes the certificate's DNS SAN and, as `NAME.pem`, a file name.
pub fn check_agent_name(name: &str) -> Result<(), Error> {
    let invalid = |reason| Error::InvalidName {
        what: "agent",
        name: name.to_owned(),
        reason,
    };
    check_host_name(name).map_err(invalid)?;
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(name)) {
        return Err(invalid("it would collide with the CA or DMZ files"));
    }
    Ok(())
}

/// Checks a DMZ name: an IP address or a DNS host name.
pub fn check_dmz_name(name: &str) -> Result<(), Error> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    check_host_name(name).map_err(|reason| Error::InvalidName {
        what: "DMZ",
        name: name.to_owned(),
        reason,
    })
}

/// Refuses a name given twice (DNS names compare case-insensitively).
pub(crate) fn check_unique(what: &'static str, names: &[String]) -> Result<(), Error> {
    let mut seen = HashSet::new();
    for name in names {
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(Error::DuplicateName {
                what,
                name: name.clone(),
            });
        }
    }
    Ok(())
}

fn check_host_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err("only letters, digits, '-' and '.' are allowed");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (leading, trailing or double '.')");
        }
        if label.len() > 63 {
            return Err("a label is longer than 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with '-'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_host_names() {
        for ok in ["engine-1", "a", "agent.example.com", "E2", "x-y.z9"] {
            check_agent_name(ok).unwrap();
        }
    }

    #[test]
    fn refuses_bad_agent_names() {
        let long = "a".repeat(64);
        for bad in [
            "", "../x", "..", "a/b", "a..b", ".a", "a.", "-a", "a-", "a_b", "a b", "é", "ca", "CA",
            "dmz", "dmz-key", "ca-key", &long,
        ] {
            let err = check_agent_name(bad).unwrap_err();
            assert!(err.is_usage(), "{bad:?}");
        }
    }

    #[test]
    fn dmz_names_may_be_ip_addresses() {
        check_dmz_name("127.0.0.1").unwrap();
        check_dmz_name("::1").unwrap();
        check_dmz_name("dmz.example.net").unwrap();
        assert!(check_dmz_name("dmz/1").is_err());
        assert!(check_dmz_name("").is_err());
    }

    #[test]
    fn duplicates_are_refused() {
        let names = vec!["a".to_owned(), "b".to_owned(), "A".to_owned()];
        assert!(matches!(
            check_unique("agent", &names),
            Err(Error::DuplicateName { name, .. }) if name == "A"
        ));
    }
}
