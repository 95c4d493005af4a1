//! The `kith-collector` binary: parses flags and environment, opens the collector,
//! prints where it listens and its credentials, and serves until SIGTERM or Ctrl-C.
//! `kith-collector import FILE` imports a local file through a running collector.

use clap::{Parser, Subcommand};
use kith_collector::imports::cli::{self, ImportArgs};
use kith_collector::{Collector, Config};
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc malloc: the collector's threads (writer, pipeline,
/// importer, runtime workers) allocate many small objects, and glibc's per-thread arenas
/// kept about 8 % more resident memory in the import benchmark, and were slower.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "kith-collector",
    version,
    about = "Kith's self-hosted collector",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Import a local CSV or NDJSON file through a running collector.
    Import(ImportArgs),
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Import(args)) => std::process::exit(cli::run(args)?),
        None => serve(cli.config),
    }
}

#[tokio::main]
async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let collector = Collector::open(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    for key in &collector.write_keys {
        if key.generated || config.write_keys.is_empty() {
            println!(
                "write key: {} (dev key, stored in {})",
                key.value,
                config.data_dir.display()
            );
        }
    }
    // Printed once, when generated: it is stored sealed and never shown again.
    if collector.admin_token.generated {
        println!(
            "admin token: {} (generated now and shown only once: keep it)",
            collector.admin_token.value
        );
    }
    if let Some(addr) = collector.metrics_addr() {
        println!("metrics on http://{addr}/metrics");
    }
    // Tools and tests read this line to find the port when listening on port 0.
    println!("listening on http://{}", listener.local_addr()?);
    collector.serve(listener, shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: draining requests and flushing");
}
