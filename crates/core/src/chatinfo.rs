//! Chat metadata in both directions: contacts' names and avatars on their ghosts, and a group's
//! name, avatar and members on its portal room (and back from Matrix to the group).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use ruma::events::{
    AnyStateEvent, AnyStateEventContent,
    room::{
        avatar::{RoomAvatarEvent, RoomAvatarEventContent},
        member::{MembershipState, RoomMemberEvent},
        name::{RoomNameEvent, RoomNameEventContent},
    },
};

use super::types::{Portal, PortalKind};
use super::{
    Bridge, BridgeError,
    network::{GroupChange, GroupInfo, NetAccount, NetTarget},
};

/// How long a contact's profile is trusted before it is fetched again: the network pushes no
/// profile changes, so ghosts pick them up when the contact is next active after this.
pub(crate) const PROFILE_REFRESH: Duration = Duration::from_secs(3600);

/// The content type of an avatar image, from its first bytes (profiles carry no type).
fn image_mimetype(data: &[u8]) -> &'static str {
    match data {
        [0x89, b'P', b'N', b'G', ..] => "image/png",
        [0xFF, 0xD8, 0xFF, ..] => "image/jpeg",
        [b'G', b'I', b'F', b'8', ..] => "image/gif",
        [
            b'R',
            b'I',
            b'F',
            b'F',
            _,
            _,
            _,
            _,
            b'W',
            b'E',
            b'B',
            b'P',
            ..,
        ] => "image/webp",
        _ => "application/octet-stream",
    }
}

/// `m.room.avatar` content for an mxc URI; empty removes the avatar.
fn avatar_content(mxc: &str) -> RoomAvatarEventContent {
    let mut c = RoomAvatarEventContent::new();
    c.url = (!mxc.is_empty()).then(|| mxc.into());
    c
}

