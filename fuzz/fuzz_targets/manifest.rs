//! A manifest file (per-block hashes), as `push` and `carry` load it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(data).unwrap();
    let _ = drydock::image::manifest::Manifest::load(f.path());
});
