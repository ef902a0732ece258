//! The `lbd` binary as operators run it: subprocesses, signals, files,
//! systemd notifications.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const LBD: &str = env!("CARGO_BIN_EXE_lbd");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "lbd did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn config_text(
    bind: SocketAddr,
    metrics: SocketAddr,
    backends: &[SocketAddr],
    drain: &str,
) -> String {
    let extra = format!("balance = \"round_robin\"\ndrain_timeout = \"{drain}\"");
    format!(
        "[admin]\nmetrics = \"{metrics}\"\ncontrol_socket = \"off\"\n\n{}",
        listener_toml(
            "web",
            &bind.to_string(),
            &extra,
            backends,
            "kind = \"tcp\"\ninterval = \"200ms\""
        )
    )
}

fn spawn_lbd(file: &std::path::Path, engine: &str, notify: Option<&std::path::Path>) -> Proc {
    let mut cmd = Command::new(LBD);
    cmd.args(["run", "--config"])
        .arg(file)
        .args(["--engine", engine, "--workers", "2"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    cmd.env("LBD_LOG", "warn");
    if let Some(n) = notify {
        cmd.env("NOTIFY_SOCKET", n);
    }
    Proc(cmd.spawn().expect("spawn lbd"))
}

/// SIGHUP 50 times, alternating backend sets, while a client loop runs:
/// no connection fails and an established connection lives through it all.
fn reload_under_load(engine: &str) {
    let b = three_echo_backends();
    let bind: SocketAddr = free_addr("127.0.0.20");
    let metrics: SocketAddr = free_addr("127.0.0.21");
    let dir = temp_dir(&format!("reload-{engine}"));
    let file = dir.join("lbd.toml");
    let sets = [
        vec![b[0].addr, b[1].addr],
        vec![b[1].addr, b[2].addr],
        vec![b[0].addr, b[1].addr, b[2].addr],
    ];
    // Long drain: backends removed by one reload come back in a later one.
    std::fs::write(&file, config_text(bind, metrics, &sets[2], "10m")).unwrap();
    let mut lbd = spawn_lbd(&file, engine, None);
    eventually(Duration::from_secs(10), "lbd ready", || {
        admin_get(metrics, "/readyz").is_some_and(|r| r.contains("200 OK"))
    });

    // An established connection that must survive every reload.
    let mut long = connect_from(None, bind).unwrap();
    let mut line = String::new();
    BufReader::new(long.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match roundtrip(bind) {
                        Ok(_) => done.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            failures.push(e.to_string());
                            0
                        }
                    };
                }
                failures
            })
        })
        .collect();
    for i in 0..50 {
        std::fs::write(&file, config_text(bind, metrics, &sets[i % 3], "10m")).unwrap();
        let before = done.load(Ordering::SeqCst);
        signal(&lbd.0, "HUP");
        let want = format!("weir_config_reloads_total{{result=\"applied\"}} {}", i + 1);
        eventually(Duration::from_secs(10), "reload applied", || {
            admin_get(metrics, "/metrics").is_some_and(|m| m.contains(&want))
        });
        // Traffic keeps flowing between reloads.
        eventually(Duration::from_secs(10), "clients progress", || {
            done.load(Ordering::SeqCst) > before + 5
        });
    }
    stop.store(true, Ordering::SeqCst);
    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed connections out of {}: {:?}",
        failures.len(),
        done.load(Ordering::SeqCst),
        &failures[..failures.len().min(5)]
    );
    assert!(done.load(Ordering::SeqCst) > 250);
    long.write_all(b"alive").unwrap();
    let mut echo = [0u8; 5];
    long.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"alive");

    // An invalid file is rejected; the listener keeps serving.
    std::fs::write(&file, "[[listener]]\nname = 1\n").unwrap();
    signal(&lbd.0, "HUP");
    eventually(Duration::from_secs(10), "reload rejected", || {
        admin_get(metrics, "/metrics")
            .is_some_and(|m| m.contains("weir_config_reloads_total{result=\"rejected\"} 1"))
    });
    roundtrip(bind).unwrap();

    // SIGTERM: stop accepting, let the open connection finish, exit 0.
    signal(&lbd.0, "TERM");
    eventually(Duration::from_secs(10), "listener closed", || {
        std::net::TcpStream::connect(bind).is_err()
    });
    long.write_all(b"drain").unwrap();
    long.read_exact(&mut echo).unwrap();
    assert_eq!(
        &echo, b"drain",
        "an open connection keeps working while lbd drains"
    );
    long.shutdown(std::net::Shutdown::Write).unwrap();
    let status = wait_exit(&mut lbd.0, Duration::from_secs(20));
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn reload_under_load_epoll() {
    reload_under_load("epoll");
}

