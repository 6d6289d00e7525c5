//! The provisioning operations (the same as the bot's login and chat commands, for integrations),
//! with structured results. The HTTP side lives in `appservice::provisioning`.

use async_trait::async_trait;
use serde::Serialize;

use super::settings::PermissionLevel;
use super::{
    Bridge,
    commands::Pending,
    contacts::{Contact, Resolved},
    network::{NetError, NetTarget},
};

#[derive(Debug, thiserror::Error)]
pub enum ProvError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<NetError> for ProvError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Unavailable(m) => ProvError::Unavailable(m),
            NetError::BadCode | NetError::CodeExpired => ProvError::BadRequest(e.to_string()),
            NetError::NotFound(m) => ProvError::NotFound(m),
            NetError::NotLoggedIn => ProvError::Forbidden(e.to_string()),
            NetError::Refused(m) => ProvError::BadRequest(m),
            NetError::Other(m) => ProvError::Internal(m),
        }
    }
}

impl From<super::BridgeError> for ProvError {
    fn from(e: super::BridgeError) -> Self {
        // What may work later (a database or homeserver outage) is "unavailable", not a fault.
        if e.is_retryable() {
            ProvError::Unavailable(e.to_string())
        } else {
            ProvError::Internal(e.to_string())
        }
    }
}

impl From<super::store::StoreError> for ProvError {
    fn from(e: super::store::StoreError) -> Self {
        ProvError::Internal(e.to_string())
    }
}

#[derive(Debug, Serialize)]
pub struct LoginInfo {
    pub identifier: String,
    pub connected: bool,
}

#[derive(Debug, Serialize)]
pub struct ChatInfo {
    pub chat_id: String,
    pub kind: &'static str,
    pub name: String,
    pub room_id: Option<String>,
}

#[async_trait]
pub trait Provisioning: Send + Sync {
    async fn login_start(&self, user: &str, identifier: &str) -> Result<(), ProvError>;
    async fn login_verify(&self, user: &str, code: &str) -> Result<LoginInfo, ProvError>;
    async fn logout(&self, user: &str) -> Result<(), ProvError>;
    async fn logins(&self, user: &str) -> Result<Vec<LoginInfo>, ProvError>;
    async fn start_chat(&self, user: &str, contact: &str) -> Result<ChatInfo, ProvError>;
    async fn chats(&self, user: &str) -> Result<Vec<ChatInfo>, ProvError>;
    async fn contacts(&self, user: &str) -> Result<Vec<Contact>, ProvError>;
    async fn search(&self, user: &str, query: &str) -> Result<Vec<Contact>, ProvError>;
    /// With several workers: the base URL of the worker running `user`'s login when it is not
    /// this one (requests that need the running login go there).
    async fn login_worker_url(&self, _user: &str) -> Result<Option<String>, ProvError> {
        Ok(None)
    }
}

impl Bridge {
    fn check_user(&self, user: &str) -> Result<(), ProvError> {
        if !user.starts_with('@') || !user.contains(':') {
            return Err(ProvError::BadRequest(
                "user_id must be a Matrix user id".into(),
            ));
        }
        if self.permission_of(user) < PermissionLevel::User {
            return Err(ProvError::Forbidden(format!(
                "{user} may not use the bridge"
            )));
        }
        Ok(())
    }

    fn login_info(&self, user: &str, identifier: String) -> LoginInfo {
        let connected = self.network.account(user).is_some_and(|a| a.is_connected());
        LoginInfo {
            identifier,
            connected,
        }
    }
}

fn chat_info(p: super::types::Portal) -> ChatInfo {
    ChatInfo {
        chat_id: p.chat_id,
        kind: match p.kind {
            super::types::PortalKind::Dm => "dm",
            super::types::PortalKind::Group => "group",
        },
        name: p.name,
        room_id: p.room_id.map(String::from),
    }
}

#[async_trait]
impl Provisioning for Bridge {
    async fn login_start(&self, user: &str, identifier: &str) -> Result<(), ProvError> {
        self.check_user(user)?;
        if let Some(a) = self.portals.login(user).await? {
            return Err(ProvError::Conflict(format!("already logged in as {a}")));
        }
        if !self.network.is_valid_account(identifier) {
            return Err(ProvError::BadRequest(
                "identifier must be + and 8 to 15 digits".into(),
            ));
        }
        self.network.request_code(identifier).await?;
        self.set_pending(
            user,
            &Pending::LoginCode {
                account: identifier.to_owned(),
            },
        )
        .await
        .map_err(|e| ProvError::Internal(e.to_string()))?;
        Ok(())
    }

