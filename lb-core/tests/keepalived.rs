//! The standalone active/standby recipe of `deploy/keepalived/`, run as
//! shipped: two edge hosts, each running `lbd` and keepalived, hold one VIP
//! in turn in front of two backends, while a client opens a connection to
//! the VIP every 20 ms and the active side fails in four ways (lbd killed,
//! host lost, planned stop with and without the hand-over).
//!
//! ```text
//!              front bridge                   back bridge
//!  client ───────┬─── eth0  edge-a  eth1 ───────┬─── backends
//!  192.0.2.2     │    192.0.2.11    10.0.0.2    │    10.0.0.11:8080
//!                └─── eth0  edge-b  eth1 ───────┘    10.0.0.12:8080
//!                     192.0.2.12    10.0.0.3
//!  VIP 192.0.2.10 (lbd listens on :80) on eth0 of the active edge
//! ```
//!
//! Every host is a network namespace of this run, and both bridges sit in
//! one more namespace, so nothing is added to the host's own networking
//! and no packet can leave the lab. The files are the recipe's own
//! (`keepalived.conf`, `lbd.toml`, `lbd-ready`, `lbd-handover`); the test
//! changes only the paths and the script user (the lab host has no `_weir`
//! account), and the VRRP timers it checks against are read from the
//! shipped `keepalived.conf`. Needs root and keepalived; skips otherwise.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, kill_process_group, Pid, Signal};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

const LBD: &str = env!("CARGO_BIN_EXE_lbd");

/// The recipe, as shipped.
const KEEPALIVED_CONF: &str = include_str!("../../deploy/keepalived/keepalived.conf");
const LBD_TOML: &str = include_str!("../../deploy/keepalived/lbd.toml");
const LBD_READY: &str = include_str!("../../deploy/keepalived/lbd-ready");
const LBD_HANDOVER: &str = include_str!("../../deploy/keepalived/lbd-handover");
const DROP_IN: &str = include_str!("../../deploy/keepalived/lbd-handover.conf");

/// The addresses the recipe uses; the lab gives them to its namespaces.
const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const VIP_PORT: u16 = 80;
const CLIENT_IP: &str = "192.0.2.2/24";
const BACKENDS: [&str; 2] = ["10.0.0.11:8080", "10.0.0.12:8080"];
/// The handover flag the recipe's check and drop-in agree on.
const RECIPE_FLAG: &str = "/run/lbd-handover";

/// How much later than the VRRP timers a takeover may be seen here: the
/// check script is a fresh bash each time, and keepalived, two lbds and
/// the client share a CI host's CPUs with other builds.
const SLACK: Duration = Duration::from_secs(1);
/// The client's pace: one new connection every 20 ms.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// A client gives up connecting after this long: its kernel has sent the
/// SYN three times by then (after 0, 1 and 3 s).
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(3500);

/// Gives every namespace of this run a unique name.
static LAB_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Where `program` is installed: a directory of `PATH`, or an sbin
/// directory (root's tools). Looked up, never run: an unknown option would
/// start keepalived in the host's own namespace.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Why the lab cannot run here (printed as SKIPPED), or `None`.
fn skip_reason() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (network namespaces, VRRP)".into());
    }
    for (program, package) in [("keepalived", "keepalived"), ("ip", "iproute2")] {
        if find_program(program).is_none() {
            return Some(format!(
                "{program} is not installed (apt-get install {package}); .ci/run installs it"
            ));
        }
    }
    None
}

