//! A minimal i8042 keyboard controller: enough for Linux's `reboot=k` (the CPU reset
//! pulse ends the VM) and for drivers that probe the controller.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::stop::{StopCallback, StopReason};

/// Data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Status (read) / command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;

const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_INTERFACE_TEST: u8 = 0xab;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
/// Output port bit 0 is the CPU reset line (active low).
const OUTPUT_PORT_RESET_LINE: u8 = 1 << 0;
const MAX_OUTPUT: usize = 16;

/// The controller's state, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Controller configuration byte.
    pub ctr: u8,
    /// Status register (without the output-full bit, which follows `output`).
    pub status: u8,
    /// The command waiting for its data byte, if any.
    pub pending: Option<u8>,
    /// Bytes waiting on the data port, oldest first.
    pub output: Vec<u8>,
}

/// The controller. Keyboard and mouse are absent; only controller commands work.
pub struct I8042 {
    on_stop: StopCallback,
    ctr: u8,
    status: u8,
    /// The command waiting for its data byte on port 0x60, if any.
    pending: Option<u8>,
    output: VecDeque<u8>,
}

impl I8042 {
    /// A controller that reports reset requests through `on_stop`.
    pub fn new(on_stop: StopCallback) -> Self {
        Self {
            on_stop,
            ctr: 0,
            status: STATUS_SYSTEM_FLAG,
            pending: None,
            output: VecDeque::new(),
        }
    }

    /// The controller's state.
    pub fn snapshot(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            status: self.status,
            pending: self.pending,
            output: self.output.iter().copied().collect(),
        }
    }

    /// Takes the state `state` (possibly from an untrusted file): the output queue is
    /// clipped to what the controller holds, and a pending command other than the two
    /// that take a data byte is dropped. Every register value is otherwise harmless.
    pub fn restore(&mut self, state: &I8042State) {
        self.ctr = state.ctr;
        self.status = state.status & !STATUS_OUTPUT_FULL;
        self.pending = state
            .pending
            .filter(|&c| c == CMD_WRITE_CTR || c == CMD_WRITE_OUTPUT_PORT);
        self.output = state.output.iter().copied().take(MAX_OUTPUT).collect();
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() < MAX_OUTPUT {
            self.output.push_back(byte);
        }
    }

    fn status(&self) -> u8 {
        let full = if self.output.is_empty() {
            0
        } else {
            STATUS_OUTPUT_FULL
        };
        self.status | full
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.push_output(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push_output(SELF_TEST_OK),
            CMD_INTERFACE_TEST => self.push_output(0),
            CMD_READ_OUTPUT_PORT => self.push_output(OUTPUT_PORT_RESET_LINE),
            CMD_PULSE_RESET => (self.on_stop)(StopReason::Reset),
            _ => log::debug!("i8042: ignoring command {cmd:#x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            Some(CMD_WRITE_OUTPUT_PORT) if byte & OUTPUT_PORT_RESET_LINE == 0 => {
                (self.on_stop)(StopReason::Reset)
            }
            _ => log::debug!("i8042: ignoring data byte {byte:#x}"),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, _offset: u64, data: &mut [u8]) {
        let value = match base {
            b if b == u64::from(I8042_COMMAND_PORT) => self.status(),
            _ => self.output.pop_front().unwrap_or(0),
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, base: u64, _offset: u64, data: &[u8]) {
        let [byte] = data else {
            return;
        };
        if base == u64::from(I8042_COMMAND_PORT) {
            self.command(*byte);
        } else {
            self.data(*byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn dev() -> (I8042, Arc<Mutex<Vec<StopReason>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (
            I8042::new(Arc::new(move |r| s.lock().unwrap().push(r))),
            seen,
        )
    }

    fn rd(d: &mut I8042, port: u16) -> u8 {
        let mut b = [0u8];
        d.read(port.into(), 0, &mut b);
        b[0]
    }

    #[test]
    fn reset_pulse_stops_vm() {
        let (mut d, seen) = dev();
        assert_eq!(
            rd(&mut d, I8042_COMMAND_PORT) & 0x2,
            0,
            "input buffer empty"
        );
        d.write(I8042_COMMAND_PORT.into(), 0, &[CMD_PULSE_RESET]);
        assert_eq!(*seen.lock().unwrap(), vec![StopReason::Reset]);
    }

    #[test]
    fn output_port_reset_line_and_ctr_roundtrip() {
        let (mut d, seen) = dev();
        d.write(I8042_COMMAND_PORT.into(), 0, &[CMD_WRITE_CTR]);
        d.write(I8042_DATA_PORT.into(), 0, &[0x45]);
        d.write(I8042_COMMAND_PORT.into(), 0, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, I8042_COMMAND_PORT) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(rd(&mut d, I8042_DATA_PORT), 0x45);
        d.write(I8042_COMMAND_PORT.into(), 0, &[CMD_SELF_TEST]);
        assert_eq!(rd(&mut d, I8042_DATA_PORT), SELF_TEST_OK);
        assert!(seen.lock().unwrap().is_empty());
        d.write(I8042_COMMAND_PORT.into(), 0, &[CMD_WRITE_OUTPUT_PORT]);
        d.write(I8042_DATA_PORT.into(), 0, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![StopReason::Reset]);
    }

    #[test]
    fn snapshot_round_trip() {
        let (mut d, _) = dev();
        d.write(I8042_COMMAND_PORT.into(), 0, &[CMD_WRITE_CTR]);
        d.write(I8042_DATA_PORT.into(), 0, &[0x47]);
        d.write(I8042_COMMAND_PORT.into(), 0, &[CMD_SELF_TEST]);
        d.write(I8042_COMMAND_PORT.into(), 0, &[CMD_READ_CTR]);
        d.write(I8042_COMMAND_PORT.into(), 0, &[CMD_WRITE_OUTPUT_PORT]);
        let s = d.snapshot();
        assert_eq!(s.ctr, 0x47);
        assert_eq!(s.pending, Some(CMD_WRITE_OUTPUT_PORT));
        assert_eq!(s.output, vec![SELF_TEST_OK, 0x47]);

        let (mut r, seen) = dev();
        r.restore(&s);
        assert_eq!(r.snapshot(), s);
        assert_eq!(
            rd(&mut r, I8042_COMMAND_PORT),
            rd(&mut d, I8042_COMMAND_PORT)
        );
        assert_eq!(rd(&mut r, I8042_DATA_PORT), SELF_TEST_OK);
        assert_eq!(rd(&mut r, I8042_DATA_PORT), 0x47);
        assert_eq!(rd(&mut r, I8042_COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        // The pending command survived: its data byte pulses the reset line.
        r.write(I8042_DATA_PORT.into(), 0, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![StopReason::Reset]);
    }

    #[test]
    fn hostile_state_is_clipped() {
        let (mut d, _) = dev();
        d.restore(&I8042State {
            ctr: 0,
            status: 0xff,
            pending: Some(0x99),
            output: vec![1; 1000],
        });
        let s = d.snapshot();
        assert_eq!(s.output.len(), MAX_OUTPUT);
        assert_eq!(s.pending, None);
        assert_eq!(s.status & STATUS_OUTPUT_FULL, 0);
    }
}
