//! The 16550A UART (COM1) wired to wisp's console.
//!
//! The register model is vm-superio's. This wrapper adds:
//! - an interrupt line that is an `EventFd` (registered by the VMM as an irqfd);
//! - an "input FIFO drained" `EventFd`, so the VMM feeds console input only as fast as the
//!   guest reads it (flow control: the FIFO holds only 64 bytes, and nothing is dropped);
//! - a serde snapshot of the register state.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Number of I/O ports a 16550 occupies.
pub const SERIAL_PORT_COUNT: u64 = 8;
/// Size of the receive FIFO (vm-superio's).
pub const SERIAL_FIFO_SIZE: usize = 64;
/// LSR bit 0: received data is waiting.
const LSR_DATA_READY: u8 = 1;

/// A serial snapshot that cannot be restored.
#[derive(Debug, Error)]
pub enum SerialStateError {
    /// More pending input than the receive FIFO holds.
    #[error(
        "serial: snapshot holds {len} bytes of pending input, the FIFO holds {SERIAL_FIFO_SIZE}"
    )]
    InputTooLong {
        /// Bytes in the snapshot.
        len: usize,
    },
    /// Pending input while the line status says there is none: the guest would never
    /// read it.
    #[error("serial: snapshot holds {len} bytes of pending input but LSR {lsr:#04x} has no data-ready bit")]
    DataReadyClear {
        /// Bytes in the snapshot.
        len: usize,
        /// The line status register.
        lsr: u8,
    },
    /// vm-superio refused the state (e.g. the interrupt could not be raised).
    #[error("serial: cannot restore the UART: {0}")]
    Uart(String),
}

/// An interrupt line backed by an `EventFd`.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the VMM when the guest has drained the receive FIFO.
pub struct InputDrained(EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("serial: cannot signal drained input: {e}");
        }
    }
}

/// Where the guest's serial output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// COM1.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, InputDrained, SerialOutput>,
    output_failed: bool,
}

impl SerialDevice {
    /// A UART that raises `irq`, signals `drained` when the guest empties its receive FIFO,
    /// and writes guest output to `out`.
    pub fn new(irq: EventFd, drained: EventFd, out: SerialOutput) -> Self {
        Self {
            uart: Serial::with_events(EventFdTrigger(irq), InputDrained(drained), out),
            output_failed: false,
        }
    }

    /// Free space in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues console input for the guest; returns how many bytes were accepted (at most
    /// the free FIFO space). The rest must be offered again after the next drain event.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }

