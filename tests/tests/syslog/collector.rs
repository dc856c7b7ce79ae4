//! Debian's rsyslogd as the syslog collector of a test: a child process with its own config,
//! work directory and pid file in the test directory, one TCP (imtcp) or TLS (imtcp with the
//! GnuTLS driver) input on a given port, writing each message it receives as one JSON object:
//! the header fields as rsyslog parsed them, the structured data as mmpstrucdata parsed it,
//! and the raw message. Killed on drop. It never touches /dev/log (no imuxsock).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use relay_e2e::process::log_tail;
use relay_e2e::{ChildGuard, Pki, wait_for};
use serde_json::Value;

/// Where Debian puts rsyslogd.
const RSYSLOGD: &str = "/usr/sbin/rsyslogd";
/// Directories where rsyslog's modules may be (Debian multiarch, other layouts).
const MODULE_DIRS: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/rsyslog",
    "/usr/lib/aarch64-linux-gnu/rsyslog",
    "/usr/lib/rsyslog",
];

/// rsyslogd, or `None` (after a skip line) when it or its TLS driver (package rsyslog-gnutls)
/// is not installed; under CI a missing one is an error.
pub fn rsyslogd_or_skip(test: &str) -> Option<PathBuf> {
    let daemon = Path::new(RSYSLOGD).exists();
    let gtls = MODULE_DIRS
        .iter()
        .any(|d| Path::new(d).join("lmnsd_gtls.so").exists());
    let missing = if daemon {
        "rsyslog's TLS driver is not installed (apt-get install rsyslog-gnutls)"
    } else {
        "rsyslogd is not installed (apt-get install rsyslog rsyslog-gnutls)"
    };
    let found = (daemon && gtls).then(|| PathBuf::from(RSYSLOGD));
    relay_e2e::tools::or_skip(test, found, missing)
}

/// A running rsyslogd.
pub struct Rsyslog {
    guard: ChildGuard,
    /// The file the received messages go to.
    pub out: PathBuf,
    stderr: PathBuf,
}

/// One message as rsyslog received and parsed it.
#[derive(Debug, Clone)]
pub struct Received {
    pub facility: String,
    pub severity: String,
    pub hostname: String,
    pub app: String,
    pub procid: String,
    pub msgid: String,
    pub time: String,
    /// `[relay@32473 ...]`, unescaped by mmpstrucdata.
    pub fields: serde_json::Map<String, Value>,
    /// `sequenceId` of `[meta ...]`.
    pub sequence: u64,
    pub msg: String,
    pub raw: String,
}

impl Received {
    /// A field of `[relay@32473 ...]`; panics if it is missing.
    pub fn field(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no field {name:?} in {}", self.raw))
    }
}

