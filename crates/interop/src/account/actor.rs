//! The account actor's loop: connecting and logging in, the handle's commands, pushes from the
//! gateway, and acks.

use super::*;

/// `d` spread over ±50%: logins that lost the gateway together (a gateway restart) then retry
/// spread out instead of all at once, at every step of the backoff.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.5..1.5))
}

/// A step of the actor (a command, a push, an ack, connecting) that takes longer than this is
/// logged while it lasts: every other command of the account waits behind it.
const SLOW_STEP: Duration = Duration::from_secs(30);

/// What the actor is doing, where its handle can read it: a caller whose command timed out logs
/// it, so that a stalled account says on which step (or that it was idle and the command never
/// reached it).
#[derive(Debug, Default)]
pub(super) struct Doing {
    /// The step under way and since when.
    step: Option<(&'static str, tokio::time::Instant)>,
    /// Steps finished since the actor started.
    steps: u64,
    /// Envelopes taken from the connection, envelope ids whose ack the gateway took, and
    /// those whose ack was given up (see [`ack_until_taken`]).
    envelopes: u64,
    acked: u64,
    acks_given_up: u64,
}

pub(super) type SharedDoing = Arc<std::sync::Mutex<Doing>>;

impl Doing {
    pub(super) fn describe(doing: &SharedDoing) -> String {
        let d = doing.lock().unwrap_or_else(|p| p.into_inner());
        match d.step {
            Some((what, since)) => format!(
                "on step {what} for {:.1} s ({} steps done)",
                since.elapsed().as_secs_f64(),
                d.steps
            ),
            None => format!("waiting for work ({} steps done)", d.steps),
        }
    }

    /// How many envelopes came, and how many of them were acked or had their ack given up.
    pub(super) fn flow(doing: &SharedDoing) -> String {
        let d = doing.lock().unwrap_or_else(|p| p.into_inner());
        format!(
            "{} envelopes taken, {} acked, {} acks given up",
            d.envelopes, d.acked, d.acks_given_up
        )
    }

