//! The application service API the homeserver calls (Matrix spec, Application Service API v1):
//! transactions, user and room-alias queries, ping and the third-party lookups, plus `/health`
//! and `/ready`. A transaction is recorded together with its events in one database transaction
//! and acknowledged at once; the events are handled afterwards by the queue worker.

use std::{collections::HashMap, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use mib_core::{
    metrics::Metrics,
    store::{QueuedEvent, TxnOutcome, TxnStore},
};
use mib_vault::SecretKey;

pub mod catchup;
pub mod order;
pub mod provisioning;
pub mod queue;

/// The associated data of sealed queue entries.
pub const QUEUE_AD: &[u8] = b"mib/event-queue/v1";

/// An error in the Matrix shape: `{"errcode": ..., "error": ...}`.
#[derive(Debug)]
pub struct MatrixApiError {
    status: StatusCode,
    errcode: &'static str,
    message: String,
}

impl MatrixApiError {
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            message: message.into(),
        }
    }

    fn internal(what: &str, err: &dyn std::fmt::Display) -> Self {
        // Details go to the log, not to the caller.
        tracing::error!(error = %err, "{what}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "M_UNKNOWN",
            "internal error, see the bridge log",
        )
    }
}

impl IntoResponse for MatrixApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"errcode": self.errcode, "error": self.message})),
        )
            .into_response()
    }
}

/// Answers whether the bridge is ready (homeserver, gateway and database reachable).
#[async_trait::async_trait]
pub trait Readiness: Send + Sync {
    /// `Ok` when ready; otherwise a list of what is not.
    async fn check(&self) -> Result<(), Vec<String>>;
}

/// Decides `GET /users/{userId}`: whether a user in our namespace exists (and creates it).
#[async_trait::async_trait]
pub trait UserQuery: Send + Sync {
    async fn user_exists(&self, user_id: &str) -> bool;
    /// Third-party users for a look-up's fields (`phone`, `name`): (ghost, account) pairs.
    async fn third_party_users(&self, _fields: &HashMap<String, String>) -> Vec<(String, String)> {
        Vec::new()
    }
    /// The account a ghost stands for, for the reverse look-up.
    async fn third_party_of(&self, _user_id: &str) -> Option<String> {
        None
    }
}

#[derive(Clone)]
pub struct AppState {
    pub hs_token: Arc<str>,
    pub store: Arc<dyn TxnStore>,
    pub queue_key: SecretKey,
    pub notify: Arc<Notify>,
    pub metrics: Metrics,
    pub readiness: Arc<dyn Readiness>,
    pub users: Arc<dyn UserQuery>,
    pub protocol: Arc<str>,
    /// Notices transactions the homeserver skipped.
    pub txn_order: Option<order::TxnOrder>,
    /// Several workers share the database: the transactions the others took count too.
    pub shared_txn_order: bool,
    /// Finds the events a homeserver outage lost (none in tests that run without a homeserver).
    pub catch_up: Option<Arc<catchup::CatchUp>>,
}

/// The appservice router. `max_body` bounds every request body.
pub fn router(state: AppState, max_body: usize) -> Router {
    let app = Router::new()
        .route("/_matrix/app/v1/transactions/{txn_id}", put(transaction))
        .route("/_matrix/app/v1/users/{user_id}", get(query_user))
        .route("/_matrix/app/v1/rooms/{alias}", get(query_alias))
        .route("/_matrix/app/v1/ping", post(ping))
        .route(
            "/_matrix/app/v1/thirdparty/protocol/{protocol}",
            get(thirdparty_protocol),
        )
        .route(
            "/_matrix/app/v1/thirdparty/user/{protocol}",
            get(thirdparty_user),
        )
        .route(
            "/_matrix/app/v1/thirdparty/location/{protocol}",
            get(thirdparty_location),
        )
        .route(
            "/_matrix/app/v1/thirdparty/user",
            get(thirdparty_user_reverse),
        )
        .route(
            "/_matrix/app/v1/thirdparty/location",
            get(thirdparty_location_reverse),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .fallback(unrecognized)
        .method_not_allowed_fallback(method_not_allowed);
    app.layer(DefaultBodyLimit::max(max_body))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

async fn unrecognized() -> MatrixApiError {
    MatrixApiError::new(
        StatusCode::NOT_FOUND,
        "M_UNRECOGNIZED",
        "unrecognized request",
    )
}

async fn method_not_allowed() -> MatrixApiError {
    MatrixApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "M_UNRECOGNIZED",
        "method not allowed on this endpoint",
    )
}

/// Checks the `hs_token` (header, or the deprecated `access_token` query parameter) in constant time.
async fn auth(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, MatrixApiError> {
    let header = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    let token = match header {
        Some(h) => h.strip_prefix("Bearer ").map(str::to_owned),
        None => req.uri().query().and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v.into_owned())
        }),
    };
    let Some(token) = token else {
        return Err(MatrixApiError::new(
            StatusCode::UNAUTHORIZED,
            "M_UNAUTHORIZED",
            "missing hs_token",
        ));
    };
    if !bool::from(token.as_bytes().ct_eq(state.hs_token.as_bytes())) {
        state.metrics.auth_failures.inc();
        return Err(MatrixApiError::new(
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
            "bad hs_token",
        ));
    }
    Ok(next.run(req).await)
}

