//! The content schema (the plaintext inside Signal encryption) and its conversion to Matrix HTML:
//! no panic, and the HTML stays within its bound whatever the ranges.
#![no_main]
use libfuzzer_sys::fuzz_target;
use matrix_interop_bridge::{
    bridge::msgconv,
    wire::content::{Content, Text, content::Body, data_message::Body as D},
};
use prost::Message;

fn render(t: &Text) {
    if let Some(html) = msgconv::text_to_html(t) {
        assert!(html.len() <= msgconv::MAX_HTML_BYTES);
    }
    assert!(msgconv::bounded_body(&t.body).len() <= msgconv::MAX_BODY_BYTES + 64);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Content {
        body: Some(Body::Data(dm)),
    }) = Content::decode(data)
    {
        match dm.body {
            Some(D::Text(t)) => render(&t),
            Some(D::Edit(e)) => {
                if let Some(t) = e.text {
                    render(&t);
                }
            }
            _ => {}
        }
    }
});
