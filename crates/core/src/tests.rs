//! The core against recording stand-ins for both sides and its stores in memory: who may make the
//! bridge do what (authors only, relay permissions, power levels). The end-to-end tests show the
//! same paths against Synapse and official libsignal; these pin the rules down one by one.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{
    Bridge, BridgeError, BridgeSettings, MatrixConnector, MatrixEventHandler,
    model::{Body as D, Delete, Edit, Message, Text},
    network::{
        GroupChange, GroupInfo, NetAccount, NetError, NetEvent, NetProfile, NetTarget, Network,
        UploadedMedia,
    },
};
use super::{
    memory::MemoryStore,
    settings::{BridgeConfig, RelayConfig},
    store::{PortalStore, UserStore},
};

/// What the core asked the Matrix side to do, in order.
#[derive(Default)]
pub(crate) struct FakeMatrix {
    pub calls: Mutex<Vec<(String, Value)>>,
    counter: Mutex<u64>,
    /// Media downloads that fail (the homeserver answering 502) before they succeed again.
    pub failing_downloads: Mutex<u32>,
}

impl FakeMatrix {
    fn record(&self, what: &str, v: Value) -> String {
        self.calls.lock().unwrap().push((what.to_owned(), v));
        let mut n = self.counter.lock().unwrap();
        *n += 1;
        format!("{n}")
    }

    pub fn calls_of(&self, what: &str) -> Vec<Value> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(w, _)| w == what)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn clear(&self) {
        self.calls.lock().unwrap().clear();
    }
}

#[async_trait]
impl MatrixConnector for FakeMatrix {
    fn bot_mxid(&self) -> &str {
        "@interopbot:x"
    }
    fn is_ghost(&self, mxid: &str) -> bool {
        mxid.starts_with("@interop_")
    }
    async fn join(&self, room_id: &str, as_user: &str) -> Result<(), BridgeError> {
        self.record("join", json!({"room": room_id, "as": as_user}));
        Ok(())
    }
    async fn leave(&self, room_id: &str, as_user: &str) -> Result<(), BridgeError> {
        self.record("leave", json!({"room": room_id, "as": as_user}));
        Ok(())
    }
    async fn send_notice(
        &self,
        room_id: &str,
        as_user: &str,
        body: &str,
        _html: &str,
        txn_id: &str,
    ) -> Result<String, BridgeError> {
        let n = self.record(
            "notice",
            json!({"room": room_id, "as": as_user, "body": body, "txn": txn_id}),
        );
        Ok(format!("$notice{n}"))
    }
    async fn joined_members(
        &self,
        _room_id: &str,
        _as_user: &str,
    ) -> Result<Vec<String>, BridgeError> {
        Ok(vec![])
    }
    async fn ensure_ghost(
        &self,
        localpart: &str,
        displayname: &str,
    ) -> Result<String, BridgeError> {
        self.record(
            "ensure_ghost",
            json!({"localpart": localpart, "name": displayname}),
        );
        Ok(format!("@{localpart}:x"))
    }
    async fn set_avatar(&self, _user: &str, _mxc: &str) -> Result<(), BridgeError> {
        Ok(())
    }
    async fn create_room(&self, room: super::types::NewRoom) -> Result<String, BridgeError> {
        let pl = &room.power_levels;
        let body = json!({"name": room.name, "is_direct": room.is_direct, "invite": room.invite,
            "avatar": room.avatar_mxc, "encrypted": room.encrypted, "space": room.space,
            "power_levels": {"users": pl.users, "redact": pl.redact, "kick": pl.kick, "ban": pl.ban,
                "events": pl.events}});
        let mut body = body;
        let id = format!("!room{}:x", *self.counter.lock().unwrap() + 1);
        body["room"] = json!(id);
        self.record("create_room", body);
        Ok(id)
    }
    async fn kick(
        &self,
        room_id: &str,
        by: &str,
        target: &str,
        reason: &str,
    ) -> Result<(), BridgeError> {
        self.record(
            "kick",
            json!({"room": room_id, "by": by, "target": target, "reason": reason}),
        );
        Ok(())
    }
    async fn invite(&self, room_id: &str, by: &str, invitee: &str) -> Result<(), BridgeError> {
        self.record(
            "invite",
            json!({"room": room_id, "by": by, "invitee": invitee}),
        );
        Ok(())
    }
    async fn send_message(
        &self,
        room_id: &str,
        as_user: &str,
        content: ruma::events::AnyMessageLikeEventContent,
        txn_id: &str,
        ts: Option<u64>,
    ) -> Result<String, BridgeError> {
        let ty = ruma::events::MessageLikeEventContent::event_type(&content).to_string();
        let json = serde_json::to_value(&content).expect("serializable");
        self.send_event(room_id, as_user, &ty, json, txn_id, ts)
            .await
    }
    async fn send_event(
        &self,
        room_id: &str,
        as_user: &str,
        event_type: &str,
        content: Value,
        txn_id: &str,
        ts: Option<u64>,
    ) -> Result<String, BridgeError> {
        let n = self.record(
            "send_event",
            json!({"room": room_id, "as": as_user, "type": event_type, "content": content, "txn": txn_id, "ts": ts}),
        );
        Ok(format!("$ev{n}"))
    }
    async fn send_state(
        &self,
        room_id: &str,
        as_user: &str,
        content: ruma::events::AnyStateEventContent,
        state_key: &str,
    ) -> Result<String, BridgeError> {
        let event_type = ruma::events::StateEventContent::event_type(&content).to_string();
        let content = serde_json::to_value(&content).expect("serializable");
        self.send_state_json(room_id, as_user, &event_type, state_key, content)
            .await
    }
    async fn send_state_json(
        &self,
        room_id: &str,
        as_user: &str,
        event_type: &str,
        state_key: &str,
        content: Value,
    ) -> Result<String, BridgeError> {
        let n = self.record(
            "send_state",
            json!({"room": room_id, "as": as_user, "type": event_type, "state_key": state_key, "content": content}),
        );
        Ok(format!("$state{n}"))
    }
    async fn redact(
        &self,
        room_id: &str,
        as_user: &str,
        event_id: &str,
    ) -> Result<(), BridgeError> {
        self.record(
            "redact",
            json!({"room": room_id, "as": as_user, "event": event_id}),
        );
        Ok(())
    }
    async fn read_receipt(
        &self,
        _room_id: &str,
        _as_user: &str,
        _event_id: &str,
    ) -> Result<(), BridgeError> {
        Ok(())
    }
    async fn typing(
        &self,
        _room_id: &str,
        _as_user: &str,
        _typing: bool,
    ) -> Result<(), BridgeError> {
        Ok(())
    }
    async fn upload(
        &self,
        _as_user: &str,
        _data: Vec<u8>,
        _mimetype: &str,
        _filename: Option<&str>,
    ) -> Result<String, BridgeError> {
        Ok("mxc://x/upload".into())
    }
    async fn download(&self, _mxc: &str) -> Result<(Vec<u8>, Option<String>), BridgeError> {
        Ok((b"media".to_vec(), None))
    }
    async fn upload_for_room(
        &self,
        _room_id: &str,
        _as_user: &str,
        _data: Vec<u8>,
        _mimetype: &str,
        _filename: &str,
    ) -> Result<ruma::events::room::MediaSource, BridgeError> {
        Ok(ruma::events::room::MediaSource::Plain(
            "mxc://x/upload".into(),
        ))
    }
    async fn download_content(
        &self,
        _source: &ruma::events::room::MediaSource,
    ) -> Result<(Vec<u8>, Option<String>), BridgeError> {
        {
            let mut failing = self.failing_downloads.lock().unwrap();
            if *failing > 0 {
                *failing -= 1;
                return Err(BridgeError::Matrix("502 Bad Gateway".into()));
            }
        }
        Ok((b"media".to_vec(), None))
    }
    async fn state_json(
        &self,
        room_id: &str,
        _as_user: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Value>, BridgeError> {
        // The last state set, else the power levels the room was made with.
        let set = self.calls_of("send_state").into_iter().rev().find(|c| {
            c["room"] == room_id && c["type"] == event_type && c["state_key"] == state_key
        });
        if let Some(c) = set {
            return Ok(Some(c["content"].clone()));
        }
        if event_type != "m.room.power_levels" {
            return Ok(None);
        }
        Ok(self
            .calls_of("create_room")
            .into_iter()
            .find(|c| c["room"] == room_id)
            .map(|c| c["power_levels"].clone()))
    }
    async fn is_encrypted(&self, _room_id: &str) -> bool {
        false
    }
    async fn mark_encrypted(&self, _room_id: &str) {}
}

/// A receipt sent on the stand-in network: to whom, the group, whether read, the messages.
pub(crate) type SentReceipt = (String, Option<String>, bool, Vec<String>);

/// One login on the stand-in network: records what it was asked to send.
pub(crate) struct FakeAccount {
    id: String,
    pub sent: Mutex<Vec<(NetTarget, String, Message)>>,
    /// Members of every group this account is asked about.
    pub group_members: Mutex<Vec<String>>,
    pub profile_lookups: Mutex<u32>,
    /// Sends that fail (transiently) before sends succeed again.
    pub failing_sends: Mutex<u32>,
    /// Attachment uploads that fail (the gateway away) before they succeed again.
    pub failing_uploads: Mutex<u32>,
    /// Profile names by account (others are "Contact <account>").
    pub names: Mutex<HashMap<String, String>>,
    /// Accounts the network does not know.
    pub unknown: Mutex<Vec<String>>,
    /// Receipts sent.
    pub receipts: Mutex<Vec<SentReceipt>>,
    /// Held by a test, receipts wait before they are sent.
    pub hold_receipts: tokio::sync::Mutex<()>,
}

impl FakeAccount {
    pub fn new(id: &str) -> Arc<Self> {
        Arc::new(Self {
            id: id.to_owned(),
            sent: Mutex::default(),
            group_members: Mutex::default(),
            profile_lookups: Mutex::default(),
            failing_sends: Mutex::default(),
            failing_uploads: Mutex::default(),
            names: Mutex::default(),
            unknown: Mutex::default(),
            receipts: Mutex::default(),
            hold_receipts: tokio::sync::Mutex::default(),
        })
    }

    pub fn sent_bodies(&self) -> Vec<D> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, _, d)| d.body.clone())
            .collect()
    }
}

#[async_trait]
impl NetAccount for FakeAccount {
    fn account_id(&self) -> &str {
        &self.id
    }
    fn is_connected(&self) -> bool {
        true
    }
    async fn send(&self, to: NetTarget, message_id: String, data: Message) -> Result<(), NetError> {
        {
            let mut failing = self.failing_sends.lock().unwrap();
            if *failing > 0 {
                *failing -= 1;
                return Err(NetError::Unavailable("gateway away".into()));
            }
        }
        self.sent.lock().unwrap().push((to, message_id, data));
        Ok(())
    }
    async fn receipt(
        &self,
        to: &str,
        group: Option<&str>,
        read: bool,
        message_ids: Vec<String>,
    ) -> Result<(), NetError> {
        let _held = self.hold_receipts.lock().await;
        self.receipts.lock().unwrap().push((
            to.to_owned(),
            group.map(str::to_owned),
            read,
            message_ids,
        ));
        Ok(())
    }
    async fn typing(&self, _to: NetTarget, _typing: bool) -> Result<(), NetError> {
        Ok(())
    }
    async fn upload(&self, _data: Vec<u8>) -> Result<UploadedMedia, NetError> {
        {
            let mut failing = self.failing_uploads.lock().unwrap();
            if *failing > 0 {
                *failing -= 1;
                return Err(NetError::Unavailable("gateway connection lost".into()));
            }
        }
        Ok(UploadedMedia {
            blob: "blob".into(),
            key: vec![0; 64],
            sha256: vec![0; 32],
        })
    }
    async fn download(
        &self,
        _blob: &str,
        _key: &[u8],
        _sha256: &[u8],
        _max: u64,
    ) -> Result<Vec<u8>, NetError> {
        Ok(b"media".to_vec())
    }
    async fn create_group(&self, name: &str, members: Vec<String>) -> Result<GroupInfo, NetError> {
        Ok(GroupInfo {
            id: "g-new".into(),
            name: name.to_owned(),
            members,
            ..Default::default()
        })
    }
    async fn update_group(&self, group: &str, _change: GroupChange) -> Result<GroupInfo, NetError> {
        self.group(group).await
    }
    async fn group(&self, group: &str) -> Result<GroupInfo, NetError> {
        Ok(GroupInfo {
            id: group.to_owned(),
            name: "A group".into(),
            members: self.group_members.lock().unwrap().clone(),
            ..Default::default()
        })
    }
    async fn profile(&self, account: &str) -> Result<Option<NetProfile>, NetError> {
        *self.profile_lookups.lock().unwrap() += 1;
        if self.unknown.lock().unwrap().iter().any(|a| a == account) {
            return Ok(None);
        }
        let name = self.names.lock().unwrap().get(account).cloned();
        Ok(Some(NetProfile {
            name: name.unwrap_or_else(|| format!("Contact {account}")),
            avatar_blob: String::new(),
        }))
    }
    async fn upload_avatar(&self, _image: Vec<u8>) -> Result<String, NetError> {
        Ok("avatar".into())
    }
    async fn download_avatar(&self, _blob: &str) -> Result<Vec<u8>, NetError> {
        Ok(vec![])
    }
    async fn ack(&self, _envelope_id: u64) {}
}

