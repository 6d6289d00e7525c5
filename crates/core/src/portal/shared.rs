//! Shared group portals: when several Matrix users of this homeserver are in one interop group,
//! the group has one room with each of them in it (`bridge.shared_group_portals`). Each user
//! keeps a portal row of their own for it (their login sends their messages, reads their
//! receipts, fills their space); the rows share the room.
//!
//! Every login in the group receives each of the group's messages. The first login to claim a
//! message in the database bridges it ([`PortalStore::claim_message`]); the others find it
//! claimed and wait until it is in the message map, then drop their copy. So a message shows
//! once whichever login gets it first, also when a login was offline and catches up later, and
//! nothing is handed over when a user logs out or leaves: the logins left go on receiving. A
//! claim that was not finished within [`CLAIM_STALE`] (its login died in between) is taken over.
//!
//! A message sent by one of the room's own users reaches the others' logins as well (from that
//! user's interop account): it is already in the room as the user's Matrix event, so it is not
//! bridged again.

use std::time::Duration;

use super::*;

/// How long a claimed message may wait for its login to bridge it before another login of the
/// room takes it over.
pub(crate) const CLAIM_STALE: Duration = Duration::from_secs(60);

/// Claims older than this are forgotten (by then every login has long had its copy).
const CLAIM_KEPT: Duration = Duration::from_secs(24 * 3600);

impl Bridge {
    /// The portal in `room` that `sender`'s events in it go through: `sender`'s own (in a shared
    /// group portal, each user with a login has one), otherwise the first with a relay, otherwise
    /// the room's first.
    pub(crate) async fn portal_in(
        &self,
        room: &str,
        sender: &str,
    ) -> Result<Option<PortalRef<'_>>, BridgeError> {
        Ok(self
            .portal_record_in(room, sender)
            .await?
            .and_then(|p| PortalRef::new(self, p)))
    }

    /// The portal in `room` that a membership change of `target` made by `sender` goes
    /// through: `target`'s own when it has one (a user of a shared group portal who leaves or is
    /// removed by anyone ends their own part), otherwise as [`Self::portal_in`].
    pub(crate) async fn portal_for_member(
        &self,
        room: &str,
        sender: &str,
        target: &str,
    ) -> Result<Option<PortalRef<'_>>, BridgeError> {
        let rows = self.portals.portals_in_room(room).await?;
        let who = if rows.iter().any(|p| p.receiver == target) {
            target
        } else {
            sender
        };
        Ok(pick(rows, who).and_then(|p| PortalRef::new(self, p)))
    }

    /// The record [`Self::portal_in`] works with.
    pub(crate) async fn portal_record_in(
        &self,
        room: &str,
        sender: &str,
    ) -> Result<Option<Portal>, BridgeError> {
        Ok(pick(self.portals.portals_in_room(room).await?, sender))
    }
}

/// Of a room's portals, `user`'s own, otherwise the first with a relay, otherwise the first.
fn pick(mut rows: Vec<Portal>, user: &str) -> Option<Portal> {
    let i = rows
        .iter()
        .position(|p| p.receiver == user)
        .or_else(|| rows.iter().position(|p| p.relay.is_some()))
        .unwrap_or(0);
    (!rows.is_empty()).then(|| rows.swap_remove(i))
}

