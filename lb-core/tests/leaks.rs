//! Descriptors come back: connections, UDP flows and removed listeners
//! leave no open socket behind, on either engine. (io_uring keeps a socket
//! open while an operation on it is in flight, so this is not a given.)
//! One test in its own binary, so no other test opens descriptors meanwhile.

mod common;

use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::*;
use lb_config::EngineChoice;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn scenario(engine: EngineChoice) {
    let tcp_backend = TestBackend::start("127.0.0.2", Behavior::Echo);
    let udp_backend = UdpSocket::bind("127.0.0.3:0").unwrap();
    let udp_addr = udp_backend.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        udp_backend
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = udp_backend.recv_from(&mut buf) {
            if &buf[..n] == b"quit" {
                return;
            }
            let _ = udp_backend.send_to(&buf[..n], from);
        }
    });
    let config = |with_extra: bool| {
        let mut c = format!(
            "[admin]\nmetrics = \"off\"\ncontrol_socket = \"off\"\n{}{}",
            listener_toml(
                "tcp",
                "127.0.0.70:0",
                "idle_timeout = \"300ms\"",
                &[tcp_backend.addr],
                "kind = \"none\""
            ),
            listener_toml(
                "udp",
                "127.0.0.71:0",
                "protocol = \"udp\"\nidle_timeout = \"300ms\"",
                &[udp_addr],
                "kind = \"none\""
            )
        );
        if with_extra {
            c.push_str(&listener_toml(
                "extra",
                "127.0.0.72:0",
                "",
                &[tcp_backend.addr],
                "kind = \"none\"",
            ));
        }
        lb_config::parse_config(&c).unwrap()
    };
    let lbd = lb_core::Server::start(
        &config(false),
        &lb_core::Options {
            engine: Some(engine),
            workers: Some(2),
        },
    )
    .unwrap();
    let tcp: SocketAddr = lbd.bound_addr("tcp").unwrap();
    let udp: SocketAddr = lbd.bound_addr("udp").unwrap();
    // Settle, then take the baseline (worker rings, probers, listeners).
    roundtrip(tcp).unwrap();
    eventually(Duration::from_secs(5), "first connection closed", || {
        metric(
            &lbd.metrics_text(),
            "weir_connections_active{listener=\"tcp\"}",
        ) == Some(0.0)
    });
    let baseline = open_fds();

    for _ in 0..100 {
        roundtrip(tcp).unwrap();
    }
    // Connections the idle timeout closes (reads still in flight).
    let idle: Vec<_> = (0..20).map(|_| connect_from(None, tcp).unwrap()).collect();
    for mut s in idle {
        let mut b = [0u8; 256];
        while s.read(&mut b).is_ok_and(|n| n > 0) {}
    }
    // UDP flows that expire.
    for _ in 0..50 {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.send_to(b"ping", udp).unwrap();
        let mut b = [0u8; 16];
        c.recv_from(&mut b).unwrap();
    }
    // A listener added and removed.
    lbd.reload(&config(true)).unwrap();
    roundtrip(lbd.bound_addr("extra").unwrap()).unwrap();
    lbd.reload(&config(false)).unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open_fds() > baseline {
        if std::time::Instant::now() > deadline {
            let links: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| format!("{:?}", std::fs::read_link(e.path()).unwrap_or_default()))
                .collect();
            panic!(
                "{engine:?}: {} descriptors open, baseline {baseline}: {links:?}",
                open_fds()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let quit = UdpSocket::bind("127.0.0.1:0").unwrap();
    quit.send_to(b"quit", udp_addr).unwrap();
    echo.join().unwrap();
}

#[test]
fn descriptors_come_back_on_both_engines() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    scenario(EngineChoice::Epoll);
    scenario(EngineChoice::IoUring);
}
