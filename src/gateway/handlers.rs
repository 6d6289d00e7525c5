//! One function per request of docs/interop-protocol.md §17.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{Notify, mpsc};

use super::{Conn, Online, Reject, Shared, blobs, check_account, reject};
use crate::wire::pb::{self, ErrorCode, Kind, stanza::Body};

const CODE_TTL_MS: i64 = 10 * 60 * 1000;
const MAX_CODE_TRIES: i64 = 5;
const LOW_PREKEYS: u32 = 10;
const MAX_ONE_TIME_KEYS: u32 = 1000;

/// Whether a body is one a client may send.
pub(crate) fn is_request(b: &Body) -> bool {
    matches!(
        b,
        Body::Register(_)
            | Body::Verify(_)
            | Body::Login(_)
            | Body::UploadKeys(_)
            | Body::FetchBundle(_)
            | Body::Send(_)
            | Body::Ack(_)
            | Body::SendReceipt(_)
            | Body::SendTyping(_)
            | Body::SetPresence(_)
            | Body::CreateGroup(_)
            | Body::UpdateGroup(_)
            | Body::GetGroup(_)
            | Body::BlobPut(_)
            | Body::BlobGet(_)
            | Body::Ping(_)
            | Body::GetProfile(_)
            | Body::SetProfile(_)
            | Body::KeyCounts(_)
    )
}

fn ok() -> Body {
    Body::Ok(pb::Ok {})
}

fn secret_hash(secret: &[u8]) -> Vec<u8> {
    Sha256::new_with_prefix(b"interop-gateway/secret/v1")
        .chain_update(secret)
        .finalize()
        .to_vec()
}

/// Handles one request. `Ok(None)` means no answer (an id-0 `Ack`).
pub(crate) async fn handle(
    shared: &Arc<Shared>,
    conn: &mut Conn,
    body: Body,
) -> Result<Option<Body>, Reject> {
    let me = match (&body, &conn.account) {
        (Body::Register(_) | Body::Verify(_) | Body::Login(_) | Body::Ping(_), _) => String::new(),
        (_, Some(a)) => a.clone(),
        (_, None) => return Err(reject(ErrorCode::Unauthorized, "log in first")),
    };
    let answer = match body {
        Body::Ping(p) => Body::Pong(pb::Pong { nonce: p.nonce }),
        Body::Register(r) => register(shared, r).await?,
        Body::Verify(v) => verify(shared, v).await?,
        Body::Login(l) => login(shared, conn, l).await?,
        Body::UploadKeys(u) => upload_keys(shared, &me, u).await?,
        Body::KeyCounts(_) => {
            let (ot, ky) = shared.db.key_counts(&me).await?;
            Body::KeyCountsResult(pb::KeyCountsResult {
                one_time_prekeys: ot,
                kyber_prekeys: ky,
            })
        }
        Body::FetchBundle(f) => fetch_bundle(shared, f).await?,
        Body::Send(s) => send(shared, &me, s).await?,
        Body::Ack(a) => {
            shared.db.ack(&me, &a.envelope_ids).await?;
            ok()
        }
        Body::SendReceipt(r) => send_receipt(shared, &me, r).await?,
        Body::SendTyping(t) => send_typing(shared, &me, t).await?,
        Body::SetPresence(p) => {
            announce_presence(shared, &me, p.online).await;
            ok()
        }
        Body::SetProfile(p) => {
            if p.name.chars().count() > 256 {
                return Err(reject(
                    ErrorCode::BadRequest,
                    "name longer than 256 characters",
                ));
            }
            shared.db.set_profile(&me, &p.name, &p.avatar_blob).await?;
            ok()
        }
        Body::GetProfile(g) => {
            check_account(&g.account)?;
            Body::Profile(
                shared
                    .db
                    .profile(&g.account)
                    .await?
                    .ok_or_else(|| reject(ErrorCode::NotFound, "no such account"))?,
            )
        }
        Body::CreateGroup(c) => create_group(shared, &me, c).await?,
        Body::UpdateGroup(u) => update_group(shared, &me, u).await?,
        Body::GetGroup(g) => {
            let group = shared
                .db
                .group(&g.group)
                .await?
                .ok_or_else(|| reject(ErrorCode::NotFound, "no such group"))?;
            if !group.members.contains(&me) {
                return Err(reject(ErrorCode::NotMember, "not a member of this group"));
            }
            Body::Group(group)
        }
        Body::BlobPut(b) => blobs::put(shared, &mut conn.uploads, b).await?,
        Body::BlobGet(b) => blobs::get(shared, b).await?,
        _ => return Err(reject(ErrorCode::BadRequest, "not a request")),
    };
    Ok(Some(answer))
}

