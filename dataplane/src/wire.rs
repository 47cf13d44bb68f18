//! Zero-copy packet views over a frame's bytes, and incremental checksums.
//!
//! The hot path never builds an owned representation of a packet: it finds header offsets once
//! ([`parse`]) and then reads and writes fields in place through small accessors. Every read is
//! bounds-checked by `parse` before any accessor runs, so the accessors index without further
//! checks failing: an accessor is only called on an offset that `parse` proved to be inside the
//! frame. Slow paths (tests, fixtures, the reject builders' cross-checks) use `etherparse`.
//!
//! Checksums are updated incrementally (RFC 1624, `HC' = ~(~HC + ~m + m')`), so a NAT rewrite
//! costs a few additions whatever the payload length. The UDP "no checksum" value 0 is kept as 0,
//! and a computed 0 is sent as 0xffff (RFC 768).

use core::net::Ipv4Addr;

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// EtherType of IPv4.
pub const ETH_P_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType of an 802.1ad (QinQ) service tag.
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// TCP flag bits (byte 13 of the TCP header).
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

// One bounds check per access (a range), then a plain (unaligned) load or store.

#[inline(always)]
pub(crate) fn rd16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_be_bytes(a)
}

#[inline(always)]
pub(crate) fn wr16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline(always)]
pub(crate) fn rd32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

#[inline(always)]
pub(crate) fn wr32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// One's-complement sum of `data` added to `sum` (RFC 1071), 32 bits at a time into a 64-bit
/// accumulator (no branch per word), folded back to at most 17 bits so callers can keep adding.
#[inline]
pub fn csum_partial(data: &[u8], sum: u32) -> u32 {
    let mut acc = u64::from(sum);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    match *chunks.remainder() {
        [a] => acc += u64::from(a) << 8,
        [a, b] => acc += u64::from(u16::from_be_bytes([a, b])),
        [a, b, c] => acc += u64::from(u16::from_be_bytes([a, b])) + (u64::from(c) << 8),
        _ => {}
    }
    // 64 -> 32 -> 17 bits; one's-complement addition is associative, so the 32-bit words'
    // sum folds to the same 16-bit sum as adding 16-bit words one by one.
    let s = (acc & 0xffff_ffff) + (acc >> 32);
    let s = ((s & 0xffff_ffff) + (s >> 32)) as u32;
    (s & 0xffff) + (s >> 16)
}

/// Folds a 32-bit one's-complement sum to 16 bits and complements it.
#[inline(always)]
pub fn csum_fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// RFC 1624's `~m + m'` for a 32-bit field, as a sum of 16-bit words (at most 4 x 0xffff).
#[inline(always)]
fn delta32(old: u32, new: u32) -> u32 {
    u32::from(!(old >> 16) as u16) + u32::from(!(old as u16)) + (new >> 16) + (new & 0xffff)
}

/// RFC 1624's `~m + m'` for a 16-bit field.
#[inline(always)]
fn delta16(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

/// RFC 1624 eqn. 3 for an accumulated delta (at most 8 x 0xffff): `~(~HC + delta)`.
#[inline(always)]
fn csum_apply(check: u16, delta: u32) -> u16 {
    csum_fold(u32::from(!check) + delta)
}

/// RFC 1624 eqn. 3: the checksum `check` after a 16-bit word changed from `old` to `new`.
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    csum_fold(sum)
}

/// RFC 1624 for a 32-bit field (two 16-bit words).
#[inline(always)]
pub fn csum_replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old >> 16) as u16)
        + u32::from(!(old as u16))
        + (new >> 16)
        + (new & 0xffff);
    csum_fold(sum)
}

/// Where the headers of a frame are. Produced by [`parse`]; every offset in it is inside the
/// frame, with the whole header it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    /// Offset of the IPv4 header.
    pub l3: usize,
    /// Offset of the L4 header (TCP, UDP or ICMP); meaningful when `has_l4`.
    pub l4: usize,
    /// End of the IP datagram (`l3 + total length`); bytes past it are link padding.
    pub end: usize,
    /// IP protocol number.
    pub proto: u8,
    /// Whether the L4 header is present in this frame (false for non-first fragments).
    pub has_l4: bool,
    /// Whether this is a fragment (MF set or a non-zero offset).
    pub fragment: bool,
}