impl Bridge {
    /// The contact's ghost, registered once, with the contact's display name and avatar
    /// (fetched again after [`PROFILE_REFRESH`]).
    pub(crate) async fn ghost(
        &self,
        account: &str,
        via: Option<&Arc<dyn NetAccount>>,
    ) -> Result<String, BridgeError> {
        let mxid = self.ghost_mxid(account);
        if self
            .ghosts_seen
            .lock()
            .await
            .get(account)
            .is_some_and(|t| t.elapsed() < PROFILE_REFRESH)
        {
            return Ok(mxid);
        }
        let known = self.portals.ghost_profile(account).await?;
        let profile = match via {
            Some(acc) => match acc.profile(account).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot fetch a contact's profile");
                    None
                }
            },
            None => None,
        };
        let mut row = known.clone().unwrap_or_default();
        let name = profile
            .as_ref()
            .map(|p| p.name.clone())
            .filter(|n| !n.is_empty())
            .or_else(|| Some(row.displayname.clone()).filter(|n| !n.is_empty()))
            .unwrap_or_else(|| account.to_owned());
        if known.is_none() || row.displayname != name {
            self.matrix
                .ensure_ghost(&self.ghost_localpart(account), &name)
                .await?;
            row.displayname = name;
        }
        if let (Some(p), Some(acc)) = (&profile, via)
            && p.avatar_blob != row.avatar_blob
        {
            match self.avatar_to_matrix(acc, &p.avatar_blob).await {
                Ok(mxc) => match self.matrix.set_avatar(&mxid, &mxc).await {
                    Ok(()) => {
                        row.avatar_blob = p.avatar_blob.clone();
                        row.avatar_mxc = mxc;
                    }
                    // e.g. the homeserver refuses the image type or size: no avatar, no failure.
                    Err(e) => {
                        tracing::warn!(error = %e, "the homeserver refused a contact's avatar")
                    }
                },
                // Shown without an avatar; tried again at the next refresh.
                Err(e) => tracing::warn!(error = %e, "cannot copy a contact's avatar"),
            }
        }
        if known.as_ref() != Some(&row) {
            self.portals.save_ghost(account, &mxid, &row).await?;
        }
        self.ghosts_seen
            .lock()
            .await
            .insert(account.to_owned(), Instant::now());
        Ok(mxid)
    }

    /// Answers the homeserver's query for a user in our namespace: the ghost of an account that
    /// exists on the network is registered (named after the contact's profile, or its id).
    pub async fn provide_ghost(&self, mxid: &str) -> bool {
        let Some(account) = self.account_of_ghost(mxid) else {
            return false;
        };
        match self.portals.ghost_profile(&account).await {
            Ok(Some(_)) => true,
            Ok(None) => {
                // Anyone on the homeserver can make it ask (by inviting a made-up id), so the
                // network is asked at a bounded rate, and an unknown account is not asked about
                // again for a while.
                if !self.user_lookups.lock().await.allow(&account) {
                    self.metrics.refused("user_query_rate");
                    return false;
                }
                // Only real contacts: a look-up through any connected login.
                let Some(acc) = self.network.any_account() else {
                    return false;
                };
                // `ghost` registers unknown accounts too, so the network is asked first.
                match acc.profile(&account).await {
                    Ok(Some(_)) => {}
                    // Only a definite "no such account" is remembered; a failed look-up is not.
                    Ok(None) => {
                        self.user_lookups.lock().await.miss(&account);
                        return false;
                    }
                    Err(_) => return false,
                }
                self.ghost(&account, Some(&acc)).await.is_ok()
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up a ghost");
                false
            }
        }
    }

    /// Copies a public interop image to the homeserver; "" for no image.
    pub(crate) async fn avatar_to_matrix(
        &self,
        acc: &Arc<dyn NetAccount>,
        blob: &str,
    ) -> Result<String, BridgeError> {
        if blob.is_empty() {
            return Ok(String::new());
        }
        let data = acc.download_avatar(blob).await?;
        let mime = image_mimetype(&data);
        self.matrix
            .upload(self.matrix.bot_mxid(), data, mime, None)
            .await
    }

    /// Copies a Matrix image to the network as a public blob; "" for no image.
    async fn avatar_to_network(
        &self,
        acc: &Arc<dyn NetAccount>,
        mxc: &str,
    ) -> Result<String, BridgeError> {
        if mxc.is_empty() {
            return Ok(String::new());
        }
        let (data, _) = self.matrix.download(mxc).await?;
        Ok(acc.upload_avatar(data).await?)
    }

    /// A group changed on the network: members, name and avatar follow on its portal.
    pub(crate) async fn on_group_update(
        &self,
        mxid: &str,
        acc: &Arc<dyn NetAccount>,
        g: &GroupInfo,
        from: &str,
    ) -> Result<(), BridgeError> {
        let me = acc.account_id().to_owned();
        let Some(mut portal) = self
            .portals
            .portal(mxid, &g.id)
            .await?
            .filter(|p| p.room_id.is_some())
        else {
            let chat = NetTarget::Group(g.id.clone());
            if g.members.contains(&me)
                && self.request_gate(mxid, acc, &chat, from, None).await?
                    == super::requests::Gate::Open
            {
                self.ensure_portal(mxid, acc, &chat, Some(g)).await?;
            }
            return Ok(());
        };
        let room = portal.room_id.clone().unwrap_or_default();
        let bot = self.matrix.bot_mxid().to_owned();
        let mut joined = self.matrix.joined_members(&room, &bot).await?;
        for m in g.members.iter().filter(|m| **m != me) {
            let ghost = self.ghost(m, Some(acc)).await?;
            if !joined.contains(&ghost) {
                self.matrix.invite(&room, &bot, &ghost).await?;
                self.matrix.join(&room, &ghost).await?;
                joined.push(ghost);
            }
        }
        for j in &joined {
            if let Some(account) = self.account_of_ghost(j)
                && !g.members.contains(&account)
            {
                self.matrix.leave(&room, j).await?;
            }
        }
        // The change shows as made by the contact who made it, when their ghost is in the room.
        let changer = if from != me && g.members.iter().any(|m| m == from) {
            self.ghost_mxid(from)
        } else {
            bot.clone()
        };
        let mut changed = false;
        if portal.name != g.name {
            let name = RoomNameEventContent::new(g.name.clone());
            self.room_state(&room, &changer, name.into()).await?;
            portal.name = g.name.clone();
            changed = true;
        }
        if portal.avatar_blob != g.avatar_blob {
            match self.avatar_to_matrix(acc, &g.avatar_blob).await {
                Ok(mxc) => {
                    self.room_state(&room, &changer, avatar_content(&mxc).into())
                        .await?;
                    portal.avatar_blob = g.avatar_blob.clone();
                    portal.avatar_mxc = mxc;
                    changed = true;
                }
                Err(e) => tracing::warn!(error = %e, "cannot copy a group's avatar"),
            }
        }
        if changed {
            self.portals.update_portal_look(&portal).await?;
        }
        Ok(())
    }

    /// Sets room state as `changer`, or as the bot when the changer may not (a ghost that joined
    /// after the room was made has no power level of its own).
    async fn room_state(
        &self,
        room: &str,
        changer: &str,
        content: AnyStateEventContent,
    ) -> Result<(), BridgeError> {
        let bot = self.matrix.bot_mxid();
        match self
            .matrix
            .send_state(room, changer, content.clone(), "")
            .await
        {
            Err(e) if changer != bot => {
                tracing::debug!(error = %e, "state change as the contact refused; sending it as the bot");
                self.matrix
                    .send_state(room, bot, content, "")
                    .await
                    .map(|_| ())
            }
            r => r.map(|_| ()),
        }
    }

    /// A state change in a portal room made on Matrix: the owner's changes to a group's name,
    /// avatar and members go to the network; the owner leaving ends the portal.
    pub(crate) async fn on_portal_state(
        &self,
        mut portal: Portal,
        ev: &AnyStateEvent,
    ) -> Result<(), BridgeError> {
        let sender = ev.sender().as_str();
        let room = portal.room_id.clone().unwrap_or_default();
        if sender == self.matrix.bot_mxid() || self.matrix.is_ghost(sender) {
            return Ok(()); // our own echo
        }
        let is_member = matches!(ev, AnyStateEvent::RoomMember(_));
        if !is_member && !ev.state_key().is_empty() {
            return Ok(()); // not the room's name or avatar
        }
        let membership = match ev {
            AnyStateEvent::RoomMember(RoomMemberEvent::Original(m)) => Some(&m.content.membership),
            _ => None,
        };
        let target = ev.state_key();
        if target == portal.receiver
            && matches!(
                membership,
                Some(MembershipState::Leave | MembershipState::Ban)
            )
        {
            return self.on_owner_left(&portal).await;
        }
        if sender != portal.receiver {
            tracing::debug!("state change by a user who does not own the portal: not bridged");
            return Ok(());
        }
        let Some(acc) = self.network.account(sender) else {
            if !is_member {
                self.notice(&room, "Your change was not bridged: you are not logged in.")
                    .await?;
            }
            return Ok(());
        };
        let mut change = GroupChange::default();
        let mut invited_ghost = None;
        match ev {
            AnyStateEvent::RoomMember(_) => {
                let Some(membership) = membership else {
                    return Ok(());
                };
                let Some(account) = self.account_of_ghost(target) else {
                    return Ok(());
                };
                if portal.kind == PortalKind::Dm {
                    if *membership == MembershipState::Invite && account != portal.chat_id {
                        self.matrix.leave(&room, target).await?;
                        self.notice(
                            &room,
                            "A direct chat cannot have more members: use `create-group` for a group.",
                        )
                        .await?;
                    }
                    return Ok(());
                }
                match membership {
                    MembershipState::Invite => {
                        change.add.push(account);
                        invited_ghost = Some(target.to_owned());
                    }
                    MembershipState::Leave | MembershipState::Ban => change.remove.push(account),
                    _ => return Ok(()),
                }
            }
            _ if portal.kind == PortalKind::Dm => return Ok(()), // a DM's look is the user's own
            AnyStateEvent::RoomName(RoomNameEvent::Original(n)) => {
                let name = n.content.name.clone();
                if name == portal.name {
                    return Ok(());
                }
                change.name = Some(name);
            }
            AnyStateEvent::RoomAvatar(RoomAvatarEvent::Original(a)) => {
                let mxc = a
                    .content
                    .url
                    .as_ref()
                    .map(|u| u.to_string())
                    .unwrap_or_default();
                if mxc == portal.avatar_mxc {
                    return Ok(());
                }
                let blob = match self.avatar_to_network(&acc, &mxc).await {
                    Ok(b) => b,
                    Err(e) if e.is_retryable() => return Err(e),
                    Err(e) => {
                        self.notice(&room, &format!("The group avatar was not bridged: {e}"))
                            .await?;
                        return Ok(());
                    }
                };
                portal.avatar_mxc = mxc;
                portal.avatar_blob = blob.clone();
                change.avatar_blob = Some(blob);
            }
            _ => return Ok(()),
        }
        match acc.update_group(&portal.chat_id, change.clone()).await {
            Ok(g) => {
                portal.name = g.name;
                self.portals.update_portal_look(&portal).await?;
                if let Some(ghost) = invited_ghost {
                    self.matrix.join(&room, &ghost).await?;
                }
                Ok(())
            }
            Err(e) if e.is_transient() => Err(e.into()),
            Err(e) => {
                if let Some(ghost) = invited_ghost {
                    let _ = self.matrix.leave(&room, &ghost).await;
                }
                self.notice(&room, &format!("Your change was not bridged: {e}"))
                    .await?;
                Ok(())
            }
        }
    }

    /// The owner left (or was removed from) their portal: the portal ends (unless it relays for
    /// others still in the room), and with `bridge.bridge_matrix_leave` the owner also leaves the
    /// group on the network. A later message in the chat opens a new portal.
    async fn on_owner_left(&self, portal: &Portal) -> Result<(), BridgeError> {
        // A relayed room stays bridged for the people still in it.
        if portal.relay.is_some()
            && let Some(room) = &portal.room_id
        {
            let bot = self.matrix.bot_mxid().to_owned();
            let members = self.matrix.joined_members(room, &bot).await?;
            if members
                .iter()
                .any(|m| *m != bot && *m != portal.receiver && !self.matrix.is_ghost(m))
            {
                tracing::info!(room_id = %room, "the owner left a relayed portal; it stays bridged");
                return Ok(());
            }
        }
        if portal.kind == PortalKind::Group
            && self.settings.bridge.bridge_matrix_leave
            && let Some(acc) = self.network.account(&portal.receiver)
        {
            let me = acc.account_id().to_owned();
            let leave = GroupChange {
                remove: vec![me],
                ..Default::default()
            };
            if let Err(e) = acc.update_group(&portal.chat_id, leave).await {
                if e.is_transient() {
                    return Err(e.into());
                }
                tracing::warn!(error = %e, "cannot leave the group on the network");
            }
        }
        self.close_portal(portal, true).await
    }

    /// Forgets a portal and empties its room of ghosts (and of the bot when `bot_leaves`).
    pub(crate) async fn close_portal(
        &self,
        portal: &Portal,
        bot_leaves: bool,
    ) -> Result<(), BridgeError> {
        self.portals
            .delete_portal(&portal.receiver, &portal.chat_id)
            .await?;
        // The chat stays known: its next message opens a new portal, not a message request.
        if let Err(e) = self.remember_known_chat(portal).await {
            tracing::warn!(error = %e, "cannot remember a closed chat");
        }
        let Some(room) = &portal.room_id else {
            return Ok(());
        };
        let bot = self.matrix.bot_mxid().to_owned();
        if let Ok(members) = self.matrix.joined_members(room, &bot).await {
            for m in members.iter().filter(|m| self.matrix.is_ghost(m)) {
                let _ = self.matrix.leave(room, m).await;
            }
        }
        if bot_leaves {
            let _ = self.matrix.leave(room, &bot).await;
        }
        tracing::info!(room_id = %room, "portal closed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avatar_types_by_magic() {
        assert_eq!(image_mimetype(b"\x89PNG\r\n\x1a\n...."), "image/png");
        assert_eq!(image_mimetype(b"\xff\xd8\xff\xe0"), "image/jpeg");
        assert_eq!(image_mimetype(b"GIF89a"), "image/gif");
        assert_eq!(image_mimetype(b"RIFF\0\0\0\0WEBPVP8 "), "image/webp");
        assert_eq!(image_mimetype(b""), "application/octet-stream");
        assert_eq!(avatar_content("").url, None);
        assert_eq!(
            avatar_content("mxc://x/y")
                .url
                .as_deref()
                .map(|u| u.as_str()),
            Some("mxc://x/y")
        );
    }
}
