//! `lbd run` and `lbd check-config`: serve from a configuration file,
//! reload it on SIGHUP, drain and exit on SIGTERM or SIGINT.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use lb_core::{notify, Options, Server};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::EngineArg;

/// Validates `file`: prints its errors and warnings, each with its field
/// path and line.
pub fn check_config(file: &Path) -> ExitCode {
    match lb_config::load_config_warned(file) {
        Ok((cfg, warnings)) => {
            for w in &warnings {
                eprintln!("{}: warning: {w}", file.display());
            }
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

/// Runs from the file at `path` until stopped.
pub fn run(path: &Path, engine: Option<EngineArg>, workers: Option<usize>) -> anyhow::Result<()> {
    let (config, warnings) = lb_config::load_config_warned(path)
        .map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))?;
    for w in &warnings {
        tracing::warn!(file = %path.display(), "{w}");
    }
    let options = Options {
        engine: engine.map(Into::into),
        workers,
    };
    let server = Server::start(&config, &options).context("cannot start")?;
    let signals = Signals::register(&server)?;
    notify::notify("READY=1");
    lb_core::watchdog::spawn(server.liveness(), &server.handle());
    serve_until_stopped(server, signals, Some(path))
}

/// The signals lbd acts on. They are registered before lbd says it is
/// ready (READY=1, the demo's banner): until then a signal takes its
/// default action, and SIGHUP's ends the process, so a `systemctl reload`
/// sent the moment the service is up would otherwise kill it.
pub struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Registers the handlers.
    pub fn register(server: &Server) -> anyhow::Result<Self> {
        let _guard = server.handle().enter();
        Ok(Self {
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }
}

/// Waits for signals: SIGHUP reloads (when there is a file), SIGTERM and SIGINT stop gracefully.
pub fn serve_until_stopped(
    server: Server,
    mut signals: Signals,
    path: Option<&Path>,
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
    tracing::info!("stopping: VIPs withdrawn first, then listeners close and connections drain");
    server.shutdown(None);
    tracing::info!("stopped");
    Ok(())
}