/// The stand-in network: the logins the test connected.
#[derive(Default)]
pub(crate) struct FakeNetwork {
    pub accounts: Mutex<HashMap<String, Arc<FakeAccount>>>,
    /// Messages "encoded" for keeping: the encoding is the index here.
    kept: Mutex<Vec<Message>>,
}

#[async_trait]
impl Network for FakeNetwork {
    async fn request_code(&self, _account: &str) -> Result<(), NetError> {
        Ok(())
    }
    async fn verify_and_connect(
        &self,
        mxid: &str,
        account: &str,
        _code: &str,
    ) -> Result<Arc<dyn NetAccount>, NetError> {
        let acc = FakeAccount::new(account);
        self.accounts
            .lock()
            .unwrap()
            .insert(mxid.to_owned(), acc.clone());
        Ok(acc)
    }
    async fn reconnect(&self, mxid: &str) -> Result<Arc<dyn NetAccount>, NetError> {
        self.account(mxid).ok_or(NetError::NotLoggedIn)
    }
    async fn logout(&self, mxid: &str) -> Result<(), NetError> {
        self.accounts.lock().unwrap().remove(mxid);
        Ok(())
    }
    fn account(&self, mxid: &str) -> Option<Arc<dyn NetAccount>> {
        self.accounts
            .lock()
            .unwrap()
            .get(mxid)
            .map(|a| a.clone() as Arc<dyn NetAccount>)
    }
    fn any_account(&self) -> Option<Arc<dyn NetAccount>> {
        self.accounts
            .lock()
            .unwrap()
            .values()
            .next()
            .map(|a| a.clone() as Arc<dyn NetAccount>)
    }
    async fn reachable(&self) -> bool {
        true
    }
    fn is_valid_account(&self, id: &str) -> bool {
        // The reference network's rule: `+` and 8 to 15 digits.
        id.strip_prefix('+')
            .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
    }
    fn encode_message(&self, message: &Message) -> Vec<u8> {
        let mut kept = self.kept.lock().unwrap();
        kept.push(message.clone());
        (kept.len() - 1).to_string().into_bytes()
    }
    fn decode_message(&self, bytes: &[u8]) -> Result<Message, NetError> {
        std::str::from_utf8(bytes)
            .ok()
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| self.kept.lock().unwrap().get(i).cloned())
            .ok_or_else(|| NetError::Other("not a kept message".into()))
    }
}

/// A bridge core over the stand-ins, with `@alice:x` logged in as `+15550001000`.
pub(crate) struct Harness {
    pub bridge: Bridge,
    pub matrix: Arc<FakeMatrix>,
    pub network: Arc<FakeNetwork>,
    pub store: Arc<MemoryStore>,
    pub alice: Arc<FakeAccount>,
    next_envelope: Mutex<u64>,
}

pub(crate) const ALICE: &str = "@alice:x";
pub(crate) const ALICE_ACC: &str = "+15550001000";

impl Harness {
    /// Message requests off: the other rules are easier to show on portals that open at once.
    pub async fn new() -> Self {
        Self::with(|s| s.bridge.message_requests = false).await
    }

    pub async fn with(tune: impl FnOnce(&mut BridgeSettings)) -> Self {
        let store = Arc::new(MemoryStore::default());
        let matrix = Arc::new(FakeMatrix::default());
        let network = Arc::new(FakeNetwork::default());
        let alice = FakeAccount::new(ALICE_ACC);
        network
            .accounts
            .lock()
            .unwrap()
            .insert(ALICE.into(), alice.clone());
        store.set_login(ALICE, ALICE_ACC).await.unwrap();
        let mut settings = BridgeSettings {
            bridge: BridgeConfig {
                permissions: BTreeMap::from([
                    ("*".to_owned(), "relay".to_owned()),
                    ("x".to_owned(), "user".to_owned()),
                    ("@admin:x".to_owned(), "admin".to_owned()),
                    ("other.example".to_owned(), "none".to_owned()),
                ]),
                relay: RelayConfig {
                    enabled: true,
                    admin_only: false,
                },
                ..BridgeConfig::default()
            },
            homeserver_domain: "x".into(),
            username_template: "interop_{id}".into(),
            encryption_default: false,
            encryption_require: false,
        };
        // Spaces add rooms the other tests do not count; their own test turns them on.
        settings.bridge.personal_spaces = false;
        tune(&mut settings);
        let bridge = Bridge::new(
            matrix.clone(),
            super::Stores {
                users: store.clone(),
                portals: store.clone(),
                requests: store.clone(),
                kv: store.clone(),
            },
            network.clone(),
            settings,
            super::metrics::Metrics::new(),
        );
        Self {
            bridge,
            matrix,
            network,
            store,
            alice,
            next_envelope: Mutex::new(1),
        }
    }

    /// Logs `mxid` in as `account` on the stand-in network.
    pub async fn login(&self, mxid: &str, account: &str) -> Arc<FakeAccount> {
        let acc = FakeAccount::new(account);
        self.network
            .accounts
            .lock()
            .unwrap()
            .insert(mxid.into(), acc.clone());
        self.store.set_login(mxid, account).await.unwrap();
        acc
    }

    /// An interop message to alice's login.
    pub async fn net_message(
        &self,
        from: &str,
        group: Option<&str>,
        message_id: &str,
        body: D,
    ) -> Result<(), BridgeError> {
        let envelope_id = {
            let mut n = self.next_envelope.lock().unwrap();
            *n += 1;
            *n
        };
        let ev = NetEvent::Message {
            envelope_id,
            from: from.into(),
            group: group.map(str::to_owned),
            message_id: message_id.into(),
            timestamp: SENT_AT + envelope_id,
            data: Message {
                body: Some(body),
                reply_to: None,
                expire_timer: 0,
            },
        };
        self.bridge.on_network_event(ALICE, &ev).await
    }

    /// A Matrix event, as the queue hands it to the core.
    pub async fn matrix_event(
        &self,
        room: &str,
        sender: &str,
        event_id: &str,
        ty: &str,
        content: Value,
    ) -> Result<(), BridgeError> {
        let mut ev = json!({"type": ty, "room_id": room, "sender": sender, "event_id": event_id, "content": content});
        if ty == "m.room.redaction" {
            ev["redacts"] = ev["content"]["redacts"].clone();
        }
        self.bridge.handle_matrix_event(&typed(ev)).await
    }

    /// The portal room of a chat of alice's.
    pub async fn room_of(&self, chat: &str) -> String {
        self.store
            .portal(ALICE, chat)
            .await
            .unwrap()
            .and_then(|p| p.room_id)
            .map(String::from)
            .expect("portal room")
    }

    /// The interop message id of a Matrix event (from the message map).
    pub async fn message_id_of(&self, room: &str, event_id: &str) -> String {
        self.store
            .by_event(room, event_id)
            .await
            .unwrap()
            .expect("mapped")
            .message_id
    }

    /// The Matrix event a network message became in `room` (it must have been bridged).
    pub async fn event_of(&self, room: &str, message_id: &str) -> String {
        self.store
            .by_message(room, message_id, "")
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{message_id} is not bridged"))
            .event_id
    }

