//! The development PKI and issuing from a loaded CA, checked by parsing what was written.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use relay_certs::{
    Ca, DevOptions, Error, IssueOptions, LeafSpec, Usage, issue_from_dir, write_dev_pki,
};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

fn pem(bytes: &[u8]) -> Pem {
    let (rest, pem) = x509_parser::pem::parse_x509_pem(bytes).expect("PEM");
    assert!(
        rest.iter().all(u8::is_ascii_whitespace),
        "one PEM block only"
    );
    pem
}

fn read_pem(path: &Path) -> Pem {
    pem(&fs::read(path).unwrap())
}

fn common_name<'a>(cert: &'a X509Certificate<'_>) -> &'a str {
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .expect("CN")
}

fn sans<'a>(cert: &'a X509Certificate<'a>) -> Vec<GeneralName<'a>> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|ext| ext.value.general_names.clone())
        .unwrap_or_default()
}

/// (serverAuth, clientAuth, any other purpose)
fn eku(cert: &X509Certificate<'_>) -> (bool, bool, bool) {
    let eku = cert.extended_key_usage().unwrap().expect("EKU").value;
    let other = eku.any
        || eku.code_signing
        || eku.email_protection
        || eku.time_stamping
        || eku.ocsp_signing
        || !eku.other.is_empty();
    (eku.server_auth, eku.client_auth, other)
}

fn opts(out: PathBuf) -> DevOptions {
    DevOptions {
        out,
        ..DevOptions::default()
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn snapshot(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    paths.iter().map(|p| fs::read(p).unwrap()).collect()
}

#[test]
fn dev_pki_has_the_documented_files_and_profiles() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nested/dev");
    let written = write_dev_pki(&opts(out.clone())).unwrap().written;
    let names: Vec<_> = written
        .iter()
        .map(|p| p.strip_prefix(&out).unwrap().to_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "ca.pem",
            "ca-key.pem",
            "dmz.pem",
            "dmz-key.pem",
            "engine-1.pem",
            "engine-1-key.pem",
            "engine-2.pem",
            "engine-2-key.pem"
        ]
    );

    let ca_pem = read_pem(&out.join("ca.pem"));
    let ca = ca_pem.parse_x509().unwrap();
    assert!(ca.is_ca());
    assert_eq!(common_name(&ca), "relay development CA");
    assert_eq!(ca.subject(), ca.issuer());
    let ku = ca.key_usage().unwrap().expect("keyUsage").value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    ca.verify_signature(None).expect("self-signed");

    let dmz_pem = read_pem(&out.join("dmz.pem"));
    let dmz = dmz_pem.parse_x509().unwrap();
    assert!(!dmz.is_ca());
    assert_eq!(common_name(&dmz), "localhost");
    assert_eq!(eku(&dmz), (true, false, false), "serverAuth only");
    let dmz_sans = sans(&dmz);
    assert!(matches!(dmz_sans[0], GeneralName::DNSName("localhost")));
    assert!(matches!(dmz_sans[1], GeneralName::IPAddress(ip) if ip == [127, 0, 0, 1]));
    dmz.verify_signature(Some(ca.public_key())).expect("chains");

    for agent in ["engine-1", "engine-2"] {
        let p = read_pem(&out.join(format!("{agent}.pem")));
        let cert = p.parse_x509().unwrap();
        assert_eq!(common_name(&cert), agent);
        assert!(matches!(sans(&cert)[0], GeneralName::DNSName(n) if n == agent));
        assert_eq!(eku(&cert), (false, true, false), "clientAuth only");
        cert.verify_signature(Some(ca.public_key()))
            .expect("chains");

        let now = OffsetDateTime::now_utc();
        let v = cert.validity();
        assert!(v.not_before.to_datetime() < now - Duration::minutes(59));
        let left = v.not_after.to_datetime() - now;
        assert!(
            left > Duration::days(824) && left <= Duration::days(825),
            "{left}"
        );
    }

    for key in ["ca-key.pem", "dmz-key.pem", "engine-1-key.pem"] {
        let text = fs::read_to_string(out.join(key)).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
    }
}

#[test]
fn key_files_are_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let written = write_dev_pki(&opts(tmp.path().to_owned())).unwrap().written;
    for path in &written {
        let m = mode(path);
        if path.to_str().unwrap().ends_with("-key.pem") {
            assert_eq!(m, 0o600, "{}", path.display());
        } else {
            assert_eq!(m & 0o022, 0, "{} not writable by others", path.display());
            assert_eq!(m & 0o400, 0o400);
        }
    }
}