    async fn login_verify(&self, user: &str, code: &str) -> Result<LoginInfo, ProvError> {
        self.check_user(user)?;
        let Some(Pending::LoginCode { account }) = self
            .pending(user)
            .await
            .map_err(|e| ProvError::Internal(e.to_string()))?
        else {
            return Err(ProvError::BadRequest(
                "no login in progress: call login/start first".into(),
            ));
        };
        self.claim_login(user)
            .await
            .map_err(|e| ProvError::Conflict(e.to_string()))?;
        let verified = self
            .network
            .verify_and_connect(user, &account, code.trim())
            .await;
        if verified.is_err() {
            // Not logged in after all: the lease taken for it goes.
            self.release_login(user).await;
        }
        match verified {
            Ok(_) => {
                let _ = self.take_pending(user).await;
                self.portals.set_login(user, &account).await?;
                if let Err(e) = self.ensure_space(user).await {
                    tracing::warn!(error = %e, "cannot make a personal space");
                }
                Ok(self.login_info(user, account))
            }
            Err(NetError::CodeExpired) => {
                let _ = self.take_pending(user).await;
                Err(NetError::CodeExpired.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn logout(&self, user: &str) -> Result<(), ProvError> {
        self.check_user(user)?;
        if self.portals.login(user).await?.is_none() {
            return Err(ProvError::NotFound("not logged in".into()));
        }
        let outcome = self.run_command("", user, "logout").await;
        if outcome.body.starts_with("Logged out") {
            Ok(())
        } else {
            Err(ProvError::Internal(outcome.body))
        }
    }

    async fn logins(&self, user: &str) -> Result<Vec<LoginInfo>, ProvError> {
        self.check_user(user)?;
        Ok(self
            .portals
            .login(user)
            .await?
            .map(|a| self.login_info(user, a))
            .into_iter()
            .collect())
    }

    async fn start_chat(&self, user: &str, contact: &str) -> Result<ChatInfo, ProvError> {
        self.check_user(user)?;
        let acc = self
            .network
            .account(user)
            .ok_or_else(|| ProvError::Forbidden("not logged in".into()))?;
        let contact = match self.resolve_contact(user, contact).await? {
            Resolved::Account(a) => a,
            Resolved::Unknown => {
                return Err(ProvError::NotFound(format!(
                    "no contact named `{contact}`: give a number (+ and 8 to 15 digits) or a contact's name"
                )));
            }
            Resolved::Ambiguous(cs) => {
                let names: Vec<String> = cs
                    .iter()
                    .map(|c| format!("{} ({})", c.name, c.account))
                    .collect();
                return Err(ProvError::Conflict(format!(
                    "`{contact}` names several contacts: {}",
                    names.join(", ")
                )));
            }
        };
        let contact = contact.as_str();
        if contact == acc.account_id() {
            return Err(ProvError::BadRequest(
                "that is the user's own identifier".into(),
            ));
        }
        if acc.profile(contact).await?.is_none() {
            return Err(ProvError::NotFound(format!(
                "{contact} is not on the interop network"
            )));
        }
        let portal = self
            .ensure_portal(user, &acc, &NetTarget::Contact(contact.to_owned()), None)
            .await
            .map_err(|e| ProvError::Internal(e.to_string()))?;
        // Opening the chat answers its message request, if there is one.
        if let Err(e) = self.accept_request(user, &acc, contact).await {
            tracing::warn!(error = %e, "cannot bridge a request's held messages");
        }
        Ok(chat_info(portal.record))
    }

    async fn chats(&self, user: &str) -> Result<Vec<ChatInfo>, ProvError> {
        self.check_user(user)?;
        Ok(self
            .portals
            .portals_of(user)
            .await?
            .into_iter()
            .map(chat_info)
            .collect())
    }

    async fn contacts(&self, user: &str) -> Result<Vec<Contact>, ProvError> {
        self.check_user(user)?;
        Ok(Bridge::contacts(self, user).await?)
    }

    async fn login_worker_url(&self, user: &str) -> Result<Option<String>, ProvError> {
        let Some(cluster) = self.cluster.get() else {
            return Ok(None);
        };
        if self.network.account(user).is_some() {
            return Ok(None);
        }
        let Some(worker) = cluster.login_worker(user).await? else {
            return Ok(None);
        };
        Ok(self.kv.kv_get(&worker_url_key(&worker)).await?)
    }

    async fn search(&self, user: &str, query: &str) -> Result<Vec<Contact>, ProvError> {
        self.check_user(user)?;
        if self.network.account(user).is_none() {
            return Err(ProvError::Forbidden("not logged in".into()));
        }
        Ok(self.search_contacts(user, query).await?)
    }
}

/// The key under which a worker keeps the base URL others reach it at (`workers.url`).
pub fn worker_url_key(worker: &str) -> String {
    format!("worker_url:{worker}")
}
