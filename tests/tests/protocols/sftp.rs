//! SFTP: OpenSSH's sshd (unprivileged config in a temp dir) behind the relay, OpenSSH's sftp
//! client in batch mode as the partner.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::*;

/// Size of the file uploaded and downloaded.
const SIZE: usize = 50 * 1024 * 1024;

fn keygen(ssh_keygen: &Path, path: &Path) {
    let out = Command::new(ssh_keygen)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "relay-test", "-f"])
        .arg(path)
        .output()
        .expect("run ssh-keygen");
    assert!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts sshd on 127.0.0.1:`port` with an SFTP subsystem and public-key login from
/// `client_key.pub` for the current user.
pub(super) async fn start_sshd(dir: &Path, port: u16) -> Server {
    let sshd = require("sshd", "openssh-server");
    let ssh_keygen = require("ssh-keygen", "openssh-client");
    keygen(&ssh_keygen, &dir.join("host_key"));
    keygen(&ssh_keygen, &dir.join("client_key"));
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))
        .expect("write authorized_keys");
    if is_root() {
        // Root sshd chroots its pre-auth child into the privilege separation directory.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
    }
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {keys}\n\
         PidFile {pid}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
         PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n",
        host_key = dir.join("host_key").display(),
        keys = dir.join("authorized_keys").display(),
        pid = dir.join("sshd.pid").display(),
    );
    std::fs::write(dir.join("sshd_config"), config).expect("write sshd_config");
    // sshd re-executes itself, so it needs its absolute path.
    let sshd = std::fs::canonicalize(&sshd).expect("absolute sshd path");
    let mut server = Server::spawn(
        "sshd",
        Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config")),
        dir.join("sshd.log"),
    );
    server
        .wait_ready(SocketAddr::from(([127, 0, 0, 1], port)))
        .await;
    server
}

/// A 50 MiB file goes up and comes back down through the relay with sftp; the original, the
/// copy sshd wrote and the copy sftp downloaded have the same SHA-256. On the way, the SSH
/// banner (the server speaks first) reaches a partner that has sent nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_upload_and_download_50_mib_through_the_relay() {
    let sftp = require("sftp", "openssh-client");
    let dir = tempfile::tempdir().expect("temp dir");
    let target_port = free_port();
    let sshd = start_sshd(dir.path(), target_port).await;

    let pki = Pki::new();
    let dmz_opts = DmzOptions::default();
    let _dmz = start_dmz(&pki, &dmz_opts).await;
    let public_port = free_port();
    let public = SocketAddr::from(([127, 0, 0, 1], public_port));
    let target = SocketAddr::from(([127, 0, 0, 1], target_port));
    let _agent = start_agent(
        &pki,
        &AgentOptions::new(
            dmz_opts.tunnel,
            vec![Service::new("sftp", public_port, target)],
        ),
    )
    .await;
    wait_open(public, START_LIMIT).await;

    // SSH servers speak first: the banner must arrive without the partner sending a byte.
    let start = Instant::now();
    let mut s = TcpStream::connect(public)
        .await
        .expect("connect to public port");
    let mut banner = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner))
        .await
        .expect("no SSH banner within 5 s")
        .expect("read SSH banner");
    assert_eq!(&banner, b"SSH-2.0-", "unexpected SSH banner");
    println!(
        "sftp: SSH banner through the relay after {:?}",
        start.elapsed()
    );
    drop(s);

    let original = dir.path().join("original.bin");
    let uploaded = dir.path().join("uploaded.bin");
    let downloaded = dir.path().join("downloaded.bin");
    let sum = write_pattern_file(&original, 0x5f7, SIZE);
    let batch = dir.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\n",
            original.display(),
            uploaded.display(),
            uploaded.display(),
            downloaded.display()
        ),
    )
    .expect("write sftp batch");
    let user = current_user();
    let ran = run_client(
        tokio::process::Command::new(sftp)
            .arg("-b")
            .arg(&batch)
            .arg("-i")
            .arg(dir.path().join("client_key"))
            .args(["-P", &public_port.to_string()])
            .args(["-F", "/dev/null"])
            .args(["-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "BatchMode=yes"])
            .args(["-o", "LogLevel=ERROR"])
            .arg(format!("{user}@127.0.0.1")),
        &sshd,
    )
    .await;

    assert_eq!(sha256_file(&uploaded), sum, "file written by sshd differs");
    assert_eq!(
        sha256_file(&downloaded),
        sum,
        "file downloaded by sftp differs"
    );
    println!(
        "sftp: put + get of {} MiB each way in {:.2?} ({:.1} MiB/s both ways together), sha256 {sum}",
        SIZE >> 20,
        ran.elapsed,
        rate(2 * SIZE, ran.elapsed)
    );
}
