//! The network's content encoding (`proto/content.proto`) to and from the core's message model.
//!
//! Decoding is total: a style or media type this bridge does not know is dropped (a range) or
//! shown as a file (an attachment), never an error, so a newer client's message still arrives.

use prost::Message as _;

use mib_core::model::{
    Body, ContactCard, Delete, Edit, Format, Location, Media, MediaKind, Message, Poll, PollEnd,
    PollVote, Quote, Reaction, Style, Text, Timer,
};
use mib_wire::content::{self as pb, data_message::Body as PbBody, format::Style as PbStyle};

/// A decoded `DataMessage` in the core's terms.
pub fn to_model(m: pb::DataMessage) -> Message {
    Message {
        body: m.body.map(|b| match b {
            PbBody::Text(t) => Body::Text(text(t)),
            PbBody::Edit(e) => Body::Edit(Edit {
                target: e.target,
                text: e.text.map(text),
            }),
            PbBody::Delete(d) => Body::Delete(Delete { target: d.target }),
            PbBody::Reaction(r) => Body::Reaction(Reaction {
                target: r.target,
                emoji: r.emoji,
                remove: r.remove,
                target_author: r.target_author,
            }),
            PbBody::Media(m) => Body::Media(media(m)),
            PbBody::Location(l) => Body::Location(Location {
                latitude: l.latitude,
                longitude: l.longitude,
                name: l.name,
                address: l.address,
            }),
            PbBody::Contact(c) => Body::Contact(ContactCard {
                display_name: c.display_name,
                phone_numbers: c.phone_numbers,
                emails: c.emails,
                vcard: c.vcard,
            }),
            PbBody::Poll(p) => Body::Poll(Poll {
                question: p.question,
                options: p.options,
                max_selections: p.max_selections,
            }),
            PbBody::PollVote(v) => Body::PollVote(PollVote {
                target: v.target,
                target_author: v.target_author,
                selections: v.selections,
            }),
            PbBody::PollEnd(e) => Body::PollEnd(PollEnd { target: e.target }),
            PbBody::Timer(t) => Body::Timer(Timer { seconds: t.seconds }),
        }),
        reply_to: m.reply_to.map(|q| Quote {
            message_id: q.message_id,
            author: q.author,
        }),
        expire_timer: m.expire_timer,
    }
}

/// The core's message as a `DataMessage`.
pub fn to_wire(m: &Message) -> pb::DataMessage {
    pb::DataMessage {
        body: m.body.as_ref().map(|b| match b {
            Body::Text(t) => PbBody::Text(wire_text(t)),
            Body::Edit(e) => PbBody::Edit(pb::Edit {
                target: e.target.clone(),
                text: e.text.as_ref().map(wire_text),
            }),
            Body::Delete(d) => PbBody::Delete(pb::Delete {
                target: d.target.clone(),
            }),
            Body::Reaction(r) => PbBody::Reaction(pb::Reaction {
                target: r.target.clone(),
                emoji: r.emoji.clone(),
                remove: r.remove,
                target_author: r.target_author.clone(),
            }),
            Body::Media(m) => PbBody::Media(wire_media(m)),
            Body::Location(l) => PbBody::Location(pb::Location {
                latitude: l.latitude,
                longitude: l.longitude,
                name: l.name.clone(),
                address: l.address.clone(),
            }),
            Body::Contact(c) => PbBody::Contact(pb::ContactCard {
                display_name: c.display_name.clone(),
                phone_numbers: c.phone_numbers.clone(),
                emails: c.emails.clone(),
                vcard: c.vcard.clone(),
            }),
            Body::Poll(p) => PbBody::Poll(pb::Poll {
                question: p.question.clone(),
                options: p.options.clone(),
                max_selections: p.max_selections,
            }),
            Body::PollVote(v) => PbBody::PollVote(pb::PollVote {
                target: v.target.clone(),
                target_author: v.target_author.clone(),
                selections: v.selections.clone(),
            }),
            Body::PollEnd(e) => PbBody::PollEnd(pb::PollEnd {
                target: e.target.clone(),
            }),
            Body::Timer(t) => PbBody::Timer(pb::Timer { seconds: t.seconds }),
        }),
        reply_to: m.reply_to.as_ref().map(|q| pb::Quote {
            message_id: q.message_id.clone(),
            author: q.author.clone(),
        }),
        expire_timer: m.expire_timer,
    }
}

