//! `lb-controller`: external IPs for LoadBalancer Services, and programming
//! the `lbd` forwarders.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use lb_controller::config::{self, Config};
use lb_controller::desired::{self, Cluster};
use lb_controller::leader::{ApiLease, Elector, Lost, Timing};
use lb_controller::metrics::{self, Metrics};
use lb_controller::translate::SERVICE_NAME_LABEL;
use lb_controller::{client, controller};

#[derive(Parser)]
#[command(name = "lb-controller", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller.
    Run {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// This replica's name in the Lease (default: $POD_NAME, else hostname-pid).
        #[arg(long)]
        identity: Option<String>,
    },
    /// Validate a configuration file and exit.
    CheckConfig {
        /// Configuration file.
        file: PathBuf,
    },
    /// Read the cluster and print the desired forwarder state; writes nothing.
    Plan {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    #[command(flatten)]
    Docs(lb_api::docs::DocsCommand),
}

/// Reads the cluster once (no watch) for `plan`.
async fn read_cluster(
    client: &kube::Client,
    cfg: &Config,
) -> anyhow::Result<(Vec<Arc<Service>>, Vec<Arc<Node>>, Vec<Arc<EndpointSlice>>)> {
    let mut node_params = ListParams::default();
    if let Some(s) = &cfg.node_selector_text {
        node_params = node_params.labels(s);
    }
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let nodes = Api::<Node>::all(client.clone()).list(&node_params).await?;
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default().labels(SERVICE_NAME_LABEL))
        .await?;
    Ok((
        services.items.into_iter().map(Arc::new).collect(),
        nodes.items.into_iter().map(Arc::new).collect(),
        slices.items.into_iter().map(Arc::new).collect(),
    ))
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    config::load(path).map_err(|errors| {
        eprintln!("{}: invalid configuration:\n{errors}", path.display());
        ExitCode::from(2)
    })
}

fn identity(given: Option<String>) -> String {
    given
        .or_else(|| std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "lb-controller".into());
            format!("{host}-{}", std::process::id())
        })
}

/// Registers SIGTERM and SIGINT at once, and returns what completes at the
/// first of them. Registered before the controller can report ready: until
/// then a SIGTERM would end it without releasing its Lease.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use anyhow::Context;
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

async fn run(cfg: Config, identity: String) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let client = client(cfg.kubeconfig.as_deref()).await?;
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = cfg.metrics {
        let bound = metrics::serve(addr, metrics.clone(), ready.clone())
            .await
            .map_err(|e| anyhow::anyhow!("admin.metrics {addr}: {e}"))?;
        tracing::info!(%bound, "metrics listening");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let le = cfg.leader_election.clone();
    if !le.enabled {
        ready.store(true, Ordering::Release);
        metrics.leader.set(1);
        return controller::run(client, cfg, &identity, metrics, stopped()).await;
    }
    let timing = Timing {
        lease_duration: le.lease_duration,
        renew_interval: le.renew_interval,
    };
    let lease = ApiLease::new(client.clone(), &le.namespace, &le.lease_name);
    let mut elector = Elector::new(lease.clone(), &le.lease_name, &identity, timing);
    ready.store(true, Ordering::Release);
    tracing::info!(%identity, lease = %format!("{}/{}", le.namespace, le.lease_name), "waiting to lead");
    if !elector.acquire(stopped()).await {
        return Ok(());
    }
    tracing::info!(%identity, "leading");
    metrics.leader.set(1);
    // A leader that loses the Lease, or cannot renew it in time, exits at
    // once, so that it never writes while another replica leads.
    let mut keeper = Elector::new(lease, &le.lease_name, &identity, timing);
    let renewer = tokio::spawn(async move {
        match keeper.keep().await {
            Lost::TakenOver => tracing::error!("lost the lease to another replica; exiting"),
            Lost::CannotRenew(e) => {
                tracing::error!(error = %e, "could not renew the lease in time; exiting")
            }
        }
        std::process::exit(1);
    });
    let result = controller::run(client, cfg, &identity, metrics, stopped()).await;
    renewer.abort();
    elector.release().await;
    result
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Docs(docs) => match docs.run(<Cli as clap::CommandFactory>::command()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lb-controller: {e}");
                ExitCode::FAILURE
            }
        },
        Command::CheckConfig { file } => match load(&file) {
            Ok(cfg) => {
                for w in &cfg.warnings {
                    eprintln!("{}: warning: {w}", file.display());
                }
                println!(
                    "{}: ok ({} pools, {} forwarders, class {}{})",
                    file.display(),
                    cfg.pools.len(),
                    cfg.forwarders.len(),
                    cfg.load_balancer_class,
                    if cfg.default_class {
                        ", also unclassed Services"
                    } else {
                        ""
                    }
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Plan { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            runtime.block_on(async {
                let result = async {
                    let client = client(cfg.kubeconfig.as_deref()).await?;
                    let (services, nodes, slices) = read_cluster(&client, &cfg).await?;
                    let plan = desired::plan(&cfg, &services, &Cluster::new(&nodes, &slices));
                    Ok::<_, anyhow::Error>((plan.state(), plan.notes))
                }
                .await;
                match result {
                    Ok((state, notes)) => {
                        for n in notes {
                            eprintln!("note: {n}");
                        }
                        match serde_json::to_string_pretty(&state) {
                            Ok(text) => println!("{text}"),
                            Err(e) => eprintln!("{e}"),
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("plan: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Run {
            config,
            identity: id,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            for w in &cfg.warnings {
                tracing::warn!(file = %config.display(), "{w}");
            }
            match runtime.block_on(run(cfg, identity(id))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lb-controller: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
