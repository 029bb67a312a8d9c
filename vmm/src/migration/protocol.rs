//! The migration stream: framing, messages, and the checks a receiver makes on them.
//!
//! ```text
//! source → destination: "WISPMIGR" | protocol version (u32 LE) | flags (u32 LE, 0)
//! then frames, both ways: kind (u8) | 3 zero bytes | payload length (u32 LE) | payload
//!
//!   HELLO    src→dst  JSON Hello: versions, configuration, memory layout, CPU features
//!   ACCEPT   dst→src  empty: the destination built the machine and waits for memory
//!   REFUSE   dst→src  UTF-8 text: why not (at any point; the source keeps the VM)
//!   PAGES    src→dst  count (u32 LE), count entries (u64 LE: page address | flags),
//!                     then 4 KiB of data for every entry without the ZERO flag
//!   STATE    src→dst  digest of every PAGES payload sent (u64 LE, CRC-64/XZ in order),
//!                     then the MachineState in the state format (header, CRC, JSON)
//!   RUNNING  dst→src  empty: the destination's vCPUs run; the source may exit
//!   CANCEL   src→dst  UTF-8 text: the source gives up; the destination discards all
//! ```
//!
//! Everything from the stream is untrusted: lengths are bounded per kind before any
//! allocation, every page address is checked against guest RAM, and the state is
//! decoded and checked as a snapshot's is.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::config::VmConfig;
use crate::memory::GuestMemory;
use crate::state::format::{self, crc64_digest, FormatError};
use crate::state::pages::PAGE;
use crate::state::MachineState;

/// The stream's first eight bytes.
pub const MAGIC: [u8; 8] = *b"WISPMIGR";
/// The protocol this wisp speaks, and the only one it accepts.
pub const PROTOCOL_VERSION: u32 = 1;
/// Pages in one PAGES frame at most.
pub const MAX_BATCH: usize = 256;
/// Page-entry flag: the page is all zero (no data follows for it).
pub const ZERO: u64 = 1;
const FLAGS_MASK: u64 = PAGE as u64 - 1;
const FRAME_HEADER: usize = 8;
/// Longest HELLO or text payload.
const MAX_SMALL: usize = 1 << 20;

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// See the module documentation.
    Hello = 1,
    /// See the module documentation.
    Accept = 2,
    /// See the module documentation.
    Refuse = 3,
    /// See the module documentation.
    Pages = 4,
    /// See the module documentation.
    State = 5,
    /// See the module documentation.
    Running = 6,
    /// See the module documentation.
    Cancel = 7,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::State,
            6 => Kind::Running,
            7 => Kind::Cancel,
            _ => return None,
        })
    }

    /// The longest payload a frame of this kind may have.
    fn max_len(self) -> usize {
        match self {
            Kind::Hello | Kind::Refuse | Kind::Cancel => MAX_SMALL,
            Kind::Accept | Kind::Running => 0,
            Kind::Pages => 4 + MAX_BATCH * (8 + PAGE),
            Kind::State => 8 + format::MAX_STATE_LEN as usize,
        }
    }
}

/// What is wrong with a stream.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// Reading or writing the connection failed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("the other side closed the connection")]
    Closed,
    /// Not a wisp migration stream.
    #[error("not a wisp migration stream (bad magic)")]
    Magic,
    /// Another protocol version.
    #[error("migration protocol version {found}, but this wisp speaks only version {PROTOCOL_VERSION}; use the same wisp version on both sides")]
    Version {
        /// What the peer sent.
        found: u32,
    },
    /// A frame that cannot be one.
    #[error("corrupt stream: {0}")]
    Corrupt(String),
    /// A frame of a kind that does not belong here.
    #[error("unexpected {got:?} frame (expected {want})")]
    Unexpected {
        /// What arrived.
        got: Kind,
        /// What the reader waited for.
        want: &'static str,
    },
    /// The peer refused or gave up, and said why.
    #[error("{0}")]
    Refused(String),
    /// A page outside guest RAM, or similar.
    #[error("bad page data: {0}")]
    Pages(String),
    /// The final state is bad.
    #[error("bad state: {0}")]
    State(#[from] FormatError),
}

