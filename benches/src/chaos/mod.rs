//! `lb-bench chaos`: the release `lbd`, on each engine, under the faults
//! an edge host meets (issue 31): back-to-back applies and reloads, a
//! backend killed, frozen or black-holed, running out of descriptors,
//! hostile control clients, a flood of UDP sources, and `kill -9` with a
//! restart, each under load from real clients to real backends on
//! loopback (or in namespaces of the run's own). One row per scenario and
//! engine goes to `benches/RELIABILITY.md` (and the figures to the `.json`
//! beside it).
//!
//! This file is the command line, the run and the page; each fault family
//! has its own file, which uses the shared pieces (`rig` for lbd,
//! `traffic` for the load, `backends`, `state`, `report`) and nothing of
//! the others.

mod backend_faults;
mod backends;
mod control_flood;
mod fd_limit;
mod flood;
mod metrics;
mod netns;
mod notes;
mod plan;
mod reconfig;
mod report;
mod restart;
mod rig;
mod state;
mod traffic;
mod udp_flood;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub use backends::serve_forever;
use plan::{Case, Plan};
use report::{Header, Row, Verdict};

/// `chaos` options. Counts left unset take the figures, or a
/// smoke run's with `--quick`.
#[derive(clap::Args)]
pub struct Args {
    /// Engines to run, in turn.
    #[arg(long, value_delimiter = ',', default_value = "epoll,io_uring")]
    engines: Vec<String>,
    /// Scenarios to run [default: all].
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Scenario>,
    /// A short smoke run (fewer applies, reloads, clients, seconds).
    #[arg(long)]
    quick: bool,
    /// Applies (`PUT /v1/state`) under load [default: 1000; quick 50].
    #[arg(long)]
    applies: Option<usize>,
    /// Reloads (SIGHUP) under load [default: 1000; quick 50].
    #[arg(long)]
    sighups: Option<usize>,
    /// Slow and idle clients on each control surface [default: 1000; quick 200].
    #[arg(long)]
    control_clients: Option<usize>,
    /// Seconds of the control flood [default: 15; quick 3].
    #[arg(long)]
    control_seconds: Option<u64>,
    /// Seconds of the UDP flood [default: 10; quick 3].
    #[arg(long)]
    udp_seconds: Option<u64>,
    /// `kill -9` and restarts of lbd under load [default: 3; quick 1].
    #[arg(long)]
    kills: Option<usize>,
    /// Flow cap (`max_connections`) of the flooded UDP listener.
    #[arg(long, default_value_t = 1000)]
    flow_cap: u32,
    /// Open-files limit of lbd in the descriptor exhaustion scenario.
    #[arg(long, default_value_t = 1024)]
    nofile: u64,
    /// New connections per second of the steady load.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Requests in flight at most in the steady load.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// lbd's workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Keep lbd's configurations and logs (in $TMPDIR/weir-chaos-PID).
    #[arg(long)]
    keep: bool,
    /// Where the markdown goes (the JSON goes beside it).
    #[arg(long, default_value = "benches/RELIABILITY.md")]
    out: PathBuf,
}

/// The scenarios, in the order.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Applies,
    Sighups,
    Backends,
    Fds,
    Control,
    Udp,
    Restart,
}

type Runner = fn(&Case) -> anyhow::Result<Vec<Row>>;

const SCENARIOS: [(Scenario, &str, Runner); 7] = [
    (Scenario::Applies, "applies", reconfig::applies),
    (Scenario::Sighups, "SIGHUPs", reconfig::sighups),
    (Scenario::Backends, "backend faults", backend_faults::run),
    (Scenario::Fds, "descriptor exhaustion", fd_limit::run),
    (Scenario::Control, "control clients", control_flood::run),
    (Scenario::Udp, "UDP source flood", udp_flood::run),
    (Scenario::Restart, "kill -9 and restart", restart::run),
];

fn plan(a: &Args) -> Plan {
    let q = a.quick;
    Plan {
        applies: a.applies.unwrap_or(if q { 50 } else { 1000 }),
        sighups: a.sighups.unwrap_or(if q { 50 } else { 1000 }),
        control_clients: a.control_clients.unwrap_or(if q { 200 } else { 1000 }),
        control_seconds: a.control_seconds.unwrap_or(if q { 3 } else { 15 }),
        flow_cap: a.flow_cap.max(1),
        udp_seconds: a.udp_seconds.unwrap_or(if q { 3 } else { 10 }),
        kills: a.kills.unwrap_or(if q { 1 } else { 3 }).max(1),
        nofile: a.nofile,
        rate: a.rate.max(1.0),
        concurrency: a.concurrency.max(1),
        workers: a.workers.max(1),
        settle: Duration::from_secs(if q { 1 } else { 2 }),
    }
}

/// Runs the scenarios on every engine and writes the page.
pub fn run(args: Args) -> anyhow::Result<()> {
    crate::interrupt::install()?;
    raise_open_files();
    let bin = crate::support::sibling("lbd")?;
    let plan = plan(&args);
    let started = Instant::now();
    let (date, load_start) = (utc_now(), crate::support::load_average());
    let dir = std::env::temp_dir().join(format!("weir-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut rows = Vec::new();
    for engine in &args.engines {
        for (scenario, name, runner) in SCENARIOS {
            if !args.only.is_empty() && !args.only.contains(&scenario) {
                continue;
            }
            eprintln!("chaos: {engine}: {name}");
            let case = Case {
                plan: &plan,
                engine,
                dir: dir
                    .join(engine)
                    .join(format!("{scenario:?}").to_lowercase()),
                bin: &bin,
            };
            match runner(&case) {
                Ok(r) => rows.extend(r),
                Err(e) => {
                    let mut row = Row::not_run(engine, name, &format!("{e:#}"));
                    row.failures = format!("scenario failed: {e:#}");
                    row.verdict = Verdict::NotMet;
                    rows.push(row);
                }
            }
            if let Some(last) = rows.last() {
                eprintln!("chaos: {engine}: {name}: {}", last.failures);
            }
        }
    }
    let header = Header {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        cpu: crate::support::cpu_model(),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        commit: commit(),
        date,
        wall: format!("{:.1} min", started.elapsed().as_secs_f64() / 60.0),
        load: (load_start, crate::support::load_average()),
        workers: plan.workers.to_string(),
    };
    let text = report::markdown(&header, &rows, &notes::notes(&plan));
    std::fs::write(&args.out, &text)?;
    std::fs::write(
        args.out.with_extension("json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    print!("{text}");
    eprintln!("wrote {}", args.out.display());
    if args.keep {
        eprintln!("lbd's files and logs: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// The flood scenarios hold thousands of sockets here: the soft
/// open-files limit goes up to the hard one.
fn raise_open_files() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    );
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

/// Output of a command, trimmed, or `None`.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The commit of this checkout, and whether lbd's sources differ from it.
fn commit() -> String {
    let Some(head) = output("git", &["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown (not a git checkout)".into();
    };
    let dirty = output("git", &["status", "--porcelain", "--", "lb-core", "config"])
        .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head} with uncommitted changes to lb-core or config")
    } else {
        head
    }
}

fn utc_now() -> String {
    output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| "unknown".into())
}
