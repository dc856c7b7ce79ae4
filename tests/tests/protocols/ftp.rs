//! FTP and explicit FTPS in passive mode: pyftpdlib behind the relay with a control service and
//! a port-range service for the passive data ports, curl as the partner.
//!
//! The DMZ binds its public listeners on 127.0.0.2 (`public.bind`) so the public data ports and
//! the FTP server's passive ports can be the same numbers on one host, as they are when the
//! DMZ and the FTP server are different machines. The FTP server advertises 127.0.0.2 (its
//! masquerade address) and the passive range; the relay maps each public port to the same
//! target port.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;

use relay_certs::{Ca, LeafSpec};

use super::*;

/// Size of the file uploaded and downloaded.
const SIZE: usize = 20 * 1024 * 1024;
/// Passive data ports, one range service.
const PASSIVE_PORTS: u16 = 20;
/// The DMZ's public address in these tests.
const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

const SERVER: &str = r#"
import sys, logging
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.servers import FTPServer

root, port, first, last, masquerade, certdir = sys.argv[1:7]
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
authorizer = DummyAuthorizer()
authorizer.add_user("partner", "partner-secret", root, perm="elradfmwMT")
if certdir:
    from pyftpdlib.handlers import TLS_FTPHandler as Handler
    Handler.certfile = certdir + "/ftps.pem"
    Handler.keyfile = certdir + "/ftps-key.pem"
    Handler.tls_control_required = True
    Handler.tls_data_required = True
else:
    from pyftpdlib.handlers import FTPHandler as Handler
Handler.authorizer = authorizer
Handler.masquerade_address = masquerade
Handler.passive_ports = range(int(first), int(last) + 1)
Handler.permit_foreign_addresses = False
FTPServer(("127.0.0.1", int(port)), Handler).serve_forever()
"#;

/// Starts pyftpdlib on 127.0.0.1:`control` with passive ports `first..first+PASSIVE_PORTS`
/// announced on `announce`; with TLS when `certdir` holds `ftps.pem`.
async fn start_ftpd(
    dir: &Path,
    control: u16,
    first: u16,
    announce: Ipv4Addr,
    certdir: Option<&Path>,
) -> Server {
    // pyftpdlib 1.5 (Debian bookworm's) closes the TLS data connection at once; 2.x works.
    let check = if certdir.is_some() {
        "import OpenSSL, pyftpdlib; assert int(pyftpdlib.__ver__.split('.')[0]) >= 2, \
         'FTPS needs pyftpdlib 2.x, found ' + pyftpdlib.__ver__"
    } else {
        "import pyftpdlib"
    };
    let python = require_python(check, "`python3 -m pip install pyftpdlib pyopenssl`");
    let root = dir.join("ftproot");
    std::fs::create_dir_all(&root).expect("create FTP root");
    std::fs::write(dir.join("ftpd.py"), SERVER).expect("write server script");
    let mut server = Server::spawn(
        "pyftpdlib",
        Command::new(python)
            .arg(dir.join("ftpd.py"))
            .arg(&root)
            .arg(control.to_string())
            .arg(first.to_string())
            .arg((first + PASSIVE_PORTS - 1).to_string())
            .arg(announce.to_string())
            .arg(certdir.map(|d| d.display().to_string()).unwrap_or_default()),
        dir.join("ftpd.log"),
    );
    server
        .wait_ready(SocketAddr::from(([127, 0, 0, 1], control)))
        .await;
    server
}

