//! `deploy/systemd/lbd.service` filters system calls (`SystemCallFilter=`,
//! with `SystemCallErrorNumber=EPERM` for the rest). A call lbd makes that
//! the filter refuses fails quietly in production, as `setpriority` and
//! `sched_setattr` did: the control and admin threads ran at the workers'
//! priority under the unit. So every call `lbd` makes on either engine,
//! serving TCP and UDP, probing, applying a state, answering status and
//! metrics, reloading and stopping, is checked against the unit's filter.
//! Needs `strace` and `systemd-analyze` (both installed by `.ci/run`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const LBD: &str = env!("CARGO_BIN_EXE_lbd");

fn have(program: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!(
            "{program} is not installed: the unit's filter is not checked (.ci/run installs it)"
        );
    }
    found
}

/// The calls of a group (`@name`, expanded through nested groups) or the
/// call itself, as systemd-analyze of this host lists them.
fn expand(spec: &str, groups: &mut BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    if !spec.starts_with('@') {
        return BTreeSet::from([spec.to_owned()]);
    }
    if let Some(known) = groups.get(spec) {
        return known.clone();
    }
    let out = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", spec])
        .output()
        .expect("systemd-analyze");
    assert!(
        out.status.success(),
        "systemd-analyze syscall-filter {spec}"
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut calls = BTreeSet::new();
    // The first line names the group; then one member per indented line,
    // comments after '#'.
    for line in text.lines().skip(1) {
        let member = line.trim();
        if member.is_empty() || member.starts_with('#') {
            continue;
        }
        calls.extend(expand(member, groups));
    }
    groups.insert(spec.to_owned(), calls.clone());
    calls
}

/// What the unit's `SystemCallFilter=` lines let through: the first line
/// is an allow list (everything else refused), later ones add to it or,
/// with `~`, take from it (systemd.exec(5)).
fn allowed_by(unit: &str) -> BTreeSet<String> {
    let mut groups = BTreeMap::new();
    let mut allowed = BTreeSet::new();
    let lines = unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="));
    for (i, line) in lines.enumerate() {
        let (deny, list) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        assert!(
            i > 0 || !deny,
            "the first SystemCallFilter= line is an allow list"
        );
        for spec in list.split_whitespace() {
            let calls = expand(spec, &mut groups);
            if deny {
                allowed.retain(|c| !calls.contains(c));
            } else {
                allowed.extend(calls);
            }
        }
    }
    allowed
}

/// The calls in an `strace -c` summary: the last column of the table's
/// rows. strace may write other lines into the same file (a thread it
/// detached from in the middle of a call ends as `<detached ...>` or
/// `<unfinished ...>`), so only a line shaped like a row counts: a share
/// and a time, then a call's name.
fn calls_in_summary(text: &str) -> BTreeSet<String> {
    let is_name = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let row = fields.len() >= 5
                && fields[0].parse::<f64>().is_ok()
                && fields[1].parse::<f64>().is_ok();
            let name = *fields.last()?;
            (row && is_name(name) && name != "total").then(|| name.to_owned())
        })
        .collect()
}

/// A UDP echo server on `ip` until `stop`.
fn udp_echo(ip: &str, stop: Arc<AtomicBool>) -> SocketAddr {
    let socket = UdpSocket::bind((ip, 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::SeqCst) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        }
    });
    addr
}

