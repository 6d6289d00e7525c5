//! The record layer of the secure stream: arbitrary decrypted bytes, split at arbitrary points.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mib_wire::noise::next_record;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::new();
    for chunk in data.chunks(7) {
        buf.extend_from_slice(chunk);
        loop {
            match next_record(&mut buf) {
                Ok(Some(rec)) => {
                    let _ = <mib_wire::pb::Stanza as prost::Message>::decode(&rec[..]);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
