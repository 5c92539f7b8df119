//! `keygate`: parses flags, sets up logging, and hands over to the library.

use clap::Parser;
use keygate::cli::{Cli, Command, admin_command};
use keygate::config::{Config, LogFormat};
use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config_path();
    let loaded = match &path {
        Some(path) => Config::load(path),
        None => Config::from_yaml("", std::path::Path::new(".")),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => return fail(&format!("config: {e}")),
    };
    if let Command::Check = cli.command {
        return match keygate::cli::check(&config) {
            Ok(summary) => {
                let shown = path.as_ref().map_or_else(
                    || "built-in defaults".to_owned(),
                    |p| p.display().to_string(),
                );
                println!("config OK: {shown} ({summary})");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&format!("config: {e}")),
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    match cli.command {
        Command::Serve { takeover } => {
            init_logging(&config);
            let options = keygate::server::Options { takeover };
            match runtime.block_on(keygate::server::run(config, path, options)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Store(keygate::cli::StoreCommand::Prepare) => {
            match runtime.block_on(keygate::cli::store_prepare(&config)) {
                Ok(out) => {
                    println!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.0),
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
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
