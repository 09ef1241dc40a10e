//! The `ipsec-mesh` binary: argument parsing and the error edge. Each subcommand lives in
//! its own module under `cli/`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.log.as_deref());
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ipsec-mesh: error: {}", cli::one_line(&e));
            ExitCode::from(1)
        }
    }
}
