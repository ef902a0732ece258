//! L2 announcement end to end, in network namespaces (root only): the real
//! `lb-controller` against the in-test API server, three edge hosts each
//! running `lbd` with `[announce] mode = "l2"`, a client and a backend, all
//! on one bridge:
//!
//! ```text
//!  client (10.8.0.100, fd00:8::64) ─┐
//!  edge1  (10.8.0.1,   fd00:8::1)  ─┤
//!  edge2  (10.8.0.2,   fd00:8::2)  ─┼─ br0
//!  edge3  (10.8.0.3,   fd00:8::3)  ─┤
//!  backend (10.8.0.50: the Node)   ─┘
//! ```
//!
//! Six IPv4 and three IPv6 Services get VIPs from one `announce = "l2"`
//! pool in the LAN's prefixes. Checks: (a) each VIP is on exactly one
//! edge's LAN interface, the client's neighbour entry is that edge's MAC,
//! and the six IPv4 VIPs use all three edges; (d) with the controller
//! stopped every VIP stays and serves, an lbd restarted meanwhile takes
//! its VIPs back from its persisted state, and a restarted controller
//! moves none; partition: an owner the controller cannot reach (its control
//! socket moved away) while the LAN can gives its VIPs up within its lease
//! and a second, once new owners announce them, and takes none back when
//! healed; (b, e) `kill -9` of an owner: a client connecting every 20 ms to
//! its IPv4 and IPv6 VIPs sees at most 1 s of failures, and its neighbour
//! entries name the new owner's MAC (ARP and NDP); (c) SIGTERM of an
//! owner: no connection fails.
//!
//! Traffic stays inside the namespaces the test creates.

#[path = "../../lb-core/tests/netns/mod.rs"]
mod netns;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netns::{veth, wait_for, Conn, NamedServer, Netns, Proc, TempDir};
use serde_json::Value;
use support::{lb_service, node, ApiServer, NODES, SERVICES};

const EDGES: usize = 3;
const BACKEND: &str = "10.8.0.50";
const V4: usize = 6;
const V6: usize = 3;
/// How often the client opens a connection.
const EVERY: Duration = Duration::from_millis(20);

fn edge_name(i: usize) -> String {
    format!("edge-{i}")
}

fn lbd_config(dir: &TempDir, i: usize) -> String {
    format!(
        r#"[runtime]
workers = 1
[admin]
metrics = "127.0.0.1:9600"
control_socket = "{sock}"
state_dir = "{state}"
[announce]
mode = "l2"
interface = "lan0"
withdraw_grace = "2s"
[defaults]
drain_timeout = "3s"
[defaults.health]
interval = "200ms"
timeout = "150ms"
"#,
        sock = dir.path(&format!("e{i}.sock")).display(),
        state = dir.path(&format!("e{i}-state")).display(),
    )
}

fn controller_config(dir: &TempDir, kubeconfig: &Path, metrics: &str) -> std::path::PathBuf {
    let forwarders: String = (1..=EDGES)
        .map(|i| {
            format!(
                "[[forwarder]]\nname = \"{}\"\nurl = \"unix://{}\"\n\n",
                edge_name(i),
                dir.path(&format!("e{i}.sock")).display()
            )
        })
        .collect();
    let extra = format!(
        "[admin]\nmetrics = \"{metrics}\"\n\n[leader_election]\nenabled = false\n\n[[pool]]\nname = \"lan\"\naddresses = [\"10.8.0.16/29\", \"fd00:8::10/125\"]\nannounce = \"l2\"\n\n[l2]\nprobe_interval = \"200ms\"\nprobe_failures = 3\n\n[health]\ncluster = \"tcp\"\n\n{forwarders}"
    );
    let path = support::controller_config(&dir.0, kubeconfig, &extra);
    // The default publish debounce (the shared test config shortens it):
    // the failover measured is the one operators get.
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("debounce = \"50ms\""), "{text}");
    std::fs::write(
        &path,
        text.replace("debounce = \"50ms\"", "debounce = \"200ms\""),
    )
    .unwrap();
    path
}

