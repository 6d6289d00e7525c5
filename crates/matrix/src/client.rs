//! The homeserver client: ruma request types sent with the `as_token`, identity assertion for
//! ghosts (`user_id`, and `device_id` where a device is needed), and typed errors that say
//! whether a failure is transient (network errors, 5xx), rate-limited (`retry_after_ms`) or
//! permanent (other 4xx).
//!
//! By default a request is tried once: the event it belongs to is retried by the one retry layer
//! (the queue's room lanes, the interop event pump), which knows the event's budget. Work with
//! no such layer above it (start-up, the crypto device's upkeep) uses [`HomeserverClient::with_retries`].

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ruma::{
    DeviceId, OwnedMxcUri, OwnedRoomId, OwnedUserId, RoomId, UserId,
    api::{
        AppserviceUserIdentity, IncomingResponse, OutgoingRequest, OutgoingRequestAppserviceExt,
        SupportedVersions,
        auth_scheme::{AuthScheme, SendAccessToken},
        path_builder::{PathBuilder, SinglePath, VersionHistory},
    },
};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    /// The homeserver answered with a Matrix error.
    #[error("homeserver answered {status} {errcode}: {message}")]
    Api {
        status: u16,
        errcode: String,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("homeserver unreachable: {0}")]
    Network(String),
    #[error("cannot build request: {0}")]
    Build(String),
    #[error("unexpected response from the homeserver: {0}")]
    Response(String),
    /// A response (a media download, say) is over the bridge's limit; it was not read further.
    #[error("the homeserver's answer is larger than the bridge's limit of {0} bytes")]
    TooLarge(u64),
}

/// The largest non-media answer the bridge reads from the homeserver.
const MAX_API_RESPONSE: u64 = 32 * 1024 * 1024;