/// Seals one unit of work for the queue: `kind` is `pdu`, `ephemeral` or `crypto`. A room
/// event (`pdu`) keeps its id, so that it is queued once however often it comes.
pub fn seal(key: &SecretKey, kind: &str, event: Value) -> QueuedEvent {
    let room_id = event["room_id"].as_str().map(str::to_owned);
    let event_id = match kind {
        "pdu" => event["event_id"].as_str().map(str::to_owned),
        _ => None,
    };
    let item = QueueItem {
        kind: kind.to_owned(),
        event,
    };
    let plain =
        zeroize::Zeroizing::new(serde_json::to_vec(&item).expect("a JSON value serializes"));
    QueuedEvent {
        room_id,
        event_id,
        sealed: key.seal(QUEUE_AD, &plain),
    }
}

/// One unit of queued work, sealed before it reaches the database.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct QueueItem {
    /// `pdu`, `ephemeral` or `crypto`.
    pub kind: String,
    pub event: Value,
}

#[tracing::instrument(skip_all, fields(txn_id = %txn_id))]
async fn transaction(
    State(state): State<AppState>,
    Path(txn_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, MatrixApiError> {
    let started = Instant::now();
    let body = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            MatrixApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                "transaction body too large",
            )
        } else {
            MatrixApiError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", rej.body_text())
        }
    })?;
    if let (Some(order), true) = (&state.txn_order, state.shared_txn_order) {
        order.learn_from(&txn_id, &*state.store).await;
    }
    if let Some(Err(missing)) = state.txn_order.as_ref().map(|o| o.check(&txn_id)) {
        return Err(MatrixApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "M_UNKNOWN",
            format!("transaction {missing} has not arrived; send it first"),
        ));
    }
    let parsed: Value = serde_json::from_slice(&body).map_err(|e| {
        MatrixApiError::new(
            StatusCode::BAD_REQUEST,
            "M_NOT_JSON",
            format!("body is not JSON: {e}"),
        )
    })?;
    let Some(obj) = parsed.as_object() else {
        return Err(MatrixApiError::new(
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
            "body must be a JSON object",
        ));
    };
    let list = |keys: &[&str]| -> Result<Vec<Value>, MatrixApiError> {
        let mut out = Vec::new();
        for k in keys {
            match obj.get(*k) {
                None | Some(Value::Null) => {}
                Some(Value::Array(a)) => out.extend(a.iter().cloned()),
                Some(_) => {
                    return Err(MatrixApiError::new(
                        StatusCode::BAD_REQUEST,
                        "M_BAD_JSON",
                        format!("`{k}` must be an array"),
                    ));
                }
            }
        }
        Ok(out)
    };
    tracing::debug!(fields = ?obj.keys().collect::<Vec<_>>(), "transaction");
    let events = list(&["events"])?;
    // Homeservers send the stable and the unstable spelling of the same list; take one.
    let ephemeral = if obj.contains_key("ephemeral") {
        list(&["ephemeral"])?
    } else {
        list(&["de.sorunome.msc2409.ephemeral"])?
    };
    let mut queued = Vec::with_capacity(events.len() + ephemeral.len() + 1);
    // Crypto changes (to-device messages with room keys, device lists, key counts) go first, so
    // that the keys for this transaction's encrypted events are known when those are handled.
    if let Some(changes) = crate::crypto::CryptoChanges::from_transaction(obj) {
        let event = serde_json::to_value(&changes).expect("serializable");
        queued.push(seal(&state.queue_key, "crypto", event));
    }
    for (kind, list) in [("pdu", events), ("ephemeral", ephemeral)] {
        for event in list {
            if !event.is_object() {
                return Err(MatrixApiError::new(
                    StatusCode::BAD_REQUEST,
                    "M_BAD_JSON",
                    "events must be objects",
                ));
            }
            state
                .metrics
                .events
                .get_or_create(&mib_core::metrics::EventLabels {
                    kind: kind.to_owned(),
                })
                .inc();
            queued.push(seal(&state.queue_key, kind, event));
        }
    }
    // Events the catch-up after an outage is about to queue come first, so that a room keeps
    // its order.
    if let Some(catch_up) = &state.catch_up
        && catch_up.before_transaction().await.is_err()
    {
        return Err(MatrixApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "M_UNKNOWN",
            "catching up after a homeserver outage; send this transaction again later",
        ));
    }
    let hash = Sha256::digest(&body);
    let outcome = state
        .store
        .apply_transaction(&txn_id, &hash, &queued)
        .await
        .map_err(|e| MatrixApiError::internal("cannot record transaction", &e))?;
    if let Some(order) = &state.txn_order {
        order.taken(&txn_id, matches!(outcome, TxnOutcome::Applied));
    }
    match outcome {
        TxnOutcome::Applied => {
            state.metrics.transactions.inc();
            state.notify.notify_one();
        }
        TxnOutcome::Duplicate => {
            state.metrics.duplicate_transactions.inc();
            tracing::debug!("transaction already applied");
        }
    }
    state
        .metrics
        .transaction_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(Json(json!({})))
}

