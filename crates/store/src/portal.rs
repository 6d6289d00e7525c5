//! Logins, portals, ghosts and the message map.

use async_trait::async_trait;
use mib_core::store::StoreError as CoreError;
use sqlx::Row;

use super::{Connections, Db, Marks, SqlStore, StoreError, group::GroupWriter, now_ms};

pub use mib_core::{
    store::PortalStore,
    types::{DmContact, GhostProfile, MappedMessage, Portal, PortalKind},
};

/// A Matrix identifier read from column `col`, checked as ruma parses it.
fn parse_id<T>(col: &str, raw: String) -> Result<T, StoreError>
where
    T: TryFrom<String, Error = ruma::IdParseError>,
{
    T::try_from(raw).map_err(|e| {
        StoreError::from(sqlx::Error::ColumnDecode {
            index: col.to_owned(),
            source: Box::new(e),
        })
    })
}

fn matrix_id<T>(r: &sqlx::any::AnyRow, col: &str) -> Result<T, StoreError>
where
    T: TryFrom<String, Error = ruma::IdParseError>,
{
    parse_id(col, r.try_get(col)?)
}

/// [`matrix_id`] of a column that may be NULL.
fn optional_matrix_id<T>(r: &sqlx::any::AnyRow, col: &str) -> Result<Option<T>, StoreError>
where
    T: TryFrom<String, Error = ruma::IdParseError>,
{
    r.try_get::<Option<String>, _>(col)?
        .map(|raw| parse_id(col, raw))
        .transpose()
}

fn portal_row(r: &sqlx::any::AnyRow) -> Result<Portal, StoreError> {
    let kind: String = r.try_get("kind")?;
    Ok(Portal {
        receiver: matrix_id(r, "receiver")?,
        chat_id: r.try_get("chat_id")?,
        kind: if kind == "group" {
            PortalKind::Group
        } else {
            PortalKind::Dm
        },
        room_id: optional_matrix_id(r, "room_id")?,
        name: r.try_get("name")?,
        relay: optional_matrix_id(r, "relay")?,
        avatar_blob: r.try_get("avatar_blob")?,
        avatar_mxc: r.try_get("avatar_mxc")?,
    })
}

/// Message-map rows per statement (seven values each: well under either database's limit on
/// parameters).
const MAP_ROWS_PER_STATEMENT: usize = 128;

/// The message map's group commit (see `group`): every chat's lane maps each message it
/// bridged, and under load their rows go in together.
pub(crate) fn map_writer() -> GroupWriter<MappedMessage> {
    GroupWriter::new(|pool, rows| Box::pin(map_rows(pool, rows)))
}

/// Inserts message-map rows in one transaction (one statement needs none); a row already
/// there (a message bridged again after a crash) is left as it is.
async fn map_rows(pool: &Connections, rows: &[MappedMessage]) -> Result<(), StoreError> {
    let now = now_ms();
    let mut conn = pool.acquire().await?;
    if rows.len() <= MAP_ROWS_PER_STATEMENT {
        return insert_map_rows(&mut conn, rows, now).await;
    }
    let mut tx = conn.begin().await?;
    for chunk in rows.chunks(MAP_ROWS_PER_STATEMENT) {
        insert_map_rows(&mut tx, chunk, now).await?;
    }
    Ok(tx.commit().await?)
}

async fn insert_map_rows(
    conn: &mut sqlx::AnyConnection,
    rows: &[MappedMessage],
    now: i64,
) -> Result<(), StoreError> {
    #[allow(non_snake_case)] // named as the SQL check expects a row list
    let MAP_ROWS = Marks::of(conn).rows(rows.len(), 7);
    let sql = format!(
        "INSERT INTO message_map (room_id, event_id, message_id, sender, part, matrix_sender, created_at) \
         VALUES {MAP_ROWS} ON CONFLICT DO NOTHING"
    );
    // Only placeholders are spliced in; the values are bound.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for m in rows {
        q = q
            .bind(m.room_id.as_str())
            .bind(m.event_id.as_str())
            .bind(m.message_id.as_str())
            .bind(m.sender.as_str())
            .bind(m.part.as_str())
            .bind(m.matrix_sender.as_str())
            .bind(now);
    }
    q.execute(conn).await?;
    Ok(())
}

