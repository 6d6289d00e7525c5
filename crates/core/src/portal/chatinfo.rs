//! A group's name, avatar and members on its portal room, both ways, and the end of a portal.

use ruma::events::{
    AnyStateEvent, AnyStateEventContent,
    room::{
        avatar::{RoomAvatarEvent, RoomAvatarEventContent},
        member::{MembershipState, RoomMemberEvent},
        name::{RoomNameEvent, RoomNameEventContent},
    },
};

use super::*;
use crate::network::GroupChange;

/// `m.room.avatar` content for an mxc URI; empty removes the avatar.
fn avatar_content(mxc: &str) -> RoomAvatarEventContent {
    let mut c = RoomAvatarEventContent::new();
    c.url = (!mxc.is_empty()).then(|| mxc.into());
    c
}

impl Bridge {
    /// A group changed on the network: members, name and avatar follow on its portal (a new
    /// portal when the login is a member of a group it has none for, past the request gate).
    pub(crate) async fn on_group_update(
        &self,
        mxid: &str,
        acc: &Arc<dyn NetAccount>,
        g: &GroupInfo,
        from: &str,
    ) -> Result<(), BridgeError> {
        let existing = self.portals.portal(mxid, &g.id).await?;
        if let Some(portal) = existing.and_then(|p| PortalRef::new(self, p)) {
            return portal.group_update(acc, g, from).await;
        }
        let chat = NetTarget::Group(g.id.clone());
        if g.members.iter().any(|m| m == acc.account_id())
            && self.request_gate(mxid, acc, &chat, from, None).await? == crate::requests::Gate::Open
        {
            self.ensure_portal(mxid, acc, &chat, Some(g)).await?;
        }
        Ok(())
    }

