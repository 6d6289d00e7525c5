//! `interop-gateway`: the reference interop gateway (docs/interop-protocol.md).

// A command-line program: printing to stdout is its job.
#![allow(clippy::print_stdout)]

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use mib_gateway::{CodeDelivery, Gateway, GatewayConfig};
use mib_wire::noise::StaticKey;
use tracing_subscriber::EnvFilter;

/// mimalloc with its settings (`mib-alloc`).
#[global_allocator]
static ALLOCATOR: mib_alloc::Allocator = mib_alloc::Allocator;

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
    Run(Box<RunArgs>),
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
    /// Development mode: accept this fixed verification code. Listens on loopback only.
    #[arg(long, env = "INTEROP_GATEWAY_DEV_CODE", conflicts_with_all = ["dev_log_codes", "code_command"])]
    dev_code: Option<String>,
    /// Development mode: write random verification codes to the log. Listens on loopback only.
    #[arg(
        long,
        env = "INTEROP_GATEWAY_DEV_LOG_CODES",
        conflicts_with = "code_command"
    )]
    dev_log_codes: bool,
    /// Production: deliver each verification code by running this program with the account as
    /// its argument and the code on its standard input.
    #[arg(long, env = "INTEROP_GATEWAY_CODE_COMMAND")]
    code_command: Option<PathBuf>,
    /// Largest media blob in bytes.
    #[arg(long, env = "INTEROP_GATEWAY_MAX_BLOB_BYTES", default_value_t = 100 * 1024 * 1024)]
    max_blob_bytes: u64,
    /// Stanzas per second per connection (token bucket refill; capacity is 5 s worth).
    #[arg(long, env = "INTEROP_GATEWAY_RATE", default_value_t = 100.0)]
    rate: f64,
    /// Seconds a verification code stays valid.
    #[arg(long, env = "INTEROP_GATEWAY_CODE_TTL_SECS", default_value_t = 600)]
    code_ttl_secs: u64,
    /// Wrong verification codes per account before its verification is locked.
    #[arg(long, env = "INTEROP_GATEWAY_VERIFY_BUDGET", default_value_t = 5)]
    verify_budget: u32,
    /// First verification lock-out in seconds (doubles with each further one, up to a day).
    #[arg(
        long,
        env = "INTEROP_GATEWAY_VERIFY_LOCKOUT_SECS",
        default_value_t = 300
    )]
    verify_lockout_secs: u64,
    /// Registrations per hour from one address by connections that are not logged in.
    #[arg(
        long,
        env = "INTEROP_GATEWAY_REGISTRATIONS_PER_HOUR",
        default_value_t = 20
    )]
    registrations_per_hour: u32,
    /// Envelopes waiting for one recipient.
    #[arg(long, env = "INTEROP_GATEWAY_QUEUE_MAX", default_value_t = 10_000)]
    queue_max: u32,
    /// Unacked envelopes are deleted after this many seconds (default 30 days).
    #[arg(long, env = "INTEROP_GATEWAY_ENVELOPE_TTL_SECS", default_value_t = 30 * 24 * 3600)]
    envelope_ttl_secs: u64,
    /// Blobs are deleted after this many seconds (default 30 days).
    #[arg(long, env = "INTEROP_GATEWAY_BLOB_TTL_SECS", default_value_t = 30 * 24 * 3600)]
    blob_ttl_secs: u64,
    /// Members of one group.
    #[arg(
        long,
        env = "INTEROP_GATEWAY_GROUP_MAX_MEMBERS",
        default_value_t = 1024
    )]
    group_max_members: u32,
    /// Envelope ids in one Ack.
    #[arg(long, env = "INTEROP_GATEWAY_ACK_MAX_IDS", default_value_t = 1000)]
    ack_max_ids: u32,
    /// Stanzas queued for writing to one connection before it counts as not reading.
    #[arg(long, env = "INTEROP_GATEWAY_OUT_QUEUE", default_value_t = 256)]
    out_queue: usize,
    /// Seconds a connection's outgoing queue may stay full before the connection is closed.
    #[arg(long, env = "INTEROP_GATEWAY_SLOW_READER_SECS", default_value_t = 30)]
    slow_reader_secs: u64,
    /// Bundle fetches per hour of one target account.
    #[arg(
        long,
        env = "INTEROP_GATEWAY_BUNDLE_FETCHES_PER_HOUR",
        default_value_t = 100
    )]
    bundle_fetches_per_hour: u32,
    /// Seconds from TCP accept to the end of the Noise handshake.
    #[arg(long, env = "INTEROP_GATEWAY_HANDSHAKE_SECS", default_value_t = 10)]
    handshake_secs: u64,
    /// Noise handshakes worked on at once (further connections wait their turn).
    #[arg(
        long,
        env = "INTEROP_GATEWAY_CONCURRENT_HANDSHAKES",
        default_value_t = 64
    )]
    concurrent_handshakes: usize,
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

