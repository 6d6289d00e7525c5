//! The provisioning API (HTTP, shared secret), as mautrix bridges offer it: integrations drive
//! logins and chats without the bot. Every request names the Matrix user with `user_id`.
//!
//! - `GET  {prefix}/v1/logins?user_id=`            → `{"logins": [{"identifier", "connected"}]}`
//! - `POST {prefix}/v1/login/start?user_id=`       `{"identifier": "+1555…"}` → `{}` (a code is sent)
//! - `POST {prefix}/v1/login/verify?user_id=`      `{"code": "123456"}` → the login
//! - `POST {prefix}/v1/logout?user_id=`            → `{}`
//! - `GET  {prefix}/v1/chats?user_id=`             → `{"chats": [...]}`
//! - `POST {prefix}/v1/chats?user_id=`             `{"contact": "+1555…" or a contact's name}` → the chat with its room
//! - `GET  {prefix}/v1/contacts?user_id=`          → `{"contacts": [{"account", "name", "mxid", "room_id"}]}`
//! - `GET  {prefix}/v1/search?user_id=&query=`     → `{"results": [...]}`: contacts by name or number,
//!   and a full number that is on the network
//!
//! With several workers, the requests that need the user's running login (opening a chat,
//! searching, logging out) are forwarded to the worker running it, once (docs/scaling.md).

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::StatusCode,
    routing::{get, post},
};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::MatrixApiError;
use mib_core::provisioning::{ProvError, Provisioning};

#[derive(Clone)]
struct Prov {
    secret: Arc<str>,
    api: Arc<dyn Provisioning>,
    /// For forwarding requests to the worker running a login.
    http: reqwest::Client,
    /// Where this router is nested (the same in every worker).
    prefix: Arc<str>,
}

/// Marks a request forwarded by another worker: it is answered here, never forwarded again.
const FORWARDED: &str = "x-mib-forwarded";

/// The largest request body forwarded (the API's bodies are a few fields).
const MAX_FORWARDED_BODY: usize = 64 * 1024;