    /// The register state, for snapshots.
    pub fn snapshot(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    /// A UART in the state `state` (from [`SerialDevice::snapshot`], possibly from an
    /// untrusted file), wired like [`SerialDevice::new`]. Raises `irq` if the restored
    /// registers have an interrupt pending. `drained` is not signalled: the caller
    /// checks [`SerialDevice::fifo_capacity`] to resume feeding input.
    pub fn from_snapshot(
        irq: EventFd,
        drained: EventFd,
        out: SerialOutput,
        state: &SerialSnapshot,
    ) -> Result<Self, SerialStateError> {
        let len = state.in_buffer.len();
        if len > SERIAL_FIFO_SIZE {
            return Err(SerialStateError::InputTooLong { len });
        }
        if len > 0 && state.line_status & LSR_DATA_READY == 0 {
            return Err(SerialStateError::DataReadyClear {
                len,
                lsr: state.line_status,
            });
        }
        let uart = Serial::from_state(
            &state.clone().into(),
            EventFdTrigger(irq),
            InputDrained(drained),
            out,
        )
        .map_err(|e| SerialStateError::Uart(e.to_string()))?;
        Ok(Self {
            uart,
            output_failed: false,
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), [first, ..]) = (u8::try_from(offset), data) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (Ok(off), [byte]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.uart.write(off, *byte) {
            if !self.output_failed {
                log::warn!("serial: guest output lost: {e:?}");
                self.output_failed = true;
            }
        }
    }
}

/// The UART registers, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<SerialSnapshot> for SerialState {
    fn from(s: SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn dev() -> (SerialDevice, EventFd, EventFd, Sink) {
        let irq = EventFd::new(libc_nonblock()).unwrap();
        let drained = EventFd::new(libc_nonblock()).unwrap();
        let sink = Sink::default();
        let d = SerialDevice::new(
            irq.try_clone().unwrap(),
            drained.try_clone().unwrap(),
            Box::new(sink.clone()),
        );
        (d, irq, drained, sink)
    }

    fn libc_nonblock() -> i32 {
        vmm_sys_util::eventfd::EFD_NONBLOCK
    }

    #[test]
    fn output_reaches_writer() {
        let (mut d, _irq, _drained, sink) = dev();
        for b in b"hi\n" {
            d.write(0x3f8, 0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_is_flow_controlled_and_drain_is_signalled() {
        let (mut d, irq, drained, _sink) = dev();
        // Enable the received-data interrupt.
        d.write(0x3f8, 1, &[0x01]);
        let input: Vec<u8> = (0..100u8).collect();
        let n = d.enqueue_input(&input);
        assert_eq!(n, 64, "FIFO holds 64 bytes");
        assert_eq!(d.enqueue_input(&input[n..]), 0);
        assert!(irq.read().is_ok(), "RDA interrupt raised");
        let mut got = Vec::new();
        for _ in 0..n {
            let mut b = [0u8];
            d.read(0x3f8, 0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input[..n]);
        assert_eq!(drained.read().unwrap(), 1, "drain signalled once");
        assert_eq!(d.enqueue_input(&input[n..]), 36);
    }

    #[test]
    fn bad_offsets_and_widths_are_harmless() {
        let (mut d, _irq, _drained, sink) = dev();
        d.write(0x3f8, 0x1_0000_0000, &[1]);
        d.write(0x3f8, 0, &[1, 2]);
        let mut b = [0xaa; 4];
        d.read(0x3f8, u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        assert!(sink.0.lock().unwrap().is_empty());
        assert_eq!(d.snapshot().in_buffer, Vec::<u8>::new());
    }

    #[test]
    fn snapshot_round_trip_keeps_registers_and_pending_input() {
        let (mut d, _irq, _drained, _sink) = dev();
        d.write(0x3f8, 1, &[0x01]); // IER: received-data interrupt
        d.write(0x3f8, 7, &[0x5a]); // scratch
        d.write(0x3f8, 3, &[0x80]); // LCR: DLAB
        d.write(0x3f8, 0, &[0x03]); // divisor low
        d.write(0x3f8, 3, &[0x03]); // LCR: 8N1
        assert_eq!(d.enqueue_input(b"abc"), 3);
        let snap = d.snapshot();
        assert_eq!(snap.in_buffer, b"abc");

        let irq = EventFd::new(libc_nonblock()).unwrap();
        let drained = EventFd::new(libc_nonblock()).unwrap();
        let mut r = SerialDevice::from_snapshot(
            irq.try_clone().unwrap(),
            drained.try_clone().unwrap(),
            Box::new(Sink::default()),
            &snap,
        )
        .unwrap();
        assert_eq!(r.snapshot(), snap);
        assert!(irq.read().is_ok(), "pending RDA interrupt raised again");
        assert_eq!(r.fifo_capacity(), 61);
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut lsr = [0u8];
            r.read(0x3f8, 5, &mut lsr);
            assert_ne!(lsr[0] & LSR_DATA_READY, 0);
            let mut b = [0u8];
            r.read(0x3f8, 0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"abc");
        assert_eq!(drained.read().unwrap(), 1, "drain signalled");
        let mut b = [0u8];
        r.read(0x3f8, 7, &mut b);
        assert_eq!(b[0], 0x5a);
    }

    #[test]
    fn bad_snapshots_are_refused() {
        let mk = |s: &SerialSnapshot| {
            SerialDevice::from_snapshot(
                EventFd::new(libc_nonblock()).unwrap(),
                EventFd::new(libc_nonblock()).unwrap(),
                Box::new(Sink::default()),
                s,
            )
        };
        let (d, _irq, _drained, _sink) = dev();
        let mut s = d.snapshot();
        s.in_buffer = vec![0; SERIAL_FIFO_SIZE + 1];
        s.line_status |= LSR_DATA_READY;
        assert!(matches!(
            mk(&s),
            Err(SerialStateError::InputTooLong { len: 65 })
        ));
        s.in_buffer = vec![1];
        s.line_status &= !LSR_DATA_READY;
        let Err(e) = mk(&s) else {
            panic!("restored");
        };
        assert!(e.to_string().contains("data-ready"), "{e}");
        s.in_buffer.clear();
        assert!(mk(&s).is_ok());
    }
}
