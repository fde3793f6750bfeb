//! One observer's judgement of one target, from successive heartbeat reads.
//!
//! Agents and coordinators run the same [`Tracker`] per target: feed it each
//! read with the observer's own monotonic time, and it says `up` (the
//! sequence number advanced within `down_after_ms`), `down` (no progress for
//! `down_after_ms`: key missing or expired, value frozen, or store
//! unreachable), or `unknown` (not read for long enough to tell). A new
//! incarnation is progress too, and is counted as a restart.

use serde::{Deserialize, Serialize};

/// What an observer says about a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ObsState {
    /// Its heartbeat advanced within `down_after_ms`.
    Up,
    /// No progress for `down_after_ms`.
    Down,
    /// Not read for long enough to tell.
    Unknown,
}

impl ObsState {
    /// The state in words, as the matrix and logs show it.
    pub fn as_str(self) -> &'static str {
        match self {
            ObsState::Up => "up",
            ObsState::Down => "down",
            ObsState::Unknown => "unknown",
        }
    }
}

/// Why an observer says what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// The sequence number advanced recently.
    Advancing,
    /// Not read for `down_after_ms` yet.
    NoReadingYet,
    /// The key is absent (never written, or expired).
    Missing,
    /// The key is present but its sequence number stopped advancing.
    Frozen,
    /// The target's heartbeat store did not answer.
    Unreachable,
    /// The value is not `incarnation:seq:unix_ms`.
    Garbled,
}

impl Reason {
    /// The reason in words, as explanations and logs show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Advancing => "heartbeat advancing",
            Reason::NoReadingYet => "no reading yet",
            Reason::Missing => "heartbeat key missing or expired",
            Reason::Frozen => "heartbeat frozen",
            Reason::Unreachable => "heartbeat store unreachable",
            Reason::Garbled => "heartbeat value unreadable",
        }
    }
}

/// A heartbeat value: `incarnation:seq:unix_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// New at every start of the member's agent.
    pub incarnation: u64,
    /// Increases by one per heartbeat within an incarnation.
    pub seq: u64,
    /// The member's wall clock when it wrote the beat (diagnostics only;
    /// never compared across hosts).
    pub unix_ms: u64,
}

impl Beat {
    /// The value as stored in the heartbeat key.
    pub fn encode(&self) -> String {
        format!("{:016x}:{}:{}", self.incarnation, self.seq, self.unix_ms)
    }

    /// Reads a stored value back; `None` for anything but
    /// `incarnation:seq:unix_ms` (a reading of [`Reading::Garbled`]).
    pub fn parse(s: &str) -> Option<Beat> {
        let mut parts = s.split(':');
        let incarnation = u64::from_str_radix(parts.next()?, 16).ok()?;
        let seq = parts.next()?.parse().ok()?;
        let unix_ms = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some(Beat { incarnation, seq, unix_ms })
    }
}

/// The outcome of one read of a target's heartbeat key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// The key holds a beat.
    Present(Beat),
    /// The key is absent (never written, or expired).
    Missing,
    /// The key holds something that is not a beat.
    Garbled,
    /// The store did not answer in time.
    Unreachable,
}

/// Everything an observer reports about one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// What the observer says of the target.
    pub state: ObsState,
    /// Why.
    pub reason: Reason,
    /// How long the observer has held `state`, in ms, at the time of the
    /// report.
    pub state_age_ms: u64,
    /// The target's incarnation as last seen.
    pub incarnation: Option<u64>,
    /// The target's sequence number as last seen.
    pub seq: Option<u64>,
    /// Incarnation changes this observer has seen.
    pub restarts: u64,
}

/// Per-target judgement state of one observer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    down_after_ms: u64,
    first_read_ms: Option<u64>,
    last_progress_ms: Option<u64>,
    last_beat: Option<Beat>,
    last_reason: Reason,
    state: ObsState,
    state_since_ms: u64,
    restarts: u64,
}

/// A change [`Tracker::observe`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state before the reading.
    pub from: ObsState,
    /// The state after it (the same when only a restart is reported).
    pub to: ObsState,
    /// Set when the target came back with a new incarnation.
    pub restarted: Option<(u64, u64)>,
}

impl Tracker {
    /// A tracker that has read nothing yet: unknown since `now_ms`.
    pub fn new(down_after_ms: u64, now_ms: u64) -> Self {
        Self {
            down_after_ms,
            first_read_ms: None,
            last_progress_ms: None,
            last_beat: None,
            last_reason: Reason::NoReadingYet,
            state: ObsState::Unknown,
            state_since_ms: now_ms,
            restarts: 0,
        }
    }

    /// The current judgement.
    pub fn state(&self) -> ObsState {
        self.state
    }

    /// Changes the threshold (the group policy changed).
    pub fn set_down_after(&mut self, down_after_ms: u64) {
        self.down_after_ms = down_after_ms;
    }

    /// Takes one reading at `now_ms` (the observer's monotonic clock).
    /// Returns a transition when the state changed or the target restarted.
    pub fn observe(&mut self, now_ms: u64, reading: Reading) -> Option<Transition> {
        self.first_read_ms.get_or_insert(now_ms);
        let mut restarted = None;
        match reading {
            Reading::Present(beat) => {
                let progress = match self.last_beat {
                    None => true,
                    Some(prev) if prev.incarnation != beat.incarnation => {
                        self.restarts += 1;
                        restarted = Some((prev.incarnation, beat.incarnation));
                        true
                    }
                    Some(prev) => beat.seq > prev.seq,
                };
                if progress {
                    self.last_progress_ms = Some(now_ms);
                    self.last_reason = Reason::Advancing;
                    self.last_beat = Some(beat);
                } else {
                    // An older beat (a late write that landed after a newer
                    // one) is not progress, and the newest seen stays the
                    // mark to beat.
                    self.last_reason = Reason::Frozen;
                }
            }
            Reading::Missing => self.last_reason = Reason::Missing,
            Reading::Garbled => self.last_reason = Reason::Garbled,
            Reading::Unreachable => self.last_reason = Reason::Unreachable,
        }
        let from = self.state;
        let to = self.judge(now_ms);
        if to != from {
            self.state = to;
            self.state_since_ms = now_ms;
        }
        (to != from || restarted.is_some()).then_some(Transition { from, to, restarted })
    }