async fn register(shared: &Shared, r: pb::Register) -> Result<Body, Reject> {
    check_account(&r.account)?;
    let code = match &shared.cfg.dev_code {
        Some(c) => c.clone(),
        None => {
            let code = format!("{:06}", rand::rng().random_range(0..1_000_000));
            // Development delivery of the code: the operator reads it from the log.
            tracing::info!(account = %r.account, %code, "verification code");
            code
        }
    };
    shared.db.set_code(&r.account, &code).await?;
    Ok(ok())
}

async fn verify(shared: &Shared, v: pb::Verify) -> Result<Body, Reject> {
    check_account(&v.account)?;
    let Some((code, created, tries)) = shared.db.code(&v.account).await? else {
        return Err(reject(
            ErrorCode::BadCode,
            "no code pending: send Register first",
        ));
    };
    if tries >= MAX_CODE_TRIES {
        return Err(reject(
            ErrorCode::BadCode,
            "too many wrong tries: send Register for a new code",
        ));
    }
    if crate::store::now_ms() - created > CODE_TTL_MS {
        shared.db.drop_code(&v.account).await?;
        return Err(reject(
            ErrorCode::CodeExpired,
            "the code expired: send Register for a new one",
        ));
    }
    if !bool::from(code.as_bytes().ct_eq(v.code.as_bytes())) {
        shared.db.count_wrong_code(&v.account).await?;
        return Err(reject(ErrorCode::BadCode, "wrong code"));
    }
    shared.db.drop_code(&v.account).await?;
    let mut secret = vec![0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    shared
        .db
        .set_secret(&v.account, &secret_hash(&secret))
        .await?;
    // Re-registration ends the sessions of the old secret.
    if let Some(old) = shared.online.lock().await.remove(&v.account) {
        let _ = old.out.try_send(super::error_stanza(
            0,
            &reject(ErrorCode::Unauthorized, "account re-registered"),
        ));
        let _ = old.kill.send(true);
    }
    Ok(Body::Registered(pb::Registered {
        account: v.account,
        secret,
    }))
}

async fn login(shared: &Arc<Shared>, conn: &mut Conn, l: pb::Login) -> Result<Body, Reject> {
    check_account(&l.account)?;
    if conn.account.is_some() {
        return Err(reject(ErrorCode::BadRequest, "already logged in"));
    }
    let Some(hash) = shared.db.account_secret_hash(&l.account).await? else {
        return Err(reject(
            ErrorCode::Unauthorized,
            "unknown account or wrong secret",
        ));
    };
    if !bool::from(hash.ct_eq(&secret_hash(&l.secret))) {
        return Err(reject(
            ErrorCode::Unauthorized,
            "unknown account or wrong secret",
        ));
    }
    let me = Online {
        conn_id: conn.id,
        out: conn.out.clone(),
        wake: conn.wake.clone(),
        kill: conn.kill_tx.clone(),
    };
    if let Some(old) = shared.online.lock().await.insert(l.account.clone(), me) {
        let _ = old.out.try_send(super::error_stanza(
            0,
            &reject(ErrorCode::Conflict, "logged in on another connection"),
        ));
        let _ = old.kill.send(true);
    }
    conn.account = Some(l.account.clone());
    let upto = shared.db.max_envelope_id(&l.account).await?;
    let queued = shared.db.queued_count(&l.account).await?;
    let (ot, ky) = shared.db.key_counts(&l.account).await?;
    conn.pending_delivery = Some(upto);
    announce_presence(shared, &l.account, true).await;
    Ok(Body::LoggedIn(pb::LoggedIn {
        account: l.account,
        queued: queued as u32,
        one_time_prekeys: ot,
        kyber_prekeys: ky,
    }))
}

/// Runs after an answer was queued: starts the delivery loop once `LoggedIn` went out.
pub(crate) async fn after_answer(
    shared: &Arc<Shared>,
    conn: &mut Conn,
) -> Option<tokio::task::JoinHandle<()>> {
    let upto = conn.pending_delivery.take()?;
    let account = conn.account.clone()?;
    Some(tokio::spawn(deliver(
        shared.clone(),
        account,
        conn.out.clone(),
        conn.wake.clone(),
        upto,
    )))
}

async fn deliver(
    shared: Arc<Shared>,
    account: String,
    out: mpsc::Sender<pb::Stanza>,
    wake: Arc<Notify>,
    upto: i64,
) {
    let push = |body| pb::Stanza {
        id: 0,
        body: Some(body),
    };
    let mut last = 0i64;
    let mut delivered = 0u32;
    let mut drained = false;
    loop {
        let limit = if drained { i64::MAX } else { upto };
        let batch = match shared.db.envelopes_after(&account, last, limit, 256).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot read envelopes");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.is_empty() {
            if !drained {
                drained = true;
                if out
                    .send(push(Body::QueueDrained(pb::QueueDrained { delivered })))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            wake.notified().await;
            continue;
        }
        for env in batch {
            last = env.id as i64;
            delivered += 1;
            if out.send(push(Body::Envelope(env))).await.is_err() {
                return;
            }
        }
    }
}

pub(crate) async fn announce_presence(shared: &Shared, account: &str, online: bool) {
    let contacts = match shared.db.contacts(account).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read contacts");
            return;
        }
    };
    let p = pb::Presence {
        account: account.to_owned(),
        online,
        last_seen: crate::store::now_ms() as u64,
    };
    for c in contacts {
        shared
            .push(
                &c,
                pb::Stanza {
                    id: 0,
                    body: Some(Body::Presence(p.clone())),
                },
            )
            .await;
    }
}

