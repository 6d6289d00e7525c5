//! `matrix-interop-bridge`: the command line and the wiring of the running bridge.

// A command-line program: printing to stdout is its job.
#![allow(clippy::print_stdout)]

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use matrix_interop_bridge::{
    appservice::{self, AppState, Readiness, UserQuery, catchup::CatchUp, queue::QueueWorker},
    bridge::store::LeaseStore,
    bridge::{
        Bridge, BridgeSettings, Stores,
        cluster::{self, Cluster, EventRouter},
        network::{NetEventSink, Network},
        provisioning::{self, Provisioning},
    },
    config::{Config, CryptoStoreKind, DatabaseType, EXAMPLE_CONFIG},
    interop::{GatewayAddr, SignalRuntime, connector::InteropNetwork},
    matrix::{
        HomeserverClient, MatrixError, MatrixSide,
        crypto::{Crypto, CryptoOptions, OpenStore, StoreLocation, Workers},
    },
    metrics::Metrics,
    registration,
    store::{KvStore, SqlStore, TxnStore, crypto::DbCryptoStore},
    vault::{self, BRIDGE_OWNER, Vault, VaultStore},
};
use tokio::sync::{Notify, watch};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Parser)]
#[command(
    name = "matrix-interop-bridge",
    version,
    about = "A Matrix bridge to Signal-protocol interop networks"
)]
struct Cli {
    /// The configuration file.
    #[arg(short, long, global = true, default_value = "config.yaml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (the default).
    Run,
    /// Write a fully commented example configuration and a fresh vault master key beside it.
    GenerateConfig {
        #[arg(short, long, default_value = "config.yaml")]
        output: PathBuf,
    },
    /// Write the appservice registration with fresh tokens, and store the tokens in the config.
    GenerateRegistration {
        #[arg(short, long, default_value = "registration.yaml")]
        output: PathBuf,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Key vault maintenance.
    Vault {
        #[command(subcommand)]
        command: VaultCommand,
    },
}

#[derive(Subcommand)]
enum VaultCommand {
    /// Re-wrap every data key under a new master key (records are untouched).
    RotateMasterKey {
        /// File with the new master key (32 bytes raw or base64); created if it does not exist.
        #[arg(long)]
        new_key_file: PathBuf,
    },
}

/// mimalloc with its settings (`mib-alloc`).
#[global_allocator]
static ALLOCATOR: mib_alloc::Allocator = mib_alloc::Allocator;

fn main() -> std::process::ExitCode {
    mib_alloc::with_settings();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&cli.config).await,
        Command::GenerateConfig { output } => generate_config(&output),
        Command::GenerateRegistration { output } => generate_registration(&cli.config, &output),
        Command::Migrate => {
            let cfg = Config::load(&cli.config)?;
            let store = SqlStore::connect(&cfg.database)
                .await
                .context("cannot open the database")?;
            store.migrate().await?;
            println!("database migrated");
            Ok(())
        }
        Command::Vault {
            command: VaultCommand::RotateMasterKey { new_key_file },
        } => {
            let cfg = Config::load(&cli.config)?;
            let store = SqlStore::connect(&cfg.database)
                .await
                .context("cannot open the database")?;
            store.check_migrated().await?;
            let master =
                vault::load_master_key(&cfg.vault.master_key_file, &cfg.vault.master_key_env)?;
            let vault = Vault::open(master, Arc::new(store)).await?;
            let new = if new_key_file.exists() {
                vault::load_master_key(&new_key_file.to_string_lossy(), "")?
            } else {
                vault::create_master_key_file(&new_key_file)
                    .context("cannot write the new key file")?
            };
            let n = vault.rotate_master_key(&new).await?;
            println!(
                "re-wrapped {n} data keys under master key {}; now point vault.master_key_file at {}",
                new.id(),
                new_key_file.display()
            );
            Ok(())
        }
    }
}

