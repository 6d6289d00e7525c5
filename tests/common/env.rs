//! A whole bridge setup for end-to-end tests: the reference gateway, a real Synapse with the
//! bridge registered, and the bridge binary; contacts on the official libsignal on demand.

use base64::{Engine, engine::general_purpose::STANDARD as B64};

use super::{
    BridgeSetup, Proc, Synapse, WorkerSet,
    interop::{CODE, TestGateway, random_account},
    node::NodeContact,
    pg::{drop_pg_schema, use_fresh_pg_schema},
};

// Fields drop in order: processes first, the directory with their logs last.
pub struct BridgeEnv {
    pub bridge: Proc,
    pub synapse: Synapse,
    pub gw: TestGateway,
    pub setup: BridgeSetup,
    _tmp: tempfile::TempDir,
}

impl BridgeEnv {
    /// Starts everything; `extra_sections` is appended to the bridge config (e.g. `encryption:`).
    /// With `MIB_KEEP_TEST_DIRS` set, the files (logs, databases) are kept for inspection.
    pub async fn start(extra_sections: &str) -> Self {
        Self::start_with(extra_sections, None, |_| async {}).await
    }

    /// As [`start`](Self::start), the bridge in `workdir` if given; `before_bridge` gets the
    /// setup (e.g. to point its config at PostgreSQL) once Synapse runs and before the bridge
    /// starts.
    pub async fn start_with<F, Fut>(
        extra_sections: &str,
        workdir: Option<&std::path::Path>,
        before_bridge: F,
    ) -> Self
    where
        F: FnOnce(&BridgeSetup) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (tmp, gw, setup) = prepare(extra_sections).await;
        let synapse =
            Synapse::start_for_bridge(&tmp.path().join("hs"), &setup.config, &setup.registration)
                .await;
        before_bridge(&setup).await;
        let bridge = setup.start_in(workdir).await;
        Self {
            bridge,
            synapse,
            gw,
            setup,
            _tmp: tmp,
        }
    }

    /// Calls the client API as `user_id` with the bridge's appservice token, as the bridge
    /// itself would: to put a ghost where the bridge did not.
    pub async fn as_appservice(
        &self,
        method: reqwest::Method,
        path: &str,
        user_id: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let reg = std::fs::read_to_string(&self.setup.registration).expect("registration");
        let token = reg
            .lines()
            .find_map(|l| l.trim().strip_prefix("as_token:"))
            .expect("as_token")
            .trim()
            .trim_matches(|c| c == '"' || c == '\'')
            .to_owned();
        let sep = if path.contains('?') { '&' } else { '?' };
        let user = super::MatrixUser {
            http: reqwest::Client::new(),
            base: self.synapse.url.clone(),
            token,
            user_id: user_id.to_owned(),
        };
        let path = format!("{path}{sep}user_id={}", super::urlencode(user_id));
        user.call(method, &path, body).await
    }

    /// A new contact on the official libsignal, registered and with keys uploaded.
    pub fn node(&self) -> NodeContact {
        node_on(&self.gw)
    }
}

/// The test's directory (kept with `MIB_KEEP_TEST_DIRS`), the gateway, and the bridge's config
/// and registration with `extra_sections`.
async fn prepare(extra_sections: &str) -> (tempfile::TempDir, TestGateway, BridgeSetup) {
    let mut tmp = tempfile::tempdir().expect("tmp");
    if std::env::var_os("MIB_KEEP_TEST_DIRS").is_some() {
        tmp.disable_cleanup(true);
        eprintln!("test files kept in {}", tmp.path().display());
    }
    let gw = TestGateway::start().await;
    let setup = BridgeSetup::write_full(
        tmp.path(),
        8008,
        &[
            ("*", "relay"),
            ("localhost", "user"),
            ("@admin:localhost", "admin"),
        ],
        &gw.addr.address,
        &B64.encode(&gw.addr.public_key),
        extra_sections,
    );
    (tmp, gw, setup)
}

/// A new contact on the official libsignal at `gw`, registered with keys uploaded.
fn node_on(gw: &TestGateway) -> NodeContact {
    let mut n = NodeContact::spawn();
    n.setup(
        gw.port,
        &B64.encode(&gw.addr.public_key),
        &random_account(),
        CODE,
    );
    n
}

/// Synapse, the gateway and several bridge workers on one PostgreSQL schema of their own (the
/// shared test server), behind a balancer.
pub struct WorkersEnv {
    pub workers: WorkerSet,
    pub synapse: Synapse,
    pub gw: TestGateway,
    pub setup: BridgeSetup,
    schema: Option<String>,
    _tmp: tempfile::TempDir,
}

impl WorkersEnv {
    pub async fn start(extra_sections: &str, n: usize) -> Self {
        let (tmp, gw, setup) = prepare(extra_sections).await;
        let schema = use_fresh_pg_schema(&setup.config).await;
        let synapse =
            Synapse::start_for_bridge(&tmp.path().join("hs"), &setup.config, &setup.registration)
                .await;
        let workers = WorkerSet::start(&setup, n).await;
        Self {
            workers,
            synapse,
            gw,
            setup,
            schema: Some(schema),
            _tmp: tmp,
        }
    }

    /// A new contact on the official libsignal, registered with keys uploaded.
    pub fn node(&self) -> NodeContact {
        node_on(&self.gw)
    }

    /// Stops the workers and drops the schema (call at the end of a passed test; a failed one
    /// keeps it for inspection).
    pub async fn finish(mut self) {
        self.workers.kill_all();
        if let Some(schema) = self.schema.take() {
            drop_pg_schema(&schema).await;
        }
    }
}