/// What a frame is, as far as the pipeline cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// An IPv4 datagram whose headers are all inside the frame.
    Ipv4(Offsets),
    /// ARP: always the kernel's.
    Arp,
    /// IPv6: passed to the kernel for now.
    Ipv6,
    /// Any other EtherType.
    OtherEthertype,
    /// The frame is shorter than its Ethernet (and VLAN) header.
    EthTruncated,
    /// The IPv4 header is truncated or inconsistent (version, IHL, total length).
    IpMalformed,
    /// The IPv4 header checksum is wrong.
    IpChecksum,
    /// The TCP, UDP or ICMP header is truncated or inconsistent.
    L4Malformed,
}

/// Finds the headers of `frame`, checking every length before any later read relies on it.
///
/// The common frame (Ethernet II without VLAN tag, IPv4 without options, not a fragment, TCP
/// or UDP) is recognised by [`parse_common`] with a few checks on fixed offsets; anything else
/// (or anything it doubts) goes through the general parser, which classifies it.
#[inline(always)]
pub fn parse(frame: &[u8]) -> Parsed {
    match parse_common(frame) {
        Some(o) => Parsed::Ipv4(o),
        None => parse_general(frame),
    }
}

/// Smallest common frame: Ethernet, a 20-byte IPv4 header and a UDP header.
const COMMON_MIN: usize = ETH_HLEN + 20 + 8;

/// The fast path of [`parse`] (which the batch pipeline also calls directly, to specialise
/// the common case): `Some` only for a well-formed Ethernet II / IPv4 (IHL 5, not a
/// fragment) / TCP or UDP frame, with exactly the offsets the general parser would find.
#[inline(always)]
pub fn parse_common(frame: &[u8]) -> Option<Offsets> {
    let h: &[u8; COMMON_MIN] = frame.first_chunk()?;
    // EtherType IPv4 and version 4 with IHL 5 (one masked compare of bytes 12 to 15); no MF
    // and fragment offset 0 (DF may be set).
    let head = u32::from_ne_bytes(*h[12..].first_chunk().expect("in the header"));
    let frag = u16::from_ne_bytes([h[20], h[21]]);
    if head & u32::from_ne_bytes([0xff, 0xff, 0xff, 0]) != u32::from_ne_bytes([0x08, 0, 0x45, 0])
        || frag & u16::from_ne_bytes([0x3f, 0xff]) != 0
    {
        return None;
    }
    let proto = h[23];
    let total = usize::from(u16::from_be_bytes([h[16], h[17]]));
    let end = ETH_HLEN + total;
    if end > frame.len() {
        return None;
    }
    // The header checksum: the ten 16-bit words sum to 0xffff (one's complement). The sum is
    // taken in native byte order (RFC 1071: byte order does not matter to the one's-complement
    // sum; 0xffff reads the same swapped).
    // Folding with end-around carries computes the sum modulo 0xffff (2^16 = 1 there, so a
    // 64-bit word counts as its four 16-bit ones, and a carry out of 64 bits, 2^64 = 1, as
    // 1), with 0xffff standing for 0. So the words are added 64 bits at a time, each carry
    // added back; the sum is not 0 (byte 14 is 0x45, and an end-around carry never gives
    // 0), so the check is that it is a multiple of 0xffff.
    let w = |i: usize| u64::from_ne_bytes(*h[i..].first_chunk().expect("in the header"));
    let (sum, carry) = w(14).overflowing_add(w(22));
    // No overflow: after a carry out the sum is at most 2^64 - 2.
    let sum = sum + u64::from(carry);
    let last = u64::from(u32::from_ne_bytes(*h[30..].first_chunk().expect("in the header")));
    let (sum, carry) = sum.overflowing_add(last);
    if !multiple_of_ffff(sum + u64::from(carry)) {
        return None;
    }
    let l4 = ETH_HLEN + 20;
    let avail = total.checked_sub(20)?;
    let ok = match proto {
        IPPROTO_UDP => {
            let ulen = usize::from(u16::from_be_bytes([h[38], h[39]]));
            // (So `avail >= 8`: the UDP header is in the datagram.)
            ulen >= 8 && ulen <= avail
        }
        IPPROTO_TCP => {
            // `avail >= 20` puts byte 46 inside the datagram, so inside the frame.
            avail >= 20 && {
                let doff = usize::from(frame[l4 + 12] >> 4) * 4;
                doff >= 20 && doff <= avail
            }
        }
        _ => false,
    };
    ok.then_some(Offsets { l3: ETH_HLEN, l4, end, proto, has_l4: true, fragment: false })
}

