/* Types shared by the C peer's BPF program and its loader. The same design as tcprtt:
 * the same hook, tcprtt's key without the interface index only its wire source sets (40
 * bytes against 44), one histogram per key; but libbpf-tools' value:
 * a log2 histogram shared by all CPUs, updated with atomic adds. */
#ifndef TCPRTT_C_H
#define TCPRTT_C_H

#define MAX_SLOTS 27

enum group { GROUP_NONE, GROUP_LADDR, GROUP_RADDR, GROUP_LPORT, GROUP_RPORT, GROUP_FLOW };

struct hist_key {
	__u16 family;
	__u16 lport;
	__u16 rport;
	__u16 reserved;
	__u8 laddr[16];
	__u8 raddr[16];
};

struct hist {
	__u64 count;
	__u64 sum;
	__u32 slots[MAX_SLOTS];
	__u32 reserved;
};

#endif
