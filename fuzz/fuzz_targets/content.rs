//! The content schema (the plaintext inside Signal encryption) and its conversion to Matrix HTML.
#![no_main]
use libfuzzer_sys::fuzz_target;
use matrix_interop_bridge::{
    bridge::msgconv,
    wire::content::{Content, content::Body, data_message::Body as D},
};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(Content { body: Some(Body::Data(dm)) }) = Content::decode(data) {
        if let Some(D::Text(t)) = dm.body {
            let _ = msgconv::text_to_html(&t);
        }
    }
});