    /// Re-judges without a new reading (time passes while a read is slow).
    pub fn tick(&mut self, now_ms: u64) -> Option<Transition> {
        let from = self.state;
        let to = self.judge(now_ms);
        if to != from {
            self.state = to;
            self.state_since_ms = now_ms;
            return Some(Transition { from, to, restarted: None });
        }
        None
    }

    fn judge(&self, now_ms: u64) -> ObsState {
        match (self.last_progress_ms, self.first_read_ms) {
            (Some(p), _) if now_ms.saturating_sub(p) < self.down_after_ms => ObsState::Up,
            (Some(_), _) => ObsState::Down,
            (None, Some(f)) if now_ms.saturating_sub(f) >= self.down_after_ms => ObsState::Down,
            _ => ObsState::Unknown,
        }
    }

    /// The observation to report at `now_ms`.
    pub fn observation(&self, now_ms: u64) -> Observation {
        let reason = match self.state {
            ObsState::Up => Reason::Advancing,
            ObsState::Unknown => Reason::NoReadingYet,
            ObsState::Down => self.last_reason,
        };
        Observation {
            state: self.state,
            reason,
            state_age_ms: now_ms.saturating_sub(self.state_since_ms),
            incarnation: self.last_beat.map(|b| b.incarnation),
            seq: self.last_beat.map(|b| b.seq),
            restarts: self.restarts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(incarnation: u64, seq: u64) -> Reading {
        Reading::Present(Beat { incarnation, seq, unix_ms: 0 })
    }

    #[test]
    fn advancing_is_up_frozen_is_down_after_the_threshold() {
        let mut t = Tracker::new(500, 0);
        assert_eq!(t.observe(0, beat(1, 1)).map(|x| x.to), Some(ObsState::Up));
        assert_eq!(t.observe(100, beat(1, 2)), None);
        // Frozen: same seq. Still up until 500 ms after the last progress.
        assert_eq!(t.observe(400, beat(1, 2)), None);
        assert_eq!(t.observe(599, beat(1, 2)), None);
        assert_eq!(t.observe(600, beat(1, 2)).map(|x| x.to), Some(ObsState::Down));
        assert_eq!(t.observation(700).reason, Reason::Frozen);
        assert_eq!(t.observation(700).state_age_ms, 100);
        // Progress again: up at once.
        assert_eq!(t.observe(800, beat(1, 3)).map(|x| x.to), Some(ObsState::Up));
    }

    #[test]
    fn missing_or_unreachable_from_the_start_is_down_after_the_threshold() {
        let mut t = Tracker::new(500, 0);
        assert_eq!(t.observe(0, Reading::Missing), None);
        assert_eq!(t.state(), ObsState::Unknown);
        assert_eq!(t.observe(499, Reading::Unreachable), None);
        assert_eq!(t.observe(500, Reading::Unreachable).map(|x| x.to), Some(ObsState::Down));
        assert_eq!(t.observation(500).reason, Reason::Unreachable);
    }

    #[test]
    fn a_new_incarnation_is_progress_and_a_restart() {
        let mut t = Tracker::new(500, 0);
        t.observe(0, beat(1, 50));
        let tr = t.observe(100, beat(2, 1)).unwrap();
        assert_eq!(tr.restarted, Some((1, 2)));
        assert_eq!(tr.to, ObsState::Up);
        assert_eq!(t.observation(100).restarts, 1);
        assert_eq!(t.observation(100).incarnation, Some(2));
    }

    #[test]
    fn a_late_older_beat_is_not_progress_and_does_not_lower_the_mark() {
        // Writes travel on several connections, so an older beat can land
        // after a newer one.
        let mut t = Tracker::new(500, 0);
        t.observe(0, beat(1, 7));
        t.observe(100, beat(1, 5));
        assert_eq!(t.observation(100).seq, Some(7));
        // Seq 6 is older than the newest seen: still no progress, down on time.
        t.observe(300, beat(1, 6));
        assert_eq!(t.observe(500, beat(1, 6)).map(|x| x.to), Some(ObsState::Down));
        assert_eq!(t.observation(500).reason, Reason::Frozen);
        assert_eq!(t.observe(600, beat(1, 8)).map(|x| x.to), Some(ObsState::Up));
    }

    #[test]
    fn tick_notices_silence_while_reads_hang() {
        let mut t = Tracker::new(500, 0);
        t.observe(0, beat(1, 1));
        assert_eq!(t.tick(499), None);
        assert_eq!(t.tick(500).map(|x| x.to), Some(ObsState::Down));
    }

    #[test]
    fn beats_round_trip() {
        let b = Beat { incarnation: 0xdead_beef, seq: 42, unix_ms: 1_700_000_000_000 };
        assert_eq!(Beat::parse(&b.encode()), Some(b));
        assert_eq!(Beat::parse("zz:1:2"), None);
        assert_eq!(Beat::parse("1:2"), None);
        assert_eq!(Beat::parse("1:2:3:4"), None);
    }
}
