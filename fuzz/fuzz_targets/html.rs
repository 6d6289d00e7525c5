//! Matrix HTML from any sender, parsed into interop formatting.
#![no_main]
use libfuzzer_sys::fuzz_target;
use matrix_interop_bridge::bridge::msgconv;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let t = msgconv::html_to_text(s);
        let _ = msgconv::text_to_html(&t);
    }
});