/// Whether `x` is a multiple of 0xffff: `x` times the inverse of 0xffff modulo 2^64 is at
/// most `u64::MAX / 0xffff` exactly for the multiples (0xffff is odd; Granlund and
/// Montgomery's divisibility test): one multiply and one compare, where `x % 0xffff` takes
/// a multiply and five more instructions.
#[inline(always)]
fn multiple_of_ffff(x: u64) -> bool {
    const INVERSE: u64 = 0xfffe_fffe_fffe_ffff;
    const _: () = assert!(INVERSE.wrapping_mul(0xffff) == 1);
    x.wrapping_mul(INVERSE) <= u64::MAX / 0xffff
}

/// The general parser: VLAN tags, IP options, fragments, other protocols, malformed frames
/// (and, correctly but slowly, the common frame too).
#[inline(never)]
pub fn parse_general(frame: &[u8]) -> Parsed {
    if frame.len() < ETH_HLEN {
        return Parsed::EthTruncated;
    }
    let mut ethertype = rd16(frame, 12);
    let mut l3 = ETH_HLEN;
    // Up to two VLAN tags (802.1ad outer, 802.1Q inner).
    for _ in 0..2 {
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            if frame.len() < l3 + 4 {
                return Parsed::EthTruncated;
            }
            ethertype = rd16(frame, l3 + 2);
            l3 += 4;
        }
    }
    match ethertype {
        ETH_P_IPV4 => {}
        ETH_P_ARP => return Parsed::Arp,
        ETH_P_IPV6 => return Parsed::Ipv6,
        _ => return Parsed::OtherEthertype,
    }
    if frame.len() < l3 + 20 {
        return Parsed::IpMalformed;
    }
    let vihl = frame[l3];
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Parsed::IpMalformed;
    }
    let total = usize::from(rd16(frame, l3 + 2));
    if total < ihl || l3 + total > frame.len() {
        return Parsed::IpMalformed;
    }
    if csum_fold(csum_partial(&frame[l3..l3 + ihl], 0)) != 0 {
        return Parsed::IpChecksum;
    }
    let frag = rd16(frame, l3 + 6);
    let more_fragments = frag & 0x2000 != 0;
    let frag_offset = frag & 0x1fff;
    let fragment = more_fragments || frag_offset != 0;
    let proto = frame[l3 + 9];
    let l4 = l3 + ihl;
    let end = l3 + total;
    let has_l4 = frag_offset == 0;
    if has_l4 {
        let avail = end - l4;
        let ok = match proto {
            IPPROTO_TCP => {
                avail >= 20 && {
                    let doff = usize::from(frame[l4 + 12] >> 4) * 4;
                    doff >= 20 && doff <= avail
                }
            }
            IPPROTO_UDP => {
                // A first fragment carries only part of the datagram the UDP length describes.
                avail >= 8 && {
                    let ulen = usize::from(rd16(frame, l4 + 4));
                    ulen >= 8 && (fragment || ulen <= avail)
                }
            }
            IPPROTO_ICMP => avail >= 8,
            _ => true,
        };
        if !ok {
            return Parsed::L4Malformed;
        }
    }
    Parsed::Ipv4(Offsets { l3, l4, end, proto, has_l4, fragment })
}

/// Read access to IPv4 fields at a parsed offset.
pub mod ip {
    use super::*;

    /// Source address.
    #[inline(always)]
    pub fn src(b: &[u8], l3: usize) -> u32 {
        rd32(b, l3 + 12)
    }
    /// Destination address.
    #[inline(always)]
    pub fn dst(b: &[u8], l3: usize) -> u32 {
        rd32(b, l3 + 16)
    }
    /// Time to live.
    #[inline(always)]
    pub fn ttl(b: &[u8], l3: usize) -> u8 {
        b[l3 + 8]
    }
    /// Identification.
    #[inline(always)]
    pub fn id(b: &[u8], l3: usize) -> u16 {
        rd16(b, l3 + 4)
    }
    /// Header length in bytes.
    #[inline(always)]
    pub fn hlen(b: &[u8], l3: usize) -> usize {
        usize::from(b[l3] & 0x0f) * 4
    }

