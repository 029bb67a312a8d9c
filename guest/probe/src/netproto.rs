//! `net-arp` and `net-dhcp`: ARP and DHCP exchanges over the virtio-net
//! driver (net.rs), for testing user-mode networking with the slirp
//! address plan (guest 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3).
//!
//! Each request is sent up to [`TRIES`] times; after each send the probe
//! polls for about a second ([`RETRY_POLLS`]) for the matching reply and
//! drops every other frame. Only frames to our MAC or to broadcast count.

use core::fmt;

use crate::net::{Mac, Net};
use crate::virtqueue::{self, WaitError};
use crate::{io, status};

/// Polls per try: [`virtqueue::POLLS`] is ~30 s here, so about 1 s.
const RETRY_POLLS: u64 = virtqueue::POLLS >> 5;
/// Sends of one request before `probe: <cmd> timeout`.
const TRIES: u32 = 5;

/// Default ARP sender address: the guest's address in the plan.
pub const GUEST_IP: [u8; 4] = [10, 0, 2, 15];

const ETH_HDR: usize = 14;
/// Shortest Ethernet frame (without FCS): ARP requests are padded to it.
const MIN_FRAME: usize = 60;
const BROADCAST: [u8; 6] = [0xff; 6];
const ETH_ARP: [u8; 2] = [0x08, 0x06];
const ETH_IPV4: [u8; 2] = [0x08, 0x00];
/// ARP for IPv4 over Ethernet: htype 1, ptype 0x0800, hlen 6, plen 4,
/// then the 16-bit operation (1 request, 2 reply).
const ARP_HEAD: [u8; 6] = [0, 1, 8, 0, 6, 4];
const ARP_LEN: usize = 28;

const IP_HDR: usize = 20;
const UDP_HDR: usize = 8;
const PROTO_UDP: u8 = 17;
const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;
/// BOOTP fixed part (up to and including `file`), then the magic cookie.
const BOOTP_FIXED: usize = 236;
const COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Our DHCP payload: the fixed part plus a full 312-byte options field,
/// i.e. a 576-byte IP datagram (slirp drops shorter BOOTP requests).
const DHCP_LEN: usize = BOOTP_FIXED + 312;
const DHCP_OFF: usize = ETH_HDR + IP_HDR + UDP_HDR;
const DHCP_FRAME: usize = DHCP_OFF + DHCP_LEN;
/// Transaction id ("wisp"), xored with the low 4 bytes of our MAC.
const XID_BASE: u32 = 0x7769_7370;
/// Parameter request list: mask, router, DNS, MTU, lease, server id.
const PARAMS: [u8; 6] = [1, 3, 6, 26, 51, 54];

const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;

/// Displays an IPv4 address in dotted decimal.
pub struct Ip(pub [u8; 4]);

impl fmt::Display for Ip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// Parses a dotted-decimal IPv4 address (four decimal numbers 0..255).
pub fn parse_ipv4(s: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split(|&b| b == b'.');
    for o in out.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let v = p.iter().fold(0u32, |v, &d| v * 10 + u32::from(d - b'0'));
        *o = u8::try_from(v).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Sends the `len`-byte frame `fill` writes, up to TRIES times, each time
/// polling about a second for a received frame that `matches` accepts.
/// Ends the run with `probe: <cmd> timeout` if none does.
fn transact<T>(
    net: &mut Net,
    len: usize,
    fill: impl Fn(&mut [u8]),
    mut matches: impl FnMut(&[u8]) -> Option<T>,
) -> T {
    for _ in 0..TRIES {
        net.send_with(len, &fill);
        let mut budget = RETRY_POLLS;
        while let Some(r) = net.recv_with(&mut budget, &mut matches) {
            if let Some(v) = r {
                return v;
            }
        }
    }
    net.fail(WaitError::Timeout)
}

/// True if frame `f` has a full Ethernet header, ethertype `ty` and is
/// addressed to `mac` or to broadcast.
fn eth_match(f: &[u8], mac: [u8; 6], ty: [u8; 2]) -> bool {
    f.len() >= ETH_HDR && (f[..6] == mac || f[..6] == BROADCAST) && f[12..14] == ty
}

fn eth_header(f: &mut [u8], dst: [u8; 6], src: [u8; 6], ty: [u8; 2]) {
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ty);
}

fn ip4(v: &[u8]) -> [u8; 4] {
    let mut a = [0; 4];
    a.copy_from_slice(&v[..4]);
    a
}