fn start_lbd(ns: &Netns, dir: &TempDir, i: usize) -> Proc {
    let cfg = dir.path(&format!("e{i}.toml"));
    std::fs::write(&cfg, lbd_config(dir, i)).unwrap();
    let _ = std::fs::create_dir_all(dir.path(&format!("e{i}-state")));
    let mut cmd = ns.command(support::lbd_binary());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .env("LBD_LOG", "info");
    let p = Proc::spawn(cmd, &format!("lbd {i}"), &dir.path(&format!("e{i}.log")));
    let sock = dir.path(&format!("e{i}.sock"));
    wait_for(Duration::from_secs(20), "lbd control socket", || {
        sock.exists().then_some(())
    });
    p
}

fn start_controller(cfg: &Path, dir: &TempDir, n: usize) -> Proc {
    let mut cmd = Command::new(support::CONTROLLER);
    cmd.args(["run", "--config"])
        .arg(cfg)
        .args(["--identity", "l2-test"])
        .env("RUST_LOG", "info,kube=warn");
    Proc::spawn(
        cmd,
        "lb-controller",
        &dir.path(&format!("controller-{n}.log")),
    )
}

/// The MAC of `dev` in `ns`.
fn mac_of(ns: &Netns, dev: &str) -> String {
    let out = ns.ip_out(&["link", "show", dev]).unwrap();
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("link/ether")
        .to_owned()
}

/// Whether `vip` is an address of `lan0` in `ns`.
fn holds(ns: &Netns, vip: IpAddr) -> bool {
    let out = ns
        .ip_out(&["addr", "show", "dev", "lan0"])
        .unwrap_or_default();
    let prefix = if vip.is_ipv4() { 32 } else { 128 };
    out.contains(&format!(" {vip}/{prefix} "))
}

/// The client's neighbour entry for `vip`: its MAC, if it has one.
fn neighbour(client: &Netns, vip: IpAddr) -> Option<String> {
    let out = client
        .ip_out(&["neigh", "show", &vip.to_string(), "dev", "lan0"])
        .ok()?;
    out.split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .map(str::to_owned)
}

/// The edges (1-based) holding `vip` on their LAN interface.
fn holders(edges: &[Netns], vip: IpAddr) -> Vec<usize> {
    (1..=EDGES).filter(|&i| holds(&edges[i - 1], vip)).collect()
}

