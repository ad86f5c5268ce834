//! A known_hosts file, loaded and asked about a host.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(data).unwrap();
    if let Ok(k) = drydock::ssh::known_hosts::KnownHosts::load(&[f.path().to_path_buf()]) {
        let name = drydock::ssh::known_hosts::host_key_name("vps.example", 22);
        let _ = k.known_algorithms(&name);
        let _ = k.has_cert_authority_for(&name);
    }
});
