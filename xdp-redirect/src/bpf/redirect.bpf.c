// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xdp_redirect: steer the packets the kxdp dataplane owns to the AF_XDP
 * socket of the queue they arrived on; give everything else to the kernel.
 *
 * A packet is "ours" when it is IPv4 (in plain Ethernet or behind one 802.1Q
 * tag) and its destination is in steer_dst (service VIPs, pod CIDRs, node
 * addresses for NodePorts) or its source is in steer_src (replies from
 * backend pods). Ours goes to xsks[rx_queue_index]; if that slot is empty
 * the packet goes to the kernel.
 *
 * Invariant: the only verdicts are XDP_REDIRECT and XDP_PASS. Nothing this
 * program does can drop a packet: a frame it cannot parse, or one that
 * arrives on a queue the dataplane has no socket for, is the kernel's.
 * Every XDP_PASS has a named reason and a counter (see enum counter).
 *
 * Layout and names here are read by ../lib.rs; keep them in step.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Upper bounds; lib.rs may lower them with set_max_entries before load. */
#define MAX_QUEUES 256
#define MAX_PREFIXES 65536

/* 802.1Q tag. <linux/if_vlan.h> is kernel-internal, so define it here. */
struct vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

/* LPM trie key: prefixlen first (the trie's contract), then the address in
 * network byte order, exactly as it sits in the IPv4 header. */
struct lpm_v4_key {
	__u32 prefixlen;
	__be32 addr;
};

/* Index of each counter in the per-CPU `counters` array. Mirrored by
 * `Counter` in lib.rs. */
enum counter {
	CNT_STEERED = 0,	  /* handed to bpf_redirect_map with a socket present */
	CNT_PASSED_NOT_OURS,	  /* IPv4, but neither address matched */
	CNT_PASSED_NON_IPV4,	  /* ARP, IPv6, double tags, anything not IPv4 */
	CNT_PASSED_MALFORMED,	  /* truncated or invalid Ethernet/VLAN/IPv4 header */
	CNT_PASSED_NO_SOCKET,	  /* ours, but no socket on this queue */
	CNT_PASSED_DRAINING,	  /* steering switched off (config.drain != 0) */
	CNT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__type(key, struct lpm_v4_key);
	__type(value, __u8);
} steer_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, __u8);
} steer_src SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Runtime configuration, one slot. An array map rather than a global so
 * that any tool can read and write it by map id, with no skeleton. Zero
 * (the state at load) means "steer normally". */
struct config {
	/* Nonzero: hand every packet to the kernel, e.g. while the dataplane
	 * is being drained, without detaching the program. */
	__u32 drain;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);

	/* Per-CPU slot and XDP runs with preemption off: a plain add is exact. */
	if (v)
		*v += 1;
}

static __always_inline int pass(__u32 why)
{
	count(why);
	return XDP_PASS;
}

/* True when the address is covered by a prefix in the given trie. */
static __always_inline int in_trie(void *trie, __be32 addr)
{
	struct lpm_v4_key key = { .prefixlen = 32, .addr = addr };

	return bpf_map_lookup_elem(trie, &key) != NULL;
}

SEC("xdp")
int xdp_redirect(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph;
	struct config *cfg;
	__u32 zero = 0, queue, hdr_len;
	__be16 proto;
	void *l3;

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || cfg->drain)
		return pass(CNT_PASSED_DRAINING);

	if ((void *)(eth + 1) > data_end)
		return pass(CNT_PASSED_MALFORMED);
	proto = eth->h_proto;
	l3 = eth + 1;

	if (proto == bpf_htons(ETH_P_8021Q)) {
		struct vlan_hdr *vlan = l3;

		if ((void *)(vlan + 1) > data_end)
			return pass(CNT_PASSED_MALFORMED);
		proto = vlan->encap_proto;
		l3 = vlan + 1;
	}

	/* Also covers a second tag (QinQ): we only own single-tagged IPv4. */
	if (proto != bpf_htons(ETH_P_IP))
		return pass(CNT_PASSED_NON_IPV4);

	iph = l3;
	if ((void *)(iph + 1) > data_end)
		return pass(CNT_PASSED_MALFORMED);
	if (iph->version != 4 || iph->ihl < 5)
		return pass(CNT_PASSED_MALFORMED);
	hdr_len = iph->ihl * 4;
	/* The dataplane trusts the IPv4 header it is given (options included)
	 * and total length: a frame shorter than either is the kernel's to
	 * judge. Ethernet padding may make the frame longer; that is fine. */
	if (bpf_ntohs(iph->tot_len) < hdr_len ||
	    l3 + bpf_ntohs(iph->tot_len) > data_end)
		return pass(CNT_PASSED_MALFORMED);

	if (!in_trie(&steer_dst, iph->daddr) && !in_trie(&steer_src, iph->saddr))
		return pass(CNT_PASSED_NOT_OURS);

	queue = ctx->rx_queue_index;
	/* Looking up first (kernel >= 5.3) tells "no socket" apart from
	 * "steered"; the XDP_PASS fallback below still covers a socket that
	 * goes away between the lookup and the redirect. */
	if (!bpf_map_lookup_elem(&xsks, &queue))
		return pass(CNT_PASSED_NO_SOCKET);

	count(CNT_STEERED);
	return bpf_redirect_map(&xsks, queue, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
