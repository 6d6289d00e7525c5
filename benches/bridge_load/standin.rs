//! The stand-in homeserver: answers every client-server call the bridge makes, at once.

use super::*;

#[derive(Default)]
pub(crate) struct HsState {
    pub(crate) rooms: AtomicU64,
    pub(crate) events: AtomicU64,
    /// Requests by route.
    pub(crate) routes: Mutex<BTreeMap<&'static str, u64>>,
    /// (user, txn) → event id, so a retried send gets the same answer (as from a homeserver).
    pub(crate) txns: Mutex<HashMap<(String, String), String>>,
    pub(crate) replayed_txns: AtomicU64,
    pub(crate) bad_auth: AtomicU64,
    /// Notices the bot sent (errors shown to users); the first few are kept.
    pub(crate) notices: Mutex<Vec<String>>,
    pub(crate) notice_count: AtomicU64,
}

pub(crate) struct Hs {
    pub(crate) state: HsState,
    pub(crate) reg: Arc<Registry>,
}

pub(crate) fn pct_decode(s: &str) -> String {
    pub(crate) fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn matrix_error(status: StatusCode, errcode: &str, msg: &str) -> Response {
    (status, Json(json!({"errcode": errcode, "error": msg}))).into_response()
}

pub(crate) async fn hs_handler(
    State(hs): State<Arc<Hs>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let segs: Vec<String> = uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(pct_decode)
        .collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let user_id = uri.query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "user_id")
            .map(|(_, v)| v.into_owned())
    });
    let st = &hs.state;
    let route: &'static str = match (method.as_str(), s.as_slice()) {
        ("GET", ["_matrix", "client", "versions"]) => "versions",
        ("POST", ["_matrix", "client", "v3", "register"]) => "register",
        ("PUT", ["_matrix", "client", "v3", "profile", ..]) => "profile",
        ("POST", ["_matrix", "client", "v1", "appservice", _, "ping"]) => "ping",
        ("GET", ["_matrix", "client", "v3", "capabilities"]) => "capabilities",
        ("POST", ["_matrix", "client", "v3", "createRoom"]) => "createRoom",
        ("POST", ["_matrix", "client", "v3", "rooms", _, "join"])
        | ("POST", ["_matrix", "client", "v3", "join", _]) => "join",
        ("PUT", ["_matrix", "client", "v3", "rooms", _, "send", ..]) => "send",
        ("GET", ["_matrix", "client", "v3", "rooms", _, "joined_members"]) => "joined_members",
        ("PUT", ["_matrix", "client", "v3", "rooms", _, "state", ..]) => "state",
        _ => "other",
    };
    *st.routes
        .lock()
        .expect("routes lock")
        .entry(route)
        .or_default() += 1;
    if route != "versions" {
        let auth = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok());
        if auth != Some(format!("Bearer {AS_TOKEN}").as_str()) {
            st.bad_auth.fetch_add(1, Ordering::Relaxed);
            return matrix_error(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "bad as_token");
        }
    }
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let out = match (route, s.as_slice()) {
        ("versions", _) => json!({"versions": ["v1.11", "v1.12"]}),
        ("register", _) => {
            let local = parsed["username"].as_str().unwrap_or("anonymous");
            json!({"user_id": format!("@{local}:{DOMAIN}")})
        }
        ("ping", _) => json!({"duration_ms": 1}),
        ("capabilities", _) => {
            json!({"capabilities": {"m.room_versions": {"default": "12", "available": {"12": "stable"}}}})
        }
        ("createRoom", _) => {
            let n = st.rooms.fetch_add(1, Ordering::Relaxed);
            json!({"room_id": format!("!benchroom{n}:{DOMAIN}")})
        }
        ("join", [.., room, "join"]) | ("join", [.., "join", room]) => json!({"room_id": room}),
        ("send", [_, _, _, _, _room, _, _ty, txn]) => {
            let sender = user_id.clone().unwrap_or_default();
            let key = (sender.clone(), (*txn).to_owned());
            let (event_id, replay) = {
                let mut txns = st.txns.lock().expect("txns lock");
                match txns.get(&key) {
                    Some(e) => (e.clone(), true),
                    None => {
                        let e = format!("$benchev{}", st.events.fetch_add(1, Ordering::Relaxed));
                        txns.insert(key, e.clone());
                        (e, false)
                    }
                }
            };
            if replay {
                st.replayed_txns.fetch_add(1, Ordering::Relaxed);
            } else {
                let text = parsed["body"].as_str().unwrap_or_default();
                if parsed["msgtype"] == "m.notice" {
                    st.notice_count.fetch_add(1, Ordering::Relaxed);
                    let mut n = st.notices.lock().expect("notices lock");
                    if n.len() < 5 {
                        n.push(format!("{sender}: {text}"));
                    }
                } else {
                    hs.reg.arrived(text);
                }
            }
            json!({"event_id": event_id})
        }
        ("joined_members", _) => json!({"joined": {}}),
        // The personal spaces' children, and other room state.
        ("state", _) => json!({
            "event_id": format!("$benchstate{}", st.events.fetch_add(1, Ordering::Relaxed))
        }),
        _ => json!({}),
    };
    Json(out).into_response()
}

pub(crate) async fn start_homeserver(reg: Arc<Registry>) -> (Arc<Hs>, u16) {
    let hs = Arc::new(Hs {
        state: HsState::default(),
        reg,
    });
    let app = Router::new().fallback(hs_handler).with_state(hs.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind stand-in homeserver");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (hs, port)
}

/// What the stand-in homeserver saw.
pub(crate) fn stand_in_report(hs: &Hs) {
    let st = &hs.state;
    let routes: Vec<String> = st
        .routes
        .lock()
        .expect("routes lock")
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("stand-in homeserver requests: {}", routes.join(", "));
    println!(
        "stand-in anomalies: {} replayed send txns, {} bad as_token, {} bot notices",
        st.replayed_txns.load(Ordering::Relaxed),
        st.bad_auth.load(Ordering::Relaxed),
        st.notice_count.load(Ordering::Relaxed),
    );
    for n in st.notices.lock().expect("notices lock").iter() {
        println!("  notice: {n}");
    }
}
