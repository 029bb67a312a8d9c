//! How a VM run ends, and the latch that the first reporter sets.

use std::sync::Mutex;

use devices::StopReason;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A device reported a guest request (reset, power-off, debug exit).
    Guest(StopReason),
    /// The guest crashed the vCPU (triple fault, emulation failure, entry failure).
    Crash(String),
    /// The user quit with the console escape sequence.
    Quit,
    /// wisp got a termination signal.
    Signal(i32),
    /// A `stop` request on the control socket.
    Stopped,
    /// The VM moved to another wisp, which runs it now.
    Migrated(String),
    /// A migration's destination could not confirm the hand-over to its source, so it
    /// stops: the source keeps the VM.
    HandOverFailed(String),
}

impl Outcome {
    /// The process exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Guest(StopReason::Reset | StopReason::PowerOff)
            | Outcome::Quit
            | Outcome::Stopped
            | Outcome::Migrated(_) => 0,
            Outcome::Guest(StopReason::ExitCode(c)) => i32::from(*c),
            Outcome::Crash(_) | Outcome::HandOverFailed(_) => 1,
            Outcome::Signal(s) => 128 + s,
        }
    }

    /// One line for the log or the error message.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Guest(StopReason::Reset) => "guest reset: VM stopped".into(),
            Outcome::Guest(StopReason::PowerOff) => "guest powered off".into(),
            Outcome::Guest(StopReason::ExitCode(c)) => format!("guest exited with status {c}"),
            Outcome::Crash(why) => format!("guest crashed: {why}"),
            Outcome::Quit => "quit from the console".into(),
            Outcome::Signal(s) => format!("stopped by signal {s}"),
            Outcome::Stopped => "stopped through the control socket".into(),
            Outcome::Migrated(to) => format!("migrated to {to}; the VM runs there now"),
            Outcome::HandOverFailed(why) => {
                format!("migration hand-over failed ({why}); the VM stays with the source")
            }
        }
    }
}

/// Holds the first outcome reported by any thread and wakes the VMM thread.
pub struct ExitLatch {
    evt: EventFd,
    outcome: Mutex<Option<Outcome>>,
}

impl ExitLatch {
    /// A latch with nothing reported yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            outcome: Mutex::new(None),
        })
    }

    /// Reports `outcome` unless another was reported first.
    pub fn set(&self, outcome: Outcome) {
        let mut slot = devices::bus::lock(&self.outcome);
        if slot.is_none() {
            *slot = Some(outcome);
            if let Err(e) = self.evt.write(1) {
                log::error!("cannot wake the VMM thread: {e}");
            }
        }
    }

    /// The reported outcome, if any.
    pub fn get(&self) -> Option<Outcome> {
        devices::bus::lock(&self.outcome).clone()
    }

    /// Readable once an outcome is reported.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_outcome_wins_and_exit_codes() {
        let l = ExitLatch::new().unwrap();
        assert_eq!(l.get(), None);
        l.set(Outcome::Guest(StopReason::ExitCode(3)));
        l.set(Outcome::Crash("late".into()));
        assert_eq!(l.get(), Some(Outcome::Guest(StopReason::ExitCode(3))));
        assert_eq!(l.eventfd().read().unwrap(), 1);
        assert_eq!(Outcome::Guest(StopReason::ExitCode(3)).exit_code(), 3);
        assert_eq!(Outcome::Guest(StopReason::PowerOff).exit_code(), 0);
        assert_eq!(Outcome::Guest(StopReason::Reset).exit_code(), 0);
        assert_eq!(Outcome::Crash("x".into()).exit_code(), 1);
        assert_eq!(Outcome::Signal(15).exit_code(), 143);
    }
}
