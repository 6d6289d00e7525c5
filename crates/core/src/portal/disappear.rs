//! Disappearing messages: a chat's timer, set from either side, and the redaction of its bridged
//! messages once the timer has run out for them. The schedule is in the database, so it
//! survives restarts; the network's clients delete their own copies (the timer travels with
//! every message, docs/interop-protocol.md §15).

use std::time::Duration;

use super::*;

/// How often the schedule is looked at.
const TICK: Duration = Duration::from_secs(1);

/// The most redactions per look.
const BATCH: u32 = 100;

/// The longest timer: a year.
pub(crate) const MAX_TIMER_S: u32 = 365 * 86_400;

/// The room state a timer is shown as (as mautrix bridges show it).
pub(crate) const TIMER_STATE: &str = "com.beeper.disappearing_timer";

/// A timer as the user writes it: `off`, or a number with `s`, `m`, `h`, `d` or `w` (`30s`,
/// `5m`, `1h`, `1d`, `1w`); at most [`MAX_TIMER_S`].
pub(crate) fn parse_timer(arg: &str) -> Option<u32> {
    let arg = arg.trim().to_lowercase();
    if arg == "off" || arg == "0" {
        return Some(0);
    }
    let (digits, unit) = arg.split_at(arg.find(|c: char| !c.is_ascii_digit())?.min(arg.len()));
    let n: u64 = digits.parse().ok()?;
    let scale = match unit.trim() {
        "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "m" | "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        "w" | "week" | "weeks" => 7 * 86_400,
        _ => return None,
    };
    u32::try_from(n.checked_mul(scale)?)
        .ok()
        .filter(|s| *s > 0 && *s <= MAX_TIMER_S)
}

/// What the room is told when `by` set the timer to `seconds`.
pub(crate) fn timer_text(by: &str, seconds: u32) -> String {
    match seconds {
        0 => format!("{by} turned disappearing messages off."),
        s => format!(
            "{by} set disappearing messages to {}: new messages disappear that long after they are sent.",
            describe_timer(s)
        ),
    }
}

/// A timer for people: "off", "1 day", "90 seconds".
pub(crate) fn describe_timer(seconds: u32) -> String {
    let unit = [
        (7 * 86_400, "week"),
        (86_400, "day"),
        (3600, "hour"),
        (60, "minute"),
    ]
    .into_iter()
    .find(|(s, _)| seconds.is_multiple_of(*s) && seconds >= *s);
    let (n, name) = match unit {
        _ if seconds == 0 => return "off".to_owned(),
        Some((s, name)) => (seconds / s, name),
        None => (seconds, "second"),
    };
    format!("{n} {name}{}", if n == 1 { "" } else { "s" })
}

impl PortalRef<'_> {
    /// The chat's timer is now `seconds` (0: off): kept, and shown as room state.
    pub(crate) async fn set_timer(&self, seconds: u32) -> Result<(), BridgeError> {
        let room = self.room.as_str();
        self.bridge
            .portals
            .set_disappear_timer(room, seconds)
            .await?;
        let content = if seconds == 0 {
            json!({})
        } else {
            json!({"type": "after_send", "timer": u64::from(seconds) * 1000})
        };
        let bot = self.bridge.matrix.bot_mxid().to_owned();
        self.bridge
            .matrix
            .send_state_json(room, &bot, TIMER_STATE, "", content)
            .await?;
        Ok(())
    }

    /// The portal's event `event_id`, sent at `sent_ms`, disappears `seconds` later (never for
    /// 0).
    pub(crate) async fn disappear_later(
        &self,
        event_id: &str,
        sent_ms: u64,
        seconds: u32,
    ) -> Result<(), BridgeError> {
        if seconds == 0 || event_id.is_empty() {
            return Ok(());
        }
        let due = sent_ms.saturating_add(u64::from(seconds.min(MAX_TIMER_S)) * 1000);
        Ok(self
            .bridge
            .portals
            .disappear_at(
                self.room.as_str(),
                event_id,
                i64::try_from(due).unwrap_or(i64::MAX),
            )
            .await?)
    }
}

impl Bridge {
    /// Redacts the bridged messages whose time has come (as the bot, which may redact in its
    /// portals); returns how many left the schedule. One the homeserver cannot take now stays
    /// for the next look; one it refuses (a room the bot left) leaves the schedule with a
    /// warning.
    pub async fn redact_due(&self, now_ms: u64) -> Result<usize, BridgeError> {
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let bot = self.matrix.bot_mxid().to_owned();
        let mut done = 0;
        for (room, event) in self.portals.due_to_disappear(now, BATCH).await? {
            match self.matrix.redact(&room, &bot, &event).await {
                Ok(()) => {}
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, %room, "cannot redact a disappearing message now; trying again");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, %room, "a disappearing message cannot be redacted; it leaves the schedule");
                }
            }
            self.portals.disappeared(&room, &event).await?;
            done += 1;
        }
        Ok(done)
    }

    /// Redacts due messages every second, for as long as the bridge runs.
    pub async fn run_disappearing(self: Arc<Self>) {
        loop {
            tokio::time::sleep(TICK).await;
            if let Err(e) = self.redact_due(crate::now_ms()).await {
                tracing::warn!(error = %e, "cannot read the disappearing messages");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_are_read_and_told_as_people_write_them() {
        for (arg, s) in [
            ("off", Some(0)),
            ("30s", Some(30)),
            ("5m", Some(300)),
            ("1 h", Some(3600)),
            ("2d", Some(172_800)),
            ("1w", Some(604_800)),
            ("90", None),
            ("1y", None),
            ("0h", None),
            ("999999w", None),
            ("", None),
        ] {
            assert_eq!(parse_timer(arg), s, "{arg}");
        }
        assert_eq!(describe_timer(0), "off");
        assert_eq!(describe_timer(86_400), "1 day");
        assert_eq!(describe_timer(90), "90 seconds");
        assert_eq!(describe_timer(7200), "2 hours");
        assert_eq!(describe_timer(1), "1 second");
    }
}