fn mapped_row(r: &sqlx::any::AnyRow) -> Result<MappedMessage, StoreError> {
    Ok(MappedMessage {
        room_id: r.try_get("room_id")?,
        event_id: r.try_get("event_id")?,
        message_id: r.try_get("message_id")?,
        sender: r.try_get("sender")?,
        part: r.try_get("part")?,
        matrix_sender: r.try_get("matrix_sender")?,
    })
}

/// Portal records kept in memory: every Matrix event and every network message looks its portal
/// up, and portals change seldom. Only for a store that is the database's one writer of portals
/// (one bridge process): with several workers another process may change a portal, and the
/// cache stays off ([`SqlStore::cache_portals`]). Lookups that found no portal are kept too (a
/// management room is looked up as often as a portal). Each room's disappearing-message timer is
/// kept with them: every message sent from Matrix reads it.
#[derive(Default)]
pub(crate) struct PortalCache {
    on: std::sync::atomic::AtomicBool,
    inner: std::sync::Mutex<CachedPortals>,
}

#[derive(Default)]
struct CachedPortals {
    /// Counts the writes: a lookup that read the database before a write finished does not
    /// put what it read in the cache.
    generation: u64,
    by_chat: std::collections::HashMap<(String, String), Option<Portal>>,
    by_room: std::collections::HashMap<String, Vec<Portal>>,
    timers: std::collections::HashMap<String, u32>,
}

impl std::fmt::Debug for PortalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortalCache")
            .field("on", &self.on)
            .finish_non_exhaustive()
    }
}

/// Entries kept at most (a few MB); past it the cache starts over.
const MAX_CACHED_PORTALS: usize = 10_000;

impl PortalCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CachedPortals> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached answer from `map` (`Err` with the generation to put a fresh one under when
    /// there is none).
    fn get<V: Clone>(&self, map: impl Fn(&CachedPortals) -> Option<&V>) -> Result<V, Option<u64>> {
        if !self.on.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(None);
        }
        let c = self.lock();
        map(&c).cloned().ok_or(Some(c.generation))
    }

    fn put(&self, generation: Option<u64>, insert: impl FnOnce(&mut CachedPortals)) {
        let mut c = self.lock();
        if generation != Some(c.generation) {
            return;
        }
        if c.by_chat.len() + c.by_room.len() + c.timers.len() >= MAX_CACHED_PORTALS {
            c.by_chat.clear();
            c.by_room.clear();
            c.timers.clear();
        }
        insert(&mut c);
    }

    /// After a write of portals (whether or not it succeeded): nothing cached is trusted.
    fn forget(&self) {
        let mut c = self.lock();
        c.generation += 1;
        c.by_chat.clear();
        c.by_room.clear();
        c.timers.clear();
    }
}

/// Empties the cache when a write of portals ends, however it ends (an error, a cancelled
/// future).
struct ForgetPortals<'a>(&'a PortalCache);

impl Drop for ForgetPortals<'_> {
    fn drop(&mut self) {
        self.0.forget();
    }
}