fn check_ec_key(k: &[u8], what: &str) -> Result<(), Reject> {
    if k.len() == 33 && k[0] == 0x05 {
        Ok(())
    } else {
        Err(reject(
            ErrorCode::BadRequest,
            format!("{what}: not a 33-byte EC key"),
        ))
    }
}

fn check_kyber_key(k: &[u8], what: &str) -> Result<(), Reject> {
    if k.len() == 1569 && k[0] == 0x08 {
        Ok(())
    } else {
        Err(reject(
            ErrorCode::BadRequest,
            format!("{what}: not a 1569-byte Kyber1024 key"),
        ))
    }
}

fn check_signature(
    identity: &libsignal_protocol::PublicKey,
    key: &pb::SignedKey,
    what: &str,
) -> Result<(), Reject> {
    if key.signature.len() != 64 {
        return Err(reject(
            ErrorCode::BadRequest,
            format!("{what}: signature must be 64 bytes"),
        ));
    }
    if identity.verify_signature(&key.public_key, &key.signature) {
        Ok(())
    } else {
        Err(reject(ErrorCode::BadRequest, "bad signature"))
    }
}

async fn upload_keys(shared: &Shared, me: &str, u: pb::UploadKeys) -> Result<Body, Reject> {
    check_ec_key(&u.identity_key, "identity_key")?;
    let identity = libsignal_protocol::PublicKey::deserialize(&u.identity_key)
        .map_err(|_| reject(ErrorCode::BadRequest, "identity_key: not a valid key"))?;
    if !(1..=16383).contains(&u.registration_id) {
        return Err(reject(
            ErrorCode::BadRequest,
            "registration_id must be in 1..16383",
        ));
    }
    if let Some(k) = &u.signed_prekey {
        check_ec_key(&k.public_key, "signed_prekey")?;
        check_signature(&identity, k, "signed_prekey")?;
    }
    if let Some(k) = &u.kyber_last_resort {
        check_kyber_key(&k.public_key, "kyber_last_resort")?;
        check_signature(&identity, k, "kyber_last_resort")?;
    }
    for k in &u.one_time_prekeys {
        check_ec_key(&k.public_key, "one_time_prekeys")?;
    }
    for k in &u.kyber_prekeys {
        check_kyber_key(&k.public_key, "kyber_prekeys")?;
        check_signature(&identity, k, "kyber_prekeys")?;
    }
    let same_identity = shared
        .db
        .identity(me)
        .await?
        .is_some_and(|(ik, _)| ik == u.identity_key);
    let (has_signed, has_lr) = if same_identity {
        shared.db.has_base_keys(me).await?
    } else {
        (false, false)
    };
    if !(has_signed || u.signed_prekey.is_some()) || !(has_lr || u.kyber_last_resort.is_some()) {
        return Err(reject(
            ErrorCode::BadRequest,
            "a signed prekey and a Kyber last-resort prekey are required",
        ));
    }
    let (ot, ky) = if same_identity {
        shared.db.key_counts(me).await?
    } else {
        (0, 0)
    };
    if ot + u.one_time_prekeys.len() as u32 > MAX_ONE_TIME_KEYS
        || ky + u.kyber_prekeys.len() as u32 > MAX_ONE_TIME_KEYS
    {
        return Err(reject(
            ErrorCode::BadRequest,
            "more than 1000 one-time keys",
        ));
    }
    shared.db.upload_keys(me, &u).await?;
    let (ot, ky) = shared.db.key_counts(me).await?;
    Ok(Body::KeyCountsResult(pb::KeyCountsResult {
        one_time_prekeys: ot,
        kyber_prekeys: ky,
    }))
}

