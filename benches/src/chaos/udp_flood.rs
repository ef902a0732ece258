//! Scenario 6: a flood of UDP sources at a listener with a flow cap. Each
//! flood datagram comes from a new source (addresses 127.20.0.0/16, a new
//! port each), so each would open a flow: lbd must refuse those beyond the
//! cap and count them, keep its memory bounded, and go on answering a
//! client whose flow was there first. A newcomer is refused while the
//! flood holds every slot (that is what a cap means) and served once the
//! flood's flows have expired.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::backends::UdpEcho;
use super::plan::Case;
use super::report::{Row, Verdict};

/// Idle timeout of the flooded listener's flows.
const IDLE: &str = "3s";
/// How long a flow's end may take to show, past the idle timeout.
const EXPIRY: Duration = Duration::from_secs(30);

/// A UDP port free on 127.0.0.2, .3 and .4.
fn common_udp_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let port = UdpSocket::bind("127.0.0.2:0")?.local_addr()?.port();
        if ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
            .iter()
            .all(|ip| UdpSocket::bind((*ip, port)).is_ok())
        {
            return Ok(port);
        }
    }
    anyhow::bail!("no UDP port free on 127.0.0.2-4")
}

/// Asks `target` up to `tries` times (waiting `wait` for each answer);
/// how many were answered and when the first was.
fn ask(
    target: SocketAddr,
    tries: usize,
    wait: Duration,
) -> anyhow::Result<(usize, Option<Duration>)> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.connect(target)?;
    s.set_read_timeout(Some(wait))?;
    let started = Instant::now();
    let (mut answered, mut first) = (0, None);
    let mut buf = [0u8; 64];
    for _ in 0..tries {
        let _ = s.send(b"newcomer");
        if s.recv(&mut buf).is_ok() {
            answered += 1;
            first.get_or_insert(started.elapsed());
        }
    }
    Ok((answered, first))
}

/// The well-behaved client: a datagram every 10 ms, each waiting up to
/// 200 ms for its echo; (sent, answered, longest silence in ms).
fn steady_client(
    target: SocketAddr,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<(u64, u64, f64)>> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.connect(target)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(std::thread::spawn(move || {
        let (mut sent, mut answered) = (0u64, 0u64);
        let (mut last, mut gap) = (Instant::now(), 0f64);
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) && sent < 1_000_000 {
            let _ = s.send(&sent.to_be_bytes());
            sent += 1;
            if s.recv(&mut buf).is_ok() {
                answered += 1;
                gap = gap.max(last.elapsed().as_secs_f64() * 1e3);
                last = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(10)); // its pace
        }
        (sent, answered, gap)
    }))
}

