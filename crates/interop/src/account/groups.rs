//! Groups: members as last seen, sender keys and their distribution, and group requests.

use super::*;

impl Actor {
    /// Whether `account` is a member of `group` (asking the gateway again when the members as
    /// last seen do not include it).
    pub(super) async fn is_member(
        &mut self,
        group: &str,
        account: &str,
    ) -> Result<bool, InteropError> {
        if self
            .groups
            .get(group)
            .is_some_and(|m| m.iter().any(|a| a == account))
        {
            return Ok(true);
        }
        self.groups.remove(group);
        match self.group_members(group).await {
            Ok(m) => Ok(m.iter().any(|a| a == account)),
            // Not a member (or no such group): a definite no.
            Err(e) if !e.is_transient() => {
                tracing::debug!(error = %e, "cannot look up a group's members");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    pub(super) async fn group_members(&mut self, group: &str) -> Result<Vec<String>, InteropError> {
        if let Some(m) = self.groups.get(group) {
            return Ok(m.clone());
        }
        match self
            .conn()?
            .request(Body::GetGroup(pb::GetGroup {
                group: group.to_owned(),
            }))
            .await?
        {
            Body::Group(g) => {
                self.groups.insert(g.id.clone(), g.members.clone());
                Ok(g.members)
            }
            _ => Err(InteropError::Unexpected),
        }
    }

    /// The sender key distribution id for `group`, distributed to every other member.
    pub(super) async fn ensure_sender_key(
        &mut self,
        group: &str,
    ) -> Result<uuid::Uuid, InteropError> {
        let dist_name = format!("dist/{group}");
        let dist = match self.store.read_extra(META, &dist_name).await? {
            Some(raw) => uuid::Uuid::from_slice(&raw)
                .map_err(|_| InteropError::Invalid("corrupt distribution id".into()))?,
            None => {
                let d = uuid::Uuid::new_v4();
                self.store
                    .commit(vec![
                        (META, dist_name.clone(), Some(d.as_bytes().to_vec())),
                        (META, format!("skdm/{group}"), None),
                    ])
                    .await?;
                d
            }
        };
        let sent_name = format!("skdm/{group}");
        let mut sent: Vec<String> = self
            .store
            .read_extra(META, &sent_name)
            .await?
            .and_then(|raw| serde_json::from_slice(&raw).ok())
            .unwrap_or_default();
        let members = self.group_members(group).await?;
        let me = self.creds.account.clone();
        let missing: Vec<String> = members
            .into_iter()
            .filter(|m| *m != me && !sent.contains(m))
            .collect();
        if missing.is_empty() {
            return Ok(dist);
        }
        let skdm = create_sender_key_distribution_message(
            &addr(&me),
            dist,
            &mut self.store.sender_keys,
            &mut rand::rng(),
        )
        .await
        .map_err(crypto)?;
        self.store.commit(vec![]).await?;
        let content = Content {
            body: Some(CBody::SenderKeyDistribution(
                content::SenderKeyDistribution {
                    group: group.to_owned(),
                    distribution_message: skdm.serialized().to_vec(),
                },
            )),
        }
        .encode_to_vec();
        for m in missing {
            let (kind, ciphertext) = self.encrypt_for(&m, &content).await?;
            let send = pb::Send {
                to: m.clone(),
                group: String::new(),
                kind: kind as i32,
                ciphertext,
                message_id: uuid::Uuid::new_v4().to_string(),
                timestamp: mib_core::now_ms(),
            };
            self.conn()?.request(Body::Send(send)).await?;
            sent.push(m);
        }
        self.store
            .commit(vec![(
                META,
                sent_name,
                Some(serde_json::to_vec(&sent).expect("serializes")),
            )])
            .await?;
        Ok(dist)
    }

    /// A member left or was removed: start a new sender key so they cannot read what follows.
    /// A request answered by a `Group` (create, update, get); the member list is kept up to date.
    pub(super) async fn group_request(&mut self, body: Body) -> Result<pb::Group, InteropError> {
        match self.conn()?.request(body).await? {
            Body::Group(g) => {
                self.group_changed(&g).await;
                Ok(g)
            }
            _ => Err(InteropError::Unexpected),
        }
    }

    pub(super) async fn group_changed(&mut self, g: &pb::Group) {
        let before = self
            .groups
            .insert(g.id.clone(), g.members.clone())
            .unwrap_or_default();
        let removed = before.iter().any(|m| !g.members.contains(m));
        if removed {
            let _ = self
                .store
                .commit(vec![
                    (META, format!("dist/{}", g.id), None),
                    (META, format!("skdm/{}", g.id), None),
                ])
                .await;
        }
    }
}
