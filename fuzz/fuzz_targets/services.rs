//! The VPS's units as its init lists them: the set it runs, and each
//! unit's state.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = drydock::services::read::parse_set(&text);
    let _ = drydock::services::read::parse_units(&text);
});