#[test]
fn existing_files_are_kept_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(tmp.path().to_owned());
    let written = write_dev_pki(&o).unwrap().written;
    let before = snapshot(&written);

    let err = write_dev_pki(&o).unwrap_err();
    assert!(
        matches!(&err, Error::Exists { path } if path.ends_with("ca.pem")),
        "{err}"
    );
    assert!(err.to_string().contains("--force"), "{err}");
    assert!(err.is_usage());
    assert_eq!(snapshot(&written), before, "files untouched");

    // One file is enough to refuse, and nothing else is written.
    fs::remove_dir_all(tmp.path()).unwrap();
    fs::create_dir(tmp.path()).unwrap();
    fs::write(tmp.path().join("engine-2-key.pem"), "mine").unwrap();
    let err = write_dev_pki(&o).unwrap_err();
    assert!(err.to_string().contains("engine-2-key.pem"), "{err}");
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);

    // --force replaces, and a key file left 0644 by someone comes back 0600.
    fs::set_permissions(
        tmp.path().join("engine-2-key.pem"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let forced = DevOptions { force: true, ..o };
    let written = write_dev_pki(&forced).unwrap().written;
    assert_eq!(written.len(), 8);
    assert_ne!(
        fs::read(tmp.path().join("engine-2-key.pem")).unwrap(),
        b"mine"
    );
    assert_eq!(mode(&tmp.path().join("engine-2-key.pem")), 0o600);
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn forced_rewrite_with_other_agents_leaves_no_certificate_of_the_old_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_dev_pki(&opts(dir.to_owned())).unwrap();
    fs::write(dir.join("notes.pem"), "not a pair: kept").unwrap();
    let forced = DevOptions {
        agents: vec!["engine-3".to_owned()],
        force: true,
        ..opts(dir.to_owned())
    };
    let pki = write_dev_pki(&forced).unwrap();
    let removed: Vec<_> = pki
        .removed
        .iter()
        .map(|p| p.strip_prefix(dir).unwrap().to_str().unwrap())
        .collect();
    assert_eq!(
        removed,
        [
            "engine-1-key.pem",
            "engine-1.pem",
            "engine-2-key.pem",
            "engine-2.pem"
        ]
    );
    let mut left: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "ca-key.pem",
            "ca.pem",
            "dmz-key.pem",
            "dmz.pem",
            "engine-3-key.pem",
            "engine-3.pem",
            "notes.pem"
        ]
    );
    let ca_pem = read_pem(&dir.join("ca.pem"));
    let ca = ca_pem.parse_x509().unwrap();
    for name in ["dmz.pem", "engine-3.pem"] {
        let p = read_pem(&dir.join(name));
        p.parse_x509()
            .unwrap()
            .verify_signature(Some(ca.public_key()))
            .unwrap_or_else(|e| panic!("{name} does not chain to the new CA: {e}"));
    }
}

#[test]
fn invalid_names_are_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dev");
    for bad in ["../evil", "a/b", "..", "", "ca", "has space", "-x"] {
        let o = DevOptions {
            agents: vec![bad.to_owned()],
            ..opts(out.clone())
        };
        let err = write_dev_pki(&o).unwrap_err();
        assert!(err.is_usage(), "{bad:?}: {err}");
        assert!(!out.exists(), "nothing written for {bad:?}");
    }
    let o = DevOptions {
        dmz_names: vec!["dmz/1".to_owned()],
        ..opts(out.clone())
    };
    assert!(write_dev_pki(&o).unwrap_err().is_usage());
    let o = DevOptions {
        agents: vec!["a".to_owned(), "a".to_owned()],
        ..opts(out.clone())
    };
    assert!(matches!(
        write_dev_pki(&o),
        Err(Error::DuplicateName { .. })
    ));
    let o = DevOptions {
        days: 0,
        ..opts(out.clone())
    };
    assert!(write_dev_pki(&o).unwrap_err().is_usage());
    assert!(!out.exists());
}

#[test]
fn custom_dmz_names_become_dns_and_ip_sans() {
    let tmp = tempfile::tempdir().unwrap();
    let o = DevOptions {
        agents: vec!["b2bi.example.com".to_owned()],
        dmz_names: vec!["dmz.example.net".into(), "192.0.2.7".into(), "::1".into()],
        days: 30,
        ..opts(tmp.path().to_owned())
    };
    write_dev_pki(&o).unwrap();
    let p = read_pem(&tmp.path().join("dmz.pem"));
    let dmz = p.parse_x509().unwrap();
    assert_eq!(common_name(&dmz), "dmz.example.net");
    let s = sans(&dmz);
    assert!(matches!(s[0], GeneralName::DNSName("dmz.example.net")));
    assert!(matches!(s[1], GeneralName::IPAddress(ip) if ip == [192, 0, 2, 7]));
    assert!(matches!(s[2], GeneralName::IPAddress(ip) if ip.len() == 16));
    assert!(tmp.path().join("b2bi.example.com-key.pem").exists());
}