/// A message in the network's encoding (protobuf `DataMessage`).
pub fn encode(m: &Message) -> Vec<u8> {
    to_wire(m).encode_to_vec()
}

/// The reverse of [`encode`].
pub fn decode(bytes: &[u8]) -> Result<Message, prost::DecodeError> {
    pb::DataMessage::decode(bytes).map(to_model)
}

/// A `Text` in the core's terms; ranges of an unknown style are dropped.
pub fn text(t: pb::Text) -> Text {
    Text {
        body: t.body,
        formats: t
            .formats
            .into_iter()
            .filter_map(|f| {
                let style = match PbStyle::try_from(f.style).ok()? {
                    PbStyle::Unspecified => return None,
                    PbStyle::Bold => Style::Bold,
                    PbStyle::Italic => Style::Italic,
                    PbStyle::Strikethrough => Style::Strikethrough,
                    PbStyle::Monospace => Style::Monospace,
                    PbStyle::CodeBlock => Style::CodeBlock,
                    PbStyle::Quote => Style::Quote,
                    PbStyle::Link => Style::Link,
                    PbStyle::Spoiler => Style::Spoiler,
                    PbStyle::Mention => Style::Mention,
                };
                Some(Format {
                    style,
                    start: f.start,
                    length: f.length,
                    url: f.url,
                })
            })
            .collect(),
    }
}

fn wire_text(t: &Text) -> pb::Text {
    pb::Text {
        body: t.body.clone(),
        formats: t
            .formats
            .iter()
            .map(|f| pb::Format {
                style: match f.style {
                    Style::Bold => PbStyle::Bold,
                    Style::Italic => PbStyle::Italic,
                    Style::Strikethrough => PbStyle::Strikethrough,
                    Style::Monospace => PbStyle::Monospace,
                    Style::CodeBlock => PbStyle::CodeBlock,
                    Style::Quote => PbStyle::Quote,
                    Style::Link => PbStyle::Link,
                    Style::Spoiler => PbStyle::Spoiler,
                    Style::Mention => PbStyle::Mention,
                } as i32,
                start: f.start,
                length: f.length,
                url: f.url.clone(),
            })
            .collect(),
    }
}

fn media(m: pb::Media) -> Media {
    use pb::media::Type;
    let kind = match Type::try_from(m.r#type).unwrap_or(Type::File) {
        Type::Image => MediaKind::Image,
        Type::Video => MediaKind::Video,
        Type::Audio => MediaKind::Audio,
        Type::Voice => MediaKind::Voice,
        Type::Sticker => MediaKind::Sticker,
        Type::File | Type::Unspecified => MediaKind::File,
    };
    Media {
        kind,
        blob: m.blob,
        key: m.key,
        sha256: m.sha256,
        size: m.size,
        mimetype: m.mimetype,
        filename: m.filename,
        caption: m.caption.map(text),
        width: m.width,
        height: m.height,
        duration_ms: m.duration_ms,
        thumbnail: m.thumbnail,
        waveform: m.waveform,
    }
}