fn generate_config(output: &Path) -> anyhow::Result<()> {
    if output.exists() {
        bail!("{} exists already; not overwriting it", output.display());
    }
    let key_path = output.with_file_name("vault.key");
    let mut text = EXAMPLE_CONFIG.to_owned();
    if !key_path.exists() {
        vault::create_master_key_file(&key_path).context("cannot write the vault master key")?;
        eprintln!(
            "wrote a new vault master key to {} (back it up; keep it secret)",
            key_path.display()
        );
    }
    let abs = std::fs::canonicalize(&key_path).unwrap_or(key_path);
    text = text.replace(
        "    master_key_file: \"\"",
        &format!("    master_key_file: \"{}\"", abs.display()),
    );
    std::fs::write(output, text).with_context(|| format!("cannot write {}", output.display()))?;
    eprintln!(
        "wrote {}; edit it, then run generate-registration",
        output.display()
    );
    Ok(())
}

fn generate_registration(config_path: &Path, output: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let (as_token, hs_token) = (registration::random_token(), registration::random_token());
    let new_text =
        registration::write_tokens_into(&text, &as_token, &hs_token).map_err(anyhow::Error::msg)?;
    std::fs::write(config_path, &new_text)
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let cfg = Config::load(config_path)?;
    std::fs::write(output, registration::registration_yaml(&cfg))
        .with_context(|| format!("cannot write {}", output.display()))?;
    eprintln!(
        "wrote {} and stored the new tokens in {}; add the registration to the homeserver's app_service_config_files",
        output.display(),
        config_path.display()
    );
    Ok(())
}

fn init_logging(cfg: &Config) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},sqlx=warn,hyper=warn,reqwest=warn",
            cfg.logging.level
        ))
    });
    let registry = tracing_subscriber::registry().with(filter);
    if cfg.logging.format == "json" {
        registry
            .with(fmt::layer().json().with_current_span(false))
            .init();
    } else {
        registry
            .with(fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())))
            .init();
    }
}

struct ReadyCheck {
    store: SqlStore,
    hs: HomeserverClient,
    network: Arc<InteropNetwork>,
}

#[async_trait::async_trait]
impl Readiness for ReadyCheck {
    async fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Err(e) = self.store.ping().await {
            problems.push(format!("database: {e}"));
        }
        if let Err(e) = self.hs.versions().await {
            problems.push(format!("homeserver: {e}"));
        }
        if !self.network.reachable().await {
            problems.push("interop gateway: not reachable".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

struct Users {
    bot: String,
    bridge: Arc<Bridge>,
}

#[async_trait::async_trait]
impl UserQuery for Users {
    async fn user_exists(&self, user_id: &str) -> bool {
        // A well-formed ghost id is registered on the spot (a user inviting a contact's ghost).
        user_id == self.bot || self.bridge.provide_ghost(user_id).await
    }

    async fn third_party_users(
        &self,
        fields: &std::collections::HashMap<String, String>,
    ) -> Vec<(String, String)> {
        let phone = fields.get("phone").map(String::as_str);
        let name = fields.get("name").map(String::as_str);
        self.bridge
            .third_party_users(phone, name)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "third-party look-up failed");
                Vec::new()
            })
    }

    async fn third_party_of(&self, user_id: &str) -> Option<String> {
        self.bridge
            .third_party_of_ghost(user_id)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "third-party reverse look-up failed");
                None
            })
    }
}