/// Uploads with EPSV and downloads with PASV (using the address the server advertises) a
/// 20 MiB file through the relay; checks the server's copy, the downloaded copy, and that the
/// data bytes crossed the relay's data-port service.
async fn passive_transfer(tls: bool) {
    let curl = require("curl", "curl");
    let label = if tls { "ftps" } else { "ftp" };
    let data_service = format!("{label}-data");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = tls.then(|| {
        let ca = Ca::new("relay FTPS test CA").expect("test CA");
        let leaf = ca
            .issue(&LeafSpec::server(&[&PUBLIC_IP.to_string()]))
            .expect("issue FTPS cert");
        std::fs::write(dir.path().join("ftps.pem"), leaf.cert_pem).expect("write cert");
        std::fs::write(dir.path().join("ftps-key.pem"), leaf.key_pem).expect("write key");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert_pem()).expect("write CA");
        path
    });
    // One block: the control port, then the passive ports; free on the target address and on
    // the public address alike, since both sides use the same numbers.
    let control = free_block(PASSIVE_PORTS + 1, &[Ipv4Addr::LOCALHOST, PUBLIC_IP]);
    let first = control + 1;
    let ftpd = start_ftpd(
        dir.path(),
        control,
        first,
        PUBLIC_IP,
        tls.then(|| dir.path()),
    )
    .await;

    let pki = Pki::new();
    let dmz_opts = DmzOptions {
        public_bind: Some(PUBLIC_IP.to_string()),
        ..DmzOptions::default()
    };
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let last = first + PASSIVE_PORTS - 1;
    let services = vec![
        Service {
            name: label.into(),
            listen: format!("127.0.0.1:{control}"),
            target: format!("127.0.0.1:{control}"),
            extra: String::new(),
        },
        Service {
            name: data_service.clone(),
            listen: format!("127.0.0.1:{first}-{last}"),
            target: format!("127.0.0.1:{first}-{last}"),
            extra: String::new(),
        },
    ];
    let _agent = start_agent(&pki, &AgentOptions::new(dmz_opts.tunnel, services)).await;
    wait_open(SocketAddr::from((PUBLIC_IP, control)), START_LIMIT).await;

    let original = dir.path().join("original.bin");
    let sum = write_pattern_file(&original, if tls { 0xf75 } else { 0xf7 }, SIZE);
    let url = format!("ftp://{PUBLIC_IP}:{control}/upload.bin");
    let curl_cmd = || {
        let mut cmd = tokio::process::Command::new(&curl);
        cmd.args(["-sS", "--user", "partner:partner-secret"]);
        if let Some(ca) = &ca {
            cmd.arg("--ssl-reqd").arg("--cacert").arg(ca);
        }
        cmd
    };

    // curl tries EPSV first: the answer holds only a port, dialed on the control address.
    let put = run_client(curl_cmd().arg("-T").arg(&original).arg(&url), &ftpd).await;
    let on_server = dir.path().join("ftproot/upload.bin");
    assert_eq!(
        sha256_file(&on_server),
        sum,
        "file stored by the server differs"
    );

    // PASV, dialing the address in the 227 answer: the server's masquerade address.
    let downloaded = dir.path().join("downloaded.bin");
    let get = run_client(
        curl_cmd()
            .args(["--disable-epsv", "--no-ftp-skip-pasv-ip", "-o"])
            .arg(&downloaded)
            .arg(&url),
        &ftpd,
    )
    .await;
    assert_eq!(sha256_file(&downloaded), sum, "downloaded file differs");

    // The data connections went through the relay's range service, not around it.
    for direction in ["partner_to_target", "target_to_partner"] {
        let counted = bytes_metric(&dmz_opts, &data_service, direction).await;
        assert!(
            counted >= SIZE as f64,
            "{data_service} {direction}: {counted} bytes counted, expected at least {SIZE}"
        );
    }
    // The server saw EPSV for the upload and PASV for the download, and advertised the DMZ's
    // public address in its 227 answer.
    let log = std::fs::read_to_string(dir.path().join("ftpd.log")).unwrap_or_default();
    let advertised = format!(
        "-> 227 Entering passive mode ({},",
        PUBLIC_IP.to_string().replace('.', ",")
    );
    for expected in ["<- EPSV", "<- PASV", advertised.as_str()] {
        assert!(
            log.contains(expected),
            "the FTP server log lacks {expected:?}:\n{}",
            ftpd.log_tail()
        );
    }
    println!(
        "{label}: passive upload (EPSV) {} MiB in {:.2?} ({:.1} MiB/s), download (PASV) in {:.2?} ({:.1} MiB/s), sha256 {sum}",
        SIZE >> 20,
        put.elapsed,
        rate(SIZE, put.elapsed),
        get.elapsed,
        rate(SIZE, get.elapsed)
    );
}

