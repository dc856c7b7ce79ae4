//! Agent certificates the DMZ must refuse beyond mtls.rs: expired, not yet valid, without the
//! clientAuth usage, revoked by `tunnel.crl`, any certificate while the CRL itself has expired,
//! and a certificate revoked while its tunnel is up (CRL reloaded). Each is refused with a log
//! line and a counted reason; other agents' listeners are unaffected.

use std::time::Duration;

use relay_certs::{Ca, LeafSpec, Usage};

use super::*;

const DAY: Duration = Duration::from_secs(86_400);

/// How long a refused agent's service must stay closed.
const STAYS_CLOSED: Duration = Duration::from_secs(3);

/// The development CA of `pki`, to issue more certificates.
fn dev_ca(pki: &Pki) -> Ca {
    let cert = std::fs::read_to_string(pki.path("ca.pem")).unwrap();
    let key = std::fs::read_to_string(pki.path("ca-key.pem")).unwrap();
    Ca::from_pem(&cert, &key).expect("dev CA")
}

/// Issues a certificate for agent identity `name` and writes `NAME.pem` and `NAME-key.pem`.
fn issue(pki: &Pki, name: &str, edit: impl FnOnce(&mut LeafSpec)) {
    let mut spec = LeafSpec::client(name);
    edit(&mut spec);
    let leaf = dev_ca(pki).issue(&spec).expect("issue");
    pki.write(&format!("{name}.pem"), &leaf.cert_pem);
    pki.write(&format!("{name}-key.pem"), &leaf.key_pem);
}