/// Sends one datagram from each of as many new sources as it can until
/// `until`; how many.
fn flood(target: SocketAddr, until: Instant, sent: &AtomicU64) {
    let mut i: u32 = 0;
    while Instant::now() < until {
        i = i.wrapping_add(1);
        let ip = Ipv4Addr::new(127, 20, (i / 250 % 250) as u8, (i % 250 + 1) as u8);
        if let Ok(s) = UdpSocket::bind((ip, 0)) {
            if s.send_to(b"flood", target).is_ok() {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub fn run(case: &Case) -> anyhow::Result<Vec<Row>> {
    let port = common_udp_port()?;
    let backends: Vec<SocketAddr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|ip| SocketAddr::new(ip.parse().expect("IPv4"), port))
        .collect();
    let _echoes = backends
        .iter()
        .map(|a| UdpEcho::start(*a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let target = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let mut lbd = case.lbd("udp")?;
    let cap = case.plan.flow_cap;
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ addr = \"{b}\" }}"))
        .collect();
    lbd.write_config(&format!(
        "{}\n[[listener]]\nname = \"udp\"\nbind = \"{target}\"\nprotocol = \"udp\"\nmax_connections = {cap}\nidle_timeout = \"{IDLE}\"\nbackends = [{}]\n",
        lbd.admin(""),
        list.join(", ")
    ))?;
    lbd.launch()?;
    ask(target, 50, Duration::from_millis(100))?
        .1
        .ok_or_else(|| anyhow::anyhow!("no UDP answer through lbd before the flood"))?;
    let rss_before = lbd.rss_mib();
    let stop = Arc::new(AtomicBool::new(false));
    let steady = steady_client(target, stop.clone())?;
    std::thread::sleep(case.plan.settle);
    let seconds = case.plan.udp_seconds;
    let until = Instant::now() + Duration::from_secs(seconds);
    let sent = AtomicU64::new(0);
    let (mut rss_peak, mut flows_peak, mut newcomer_during) = (rss_before, 0f64, (0, None));
    std::thread::scope(|s| {
        s.spawn(|| flood(target, until, &sent));
        let mut asked = false;
        while Instant::now() < until {
            rss_peak = rss_peak.max(lbd.rss_mib());
            let flows = lbd.metric("weir_udp_flows_active", &[]).unwrap_or(0.0);
            flows_peak = flows_peak.max(flows);
            if !asked && Instant::now() + Duration::from_secs(seconds / 2) >= until {
                asked = true;
                newcomer_during = ask(target, 10, Duration::from_millis(100)).unwrap_or((0, None));
            } else {
                std::thread::sleep(Duration::from_millis(200)); // sampling pace
            }
        }
    });
    let flood_end = Instant::now();
    let expired = crate::support::wait_until("the flood's flows to expire", || {
        flood_end.elapsed() > EXPIRY
            || lbd
                .metric("weir_udp_flows_active", &[])
                .is_ok_and(|f| f <= 1.0)
    })?;
    let flows_left = lbd.metric("weir_udp_flows_active", &[]).unwrap_or(f64::NAN);
    let newcomer_after = ask(target, 20, Duration::from_millis(200))?;
    let rss_after = lbd.rss_mib();
    stop.store(true, Ordering::Relaxed);
    let (w_sent, w_answered, w_gap) = steady
        .join()
        .map_err(|_| anyhow::anyhow!("the steady client panicked"))?;
    let metric = |n: &str, l: &[(&str, &str)]| lbd.metric(n, l).unwrap_or(f64::NAN);
    let created = metric("weir_udp_flows_created_total", &[]);
    let refused = metric("weir_udp_drops_total", &[("reason", "flow_limit")]);
    let local = metric("weir_udp_drops_total", &[("reason", "local_error")]);
    let expired_n = metric("weir_udp_flows_expired_total", &[]);
    let sent = sent.into_inner();
    let panics = lbd.panics();
    let mut row = case.row(format!("UDP flood of new sources, flow cap {cap}"));
    row.load = format!(
        "1 client, a datagram every 10 ms (each waiting ≤ 200 ms for its echo): {w_sent} sent, {w_answered} answered, longest silence {w_gap:.0} ms"
    );
    row.faults = format!("{sent} datagrams from {sent} new sources (127.20.0.0/16) in {seconds} s");
    row.failures = format!(
        "flows refused (flow_limit) {refused}, local_error {local}; a newcomer during the flood: {}/10 answered; \
         after the flood's flows expired ({:.1} s): {}/20 answered",
        newcomer_during.0,
        (expired - flood_end).as_secs_f64(),
        newcomer_after.0
    );
    row.lost = format!(
        "steady client: {} of {w_sent} unanswered; flows: {created} created, {expired_n} expired (idle {IDLE}), \
         peak {flows_peak} active, {flows_left} left; lbd RSS {rss_before:.1} MiB before, {rss_peak:.1} peak, {rss_after:.1} after",
        w_sent - w_answered
    );
    row.expected = "flows ≤ cap, refusals counted, memory bounded, the established client answered, newcomers served once flows expire".into();
    let steady_ok = w_answered as f64 >= 0.99 * w_sent as f64;
    row.verdict = Verdict::of(
        steady_ok
            && flows_peak <= f64::from(cap)
            && newcomer_after.0 > 0
            && refused > 0.0
            && panics.is_empty(),
    );
    row.figures = json!({
        "flow_cap": cap, "flood_datagrams": sent, "flood_seconds": seconds,
        "steady": { "sent": w_sent, "answered": w_answered, "longest_silence_ms": w_gap },
        "refused_flow_limit": refused, "local_error": local, "created": created, "expired": expired_n,
        "flows_peak": flows_peak, "flows_left": flows_left,
        "newcomer_during": newcomer_during.0, "newcomer_after": newcomer_after.0,
        "rss_mib": { "before": rss_before, "peak": rss_peak, "after": rss_after }, "panics": panics,
    });
    Ok(vec![row])
}
