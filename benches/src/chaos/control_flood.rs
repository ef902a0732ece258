//! Scenario 5: slow and idle clients on both control surfaces at once (the
//! unix socket, and the TLS port with token auth from 50 source
//! addresses), while an authorised client polls `GET /v1/status` on each.
//! The target (issue 31): every authorised request served within 1 s.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use super::flood::{Count, Dest, Flood};
use super::plan::Case;
use super::report::{Row, Verdict};
use super::rig::Lbd;

/// The target: every authorised request within this.
const TARGET: Duration = Duration::from_secs(1);
/// An authorised request not answered within this is a failure.
const GIVE_UP: Duration = Duration::from_secs(5);
/// Pause between two authorised requests on one surface.
const EVERY: Duration = Duration::from_millis(100);
/// A request head that never ends (unix socket).
const SLOW_HEAD: &[u8] = b"GET /v1/status HTTP/1.1\r\nHost: lbd\r\nX-Slow: ";
/// A TLS handshake record announcing 16,000 bytes, then a trickle.
const SLOW_HELLO: &[u8] = b"\x16\x03\x01\x3e\x80\x01\x00\x3e\x7c\x03\x03";
/// Source addresses of the TLS flood (lbd allows 32 connections each).
const SOURCES: u8 = 50;

/// A CA, a server certificate for 127.0.0.1 signed by it, and a token, made
/// with `openssl`; the `[admin]` lines that use them.
fn pki(dir: &Path, port: u16) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    let p = |n: &str| dir.join(n).display().to_string();
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )?;
    // `fixed` are words without spaces; `paths` are flag and path pairs.
    let openssl = |fixed: &str, paths: &[(&str, &str)]| -> anyhow::Result<()> {
        let mut args: Vec<&str> = fixed.split_whitespace().collect();
        args.extend(paths.iter().flat_map(|(flag, path)| [*flag, *path]));
        let out = Command::new("openssl")
            .args(&args)
            .output()
            .map_err(|e| anyhow::anyhow!("openssl (apt-get install openssl) could not run: {e}"))?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    };
    let new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let (ca_key, ca, key, csr) = (p("ca.key"), p("ca.pem"), p("server.key"), p("server.csr"));
    openssl(
        &format!("req -x509 {new_key} -days 2 -subj /CN=weir-chaos-ca"),
        &[("-keyout", &ca_key), ("-out", &ca)],
    )?;
    openssl(
        &format!("req {new_key} -subj /CN=127.0.0.1"),
        &[("-keyout", &key), ("-out", &csr)],
    )?;
    openssl(
        "x509 -req -days 2 -CAcreateserial",
        &[
            ("-in", &csr),
            ("-CA", &ca),
            ("-CAkey", &ca_key),
            ("-out", &p("server.pem")),
            ("-extfile", &p("ext.cnf")),
        ],
    )?;
    std::fs::write(dir.join("token"), "chaos-token\n")?;
    use std::os::unix::fs::PermissionsExt;
    for secret in ["token", "server.key", "ca.key"] {
        std::fs::set_permissions(dir.join(secret), std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(format!(
        "control_tcp = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntoken_file = \"{}\"\n",
        p("server.pem"),
        p("server.key"),
        p("token")
    ))
}

/// Authorised requests every [`EVERY`] until `until`: each one's time in
/// ms, or its error.
fn poll(until: Instant, mut once: impl FnMut() -> anyhow::Result<()>) -> Vec<Result<f64, String>> {
    let mut out = Vec::new();
    while Instant::now() < until {
        let started = Instant::now();
        let r = once().map_err(|e| format!("{e:#}"));
        let took = started.elapsed();
        out.push(r.and_then(|()| {
            if took > GIVE_UP {
                Err(format!("answered after {took:?}"))
            } else {
                Ok(took.as_secs_f64() * 1e3)
            }
        }));
        if let Some(rest) = EVERY.checked_sub(took) {
            std::thread::sleep(rest); // the polling pace
        }
    }
    out
}

/// `lbd status` on the unix socket: an operator's process of its own, as
/// on a real host (lbd tells unix-socket clients apart by process, so a
/// flood from this one must not cost the operator's its connection). The
/// time includes starting the process.
fn unix_status(lbd: &Lbd) -> anyhow::Result<()> {
    let out = std::process::Command::new(lbd.bin())
        .arg("status")
        .arg("--socket")
        .arg(&lbd.socket)
        .args(["--output", "json"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "lbd status: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

pub fn run(case: &Case) -> anyhow::Result<Vec<Row>> {
    let port = super::backends::free_addr()?.port();
    let mut lbd = case.lbd("control")?;
    let tls = match pki(&lbd.dir.join("pki"), port) {
        Ok(t) => t,
        Err(e) => {
            let why = format!("no TLS material: {e:#}");
            return Ok(vec![Row::not_run(case.engine, "control clients", &why)]);
        }
    };
    lbd.write_config(&lbd.admin(&tls))?;
    lbd.launch()?;
    let target = lb_api::client::Target::Https {
        url: format!("https://127.0.0.1:{port}"),
        token: "chaos-token".into(),
        tls: lb_api::tls::client_config(&lbd.dir.join("pki/ca.pem"), None)?,
    };
    let n = case.plan.control_clients;
    let sources: Vec<IpAddr> = (1..=SOURCES)
        .map(|i| IpAddr::from([127, 0, 2, i]))
        .collect();
    let tcp = SocketAddr::from(([127, 0, 0, 1], port));
    let mut rows = Vec::new();
    for reconnect in [false, true] {
        let floods = [
            Flood::start(Dest::Unix(lbd.socket.clone()), n, SLOW_HEAD, reconnect),
            Flood::start(Dest::Tcp(tcp, sources.clone()), n, SLOW_HELLO, reconnect),
        ];
        let until = Instant::now() + Duration::from_secs(case.plan.control_seconds);
        let (unix, tls) = std::thread::scope(|s| {
            let unix = s.spawn(|| poll(until, || unix_status(&lbd)));
            let tls = s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                anyhow::Ok(poll(until, || {
                    rt.block_on(async {
                        tokio::time::timeout(GIVE_UP, lb_api::client::status(&target)).await
                    })??;
                    Ok(())
                }))
            });
            (unix.join(), tls.join())
        });
        let [unix_flood, tls_flood] = floods.map(Flood::end);
        let unix = unix.map_err(|_| anyhow::anyhow!("the unix poller panicked"))?;
        let tls = tls.map_err(|_| anyhow::anyhow!("the TLS poller panicked"))??;
        let panics = lbd.panics();
        let how = if reconnect {
            ", reconnecting when closed"
        } else {
            ""
        };
        rows.push(row(
            case,
            &format!("unix socket{how}"),
            n,
            &unix,
            unix_flood,
            &panics,
        ));
        rows.push(row(
            case,
            &format!("TLS port{how}"),
            n,
            &tls,
            tls_flood,
            &panics,
        ));
    }
    Ok(rows)
}

fn row(
    case: &Case,
    surface: &str,
    n: usize,
    polls: &[Result<f64, String>],
    flood: Count,
    panics: &[String],
) -> Row {
    let mut ms: Vec<u64> = polls
        .iter()
        .filter_map(|p| p.as_ref().ok())
        .map(|m| (m * 1e3) as u64)
        .collect();
    ms.sort_unstable();
    let errors: Vec<&String> = polls.iter().filter_map(|p| p.as_ref().err()).collect();
    let (p99, max) = (
        crate::load::quantile(&ms, 0.99) / 1e3,
        ms.last().map_or(f64::NAN, |m| *m as f64 / 1e3),
    );
    let slow = ms
        .iter()
        .filter(|&&m| m as f64 / 1e3 > TARGET.as_secs_f64() * 1e3)
        .count();
    let mut row = case.row(format!("{n} slow and idle control clients, {surface}"));
    row.load = format!(
        "authorised GET /v1/status every {} ms for {} s: {} requests",
        EVERY.as_millis(),
        case.plan.control_seconds,
        polls.len()
    );
    row.faults = format!(
        "{n} connections ({} idle, {} trickling 1 byte/100 ms): {} opened, {} closed by lbd, {} reopened, {} connects failed",
        n - n / 2,
        n / 2,
        flood.opened,
        flood.closed,
        flood.reopened,
        flood.failed
    );
    row.failures = match errors.first() {
        None => "0".into(),
        Some(e) => format!("{} (first: {e})", errors.len()),
    };
    row.lost = format!("authorised requests: p99 {p99:.1} ms, max {max:.1} ms, {slow} over 1 s");
    row.expected = "every authorised request served within 1 s".into();
    row.verdict =
        Verdict::of(errors.is_empty() && slow == 0 && !ms.is_empty() && panics.is_empty());
    row.figures = json!({
        "requests": polls.len(), "errors": errors, "p99_ms": p99, "max_ms": max, "over_1s": slow,
        "flood": { "clients": n, "opened": flood.opened, "closed": flood.closed, "reopened": flood.reopened, "failed": flood.failed },
        "panics": panics,
    });
    row
}