/// One connection from the client to `vip`:80 that reads the backend's
/// hello.
fn connect(client: &Netns, vip: IpAddr) -> Result<(), String> {
    client.run(move || {
        Conn::open(SocketAddr::new(vip, 80), Duration::from_millis(500))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

/// A client connecting to `vip` every [`EVERY`] until stopped; returns each
/// attempt's time since the start and whether it succeeded.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Duration, bool)>>,
    started: Instant,
}

impl Prober {
    fn start(client: &Netns, vip: IpAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let started = Instant::now();
        let thread = client.spawn(move || {
            let mut seen = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let at = Instant::now();
                let ok = Conn::open(SocketAddr::new(vip, 80), Duration::from_millis(300)).is_ok();
                seen.push((at - started, ok));
                if let Some(left) = EVERY.checked_sub(at.elapsed()) {
                    std::thread::sleep(left);
                }
            }
            seen
        });
        Self {
            stop,
            thread,
            started,
        }
    }

    fn stop(self) -> (Instant, Vec<(Duration, bool)>) {
        self.stop.store(true, Ordering::SeqCst);
        (self.started, self.thread.join().expect("prober"))
    }
}

/// From a prober's record: how many attempts failed, and the time from the
/// first failure to the first success after the last one.
fn outage(seen: &[(Duration, bool)]) -> (usize, Duration) {
    let failed = seen.iter().filter(|(_, ok)| !ok).count();
    let first = seen.iter().find(|(_, ok)| !ok).map(|(t, _)| *t);
    let last = seen.iter().rposition(|(_, ok)| !ok);
    let recovered = last.and_then(|i| seen[i + 1..].iter().find(|(_, ok)| *ok).map(|(t, _)| *t));
    match (first, recovered) {
        (Some(a), Some(b)) => (failed, b - a),
        (Some(a), None) => (
            failed,
            seen.last().map_or(a, |(t, _)| *t) - a + Duration::from_secs(3600),
        ),
        _ => (0, Duration::ZERO),
    }
}

fn vips_of(api: &ApiServer, names: &[String]) -> Vec<IpAddr> {
    names
        .iter()
        .map(|n| {
            let svc = api.get(SERVICES, "default", n).unwrap();
            support::ingress_ips(&svc)[0].parse().unwrap()
        })
        .collect()
}

fn condition_message(api: &ApiServer, name: &str) -> String {
    let svc = api.get(SERVICES, "default", name).unwrap();
    svc["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "weir.dev/ForwardersProgrammed")
        .and_then(|c| c["message"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Each VIP's owner and epoch in the state `lbd` `i` runs.
fn owners_in(
    dir: &TempDir,
    rt: &tokio::runtime::Runtime,
    i: usize,
) -> BTreeMap<IpAddr, (String, u64)> {
    let sock = dir.path(&format!("e{i}.sock"));
    let state: Option<Value> = rt.block_on(support::lbd_state(&sock));
    state
        .and_then(|s| {
            s["l2"]["owners"].as_array().map(|a| {
                a.iter()
                    .map(|o| {
                        (
                            o["vip"].as_str().unwrap().parse().unwrap(),
                            (
                                o["owner"].as_str().unwrap().to_owned(),
                                o["epoch"].as_u64().unwrap(),
                            ),
                        )
                    })
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn version_of(dir: &TempDir, rt: &tokio::runtime::Runtime, i: usize) -> u64 {
    let sock = dir.path(&format!("e{i}.sock"));
    rt.block_on(support::lbd_state(&sock))
        .and_then(|s| s["version"].as_u64())
        .unwrap_or(0)
}

/// Waits until every VIP is held by exactly one of the `live` edges, and
/// returns the owners (1-based edge index per VIP). An edge whose `lbd` was
/// killed keeps the addresses it had (nothing removes them until `lbd`
/// starts again), so the dead are not counted.
fn settled(edges: &[Netns], vips: &[IpAddr], live: &BTreeSet<usize>, what: &str) -> Vec<usize> {
    wait_for(Duration::from_secs(20), what, || {
        let owners: Vec<usize> = vips
            .iter()
            .filter_map(|&v| {
                let on: Vec<usize> = holders(edges, v)
                    .into_iter()
                    .filter(|i| live.contains(i))
                    .collect();
                match on.as_slice() {
                    [one] => Some(*one),
                    _ => None,
                }
            })
            .collect();
        (owners.len() == vips.len()).then_some(owners)
    })
}

/// The live edge `vip` moves to.
fn new_owner(edges: &[Netns], live: &BTreeSet<usize>, vip: IpAddr) -> usize {
    wait_for(Duration::from_secs(10), &format!("{vip} moves"), || {
        holders(edges, vip).into_iter().find(|i| live.contains(i))
    })
}

#[test]
fn one_edge_answers_for_each_vip_and_failover_is_fast() {
    if !netns::is_root() {
        eprintln!("SKIPPED: one_edge_answers_for_each_vip_and_failover_is_fast needs root (network namespaces)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let api = rt.block_on(ApiServer::start());
    let tag = format!("wl{}", std::process::id() % 100_000);
    let dir = TempDir::new("l2");

    // Topology. Guards drop in reverse order: processes before namespaces.
    let lan = Netns::new(&format!("{tag}-lan"));
    let client = Netns::new(&format!("{tag}-client"));
    let backend = Netns::new(&format!("{tag}-backend"));
    let edges: Vec<Netns> = (1..=EDGES)
        .map(|i| Netns::new(&format!("{tag}-edge{i}")))
        .collect();
    lan.ip(&[
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ]);
    lan.ip(&["link", "set", "br0", "up"]);
    let attach = |ns: &Netns, port: &str, v4: &str, v6: &str| {
        veth(&lan, port, "", ns, "lan0", v4);
        lan.ip(&["link", "set", port, "master", "br0"]);
        ns.ip(&["addr", "add", v6, "dev", "lan0", "nodad"]);
    };
    attach(&client, "pc", "10.8.0.100/24", "fd00:8::64/64");
    attach(&backend, "pb", &format!("{BACKEND}/24"), "fd00:8::50/64");
    for (n, ns) in edges.iter().enumerate() {
        let i = n + 1;
        attach(
            ns,
            &format!("pe{i}"),
            &format!("10.8.0.{i}/24"),
            &format!("fd00:8::{i}/64"),
        );
        // Only the owner, which has the VIP on lan0, answers ARP for it.
        ns.sysctl("net.ipv4.conf.all.arp_ignore", "1");
        ns.sysctl("net.ipv4.conf.all.arp_announce", "2");
    }
    let ports: Vec<u16> = (0..(V4 + V6) as u16).map(|k| 30100 + k).collect();
    let _backend = NamedServer::start(&backend, "node-0", &ports, 30199, BACKEND.parse().unwrap());
    let macs: Vec<String> = edges.iter().map(|ns| mac_of(ns, "lan0")).collect();

    let mut lbds: Vec<Option<Proc>> = (1..=EDGES)
        .map(|i| Some(start_lbd(&edges[i - 1], &dir, i)))
        .collect();
    api.create(NODES, "", node("node-0", BACKEND));
    let metrics = format!("127.0.0.1:{}", support::free_port("127.0.0.1"));
    let cfg = controller_config(&dir, &api.kubeconfig(&dir.0, "ctl"), &metrics);
    let mut controller = start_controller(&cfg, &dir, 1);

    let v4_names: Vec<String> = (0..V4).map(|k| format!("web-{k}")).collect();
    let v6_names: Vec<String> = (0..V6).map(|k| format!("six-{k}")).collect();
    for (k, name) in v4_names.iter().chain(&v6_names).enumerate() {
        let mut svc = lb_service(name, &[(80, ports[k])]);
        if k >= V4 {
            svc["spec"]["ipFamilies"] = serde_json::json!(["IPv6"]);
        }
        api.create(SERVICES, "default", svc);
    }
    for name in v4_names.iter().chain(&v6_names) {
        rt.block_on(support::programmed(&api, "default", name));
    }
    let v4 = vips_of(&api, &v4_names);
    let v6 = vips_of(&api, &v6_names);
    let all: Vec<IpAddr> = v4.iter().chain(&v6).copied().collect();
    let mut live: BTreeSet<usize> = (1..=EDGES).collect();

    // (a) Exactly one edge holds each VIP, the client reaches it through
    // that edge's MAC, and the Service's condition names it.
    let owners = settled(&edges, &all, &live, "every VIP on exactly one edge");
    assert_eq!(
        owners[..V4].iter().collect::<BTreeSet<_>>().len(),
        EDGES,
        "six IPv4 VIPs spread over the three edges: {owners:?}"
    );
    for (k, &vip) in all.iter().enumerate() {
        wait_for(
            Duration::from_secs(10),
            &format!("a connection to {vip}"),
            || connect(&client, vip).ok(),
        );
        assert_eq!(
            neighbour(&client, vip).as_deref(),
            Some(macs[owners[k] - 1].as_str()),
            "{vip}: the client's neighbour entry is its owner's MAC"
        );
    }
    // Each lbd's status says who owns each VIP, and why it does not
    // announce the others.
    for i in 1..=EDGES {
        let sock = dir.path(&format!("e{i}.sock"));
        let status: Value = rt.block_on(async {
            let (_, body) = lb_api::client::request(&sock, hyper::Method::GET, "/v1/status", None)
                .await
                .unwrap();
            serde_json::from_slice(&body).unwrap()
        });
        for (k, &vip) in all.iter().enumerate() {
            let v = status["announce"]["vips"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["vip"] == vip.to_string())
                .unwrap_or_else(|| panic!("{vip} in lbd {i}'s status: {status}"));
            assert_eq!(v["owner"], edge_name(owners[k]), "{v}");
            assert_eq!(v["announced"], owners[k] == i, "{v}");
            if owners[k] != i {
                assert_eq!(v["reason"], "not_owner", "{v}");
            }
        }
    }
    let name = &v4_names[0];
    wait_for(
        Duration::from_secs(10),
        "the condition names the owner",
        || {
            condition_message(&api, name)
                .contains(&format!("{} ({})", edge_name(owners[0]), all[0]))
                .then_some(())
        },
    );
    assert!(
        !support::events_for(&api, name, "AnnouncerChosen").is_empty(),
        "an Event says who announces {name}"
    );

    // (d) Controller stopped: every VIP stays where it is and serves, past
    // the lease (1.2 s here); restarted: nothing moves.
    let before: Vec<_> = (1..=EDGES).map(|i| owners_in(&dir, &rt, i)).collect();
    controller.signal("KILL");
    controller.wait_exit(Duration::from_secs(5));
    let quiet_until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < quiet_until {
        assert_eq!(
            settled(&edges, &all, &live, "VIPs stay without the controller"),
            owners
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for &vip in &all {
        connect(&client, vip).unwrap_or_else(|e| panic!("{vip} without the controller: {e}"));
    }
    // An lbd restarted while the controller is down takes its VIPs back
    // from its persisted state once its lease has passed (static
    // stability), and no other edge takes them meanwhile.
    let restarted = owners[0];
    let mine: Vec<IpAddr> = all
        .iter()
        .zip(&owners)
        .filter(|(_, &o)| o == restarted)
        .map(|(v, _)| *v)
        .collect();
    let old = lbds[restarted - 1].take().unwrap();
    old.signal("KILL");
    drop(old);
    let back_at = Instant::now();
    lbds[restarted - 1] = Some(start_lbd(&edges[restarted - 1], &dir, restarted));
    // First it holds back (the persisted map may be stale), removing what
    // the killed run left; the lease later it announces again.
    wait_for(
        Duration::from_secs(5),
        "the restarted lbd holds back",
        || {
            mine.iter()
                .all(|&v| !holds(&edges[restarted - 1], v))
                .then_some(())
        },
    );
    assert_eq!(
        settled(&edges, &all, &live, "the restarted lbd's VIPs come back"),
        owners
    );
    let back = back_at.elapsed();
    eprintln!(
        "lbd edge-{restarted} restarted without the controller: its {} VIPs back after {back:?}",
        mine.len()
    );
    for &vip in &mine {
        wait_for(
            Duration::from_secs(10),
            &format!("{vip} after the restart"),
            || connect(&client, vip).ok(),
        );
    }
    let versions: Vec<u64> = (1..=EDGES).map(|i| version_of(&dir, &rt, i)).collect();
    let changed_before = support::events_for(&api, &v4_names[0], "AnnouncerChanged").len();
    let controller = start_controller(&cfg, &dir, 2);
    wait_for(
        Duration::from_secs(20),
        "the restarted controller programs every edge",
        || {
            (1..=EDGES)
                .all(|i| version_of(&dir, &rt, i) > versions[i - 1])
                .then_some(())
        },
    );
    let after: Vec<_> = (1..=EDGES).map(|i| owners_in(&dir, &rt, i)).collect();
    assert_eq!(
        after, before,
        "a restarted controller moves no VIP, epochs included"
    );
    assert_eq!(
        settled(&edges, &all, &live, "VIPs stay after the restart"),
        owners
    );
    let moved: usize = v4_names
        .iter()
        .chain(&v6_names)
        .map(|n| support::events_for(&api, n, "AnnouncerChanged").len())
        .sum();
    assert_eq!(
        moved, changed_before,
        "no AnnouncerChanged Event after the restart"
    );

    // Partition: the controller loses an owner (its control socket is
    // moved away) while the LAN does not. Its VIPs move; the old owner,
    // cut off for its lease and seeing the new owners' announcements,
    // stops answering for them (ARP and NDP alike).
    let cut = (1..=EDGES)
        .rev()
        .find(|&i| owners[..V4].contains(&i) && owners[V4..].contains(&i))
        .expect("an edge owning VIPs of both families");
    let theirs: Vec<IpAddr> = all
        .iter()
        .zip(&owners)
        .filter(|(_, &o)| o == cut)
        .map(|(v, _)| *v)
        .collect();
    let sock = dir.path(&format!("e{cut}.sock"));
    let away = dir.path(&format!("e{cut}.sock.cut"));
    std::fs::rename(&sock, &away).unwrap();
    let cut_at = Instant::now();
    live.remove(&cut);
    let moved_to = settled(&edges, &all, &live, "the cut-off edge's VIPs move");
    // Each of its VIPs on one host only, and the client pointed there (a
    // cut-off owner that announced again would pull it back).
    let one_owner = |what: &str| {
        for &v in &theirs {
            let on = holders(&edges, v);
            assert_eq!(on.len(), 1, "{what}: {v} on {on:?}");
            assert_eq!(
                neighbour(&client, v).as_deref(),
                Some(macs[on[0] - 1].as_str()),
                "{what}: the client's entry for {v}"
            );
        }
    };
    wait_for(
        Duration::from_secs(5),
        "the cut-off owner gives its VIPs up",
        || {
            theirs
                .iter()
                .all(|&v| !holds(&edges[cut - 1], v))
                .then_some(())
        },
    );
    let gave_up = cut_at.elapsed();
    eprintln!(
        "partition of edge-{cut}: its {} VIPs given up after {gave_up:?}",
        theirs.len()
    );
    assert!(
        gave_up < Duration::from_millis(1200 + 1000),
        "a cut-off owner stops answering within its lease and a second: {gave_up:?}"
    );
    for &vip in &theirs {
        connect(&client, vip).unwrap_or_else(|e| panic!("{vip} after the partition: {e}"));
    }
    one_owner("after the partition");
    // Healed: it is live again and takes nothing back.
    std::fs::rename(&away, &sock).unwrap();
    live.insert(cut);
    let healed = version_of(&dir, &rt, (1..=EDGES).find(|i| *i != cut).unwrap());
    wait_for(
        Duration::from_secs(20),
        "the healed edge runs the current state",
        || (version_of(&dir, &rt, cut) >= healed).then_some(()),
    );
    let owners = settled(&edges, &all, &live, "nothing moves back");
    one_owner("healed");
    assert_eq!(
        owners, moved_to,
        "a forwarder that comes back takes no VIP back"
    );

    // (b, e) kill -9 of the owner of an IPv4 and an IPv6 VIP.
    let victim = (1..=EDGES)
        .find(|&i| owners[..V4].contains(&i) && owners[V4..].contains(&i))
        .expect("an edge owning VIPs of both families");
    assert_ne!(victim, cut, "the first such edge, the cut one was the last");
    let vip4 = v4[owners[..V4].iter().position(|&o| o == victim).unwrap()];
    let vip6 = v6[owners[V4..].iter().position(|&o| o == victim).unwrap()];
    for vip in [vip4, vip6] {
        assert_eq!(
            neighbour(&client, vip).as_deref(),
            Some(macs[victim - 1].as_str()),
            "before the kill, the client reaches {vip} through its owner"
        );
    }
    let probes = [Prober::start(&client, vip4), Prober::start(&client, vip6)];
    std::thread::sleep(Duration::from_millis(200));
    let killed_at = Instant::now();
    lbds[victim - 1].as_ref().unwrap().signal("KILL");
    live.remove(&victim);
    let (to4, to6) = (
        new_owner(&edges, &live, vip4),
        new_owner(&edges, &live, vip6),
    );
    for (vip, to) in [(vip4, to4), (vip6, to6)] {
        wait_for(
            Duration::from_secs(10),
            &format!("the client learns {vip}'s new MAC"),
            || (neighbour(&client, vip).as_deref() == Some(macs[to - 1].as_str())).then_some(()),
        );
    }
    // A second of successes after the move, then the record.
    std::thread::sleep(Duration::from_secs(1));
    for (probe, vip) in probes.into_iter().zip([vip4, vip6]) {
        let (started, seen) = probe.stop();
        let (failed, window) = outage(&seen);
        let kill = killed_at - started;
        eprintln!(
            "kill -9 edge-{victim}: {vip}: {failed} of {} connections failed, outage {window:?} (killed at {kill:?})",
            seen.len()
        );
        assert!(
            window <= Duration::from_secs(1),
            "{vip}: failures for {window:?} after kill -9 (at most 1 s)"
        );
    }
    assert!(
        support::events_for(
            &api,
            &v4_names[all.iter().position(|v| *v == vip4).unwrap()],
            "AnnouncerChanged"
        )
        .iter()
        .any(|e| e["note"]
            .as_str()
            .unwrap_or_default()
            .contains(&edge_name(victim))),
        "an Event tells the move"
    );
    // The leader's view in its metrics.
    let scrape = support::http_get(&metrics, "/metrics").unwrap_or_default();
    let victim_ready = format!(
        "weir_controller_forwarder_ready{{forwarder=\"{}\"}}",
        edge_name(victim)
    );
    assert_eq!(
        support::metric(&scrape, &victim_ready),
        Some(0.0),
        "{scrape}"
    );
    assert!(
        support::metric(
            &scrape,
            "weir_controller_l2_owner_changes_total{change=\"moved\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "{scrape}"
    );
    let moved_name = &v4_names[all.iter().position(|v| *v == vip4).unwrap()];
    wait_for(
        Duration::from_secs(10),
        "the condition names the new owner",
        || {
            condition_message(&api, moved_name)
                .contains(&format!("{} ({vip4})", edge_name(to4)))
                .then_some(())
        },
    );

    // (c) SIGTERM of a remaining owner: planned handover, no failure.
    let owners = settled(&edges, &all, &live, "VIPs settle on the two edges left");
    let leaving = *live
        .iter()
        .find(|&&i| owners[..V4].contains(&i))
        .expect("a live edge owning an IPv4 VIP");
    let vip = v4[owners[..V4].iter().position(|&o| o == leaving).unwrap()];
    let probe = Prober::start(&client, vip);
    std::thread::sleep(Duration::from_millis(200));
    let lbd = lbds[leaving - 1].as_mut().unwrap();
    lbd.signal("TERM");
    live.remove(&leaving);
    let to = new_owner(&edges, &live, vip);
    wait_for(
        Duration::from_secs(10),
        "the client learns the new MAC",
        || (neighbour(&client, vip).as_deref() == Some(macs[to - 1].as_str())).then_some(()),
    );
    let status = lbd.wait_exit(Duration::from_secs(20));
    assert!(
        status.success(),
        "lbd {leaving} exits cleanly on SIGTERM: {status}"
    );
    let (_, seen) = probe.stop();
    let (failed, _) = outage(&seen);
    eprintln!(
        "SIGTERM edge-{leaving}: {vip}: {failed} of {} connections failed",
        seen.len()
    );
    assert_eq!(failed, 0, "a planned handover loses no connection");
    assert!(
        !holds(&edges[leaving - 1], vip),
        "the stopped lbd removed its VIP"
    );
    settled(&edges, &all, &live, "every VIP on the last edge");

    // The processes go first (killed on drop), then the namespaces.
    drop(controller);
    drop(lbds);
}