    /// Decrements the TTL, updating the header checksum.
    #[inline]
    pub fn dec_ttl(b: &mut [u8], l3: usize) {
        let old = rd16(b, l3 + 8);
        b[l3 + 8] -= 1;
        let new = rd16(b, l3 + 8);
        let c = csum_replace2(rd16(b, l3 + 10), old, new);
        wr16(b, l3 + 10, c);
    }

    /// Writes the source (`which == 12`) or destination (`which == 16`) address, updating the
    /// header checksum. Returns the old value.
    #[inline]
    pub fn set_addr(b: &mut [u8], l3: usize, which: usize, new: u32) -> u32 {
        let old = rd32(b, l3 + which);
        if old != new {
            wr32(b, l3 + which, new);
            let c = csum_replace4(rd16(b, l3 + 10), old, new);
            wr16(b, l3 + 10, c);
        }
        old
    }

    /// Recomputes the header checksum from scratch (used on headers this crate builds).
    pub fn fill_checksum(b: &mut [u8], l3: usize) {
        let hl = hlen(b, l3);
        wr16(b, l3 + 10, 0);
        let c = csum_fold(csum_partial(&b[l3..l3 + hl], 0));
        wr16(b, l3 + 10, c);
    }
}

/// Offset of the L4 checksum field relative to the L4 header, for protocols that have one
/// covering the pseudo-header.
#[inline(always)]
pub fn l4_csum_off(proto: u8) -> Option<usize> {
    match proto {
        IPPROTO_TCP => Some(16),
        IPPROTO_UDP => Some(6),
        _ => None,
    }
}

/// Rewrites the addresses and ports of the IPv4 datagram at `l3`/`l4` to the given tuple,
/// updating the IP header checksum and the TCP/UDP checksum incrementally. `l4_present` is false
/// for non-first fragments, which carry only the IP header's addresses.
///
/// `csum_len` is how many bytes of L4 header are in the frame (inner headers of ICMP errors may
/// be cut at 8 bytes, leaving the TCP checksum out; it is then not touched).
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn rewrite_tuple(
    b: &mut [u8],
    l3: usize,
    l4: usize,
    proto: u8,
    l4_present: bool,
    l4_len: usize,
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
) {
    // One accumulated delta per checksum, folded once: the addresses change both the IP
    // header checksum and (through the pseudo-header) the TCP/UDP one.
    let old_src = rd32(b, l3 + 12);
    let old_dst = rd32(b, l3 + 16);
    let d_ip = if old_src == src && old_dst == dst {
        0
    } else {
        wr32(b, l3 + 12, src);
        wr32(b, l3 + 16, dst);
        let d = delta32(old_src, src) + delta32(old_dst, dst);
        let c = csum_apply(rd16(b, l3 + 10), d);
        wr16(b, l3 + 10, c);
        d
    };
    if !l4_present {
        return;
    }
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let old_sport = rd16(b, l4);
            let old_dport = rd16(b, l4 + 2);
            wr16(b, l4, sport);
            wr16(b, l4 + 2, dport);
            let coff = l4_csum_off(proto).unwrap_or(6);
            if l4_len < coff + 2 {
                return;
            }
            let old_c = rd16(b, l4 + coff);
            if proto == IPPROTO_UDP && old_c == 0 {
                return; // No checksum: stays absent.
            }
            let mut d = d_ip;
            if old_sport != sport {
                d += delta16(old_sport, sport);
            }
            if old_dport != dport {
                d += delta16(old_dport, dport);
            }
            if d == 0 {
                return;
            }
            let mut c = csum_apply(old_c, d);
            if proto == IPPROTO_UDP && c == 0 {
                c = 0xffff;
            }
            wr16(b, l4 + coff, c);
        }
        // ICMP query id plays the port's role; ICMP's checksum has no pseudo-header.
        IPPROTO_ICMP if l4_len >= 8 => {
            let old_id = rd16(b, l4 + 4);
            if old_id != sport {
                wr16(b, l4 + 4, sport);
                let c = csum_replace2(rd16(b, l4 + 2), old_id, sport);
                wr16(b, l4 + 2, c);
            }
        }
        _ => {}
    }
}