/// Plain FTP, passive mode, through a control service and a 20-port data range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftp_passive_20_mib_through_a_port_range() {
    passive_transfer(false).await;
}

/// Explicit FTPS (AUTH TLS, protected data channel), passive mode, certificate verified by
/// curl against the test CA through the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftps_explicit_passive_20_mib_through_a_port_range() {
    passive_transfer(true).await;
}

/// Outbound: the engine (curl) is the FTP client and the partner's server (pyftpdlib) is
/// outside. curl sends the control and every passive data connection through the agent's
/// SOCKS5 proxy; the DMZ dials them under `policy.connect_allow` (control port and the
/// partner's passive range). 20 MiB up and down, checksums and proxy byte counts checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftp_outbound_passive_through_socks5() {
    let curl = require("curl", "curl");
    let dir = tempfile::tempdir().expect("temp dir");
    let control = free_block(PASSIVE_PORTS + 1, &[Ipv4Addr::LOCALHOST]);
    let first = control + 1;
    let last = first + PASSIVE_PORTS - 1;
    let ftpd = start_ftpd(dir.path(), control, first, Ipv4Addr::LOCALHOST, None).await;

    let pki = Pki::new();
    let dmz_opts = DmzOptions {
        connect_allow: vec![
            format!("127.0.0.1:{control}"),
            format!("127.0.0.1:{first}-{last}"),
        ],
        ..DmzOptions::default()
    };
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut agent_opts = AgentOptions::new(dmz_opts.tunnel, vec![]);
    agent_opts.extra = format!("\n[outbound_proxy]\nlisten = \"{proxy}\"\n");
    let _agent = start_agent(&pki, &agent_opts).await;
    wait_for(START_LIMIT, || async {
        matches!(http_get(agent_opts.admin, "/readyz").await, Ok((200, _)))
    })
    .await
    .expect("agent not ready");
    wait_open(proxy, START_LIMIT).await;

    let original = dir.path().join("original.bin");
    let sum = write_pattern_file(&original, 0x70f, SIZE);
    let url = format!("ftp://127.0.0.1:{control}/outbound.bin");
    let curl_cmd = || {
        let mut cmd = tokio::process::Command::new(&curl);
        cmd.args(["-sS", "--user", "partner:partner-secret", "--socks5"])
            .arg(proxy.to_string());
        cmd
    };
    let put = run_client(curl_cmd().arg("-T").arg(&original).arg(&url), &ftpd).await;
    assert_eq!(
        sha256_file(&dir.path().join("ftproot/outbound.bin")),
        sum,
        "file stored by the partner's server differs"
    );
    let downloaded = dir.path().join("downloaded.bin");
    let get = run_client(
        curl_cmd()
            .args(["--disable-epsv", "-o"])
            .arg(&downloaded)
            .arg(&url),
        &ftpd,
    )
    .await;
    assert_eq!(sha256_file(&downloaded), sum, "downloaded file differs");
    for direction in ["partner_to_target", "target_to_partner"] {
        let counted = bytes_metric(&dmz_opts, "proxy", direction).await;
        assert!(
            counted >= SIZE as f64,
            "proxy {direction}: {counted} bytes counted, expected at least {SIZE}"
        );
    }
    println!(
        "ftp outbound via SOCKS5: upload {} MiB in {:.2?} ({:.1} MiB/s), download in {:.2?} ({:.1} MiB/s), sha256 {sum}",
        SIZE >> 20,
        put.elapsed,
        rate(SIZE, put.elapsed),
        get.elapsed,
        rate(SIZE, get.elapsed)
    );
}
