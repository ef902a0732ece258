//! The `lbd` subcommands, one file each: [`run`] (and `check-config`),
//! [`status`], [`apply`], [`drain`] and [`demo`]; what they share (where the control
//! API is, output) is here.

pub mod apply;
pub mod demo;
pub mod drain;
pub mod run;
pub mod status;

use std::path::PathBuf;

use anyhow::Context;
use clap::ValueEnum;
use lb_api::client::Target;

const DEFAULT_SOCKET: &str = "/run/lbd/control.sock";

/// Where the control API is: a unix socket, or an HTTPS URL with a token.
#[derive(clap::Args)]
pub struct Remote {
    /// The control socket.
    #[arg(long, default_value = DEFAULT_SOCKET, conflicts_with = "url")]
    pub socket: PathBuf,
    /// The TLS control API, `https://host:port` (needs --token-file and --ca).
    #[arg(long, requires_all = ["token_file", "ca"])]
    pub url: Option<String>,
    /// File holding the bearer token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// CA certificate(s) that signed lbd's certificate (PEM).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate for mutual TLS (PEM).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key for mutual TLS (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
}

impl Remote {
    /// The control API these flags name.
    pub fn target(&self) -> anyhow::Result<Target> {
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
        let tls = lb_api::tls::client_config(ca, identity)?;
        Ok(Target::Https {
            url: url.clone(),
            token,
            tls,
        })
    }
}

/// How `status` and `apply` print.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Writes to stdout; a closed pipe (`lbd status | head`) is not an error.
pub fn say(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

/// Runs `f` to completion on a small runtime of its own.
pub fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}