#[test]
fn issuing_from_a_loaded_ca_chains() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_dev_pki(&opts(dir.to_owned())).unwrap();
    let ca_pem = read_pem(&dir.join("ca.pem"));
    let ca_cert = ca_pem.parse_x509().unwrap();

    // Library: load from PEM, issue, verify.
    let ca = Ca::from_pem(
        &fs::read_to_string(dir.join("ca.pem")).unwrap(),
        &fs::read_to_string(dir.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    let leaf = ca.issue(&LeafSpec::client("engine-9")).unwrap();
    let p = pem(leaf.cert_pem.as_bytes());
    let cert = p.parse_x509().unwrap();
    cert.verify_signature(Some(ca_cert.public_key()))
        .expect("chains to the loaded CA");
    assert_eq!(cert.issuer(), ca_cert.subject());

    // Directory: a new agent next to the others.
    let mut issue = IssueOptions::new(dir);
    issue.agents = vec!["engine-3".into()];
    let written = issue_from_dir(&issue).unwrap();
    assert_eq!(
        written,
        [dir.join("engine-3.pem"), dir.join("engine-3-key.pem")]
    );
    assert_eq!(mode(&written[1]), 0o600);
    let p = read_pem(&written[0]);
    let cert = p.parse_x509().unwrap();
    cert.verify_signature(Some(ca_cert.public_key()))
        .expect("chains");
    assert_eq!(eku(&cert), (false, true, false));

    // Rotation of the DMZ certificate: refused in place without force, done with it.
    let old = fs::read(dir.join("dmz.pem")).unwrap();
    let mut rotate = IssueOptions::new(dir);
    rotate.dmz_names = vec!["dmz.example.net".into()];
    assert!(matches!(issue_from_dir(&rotate), Err(Error::Exists { .. })));
    assert_eq!(fs::read(dir.join("dmz.pem")).unwrap(), old);
    rotate.force = true;
    issue_from_dir(&rotate).unwrap();
    let p = read_pem(&dir.join("dmz.pem"));
    let dmz = p.parse_x509().unwrap();
    assert_eq!(common_name(&dmz), "dmz.example.net");
    dmz.verify_signature(Some(ca_cert.public_key()))
        .expect("chains");

    // A certificate from another CA does not verify against this one.
    let other = Ca::new("other").unwrap();
    let stranger = other.issue(&LeafSpec::client("engine-1")).unwrap();
    let p = pem(stranger.cert_pem.as_bytes());
    let cert = p.parse_x509().unwrap();
    assert!(cert.verify_signature(Some(ca_cert.public_key())).is_err());
}

#[test]
fn issue_needs_a_ca_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let mut issue = IssueOptions::new(tmp.path());
    issue.agents = vec!["engine-3".into()];
    let err = issue_from_dir(&issue).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("ca.pem"), "{err}");
    assert!(!err.is_usage());
}

#[test]
fn leaf_specs_for_negative_tests() {
    let ca = Ca::new("test CA").unwrap();

    let spiffe = LeafSpec {
        sans: vec!["spiffe://relay.example/engine-1".into(), "engine-1".into()],
        ..LeafSpec::client("engine-1")
    };
    let leaf = ca.issue(&spiffe).unwrap();
    let p = pem(leaf.cert_pem.as_bytes());
    let cert = p.parse_x509().unwrap();
    assert!(matches!(
        sans(&cert)[0],
        GeneralName::URI("spiffe://relay.example/engine-1")
    ));

    let expired = LeafSpec {
        not_before: OffsetDateTime::now_utc() - Duration::days(10),
        not_after: OffsetDateTime::now_utc() - Duration::days(1),
        ..LeafSpec::client("engine-1")
    };
    let p = pem(ca.issue(&expired).unwrap().cert_pem.as_bytes());
    assert!(!p.parse_x509().unwrap().validity().is_valid());

    let server_as_client = LeafSpec::server(&["engine-1"]);
    let p = pem(ca.issue(&server_as_client).unwrap().cert_pem.as_bytes());
    assert_eq!(eku(&p.parse_x509().unwrap()), (true, false, false));

    let both = LeafSpec {
        usage: Usage::Both,
        ..LeafSpec::client("x")
    };
    let p = pem(ca.issue(&both).unwrap().cert_pem.as_bytes());
    assert_eq!(eku(&p.parse_x509().unwrap()), (true, true, false));

    let none = LeafSpec {
        usage: Usage::Unrestricted,
        sans: vec![],
        ..LeafSpec::client("x")
    };
    let p = pem(ca.issue(&none).unwrap().cert_pem.as_bytes());
    let cert = p.parse_x509().unwrap();
    assert!(cert.extended_key_usage().unwrap().is_none());
    assert!(cert.subject_alternative_name().unwrap().is_none());

    let leaf = ca.issue(&LeafSpec::client("x")).unwrap();
    assert!(!format!("{leaf:?}").contains(leaf.key_pem.lines().nth(1).unwrap()));
}
