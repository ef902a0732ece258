//! UDP forwarding end to end, on both engines: real lbd, real UDP
//! backends on loopback (IPv4 and IPv6), real client sockets.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use lb_config::EngineChoice;

/// A UDP backend: answers each datagram with `name|payload`, and reports
/// what it received.
struct UdpBackend {
    addr: SocketAddr,
    name: String,
    received: mpsc::Receiver<Vec<u8>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpBackend {
    fn start(ip: &str) -> Self {
        Self::start_at(SocketAddr::new(ip.parse().unwrap(), 0))
    }

    fn start_at(addr: SocketAddr) -> Self {
        let sock = UdpSocket::bind(addr).unwrap();
        let addr = sock.local_addr().unwrap();
        let name = format!("udp-{addr}");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, received) = mpsc::channel();
        let thread = {
            let (stop, name) = (stop.clone(), name.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 70_000];
                while !stop.load(Ordering::SeqCst) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let _ = tx.send(buf[..n].to_vec());
                    let mut reply = format!("{name}|").into_bytes();
                    reply.extend_from_slice(&buf[..n.min(1000)]);
                    let _ = sock.send_to(&reply, from);
                }
            })
        };
        Self {
            addr,
            name,
            received,
            stop,
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let poke = UdpSocket::bind(SocketAddr::new(self.addr.ip(), 0)).unwrap();
        let _ = poke.send_to(b"", self.addr);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn client(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// `n` clients on `ip`, to be held together: each has its own port while
/// they live (a dropped client's port may be handed out again, and the new
/// socket would rightly find the old one's flow).
fn clients(ip: &str, n: usize) -> Vec<UdpSocket> {
    (0..n).map(|_| client(ip)).collect()
}

/// Sends `payload` to `vip` and returns (backend name, reply source).
fn ask(c: &UdpSocket, vip: SocketAddr, payload: &[u8]) -> std::io::Result<(String, SocketAddr)> {
    c.send_to(payload, vip)?;
    let mut buf = vec![0u8; 70_000];
    loop {
        let (n, from) = match c.recv_from(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let (name, echoed) = text.split_once('|').unwrap_or((&text, ""));
        let ours = payload.starts_with(echoed.as_bytes()) || echoed.as_bytes().ends_with(payload);
        assert!(ours, "reply for another request: {text:?}");
        return Ok((name.to_owned(), from));
    }
}

fn udp_listener(
    name: &str,
    bind: &str,
    extra: &str,
    backends: &[SocketAddr],
    health: &str,
) -> String {
    listener_toml(
        name,
        bind,
        &format!("protocol = \"udp\"\n{extra}"),
        backends,
        health,
    )
}

const ADMIN: &str = "[admin]\nmetrics = \"off\"\ncontrol_socket = \"off\"\n";

fn request_response_from_the_listener_address(engine: EngineChoice) {
    for (ip, vip_ip) in [("127.0.0.2", "127.0.0.60"), ("::1", "::1")] {
        let backends: Vec<UdpBackend> = (0..3)
            .map(|i| {
                UdpBackend::start(if ip == "::1" {
                    ip
                } else {
                    ["127.0.0.2", "127.0.0.3", "127.0.0.4"][i]
                })
            })
            .collect();
        let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        let bind = SocketAddr::new(vip_ip.parse().unwrap(), 0).to_string();
        let lbd = start_lbd(
            &format!(
                "{ADMIN}{}",
                udp_listener("dns", &bind, "", &addrs, "kind = \"none\"")
            ),
            engine,
        );
        let vip = lbd.bound_addr("dns").unwrap();
        let mut seen = HashSet::new();
        for c in &clients(if ip == "::1" { "::1" } else { "127.0.0.1" }, 30) {
            let (name, from) = ask(c, vip, b"question").unwrap();
            assert_eq!(
                from, vip,
                "the reply must come from the listener's address and port"
            );
            seen.insert(name);
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }
}

fn flows_stick_and_spread(engine: EngineChoice) {
    let backends: Vec<UdpBackend> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|ip| UdpBackend::start(ip))
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lbd = start_lbd(
        &format!(
            "{ADMIN}{}",
            udp_listener("u", "127.0.0.61:0", "", &addrs, "kind = \"none\"")
        ),
        engine,
    );
    let vip = lbd.bound_addr("u").unwrap();
    let mut per_client: HashMap<SocketAddr, String> = HashMap::new();
    for c in &clients("127.0.0.1", 30) {
        let first = ask(c, vip, b"a").unwrap().0;
        for i in 0..10 {
            assert_eq!(
                ask(c, vip, format!("b{i}").as_bytes()).unwrap().0,
                first,
                "a client's datagrams stay on one backend"
            );
        }
        per_client.insert(c.local_addr().unwrap(), first);
    }
    let distinct: HashSet<_> = per_client.values().collect();
    assert_eq!(distinct.len(), 3, "{per_client:?}");
    let m = lbd.metrics_text();
    assert_eq!(
        metric(&m, "weir_udp_flows_created_total{listener=\"u\"}"),
        Some(30.0),
        "{m}"
    );
    // Counters move right after the datagram is handed over: poll briefly.
    eventually(Duration::from_secs(5), "330 datagrams each way", || {
        let m = lbd.metrics_text();
        metric(
            &m,
            "weir_udp_datagrams_total{direction=\"to_backend\",listener=\"u\"}",
        ) == Some(330.0)
            && metric(
                &m,
                "weir_udp_datagrams_total{direction=\"to_client\",listener=\"u\"}",
            ) == Some(330.0)
    });
}

fn idle_expiry_and_flow_cap(engine: EngineChoice) {
    let b = UdpBackend::start("127.0.0.2");
    let lbd = start_lbd(
        &format!(
            "{ADMIN}{}",
            udp_listener(
                "u",
                "127.0.0.62:0",
                "idle_timeout = \"300ms\"\nmax_connections = 2",
                &[b.addr],
                "kind = \"none\""
            )
        ),
        engine,
    );
    let vip = lbd.bound_addr("u").unwrap();
    let (c1, c2, c3) = (
        client("127.0.0.1"),
        client("127.0.0.1"),
        client("127.0.0.1"),
    );
    ask(&c1, vip, b"1").unwrap();
    ask(&c2, vip, b"2").unwrap();
    c3.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        ask(&c3, vip, b"3").is_err(),
        "a third flow beyond the cap must be dropped"
    );
    let m = lbd.metrics_text();
    assert_eq!(
        metric(
            &m,
            "weir_udp_drops_total{listener=\"u\",reason=\"flow_limit\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "weir_udp_flows_active{listener=\"u\"}"),
        Some(2.0),
        "{m}"
    );
    eventually(Duration::from_secs(5), "idle flows expire", || {
        metric(&lbd.metrics_text(), "weir_udp_flows_active{listener=\"u\"}") == Some(0.0)
    });
    assert_eq!(
        metric(
            &lbd.metrics_text(),
            "weir_udp_flows_expired_total{listener=\"u\"}"
        ),
        Some(2.0)
    );
    c3.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    ask(&c3, vip, b"3").unwrap();
}

fn repick_when_the_backend_goes_down(engine: EngineChoice) {
    let hport = free_port("127.0.0.2");
    let (sa, sb) = (Arc::new(AtomicU16::new(200)), Arc::new(AtomicU16::new(200)));
    let _ha = TestBackend::start_at(
        format!("127.0.0.2:{hport}").parse().unwrap(),
        Behavior::Http { status: sa.clone() },
    );
    let _hb = TestBackend::start_at(
        format!("127.0.0.3:{hport}").parse().unwrap(),
        Behavior::Http { status: sb.clone() },
    );
    let (a, b) = (
        UdpBackend::start("127.0.0.2"),
        UdpBackend::start("127.0.0.3"),
    );
    let health = format!(
        "kind = \"http\"\nport = {hport}\npath = \"/\"\ninterval = \"100ms\"\nrise = 1\nfall = 1"
    );
    let lbd = start_lbd(
        &format!(
            "{ADMIN}{}",
            udp_listener("u", "127.0.0.63:0", "", &[a.addr, b.addr], &health)
        ),
        engine,
    );
    let vip = lbd.bound_addr("u").unwrap();
    let c = client("127.0.0.1");
    let first = ask(&c, vip, b"x").unwrap().0;
    let (status, first_addr, other) = if first == a.name {
        (&sa, a.addr, &b)
    } else {
        (&sb, b.addr, &a)
    };
    status.store(503, Ordering::SeqCst);
    eventually(Duration::from_secs(10), "backend marked down", || {
        backend_healthy(&lbd, "u", first_addr) == Some(false)
    });
    assert_eq!(
        ask(&c, vip, b"y").unwrap().0,
        other.name,
        "the flow moves on its next datagram"
    );
    assert_eq!(ask(&c, vip, b"z").unwrap().0, other.name);
}

fn drain_after_removal(engine: EngineChoice) {
    let (a, b) = (
        UdpBackend::start("127.0.0.2"),
        UdpBackend::start("127.0.0.3"),
    );
    let bind = format!("127.0.0.64:{}", free_port("127.0.0.64"));
    let cfg = |addrs: &[SocketAddr]| {
        format!(
            "{ADMIN}{}",
            udp_listener(
                "u",
                &bind,
                "drain_timeout = \"800ms\"",
                addrs,
                "kind = \"none\""
            )
        )
    };
    let lbd = start_lbd(&cfg(&[a.addr]), engine);
    let vip: SocketAddr = bind.parse().unwrap();
    let c = client("127.0.0.1");
    assert_eq!(ask(&c, vip, b"1").unwrap().0, a.name);
    lbd.reload(&lb_config::parse_config(&cfg(&[b.addr])).unwrap())
        .unwrap();
    assert_eq!(
        ask(&c, vip, b"2").unwrap().0,
        a.name,
        "an existing flow stays on its removed backend while draining"
    );
    assert_eq!(
        ask(&client("127.0.0.1"), vip, b"new").unwrap().0,
        b.name,
        "new flows use the new set"
    );
    eventually(Duration::from_secs(5), "the drained flow moves", || {
        ask(&c, vip, b"3").is_ok_and(|(n, _)| n == b.name)
    });
}

fn proxy_v2_dgram_header(engine: EngineChoice) {
    let b = UdpBackend::start("127.0.0.2");
    let lbd = start_lbd(
        &format!(
            "{ADMIN}{}",
            udp_listener(
                "u",
                "127.0.0.65:0",
                "proxy_protocol = \"v2\"",
                &[b.addr],
                "kind = \"none\""
            )
        ),
        engine,
    );
    let vip = lbd.bound_addr("u").unwrap();
    let c = client("127.0.0.1");
    ask(&c, vip, b"payload").unwrap();
    let got = b.received.recv_timeout(Duration::from_secs(5)).unwrap();
    let me = c.local_addr().unwrap();
    let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    want.extend_from_slice(&[0x21, 0x12, 0x00, 0x0c]);
    want.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 65]);
    want.extend_from_slice(&me.port().to_be_bytes());
    want.extend_from_slice(&vip.port().to_be_bytes());
    want.extend_from_slice(b"payload");
    assert_eq!(got, want);
}

fn flood_stays_within_the_flow_cap(engine: EngineChoice) {
    let b = UdpBackend::start("127.0.0.2");
    let lbd = start_lbd(
        &format!(
            "{ADMIN}{}",
            udp_listener(
                "u",
                "127.0.0.66:0",
                "max_connections = 50",
                &[b.addr],
                "kind = \"none\""
            )
        ),
        engine,
    );
    let vip = lbd.bound_addr("u").unwrap();
    let steady = client("127.0.0.1");
    ask(&steady, vip, b"before").unwrap();
    let flood: Vec<UdpSocket> = (0..1000)
        .map(|_| UdpSocket::bind("127.0.0.9:0").unwrap())
        .collect();
    for s in &flood {
        s.send_to(b"flood", vip).unwrap();
    }
    eventually(
        Duration::from_secs(10),
        "every flood datagram handled",
        || {
            let m = lbd.metrics_text();
            let created = metric(&m, "weir_udp_flows_created_total{listener=\"u\"}").unwrap_or(0.0);
            let dropped = metric(
                &m,
                "weir_udp_drops_total{listener=\"u\",reason=\"flow_limit\"}",
            )
            .unwrap_or(0.0);
            created + dropped >= 1001.0
        },
    );
    let m = lbd.metrics_text();
    assert_eq!(
        metric(&m, "weir_udp_flows_active{listener=\"u\"}"),
        Some(50.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "weir_udp_drops_total{listener=\"u\",reason=\"flow_limit\"}"
        ),
        Some(951.0),
        "{m}"
    );
    for i in 0..20 {
        ask(&steady, vip, format!("after{i}").as_bytes()).unwrap();
    }
}

fn oversized_datagrams_are_counted_not_cut(engine: EngineChoice) {
    let b4 = UdpBackend::start("127.0.0.2");
    let b6 = UdpBackend::start("::1");
    let lbd = start_lbd(
        &format!(
            "{ADMIN}{}{}",
            udp_listener("v4", "127.0.0.67:0", "", &[b4.addr], "kind = \"none\""),
            udp_listener("v6", "[::1]:0", "", &[b6.addr], "kind = \"none\"")
        ),
        engine,
    );
    let max = vec![7u8; 65_507];
    ask(&client("127.0.0.1"), lbd.bound_addr("v4").unwrap(), &max).unwrap();
    assert_eq!(
        b4.received
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .len(),
        65_507,
        "the largest datagram passes whole"
    );
    let c6 = client("::1");
    c6.send_to(&vec![8u8; 65_520], lbd.bound_addr("v6").unwrap())
        .unwrap();
    eventually(Duration::from_secs(5), "oversized datagram counted", || {
        metric(
            &lbd.metrics_text(),
            "weir_udp_drops_total{listener=\"v6\",reason=\"truncated\"}",
        ) == Some(1.0)
    });
    assert!(
        b6.received.try_recv().is_err(),
        "nothing reached the backend"
    );
}

/// Clients that send faster than lbd forwards: lbd takes what waits in one
/// go and sends each client's equal-sized datagrams in one segmented send.
/// Every datagram must arrive whole, once, and in its client's order, with
/// and without PROXY v2 headers.
fn bursts_arrive_whole_and_in_order(engine: EngineChoice) {
    const CLIENTS: u8 = 3;
    const BURST: u16 = 32;
    const BURSTS: u16 = 20;
    /// The bytes of datagram `seq` of `client`: id, sequence, then filler;
    /// mostly one size, with longer and shorter ones between the runs.
    fn datagram(client: u8, seq: u16) -> Vec<u8> {
        let len = match seq % 16 {
            15 => 37,
            9 => 1_200,
            _ => 200,
        };
        let mut d = vec![client, (seq >> 8) as u8, seq as u8];
        d.extend((0..len - 3).map(|i| (i as u16 ^ seq) as u8));
        d
    }
    let plain = UdpBackend::start("127.0.0.2");
    let framed = UdpBackend::start("127.0.0.3");
    // One worker: every client's datagrams meet in one socket.
    let lbd = start_lbd_workers(
        &format!(
            "{ADMIN}{}{}",
            udp_listener(
                "plain",
                "127.0.0.68:0",
                "",
                &[plain.addr],
                "kind = \"none\""
            ),
            udp_listener(
                "framed",
                "127.0.0.69:0",
                "proxy_protocol = \"v2\"",
                &[framed.addr],
                "kind = \"none\""
            )
        ),
        engine,
        1,
    );
    // The v2 header for IPv4 is 28 bytes: 16 fixed, then the addresses.
    for (backend, name, header) in [(&plain, "plain", 0), (&framed, "framed", 28)] {
        let vip = lbd.bound_addr(name).unwrap();
        let clients = clients("127.0.0.1", usize::from(CLIENTS));
        let mut got: HashMap<u8, Vec<u16>> = HashMap::new();
        for burst in 0..BURSTS {
            for i in 0..BURST {
                let seq = burst * BURST + i;
                for (id, c) in clients.iter().enumerate() {
                    c.send_to(&datagram(id as u8, seq), vip).unwrap();
                }
            }
            // The whole burst arrives before the next one is sent, so no
            // socket buffer on the way overflows.
            for _ in 0..BURST * u16::from(CLIENTS) {
                let d = backend
                    .received
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("{name}: burst {burst} incomplete: {e}"));
                let d = &d[header..];
                let (id, seq) = (d[0], u16::from_be_bytes([d[1], d[2]]));
                assert_eq!(
                    d,
                    datagram(id, seq),
                    "{name}: datagram {seq} of client {id}"
                );
                got.entry(id).or_default().push(seq);
            }
        }
        for id in 0..CLIENTS {
            let want: Vec<u16> = (0..BURSTS * BURST).collect();
            assert_eq!(got[&id], want, "{name}: client {id}'s datagrams in order");
        }
        let m = lbd.metrics_text();
        let total = f64::from(BURSTS * BURST * u16::from(CLIENTS));
        assert_eq!(
            metric(
                &m,
                &format!(
                    "weir_udp_datagrams_total{{direction=\"to_backend\",listener=\"{name}\"}}"
                )
            ),
            Some(total),
            "{m}"
        );
    }
}