async fn run(config_path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(config_path)?;
    init_logging(&cfg);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "starting matrix-interop-bridge"
    );
    let (store, vault) = open_store(&cfg).await?;
    let queue_key = vault.data_key(BRIDGE_OWNER).await?;
    let hs = HomeserverClient::new(&cfg.homeserver.address, &cfg.appservice.as_token)?;
    let Parts {
        matrix,
        network,
        bridge,
        metrics,
    } = assemble(&cfg, &hs, &store, &vault)?;

    let notify = Arc::new(Notify::new());
    let txn_store: Arc<dyn TxnStore> = Arc::new(store.clone());
    let catch_up = Arc::new(
        CatchUp::new(
            Arc::new(hs.clone()),
            txn_store.clone(),
            Arc::new(store.clone()),
            queue_key.clone(),
            notify.clone(),
        )
        .await,
    );
    let state = AppState {
        hs_token: cfg.appservice.hs_token.as_str().into(),
        store: txn_store.clone(),
        queue_key: queue_key.clone(),
        notify: notify.clone(),
        metrics: metrics.clone(),
        readiness: Arc::new(ReadyCheck {
            store: store.clone(),
            hs: hs.clone(),
            network: network.clone(),
        }),
        users: Arc::new(Users {
            bot: cfg.bot_mxid(),
            bridge: bridge.clone(),
        }),
        protocol: "interop".into(),
        txn_order: Some(Default::default()),
        shared_txn_order: cfg.workers.enabled,
        catch_up: Some(catch_up.clone()),
    };
    // Several workers: the leases, and this worker's id.
    let workers: Option<Workers> = cfg.workers.enabled.then(|| {
        (
            Arc::new(store.clone()) as Arc<dyn LeaseStore>,
            cfg.workers.worker_id(),
        )
    });
    // Several workers: leases say which logins and rooms are this one's. Joined before the
    // listener serves: a provisioning login verified before would run without its lease, and
    // another worker would start it too.
    let cluster = workers.as_ref().map(|(leases, id)| {
        let c = Cluster::new(
            leases.clone(),
            Arc::new(store.clone()),
            Arc::new(store.clone()),
            id,
        );
        bridge.join_cluster(c.clone());
        c
    });
    if let Some(c) = &cluster {
        // Where the others forward provisioning requests for the logins this worker runs.
        let url = cfg
            .workers
            .url_or(&cfg.appservice.hostname, cfg.appservice.port);
        store
            .kv_set(&provisioning::worker_url_key(c.worker_id()), &url)
            .await
            .context("cannot record this worker's URL in the database")?;
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let server = serve_appservice(&cfg, state, &bridge, shutdown_rx.clone()).await?;
    if cfg.metrics.enabled {
        serve_metrics(&cfg, &metrics, shutdown_rx.clone()).await?;
    }

    let startup_client = hs.with_retries(6);
    tokio::select! {
        r = startup_checks(&cfg, &startup_client) => r?,
        _ = shutdown_signal() => {
            let _ = shutdown_tx.send(true);
            return Ok(());
        }
    }
    let crypto = if cfg.encryption.allow {
        let crypto = start_crypto(&cfg, &hs, &store, &vault, workers.clone()).await?;
        matrix.set_crypto(crypto.clone());
        tokio::spawn(crypto.clone().maintain());
        Some(crypto)
    } else {
        None
    };
    // Events that arrived during start-up wait in the queue until now.
    let worker = QueueWorker {
        store: txn_store,
        key: queue_key,
        notify,
        handler: bridge.clone(),
        metrics,
        crypto,
        router: cluster.clone().map(|c| c as Arc<dyn EventRouter>),
    };
    let worker = tokio::spawn(worker.run(shutdown_rx.clone()));
    tokio::spawn(catch_up.run(shutdown_rx.clone()));
    // Disappearing messages: the schedule is in the database; with several workers each
    // looks at it (a second redaction of the same event changes nothing).
    tokio::spawn(bridge.clone().run_disappearing());
    tokio::spawn(bridge.clone().run_claim_pruning());
    let leases = match &cluster {
        Some(c) => {
            tracing::info!(worker = %c.worker_id(), "one worker of several: logins are taken by lease");
            Some(tokio::spawn(
                c.clone().run(network.clone(), shutdown_rx.clone()),
            ))
        }
        None => {
            let logins = bridge.reconnect_logins().await?;
            tracing::info!(logins, "logins started");
            None
        }
    };
    tracing::info!("bridge ready");

    shutdown_signal().await;
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), worker).await;
    if let Some(leases) = leases {
        // Logins stopped and leases released: the other workers take over at once.
        let _ = tokio::time::timeout(Duration::from_secs(10), leases).await;
    }
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Opens and migrates the database, and opens the vault over it.
async fn open_store(cfg: &Config) -> anyhow::Result<(SqlStore, Vault)> {
    let store = SqlStore::connect(&cfg.database)
        .await
        .context("cannot open the database")?;
    store
        .migrate()
        .await
        .context("cannot migrate the database")?;
    let pruned = store.prune_transactions(7 * 24 * 3600 * 1000).await?;
    tracing::debug!(pruned, "old transaction ids pruned");
    // One process writes the portals unless several workers share the database.
    if !cfg.workers.enabled {
        store.cache_portals();
    }
    let master = vault::load_master_key(&cfg.vault.master_key_file, &cfg.vault.master_key_env)?;
    let vault = Vault::open(master, Arc::new(store.clone())).await?;
    Ok((store, vault))
}