    /// Forgets a portal and empties its room of ghosts (and of the bot when `bot_leaves`).
    pub(crate) async fn close_portal(
        &self,
        portal: &Portal,
        bot_leaves: bool,
    ) -> Result<(), BridgeError> {
        self.portals
            .delete_portal(portal.receiver.as_str(), &portal.chat_id)
            .await?;
        // The chat stays known: its next message opens a new portal, not a message request.
        if let Err(e) = self.remember_known_chat(portal).await {
            tracing::warn!(error = %e, "cannot remember a closed chat");
        }
        let Some(room) = portal.room_id.as_ref().map(|r| r.as_str()) else {
            return Ok(());
        };
        self.remove_from_space(portal.receiver.as_str(), room).await;
        if !self.portals.portals_in_room(room).await?.is_empty() {
            // A shared group portal: the room goes on for the other logins in it, and is no
            // longer this user's to read.
            self.kick_from_shared(room, portal.receiver.as_str(), "left the bridged chat")
                .await;
            tracing::info!(room_id = %room, "a login left a shared group portal");
            return Ok(());
        }
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

impl PortalRef<'_> {
    /// The group changed on the network: members, name and avatar follow on the portal.
    async fn group_update(
        &self,
        acc: &Arc<dyn NetAccount>,
        g: &GroupInfo,
        from: &str,
    ) -> Result<(), BridgeError> {
        let me = acc.account_id().to_owned();
        let room = self.room.as_str();
        let mut portal = self.record.clone();
        let bot = self.bridge.matrix.bot_mxid().to_owned();
        // Users of a shared room who are no longer in the group lose their part of it.
        self.drop_former_members(&g.members).await?;
        let mut joined = self.bridge.matrix.joined_members(room, &bot).await?;
        // The room's own users (the logins sharing it) are there themselves, not as ghosts.
        let own = self.own_accounts().await?;
        for m in g.members.iter().filter(|m| **m != me && !own.contains(m)) {
            let ghost = self.bridge.ghost(m, Some(acc)).await?;
            if !joined.contains(&ghost) {
                self.bridge.matrix.invite(room, &bot, &ghost).await?;
                self.bridge.matrix.join(room, &ghost).await?;
                joined.push(ghost);
            }
        }
        for j in &joined {
            if let Some(account) = self.bridge.account_of_ghost(j)
                && (!g.members.contains(&account) || own.contains(&account))
            {
                self.bridge.matrix.leave(room, j).await?;
            }
        }
        // The change shows as made by the contact who made it, when their ghost is in the room.
        let changer = if from != me && g.members.iter().any(|m| m == from) {
            self.bridge.ghost_mxid(from)
        } else {
            bot.clone()
        };
        let mut changed = false;
        if portal.name != g.name {
            let name = RoomNameEventContent::new(g.name.clone());
            self.room_state(&changer, name.into()).await?;
            portal.name = g.name.clone();
            changed = true;
        }
        if portal.avatar_blob != g.avatar_blob {
            match self.bridge.avatar_to_matrix(acc, &g.avatar_blob).await {
                Ok(mxc) => {
                    self.room_state(&changer, avatar_content(&mxc).into())
                        .await?;
                    portal.avatar_blob = g.avatar_blob.clone();
                    portal.avatar_mxc = mxc;
                    changed = true;
                }
                Err(e) => tracing::warn!(error = %e, "cannot copy a group's avatar"),
            }
        }
        if changed {
            self.bridge.portals.update_portal_look(&portal).await?;
        }
        Ok(())
    }

    /// Sets room state as `changer`, or as the bot when the changer may not (a ghost that joined
    /// after the room was made has no power level of its own).
    async fn room_state(
        &self,
        changer: &str,
        content: AnyStateEventContent,
    ) -> Result<(), BridgeError> {
        let (room, bot) = (self.room.as_str(), self.bridge.matrix.bot_mxid());
        match self
            .bridge
            .matrix
            .send_state(room, changer, content.clone(), "")
            .await
        {
            Err(e) if changer != bot => {
                tracing::debug!(error = %e, "state change as the contact refused; sending it as the bot");
                self.bridge
                    .matrix
                    .send_state(room, bot, content, "")
                    .await
                    .map(|_| ())
            }
            r => r.map(|_| ()),
        }
    }

    /// A state change in the portal's room made on Matrix: the owner's changes to a group's
    /// name, avatar and members go to the network; the owner leaving ends the portal.
    pub(crate) async fn matrix_state(&self, ev: &AnyStateEvent) -> Result<(), BridgeError> {
        let sender = ev.sender().as_str();
        let room = self.room.as_str();
        let mut portal = self.record.clone();
        if sender == self.bridge.matrix.bot_mxid() || self.bridge.matrix.is_ghost(sender) {
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
            return self.owner_left().await;
        }
        if sender != portal.receiver {
            tracing::debug!("state change by a user who does not own the portal: not bridged");
            return Ok(());
        }
        let Some(acc) = self.bridge.network.account(sender) else {
            if !is_member {
                self.notice("Your change was not bridged: you are not logged in.")
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
                let Some(account) = self.bridge.account_of_ghost(target) else {
                    return Ok(());
                };
                if portal.kind == PortalKind::Dm {
                    if *membership == MembershipState::Invite && account != portal.chat_id {
                        self.bridge.matrix.leave(room, target).await?;
                        self.notice("A direct chat cannot have more members: use `create-group` for a group.",
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
                let blob = match self.bridge.avatar_to_network(&acc, &mxc).await {
                    Ok(b) => b,
                    Err(e) if e.is_retryable() => return Err(e),
                    Err(e) => {
                        self.notice(&format!("The group avatar was not bridged: {e}"))
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
                self.bridge.portals.update_portal_look(&portal).await?;
                if let Some(ghost) = invited_ghost {
                    self.bridge.matrix.join(room, &ghost).await?;
                }
                Ok(())
            }
            Err(e) if e.is_transient() => Err(e.into()),
            Err(e) => {
                if let Some(ghost) = invited_ghost {
                    let _ = self.bridge.matrix.leave(room, &ghost).await;
                }
                self.notice(&format!("Your change was not bridged: {e}"))
                    .await?;
                Ok(())
            }
        }
    }

    /// The owner left (or was removed from) their portal: the portal ends (unless it relays for
    /// others still in the room), and with `bridge.bridge_matrix_leave` the owner also leaves the
    /// group on the network. A later message in the chat opens a new portal.
    async fn owner_left(&self) -> Result<(), BridgeError> {
        let portal = &self.record;
        // A relayed room stays bridged for the people still in it.
        if portal.relay.is_some() {
            let room = self.room.as_str();
            let bot = self.bridge.matrix.bot_mxid().to_owned();
            let members = self.bridge.matrix.joined_members(room, &bot).await?;
            if members
                .iter()
                .any(|m| *m != bot && *m != portal.receiver && !self.bridge.matrix.is_ghost(m))
            {
                tracing::info!(room_id = %room, "the owner left a relayed portal; it stays bridged");
                return Ok(());
            }
        }
        if portal.kind == PortalKind::Group
            && self.bridge.settings.bridge.bridge_matrix_leave
            && let Some(acc) = self.bridge.network.account(portal.receiver.as_str())
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
        self.bridge.close_portal(portal, true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avatar_content_names_the_image() {
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