/// Reads a response body, refusing it (without reading further) once it is over `max` bytes,
/// whether the homeserver announced its length or not.
async fn read_limited(mut resp: reqwest::Response, max: u64) -> Result<Vec<u8>, MatrixError> {
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(MatrixError::TooLarge(max));
    }
    let mut data = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| MatrixError::Network(e.to_string()))?
    {
        if (data.len() + chunk.len()) as u64 > max {
            return Err(MatrixError::TooLarge(max));
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

impl MatrixError {
    pub fn errcode(&self) -> Option<&str> {
        match self {
            MatrixError::Api { errcode, .. } => Some(errcode),
            _ => None,
        }
    }

    /// Whether the request may have had its effect although it failed (the homeserver went
    /// away or failed while handling it).
    pub fn outcome_unknown(&self) -> bool {
        match self {
            MatrixError::Network(_) | MatrixError::Response(_) => true,
            MatrixError::Api { status, .. } => *status >= 500,
            _ => false,
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            MatrixError::Network(_) => true,
            MatrixError::Api {
                status, errcode, ..
            } => *status >= 500 || errcode == "M_LIMIT_EXCEEDED",
            _ => false,
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errcode: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// Supplies the path-builder argument for both kinds of ruma endpoints.
pub trait PathArg: PathBuilder {
    fn arg(versions: &SupportedVersions) -> Self::Input<'_>;
}

impl PathArg for VersionHistory {
    fn arg(versions: &SupportedVersions) -> Self::Input<'_> {
        Cow::Borrowed(versions)
    }
}

impl PathArg for SinglePath {
    fn arg(_: &SupportedVersions) -> Self::Input<'_> {}
}

/// A client of one homeserver, shared by the bot and all ghosts.
#[derive(Clone)]
pub struct HomeserverClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: String,
    as_token: String,
    versions: SupportedVersions,
    retry_base: Duration,
    /// How many times a request is tried before its error is returned.
    attempts: u32,
    /// Raised when a request finds the homeserver unreachable or failing (5xx); shared by all
    /// clients of the homeserver.
    outage: Arc<AtomicBool>,
}

impl fmt::Debug for HomeserverClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HomeserverClient")
            .field("base", &self.inner.base)
            .finish_non_exhaustive()
    }
}

impl HomeserverClient {
    pub fn new(base: &str, as_token: &str) -> Result<Self, MatrixError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("matrix-interop-bridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| MatrixError::Build(e.to_string()))?;
        let versions = SupportedVersions::from_parts(&["v1.11".to_owned()], &BTreeMap::new());
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base: base.trim_end_matches('/').to_owned(),
                as_token: as_token.to_owned(),
                versions,
                retry_base: Duration::from_millis(250),
                attempts: 1,
                outage: Arc::default(),
            }),
        })
    }

    /// A client of the same homeserver that tries each request up to `attempts` times,
    /// waiting with backoff after transient failures and as long as a rate limit asks.
    pub fn with_retries(&self, attempts: u32) -> Self {
        Self {
            inner: Arc::new(Inner {
                http: self.inner.http.clone(),
                base: self.inner.base.clone(),
                as_token: self.inner.as_token.clone(),
                versions: self.inner.versions.clone(),
                retry_base: self.inner.retry_base,
                attempts: attempts.max(1),
                outage: self.inner.outage.clone(),
            }),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.inner.base
    }

    /// Whether a request found the homeserver unreachable or failing since the last call.
    pub fn take_outage(&self) -> bool {
        self.inner.outage.swap(false, Ordering::SeqCst)
    }

    /// Sends `req` as `user` (identity assertion; `None` = the appservice's sender, the bot).
    pub async fn send<R>(
        &self,
        req: R,
        user: Option<&UserId>,
        device: Option<&DeviceId>,
    ) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::PathBuilder: PathArg,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let http_req = self.build(req, user, device)?;
        let resp = self.execute(http_req).await?;
        R::IncomingResponse::try_from_http_response(resp)
            .map_err(|e| MatrixError::Response(e.to_string()))
    }

    fn build<R>(
        &self,
        req: R,
        user: Option<&UserId>,
        device: Option<&DeviceId>,
    ) -> Result<http::Request<Vec<u8>>, MatrixError>
    where
        R: OutgoingRequest,
        R::PathBuilder: PathArg,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let token = SendAccessToken::Appservice(&self.inner.as_token);
        let arg = <R::PathBuilder as PathArg>::arg(&self.inner.versions);
        let built = match user {
            Some(user) => {
                let mut ident = AppserviceUserIdentity::new(user);
                ident.device_id = device;
                req.try_into_http_request_with_identity(&self.inner.base, token, ident, arg)
            }
            None => req.try_into_http_request(&self.inner.base, token, arg),
        };
        built.map_err(|e| MatrixError::Build(e.to_string()))
    }

    /// Runs a built request with retries; returns the successful response.
    async fn execute(
        &self,
        req: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, MatrixError> {
        self.execute_limited(req, MAX_API_RESPONSE).await
    }

    /// [`Self::execute`] with a limit on the answer's size.
    async fn execute_limited(
        &self,
        req: http::Request<Vec<u8>>,
        max: u64,
    ) -> Result<http::Response<Vec<u8>>, MatrixError> {
        let (parts, body) = req.into_parts();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut rb = self
                .inner
                .http
                .request(parts.method.clone(), parts.uri.to_string());
            for (k, v) in &parts.headers {
                rb = rb.header(k, v);
            }
            let result: Result<(), MatrixError> = match rb.body(body.clone()).send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let headers = resp.headers().clone();
                    let limit = if status.is_success() { max } else { 64 * 1024 };
                    match read_limited(resp, limit).await {
                        Ok(bytes) if status.is_success() => {
                            let mut b = http::Response::builder().status(status);
                            for (k, v) in &headers {
                                b = b.header(k, v);
                            }
                            return b
                                .body(bytes.to_vec())
                                .map_err(|e| MatrixError::Response(e.to_string()));
                        }
                        Ok(bytes) => Err(api_error(status.as_u16(), &bytes)),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(MatrixError::Network(e.to_string())),
            };
            let err = result.expect_err("success returned above");
            if matches!(&err, MatrixError::Network(_))
                || matches!(&err, MatrixError::Api { status, .. } if *status >= 500)
            {
                self.inner.outage.store(true, Ordering::SeqCst);
            }
            if !err.is_transient() || attempt >= self.inner.attempts {
                return Err(err);
            }
            let backoff = match &err {
                MatrixError::Api {
                    retry_after: Some(d),
                    ..
                } => *d,
                _ => self.inner.retry_base * 2u32.pow(attempt - 1),
            };
            tracing::warn!(method = %parts.method, path = parts.uri.path(), attempt, ?backoff, error = %err, "retrying homeserver request");
            tokio::time::sleep(backoff.min(Duration::from_secs(60))).await;
        }
    }

    /// `POST /_matrix/client/v1/appservice/{id}/ping`: proves both directions work.
    pub async fn ping_appservice(&self, appservice_id: &str) -> Result<Duration, MatrixError> {
        use ruma::api::client::appservice::request_ping::v1 as ping;
        let mut req = ping::Request::new(appservice_id.to_owned());
        req.transaction_id = Some(ruma::TransactionId::new());
        Ok(self.send(req, None, None).await?.duration)
    }

    /// Registers an appservice user; an existing user counts as success.
    pub async fn register_user(&self, localpart: &str) -> Result<(), MatrixError> {
        use ruma::api::client::account::register::{LoginType, v3 as register};
        let mut req = register::Request::new();
        req.username = Some(localpart.to_owned());
        req.login_type = Some(LoginType::ApplicationService);
        req.inhibit_login = true;
        match self.send(req, None, None).await {
            Ok(_) => Ok(()),
            Err(e) if e.errcode() == Some("M_USER_IN_USE") => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn set_displayname(&self, user: &UserId, name: &str) -> Result<(), MatrixError> {
        use ruma::{
            api::client::profile::set_profile_field::v3 as set, profile::ProfileFieldValue,
        };
        let req = set::Request::new(
            user.to_owned(),
            ProfileFieldValue::DisplayName(name.to_owned()),
        );
        self.send(req, Some(user), None).await.map(|_| ())
    }

    pub async fn set_avatar(&self, user: &UserId, mxc: OwnedMxcUri) -> Result<(), MatrixError> {
        use ruma::{
            api::client::profile::set_profile_field::v3 as set, profile::ProfileFieldValue,
        };
        let req = set::Request::new(user.to_owned(), ProfileFieldValue::AvatarUrl(mxc));
        self.send(req, Some(user), None).await.map(|_| ())
    }

    pub async fn join(&self, room: &RoomId, user: &UserId) -> Result<(), MatrixError> {
        use ruma::api::client::membership::join_room_by_id::v3 as join;
        self.send(join::Request::new(room.to_owned()), Some(user), None)
            .await
            .map(|_| ())
    }

    pub async fn leave(&self, room: &RoomId, user: &UserId) -> Result<(), MatrixError> {
        use ruma::api::client::membership::leave_room::v3 as leave;
        self.send(leave::Request::new(room.to_owned()), Some(user), None)
            .await
            .map(|_| ())
    }

    pub async fn invite(
        &self,
        room: &RoomId,
        by: &UserId,
        invitee: &UserId,
    ) -> Result<(), MatrixError> {
        use ruma::api::client::membership::invite_user::v3::{self as invite, InvitationRecipient};
        let recipient: InvitationRecipient =
            serde_json::from_value(serde_json::json!({ "user_id": invitee }))
                .map_err(|e| MatrixError::Build(e.to_string()))?;
        let req = invite::Request::new(room.to_owned(), recipient);
        self.send(req, Some(by), None).await.map(|_| ())
    }

    /// Removes `target` from the room (`by` needs the power to).
    pub async fn kick(
        &self,
        room: &RoomId,
        by: &UserId,
        target: &UserId,
        reason: &str,
    ) -> Result<(), MatrixError> {
        use ruma::api::client::membership::kick_user::v3 as kick;
        let mut req = kick::Request::new(room.to_owned(), target.to_owned());
        req.reason = Some(reason.to_owned());
        self.send(req, Some(by), None).await.map(|_| ())
    }

    /// Sends a message event given as raw JSON content; returns the event id.
    pub async fn send_message(
        &self,
        room: &RoomId,
        as_user: &UserId,
        event_type: &str,
        content: &serde_json::Value,
        txn_id: &str,
        ts: Option<u64>,
    ) -> Result<String, MatrixError> {
        use ruma::api::client::message::send_message_event::v3 as send;
        let raw = ruma::serde::Raw::new(content)
            .map_err(|e| MatrixError::Build(e.to_string()))?
            .cast_unchecked();
        let mut req =
            send::Request::new_raw(room.to_owned(), txn_id.into(), event_type.into(), raw);
        // Timestamp massaging: the event shows the time it was sent on the network.
        req.timestamp = ts
            .and_then(ruma::UInt::new)
            .map(ruma::MilliSecondsSinceUnixEpoch);
        Ok(self
            .send(req, Some(as_user), None)
            .await?
            .event_id
            .to_string())
    }

    /// The id of a recent event `as_user` sent into `room` whose content has `field` equal to
    /// `value` (among the sender's last 50 events), if any.
    pub async fn find_sent(
        &self,
        room: &RoomId,
        as_user: &UserId,
        field: &str,
        value: &str,
    ) -> Result<Option<String>, MatrixError> {
        use ruma::api::client::message::get_message_events::v3 as messages;
        let mut req = messages::Request::backward(room.to_owned());
        req.limit = ruma::UInt::from(50u32);
        req.filter.senders = Some(vec![as_user.to_owned()]);
        let resp = self.send(req, Some(as_user), None).await?;
        Ok(resp.chunk.iter().find_map(|raw| {
            let ev: serde_json::Value = serde_json::from_str(raw.json().get()).ok()?;
            (ev["content"][field] == value)
                .then(|| ev["event_id"].as_str().map(str::to_owned))
                .flatten()
        }))
    }

    /// Sends a state event given as raw JSON content; returns the event id.
    pub async fn send_state(
        &self,
        room: &RoomId,
        as_user: &UserId,
        event_type: &str,
        state_key: &str,
        content: &serde_json::Value,
    ) -> Result<String, MatrixError> {
        use ruma::api::client::state::send_state_event::v3 as send;
        let raw = ruma::serde::Raw::new(content)
            .map_err(|e| MatrixError::Build(e.to_string()))?
            .cast_unchecked();
        let req = send::Request::new_raw(
            room.to_owned(),
            event_type.into(),
            state_key.to_owned(),
            raw,
        );
        Ok(self
            .send(req, Some(as_user), None)
            .await?
            .event_id
            .to_string())
    }

    /// Creates a room as `creator` from a raw `createRoom` body (spec shape).
    pub async fn create_room(
        &self,
        creator: &UserId,
        body: serde_json::Value,
    ) -> Result<OwnedRoomId, MatrixError> {
        let req = create_request(body)?;
        Ok(self.send(req, Some(creator), None).await?.room_id)
    }

    pub async fn joined_members(
        &self,
        room: &RoomId,
        as_user: &UserId,
    ) -> Result<Vec<OwnedUserId>, MatrixError> {
        use ruma::api::client::membership::joined_members::v3 as members;
        Ok(self
            .send(members::Request::new(room.to_owned()), Some(as_user), None)
            .await?
            .joined
            .into_keys()
            .collect())
    }

    /// Uploads media; returns its mxc URI.
    pub async fn upload(
        &self,
        as_user: &UserId,
        data: Vec<u8>,
        mimetype: &str,
        filename: Option<&str>,
    ) -> Result<OwnedMxcUri, MatrixError> {
        use ruma::api::client::media::create_content::v3 as upload;
        let mut req = upload::Request::new(data);
        req.content_type = Some(mimetype.to_owned());
        req.filename = filename.map(str::to_owned);
        Ok(self.send(req, Some(as_user), None).await?.content_uri)
    }

    pub async fn redact(
        &self,
        room: &RoomId,
        as_user: &UserId,
        event_id: &str,
        reason: Option<&str>,
    ) -> Result<(), MatrixError> {
        use ruma::api::client::redact::redact_event::v3 as redact;
        let event_id = ruma::OwnedEventId::try_from(event_id)
            .map_err(|e| MatrixError::Build(e.to_string()))?;
        let mut req = redact::Request::new(room.to_owned(), event_id, ruma::TransactionId::new());
        req.reason = reason.map(str::to_owned);
        self.send(req, Some(as_user), None).await.map(|_| ())
    }

    pub async fn read_receipt(
        &self,
        room: &RoomId,
        as_user: &UserId,
        event_id: &str,
    ) -> Result<(), MatrixError> {
        use ruma::api::client::receipt::create_receipt::v3 as receipt;
        let event_id = ruma::OwnedEventId::try_from(event_id)
            .map_err(|e| MatrixError::Build(e.to_string()))?;
        let req = receipt::Request::new(room.to_owned(), receipt::ReceiptType::Read, event_id);
        self.send(req, Some(as_user), None).await.map(|_| ())
    }

    pub async fn typing(
        &self,
        room: &RoomId,
        as_user: &UserId,
        typing: bool,
    ) -> Result<(), MatrixError> {
        use ruma::api::client::typing::create_typing_event::v3 as typing_ev;
        let state = if typing {
            typing_ev::Typing::Yes(typing_ev::TypingInfo::new(Duration::from_secs(20)))
        } else {
            typing_ev::Typing::No
        };
        let req = typing_ev::Request::new(as_user.to_owned(), room.to_owned(), state);
        self.send(req, Some(as_user), None).await.map(|_| ())
    }

    /// Downloads media through the authenticated media API; returns the bytes and the content type.
    pub async fn download(
        &self,
        mxc: &str,
        max_bytes: usize,
    ) -> Result<(Vec<u8>, Option<String>), MatrixError> {
        use ruma::api::client::authenticated_media::get_content::v1 as get;
        let uri = ruma::OwnedMxcUri::from(mxc);
        let (server, media_id) = uri
            .parts()
            .map_err(|e| MatrixError::Build(format!("bad mxc uri: {e}")))?;
        let req = get::Request::new(media_id.to_owned(), server.to_owned());
        // Read at most `max_bytes` of it, whatever the homeserver says or sends.
        let http_req = self.build(req, None, None)?;
        let resp = self.execute_limited(http_req, max_bytes as u64).await?;
        let resp = <get::Response as ruma::api::IncomingResponse>::try_from_http_response(resp)
            .map_err(|e| MatrixError::Response(e.to_string()))?;
        Ok((resp.file, resp.content_type))
    }

    /// A client-server request outside the ruma endpoints we use: JSON in, JSON out, with the
    /// as_token and, for `user`, identity assertion. Any 2xx is success (an empty body is `null`).
    async fn raw_json(
        &self,
        method: reqwest::Method,
        path: &str,
        user: Option<&UserId>,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, MatrixError> {
        let mut uri = format!("{}{path}", self.inner.base);
        if let Some(user) = user {
            let sep = if path.contains('?') { '&' } else { '?' };
            uri = format!("{uri}{sep}user_id={}", urlencode(user.as_str()));
        }
        let mut req = http::Request::builder().method(method).uri(uri).header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", self.inner.as_token),
        );
        let body = match body {
            Some(body) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                serde_json::to_vec(&body).map_err(|e| MatrixError::Build(e.to_string()))?
            }
            None => Vec::new(),
        };
        let req = req
            .body(body)
            .map_err(|e| MatrixError::Build(e.to_string()))?;
        let bytes = self.execute(req).await?.into_body();
        if bytes.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| MatrixError::Response(e.to_string()))
    }

    /// `GET` of a client-API path with query parameters, as the bot (no device: a sync of the
    /// bot's takes none of its device's to-device messages).
    pub async fn get_json(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<serde_json::Value, MatrixError> {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(query)
            .finish();
        let path = if query.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{query}")
        };
        self.raw_json(reqwest::Method::GET, &path, None, None).await
    }

    /// MSC4190: creates (or updates) a device of an appservice user.
    pub async fn create_device(
        &self,
        user: &UserId,
        device: &DeviceId,
        display_name: &str,
    ) -> Result<(), MatrixError> {
        let path = format!("/_matrix/client/v3/devices/{}", urlencode(device.as_str()));
        let body = serde_json::json!({ "display_name": display_name });
        self.raw_json(reqwest::Method::PUT, &path, Some(user), Some(body))
            .await
            .map(|_| ())
    }

    /// Reads one state event's content.
    pub async fn room_state(
        &self,
        room: &RoomId,
        as_user: &UserId,
        event_type: &str,
        state_key: &str,
    ) -> Result<serde_json::Value, MatrixError> {
        let path = format!(
            "/_matrix/client/v3/rooms/{}/state/{}/{}",
            urlencode(room.as_str()),
            urlencode(event_type),
            urlencode(state_key)
        );
        self.raw_json(reqwest::Method::GET, &path, Some(as_user), None)
            .await
    }

    /// The homeserver's default room version (from `/capabilities`).
    pub async fn default_room_version(&self) -> Result<String, MatrixError> {
        let v = self
            .raw_json(
                reqwest::Method::GET,
                "/_matrix/client/v3/capabilities",
                None,
                None,
            )
            .await?;
        Ok(v["capabilities"]["m.room_versions"]["default"]
            .as_str()
            .unwrap_or("1")
            .to_owned())
    }

    /// `GET /_matrix/client/versions`, to see whether the homeserver is up.
    pub async fn versions(&self) -> Result<(), MatrixError> {
        let url = format!("{}/_matrix/client/versions", self.inner.base);
        let resp = self
            .inner
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| MatrixError::Network(e.to_string()))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(MatrixError::Network(format!("status {}", resp.status())))
        }
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

