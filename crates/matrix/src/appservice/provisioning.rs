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
}

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
pub fn router(secret: &str, api: Arc<dyn Provisioning>) -> Router {
    let state = Prov {
        secret: secret.into(),
        api,
    };
    Router::new()
        .route("/v1/logins", get(logins))
        .route("/v1/login/start", post(login_start))
        .route("/v1/login/verify", post(login_verify))
        .route("/v1/logout", post(logout))
        .route("/v1/chats", get(chats).post(start_chat))
        .route("/v1/contacts", get(contacts))
        .route("/v1/search", get(search))
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