fn main() -> anyhow::Result<()> {
    mib_alloc::with_settings();
    start(Cli::parse())
}

#[tokio::main]
async fn start(cli: Cli) -> anyhow::Result<()> {
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
        Command::Run(args) => run(*args).await,
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
    let mut code_rx = None;
    cfg.codes = match (&args.dev_code, args.dev_log_codes, &args.code_command) {
        (Some(code), _, _) => CodeDelivery::DevFixed(code.clone()),
        (None, true, _) => CodeDelivery::DevLog,
        (None, false, Some(_)) => {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            code_rx = Some(rx);
            CodeDelivery::Channel(tx)
        }
        (None, false, None) => bail!(
            "no way to deliver verification codes: set --code-command, or --dev-code / --dev-log-codes for development"
        ),
    };
    let l = &mut cfg.limits;
    l.code_ttl = Duration::from_secs(args.code_ttl_secs);
    l.verify_budget = args.verify_budget.max(1);
    l.verify_lockout = Duration::from_secs(args.verify_lockout_secs);
    l.registrations_per_source = args.registrations_per_hour;
    l.queue_max = args.queue_max;
    l.envelope_ttl = Duration::from_secs(args.envelope_ttl_secs);
    l.blob_ttl = Duration::from_secs(args.blob_ttl_secs);
    l.group_max_members = args.group_max_members;
    l.ack_max_ids = args.ack_max_ids;
    l.out_queue = args.out_queue.max(1);
    l.slow_reader_timeout = Duration::from_secs(args.slow_reader_secs);
    l.bundle_fetches_per_target = args.bundle_fetches_per_hour;
    l.handshake_timeout = Duration::from_secs(args.handshake_secs);
    l.concurrent_handshakes = args.concurrent_handshakes;
    cfg.max_blob_bytes = args.max_blob_bytes;
    if args.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    cfg.rate_per_sec = args.rate;
    cfg.rate_capacity = args.rate * 5.0;
    let dev_mode = cfg.codes.is_dev();
    let listener = mib_gateway::listen(args.listen.as_str())
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    cfg.check_listen_addr(listener.local_addr()?)?;
    let gateway = Gateway::open(cfg)
        .await
        .context("cannot open the gateway state")?;
    if let (Some(rx), Some(program)) = (code_rx, args.code_command.clone()) {
        tokio::spawn(deliver_codes(rx, program));
    }
    tracing::info!(listen = %args.listen, public_key = %StaticKey::from_file_text(&std::fs::read_to_string(&args.key_file)?).map(|k| k.public_b64()).unwrap_or_default(), dev_mode, "interop gateway running");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(gateway.serve(listener, rx));
    let _ = tokio::signal::ctrl_c().await;
    let _ = tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}

/// Runs the code command once per verification code, one at a time. The code goes on stdin, so
/// it appears neither in the process list nor in our log.
async fn deliver_codes(
    mut rx: tokio::sync::mpsc::Receiver<(String, zeroize::Zeroizing<String>)>,
    program: PathBuf,
) {
    use tokio::io::AsyncWriteExt;
    while let Some((account, code)) = rx.recv().await {
        let run = async {
            let mut child = tokio::process::Command::new(&program)
                .arg(&account)
                .stdin(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(code.as_bytes()).await?;
                stdin.write_all(b"\n").await?;
            }
            child.wait().await
        };
        match tokio::time::timeout(Duration::from_secs(30), run).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => tracing::warn!(%account, %status, "the code command failed"),
            Ok(Err(e)) => tracing::warn!(%account, error = %e, "cannot run the code command"),
            Err(_) => tracing::warn!(%account, "the code command timed out"),
        }
    }
}
