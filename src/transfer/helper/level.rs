//! The zstd level of a helper push, chosen from what the transfer
//! measures rather than fixed: how much of the sender's time goes to
//! reading and compressing the pages, against the time it waits for the
//! link (or the helper's writes) to take more. A sender that waits more
//! than half the time has CPU to spare for fewer bytes: one level up. One
//! that is busy more than 85 % of the time is the limit itself: one level
//! down. Decided every 4 MiB of pages, between levels 1 and 12 (above 12
//! zstd's strategies get several times slower for a few percent).

use std::time::Duration;

const WINDOW: u64 = 4 << 20;
pub const MIN: i32 = 1;
pub const MAX: i32 = 12;

#[derive(Debug)]
pub struct LevelControl {
    level: i32,
    input: u64,
    busy: Duration,
    waited: Duration,
    /// Every level used, in order (a level repeated once).
    pub used: Vec<i32>,
}

impl LevelControl {
    pub fn new(start: i32) -> LevelControl {
        let level = start.clamp(MIN, MAX);
        LevelControl {
            level,
            input: 0,
            busy: Duration::ZERO,
            waited: Duration::ZERO,
            used: vec![level],
        }
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// After a frame of INPUT bytes: BUSY spent making it, WAITED spent
    /// until the link took it (or a confirmation made room). The new level
    /// when it changes.
    pub fn record(&mut self, input: u64, busy: Duration, waited: Duration) -> Option<i32> {
        self.input += input;
        self.busy += busy;
        self.waited += waited;
        if self.input < WINDOW {
            return None;
        }
        let total = (self.busy + self.waited).as_secs_f64();
        let busy = if total > 0.0 {
            self.busy.as_secs_f64() / total
        } else {
            1.0
        };
        self.input = 0;
        self.busy = Duration::ZERO;
        self.waited = Duration::ZERO;
        let next = if busy < 0.5 {
            self.level + 1
        } else if busy > 0.85 {
            self.level - 1
        } else {
            self.level
        }
        .clamp(MIN, MAX);
        (next != self.level).then(|| {
            self.level = next;
            self.used.push(next);
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A slow link (the sender mostly waits) climbs a level per window up
    /// to the top; a fast one (the sender always busy) comes down to 1; a
    /// balance holds.
    #[test]
    fn the_level_follows_what_limits_the_transfer() {
        let mut c = LevelControl::new(3);
        for _ in 0..64 {
            c.record(1 << 20, MS, 4 * MS);
        }
        assert_eq!(c.level(), MAX);
        assert_eq!(c.used, (3..=MAX).collect::<Vec<_>>());
        for _ in 0..64 {
            c.record(1 << 20, 10 * MS, Duration::ZERO);
        }
        assert_eq!(c.level(), MIN);
        let mut c = LevelControl::new(3);
        for _ in 0..64 {
            assert_eq!(c.record(1 << 20, 7 * MS, 3 * MS), None);
        }
        assert_eq!(c.used, vec![3]);
        // Nothing decided before a window's worth of pages.
        let mut c = LevelControl::new(3);
        assert_eq!(c.record(3 << 20, MS, 100 * MS), None);
        assert_eq!(c.record(1 << 20, MS, 100 * MS), Some(4));
    }
}
