//! `keygate`: parses flags, sets up logging, and hands over to the library.

use clap::Parser;
use keygate::cli::{Cli, Command, admin_command};
use keygate::config::{Config, LogFormat};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => return fail(&format!("config: {e}")),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    match cli.command {
        Command::Serve => {
            init_logging(&config);
            match runtime.block_on(keygate::server::run(
                config,
                keygate::server::shutdown_signal,
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "keygate failed");
                    fail(&e)
                }
            }
        }
        command => match runtime.block_on(admin_command(&config, command)) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.0),
        },
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("keygate: {message}");
    ExitCode::FAILURE
}

fn init_logging(config: &Config) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(config.log.level)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
