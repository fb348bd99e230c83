//! `cargo run --release -p userseg-loadgen --example load -- --target http://127.0.0.1:8080 ...`:
//! the same as `userseg load`, for when the binary is not at hand.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "load",
    about = "Push a synthetic workload to a userseg server."
)]
struct Cli {
    #[command(flatten)]
    args: userseg_loadgen::LoadArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match userseg_loadgen::run(Cli::parse().args).await {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