impl Bridge {
    /// The group's room when another login of this bridge has a portal for it: `receiver`
    /// joins it (invited by the bot) with a portal row of their own.
    pub(super) async fn join_shared_group(
        &self,
        receiver: &str,
        chat_id: &str,
    ) -> Result<Option<PortalRef<'_>>, BridgeError> {
        if !self.settings.bridge.shared_group_portals {
            return Ok(None);
        }
        let Some(first) = self.portals.group_portal(chat_id).await? else {
            return Ok(None);
        };
        let Some(room) = first.room_id.as_ref().map(|r| r.to_string()) else {
            return Ok(None);
        };
        // The user joins the room: the ghost of their account, there as a member of the
        // group, goes.
        if let Some(account) = self.portals.login(receiver).await? {
            let ghost = self.ghost_mxid(&account);
            if let Err(e) = self.matrix.leave(&room, &ghost).await {
                tracing::debug!(error = %e, "the joining user's ghost was not in the room");
            }
        }
        let bot = self.matrix.bot_mxid().to_owned();
        self.matrix.invite(&room, &bot, receiver).await?;
        self.give_owner_level(&room, receiver).await;
        let portal = Portal {
            receiver: matrix_id(receiver)?,
            relay: None,
            ..first
        };
        self.portals.save_portal(&portal).await?;
        tracing::info!(room_id = %room, "a login joined a shared group portal");
        self.add_to_space(receiver, &room).await;
        Ok(Some(PortalRef {
            bridge: self,
            record: portal,
            room,
        }))
    }

    /// A user who joins a group's room gets the level its creator has, so that they too can
    /// rename the group, change its avatar and add or remove members from Matrix. Best effort:
    /// without it they chat as any member does.
    async fn give_owner_level(&self, room: &str, user: &str) {
        let bot = self.matrix.bot_mxid().to_owned();
        let pl = "m.room.power_levels";
        let result = match self.matrix.state_json(room, &bot, pl, "").await {
            Ok(Some(mut levels)) if levels["users"].is_object() => {
                levels["users"][user] = json!(GROUP_OWNER_LEVEL);
                self.matrix
                    .send_state_json(room, &bot, pl, "", levels)
                    .await
                    .map(|_| ())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot give a shared group portal's new user its level");
        }
    }

    /// Takes a user out of a shared group portal whose room goes on for others: the bot removes
    /// them from the room, which is no longer theirs to read (they logged out, left the group,
    /// or deleted their portal).
    pub(crate) async fn kick_from_shared(&self, room: &str, user: &str, reason: &str) {
        let bot = self.matrix.bot_mxid().to_owned();
        if let Err(e) = self.matrix.kick(room, &bot, user, reason).await {
            // Mostly: they left already.
            tracing::debug!(error = %e, "cannot remove a user from a shared group portal");
        }
    }

    /// Forgets old message claims every hour, for as long as the bridge runs.
    pub async fn run_claim_pruning(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            let before = crate::now_ms() as i64 - CLAIM_KEPT.as_millis() as i64;
            if let Err(e) = self.portals.prune_claims(before).await {
                tracing::warn!(error = %e, "cannot forget old message claims");
            }
        }
    }
}

impl PortalRef<'_> {
    /// The group's members on the network changed: in a shared room, each user whose login is
    /// no longer a member loses their part of it (while another user's remains).
    pub(super) async fn drop_former_members(&self, members: &[String]) -> Result<(), BridgeError> {
        let rows = self.bridge.portals.portals_in_room(&self.room).await?;
        let mut left = rows.len();
        for p in rows {
            if left <= 1 {
                break;
            }
            let Some(account) = self.bridge.portals.login(p.receiver.as_str()).await? else {
                continue;
            };
            if members.contains(&account) {
                continue;
            }
            self.bridge
                .portals
                .delete_portal(p.receiver.as_str(), &p.chat_id)
                .await?;
            self.bridge
                .remove_from_space(p.receiver.as_str(), &self.room)
                .await;
            self.bridge
                .kick_from_shared(
                    &self.room,
                    p.receiver.as_str(),
                    "no longer a member of this group on the network",
                )
                .await;
            left -= 1;
        }
        Ok(())
    }

    /// The interop accounts of the logins whose portals share this room (in a shared group
    /// portal, these are the room's own users: no ghost stands for them).
    pub(super) async fn own_accounts(&self) -> Result<Vec<String>, BridgeError> {
        let mut own = Vec::new();
        for p in self.bridge.portals.portals_in_room(&self.room).await? {
            if let Some(account) = self.bridge.portals.login(p.receiver.as_str()).await? {
                own.push(account);
            }
        }
        Ok(own)
    }

    /// Whether this login (of the account `me`) leaves the network message `message_id` from
    /// `from` to another login of the room: one of the room's own users sent it, or another login claimed it
    /// (then it waits, as [`BridgeError::NotReady`], until that one has bridged it).
    pub(super) async fn leave_to_others(
        &self,
        me: &str,
        from: &str,
        message_id: &str,
    ) -> Result<bool, BridgeError> {
        if self.record.kind != PortalKind::Group {
            return Ok(false);
        }
        // Alone in the room, the login's own account is the only one of ours (and its messages
        // from another device are bridged as before).
        let shared = self.bridge.portals.portals_in_room(&self.room).await?.len() > 1;
        if shared && from != me && self.own_accounts().await?.iter().any(|a| a == from) {
            return Ok(true); // a user's own message, in the room as their Matrix event
        }
        let now = crate::now_ms() as i64;
        let claimed = self
            .bridge
            .portals
            .claim_message(
                &self.room,
                from,
                message_id,
                self.record.receiver.as_str(),
                now,
                now - CLAIM_STALE.as_millis() as i64,
            )
            .await?;
        if claimed {
            return Ok(false);
        }
        Err(BridgeError::NotReady(
            "another login of this shared group is bridging the message".into(),
        ))
    }
}
