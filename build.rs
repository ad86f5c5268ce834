//! Builds the helper (helper/) as a static x86_64 executable and puts it in
//! OUT_DIR, where `src/transfer/helper.rs` embeds it with `include_bytes!`.
//!
//! It is a separate cargo invocation because it needs other flags than
//! drydock itself: `-C target-feature=+crt-static` (no dependency on the
//! VPS's C library, which may be older than this machine's) and an
//! explicit `--target`, so the flag does not reach build scripts and proc
//! macros. Its own target folder (target/helper) avoids waiting on the
//! lock of the build that runs this script. `DRYDOCK_HELPER=path` uses a
//! helper built elsewhere instead.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The commit drydock is built from (`--version`), or "unknown" outside a
/// git checkout; the build script runs again when HEAD moves.
fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if let Some(log) = git(&["rev-parse", "--git-path", "logs/HEAD"]) {
        println!("cargo:rerun-if-changed={log}");
    }
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
}

fn main() {
    println!("cargo:rustc-env=DRYDOCK_COMMIT={}", commit());
    println!("cargo:rerun-if-changed=helper/src");
    println!("cargo:rerun-if-changed=helper/Cargo.toml");
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-env-changed=DRYDOCK_HELPER");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("drydock-helper");
    if let Some(prebuilt) = env::var_os("DRYDOCK_HELPER") {
        std::fs::copy(&prebuilt, &dest).expect("copy DRYDOCK_HELPER");
    } else {
        build_helper(&out, &dest);
    }
    pack(&dest);
}

/// DEST.gz beside DEST: the helper as it crosses the link, 2.4 MB in 1.0
/// MB (gzip -9; every VPS has gzip, and a host without it is sent DEST).
fn pack(dest: &std::path::Path) {
    use std::io::Write;
    let raw = std::fs::read(dest).expect("read the helper");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&raw).expect("gzip the helper");
    let packed = gz.finish().expect("gzip the helper");
    std::fs::write(dest.with_extension("gz"), packed).expect("write the packed helper");
}

fn build_helper(out: &std::path::Path, dest: &std::path::Path) {
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    // OUT_DIR is TARGET_DIR/<profile>/build/drydock-*/out.
    let target_dir = out
        .ancestors()
        .nth(4)
        .map(|t| t.join("helper"))
        .unwrap_or_else(|| out.join("helper-target"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "--quiet",
            "--profile",
            "helper",
            "-p",
            "drydock-helper",
            "--bin",
            "drydock-helper",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    for v in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static");
    let status = cmd.status().expect("cannot run cargo to build the helper");
    assert!(status.success(), "building the helper failed");
    let built = target_dir
        .join(TARGET)
        .join("helper")
        .join("drydock-helper");
    std::fs::copy(&built, dest).expect("copy the built helper");
}
