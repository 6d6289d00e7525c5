//! One function per request of docs/interop-protocol.md §17.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{
    CodeDelivery, Conn, Online, Reject, Shared, blobs, check_account,
    db::{SendOutcome, VerifyBudget, VerifyOutcome},
    reject,
};
use mib_wire::pb::{self, ErrorCode, Kind, stanza::Body};

const LOW_PREKEYS: u32 = 10;
const MAX_ONE_TIME_KEYS: usize = 1000;
/// Profile and group names, in bytes of UTF-8 (docs §11, §12).
const MAX_NAME_BYTES: usize = 256;

fn rate_limited(message: &str, retry_after_ms: u64) -> Reject {
    Reject {
        code: ErrorCode::RateLimited,
        message: message.into(),
        retry_after_ms: retry_after_ms.max(1),
    }
}

fn check_name(name: &str) -> Result<(), Reject> {
    if name.len() > MAX_NAME_BYTES {
        return Err(reject(ErrorCode::BadRequest, "name longer than 256 bytes"));
    }
    Ok(())
}

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
        Body::Register(r) => register(shared, conn, r).await?,
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
        Body::FetchBundle(f) => fetch_bundle(shared, &me, f).await?,
        Body::Send(s) => queue_send(shared, Some(&me), s).await?.await?,
        Body::Ack(a) => {
            let max = shared.cfg.limits.ack_max_ids;
            if a.envelope_ids.len() > max as usize {
                return Err(reject(
                    ErrorCode::BadRequest,
                    format!("more than {max} envelope ids in one Ack"),
                ));
            }
            shared.db.ack(&me, &a.envelope_ids).await?;
            if let Some(w) = &conn.window {
                w.acked(&a.envelope_ids);
            }
            ok()
        }
        Body::SendReceipt(r) => send_receipt(shared, &me, r).await?,
        Body::SendTyping(t) => send_typing(shared, &me, t).await?,
        Body::SetPresence(p) => {
            set_presence(shared, &me, p.online).await;
            ok()
        }
        Body::SetProfile(p) => {
            check_name(&p.name)?;
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

async fn register(shared: &Shared, conn: &Conn, r: pb::Register) -> Result<Body, Reject> {
    check_account(&r.account)?;
    if conn.account.is_none()
        && let Err(retry) = shared.registrations.take(&conn.peer)
    {
        return Err(rate_limited(
            "too many registrations from this address",
            retry,
        ));
    }
    // No code goes out while the account's verification is locked.
    let locked = shared.db.verify_locked_for(&r.account).await?;
    if locked > 0 {
        return Err(rate_limited(
            "verification of this account is locked",
            locked as u64,
        ));
    }
    let code = match &shared.cfg.codes {
        CodeDelivery::DevFixed(c) => zeroize::Zeroizing::new(c.clone()),
        _ => zeroize::Zeroizing::new(format!("{:06}", rand::rng().random_range(0..1_000_000))),
    };
    shared.db.set_code(&r.account, &code).await?;
    match &shared.cfg.codes {
        CodeDelivery::DevFixed(_) => {}
        // Development delivery of the code: the operator reads it from the log.
        CodeDelivery::DevLog => {
            tracing::info!(account = %r.account, code = %*code, "verification code (development mode)");
        }
        CodeDelivery::Channel(tx) => {
            if tx.try_send((r.account.clone(), code)).is_err() {
                tracing::warn!("the verification code sender is busy or gone");
                return Err(reject(ErrorCode::Internal, "cannot send a code now"));
            }
        }
    }
    Ok(ok())
}

async fn verify(shared: &Shared, v: pb::Verify) -> Result<Body, Reject> {
    check_account(&v.account)?;
    let l = &shared.cfg.limits;
    let budget = VerifyBudget {
        code_ttl_ms: l.code_ttl.as_millis() as i64,
        tries: i64::from(l.verify_budget.max(1)),
        window_ms: l.verify_window.as_millis() as i64,
        lockout_ms: l.verify_lockout.as_millis() as i64,
        lockout_max_ms: l.verify_lockout_max.as_millis() as i64,
    };
    match shared.db.verify_code(&v.account, &v.code, budget).await? {
        VerifyOutcome::Locked(ms) => {
            return Err(rate_limited(
                "too many wrong codes: verification is locked",
                ms as u64,
            ));
        }
        VerifyOutcome::NoCode => {
            return Err(reject(
                ErrorCode::BadCode,
                "no code pending: send Register first",
            ));
        }
        VerifyOutcome::Expired => {
            return Err(reject(
                ErrorCode::CodeExpired,
                "the code expired: send Register for a new one",
            ));
        }
        VerifyOutcome::Wrong => return Err(reject(ErrorCode::BadCode, "wrong code")),
        VerifyOutcome::Correct => {}
    }
    let mut secret = vec![0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    shared
        .db
        .set_secret(&v.account, &secret_hash(&secret))
        .await?;
    // Re-registration ends the sessions of the old secret.
    if let Some(old) = shared.online().remove(&v.account) {
        let _ = old.out.try_send(Box::new(super::error_stanza(
            0,
            &reject(ErrorCode::Unauthorized, "account re-registered"),
        )));
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
    conn.window = (l.window > 0).then(|| {
        Arc::new(super::Window::new(
            l.window.min(shared.cfg.limits.max_window),
        ))
    });
    let me = conn.online();
    if let Some(old) = shared.online().insert(l.account.clone(), me) {
        let _ = old.out.try_send(Box::new(super::error_stanza(
            0,
            &reject(ErrorCode::Conflict, "logged in on another connection"),
        )));
        let _ = old.kill.send(true);
    }
    conn.account = Some(l.account.clone());
    let counts = shared.db.login_counts(&l.account).await?;
    conn.pending_delivery = Some(counts.upto);
    // A login does not make the account online (docs §10.3); `SetPresence` does.
    Ok(Body::LoggedIn(pb::LoggedIn {
        account: l.account,
        queued: counts.queued,
        one_time_prekeys: counts.one_time_prekeys,
        kyber_prekeys: counts.kyber_prekeys,
    }))
}

/// Runs after an answer was queued: starts the delivery loop once `LoggedIn` went out.
pub(crate) async fn after_answer(
    shared: &Arc<Shared>,
    conn: &mut Conn,
) -> Option<tokio::task::JoinHandle<()>> {
    let upto = conn.pending_delivery.take()?;
    let account = conn.account.clone()?;
    let me = conn.online();
    Some(tokio::spawn(deliver(shared.clone(), account, me, upto)))
}

/// Pushes the account's envelopes on the connection `me`: those stored up to `upto` (the
/// queue at login), then `QueueDrained`, then each one stored from then on.
///
/// Once it has read the whole queue, the loop waits for its inbox: the group commit hands it
/// the envelopes it just committed for the account, and the loop pushes them without reading
/// when they follow on from the last envelope it pushed (with many accounts, each getting an
/// envelope now and then, a read per envelope was most of what the database's threads did).
/// Anything it cannot so trust (a gap, envelopes stored apart, an inbox that overflowed) has
/// it read its queue again, after the last envelope it pushed.
async fn deliver(shared: Arc<Shared>, account: String, me: Online, upto: i64) {
    use super::Stage as S;
    let Online {
        out,
        inbox,
        kill,
        window,
        delivery: stage,
        ..
    } = me;
    let stall = shared.cfg.limits.slow_reader_timeout;
    let push = |body| pb::Stanza {
        id: 0,
        body: Some(body),
    };
    let mut last = 0i64;
    let mut delivered = 0u32;
    let mut drained = false;
    // Pushes one envelope, through the window when the login asked for one; false when the
    // connection is gone.
    let push_envelope = async |env: pb::Envelope| {
        if let Some(w) = &window {
            stage.set(S::Window);
            w.admit(env.id).await;
        }
        stage.set(S::Queue);
        super::enqueue(&out, &kill, stall, push(Body::Envelope(env)))
            .await
            .is_ok()
    };
    // One read finds the queue at login and what came since: `QueueDrained` goes between the
    // envelopes up to `upto` and those after it, or after the read when it found them all (a
    // read of the queue at login, a read to find it empty and a read for what came since were
    // three reads for a login with a few envelopes waiting).
    let push_drained = async |delivered: u32| {
        stage.set(S::Queue);
        let drained = push(Body::QueueDrained(pb::QueueDrained { delivered }));
        super::enqueue(&out, &kill, stall, drained).await.is_ok()
    };
    loop {
        stage.set(S::Reading);
        let batch = match shared
            .db
            .envelopes_after(&account, last, i64::MAX, DELIVERY_BATCH)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot read envelopes");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let read_all = batch.len() < DELIVERY_BATCH as usize;
        for env in batch {
            if !drained && env.id as i64 > upto {
                drained = true;
                if !push_drained(delivered).await {
                    return;
                }
            }
            last = env.id as i64;
            delivered += 1;
            if !push_envelope(env).await {
                return;
            }
        }
        if !read_all {
            continue;
        }
        if !drained {
            drained = true;
            if !push_drained(delivered).await {
                return;
            }
        }
        // The read found every envelope stored before it: from here on, what is stored is
        // handed over, until something cannot be trusted.
        loop {
            stage.set(S::Wake);
            let Some(handed) = inbox.next(last).await else {
                break;
            };
            for env in handed {
                last = env.id as i64;
                if !push_envelope(env).await {
                    return;
                }
            }
        }
    }
}

/// Envelopes read for delivery at a time.
const DELIVERY_BATCH: i64 = 256;

/// Sets an account's presence and, when it changed, tells its contacts (docs §10.3).
pub(crate) async fn set_presence(shared: &Shared, account: &str, online: bool) {
    let changed = {
        let mut present = shared.present();
        if online {
            present.insert(account.to_owned())
        } else {
            present.remove(account)
        }
    };
    if changed {
        announce_presence(shared, account, online).await;
    }
}

async fn announce_presence(shared: &Shared, account: &str, online: bool) {
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
        last_seen: super::db::now_ms() as u64,
    };
    shared.push(&contacts, &Body::Presence(p));
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
    // Sizes of every key and signature first, then the signatures (docs §8.1 order).
    let signed = u
        .signed_prekey
        .iter()
        .map(|k| (k, "signed_prekey", false))
        .chain(
            u.kyber_last_resort
                .iter()
                .map(|k| (k, "kyber_last_resort", true)),
        )
        .chain(u.kyber_prekeys.iter().map(|k| (k, "kyber_prekeys", true)));
    for (k, what, kyber) in signed.clone() {
        if kyber {
            check_kyber_key(&k.public_key, what)?;
        } else {
            check_ec_key(&k.public_key, what)?;
        }
        if k.signature.len() != 64 {
            return Err(reject(
                ErrorCode::BadRequest,
                format!("{what}: signature must be 64 bytes"),
            ));
        }
    }
    for k in &u.one_time_prekeys {
        check_ec_key(&k.public_key, "one_time_prekeys")?;
    }
    for (k, what, _) in signed {
        check_signature(&identity, k, what)?;
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
    // A Kyber last-resort prekey is optional: an account without one is an X3DH-era client
    // (docs §8.1), whose bundles carry no Kyber prekey. Once stored, it can only be replaced.
    if !(has_signed || u.signed_prekey.is_some()) {
        return Err(reject(ErrorCode::BadRequest, "a signed prekey is required"));
    }
    if u.kyber_last_resort.is_none() && !has_lr && !u.kyber_prekeys.is_empty() {
        return Err(reject(
            ErrorCode::BadRequest,
            "one-time Kyber prekeys need a Kyber last-resort prekey",
        ));
    }
    // Count what would be stored: an uploaded id already stored replaces that key.
    let (mut ot, mut ky): (BTreeSet<u32>, BTreeSet<u32>) = if same_identity {
        shared.db.one_time_key_ids(me).await?
    } else {
        Default::default()
    };
    ot.extend(u.one_time_prekeys.iter().map(|k| k.id));
    ky.extend(u.kyber_prekeys.iter().map(|k| k.id));
    if ot.len() > MAX_ONE_TIME_KEYS || ky.len() > MAX_ONE_TIME_KEYS {
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

async fn fetch_bundle(shared: &Shared, me: &str, f: pb::FetchBundle) -> Result<Body, Reject> {
    check_account(&f.account)?;
    // Each fetch consumes one-time keys of the target: a bucket per (fetcher, target) keeps
    // anyone from draining them, without letting one fetcher lock everyone else out.
    if let Err(retry) = shared.bundle_fetches.take(&format!("{me} {}", f.account)) {
        return Err(rate_limited(
            "too many bundle fetches for this account",
            retry,
        ));
    }
    let bundle = shared
        .db
        .fetch_bundle(&f.account)
        .await?
        .ok_or_else(|| reject(ErrorCode::NotFound, "no keys for this account"))?;
    let (ot, ky) = shared.db.key_counts(&f.account).await?;
    // An account without Kyber keys (X3DH era) is low only on EC one-time keys.
    let kyber_low = bundle.kyber_prekey.is_some() && ky < LOW_PREKEYS;
    if ot < LOW_PREKEYS || kyber_low {
        let low = pb::PrekeysLow {
            one_time_prekeys: ot,
            kyber_prekeys: ky,
        };
        shared.push([&f.account], &Body::PrekeysLow(low));
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

/// The answer to a `Send` that is in the group commit: its `Sent` once stored.
pub(crate) type SendAnswer = std::pin::Pin<Box<dyn Future<Output = Result<Body, Reject>> + Send>>;

/// Checks a `Send` of the connection logged in as `me` (`None`: not logged in, refused) and puts
/// it in the group commit; the returned future answers it once it is stored. Sends of one
/// connection queued one after the other are stored in that order, so a connection may have
/// several in the commit at once (see `lib.rs`, `connection`).
pub(crate) async fn queue_send(
    shared: &Arc<Shared>,
    me: Option<&str>,
    s: pb::Send,
) -> Result<SendAnswer, Reject> {
    let me = me.ok_or_else(|| reject(ErrorCode::Unauthorized, "log in first"))?;
    let kind = Kind::try_from(s.kind).unwrap_or(Kind::Unspecified);
    if !matches!(kind, Kind::Prekey | Kind::Message | Kind::Group) {
        return Err(reject(
            ErrorCode::BadRequest,
            "kind must be PREKEY, MESSAGE or GROUP",
        ));
    }
    if s.ciphertext.is_empty() {
        return Err(reject(ErrorCode::BadRequest, "empty ciphertext"));
    }
    if s.message_id.is_empty() || s.message_id.len() > 128 {
        return Err(reject(
            ErrorCode::BadRequest,
            "message_id must be 1 to 128 bytes",
        ));
    }
    let recipients = if kind == Kind::Group {
        if s.group.is_empty() || !s.to.is_empty() {
            return Err(reject(
                ErrorCode::BadRequest,
                "a GROUP send names the group and no recipient",
            ));
        }
        group_members_for(shared, me, &s.group).await?
    } else {
        check_account(&s.to)?;
        if s.to == me {
            return Err(reject(ErrorCode::BadRequest, "cannot send to yourself"));
        }
        if !s.group.is_empty() {
            return Err(reject(
                ErrorCode::BadRequest,
                "a PREKEY or MESSAGE send names no group",
            ));
        }
        if !shared.db.account_exists(&s.to).await? {
            return Err(reject(ErrorCode::NotFound, "no such account"));
        }
        vec![s.to.clone()]
    };
    let envelopes: Vec<pb::Envelope> = recipients
        .into_iter()
        .map(|to| pb::Envelope {
            from: me.to_owned(),
            to,
            timestamp: s.timestamp,
            kind: s.kind,
            ciphertext: s.ciphertext.clone(),
            message_id: s.message_id.clone(),
            group: s.group.clone(),
            ..Default::default()
        })
        .collect();
    let fanout = kind == Kind::Group;
    // The group commit's writer hands the recipients the envelopes once they are stored
    // (`GatewayDb::on_stored`), whatever becomes of this sender.
    let stored = shared.db.store_send(
        me,
        &s.message_id,
        envelopes,
        shared.cfg.limits.queue_max,
        fanout,
    );
    Ok(Box::pin(async move {
        let (ts, n) = match stored.await? {
            SendOutcome::Stored(ts, n) => (ts, n),
            SendOutcome::Repeat(ts, n) => (ts, n),
            SendOutcome::QueueFull => return Err(queue_full()),
        };
        Ok(Body::Sent(pb::Sent {
            message_id: s.message_id,
            server_timestamp: ts as u64,
            recipients: n as u32,
        }))
    }))
}

fn queue_full() -> Reject {
    reject(
        ErrorCode::QueueFull,
        "the recipient's queue is full: retry later",
    )
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
    let max = shared.cfg.limits.receipt_max_ids as usize;
    if receipt.message_ids.is_empty() || receipt.message_ids.len() > max {
        return Err(reject(
            ErrorCode::BadRequest,
            format!("1 to {max} message ids"),
        ));
    }
    if !shared.db.account_exists(&r.to).await? {
        return Err(reject(ErrorCode::NotFound, "no such account"));
    }
    // The receipt's own `group` travels inside it; the envelope's `group` is for GROUP and
    // GROUP_UPDATE only (docs §7).
    let env = pb::Envelope {
        from: me.to_owned(),
        to: r.to.clone(),
        kind: Kind::Receipt as i32,
        receipt: Some(receipt),
        ..Default::default()
    };
    if !shared
        .db
        .store_envelope(&env, shared.cfg.limits.queue_max)
        .await?
    {
        return Err(queue_full());
    }
    // Its recipient was woken by the group commit's writer.
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
    shared.push(&recipients, &Body::Typing(typing));
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

/// Checks accounts named in a group request: every malformed one first (`BAD_REQUEST`), then
/// every unknown one (`NOT_FOUND`), as docs §12 orders them.
async fn check_members(
    shared: &Shared,
    must_exist: &[String],
    well_formed: &[String],
) -> Result<(), Reject> {
    for m in must_exist.iter().chain(well_formed) {
        check_account(m)?;
    }
    for m in must_exist {
        if !shared.db.account_exists(m).await? {
            return Err(reject(ErrorCode::NotFound, format!("no such account {m}")));
        }
    }
    Ok(())
}

fn check_group_size(shared: &Shared, members: usize) -> Result<(), Reject> {
    let max = shared.cfg.limits.group_max_members;
    if members > max as usize {
        return Err(reject(
            ErrorCode::BadRequest,
            format!("a group has at most {max} members"),
        ));
    }
    Ok(())
}

async fn create_group(shared: &Shared, me: &str, c: pb::CreateGroup) -> Result<Body, Reject> {
    check_name(&c.name)?;
    check_members(shared, &[], &c.members).await?;
    let members: BTreeSet<String> = c.members.into_iter().chain([me.to_owned()]).collect();
    check_group_size(shared, members.len())?;
    check_members(shared, &members.iter().cloned().collect::<Vec<_>>(), &[]).await?;
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
    shared
        .db
        .save_group(&g, &envelopes, shared.cfg.limits.queue_max)
        .await?;
    shared.read_again(members.iter());
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
    check_members(shared, &u.add, &u.remove).await?;
    if let Some(name) = &u.name {
        check_name(name)?;
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
    check_group_size(shared, after.len())?;
    g.members = after.iter().cloned().collect();
    g.revision += 1;
    g.changed_by = me.to_owned();
    let everyone: BTreeSet<String> = before.union(&after).cloned().collect();
    let envelopes = group_update_envelopes(&g, me, everyone.iter().cloned());
    shared
        .db
        .save_group(&g, &envelopes, shared.cfg.limits.queue_max)
        .await?;
    shared.read_again(everyone.iter());
    Ok(Body::Group(g))
}