/// One's-complement sum folded to 16 bits, not complemented (0 only for a zero sum).
#[inline(always)]
fn csum_fold_sum(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// RFC 1624's `~m + m'` of the TTL word (TTL, protocol) when the TTL drops by one: the word
/// loses 0x100, so the sum is `~m + m - 0x100 = 0xffff - 0x100` whatever the TTL (above 1).
const TTL_DEC_DELTA: u32 = 0xfeff;

/// A translation of one direction of a flow, prepared when the flow is created: the checksum
/// deltas (RFC 1624 `~m + m'`, folded) that rewriting a packet from tuple `from` to tuple `to`
/// adds to the IP header checksum (the addresses, and the TTL decrement of forwarding) and to
/// the TCP/UDP checksum (the pseudo-header's addresses and the ports). See [`nat_apply`].
/// Tuples are (source address, destination address, source port, destination port).
pub fn nat_deltas(from: (u32, u32, u16, u16), to: (u32, u32, u16, u16)) -> [u16; 2] {
    let mut addr = 0;
    if from.0 != to.0 {
        addr += delta32(from.0, to.0);
    }
    if from.1 != to.1 {
        addr += delta32(from.1, to.1);
    }
    let mut l4 = addr;
    if from.2 != to.2 {
        l4 += delta16(from.2, to.2);
    }
    if from.3 != to.3 {
        l4 += delta16(from.3, to.3);
    }
    [csum_fold_sum(addr + TTL_DEC_DELTA), csum_fold_sum(l4)]
}

/// Translates and forwards a TCP or UDP packet of a known flow: writes the new tuple,
/// decrements the TTL (the caller checked it is above 1) and applies the deltas
/// [`nat_deltas`] prepared for the packet's tuple (which the caller matched exactly) with one
/// fold per checksum (RFC 1624 eqn. 3). A UDP checksum of 0 (none) stays 0, a computed 0 is
/// sent as 0xffff. The L4 header must be present in the frame ([`parse`] checked it).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn nat_apply(
    b: &mut [u8],
    l3: usize,
    l4: usize,
    proto: u8,
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    deltas: [u16; 2],
) {
    let ip = &mut b[l3..l3 + 20];
    ip[8] -= 1;
    // Each pair is written as one word (built from a flow's tuple, whose fields sit in the
    // same order, they are one load each).
    ip[12..20].copy_from_slice(&(u64::from(src) << 32 | u64::from(dst)).to_be_bytes());
    let c: &mut [u8; 2] = (&mut ip[10..12]).try_into().unwrap();
    *c = csum_apply_ne(*c, deltas[0]).to_ne_bytes();
    let udp = proto == IPPROTO_UDP;
    let coff = if udp { 6 } else { 16 };
    let h = &mut b[l4..l4 + coff + 2];
    h[..4].copy_from_slice(&(u32::from(sport) << 16 | u32::from(dport)).to_be_bytes());
    let c: &mut [u8; 2] = (&mut h[coff..coff + 2]).try_into().unwrap();
    if udp && *c == [0, 0] {
        return; // No checksum: stays absent.
    }
    let mut new = csum_apply_ne(*c, deltas[1]);
    if udp && new == 0 {
        new = 0xffff;
    }
    *c = new.to_ne_bytes();
}

/// [`csum_apply`] for a delta of at most 0xffff (a [`nat_deltas`] value), on a checksum's
/// bytes as the packet holds them: the sum is taken on 16-bit words read in native byte
/// order (RFC 1071 2(B): swapping the bytes of one's-complement addends swaps the bytes of
/// their sum, bit for bit, 0 and 0xffff included), so only the delta's bytes are put in that
/// order; two 16-bit addends need a single end-around carry. Returns the new checksum in
/// that order (`to_ne_bytes` gives its bytes; 0 and 0xffff read the same either way).
#[inline(always)]
fn csum_apply_ne(check: [u8; 2], delta: u16) -> u16 {
    let (s, carry) =
        (!u16::from_ne_bytes(check)).overflowing_add(u16::from_ne_bytes(delta.to_be_bytes()));
    !(s + u16::from(carry))
}

