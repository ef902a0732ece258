//! `lbd`: Weir's forwarder. Subcommands: `run`, `check-config`, `status`,
//! `apply`, `drain`/`undrain`, `demo` (one file each under `cli/`).

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use cli::{Output, Remote};
use lb_config::EngineChoice;

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

/// `--engine`.
#[derive(Clone, Copy, ValueEnum)]
pub enum EngineArg {
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
    /// Validate a configuration file; prints its errors and warnings, exits 1 on an error.
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
    /// Drain without exiting (planned maintenance): withdraw every VIP,
    /// keep accepting for announce.withdraw_grace, close listeners, let
    /// connections finish; `lbd undrain` reverts.
    Drain {
        #[command(flatten)]
        remote: Remote,
    },
    /// End a drain: bind the listeners again and announce the VIPs.
    Undrain {
        #[command(flatten)]
        remote: Remote,
    },
    /// A working load balancer on loopback with three demo backends.
    Demo {
        /// Where the demo listens [default: 127.0.0.1:8080, or the next
        /// free port].
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Where /metrics is served [default: 127.0.0.1:9600, or the next
        /// free port].
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Override the engine.
        #[arg(long, value_enum)]
        engine: Option<EngineArg>,
    },
    #[command(flatten)]
    Docs(lb_api::docs::DocsCommand),
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
        Command::CheckConfig { file } => return cli::run::check_config(&file),
        Command::Status { remote, output } => cli::status::status(&remote, output),
        Command::Apply {
            file,
            remote,
            output,
        } => cli::apply::apply(&file, &remote, output),
        Command::Drain { remote } => cli::drain::drain(&remote, true),
        Command::Undrain { remote } => cli::drain::drain(&remote, false),
        Command::Run {
            config,
            engine,
            workers,
        } => cli::run::run(&config, engine, workers),
        Command::Demo {
            listen,
            metrics,
            engine,
        } => cli::demo::demo(listen, metrics, engine),
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
