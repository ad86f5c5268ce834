//! ~/.ssh/config as drydock resolves a host through it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for host in ["vps", "root@vps:2222", "[2001:db8::1]:22"] {
        if let Ok(spec) = drydock::ssh::HostSpec::parse(host) {
            let _ = drydock::ssh::Target::resolve_with(
                &spec,
                &text,
                std::path::Path::new("/nonexistent"),
            );
        }
    }
});
