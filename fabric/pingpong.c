/*
 * rankwire-fi-pingpong: a libfabric RDM tagged ping-pong between two processes.
 *
 * Self-contained so it needs no Python in a container: it forks, and the two processes
 * (client = parent, server = child) each open their own endpoint on the same provider,
 * exchange endpoint names over a socketpair, then bounce messages. The client reports
 * one JSON line per message size; failures are one line on stderr and exit status 1.
 *
 *   rankwire-fi-pingpong [-p PROVIDER] [-d DOMAIN] [-m msg|tagged] [-I ITERS]
 *                        [-W WARMUP] [-S SIZE[,SIZE...]] [-t TIMEOUT_S]
 *
 * The server posts its next receive before it echoes, so messages are never unexpected.
 *
 * Built by rankwire (fabric/pingpong.py) with the host compiler against libfabric-dev.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_tagged.h>

#define MAX_SIZES 32
#define TAG 0x5250ULL

struct side {
	struct fi_info *info;
	struct fid_fabric *fabric;
	struct fid_domain *domain;
	struct fid_cq *cq;
	struct fid_av *av;
	struct fid_ep *ep;
	struct fid_mr *mr;
	void *desc;
	char *sbuf, *rbuf;
	fi_addr_t peer;
	uint64_t posted, completed;
	struct fi_context2 ctx[2];
};

static const char *role = "client";
static double timeout_s = 30.0;
static int tagged; /* 0: fi_send/fi_recv (FI_MSG), 1: fi_tsend/fi_trecv (FI_TAGGED) */

