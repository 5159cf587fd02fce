//! The vfio-user migration v2 state machine of one device.
//!
//! Direct arcs (the specification's subset of Linux's; PRE_COPY is not
//! offered because [`Migratable`] has no iterative save):
//!
//! ```text
//! RUNNING -> STOP          stop the device
//! STOP -> RUNNING          run it again
//! STOP -> STOP_COPY        save its state; MIG_DATA_READ streams it
//! STOP_COPY -> STOP        end the data session
//! STOP -> RESUMING         start collecting MIG_DATA_WRITE data
//! RESUMING -> STOP         load what was collected
//! ```
//!
//! Any other transition follows the shortest path over these arcs that has
//! no saving state (STOP_COPY, PRE_COPY) inside it. A failed arc leaves the
//! machine in the last state it reached; a failed load moves it to ERROR,
//! from which only a device reset ([`Migration::reset`]) recovers.

use std::collections::VecDeque;

use vdevd_devices::device::Migratable;
use vdevd_protocol::MigState;

use crate::error::Error;

/// Most bytes of migration data accepted with MIG_DATA_WRITE.
pub const MAX_INCOMING_STATE: usize = 256 << 20;

/// The states the machine has (those of `vfio_device_mig_state` that
/// vfio-user uses and vdevd supports).
const STATES: [MigState; 5] = [
    MigState::Running,
    MigState::Stop,
    MigState::StopCopy,
    MigState::Resuming,
    MigState::Error,
];

fn direct_arc(from: MigState, to: MigState) -> bool {
    use MigState::*;
    matches!(
        (from, to),
        (Running, Stop)
            | (Stop, Running)
            | (Stop, StopCopy)
            | (StopCopy, Stop)
            | (Stop, Resuming)
            | (Resuming, Stop)
    )
}

fn saving(s: MigState) -> bool {
    matches!(s, MigState::StopCopy | MigState::PreCopy)
}

/// The states to pass through from `from` to `to`, `to` included, `from`
/// not. `None` if `to` cannot be reached.
pub fn path(from: MigState, to: MigState) -> Option<Vec<MigState>> {
    if from == to {
        return Some(Vec::new());
    }
    // Breadth-first search; a saving state may only start or end a path.
    let mut prev: Vec<(MigState, MigState)> = Vec::new();
    let mut queue = VecDeque::from([from]);
    let mut seen = vec![from];
    while let Some(s) = queue.pop_front() {
        if s != from && saving(s) {
            continue;
        }
        for &next in &STATES {
            if seen.contains(&next) || !direct_arc(s, next) {
                continue;
            }
            seen.push(next);
            prev.push((next, s));
            if next == to {
                let mut out = vec![to];
                let mut at = to;
                while let Some(&(_, p)) = prev.iter().find(|(n, _)| *n == at) {
                    if p == from {
                        break;
                    }
                    out.push(p);
                    at = p;
                }
                out.reverse();
                return Some(out);
            }
            queue.push_back(next);
        }
    }
    None
}

/// Migration state and data of one device.
#[derive(Debug)]
pub struct Migration {
    state: MigState,
    /// Saved state being read out (STOP_COPY), and how much was read.
    saved: Vec<u8>,
    cursor: usize,
    /// State being written in (RESUMING).
    incoming: Vec<u8>,
}

impl Default for Migration {
    fn default() -> Self {
        Migration {
            state: MigState::Running,
            saved: Vec::new(),
            cursor: 0,
            incoming: Vec::new(),
        }
    }
}

impl Migration {
    /// The current state.
    pub fn state(&self) -> MigState {
        self.state
    }

    /// Back to RUNNING with no data session (device reset or close).
    pub fn reset(&mut self) {
        *self = Migration::default();
    }

    /// Move to `target`, running the device actions of every arc on the way.
    pub fn set_state(&mut self, target: MigState, mig: &mut dyn Migratable) -> Result<(), Error> {
        if self.state == MigState::Error {
            return Err(Error::InvalidState(
                "the device is in the migration ERROR state; reset it".into(),
            ));
        }
        if !matches!(
            target,
            MigState::Running | MigState::Stop | MigState::StopCopy | MigState::Resuming
        ) {
            return Err(Error::NotSupported(format!("migration state {target:?}")));
        }
        let steps = path(self.state, target).ok_or_else(|| {
            Error::InvalidState(format!(
                "no migration path from {:?} to {target:?}",
                self.state
            ))
        })?;
        for next in steps {
            self.arc(next, mig)?;
        }
        Ok(())
    }

    fn arc(&mut self, to: MigState, mig: &mut dyn Migratable) -> Result<(), Error> {
        use MigState::*;
        log::debug!("migration: {:?} -> {to:?}", self.state);
        match (self.state, to) {
            (Running, Stop) => mig.stop()?,
            (Stop, Running) => mig.run()?,
            (Stop, StopCopy) => {
                self.saved = mig.save()?;
                self.cursor = 0;
            }
            (StopCopy, Stop) => {
                self.saved = Vec::new();
                self.cursor = 0;
            }
            (Stop, Resuming) => self.incoming.clear(),
            (Resuming, Stop) => {
                let data = std::mem::take(&mut self.incoming);
                if let Err(e) = mig.load(&data) {
                    self.state = Error;
                    return Err(e.into());
                }
            }
            (from, to) => {
                return Err(crate::error::Error::InvalidState(format!(
                    "no migration arc {from:?} -> {to:?}"
                )));
            }
        }
        self.state = to;
        Ok(())
    }