impl SqlStore {
    /// Keeps portal records in memory. Only for the database's one bridge process: with
    /// several workers another process may change a portal.
    pub fn cache_portals(&self) {
        self.portal_cache
            .on
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    async fn cached_portal(
        &self,
        receiver: &str,
        chat_id: &str,
    ) -> Result<Option<Portal>, CoreError> {
        let key = (receiver.to_owned(), chat_id.to_owned());
        let generation = match self.portal_cache.get(|c| c.by_chat.get(&key)) {
            Ok(hit) => return Ok(hit),
            Err(generation) => generation,
        };
        let q = format!("SELECT {PORTAL_COLS} FROM portal WHERE receiver = $1 AND chat_id = $2");
        let row = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(receiver)
            .bind(chat_id)
            .fetch_optional(self.pool())
            .await
            .db()?;
        let found = row.as_ref().map(portal_row).transpose()?;
        self.portal_cache.put(generation, |c| {
            c.by_chat.insert(key, found.clone());
        });
        Ok(found)
    }

    async fn cached_room(&self, room_id: &str) -> Result<Vec<Portal>, CoreError> {
        let generation = match self.portal_cache.get(|c| c.by_room.get(room_id)) {
            Ok(hit) => return Ok(hit),
            Err(generation) => generation,
        };
        let q = format!(
            "SELECT {PORTAL_COLS} FROM portal WHERE room_id = $1 ORDER BY created_at, receiver"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(room_id)
            .fetch_all(self.pool())
            .await
            .db()?;
        let found = rows.iter().map(portal_row).collect::<Result<Vec<_>, _>>()?;
        self.portal_cache.put(generation, |c| {
            c.by_room.insert(room_id.to_owned(), found.clone());
        });
        Ok(found)
    }
}

pub(crate) const PORTAL_COLS: &str =
    "receiver, chat_id, kind, room_id, name, relay, avatar_blob, avatar_mxc";
pub(crate) const MAP_COLS: &str = "room_id, event_id, message_id, sender, part, matrix_sender";

#[async_trait]
impl PortalStore for SqlStore {
    async fn set_login(&self, mxid: &str, account: &str) -> Result<(), CoreError> {
        sqlx::query(
            "INSERT INTO login (mxid, account, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (mxid) DO UPDATE SET account = excluded.account",
        )
        .bind(mxid)
        .bind(account)
        .bind(now_ms())
        .execute(self.pool())
        .await
        .db()?;
        Ok(())
    }

    async fn login(&self, mxid: &str) -> Result<Option<String>, CoreError> {
        Ok(
            sqlx::query_scalar("SELECT account FROM login WHERE mxid = $1")
                .bind(mxid)
                .fetch_optional(self.pool())
                .await
                .db()?,
        )
    }

    async fn delete_login(&self, mxid: &str) -> Result<(), CoreError> {
        sqlx::query("DELETE FROM login WHERE mxid = $1")
            .bind(mxid)
            .execute(self.pool())
            .await
            .db()?;
        Ok(())
    }

    async fn all_logins(&self) -> Result<Vec<(String, String)>, CoreError> {
        let rows = sqlx::query("SELECT mxid, account FROM login ORDER BY mxid")
            .fetch_all(self.pool())
            .await
            .db()?;
        rows.iter()
            .map(|r| Ok((r.try_get("mxid").db()?, r.try_get("account").db()?)))
            .collect()
    }

    async fn portal(&self, receiver: &str, chat_id: &str) -> Result<Option<Portal>, CoreError> {
        self.cached_portal(receiver, chat_id).await
    }

    async fn portals_in_room(&self, room_id: &str) -> Result<Vec<Portal>, CoreError> {
        self.cached_room(room_id).await
    }

    async fn group_portal(&self, chat_id: &str) -> Result<Option<Portal>, CoreError> {
        let q = format!(
            "SELECT {PORTAL_COLS} FROM portal WHERE chat_id = $1 AND kind = 'group' \
             AND room_id IS NOT NULL ORDER BY created_at, receiver LIMIT 1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(chat_id)
            .fetch_optional(self.pool())
            .await
            .db()?;
        Ok(row.as_ref().map(portal_row).transpose()?)
    }

    async fn claim_message(
        &self,
        room_id: &str,
        sender: &str,
        message_id: &str,
        owner: &str,
        now_ms: i64,
        stale_before_ms: i64,
    ) -> Result<bool, CoreError> {
        let row = sqlx::query(
            "INSERT INTO message_claim (room_id, sender, message_id, owner, claimed_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (room_id, sender, message_id) DO UPDATE \
             SET owner = excluded.owner, claimed_at = excluded.claimed_at \
             WHERE message_claim.owner = excluded.owner OR message_claim.claimed_at < $6 \
             RETURNING owner",
        )
        .bind(room_id)
        .bind(sender)
        .bind(message_id)
        .bind(owner)
        .bind(now_ms)
        .bind(stale_before_ms)
        .fetch_optional(self.pool())
        .await
        .db()?;
        Ok(row.is_some())
    }

    async fn prune_claims(&self, before_ms: i64) -> Result<(), CoreError> {
        sqlx::query("DELETE FROM message_claim WHERE claimed_at < $1")
            .bind(before_ms)
            .execute(self.pool())
            .await
            .db()?;
        Ok(())
    }

    async fn save_portal(&self, p: &Portal) -> Result<(), CoreError> {
        let _forget = ForgetPortals(&self.portal_cache);
        sqlx::query(
            "INSERT INTO portal (receiver, chat_id, kind, room_id, name, relay, avatar_blob, avatar_mxc, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (receiver, chat_id) DO UPDATE SET kind = excluded.kind, room_id = excluded.room_id, \
             name = excluded.name, relay = excluded.relay, avatar_blob = excluded.avatar_blob, avatar_mxc = excluded.avatar_mxc",
        )
        .bind(p.receiver.as_str())
        .bind(&p.chat_id)
        .bind(p.kind.as_str())
        .bind(p.room_id.as_ref().map(|r| r.as_str()))
        .bind(&p.name)
        .bind(p.relay.as_ref().map(|r| r.as_str()))
        .bind(&p.avatar_blob)
        .bind(&p.avatar_mxc)
        .bind(now_ms())
        .execute(self.pool())
        .await.db()?;
        Ok(())
    }

    async fn update_portal_look(&self, p: &Portal) -> Result<(), CoreError> {
        let _forget = ForgetPortals(&self.portal_cache);
        sqlx::query(
            "UPDATE portal SET name = $1, avatar_blob = $2, avatar_mxc = $3 \
             WHERE chat_id = $4 AND room_id = $5",
        )
        .bind(&p.name)
        .bind(&p.avatar_blob)
        .bind(&p.avatar_mxc)
        .bind(&p.chat_id)
        .bind(p.room_id.as_ref().map(|r| r.as_str()))
        .execute(self.pool())
        .await
        .db()?;
        Ok(())
    }

    async fn delete_portal(&self, receiver: &str, chat_id: &str) -> Result<(), CoreError> {
        let _forget = ForgetPortals(&self.portal_cache);
        let mut conn = self.pool().acquire().await.map_err(StoreError::from)?;
        let mut tx = self.begin_write(&mut conn).await?;
        let room: Option<Option<String>> =
            sqlx::query_scalar("SELECT room_id FROM portal WHERE receiver = $1 AND chat_id = $2")
                .bind(receiver)
                .bind(chat_id)
                .fetch_optional(&mut *tx)
                .await
                .db()?;
        if let Some(Some(room)) = room {
            // Shared with other logins' portals: the room and its messages stay theirs.
            let sharing: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM portal WHERE room_id = $1 AND NOT (receiver = $2 AND chat_id = $3)",
            )
            .bind(&room)
            .bind(receiver)
            .bind(chat_id)
            .fetch_one(&mut *tx)
            .await
            .db()?;
            if sharing == 0 {
                sqlx::query("DELETE FROM message_map WHERE room_id = $1")
                    .bind(room)
                    .execute(&mut *tx)
                    .await
                    .db()?;
            }
        }
        sqlx::query("DELETE FROM portal WHERE receiver = $1 AND chat_id = $2")
            .bind(receiver)
            .bind(chat_id)
            .execute(&mut *tx)
            .await
            .db()?;
        tx.commit().await.db()?;
        Ok(())
    }

    async fn portals_of(&self, receiver: &str) -> Result<Vec<Portal>, CoreError> {
        let q = format!("SELECT {PORTAL_COLS} FROM portal WHERE receiver = $1 ORDER BY created_at");
        let rows = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(receiver)
            .fetch_all(self.pool())
            .await
            .db()?;
        Ok(rows.iter().map(portal_row).collect::<Result<_, _>>()?)
    }

    async fn dm_contacts(&self, receiver: &str) -> Result<Vec<DmContact>, CoreError> {
        let rows = sqlx::query(
            "SELECT p.chat_id, p.room_id, COALESCE(g.displayname, '') AS displayname \
             FROM portal p LEFT JOIN ghost g ON g.account = p.chat_id \
             WHERE p.receiver = $1 AND p.kind = 'dm' ORDER BY p.created_at",
        )
        .bind(receiver)
        .fetch_all(self.pool())
        .await
        .db()?;
        rows.iter()
            .map(|r| {
                Ok(DmContact {
                    account: r.try_get("chat_id").db()?,
                    room_id: r.try_get("room_id").db()?,
                    displayname: r.try_get("displayname").db()?,
                })
            })
            .collect()
    }

    async fn ghost_profile(&self, account: &str) -> Result<Option<GhostProfile>, CoreError> {
        let row = sqlx::query(
            "SELECT displayname, avatar_blob, avatar_mxc FROM ghost WHERE account = $1",
        )
        .bind(account)
        .fetch_optional(self.pool())
        .await
        .db()?;
        row.map(|r| {
            Ok(GhostProfile {
                displayname: r.try_get("displayname").db()?,
                avatar_blob: r.try_get("avatar_blob").db()?,
                avatar_mxc: r.try_get("avatar_mxc").db()?,
            })
        })
        .transpose()
    }

    async fn ghosts_named(&self, name: &str, limit: u32) -> Result<Vec<String>, CoreError> {
        // LIKE is ASCII case-insensitive on SQLite, and made so on PostgreSQL with LOWER; the
        // name's own wildcards are escaped.
        let pattern = format!(
            "%{}%",
            name.to_ascii_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        let rows = sqlx::query(
            "SELECT account FROM ghost WHERE LOWER(displayname) LIKE $1 ESCAPE '\\' \
             ORDER BY account LIMIT $2",
        )
        .bind(pattern)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .db()?;
        Ok(rows
            .iter()
            .map(|r| r.try_get::<String, _>("account"))
            .collect::<Result<_, _>>()
            .db()?)
    }

    async fn save_ghost(
        &self,
        account: &str,
        mxid: &str,
        profile: &GhostProfile,
    ) -> Result<(), CoreError> {
        sqlx::query(
            "INSERT INTO ghost (account, mxid, displayname, avatar_blob, avatar_mxc) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (account) DO UPDATE SET mxid = excluded.mxid, displayname = excluded.displayname, \
             avatar_blob = excluded.avatar_blob, avatar_mxc = excluded.avatar_mxc",
        )
        .bind(account)
        .bind(mxid)
        .bind(&profile.displayname)
        .bind(&profile.avatar_blob)
        .bind(&profile.avatar_mxc)
        .execute(self.pool())
        .await.db()?;
        Ok(())
    }

    async fn map_message(&self, m: &MappedMessage) -> Result<(), CoreError> {
        self.map_writer.write(self.pool(), m.clone()).await
    }

    async fn by_message(
        &self,
        room_id: &str,
        message_id: &str,
        part: &str,
    ) -> Result<Option<MappedMessage>, CoreError> {
        let q = format!(
            "SELECT {MAP_COLS} FROM message_map WHERE room_id = $1 AND message_id = $2 AND part = $3 LIMIT 1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(room_id)
            .bind(message_id)
            .bind(part)
            .fetch_optional(self.pool())
            .await
            .db()?;
        Ok(row.as_ref().map(mapped_row).transpose()?)
    }

    async fn by_event(
        &self,
        room_id: &str,
        event_id: &str,
    ) -> Result<Option<MappedMessage>, CoreError> {
        let q = format!("SELECT {MAP_COLS} FROM message_map WHERE room_id = $1 AND event_id = $2");
        let row = sqlx::query(sqlx::AssertSqlSafe(q))
            .bind(room_id)
            .bind(event_id)
            .fetch_optional(self.pool())
            .await
            .db()?;
        Ok(row.as_ref().map(mapped_row).transpose()?)
    }

    async fn unmap_event(&self, room_id: &str, event_id: &str) -> Result<(), CoreError> {
        sqlx::query("DELETE FROM message_map WHERE room_id = $1 AND event_id = $2")
            .bind(room_id)
            .bind(event_id)
            .execute(self.pool())
            .await
            .db()?;
        Ok(())
    }

    async fn disappear_timer(&self, room_id: &str) -> Result<u32, CoreError> {
        let generation = match self.portal_cache.get(|c| c.timers.get(room_id)) {
            Ok(hit) => return Ok(hit),
            Err(generation) => generation,
        };
        let seconds: Option<i64> =
            sqlx::query_scalar("SELECT seconds FROM disappear_timer WHERE room_id = $1")
                .bind(room_id)
                .fetch_optional(self.pool())
                .await
                .db()?;
        let seconds = seconds.map_or(0, |s| u32::try_from(s).unwrap_or(u32::MAX));
        self.portal_cache.put(generation, |c| {
            c.timers.insert(room_id.to_owned(), seconds);
        });
        Ok(seconds)
    }

    async fn set_disappear_timer(&self, room_id: &str, seconds: u32) -> Result<(), CoreError> {
        let _forget = ForgetPortals(&self.portal_cache);
        sqlx::query(
            "INSERT INTO disappear_timer (room_id, seconds) VALUES ($1, $2) \
             ON CONFLICT (room_id) DO UPDATE SET seconds = excluded.seconds",
        )
        .bind(room_id)
        .bind(i64::from(seconds))
        .execute(self.pool())
        .await
        .db()?;
        Ok(())
    }

    async fn disappear_at(
        &self,
        room_id: &str,
        event_id: &str,
        due_ms: i64,
    ) -> Result<(), CoreError> {
        sqlx::query(
            "INSERT INTO disappearing (room_id, event_id, due_at) VALUES ($1, $2, $3) \
             ON CONFLICT (room_id, event_id) DO NOTHING",
        )
        .bind(room_id)
        .bind(event_id)
        .bind(due_ms)
        .execute(self.pool())
        .await
        .db()?;
        Ok(())
    }

    async fn due_to_disappear(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<(String, String)>, CoreError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT room_id, event_id FROM disappearing WHERE due_at <= $1 \
             ORDER BY due_at LIMIT $2",
        )
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .db()?;
        Ok(rows)
    }

    async fn disappeared(&self, room_id: &str, event_id: &str) -> Result<(), CoreError> {
        sqlx::query("DELETE FROM disappearing WHERE room_id = $1 AND event_id = $2")
            .bind(room_id)
            .bind(event_id)
            .execute(self.pool())
            .await
            .db()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    on_both_databases!(
        logins_portals_and_map,
        cached_portals_follow_writes,
        shared_group_rooms_and_claims,
        many_lanes_mapping_at_once_each_land_once
    );

    /// Many chats' lanes map messages at once, more than one statement's rows and some twice
    /// (a message bridged again after a crash): the group commit lands each row once, and
    /// every caller returns only once its row is there.
    async fn many_lanes_mapping_at_once_each_land_once(s: &SqlStore) {
        let row = |i: usize| MappedMessage {
            room_id: format!("!r{}:x", i % 7),
            event_id: format!("$e{i}"),
            message_id: format!("m{i}"),
            sender: "+1555".into(),
            part: String::new(),
            matrix_sender: "@u:x".into(),
        };
        let n = MAP_ROWS_PER_STATEMENT * 3 + 5;
        let writes: Vec<_> = (0..n)
            .chain(0..n / 3)
            .map(|i| {
                let (s, m) = (s.clone(), row(i));
                tokio::spawn(async move {
                    s.map_message(&m).await.expect("map");
                    // Durable once the call returns.
                    assert_eq!(
                        s.by_message(&m.room_id, &m.message_id, "")
                            .await
                            .expect("read"),
                        Some(m)
                    );
                })
            })
            .collect();
        for w in writes {
            w.await.expect("task");
        }
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM message_map")
            .fetch_one(s.pool())
            .await
            .expect("count");
        assert_eq!(rows, n as i64);
    }

    /// Two logins' portals of one group share a room: listed oldest first, the group's portal
    /// is found for a third, a look update reaches both, and the first one deleted leaves the
    /// room's message map to the other. A message is claimed once; a stale claim is taken over.
    async fn shared_group_rooms_and_claims(s: &SqlStore) {
        s.cache_portals();
        let portal = |receiver: &str| Portal {
            receiver: receiver.try_into().unwrap(),
            chat_id: "g1".into(),
            kind: PortalKind::Group,
            room_id: Some("!g:x".try_into().unwrap()),
            name: "Group".into(),
            relay: None,
            avatar_blob: String::new(),
            avatar_mxc: String::new(),
        };
        s.save_portal(&portal("@a:x")).await.expect("a");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        s.save_portal(&portal("@b:x"))
            .await
            .expect("b shares the room");
        let rows = s.portals_in_room("!g:x").await.expect("rows");
        let owners: Vec<&str> = rows.iter().map(|p| p.receiver.as_str()).collect();
        assert_eq!(owners, ["@a:x", "@b:x"]);
        assert_eq!(
            s.group_portal("g1")
                .await
                .expect("group")
                .map(|p| p.receiver),
            Some("@a:x".try_into().unwrap())
        );
        assert_eq!(s.group_portal("g2").await.expect("none"), None);
        let mut look = portal("@b:x");
        look.name = "Renamed".into();
        s.update_portal_look(&look).await.expect("look");
        assert!(
            s.portals_in_room("!g:x")
                .await
                .expect("rows")
                .iter()
                .all(|p| p.name == "Renamed")
        );
        s.map_message(&MappedMessage {
            room_id: "!g:x".into(),
            event_id: "$1".into(),
            message_id: "m1".into(),
            sender: "+1".into(),
            part: String::new(),
            matrix_sender: String::new(),
        })
        .await
        .expect("map");
        s.delete_portal("@a:x", "g1").await.expect("a leaves");
        assert!(s.by_message("!g:x", "m1", "").await.expect("map").is_some());
        assert_eq!(
            s.portal_by_room("!g:x")
                .await
                .expect("b")
                .map(|p| p.receiver),
            Some("@b:x".try_into().unwrap())
        );
        s.delete_portal("@b:x", "g1").await.expect("b leaves");
        assert!(s.by_message("!g:x", "m1", "").await.expect("map").is_none());

        let claim = |owner: &'static str, now: i64| async move {
            s.claim_message("!g:x", "+1", "m2", owner, now, now - 60_000)
                .await
                .expect("claim")
        };
        assert!(claim("@a:x", 1_000_000).await, "free");
        assert!(claim("@a:x", 1_000_100).await, "already a's");
        assert!(!claim("@b:x", 1_000_200).await, "a's, and fresh");
        assert!(claim("@b:x", 1_070_200).await, "a's went stale");
        assert!(!claim("@a:x", 1_070_300).await, "b's now");
        s.prune_claims(2_000_000).await.expect("prune");
        assert!(claim("@a:x", 1_070_400).await, "forgotten");
    }

    /// The same with portals kept in memory; lookups that found nothing before the writes are
    /// cached too, and each write must make them go.
    async fn cached_portals_follow_writes(s: &SqlStore) {
        s.cache_portals();
        let chat = ("@a:x", "+15550002222");
        assert_eq!(s.portal_by_room("!r:x").await.expect("by room"), None);
        assert_eq!(s.portal(chat.0, chat.1).await.expect("get"), None);
        logins_portals_and_map(s).await;
        assert_eq!(s.portal_by_room("!r:x").await.expect("by room"), None);
        assert_eq!(s.portal(chat.0, chat.1).await.expect("get"), None);
        // A room's disappearing-message timer: read, then set, then read again.
        let timer = || async { s.disappear_timer("!t:x").await.expect("timer") };
        assert_eq!(timer().await, 0);
        s.set_disappear_timer("!t:x", 30).await.expect("set");
        assert_eq!(timer().await, 30);
        s.set_disappear_timer("!t:x", 0).await.expect("set");
        assert_eq!(timer().await, 0);
    }

    async fn logins_portals_and_map(s: &SqlStore) {
        s.set_login("@a:x", "+15550001111").await.expect("login");
        assert_eq!(
            s.login("@a:x").await.expect("get").as_deref(),
            Some("+15550001111")
        );
        assert_eq!(s.all_logins().await.expect("all").len(), 1);
        let mut p = Portal {
            receiver: "@a:x".try_into().unwrap(),
            chat_id: "+15550002222".into(),
            kind: PortalKind::Dm,
            room_id: None,
            name: String::new(),
            relay: None,
            avatar_blob: String::new(),
            avatar_mxc: String::new(),
        };
        s.save_portal(&p).await.expect("save");
        p.room_id = Some("!r:x".try_into().unwrap());
        p.avatar_blob = "0123456789abcdef0123456789abcdef".into();
        p.avatar_mxc = "mxc://x/avatar".into();
        p.relay = Some("@a:x".try_into().unwrap());
        s.save_portal(&p).await.expect("update");
        assert_eq!(
            s.portal_by_room("!r:x").await.expect("by room"),
            Some(p.clone())
        );
        assert_eq!(s.portals_of("@a:x").await.expect("of").len(), 1);
        let contacts = s.dm_contacts("@a:x").await.expect("contacts");
        assert_eq!(contacts.len(), 1);
        assert_eq!(contacts[0].account, "+15550002222");
        assert_eq!(contacts[0].room_id.as_deref(), Some("!r:x"));
        // A look update changes name and avatar only, and only for the same room.
        let mut look = p.clone();
        look.name = "Renamed".into();
        look.avatar_mxc = "mxc://x/new".into();
        look.relay = None;
        s.update_portal_look(&look).await.expect("look");
        let got = s
            .portal_by_room("!r:x")
            .await
            .expect("by room")
            .expect("portal");
        assert_eq!(
            (got.name.as_str(), got.avatar_mxc.as_str()),
            ("Renamed", "mxc://x/new")
        );
        assert_eq!(
            got.relay.as_ref().map(|u| u.as_str()),
            Some("@a:x"),
            "relay untouched"
        );
        look.room_id = Some("!other:x".try_into().unwrap());
        look.name = "Stale".into();
        s.update_portal_look(&look).await.expect("look");
        assert_eq!(
            s.portal_by_room("!r:x")
                .await
                .expect("by room")
                .expect("portal")
                .name,
            "Renamed"
        );
        let m = MappedMessage {
            room_id: "!r:x".into(),
            event_id: "$e".into(),
            message_id: "m1".into(),
            sender: "+15550002222".into(),
            part: String::new(),
            matrix_sender: "@interop_15550002222:x".into(),
        };
        s.map_message(&m).await.expect("map");
        s.map_message(&m).await.expect("map twice is fine");
        assert_eq!(
            s.by_message("!r:x", "m1", "").await.expect("by msg"),
            Some(m.clone())
        );
        assert_eq!(s.by_event("!r:x", "$e").await.expect("by ev"), Some(m));
        s.delete_portal("@a:x", "+15550002222")
            .await
            .expect("delete");
        assert!(s.by_event("!r:x", "$e").await.expect("by ev").is_none());
        assert_eq!(s.portal_by_room("!r:x").await.expect("by room"), None);
        let bob = GhostProfile {
            displayname: "Bob".into(),
            avatar_blob: "00112233445566778899aabbccddeeff".into(),
            avatar_mxc: "mxc://x/bob".into(),
        };
        s.save_ghost("+15550002222", "@interop_15550002222:x", &bob)
            .await
            .expect("ghost");
        assert_eq!(
            s.ghost_profile("+15550002222").await.expect("ghost"),
            Some(bob)
        );
        s.delete_login("@a:x").await.expect("logout");
        assert!(s.login("@a:x").await.expect("get").is_none());
    }
}