#[test]
fn keepalived_pair_moves_the_vip_when_the_active_lbd_fails() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: keepalived active/standby pair: {why}");
        return;
    }
    check_recipe_agrees_with_itself();
    let timers = Timers::from_recipe();
    let mut lab = match Lab::new() {
        Ok(lab) => lab,
        Err(Unsupported(why)) => {
            eprintln!("SKIPPED: keepalived active/standby pair: {why}");
            return;
        }
    };
    let probe = Probe::start(&lab.client);
    let (a, b) = (0, 1);
    let (via_a, via_b) = (lab.edges[a].back_ip, lab.edges[b].back_ip);

    // Start: edge-a takes the VIP first (its keepalived starts first and
    // waits out its down timer alone), then edge-b joins as the standby.
    lab.edges[a].start_lbd();
    lab.edges[b].start_lbd();
    lab.edges[a].check_script_follows_readiness(&lab.bin);
    lab.edges[a].start_keepalived();
    lab.wait_vip_only_on(a, timers.master_down(timers.priority[a]) + 10 * SLACK);
    lab.edges[b].start_keepalived();
    lab.edges[b].wait_state("BACKUP", 1, 10 * SLACK);
    lab.assert_vip_only_on(a, "with both keepalived running");
    assert!(
        probe
            .wait_answer_via(via_a, Instant::now(), 5 * SLACK)
            .is_some(),
        "the client reaches a backend through the VIP on edge-a"
    );
    assert_eq!(lab.client_neighbour_of_vip(), lab.edges[a].front_mac);

    // 1. lbd on the active host dies (SIGKILL): its check fails `fall`
    // times, keepalived enters FAULT, drops the VIP and sends priority 0;
    // edge-b takes over after its skew time.
    let crash_bound = timers.after_check_failure(timers.priority[b]);
    let killed_at = Instant::now();
    lab.edges[a].kill_lbd();
    let crash_outage = probe
        .wait_answer_via(via_b, killed_at, crash_bound + 5 * SLACK)
        .expect("the client reaches a backend through edge-b after edge-a's lbd died")
        - killed_at;
    lab.wait_vip_only_on(b, SLACK);
    assert_eq!(
        lab.client_neighbour_of_vip(),
        lab.edges[b].front_mac,
        "the client's neighbour entry for the VIP names edge-b (gratuitous ARP)"
    );
    assert!(
        crash_outage <= crash_bound + SLACK,
        "failover after an lbd crash took {crash_outage:?}; the timers allow {crash_bound:?} (+{SLACK:?})"
    );

    // 2. nopreempt: edge-a's lbd comes back, its keepalived becomes BACKUP
    // again, and the VIP stays on edge-b (a move would cut edge-b's
    // connections for nothing).
    let restarted_at = Instant::now();
    lab.edges[a].start_lbd();
    lab.edges[a].wait_state("BACKUP", 2, timers.rise_time() + 5 * SLACK);
    let held_until = Instant::now() + timers.master_down(timers.priority[a]) + timers.advert_int;
    while Instant::now() < held_until {
        lab.assert_vip_only_on(b, "edge-a is back as the standby (nopreempt)");
        std::thread::sleep(PROBE_EVERY);
    }

    // 3. The active host is lost (its link goes down, as on a power cut):
    // edge-a hears no advert for 3 intervals plus its skew, then takes over.
    let host_bound = timers.master_down(timers.priority[a]);
    let lost_at = Instant::now();
    lab.edges[b].ns.ip(&["link", "set", "eth0", "down"]);
    let host_outage = probe
        .wait_answer_via(via_a, lost_at, host_bound + 5 * SLACK)
        .expect("the client reaches a backend through edge-a after edge-b was lost")
        - lost_at;
    lab.wait_vip_only_on(a, SLACK);
    assert_eq!(lab.client_neighbour_of_vip(), lab.edges[a].front_mac);
    assert!(
        host_outage <= host_bound + SLACK,
        "failover after a host loss took {host_outage:?}; the timers allow {host_bound:?} (+{SLACK:?})"
    );
    // edge-b comes back: it finds edge-a advertising and stays the standby.
    let back_at = Instant::now();
    lab.edges[b].ns.ip(&["link", "set", "eth0", "up"]);
    lab.edges[b].wait_state("BACKUP", 2, 10 * SLACK);
    lab.assert_vip_only_on(a, "edge-b is back as the standby");

    // 4. A planned stop of the active lbd, as the drop-in does it:
    // lbd-handover gives the VIP away, then lbd gets SIGTERM.
    let handover_at = Instant::now();
    lab.edges[a].handover(&lab.bin);
    let handed_over = handover_at.elapsed();
    assert!(
        !lab.edges[a].has_vip(),
        "lbd-handover returns once the VIP has left"
    );
    assert!(
        handed_over <= timers.check_fall_time() + SLACK,
        "lbd-handover took {handed_over:?}; the check gives up after {:?}",
        timers.check_fall_time()
    );
    lab.edges[a].signal_lbd(Signal::TERM);
    probe
        .wait_answer_via(via_b, handover_at, timers.advert_int * 4 + 5 * SLACK)
        .expect("the client reaches a backend through edge-b after the hand-over");
    lab.wait_vip_only_on(b, SLACK);
    assert_eq!(lab.client_neighbour_of_vip(), lab.edges[b].front_mac);

    // 5. The same stop without the hand-over (plain `systemctl stop lbd`):
    // lbd closes its listeners and turns /readyz to 503 at once, so new
    // connections are refused until keepalived notices, as after a crash.
    // edge-a first comes back as the standby: its draining lbd goes (it
    // waits only for connections the move has cut: their packets reach
    // edge-b now), the flag goes as the drop-in's ExecStartPre removes it.
    lab.edges[a].kill_lbd();
    std::fs::remove_file(lab.edges[a].flag()).expect("lbd-handover left its flag");
    lab.edges[a].start_lbd();
    lab.edges[a].wait_state("BACKUP", 3, timers.rise_time() + 5 * SLACK);
    let plain_bound = timers.after_check_failure(timers.priority[a]);
    let stopped_at = Instant::now();
    lab.edges[b].signal_lbd(Signal::TERM);
    let plain_outage = probe
        .wait_answer_via(via_a, stopped_at, plain_bound + 5 * SLACK)
        .expect("the client reaches a backend through edge-a after edge-b's lbd stopped")
        - stopped_at;
    lab.wait_vip_only_on(a, SLACK);
    assert!(
        plain_outage <= plain_bound + SLACK,
        "failover after SIGTERM took {plain_outage:?}; the timers allow {plain_bound:?} (+{SLACK:?})"
    );

    // Every connection has ended once the clients stop; count them.
    let attempts = probe.stop();
    lab.edges[b].kill_lbd();
    let window = |from: Instant, to: Instant| -> Vec<Attempt> {
        attempts
            .iter()
            .filter(|a| from <= a.start && a.start < to)
            .copied()
            .collect()
    };
    let crash = window(killed_at, restarted_at);
    let host = window(lost_at, back_at);
    let handover = window(handover_at, stopped_at);
    let plain = window(stopped_at, Instant::now());
    assert!(
        !crash.iter().any(|c| c.answered_via(via_a)),
        "nothing is answered through edge-a once its lbd is dead"
    );
    let handover_counts = Counts::of(&handover);
    assert_eq!(
        (handover_counts.refused, handover_counts.timed_out),
        (0, 0),
        "a planned hand-over refuses no connection and leaves none unanswered: {handover_counts}"
    );
    let handover_pause = pause_between(&handover, via_a, via_b, handover_at);
    assert!(
        handover_pause <= timers.skew(timers.priority[b]) + SLACK,
        "answers paused {handover_pause:?} during the hand-over; edge-b's skew is {:?}",
        timers.skew(timers.priority[b])
    );

    eprintln!(
        "keepalived pair (advert_int {:?}, check every {:?}, fall {}; a new client connection every \
         {PROBE_EVERY:?}, {} in all):\n\
         \x20 lbd killed (SIGKILL) on the active host: first answer through the standby {:.2} s \
         after the kill (the timers allow {:.2} s); {}\n\
         \x20 active host lost (link down): first answer through the standby {:.2} s after the \
         loss (the timers allow {:.2} s); {}\n\
         \x20 planned hand-over (lbd-handover, then SIGTERM): VIP left after {:.2} s, answers \
         paused {:.2} s; {handover_counts}\n\
         \x20 SIGTERM without the hand-over: first answer through the standby {:.2} s after \
         the signal (the timers allow {:.2} s); {}",
        timers.advert_int,
        timers.interval,
        timers.fall,
        attempts.len(),
        crash_outage.as_secs_f64(),
        crash_bound.as_secs_f64(),
        Counts::of(&crash),
        host_outage.as_secs_f64(),
        host_bound.as_secs_f64(),
        Counts::of(&host),
        handed_over.as_secs_f64(),
        handover_pause.as_secs_f64(),
        plain_outage.as_secs_f64(),
        plain_bound.as_secs_f64(),
        Counts::of(&plain),
    );
}

