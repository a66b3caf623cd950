//! The `potluck` binary: parses the command line and runs it; every error ends here, printed
//! with its causes, with a non-zero exit code.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = potluck_daemon::cli::Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(potluck_daemon::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