/// A frame as read.
pub struct Frame {
    /// Its kind.
    pub kind: Kind,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Writes the stream's preamble.
pub fn write_preamble(w: &mut impl Write) -> io::Result<()> {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    w.write_all(&b)
}

/// Reads and checks the stream's preamble.
pub fn read_preamble(r: &mut impl Read) -> Result<(), ProtocolError> {
    let mut b = [0u8; 16];
    read_exact(r, &mut b)?;
    if b[..8] != MAGIC {
        return Err(ProtocolError::Magic);
    }
    let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version { found: version });
    }
    if b[12..16] != [0; 4] {
        return Err(ProtocolError::Corrupt("unknown stream flags".into()));
    }
    Ok(())
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ProtocolError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
        _ => ProtocolError::Io(e),
    })
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut h = [0u8; FRAME_HEADER];
    h[0] = kind as u8;
    h[4..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&h)?;
    w.write_all(payload)
}

/// Reads one frame, refusing unknown kinds and payloads longer than the kind allows
/// before reading them. A REFUSE or CANCEL frame becomes [`ProtocolError::Refused`].
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtocolError> {
    let mut h = [0u8; FRAME_HEADER];
    read_exact(r, &mut h)?;
    let kind = Kind::from_u8(h[0])
        .ok_or_else(|| ProtocolError::Corrupt(format!("unknown frame kind {}", h[0])))?;
    if h[1..4] != [0; 3] {
        return Err(ProtocolError::Corrupt(
            "frame header reserved bytes set".into(),
        ));
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > kind.max_len() {
        return Err(ProtocolError::Corrupt(format!(
            "{kind:?} frame of {len} bytes (at most {})",
            kind.max_len()
        )));
    }
    let mut payload = vec![0u8; len];
    read_exact(r, &mut payload)?;
    if matches!(kind, Kind::Refuse | Kind::Cancel) {
        return Err(ProtocolError::Refused(
            String::from_utf8_lossy(&payload).into_owned(),
        ));
    }
    Ok(Frame { kind, payload })
}

/// Reads one frame of kind `want`.
pub fn expect_frame(r: &mut impl Read, want: Kind) -> Result<Vec<u8>, ProtocolError> {
    let f = read_frame(r)?;
    if f.kind != want {
        return Err(ProtocolError::Unexpected {
            got: f.kind,
            want: match want {
                Kind::Hello => "HELLO",
                Kind::Accept => "ACCEPT",
                Kind::Pages | Kind::State => "PAGES or STATE",
                Kind::Running => "RUNNING",
                Kind::Refuse | Kind::Cancel => "an answer",
            },
        });
    }
    Ok(f.payload)
}

/// One CPUID register the guest's features live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    /// CPUID leaf.
    pub leaf: u32,
    /// Subleaf.
    pub subleaf: u32,
    /// Register: 0 = EAX, 1 = EBX, 2 = ECX, 3 = EDX.
    pub reg: u8,
    /// The feature bits the guest sees.
    pub bits: u32,
}

/// What the source says about the VM before any memory moves.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// The source's wisp (informational).
    pub wisp_version: String,
    /// The state format the final STATE frame uses.
    pub format_version: u32,
    /// The machine configuration.
    pub config: VmConfig,
    /// Guest RAM as (guest address, length) regions.
    pub memory: Vec<(u64, u64)>,
    /// The CPU features the guest was given.
    pub cpu: Vec<CpuFeatures>,
}

/// Writes a HELLO frame.
pub fn write_hello(w: &mut impl Write, hello: &Hello) -> io::Result<()> {
    let body = serde_json::to_vec(hello).map_err(io::Error::other)?;
    write_frame(w, Kind::Hello, &body)
}

/// Parses a HELLO payload.
pub fn parse_hello(payload: &[u8]) -> Result<Hello, ProtocolError> {
    serde_json::from_slice(payload)
        .map_err(|e| ProtocolError::Corrupt(format!("unreadable HELLO: {e}")))
}