/// `source_ranges` on UDP: datagrams from outside are dropped and counted
/// one by one, also when they arrive in a batch with allowed ones.
fn source_ranges_drop_and_count(engine: EngineChoice) {
    let b = UdpBackend::start("127.0.0.2");
    let lbd = start_lbd_workers(
        &format!(
            "{ADMIN}{}",
            udp_listener(
                "u",
                "127.0.0.70:0",
                "source_ranges = [\"127.0.3.0/24\"]",
                &[b.addr],
                "kind = \"none\""
            )
        ),
        engine,
        1,
    );
    let vip = lbd.bound_addr("u").unwrap();
    let (inside, outside) = (client("127.0.3.1"), client("127.0.4.1"));
    for i in 0..40u8 {
        outside.send_to(&[b'x', i], vip).unwrap();
        inside.send_to(&[b'y', i], vip).unwrap();
    }
    for i in 0..40u8 {
        let got = b.received.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(
            got,
            [b'y', i],
            "only the allowed client's datagrams, in order"
        );
    }
    eventually(
        Duration::from_secs(5),
        "every refused datagram counted",
        || {
            metric(
                &lbd.metrics_text(),
                "weir_udp_drops_total{listener=\"u\",reason=\"source_range\"}",
            ) == Some(40.0)
        },
    );
    assert!(
        b.received.try_recv().is_err(),
        "nothing from outside reached the backend"
    );
}