/// Runs `lbd` on `engine` under `strace -f -c` through everything it does
/// in a life, and returns the calls it made.
fn calls_made(engine: &str, dir: &Path) -> BTreeSet<String> {
    let stop = Arc::new(AtomicBool::new(false));
    let backend = TestBackend::start("127.0.0.2", Behavior::Echo);
    let udp_backend = udp_echo("127.0.0.2", stop.clone());
    let tcp_bind = free_addr("127.0.0.41");
    let udp_bind = {
        let probe = UdpSocket::bind("127.0.0.41:0").unwrap();
        probe.local_addr().unwrap()
    };
    let metrics = free_addr("127.0.0.42");
    let socket = dir.join("control.sock");
    let file = dir.join("lbd.toml");
    let tcp_check = "kind = \"tcp\"\ninterval = \"200ms\"";
    let config = format!(
        "[admin]\nmetrics = \"{metrics}\"\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n\n{}{}",
        socket.display(),
        dir.join("state").display(),
        listener_toml("t", &tcp_bind.to_string(), "", &[backend.addr], tcp_check),
        listener_toml(
            "u",
            &udp_bind.to_string(),
            "protocol = \"udp\"",
            &[udp_backend],
            "kind = \"none\""
        ),
    );
    std::fs::write(&file, &config).unwrap();
    let summary = dir.join("strace.txt");
    let mut lbd = Command::new("strace")
        .args(["-f", "-qq", "-c", "-o"])
        .arg(&summary)
        .arg(LBD)
        .args(["run", "--config"])
        .arg(&file)
        .args(["--engine", engine, "--workers", "2"])
        .env("LBD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace");
    let lbd_cli = |args: &[&str]| {
        Command::new(LBD)
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // Ready: listeners, the control socket and the admin endpoint are up.
    eventually(Duration::from_secs(30), "lbd ready under strace", || {
        admin_get(metrics, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    });
    assert!(roundtrip(tcp_bind).is_ok_and(|name| name == backend.name));
    // UDP both ways.
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    eventually(Duration::from_secs(10), "a UDP echo through lbd", || {
        let mut buf = [0u8; 16];
        client.send_to(b"ping", udp_bind).is_ok()
            && client
                .recv_from(&mut buf)
                .is_ok_and(|(n, _)| &buf[..n] == b"ping")
    });
    // The admin endpoint and the control API: status, and a state with a
    // new listener (bound, checked against the socket table, persisted).
    assert!(admin_get(metrics, "/metrics").is_some_and(|b| b.contains("weir_")));
    assert!(lbd_cli(&["status"]), "lbd status");
    let dynamic = free_addr("127.0.0.43");
    let state = dir.join("state.toml");
    std::fs::write(
        &state,
        format!(
            "version = 1\n{}",
            listener_toml("d", &dynamic.to_string(), "", &[backend.addr], tcp_check)
        ),
    )
    .unwrap();
    assert!(lbd_cli(&["apply", state.to_str().unwrap()]), "lbd apply");
    eventually(
        Duration::from_secs(10),
        "the applied listener serves",
        || roundtrip(dynamic).is_ok(),
    );
    // A reload, then a stop.
    let pid = lbd_pid(lbd.id());
    let signal = |sig: &str| {
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(signal("-HUP"));
    eventually(Duration::from_secs(10), "serving after the reload", || {
        roundtrip(tcp_bind).is_ok()
    });
    assert!(signal("-TERM"));
    let status = lbd.wait().unwrap();
    stop.store(true, Ordering::SeqCst);
    assert!(status.success(), "lbd under strace: {status}");
    let text = std::fs::read_to_string(&summary).unwrap();
    let calls = calls_in_summary(&text);
    assert!(!calls.is_empty(), "no calls in strace's summary:\n{text}");
    calls
}

/// The pid of strace's child, lbd.
fn lbd_pid(strace: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children"))
        .unwrap_or_default();
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("strace's child")
}

fn unit_text() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/lbd.service");
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn summary_rows_are_calls_and_nothing_else() {
    let text = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ------------------
 61.02    0.004113          12       331        17 futex
  0.00    0.000000           0         1           io_uring_setup
5093 <unfinished ...>
5094 <detached ...>
------ ----------- ----------- --------- --------- ------------------
100.00    0.006740           9       730        38 total
";
    assert_eq!(
        calls_in_summary(text),
        BTreeSet::from(["futex".to_owned(), "io_uring_setup".to_owned()])
    );
}

#[test]
fn lbd_service_lets_through_every_call_lbd_makes() {
    if !have("strace") || !have("systemd-analyze") {
        return;
    }
    let allowed = allowed_by(&unit_text());
    assert!(allowed.contains("io_uring_enter") && !allowed.contains("mount"));
    for engine in ["epoll", "io_uring"] {
        let dir = temp_dir(&format!("unit-filter-{engine}"));
        let made = calls_made(engine, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            made.contains("accept4") || made.contains("io_uring_enter"),
            "{made:?}"
        );
        let refused: Vec<_> = made.difference(&allowed).collect();
        assert!(
            refused.is_empty(),
            "lbd ({engine}) makes calls that lbd.service refuses with EPERM: {refused:?}"
        );
    }
}