/// Collects pages into PAGES frames of at most [`MAX_BATCH`] pages.
pub struct PageBatch {
    entries: Vec<u64>,
    data: Vec<u8>,
    payload: Vec<u8>,
}

impl Default for PageBatch {
    fn default() -> Self {
        Self {
            entries: Vec::with_capacity(MAX_BATCH),
            data: Vec::with_capacity(MAX_BATCH * PAGE),
            payload: Vec::with_capacity(Kind::Pages.max_len()),
        }
    }
}

impl PageBatch {
    /// Adds the page at `guest_addr` (page-aligned) with its contents, or as a zero
    /// marker; true when the batch is full.
    pub fn push(&mut self, guest_addr: u64, data: &[u8], zero: bool) -> bool {
        if zero {
            self.entries.push(guest_addr | ZERO);
        } else {
            self.entries.push(guest_addr);
            self.data.extend_from_slice(data);
        }
        self.entries.len() == MAX_BATCH
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The PAGES payload of the batch, which is then empty again.
    pub fn take_payload(&mut self) -> &[u8] {
        self.payload.clear();
        self.payload
            .extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            self.payload.extend_from_slice(&e.to_le_bytes());
        }
        self.payload.extend_from_slice(&self.data);
        self.entries.clear();
        self.data.clear();
        &self.payload
    }
}

/// Writes the pages of a PAGES `payload` into `mem`, checking every entry first:
/// page-aligned, known flags, inside guest RAM, and data for exactly the non-zero
/// pages. Returns how many pages it held. On error nothing is written.
pub fn apply_pages(mem: &GuestMemory, payload: &[u8]) -> Result<usize, ProtocolError> {
    let bad = |m: String| Err(ProtocolError::Pages(m));
    let Some(count) = payload.get(..4) else {
        return bad("no page count".into());
    };
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    if count > MAX_BATCH {
        return bad(format!("{count} pages in one frame (at most {MAX_BATCH})"));
    }
    let entries_end = 4 + count * 8;
    let Some(entries) = payload.get(4..entries_end) else {
        return bad(format!("{count} page entries announced, fewer sent"));
    };
    let entries: Vec<u64> = entries
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .collect();
    let mut with_data = 0usize;
    for &e in &entries {
        let (addr, flags) = (e & !FLAGS_MASK, e & FLAGS_MASK);
        if flags & !ZERO != 0 {
            return bad(format!("page entry {e:#x} has unknown flags"));
        }
        if !mem.check_range(GuestAddress(addr), PAGE) {
            return bad(format!("page {addr:#x} is outside guest RAM"));
        }
        if flags & ZERO == 0 {
            with_data += 1;
        }
    }
    let data = &payload[entries_end..];
    if data.len() != with_data * PAGE {
        return bad(format!(
            "{} bytes of page data for {with_data} pages",
            data.len()
        ));
    }
    let zero = [0u8; PAGE];
    let mut pages = data.chunks_exact(PAGE);
    for &e in &entries {
        let src = if e & ZERO != 0 {
            &zero[..]
        } else {
            pages.next().unwrap_or(&zero)
        };
        mem.write_slice(src, GuestAddress(e & !FLAGS_MASK))
            .map_err(|err| ProtocolError::Pages(err.to_string()))?;
    }
    Ok(count)
}

