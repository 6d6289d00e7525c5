//! `interop-gateway`: the reference interop gateway (docs/interop-protocol.md).

// A command-line program: printing to stdout is its job.
#![allow(clippy::print_stdout)]

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use matrix_interop_bridge::{
    gateway::{Gateway, GatewayConfig},
    wire::noise::StaticKey,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "interop-gateway",
    version,
    about = "Reference gateway of the interop network"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a Noise static key file and print its public key (base64) for the bridge config.
    GenerateKey {
        #[arg(long, default_value = "gateway.key")]
        out: PathBuf,
    },
    /// Print the public key of an existing key file.
    PublicKey {
        #[arg(long, default_value = "gateway.key")]
        key_file: PathBuf,
    },
    /// Run the gateway.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "INTEROP_GATEWAY_LISTEN",
        default_value = "127.0.0.1:29400"
    )]
    listen: String,
    /// Noise static key file (see generate-key); created when missing.
    #[arg(long, env = "INTEROP_GATEWAY_KEY_FILE", default_value = "gateway.key")]
    key_file: PathBuf,
    /// SQLite database.
    #[arg(
        long,
        env = "INTEROP_GATEWAY_DATABASE",
        default_value = "sqlite://gateway.db"
    )]
    database: String,
    /// Directory for media blobs.
    #[arg(long, env = "INTEROP_GATEWAY_BLOB_DIR", default_value = "blobs")]
    blob_dir: PathBuf,
    /// Development mode: accept this fixed verification code (otherwise codes go to the log).
    #[arg(long, env = "INTEROP_GATEWAY_DEV_CODE")]
    dev_code: Option<String>,
    /// Largest media blob in bytes.
    #[arg(long, env = "INTEROP_GATEWAY_MAX_BLOB_BYTES", default_value_t = 100 * 1024 * 1024)]
    max_blob_bytes: u64,
    /// Stanzas per second per connection (token bucket refill; capacity is 5 s worth).
    #[arg(long, env = "INTEROP_GATEWAY_RATE", default_value_t = 100.0)]
    rate: f64,
    /// Log as JSON.
    #[arg(long, env = "INTEROP_GATEWAY_LOG_JSON")]
    log_json: bool,
}

fn write_key(path: &PathBuf) -> anyhow::Result<StaticKey> {
    let key = StaticKey::generate();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::io::Write::write_all(&mut f, key.to_file_text().as_bytes())?;
    Ok(key)
}

fn read_key(path: &PathBuf) -> anyhow::Result<StaticKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    StaticKey::from_file_text(&text)
        .with_context(|| format!("{} is not a gateway key file", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::GenerateKey { out } => {
            if out.exists() {
                bail!("{} exists already", out.display());
            }
            let key = write_key(&out)?;
            println!("{}", key.public_b64());
            Ok(())
        }
        Command::PublicKey { key_file } => {
            println!("{}", read_key(&key_file)?.public_b64());
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let key = if args.key_file.exists() {
        read_key(&args.key_file)?
    } else {
        write_key(&args.key_file)?
    };
    let mut cfg = GatewayConfig::new(key, args.database.clone(), args.blob_dir.clone());
    cfg.dev_code = args.dev_code.clone();
    cfg.max_blob_bytes = args.max_blob_bytes;
    if args.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    cfg.rate_per_sec = args.rate;
    cfg.rate_capacity = args.rate * 5.0;
    let gateway = Gateway::open(cfg)
        .await
        .context("cannot open the gateway state")?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, public_key = %StaticKey::from_file_text(&std::fs::read_to_string(&args.key_file)?).map(|k| k.public_b64()).unwrap_or_default(), dev_mode = args.dev_code.is_some(), "interop gateway running");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(gateway.serve(listener, rx));
    let _ = tokio::signal::ctrl_c().await;
    let _ = tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}
