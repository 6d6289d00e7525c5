//! The core's stores in memory, for tests of the core's logic that need no database: the same
//! answers as the SQL store and the vault-sealed requests (`store::portal`'s and
//! `vault::requests`' own tests pin those down on both databases), without SQL or encryption.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, MutexGuard},
};

use async_trait::async_trait;

use super::{
    BridgeError,
    requests::{HeldMessage, MessageRequest, RequestStore},
    store::{KvStore, Lease, LeaseStore, PortalStore, StoreError, UserStore},
    types::{DmContact, GhostProfile, MappedMessage, Portal, PortalKind},
};

#[derive(Default)]
struct Data {
    logins: BTreeMap<String, String>,
    /// In the order they were created, as the SQL store lists them.
    portals: Vec<Portal>,
    ghosts: HashMap<String, GhostProfile>,
    map: Vec<MappedMessage>,
    management_rooms: HashMap<String, String>,
    spaces: HashMap<String, String>,
    requests: BTreeMap<(String, String), MessageRequest>,
    held: BTreeMap<(String, String, u32), HeldMessage>,
    leases: BTreeMap<String, Lease>,
    pending: HashMap<String, String>,
    kv: HashMap<String, String>,
    timers: HashMap<String, u32>,
    /// (room, event) → when it disappears.
    disappearing: BTreeMap<(String, String), i64>,
    /// (room, sender, message id) → the login that claimed it, and when.
    claims: HashMap<(String, String, String), (String, i64)>,
    /// Tests: the next `disappear_at` fails as a database that went away would.
    fail_next_schedule: bool,
}

/// Logins, portals, ghosts, the message map, management rooms and message requests in memory.
#[derive(Default)]
pub struct MemoryStore(Mutex<Data>);

impl MemoryStore {
    fn data(&self) -> MutexGuard<'_, Data> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next scheduling of a disappearing message fail as if the database had gone
    /// away (for tests of what a failure between two writes leaves behind).
    pub fn fail_next_schedule(&self) {
        self.data().fail_next_schedule = true;
    }
}

#[async_trait]
impl PortalStore for MemoryStore {
    async fn set_login(&self, mxid: &str, account: &str) -> Result<(), StoreError> {
        self.data().logins.insert(mxid.into(), account.into());
        Ok(())
    }

    async fn login(&self, mxid: &str) -> Result<Option<String>, StoreError> {
        Ok(self.data().logins.get(mxid).cloned())
    }

    async fn delete_login(&self, mxid: &str) -> Result<(), StoreError> {
        self.data().logins.remove(mxid);
        Ok(())
    }