    pub fn notices(&self) -> Vec<String> {
        self.matrix
            .calls_of("notice")
            .iter()
            .map(|n| n["body"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// An interop edit of `target` to `body`.
pub(crate) fn net_edit(target: &str, body: &str) -> D {
    D::Edit(Edit {
        target: target.into(),
        text: Some(Text {
            body: body.into(),
            formats: vec![],
        }),
    })
}

/// When the harness's interop messages were sent (plus their envelope number).
pub(crate) const SENT_AT: u64 = 1_700_000_000_000;

pub(crate) fn text(body: &str) -> D {
    D::Text(Text {
        body: body.into(),
        formats: vec![],
    })
}

/// A room event as the Matrix side hands it to the core: parsed with ruma (the homeserver adds
/// the timestamp).
pub(crate) fn typed(mut ev: Value) -> ruma::events::AnyTimelineEvent {
    ev["origin_server_ts"] = json!(1);
    serde_json::from_value(ev.clone()).unwrap_or_else(|e| panic!("not a valid event: {e}: {ev}"))
}

fn matrix_text(body: &str) -> Value {
    json!({"msgtype": "m.text", "body": body})
}

fn matrix_edit(target: &str, body: &str) -> Value {
    json!({
        "msgtype": "m.text",
        "body": format!("* {body}"),
        "m.new_content": {"msgtype": "m.text", "body": body},
        "m.relates_to": {"rel_type": "m.replace", "event_id": target},
    })
}

const BOB_ACC: &str = "+15550002000";
const CAROL_ACC: &str = "+15550003000";

/// A message is reported delivered once it is on Matrix. While a chat's receipt is on its way,
/// the chat's next messages wait for the next receipt and go in it together (one receipt per
/// message cost the gateway and the contact a stored envelope each); another chat's go apart.
#[tokio::test]
async fn delivery_receipts_of_a_busy_chat_go_together() {
    let h = Harness::new().await;
    let held = h.alice.hold_receipts.lock().await;
    for id in ["b1", "b2", "b3"] {
        h.net_message(BOB_ACC, None, id, text(id)).await.unwrap();
    }
    h.net_message(CAROL_ACC, None, "c1", text("c1"))
        .await
        .unwrap();
    // Edits and reactions are not reported.
    h.net_message(
        BOB_ACC,
        None,
        "b4",
        D::Reaction(super::model::Reaction {
            target: "b1".into(),
            emoji: "👍".into(),
            remove: false,
            target_author: BOB_ACC.into(),
        }),
    )
    .await
    .unwrap();
    drop(held);
    let want = |to: &str, ids: &[&str]| {
        (
            to.to_owned(),
            None,
            false,
            ids.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
        )
    };
    let mut sent = Vec::new();
    for _ in 0..200 {
        sent = h.alice.receipts.lock().unwrap().clone();
        if sent.len() >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    sent.sort();
    assert_eq!(
        sent,
        [
            want(BOB_ACC, &["b1"]),
            want(BOB_ACC, &["b2", "b3"]),
            want(CAROL_ACC, &["c1"])
        ]
    );
    // Nothing is on its way now: the next message goes at once.
    h.net_message(BOB_ACC, None, "b5", text("b5"))
        .await
        .unwrap();
    for _ in 0..200 {
        if h.alice.receipts.lock().unwrap().len() == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(h.alice.receipts.lock().unwrap()[3], want(BOB_ACC, &["b5"]));
}

/// A DM portal with Bob (made by Bob's first message), and an event alice wrote in it.
async fn dm_with_alices_message(h: &Harness) -> (String, String) {
    h.net_message(BOB_ACC, None, "bob-1", text("hi alice"))
        .await
        .unwrap();
    let room = h.room_of(BOB_ACC).await;
    h.matrix_event(
        &room,
        ALICE,
        "$alice1",
        "m.room.message",
        matrix_text("hello bob"),
    )
    .await
    .unwrap();
    let id = h.message_id_of(&room, "$alice1").await;
    (room, id)
}

#[tokio::test]
async fn a_contact_cannot_delete_or_edit_the_users_message() {
    let h = Harness::new().await;
    let (room, alices) = dm_with_alices_message(&h).await;
    h.matrix.clear();
    h.net_message(
        BOB_ACC,
        None,
        "bob-del",
        D::Delete(Delete {
            target: alices.clone(),
        }),
    )
    .await
    .unwrap();
    h.net_message(
        BOB_ACC,
        None,
        "bob-edit",
        D::Edit(Edit {
            target: alices.clone(),
            text: Some(Text {
                body: "I owe Bob 1000 EUR".into(),
                formats: vec![],
            }),
        }),
    )
    .await
    .unwrap();
    assert!(
        h.matrix.calls_of("redact").is_empty(),
        "redacted: {:?}",
        h.matrix.calls_of("redact")
    );
    assert!(
        h.matrix.calls_of("send_event").is_empty(),
        "edited: {:?}",
        h.matrix.calls_of("send_event")
    );
    // Bob's own message: both work.
    let bobs = "bob-1".to_owned();
    h.net_message(
        BOB_ACC,
        None,
        "bob-edit2",
        D::Edit(Edit {
            target: bobs.clone(),
            text: Some(Text {
                body: "hi Alice".into(),
                formats: vec![],
            }),
        }),
    )
    .await
    .unwrap();
    assert_eq!(h.matrix.calls_of("send_event").len(), 1);
    h.net_message(
        BOB_ACC,
        None,
        "bob-del2",
        D::Delete(Delete { target: bobs }),
    )
    .await
    .unwrap();
    let redactions = h.matrix.calls_of("redact");
    assert_eq!(redactions.len(), 1);
    assert_eq!(redactions[0]["room"], json!(room));
    assert_eq!(redactions[0]["as"], json!("@interop_15550002000:x"));
}

#[tokio::test]
async fn a_group_member_cannot_delete_another_members_message() {
    let h = Harness::new().await;
    *h.alice.group_members.lock().unwrap() =
        vec![ALICE_ACC.into(), BOB_ACC.into(), CAROL_ACC.into()];
    h.net_message(BOB_ACC, Some("g1"), "bob-g1", text("from bob"))
        .await
        .unwrap();
    h.net_message(
        CAROL_ACC,
        Some("g1"),
        "carol-g1",
        D::Delete(Delete {
            target: "bob-g1".into(),
        }),
    )
    .await
    .unwrap();
    assert!(h.matrix.calls_of("redact").is_empty());
}

#[tokio::test]
async fn only_the_author_edits_or_deletes_on_the_network() {
    let h = Harness::new().await;
    let (room, _) = dm_with_alices_message(&h).await;
    // Alice's portal relays for others.
    let mut p = h.store.portal(ALICE, BOB_ACC).await.unwrap().unwrap();
    p.relay = Some(ALICE.try_into().unwrap());
    h.store.save_portal(&p).await.unwrap();
    h.matrix_event(
        &room,
        "@bob:x",
        "$b1",
        "m.room.message",
        matrix_text("from matrix bob"),
    )
    .await
    .unwrap();
    h.alice.sent.lock().unwrap().clear();
    h.matrix.clear();

    // Carol (another Matrix user in the room) edits and redacts Bob's relayed message and Alice's.
    h.matrix_event(
        &room,
        "@carol:x",
        "$c1",
        "m.room.message",
        matrix_edit("$b1", "forged"),
    )
    .await
    .unwrap();
    h.matrix_event(
        &room,
        "@carol:x",
        "$c2",
        "m.room.redaction",
        json!({"redacts": "$b1"}),
    )
    .await
    .unwrap();
    h.matrix_event(
        &room,
        "@carol:x",
        "$c3",
        "m.room.message",
        matrix_edit("$alice1", "forged"),
    )
    .await
    .unwrap();
    // The owner redacts the contact's message (which the owner did not write).
    let bobs_event = {
        let m = h
            .store
            .by_message(&room, "bob-1", "")
            .await
            .unwrap()
            .unwrap();
        m.event_id
    };
    h.matrix_event(
        &room,
        ALICE,
        "$a2",
        "m.room.redaction",
        json!({"redacts": bobs_event}),
    )
    .await
    .unwrap();
    // Alice edits Bob's relayed message.
    h.matrix_event(
        &room,
        ALICE,
        "$a3",
        "m.room.message",
        matrix_edit("$b1", "forged by owner"),
    )
    .await
    .unwrap();
    let sent = h.alice.sent_bodies();
    assert!(sent.is_empty(), "sent for someone else: {sent:?}");

    // The authors themselves may.
    h.matrix_event(
        &room,
        "@bob:x",
        "$b2",
        "m.room.message",
        matrix_edit("$b1", "fixed"),
    )
    .await
    .unwrap();
    h.matrix_event(
        &room,
        ALICE,
        "$a4",
        "m.room.redaction",
        json!({"redacts": "$alice1"}),
    )
    .await
    .unwrap();
    let sent = h.alice.sent_bodies();
    assert_eq!(sent.len(), 2, "{sent:?}");
    match &sent[0] {
        D::Edit(e) => assert_eq!(e.text.as_ref().unwrap().body, "@bob:x: fixed"),
        other => panic!("expected an edit, got {other:?}"),
    }
    assert!(matches!(&sent[1], D::Delete(_)));
}

#[tokio::test]
async fn relayed_messages_name_the_full_matrix_id_and_need_the_relay_level() {
    let h = Harness::new().await;
    let (room, _) = dm_with_alices_message(&h).await;
    let mut p = h.store.portal(ALICE, BOB_ACC).await.unwrap().unwrap();
    p.relay = Some(ALICE.try_into().unwrap());
    h.store.save_portal(&p).await.unwrap();
    h.alice.sent.lock().unwrap().clear();
    // A display name or localpart "alice" on another server must not read as the owner.
    h.matrix_event(
        &room,
        "@alice:evil.example",
        "$e1",
        "m.room.message",
        matrix_text("pay him"),
    )
    .await
    .unwrap();
    // A server whose users have no permission at all.
    h.matrix_event(
        &room,
        "@mallory:other.example",
        "$m1",
        "m.room.message",
        matrix_text("hi"),
    )
    .await
    .unwrap();
    let sent = h.alice.sent_bodies();
    assert_eq!(sent.len(), 1, "{sent:?}");
    match &sent[0] {
        D::Text(t) => assert_eq!(t.body, "@alice:evil.example: pay him"),
        other => panic!("{other:?}"),
    }
    // Content without text still names its sender; a reaction, which cannot, is not relayed.
    h.alice.sent.lock().unwrap().clear();
    h.matrix_event(
        &room,
        "@bob:x",
        "$img",
        "m.room.message",
        json!({"msgtype": "m.image", "body": "a.png", "url": "mxc://x/a", "info": {"mimetype": "image/png"}}),
    )
    .await
    .unwrap();
    h.matrix_event(
        &room,
        "@bob:x",
        "$loc",
        "m.room.message",
        json!({"msgtype": "m.location", "body": "Home", "geo_uri": "geo:1,2"}),
    )
    .await
    .unwrap();
    h.matrix_event(
        &room,
        "@bob:x",
        "$react",
        "m.reaction",
        json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": "$alice1", "key": "👍"}}),
    )
    .await
    .unwrap();
    let sent = h.alice.sent_bodies();
    assert_eq!(sent.len(), 2, "{sent:?}");
    match &sent[0] {
        D::Media(m) => assert_eq!(m.caption.as_ref().unwrap().body, "@bob:x sent a file"),
        other => panic!("{other:?}"),
    }
    match &sent[1] {
        D::Location(l) => assert_eq!(l.name, "@bob:x: Home"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn only_the_owner_or_an_admin_sets_the_relay() {
    let h = Harness::new().await;
    let (room, _) = dm_with_alices_message(&h).await;
    h.login("@bob:x", "+15550009999").await;
    h.login("@admin:x", "+15550009998").await;
    let relay = || async { h.store.portal(ALICE, BOB_ACC).await.unwrap().unwrap().relay };
    h.matrix_event(
        &room,
        "@bob:x",
        "$r1",
        "m.room.message",
        matrix_text("!interop set-relay"),
    )
    .await
    .unwrap();
    assert_eq!(relay().await, None, "{:?}", h.notices());
    h.matrix_event(
        &room,
        ALICE,
        "$r2",
        "m.room.message",
        matrix_text("!interop set-relay"),
    )
    .await
    .unwrap();
    assert_eq!(relay().await.as_ref().map(|u| u.as_str()), Some(ALICE));
    h.matrix_event(
        &room,
        "@bob:x",
        "$r3",
        "m.room.message",
        matrix_text("!interop unset-relay"),
    )
    .await
    .unwrap();
    assert_eq!(relay().await.as_ref().map(|u| u.as_str()), Some(ALICE));
    h.matrix_event(
        &room,
        "@admin:x",
        "$r4",
        "m.room.message",
        matrix_text("!interop unset-relay"),
    )
    .await
    .unwrap();
    assert_eq!(relay().await, None);
}

#[tokio::test]
async fn ghosts_cannot_redact_others_in_portal_rooms() {
    let h = Harness::new().await;
    *h.alice.group_members.lock().unwrap() = vec![ALICE_ACC.into(), BOB_ACC.into()];
    h.net_message(BOB_ACC, Some("g2"), "m1", text("hi"))
        .await
        .unwrap();
    h.net_message(BOB_ACC, None, "m2", text("hi"))
        .await
        .unwrap();
    let rooms = h.matrix.calls_of("create_room");
    assert_eq!(rooms.len(), 2);
    for body in rooms {
        let pl = &body["power_levels"];
        let ghost = pl["users"]["@interop_15550002000:x"].as_i64().unwrap();
        for action in ["redact", "kick", "ban"] {
            assert!(pl[action].as_i64().unwrap() > ghost, "{action}: {pl}");
        }
        assert!(pl["events"]["m.room.power_levels"].as_i64().unwrap() > ghost);
    }
}

#[tokio::test]
async fn media_over_the_limit_is_refused_with_a_notice_both_ways() {
    use super::model::{Media, MediaKind};
    let h = Harness::with(|s| {
        s.bridge.max_media_size = 1000;
        s.bridge.message_requests = false;
    })
    .await;
    let (room, _) = dm_with_alices_message(&h).await;
    h.matrix.clear();
    h.alice.sent.lock().unwrap().clear();
    // From the network: a file announcing 5 MB.
    h.net_message(
        BOB_ACC,
        None,
        "bob-big",
        D::Media(Media {
            kind: MediaKind::Image,
            blob: "b".into(),
            key: vec![0; 64],
            sha256: vec![0; 32],
            size: 5_000_000,
            mimetype: "image/png".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let sent = h.matrix.calls_of("send_event");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["content"]["msgtype"], json!("m.notice"));
    assert!(
        sent[0]["content"]["body"]
            .as_str()
            .unwrap()
            .contains("limit")
    );
    // A file whose bytes are not the size it declared.
    h.net_message(
        BOB_ACC,
        None,
        "bob-liar",
        D::Media(Media {
            kind: MediaKind::Image,
            blob: "b".into(),
            key: vec![0; 64],
            sha256: vec![0; 32],
            size: 3,
            mimetype: "image/png".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let sent = h.matrix.calls_of("send_event");
    assert_eq!(sent[1]["content"]["msgtype"], json!("m.notice"));
    // From Matrix: an image announcing 2 MB is refused before anything is downloaded.
    h.matrix_event(
        &room,
        ALICE,
        "$img",
        "m.room.message",
        json!({"msgtype": "m.image", "body": "a.png", "url": "mxc://x/a", "info": {"size": 2_000_000, "mimetype": "image/png"}}),
    )
    .await
    .unwrap();
    assert!(h.alice.sent_bodies().is_empty());
    assert!(
        h.notices().iter().any(|n| n.contains("limit")),
        "{:?}",
        h.notices()
    );
}

/// Anyone on the homeserver can make it query a ghost id; 200 probes of numbers cost at most
/// the burst in network look-ups and ghost registrations, and an unknown number is not asked
/// about again.
#[tokio::test]
async fn user_queries_are_rate_limited() {
    let h = Harness::new().await;
    let mut yes = 0;
    for i in 0..200 {
        if h.bridge
            .provide_ghost(&format!("@interop_1555700{i:04}:x"))
            .await
        {
            yes += 1;
        }
    }
    let lookups = *h.alice.profile_lookups.lock().unwrap();
    // One look-up to ask, one for the profile of each ghost registered.
    assert!(lookups <= 2 * 21, "{lookups} look-ups");
    assert!(h.matrix.calls_of("ensure_ghost").len() <= 21);
    assert!(yes <= 21);
    // A known ghost still answers at once.
    h.net_message(BOB_ACC, None, "m", text("hi")).await.unwrap();
    assert!(h.bridge.provide_ghost("@interop_15550002000:x").await);
}

/// A stranger's messages open nothing and register no ghost: they are held until the user
/// accepts; then they arrive in order.
#[tokio::test]
async fn a_strangers_first_messages_wait_for_the_users_answer() {
    let h = Harness::with(|_| {}).await;
    h.store.set_management_room(ALICE, "!mgmt:x").await.unwrap();
    for i in 0..3 {
        h.net_message(
            BOB_ACC,
            None,
            &format!("s{i}"),
            text(&format!("secret offer {i}")),
        )
        .await
        .unwrap();
    }
    assert!(h.matrix.calls_of("create_room").is_empty());
    assert!(h.matrix.calls_of("ensure_ghost").is_empty());
    assert!(h.matrix.calls_of("send_event").is_empty());
    let notices = h.notices();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0].contains("accept +15550002000"));
    // Held sealed at rest: `vault::requests::tests::held_messages_are_sealed_at_rest_and_come_back_in_order`.
    h.matrix_event(
        "!mgmt:x",
        ALICE,
        "$acc",
        "m.room.message",
        matrix_text("accept +15550002000"),
    )
    .await
    .unwrap();
    assert_eq!(h.matrix.calls_of("create_room").len(), 1);
    let bodies: Vec<Value> = h
        .matrix
        .calls_of("send_event")
        .iter()
        .map(|e| e["content"]["body"].clone())
        .collect();
    assert_eq!(
        bodies,
        vec![
            json!("secret offer 0"),
            json!("secret offer 1"),
            json!("secret offer 2")
        ]
    );
    // From now on Bob's messages go straight in.
    h.net_message(BOB_ACC, None, "s3", text("next"))
        .await
        .unwrap();
    assert_eq!(h.matrix.calls_of("send_event").len(), 4);
    assert_eq!(h.matrix.calls_of("create_room").len(), 1);
}

/// Being added to a 1,000-member group by a stranger creates no room and no ghost; a decline
/// drops it and what follows; a group from a known contact opens at once.
#[tokio::test]
async fn a_strangers_big_group_is_a_request() {
    let h = Harness::with(|_| {}).await;
    h.store.set_management_room(ALICE, "!mgmt:x").await.unwrap();
    let mut members: Vec<String> = (0..1000).map(|i| format!("+1555800{i:04}")).collect();
    members.push(ALICE_ACC.into());
    *h.alice.group_members.lock().unwrap() = members.clone();
    let update = NetEvent::GroupUpdate {
        envelope_id: 1,
        from: "+15558000000".into(),
        group: GroupInfo {
            id: "spam".into(),
            name: "Win big".into(),
            members,
            ..Default::default()
        },
    };
    h.bridge.on_network_event(ALICE, &update).await.unwrap();
    h.net_message("+15558000001", Some("spam"), "sp1", text("click here"))
        .await
        .unwrap();
    assert!(h.matrix.calls_of("create_room").is_empty());
    assert!(h.matrix.calls_of("ensure_ghost").is_empty());
    assert_eq!(h.notices().len(), 1, "{:?}", h.notices());
    h.matrix_event(
        "!mgmt:x",
        ALICE,
        "$d",
        "m.room.message",
        matrix_text("decline spam"),
    )
    .await
    .unwrap();
    h.net_message("+15558000001", Some("spam"), "sp2", text("click here"))
        .await
        .unwrap();
    h.bridge.on_network_event(ALICE, &update).await.unwrap();
    assert!(h.matrix.calls_of("create_room").is_empty());
    assert!(h.matrix.calls_of("ensure_ghost").is_empty());
    h.matrix_event(
        "!mgmt:x",
        ALICE,
        "$l",
        "m.room.message",
        matrix_text("list-requests"),
    )
    .await
    .unwrap();
    assert!(
        h.notices().last().unwrap().contains("no message requests"),
        "{:?}",
        h.notices()
    );

    // Bob is a contact (Alice opened a chat with him); his group opens directly.
    h.matrix_event(
        "!mgmt:x",
        ALICE,
        "$s",
        "m.room.message",
        matrix_text("start-chat +15550002000"),
    )
    .await
    .unwrap();
    assert_eq!(h.matrix.calls_of("create_room").len(), 1);
    *h.alice.group_members.lock().unwrap() = vec![ALICE_ACC.into(), BOB_ACC.into()];
    h.net_message(BOB_ACC, Some("friends"), "f1", text("hi all"))
        .await
        .unwrap();
    assert_eq!(h.matrix.calls_of("create_room").len(), 2);
}

/// One stranger cannot fill a login's message requests (and crowd out everyone else), and a
/// declined group stays declined when a contact of the user writes in it.
#[tokio::test]
async fn request_limits_and_refusals_hold() {
    let h = Harness::with(|_| {}).await;
    h.store.set_management_room(ALICE, "!mgmt:x").await.unwrap();
    h.matrix_event(
        "!mgmt:x",
        ALICE,
        "$s",
        "m.room.message",
        matrix_text("start-chat +15550002000"),
    )
    .await
    .unwrap();
    let rooms_before = h.matrix.calls_of("create_room").len();
    let mallory = "+15559990000";
    for i in 0..10 {
        let g = GroupInfo {
            id: format!("spam{i}"),
            name: "Prize".into(),
            members: vec![ALICE_ACC.into(), mallory.into(), BOB_ACC.into()],
            ..Default::default()
        };
        let ev = NetEvent::GroupUpdate {
            envelope_id: 100 + i,
            from: mallory.into(),
            group: g,
        };
        h.bridge.on_network_event(ALICE, &ev).await.unwrap();
    }
    let open: Vec<_> = h
        .bridge
        .requests
        .requests(ALICE)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.is_open())
        .collect();
    assert_eq!(
        open.len(),
        super::requests::MAX_REQUESTS_PER_SENDER,
        "{open:?}"
    );
    // A newcomer still gets through to the user.
    h.net_message("+15557770000", None, "new-1", text("hello, I am new"))
        .await
        .unwrap();
    assert!(
        h.notices()
            .iter()
            .any(|n| n.contains("accept +15557770000"))
    );
    // Declined: Bob (a contact) writing in that group does not open it.
    h.matrix_event(
        "!mgmt:x",
        ALICE,
        "$d",
        "m.room.message",
        matrix_text("decline spam0"),
    )
    .await
    .unwrap();
    *h.alice.group_members.lock().unwrap() = vec![ALICE_ACC.into(), mallory.into(), BOB_ACC.into()];
    h.net_message(BOB_ACC, Some("spam0"), "b-spam", text("who is this?"))
        .await
        .unwrap();
    assert_eq!(h.matrix.calls_of("create_room").len(), rooms_before);
}

/// After a restart a login exists before it is connected again: a Matrix event in its portal
/// waits (a retryable error its room's lane retries, no notice) and goes out once the login is
/// there. Only a user with no login at all is told they are not logged in.
#[tokio::test]
async fn a_login_still_connecting_makes_the_event_wait() {
    let h = Harness::new().await;
    let (room, _) = dm_with_alices_message(&h).await;
    let alice = h.network.accounts.lock().unwrap().remove(ALICE).unwrap();
    h.matrix.clear();
    let send = |id: &'static str| {
        h.matrix_event(
            &room,
            ALICE,
            id,
            "m.room.message",
            matrix_text("sent at start-up"),
        )
    };
    let r = send("$w1").await;
    assert!(
        matches!(&r, Err(e) if e.is_retryable() && e.is_waiting()),
        "{r:?}"
    );
    assert!(h.notices().is_empty(), "{:?}", h.notices());
    h.network
        .accounts
        .lock()
        .unwrap()
        .insert(ALICE.into(), alice.clone());
    alice.sent.lock().unwrap().clear();
    send("$w1").await.unwrap();
    assert_eq!(alice.sent_bodies().len(), 1);
    // No login at all: refused with the notice.
    h.network.accounts.lock().unwrap().remove(ALICE);
    h.store.delete_login(ALICE).await.unwrap();
    send("$w2").await.unwrap();
    assert!(h.notices().iter().any(|n| n.contains("not logged in")));
}

#[tokio::test]
async fn messages_keep_the_time_they_were_sent() {
    let h = Harness::new().await;
    h.net_message(BOB_ACC, None, "late-1", text("written hours ago"))
        .await
        .unwrap();
    let sent = h.matrix.calls_of("send_event");
    let msg = sent
        .iter()
        .find(|e| e["content"]["body"] == "written hours ago")
        .expect("bridged");
    let ts = msg["ts"].as_u64().expect("sent with a timestamp");
    assert!((SENT_AT..SENT_AT + 100).contains(&ts), "ts {ts}");
}

#[tokio::test]
async fn relations_before_their_message_are_set_aside_not_dropped() {
    let h = Harness::new().await;
    h.net_message(BOB_ACC, None, "bob-0", text("first"))
        .await
        .unwrap();
    for early in [
        net_edit("bob-1", "second, edited"),
        D::Delete(Delete {
            target: "bob-1".into(),
        }),
        D::Reaction(super::model::Reaction {
            target: "bob-1".into(),
            emoji: "👍".into(),
            remove: false,
            target_author: String::new(),
        }),
    ] {
        let r = h.net_message(BOB_ACC, None, "bob-rel", early).await;
        assert!(
            matches!(&r, Err(e @ BridgeError::TargetNotYet(_)) if e.retry_class() == super::RetryClass::UntilTarget),
            "{r:?}"
        );
    }
    // Once the message is there, the same edit applies.
    h.net_message(BOB_ACC, None, "bob-1", text("second"))
        .await
        .unwrap();
    h.net_message(
        BOB_ACC,
        None,
        "bob-edit",
        net_edit("bob-1", "second, edited"),
    )
    .await
    .unwrap();
    assert!(
        h.matrix
            .calls_of("send_event")
            .iter()
            .any(|e| e["content"]["m.new_content"]["body"] == "second, edited")
    );
}

#[tokio::test]
async fn notices_sent_again_for_the_same_event_reuse_their_transaction_ids() {
    let h = Harness::new().await;
    let room = "!r:x";
    for _ in 0..2 {
        super::handling_event("matrix:$e1".into(), async {
            h.bridge.notice(room, "one").await.unwrap();
            h.bridge.notice(room, "two").await.unwrap();
        })
        .await;
    }
    super::handling_event("matrix:$e2".into(), async {
        h.bridge.notice(room, "one").await.unwrap();
    })
    .await;
    let txns: Vec<String> = h
        .matrix
        .calls_of("notice")
        .iter()
        .map(|n| n["txn"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(txns.len(), 5);
    // A retry repeats the ids (the homeserver applies each once); notices differ among
    // themselves and from another event's.
    assert_eq!(txns[0], txns[2]);
    assert_eq!(txns[1], txns[3]);
    assert_ne!(txns[0], txns[1]);
    assert_ne!(txns[4], txns[0]);
}

#[tokio::test]
async fn a_message_the_bridge_gives_up_on_is_reported_in_its_room() {
    let h = Harness::new().await;
    let (room, _) = dm_with_alices_message(&h).await;
    h.matrix.clear();
    let ev = json!({"type": "m.room.message", "room_id": room, "sender": ALICE, "event_id": "$lost",
        "content": {"msgtype": "m.text", "body": "hi"}});
    h.bridge
        .not_handled(
            &typed(ev),
            &BridgeError::MatrixRefused("413 M_TOO_LARGE".into()),
        )
        .await
        .unwrap();
    let notices = h.notices();
    assert!(
        notices
            .iter()
            .any(|n| n.contains("not bridged") && n.contains("M_TOO_LARGE")),
        "{notices:?}"
    );
    // Events of the bridge's own users are not reported.
    h.matrix.clear();
    let ghost = json!({"type": "m.room.message", "room_id": room, "sender": "@interop_15550002000:x",
        "event_id": "$g", "content": {"msgtype": "m.text", "body": "hi"}});
    h.bridge
        .not_handled(&typed(ghost), &BridgeError::MatrixRefused("x".into()))
        .await
        .unwrap();
    assert!(h.notices().is_empty());
}

#[tokio::test]
async fn a_redaction_that_failed_to_send_is_sent_when_retried() {
    let h = Harness::new().await;
    let (room, alices) = dm_with_alices_message(&h).await;
    *h.alice.failing_sends.lock().unwrap() = 1;
    let redaction = json!({"redacts": "$alice1"});
    let first = h
        .matrix_event(&room, ALICE, "$red1", "m.room.redaction", redaction.clone())
        .await;
    assert!(matches!(&first, Err(e) if e.is_retryable()), "{first:?}");
    // The queue hands it over again: the mapping is still there, so the deletion goes out.
    h.matrix_event(&room, ALICE, "$red1", "m.room.redaction", redaction)
        .await
        .unwrap();
    assert!(
        h.alice
            .sent_bodies()
            .iter()
            .any(|b| matches!(b, D::Delete(d) if d.target == alices)),
        "{:?}",
        h.alice.sent_bodies()
    );
}

/// An attachment whose upload or download fails on something that comes back (the gateway
/// away, the homeserver answering 502) is tried again, not reported as not bridged: the
/// queue keeps it, and it goes out once the peer is back (found by the kill -9 chaos run).
#[tokio::test]
async fn an_attachment_whose_peer_is_away_is_tried_again_not_dropped() {
    let h = Harness::new().await;
    let (room, _) = dm_with_alices_message(&h).await;
    h.alice.sent.lock().unwrap().clear();
    let image = |n: u32| {
        json!({"msgtype": "m.image", "body": format!("cat{n}.png"), "url": "mxc://x/c",
            "info": {"size": 5, "mimetype": "image/png"}})
    };
    let sticker = json!({"body": "a cat", "url": "mxc://x/s", "info": {"mimetype": "image/webp"}});
    let cases: [(&str, &str, Value, &dyn Fn()); 4] = [
        ("$up", "m.room.message", image(1), &|| {
            *h.alice.failing_uploads.lock().unwrap() = 1
        }),
        ("$down", "m.room.message", image(2), &|| {
            *h.matrix.failing_downloads.lock().unwrap() = 1
        }),
        ("$stick", "m.sticker", sticker.clone(), &|| {
            *h.alice.failing_uploads.lock().unwrap() = 1
        }),
        ("$stick2", "m.sticker", sticker, &|| {
            *h.matrix.failing_downloads.lock().unwrap() = 1
        }),
    ];
    for (id, ty, content, fail_once) in cases {
        fail_once();
        let first = h.matrix_event(&room, ALICE, id, ty, content.clone()).await;
        assert!(
            matches!(&first, Err(e) if e.is_retryable()),
            "{id}: {first:?}"
        );
        assert!(h.notices().is_empty(), "{id}: {:?}", h.notices());
        h.matrix_event(&room, ALICE, id, ty, content).await.unwrap();
    }
    let media = h
        .alice
        .sent_bodies()
        .into_iter()
        .filter(|b| matches!(b, D::Media(_)))
        .count();
    assert_eq!(media, 4, "{:?}", h.alice.sent_bodies());
    assert!(h.notices().is_empty(), "{:?}", h.notices());
}

#[tokio::test]
async fn portal_creation_locks_do_not_pile_up() {
    let h = Harness::new().await;
    for i in 0..1100u32 {
        let contact = format!("+1555{i:07}");
        h.net_message(&contact, None, &format!("m{i}"), text("hi"))
            .await
            .unwrap();
    }
    let locks = h.bridge.portal_locks.lock().await.len();
    assert!(locks <= 1024, "{locks} portal locks kept");
}

/// Matrix attachments reach the network with what their typed content says: the kind (a voice
/// message is not just audio), size, dimensions, duration, file name and HTML caption; a reply
/// in a thread quotes the message it answers; a sticker goes out as a sticker with its image's
/// dimensions, its description not made a caption, and its reply kept.
#[tokio::test]
async fn matrix_attachments_and_replies_keep_their_details() {
    let h = Harness::new().await;
    let (room, _) = dm_with_alices_message(&h).await;
    h.alice.sent.lock().unwrap().clear();
    let send = |id: &'static str, ty: &'static str, content: Value| {
        let room = room.clone();
        let h = &h;
        async move { h.matrix_event(&room, ALICE, id, ty, content).await.unwrap() }
    };
    send(
        "$voice",
        "m.room.message",
        json!({"msgtype": "m.audio", "body": "voice.ogg", "url": "mxc://x/v",
            "info": {"duration": 4200, "mimetype": "audio/ogg"}, "org.matrix.msc3245.voice": {}}),
    )
    .await;
    send(
        "$img",
        "m.room.message",
        json!({"msgtype": "m.image", "body": "look at **this**", "filename": "cat.png",
            "format": "org.matrix.custom.html", "formatted_body": "look at <b>this</b>",
            "url": "mxc://x/c", "info": {"w": 640, "h": 480, "size": 5, "mimetype": "image/png"}}),
    )
    .await;
    send(
        "$video",
        "m.room.message",
        json!({"msgtype": "m.video", "body": "clip.mp4", "url": "mxc://x/m",
            "info": {"duration": 1500, "w": 2, "h": 3}}),
    )
    .await;
    send(
        "$threaded",
        "m.room.message",
        json!({"msgtype": "m.text", "body": "in a thread", "m.relates_to": {"rel_type": "m.thread",
            "event_id": "$alice1", "is_falling_back": false, "m.in_reply_to": {"event_id": "$alice1"}}}),
    )
    .await;
    send(
        "$sticker",
        "m.sticker",
        json!({"body": "a cat", "url": "mxc://x/s",
            "info": {"w": 128, "h": 96, "mimetype": "image/webp"},
            "m.relates_to": {"m.in_reply_to": {"event_id": "$alice1"}}}),
    )
    .await;
    let sent = h.alice.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 5, "{sent:?}");
    let media = |i: usize| match &sent[i].2.body {
        Some(D::Media(m)) => m.clone(),
        other => panic!("{other:?}"),
    };
    let voice = media(0);
    assert_eq!(voice.kind, super::model::MediaKind::Voice);
    assert_eq!(
        (voice.duration_ms, voice.mimetype.as_str()),
        (4200, "audio/ogg")
    );
    let image = media(1);
    assert_eq!(image.kind, super::model::MediaKind::Image);
    assert_eq!((image.width, image.height), (640, 480));
    assert_eq!(image.filename, "cat.png");
    let caption = image.caption.expect("caption");
    assert_eq!(caption.body, "look at this");
    assert!(
        !caption.formats.is_empty(),
        "the HTML caption keeps its bold"
    );
    let video = media(2);
    assert_eq!(
        (video.kind, video.duration_ms, video.width, video.height),
        (super::model::MediaKind::Video, 1500, 2, 3)
    );
    assert_eq!(video.mimetype, "application/octet-stream");
    let quote = sent[3].2.reply_to.as_ref().expect("a reply");
    assert_eq!(quote.author, ALICE_ACC);
    let sticker = media(4);
    assert_eq!(
        (sticker.kind, sticker.width, sticker.height),
        (super::model::MediaKind::Sticker, 128, 96)
    );
    assert_eq!(sticker.mimetype, "image/webp");
    assert_eq!(
        sticker.caption, None,
        "a sticker's description is no caption"
    );
    let quote = sent[4].2.reply_to.as_ref().expect("the sticker's reply");
    assert_eq!(quote.author, ALICE_ACC);
    let refused: Vec<String> = h
        .matrix
        .calls_of("send_event")
        .iter()
        .filter_map(|s| s["content"]["message"].as_str().map(str::to_owned))
        .collect();
    assert!(refused.is_empty(), "nothing refused: {refused:?}");
}

/// A message the Matrix side could not parse is answered in its portal, naming its sender;
/// elsewhere, and from the bridge's own users, it is only logged.
#[tokio::test]
async fn a_malformed_message_is_reported_to_its_sender() {
    let h = Harness::new().await;
    let (room, _) = dm_with_alices_message(&h).await;
    h.matrix.clear();
    h.bridge
        .malformed(&room, ALICE, "m.room.message", "missing field `body`")
        .await
        .unwrap();
    let notices = h.notices();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0].contains(ALICE) && notices[0].contains("missing field `body`"));
    h.matrix.clear();
    for (room, sender, ty) in [
        ("!elsewhere:x", ALICE, "m.room.message"),
        (room.as_str(), "@interop_15550002000:x", "m.room.message"),
        (room.as_str(), ALICE, "m.room.topic"),
    ] {
        h.bridge.malformed(room, sender, ty, "bad").await.unwrap();
    }
    assert!(h.notices().is_empty(), "{:?}", h.notices());
}

/// Network attachments become Matrix content with everything a client shows: a voice message
/// is marked as one (MSC3245, with its duration and waveform), an image has its dimensions,
/// thumbnail and HTML caption, a reply relates to the event it answers, and a sticker is an
/// `m.sticker` event (with its reply) rather than an image.
#[tokio::test]
async fn network_attachments_become_complete_matrix_content() {
    use super::model::{Media, MediaKind, Quote};
    let h = Harness::new().await;
    let (room, _) = dm_with_alices_message(&h).await;
    h.matrix.clear();
    let media = |kind, extra: fn(&mut Media)| {
        let mut m = Media {
            kind,
            blob: "b".into(),
            key: vec![0; 64],
            sha256: vec![0; 32],
            size: 5,
            mimetype: "audio/ogg".into(),
            ..Default::default()
        };
        extra(&mut m);
        D::Media(m)
    };
    h.net_message(
        BOB_ACC,
        None,
        "bob-voice",
        media(MediaKind::Voice, |m| {
            m.duration_ms = 3000;
            m.waveform = vec![0, 128, 255];
        }),
    )
    .await
    .unwrap();
    // Replies to Bob's voice message.
    let reply = |message_id: &str, body: D| {
        let ev = NetEvent::Message {
            from: BOB_ACC.into(),
            group: None,
            message_id: message_id.into(),
            timestamp: 0,
            data: Message {
                body: Some(body),
                reply_to: Some(Quote {
                    message_id: "bob-voice".into(),
                    author: BOB_ACC.into(),
                }),
                expire_timer: 0,
            },
            envelope_id: 0,
        };
        let h = &h;
        async move { h.bridge.on_network_event(ALICE, &ev).await.unwrap() }
    };
    reply(
        "bob-photo",
        media(MediaKind::Image, |m| {
            m.mimetype = "image/png".into();
            (m.width, m.height) = (640, 480);
            m.thumbnail = vec![1, 2, 3];
            m.filename = "cat.png".into();
            m.caption = Some(super::msgconv::html_to_text("a <b>cat</b>"));
        }),
    )
    .await;
    reply(
        "bob-sticker",
        media(MediaKind::Sticker, |m| {
            m.mimetype = "image/webp".into();
            (m.width, m.height) = (128, 128);
        }),
    )
    .await;
    let sent = h.matrix.calls_of("send_event");
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(sent[1]["type"], "m.room.message");
    let sticker = &sent[2];
    assert_eq!(sticker["type"], "m.sticker", "{sticker}");
    let sticker = &sticker["content"];
    assert_eq!(sticker["url"], "mxc://x/upload");
    assert_eq!(sticker["info"]["mimetype"], "image/webp");
    assert_eq!(sticker["info"]["w"], 128);
    assert!(sticker.get("msgtype").is_none(), "{sticker}");
    assert!(
        sticker["m.relates_to"]["m.in_reply_to"]["event_id"].is_string(),
        "{sticker}"
    );
    assert!(
        h.store
            .by_message(&room, "bob-sticker", "")
            .await
            .unwrap()
            .is_some(),
        "mapped, so edits and deletions find it"
    );
    let voice = &sent[0]["content"];
    assert_eq!(voice["msgtype"], "m.audio");
    assert_eq!(voice["url"], "mxc://x/upload");
    assert_eq!(voice["info"]["duration"], 3000);
    assert_eq!(voice["info"]["size"], 5);
    assert!(voice["org.matrix.msc3245.voice"].is_object(), "{voice}");
    assert_eq!(voice["org.matrix.msc1767.audio"]["duration"], 3000);
    assert_eq!(
        voice["org.matrix.msc1767.audio"]["waveform"],
        json!([0, 128, 255])
    );
    let image = &sent[1]["content"];
    assert_eq!(image["msgtype"], "m.image");
    assert_eq!(
        (image["info"]["w"].clone(), image["info"]["h"].clone()),
        (json!(640), json!(480))
    );
    assert_eq!(image["info"]["mimetype"], "image/png");
    assert_eq!(image["info"]["thumbnail_url"], "mxc://x/upload");
    assert_eq!(image["info"]["thumbnail_info"]["size"], 3);
    assert_eq!(image["filename"], "cat.png");
    assert_eq!(image["body"], "a cat");
    assert_eq!(image["format"], "org.matrix.custom.html");
    assert_eq!(image["formatted_body"], "a <strong>cat</strong>");
    let voice_event = h.event_of(&room, "bob-voice").await;
    assert_eq!(
        image["m.relates_to"]["m.in_reply_to"]["event_id"],
        json!(voice_event)
    );
}

/// A login's contacts are the people it has a direct chat with, by their profile names; they
/// are found by any part of the name or number, `start-chat` takes an unambiguous name, and a
/// full number not among them is looked up on the network. Contacts' numbers are only shown in
/// the management room.
#[tokio::test]
async fn contacts_are_listed_searched_and_chatted_with_by_name() {
    let h = Harness::new().await;
    h.store.set_management_room(ALICE, "!mgmt:x").await.unwrap();
    let names = [
        ("+15550002000", "Bob Builder"),
        ("+15550003000", "Bobby Tables"),
        ("+15550004000", "Carol"),
        ("+15550005000", "Dave Stranger"),
    ];
    for (a, n) in names {
        h.alice.names.lock().unwrap().insert(a.into(), n.into());
    }
    h.alice.unknown.lock().unwrap().push("+15550009999".into());
    assert!(
        mgmt_cmd(&h, "list-contacts")
            .await
            .contains("no contacts yet")
    );
    for (a, _) in &names[..3] {
        let out = mgmt_cmd(&h, &format!("start-chat {a}")).await;
        assert!(out.contains("Your chat with"), "{out}");
    }

    let list = mgmt_cmd(&h, "list-contacts").await;
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 3, "{list}");
    assert!(lines[0].starts_with("- Bob Builder (+15550002000): https://matrix.to/#/!"));
    assert!(lines[1].starts_with("- Bobby Tables (+15550003000)"));
    assert!(lines[2].starts_with("- Carol (+15550004000)"));
    let c = h.bridge.contacts(ALICE).await.unwrap();
    assert_eq!(c[2].mxid, "@interop_15550004000:x");
    assert_eq!(c[2].room_id, Some(h.room_of("+15550004000").await));

    // Search: names in any case, numbers by their digits, a full number on the network.
    assert_eq!(found(&h, "bob").await, ["+15550002000", "+15550003000"]);
    assert_eq!(found(&h, "TABLES").await, ["+15550003000"]);
    assert_eq!(found(&h, "555 000 4").await, ["+15550004000"]);
    assert_eq!(
        found(&h, "+15550005000").await,
        ["+15550005000"],
        "on the network"
    );
    assert_eq!(
        found(&h, "+15550009999").await,
        Vec::<String>::new(),
        "not on it"
    );
    assert_eq!(found(&h, "zed").await, Vec::<String>::new());
    assert!(
        mgmt_cmd(&h, "search dave").await.contains("Nothing found"),
        "only contacts by name"
    );
    let out = mgmt_cmd(&h, "search +15550005000").await;
    assert!(out.contains("Dave Stranger (+15550005000)"), "{out}");

    // start-chat by name: exact names first, then a unique part; several is a question.
    let room = h.room_of("+15550004000").await;
    assert!(mgmt_cmd(&h, "start-chat carol").await.contains(&room));
    let out = mgmt_cmd(&h, "start-chat bob").await;
    assert!(
        out.contains("names several contacts") && out.contains("Bobby Tables"),
        "{out}"
    );
    let room = h.room_of("+15550002000").await;
    assert!(mgmt_cmd(&h, "start-chat bob builder").await.contains(&room));
    assert!(
        mgmt_cmd(&h, "start-chat nobody")
            .await
            .contains("No contact is named `nobody`")
    );
    let out = mgmt_cmd(&h, "start-chat +15550009999").await;
    assert!(out.contains("not on the interop network"), "{out}");

    // Outside the management room the numbers stay hidden.
    let portal = h.room_of("+15550002000").await;
    let out = h
        .bridge
        .run_command(&portal, ALICE, "list-contacts")
        .await
        .body;
    assert!(
        out.contains("management room") && !out.contains("+1555"),
        "{out}"
    );

    // The provisioning API gives the same answers.
    use super::provisioning::{ProvError, Provisioning};
    assert_eq!(
        Provisioning::contacts(&h.bridge, ALICE)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        Provisioning::search(&h.bridge, ALICE, "bob")
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(matches!(
        h.bridge.start_chat(ALICE, "bob").await,
        Err(ProvError::Conflict(_))
    ));
    assert!(matches!(
        h.bridge.start_chat(ALICE, "nobody").await,
        Err(ProvError::NotFound(_))
    ));
    let chat = h.bridge.start_chat(ALICE, "Carol").await.unwrap();
    assert_eq!(chat.chat_id, "+15550004000");
}

/// The homeserver's third-party look-ups: a number on the network is its ghost (registered),
/// one not on it is nobody, a name finds known ghosts, and a ghost maps back to its number.
#[tokio::test]
async fn third_party_lookups_find_ghosts() {
    let h = Harness::new().await;
    h.alice
        .names
        .lock()
        .unwrap()
        .insert("+15550002000".into(), "Bob Builder".into());
    h.alice.unknown.lock().unwrap().push("+15550009999".into());
    let users = h
        .bridge
        .third_party_users(Some("+1 555 000 2000"), None)
        .await
        .unwrap();
    assert_eq!(
        users,
        [(
            "@interop_15550002000:x".to_owned(),
            "+15550002000".to_owned()
        )]
    );
    assert!(h.matrix.calls_of("ensure_ghost").len() == 1, "registered");
    let none = h
        .bridge
        .third_party_users(Some("+15550009999"), None)
        .await
        .unwrap();
    assert!(none.is_empty());
    let none = h
        .bridge
        .third_party_users(Some("not a number"), None)
        .await
        .unwrap();
    assert!(none.is_empty());
    let by_name = h
        .bridge
        .third_party_users(None, Some("builder"))
        .await
        .unwrap();
    assert_eq!(by_name[0].1, "+15550002000");
    assert_eq!(
        h.bridge
            .third_party_of_ghost("@interop_15550002000:x")
            .await
            .unwrap(),
        Some("+15550002000".to_owned())
    );
    // Anyone on the homeserver can make these look-ups: numbers are asked about at the bounded
    // rate of every look-up, and a number not on the network is not asked about again.
    let before = *h.alice.profile_lookups.lock().unwrap();
    let mut found = 0;
    for i in 0..200 {
        let phone = format!("+1555800{i:04}");
        found += h
            .bridge
            .third_party_users(Some(&phone), None)
            .await
            .unwrap()
            .len();
    }
    let asked = *h.alice.profile_lookups.lock().unwrap() - before;
    assert!(asked <= 2 * 21, "{asked} look-ups");
    assert!(found <= 21, "{found}");
    let before = *h.alice.profile_lookups.lock().unwrap();
    h.bridge
        .third_party_users(Some("+15550009999"), None)
        .await
        .unwrap();
    assert_eq!(
        *h.alice.profile_lookups.lock().unwrap(),
        before,
        "a known miss is not asked"
    );
    // A ghost id the bridge never registered, and a user that is no ghost.
    assert_eq!(
        h.bridge
            .third_party_of_ghost("@interop_15550007000:x")
            .await
            .unwrap(),
        None
    );
    assert_eq!(h.bridge.third_party_of_ghost("@bob:x").await.unwrap(), None);
}

/// A command from alice in her management room; the bot's answer.
async fn mgmt_cmd(h: &Harness, line: &str) -> String {
    h.bridge.run_command("!mgmt:x", ALICE, line).await.body
}

/// The accounts a search of alice's contacts finds.
async fn found(h: &Harness, q: &str) -> Vec<String> {
    h.bridge
        .search_contacts(ALICE, q)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.account)
        .collect()
}

/// Admin commands: `delete-all-portals` deletes every user's portals only after `confirm` (and
/// `cancel` stops it), `sudo` runs a command as another user with that user's level,
/// `sync-portal` refreshes one portal for its owner or an admin, and `set-management-room`
/// moves where commands need no prefix; none of them works below its level.
#[tokio::test]
async fn admin_commands_are_confirmed_permission_checked_and_act_as_asked() {
    const ADMIN: &str = "@admin:x";
    let h = Harness::new().await;
    h.store.set_management_room(ALICE, "!mgmt:x").await.unwrap();
    h.store
        .set_management_room(ADMIN, "!admin-mgmt:x")
        .await
        .unwrap();
    let bob_user = "@bob:x";
    h.login(bob_user, "+15550006000").await;
    for (user, contact) in [
        (ALICE, "+15550002000"),
        (ALICE, "+15550003000"),
        (bob_user, "+15550004000"),
    ] {
        let out = h
            .bridge
            .run_command("!any:x", user, &format!("start-chat {contact}"))
            .await
            .body;
        assert!(out.contains("Your chat with"), "{out}");
    }

    // Below the level: refused, nothing asked.
    let out = mgmt_cmd(&h, "delete-all-portals").await;
    assert!(out.contains("not allowed"), "{out}");
    let out = mgmt_cmd(&h, "sudo @bob:x list-chats").await;
    assert!(out.contains("not allowed"), "{out}");

    // sudo: the command runs as the user, with the user's level (not the admin's).
    let out = h
        .bridge
        .run_command("!admin-mgmt:x", ADMIN, "sudo @bob:x list-chats")
        .await
        .body;
    assert!(
        out.starts_with("As @bob:x:") && out.contains("+15550004000"),
        "{out}"
    );
    assert!(!out.contains("+15550002000"), "bob's chats only: {out}");
    let out = h
        .bridge
        .run_command("!admin-mgmt:x", ADMIN, "sudo @bob:x delete-all-portals")
        .await
        .body;
    assert!(out.contains("not allowed"), "{out}");
    assert!(
        h.bridge
            .run_command("!admin-mgmt:x", ADMIN, "sudo @bob:x sudo @alice:x ping")
            .await
            .body
            .contains("cannot run `sudo`")
    );
    assert!(
        h.bridge
            .run_command("!admin-mgmt:x", ADMIN, "sudo bob list-chats")
            .await
            .body
            .contains("not a Matrix user id")
    );

    // sync-portal: the owner refreshes the profile of the contact from the network.
    let bob_room = h.room_of("+15550002000").await;
    h.alice
        .names
        .lock()
        .unwrap()
        .insert("+15550002000".into(), "Bob Renamed".into());
    let out = h
        .bridge
        .run_command(&bob_room, bob_user, "sync-portal")
        .await
        .body;
    assert!(out.contains("Only the owner"), "{out}");
    let out = h
        .bridge
        .run_command(&bob_room, ALICE, "sync-portal")
        .await
        .body;
    assert_eq!(out, "Portal refreshed from the network.");
    let profile = h
        .store
        .ghost_profile("+15550002000")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(profile.displayname, "Bob Renamed");

    // set-management-room: not in a portal; elsewhere the room takes over.
    let out = h
        .bridge
        .run_command(&bob_room, ALICE, "set-management-room")
        .await
        .body;
    assert!(out.contains("cannot be your management room"), "{out}");
    let out = h
        .bridge
        .run_command("!new-mgmt:x", ALICE, "set-management-room")
        .await
        .body;
    assert!(out.contains("now your management room"), "{out}");
    assert_eq!(
        h.store.management_room(ALICE).await.unwrap().as_deref(),
        Some("!new-mgmt:x")
    );

    // delete-all-portals: only in the management room, only after `confirm`.
    let out = h
        .bridge
        .run_command("!elsewhere:x", ADMIN, "delete-all-portals")
        .await
        .body;
    assert!(out.contains("management room"), "{out}");
    let out = h
        .bridge
        .run_command("!admin-mgmt:x", ADMIN, "delete-all-portals")
        .await
        .body;
    assert!(
        out.contains("all 3 portal(s)") && out.contains("`confirm`"),
        "{out}"
    );
    assert!(
        h.bridge
            .continue_pending("!admin-mgmt:x", ADMIN, "yes")
            .await
            .unwrap()
            .body
            .contains("Send `confirm`")
    );
    assert!(
        h.bridge
            .continue_pending("!admin-mgmt:x", ADMIN, "cancel")
            .await
            .unwrap()
            .body
            .contains("Cancelled")
    );
    assert_eq!(
        h.store.portals_of(ALICE).await.unwrap().len(),
        2,
        "nothing deleted"
    );
    h.bridge
        .run_command("!admin-mgmt:x", ADMIN, "delete-all-portals")
        .await;
    let out = h
        .bridge
        .continue_pending("!admin-mgmt:x", ADMIN, "confirm")
        .await
        .unwrap()
        .body;
    assert_eq!(out, "Deleted 3 portal(s).");
    assert!(h.store.portals_of(ALICE).await.unwrap().is_empty());
    assert!(h.store.portals_of(bob_user).await.unwrap().is_empty());
    assert!(
        h.matrix
            .calls_of("leave")
            .iter()
            .any(|c| c["room"] == bob_room.as_str())
    );
    assert!(
        h.bridge
            .continue_pending("!admin-mgmt:x", ADMIN, "confirm")
            .await
            .is_none(),
        "nothing waits any more"
    );
}

/// A login's personal space: made (with the user invited) at the first portal, holding each
/// portal as it opens, losing it when it closes, and left at logout.
#[tokio::test]
async fn each_login_has_a_space_holding_its_portals() {
    let h = Harness::with(|s| {
        s.bridge.message_requests = false;
        s.bridge.personal_spaces = true;
    })
    .await;
    h.net_message(BOB_ACC, None, "m1", text("hi"))
        .await
        .unwrap();
    let rooms = h.matrix.calls_of("create_room");
    let space = rooms
        .iter()
        .position(|r| r["space"] == true)
        .expect("a space");
    assert_eq!(rooms[space]["invite"], json!([ALICE]));
    let space_id = h.store.space_room(ALICE).await.unwrap().expect("kept");
    let portal = h.room_of(BOB_ACC).await;
    let children = || {
        h.matrix
            .calls_of("send_state")
            .into_iter()
            .filter(|c| c["type"] == "m.space.child" && c["room"] == space_id.as_str())
            .collect::<Vec<_>>()
    };
    let added = children();
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(added[0]["state_key"], portal.as_str());
    assert_eq!(added[0]["content"]["via"], json!(["x"]));

    // A second chat goes into the same space.
    h.net_message("+15550003000", None, "m2", text("hello"))
        .await
        .unwrap();
    assert_eq!(children().len(), 2);
    assert_eq!(
        h.matrix
            .calls_of("create_room")
            .iter()
            .filter(|r| r["space"] == true)
            .count(),
        1
    );

    // Closing a portal takes it out (a child without `via`).
    let out = h
        .bridge
        .run_command(&portal, ALICE, "delete-portal")
        .await
        .body;
    assert!(out.contains("Portal deleted"), "{out}");
    let removed = children();
    assert_eq!(removed.last().unwrap()["state_key"], portal.as_str());
    assert_eq!(removed.last().unwrap()["content"]["via"], json!([]));

    // Logout: the bot leaves the space and forgets it.
    let out = h.bridge.run_command("!mgmt:x", ALICE, "logout").await.body;
    assert!(out.starts_with("Logged out"), "{out}");
    assert!(
        h.matrix
            .calls_of("leave")
            .iter()
            .any(|c| c["room"] == space_id.as_str())
    );
    assert_eq!(h.store.space_room(ALICE).await.unwrap(), None);
}

/// Polls both ways (MSC3381's unstable events on Matrix): a network poll becomes a poll start
/// whose answer ids are the option indexes; votes go both ways by option, whoever started the
/// poll (a Matrix poll's own answer ids are kept for that); only a poll's author ends it, on
/// either side; a poll with more options than Matrix allows is refused with a notice.
#[tokio::test]
async fn polls_go_both_ways_with_votes_by_option() {
    use super::model::{Poll, PollEnd, PollVote};
    let h = Harness::new().await;
    let (room, _) = dm_with_alices_message(&h).await;
    h.matrix.clear();
    h.alice.sent.lock().unwrap().clear();
    let events_of = |ty: &str| -> Vec<Value> {
        h.matrix
            .calls_of("send_event")
            .into_iter()
            .filter(|e| e["type"] == ty)
            .collect()
    };
    let last_sent = || h.alice.sent.lock().unwrap().last().cloned().expect("sent");
    let poll_rel = |event_id: &str| json!({"rel_type": "m.reference", "event_id": event_id});
    let vote = |target: &str, author: &str, selections: Vec<u32>| {
        D::PollVote(PollVote {
            target: target.into(),
            target_author: author.into(),
            selections,
        })
    };

    // From the network: the poll, with its options in order.
    h.net_message(
        BOB_ACC,
        None,
        "bob-poll",
        D::Poll(Poll {
            question: "Lunch?".into(),
            options: vec!["pizza".into(), "soup".into(), "salad".into()],
            max_selections: 0,
        }),
    )
    .await
    .unwrap();
    let start = events_of("org.matrix.msc3381.poll.start");
    assert_eq!(start.len(), 1, "{start:?}");
    let block = &start[0]["content"]["org.matrix.msc3381.poll.start"];
    assert_eq!(block["question"]["org.matrix.msc1767.text"], "Lunch?");
    assert_eq!(block["max_selections"], 1, "0 counts as 1");
    let answers: Vec<(String, String)> = block["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_owned(),
                a["org.matrix.msc1767.text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        answers,
        [("0", "pizza"), ("1", "soup"), ("2", "salad")].map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    assert!(
        start[0]["content"]["org.matrix.msc1767.text"]
            .as_str()
            .unwrap()
            .contains("2. soup"),
        "a text fallback: {start:?}"
    );
    let bob_poll = h.event_of(&room, "bob-poll").await;

    // Alice votes on it; Bob votes too (an index twice and one the poll lacks are dropped).
    h.matrix_event(
        &room,
        ALICE,
        "$vote1",
        "org.matrix.msc3381.poll.response",
        json!({"m.relates_to": poll_rel(&bob_poll),
            "org.matrix.msc3381.poll.response": {"answers": ["1"]}}),
    )
    .await
    .unwrap();
    let (_, _, voted) = last_sent();
    assert_eq!(voted.body, Some(vote("bob-poll", BOB_ACC, vec![1])));
    h.net_message(
        BOB_ACC,
        None,
        "bob-vote",
        vote("bob-poll", BOB_ACC, vec![2, 2, 99]),
    )
    .await
    .unwrap();
    let responses = events_of("org.matrix.msc3381.poll.response");
    assert_eq!(responses.len(), 1, "{responses:?}");
    assert_eq!(
        responses[0]["content"]["org.matrix.msc3381.poll.response"]["answers"],
        json!(["2"])
    );
    assert_eq!(responses[0]["content"]["m.relates_to"], poll_rel(&bob_poll));
    assert_ne!(responses[0]["as"], json!(h.bridge.matrix.bot_mxid()));

    // From Matrix: Alice's poll, with answer ids of her client's choosing.
    h.matrix_event(
        &room,
        ALICE,
        "$apoll",
        "org.matrix.msc3381.poll.start",
        json!({"org.matrix.msc3381.poll.start": {
            "question": {"org.matrix.msc1767.text": "Cinema?"},
            "kind": "org.matrix.msc3381.poll.disclosed", "max_selections": 2,
            "answers": [{"id": "yes-id", "org.matrix.msc1767.text": "yes"},
                        {"id": "no-id", "org.matrix.msc1767.text": "no"}]},
            "org.matrix.msc1767.text": "Cinema?\n1. yes\n2. no"}),
    )
    .await
    .unwrap();
    let (_, alice_poll, poll) = last_sent();
    assert_eq!(
        poll.body,
        Some(D::Poll(Poll {
            question: "Cinema?".into(),
            options: vec!["yes".into(), "no".into()],
            max_selections: 2,
        }))
    );
    h.net_message(
        BOB_ACC,
        None,
        "bob-vote-2",
        vote(&alice_poll, ALICE_ACC, vec![1]),
    )
    .await
    .unwrap();
    let responses = events_of("org.matrix.msc3381.poll.response");
    assert_eq!(
        responses[1]["content"]["org.matrix.msc3381.poll.response"]["answers"],
        json!(["no-id"])
    );
    h.matrix_event(
        &room,
        ALICE,
        "$vote2",
        "org.matrix.msc3381.poll.response",
        json!({"m.relates_to": poll_rel("$apoll"),
            "org.matrix.msc3381.poll.response": {"answers": ["no-id", "yes-id", "nope"]}}),
    )
    .await
    .unwrap();
    let (_, _, voted) = last_sent();
    assert_eq!(voted.body, Some(vote(&alice_poll, ALICE_ACC, vec![1, 0])));

    // Ends: each author ends their own; nobody ends another's.
    h.net_message(
        BOB_ACC,
        None,
        "bob-ends-alices",
        D::PollEnd(PollEnd {
            target: alice_poll.clone(),
        }),
    )
    .await
    .unwrap();
    assert!(events_of("org.matrix.msc3381.poll.end").is_empty());
    h.net_message(
        BOB_ACC,
        None,
        "bob-end",
        D::PollEnd(PollEnd {
            target: "bob-poll".into(),
        }),
    )
    .await
    .unwrap();
    let ends = events_of("org.matrix.msc3381.poll.end");
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0]["content"]["m.relates_to"], poll_rel(&bob_poll));
    let before = h.alice.sent.lock().unwrap().len();
    h.matrix_event(
        &room,
        ALICE,
        "$end-bobs",
        "org.matrix.msc3381.poll.end",
        json!({"m.relates_to": poll_rel(&bob_poll), "org.matrix.msc3381.poll.end": {},
            "org.matrix.msc1767.text": "Ended"}),
    )
    .await
    .unwrap();
    assert_eq!(h.alice.sent.lock().unwrap().len(), before, "not hers");
    h.matrix_event(
        &room,
        ALICE,
        "$end-own",
        "org.matrix.msc3381.poll.end",
        json!({"m.relates_to": poll_rel("$apoll"), "org.matrix.msc3381.poll.end": {},
            "org.matrix.msc1767.text": "Ended"}),
    )
    .await
    .unwrap();
    let (_, _, end) = last_sent();
    assert_eq!(end.body, Some(D::PollEnd(PollEnd { target: alice_poll })));

    // Too many options for Matrix: a notice says so.
    h.net_message(
        BOB_ACC,
        None,
        "bob-big-poll",
        D::Poll(Poll {
            question: "Pick".into(),
            options: (0..21).map(|i| i.to_string()).collect(),
            max_selections: 1,
        }),
    )
    .await
    .unwrap();
    assert_eq!(events_of("org.matrix.msc3381.poll.start").len(), 1);
    let refused: Vec<String> = events_of("m.room.message")
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    assert!(
        refused.iter().any(|b| b.contains("A poll was not bridged")),
        "{refused:?}"
    );
}

/// Disappearing messages: the owner sets a portal's timer (the network hears of it, the room
/// shows it as state); messages both ways then carry it and are scheduled, in the store, for
/// redaction that long after they were sent; due ones are redacted by the bot, once. A timer
/// from the network does the same, and `off` stops it.
#[tokio::test]
async fn disappearing_messages_follow_the_timer_both_ways() {
    use super::model::Timer;
    let h = Harness::new().await;
    let (room, _) = dm_with_alices_message(&h).await;
    h.matrix.clear();
    let out = h
        .bridge
        .run_command(&room, ALICE, "disappearing-timer 1h")
        .await
        .body;
    assert!(out.contains("set disappearing messages to 1 hour"), "{out}");
    let sent = h.alice.sent.lock().unwrap().last().cloned().expect("sent");
    assert_eq!(sent.2.body, Some(D::Timer(Timer { seconds: 3600 })));
    let state = h.matrix.calls_of("send_state");
    assert_eq!(state[0]["type"], "com.beeper.disappearing_timer");
    assert_eq!(
        state[0]["content"],
        json!({"type": "after_send", "timer": 3_600_000})
    );
    assert!(
        h.bridge
            .run_command(&room, ALICE, "disappearing-timer")
            .await
            .body
            .contains("1 hour")
    );
    assert!(
        h.bridge
            .run_command(&room, "@eve:x", "disappearing-timer off")
            .await
            .body
            .contains("Only the owner"),
        "a stranger cannot change it"
    );

    // Both directions carry it and are scheduled.
    let before = super::now_ms() as i64;
    h.matrix_event(
        &room,
        ALICE,
        "$mine",
        "m.room.message",
        matrix_text("gone soon"),
    )
    .await
    .unwrap();
    let sent = h.alice.sent.lock().unwrap().last().cloned().expect("sent");
    assert_eq!(sent.2.expire_timer, 3600);
    let bob_ts = super::now_ms() - 1000;
    let ev = NetEvent::Message {
        from: BOB_ACC.into(),
        group: None,
        message_id: "bob-brief".into(),
        timestamp: bob_ts,
        data: Message {
            body: Some(text("brief")),
            reply_to: None,
            expire_timer: 60,
        },
        envelope_id: 0,
    };
    // The database fails while it is scheduled: handled again, it is scheduled then (it was
    // mapped first, and a mapped message counts as bridged and was never scheduled).
    h.store.fail_next_schedule();
    h.bridge
        .on_network_event(ALICE, &ev)
        .await
        .expect_err("the schedule failed");
    h.bridge.on_network_event(ALICE, &ev).await.unwrap();
    let bobs = h.event_of(&room, "bob-brief").await;
    let due = |at: i64| {
        let store = h.store.clone();
        async move { store.due_to_disappear(at, 10).await.unwrap() }
    };
    assert!(due(before).await.is_empty(), "nothing due yet");
    assert_eq!(
        due(bob_ts as i64 + 60_000).await,
        [(room.clone(), bobs.clone())],
        "the contact's goes a minute after it was sent"
    );
    assert_eq!(due(before + 3_700_000).await.len(), 2);

    // Due ones are redacted by the bot, and only once.
    assert_eq!(
        h.bridge.redact_due(bob_ts + 60_000).await.unwrap(),
        1,
        "only the contact's is due"
    );
    assert_eq!(
        h.bridge
            .redact_due(super::now_ms() + 3_700_000)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        h.bridge
            .redact_due(super::now_ms() + 3_700_000)
            .await
            .unwrap(),
        0
    );
    let redacted: Vec<Value> = h
        .matrix
        .calls_of("redact")
        .iter()
        .map(|r| r["event"].clone())
        .collect();
    assert_eq!(redacted, [json!(bobs), json!("$mine")]);
    assert!(
        h.matrix
            .calls_of("redact")
            .iter()
            .all(|r| r["as"] == json!(h.bridge.matrix.bot_mxid()))
    );

    // The contact turns it off: the room hears of it, and new messages stay.
    h.net_message(BOB_ACC, None, "bob-off", D::Timer(Timer { seconds: 0 }))
        .await
        .unwrap();
    assert!(
        h.notices()
            .iter()
            .any(|n| n.contains("turned disappearing messages off")),
        "{:?}",
        h.notices()
    );
    assert_eq!(
        h.matrix.calls_of("send_state").last().unwrap()["content"],
        json!({})
    );
    h.matrix_event(
        &room,
        ALICE,
        "$stays",
        "m.room.message",
        matrix_text("stays"),
    )
    .await
    .unwrap();
    let sent = h.alice.sent.lock().unwrap().last().cloned().expect("sent");
    assert_eq!(sent.2.expire_timer, 0);
    assert!(due(i64::MAX).await.is_empty());
}

/// Two users of this homeserver in one interop group share its room (`bridge.shared_group_portals`):
/// a contact's message, which both logins receive, shows once, whichever login gets it first and
/// also when one of them catches up later; a message claimed by the other login waits until that
/// one bridged it (and is taken over when it never does); one user's message, which reaches the
/// other's login as well, is not shown again; each user's messages go out through their own
/// login; a user who logs out leaves the room to the other.
#[tokio::test]
async fn a_group_of_two_logins_has_one_room_and_each_message_once() {
    const DAVE: &str = "@dave:x";
    const DAVE_ACC: &str = "+15550004000";
    let h = Harness::new().await;
    let dave = h.login(DAVE, DAVE_ACC).await;
    let members: Vec<String> = vec![ALICE_ACC.into(), DAVE_ACC.into(), CAROL_ACC.into()];
    *h.alice.group_members.lock().unwrap() = members.clone();
    *dave.group_members.lock().unwrap() = members;
    let envelope = std::sync::atomic::AtomicU64::new(100);
    let deliver = |to: &'static str, from: &'static str, id: &str, body: &str| {
        let ev = NetEvent::Message {
            envelope_id: envelope.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
            from: from.into(),
            group: Some("g1".into()),
            message_id: id.into(),
            timestamp: SENT_AT,
            data: Message {
                body: Some(text(body)),
                reply_to: None,
                expire_timer: 0,
            },
        };
        let bridge = &h.bridge;
        async move { bridge.on_network_event(to, &ev).await }
    };
    let shown = |room: &str, body: &str| {
        h.matrix
            .calls_of("send_event")
            .iter()
            .filter(|c| c["room"] == room && c["content"]["body"] == body)
            .count()
    };

    // Carol writes: alice's login gets it first and makes the room; dave's copy brings dave in.
    deliver(ALICE, CAROL_ACC, "c1", "hello both").await.unwrap();
    let room = h.room_of("g1").await;
    deliver(DAVE, CAROL_ACC, "c1", "hello both").await.unwrap();
    let daves = h
        .store
        .portal(DAVE, "g1")
        .await
        .unwrap()
        .expect("dave's portal");
    assert_eq!(
        daves.room_id.as_ref().map(|r| r.as_str()),
        Some(room.as_str())
    );
    assert_eq!(h.matrix.calls_of("create_room").len(), 1, "one room");
    assert!(
        h.matrix
            .calls_of("invite")
            .iter()
            .any(|c| c["room"] == room.as_str() && c["invitee"] == DAVE)
    );
    assert_eq!(shown(&room, "hello both"), 1);
    // Dave has the level alice has in the room (to rename it, say).
    let levels = h.matrix.calls_of("send_state");
    let pl = levels
        .iter()
        .rev()
        .find(|c| c["room"] == room.as_str() && c["type"] == "m.room.power_levels")
        .expect("power levels set");
    assert_eq!(pl["content"]["users"][DAVE], 75, "{pl}");
    assert_eq!(pl["content"]["users"][ALICE], 75, "{pl}");
    // Dave is in the room himself: the ghost of his account (a member of the group) goes.
    let daves_ghost = h.bridge.ghost_mxid(DAVE_ACC);
    assert!(
        h.matrix
            .calls_of("leave")
            .iter()
            .any(|c| c["room"] == room.as_str() && c["as"] == daves_ghost.as_str())
    );

    // Dave writes on Matrix: out through dave's login only; its copy reaching alice's login
    // (from dave's account) is not shown again.
    h.matrix_event(
        &room,
        DAVE,
        "$d1",
        "m.room.message",
        matrix_text("dave here"),
    )
    .await
    .unwrap();
    assert!(dave.sent_bodies().contains(&text("dave here")));
    assert!(!h.alice.sent_bodies().contains(&text("dave here")));
    deliver(ALICE, DAVE_ACC, "d-1", "dave here").await.unwrap();
    assert_eq!(
        shown(&room, "dave here"),
        0,
        "the Matrix event is the message"
    );

    // Dave's login was away: alice's bridges carol's messages; dave's copies come later.
    for i in 0..3 {
        deliver(
            ALICE,
            CAROL_ACC,
            &format!("c-away-{i}"),
            &format!("away {i}"),
        )
        .await
        .unwrap();
    }
    for i in 0..3 {
        deliver(
            DAVE,
            CAROL_ACC,
            &format!("c-away-{i}"),
            &format!("away {i}"),
        )
        .await
        .unwrap();
        assert_eq!(shown(&room, &format!("away {i}")), 1);
    }

    // Both at once: dave's login has claimed a message and not bridged it yet; alice's copy
    // waits (to be retried) until dave's is done, then finds it bridged.
    let now = crate::now_ms() as i64;
    assert!(
        h.store
            .claim_message(&room, CAROL_ACC, "c-race", DAVE, now, now - 60_000)
            .await
            .unwrap()
    );
    let waiting = deliver(ALICE, CAROL_ACC, "c-race", "race").await;
    assert!(
        matches!(waiting, Err(BridgeError::NotReady(_))),
        "{waiting:?}"
    );
    deliver(DAVE, CAROL_ACC, "c-race", "race").await.unwrap();
    deliver(ALICE, CAROL_ACC, "c-race", "race").await.unwrap();
    assert_eq!(shown(&room, "race"), 1);
    // A claim its login never finished (it died) is taken over after a minute.
    assert!(
        h.store
            .claim_message(
                &room,
                CAROL_ACC,
                "c-lost",
                DAVE,
                now - 61_000,
                now - 121_000
            )
            .await
            .unwrap()
    );
    deliver(ALICE, CAROL_ACC, "c-lost", "lost?").await.unwrap();
    assert_eq!(shown(&room, "lost?"), 1);

    // Alice logs out: the room stays, dave's login goes on bridging into it.
    let out = h.bridge.run_command("!mgmt:x", ALICE, "logout").await.body;
    assert!(out.starts_with("Logged out"), "{out}");
    assert!(h.store.portal(ALICE, "g1").await.unwrap().is_none());
    // The room is no longer alice's to read: the bot removes her.
    assert!(
        h.matrix
            .calls_of("kick")
            .iter()
            .any(|c| c["room"] == room.as_str() && c["target"] == ALICE)
    );
    assert!(
        !h.matrix
            .calls_of("leave")
            .iter()
            .any(|c| c["room"] == room.as_str() && c["as"] == "@interopbot:x"),
        "the bot stays in the shared room"
    );
    deliver(DAVE, CAROL_ACC, "c-after", "after alice left")
        .await
        .unwrap();
    assert_eq!(shown(&room, "after alice left"), 1);
    assert!(
        h.store.by_message(&room, "c1", "").await.unwrap().is_some(),
        "the map stays"
    );
}

/// With `bridge.shared_group_portals` off, each login has a room of its own for a group.
#[tokio::test]
async fn without_shared_group_portals_each_login_has_its_own_room() {
    const DAVE: &str = "@dave:x";
    const DAVE_ACC: &str = "+15550004000";
    let h = Harness::with(|s| {
        s.bridge.message_requests = false;
        s.bridge.shared_group_portals = false;
    })
    .await;
    let dave = h.login(DAVE, DAVE_ACC).await;
    *dave.group_members.lock().unwrap() = vec![ALICE_ACC.into(), DAVE_ACC.into()];
    h.net_message(CAROL_ACC, Some("g1"), "c1", text("hi"))
        .await
        .unwrap();
    let ev = NetEvent::Message {
        envelope_id: 500,
        from: CAROL_ACC.into(),
        group: Some("g1".into()),
        message_id: "c1".into(),
        timestamp: SENT_AT,
        data: Message {
            body: Some(text("hi")),
            reply_to: None,
            expire_timer: 0,
        },
    };
    h.bridge.on_network_event(DAVE, &ev).await.unwrap();
    let alices = h.room_of("g1").await;
    let daves = h
        .store
        .portal(DAVE, "g1")
        .await
        .unwrap()
        .unwrap()
        .room_id
        .unwrap();
    assert_ne!(alices, daves.as_str());
    assert_eq!(h.matrix.calls_of("create_room").len(), 2);
}

/// A user of a shared group portal who is no longer in the group on the network loses their part
/// of the room: their portal goes and the bot removes them, so they do not read on through the
/// other users' logins. The last user's portal stays, as a portal of one login does.
#[tokio::test]
async fn a_user_removed_from_a_shared_group_is_removed_from_its_room() {
    const DAVE: &str = "@dave:x";
    const DAVE_ACC: &str = "+15550004000";
    let h = Harness::new().await;
    let dave = h.login(DAVE, DAVE_ACC).await;
    let members: Vec<String> = vec![ALICE_ACC.into(), DAVE_ACC.into(), CAROL_ACC.into()];
    *h.alice.group_members.lock().unwrap() = members.clone();
    *dave.group_members.lock().unwrap() = members;
    let update = |envelope_id: u64, members: Vec<String>| NetEvent::GroupUpdate {
        envelope_id,
        from: CAROL_ACC.into(),
        group: GroupInfo {
            id: "g1".into(),
            name: "A group".into(),
            members,
            ..Default::default()
        },
    };
    let all = vec![
        ALICE_ACC.to_owned(),
        DAVE_ACC.to_owned(),
        CAROL_ACC.to_owned(),
    ];
    h.bridge
        .on_network_event(ALICE, &update(1, all.clone()))
        .await
        .unwrap();
    h.bridge
        .on_network_event(DAVE, &update(2, all))
        .await
        .unwrap();
    let room = h.room_of("g1").await;
    assert!(h.store.portal(DAVE, "g1").await.unwrap().is_some());

    // Carol removes dave; alice's login hears of it first.
    let without_dave = vec![ALICE_ACC.to_owned(), CAROL_ACC.to_owned()];
    h.bridge
        .on_network_event(ALICE, &update(3, without_dave.clone()))
        .await
        .unwrap();
    assert!(h.store.portal(DAVE, "g1").await.unwrap().is_none());
    assert!(h.store.portal(ALICE, "g1").await.unwrap().is_some());
    let kicked: Vec<Value> = h.matrix.calls_of("kick");
    assert!(
        kicked
            .iter()
            .any(|c| c["room"] == room.as_str() && c["target"] == DAVE),
        "{kicked:?}"
    );
    // Alice, the last user, keeps her portal even when she is removed too.
    h.bridge
        .on_network_event(ALICE, &update(4, vec![CAROL_ACC.to_owned()]))
        .await
        .unwrap();
    assert!(h.store.portal(ALICE, "g1").await.unwrap().is_some());
    assert!(
        !h.matrix
            .calls_of("kick")
            .iter()
            .any(|c| c["target"] == ALICE)
    );
}

/// A user of a shared group portal removed from its room on Matrix (by a room admin, not by
/// themselves) loses their part of it: their portal goes, the others' stay.
#[tokio::test]
async fn a_user_kicked_from_a_shared_group_room_on_matrix_loses_their_part() {
    const DAVE: &str = "@dave:x";
    const DAVE_ACC: &str = "+15550004000";
    let h = Harness::new().await;
    let dave = h.login(DAVE, DAVE_ACC).await;
    let members: Vec<String> = vec![ALICE_ACC.into(), DAVE_ACC.into(), CAROL_ACC.into()];
    *h.alice.group_members.lock().unwrap() = members.clone();
    *dave.group_members.lock().unwrap() = members.clone();
    for (n, to) in [(1, ALICE), (2, DAVE)] {
        let update = NetEvent::GroupUpdate {
            envelope_id: n,
            from: CAROL_ACC.into(),
            group: GroupInfo {
                id: "g1".into(),
                name: "A group".into(),
                members: members.clone(),
                ..Default::default()
            },
        };
        h.bridge.on_network_event(to, &update).await.unwrap();
    }
    let room = h.room_of("g1").await;
    let kick = typed(json!({
        "type": "m.room.member", "room_id": room, "sender": "@admin:x", "event_id": "$kick",
        "state_key": DAVE, "content": {"membership": "leave"},
    }));
    h.bridge.handle_matrix_event(&kick).await.unwrap();
    assert!(h.store.portal(DAVE, "g1").await.unwrap().is_none());
    assert!(h.store.portal(ALICE, "g1").await.unwrap().is_some());
}
