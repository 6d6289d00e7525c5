//! The core's message model: what a chat message is, whichever side it came from.
//!
//! The Matrix side maps events to and from it (`portal.rs`, `msgconv.rs`); the interop side maps
//! the network's content encoding to and from it (`interop::convert`). Nothing here knows how
//! either side encodes a message.

/// One message of a chat: its content, and the message it replies to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Message {
    /// `None` for content this bridge does not know (a newer client's message type).
    pub body: Option<Body>,
    pub reply_to: Option<Quote>,
    /// The chat's disappearing-message timer as the sender knows it, in seconds (0: off): the
    /// message disappears that long after it was sent.
    pub expire_timer: u32,
}

/// What a message carries.
#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    Text(Text),
    Edit(Edit),
    Delete(Delete),
    Reaction(Reaction),
    Media(Media),
    Location(Location),
    Contact(ContactCard),
    Poll(Poll),
    PollVote(PollVote),
    PollEnd(PollEnd),
    Timer(Timer),
}

/// Sets the chat's disappearing-message timer: messages disappear `seconds` after they were
/// sent (0 turns it off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timer {
    pub seconds: u32,
}

/// The message a reply answers, by its network id and author.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quote {
    pub message_id: String,
    pub author: String,
}

/// Plain text with styled ranges; ranges count Unicode scalar values (code points) of `body`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Text {
    pub body: String,
    pub formats: Vec<Format>,
}

/// One styled range of a [`Text`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Format {
    pub style: Style,
    /// Code point offset into the text.
    pub start: u32,
    /// Length in code points.
    pub length: u32,
    /// [`Style::Link`]: the target; [`Style::Mention`]: the mentioned account.
    pub url: String,
}

/// How a range of text is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Style {
    Bold,
    Italic,
    Strikethrough,
    Monospace,
    CodeBlock,
    Quote,
    Link,
    Spoiler,
    Mention,
}

/// A new text for an earlier message of the same sender.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Edit {
    pub target: String,
    pub text: Option<Text>,
}

/// Deletes an earlier message of the same sender.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delete {
    pub target: String,
}

/// Adds (or, with `remove`, takes back) an emoji reaction to a message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reaction {
    pub target: String,
    pub emoji: String,
    pub remove: bool,
    pub target_author: String,
}

/// What kind of file a [`Media`] is; decides how it is shown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MediaKind {
    Image,
    Video,
    Audio,
    Voice,
    #[default]
    File,
    Sticker,
}

/// An attachment: the network blob holding its ciphertext, the keys to open it, and what a
/// client shows before opening it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Media {
    pub kind: MediaKind,
    /// The network's id of the encrypted blob.
    pub blob: String,
    /// The attachment's keys (encryption and MAC), as the network defines them.
    pub key: Vec<u8>,
    /// Digest of the encrypted blob.
    pub sha256: Vec<u8>,
    /// Size of the plaintext.
    pub size: u64,
    pub mimetype: String,
    pub filename: String,
    pub caption: Option<Text>,
    pub width: u32,
    pub height: u32,
    pub duration_ms: u32,
    /// A small JPEG, inline; empty for none.
    pub thumbnail: Vec<u8>,
    /// Voice messages: samples 0..=255; empty for none.
    pub waveform: Vec<u32>,
}

/// The most options a poll has (as on Matrix, MSC3381).
pub const MAX_POLL_OPTIONS: usize = 20;

/// A poll: a question and its options; voters pick up to `max_selections` (at least 1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Poll {
    pub question: String,
    pub options: Vec<String>,
    pub max_selections: u32,
}

/// A vote on the poll `target` (by `target_author`): indexes into its options. A later vote of
/// the same voter replaces it; an empty one takes it back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PollVote {
    pub target: String,
    pub target_author: String,
    pub selections: Vec<u32>,
}

/// Closes the sender's own poll `target`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PollEnd {
    pub target: String,
}

/// A shared location.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Location {
    pub latitude: f64,
    pub longitude: f64,
    pub name: String,
    pub address: String,
}

/// A shared contact.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContactCard {
    pub display_name: String,
    pub phone_numbers: Vec<String>,
    pub emails: Vec<String>,
    pub vcard: String,
}