    async fn all_logins(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self
            .data()
            .logins
            .iter()
            .map(|(m, a)| (m.clone(), a.clone()))
            .collect())
    }

    async fn portal(&self, receiver: &str, chat_id: &str) -> Result<Option<Portal>, StoreError> {
        Ok(self
            .data()
            .portals
            .iter()
            .find(|p| p.receiver == receiver && p.chat_id == chat_id)
            .cloned())
    }

    async fn portals_in_room(&self, room_id: &str) -> Result<Vec<Portal>, StoreError> {
        Ok(self
            .data()
            .portals
            .iter()
            .filter(|p| p.room_id.as_ref().is_some_and(|r| r == room_id))
            .cloned()
            .collect())
    }

    async fn group_portal(&self, chat_id: &str) -> Result<Option<Portal>, StoreError> {
        Ok(self
            .data()
            .portals
            .iter()
            .find(|p| p.chat_id == chat_id && p.kind == PortalKind::Group && p.room_id.is_some())
            .cloned())
    }

    async fn claim_message(
        &self,
        room_id: &str,
        sender: &str,
        message_id: &str,
        owner: &str,
        now_ms: i64,
        stale_before_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut d = self.data();
        let key = (room_id.to_owned(), sender.to_owned(), message_id.to_owned());
        match d.claims.get(&key) {
            Some((held_by, at)) if held_by != owner && *at >= stale_before_ms => Ok(false),
            _ => {
                d.claims.insert(key, (owner.to_owned(), now_ms));
                Ok(true)
            }
        }
    }

    async fn prune_claims(&self, before_ms: i64) -> Result<(), StoreError> {
        self.data().claims.retain(|_, (_, at)| *at >= before_ms);
        Ok(())
    }

    async fn save_portal(&self, p: &Portal) -> Result<(), StoreError> {
        let mut data = self.data();
        // Only the portals of one group share a room.
        let taken = p.room_id.is_some()
            && data.portals.iter().any(|q| {
                q.room_id == p.room_id
                    && (q.chat_id != p.chat_id
                        || (q.receiver != p.receiver && p.kind == PortalKind::Dm))
            });
        if taken {
            return Err(StoreError::failed("the room belongs to another portal"));
        }
        match data
            .portals
            .iter_mut()
            .find(|q| q.receiver == p.receiver && q.chat_id == p.chat_id)
        {
            Some(q) => *q = p.clone(),
            None => data.portals.push(p.clone()),
        }
        Ok(())
    }

    async fn update_portal_look(&self, p: &Portal) -> Result<(), StoreError> {
        let mut data = self.data();
        for q in data
            .portals
            .iter_mut()
            .filter(|q| q.chat_id == p.chat_id && q.room_id == p.room_id)
        {
            q.name.clone_from(&p.name);
            q.avatar_blob.clone_from(&p.avatar_blob);
            q.avatar_mxc.clone_from(&p.avatar_mxc);
        }
        Ok(())
    }

    async fn delete_portal(&self, receiver: &str, chat_id: &str) -> Result<(), StoreError> {
        let mut data = self.data();
        let room = data
            .portals
            .iter()
            .find(|p| p.receiver == receiver && p.chat_id == chat_id)
            .and_then(|p| p.room_id.as_ref().map(|r| r.to_string()));
        let shared = |data: &Data, room: &str| {
            data.portals.iter().any(|p| {
                p.room_id.as_ref().is_some_and(|r| r == room)
                    && !(p.receiver == receiver && p.chat_id == chat_id)
            })
        };
        if let Some(room) = room
            && !shared(&data, &room)
        {
            data.map.retain(|m| m.room_id != room);
        }
        data.portals
            .retain(|p| !(p.receiver == receiver && p.chat_id == chat_id));
        Ok(())
    }

    async fn portals_of(&self, receiver: &str) -> Result<Vec<Portal>, StoreError> {
        Ok(self
            .data()
            .portals
            .iter()
            .filter(|p| p.receiver == receiver)
            .cloned()
            .collect())
    }

    async fn dm_contacts(&self, receiver: &str) -> Result<Vec<DmContact>, StoreError> {
        let d = self.data();
        Ok(d.portals
            .iter()
            .filter(|p| p.receiver == receiver && p.kind == PortalKind::Dm)
            .map(|p| DmContact {
                account: p.chat_id.clone(),
                room_id: p.room_id.as_ref().map(|r| r.to_string()),
                displayname: d
                    .ghosts
                    .get(&p.chat_id)
                    .map(|g| g.displayname.clone())
                    .unwrap_or_default(),
            })
            .collect())
    }

    async fn ghost_profile(&self, account: &str) -> Result<Option<GhostProfile>, StoreError> {
        Ok(self.data().ghosts.get(account).cloned())
    }

    async fn ghosts_named(&self, name: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        let name = name.to_ascii_lowercase();
        let mut found: Vec<String> = self
            .data()
            .ghosts
            .iter()
            .filter(|(_, g)| g.displayname.to_ascii_lowercase().contains(&name))
            .map(|(a, _)| a.clone())
            .collect();
        found.sort();
        found.truncate(limit as usize);
        Ok(found)
    }

    async fn save_ghost(
        &self,
        account: &str,
        _mxid: &str,
        profile: &GhostProfile,
    ) -> Result<(), StoreError> {
        self.data().ghosts.insert(account.into(), profile.clone());
        Ok(())
    }

    async fn map_message(&self, m: &MappedMessage) -> Result<(), StoreError> {
        let mut data = self.data();
        // Both of the SQL store's keys; a second row for either is ignored.
        let known = data.map.iter().any(|o| {
            o.room_id == m.room_id
                && (o.event_id == m.event_id
                    || (o.message_id == m.message_id && o.sender == m.sender && o.part == m.part))
        });
        if !known {
            data.map.push(m.clone());
        }
        Ok(())
    }

    async fn by_message(
        &self,
        room_id: &str,
        message_id: &str,
        part: &str,
    ) -> Result<Option<MappedMessage>, StoreError> {
        Ok(self
            .data()
            .map
            .iter()
            .find(|m| m.room_id == room_id && m.message_id == message_id && m.part == part)
            .cloned())
    }

    async fn by_event(
        &self,
        room_id: &str,
        event_id: &str,
    ) -> Result<Option<MappedMessage>, StoreError> {
        Ok(self
            .data()
            .map
            .iter()
            .find(|m| m.room_id == room_id && m.event_id == event_id)
            .cloned())
    }

    async fn unmap_event(&self, room_id: &str, event_id: &str) -> Result<(), StoreError> {
        self.data()
            .map
            .retain(|m| !(m.room_id == room_id && m.event_id == event_id));
        Ok(())
    }

    async fn disappear_timer(&self, room_id: &str) -> Result<u32, StoreError> {
        Ok(self.data().timers.get(room_id).copied().unwrap_or(0))
    }

    async fn set_disappear_timer(&self, room_id: &str, seconds: u32) -> Result<(), StoreError> {
        self.data().timers.insert(room_id.to_owned(), seconds);
        Ok(())
    }

    async fn disappear_at(
        &self,
        room_id: &str,
        event_id: &str,
        due_ms: i64,
    ) -> Result<(), StoreError> {
        let mut d = self.data();
        if std::mem::take(&mut d.fail_next_schedule) {
            return Err(StoreError::unavailable("the database went away"));
        }
        d.disappearing
            .entry((room_id.to_owned(), event_id.to_owned()))
            .or_insert(due_ms);
        Ok(())
    }

    async fn due_to_disappear(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let d = self.data();
        let mut due: Vec<(i64, (String, String))> = d
            .disappearing
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(k, at)| (*at, k.clone()))
            .collect();
        due.sort();
        Ok(due
            .into_iter()
            .take(limit as usize)
            .map(|(_, k)| k)
            .collect())
    }

    async fn disappeared(&self, room_id: &str, event_id: &str) -> Result<(), StoreError> {
        self.data()
            .disappearing
            .remove(&(room_id.to_owned(), event_id.to_owned()));
        Ok(())
    }
}

