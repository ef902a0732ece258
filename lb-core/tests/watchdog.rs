//! The systemd watchdog as `lbd` feeds it: `WATCHDOG=1` over
//! `$NOTIFY_SOCKET` at half of `WATCHDOG_USEC`, only when systemd asked
//! for it, and only while its workers answer.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LBD: &str = env!("CARGO_BIN_EXE_lbd");

struct Lbd(Child);

impl Drop for Lbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A notification socket and an `lbd` (one listener, two workers) that
/// reports to it, with the watchdog environment `env`.
fn lbd_with(tag: &str, env: &[(&str, String)]) -> (Lbd, UnixDatagram, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("weir-watchdog-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let backend = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let file = dir.join("lbd.toml");
    std::fs::write(
        &file,
        format!(
            "[admin]\nmetrics = \"off\"\ncontrol_socket = \"off\"\n\n{}",
            listener_toml(
                "web",
                "127.0.0.25:0",
                "",
                &[backend.local_addr().unwrap()],
                "kind = \"none\""
            )
        ),
    )
    .unwrap();
    let mut cmd = Command::new(LBD);
    cmd.args(["run", "--config"])
        .arg(&file)
        .args(["--workers", "2"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("LBD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let lbd = Lbd(cmd.spawn().expect("spawn lbd"));
    (lbd, sock, dir)
}

fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn stop(lbd: &mut Lbd) {
    let ok = Command::new("kill")
        .args(["-TERM", &lbd.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let deadline = Instant::now() + Duration::from_secs(10);
    while lbd.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "lbd did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn lbd_feeds_the_watchdog_at_half_its_timeout() {
    // 400 ms: WATCHDOG=1 every 200 ms.
    let (mut lbd, sock, dir) = lbd_with("feed", &[("WATCHDOG_USEC", "400000".into())]);
    assert_eq!(next(&sock), "READY=1");
    let start = Instant::now();
    for _ in 0..5 {
        assert_eq!(next(&sock), "WATCHDOG=1");
    }
    // Five in about 0.8 s (the first comes at once); far fewer than five
    // in 10 s would have failed above, far more would be a busy loop.
    assert!(
        start.elapsed() >= Duration::from_millis(600),
        "fed too often: 5 in {:?}",
        start.elapsed()
    );
    stop(&mut lbd);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn lbd_leaves_a_watchdog_meant_for_another_process_alone() {
    // WATCHDOG_PID names another process (pid 1): nothing to feed, so the
    // notification after READY=1 is the STOPPING=1 of the stop.
    let (mut lbd, sock, dir) = lbd_with(
        "other",
        &[
            ("WATCHDOG_USEC", "100000".into()),
            ("WATCHDOG_PID", "1".into()),
        ],
    );
    assert_eq!(next(&sock), "READY=1");
    // Long enough for several ticks of a watchdog fed by mistake.
    quiet_for(&sock, Duration::from_millis(300));
    stop(&mut lbd);
    assert_eq!(next(&sock), "STOPPING=1");
    let _ = std::fs::remove_dir_all(dir);
}

/// Asserts that nothing arrives on `sock` for `quiet`.
fn quiet_for(sock: &UnixDatagram, quiet: Duration) {
    sock.set_read_timeout(Some(quiet)).unwrap();
    let mut buf = [0u8; 256];
    match sock.recv(&mut buf) {
        Ok(n) => panic!(
            "unexpected notification: {}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{e}"
        ),
    }
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
}

#[test]
fn workers_answer_while_the_server_runs() {
    let backend = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let toml = listener_toml(
        "web",
        "127.0.0.26:0",
        "",
        &[backend.local_addr().unwrap()],
        "kind = \"none\"",
    );
    let server = start_lbd(&toml, lb_config::EngineChoice::Epoll);
    let liveness = server.liveness();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert!(rt.block_on(liveness.workers_answer(Duration::from_secs(5))));
    drop(server);
    assert!(
        !rt.block_on(liveness.workers_answer(Duration::from_secs(5))),
        "a stopped server is not alive"
    );
}
