//! A measurement, not a check of the suite (ignored; root and bird2):
//! how long 1,000 VIPs take from a `PUT /v1/state` to routes in the
//! router's BIRD table, and that a change to one VIP afterwards changes
//! that VIP alone. The figures go to `benches/RESULTS-announce.md`:
//!
//! ```sh
//! cargo test --release -p lb-core --test bgp_scale -- --ignored --nocapture
//! ```

mod netns;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use lb_api::client::{PutOutcome, Target};
use lb_config::{BackendSpec, DesiredState, HealthSpec, ListenerSpec};
use netns::*;

const LBD: &str = env!("CARGO_BIN_EXE_lbd");
const VIPS: usize = 1000;

/// VIP `n` in 198.18.0.0/22 (the benchmarking range).
fn vip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, (n / 250) as u8, (n % 250 + 1) as u8)
}

fn state(version: u64, count: usize) -> DesiredState {
    DesiredState {
        version,
        listeners: (0..count)
            .map(|n| {
                let mut l = ListenerSpec::new(format!("vip-{n}"), format!("{}:80", vip(n)));
                l.backends = vec![BackendSpec {
                    addr: "10.98.0.21:8080".into(),
                    weight: None,
                }];
                l.health = Some(HealthSpec {
                    kind: Some(lb_config::HealthKind::None),
                    ..HealthSpec::default()
                });
                l
            })
            .collect(),
        l2: None,
    }
}

/// Routes in the router's BIRD-written table.
fn routes(router: &Netns) -> usize {
    router
        .ip_out(&["route", "show", "table", "100"])
        .unwrap_or_default()
        .lines()
        .count()
}

/// How many VIPs the edge's status says are announced.
fn announced(socket: &std::path::Path) -> u64 {
    let target = Target::Unix(socket.to_owned());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let st = rt
        .block_on(lb_api::client::status(&target))
        .expect("status");
    st.announce
        .map(|a| a.vips.iter().filter(|v| v.announced).count() as u64)
        .unwrap_or(0)
}

#[test]
#[ignore = "a measurement: cargo test --release -p lb-core --test bgp_scale -- --ignored --nocapture"]
fn thousand_vips_from_put_to_router() {
    assert!(is_root(), "needs root (network namespaces)");
    assert!(
        Command::new("bird").arg("--version").output().is_ok(),
        "needs bird2"
    );
    let tag = format!("ws{}", std::process::id() % 100_000);
    let dir = TempDir::new("bgp-scale");
    let router = Netns::new(&format!("{tag}-router"));
    let edge = Netns::new(&format!("{tag}-edge"));
    veth(
        &router,
        "re1",
        "10.99.1.1/24",
        &edge,
        "uplink",
        "10.99.1.2/24",
    );

    let _router_bird = Bird::start(
        &router,
        &dir,
        "router",
        &bird_router_config("10.99.1.1", &[Ipv4Addr::new(10, 99, 1, 2)]),
    );
    let socket = dir.path("edge.sock");
    let conf = dir.path("edge.toml");
    std::fs::write(
        &conf,
        format!(
            "[runtime]\nworkers = 1\n[admin]\nmetrics = \"127.0.0.1:9600\"\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n[announce]\nmode = \"bgp\"\n",
            socket.display(),
            dir.path("state").display()
        ),
    )
    .unwrap();
    let mut cmd = edge.command(LBD);
    cmd.args(["run", "--config"])
        .arg(&conf)
        .env("LBD_LOG", "info");
    let _lbd = Proc::spawn(cmd, "lbd", &dir.path("lbd.log"));
    let _edge_bird = Bird::start(
        &edge,
        &dir,
        "edge",
        &bird_edge_config(
            Ipv4Addr::new(10, 99, 1, 2),
            "10.99.1.1",
            Some("198.18.0.0/22"),
        ),
    );
    wait_for(Duration::from_secs(10), "lbd's control socket", || {
        socket.exists().then_some(())
    });
    // The BGP session first, so that the figure is lbd and BIRD, not
    // BIRD's connect delay.
    wait_for(Duration::from_secs(20), "the BGP session", || {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(dir.path("router-bird.ctl"))
            .args(["show", "protocols", "edge1"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .contains("Established")
            .then_some(())
    });

    let target = Target::Unix(socket.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t0 = Instant::now();
    let outcome = rt
        .block_on(lb_api::client::put_state(&target, &state(1, VIPS)))
        .expect("put");
    let applied = t0.elapsed();
    assert_eq!(outcome, PutOutcome::Applied(1));
    let placed_at = wait_for(Duration::from_secs(30), "every VIP placed", || {
        (announced(&socket) as usize == VIPS).then(|| t0.elapsed())
    });
    let routed = wait_for(
        Duration::from_secs(60),
        "1,000 routes on the router",
        || (routes(&router) == VIPS).then(|| t0.elapsed()),
    );

    // One VIP fewer: one withdrawal, nothing re-announced.
    let before = metric_sum(&edge, "weir_vip_announce_changes_total");
    let t1 = Instant::now();
    let outcome = rt
        .block_on(lb_api::client::put_state(&target, &state(2, VIPS - 1)))
        .expect("put");
    assert_eq!(outcome, PutOutcome::Applied(2));
    wait_for(
        Duration::from_secs(30),
        "one route fewer on the router",
        || (routes(&router) == VIPS - 1).then_some(()),
    );
    let one = t1.elapsed();
    let after = metric_sum(&edge, "weir_vip_announce_changes_total");
    assert_eq!(
        after - before,
        1.0,
        "a change to one VIP is one netlink change"
    );

    eprintln!(
        "{VIPS} VIPs: PUT answered in {applied:?}; all placed on weir0 after {placed_at:?}; all on the router after {routed:?}"
    );
    eprintln!(
        "then one VIP removed: off the router after {one:?}, {} netlink change",
        after - before
    );
    assert!(
        routed < Duration::from_secs(5),
        "1,000 VIPs took {routed:?}"
    );
}

/// The sum of every series of `name` on the edge's metrics endpoint.
fn metric_sum(edge: &Netns, name: &'static str) -> f64 {
    edge.run(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9600").expect("metrics");
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    })
}