#[async_trait]
impl UserStore for MemoryStore {
    async fn management_room(&self, mxid: &str) -> Result<Option<String>, StoreError> {
        Ok(self.data().management_rooms.get(mxid).cloned())
    }

    async fn set_management_room(&self, mxid: &str, room_id: &str) -> Result<(), StoreError> {
        self.data()
            .management_rooms
            .insert(mxid.into(), room_id.into());
        Ok(())
    }

    async fn space_room(&self, mxid: &str) -> Result<Option<String>, StoreError> {
        Ok(self.data().spaces.get(mxid).cloned())
    }

    async fn set_space_room(&self, mxid: &str, room_id: Option<&str>) -> Result<(), StoreError> {
        let mut data = self.data();
        match room_id {
            Some(r) => data.spaces.insert(mxid.to_owned(), r.to_owned()),
            None => data.spaces.remove(mxid),
        };
        Ok(())
    }

    async fn management_room_owner(&self, room_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .data()
            .management_rooms
            .iter()
            .find(|(_, r)| *r == room_id)
            .map(|(m, _)| m.clone()))
    }

    async fn pending_command(&self, mxid: &str) -> Result<Option<String>, StoreError> {
        Ok(self.data().pending.get(mxid).cloned())
    }

    async fn set_pending_command(
        &self,
        mxid: &str,
        command: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut d = self.data();
        match command {
            Some(c) => d.pending.insert(mxid.into(), c.into()),
            None => d.pending.remove(mxid),
        };
        Ok(())
    }
}

