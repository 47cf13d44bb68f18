//! Per-worker counters: every verdict and every drop or pass reason has one.
//!
//! Counters are plain integers owned by one worker (no atomics, no sharing on the hot path);
//! whoever reports them (the inspect CLI, metrics) reads a copy the worker publishes. A test
//! can therefore assert that a counter moved by exactly the expected amount.

use serde::Serialize;

macro_rules! reasons {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
        #[repr(u8)]
        pub enum $name { $($(#[$vm])* $v,)* }

        impl $name {
            /// Every reason, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v,)*];
            /// How many reasons there are.
            pub const COUNT: usize = Self::ALL.len();
            /// The reason as a metric label.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$v => $s,)* }
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

reasons! {
    /// Why a frame was dropped.
    DropReason {
        /// Shorter than its Ethernet/VLAN header.
        EthTruncated => "eth_truncated",
        /// IPv4 header truncated or inconsistent.
        IpMalformed => "ip_malformed",
        /// IPv4 header checksum wrong.
        IpChecksum => "ip_checksum",
        /// TCP/UDP/ICMP header truncated or inconsistent.
        L4Malformed => "l4_malformed",
        /// A non-first fragment to a service address whose first fragment was not seen.
        FragmentUnknown => "fragment_unknown",
        /// A new flow to a service port with no usable endpoint (a reject was sent when possible).
        NoEndpoints => "no_endpoints",
        /// A packet of a flow whose backend was removed (TCP: the client got a reset).
        BackendRemoved => "backend_removed",
        /// A packet of a flow whose service was removed.
        ServiceRemoved => "service_removed",
        /// No source-NAT port was free.
        SnatExhausted => "snat_exhausted",
        /// A TCP RST or non-SYN that matches no flow and no frontend wants.
        TcpNoFlow => "tcp_no_flow",
        /// The frame buffer is too small to build a reply in.
        NoRoom => "no_room",
        /// An ICMP message to a service address that is not an echo request.
        IcmpToVip => "icmp_to_vip",
        /// Traffic to a service address on a port or protocol it does not serve.
        VipNoPort => "vip_no_port",
        /// A new connection the source pod's egress NetworkPolicy does not allow.
        PolicyEgress => "policy_egress",
        /// A new connection the destination pod's ingress NetworkPolicy does not allow.
        PolicyIngress => "policy_ingress",
    }
}

reasons! {
    /// Why a frame was handed to the kernel.
    PassReason {
        /// ARP is the kernel's.
        Arp => "arp",
        /// IPv6 is not handled yet.
        Ipv6 => "ipv6",
        /// Neither IPv4, IPv6 nor ARP.
        OtherEthertype => "other_ethertype",
        /// IPv4 that no table claims (node traffic, other destinations).
        NotOurs => "not_ours",
        /// TTL would expire: the kernel sends the time-exceeded error.
        TtlExpired => "ttl_expired",
        /// An IP protocol the pipeline does not translate.
        OtherProto => "other_proto",
        /// No next hop known for the destination yet: the kernel routes it (and resolves ARP).
        NoNextHop => "no_next_hop",
        /// A non-first fragment that matches no tracked datagram.
        FragmentUnknown => "fragment_unknown",
    }
}

/// Counters of one worker.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    /// Frames received.
    pub rx: u64,
    /// Frames sent out of an interface (forwarded or replied to).
    pub tx: u64,
    /// Frames handed to the kernel, by reason.
    pub pass: [u64; PassReason::COUNT],
    /// Frames dropped, by reason.
    pub drop: [u64; DropReason::COUNT],
    /// New flows translated to a backend.
    pub nat_new: u64,
    /// Packets of known flows translated (forward direction).
    pub nat_forward: u64,
    /// Packets of known flows translated back (reply direction).
    pub nat_reply: u64,
    /// Packets forwarded without translation (pod to pod).
    pub forwarded_plain: u64,
    /// New flows that followed a session-affinity entry.
    pub affinity_hits: u64,
    /// Rejects sent (TCP reset or ICMP port unreachable).
    pub rejects_sent: u64,
    /// ICMP echo replies sent for service addresses.
    pub echo_replies: u64,
    /// ICMP errors whose embedded header was translated.
    pub icmp_errors_translated: u64,
    /// Fragments translated by the fragment table.
    pub fragments_translated: u64,
    /// UDP flows moved to a live backend after theirs was removed.
    pub udp_rebalanced: u64,
    /// Flows source-NATed (masquerade or hairpin).
    pub snat_flows: u64,
    /// Frames handed to the worker that owns their flow.
    pub handed_off: u64,
    /// Connections between pods (no service) that NetworkPolicy allowed and conntrack tracks.
    pub policy_flows: u64,
}

impl Counters {
    /// Counts a drop.
    #[inline(always)]
    pub fn dropped(&mut self, r: DropReason) {
        self.drop[r as usize] += 1;
    }
    /// Counts a pass.
    #[inline(always)]
    pub fn passed(&mut self, r: PassReason) {
        self.pass[r as usize] += 1;
    }
    /// Drops for one reason.
    pub fn drops(&self, r: DropReason) -> u64 {
        self.drop[r as usize]
    }
    /// Passes for one reason.
    pub fn passes(&self, r: PassReason) -> u64 {
        self.pass[r as usize]
    }
    /// All drops.
    pub fn total_drops(&self) -> u64 {
        self.drop.iter().sum()
    }
    /// All passes.
    pub fn total_passes(&self) -> u64 {
        self.pass.iter().sum()
    }
    /// Adds another worker's counters into these.
    pub fn merge(&mut self, o: &Counters) {
        self.rx += o.rx;
        self.tx += o.tx;
        for (a, b) in self.pass.iter_mut().zip(o.pass.iter()) {
            *a += b;
        }
        for (a, b) in self.drop.iter_mut().zip(o.drop.iter()) {
            *a += b;
        }
        self.nat_new += o.nat_new;
        self.nat_forward += o.nat_forward;
        self.nat_reply += o.nat_reply;
        self.forwarded_plain += o.forwarded_plain;
        self.affinity_hits += o.affinity_hits;
        self.rejects_sent += o.rejects_sent;
        self.echo_replies += o.echo_replies;
        self.icmp_errors_translated += o.icmp_errors_translated;
        self.fragments_translated += o.fragments_translated;
        self.udp_rebalanced += o.udp_rebalanced;
        self.policy_flows += o.policy_flows;
        self.snat_flows += o.snat_flows;
        self.handed_off += o.handed_off;
    }
}
