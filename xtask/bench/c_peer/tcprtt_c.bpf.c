// SPDX-License-Identifier: (MIT OR Apache-2.0)
/* The C peer of tcprtt's program for `cargo xtask bench`: what a libbpf tool of the same
 * design costs per event. Same hook (tp_btf/tcp_probe), same key, same filters (LPM tries
 * over IPv4-mapped addresses, port hash maps); the value is a log2 histogram in a
 * preallocated hash map shared by all CPUs, updated with atomic adds, as libbpf-tools'
 * tcprtt does. Field offsets come from CO-RE relocations. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "tcprtt_c.h"

#define AF_INET 2
#define AF_INET6 10

const volatile int group = GROUP_NONE;
const volatile bool filter_laddr = false;
const volatile bool filter_raddr = false;
const volatile bool filter_lport = false;
const volatile bool filter_rport = false;

struct addr_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 10240);
	__type(key, struct hist_key);
	__type(value, struct hist);
} hists SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hist);
} all_traffic SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16);
	__type(key, struct addr_key);
	__type(value, __u8);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} laddrs SEC(".maps"), raddrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u16);
	__type(value, __u8);
} lports SEC(".maps"), rports SEC(".maps");

static const struct hist zero;

static __always_inline __u32 log2l(__u64 v)
{
	__u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	return r;
}

static __always_inline void read_addrs(struct sock *sk, __u16 family, __u8 *laddr, __u8 *raddr)
{
	if (family == AF_INET) {
		__builtin_memset(laddr, 0, 16);
		__builtin_memset(raddr, 0, 16);
		laddr[10] = laddr[11] = raddr[10] = raddr[11] = 0xff;
		*(__u32 *)(laddr + 12) = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		*(__u32 *)(raddr + 12) = BPF_CORE_READ(sk, __sk_common.skc_daddr);
	} else {
		BPF_CORE_READ_INTO(laddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(raddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	}
}

static __always_inline int in_prefixes(void *trie, const __u8 *addr)
{
	struct addr_key k = { .prefixlen = 128 };
	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(trie, &k) != NULL;
}

static __always_inline int record(struct sock *sk)
{
	struct tcp_sock *ts = (struct tcp_sock *)sk;
	struct hist_key key = {};
	struct hist *h;
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);
	__u64 srtt;

	if (family != AF_INET && family != AF_INET6)
		return 0;
	if (filter_laddr || filter_raddr || group == GROUP_LADDR || group == GROUP_RADDR ||
	    group == GROUP_FLOW) {
		__u8 laddr[16], raddr[16];
		read_addrs(sk, family, laddr, raddr);
		if (filter_laddr && !in_prefixes(&laddrs, laddr))
			return 0;
		if (filter_raddr && !in_prefixes(&raddrs, raddr))
			return 0;
		key.family = family;
		if (group == GROUP_LADDR || group == GROUP_FLOW)
			__builtin_memcpy(key.laddr, laddr, 16);
		if (group == GROUP_RADDR || group == GROUP_FLOW)
			__builtin_memcpy(key.raddr, raddr, 16);
	}
	if (filter_lport || group == GROUP_LPORT || group == GROUP_FLOW) {
		__u16 lport = BPF_CORE_READ(sk, __sk_common.skc_num);
		if (filter_lport && !bpf_map_lookup_elem(&lports, &lport))
			return 0;
		if (group == GROUP_LPORT || group == GROUP_FLOW)
			key.lport = lport;
	}
	if (filter_rport || group == GROUP_RPORT || group == GROUP_FLOW) {
		__u16 rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
		if (filter_rport && !bpf_map_lookup_elem(&rports, &rport))
			return 0;
		if (group == GROUP_RPORT || group == GROUP_FLOW)
			key.rport = rport;
	}

	if (group == GROUP_NONE) {
		__u32 idx = 0;
		h = bpf_map_lookup_elem(&all_traffic, &idx);
	} else {
		h = bpf_map_lookup_elem(&hists, &key);
		if (!h) {
			bpf_map_update_elem(&hists, &key, &zero, BPF_NOEXIST);
			h = bpf_map_lookup_elem(&hists, &key);
		}
	}
	if (!h)
		return 0;
	srtt = BPF_CORE_READ(ts, srtt_us) >> 3;
	__u32 slot = log2l(srtt);
	if (slot >= MAX_SLOTS)
		slot = MAX_SLOTS - 1;
	__sync_fetch_and_add(&h->slots[slot], 1);
	__sync_fetch_and_add(&h->count, 1);
	__sync_fetch_and_add(&h->sum, srtt);
	return 0;
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(tcprtt_c, struct sock *sk, struct sk_buff *skb)
{
	return record(sk);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