/// The recipe's parts name the same VIP and the same handover flag.
fn check_recipe_agrees_with_itself() {
    assert!(
        KEEPALIVED_CONF.contains(&format!("{VIP}/24 dev eth0")),
        "keepalived.conf holds the VIP {VIP}"
    );
    assert!(
        LBD_TOML.contains(&format!("bind = \"{VIP}:{VIP_PORT}\"")),
        "lbd.toml listens on the VIP"
    );
    for (file, text) in [
        ("keepalived.conf", KEEPALIVED_CONF),
        ("lbd-ready", LBD_READY),
        ("lbd-handover", LBD_HANDOVER),
        ("lbd-handover.conf", DROP_IN),
    ] {
        assert!(text.contains(RECIPE_FLAG), "{file} uses {RECIPE_FLAG}");
    }
    assert!(
        DROP_IN.contains(&format!("ExecStop=+/etc/keepalived/lbd-handover {VIP}\n")),
        "the drop-in hands over the VIP of keepalived.conf"
    );
    assert!(
        DROP_IN.contains(&format!("ExecStartPre=+/bin/rm -f {RECIPE_FLAG}\n")),
        "the drop-in clears the flag before lbd starts"
    );
}

/// The VRRP timing the shipped `keepalived.conf` sets, and what follows
/// from it: VRRP's Skew_Time and Master_Down_Interval (RFC 5798 section
/// 6.1), and how keepalived runs its checks.
#[derive(Debug)]
struct Timers {
    advert_int: Duration,
    /// Time from one run of the check to the next.
    interval: Duration,
    /// Failed checks in a row before the instance enters FAULT.
    fall: u32,
    rise: u32,
    /// edge-a's and edge-b's.
    priority: [u32; 2],
}

