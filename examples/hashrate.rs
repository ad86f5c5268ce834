//! Hashing throughput of the manifest code per block size (used by
//! scripts/bench): how fast a local image can be hashed, and how
//! much per-block overhead smaller blocks cost.

use std::time::Instant;

fn main() {
    let total: usize = 1 << 30;
    let data: Vec<u8> = (0..total)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    println!("{:>10}  {:>10}", "block", "MB/s");
    for bs in [64 << 10, 256 << 10, 1 << 20, 4 << 20] {
        let t = Instant::now();
        let mut n = 0u8;
        for chunk in data.chunks(bs) {
            n ^= drydock::image::manifest::sha256(chunk)[0];
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{:>8}KiB  {:>10.0}  (xor {n})",
            bs >> 10,
            total as f64 / s / 1e6
        );
    }
}