    fn count(doing: &SharedDoing, f: impl FnOnce(&mut Doing)) {
        f(&mut doing.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Marks a step as under way until dropped (ended, or the actor's task dropped).
struct DoingStep<'a>(&'a SharedDoing);

impl Drop for DoingStep<'_> {
    fn drop(&mut self) {
        let mut d = self.0.lock().unwrap_or_else(|p| p.into_inner());
        d.step = None;
        d.steps += 1;
    }
}

/// Runs `step`, recording it in `doing` while it lasts and warning once if it takes longer than
/// [`SLOW_STEP`] (and again when it ends).
async fn watched<F: std::future::Future>(
    doing: &SharedDoing,
    what: &'static str,
    step: F,
) -> F::Output {
    let started = tokio::time::Instant::now();
    doing.lock().unwrap_or_else(|p| p.into_inner()).step = Some((what, started));
    let _under_way = DoingStep(doing);
    tokio::pin!(step);
    tokio::select! {
        out = &mut step => return out,
        _ = tokio::time::sleep(SLOW_STEP) => {
            tracing::warn!(step = what, "the account is still busy with one step after 30 s");
        }
    }
    let out = step.await;
    tracing::warn!(step = what, took = ?started.elapsed(), "a slow step of the account ended");
    out
}

/// The command to run next, or `None` if its caller stopped waiting for it (see
/// [`Command::caller_gone`]). A command that waited over [`SLOW_STEP`] for its turn is logged:
/// that is an account with more work than it gets through, not one stuck on a step.
fn admit(queued: Queued) -> Option<Command> {
    let Queued { since, command } = queued;
    let waited = since.elapsed();
    if command.caller_gone() {
        tracing::warn!(
            command = command.name(),
            ?waited,
            "a command whose caller stopped waiting for it is dropped unrun"
        );
        return None;
    }
    if waited > SLOW_STEP {
        tracing::warn!(
            command = command.name(),
            ?waited,
            "a command waited over 30 s for its turn: the account has more work than it gets through"
        );
    }
    Some(command)
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Send { .. } => "send",
            Command::CreateGroup { .. } => "create group",
            Command::UpdateGroup { .. } => "update group",
            Command::GetGroup { .. } => "get group",
            Command::SetProfile { .. } => "set profile",
            Command::ResetIdentity { .. } => "reset identity",
            Command::SessionInfo { .. } => "session info",
            Command::Stop => "stop",
        }
    }
}

impl Actor {
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Box<Queued>>,
        mut acks: mpsc::UnboundedReceiver<u64>,
    ) {
        let mut backoff = Duration::from_millis(250);
        let doing = self.doing.clone();
        loop {
            if self.conn.is_none() {
                match watched(&doing, "connect", self.connect()).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(250);
                        self.emit(Event::Connected {
                            account: self.creds.account.clone(),
                        })
                        .await;
                    }
                    Err(e) if e.code() == Some(ErrorCode::Unauthorized) => {
                        self.emit(Event::LoggedOut {
                            account: self.creds.account.clone(),
                            reason: e.to_string(),
                        })
                        .await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, ?backoff, "interop connection failed");
                        self.emit(Event::Disconnected {
                            account: self.creds.account.clone(),
                            reason: e.to_string(),
                        })
                        .await;
                    }
                }
            }
            let connected = self.conn.is_some();
            tokio::select! {
                // Acks first: they free the gateway's queue and must not be lost at a stop.
                biased;
                Some(envelope_id) = acks.recv() => {
                    // Whatever else is ready goes in the same commit and the same `Ack`.
                    let mut batch = vec![envelope_id];
                    while batch.len() < MAX_ACK_BATCH
                        && let Ok(id) = acks.try_recv()
                    {
                        batch.push(id);
                    }
                    watched(&doing, "ack", self.ack(&batch)).await;
                }
                cmd = rx.recv() => match cmd.map(|q| *q) {
                    None | Some(Queued { command: Command::Stop, .. }) => {
                        let mut batch = Vec::new();
                        while let Ok(envelope_id) = acks.try_recv() {
                            batch.push(envelope_id);
                        }
                        for chunk in batch.chunks(MAX_ACK_BATCH) {
                            self.ack(chunk).await;
                        }
                        return;
                    }
                    Some(queued) => {
                        if let Some(cmd) = admit(queued) {
                            let what = cmd.name();
                            watched(&doing, what, self.command(cmd)).await
                        }
                    }
                },
                push = async { match self.conn.as_mut() { Some((_, p)) => p.recv().await, None => std::future::pending().await } }, if connected => {
                    match push {
                        Some(st) => watched(&doing, "pushes", self.pushes(*st)).await,
                        None => {
                            self.conn = None;
                            self.published.send_replace(None);
                            self.emit(Event::Disconnected { account: self.creds.account.clone(), reason: "connection lost".into() }).await;
                        }
                    }
                }
                _ = tokio::time::sleep(jittered(backoff)), if !connected => {
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    pub(super) async fn connect(&mut self) -> Result<(), InteropError> {
        let (conn, pushes) = GatewayConn::connect(&self.gateway).await?;
        let logged = conn
            .login(&self.creds.account, &self.creds.secret, DELIVERY_WINDOW)
            .await?;
        self.published.send_replace(Some(conn.clone()));
        self.conn = Some((conn, pushes));
        self.maintain_keys(logged.one_time_prekeys, logged.kyber_prekeys)
            .await?;
        Ok(())
    }

    pub(super) fn conn(&self) -> Result<&GatewayConn, InteropError> {
        self.conn
            .as_ref()
            .map(|(c, _)| c)
            .ok_or(InteropError::Disconnected)
    }

    pub(super) async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Send {
                to,
                message_id,
                data,
                reply,
            } => {
                let r = self.send_data(&to, &message_id, data).await;
                let _ = reply.send(r);
            }
            Command::CreateGroup {
                name,
                members,
                reply,
            } => {
                let r = self
                    .group_request(Body::CreateGroup(pb::CreateGroup { name, members }))
                    .await;
                let _ = reply.send(r);
            }
            Command::UpdateGroup { update, reply } => {
                let r = self.group_request(Body::UpdateGroup(update)).await;
                let _ = reply.send(r);
            }
            Command::GetGroup { group, reply } => {
                let r = self
                    .group_request(Body::GetGroup(pb::GetGroup { group }))
                    .await;
                let _ = reply.send(r);
            }
            Command::SetProfile {
                name,
                avatar_blob,
                reply,
            } => {
                let body = Body::SetProfile(pb::SetProfile { name, avatar_blob });
                let r = match self.conn() {
                    Ok(conn) => conn.request_ok(body).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Command::ResetIdentity { reply } => {
                let r = async {
                    self.store.reset_identity().await?;
                    self.store
                        .commit(vec![(META, "signed_at".into(), None)])
                        .await?;
                    self.maintain_keys(0, 0).await
                }
                .await;
                let _ = reply.send(r);
            }
            Command::SessionInfo { peer, reply } => {
                use libsignal_protocol::SessionStore;
                let r = self
                    .store
                    .sessions
                    .load_session(&addr(&peer))
                    .await
                    .map_err(crypto)
                    .and_then(|s| match s {
                        None => Ok(SessionInfo {
                            exists: false,
                            version: 0,
                            post_quantum: false,
                        }),
                        Some(rec) => Ok(SessionInfo {
                            exists: true,
                            version: rec.session_version().map_err(crypto)?,
                            post_quantum: rec
                                .has_usable_sender_chain(
                                    std::time::SystemTime::now(),
                                    libsignal_protocol::SessionUsabilityRequirements::all(),
                                )
                                .unwrap_or(false),
                        }),
                    });
                // No PQXDH session: perhaps a classic one (version 3, never post-quantum).
                let r = match r {
                    Ok(info) if !info.exists => {
                        self.classic_session(&peer).await.map(|c| SessionInfo {
                            exists: c.is_some(),
                            version: if c.is_some() { 3 } else { 0 },
                            post_quantum: false,
                        })
                    }
                    other => other,
                };
                let _ = reply.send(r);
            }
            Command::Stop => {}
        }
    }

    /// Envelopes handled: their inbox entries (and any buffered Signal state) are committed in
    /// one transaction, then the gateway is told.
    pub(super) async fn ack(&mut self, envelope_ids: &[u64]) {
        let clear: Vec<_> = envelope_ids
            .iter()
            .filter(|id| self.inbox.as_mut().is_none_or(|inbox| inbox.remove(id)))
            .map(|id| (INBOX, id.to_string(), None))
            .collect();
        if let Err(e) = self.store.commit(clear).await {
            // Not acked: they come again once the database is back (a message replayed from
            // the inbox is found in the message map and acked without a second effect).
            self.redeliver_later(&format!("cannot record acks: {e}"))
                .await;
            return;
        }
        for id in envelope_ids {
            self.recent.push_back(*id);
        }
        while self.recent.len() > 1024 {
            self.recent.pop_front();
        }
        self.send_acks(envelope_ids.to_vec());
    }

    /// Something an envelope needs from the database cannot be had now (a connection lost, a
    /// full disk). Acking later envelopes past it would break their order, and the gateway
    /// sends an unacked envelope again only after a new login (docs §7); so the buffered state
    /// is undone and the connection dropped: after a pause, the actor logs in again and gets
    /// this envelope and all later ones again, in order.
    pub(super) async fn redeliver_later(&mut self, reason: &str) {
        self.store.rollback();
        tracing::warn!(%reason, pause = ?self.store_backoff, "cannot process an envelope now; it and later ones will be delivered again");
        self.conn = None;
        self.published.send_replace(None);
        self.emit(Event::Disconnected {
            account: self.creds.account.clone(),
            reason: reason.to_owned(),
        })
        .await;
        tokio::time::sleep(self.store_backoff).await;
        self.store_backoff = (self.store_backoff * 2).min(MAX_STORE_BACKOFF);
    }

    /// Sends an `Ack` as a request, apart from the actor, until the gateway takes it (see
    /// [`ack_until_taken`]).
    pub(super) fn send_acks(&self, envelope_ids: Vec<u64>) {
        let Ok(conn) = self.conn().cloned() else {
            return;
        };
        let doing = self.doing.clone();
        tokio::spawn(async move {
            let n = envelope_ids.len();
            let closed = conn.clone();
            let taken = ack_until_taken(
                || {
                    let ack = Body::Ack(pb::Ack {
                        envelope_ids: envelope_ids.clone(),
                    });
                    let conn = conn.clone();
                    async move { conn.request(ack).await }
                },
                move || closed.is_closed(),
                n,
            )
            .await;
            Doing::count(&doing, |d| {
                if taken {
                    d.acked += n as u64;
                } else {
                    d.acks_given_up += n as u64;
                }
            });
        });
    }

    pub(super) async fn emit(&self, ev: Event) {
        let _ = self.events.send(Box::new(ev));
    }

    /// A push and whatever else has come behind it (up to [`MAX_RUN`]), in order: runs of
    /// envelopes go to [`Self::envelopes`] together.
    async fn pushes(&mut self, first: pb::Stanza) {
        let is_envelope = |st: &pb::Stanza| u64::from(matches!(st.body, Some(Body::Envelope(_))));
        let mut envelopes = is_envelope(&first);
        let mut pushes = vec![first];
        while pushes.len() < MAX_RUN
            && let Some(st) = self.conn.as_mut().and_then(|(_, p)| p.try_recv().ok())
        {
            envelopes += is_envelope(&st);
            pushes.push(*st);
        }
        Doing::count(&self.doing, |d| d.envelopes += envelopes);
        let mut run = Vec::new();
        for st in pushes {
            match st.body {
                Some(Body::Envelope(env)) => run.push(env),
                body => {
                    if !run.is_empty() {
                        self.envelopes(std::mem::take(&mut run)).await;
                    }
                    if self.conn.is_none() {
                        // Given up for now, or logged out: what is left comes again after a
                        // login.
                        return;
                    }
                    self.push(pb::Stanza { body, ..st }).await;
                }
            }
        }
        if !run.is_empty() && self.conn.is_some() {
            self.envelopes(run).await;
        }
    }

    pub(super) async fn push(&mut self, st: pb::Stanza) {
        match st.body {
            Some(Body::Envelope(env)) => self.envelope(env).await,
            Some(Body::Typing(t)) => {
                self.emit(Event::Typing {
                    from: t.from,
                    group: (!t.group.is_empty()).then_some(t.group),
                    typing: t.typing,
                })
                .await
            }
            Some(Body::Presence(p)) => {
                self.emit(Event::Presence {
                    account: p.account,
                    online: p.online,
                })
                .await
            }
            Some(Body::PrekeysLow(_))
                if self
                    .last_replenish
                    .is_some_and(|t| t.elapsed() < REPLENISH_COALESCE) =>
            {
                tracing::debug!("prekeys low again soon after a replenish; coalesced");
            }
            Some(Body::PrekeysLow(low)) => {
                match self
                    .maintain_keys(low.one_time_prekeys, low.kyber_prekeys)
                    .await
                {
                    Ok(()) => self.last_replenish = Some(std::time::Instant::now()),
                    Err(e) => tracing::warn!(error = %e, "cannot replenish prekeys"),
                }
            }
            Some(Body::Error(e)) => {
                tracing::warn!(code = e.code, message = %e.message, "gateway error push");
                if e.code == ErrorCode::Unauthorized as i32 {
                    self.conn = None;
                    self.published.send_replace(None);
                    self.emit(Event::LoggedOut {
                        account: self.creds.account.clone(),
                        reason: e.message,
                    })
                    .await;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get_group() -> (Queued, oneshot::Receiver<Result<pb::Group, InteropError>>) {
        let (reply, rx) = oneshot::channel();
        let command = Command::GetGroup {
            group: "g1".into(),
            reply,
        };
        (*Queued::new(command), rx)
    }

    /// A command whose caller gave up (its timeout passed while it waited behind others) is
    /// not run late: it would only lengthen the queue of an overloaded account, and its caller
    /// has already been told it failed. One still awaited is run however long it waited.
    #[tokio::test(start_paused = true)]
    async fn commands_whose_callers_gave_up_are_not_run() {
        let (waited_long, rx) = get_group();
        tokio::time::advance(COMMAND_TIMEOUT / 2).await;
        assert!(admit(waited_long).is_some(), "its caller still waits");
        drop(rx);

        let (abandoned, rx) = get_group();
        drop(rx);
        assert!(admit(abandoned).is_none());

        let (reply, rx) = oneshot::channel();
        let stop_and_send = [
            Command::Stop,
            Command::Send {
                to: Target::Account("+15550002000".into()),
                message_id: "m".into(),
                data: DataMessage::default(),
                reply,
            },
        ];
        drop(rx);
        let admitted: Vec<bool> = stop_and_send
            .into_iter()
            .map(|c| admit(*Queued::new(c)).is_some())
            .collect();
        assert_eq!(admitted, [true, false], "a stop has no caller to lose");
    }

    /// The step under way is what a timed-out caller logs: its name and how long it has run
    /// while it lasts, then that the actor waits for work.
    #[tokio::test(start_paused = true)]
    async fn the_step_under_way_is_recorded_until_it_ends() {
        let doing = SharedDoing::default();
        assert_eq!(Doing::describe(&doing), "waiting for work (0 steps done)");
        let (done, wait) = oneshot::channel::<()>();
        let step = tokio::spawn({
            let doing = doing.clone();
            async move { watched(&doing, "send", wait).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            Doing::describe(&doing),
            "on step send for 2.0 s (0 steps done)"
        );
        done.send(()).expect("the step waits");
        step.await.expect("task").expect("ended");
        assert_eq!(Doing::describe(&doing), "waiting for work (1 steps done)");
        // A step dropped midway (the actor's task ended) is not left under way.
        let (_keep, never) = oneshot::channel::<()>();
        let dropped = tokio::spawn({
            let doing = doing.clone();
            async move { watched(&doing, "push", never).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        dropped.abort();
        let _ = dropped.await;
        assert_eq!(Doing::describe(&doing), "waiting for work (2 steps done)");
    }

    #[test]
    fn retries_are_spread_around_the_backoff() {
        let d = Duration::from_millis(1000);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(d)).collect();
        assert!(waits.iter().all(|w| *w >= d / 2 && *w <= d.mul_f64(1.5)));
        let (min, max) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(*max - *min > d / 2, "not spread: {min:?}..{max:?}");
    }
}

/// The first pause before an ack whose answer did not come is sent again (doubling up to
/// [`MAX_ACK_RETRY`]).
const FIRST_ACK_RETRY: Duration = Duration::from_millis(250);
const MAX_ACK_RETRY: Duration = Duration::from_secs(30);

/// Sends an ack (`request`) until the gateway takes it. With a delivery window, an envelope
/// that is never acked keeps its place in the window until the next login, and 128 of them
/// stall the login, so an ack is not given up while its connection lives:
/// - rate-limited: sent again when the gateway says;
/// - no answer in time, or an answer that is not one: sent again after a pause (an ack is
///   idempotent);
/// - the connection gone (`closed`): given up; the envelopes come again at the next login and
///   are acked from the actor's `recent` list;
/// - refused otherwise: given up with a warning, since asking again would be refused again.
pub(super) async fn ack_until_taken<F, Fut>(
    mut request: F,
    closed: impl Fn() -> bool,
    envelopes: usize,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Body, InteropError>>,
{
    let mut backoff = FIRST_ACK_RETRY;
    loop {
        let wait = match request().await {
            Ok(_) => return true,
            Err(InteropError::Gateway {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                ..
            }) => Duration::from_millis(retry_after_ms.clamp(10, 10_000)),
            Err(e @ InteropError::Disconnected) => {
                tracing::debug!(error = %e, "ack not delivered; the envelopes come again");
                return false;
            }
            Err(e @ (InteropError::Timeout | InteropError::Unexpected)) => {
                tracing::warn!(error = %e, envelopes, pause = ?backoff, "an ack got no answer; sending it again");
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_ACK_RETRY);
                wait
            }
            Err(e) => {
                tracing::warn!(error = %e, envelopes, "ack refused; the envelopes come again at the next login");
                return false;
            }
        };
        if closed() {
            return false;
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod ack_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// The gateway's answers to an ack, as the test gives them.
    #[derive(Clone, Copy)]
    enum A {
        Taken,
        NoAnswer,
        Limited,
        Gone,
        Refused,
    }

    fn answer(a: A) -> Result<Body, InteropError> {
        let refusal = |code, retry_after_ms| InteropError::Gateway {
            code,
            message: "no".into(),
            retry_after_ms,
        };
        match a {
            A::Taken => Ok(Body::Ok(pb::Ok {})),
            A::NoAnswer => Err(InteropError::Timeout),
            A::Limited => Err(refusal(ErrorCode::RateLimited, 50)),
            A::Gone => Err(InteropError::Disconnected),
            A::Refused => Err(refusal(ErrorCode::BadRequest, 0)),
        }
    }

    /// Runs `ack_until_taken` against `answers` given in turn (the last one repeats), with the
    /// connection closing after `closed_after` sends; returns how many times the ack was sent.
    async fn sends(answers: Vec<A>, closed_after: usize) -> usize {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let request = move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            let a = answers[n.min(answers.len() - 1)];
            async move { answer(a) }
        };
        let seen = calls.clone();
        ack_until_taken(
            request,
            move || seen.load(Ordering::SeqCst) >= closed_after,
            1,
        )
        .await;
        calls.load(Ordering::SeqCst)
    }

    /// An ack whose answer did not come in time is sent again while the connection lives (it
    /// was given up on at the first timeout, which left its envelopes holding places in the
    /// delivery window until the next login); a connection gone or a refusal ends it.
    #[tokio::test(start_paused = true)]
    async fn an_ack_is_sent_until_the_gateway_takes_it() {
        use A::*;
        assert_eq!(sends(vec![NoAnswer, NoAnswer, Taken], usize::MAX).await, 3);
        let mut limited = vec![Limited; 12];
        limited.push(Taken);
        assert_eq!(
            sends(limited, usize::MAX).await,
            13,
            "rate limits are waited out"
        );
        assert_eq!(sends(vec![Gone], usize::MAX).await, 1);
        assert_eq!(
            sends(vec![NoAnswer], 2).await,
            2,
            "a closed connection ends it"
        );
        assert_eq!(sends(vec![Refused], usize::MAX).await, 1);
    }
}
