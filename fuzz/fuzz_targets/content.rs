//! The content schema (the plaintext inside Signal encryption), its mapping to the core's message
//! model and the conversion to Matrix HTML: no panic, and the HTML stays within its bound whatever
//! the ranges.
#![no_main]
use libfuzzer_sys::fuzz_target;
use matrix_interop_bridge::{
    bridge::{
        model::{Body, Text},
        msgconv,
    },
    interop::convert,
};
use mib_wire::content::{Content, content::Body as CBody};
use prost::Message;

fn render(t: &Text) {
    if let Some(html) = msgconv::text_to_html(t) {
        assert!(html.len() <= msgconv::MAX_HTML_BYTES);
    }
    assert!(msgconv::bounded_body(&t.body).len() <= msgconv::MAX_BODY_BYTES + 64);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Content {
        body: Some(CBody::Data(dm)),
    }) = Content::decode(data)
    {
        let m = convert::to_model(dm);
        // What decoded encodes again, and the model survives the trip (compared as bytes: a NaN
        // coordinate is not equal to itself).
        let bytes = convert::encode(&m);
        let again = convert::decode(&bytes).expect("our own encoding decodes");
        assert_eq!(convert::encode(&again), bytes);
        match m.body {
            Some(Body::Text(t)) => render(&t),
            Some(Body::Edit(e)) => {
                if let Some(t) = e.text {
                    render(&t);
                }
            }
            _ => {}
        }
    }
});
