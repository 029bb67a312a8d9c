//! `migration`: the destination's side of a migration stream, without KVM: the frame
//! reader (`vmm::migration::protocol`), the HELLO and its configuration check
//! (`receive::read_hello`, `VmConfig::validate`), then PAGES into guest memory and the
//! STATE with its digest and checks (`receive::receive_pages`).
//!
//! Input: a mode byte. Mode 0: the rest is the stream as it comes from the source.
//! Otherwise the target writes the preamble and builds frames from specs (kind byte, u16
//! length, payload); with mode bit 1, a PAGES spec is a compact page list (count byte,
//! then per page an index byte, bit 7 for ZERO, and a fill byte) that the target turns
//! into the real payload; with mode bit 2, a STATE spec's payload is only the JSON body,
//! to which the target adds the right digest, header and CRC.

use std::io::Cursor;

use vmm::migration::protocol::{self, Kind, PageDigest};
use vmm::migration::receive::{read_hello, receive_pages, Received};

use super::state::{wrap, LIMITS};
use crate::input::Input;
use crate::memory::{fill, guest_memory};

const PAGE: usize = 4096;

/// The real PAGES payload of a compact page list.
fn pages_payload(spec: &[u8]) -> Vec<u8> {
    let mut spec = Input::new(spec);
    let count = usize::from(spec.u8() % 9);
    let pages: Vec<(u8, u8)> = (0..count).map(|_| (spec.u8(), spec.u8())).collect();
    let mut out = (count as u32).to_le_bytes().to_vec();
    for &(index, _) in &pages {
        // Pages 0 to 0x3f: the fuzz memory has 0-0xf and 0x20, the rest is outside.
        let addr = u64::from(index & 0x3f) * PAGE as u64;
        let zero = u64::from(index >> 7);
        out.extend_from_slice(&(addr | zero).to_le_bytes());
    }
    for &(index, fill) in &pages {
        if index & 0x80 == 0 {
            out.extend(std::iter::repeat_n(fill, PAGE));
        }
    }
    out
}

/// The stream built from frame specs.
fn build(mode: u8, input: &mut Input) -> Vec<u8> {
    let mut stream = Vec::new();
    protocol::write_preamble(&mut stream).expect("write to a Vec");
    let mut digest = PageDigest::default();
    while !input.is_empty() {
        let kind = input.u8();
        let len = usize::from(input.u16());
        let spec = input.bytes(len);
        let payload = match kind {
            k if k == Kind::Pages as u8 && mode & 2 != 0 => pages_payload(spec),
            k if k == Kind::State as u8 && mode & 4 != 0 => {
                let mut p = digest.value().to_le_bytes().to_vec();
                p.extend_from_slice(&wrap(spec));
                p
            }
            _ => spec.to_vec(),
        };
        if kind == Kind::Pages as u8 {
            digest.update(&payload);
        }
        stream.extend_from_slice(&[kind, 0, 0, 0]);
        stream.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        stream.extend_from_slice(&payload);
    }
    stream
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let stream = if mode == 0 {
        input.rest().to_vec()
    } else {
        build(mode, &mut input)
    };
    let mut r = Cursor::new(stream);
    let Ok(hello) = read_hello(&mut r) else {
        return;
    };
    // `wisp receive` refuses an offer whose configuration does not validate.
    if hello.config.validate(&LIMITS).is_err() {
        return;
    }
    let mem = guest_memory();
    fill(&mem, &[]);
    let mut progress = Received::default();
    if let Ok(state) = receive_pages(&mut r, &mem, &mut progress) {
        assert_eq!(
            state.vcpus.len(),
            usize::from(state.config.cpus),
            "a checked state"
        );
    }
}
