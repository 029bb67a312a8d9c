//! The 16550A UART (COM1) wired to wisp's console.
//!
//! The register model is vm-superio's. This wrapper adds:
//! - an interrupt line that is an `EventFd` (registered by the VMM as an irqfd);
//! - an "input FIFO drained" `EventFd`, so the VMM feeds console input only as fast as the
//!   guest reads it (flow control: the FIFO holds only 64 bytes, and nothing is dropped);
//! - a serde snapshot of the register state;
//! - a receive interrupt that is a level, as on a real 16550: IIR reports "received data
//!   available" for as long as the FIFO holds data (see [`SerialDevice::read`]);
//! - input only for a guest that listens: bytes enter the FIFO only while the guest has
//!   the received-data interrupt enabled (IER bit 0). A driver that sets up the port
//!   reads and discards whatever the FIFO holds (Linux's 8250 startup reads RBR twice
//!   and does so before it enables the interrupt), so typed-ahead input fed earlier
//!   would lose its first bytes. Enabling the interrupt signals the drain event, so the
//!   VMM offers the waiting input then. A polling guest enables IER bit 0 to get input
//!   (and keeps interrupts off in the CPU if it has no handler).

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
/// The interrupt identification register's offset.
const IIR_OFFSET: u8 = 2;
/// IIR's interrupt-identification bits (bit 0 set: nothing pending).
const IIR_ID_MASK: u8 = 0x0f;
/// IIR: received data available.
const IIR_RDA: u8 = 0x04;
/// IIR: no interrupt pending.
const IIR_NONE: u8 = 0x01;
/// IER bit 0: the received-data interrupt is enabled.
const IER_RDA: u8 = 0x01;

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
    /// Nothing is accepted while the guest has the received-data interrupt disabled.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || !self.accepts_input() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot queue input: {e}");
                0
            }
        }
    }

    /// Whether the guest listens for input: its driver enabled the received-data
    /// interrupt.
    pub fn accepts_input(&self) -> bool {
        self.uart.state().interrupt_enable & IER_RDA != 0
    }

    /// Whether the received-data interrupt condition holds: data waits in the FIFO and
    /// the guest enabled the interrupt.
    fn rx_interrupt_pending(&self) -> bool {
        self.uart.fifo_capacity() < SERIAL_FIFO_SIZE && self.accepts_input()
    }

    /// The register state, for snapshots.
    pub fn snapshot(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    /// A UART in the state `state` (from [`SerialDevice::snapshot`], possibly from an
    /// untrusted file), wired like [`SerialDevice::new`]; see [`SerialDevice::load`].
    pub fn from_snapshot(
        irq: EventFd,
        drained: EventFd,
        out: SerialOutput,
        state: &SerialSnapshot,
    ) -> Result<Self, SerialStateError> {
        let mut dev = Self::new(irq, drained, out);
        dev.load(state)?;
        Ok(dev)
    }

    /// Puts the UART in the state `state` (untrusted: checked first; on error the UART
    /// is unchanged), keeping its interrupt, drain event and output. Raises the
    /// interrupt if the loaded registers have one pending. The drain event is not
    /// signalled: the caller checks [`SerialDevice::fifo_capacity`] to resume feeding
    /// input.
    pub fn load(&mut self, state: &SerialSnapshot) -> Result<(), SerialStateError> {
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
        let uart_err = |e: io::Error| SerialStateError::Uart(e.to_string());
        let irq = self.uart.interrupt_evt().0.try_clone().map_err(uart_err)?;
        let drained = self.uart.events().0.try_clone().map_err(uart_err)?;
        // Take the output out of the current UART for the new one.
        let placeholder = Serial::with_events(
            EventFdTrigger(irq.try_clone().map_err(uart_err)?),
            InputDrained(drained.try_clone().map_err(uart_err)?),
            Box::new(io::sink()) as SerialOutput,
        );
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        self.uart = Serial::from_state(
            &state.clone().into(),
            EventFdTrigger(irq),
            InputDrained(drained),
            out,
        )
        .map_err(|e| SerialStateError::Uart(e.to_string()))?;
        self.output_failed = false;
        // vm-superio raises the interrupt only if the saved IIR shows it; a UART saved
        // with data waiting and no interrupt recorded (a guest that missed it) gets it.
        if self.rx_interrupt_pending() && state.interrupt_identification & IIR_RDA == 0 {
            self.uart
                .interrupt_evt()
                .trigger()
                .map_err(|e| SerialStateError::Uart(e.to_string()))?;
        }
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    /// A guest read. IIR is corrected: vm-superio drops "received data available" on
    /// every read of IIR or of the data register, even while the FIFO still holds data,
    /// so a driver that stops reading with bytes left (Linux's 8250 handler takes at
    /// most 256 per pass, then asks IIR again) is told nothing is pending and returns.
    /// The interrupt it was raised for is consumed, the VMM refills the FIFO only once
    /// it is empty, and console input stalls for good. A real 16550 keeps the condition
    /// up while data waits, which is what IIR reports here, and drops it once the FIFO
    /// is empty or the guest masks the interrupt. (THRE, which vm-superio
    /// clears on the same read, is not reported next to it; Linux finds it in LSR.)
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), [first, ..]) = (u8::try_from(offset), data) {
            let value = self.uart.read(off);
            *first = match (off == IIR_OFFSET, self.rx_interrupt_pending()) {
                (true, true) => (value & !IIR_ID_MASK) | IIR_RDA,
                // Latched by vm-superio, but masked or emptied since.
                (true, false) if value & IIR_ID_MASK == IIR_RDA => {
                    (value & !IIR_ID_MASK) | IIR_NONE
                }
                _ => value,
            };
        }
    }

    /// A guest write. When it turns the received-data interrupt on, the drain event is
    /// signalled so that input held back while the guest did not listen is offered now.
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (Ok(off), [byte]) = (u8::try_from(offset), data) else {
            return;
        };
        let listened = self.accepts_input();
        let result = self.uart.write(off, *byte);
        if !listened && self.accepts_input() && self.uart.fifo_capacity() == SERIAL_FIFO_SIZE {
            self.uart.events().in_buffer_empty();
        }
        if let Err(e) = result {
            if !self.output_failed {
                let why = match e {
                    vm_superio::serial::Error::IOError(e) => format!("cannot write: {e}"),
                    e => e.to_string(),
                };
                log::warn!("serial: guest console output is lost ({why}); wisp keeps trying");
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
    fn load_keeps_the_output_and_refuses_bad_states_unchanged() {
        let (mut d, _irq, _drained, sink) = dev();
        d.write(0x3f8, 0, b"a");
        let mut state = d.snapshot();
        state.scratch = 0x42;
        d.load(&state).unwrap();
        d.write(0x3f8, 0, b"b");
        assert_eq!(&*sink.0.lock().unwrap(), b"ab");
        let mut b = [0u8];
        d.read(0x3f8, 7, &mut b);
        assert_eq!(b[0], 0x42);
        let mut bad = state.clone();
        bad.in_buffer = vec![0; SERIAL_FIFO_SIZE + 1];
        assert!(d.load(&bad).is_err());
        assert_eq!(d.snapshot(), state, "unchanged");
    }

    #[test]
    fn input_is_flow_controlled_and_drain_is_signalled() {
        let (mut d, irq, drained, _sink) = dev();
        // Enable the received-data interrupt (which signals the drain event once).
        d.write(0x3f8, 1, &[0x01]);
        assert_eq!(drained.read().unwrap(), 1);
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
    fn iir_reports_received_data_while_the_fifo_holds_any() {
        let (mut d, _irq, _drained, _sink) = dev();
        let iir = |d: &mut SerialDevice| {
            let mut b = [0u8];
            d.read(0x3f8, 2, &mut b);
            b[0] & IIR_ID_MASK
        };
        d.write(0x3f8, 1, &[IER_RDA]);
        assert_eq!(d.enqueue_input(b"0123456789"), 10);
        assert_eq!(iir(&mut d), IIR_RDA);
        // Reading IIR again, and reading part of the data, leaves it pending.
        assert_eq!(iir(&mut d), IIR_RDA);
        for _ in 0..9 {
            d.read(0x3f8, 0, &mut [0u8]);
            assert_eq!(iir(&mut d), IIR_RDA);
        }
        d.read(0x3f8, 0, &mut [0u8]);
        assert_eq!(iir(&mut d), 0x01, "nothing pending once the FIFO is empty");
        // Masked in IER: not reported.
        assert_eq!(d.enqueue_input(b"x"), 1);
        d.write(0x3f8, 1, &[0]);
        assert_eq!(iir(&mut d), 0x01);
    }

    /// Linux's 8250 startup reads RBR (twice) before it enables the received-data
    /// interrupt; input offered before then must wait, not be eaten.
    #[test]
    fn input_waits_until_the_guest_enables_the_receive_interrupt() {
        let (mut d, _irq, drained, _sink) = dev();
        assert!(!d.accepts_input());
        assert_eq!(d.enqueue_input(b"echo hi"), 0, "nobody listens yet");
        // The driver probes and clears the port: nothing is lost since nothing was in.
        for off in [5, 0, 2, 6, 0] {
            d.read(0x3f8, off, &mut [0u8]);
        }
        // (vm-superio signals a drain on every read of an empty FIFO; harmless.)
        let _ = drained.read();
        // The divisor latch shares offset 1: writing it is not enabling the interrupt.
        d.write(0x3f8, 3, &[0x80]);
        d.write(0x3f8, 1, &[IER_RDA]);
        d.write(0x3f8, 3, &[0x03]);
        assert!(!d.accepts_input());
        assert!(drained.read().is_err());
        // Enabling it is the signal to offer the waiting input.
        d.write(0x3f8, 1, &[IER_RDA | 0x04]);
        assert!(d.accepts_input());
        assert_eq!(drained.read().unwrap(), 1);
        assert_eq!(d.enqueue_input(b"echo hi"), 7);
        let mut got = Vec::new();
        for _ in 0..7 {
            let mut b = [0u8];
            d.read(0x3f8, 0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, b"echo hi");
        // Writing IER again while listening signals nothing more than the drain did.
        assert_eq!(drained.read().unwrap(), 1, "drained once");
        d.write(0x3f8, 1, &[IER_RDA]);
        assert!(drained.read().is_err());
    }

    /// Linux's 8250 interrupt handler (serial8250_interrupt, serial8250_handle_irq and
    /// serial8250_rx_chars in 6.1) against the UART, with the VMM refilling the FIFO
    /// shortly after the guest drains it (0 to 3 guest register accesses later: the
    /// VMM thread runs beside the vCPU) and the irqfd's edges latched the way the LAPIC
    /// latches one pending interrupt: every byte must arrive. (Before the IIR fix,
    /// input stalled after a few hundred bytes.)
    #[test]
    fn a_linux_like_driver_fed_on_drain_receives_every_byte() {
        let (mut d, irq, drained, _sink) = dev();
        let input: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        // The VMM's console feed (event_loop.rs): stdin arrives in reads of varying
        // size. A read is moved into the FIFO as far as it has room, the rest after
        // the next drain; once it is all in, the next read from stdin follows (a turn
        // of the VMM's loop later), into whatever room the FIFO has then.
        struct Vmm<'a> {
            input: &'a [u8],
            fed: usize,
            read_left: usize,
            drained: EventFd,
            feed_in: Option<u32>,
            rng: u32,
        }
        impl Vmm<'_> {
            fn random(&mut self, below: u32) -> u32 {
                self.rng = self.rng.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (self.rng >> 16) % below
            }
            fn feed(&mut self, d: &mut SerialDevice) {
                if self.read_left == 0 {
                    let left = self.input.len() - self.fed;
                    self.read_left = (1 + self.random(300) as usize).min(left);
                }
                let n = d.enqueue_input(&self.input[self.fed..self.fed + self.read_left]);
                self.fed += n;
                self.read_left -= n;
            }
            /// The VMM thread's turn after one guest register access (`idle`: the
            /// guest waits for an interrupt, so the VMM gets there).
            fn step(&mut self, d: &mut SerialDevice, idle: bool) {
                let more = self.fed < self.input.len();
                let stdin_ready = more && self.read_left == 0;
                if self.feed_in.is_none() && (self.drained.read().is_ok() || stdin_ready) {
                    self.feed_in = Some(self.random(4));
                }
                match self.feed_in {
                    Some(0) => {
                        self.feed(d);
                        self.feed_in = None;
                    }
                    Some(_) if idle => {
                        self.feed(d);
                        self.feed_in = None;
                    }
                    Some(n) => self.feed_in = Some(n - 1),
                    None => {}
                }
            }
        }
        let mut vmm = Vmm {
            input: &input,
            fed: 0,
            read_left: 0,
            drained,
            feed_in: None,
            rng: 0x2545_f491,
        };
        let reg = |d: &mut SerialDevice, vmm: &mut Vmm, off: u64| {
            let mut b = [0u8];
            d.read(0x3f8, off, &mut b);
            vmm.step(d, false);
            b[0]
        };
        d.write(0x3f8, 1, &[IER_RDA]);
        vmm.feed(&mut d);
        let mut got = Vec::new();
        // Each turn is one interrupt delivered to the guest.
        while irq.read().is_ok() {
            for _pass in 0..512 {
                // serial8250_handle_irq
                if reg(&mut d, &mut vmm, 2) & 0x01 != 0 {
                    break;
                }
                let mut lsr = reg(&mut d, &mut vmm, 5);
                let mut max_count = 256;
                while lsr & LSR_DATA_READY != 0 {
                    got.push(reg(&mut d, &mut vmm, 0));
                    max_count -= 1;
                    if max_count == 0 {
                        break;
                    }
                    lsr = reg(&mut d, &mut vmm, 5);
                }
            }
            // The guest halts until the next interrupt; the VMM catches up.
            vmm.step(&mut d, true);
        }
        assert_eq!(got.len(), input.len(), "console input stalled");
        assert_eq!(got, input);
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
