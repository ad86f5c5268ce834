//! The helper protocol's frame reader (both ends read frames with it):
//! every message of a stream of bytes, to its end or its first error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = std::io::Cursor::new(data);
    while let Ok(Some(m)) = drydock_helper::proto::read_msg(&mut r) {
        // What was decoded encodes again (the encoder must take it).
        let _ = m.encode();
    }
});