impl Timers {
    fn from_recipe() -> Self {
        let setting = |key: &str| -> f64 {
            let mut found = KEEPALIVED_CONF.lines().filter_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some(key)).then(|| words.next().map(str::to_owned))
            });
            let value = found.next().flatten();
            assert!(found.next().is_none(), "keepalived.conf sets {key} once");
            value
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("keepalived.conf sets {key} to a number"))
        };
        let priority = |host: &str| -> u32 {
            let line = KEEPALIVED_CONF
                .lines()
                .find(|l| l.starts_with(&format!("@{host} priority ")))
                .unwrap_or_else(|| panic!("keepalived.conf gives {host} a priority"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        Self {
            advert_int: Duration::from_secs_f64(setting("advert_int")),
            interval: Duration::from_secs_f64(setting("interval")),
            fall: setting("fall") as u32,
            rise: setting("rise") as u32,
            priority: [priority("edge-a"), priority("edge-b")],
        }
    }

    /// How much sooner a higher priority takes over: (256 - priority) /
    /// 256 advert intervals.
    fn skew(&self, priority: u32) -> Duration {
        self.advert_int * (256 - priority) / 256
    }

    /// A backup becomes master this long after the last advert it heard.
    fn master_down(&self, priority: u32) -> Duration {
        self.advert_int * 3 + self.skew(priority)
    }

    /// From lbd dying to the last failed check: the next check runs within
    /// one interval, and `fall` of them must fail.
    fn check_fall_time(&self) -> Duration {
        self.interval * self.fall
    }

    /// From a passing lbd to a check that lets the instance leave FAULT.
    fn rise_time(&self) -> Duration {
        self.interval * self.rise
    }

    /// From the active lbd dying to the peer (of `priority`) holding the
    /// VIP: the checks fail, then the FAULT host's priority-0 advert starts
    /// the peer's skew timer.
    fn after_check_failure(&self, priority: u32) -> Duration {
        self.check_fall_time() + self.skew(priority)
    }
}

/// The kernel lacks something the lab needs (a bridge, veth): a skip.
struct Unsupported(String);

/// Runs `ip` with `args`; panics with its stderr when it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of this run, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <this> args...`.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A handle that moves a thread into this namespace.
    fn handle(&self) -> File {
        File::open(format!("/run/netns/{}", self.name)).expect("the namespace's handle")
    }

    /// Runs `f` on this thread inside the namespace (sockets it creates
    /// stay there), then returns the thread to where it was, even when
    /// `f` panics.
    fn within<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Return(File);
        impl Drop for Return {
            fn drop(&mut self) {
                move_into_link_name_space(self.0.as_fd(), Some(LinkNameSpaceType::Network))
                    .expect("back to the test's namespace");
            }
        }
        let back = Return(File::open("/proc/thread-self/ns/net").unwrap());
        move_into_link_name_space(self.handle().as_fd(), Some(LinkNameSpaceType::Network))
            .expect("into the namespace");
        let out = f();
        drop(back);
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A process started in a namespace, in a process group of its own (so
/// keepalived's VRRP child and check scripts go with it); stopped on drop.
struct Proc {
    child: Child,
    /// Waited for: its pid may belong to someone else now.
    reaped: bool,
}

impl Proc {
    fn spawn(ns: &Netns, args: &[&str], log: &Path, env: &[(&str, &str)]) -> Self {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        // `ip netns exec` execs the program: the child is the program.
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
        Self {
            child,
            reaped: false,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32).expect("a child has a pid")
    }

    /// Sends `signal` to the process alone.
    fn signal(&self, signal: Signal) {
        assert!(!self.reaped);
        kill_process(self.pid(), signal).expect("signal a child of the test");
    }

    /// Waits up to `within` for the process to exit, and reaps it.
    fn reaped_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.child.try_wait().expect("wait").is_some() {
                self.reaped = true;
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process has exited (a zombie not yet reaped, which
    /// keeps its pid and process group ours).
    fn exited(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        // SIGTERM first: keepalived stops its VRRP child and drops the VIP.
        let _ = kill_process_group(self.pid(), Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Whatever is left in the group (a check script, or a process that
        // ignored SIGTERM) goes now, while the unreaped leader still holds
        // the group's id.
        let _ = kill_process_group(self.pid(), Signal::KILL);
        let _ = self.child.wait();
        self.reaped = true;
    }
}

/// A directory of this run, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates `path` with mode 0755: keepalived runs the check as an
/// unprivileged user, which must reach the script.
fn open_dir(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Replaces the one occurrence of `from` in `text` (the recipe must still
/// contain it, or the test would run something else than it claims).
fn replace_once(text: &str, from: &str, to: &str, file: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{file} contains `{from}` exactly once"
    );
    text.replacen(from, to, 1)
}

/// One edge host: a namespace with lbd and keepalived.
struct Edge {
    // Processes first: they stop before their namespace goes.
    keepalived: Option<Proc>,
    lbd: Option<Proc>,
    ns: Netns,
    name: &'static str,
    dir: PathBuf,
    front_mac: String,
    back_ip: IpAddr,
}

impl Edge {
    fn flag(&self) -> PathBuf {
        self.dir.join("handover")
    }

    fn log(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.log"))
    }

    /// Writes this host's copy of the recipe: only paths and the script
    /// user differ from the shipped files.
    fn write_config(&self, bin: &Path) {
        let dir = self.dir.display();
        let toml = replace_once(
            LBD_TOML,
            "control_socket = \"/run/lbd/control.sock\"",
            &format!("control_socket = \"{dir}/control.sock\""),
            "lbd.toml",
        );
        let toml = replace_once(
            &toml,
            "state_dir = \"/var/lib/lbd\"",
            &format!("state_dir = \"{dir}/state\""),
            "lbd.toml",
        );
        std::fs::write(self.dir.join("lbd.toml"), toml).unwrap();
        // The lab host has no _weir account; nobody is on every Debian host.
        let conf = replace_once(
            KEEPALIVED_CONF,
            "script_user _weir",
            "script_user nobody",
            "keepalived.conf",
        );
        let conf = replace_once(
            &conf,
            &format!("\"/etc/keepalived/lbd-ready 127.0.0.1 9600 {RECIPE_FLAG}\""),
            &format!(
                "\"{}/lbd-ready 127.0.0.1 9600 {}\"",
                bin.display(),
                self.flag().display()
            ),
            "keepalived.conf",
        );
        std::fs::write(self.dir.join("keepalived.conf"), conf).unwrap();
    }

    /// Starts lbd and waits until `/readyz` answers 200.
    fn start_lbd(&mut self) {
        assert!(self.lbd.is_none(), "{}: lbd already runs", self.name);
        let config = self.dir.join("lbd.toml");
        let proc = Proc::spawn(
            &self.ns,
            &[LBD, "run", "--config", config.to_str().unwrap()],
            &self.log("lbd"),
            &[("LBD_LOG", "info")],
        );
        self.lbd = Some(proc);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.readyz() != Some(200) {
            assert!(
                Instant::now() < deadline,
                "{}: lbd did not become ready in 30 s",
                self.name
            );
            std::thread::sleep(PROBE_EVERY);
        }
    }

    /// The status of `GET /readyz` on lbd's admin.metrics address, as
    /// lbd-ready asks it.
    fn readyz(&self) -> Option<u16> {
        self.ns.within(|| {
            let mut s =
                TcpStream::connect_timeout(&"127.0.0.1:9600".parse().unwrap(), SLACK).ok()?;
            s.set_read_timeout(Some(SLACK)).ok()?;
            s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").ok()?;
            let mut reply = String::new();
            s.read_to_string(&mut reply).ok()?;
            reply.split(' ').nth(1)?.parse().ok()
        })
    }

    /// Runs the shipped check as keepalived would (the same arguments,
    /// in this namespace).
    fn run_check(&self, bin: &Path) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(bin.join("lbd-ready"))
            .args(["127.0.0.1", "9600"])
            .arg(self.flag())
            .status()
            .expect("lbd-ready runs")
            .success()
    }

    /// lbd-ready passes while lbd is ready and fails while the hand-over
    /// flag exists.
    fn check_script_follows_readiness(&self, bin: &Path) {
        assert!(
            self.run_check(bin),
            "{}: lbd-ready passes on a ready lbd",
            self.name
        );
        File::create(self.flag()).unwrap();
        assert!(
            !self.run_check(bin),
            "{}: lbd-ready fails while the flag exists",
            self.name
        );
        std::fs::remove_file(self.flag()).unwrap();
    }

    fn start_keepalived(&mut self) {
        let keepalived = find_program("keepalived").expect("keepalived is installed");
        let (conf, pid, vrrp_pid) = (
            self.dir.join("keepalived.conf"),
            self.dir.join("keepalived.pid"),
            self.dir.join("vrrp.pid"),
        );
        // -n: stay in the foreground; -l -G: log to the console (the log
        // file), not to the host's syslog; -P: VRRP only; -i: this host's
        // config id, which picks its @edge-x lines.
        let proc = Proc::spawn(
            &self.ns,
            &[
                keepalived.to_str().unwrap(),
                "-n",
                "-l",
                "-G",
                "-P",
                "-i",
                self.name,
                "-f",
                conf.to_str().unwrap(),
                "-p",
                pid.to_str().unwrap(),
                "-r",
                vrrp_pid.to_str().unwrap(),
            ],
            &self.log("keepalived"),
            &[],
        );
        self.keepalived = Some(proc);
    }

    /// Waits until keepalived has logged its `count`th entry into `state`.
    fn wait_state(&self, state: &str, count: usize, within: Duration) {
        let line = format!("(weir_vip) Entering {state} STATE");
        let deadline = Instant::now() + within;
        loop {
            let log = std::fs::read_to_string(self.log("keepalived")).unwrap_or_default();
            if log.matches(&line).count() >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: keepalived did not enter {state} (time {count}) within {within:?}",
                self.name
            );
            std::thread::sleep(PROBE_EVERY);
        }
    }

    fn has_vip(&self) -> bool {
        !self
            .ns
            .ip(&["-o", "addr", "show", "to", &VIP.to_string()])
            .trim()
            .is_empty()
    }

    /// SIGKILL: no drain, no goodbye, as a crash.
    fn kill_lbd(&mut self) {
        let mut proc = self.lbd.take().expect("lbd runs");
        proc.signal(Signal::KILL);
        assert!(proc.reaped_within(Duration::from_secs(5)));
    }

    /// Signals lbd without waiting for it: after SIGTERM it drains for up
    /// to `drain_timeout`, and the lab is torn down before that ends.
    fn signal_lbd(&self, signal: Signal) {
        self.lbd.as_ref().expect("lbd runs").signal(signal);
    }

    /// Runs the shipped lbd-handover with the drop-in's arguments.
    fn handover(&self, bin: &Path) {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(bin.join("lbd-handover"))
            .arg(VIP.to_string())
            .arg(self.flag())
            .status()
            .expect("lbd-handover runs");
        assert!(status.success(), "{}: lbd-handover failed", self.name);
    }
}

/// The two backends: each answers a connection with its address and the
/// address the connection came from (the edge that forwarded it), then
/// closes.
struct Backends {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backends {
    fn start(ns: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for addr in BACKENDS {
            let addr: SocketAddr = addr.parse().unwrap();
            let listener = ns
                .within(|| TcpListener::bind(addr))
                .expect("backend binds");
            listener.set_nonblocking(true).unwrap();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || serve(listener, addr, &stop)));
        }
        Self { stop, threads }
    }
}

/// Accepts until `stop` (polling it every 5 ms), at most ten minutes.
fn serve(listener: TcpListener, addr: SocketAddr, stop: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match listener.accept() {
            Ok((mut s, peer)) => {
                // Health checks close at once; their errors do not matter.
                let _ = s.set_nonblocking(false);
                let _ = s.write_all(format!("{addr} via {}\n", peer.ip()).as_bytes());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => {}
        }
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The namespaces, processes and files of one run.
struct Lab {
    // Dropped in this order: processes, threads, namespaces, files. The
    // fields with a leading underscore are held for their drop.
    edges: [Edge; 2],
    _backends: Backends,
    _backend_ns: Netns,
    client: Netns,
    _bridges: Netns,
    /// The shipped scripts, in a directory only root may write.
    bin: PathBuf,
    _dir: TempDir,
}

impl Lab {
    fn new() -> Result<Self, Unsupported> {
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("weir-kv{}-{seq}", std::process::id());
        let dir = TempDir(std::env::temp_dir().join(&tag));
        let _ = std::fs::remove_dir_all(&dir.0);
        open_dir(&dir.0);
        let bin = dir.0.join("bin");
        open_dir(&bin);
        for (name, text) in [("lbd-ready", LBD_READY), ("lbd-handover", LBD_HANDOVER)] {
            std::fs::write(bin.join(name), text).unwrap();
            std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }

        let bridges = Netns::create(format!("{tag}-bridges"));
        for bridge in ["front", "back"] {
            let made = Command::new("ip")
                .args(["-n", &bridges.name, "link", "add", bridge, "type", "bridge"])
                .output()
                .expect("ip runs");
            if !made.status.success() {
                return Err(Unsupported(format!(
                    "this kernel cannot create a bridge: {}",
                    String::from_utf8_lossy(&made.stderr).trim()
                )));
            }
            bridges.ip(&["link", "set", bridge, "up"]);
        }
        // Plugs `ns`'s interface `inside` into `bridge` through a veth pair
        // whose bridge end is `port`.
        let plug = |ns: &Netns, inside: &str, mac: &str, port: &str, bridge: &str| {
            let made = Command::new("ip")
                .args(["-n", &bridges.name, "link", "add", port, "type", "veth"])
                .args(["peer", "name", inside, "address", mac, "netns", &ns.name])
                .output()
                .expect("ip runs");
            if !made.status.success() {
                return Err(Unsupported(format!(
                    "this kernel cannot create a veth pair: {}",
                    String::from_utf8_lossy(&made.stderr).trim()
                )));
            }
            bridges.ip(&["link", "set", port, "master", bridge, "up"]);
            ns.ip(&["link", "set", inside, "up"]);
            Ok(())
        };

        let client = Netns::create(format!("{tag}-client"));
        plug(&client, "eth0", "02:99:00:00:00:02", "client", "front")?;
        client.ip(&["addr", "add", CLIENT_IP, "dev", "eth0"]);

        let backend_ns = Netns::create(format!("{tag}-backends"));
        plug(&backend_ns, "eth0", "02:99:00:01:00:0b", "backends", "back")?;
        for addr in BACKENDS {
            let ip = addr.split(':').next().unwrap();
            backend_ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        }

        let mut edges = Vec::new();
        for (i, name) in ["edge-a", "edge-b"].into_iter().enumerate() {
            let ns = Netns::create(format!("{tag}-{name}"));
            let front_mac = format!("02:99:00:00:00:{:02x}", 0x11 + i);
            plug(&ns, "eth0", &front_mac, &format!("{name}-f"), "front")?;
            plug(
                &ns,
                "eth1",
                &format!("02:99:00:01:00:{:02x}", 0x02 + i),
                &format!("{name}-b"),
                "back",
            )?;
            ns.ip(&[
                "addr",
                "add",
                &format!("192.0.2.{}/24", 11 + i),
                "dev",
                "eth0",
            ]);
            let back_ip: IpAddr = format!("10.0.0.{}", 2 + i).parse().unwrap();
            ns.ip(&["addr", "add", &format!("{back_ip}/24"), "dev", "eth1"]);
            let edge = Edge {
                keepalived: None,
                lbd: None,
                ns,
                name,
                dir: dir.0.join(name),
                front_mac,
                back_ip,
            };
            open_dir(&edge.dir);
            edge.write_config(&bin);
            edges.push(edge);
        }
        let backends = Backends::start(&backend_ns);
        let edges: [Edge; 2] = edges.try_into().ok().unwrap();
        Ok(Self {
            edges,
            _backends: backends,
            _backend_ns: backend_ns,
            client,
            _bridges: bridges,
            bin,
            _dir: dir,
        })
    }

    /// The link-layer address the client's kernel holds for the VIP.
    fn client_neighbour_of_vip(&self) -> String {
        let entry = self.client.ip(&["neigh", "show", &VIP.to_string()]);
        entry
            .split_whitespace()
            .skip_while(|w| *w != "lladdr")
            .nth(1)
            .unwrap_or_else(|| panic!("the client has a neighbour entry for the VIP: {entry:?}"))
            .to_owned()
    }

    fn assert_vip_only_on(&self, holder: usize, what: &str) {
        for (i, edge) in self.edges.iter().enumerate() {
            assert_eq!(
                edge.has_vip(),
                i == holder,
                "{what}: {} {} the VIP",
                edge.name,
                if edge.has_vip() { "holds" } else { "lacks" }
            );
        }
    }

    /// Waits until the VIP is on edge `holder` and on no other.
    fn wait_vip_only_on(&self, holder: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let only = self
                .edges
                .iter()
                .enumerate()
                .all(|(i, e)| e.has_vip() == (i == holder));
            if only {
                return;
            }
            if Instant::now() >= deadline {
                self.assert_vip_only_on(holder, &format!("after {within:?}"));
            }
            std::thread::sleep(PROBE_EVERY);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        // What each daemon said, for the failure at hand.
        for edge in &self.edges {
            for what in ["keepalived", "lbd"] {
                let log = std::fs::read_to_string(edge.log(what)).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(30)..];
                eprintln!("--- {} {what}:\n{}", edge.name, tail.join("\n"));
            }
        }
    }
}

/// What one connection to the VIP got.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// A backend answered through the edge with this back address, after
    /// a connect that took this long.
    Via(IpAddr, Duration),
    /// RST: the VIP is on a host where nothing listens.
    Refused,
    /// No answer to the SYN or its retransmissions within
    /// [`PROBE_CONNECT_TIMEOUT`].
    TimedOut,
    /// Connected, then cut or left without an answer.
    Broken,
    /// Anything else (unreachable, ...).
    Other,
}

#[derive(Clone, Copy, Debug)]
struct Attempt {
    start: Instant,
    end: Instant,
    outcome: Outcome,
}

impl Attempt {
    fn answered_via(&self, edge: IpAddr) -> bool {
        matches!(self.outcome, Outcome::Via(ip, _) if ip == edge)
    }
}

/// Tallies of outcomes over part of a run.
#[derive(Debug, Default)]
struct Counts {
    answered: usize,
    /// Answered, but only after the kernel resent the SYN (the first one
    /// went to a host that had just lost the VIP).
    retransmitted: usize,
    refused: usize,
    timed_out: usize,
    broken: usize,
    other: usize,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} answered ({} after a SYN retransmission), {} refused, {} timed out, {} cut, {} other",
            self.answered,
            self.retransmitted,
            self.refused,
            self.timed_out,
            self.broken,
            self.other
        )
    }
}

impl Counts {
    fn of(attempts: &[Attempt]) -> Self {
        let mut c = Self::default();
        for a in attempts {
            match a.outcome {
                Outcome::Via(_, connect) => {
                    c.answered += 1;
                    // The first SYN retransmission leaves after a second.
                    if connect >= Duration::from_millis(900) {
                        c.retransmitted += 1;
                    }
                }
                Outcome::Refused => c.refused += 1,
                Outcome::TimedOut => c.timed_out += 1,
                Outcome::Broken => c.broken += 1,
                Outcome::Other => c.other += 1,
            }
        }
        c
    }
}

/// How long no client got an answer while the VIP moved from `old` to
/// `new`: from the last answer through `old` to the first through `new`
/// (or from `from`, when none came through `old`).
fn pause_between(attempts: &[Attempt], old: IpAddr, new: IpAddr, from: Instant) -> Duration {
    let first_new = attempts
        .iter()
        .filter(|a| a.answered_via(new))
        .map(|a| a.end)
        .min()
        .expect("an answer through the new holder");
    let last_old = attempts
        .iter()
        .filter(|a| a.answered_via(old) && a.end < first_new)
        .map(|a| a.end)
        .max()
        .unwrap_or(from);
    first_new - last_old
}

/// The clients: every [`PROBE_EVERY`] a new connection to the VIP, each
/// on a thread of its own in the client namespace (so a connection left
/// hanging by a failover does not hold back the next ones), each recorded.
struct Probe {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<JoinHandle<()>>,
}

impl Probe {
    fn start(client: &Netns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let handle = client.handle();
        let thread = {
            let (stop, attempts) = (stop.clone(), attempts.clone());
            std::thread::spawn(move || {
                // Threads spawned from here start in the client namespace.
                move_into_link_name_space(handle.as_fd(), Some(LinkNameSpaceType::Network))
                    .expect("into the client namespace");
                let mut running: Vec<JoinHandle<()>> = Vec::new();
                // Bounded: five minutes, or 15,000 connections.
                let deadline = Instant::now() + Duration::from_secs(300);
                let mut next = Instant::now();
                for _ in 0..15_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                        break;
                    }
                    let attempts = attempts.clone();
                    running.push(std::thread::spawn(move || {
                        let start = Instant::now();
                        let outcome = exchange();
                        let end = Instant::now();
                        attempts.lock().unwrap().push(Attempt {
                            start,
                            end,
                            outcome,
                        });
                    }));
                    running.retain(|t| !t.is_finished());
                    next += PROBE_EVERY;
                    if let Some(rest) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(rest);
                    }
                }
                // Each connection ends within its connect and read timeouts.
                for t in running {
                    let _ = t.join();
                }
            })
        };
        Self {
            stop,
            attempts,
            thread: Some(thread),
        }
    }

    /// The connections opened since `from`, in the order they ended.
    fn since(&self, from: Instant) -> Vec<Attempt> {
        let all = self.attempts.lock().unwrap();
        all.iter().filter(|a| a.start >= from).copied().collect()
    }

    /// Waits until a connection opened after `from` is answered through
    /// the edge `via`; returns when the first such answer arrived.
    fn wait_answer_via(&self, via: IpAddr, from: Instant, within: Duration) -> Option<Instant> {
        let deadline = Instant::now() + within;
        loop {
            let first = self
                .since(from)
                .iter()
                .filter(|a| a.answered_via(via))
                .map(|a| a.end)
                .min();
            if first.is_some() {
                return first;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(PROBE_EVERY);
        }
    }

    /// Stops opening connections, waits for the open ones to end; returns
    /// them all.
    fn stop(mut self) -> Vec<Attempt> {
        self.halt();
        std::mem::take(&mut *self.attempts.lock().unwrap())
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One connection to the VIP: connect, read the backend's line.
fn exchange() -> Outcome {
    let vip = SocketAddr::new(IpAddr::V4(VIP), VIP_PORT);
    let start = Instant::now();
    let mut s = match TcpStream::connect_timeout(&vip, PROBE_CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
        {
            return Outcome::TimedOut
        }
        Err(_) => return Outcome::Other,
    };
    let connect = start.elapsed();
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut reply = String::new();
    if s.read_to_string(&mut reply).is_err() {
        return Outcome::Broken;
    }
    // "10.0.0.11:8080 via 10.0.0.2\n"
    match reply.trim_end().rsplit_once(" via ") {
        Some((_, ip)) => ip
            .parse()
            .map_or(Outcome::Broken, |ip| Outcome::Via(ip, connect)),
        None => Outcome::Broken,
    }
}