/// Starts agent `identity` (in-process) for a service on a fresh port and checks the DMZ
/// refuses it: a log line naming one of `why`, one more `tls_handshake` rejection, and the
/// service never opens.
async fn assert_refused(pki: &Pki, dmz: &Dmz, identity: &str, why: &[&str]) {
    let before = dmz.rejections("tls_handshake").await;
    let lines_before = dmz
        .proc
        .count_lines(&["agent connection refused", "TLS handshake failed"]);
    let echo = CountingEcho::start().await;
    let port = free_port();
    let mut opts = AgentOptions::new(
        dmz.opts.tunnel,
        vec![Service::new("refused", port, echo.addr)],
    );
    opts.identity = identity.into();
    opts.connections = 1;
    let agent = start_agent(pki, &opts).await;
    let n = dmz.wait_rejections("tls_handshake", before + 1.0).await;
    // The refusal log is rate-limited per reason (one line a second): wait for ours.
    let line = dmz
        .proc
        .wait_count(
            &["agent connection refused", "TLS handshake failed"],
            lines_before + 1,
            LIMIT,
        )
        .await;
    println!(
        "{identity}: relay_rejections_total{{reason=\"tls_handshake\"}} {before} -> {n}; DMZ log: {line}"
    );
    let lower = line.to_lowercase();
    assert!(
        why.iter().any(|w| lower.contains(&w.to_lowercase())),
        "{identity}: the DMZ's reason should mention one of {why:?}: {line}"
    );
    assert_stays_closed(local(port), STAYS_CLOSED, identity).await;
    assert_eq!(echo.accepted(), 0);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_agent_certificate_is_refused() {
    let _serial = shared().await;
    let pki = Pki::new();
    issue(&pki, "engine-old", |s| {
        let an_hour_ago = s.not_before;
        s.not_before = an_hour_ago - DAY * 30;
        s.not_after = an_hour_ago - DAY;
    });
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let legit = Legit::start(&pki, dmz.opts.tunnel).await;
    assert_refused(&pki, &dmz, "engine-old", &["expired"]).await;
    legit.check("beside the expired certificate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yet_valid_agent_certificate_is_refused() {
    let _serial = shared().await;
    let pki = Pki::new();
    issue(&pki, "engine-future", |s| {
        let an_hour_ago = s.not_before;
        s.not_before = an_hour_ago + DAY;
        s.not_after = an_hour_ago + DAY * 30;
    });
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let legit = Legit::start(&pki, dmz.opts.tunnel).await;
    assert_refused(
        &pki,
        &dmz,
        "engine-future",
        &["not valid yet", "NotValidYet"],
    )
    .await;
    legit.check("beside the future certificate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_certificate_without_client_auth_usage_is_refused() {
    let _serial = shared().await;
    let pki = Pki::new();
    issue(&pki, "engine-server", |s| s.usage = Usage::Server);
    let dmz = Dmz::start(&pki, DmzOptions::default()).await;
    let legit = Legit::start(&pki, dmz.opts.tunnel).await;
    assert_refused(&pki, &dmz, "engine-server", &["purpose", "usage"]).await;
    legit.check("beside the server-only certificate").await;
}

/// The DMZ config of `opts` with `tunnel.crl` set to `crl`.
fn with_crl(pki: &Pki, opts: &DmzOptions, crl: &std::path::Path) -> String {
    let text = opts.toml(pki);
    let edited = text.replacen(
        "[tunnel]\n",
        &format!("[tunnel]\ncrl = \"{}\"\n", crl.display()),
        1,
    );
    assert_ne!(text, edited, "the harness config has no [tunnel] table");
    edited
}

fn pem(pki: &Pki, name: &str) -> String {
    std::fs::read_to_string(pki.path(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_certificate_is_refused() {
    let _serial = shared().await;
    let pki = Pki::new();
    let next = relay_certs::validity(7).1;
    let crl = dev_ca(&pki)
        .crl(&[&pem(&pki, "engine-1.pem")], next)
        .expect("CRL");
    let crl_path = pki.write("revoked.crl.pem", &crl);
    let opts = DmzOptions::default();
    let text = with_crl(&pki, &opts, &crl_path);
    let dmz = Dmz::start_with(&pki, opts, text).await;
    let legit = Legit::start_as(&pki, dmz.opts.tunnel, "engine-2").await;
    assert_refused(&pki, &dmz, "engine-1", &["revoked"]).await;
    legit.check("beside the revoked certificate").await;
}

/// A CRL past its next update refuses every agent (a stale revocation list is not trusted),
/// and the DMZ stays up and says why it is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_crl_refuses_every_agent() {
    let _serial = shared().await;
    let pki = Pki::new();
    // Ca::crl sets this_update an hour ago; next_update five minutes ago.
    let past = relay_certs::validity(1).0 + Duration::from_secs(55 * 60);
    let crl = dev_ca(&pki).crl(&[], past).expect("CRL");
    let crl_path = pki.write("stale.crl.pem", &crl);
    let opts = DmzOptions::default();
    let text = with_crl(&pki, &opts, &crl_path);
    let dmz = Dmz::start_with(&pki, opts, text).await;
    for identity in ["engine-1", "engine-2"] {
        assert_refused(&pki, &dmz, identity, &["revocation list", "RevocationList"]).await;
    }
    let (status, body) = http_get(dmz.opts.admin, "/readyz").await.unwrap();
    println!("/readyz with an expired CRL: {status} {}", body.trim());
    assert_eq!(status, 503);
    assert!(alive(dmz.pid()));
}

/// engine-1 is connected; its certificate is revoked in the CRL file and the DMZ reloads
/// (`POST /reload`): engine-1's tunnel is cut, its listener closes and stays closed (its
/// reconnects are refused as revoked), while engine-2 keeps its listener and sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_reload_cuts_a_revoked_agent() {
    let _serial = shared().await;
    let pki = Pki::new();
    let next = relay_certs::validity(7).1;
    let crl_path = pki.write("live.crl.pem", &dev_ca(&pki).crl(&[], next).expect("CRL"));
    let opts = DmzOptions::default();
    let text = with_crl(&pki, &opts, &crl_path);
    let dmz = Dmz::start_with(&pki, opts, text).await;
    let engine1 = Legit::start_as(&pki, dmz.opts.tunnel, "engine-1").await;
    let engine2 = Legit::start_as(&pki, dmz.opts.tunnel, "engine-2").await;

    let crl = dev_ca(&pki)
        .crl(&[&pem(&pki, "engine-1.pem")], next)
        .expect("CRL");
    pki.write("live.crl.pem", &crl);
    let before = dmz.rejections("tls_handshake").await;
    let (status, body) = http_post(dmz.opts.admin, "/reload", LIMIT)
        .await
        .expect("admin answer in time");
    println!("POST /reload: {status} {}", body.trim());
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("1 tunnel(s) cut"), "{body}");
    let took = wait_closed(engine1.public, LIMIT).await;
    println!("engine-1's listener closed {took:?} after the reload");
    let line = dmz
        .proc
        .wait_line(&["no longer admitted", "engine-1"], LIMIT)
        .await;
    println!("DMZ log: {line}");
    // engine-1 keeps dialing and is refused as revoked.
    let n = dmz.wait_rejections("tls_handshake", before + 1.0).await;
    let refusal = dmz
        .proc
        .wait_line(&["agent connection refused", "evoked"], LIMIT)
        .await;
    println!(
        "relay_rejections_total{{reason=\"tls_handshake\"}} {before} -> {n}; DMZ log: {refusal}"
    );
    assert_stays_closed(engine1.public, STAYS_CLOSED, "revoked engine-1").await;
    engine2.check("after engine-1 was revoked").await;
    assert_eq!(
        dmz.proc.count_lines(&["agent tunnel down", "engine-2"]),
        0,
        "engine-2's tunnel went down"
    );
}