/// `net-arp:TARGET[:SENDER]`: who-has TARGET tell SENDER, broadcast.
pub fn arp(cmd: &str, target: [u8; 4], sender: [u8; 4]) {
    let mut net = Net::open(cmd);
    net.rx_post_all();
    let mac = net.mac();
    let fill = |f: &mut [u8]| {
        f.fill(0);
        eth_header(f, BROADCAST, mac, ETH_ARP);
        let a = &mut f[ETH_HDR..ETH_HDR + ARP_LEN];
        a[..6].copy_from_slice(&ARP_HEAD);
        a[7] = 1; // request
        a[8..14].copy_from_slice(&mac);
        a[14..18].copy_from_slice(&sender);
        a[24..28].copy_from_slice(&target); // target MAC stays zero
    };
    let is_at = transact(&mut net, MIN_FRAME, fill, |f| {
        let a = f.get(ETH_HDR..ETH_HDR + ARP_LEN)?;
        let reply = a[..6] == ARP_HEAD && a[6..8] == [0, 2] && a[14..18] == target;
        let mut sha = [0; 6];
        sha.copy_from_slice(&a[8..14]);
        (eth_match(f, mac, ETH_ARP) && reply).then_some(sha)
    });
    println!("probe: net-arp {} is-at {}", Ip(target), Mac(is_at));
}

/// Adds the 16-bit big-endian words of `data` (odd length: zero-padded)
/// to the ones'-complement accumulator `sum`.
fn sum16(sum: u32, data: &[u8]) -> u32 {
    data.chunks(2).fold(sum, |s, c| {
        s + (u32::from(c[0]) << 8 | u32::from(c.get(1).copied().unwrap_or(0)))
    })
}

