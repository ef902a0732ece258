//! `lbd`: Weir's forwarder. Subcommands: `run`, `check-config`, `demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use lb_config::EngineChoice;
use lb_core::{notify, Options, Server};
use tokio::signal::unix::{signal, SignalKind};

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
    notify::notify("READY=1");
    serve_until_stopped(server, Some(path))
}

/// Waits for signals: SIGHUP reloads (when there is a file), SIGTERM and SIGINT stop gracefully.
fn serve_until_stopped(server: Server, path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let handle = server.handle();
    let (mut hup, mut term, mut int) = {
        let _guard = handle.enter();
        (
            signal(SignalKind::hangup()).context("SIGHUP handler")?,
            signal(SignalKind::terminate()).context("SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("SIGINT handler")?,
        )
    };
    loop {
        let reload = handle.block_on(async {
            tokio::select! {
                _ = hup.recv() => true,
                _ = term.recv() => false,
                _ = int.recv() => false,
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
    let config = lb_core::demo::config(listen, metrics, &backends)
        .map_err(|e| anyhow::anyhow!("demo config:\n{e}"))?;
    let options = Options {
        engine: engine.map(Into::into),
        workers: None,
    };
    let server = Server::start(&config, &options).with_context(|| {
        format!("cannot start the demo (is {listen} or {metrics} in use? try --listen / --metrics)")
    })?;
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
    println!();
    println!("Ctrl-C to stop.");
    serve_until_stopped(server, None)
}
