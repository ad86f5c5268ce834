//! The fuzz targets' seeds of drydock's own parsers (`scripts/fuzz` runs
//! this): the probe's facts as this machine's shell prints them (a real
//! Debian), a manifest as drydock writes it, and an ssh config and a
//! known_hosts with the forms real ones have.
//!
//!     cargo run --example fuzz_seeds -- DIR

use drydock::image::manifest::{
    Manifest, block_count, block_len, segment_count, to_hex, zero_hash,
};

fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: fuzz_seeds DIR"));
    for t in ["facts", "manifest", "ssh_config", "known_hosts"] {
        std::fs::create_dir_all(dir.join(t))?;
    }
    let out = std::process::Command::new("sh")
        .args(["-c", &drydock::remote::facts::facts_script()])
        .output()?;
    std::fs::write(dir.join("facts/this-machine"), &out.stdout)?;

    let size = 5 * (1 << 20) + 12345;
    let blocks: Vec<String> = (0..block_count(size))
        .map(|i| to_hex(&zero_hash(block_len(size, i))))
        .collect();
    let segments = vec![to_hex(&zero_hash(1)); segment_count(size) as usize];
    let m = Manifest::new(size, None, segments, blocks)?;
    m.save(&dir.join("manifest/zeros.manifest"))?;

    std::fs::write(
        dir.join("ssh_config/rich"),
        "Host vps\n  HostName 203.0.113.7\n  User root\n  Port 2222\n  IdentityFile ~/.ssh/id_ed25519\n\
         \tProxyJump bastion,other:2200\nHost bastion\n  HostName=198.51.100.1\nMatch host *.example\n\
         \tUser admin\nHost [2001:db8::1]\n  HostKeyAlias six\nInclude /nonexistent/*.conf\n\
         Host *\n  UserKnownHostsFile ~/.ssh/known_hosts ~/.ssh/known_hosts2\n  StrictHostKeyChecking accept-new\n",
    )?;
    std::fs::write(
        dir.join("known_hosts/forms"),
        "vps.example,203.0.113.7 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n\
         [vps.example]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n\
         |1|JfKTdBh7rNbXkVAQCRp4OQoPfmI=|USECr3SWf1JUPsms5AqfD5QfxkM= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n\
         @cert-authority *.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n\
         @revoked * ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n\
         # a comment\n\n",
    )?;
    Ok(())
}
