//! The contacts (interop accounts of our own client, in this process) and the world of
//! users, contacts and portals a run sends through.

use super::*;

/// A contact: an interop account of our own client, registered as the tests register theirs.
pub(crate) struct Contact {
    pub(crate) account: String,
    /// Its running account (a new one after [`Contact::come_back`]).
    handle: std::sync::RwLock<AccountHandle>,
    /// Its store and vault (kept open while the contact lives).
    ours: tokio::sync::Mutex<common::interop::Ours>,
    reg: Arc<Registry>,
    undecryptable: Arc<AtomicUsize>,
}

/// Registers `account` at the gateway, starts its client, and feeds its messages to `reg`.
pub(crate) async fn start_contact(
    rt: &SignalRuntime,
    gw: &GatewayAddr,
    account: String,
    reg: Arc<Registry>,
    undecryptable: Arc<AtomicUsize>,
) -> Contact {
    let mut ours = common::interop::register_ours(rt, gw, &account).await;
    feed(&mut ours, reg.clone(), undecryptable.clone());
    Contact {
        account,
        handle: std::sync::RwLock::new(ours.handle.clone()),
        ours: tokio::sync::Mutex::new(ours),
        reg,
        undecryptable,
    }
}

/// Hands the events of the account running in `ours` to `reg`, and acks them.
fn feed(ours: &mut common::interop::Ours, reg: Arc<Registry>, undecryptable: Arc<AtomicUsize>) {
    let handle = ours.handle.clone();
    let (_, mut events) = mpsc::unbounded_channel();
    std::mem::swap(&mut events, &mut ours.events);
    // Acks go through their own task, so receiving never waits on the account's command queue
    // (the account waits on this channel while it hands out events).
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<u64>();
    tokio::spawn(async move {
        while let Some(id) = ack_rx.recv().await {
            handle.ack(id).await;
        }
    });
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            if let Some(id) = ev.envelope_id() {
                let _ = ack_tx.send(id);
            }
            if let Some(body) = common::interop::body_of(&ev) {
                reg.arrived(&body);
            } else if matches!(*ev, Event::Undecryptable { .. }) {
                undecryptable.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
}

impl Contact {
    /// The contact's running account.
    pub(crate) fn handle(&self) -> AccountHandle {
        self.handle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the contact's client: the gateway keeps what is sent to it meanwhile.
    pub(crate) async fn go_offline(&self) {
        self.handle().stop().await;
    }

    /// Starts the contact's client again from its store (after [`Contact::go_offline`]).
    pub(crate) async fn come_back(&self, rt: &SignalRuntime, gw: &GatewayAddr) {
        let mut ours = self.ours.lock().await;
        ours.respawn(rt, gw).await;
        *self.handle.write().unwrap_or_else(|p| p.into_inner()) = ours.handle.clone();
        feed(&mut ours, self.reg.clone(), self.undecryptable.clone());
    }
}

pub(crate) struct World {
    pub(crate) reg: Arc<Registry>,
    pub(crate) http: reqwest::Client,
    pub(crate) bridge_base: String,
    /// Where user i's provisioning requests go: the worker that runs its login (with several
    /// workers, i mod N; the provisioning API answers on the worker running the login).
    pub(crate) provisioning_bases: Vec<String>,
    /// Matrix user ids and their interop accounts (index = user).
    pub(crate) users: Vec<String>,
    pub(crate) user_accounts: Vec<String>,
    /// DM portals each user has (`--chats-per-user`); chat c is user `c % M`'s with contact
    /// `c % N`.
    pub(crate) chats_per_user: usize,
    /// The portal rooms (index = chat).
    pub(crate) rooms: Vec<String>,
    pub(crate) contacts: Vec<Contact>,
    pub(crate) txn_counter: AtomicU64,
    /// With `--synapse`: each user's client session (index = user); empty with the stand-in.
    pub(crate) clients: Vec<common::MatrixUser>,
    /// Sync loops that finished their first (initial) sync.
    pub(crate) synced: AtomicUsize,
    /// Sync responses whose timeline was cut short (messages would be missing).
    pub(crate) sync_limited: AtomicUsize,
    /// With `--synapse`: each user's room's ghost (index = user), for the baseline.
    pub(crate) ghosts: Vec<String>,
    /// The token the homeserver knows the appservice by (the registration's).
    pub(crate) as_token: String,
}

impl World {
    /// How many DM portals there are in all.
    pub(crate) fn chats(&self) -> usize {
        self.users.len() * self.chats_per_user
    }

    /// The chat message `seq` goes through.
    pub(crate) fn chat(&self, seq: usize) -> usize {
        seq % self.chats()
    }

    pub(crate) fn user_of_chat(&self, chat: usize) -> usize {
        chat % self.users.len()
    }

    pub(crate) fn contact_of_chat(&self, chat: usize) -> usize {
        chat % self.contacts.len()
    }

    pub(crate) async fn provision(&self, path: &str, user: &str, body: Value) -> Value {
        let i = self.users.iter().position(|u| u == user).unwrap_or(0);
        let url = format!(
            "{}/_matrix/provision/v1/{path}?user_id={}",
            self.provisioning_bases[i % self.provisioning_bases.len()],
            common::urlencode(user)
        );
        let resp = self
            .http
            .post(url)
            .bearer_auth(PROV_SECRET)
            .json(&body)
            .send()
            .await
            .expect("provisioning request");
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(
            status.is_success(),
            "provisioning {path} for {user}: {status} {v}"
        );
        v
    }

    pub(crate) fn event(&self, run: usize, seq: usize) -> Value {
        let chat = self.chat(seq);
        let u = self.user_of_chat(chat);
        json!({
            "type": "m.room.message",
            "room_id": self.rooms[chat],
            "sender": self.users[u],
            "event_id": format!("$bench-{run}-{seq}"),
            "origin_server_ts": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "content": {"msgtype": "m.text", "body": Registry::body(run, seq)},
        })
    }

    /// Pushes one appservice transaction with the given messages; marks them sent first.
    pub(crate) async fn push(self: Arc<Self>, track: Arc<Track>, run: usize, seqs: Vec<usize>) {
        let events: Vec<Value> = seqs.iter().map(|&s| self.event(run, s)).collect();
        let txn = self.txn_counter.fetch_add(1, Ordering::Relaxed);
        let url = format!(
            "{}/_matrix/app/v1/transactions/bench-{txn}",
            self.bridge_base
        );
        for &s in &seqs {
            self.reg.mark_sent(&track, s);
        }
        let resp = self
            .http
            .put(url)
            .bearer_auth(HS_TOKEN)
            .json(&json!({"events": events}))
            .send()
            .await
            .expect("push transaction");
        assert!(
            resp.status().is_success(),
            "transaction refused: {}",
            resp.status()
        );
    }

    /// With `--synapse`: user `seq % M` sends message `seq` through the client-server API.
    pub(crate) async fn client_send(self: Arc<Self>, track: Arc<Track>, run: usize, seq: usize) {
        let u = seq % self.users.len();
        let c = &self.clients[u];
        let txn = self.txn_counter.fetch_add(1, Ordering::Relaxed);
        let path = format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/bench-{txn}",
            common::urlencode(&self.rooms[u])
        );
        self.reg.mark_sent(&track, seq);
        let body = json!({"msgtype": "m.text", "body": Registry::body(run, seq)});
        let (status, v) = c.call(reqwest::Method::PUT, &path, Some(body)).await;
        assert_eq!(status, 200, "{} cannot send: {v}", c.user_id);
    }

    /// The baseline (`--synapse`): the ghost of user `seq % M`'s room sends message `seq` with
    /// the appservice token, as a bridge would but with nothing behind it.
    pub(crate) async fn ghost_send(self: Arc<Self>, track: Arc<Track>, run: usize, seq: usize) {
        let u = seq % self.users.len();
        let c = &self.clients[u];
        let txn = self.txn_counter.fetch_add(1, Ordering::Relaxed);
        let url = format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/bare-{txn}?user_id={}",
            c.base,
            common::urlencode(&self.rooms[u]),
            common::urlencode(&self.ghosts[u])
        );
        self.reg.mark_sent(&track, seq);
        let body = json!({"msgtype": "m.text", "body": Registry::body(run, seq)});
        let resp = self
            .http
            .put(url)
            .bearer_auth(&self.as_token)
            .json(&body)
            .send()
            .await
            .expect("ghost send");
        assert!(
            resp.status().is_success(),
            "{} cannot send: {}",
            self.ghosts[u],
            resp.status()
        );
    }

    /// Sends Matrix→interop message `seq`: a transaction to the bridge (stand-in), or a client
    /// send through Synapse.
    pub(crate) async fn matrix_send(
        self: Arc<Self>,
        track: Arc<Track>,
        run: usize,
        seqs: Vec<usize>,
    ) {
        if self.clients.is_empty() {
            self.push(track, run, seqs).await;
        } else {
            for seq in seqs {
                self.clone().client_send(track.clone(), run, seq).await;
            }
        }
    }

    /// One interop message from the contact of `seq`'s user to that user.
    /// Who sends `seq` in an interop-side run (a contact index), and to which account: the
    /// contact of the seq's user, to that user; in the reference run, a contact to its partner.
    pub(crate) fn interop_send(&self, dir: Dir, seq: usize) -> (usize, String) {
        if dir == Dir::Reference {
            let n = self.contacts.len();
            let c = seq % n;
            let partner = if c ^ 1 < n { c ^ 1 } else { c - 1 };
            (c, self.contacts[partner].account.clone())
        } else {
            let chat = self.chat(seq);
            (
                self.contact_of_chat(chat),
                self.user_accounts[self.user_of_chat(chat)].clone(),
            )
        }
    }

    /// One interop message from a contact (see [`World::interop_send`]).
    pub(crate) async fn contact_send(
        self: Arc<Self>,
        track: Arc<Track>,
        dir: Dir,
        run: usize,
        seq: usize,
    ) {
        let (sender, to) = self.interop_send(dir, seq);
        let c = &self.contacts[sender];
        self.reg.mark_sent(&track, seq);
        // As a client would: a transient failure (an overloaded account's queue outlasting its
        // timeout) is sent again with the same id, which the gateway takes once. The latency
        // counts from the first try.
        let id = uuid::Uuid::new_v4().to_string();
        let mut tries = 0;
        loop {
            tries += 1;
            match c
                .handle()
                .send(
                    Target::Account(to.clone()),
                    id.clone(),
                    common::interop::text(&Registry::body(run, seq)),
                )
                .await
            {
                Ok(_) => break,
                Err(e) if e.is_transient() && tries < 3 => {
                    tracing::warn!(contact = %c.account, error = %e, "a contact's send failed; sending it again");
                    track.resends.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => panic!("contact {} cannot send: {e}", c.account),
            }
        }
    }
}

/// With `--synapse`: user `u`'s sync loop; every bench message from someone else in its rooms
/// is an arrival. The initial sync only sets the starting point.
pub(crate) async fn sync_loop(world: Arc<World>, u: usize) {
    let c = &world.clients[u];
    let filter = json!({
        "room": {
            "timeline": {"limit": 1000, "types": ["m.room.message"]},
            "state": {"types": []},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
        "presence": {"types": []},
        "account_data": {"types": []},
    });
    let filter = common::urlencode(&filter.to_string());
    let mut since = String::new();
    loop {
        let path = if since.is_empty() {
            format!("/_matrix/client/v3/sync?timeout=0&filter={filter}")
        } else {
            format!("/_matrix/client/v3/sync?timeout=30000&filter={filter}&since={since}")
        };
        // Not `MatrixUser::call`: a sync that fails (Synapse going down at the end) is retried.
        let resp = c
            .http
            .get(format!("{}{path}", c.base))
            .bearer_auth(&c.token)
            .send()
            .await;
        let b: Value = match resp {
            Ok(r) if r.status().is_success() => r.json().await.unwrap_or(Value::Null),
            _ => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if since.is_empty() {
            world.synced.fetch_add(1, Ordering::Relaxed);
        } else if let Some(rooms) = b["rooms"]["join"].as_object() {
            for r in rooms.values() {
                if r["timeline"]["limited"] == true {
                    world.sync_limited.fetch_add(1, Ordering::Relaxed);
                }
                for e in r["timeline"]["events"].as_array().into_iter().flatten() {
                    if e["sender"] != c.user_id.as_str()
                        && let Some(body) = e["content"]["body"].as_str()
                    {
                        world.reg.arrived(body);
                    }
                }
            }
        }
        since = b["next_batch"].as_str().unwrap_or_default().to_owned();
    }
}

/// Waits until every message of `track` arrived; panics when nothing arrives for `STALL`, after
/// printing what the gateway's connections and the contacts wait for ([`stall_report`]).
/// `sending`: the task still sending the run's messages, whose panic is passed on.
pub(crate) async fn wait_done(
    world: &World,
    track: &Track,
    mut bridge: Option<&mut BridgeProc>,
    mut sending: Option<&mut tokio::task::JoinHandle<()>>,
) {
    let mut last = usize::MAX;
    let mut since = Instant::now();
    loop {
        if let Some(task) = sending.take_if(|t| t.is_finished())
            && let Err(e) = task.await
        {
            std::panic::resume_unwind(e.into_panic());
        }
        let got = track.received.load(Ordering::Relaxed);
        if got >= track.len() && sending.is_none() {
            return;
        }
        if got != last {
            last = got;
            since = Instant::now();
        }
        assert!(
            bridge.as_mut().is_none_or(|b| b.is_running()),
            "the bridge exited during {}",
            track.name
        );
        if since.elapsed() >= STALL {
            stall_report(world).await;
            panic!(
                "{}: {got} of {} messages arrived{}, then nothing for {} s",
                track.name,
                track.len(),
                if sending.is_some() {
                    " while sending"
                } else {
                    ""
                },
                STALL.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Prints what waits where when a run stalled: the gateway's connections that have envelopes
/// in flight or stanzas queued, or whose delivery waits for anything but a new envelope; every
/// contact's actor and connection; and the gateway's TCP connections with bytes queued.
pub(crate) async fn stall_report(world: &World) {
    let (gateway, port) = match &*GATEWAY.lock().unwrap_or_else(|p| p.into_inner()) {
        Some(w) => (w.in_process.clone(), Some(w.port)),
        None => (None, None),
    };
    eprintln!("--- stall report ---");
    if let Some(gateway) = gateway {
        for c in gateway.connections().await {
            if c.in_flight > 0 || c.out_queued > 0 || !c.delivery.contains("new envelope") {
                eprintln!("gateway connection {c}");
            }
        }
    }
    if let Some(port) = port {
        let ss = std::process::Command::new("ss")
            .args(["-tnH", "state", "established"])
            .output();
        match ss {
            Ok(out) => {
                let port = format!(":{port}");
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    let queued = cols.len() >= 4 && (cols[0] != "0" || cols[1] != "0");
                    if queued && (cols[2].ends_with(&port) || cols[3].ends_with(&port)) {
                        eprintln!("socket (recv-q send-q local peer) {line}");
                    }
                }
            }
            Err(e) => eprintln!("cannot run ss: {e}"),
        }
    }
    for c in &world.contacts {
        eprintln!("contact {}: {}", c.account, c.handle().describe());
    }
    // `MIB_BENCH_STALL_STACKS=F`: every thread's stack into the file F too (needs gdb; into a
    // file, since a pipe that this process, stopped by gdb, cannot read would block it).
    if let Some(path) = std::env::var_os("MIB_BENCH_STALL_STACKS") {
        let pid = std::process::id().to_string();
        let run = std::fs::File::create(&path).and_then(|f| {
            std::process::Command::new("gdb")
                .args(["-p", &pid, "-batch", "-ex", "thread apply all bt"])
                .stdout(f)
                .stderr(std::process::Stdio::null())
                .status()
        });
        match run {
            Ok(_) => eprintln!("stacks in {}", std::path::Path::new(&path).display()),
            Err(e) => eprintln!("cannot run gdb: {e}"),
        }
    }
    eprintln!("--- end of stall report ---");
}