    /// The next at most `max` bytes of the saved state (STOP_COPY only).
    /// Fewer than `max` (possibly none) means the end of the stream.
    pub fn read(&mut self, max: usize) -> Result<&[u8], Error> {
        if self.state != MigState::StopCopy {
            return Err(Error::InvalidState(format!(
                "MIG_DATA_READ in migration state {:?}",
                self.state
            )));
        }
        let start = self.cursor.min(self.saved.len());
        let end = start.saturating_add(max).min(self.saved.len());
        self.cursor = end;
        Ok(&self.saved[start..end])
    }

    /// Append migration data (RESUMING only).
    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        if self.state != MigState::Resuming {
            return Err(Error::InvalidState(format!(
                "MIG_DATA_WRITE in migration state {:?}",
                self.state
            )));
        }
        let total = self.incoming.len().saturating_add(data.len());
        if total > MAX_INCOMING_STATE {
            return Err(Error::TransferTooLarge {
                what: "migration state",
                value: total as u64,
                max: MAX_INCOMING_STATE as u64,
            });
        }
        self.incoming.extend_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigState::*;
    use vdevd_devices::Error as DevError;

    #[derive(Default)]
    struct Fake {
        calls: Vec<&'static str>,
        state: Vec<u8>,
        loaded: Option<Vec<u8>>,
        fail_load: bool,
        fail_stop: bool,
    }

    impl Migratable for Fake {
        fn stop(&mut self) -> Result<(), DevError> {
            self.calls.push("stop");
            if self.fail_stop {
                return Err(DevError::Busy("queue draining".into()));
            }
            Ok(())
        }
        fn run(&mut self) -> Result<(), DevError> {
            self.calls.push("run");
            Ok(())
        }
        fn save(&mut self) -> Result<Vec<u8>, DevError> {
            self.calls.push("save");
            Ok(self.state.clone())
        }
        fn load(&mut self, state: &[u8]) -> Result<(), DevError> {
            self.calls.push("load");
            if self.fail_load {
                return Err(DevError::InvalidArgument("bad state".into()));
            }
            self.loaded = Some(state.to_vec());
            Ok(())
        }
    }

    #[test]
    fn shortest_paths_avoid_saving_states_inside() {
        assert_eq!(path(Running, Running), Some(vec![]));
        assert_eq!(path(Running, Stop), Some(vec![Stop]));
        assert_eq!(path(Running, StopCopy), Some(vec![Stop, StopCopy]));
        assert_eq!(path(StopCopy, Running), Some(vec![Stop, Running]));
        assert_eq!(path(Resuming, Running), Some(vec![Stop, Running]));
        assert_eq!(path(StopCopy, Resuming), Some(vec![Stop, Resuming]));
        assert_eq!(path(Running, Resuming), Some(vec![Stop, Resuming]));
        assert_eq!(path(Error, Running), None);
        assert_eq!(path(Running, Error), None);
    }

    #[test]
    fn save_and_stream_out() {
        let mut dev = Fake {
            state: (0..100).collect(),
            ..Fake::default()
        };
        let mut m = Migration::default();
        assert!(m.read(10).is_err(), "no data while running");
        m.set_state(StopCopy, &mut dev).unwrap();
        assert_eq!(dev.calls, ["stop", "save"]);
        let mut out = Vec::new();
        loop {
            let chunk = m.read(30).unwrap().to_vec();
            out.extend_from_slice(&chunk);
            if chunk.len() < 30 {
                break;
            }
        }
        assert_eq!(out, dev.state);
        m.set_state(Running, &mut dev).unwrap();
        assert_eq!(dev.calls, ["stop", "save", "run"]);
        assert_eq!(m.state(), Running);
    }

    #[test]
    fn resume_loads_what_was_written() {
        let mut dev = Fake::default();
        let mut m = Migration::default();
        assert!(m.write(b"x").is_err(), "not resuming");
        m.set_state(Resuming, &mut dev).unwrap();
        m.write(b"hello ").unwrap();
        m.write(b"world").unwrap();
        m.set_state(Running, &mut dev).unwrap();
        assert_eq!(dev.loaded.as_deref(), Some(&b"hello world"[..]));
        assert_eq!(dev.calls, ["stop", "load", "run"]);
    }

    #[test]
    fn failed_load_is_error_until_reset() {
        let mut dev = Fake {
            fail_load: true,
            ..Fake::default()
        };
        let mut m = Migration::default();
        m.set_state(Resuming, &mut dev).unwrap();
        m.write(b"junk").unwrap();
        assert!(m.set_state(Stop, &mut dev).is_err());
        assert_eq!(m.state(), Error);
        assert!(m.set_state(Running, &mut dev).is_err());
        m.reset();
        assert_eq!(m.state(), Running);
    }

    #[test]
    fn failed_arc_keeps_the_last_state_reached() {
        let mut dev = Fake {
            fail_stop: true,
            ..Fake::default()
        };
        let mut m = Migration::default();
        let e = m.set_state(StopCopy, &mut dev).unwrap_err();
        assert_eq!(e.errno(), libc::EBUSY);
        assert_eq!(m.state(), Running);
    }

    #[test]
    fn unsupported_targets_are_refused() {
        let mut dev = Fake::default();
        let mut m = Migration::default();
        for s in [PreCopy, PreCopyP2p, RunningP2p, Error] {
            assert!(m.set_state(s, &mut dev).is_err(), "{s:?}");
        }
        assert!(dev.calls.is_empty());
    }

    #[test]
    fn incoming_state_is_bounded() {
        let mut dev = Fake::default();
        let mut m = Migration::default();
        m.set_state(Resuming, &mut dev).unwrap();
        let big = vec![0u8; 1 << 20];
        let mut n = 0;
        let err = loop {
            match m.write(&big) {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(n, MAX_INCOMING_STATE >> 20);
        assert_eq!(err.errno(), libc::E2BIG);
    }
}
