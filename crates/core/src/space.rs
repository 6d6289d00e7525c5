//! Personal spaces: each login gets a space (`m.space`) that holds its portals, made at login,
//! filled as portals appear and emptied as they close, and left at logout, as mautrix's personal
//! filtering spaces are. Space upkeep never fails what caused it: a portal is bridged whether or
//! not its space could be told.

use std::collections::BTreeMap;

use ruma::events::{AnyStateEventContent, space::child::SpaceChildEventContent};

use super::{
    Bridge, BridgeError,
    types::{BridgeInfo, NewRoom, PowerLevels},
};

impl Bridge {
    /// The login's space, made (with the user invited, and the portals it has so far) if it
    /// has none; `None` when personal spaces are off.
    pub(crate) async fn ensure_space(&self, mxid: &str) -> Result<Option<String>, BridgeError> {
        Ok(self.space_of(mxid).await?.map(|(space, _)| space))
    }

    /// The login's space and whether it was made just now (holding every portal already).
    async fn space_of(&self, mxid: &str) -> Result<Option<(String, bool)>, BridgeError> {
        if !self.settings.bridge.personal_spaces {
            return Ok(None);
        }
        if let Some(space) = self.users.space_room(mxid).await? {
            return Ok(Some((space, false)));
        }
        let account = self.portals.login(mxid).await?.unwrap_or_default();
        let bot = self.matrix.bot_mxid().to_owned();
        let events = [
            "m.space.child",
            "m.room.power_levels",
            "m.room.name",
            "m.room.avatar",
        ]
        .map(|ty| (ty.to_owned(), 100))
        .into();
        let room = NewRoom {
            name: Some(format!("Interop ({account})")),
            is_direct: false,
            invite: vec![mxid.to_owned()],
            bridge: BridgeInfo {
                bot: bot.clone(),
                protocol: ("interop".into(), "Interop".into()),
                channel: (account.clone(), account),
            },
            power_levels: PowerLevels {
                users: BTreeMap::from([(bot, 100), (mxid.to_owned(), 50)]),
                redact: 50,
                kick: 100,
                ban: 100,
                events,
            },
            avatar_mxc: None,
            encrypted: false,
            space: true,
        };
        let space = self.matrix.create_room(room).await?;
        self.users.set_space_room(mxid, Some(&space)).await?;
        tracing::info!(space = %space, "personal space created");
        for p in self.portals.portals_of(mxid).await? {
            if let Some(r) = p.room_id {
                self.set_space_child(&space, r.as_str(), true).await;
            }
        }
        Ok(Some((space, true)))
    }

    /// Puts a new portal room into its owner's space (making the space if needed).
    pub(crate) async fn add_to_space(&self, mxid: &str, room_id: &str) {
        match self.space_of(mxid).await {
            Ok(Some((space, false))) => self.set_space_child(&space, room_id, true).await,
            // A space made just now holds the portal already.
            Ok(Some((_, true)) | None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot make a personal space"),
        }
    }

    /// Takes a closed portal's room out of its owner's space.
    pub(crate) async fn remove_from_space(&self, mxid: &str, room_id: &str) {
        if let Ok(Some(space)) = self.users.space_room(mxid).await {
            self.set_space_child(&space, room_id, false).await;
        }
    }

    /// The login ended: the bot leaves the space and forgets it (the user keeps an empty space
    /// they can leave; a new login makes a new one).
    pub(crate) async fn close_space(&self, mxid: &str) {
        let Ok(Some(space)) = self.users.space_room(mxid).await else {
            return;
        };
        let bot = self.matrix.bot_mxid().to_owned();
        if let Err(e) = self.matrix.leave(&space, &bot).await {
            tracing::warn!(error = %e, "cannot leave a personal space");
        }
        if let Err(e) = self.users.set_space_room(mxid, None).await {
            tracing::warn!(error = %e, "cannot forget a personal space");
        }
    }

    /// `m.space.child` for `room_id` in `space`: with a `via` it is a child; without, it is
    /// not (the spec's way of removing one).
    async fn set_space_child(&self, space: &str, room_id: &str, present: bool) {
        let via = if present {
            vec![self.settings.homeserver_domain.clone()]
        } else {
            Vec::new()
        };
        let Ok(via) = via
            .into_iter()
            .map(ruma::OwnedServerName::try_from)
            .collect::<Result<Vec<_>, _>>()
        else {
            tracing::warn!("the homeserver domain is not a server name");
            return;
        };
        let content = AnyStateEventContent::SpaceChild(SpaceChildEventContent::new(via));
        let bot = self.matrix.bot_mxid().to_owned();
        if let Err(e) = self.matrix.send_state(space, &bot, content, room_id).await {
            tracing::warn!(error = %e, "cannot update a personal space");
        }
    }
}