/// Formats a host-order IPv4 address.
pub fn ipv4(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

/// [`nat_deltas`] of both directions of a flow: its original tuple `orig` rewritten to the
/// reverse of `reply`, and `reply` to the reverse of `orig` (tuples as in [`nat_deltas`]).
/// The same as two calls, bit for bit, for about half the work: both directions change the
/// same 16-bit words, each the other way round, and for one word `(~m + m') + (~m' + m) =
/// 2 * 0xffff`, so the reply direction's unfolded sums follow from the original's by exact
/// integer arithmetic.
#[inline]
pub fn nat_deltas_both(orig: (u32, u32, u16, u16), reply: (u32, u32, u16, u16)) -> [[u16; 2]; 2] {
    // The original direction: (orig) -> (reply.1, reply.0, reply.3, reply.2).
    let (addr, addr_words) = changed_sum([(orig.0, reply.1), (orig.1, reply.0)], delta32, 2);
    let (ports, port_words) = changed_sum([(orig.2, reply.3), (orig.3, reply.2)], delta16, 1);
    let addr_back = 2 * 0xffff * addr_words - addr;
    let ports_back = 2 * 0xffff * port_words - ports;
    [
        [csum_fold_sum(addr + TTL_DEC_DELTA), csum_fold_sum(addr + ports)],
        [csum_fold_sum(addr_back + TTL_DEC_DELTA), csum_fold_sum(addr_back + ports_back)],
    ]
}

/// The sum of `delta(old, new)` over the fields that change, and how many 16-bit words they
/// span (`words` each); an unchanged field adds nothing, as in [`nat_deltas`].
#[inline(always)]
fn changed_sum<T: PartialEq + Copy>(
    fields: [(T, T); 2],
    delta: impl Fn(T, T) -> u32,
    words: u32,
) -> (u32, u32) {
    let mut s = (0, 0);
    for (old, new) in fields {
        if old != new {
            s = (s.0 + delta(old, new), s.1 + words);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csum_partial_equals_word_by_word_sum() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1501).map(|x| x.wrapping_mul(151)).collect();
        for len in 0..data.len() {
            let d = &data[..len];
            let mut s: u64 = 0;
            for c in d.chunks(2) {
                s += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            while s >> 16 != 0 {
                s = (s & 0xffff) + (s >> 16);
            }
            assert_eq!(csum_fold(csum_partial(d, 0)), !(s as u16), "len {len}");
            assert_eq!(
                csum_fold(csum_partial(d, 0xffff_ffff)),
                csum_fold(csum_partial(d, 0xffff) + 0xffff),
                "carry in, len {len}"
            );
        }
    }

    #[test]
    fn rfc1624_matches_full_recompute() {
        let mut hdr =
            [0x45u8, 0, 0, 0x54, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 96, 0, 10];
        ip::fill_checksum(&mut hdr, 0);
        ip::set_addr(&mut hdr, 0, 16, u32::from(Ipv4Addr::new(10, 244, 1, 7)));
        ip::dec_ttl(&mut hdr, 0);
        let inc = rd16(&hdr, 10);
        ip::fill_checksum(&mut hdr, 0);
        assert_eq!(inc, rd16(&hdr, 10));
    }

    #[test]
    fn truncated_and_garbage_frames_are_classified() {
        assert_eq!(parse(&[]), Parsed::EthTruncated);
        assert_eq!(parse(&[0u8; 13]), Parsed::EthTruncated);
        let mut f = [0u8; 14];
        f[12] = 0x81;
        assert_eq!(parse(&f), Parsed::EthTruncated);
        let mut f = [0u8; 30];
        f[12] = 0x08;
        assert_eq!(parse(&f), Parsed::IpMalformed);
        f[12] = 0x86;
        f[13] = 0xdd;
        assert_eq!(parse(&f), Parsed::Ipv6);
    }

    /// A UDP (or TCP) frame: Ethernet, IPv4 without options, the L4 header, a payload.
    fn frame(proto: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + 6];
        f[12] = 0x08;
        let total = (f.len() - 14) as u16;
        let ip = [0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 96, 0, 10];
        f[14..34].copy_from_slice(&ip);
        wr16(&mut f, 16, total);
        ip::fill_checksum(&mut f, 14);
        wr16(&mut f, 34, 40000);
        wr16(&mut f, 36, 53);
        if proto == IPPROTO_UDP {
            wr16(&mut f, 38, total - 20);
        } else {
            f[46] = 5 << 4;
        }
        f
    }

    #[test]
    fn the_fast_parser_agrees_with_the_general_one() {
        let mut rng = crate::balance::FastRng::new(5);
        let mut fast = 0;
        for n in 0..200_000u32 {
            let mut f = frame(if n % 2 == 0 { IPPROTO_UDP } else { IPPROTO_TCP });
            // Mostly one or two corrupted bytes among the headers, sometimes a truncation.
            for _ in 0..(n % 3) {
                let i = (rng.next_u64() % 56) as usize;
                f[i] = rng.next_u64() as u8;
            }
            if n % 7 == 0 {
                f.truncate((rng.next_u64() % 60) as usize);
            }
            let general = parse_general(&f);
            if let Some(o) = parse_common(&f) {
                assert_eq!(Parsed::Ipv4(o), general, "{f:02x?}");
                fast += 1;
            }
            assert_eq!(parse(&f), general);
        }
        // Intact frames (a third of them) take the fast path.
        assert!(fast > 60_000, "{fast}");
    }

    #[test]
    fn the_divisibility_test_is_the_remainders() {
        let mut rng = crate::balance::FastRng::new(5);
        for k in 0..200_000u64 {
            let x = match k % 4 {
                0 => rng.next_u64(),
                1 => rng.next_u64() >> 24,
                2 => (rng.next_u64() >> 17) * 0xffff,
                _ => (rng.next_u64() >> 17) * 0xffff + 1 + rng.next_u64() % 0xfffe,
            };
            assert_eq!(multiple_of_ffff(x), x % 0xffff == 0, "{x}");
        }
        for x in [0, 0xffff, 0xfffe, 0x1_0000, u64::MAX, u64::MAX - 1, u64::MAX / 0xffff * 0xffff] {
            assert_eq!(multiple_of_ffff(x), x % 0xffff == 0, "{x}");
        }
    }

    #[test]
    fn the_native_order_checksum_update_is_rfc_1624s() {
        let mut rng = crate::balance::FastRng::new(3);
        let checks = [0, 1, 0xfffe, 0xffff, 0x00ff, 0xff00].into_iter();
        for check in checks.chain((0..58).map(|_| rng.next_u64() as u16)) {
            for delta in 0..=0xffff_u16 {
                let want = csum_apply(check, u32::from(delta)).to_be_bytes();
                let got = csum_apply_ne(check.to_be_bytes(), delta).to_ne_bytes();
                assert_eq!(got, want, "{check} {delta}");
            }
        }
    }

    #[test]
    fn precomputed_nat_equals_a_full_recompute() {
        let mut rng = crate::balance::FastRng::new(9);
        for n in 0..20_000u32 {
            let proto = if n % 2 == 0 { IPPROTO_UDP } else { IPPROTO_TCP };
            let mut f = frame(proto);
            for b in &mut f[54..] {
                *b = rng.next_u64() as u8;
            }
            let coff = if proto == IPPROTO_UDP { 40 } else { 50 };
            let l4sum = |f: &[u8]| {
                let mut s = csum_partial(&f[26..34], 0) + u32::from(proto) + (f.len() - 34) as u32;
                s = csum_partial(&f[34..], s);
                s
            };
            let c = csum_fold(l4sum(&f));
            wr16(&mut f, coff, if c == 0 && proto == IPPROTO_UDP { 0xffff } else { c });
            if proto == IPPROTO_UDP && n % 5 == 0 {
                wr16(&mut f, coff, 0); // No checksum.
            }
            let before = f.clone();
            // Some fields kept, others changed.
            let r = |keep: bool, old: u32, x: u64| if keep { old } else { x as u32 };
            let from = (rd32(&f, 26), rd32(&f, 30), rd16(&f, 34), rd16(&f, 36));
            let to = (
                r(n % 4 == 0, from.0, rng.next_u64()),
                r(n % 4 == 1, from.1, rng.next_u64()),
                r(n % 3 == 0, u32::from(from.2), rng.next_u64()) as u16,
                r(n % 3 == 1, u32::from(from.3), rng.next_u64()) as u16,
            );
            nat_apply(&mut f, 14, 34, proto, to.0, to.1, to.2, to.3, nat_deltas(from, to));
            assert_eq!((rd32(&f, 26), rd32(&f, 30), rd16(&f, 34), rd16(&f, 36)), to);
            assert_eq!(f[22], 63);
            // The IP header checksums to 0xffff again; the L4 checksum is what a full
            // computation gives (UDP: 0 kept, a computed 0 sent as 0xffff).
            assert_eq!(csum_fold(csum_partial(&f[14..34], 0)), 0);
            let got = rd16(&f, coff);
            if proto == IPPROTO_UDP && rd16(&before, coff) == 0 {
                assert_eq!(got, 0);
            } else {
                wr16(&mut f, coff, 0);
                let mut want = csum_fold(l4sum(&f));
                if proto == IPPROTO_UDP && want == 0 {
                    want = 0xffff;
                }
                assert_eq!(got, want, "{n}");
            }
        }
    }
}
