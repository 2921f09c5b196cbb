// SPDX-License-Identifier: (MIT OR Apache-2.0)
/* Loader of the C peer: `tcprtt_c [-b|-B|--by-lport|--by-rport|--by-flow] [-a ADDR] [-A ADDR]
 * [-p PORT] [-P PORT]`, IPv4 addresses only. Loads, fills the filters, attaches, says
 * "Tracing" on stderr and waits for SIGINT or SIGTERM; then prints the number of samples
 * it counted. Only `cargo xtask bench` runs it. */
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include "tcprtt_c.h"
#include "tcprtt_c.skel.h"

static volatile sig_atomic_t done;

static void on_signal(int sig)
{
	(void)sig;
	done = 1;
}

struct addr_key {
	__u32 prefixlen;
	__u8 addr[16];
};

static int add_addr(int fd, const char *text)
{
	struct addr_key k = { .prefixlen = 128 };
	__u8 one = 1;
	char ip[64];
	int len = 32;
	const char *slash = strchr(text, '/');

	snprintf(ip, sizeof(ip), "%.*s", slash ? (int)(slash - text) : (int)strlen(text), text);
	if (slash)
		len = atoi(slash + 1);
	k.addr[10] = k.addr[11] = 0xff;
	if (inet_pton(AF_INET, ip, k.addr + 12) != 1) {
		fprintf(stderr, "tcprtt_c: '%s' is not an IPv4 address\n", text);
		return -1;
	}
	k.prefixlen = 96 + len;
	return bpf_map_update_elem(fd, &k, &one, BPF_ANY);
}

static int add_port(int fd, const char *text)
{
	__u16 port = (__u16)atoi(text);
	__u8 one = 1;
	return bpf_map_update_elem(fd, &port, &one, BPF_ANY);
}

int main(int argc, char **argv)
{
	struct tcprtt_c_bpf *skel = tcprtt_c_bpf__open();
	const char *laddr = NULL, *raddr = NULL, *lport = NULL, *rport = NULL;
	struct hist h;
	__u64 total = 0;
	__u32 idx = 0;

	if (!skel) {
		fprintf(stderr, "tcprtt_c: opening the BPF object: %s\n", strerror(errno));
		return 1;
	}
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!strcmp(a, "-b"))
			skel->rodata->group = GROUP_LADDR;
		else if (!strcmp(a, "-B"))
			skel->rodata->group = GROUP_RADDR;
		else if (!strcmp(a, "--by-lport"))
			skel->rodata->group = GROUP_LPORT;
		else if (!strcmp(a, "--by-rport"))
			skel->rodata->group = GROUP_RPORT;
		else if (!strcmp(a, "--by-flow"))
			skel->rodata->group = GROUP_FLOW;
		else if (!strcmp(a, "-a") && v)
			laddr = v, i++;
		else if (!strcmp(a, "-A") && v)
			raddr = v, i++;
		else if (!strcmp(a, "-p") && v)
			lport = v, i++;
		else if (!strcmp(a, "-P") && v)
			rport = v, i++;
		else {
			fprintf(stderr, "tcprtt_c: unknown argument '%s'\n", a);
			return 2;
		}
	}
	skel->rodata->filter_laddr = laddr != NULL;
	skel->rodata->filter_raddr = raddr != NULL;
	skel->rodata->filter_lport = lport != NULL;
	skel->rodata->filter_rport = rport != NULL;
	if (tcprtt_c_bpf__load(skel)) {
		fprintf(stderr, "tcprtt_c: loading: %s\n", strerror(errno));
		return 1;
	}
	if ((laddr && add_addr(bpf_map__fd(skel->maps.laddrs), laddr)) ||
	    (raddr && add_addr(bpf_map__fd(skel->maps.raddrs), raddr)) ||
	    (lport && add_port(bpf_map__fd(skel->maps.lports), lport)) ||
	    (rport && add_port(bpf_map__fd(skel->maps.rports), rport))) {
		fprintf(stderr, "tcprtt_c: filling the filters: %s\n", strerror(errno));
		return 1;
	}
	if (tcprtt_c_bpf__attach(skel)) {
		fprintf(stderr, "tcprtt_c: attaching: %s\n", strerror(errno));
		return 1;
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	fprintf(stderr, "Tracing TCP RTT via tp_btf/tcp_probe (C peer). Hit Ctrl-C to end.\n");
	while (!done)
		pause();

	if (skel->rodata->group == GROUP_NONE) {
		if (!bpf_map_lookup_elem(bpf_map__fd(skel->maps.all_traffic), &idx, &h))
			total = h.count;
	} else {
		struct hist_key key, next, *prev = NULL;
		int fd = bpf_map__fd(skel->maps.hists);
		while (!bpf_map_get_next_key(fd, prev, &next)) {
			if (!bpf_map_lookup_elem(fd, &next, &h))
				total += h.count;
			key = next;
			prev = &key;
		}
	}
	printf("samples %llu\n", (unsigned long long)total);
	tcprtt_c_bpf__destroy(skel);
	return 0;
}