impl From<ProvError> for MatrixApiError {
    fn from(e: ProvError) -> Self {
        let (status, code) = match &e {
            ProvError::BadRequest(_) => (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            ProvError::Forbidden(_) => (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
            ProvError::NotFound(_) => (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
            ProvError::Conflict(_) => (StatusCode::CONFLICT, "M_CONFLICT"),
            ProvError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "M_UNAVAILABLE"),
            ProvError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN"),
        };
        MatrixApiError::new(status, code, e.to_string())
    }
}

type Q = Query<HashMap<String, String>>;

fn user(q: &HashMap<String, String>) -> Result<String, MatrixApiError> {
    q.get("user_id").cloned().ok_or_else(|| {
        MatrixApiError::new(
            StatusCode::BAD_REQUEST,
            "M_MISSING_PARAM",
            "user_id is required",
        )
    })
}

fn field(body: &Value, name: &str) -> Result<String, MatrixApiError> {
    body[name].as_str().map(str::to_owned).ok_or_else(|| {
        MatrixApiError::new(
            StatusCode::BAD_REQUEST,
            "M_BAD_JSON",
            format!("`{name}` is required"),
        )
    })
}

/// The provisioning router, to be nested under `prefix`.
pub fn router(secret: &str, prefix: &str, api: Arc<dyn Provisioning>) -> Router {
    let state = Prov {
        secret: secret.into(),
        api,
        http: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .expect("an HTTP client without TLS settings builds"),
        prefix: prefix.trim_end_matches('/').into(),
    };
    Router::new()
        .route("/v1/logins", get(logins))
        .route("/v1/login/start", post(login_start))
        .route("/v1/login/verify", post(login_verify))
        .route("/v1/logout", post(logout))
        .route("/v1/chats", get(chats).post(start_chat))
        .route("/v1/contacts", get(contacts))
        .route("/v1/search", get(search))
        // Layers run last-added first: the secret is checked before anything is forwarded.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), forward))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

async fn auth(
    State(p): State<Prov>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, MatrixApiError> {
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    match token {
        None => Err(MatrixApiError::new(
            StatusCode::UNAUTHORIZED,
            "M_MISSING_TOKEN",
            "missing provisioning secret",
        )),
        Some(t) if bool::from(t.as_bytes().ct_eq(p.secret.as_bytes())) => Ok(next.run(req).await),
        Some(_) => Err(MatrixApiError::new(
            StatusCode::FORBIDDEN,
            "M_UNKNOWN_TOKEN",
            "wrong provisioning secret",
        )),
    }
}

/// With several workers: a request that needs the user's running login, arriving at a worker
/// that does not run it, is answered by the worker that does (a request forwarded once is
/// answered where it arrives).
async fn forward(
    State(p): State<Prov>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, MatrixApiError> {
    use axum::http::Method;
    let needs_login = matches!(
        (req.method(), req.uri().path()),
        (&Method::POST, "/v1/chats") | (&Method::GET, "/v1/search") | (&Method::POST, "/v1/logout")
    );
    if !needs_login || req.headers().contains_key(FORWARDED) {
        return Ok(next.run(req).await);
    }
    let query: HashMap<String, String> = Query::try_from_uri(req.uri())
        .map(|Query(q)| q)
        .unwrap_or_default();
    let Some(base) = p.api.login_worker_url(&user(&query)?).await? else {
        return Ok(next.run(req).await);
    };
    // The path as the client sent it: this router is nested under the prefix.
    let url = format!(
        "{base}{}{}",
        p.prefix,
        req.uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/")
    );
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, MAX_FORWARDED_BODY)
        .await
        .map_err(|_| {
            MatrixApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                "request body too large",
            )
        })?;
    let mut out = p
        .http
        .request(parts.method.clone(), &url)
        .header(FORWARDED, "1");
    for name in [http::header::AUTHORIZATION, http::header::CONTENT_TYPE] {
        if let Some(v) = parts.headers.get(&name) {
            out = out.header(name, v.clone());
        }
    }
    let unreachable = |e: reqwest::Error| {
        tracing::warn!(error = %e, "cannot forward a provisioning request to the login's worker");
        MatrixApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "M_UNAVAILABLE",
            "the bridge worker running this login cannot be reached; try again",
        )
    };
    let resp = out.body(body).send().await.map_err(unreachable)?;
    let status = resp.status();
    let content_type = resp.headers().get(http::header::CONTENT_TYPE).cloned();
    let bytes = resp.bytes().await.map_err(unreachable)?;
    let mut answer = axum::response::Response::new(axum::body::Body::from(bytes));
    *answer.status_mut() = status;
    if let Some(ct) = content_type {
        answer.headers_mut().insert(http::header::CONTENT_TYPE, ct);
    }
    Ok(answer)
}

async fn logins(State(p): State<Prov>, Query(q): Q) -> Result<Json<Value>, MatrixApiError> {
    Ok(Json(json!({"logins": p.api.logins(&user(&q)?).await?})))
}

async fn login_start(
    State(p): State<Prov>,
    Query(q): Q,
    Json(body): Json<Value>,
) -> Result<Json<Value>, MatrixApiError> {
    p.api
        .login_start(&user(&q)?, &field(&body, "identifier")?)
        .await?;
    Ok(Json(json!({"next_step": "code"})))
}

async fn login_verify(
    State(p): State<Prov>,
    Query(q): Q,
    Json(body): Json<Value>,
) -> Result<Json<Value>, MatrixApiError> {
    let login = p
        .api
        .login_verify(&user(&q)?, &field(&body, "code")?)
        .await?;
    Ok(Json(json!({"login": login})))
}

async fn logout(State(p): State<Prov>, Query(q): Q) -> Result<Json<Value>, MatrixApiError> {
    p.api.logout(&user(&q)?).await?;
    Ok(Json(json!({})))
}

async fn chats(State(p): State<Prov>, Query(q): Q) -> Result<Json<Value>, MatrixApiError> {
    Ok(Json(json!({"chats": p.api.chats(&user(&q)?).await?})))
}

async fn start_chat(
    State(p): State<Prov>,
    Query(q): Q,
    Json(body): Json<Value>,
) -> Result<Json<Value>, MatrixApiError> {
    let chat = p
        .api
        .start_chat(&user(&q)?, &field(&body, "contact")?)
        .await?;
    Ok(Json(json!({"chat": chat})))
}

async fn contacts(State(p): State<Prov>, Query(q): Q) -> Result<Json<Value>, MatrixApiError> {
    Ok(Json(json!({"contacts": p.api.contacts(&user(&q)?).await?})))
}

async fn search(State(p): State<Prov>, Query(q): Q) -> Result<Json<Value>, MatrixApiError> {
    let query = q.get("query").ok_or_else(|| {
        MatrixApiError::new(
            StatusCode::BAD_REQUEST,
            "M_MISSING_PARAM",
            "query is required",
        )
    })?;
    Ok(Json(
        json!({"results": p.api.search(&user(&q)?, query).await?}),
    ))
}