/// The Internet checksum of an accumulated sum.
fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes the Ethernet (broadcast), IPv4 and UDP headers, with both
/// checksums, in front of the `payload`-byte UDP payload already in `f`.
fn udp_broadcast(f: &mut [u8], mac: [u8; 6], sport: u16, dport: u16, payload: usize) {
    let (src, dst) = ([0u8; 4], [0xffu8; 4]);
    eth_header(f, BROADCAST, mac, ETH_IPV4);
    let total = (IP_HDR + UDP_HDR + payload) as u16;
    let ip = &mut f[ETH_HDR..ETH_HDR + IP_HDR];
    ip[..12].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_UDP, 0, 0]);
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = fold(sum16(0, ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let udp_len = (UDP_HDR + payload) as u16;
    let udp = &mut f[ETH_HDR + IP_HDR..ETH_HDR + IP_HDR + usize::from(udp_len)];
    udp[..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].fill(0);
    let pseudo = sum16(sum16(0, &src), &dst) + u32::from(PROTO_UDP) + u32::from(udp_len);
    let c = match fold(sum16(pseudo, udp)) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
}

/// Appends DHCP option `code` with value `v` at `*at` in `o`.
fn put_opt(o: &mut [u8], at: &mut usize, code: u8, v: &[u8]) {
    o[*at] = code;
    o[*at + 1] = v.len() as u8;
    o[*at + 2..*at + 2 + v.len()].copy_from_slice(v);
    *at += 2 + v.len();
}

/// Writes a whole DHCP DISCOVER or REQUEST frame (broadcast flag set;
/// a REQUEST carries `request` = (requested IP, server id)).
fn dhcp_fill(f: &mut [u8], mac: [u8; 6], xid: u32, kind: u8, request: Option<Request>) {
    f.fill(0);
    let d = &mut f[DHCP_OFF..DHCP_OFF + DHCP_LEN];
    d[..4].copy_from_slice(&[1, 1, 6, 0]); // BOOTREQUEST, Ethernet, hlen, hops
    d[4..8].copy_from_slice(&xid.to_be_bytes());
    d[10] = 0x80; // flags: broadcast
    d[28..34].copy_from_slice(&mac);
    d[BOOTP_FIXED..BOOTP_FIXED + 4].copy_from_slice(&COOKIE);
    let o = &mut d[BOOTP_FIXED + 4..];
    let mut at = 0;
    put_opt(o, &mut at, 53, &[kind]);
    let mut client_id = [1u8; 7]; // hardware type 1, then the MAC
    client_id[1..].copy_from_slice(&mac);
    put_opt(o, &mut at, 61, &client_id);
    if let Some(Request { ip, server }) = request {
        put_opt(o, &mut at, 50, &ip);
        if let Some(s) = server {
            put_opt(o, &mut at, 54, &s);
        }
    }
    put_opt(o, &mut at, 55, &PARAMS);
    o[at] = 255;
    udp_broadcast(f, mac, DHCP_CLIENT_PORT, DHCP_SERVER_PORT, DHCP_LEN);
}

#[derive(Clone, Copy)]
struct Request {
    ip: [u8; 4],
    server: Option<[u8; 4]>,
}

/// What a DHCP reply says (first occurrence of each option).
#[derive(Default)]
struct Reply {
    kind: u8,
    yiaddr: [u8; 4],
    server: Option<[u8; 4]>,
    router: Option<[u8; 4]>,
    dns: Option<[u8; 4]>,
    mask: Option<[u8; 4]>,
    mtu: Option<u16>,
    lease: Option<u32>,
}

/// Parses a DHCP reply (UDP 67 -> 68, BOOTREPLY) to transaction `xid`
/// for `mac`; `None` for any other frame.
fn dhcp_parse(f: &[u8], mac: [u8; 6], xid: u32) -> Option<Reply> {
    if !eth_match(f, mac, ETH_IPV4) {
        return None;
    }
    let ip = &f[ETH_HDR..];
    let ihl = usize::from(*ip.first()? & 0xf) * 4;
    if ip.len() < IP_HDR || ip[0] >> 4 != 4 || ip[9] != PROTO_UDP || ihl < IP_HDR {
        return None;
    }
    // Not a fragment: MF clear, offset 0.
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[6] & 0x3f != 0 || ip[7] != 0 || total < ihl + UDP_HDR || total > ip.len() {
        return None;
    }
    let udp = &ip[ihl..total];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    if (sport, dport) != (DHCP_SERVER_PORT, DHCP_CLIENT_PORT)
        || udp_len < UDP_HDR
        || udp_len > udp.len()
    {
        return None;
    }
    let d = &udp[UDP_HDR..udp_len];
    if d.len() < BOOTP_FIXED + 4
        || d[0] != 2
        || d[4..8] != xid.to_be_bytes()
        || d[28..34] != mac
        || d[BOOTP_FIXED..BOOTP_FIXED + 4] != COOKIE
    {
        return None;
    }
    let mut r = Reply {
        yiaddr: ip4(&d[16..20]),
        ..Reply::default()
    };
    let o = &d[BOOTP_FIXED + 4..];
    let mut i = 0;
    while i < o.len() {
        let code = o[i];
        if code == 0 {
            i += 1;
            continue;
        }
        if code == 255 {
            break;
        }
        let len = usize::from(*o.get(i + 1)?);
        let v = o.get(i + 2..i + 2 + len)?;
        i += 2 + len;
        let addr = (len >= 4).then(|| ip4(v));
        match code {
            53 if len >= 1 && r.kind == 0 => r.kind = v[0],
            1 => r.mask = r.mask.or(addr),
            3 => r.router = r.router.or(addr),
            6 => r.dns = r.dns.or(addr),
            54 => r.server = r.server.or(addr),
            26 if len >= 2 => r.mtu = r.mtu.or(Some(u16::from_be_bytes([v[0], v[1]]))),
            51 => r.lease = r.lease.or(addr.map(u32::from_be_bytes)),
            _ => {}
        }
    }
    (r.kind != 0).then_some(r)
}

/// `net-dhcp`: DISCOVER, OFFER, REQUEST, ACK (or NAK: status 8).
pub fn dhcp(cmd: &str) {
    let mut net = Net::open(cmd);
    net.rx_post_all();
    let mac = net.mac();
    let xid = XID_BASE ^ u32::from_be_bytes(ip4(&mac[2..]));
    let offer = transact(
        &mut net,
        DHCP_FRAME,
        |f| dhcp_fill(f, mac, xid, DISCOVER, None),
        |f| dhcp_parse(f, mac, xid).filter(|r| r.kind == OFFER),
    );
    let ip = |a: Option<[u8; 4]>| a.map_or(Ip([0; 4]), Ip);
    println!(
        "probe: net-dhcp offer={} server={} router={} dns={} mask={} mtu={} lease={}",
        Ip(offer.yiaddr),
        ip(offer.server),
        ip(offer.router),
        ip(offer.dns),
        ip(offer.mask),
        offer.mtu.unwrap_or(0),
        offer.lease.unwrap_or(0)
    );
    let request = Request {
        ip: offer.yiaddr,
        server: offer.server,
    };
    let reply = transact(
        &mut net,
        DHCP_FRAME,
        |f| dhcp_fill(f, mac, xid, REQUEST, Some(request)),
        |f| dhcp_parse(f, mac, xid).filter(|r| r.kind == ACK || r.kind == NAK),
    );
    if reply.kind == NAK {
        println!("probe: net-dhcp nak");
        io::exit(status::CHECK_FAILED)
    }
    println!("probe: net-dhcp ack={}", Ip(reply.yiaddr));
}