/// A backend that answers faster than lbd relays: lbd drains the flow's
/// socket and sends the replies to the client in segmented runs. Every
/// reply must arrive whole, once, in order, from the listener's address.
fn reply_bursts_arrive_whole_and_in_order(engine: EngineChoice) {
    const BURSTS: u8 = 20;
    const REPLIES: u8 = 48;
    fn reply(burst: u8, i: u8) -> Vec<u8> {
        let len = match i % 16 {
            15 => 37,
            9 => 1_200,
            _ => 300,
        };
        let mut d = vec![burst, i];
        d.extend((0..len - 2).map(|k| (k as u8) ^ i));
        d
    }
    let backend = UdpSocket::bind("127.0.0.2:0").unwrap();
    backend
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let addr = backend.local_addr().unwrap();
    let answering = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..BURSTS {
            let Ok((_, from)) = backend.recv_from(&mut buf) else {
                return;
            };
            for i in 0..REPLIES {
                backend.send_to(&reply(buf[0], i), from).unwrap();
            }
        }
    });
    let lbd = start_lbd_workers(
        &format!(
            "{ADMIN}{}",
            udp_listener("u", "127.0.0.71:0", "", &[addr], "kind = \"none\"")
        ),
        engine,
        1,
    );
    let vip = lbd.bound_addr("u").unwrap();
    let c = client("127.0.0.1");
    let mut buf = vec![0u8; 70_000];
    for burst in 0..BURSTS {
        c.send_to(&[burst], vip).unwrap();
        for i in 0..REPLIES {
            let (n, from) = loop {
                match c.recv_from(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => {
                        break r.unwrap_or_else(|e| panic!("burst {burst}: reply {i} missing: {e}"))
                    }
                }
            };
            assert_eq!(from, vip, "replies come from the listener's address");
            assert_eq!(&buf[..n], reply(burst, i), "burst {burst}: reply {i}");
        }
    }
    answering.join().unwrap();
    // The worker counts a send after the datagrams left, so the client can
    // hold the last reply before the count includes it.
    let total = f64::from(u16::from(BURSTS) * u16::from(REPLIES));
    let series = "weir_udp_datagrams_total{direction=\"to_client\",listener=\"u\"}";
    eventually(Duration::from_secs(5), "every reply counted", || {
        metric(&lbd.metrics_text(), series) == Some(total)
    });
}

both_engines!(
    request_response_from_the_listener_address,
    flows_stick_and_spread,
    idle_expiry_and_flow_cap,
    repick_when_the_backend_goes_down,
    drain_after_removal,
    proxy_v2_dgram_header,
    flood_stays_within_the_flow_cap,
    oversized_datagrams_are_counted_not_cut,
    bursts_arrive_whole_and_in_order,
    source_ranges_drop_and_count,
    reply_bursts_arrive_whole_and_in_order,
);
