//! VIPs announced over BGP through BIRD, across hosts in network
//! namespaces (root only; `.ci/run` installs bird2):
//!
//! ```text
//!  client ── router ─┬─ edge1 ─┐
//!  (10.99.0.2/.3)    ├─ edge2 ─┼── LAN ── backend1, backend2, backend3
//!                    └─ edge3 ─┘   (10.98.0.0/24)
//! ```
//!
//! Each edge runs `lbd` (`[announce] mode = "bgp"`) and BIRD with the
//! shipped `deploy/bird/bird-edge.conf`; the router runs BIRD with `merge
//! paths` (ECMP) and BFD, and hashes on layer 4. BIRD 2 installs ECMP
//! routes as plain multipath routes, so the router's BIRD writes them to
//! table 100 and the test mirrors that table into resilient next-hop
//! groups, as a router with resilient hashing forwards (plain multipath
//! groups where the kernel has none). Backends answer with their name and
//! the address of the edge that connected.
//!
//! Checks: (a) 3 next hops, every edge and backend reached; (b) an edge
//! that loses a VIP's backends withdraws that VIP alone; (d) a killed edge
//! is dropped within 1 s (BFD) while connections on the others survive;
//! (e) a UDP flow moved to another edge keeps its backend; (c) SIGTERM:
//! the route goes before the listeners close, new connections never fail,
//! and a transfer in flight on that edge completes; (f) no LAN neighbour
//! gets an ARP answer for a VIP.

mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netns::*;

const LBD: &str = env!("CARGO_BIN_EXE_lbd");
const VIP_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const VIP_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const EDGES: usize = 3;
const BACKENDS: usize = 3;
/// Edge `i`'s address towards the router.
fn edge_up(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, i as u8, 2)
}
/// Edge `i`'s address on the LAN (what backends see).
fn edge_lan(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 98, 0, 10 + i as u8))
}
fn backend_ip(k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 98, 0, 20 + k as u8))
}
fn edge_of(lan: IpAddr) -> Option<usize> {
    (1..=EDGES).find(|&i| edge_lan(i) == lan)
}

