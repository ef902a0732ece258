//! What the standalone scenarios share (`controller-scale`, `listeners`,
//! `chaos`): this workspace's binaries next to `lb-bench`, child processes
//! killed when dropped, polling with a deadline, `lbd`'s control socket,
//! a port free on several addresses, the machine's description, and
//! medians.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long [`wait_until`] waits.
pub const WAIT: Duration = Duration::from_secs(300);

/// A child process killed (it was started here) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A binary of this workspace, next to `lb-bench`.
pub fn sibling(name: &str) -> anyhow::Result<String> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it first (cargo build --release -p lb-core -p lb-controller -p lb-bench)",
        path.display()
    );
    Ok(path.display().to_string())
}

pub fn spawn(program: &str, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
    let log = std::fs::File::create(log)?;
    let child = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| anyhow::anyhow!("{program}: {e}"))?;
    Ok(Proc(child))
}

/// Polls `done` every 20 ms until it holds; the instant it was first seen.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + WAIT;
    loop {
        if done() {
            return Ok(Instant::now());
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP port free on every address of `ips` (backends that listen on
/// several loopback addresses at one port, as a NodePort does on nodes).
pub fn common_port(ips: &[&str]) -> anyhow::Result<u16> {
    anyhow::ensure!(!ips.is_empty(), "no address to find a port on");
    for _ in 0..50 {
        let first = TcpListener::bind((ips[0], 0))?;
        let port = first.local_addr()?.port();
        if ips[1..]
            .iter()
            .all(|ip| TcpListener::bind((*ip, port)).is_ok())
        {
            return Ok(port);
        }
    }
    anyhow::bail!("no port free on all of {ips:?}")
}

pub fn median(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let m = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (m, values[0], values[n - 1])
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The CPU's model name from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

pub fn machine() -> String {
    let cpu = cpu_model();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{cpu}, {cpus} CPUs; Linux {kernel}")
}

/// "median (min–max)" of `values`, or "–" when there are none.
pub fn spread(mut values: Vec<f64>, decimals: usize) -> String {
    if values.is_empty() {
        return "–".to_owned();
    }
    let (m, lo, hi) = median(&mut values);
    format!("{m:.decimals$} ({lo:.decimals$}–{hi:.decimals$})")
}

/// One request to `lbd`'s control socket: the status code and the body.
pub fn control(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    control_within(socket, method, path, body, Duration::from_secs(60))
}

/// [`control`], giving up when a read waits longer than `timeout`.
pub fn control_within(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: lbd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status line from lbd: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}
