//! The probe's facts, as the VPS's shell prints them: os-release,
//! mountinfo, `ip -j`, block devices, the kernel command line, in one
//! sectioned text; and the os-release reader of a booted copy.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(f) = drydock::remote::facts::parse(&text) {
        let _ = f.interfaces();
        let _ = f.root_disk();
        let _ = f.pretty_name();
    }
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    let _ = drydock::remote::facts::parse_mountinfo(&lines);
    let _ = drydock::vm::guest::parse_os_release(&text);
});
