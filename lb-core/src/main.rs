//! `lbd`: Weir's forwarder. Subcommands: `run`, `check-config`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use lb_config::EngineChoice;
use lb_core::{notify, Options, Server};
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "lbd",
    version,
    about = "Weir's L4 load balancer (TCP forwarder with health checks, Maglev, draining, PROXY protocol)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum EngineArg {
    Auto,
    #[value(name = "io_uring")]
    IoUring,
    Epoll,
}

impl From<EngineArg> for EngineChoice {
    fn from(e: EngineArg) -> Self {
        match e {
            EngineArg::Auto => EngineChoice::Auto,
            EngineArg::IoUring => EngineChoice::IoUring,
            EngineArg::Epoll => EngineChoice::Epoll,
        }
    }
}

const DEFAULT_SOCKET: &str = "/run/lbd/control.sock";

/// Where the control API is: a unix socket, or an HTTPS URL with a token.
#[derive(clap::Args)]
struct Remote {
    /// The control socket.
    #[arg(long, default_value = DEFAULT_SOCKET, conflicts_with = "url")]
    socket: PathBuf,
    /// The TLS control API, `https://host:port` (needs --token-file and --ca).
    #[arg(long, requires_all = ["token_file", "ca"])]
    url: Option<String>,
    /// File holding the bearer token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificate(s) that signed lbd's certificate (PEM).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate for mutual TLS (PEM).
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Client private key for mutual TLS (PEM).
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

impl Remote {
    fn target(&self) -> anyhow::Result<lb_core::client::Target> {
        use lb_core::client::Target;
        let Some(url) = &self.url else {
            return Ok(Target::Unix(self.socket.clone()));
        };
        let token_file = self
            .token_file
            .as_ref()
            .context("--url needs --token-file")?;
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("cannot read {}", token_file.display()))?
            .trim()
            .to_owned();
        let ca = self.ca.as_ref().context("--url needs --ca")?;
        let identity = self.cert.as_deref().zip(self.key.as_deref());
        let tls = lb_core::tls::client_config(ca, identity)?;
        Ok(Target::Https {
            url: url.clone(),
            token,
            tls,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run from a configuration file; SIGHUP reloads it, SIGTERM drains and exits.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Override runtime.engine.
        #[arg(long, value_enum)]
        engine: Option<EngineArg>,
        /// Override runtime.workers.
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Validate a configuration file; prints every error and exits 1 if any.
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
    /// Show listeners and backends of a running lbd (control API).
    Status {
        #[command(flatten)]
        remote: Remote,
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Push a dynamic state (TOML or JSON: `version` and listeners) to a running lbd.
    Apply {
        /// The state file (`.json`, or TOML with `version` and `[[listener]]`).
        file: PathBuf,
        #[command(flatten)]
        remote: Remote,
        /// `table` for people, `json` for scripts.
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// A working load balancer on loopback with three demo backends.
    Demo {
        /// Where the demo listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Where /metrics is served.
        #[arg(long, default_value = "127.0.0.1:9600")]
        metrics: std::net::SocketAddr,
        /// Override the engine.
        #[arg(long, value_enum)]
        engine: Option<EngineArg>,
    },
    #[command(flatten)]
    Docs(lb_core::manual::DocsCommand),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LBD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::CheckConfig { file } => return check_config(&file),
        Command::Status { remote, output } => status(&remote, output),
        Command::Apply {
            file,
            remote,
            output,
        } => apply(&file, &remote, output),
        Command::Run {
            config,
            engine,
            workers,
        } => run(&config, engine, workers),
        Command::Demo {
            listen,
            metrics,
            engine,
        } => demo(listen, metrics, engine),
        Command::Docs(docs) => docs
            .run(<Cli as clap::CommandFactory>::command())
            .map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match lb_config::load_config(file) {
        Ok(cfg) => {
            println!("{}: ok ({} listeners)", file.display(), cfg.listeners.len());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{}: {e}", file.display());
            }
            eprintln!("{}: {} error(s)", file.display(), errors.0.len());
            ExitCode::FAILURE
        }
    }
}

fn run(
    path: &std::path::Path,
    engine: Option<EngineArg>,
    workers: Option<usize>,
) -> anyhow::Result<()> {
    let config =
        lb_config::load_config(path).map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))?;
    let options = Options {
        engine: engine.map(Into::into),
        workers,
    };
    let server = Server::start(&config, &options).context("cannot start")?;
    let signals = Signals::register(&server)?;
    notify::notify("READY=1");
    lb_core::watchdog::spawn(&server);
    serve_until_stopped(server, signals, Some(path))
}

/// The signals lbd acts on. They are registered before lbd says it is
/// ready (READY=1, the demo's banner): until then a signal takes its
/// default action, and SIGHUP's ends the process, so a `systemctl reload`
/// sent the moment the service is up would otherwise kill it.
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    fn register(server: &Server) -> anyhow::Result<Self> {
        let _guard = server.handle().enter();
        Ok(Self {
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }
}

/// Waits for signals: SIGHUP reloads (when there is a file), SIGTERM and SIGINT stop gracefully.
fn serve_until_stopped(
    server: Server,
    mut signals: Signals,
    path: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let handle = server.handle();
    loop {
        let reload = handle.block_on(async {
            tokio::select! {
                _ = signals.hup.recv() => true,
                _ = signals.term.recv() => false,
                _ = signals.int.recv() => false,
            }
        });
        if !reload {
            break;
        }
        match path {
            Some(p) => {
                notify::reloading();
                // Errors are logged and counted inside; the running config stays.
                let _ = server.reload_file(p);
                notify::notify("READY=1");
            }
            None => tracing::info!("SIGHUP ignored: no configuration file"),
        }
    }
    notify::notify("STOPPING=1");
    tracing::info!("stopping: listeners closed, draining connections");
    server.shutdown(None);
    tracing::info!("stopped");
    Ok(())
}

fn demo(
    listen: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    engine: Option<EngineArg>,
) -> anyhow::Result<()> {
    let backends = lb_core::demo::start_backends(3)
        .context("cannot start the demo backends on 127.0.0.2-4")?;
    // Removed however the demo ends, a failed start included.
    let run_dir = RunDir(std::env::temp_dir().join(format!("lbd-demo-{}", std::process::id())));
    let config = lb_core::demo::config(listen, metrics, &backends, &run_dir.0)
        .map_err(|e| anyhow::anyhow!("demo config:\n{e}"))?;
    let options = Options {
        engine: engine.map(Into::into),
        workers: None,
    };
    let server = Server::start(&config, &options).with_context(|| {
        format!("cannot start the demo (is {listen} or {metrics} in use? try --listen / --metrics)")
    })?;
    let signals = Signals::register(&server)?;
    let url = format!("http://{}/", server.bound_addr("demo").unwrap_or(listen));
    println!();
    println!(
        "Weir demo: lbd ({} engine, {} workers) balancing round robin over 3 backends:",
        server.engine().name(),
        server.status().workers
    );
    for b in &backends {
        println!("  backend  http://{b}/");
    }
    println!();
    println!("  try:     for i in 1 2 3 4 5 6; do curl -s {url}; done");
    if let Some(m) = server.admin_addr() {
        println!("  metrics: curl -s http://{m}/metrics | grep weir_");
    }
    println!(
        "  status:  lbd status --socket {}",
        run_dir.0.join("control.sock").display()
    );
    println!();
    println!("Ctrl-C to stop.");
    serve_until_stopped(server, signals, None)
}

/// The demo's private directory (control socket, state), removed on drop.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes to stdout; a closed pipe (`lbd status | head`) is not an error.
fn say(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}

fn status(remote: &Remote, output: Output) -> anyhow::Result<()> {
    let target = remote.target()?;
    let (code, body) = block_on(lb_core::client::send(
        &target,
        hyper::Method::GET,
        "/v1/status",
        None,
    ))??;
    if !code.is_success() {
        anyhow::bail!("lbd answered {code}: {}", String::from_utf8_lossy(&body));
    }
    if output == Output::Json {
        say(&format!("{}\n", String::from_utf8_lossy(&body).trim_end()));
        return Ok(());
    }
    let st: lb_core::Status = serde_json::from_slice(&body).context("unexpected status format")?;
    say(&render_status(&st));
    Ok(())
}

fn render_status(st: &lb_core::Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "engine {}, {} workers, config generation {}, dynamic state version {}",
        st.engine, st.workers, st.generation, st.dynamic_version
    );
    if st.listeners.is_empty() {
        let _ = writeln!(out, "no listeners");
    }
    for l in &st.listeners {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<32} {:<24} {:<5} {:>8} {:>10}",
            "LISTENER", "BIND", "PROTO", "ACTIVE", "ACCEPTED"
        );
        let proto = format!("{:?}", l.protocol).to_lowercase();
        let _ = writeln!(
            out,
            "{:<32} {:<24} {:<5} {:>8} {:>10}",
            l.name,
            l.bind.to_string(),
            proto,
            l.active,
            l.accepted
        );
        let _ = writeln!(
            out,
            "  {:<30} {:<9} {:>8} {:>6}  LAST CHECK ERROR",
            "BACKEND", "HEALTH", "ACTIVE", "WEIGHT"
        );
        for b in &l.backends {
            let health = match (b.draining, b.healthy) {
                (true, _) => "draining",
                (false, true) => "up",
                (false, false) => "down",
            };
            let err = b.last_error.as_deref().unwrap_or("-");
            let _ = writeln!(
                out,
                "  {:<30} {:<9} {:>8} {:>6}  {}",
                b.addr.to_string(),
                health,
                b.active,
                b.weight,
                err
            );
        }
    }
    out
}