/// The bridge's parts, wired together: the core between its Matrix side and its network side.
struct Parts {
    matrix: Arc<MatrixSide>,
    network: Arc<InteropNetwork>,
    bridge: Arc<Bridge>,
    metrics: Metrics,
}

fn assemble(
    cfg: &Config,
    hs: &HomeserverClient,
    store: &SqlStore,
    vault: &Vault,
) -> anyhow::Result<Parts> {
    let matrix: Arc<MatrixSide> = MatrixSide::new(
        hs.clone(),
        cfg.bot_mxid(),
        cfg.homeserver.domain.clone(),
        &cfg.ghost_regex(),
    )?
    .with_max_media(cfg.bridge.max_media_size)
    .arc();
    let gateway = GatewayAddr {
        address: cfg.interop.gateway_address.clone(),
        public_key: cfg
            .interop
            .gateway_key()
            .context("interop.gateway_public_key")?,
    };
    let signal_rt = SignalRuntime::start(
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
    );
    let vault_store: Arc<dyn VaultStore> = Arc::new(store.clone());
    let requests = Arc::new(matrix_interop_bridge::store::requests::SealedRequests::new(
        vault.clone(),
        vault_store.clone(),
    ));
    let metrics = Metrics::new();
    let network = InteropNetwork::new(
        signal_rt,
        gateway,
        cfg.interop.account_options(),
        vault.clone(),
        vault_store,
        metrics.logins.clone(),
    );
    let bridge = Arc::new(Bridge::new(
        matrix.clone(),
        Stores {
            users: Arc::new(store.clone()),
            portals: Arc::new(store.clone()),
            requests,
            kv: Arc::new(store.clone()),
        },
        network.clone(),
        BridgeSettings {
            bridge: {
                let mut bridge = cfg.bridge.clone();
                // A shared group portal's users may be in different workers, and a room's
                // events are handled in one (docs/scaling.md): each login keeps its own room.
                if cfg.workers.enabled && bridge.shared_group_portals {
                    tracing::info!("several workers: each login gets its own room for a group");
                    bridge.shared_group_portals = false;
                }
                bridge
            },
            homeserver_domain: cfg.homeserver.domain.clone(),
            username_template: cfg.appservice.username_template.clone(),
            encryption_default: cfg.encryption.default,
            encryption_require: cfg.encryption.require,
        },
        metrics.clone(),
    ));
    let sink: Arc<dyn NetEventSink> = bridge.clone();
    network.set_sink(Arc::downgrade(&sink));
    Ok(Parts {
        matrix,
        network,
        bridge,
        metrics,
    })
}

/// Listens for the homeserver (and, when enabled, the provisioning API) until shutdown.
async fn serve_appservice(
    cfg: &Config,
    state: AppState,
    bridge: &Arc<Bridge>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(cfg.listen_addr())
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (appservice.hostname/port)",
                cfg.listen_addr()
            )
        })?;
    tracing::info!(addr = %cfg.listen_addr(), "appservice API listening");
    let mut app = appservice::router(state, cfg.appservice.max_body_bytes);
    if cfg.provisioning.enabled {
        let api: Arc<dyn Provisioning> = bridge.clone();
        app = app.nest(
            &cfg.provisioning.prefix,
            appservice::provisioning::router(
                &cfg.provisioning.shared_secret,
                &cfg.provisioning.prefix,
                api,
            ),
        );
        tracing::info!(prefix = %cfg.provisioning.prefix, "provisioning API enabled");
    }
    Ok(tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|v| *v).await;
            })
            .await
    }))
}