async fn fetch_bundle(shared: &Shared, f: pb::FetchBundle) -> Result<Body, Reject> {
    check_account(&f.account)?;
    let bundle = shared
        .db
        .fetch_bundle(&f.account)
        .await?
        .ok_or_else(|| reject(ErrorCode::NotFound, "no keys for this account"))?;
    let (ot, ky) = shared.db.key_counts(&f.account).await?;
    if ot < LOW_PREKEYS || ky < LOW_PREKEYS {
        let low = pb::PrekeysLow {
            one_time_prekeys: ot,
            kyber_prekeys: ky,
        };
        shared
            .push(
                &f.account,
                pb::Stanza {
                    id: 0,
                    body: Some(Body::PrekeysLow(low)),
                },
            )
            .await;
    }
    Ok(Body::Bundle(bundle))
}

async fn group_members_for(shared: &Shared, me: &str, group: &str) -> Result<Vec<String>, Reject> {
    let g = shared
        .db
        .group(group)
        .await?
        .ok_or_else(|| reject(ErrorCode::NotFound, "no such group"))?;
    if !g.members.iter().any(|m| m == me) {
        return Err(reject(ErrorCode::NotMember, "not a member of this group"));
    }
    Ok(g.members.into_iter().filter(|m| m != me).collect())
}