/// The running digest of PAGES payloads, as both sides compute it.
pub struct PageDigest(crc::Digest<'static, u64, crc::Table<16>>);

impl Default for PageDigest {
    fn default() -> Self {
        Self(crc64_digest())
    }
}

impl PageDigest {
    /// Adds one PAGES payload.
    pub fn update(&mut self, payload: &[u8]) {
        self.0.update(payload);
    }

    /// The digest so far.
    pub fn value(&self) -> u64 {
        self.0.clone().finalize()
    }
}

/// Writes the STATE frame: the page digest, then the encoded state.
pub fn write_state(w: &mut impl Write, digest: u64, state: &MachineState) -> io::Result<()> {
    let encoded = format::encode(state).map_err(io::Error::other)?;
    let mut payload = Vec::with_capacity(8 + encoded.len());
    payload.extend_from_slice(&digest.to_le_bytes());
    payload.extend_from_slice(&encoded);
    write_frame(w, Kind::State, &payload)
}

/// Parses a STATE payload: the source's page digest, and the state (format and
/// checksum checked; its consistency is the caller's to check).
pub fn parse_state(payload: &[u8]) -> Result<(u64, MachineState), ProtocolError> {
    let Some(d) = payload.get(..8) else {
        return Err(ProtocolError::Corrupt(
            "STATE frame without a digest".into(),
        ));
    };
    let digest = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    let state = format::decode(&payload[8..])?;
    Ok((digest, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        write_preamble(&mut buf).unwrap();
        write_frame(&mut buf, Kind::Accept, &[]).unwrap();
        write_frame(&mut buf, Kind::Refuse, b"no room").unwrap();
        let mut r = Cursor::new(buf);
        read_preamble(&mut r).unwrap();
        assert_eq!(expect_frame(&mut r, Kind::Accept).unwrap(), b"");
        let e = read_frame(&mut r).err().unwrap();
        assert_eq!(e.to_string(), "no room");
        assert!(matches!(read_frame(&mut r), Err(ProtocolError::Closed)));

        let mut bad = Vec::new();
        write_preamble(&mut bad).unwrap();
        bad[8] = 9;
        let e = read_preamble(&mut Cursor::new(bad)).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
        assert!(matches!(
            read_preamble(&mut Cursor::new(b"GARBAGE!GARBAGE!".to_vec())),
            Err(ProtocolError::Magic)
        ));
        // An oversized frame is refused from its header, before its payload.
        let mut big = vec![Kind::Hello as u8, 0, 0, 0];
        big.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = read_frame(&mut Cursor::new(big)).err().unwrap();
        assert!(e.to_string().contains("at most"), "{e}");
        let e = read_frame(&mut Cursor::new(vec![99, 0, 0, 0, 0, 0, 0, 0]))
            .err()
            .unwrap();
        assert!(e.to_string().contains("unknown frame kind 99"), "{e}");
    }

    #[test]
    fn pages_are_applied_only_when_every_entry_is_good() {
        let src = crate::memory::create(16 << 20).unwrap();
        let dst = crate::memory::create(16 << 20).unwrap();
        src.write_slice(&[7u8; PAGE], GuestAddress(0x3000)).unwrap();
        dst.write_slice(&[9u8; PAGE], GuestAddress(0x5000)).unwrap();
        let mut batch = PageBatch::default();
        let mut page = [0u8; PAGE];
        src.read_slice(&mut page, GuestAddress(0x3000)).unwrap();
        batch.push(0x3000, &page, false);
        batch.push(0x5000, &[], true);
        let payload = batch.take_payload().to_vec();
        assert!(batch.is_empty());
        assert_eq!(apply_pages(&dst, &payload).unwrap(), 2);
        let mut got = [0u8; PAGE];
        dst.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
        assert_eq!(got, [7u8; PAGE]);
        dst.read_slice(&mut got, GuestAddress(0x5000)).unwrap();
        assert_eq!(got, [0u8; PAGE], "a zero marker clears the page");

        // Bad batches change nothing.
        dst.write_slice(&[1u8; PAGE], GuestAddress(0x3000)).unwrap();
        let mut outside = PageBatch::default();
        outside.push(0x3000, &page, false);
        outside.push(16 << 20, &[], true);
        let mut flags = payload.clone();
        flags[4] |= 0x10;
        let mut short = payload.clone();
        short.truncate(short.len() - 1);
        let mut many = payload.clone();
        many[..4].copy_from_slice(&1000u32.to_le_bytes());
        for (bad, want) in [
            (outside.take_payload().to_vec(), "outside guest RAM"),
            (flags, "unknown flags"),
            (short, "bytes of page data"),
            (many, "at most 256"),
            (vec![1, 0], "no page count"),
        ] {
            let e = apply_pages(&dst, &bad).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        dst.read_slice(&mut got, GuestAddress(0x3000)).unwrap();
        assert_eq!(got, [1u8; PAGE], "nothing written by a bad batch");
    }
}