fn apply(file: &std::path::Path, remote: &Remote, output: Output) -> anyhow::Result<()> {
    let target = remote.target()?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let is_json =
        file.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    let state: lb_config::DesiredState = if is_json {
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a JSON state", file.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("{}: not a TOML state", file.display()))?
    };
    let body = serde_json::to_vec(&state)?;
    let (code, reply) = block_on(lb_core::client::send(
        &target,
        hyper::Method::PUT,
        "/v1/state",
        Some(body),
    ))??;
    if output == Output::Json {
        say(&format!("{}\n", String::from_utf8_lossy(&reply).trim_end()));
        if code.is_success() {
            return Ok(());
        }
        anyhow::bail!("lbd answered {code}");
    }
    let value: serde_json::Value = serde_json::from_slice(&reply).unwrap_or_default();
    match code.as_u16() {
        200 => {
            say(&format!("applied version {}\n", value["version"]));
            Ok(())
        }
        409 => anyhow::bail!(
            "version {} refused: lbd runs version {} (a state's version must be above it, or equal with the same content)",
            state.version,
            value["current_version"]
        ),
        422 => {
            for e in value["errors"].as_array().into_iter().flatten() {
                eprintln!("{}: {}: {}", file.display(), e["path"].as_str().unwrap_or(""), e["message"].as_str().unwrap_or(""));
            }
            anyhow::bail!("state rejected; lbd keeps running its current state")
        }
        _ => anyhow::bail!("lbd answered {code}: {}", String::from_utf8_lossy(&reply).trim_end()),
    }
}