fn api_error(status: u16, body: &[u8]) -> MatrixError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let (errcode, message, retry) = match parsed {
        Some(b) => (b.errcode, b.error, b.retry_after_ms),
        None => (
            String::new(),
            String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            None,
        ),
    };
    MatrixError::Api {
        status,
        errcode,
        message,
        retry_after: retry.map(Duration::from_millis),
    }
}

/// The `createRoom` request for a body in the client-server API's JSON form.
pub(crate) fn create_request(
    body: serde_json::Value,
) -> Result<ruma::api::client::room::create_room::v3::Request, MatrixError> {
    Ok(serde_json::from_value::<CreateRoomBody>(body)
        .map_err(|e| MatrixError::Build(e.to_string()))?
        .into_request())
}

/// The subset of `createRoom` the bridge uses, deserialized from the spec's JSON shape.
#[derive(Deserialize, Default)]
struct CreateRoomBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    invite: Vec<OwnedUserId>,
    #[serde(default)]
    is_direct: bool,
    #[serde(default)]
    preset: Option<ruma::api::client::room::create_room::v3::RoomPreset>,
    #[serde(default)]
    initial_state: Vec<ruma::serde::Raw<ruma::events::AnyInitialStateEvent>>,
    #[serde(default)]
    power_level_content_override: Option<Box<serde_json::value::RawValue>>,
    /// Extra `m.room.create` content (`{"type": "m.space"}` for a space).
    #[serde(default)]
    creation_content: Option<Box<serde_json::value::RawValue>>,
}

