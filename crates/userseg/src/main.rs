//! The userseg binary: parses the command line, validates it into a role's config and runs the
//! role until SIGTERM / SIGINT (see the library, `lib.rs`).

use anyhow::Result;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use userseg::cli::{Cli, Command};
use userseg::{es, migrate, observability, standalone, uss};

/// mimalloc: ingest allocates two small strings per pair on one thread and frees them on
/// another (the batch processor), a pattern where glibc malloc contends.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Command::Version = cli.command {
        println!("userseg {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if let Command::Keys(args) = cli.command {
        return userseg::keys::run(args);
    }
    observability::init_logging(&cli.log_format)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Standalone(args) => serve(args.validate()?, standalone::start).await,
            Command::Uss(args) => serve(args.validate()?, uss::start).await,
            Command::Es(args) => serve(args.validate()?, es::start).await,
            Command::Migrate(args) => migrate::run(&args.validate()?).await,
            Command::Load(args) => userseg_loadgen::run(*args)
                .await
                .map(|_| ())
                .map_err(Into::into),
            Command::Version | Command::Keys(_) => Ok(()),
        }
    });
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "userseg stopped with an error");
    }
    result
}

/// Starts a role with `config` and runs it until SIGTERM / SIGINT have stopped it.
async fn serve<C, F>(config: C, start: impl FnOnce(C, CancellationToken) -> F) -> Result<()>
where
    F: std::future::Future<Output = Result<userseg::Server>>,
{
    start(config, observability::shutdown_on_signals()?)
        .await?
        .wait()
        .await
}
