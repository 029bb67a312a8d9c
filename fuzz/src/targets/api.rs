//! `api`: the control socket's request parser (`vmm::api::Request::parse`, on the line
//! as the server cuts it: up to the first newline, lossy UTF-8, trimmed), the
//! migration address a `migrate` request carries, and the
//! client's parsers of answers and migration events.
//!
//! Oracle: an accepted request, encoded as a client does, parses to the same request.

use vmm::api::{MigrationEvent, Request, Response};
use vmm::migration::Address;

/// Runs one input.
pub fn run(data: &[u8]) {
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if let Ok(req) = Request::parse(text) {
        let encoded = serde_json::to_string(&req).expect("encode a request");
        let back = Request::parse(&encoded).expect("an encoded request parses");
        assert_eq!(back, req, "{encoded}");
        if let Request::Migrate { to, .. } = &req {
            if let Ok(addr) = to.parse::<Address>() {
                let shown = addr.to_string();
                let again: Address = shown.parse().expect("a shown address parses");
                assert_eq!(again.to_string(), shown);
            }
        }
    }
    let _ = serde_json::from_str::<MigrationEvent>(text);
    let _ = serde_json::from_str::<Response>(text);
}
