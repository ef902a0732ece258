//! One `lbd` under test: its configuration file (the scenario's listeners
//! below an `[admin]` section of this run's own paths and ports), the
//! process (optionally under an open-files limit, or inside a network
//! namespace), and what a scenario asks of it: readiness, SIGHUP, `kill -9`
//! and restart, the control API, `/metrics`, resident memory, and any panic
//! in its logs.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_api::wire::Status;

/// How long lbd may take to answer `/readyz` after a start.
const START: Duration = Duration::from_secs(30);

/// An `lbd` run by a scenario.
pub struct Lbd {
    bin: String,
    engine: String,
    workers: usize,
    /// Where its files go.
    pub dir: PathBuf,
    /// Its control socket.
    pub socket: PathBuf,
    /// Its metrics endpoint.
    pub metrics: SocketAddr,
    config: PathBuf,
    nofile: Option<u64>,
    netns: Option<Arc<File>>,
    child: Option<Child>,
    starts: usize,
}

impl Lbd {
    /// The lbd binary.
    pub fn bin(&self) -> &str {
        &self.bin
    }

    /// An lbd of `engine` with its files in `dir` (created); not started.
    pub fn new(bin: &str, engine: &str, workers: usize, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("state"))?;
        let metrics = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        Ok(Self {
            bin: bin.to_owned(),
            engine: engine.to_owned(),
            workers,
            dir: dir.to_owned(),
            socket: dir.join("lbd.sock"),
            metrics,
            config: dir.join("lbd.toml"),
            nofile: None,
            netns: None,
            child: None,
            starts: 0,
        })
    }

    /// Starts it under `prlimit --nofile=N:N`.
    pub fn with_nofile(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// Starts it inside the network namespace `ns`.
    pub fn in_namespace(mut self, ns: Arc<File>) -> Self {
        self.netns = Some(ns);
        self
    }

    /// The `[admin]` section: this run's metrics port, control socket and
    /// state directory, plus `extra` lines.
    pub fn admin(&self, extra: &str) -> String {
        format!(
            "[admin]\nmetrics = \"{}\"\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n{extra}\n",
            self.metrics,
            self.socket.display(),
            self.dir.join("state").display()
        )
    }

    /// Writes the configuration file atomically (a reload never reads half
    /// of it).
    pub fn write_config(&self, text: &str) -> anyhow::Result<()> {
        let tmp = self.config.with_extension("toml.new");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// Starts lbd (again, after [`Lbd::kill9`]) and waits until it is
    /// ready; how long that took.
    pub fn launch(&mut self) -> anyhow::Result<Duration> {
        anyhow::ensure!(self.child.is_none(), "lbd is already running");
        let started = Instant::now();
        self.starts += 1;
        let log = File::create(self.log(self.starts))?;
        let config = self.config.display().to_string();
        let workers = self.workers.to_string();
        let args = [
            "run",
            "--config",
            &config,
            "--engine",
            &self.engine,
            "--workers",
            &workers,
        ];
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        let child = match &self.netns {
            Some(ns) => crate::topo::within_namespace(ns, "the chaos namespace", || cmd.spawn())??,
            None => cmd.spawn()?,
        };
        crate::interrupt::track_group(child.id());
        self.child = Some(child);
        let deadline = started + START;
        loop {
            if crate::support::control(&self.socket, "GET", "/readyz", None)
                .is_ok_and(|(c, _)| c == 200)
            {
                return Ok(started.elapsed());
            }
            if let Some(Some(status)) = self.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                anyhow::bail!("lbd exited at start ({status}): {}", self.log_tail());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "lbd not ready after {START:?}: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process id of the running lbd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            crate::interrupt::untrack_group(c.id());
        }
    }

    /// Sends SIGHUP (reload the file).
    pub fn sighup(&self) -> anyhow::Result<()> {
        self.signal(rustix::process::Signal::HUP)
    }

    fn signal(&self, sig: rustix::process::Signal) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow::anyhow!("lbd is not running"))?;
        let pid = rustix::process::Pid::from_raw(pid as i32)
            .ok_or_else(|| anyhow::anyhow!("bad pid {pid}"))?;
        rustix::process::kill_process(pid, sig)?;
        Ok(())
    }

    /// Whether the process has exited (a crash), with how.
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        Some(status.to_string())
    }

    /// `GET /v1/status`, answered within 10 s.
    pub fn status(&self) -> anyhow::Result<Status> {
        self.status_within(Duration::from_secs(10))
    }

    /// `GET /v1/status`, answered within `timeout`.
    pub fn status_within(&self, timeout: Duration) -> anyhow::Result<Status> {
        let (code, body) =
            crate::support::control_within(&self.socket, "GET", "/v1/status", None, timeout)?;
        anyhow::ensure!(code == 200, "GET /v1/status: {code} {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// `PUT /v1/state`; the time it took.
    pub fn put_state(&self, state: &serde_json::Value) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let body = state.to_string();
        let (code, reply) = crate::support::control(&self.socket, "PUT", "/v1/state", Some(&body))?;
        anyhow::ensure!(code == 200, "PUT /v1/state: {code} {reply}");
        Ok(started.elapsed())
    }

    /// The version of the dynamic state in force (`GET /v1/state`).
    pub fn state_version(&self) -> anyhow::Result<u64> {
        let (code, body) = crate::support::control(&self.socket, "GET", "/v1/state", None)?;
        anyhow::ensure!(code == 200, "GET /v1/state: {code} {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        v["version"]
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no version in {body}"))
    }

    /// The text of `/metrics`.
    pub fn metrics_text(&self) -> anyhow::Result<String> {
        let get = || -> anyhow::Result<String> {
            let mut s = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: lbd\r\nConnection: close\r\n\r\n"
            )?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        };
        match &self.netns {
            Some(ns) => crate::topo::within_namespace(ns, "the chaos namespace", get)?,
            None => get(),
        }
    }

    /// One metric summed over the samples with `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(super::metrics::sum(&self.metrics_text()?, name, labels))
    }

    /// Resident memory in MiB (0 when not running).
    pub fn rss_mib(&self) -> f64 {
        self.pid()
            .map_or(0.0, |p| crate::peers::rss_kib(&[p]) as f64 / 1024.0)
    }

    fn log(&self, start: usize) -> PathBuf {
        self.dir.join(format!("lbd-{start}.log"))
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log(self.starts)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// Lines of every start's log that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        (1..=self.starts)
            .filter_map(|s| std::fs::read_to_string(self.log(s)).ok())
            .flat_map(|t| {
                t.lines()
                    .filter(|l| l.contains(needle))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Lines of every start's log that tell of a panic.
    pub fn panics(&self) -> Vec<String> {
        self.log_lines("panicked")
    }
}

impl Drop for Lbd {
    fn drop(&mut self) {
        self.kill9();
    }
}