async fn send(shared: &Shared, me: &str, s: pb::Send) -> Result<Body, Reject> {
    if s.message_id.is_empty() || s.message_id.len() > 128 {
        return Err(reject(
            ErrorCode::BadRequest,
            "message_id must be 1 to 128 characters",
        ));
    }
    if s.ciphertext.is_empty() {
        return Err(reject(ErrorCode::BadRequest, "empty ciphertext"));
    }
    let kind = Kind::try_from(s.kind).unwrap_or(Kind::Unspecified);
    let recipients = match kind {
        Kind::Prekey | Kind::Message => {
            check_account(&s.to)?;
            if s.to == me {
                return Err(reject(ErrorCode::BadRequest, "cannot send to yourself"));
            }
            if !shared.db.account_exists(&s.to).await? {
                return Err(reject(ErrorCode::NotFound, "no such account"));
            }
            vec![s.to.clone()]
        }
        Kind::Group => group_members_for(shared, me, &s.group).await?,
        _ => {
            return Err(reject(
                ErrorCode::BadRequest,
                "kind must be PREKEY, MESSAGE or GROUP",
            ));
        }
    };
    let envelopes: Vec<pb::Envelope> = recipients
        .iter()
        .map(|to| pb::Envelope {
            from: me.to_owned(),
            to: to.clone(),
            timestamp: s.timestamp,
            kind: s.kind,
            ciphertext: s.ciphertext.clone(),
            message_id: s.message_id.clone(),
            group: if kind == Kind::Group {
                s.group.clone()
            } else {
                String::new()
            },
            ..Default::default()
        })
        .collect();
    let (ts, n) = match shared.db.store_send(me, &s.message_id, &envelopes).await? {
        Ok(ts) => {
            shared
                .relayed
                .fetch_add(envelopes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            shared.wake(&recipients).await;
            (ts, envelopes.len() as i64)
        }
        Err(earlier) => earlier,
    };
    Ok(Body::Sent(pb::Sent {
        message_id: s.message_id,
        server_timestamp: ts as u64,
        recipients: n as u32,
    }))
}

async fn send_receipt(shared: &Shared, me: &str, r: pb::SendReceipt) -> Result<Body, Reject> {
    check_account(&r.to)?;
    let Some(receipt) = r.receipt else {
        return Err(reject(ErrorCode::BadRequest, "receipt missing"));
    };
    if pb::ReceiptType::try_from(receipt.r#type).unwrap_or(pb::ReceiptType::ReceiptUnspecified)
        == pb::ReceiptType::ReceiptUnspecified
    {
        return Err(reject(
            ErrorCode::BadRequest,
            "receipt type must be DELIVERED or READ",
        ));
    }
    if receipt.message_ids.is_empty() || receipt.message_ids.len() > 1000 {
        return Err(reject(ErrorCode::BadRequest, "1 to 1000 message ids"));
    }
    if !shared.db.account_exists(&r.to).await? {
        return Err(reject(ErrorCode::NotFound, "no such account"));
    }
    let env = pb::Envelope {
        from: me.to_owned(),
        to: r.to.clone(),
        kind: Kind::Receipt as i32,
        group: receipt.group.clone(),
        receipt: Some(receipt),
        ..Default::default()
    };
    shared.db.store_envelopes(&[env]).await?;
    shared.wake([&r.to]).await;
    Ok(ok())
}

async fn send_typing(shared: &Shared, me: &str, t: pb::SendTyping) -> Result<Body, Reject> {
    if !t.group.is_empty() && !t.to.is_empty() {
        return Err(reject(
            ErrorCode::BadRequest,
            "set either to or group, not both",
        ));
    }
    let recipients = if !t.group.is_empty() {
        group_members_for(shared, me, &t.group).await?
    } else {
        check_account(&t.to)?;
        if !shared.db.account_exists(&t.to).await? {
            return Err(reject(ErrorCode::NotFound, "no such account"));
        }
        vec![t.to.clone()]
    };
    let typing = pb::Typing {
        from: me.to_owned(),
        group: t.group.clone(),
        typing: t.typing,
    };
    for r in recipients {
        shared
            .push(
                &r,
                pb::Stanza {
                    id: 0,
                    body: Some(Body::Typing(typing.clone())),
                },
            )
            .await;
    }
    Ok(ok())
}

fn group_update_envelopes(
    g: &pb::Group,
    me: &str,
    recipients: impl IntoIterator<Item = String>,
) -> Vec<pb::Envelope> {
    recipients
        .into_iter()
        .filter(|r| r != me)
        .map(|to| pb::Envelope {
            from: me.to_owned(),
            to,
            kind: Kind::GroupUpdate as i32,
            group: g.id.clone(),
            group_update: Some(g.clone()),
            ..Default::default()
        })
        .collect()
}

async fn check_members_exist(shared: &Shared, members: &[String]) -> Result<(), Reject> {
    for m in members {
        check_account(m)?;
        if !shared.db.account_exists(m).await? {
            return Err(reject(ErrorCode::NotFound, format!("no such account {m}")));
        }
    }
    Ok(())
}

async fn create_group(shared: &Shared, me: &str, c: pb::CreateGroup) -> Result<Body, Reject> {
    if c.name.chars().count() > 256 {
        return Err(reject(
            ErrorCode::BadRequest,
            "name longer than 256 characters",
        ));
    }
    if c.members.len() > 1024 {
        return Err(reject(ErrorCode::BadRequest, "more than 1024 members"));
    }
    check_members_exist(shared, &c.members).await?;
    let members: BTreeSet<String> = c.members.into_iter().chain([me.to_owned()]).collect();
    let mut raw = [0u8; 16];
    rand::rng().fill_bytes(&mut raw);
    let g = pb::Group {
        id: hex::encode(raw),
        name: c.name,
        avatar_blob: String::new(),
        members: members.iter().cloned().collect(),
        changed_by: me.to_owned(),
        revision: 1,
    };
    let envelopes = group_update_envelopes(&g, me, members.iter().cloned());
    shared.db.save_group(&g, &envelopes).await?;
    shared.wake(members.iter()).await;
    Ok(Body::Group(g))
}

async fn update_group(shared: &Shared, me: &str, u: pb::UpdateGroup) -> Result<Body, Reject> {
    let mut g = shared
        .db
        .group(&u.group)
        .await?
        .ok_or_else(|| reject(ErrorCode::NotFound, "no such group"))?;
    if !g.members.iter().any(|m| m == me) {
        return Err(reject(ErrorCode::NotMember, "not a member of this group"));
    }
    check_members_exist(shared, &u.add).await?;
    for r in &u.remove {
        check_account(r)?;
    }
    if let Some(name) = &u.name {
        if name.chars().count() > 256 {
            return Err(reject(
                ErrorCode::BadRequest,
                "name longer than 256 characters",
            ));
        }
        g.name = name.clone();
    }
    if let Some(avatar) = &u.avatar_blob {
        g.avatar_blob = avatar.clone();
    }
    let before: BTreeSet<String> = g.members.iter().cloned().collect();
    let mut after = before.clone();
    after.extend(u.add.iter().cloned());
    for r in &u.remove {
        after.remove(r);
    }
    g.members = after.iter().cloned().collect();
    g.revision += 1;
    g.changed_by = me.to_owned();
    let everyone: BTreeSet<String> = before.union(&after).cloned().collect();
    let envelopes = group_update_envelopes(&g, me, everyone.iter().cloned());
    shared.db.save_group(&g, &envelopes).await?;
    shared.wake(everyone.iter()).await;
    Ok(Body::Group(g))
}