/// Serves Prometheus metrics until shutdown.
async fn serve_metrics(
    cfg: &Config,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(&cfg.metrics.listen)
        .await
        .with_context(|| format!("cannot listen on {} (metrics.listen)", cfg.metrics.listen))?;
    let router = metrics_router(metrics);
    tokio::spawn(async move {
        let _ = axum::serve(l, router)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|v| *v).await;
            })
            .await;
    });
    Ok(())
}

/// Opens the bridge's crypto devices. Their state lives in the database (`crypto_item`), sealed
/// with the bridge's data key; with `encryption.store: directory` it lives in local SQLite stores
/// instead, next to the SQLite database (or in the working directory on PostgreSQL), as before.
/// The bot's device id is in the database; a directory store's passphrase is in the vault.
async fn start_crypto(
    cfg: &Config,
    hs: &HomeserverClient,
    store: &SqlStore,
    vault: &Vault,
    workers: Option<Workers>,
) -> anyhow::Result<Arc<Crypto>> {
    use base64::Engine;
    // Several workers: one at a time creates the bot's device and its keys (else two starting
    // together might create one each).
    let _setup = match &workers {
        Some((leases, id)) => Some(
            cluster::hold(
                leases,
                "crypto-setup",
                id,
                120_000,
                Duration::from_secs(150),
                (),
            )
            .await?,
        ),
        None => None,
    };
    const KIND: &str = "crypto";
    let db: &dyn VaultStore = store;
    let directory = cfg.encryption.store == CryptoStoreKind::Directory;
    let passphrase = match db.record(BRIDGE_OWNER, KIND, "store_passphrase").await? {
        Some(sealed) => Some(String::from_utf8(
            vault
                .open_record(BRIDGE_OWNER, KIND, "store_passphrase", &sealed)
                .await?
                .to_vec(),
        )?),
        None if directory => {
            let mut raw = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut raw);
            let p = base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw);
            let sealed = vault
                .seal_record(BRIDGE_OWNER, KIND, "store_passphrase", p.as_bytes())
                .await?;
            db.put_record(BRIDGE_OWNER, KIND, "store_passphrase", &sealed)
                .await?;
            Some(p)
        }
        None => None,
    };
    let device = match store.kv_get("crypto_device_id").await? {
        Some(d) => d,
        None => {
            let d: String = rand::Rng::sample_iter(rand::rng(), rand::distr::Alphanumeric)
                .take(10)
                .map(|c| char::from(c).to_ascii_uppercase())
                .collect();
            let d = format!("MIB{d}");
            store.kv_set("crypto_device_id", &d).await?;
            d
        }
    };
    let path = match cfg.database.db_type() {
        DatabaseType::Sqlite => {
            let file = cfg
                .database
                .uri
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let file = file.split('?').next().unwrap_or(file);
            PathBuf::from(format!("{file}.crypto"))
        }
        DatabaseType::Postgres => PathBuf::from("matrix-interop-bridge.crypto"),
    };
    let (location, shown) = match passphrase {
        Some(passphrase) if directory => (
            StoreLocation::Directory {
                root: path.clone(),
                passphrase,
            },
            path.display().to_string(),
        ),
        passphrase => (
            StoreLocation::Database {
                open: crypto_stores(store, vault.data_key(BRIDGE_OWNER).await?),
                kv: Arc::new(store.clone()),
                // A directory store of an earlier version is copied in once, never changed.
                legacy: passphrase
                    .filter(|_| path.exists())
                    .map(|p| (path.clone(), p)),
            },
            "the database".to_owned(),
        ),
    };
    // The device's upkeep (key uploads, claims, to-device) has no event retry layer above it.
    let crypto = Crypto::start(
        hs.with_retries(6),
        CryptoOptions {
            bot: cfg.bot_mxid(),
            device,
            store: location,
            msc4190: cfg.encryption.msc4190,
            self_sign: cfg.encryption.self_sign,
            ghost_devices: cfg.encryption.ghost_devices,
            ghost_device_cache: cfg.encryption.ghost_device_cache,
            msc4350: cfg.encryption.msc4350,
            workers,
        },
    )
    .await
    .with_context(|| format!("cannot start encryption (crypto store in {shown})"))?;
    Ok(crypto)
}

