//! The 16550A UART (COM1) wired to wisp's console.
//!
//! The register model is vm-superio's. This wrapper adds:
//! - an interrupt line that is an `EventFd` (registered by the VMM as an irqfd);
//! - an "input FIFO drained" `EventFd`, so the VMM feeds console input only as fast as the
//!   guest reads it (flow control: the FIFO holds only 64 bytes, and nothing is dropped);
//! - a serde snapshot of the register state.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Number of I/O ports a 16550 occupies.
pub const SERIAL_PORT_COUNT: u64 = 8;

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
}
