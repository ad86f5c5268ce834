//! The writes of a push in helper mode: each range compressed at a level
//! chosen from the measured throughput, sent with at most WRITE_WINDOW
//! bytes unconfirmed, each confirmed by the helper after its read-back.

use std::fs::File;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::remote::device::Device;
use crate::transfer::helper::{self, Link, Patch};

/// Bytes of writes sent but not yet confirmed, at most.
pub(super) const WRITE_WINDOW: u64 = 32 << 20;

/// The writes of a push: compressed at a level chosen from the measured
/// throughput.
pub(super) struct Writer<'a> {
    pub(super) levels: helper::level::LevelControl,
    pub(super) z: zstd::bulk::Compressor<'static>,
    pub(super) image: &'a File,
    pub(super) dev: &'a Device,
}

impl Writer<'_> {
    pub(super) fn partly(&self, e: anyhow::Error) -> anyhow::Error {
        crate::errors::resumable!(
            "the push stopped with {} partly written: run the same push again to finish it \
             (ranges already written are recognised): {e:#}",
            self.dev.path
        )
    }

    /// PATCHES sent, at most WRITE_WINDOW bytes unconfirmed, until every
    /// one is confirmed.
    pub(super) async fn write(
        &mut self,
        link: &mut Link,
        patches: &[Patch],
        bar: &crate::ui::Bar,
    ) -> Result<()> {
        let mut in_flight: std::collections::VecDeque<Patch> = Default::default();
        let mut in_flight_bytes = 0u64;
        let mut next = 0;
        while next < patches.len() || !in_flight.is_empty() {
            if next < patches.len() && in_flight_bytes < WRITE_WINDOW {
                let p = patches[next];
                next += 1;
                let t = Instant::now();
                let frame = helper::write_frame(self.image, p, &mut self.z)?;
                let busy = t.elapsed();
                let t = Instant::now();
                link.send(frame).await.map_err(|e| self.partly(e))?;
                if let Some(l) = self.levels.record(p.len as u64, busy, t.elapsed()) {
                    self.z.set_compression_level(l)?;
                }
                in_flight.push_back(p);
                in_flight_bytes += p.len as u64;
                continue;
            }
            let t = Instant::now();
            let answer = link.recv().await.map_err(|e| self.partly(e))?;
            if next < patches.len() {
                // The window was full: waiting on the helper's writes.
                self.levels.record(0, Duration::ZERO, t.elapsed());
            }
            match answer {
                drydock_helper::proto::Msg::Written { offset, len } => {
                    let p = in_flight
                        .pop_front()
                        .context("the helper confirmed a write not sent")?;
                    if p.offset != offset || p.len != len {
                        bail!("the helper confirmed {len} bytes at {offset}, not the range sent");
                    }
                    in_flight_bytes -= len as u64;
                    bar.inc(len as u64);
                }
                m => bail!("the helper sent {} during the writes", m.name()),
            }
        }
        Ok(())
    }
}
