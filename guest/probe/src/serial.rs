//! Polled 16550 UART on COM1 (no initialisation needed by the VMM's or
//! QEMU's emulated UART). Reading sets IER bit 0, the received-data
//! interrupt, because wisp feeds console input only to a guest that enables
//! it; the probe runs with IF=0, so the interrupt is never taken.

use core::fmt;

use crate::io;

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const RBR: u16 = COM1;
const IER: u16 = COM1 + 1;
const LSR: u16 = COM1 + 5;
const IER_RDA: u8 = 1 << 0;
const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// Upper bound on LSR polls per byte, so a missing or stuck UART cannot
/// hang the probe.
const MAX_POLLS: u32 = 1 << 20;

/// Handle to COM1 (stateless; CPL3 only, see io.rs).
pub struct Serial;

impl Serial {
    /// Writes one byte, waiting (bounded) for THR to be empty.
    pub fn write_byte(&mut self, b: u8) {
        let mut polls = 0;
        // SAFETY: reading the LSR of COM1 has no side effects we rely on.
        while unsafe { io::inb(LSR) } & LSR_THR_EMPTY == 0 && polls < MAX_POLLS {
            polls += 1;
            core::hint::spin_loop();
        }
        // SAFETY: writing THR transmits one byte on COM1.
        unsafe { io::outb(THR, b) };
    }

    /// Reads exactly `n` bytes, passing each to `f`, polling LSR and
    /// waiting as long as it takes (no timeout: the VMM feeds input as the
    /// FIFO drains). Two port accesses per byte (LSR, then RBR) while data
    /// is ready, plus one LSR poll per wait.
    pub fn read_bytes(&mut self, n: u32, mut f: impl FnMut(u8)) {
        // SAFETY: enabling the received-data interrupt only tells the UART we
        // listen; with IF=0 the CPU never takes it. (LCR.DLAB is never set by
        // the probe, so offset 1 is IER.)
        unsafe { io::outb(IER, IER_RDA) };
        let mut left = n;
        while left > 0 {
            // SAFETY: reading the LSR of COM1 has no side effects we rely on.
            if unsafe { io::inb(LSR) } & LSR_DATA_READY != 0 {
                // SAFETY: LSR says data ready: reading RBR pops one byte of
                // the receive FIFO, which is what we want.
                f(unsafe { io::inb(RBR) });
                left -= 1;
            } else {
                core::hint::spin_loop();
            }
        }
    }

    /// Writes bytes unchanged.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_byte(b);
        }
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Displays bytes as text: printable ASCII as is, anything else as `\xNN`
/// (the kernel cmdline need not be UTF-8).
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            if (0x20..0x7f).contains(&b) {
                fmt::Write::write_char(f, b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// Prints a formatted line (terminated by `\n`) on COM1.
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut s = $crate::serial::Serial;
        let _ = s.write_fmt(format_args!($($arg)*));
        s.write_byte(b'\n');
    }};
}