async fn query_user(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
) -> Result<Json<Value>, MatrixApiError> {
    if state.users.user_exists(&user_id).await {
        Ok(Json(json!({})))
    } else {
        Err(MatrixApiError::new(
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
            "no such user",
        ))
    }
}

async fn query_alias(Path(_alias): Path<String>) -> MatrixApiError {
    MatrixApiError::new(
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
        "this bridge does not provide room aliases",
    )
}

async fn ping(body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, MatrixApiError> {
    let body = body.map_err(|_| {
        MatrixApiError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", "unreadable body")
    })?;
    if !body.is_empty() {
        serde_json::from_slice::<Value>(&body).map_err(|e| {
            MatrixApiError::new(
                StatusCode::BAD_REQUEST,
                "M_NOT_JSON",
                format!("body is not JSON: {e}"),
            )
        })?;
    }
    Ok(Json(json!({})))
}

async fn thirdparty_protocol(
    State(state): State<AppState>,
    Path(protocol): Path<String>,
) -> Result<Json<Value>, MatrixApiError> {
    if protocol != *state.protocol {
        return Err(MatrixApiError::new(
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
            "unknown protocol",
        ));
    }
    Ok(Json(json!({
        "user_fields": ["phone", "name"],
        "location_fields": [],
        "icon": "",
        "field_types": {
            "phone": {"regexp": "^\\+[0-9]{8,15}$", "placeholder": "+15551234567"},
            "name": {"regexp": ".+", "placeholder": "Alice"}
        },
        "instances": [{
            "desc": "Interop network",
            "fields": {},
            "network_id": "interop"
        }]
    })))
}

fn unknown_protocol() -> MatrixApiError {
    MatrixApiError::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", "unknown protocol")
}

/// `GET /thirdparty/user/{protocol}?phone=…` or `?name=…`: the ghosts of accounts that exist
/// on the network (a number is looked up through a connected login, at a bounded rate).
async fn thirdparty_user(
    State(state): State<AppState>,
    Path(protocol): Path<String>,
    Query(fields): Query<HashMap<String, String>>,
) -> Result<Json<Value>, MatrixApiError> {
    if protocol != *state.protocol {
        return Err(unknown_protocol());
    }
    // Synapse sends reverse look-ups (`GET /thirdparty/user?userid=`) here, with the protocol.
    if let Some(user_id) = fields.get("userid") {
        return Ok(Json(reverse_user(&state, user_id).await));
    }
    let found = state.users.third_party_users(&fields).await;
    Ok(Json(Value::Array(
        found
            .into_iter()
            .map(|(userid, account)| third_party_user(&state.protocol, userid, account))
            .collect(),
    )))
}

fn third_party_user(protocol: &str, userid: String, account: String) -> Value {
    json!({"userid": userid, "protocol": protocol, "fields": {"phone": account}})
}

/// `GET /thirdparty/location/{protocol}`: chats on this network belong to a login and have no
/// public rooms (no aliases) to name, so no location is ever found.
async fn thirdparty_location(
    State(state): State<AppState>,
    Path(protocol): Path<String>,
) -> Result<Json<Value>, MatrixApiError> {
    if protocol != *state.protocol {
        return Err(unknown_protocol());
    }
    Ok(Json(json!([])))
}

/// `GET /thirdparty/user?userid=@ghost`: the account a ghost stands for.
async fn thirdparty_user_reverse(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, MatrixApiError> {
    let Some(user_id) = q.get("userid") else {
        return Err(MatrixApiError::new(
            StatusCode::BAD_REQUEST,
            "M_MISSING_PARAM",
            "userid is required",
        ));
    };
    Ok(Json(reverse_user(&state, user_id).await))
}

async fn reverse_user(state: &AppState, user_id: &str) -> Value {
    match state.users.third_party_of(user_id).await {
        Some(account) => json!([third_party_user(
            &state.protocol,
            user_id.to_owned(),
            account
        )]),
        None => json!([]),
    }
}

async fn thirdparty_location_reverse(Query(_q): Query<HashMap<String, String>>) -> Json<Value> {
    Json(json!([]))
}

async fn ready(State(state): State<AppState>, _headers: HeaderMap) -> Response {
    match state.readiness.check().await {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "problems": problems})),
        )
            .into_response(),
    }
}