/// Waits for the homeserver, registers the bot, sets its profile, and checks that the homeserver
/// can reach the bridge with the right tokens.
/// The crypto stores of the bridge's devices in its database, sealed under `key`.
fn crypto_stores(db: &SqlStore, key: vault::SecretKey) -> OpenStore {
    let db = db.clone();
    Arc::new(move |user, device| {
        Arc::new(DbCryptoStore::new(db.clone(), key.clone(), user, device))
    })
}

async fn startup_checks(cfg: &Config, hs: &HomeserverClient) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(500);
    loop {
        match hs.versions().await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(address = %cfg.homeserver.address, error = %e, "homeserver not reachable yet (homeserver.address)");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    let bot_user: ruma::OwnedUserId = cfg.bot_mxid().try_into().context("bot user id")?;
    match hs.register_user(&cfg.appservice.bot.username).await {
        Ok(()) => {}
        Err(e) if e.errcode() == Some("M_UNKNOWN_TOKEN") || e.errcode() == Some("M_FORBIDDEN") => {
            bail!(
                "the homeserver rejected the bridge's as_token ({e}). Check that registration.yaml is listed in the \
                 homeserver's app_service_config_files, that its as_token matches appservice.as_token, and restart the homeserver"
            );
        }
        Err(e) => bail!("cannot register the bot user: {e}"),
    }
    if let Err(e) = hs
        .set_displayname(&bot_user, &cfg.appservice.bot.displayname)
        .await
    {
        tracing::warn!(error = %e, "cannot set the bot's display name");
    }
    let avatar = ruma::OwnedMxcUri::from(cfg.appservice.bot.avatar.as_str());
    if avatar.is_valid()
        && let Err(e) = hs.set_avatar(&bot_user, avatar).await
    {
        tracing::warn!(error = %e, "cannot set the bot's avatar");
    }
    match hs.ping_appservice(&cfg.appservice.id).await {
        Ok(d) => tracing::info!(
            round_trip_ms = d.as_millis() as u64,
            "homeserver reached the bridge"
        ),
        Err(e) => explain_ping_failure(cfg, &e)?,
    }
    Ok(())
}

fn explain_ping_failure(cfg: &Config, e: &MatrixError) -> anyhow::Result<()> {
    match e.errcode() {
        Some("M_CONNECTION_FAILED") | Some("M_CONNECTION_TIMEOUT") => {
            tracing::error!(
                address = %cfg.appservice.address,
                "the homeserver cannot reach the bridge at appservice.address: check the address, firewalls, and \
                 that the registration's url matches; the bridge keeps running ({e})"
            );
            Ok(())
        }
        Some("M_BAD_STATUS") => bail!(
            "the homeserver reached the bridge but the bridge refused it ({e}): the hs_token in registration.yaml \
             does not match appservice.hs_token; regenerate the registration or copy the token"
        ),
        Some("M_FORBIDDEN") | Some("M_UNKNOWN_TOKEN") => bail!(
            "the homeserver refused the ping ({e}): appservice.id `{}` or appservice.as_token does not match the \
             loaded registration",
            cfg.appservice.id
        ),
        Some("M_URL_NOT_SET") => {
            bail!("the registration has no url: set appservice.address and regenerate it")
        }
        _ => {
            tracing::warn!(error = %e, "the homeserver does not support the appservice ping; skipping the check");
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// `GET /metrics`: the Prometheus text exposition.
fn metrics_router(metrics: &Metrics) -> axum::Router {
    let metrics = metrics.clone();
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    )
}