static void die(const char *what, int ret)
{
	fprintf(stderr, "rankwire-fi-pingpong (%s): %s: %s\n", role, what,
		ret ? fi_strerror(ret < 0 ? -ret : ret) : strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Read completions; returns after at least one poll. Manual-progress providers (shm)
 * only move data while their CQ is read, so this is also the progress engine. */
static void progress(struct side *s)
{
	struct fi_cq_entry entries[8];
	ssize_t ret = fi_cq_read(s->cq, entries, 8);
	if (ret > 0) {
		s->completed += (uint64_t)ret;
	} else if (ret == -FI_EAVAIL) {
		struct fi_cq_err_entry err = {0};
		fi_cq_readerr(s->cq, &err, 0);
		fprintf(stderr, "rankwire-fi-pingpong (%s): completion error: %s (%s)\n", role,
			fi_strerror(err.err),
			fi_cq_strerror(s->cq, err.prov_errno, err.err_data, NULL, 0));
		exit(1);
	} else if (ret != -FI_EAGAIN) {
		die("fi_cq_read", (int)ret);
	}
}

static void wait_all(struct side *s)
{
	double deadline = now() + timeout_s;
	unsigned spins = 0;
	while (s->completed < s->posted) {
		progress(s);
		if (++spins % 4096 == 0 && now() > deadline) {
			fprintf(stderr, "rankwire-fi-pingpong (%s): no completion within %.0f s "
				"(peer gone?)\n", role, timeout_s);
			exit(1);
		}
	}
}

static void post_recv(struct side *s, size_t n)
{
	ssize_t ret;
	for (;;) {
		ret = tagged ? fi_trecv(s->ep, s->rbuf, n, s->desc, s->peer, TAG, 0, &s->ctx[0])
			     : fi_recv(s->ep, s->rbuf, n, s->desc, s->peer, &s->ctx[0]);
		if (ret != -FI_EAGAIN)
			break;
		progress(s);
	}
	if (ret)
		die(tagged ? "fi_trecv" : "fi_recv", (int)ret);
	s->posted++;
}

static void post_send(struct side *s, const char *buf, size_t n)
{
	ssize_t ret;
	for (;;) {
		ret = tagged ? fi_tsend(s->ep, buf, n, s->desc, s->peer, TAG, &s->ctx[1])
			     : fi_send(s->ep, buf, n, s->desc, s->peer, &s->ctx[1]);
		if (ret != -FI_EAGAIN)
			break;
		progress(s);
	}
	if (ret)
		die(tagged ? "fi_tsend" : "fi_send", (int)ret);
	s->posted++;
}

static void xfer(int fd, void *buf, size_t n, int out)
{
	char *p = buf;
	while (n) {
		ssize_t r = out ? write(fd, p, n) : read(fd, p, n);
		if (r <= 0) {
			if (r < 0 && errno == EINTR)
				continue;
			fprintf(stderr, "rankwire-fi-pingpong (%s): peer went away during setup\n",
				role);
			exit(1);
		}
		p += r;
		n -= (size_t)r;
	}
}

static void open_side(struct side *s, const char *prov, const char *domain, size_t max)
{
	struct fi_info *hints = fi_allocinfo(), *cur;
	int ret;
	uint32_t version = FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION);

	if (!hints)
		die("fi_allocinfo", -FI_ENOMEM);
	if (fi_version() < version)
		version = fi_version();
	hints->ep_attr->type = FI_EP_RDM;
	hints->caps = tagged ? FI_TAGGED : FI_MSG;
	hints->mode = FI_CONTEXT | FI_CONTEXT2;
	hints->domain_attr->mr_mode =
		FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
	if (prov && *prov)
		hints->fabric_attr->prov_name = strdup(prov);
	if (domain && *domain)
		hints->domain_attr->name = strdup(domain);
	ret = fi_getinfo(version, NULL, NULL, 0, hints, &s->info);
	fi_freeinfo(hints);
	if (ret)
		die("fi_getinfo", ret);
	/* IP providers list one domain per interface: stay on loopback when there is one. */
	for (cur = s->info; cur; cur = cur->next) {
		if (cur->domain_attr->name && !strcmp(cur->domain_attr->name, "lo")) {
			struct fi_info *pick = fi_dupinfo(cur);
			fi_freeinfo(s->info);
			s->info = pick;
			break;
		}
	}
	if ((ret = fi_fabric(s->info->fabric_attr, &s->fabric, NULL)))
		die("fi_fabric", ret);
	if ((ret = fi_domain(s->fabric, s->info, &s->domain, NULL)))
		die("fi_domain", ret);
	struct fi_cq_attr cq_attr = {.format = FI_CQ_FORMAT_CONTEXT, .size = 128,
				     .wait_obj = FI_WAIT_NONE};
	if ((ret = fi_cq_open(s->domain, &cq_attr, &s->cq, NULL)))
		die("fi_cq_open", ret);
	struct fi_av_attr av_attr = {.type = s->info->domain_attr->av_type, .count = 2};
	if (av_attr.type == FI_AV_UNSPEC)
		av_attr.type = FI_AV_MAP;
	if ((ret = fi_av_open(s->domain, &av_attr, &s->av, NULL)))
		die("fi_av_open", ret);
	if ((ret = fi_endpoint(s->domain, s->info, &s->ep, NULL)))
		die("fi_endpoint", ret);
	if ((ret = fi_ep_bind(s->ep, &s->av->fid, 0)))
		die("fi_ep_bind(av)", ret);
	if ((ret = fi_ep_bind(s->ep, &s->cq->fid, FI_TRANSMIT | FI_RECV)))
		die("fi_ep_bind(cq)", ret);
	if ((ret = fi_enable(s->ep)))
		die("fi_enable", ret);

	size_t len = 2 * (max ? max : 1);
	char *buf;
	if (posix_memalign((void **)&buf, 4096, len))
		die("posix_memalign", -FI_ENOMEM);
	memset(buf, 0, len);
	s->sbuf = buf;
	s->rbuf = buf + len / 2;
	int mr_mode = s->info->domain_attr->mr_mode;
	if (mr_mode & FI_MR_LOCAL) {
		if ((ret = fi_mr_reg(s->domain, buf, len, FI_SEND | FI_RECV, 0, 0, 0, &s->mr,
				     NULL)))
			die("fi_mr_reg", ret);
		if (mr_mode & FI_MR_ENDPOINT) {
			if ((ret = fi_mr_bind(s->mr, &s->ep->fid, 0)))
				die("fi_mr_bind", ret);
			if ((ret = fi_mr_enable(s->mr)))
				die("fi_mr_enable", ret);
		}
		s->desc = fi_mr_desc(s->mr);
	}
}

static void connect_peer(struct side *s, int fd)
{
	char name[256], peer[256];
	size_t len = sizeof(name), plen;
	int ret = fi_getname(&s->ep->fid, name, &len);
	if (ret)
		die("fi_getname", ret);
	xfer(fd, &len, sizeof(len), 1);
	xfer(fd, name, len, 1);
	xfer(fd, &plen, sizeof(plen), 0);
	if (plen > sizeof(peer))
		die("peer address too long", -FI_EINVAL);
	xfer(fd, peer, plen, 0);
	if (fi_av_insert(s->av, peer, 1, &s->peer, 0, NULL) != 1)
		die("fi_av_insert", -FI_EINVAL);
	char go = 1;
	xfer(fd, &go, 1, 1); /* both sides ready before the first message */
	xfer(fd, &go, 1, 0);
}

static void close_side(struct side *s)
{
	if (s->mr)
		fi_close(&s->mr->fid);
	fi_close(&s->ep->fid);
	fi_close(&s->av->fid);
	fi_close(&s->cq->fid);
	fi_close(&s->domain->fid);
	fi_close(&s->fabric->fid);
	fi_freeinfo(s->info);
	free(s->sbuf);
}

/* The libfabric this process mapped, with device and inode (proof of which copy). */
static void mapped_library(char *out, size_t n, char *devino, size_t m)
{
	FILE *maps = fopen("/proc/self/maps", "r");
	char line[4096];
	out[0] = devino[0] = 0;
	if (!maps)
		return;
	while (fgets(line, sizeof(line), maps)) {
		char dev[32], path[4000] = "";
		unsigned long inode;
		if (sscanf(line, "%*s %*s %*s %31s %lu %3999s", dev, &inode, path) == 3 &&
		    strstr(path, "/libfabric.so")) {
			snprintf(out, n, "%s", path);
			snprintf(devino, m, "%s:%lu", dev, inode);
			break;
		}
	}
	fclose(maps);
}

static void json_string(const char *key, const char *value)
{
	printf("\"%s\": \"", key);
	for (const char *c = value ? value : ""; *c; c++) {
		if (*c == '"' || *c == '\\')
			putchar('\\');
		if ((unsigned char)*c >= 0x20)
			putchar(*c);
	}
	printf("\"");
}

static void run(int fd, int server, const char *prov, const char *domain, size_t *sizes,
		int nsizes, long iters, long warmup)
{
	struct side s = {0};
	size_t max = 0;
	for (int i = 0; i < nsizes; i++)
		if (sizes[i] > max)
			max = sizes[i];
	open_side(&s, prov, domain, max);
	connect_peer(&s, fd);
	if (!server) {
		char lib[4096], devino[64];
		mapped_library(lib, sizeof(lib), devino, sizeof(devino));
		uint32_t v = fi_version();
		printf("{\"event\": \"info\", ");
		json_string("provider", s.info->fabric_attr->prov_name);
		printf(", ");
		json_string("fabric", s.info->fabric_attr->name);
		printf(", ");
		json_string("domain", s.info->domain_attr->name);
		printf(", ");
		json_string("library", lib);
		printf(", ");
		json_string("library_dev_inode", devino);
		printf(", ");
		json_string("mode", tagged ? "tagged" : "msg");
		printf(", \"version\": \"%u.%u\"}\n", FI_MAJOR(v), FI_MINOR(v));
		fflush(stdout);
	}
	for (int k = 0; k < nsizes; k++) {
		size_t n = sizes[k];
		long total = warmup + iters;
		double t0 = now();
		if (server)
			post_recv(&s, n);
		for (long i = 0; i < total; i++) {
			if (i == warmup)
				t0 = now();
			if (server) {
				wait_all(&s); /* message i is in, echo i-1 has left */
				if (i + 1 < total)
					post_recv(&s, n);
				/* Echo what came in; by causality message i+1 cannot land in
				 * rbuf before the client has all of this echo. */
				post_send(&s, s.rbuf, n);
			} else {
				if (n)
					s.sbuf[0] = s.sbuf[n - 1] = (char)(i & 0x7f);
				post_recv(&s, n);
				post_send(&s, s.sbuf, n);
				wait_all(&s);
				if (n && (s.rbuf[0] != (char)(i & 0x7f) ||
					  s.rbuf[n - 1] != (char)(i & 0x7f))) {
					fprintf(stderr, "rankwire-fi-pingpong (client): data mismatch "
						"at size %zu\n", n);
					exit(1);
				}
			}
		}
		double elapsed = now() - t0;
		wait_all(&s);
		if (!server) {
			double rtt_us = elapsed / (double)iters * 1e6;
			double lat_us = rtt_us / 2;
			printf("{\"event\": \"result\", \"size\": %zu, \"iterations\": %ld, "
			       "\"warmup\": %ld, \"rtt_us\": %.3f, \"latency_us\": %.3f, "
			       "\"bandwidth_MBps\": %.3f}\n",
			       n, iters, warmup, rtt_us, lat_us, lat_us > 0 ? n / lat_us : 0.0);
			fflush(stdout);
		}
	}
	char done = 1;
	xfer(fd, &done, 1, 1); /* neither side closes while the other may still need it */
	xfer(fd, &done, 1, 0);
	close_side(&s);
}

static size_t parse_size(const char *text)
{
	char *end;
	double v = strtod(text, &end);
	size_t unit = 1;
	if (*end == 'k' || *end == 'K')
		unit = 1024, end++;
	else if (*end == 'm' || *end == 'M')
		unit = 1024 * 1024, end++;
	else if (*end == 'g' || *end == 'G')
		unit = 1024UL * 1024 * 1024, end++;
	if (*end == 'i' || *end == 'B')
		end++;
	if (*end == 'B')
		end++;
	if (*end || v < 0 || end == text) {
		fprintf(stderr, "rankwire-fi-pingpong: bad size '%s'\n", text);
		exit(2);
	}
	return (size_t)(v * (double)unit);
}

int main(int argc, char **argv)
{
	const char *prov = NULL, *domain = NULL;
	long iters = 1000, warmup = 100;
	size_t sizes[MAX_SIZES] = {64, 1 << 20};
	int nsizes = 2, opt;

	while ((opt = getopt(argc, argv, "p:d:m:I:W:S:t:h")) != -1) {
		switch (opt) {
		case 'm': tagged = !strcmp(optarg, "tagged"); break;
		case 'p': prov = optarg; break;
		case 'd': domain = optarg; break;
		case 'I': iters = atol(optarg); break;
		case 'W': warmup = atol(optarg); break;
		case 't': timeout_s = atof(optarg); break;
		case 'S':
			nsizes = 0;
			for (char *tok = strtok(optarg, ","); tok && nsizes < MAX_SIZES;
			     tok = strtok(NULL, ","))
				sizes[nsizes++] = parse_size(tok);
			break;
		default:
			fprintf(stderr, "usage: %s [-p PROVIDER] [-d DOMAIN] [-m msg|tagged] [-I ITERS] [-W WARMUP] "
				"[-S SIZE,...] [-t TIMEOUT_S]\n", argv[0]);
			return 2;
		}
	}
	if (iters < 1 || warmup < 0 || nsizes < 1) {
		fprintf(stderr, "rankwire-fi-pingpong: need -I >= 1, -W >= 0 and a size\n");
		return 2;
	}
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		die("socketpair", 0);
	fflush(stdout);
	pid_t pid = fork();
	if (pid < 0)
		die("fork", 0);
	if (pid == 0) {
		role = "server";
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		close(sv[0]);
		run(sv[1], 1, prov, domain, sizes, nsizes, iters, warmup);
		_exit(0);
	}
	close(sv[1]);
	run(sv[0], 0, prov, domain, sizes, nsizes, iters, warmup);
	int status;
	if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status))
		return 1;
	return 0;
}