impl Rsyslog {
    /// Starts rsyslogd listening on 127.0.0.1:`port`, over TLS with the PKI's DMZ certificate
    /// (valid for 127.0.0.1) when `tls`, and waits until the port accepts connections. `name`
    /// names its directory in the test directory (a restart uses a new name).
    pub async fn start(rsyslogd: &Path, pki: &Pki, name: &str, port: u16, tls: bool) -> Self {
        let dir = pki.path(name);
        std::fs::create_dir_all(&dir).expect("rsyslog directory");
        let out = dir.join("received.json");
        let conf = dir.join("rsyslog.conf");
        std::fs::write(&conf, config(pki, &dir, &out, port, tls)).expect("write rsyslog.conf");
        let stderr = dir.join("rsyslogd.stderr");
        let log = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("rsyslogd log file")
        };
        let child = Command::new(rsyslogd)
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(log(&dir.join("rsyslogd.stdout")))
            .stderr(log(&stderr))
            .spawn()
            .expect("spawn rsyslogd");
        let mut collector = Self {
            guard: ChildGuard { child },
            out,
            stderr,
        };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let up = wait_for(Duration::from_secs(20), || relay_e2e::accepts(addr)).await;
        if up.is_none() {
            let status = collector.guard.child.try_wait().ok().flatten();
            panic!(
                "rsyslogd did not listen on {addr} within 20 s (exit status {status:?})\n{}",
                log_tail(&collector.stderr, 30)
            );
        }
        collector
    }

    /// Every message received so far; a message still being written is left out.
    pub fn received(&self) -> Vec<Received> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .map_while(Result::ok)
            .map(|v| parse(&v))
            .collect()
    }

    /// Waits up to `limit` until at least `n` messages were received; returns them and the
    /// time it took, or panics.
    pub async fn wait_received(&self, n: usize, limit: Duration) -> (Vec<Received>, Duration) {
        let took = wait_for(limit, || async { self.received().len() >= n }).await;
        let got = self.received();
        match took {
            Some(t) => (got, t),
            None => panic!(
                "rsyslog received {} messages, expected {n} within {limit:?}: {:#?}\n{}",
                got.len(),
                got.iter().map(|r| &r.raw).collect::<Vec<_>>(),
                log_tail(&self.stderr, 20)
            ),
        }
    }

    /// rsyslogd's own log, for assertion messages.
    pub fn tail(&self) -> String {
        log_tail(&self.stderr, 20)
    }

    /// Kills rsyslogd (SIGKILL) and waits for it to exit.
    pub fn kill(mut self) {
        let _ = self.guard.child.kill();
        let _ = self.guard.child.wait();
    }
}

/// One JSON object of the output file as a [`Received`].
fn parse(v: &Value) -> Received {
    let text = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no {k:?} in {v}"))
            .to_owned()
    };
    let sd: Value = serde_json::from_str(&text("sd"))
        .unwrap_or_else(|e| panic!("structured data is not JSON ({e}): {v}"));
    let fields = sd
        .get("relay@32473")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_else(|| panic!("no [relay@32473] element: {v}"));
    // mmpstrucdata writes names in lower case.
    let sequence = sd
        .get("meta")
        .and_then(|m| m.get("sequenceid"))
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no [meta sequenceId] element: {v}"));
    Received {
        facility: text("facility"),
        severity: text("severity"),
        hostname: text("hostname"),
        app: text("app"),
        procid: text("procid"),
        msgid: text("msgid"),
        time: text("time"),
        fields,
        sequence,
        msg: text("msg"),
        raw: text("raw"),
    }
}

/// rsyslog.conf: one imtcp input on `port` (TLS through the GnuTLS driver when `tls`), each
/// message's structured data parsed (mmpstrucdata) and written to `out` as JSON.
fn config(pki: &Pki, dir: &Path, out: &Path, port: u16, tls: bool) -> String {
    let mut s = format!("global(workDirectory=\"{}\"", dir.display());
    if tls {
        s += &format!(
            "\n  defaultNetstreamDriver=\"gtls\"\n  defaultNetstreamDriverCAFile=\"{}\"\n  defaultNetstreamDriverCertFile=\"{}\"\n  defaultNetstreamDriverKeyFile=\"{}\"",
            pki.path("ca.pem").display(),
            pki.path("dmz.pem").display(),
            pki.path("dmz-key.pem").display()
        );
    }
    s += ")\n";
    if tls {
        s += "module(load=\"imtcp\" streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\")\n";
    } else {
        s += "module(load=\"imtcp\")\n";
    }
    s += &format!(
        r#"module(load="mmpstrucdata")
template(name="fields" type="list" option.jsonf="on") {{
  property(outname="facility" name="syslogfacility-text" format="jsonf")
  property(outname="severity" name="syslogseverity-text" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="time" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="sd" name="$!rfc5424-sd" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
  property(outname="raw" name="rawmsg" format="jsonf")
}}
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="audit")
ruleset(name="audit") {{
  action(type="mmpstrucdata")
  action(type="omfile" file="{}" template="fields")
}}
"#,
        out.display()
    );
    s
}
