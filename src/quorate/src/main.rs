//! The `quorate` binary: parse the command line, set up logging, run.

use clap::Parser;
use quorate::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = Cli::parse();
    // Servers log at info by default; CLI commands only warn.
    let default = if matches!(cli.command, Command::Server(_) | Command::Agent(_)) { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();

    let json_mode = cli.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(quorate::cli::run(cli)) {
        if json_mode {
            let code = e.downcast_ref::<quorate::client::ClientError>().map(|c| format!("{:?}", c.code()));
            println!("{}", serde_json::json!({ "error": format!("{e:#}"), "code": code }));
        } else {
            eprintln!("error: {e:#}");
        }
        std::process::exit(1);
    }
}