fn wire_media(m: &Media) -> pb::Media {
    use pb::media::Type;
    pb::Media {
        r#type: match m.kind {
            MediaKind::Image => Type::Image,
            MediaKind::Video => Type::Video,
            MediaKind::Audio => Type::Audio,
            MediaKind::Voice => Type::Voice,
            MediaKind::File => Type::File,
            MediaKind::Sticker => Type::Sticker,
        } as i32,
        blob: m.blob.clone(),
        key: m.key.clone(),
        sha256: m.sha256.clone(),
        size: m.size,
        mimetype: m.mimetype.clone(),
        filename: m.filename.clone(),
        caption: m.caption.as_ref().map(wire_text),
        width: m.width,
        height: m.height,
        duration_ms: m.duration_ms,
        thumbnail: m.thumbnail.clone(),
        waveform: m.waveform.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(body: &str, formats: Vec<Format>) -> Text {
        Text {
            body: body.into(),
            formats,
        }
    }

    /// Every kind of body survives the trip to the wire and back unchanged.
    #[test]
    fn every_body_round_trips() {
        let styled = text(
            "bold link @x",
            (0..9)
                .map(|i| Format {
                    style: [
                        Style::Bold,
                        Style::Italic,
                        Style::Strikethrough,
                        Style::Monospace,
                        Style::CodeBlock,
                        Style::Quote,
                        Style::Link,
                        Style::Spoiler,
                        Style::Mention,
                    ][i],
                    start: i as u32,
                    length: 1,
                    url: format!("u{i}"),
                })
                .collect(),
        );
        let kinds = [
            MediaKind::Image,
            MediaKind::Video,
            MediaKind::Audio,
            MediaKind::Voice,
            MediaKind::File,
            MediaKind::Sticker,
        ];
        let mut bodies = vec![
            Body::Text(styled.clone()),
            Body::Edit(Edit {
                target: "m1".into(),
                text: Some(styled.clone()),
            }),
            Body::Delete(Delete {
                target: "m2".into(),
            }),
            Body::Reaction(Reaction {
                target: "m3".into(),
                emoji: "👍".into(),
                remove: true,
                target_author: "+15550001111".into(),
            }),
            Body::Location(Location {
                latitude: 52.5,
                longitude: 13.4,
                name: "n".into(),
                address: "a".into(),
            }),
            Body::Poll(Poll {
                question: "Lunch?".into(),
                options: vec!["pizza".into(), "soup".into()],
                max_selections: 2,
            }),
            Body::PollVote(PollVote {
                target: "m4".into(),
                target_author: "+15550001111".into(),
                selections: vec![1, 0],
            }),
            Body::PollEnd(PollEnd {
                target: "m4".into(),
            }),
            Body::Timer(Timer { seconds: 86_400 }),
            Body::Contact(ContactCard {
                display_name: "Carol".into(),
                phone_numbers: vec!["+15550009999".into()],
                emails: vec!["c@example.org".into()],
                vcard: "BEGIN:VCARD".into(),
            }),
        ];
        bodies.extend(kinds.into_iter().map(|kind| {
            Body::Media(Media {
                kind,
                blob: "b".into(),
                key: vec![1; 64],
                sha256: vec![2; 32],
                size: 9,
                mimetype: "image/png".into(),
                filename: "f.png".into(),
                caption: Some(styled.clone()),
                width: 1,
                height: 2,
                duration_ms: 3,
                thumbnail: vec![4],
                waveform: vec![5, 6],
            })
        }));
        for body in bodies {
            let m = Message {
                body: Some(body),
                reply_to: Some(Quote {
                    message_id: "q".into(),
                    author: "+15550002222".into(),
                }),
                expire_timer: 3600,
            };
            assert_eq!(decode(&encode(&m)).expect("decodes"), m);
        }
    }

    /// What this bridge does not know still arrives: an unknown style is dropped, an unknown
    /// media type is a file, an unknown body is no body.
    #[test]
    fn unknown_values_degrade() {
        let t = pb::Text {
            body: "hi".into(),
            formats: vec![
                pb::Format {
                    style: 99,
                    start: 0,
                    length: 1,
                    url: String::new(),
                },
                pb::Format {
                    style: PbStyle::Unspecified as i32,
                    start: 0,
                    length: 1,
                    url: String::new(),
                },
                pb::Format {
                    style: PbStyle::Bold as i32,
                    start: 1,
                    length: 1,
                    url: String::new(),
                },
            ],
        };
        assert_eq!(super::text(t).formats.len(), 1);
        let m = media(pb::Media {
            r#type: 42,
            ..Default::default()
        });
        assert_eq!(m.kind, MediaKind::File);
        assert_eq!(to_model(pb::DataMessage::default()), Message::default());
    }
}
