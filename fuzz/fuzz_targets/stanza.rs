//! Every stanza type, as the gateway and the client decode them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(st) = mib_wire::pb::Stanza::decode(data) {
        // Re-encoding what decoded must not panic either.
        let _ = st.encode_to_vec();
    }
});