impl CreateRoomBody {
    fn into_request(self) -> ruma::api::client::room::create_room::v3::Request {
        let mut req = ruma::api::client::room::create_room::v3::Request::new();
        req.name = self.name;
        req.topic = self.topic;
        req.invite = self.invite;
        req.is_direct = self.is_direct;
        req.preset = self.preset;
        req.initial_state = self.initial_state;
        req.power_level_content_override = self
            .power_level_content_override
            .map(ruma::serde::Raw::from_json);
        req.creation_content = self.creation_content.map(ruma::serde::Raw::from_json);
        req
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A homeserver that answers every request with `total` bytes of media in 64 KiB chunks,
    /// announcing the length or not; returns its address and how much it managed to write.
    async fn media_server(total: usize, announce: bool) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let written = Arc::new(AtomicUsize::new(0));
        let w = written.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let w = w.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = sock.read(&mut buf).await;
                    let head = if announce {
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: {total}\r\n\r\n"
                        )
                    } else {
                        "HTTP/1.1 200 OK\r\ncontent-type: image/png\r\nconnection: close\r\n\r\n"
                            .to_owned()
                    };
                    if sock.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = vec![0x42u8; 64 * 1024];
                    let mut sent = 0;
                    while sent < total {
                        if sock.write_all(&chunk).await.is_err() {
                            return;
                        }
                        sent += chunk.len();
                        w.fetch_add(chunk.len(), Ordering::SeqCst);
                    }
                });
            }
        });
        (format!("http://{addr}"), written)
    }

    /// The download stops at the limit: a homeserver (or a remote server through it) sending
    /// 200 MB, announced or not, costs the bridge about the limit, not 200 MB.
    #[tokio::test]
    async fn media_downloads_stop_at_the_limit() {
        for announce in [true, false] {
            let (base, written) = media_server(200 * 1024 * 1024, announce).await;
            let client = HomeserverClient::new(&base, "as_token").unwrap();
            let err = client
                .download("mxc://x/abcdef", 1024 * 1024)
                .await
                .expect_err("over the limit");
            assert!(matches!(err, MatrixError::TooLarge(_)), "{err}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let sent = written.load(Ordering::SeqCst);
            // What the kernel's socket buffers took on top of the limit, and no more.
            assert!(
                sent < 24 * 1024 * 1024,
                "announce={announce}: {sent} bytes sent"
            );
        }
        // Under the limit it arrives whole.
        let (base, _) = media_server(128 * 1024, false).await;
        let client = HomeserverClient::new(&base, "as_token").unwrap();
        let (data, ct) = client
            .download("mxc://x/abcdef", 1024 * 1024)
            .await
            .unwrap();
        assert_eq!(data.len(), 128 * 1024);
        assert_eq!(ct.as_deref(), Some("image/png"));
    }
}