fn lbd_config(dir: &TempDir, i: usize) -> String {
    let list = |port: u16| {
        (1..=BACKENDS)
            .map(|k| format!("{{ addr = \"{}:{port}\" }}", backend_ip(k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"[runtime]
workers = 1
[admin]
metrics = "127.0.0.1:9600"
control_socket = "{sock}"
state_dir = "{state}"
[announce]
mode = "bgp"
interface = "weir0"
withdraw_grace = "1500ms"
[defaults]
drain_timeout = "6s"

[[listener]]
name = "a-tcp"
bind = "{VIP_A}:80"
backends = [{a}]
[listener.health]
kind = "tcp"
interval = "200ms"
timeout = "150ms"
rise = 1
fall = 2

[[listener]]
name = "a-udp"
protocol = "udp"
bind = "{VIP_A}:53"
backends = [{u}]

[[listener]]
name = "b-tcp"
bind = "{VIP_B}:80"
backends = [{b}]
[listener.health]
kind = "tcp"
interval = "100ms"
timeout = "80ms"
rise = 1
fall = 1
"#,
        sock = dir.path(&format!("e{i}.sock")).display(),
        state = dir.path(&format!("e{i}-state")).display(),
        a = list(8080),
        u = list(5353),
        b = list(8081),
    )
}

fn edge_bird_config(i: usize) -> String {
    bird_edge_config(edge_up(i), &format!("10.99.{i}.1"), None)
}

fn router_bird_config() -> String {
    let edges: Vec<Ipv4Addr> = (1..=EDGES).map(edge_up).collect();
    bird_router_config("10.99.0.1", &edges)
}

/// BIRD's ECMP routes on the router (table 100): VIP -> edges.
fn bird_routes(router: &Netns) -> BTreeMap<Ipv4Addr, BTreeSet<usize>> {
    let text = router
        .ip_out(&["-j", "route", "show", "table", "100"])
        .unwrap_or_default();
    let routes: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
    let mut out = BTreeMap::new();
    for r in routes.as_array().into_iter().flatten() {
        let Some(dst) = r["dst"].as_str().and_then(|d| d.parse::<Ipv4Addr>().ok()) else {
            continue;
        };
        let gateways: Vec<&str> = match r["nexthops"].as_array() {
            Some(hops) => hops.iter().filter_map(|h| h["gateway"].as_str()).collect(),
            None => r["gateway"].as_str().into_iter().collect(),
        };
        let edges = gateways
            .iter()
            .filter_map(|g| g.parse::<Ipv4Addr>().ok())
            .filter_map(|g| (1..=EDGES).find(|&i| edge_up(i) == g))
            .collect();
        out.insert(dst, edges);
    }
    out
}

fn paths(router: &Netns, vip: Ipv4Addr) -> BTreeSet<usize> {
    bird_routes(router).remove(&vip).unwrap_or_default()
}

/// How long the router takes to change its forwarding after BIRD's table
/// changed: longer than the 10-15 ms measured in the lab, so that the
/// window in which a withdrawn edge still receives new connections holds
/// many of them.
const CONVERGENCE: Duration = Duration::from_millis(200);

/// Mirrors table 100 into next-hop groups (resilient where the kernel
/// has them) routed in the main table; records what it could not do.
/// A change of the router's forwarding: the VIP, its edges, and the
/// instants just before and just after it.
type Switch = (Ipv4Addr, BTreeSet<usize>, Instant, Instant);

struct Mirror {
    stop: Arc<AtomicBool>,
    applied: Arc<Mutex<BTreeMap<Ipv4Addr, BTreeSet<usize>>>>,
    /// Every change: the VIP, its edges, and the instants just before and
    /// just after the router's forwarding changed.
    history: Arc<Mutex<Vec<Switch>>>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mirror {
    fn start(router: &Netns, resilient: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let applied = Arc::new(Mutex::new(BTreeMap::new()));
        let history = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let name = router.name.clone();
        let thread = {
            let (stop, applied, errors, history) = (
                stop.clone(),
                applied.clone(),
                errors.clone(),
                history.clone(),
            );
            std::thread::spawn(move || {
                let ns = Netns { name };
                let run = |args: &[&str]| {
                    if let Err(e) = ns.ip_out(args) {
                        errors
                            .lock()
                            .unwrap()
                            .push(format!("ip {}: {e}", args.join(" ")));
                    }
                };
                // What changed in BIRD's table, and when it was first seen.
                let mut seen: BTreeMap<Ipv4Addr, (BTreeSet<usize>, Instant)> = BTreeMap::new();
                while !stop.load(Ordering::SeqCst) {
                    let want = bird_routes(&ns);
                    let mut have = applied.lock().unwrap();
                    for (vip, edges) in &want {
                        if have.get(vip) == Some(edges) {
                            seen.remove(vip);
                            continue;
                        }
                        let first = match seen.get(vip) {
                            Some((e, at)) if e == edges => *at,
                            _ => {
                                seen.insert(*vip, (edges.clone(), Instant::now()));
                                continue;
                            }
                        };
                        if first.elapsed() < CONVERGENCE {
                            continue;
                        }
                        seen.remove(vip);
                        let group = (100 + vip.octets()[3] as u32).to_string();
                        let members: Vec<String> = edges.iter().map(|e| e.to_string()).collect();
                        let members = members.join("/");
                        let verb = if have.contains_key(vip) {
                            "replace"
                        } else {
                            "add"
                        };
                        let mut args = vec!["nexthop", verb, "id", &group, "group", &members];
                        if resilient {
                            args.extend(["type", "resilient", "buckets", "64", "idle_timer", "1"]);
                        }
                        let before = Instant::now();
                        run(&args);
                        let dst = format!("{vip}/32");
                        run(&["route", "replace", &dst, "nhid", &group]);
                        history
                            .lock()
                            .unwrap()
                            .push((*vip, edges.clone(), before, Instant::now()));
                        have.insert(*vip, edges.clone());
                    }
                    let gone: Vec<Ipv4Addr> = have
                        .keys()
                        .filter(|v| !want.contains_key(v))
                        .copied()
                        .collect();
                    for vip in gone {
                        run(&["route", "del", &format!("{vip}/32")]);
                        run(&[
                            "nexthop",
                            "del",
                            "id",
                            &(100 + vip.octets()[3] as u32).to_string(),
                        ]);
                        have.remove(&vip);
                    }
                    drop(have);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Self {
            stop,
            applied,
            history,
            errors,
            thread: Some(thread),
        }
    }

    /// Waits until the router forwards `vip` to exactly `edges`.
    fn wait(&self, vip: Ipv4Addr, edges: &[usize], within: Duration) {
        let want: BTreeSet<usize> = edges.iter().copied().collect();
        wait_for(
            within,
            &format!("router forwards {vip} to edges {want:?}"),
            || (self.applied.lock().unwrap().get(&vip) == Some(&want)).then_some(()),
        );
    }
}

impl Mirror {
    /// When the router's forwarding of `vip` last changed to `edges`.
    fn switched(&self, vip: Ipv4Addr, edges: &[usize]) -> Option<(Instant, Instant)> {
        let want: BTreeSet<usize> = edges.iter().copied().collect();
        self.history
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(v, e, _, _)| *v == vip && *e == want)
            .map(|&(_, _, a, b)| (a, b))
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Edge {
    ns: Netns,
    lbd: Proc,
    bird: Bird,
    socket: std::path::PathBuf,
}

impl Edge {
    fn status(&self) -> lb_api::wire::Status {
        let target = lb_api::client::Target::Unix(self.socket.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(lb_api::client::status(&target))
            .expect("status")
    }

    fn vip(&self, vip: Ipv4Addr) -> Option<lb_api::wire::VipStatus> {
        self.status()
            .announce?
            .vips
            .into_iter()
            .find(|v| v.vip == IpAddr::V4(vip))
    }

    /// The text of `/metrics`.
    fn metrics(&self) -> String {
        self.ns.run(|| {
            use std::io::Read;
            let mut s = TcpStream::connect("127.0.0.1:9600").expect("metrics endpoint");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        })
    }

    fn lbd_cli(&self, command: &str) -> String {
        let out = Command::new(LBD)
            .args([command, "--socket"])
            .arg(&self.socket)
            .output()
            .expect("lbd cli");
        assert!(
            out.status.success(),
            "lbd {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The value of one series (exact labels) in a metrics text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Opens connections to `vip:80` from the client until `pred` holds for
/// one (at most `tries`).
fn connect_until(
    client: &Netns,
    vip: Ipv4Addr,
    from: Option<Ipv4Addr>,
    tries: usize,
    pred: impl Fn(&Conn) -> bool + Send + 'static,
) -> Option<Conn> {
    client.run(move || {
        for _ in 0..tries {
            let conn = match from {
                None => Conn::open(SocketAddr::from((vip, 80)), Duration::from_secs(3)),
                Some(src) => open_from(src, SocketAddr::from((vip, 80))),
            };
            if let Ok(c) = conn {
                if pred(&c) {
                    return Some(c);
                }
            }
        }
        None
    })
}

fn open_from(src: Ipv4Addr, to: SocketAddr) -> std::io::Result<Conn> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::from((src, 0)).into())?;
    sock.connect_timeout(&to.into(), Duration::from_secs(3))?;
    let stream: TcpStream = sock.into();
    Conn::from_stream(stream)
}

#[test]
fn vips_over_bgp_across_edge_hosts() {
    if !is_root() {
        eprintln!("SKIPPED: vips_over_bgp_across_edge_hosts needs root (network namespaces)");
        return;
    }
    assert!(
        Command::new("bird").arg("--version").output().is_ok(),
        "bird is not installed (apt-get install bird2; .ci/run does)"
    );
    let started = Instant::now();
    let tag = format!("wb{}", std::process::id() % 100_000);
    let dir = TempDir::new("bgp");

    // Topology. Guards drop in reverse order: processes before namespaces.
    let client = Netns::new(&format!("{tag}-client"));
    let router = Netns::new(&format!("{tag}-router"));
    let lan = Netns::new(&format!("{tag}-lan"));
    let edge_ns: Vec<Netns> = (1..=EDGES)
        .map(|i| Netns::new(&format!("{tag}-edge{i}")))
        .collect();
    let backend_ns: Vec<Netns> = (1..=BACKENDS)
        .map(|k| Netns::new(&format!("{tag}-backend{k}")))
        .collect();

    veth(&client, "c0", "10.99.0.2/24", &router, "rc", "10.99.0.1/24");
    client.ip(&["addr", "add", "10.99.0.3/24", "dev", "c0"]);
    client.ip(&["route", "add", "default", "via", "10.99.0.1"]);
    router.sysctl("net.ipv4.ip_forward", "1");
    router.sysctl("net.ipv4.fib_multipath_hash_policy", "1");
    lan.ip(&["link", "add", "br0", "type", "bridge"]);
    lan.ip(&["link", "set", "br0", "up"]);
    for (n, ns) in edge_ns.iter().enumerate() {
        let i = n + 1;
        veth(
            &router,
            &format!("re{i}"),
            &format!("10.99.{i}.1/24"),
            ns,
            "uplink",
            &format!("{}/24", edge_up(i)),
        );
        ns.ip(&["route", "add", "default", "via", &format!("10.99.{i}.1")]);
        veth(
            ns,
            "lan",
            &format!("{}/24", edge_lan(i)),
            &lan,
            &format!("e{i}"),
            "",
        );
        lan.ip(&["link", "set", &format!("e{i}"), "master", "br0"]);
        // As deploy/bird/sysctl-weir.conf says.
        ns.sysctl("net.ipv4.conf.all.arp_ignore", "1");
        ns.sysctl("net.ipv4.conf.all.arp_announce", "2");
    }
    for (n, ns) in backend_ns.iter().enumerate() {
        let k = n + 1;
        veth(
            ns,
            "lan",
            &format!("{}/24", backend_ip(k)),
            &lan,
            &format!("b{k}"),
            "",
        );
        lan.ip(&["link", "set", &format!("b{k}"), "master", "br0"]);
    }

    // Resilient next-hop groups, if this kernel has them.
    for i in 1..=EDGES {
        router.ip(&[
            "nexthop",
            "add",
            "id",
            &i.to_string(),
            "via",
            &edge_up(i).to_string(),
            "dev",
            &format!("re{i}"),
        ]);
    }
    let resilient = router
        .ip_out(&[
            "nexthop",
            "add",
            "id",
            "99",
            "group",
            "1",
            "type",
            "resilient",
            "buckets",
            "8",
        ])
        .is_ok();
    if resilient {
        router.ip(&["nexthop", "del", "id", "99"]);
    } else {
        eprintln!("note: this kernel has no resilient next-hop groups; the router hashes with plain multipath groups, and (d) skips its survival check");
    }

    let _servers: Vec<NamedServer> = backend_ns
        .iter()
        .enumerate()
        .map(|(n, ns)| {
            NamedServer::start(
                ns,
                &format!("backend{}", n + 1),
                &[8080, 8081],
                5353,
                backend_ip(n + 1),
            )
        })
        .collect();

    let router_bird = Bird::start(&router, &dir, "router", &router_bird_config());
    let mut edges: Vec<Edge> = Vec::new();
    for (n, ns) in edge_ns.into_iter().enumerate() {
        let i = n + 1;
        let conf = dir.path(&format!("e{i}.toml"));
        std::fs::write(&conf, lbd_config(&dir, i)).unwrap();
        let mut cmd = ns.command(LBD);
        cmd.args(["run", "--config"])
            .arg(&conf)
            .env("LBD_LOG", "info");
        let lbd = Proc::spawn(
            cmd,
            &format!("lbd on edge{i}"),
            &dir.path(&format!("e{i}-lbd.log")),
        );
        let bird = Bird::start(&ns, &dir, &format!("e{i}"), &edge_bird_config(i));
        edges.push(Edge {
            ns,
            lbd,
            bird,
            socket: dir.path(&format!("e{i}.sock")),
        });
    }
    let mirror = Mirror::start(&router, resilient);

    // (a) Every edge announces both VIPs; the router has 3 next hops for
    // each, and connections reach every edge and every backend.
    wait_for(
        Duration::from_secs(30),
        "the router has 3 paths for both VIPs",
        || {
            (paths(&router, VIP_A).len() == EDGES && paths(&router, VIP_B).len() == EDGES)
                .then_some(())
        },
    );
    mirror.wait(VIP_A, &[1, 2, 3], Duration::from_secs(5));
    for e in &edges {
        let v = e.vip(VIP_A).expect("VIP A in status");
        assert!(v.announced && v.reason.is_none(), "{v:?}");
        assert!(
            e.ns.ip_out(&["addr", "show", "dev", "weir0"])
                .unwrap()
                .contains("192.0.2.10/32"),
            "the VIP's host route is on weir0"
        );
    }
    let conns: Vec<Conn> = client.run(|| {
        (0..48)
            .map(|_| {
                Conn::open(SocketAddr::from((VIP_A, 80)), Duration::from_secs(3))
                    .expect("connect through the router")
            })
            .collect()
    });
    let seen_edges: BTreeSet<usize> = conns.iter().filter_map(|c| edge_of(c.edge)).collect();
    let seen_backends: BTreeSet<&str> = conns.iter().map(|c| c.backend.as_str()).collect();
    assert_eq!(seen_edges.len(), EDGES, "every edge served: {seen_edges:?}");
    assert_eq!(
        seen_backends.len(),
        BACKENDS,
        "every backend reached: {seen_backends:?}"
    );
    eprintln!("(a) ok after {:?}", started.elapsed());

    // (b) edge1 loses every backend of VIP B (its connects to port 8081
    // fail): it alone withdraws VIP B; VIP A stays on all three.
    edges[0]
        .ns
        .ip(&["route", "add", "unreachable", "default", "table", "200"]);
    let cut = Instant::now();
    edges[0].ns.ip(&[
        "rule", "add", "ipproto", "tcp", "dport", "8081", "lookup", "200", "pref", "100",
    ]);
    wait_for(
        Duration::from_secs(5),
        "the router drops edge1 for VIP B",
        || (paths(&router, VIP_B) == BTreeSet::from([2, 3])).then_some(()),
    );
    let health_to_router = cut.elapsed();
    assert_eq!(
        paths(&router, VIP_A),
        BTreeSet::from([1, 2, 3]),
        "VIP A is not withdrawn"
    );
    let v = edges[0].vip(VIP_B).unwrap();
    assert!(
        !v.announced && v.reason.as_deref() == Some("no_backend_up"),
        "{v:?}"
    );
    for e in &edges[1..] {
        assert!(e.vip(VIP_B).unwrap().announced, "other edges keep VIP B");
    }
    assert!(edges[0].vip(VIP_A).unwrap().announced);
    let metrics = edges[0].metrics();
    for (series, value) in [
        ("weir_vip_announced{vip=\"192.0.2.11\"}", 0.0),
        ("weir_vip_announced{vip=\"192.0.2.10\"}", 1.0),
        (
            "weir_vip_announce_changes_total{action=\"withdraw\",vip=\"192.0.2.11\"}",
            1.0,
        ),
        (
            "weir_vip_announce_changes_total{action=\"announce\",vip=\"192.0.2.11\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric(&metrics, series), Some(value), "{series}\n{metrics}");
    }
    edges[0].ns.ip(&["rule", "del", "pref", "100"]);
    wait_for(
        Duration::from_secs(5),
        "edge1 announces VIP B again",
        || (paths(&router, VIP_B).len() == EDGES).then_some(()),
    );
    eprintln!(
        "(b) ok after {:?}: backends cut off to the router's withdrawal in {health_to_router:?} (health check every 100 ms, fall 1)",
        started.elapsed()
    );

    // (d) edge3 dies hard: kill -9 lbd, and BIRD stops answering without
    // closing anything (SIGSTOP: a killed process's sockets would be
    // closed by its kernel, which a dead host's are not). Only BFD can
    // tell: the router drops edge3 within 1 s; connections on edge1 and
    // edge2 go on.
    let t0 = Instant::now();
    edges[2].bird.proc.signal("STOP");
    edges[2].lbd.signal("KILL");
    wait_for(Duration::from_secs(5), "the router drops edge3", || {
        (!paths(&router, VIP_A).contains(&3)).then_some(())
    });
    let dropped = t0.elapsed();
    assert!(
        dropped < Duration::from_secs(1),
        "edge3 dropped after {dropped:?}"
    );
    edges[2].bird.proc.signal("KILL");
    mirror.wait(VIP_A, &[1, 2], Duration::from_secs(2));
    let (survivors, lost): (Vec<Conn>, Vec<Conn>) =
        conns.into_iter().partition(|c| edge_of(c.edge) != Some(3));
    assert!(
        survivors.iter().any(|c| edge_of(c.edge) == Some(1))
            && survivors.iter().any(|c| edge_of(c.edge) == Some(2)),
        "connections on both surviving edges"
    );
    let broken: Vec<String> = survivors
        .into_iter()
        .filter_map(|mut c| {
            c.echo(b"still there?")
                .err()
                .map(|e| format!("{}: {e}", c.edge))
        })
        .collect();
    if resilient {
        assert!(
            broken.is_empty(),
            "connections on surviving edges broke: {broken:?}"
        );
    } else {
        eprintln!(
            "(d) plain multipath: {} connections on surviving edges moved and broke",
            broken.len()
        );
    }
    eprintln!(
        "(d) ok after {:?}: edge3 dropped in {dropped:?}; {} of its connections lost (a proxy terminates TCP)",
        started.elapsed(),
        lost.len()
    );
    drop(lost);

    // (e) UDP: flows through the router; drain the edge serving the
    // first one; the flows it served move to the other edge and keep
    // their backend (Maglev: every edge picks the same one).
    let socks: Vec<UdpSocket> = client.run(|| {
        (0..16)
            .map(|_| {
                let s = UdpSocket::bind("10.99.0.2:0").unwrap();
                s.connect((VIP_A, 53)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                s
            })
            .collect()
    });
    let ask = |s: &UdpSocket| -> Option<(String, usize)> {
        s.send(b"who").ok()?;
        let mut buf = [0u8; 256];
        let n = s.recv(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let mut parts = text.split_whitespace();
        let name = parts.next()?.to_owned();
        let edge = edge_of(parts.next()?.parse().ok()?)?;
        Some((name, edge))
    };
    let before: Vec<(String, usize)> = socks.iter().map(|s| ask(s).expect("udp answer")).collect();
    let moved_edge = before[0].1;
    let other = if moved_edge == 1 { 2 } else { 1 };
    let said = edges[moved_edge - 1].lbd_cli("drain");
    assert!(said.contains("draining"), "{said}");
    mirror.wait(VIP_A, &[other], Duration::from_secs(3));
    let after: Vec<(String, usize)> = socks
        .iter()
        .map(|s| ask(s).expect("udp answer after the move"))
        .collect();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a.1, other, "every flow is on the edge left");
        assert_eq!(
            a.0, b.0,
            "a flow moved from edge{} to edge{} keeps its backend",
            b.1, a.1
        );
    }
    let st = edges[moved_edge - 1].status();
    assert!(st.drain.is_some(), "drained edge says so");
    let said = edges[moved_edge - 1].lbd_cli("undrain");
    assert!(said.contains("undrained"), "{said}");
    mirror.wait(VIP_A, &[1, 2], Duration::from_secs(5));
    eprintln!(
        "(e) ok after {:?}: {} flows moved from edge{moved_edge} to edge{other}, same backends",
        started.elapsed(),
        before.iter().filter(|b| b.1 == moved_edge).count()
    );

    // (c) SIGTERM edge2. A client loop opens new connections all along;
    // a transfer from 10.99.0.3 (which the router sends to edge2 only: a
    // path that does not move, as a router that keeps flows on their
    // next hop would) is in flight.
    router.ip(&[
        "route",
        "add",
        &format!("{VIP_A}/32"),
        "via",
        &edge_up(2).to_string(),
        "table",
        "300",
    ]);
    router.ip(&[
        "rule",
        "add",
        "from",
        "10.99.0.3",
        "lookup",
        "300",
        "pref",
        "100",
    ]);
    let mut pinned = connect_until(&client, VIP_A, Some(Ipv4Addr::new(10, 99, 0, 3)), 1, |c| {
        edge_of(c.edge) == Some(2)
    })
    .expect("a connection through edge2");
    // New connections reach edge2 again after the undrain (the resilient
    // group gives it buckets once they are idle).
    wait_for(
        Duration::from_secs(10),
        "new connections reach edge2 again",
        || connect_until(&client, VIP_A, None, 20, |c| edge_of(c.edge) == Some(2)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    // Every attempt: when it started and ended, and its error.
    type Attempt = (Instant, Instant, Option<String>);
    let attempts = Arc::new(Mutex::new(Vec::<Attempt>::new()));
    let loop_thread = {
        let (stop, attempts) = (stop.clone(), attempts.clone());
        client.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let start = Instant::now();
                let result = Conn::open(SocketAddr::from((VIP_A, 80)), Duration::from_secs(2))
                    .and_then(|mut c| c.echo(b"ping"));
                attempts.lock().unwrap().push((
                    start,
                    Instant::now(),
                    result.err().map(|e| e.to_string()),
                ));
            }
        })
    };
    let transfer = std::thread::spawn(move || -> std::io::Result<usize> {
        // 40 chunks of 16 KiB, 100 ms apart: longer than the grace.
        let chunk = vec![b'x'; 16 * 1024];
        for _ in 0..40 {
            pinned.echo(&chunk)?;
            std::thread::sleep(Duration::from_millis(100));
        }
        pinned.stream.flush()?;
        Ok(40 * chunk.len())
    });
    let t0 = Instant::now();
    edges[1].lbd.signal("TERM");
    wait_for(
        Duration::from_secs(3),
        "the router drops edge2 after SIGTERM",
        || (paths(&router, VIP_A) == BTreeSet::from([1])).then_some(()),
    );
    let withdrawn = t0.elapsed();
    // The route is gone; edge2's listener still accepts, and delivers
    // locally (the backend sees edge2, not an edge the VIP is routed to).
    let local = edges[1]
        .ns
        .run(|| Conn::open(SocketAddr::from((VIP_A, 80)), Duration::from_secs(1)).map(|c| c.edge));
    assert_eq!(
        local.ok().and_then(edge_of),
        Some(2),
        "edge2 still accepts after its route is withdrawn ({withdrawn:?} after SIGTERM)"
    );
    let status = edges[1].lbd.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "lbd on edge2 exits 0 after its drain");
    let moved = transfer.join().unwrap();
    assert!(
        moved.is_ok(),
        "the transfer in flight on edge2 completes: {moved:?}"
    );
    stop.store(true, Ordering::SeqCst);
    loop_thread.join().unwrap();
    // A connection under way on edge2 at the very instant the router
    // moves edge2's flows to edge1 is reset there: a router without flow
    // state does that to every flow it moves. Every other connection
    // must succeed: those the router still sends to edge2 after SIGTERM
    // (it accepts through the grace) and those after the switch.
    let (switch_from, switch_to) = mirror.switched(VIP_A, &[1]).expect("the switch to edge1");
    let attempts = attempts.lock().unwrap().clone();
    let straddling = |a: &Attempt| a.0 < switch_to && a.1 > switch_from;
    let failed: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.2.is_some() && !straddling(a))
        .collect();
    assert!(
        failed.is_empty(),
        "new connections failed while edge2 stopped: {failed:?}"
    );
    let during_grace = attempts
        .iter()
        .filter(|a| a.0 > t0 && a.1 < switch_from)
        .count();
    let lost_at_switch = attempts.iter().filter(|a| a.2.is_some()).count();
    assert!(attempts.len() > 10, "the client loop ran");
    eprintln!(
        "(c) ok after {:?}: route withdrawn {withdrawn:?} after SIGTERM; {} new connections ({during_grace} between SIGTERM and the switch), {lost_at_switch} under way at the switch lost",
        started.elapsed(),
        attempts.len()
    );

    // (f) No LAN neighbour gets an ARP answer for a VIP: backend1 routes
    // VIP A onto the LAN and asks; no edge answers (arp_ignore = 1).
    backend_ns[0].sysctl("net.ipv4.neigh.lan.mcast_solicit", "1");
    backend_ns[0].sysctl("net.ipv4.neigh.lan.retrans_time_ms", "100");
    backend_ns[0].ip(&["route", "add", &format!("{VIP_A}/32"), "dev", "lan"]);
    backend_ns[0].run(|| {
        let _ = TcpStream::connect_timeout(&SocketAddr::from((VIP_A, 80)), Duration::from_secs(1));
    });
    let neighbour = wait_for(
        Duration::from_secs(5),
        "backend1's ARP for VIP A settles",
        || {
            let n = backend_ns[0]
                .ip_out(&["neigh", "show", &VIP_A.to_string(), "dev", "lan"])
                .unwrap_or_default();
            (!n.contains("INCOMPLETE")).then_some(n)
        },
    );
    assert!(
        !neighbour.contains("lladdr"),
        "an edge answered ARP for VIP A on the LAN: {neighbour}"
    );

    assert!(
        mirror.errors.lock().unwrap().is_empty(),
        "router mirror: {:?}",
        mirror.errors.lock().unwrap()
    );
    drop(router_bird);
    eprintln!(
        "vips_over_bgp_across_edge_hosts took {:?}",
        started.elapsed()
    );
}