#[async_trait]
impl RequestStore for MemoryStore {
    async fn request(
        &self,
        receiver: &str,
        chat_id: &str,
    ) -> Result<Option<MessageRequest>, BridgeError> {
        let key = (receiver.to_owned(), chat_id.to_owned());
        Ok(self.data().requests.get(&key).cloned())
    }

    async fn save_request(&self, receiver: &str, r: &MessageRequest) -> Result<(), BridgeError> {
        let key = (receiver.to_owned(), r.chat_id.clone());
        self.data().requests.insert(key, r.clone());
        Ok(())
    }

    async fn requests(&self, receiver: &str) -> Result<Vec<MessageRequest>, BridgeError> {
        Ok(self
            .data()
            .requests
            .iter()
            .filter(|((r, _), _)| r == receiver)
            .map(|(_, req)| req.clone())
            .collect())
    }

    async fn hold(
        &self,
        receiver: &str,
        chat_id: &str,
        seq: u32,
        m: &HeldMessage,
    ) -> Result<(), BridgeError> {
        let key = (receiver.to_owned(), chat_id.to_owned(), seq);
        self.data().held.insert(key, m.clone());
        Ok(())
    }

    async fn held(&self, receiver: &str, chat_id: &str) -> Result<Vec<HeldMessage>, BridgeError> {
        Ok(self
            .data()
            .held
            .iter()
            .filter(|((r, c, _), _)| r == receiver && c == chat_id)
            .map(|(_, m)| m.clone())
            .collect())
    }

    async fn forget(
        &self,
        receiver: &str,
        chat_id: &str,
        keep_request: bool,
    ) -> Result<(), BridgeError> {
        let mut data = self.data();
        data.held
            .retain(|(r, c, _), _| !(r == receiver && c == chat_id));
        if !keep_request {
            data.requests
                .remove(&(receiver.to_owned(), chat_id.to_owned()));
        }
        Ok(())
    }
}

#[async_trait]
impl KvStore for MemoryStore {
    async fn kv_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.data().kv.get(key).cloned())
    }
    async fn kv_set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.data().kv.insert(key.to_owned(), value.to_owned());
        Ok(())
    }
}

#[async_trait]
impl LeaseStore for MemoryStore {
    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        until: i64,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let mut d = self.data();
        let lease = d.leases.entry(name.to_owned()).or_insert_with(|| Lease {
            holder: holder.to_owned(),
            expires_at: 0,
            generation: 0,
        });
        if lease.holder != holder && lease.expires_at > now {
            return Ok(None);
        }
        if lease.holder != holder {
            lease.generation += 1;
            lease.holder = holder.to_owned();
        }
        lease.expires_at = until;
        Ok(Some(lease.generation))
    }

    async fn renew_leases(
        &self,
        holder: &str,
        until: i64,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut d = self.data();
        let mut kept = Vec::new();
        for (name, l) in d.leases.iter_mut() {
            if l.holder == holder && l.expires_at > now {
                l.expires_at = until;
                kept.push(name.clone());
            }
        }
        Ok(kept)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        if let Some(l) = self.data().leases.get_mut(name)
            && l.holder == holder
        {
            l.expires_at = 0;
        }
        Ok(())
    }

    async fn lease(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        Ok(self.data().leases.get(name).cloned())
    }

    async fn live_lease_count(&self, prefix: &str, now: i64) -> Result<usize, StoreError> {
        Ok(self
            .data()
            .leases
            .iter()
            .filter(|(n, l)| n.starts_with(prefix) && l.expires_at > now)
            .count())
    }

    async fn unheld_logins(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let d = self.data();
        Ok(d.logins
            .keys()
            .filter(|m| {
                d.leases
                    .get(&format!("login:{m}"))
                    .is_none_or(|l| l.expires_at <= now)
            })
            .cloned()
            .collect())
    }
}
