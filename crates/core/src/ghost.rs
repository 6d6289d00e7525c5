//! Ghosts: the Matrix users that stand for interop contacts (bridgev2's `Ghost`). Their user
//! ids follow `username_template`; their display names and avatars follow the contacts'
//! profiles; and the homeserver's queries for users in the bridge's namespace are answered here,
//! at a bounded rate.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Bridge, BridgeError, network::NetAccount};

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

impl Bridge {
    pub(crate) fn ghost_localpart(&self, account: &str) -> String {
        self.settings
            .username_template
            .replace("{id}", account.trim_start_matches('+'))
    }

    pub(crate) fn ghost_mxid(&self, account: &str) -> String {
        format!(
            "@{}:{}",
            self.ghost_localpart(account),
            self.settings.homeserver_domain
        )
    }

    /// The interop account a ghost stands for.
    pub(crate) fn account_of_ghost(&self, mxid: &str) -> Option<String> {
        let (prefix, suffix) = self.settings.username_template.split_once("{id}")?;
        let local = mxid
            .strip_prefix('@')?
            .strip_suffix(&format!(":{}", self.settings.homeserver_domain))?;
        let digits = local.strip_prefix(prefix)?.strip_suffix(suffix)?;
        let account = format!("+{digits}");
        self.network.is_valid_account(&account).then_some(account)
    }

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
        match self.resolve_account(&account, None).await {
            Ok(found) => found.is_some(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot look up a ghost");
                false
            }
        }
    }

    /// The ghost of `account` if the account exists on the network: known ghosts at once, others
    /// looked up through `via` (or any connected login) and registered. Anyone on the homeserver
    /// can make the bridge ask (by inviting a made-up id, or through a third-party look-up), so
    /// the network is asked at a bounded rate, and an unknown account is not asked about again for
    /// a while: `Ok(None)` for an account that does not exist, or that could not be asked about now.
    pub(crate) async fn resolve_account(
        &self,
        account: &str,
        via: Option<&Arc<dyn NetAccount>>,
    ) -> Result<Option<String>, BridgeError> {
        if !self.network.is_valid_account(account) {
            return Ok(None);
        }
        if self.portals.ghost_profile(account).await?.is_some() {
            return Ok(Some(self.ghost_mxid(account)));
        }
        if !self.user_lookups.lock().await.allow(account) {
            self.metrics.refused("user_query_rate");
            return Ok(None);
        }
        let acc = match via {
            Some(acc) => acc.clone(),
            None => match self.network.any_account() {
                Some(acc) => acc,
                None => return Ok(None),
            },
        };
        // `ghost` registers unknown accounts too, so the network is asked first.
        match acc.profile(account).await {
            Ok(Some(_)) => {}
            // Only a definite "no such account" is remembered; a failed look-up is not.
            Ok(None) => {
                self.user_lookups.lock().await.miss(account);
                return Ok(None);
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot look up an account");
                return Ok(None);
            }
        }
        self.ghost(account, Some(&acc)).await.map(Some)
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
    pub(crate) async fn avatar_to_network(
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
}

/// Bounds the network look-ups that user queries cause: a token bucket (a burst of
/// [`LookupLimit::BURST`], then one every [`LookupLimit::EVERY`]) and a memory of accounts the
/// network did not know (forgotten after [`LookupLimit::MISS_TTL`]; bounded in size).
pub(crate) struct LookupLimit {
    tokens: f64,
    last: Instant,
    misses: HashMap<String, Instant>,
}

impl LookupLimit {
    const BURST: f64 = 20.0;
    const EVERY: std::time::Duration = std::time::Duration::from_secs(3);
    const MISS_TTL: std::time::Duration = std::time::Duration::from_secs(600);
    const MAX_MISSES: usize = 10_000;

    pub(crate) fn new() -> Self {
        Self {
            tokens: Self::BURST,
            last: Instant::now(),
            misses: HashMap::new(),
        }
    }

    /// Whether the network may be asked about `account` now (takes a token).
    pub(crate) fn allow(&mut self, account: &str) -> bool {
        if self
            .misses
            .get(account)
            .is_some_and(|t| t.elapsed() < Self::MISS_TTL)
        {
            return false;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() / Self::EVERY.as_secs_f64();
        self.tokens = (self.tokens + refill).min(Self::BURST);
        self.last = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// The network does not know `account`.
    pub(crate) fn miss(&mut self, account: &str) {
        if self.misses.len() >= Self::MAX_MISSES {
            self.misses.retain(|_, t| t.elapsed() < Self::MISS_TTL);
            if self.misses.len() >= Self::MAX_MISSES {
                self.misses.clear();
            }
        }
        self.misses.insert(account.to_owned(), Instant::now());
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
    }
}
