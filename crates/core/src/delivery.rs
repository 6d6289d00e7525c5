//! Delivery receipts to the network: a message is reported delivered once it is on Matrix (as a
//! phone says once it has the message). One receipt per chat is on its way at a time, and the
//! messages bridged meanwhile go together in the next one (a receipt names several messages), so
//! a busy chat costs the gateway and the contact one receipt per round trip, not one per message.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use crate::network::NetAccount;

/// Messages named in one receipt (the wire protocol allows 1,000).
const MAX_IDS_PER_RECEIPT: usize = 100;
/// Messages kept per chat while its receipt is on its way; past it the oldest are dropped (a
/// delivery receipt is a courtesy to the sender: no message is lost without it).
const MAX_WAITING: usize = 1_000;

/// A chat: the login, the contact the receipt goes to, and the group.
type Chat = (String, String, Option<String>);

/// The chats with a receipt on its way, and the messages that wait for the next one.
#[derive(Clone, Default)]
pub(crate) struct DeliveryReceipts {
    waiting: Arc<std::sync::Mutex<HashMap<Chat, VecDeque<String>>>>,
}

impl DeliveryReceipts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Chat, VecDeque<String>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reports `message_id` from `from` (in `group`) delivered through the login `acc`: at once
    /// when no receipt of the chat is on its way, else with the next one. Never waits.
    pub(crate) fn delivered(
        &self,
        acc: &Arc<dyn NetAccount>,
        from: &str,
        group: Option<&str>,
        message_id: &str,
    ) {
        let chat = (
            acc.account_id().to_owned(),
            from.to_owned(),
            group.map(str::to_owned),
        );
        {
            let mut waiting = self.lock();
            if let Some(ids) = waiting.get_mut(&chat) {
                if ids.len() >= MAX_WAITING {
                    ids.pop_front();
                }
                ids.push_back(message_id.to_owned());
                return;
            }
            waiting.insert(chat.clone(), VecDeque::new());
        }
        let sender = Sender {
            receipts: self.clone(),
            chat,
            done: false,
        };
        tokio::spawn(sender.run(acc.clone(), vec![message_id.to_owned()]));
    }
}

/// Sends a chat's receipts until none waits; if its task ends early (the runtime shutting down),
/// the chat is freed so that later messages get receipts again.
struct Sender {
    receipts: DeliveryReceipts,
    chat: Chat,
    done: bool,
}

impl Sender {
    async fn run(mut self, acc: Arc<dyn NetAccount>, mut ids: Vec<String>) {
        let (to, group) = (self.chat.1.clone(), self.chat.2.clone());
        loop {
            for chunk in ids.chunks(MAX_IDS_PER_RECEIPT) {
                if let Err(e) = acc
                    .receipt(&to, group.as_deref(), false, chunk.to_vec())
                    .await
                {
                    tracing::debug!(error = %e, "delivery receipt not sent");
                }
            }
            let mut waiting = self.receipts.lock();
            match waiting.get_mut(&self.chat) {
                Some(next) if !next.is_empty() => ids = next.drain(..).collect(),
                _ => {
                    waiting.remove(&self.chat);
                    self.done = true;
                    return;
                }
            }
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if !self.done {
            self.receipts.lock().remove(&self.chat);
        }
    }
}
