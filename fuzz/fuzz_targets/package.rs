//! A package file as the VPS's mirror serves it (a .deb: ar, then its
//! data.tar compressed), read up to 8 MiB of its content; and the pieces
//! list drydock sends for it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Read;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = drydock_helper::package::data_archive(std::io::Cursor::new(data)) {
        let mut out = Vec::new();
        let _ = r.take(8 << 20).read_to_end(&mut out);
    }
    let _ = drydock_helper::package::decode_pieces(data);
});