#[test]
fn reload_under_load_io_uring() {
    reload_under_load("io_uring");
}

/// The signals a process catches (`SigCgt` in `/proc/<pid>/status`), as a
/// mask with bit `n - 1` for signal `n`.
/// 200 sequential TCP round trips on one connection, and 200 sequential
/// UDP exchanges, through the `lbd` binary with one worker: every message
/// reaches a sleeping worker, so a late wake-up shows as milliseconds per
/// trip. Each set takes about 30 ms on a healthy engine; the bound is 2 s
/// (a guard against lost or late wake-ups, not a performance assertion).
fn sequential_round_trips_through_the_binary(engine: &str) {
    let tcp_backend = TestBackend::start("127.0.0.2", Behavior::Echo);
    let udp_backend = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    udp_backend
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let udp_addr = udp_backend.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((n, from)) = udp_backend.recv_from(&mut buf) {
                    let _ = udp_backend.send_to(&buf[..n], from);
                }
            }
        })
    };
    let tcp_bind: SocketAddr = free_addr("127.0.0.23");
    let udp_bind: SocketAddr = "127.0.0.23:0".parse().unwrap();
    let udp_port = std::net::UdpSocket::bind(udp_bind)
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let udp_bind = SocketAddr::new(udp_bind.ip(), udp_port);
    let dir = temp_dir(&format!("prompt-{engine}"));
    let file = dir.join("lbd.toml");
    let none = "kind = \"none\"";
    std::fs::write(
        &file,
        format!(
            "[admin]\nmetrics = \"off\"\ncontrol_socket = \"off\"\n{}{}",
            listener_toml("t", &tcp_bind.to_string(), "", &[tcp_backend.addr], none),
            listener_toml(
                "u",
                &udp_bind.to_string(),
                "protocol = \"udp\"",
                &[udp_addr],
                none
            ),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(LBD);
    cmd.args(["run", "--config"])
        .arg(&file)
        .args(["--engine", engine, "--workers", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _lbd = Proc(cmd.spawn().expect("spawn lbd"));
    let mut conn = None;
    eventually(Duration::from_secs(10), "lbd accepts", || {
        conn = connect_from(None, tcp_bind).ok();
        conn.is_some()
    });
    let s = conn.unwrap();
    s.set_nodelay(true).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let started = Instant::now();
    for i in 0..200u32 {
        let request = format!("request {i:05}\n");
        (&s).write_all(request.as_bytes()).unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, request);
    }
    let tcp = started.elapsed();
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    let started = Instant::now();
    for i in 0..200u32 {
        let request = format!("datagram {i:05}");
        client.send_to(request.as_bytes(), udp_bind).unwrap();
        let (n, _) = client.recv_from(&mut buf).expect("a reply");
        assert_eq!(&buf[..n], request.as_bytes());
    }
    let udp = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    echo.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        tcp < Duration::from_secs(2) && udp < Duration::from_secs(2),
        "{engine}: 200 TCP round trips took {tcp:?}, 200 UDP exchanges {udp:?}: late wake-ups"
    );
}

#[test]
fn sequential_round_trips_through_the_binary_epoll() {
    sequential_round_trips_through_the_binary("epoll");
}

#[test]
fn sequential_round_trips_through_the_binary_io_uring() {
    sequential_round_trips_through_the_binary("io_uring");
}

fn caught_signals(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

#[test]
fn systemd_notifications() {
    let b = TestBackend::start("127.0.0.2", Behavior::Echo);
    let dir = temp_dir("notify");
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Fill the socket's queue, so that lbd blocks in sending READY=1 until
    // the fillers are read: the signals it catches while it waits there
    // are the ones a `systemctl reload` or `stop` sent the moment it is
    // ready would meet.
    let filler = UnixDatagram::unbound().unwrap();
    filler.set_nonblocking(true).unwrap();
    let mut fillers = 0;
    while filler.send_to(b"filler", &sock_path).is_ok() {
        fillers += 1;
        assert!(fillers < 100_000, "the queue never filled");
    }
    let bind: SocketAddr = free_addr("127.0.0.22");
    // Its own address: two free ports asked of one address can be the same.
    let metrics: SocketAddr = free_addr("127.0.0.24");
    let file = dir.join("lbd.toml");
    std::fs::write(&file, config_text(bind, metrics, &[b.addr], "1s")).unwrap();
    let mut lbd = spawn_lbd(&file, "auto", Some(&sock_path));
    let next = || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // SIGHUP (1), SIGINT (2) and SIGTERM (15) are caught while READY=1
    // cannot have been sent yet: one that came between READY=1 and its
    // handler would take the default action, which ends the process.
    let handled = 1 << 0 | 1 << 1 | 1 << 14;
    eventually(
        Duration::from_secs(10),
        "SIGHUP, SIGINT and SIGTERM caught before READY=1",
        || caught_signals(lbd.0.id()) & handled == handled,
    );
    for _ in 0..fillers {
        assert_eq!(next(), "filler");
    }
    assert_eq!(next(), "READY=1");
    signal(&lbd.0, "HUP");
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next(), "READY=1");
    signal(&lbd.0, "TERM");
    assert_eq!(next(), "STOPPING=1");
    assert!(wait_exit(&mut lbd.0, Duration::from_secs(10)).success());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_config_reports_every_error_and_exit_code() {
    let dir = temp_dir("check");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[listener]]\nname = \"a\"\nbind = \"x\"\n[listener.health]\nrise = 0\n",
    )
    .unwrap();
    let out = Command::new(LBD)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3: listener[0].bind"), "{err}");
    assert!(err.contains("line 5: listener[0].health.rise"), "{err}");
    assert!(err.contains("2 error(s)"), "{err}");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/examples/lbd.toml");
    let out = Command::new(LBD)
        .args(["check-config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "the example earns no warning");
    // A setting that takes no effect is a warning: the file still passes.
    let unused = dir.join("unused.toml");
    std::fs::write(
        &unused,
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n[listener.health]\npath = \"/ready\"\n",
    )
    .unwrap();
    let out = Command::new(LBD)
        .arg("check-config")
        .arg(&unused)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: line 5: listener[0].health.path: has no effect"),
        "{err}"
    );
    // `lbd apply` names the field of a wrongly typed value, in either form,
    // before it reaches any lbd.
    for (name, text, path) in [
        (
            "state.json",
            r#"{"version": 2, "listeners": [{"name": "a", "bind": "127.0.0.1:80",
                "backends": [{"addr": "127.0.0.2:80", "weight": "2"}]}]}"#,
            "listeners[0].backends[0].weight",
        ),
        (
            "state.toml",
            "version = 2\n[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\nbackends = [{ addr = \"127.0.0.2:80\", weight = \"2\" }]\n",
            "line 5: listener[0].backends[0].weight",
        ),
    ] {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        let out = Command::new(LBD)
            .arg("apply")
            .arg(&file)
            .arg("--socket")
            .arg(dir.join("nobody.sock"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(path), "{name}: {err}");
    }
    let out = Command::new(LBD)
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "run refuses an invalid file");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn demo_serves_named_backends() {
    let listen = format!("127.0.0.23:{}", free_port("127.0.0.23"));
    let metrics = format!("127.0.0.25:{}", free_port("127.0.0.25"));
    let mut child = Proc(
        Command::new(LBD)
            .args(["demo", "--listen", &listen, "--metrics", &metrics])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut printed = String::new();
    while !printed.contains("Ctrl-C") {
        assert!(
            out.read_line(&mut printed).unwrap() > 0,
            "demo exited: {printed}"
        );
    }
    assert!(
        printed.contains(&format!("curl -s http://{listen}/")),
        "{printed}"
    );
    // Not on PATH here: the status command names this very binary (as the
    // kernel resolves it), or `lbd` where that one is first on PATH.
    let exe = std::fs::canonicalize(LBD).unwrap();
    assert!(
        printed.contains(&format!("{} status --socket", exe.display()))
            || printed.contains("  status:  lbd status --socket"),
        "{printed}"
    );
    assert!(!printed.contains("is in use"), "given addresses: {printed}");
    let addr: SocketAddr = listen.parse().unwrap();
    let mut names = std::collections::HashSet::new();
    for _ in 0..6 {
        let mut s = connect_from(None, addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        let line = body.lines().last().unwrap().to_owned();
        assert!(line.starts_with("Hello from weir demo backend-"), "{line}");
        names.insert(line);
    }
    assert_eq!(names.len(), 3, "round robin over three backends: {names:?}");
    signal(&child.0, "INT");
    assert!(wait_exit(&mut child.0, Duration::from_secs(10)).success());
}

/// A metrics address that is taken is named as such, and the demo stops.
#[test]
fn demo_names_a_taken_metrics_address() {
    let listen = format!("127.0.0.23:{}", free_port("127.0.0.23"));
    let taken = std::net::TcpListener::bind("127.0.0.25:0").unwrap();
    let metrics = taken.local_addr().unwrap().to_string();
    let out = Command::new(LBD)
        .args(["demo", "--listen", &listen, "--metrics", &metrics])
        .env("LBD_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("--metrics {metrics}")), "{err}");
    assert!(
        !err.contains(&listen),
        "the listen address is not to blame: {err}"
    );
}

/// `lbd run` under `prlimit --nofile=LIMIT:LIMIT` with `config`; the child
/// and its stderr file.
fn spawn_limited(limit: u64, config: &str, tag: &str) -> (Proc, std::path::PathBuf) {
    let dir = temp_dir(tag);
    let file = dir.join("lbd.toml");
    std::fs::write(&file, config).unwrap();
    let stderr = dir.join("stderr");
    let child = Command::new("prlimit")
        .arg(format!("--nofile={limit}:{limit}"))
        .arg(LBD)
        .args(["run", "--engine", "epoll", "--workers", "1", "--config"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("prlimit runs lbd (util-linux)");
    (Proc(child), stderr)
}

/// A derived connection cap below 64 refuses to start and says what to
/// raise; one below 1,024 starts with a warning saying why.
#[test]
fn descriptor_limits_refuse_or_warn_at_start() {
    let config = "[admin]\nmetrics = \"off\"\ncontrol_socket = \"off\"\n";
    let (mut lbd, stderr) = spawn_limited(256, config, "nofile-256");
    let status = wait_exit(&mut lbd.0, Duration::from_secs(20));
    let text = std::fs::read_to_string(&stderr).unwrap();
    assert!(!status.success(), "started under 256 descriptors: {text}");
    assert!(text.contains("LimitNOFILE"), "{text}");
    let (mut lbd, stderr) = spawn_limited(1200, config, "nofile-1200");
    eventually(Duration::from_secs(10), "the warning", || {
        std::fs::read_to_string(&stderr).is_ok_and(|t| t.contains("at most"))
    });
    assert!(lbd.0.try_wait().unwrap().is_none(), "it runs");
    signal(&lbd.0, "TERM");
    wait_exit(&mut lbd.0, Duration::from_secs(20));
}

/// Running out of descriptors is this host's problem, not the backend's:
/// a connect that fails with EMFILE is counted as `local`, never marks the
/// backend down, and new connections are served as soon as descriptors are
/// free again.
///
/// To make the connect (not the accept) fail, the test brings lbd to
/// exactly one free descriptor (counting /proc/<pid>/fd under a known
/// limit): the next connection's accept takes it, and its connect has
/// none.
#[test]
fn running_out_of_descriptors_is_no_evidence_against_backends() {
    const LIMIT: usize = 420;
    let backend = TestBackend::start("127.0.0.2", Behavior::Echo);
    let bind: SocketAddr = free_addr("127.0.0.24");
    let metrics: SocketAddr = free_addr("127.0.0.25");
    let config = format!(
        "[runtime]\nmax_connections = 5000\n[admin]\nmetrics = \"{metrics}\"\ncontrol_socket = \"off\"\n{}",
        listener_toml(
            "web",
            &bind.to_string(),
            "",
            &[backend.addr],
            // One check at start, none during the test (it would take a
            // descriptor); passive evidence alone could mark it down.
            "kind = \"tcp\"\ninterval = \"60s\"\nrise = 1\nfall = 1"
        )
    );
    let (mut lbd, _stderr) = spawn_limited(LIMIT as u64, &config, "emfile");
    eventually(Duration::from_secs(10), "lbd ready", || {
        admin_get(metrics, "/readyz").is_some_and(|r| r.contains("200 OK"))
    });
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", lbd.0.id())).map_or(0, |d| d.count());
    // Proxied connections (each seen to reach the backend) until no pair
    // of descriptors is left.
    let proxied = || -> Option<std::net::TcpStream> {
        let s = connect_from(None, bind).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut line = String::new();
        BufReader::new(s.try_clone().ok()?)
            .read_line(&mut line)
            .ok()?;
        (!line.is_empty()).then_some(s)
    };
    let mut held = Vec::new();
    while fds() + 2 <= LIMIT {
        held.push(proxied().expect("a proxied connection while descriptors remain"));
        assert!(held.len() < LIMIT, "descriptors never ran out");
    }
    // Exactly one free: an idle connection to the metrics endpoint holds
    // one of lbd's descriptors for the endpoint's head timeout.
    let mut idle = None;
    if fds() == LIMIT {
        drop(held.pop());
        eventually(Duration::from_secs(5), "a pair freed", || {
            fds() == LIMIT - 2
        });
    }
    if fds() == LIMIT - 2 {
        idle = Some(std::net::TcpStream::connect(metrics).unwrap());
        eventually(Duration::from_secs(2), "the idle one accepted", || {
            fds() == LIMIT - 1
        });
    }
    assert_eq!(fds(), LIMIT - 1, "one descriptor free");
    // Accepted with the last descriptor; its connect has none: closed.
    let mut refused = connect_from(None, bind).unwrap();
    assert!(
        closed_by_peer(&mut refused),
        "a connect with no descriptor left is refused"
    );
    drop((held, idle, refused));
    eventually(Duration::from_secs(5), "descriptors freed", || {
        fds() < LIMIT / 2
    });
    let m = admin_get(metrics, "/metrics").unwrap();
    let value = |series: &str| metric(m.split_once("\r\n\r\n").map_or(&m[..], |x| x.1), series);
    let b = backend.addr;
    assert!(
        value(&format!("weir_backend_connect_errors_total{{backend=\"{b}\",listener=\"web\",reason=\"local\"}}")) >= Some(1.0),
        "counted as a local error:\n{m}"
    );
    assert!(
        value("weir_connections_rejected_total{listener=\"web\",reason=\"local_error\"}")
            >= Some(1.0),
        "the refusal's reason:\n{m}"
    );
    assert_eq!(
        value(&format!(
            "weir_backend_up{{backend=\"{b}\",listener=\"web\"}}"
        )),
        Some(1.0),
        "the backend stays up:\n{m}"
    );
    // Descriptors free again: served at once, no health check needed.
    roundtrip(bind).unwrap();
    signal(&lbd.0, "TERM");
    wait_exit(&mut lbd.0, Duration::from_secs(30));
}

/// Starts `lbd demo` with its defaults; its banner (up to "Ctrl-C").
fn start_demo() -> (Proc, String) {
    let mut child = Proc(
        Command::new(LBD)
            .arg("demo")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(child.0.stdout.take().unwrap());
    let mut printed = String::new();
    while !printed.contains("Ctrl-C") {
        assert!(
            out.read_line(&mut printed).unwrap() > 0,
            "demo exited: {printed}"
        );
    }
    (child, printed)
}

/// The URL a demo banner says to curl.
fn demo_url(banner: &str) -> SocketAddr {
    let at = banner.find("curl -s http://").expect("a URL") + "curl -s http://".len();
    let rest = &banner[at..];
    rest[..rest.find('/').unwrap()].parse().unwrap()
}

/// A second `lbd demo` does not join the first one's port (both would
/// serve half the connections): it takes the next free one and says so.
#[test]
fn a_second_demo_takes_another_port() {
    let (mut first, banner) = start_demo();
    let (mut second, other) = start_demo();
    let (a, b) = (demo_url(&banner), demo_url(&other));
    assert_ne!(a, b, "{banner}\n{other}");
    assert!(other.contains("is in use"), "{other}");
    for (addr, child) in [(a, &first), (b, &second)] {
        let pid = child.0.id();
        assert!(
            owner_of(addr).contains(&pid),
            "{addr} is served by {pid} alone: {:?}",
            owner_of(addr)
        );
    }
    signal(&first.0, "INT");
    signal(&second.0, "INT");
    wait_exit(&mut first.0, Duration::from_secs(10));
    wait_exit(&mut second.0, Duration::from_secs(10));
}

/// The pids whose sockets listen on `addr` (from /proc/net/tcp and the
/// processes' descriptors).
fn owner_of(addr: SocketAddr) -> Vec<u32> {
    let port = format!("{:04X}", addr.port());
    let inodes: Vec<String> = std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1)?.ends_with(&format!(":{port}")) && f.get(3) == Some(&"0A"))
                .then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    let mut pids = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let holds = std::fs::read_dir(p.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
            });
        if holds {
            pids.push(pid);
        }
    }
    pids
}

/// `lbd run` with a listener another lbd already serves does not start;
/// it names the other process.
#[test]
fn lbd_run_refuses_a_port_another_lbd_serves() {
    let b = TestBackend::start("127.0.0.2", Behavior::Echo);
    let bind: SocketAddr = free_addr("127.0.0.26");
    let config = format!(
        "[admin]\nmetrics = \"off\"\ncontrol_socket = \"off\"\n{}",
        listener_toml("web", &bind.to_string(), "", &[b.addr], "kind = \"none\"")
    );
    let dir = temp_dir("shared-port");
    let file = dir.join("lbd.toml");
    std::fs::write(&file, &config).unwrap();
    let mut first = spawn_lbd(&file, "epoll", None);
    eventually(Duration::from_secs(10), "the first lbd serves", || {
        roundtrip(bind).is_ok()
    });
    let out = Command::new(LBD)
        .args(["run", "--engine", "epoll", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second lbd started: {stderr}");
    assert!(stderr.contains("already served by"), "{stderr}");
    // Named once, though its two workers each hold a socket there.
    assert_eq!(
        stderr.matches(&format!("pid {}", first.0.id())).count(),
        1,
        "{stderr}"
    );
    signal(&first.0, "TERM");
    wait_exit(&mut first.0, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A thread of a process, as /proc shows it.
#[derive(Debug)]
struct ThreadView {
    name: String,
    /// Field 19 of /proc/<pid>/task/<tid>/stat.
    nice: i64,
    /// Field 41: the scheduling policy (0 normal, 5 idle).
    policy: u32,
    /// `se.slice` of /proc/<pid>/task/<tid>/sched (kernels with EEVDF).
    slice_ns: Option<u64>,
}

/// Each thread of process `pid`.
fn threads_of(pid: u32) -> Vec<ThreadView> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            // `rest` starts with field 3 (state): nice is field 19.
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let nice = fields.get(16)?.parse().ok()?;
            // Field 41: the scheduling policy (0 normal, 5 idle).
            let policy = fields.get(38)?.parse().ok()?;
            let sched = std::fs::read_to_string(t.path().join("sched")).unwrap_or_default();
            let slice_ns = sched.lines().find_map(|l| {
                let (key, value) = l.split_once(':')?;
                (key.trim() == "se.slice").then(|| value.trim().parse().ok())?
            });
            Some(ThreadView {
                name,
                nice,
                policy,
                slice_ns,
            })
        })
        .collect()
}

/// The running kernel's (major, minor) version.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The control runtime (health checks, timers, reloads) runs below the
/// forwarding workers' priority and with the scheduler's shortest slice;
/// the admin runtime (the control API, applies, the metrics endpoint) at
/// idle priority, where this process may raise it back (as root here).
/// `lb-bench listeners`, p99 on an untouched listener during back-to-back
/// applies of 2,000 listeners: 3.46 ms before the niceness, 1.0-2.5 ms
/// with the control priority, within the idle run's noise at idle priority.
#[test]
fn the_control_runtime_runs_below_the_workers_priority() {
    let b = TestBackend::start("127.0.0.2", Behavior::Echo);
    let dir = temp_dir("nice");
    let bind: SocketAddr = free_addr("127.0.0.26");
    let metrics: SocketAddr = free_addr("127.0.0.27");
    let file = dir.join("lbd.toml");
    std::fs::write(&file, config_text(bind, metrics, &[b.addr], "1s")).unwrap();
    let lbd = spawn_lbd(&file, "epoll", None);
    eventually(Duration::from_secs(10), "lbd ready", || {
        admin_get(metrics, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    });
    let pid = lbd.0.id();
    let threads = threads_of(pid);
    // Idle priority where lbd may raise a thread back: root may. The
    // guard raises the admin threads for 10 s when their heartbeat is
    // late (a loaded machine); they come down again after.
    let admin_idle = || {
        let admin: Vec<_> = threads_of(pid)
            .into_iter()
            .filter(|t| t.name == "lbd-admin")
            .collect();
        !admin.is_empty() && admin.iter().all(|t| t.policy == 5)
    };
    let root = rustix::process::geteuid().is_root();
    if root {
        eventually(
            Duration::from_secs(30),
            "admin threads at idle priority",
            admin_idle,
        );
    }
    drop(lbd);
    let _ = std::fs::remove_dir_all(dir);
    let admin: Vec<_> = threads.iter().filter(|t| t.name == "lbd-admin").collect();
    assert!(root || admin.iter().all(|t| t.policy == 0), "{threads:?}");
    let control: Vec<_> = threads.iter().filter(|t| t.name == "lbd-control").collect();
    let workers: Vec<_> = threads
        .iter()
        .filter(|t| t.name.starts_with("lbd-worker"))
        .collect();
    assert!(!control.is_empty() && workers.len() == 2, "{threads:?}");
    // lbd inherits the test's niceness (`nice cargo test`): relative to it.
    let base = threads.iter().find(|t| t.name == "lbd").unwrap().nice;
    let expected = (base + 10).min(19);
    assert!(
        control.iter().all(|t| t.nice == expected && t.policy == 0),
        "{threads:?}"
    );
    assert!(
        !admin.is_empty() && admin.iter().all(|t| t.nice == expected),
        "{threads:?}"
    );
    assert!(workers.iter().all(|t| t.nice == base), "{threads:?}");
    assert!(base == 19 || expected > base, "{threads:?}");
    // Custom slices came with Linux 6.12; before, every thread has the
    // default one and only the niceness applies.
    if kernel_version() >= (6, 12) {
        assert!(
            control.iter().all(|t| t.slice_ns == Some(100_000)),
            "{threads:?}"
        );
        assert!(
            workers.iter().all(|t| t.slice_ns > Some(100_000)),
            "{threads:?}"
        );
    }
}
