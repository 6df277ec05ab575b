/*
 * The load program of the real-hvisor rig's benchmark (bench.sh): direct I/O on a zone1 disk
 * timed by zone1's own clock, and a bounded reader for zone0's end of the console transfer.
 * Built static for aarch64 by bench.sh; one "@LOAD key=value ...@" line per run on stdout.
 *
 *   rigload write DEV MIB          MIB MiB in 1 MiB blocks, O_DIRECT, then fsync
 *   rigload read DEV MIB           MIB MiB in 1 MiB blocks, O_DIRECT
 *   rigload rand|randwrite DEV MIB COUNT [QD]
 *                                  COUNT 4 KiB O_DIRECT reads (writes of a random pattern, no
 *                                  fsync) at random offsets in the first MIB MiB, QD of them in
 *                                  flight (default 1: one pread/pwrite after the other; more:
 *                                  Linux native AIO, io_submit/io_getevents, from one thread)
 *   rigload recv BYTES IDLE_MS FIRST_MS [READY]
 *                                  copies stdin to stdout until BYTES arrived, or nothing came
 *                                  for IDLE_MS after the first byte (FIRST_MS before it): a
 *                                  transfer that lost bytes ends instead of waiting forever.
 *                                  It prints READY on stderr once it is about to read, for the
 *                                  sender to start; its line (on stderr) has the time from
 *                                  then to the last byte.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MIB (1u << 20)

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *aligned(size_t len)
{
	void *p;
	if (posix_memalign(&p, 4096, len)) {
		fprintf(stderr, "rigload: no memory\n");
		exit(1);
	}
	return p;
}

static int open_dev(const char *dev, int flags)
{
	int fd = open(dev, flags | O_DIRECT);
	if (fd < 0) {
		fprintf(stderr, "rigload: %s: %s\n", dev, strerror(errno));
		exit(1);
	}
	return fd;
}

/* xorshift64: a pattern that no block device can compress or dedupe. */
static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void fill(void *buf, size_t len)
{
	for (size_t i = 0; i < len / 8; i++)
		((uint64_t *)buf)[i] = next();
}

static int seq(const char *op, const char *dev, unsigned mib)
{
	int wr = op[0] == 'w';
	int fd = open_dev(dev, wr ? O_WRONLY : O_RDONLY);
	void *buf = aligned(MIB);
	fill(buf, MIB);
	double t0 = now();
	for (unsigned i = 0; i < mib; i++) {
		ssize_t n = wr ? pwrite(fd, buf, MIB, (off_t)i * MIB) : pread(fd, buf, MIB, (off_t)i * MIB);
		if (n != (ssize_t)MIB) {
			printf("@LOAD op=%s error=%s block=%u@\n", op, n < 0 ? strerror(errno) : "short", i);
			return 1;
		}
	}
	if (wr && fsync(fd)) {
		printf("@LOAD op=%s error=fsync:%s@\n", op, strerror(errno));
		return 1;
	}
	double s = now() - t0;
	printf("@LOAD op=%s bytes=%llu s=%.6f mbs=%.3f@\n", op, (unsigned long long)mib * MIB, s,
	       mib * (double)MIB / s / 1e6);
	return 0;
}

/* The deep queue's rounds (one io_submit of the free slots, one io_getevents), or NULL. */
struct rounds {
	unsigned count;
	double submit_s, wait_s;
};

static int rnd_done(const char *op, unsigned count, unsigned qd, double s, double lat_sum,
		    const struct rounds *rounds)
{
	printf("@LOAD op=%s qd=%u requests=%u s=%.6f iops=%.1f lat_us=%.1f", op, qd, count, s,
	       count / s, lat_sum * 1e6 / count);
	/* Per round: the time zone1 spends submitting, and waiting for the device and its
	 * interrupt; the same clock and guest whichever daemon serves the disk. */
	if (rounds && rounds->count)
		printf(" rounds=%u per_round=%.1f submit_us=%.1f wait_us=%.1f", rounds->count,
		       (double)count / rounds->count, rounds->submit_s * 1e6 / rounds->count,
		       rounds->wait_s * 1e6 / rounds->count);
	printf("@\n");
	return 0;
}

/* Queue depth 1: each request waits for the one before. */
static int rnd_sync(const char *op, int fd, uint64_t blocks, unsigned count)
{
	int wr = !strcmp(op, "randwrite");
	void *buf = aligned(4096);
	fill(buf, 4096);
	double t0 = now();
	for (unsigned i = 0; i < count; i++) {
		off_t off = (off_t)(next() % blocks) * 4096;
		ssize_t n = wr ? pwrite(fd, buf, 4096, off) : pread(fd, buf, 4096, off);
		if (n != 4096) {
			printf("@LOAD op=%s qd=1 error=%s request=%u@\n", op, n < 0 ? strerror(errno) : "short", i);
			return 1;
		}
	}
	double s = now() - t0;
	return rnd_done(op, count, 1, s, s, NULL);
}

/* Queue depth QD: native AIO on the O_DIRECT descriptor keeps QD requests in the disk's queue
 * from one thread (zone1 has one vCPU: threads would only add context switches), resubmitting
 * each slot as soon as its request completes. Raw syscalls: no libaio in a static build. */
static int rnd_aio(const char *op, int fd, uint64_t blocks, unsigned count, unsigned qd)
{
	int wr = !strcmp(op, "randwrite");
	aio_context_t ctx = 0;
	if (syscall(SYS_io_setup, qd, &ctx)) {
		printf("@LOAD op=%s qd=%u error=io_setup:%s@\n", op, qd, strerror(errno));
		return 1;
	}
	struct iocb *cbs = calloc(qd, sizeof(*cbs));
	struct iocb **ready = calloc(qd, sizeof(*ready));
	struct io_event *events = calloc(qd, sizeof(*events));
	double *issued = calloc(qd, sizeof(*issued));
	char *bufs = aligned((size_t)qd * 4096);
	if (!cbs || !ready || !events || !issued) {
		fprintf(stderr, "rigload: no memory\n");
		exit(1);
	}
	fill(bufs, (size_t)qd * 4096);
	unsigned submitted = 0, completed = 0, nready = 0;
	double lat_sum = 0, t0 = now();
	struct rounds rounds = { 0 };
	for (unsigned i = 0; i < qd && i < count; i++)
		ready[nready++] = &cbs[i];
	while (completed < count) {
		double t = now();
		for (unsigned i = 0; i < nready; i++) {
			struct iocb *cb = ready[i];
			unsigned slot = cb - cbs;
			memset(cb, 0, sizeof(*cb));
			cb->aio_data = slot;
			cb->aio_lio_opcode = wr ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
			cb->aio_fildes = fd;
			cb->aio_buf = (uint64_t)(uintptr_t)(bufs + (size_t)slot * 4096);
			cb->aio_nbytes = 4096;
			cb->aio_offset = (next() % blocks) * 4096;
			issued[slot] = t;
		}
		for (unsigned done = 0; done < nready;) {
			long n = syscall(SYS_io_submit, ctx, (long)(nready - done), ready + done);
			if (n <= 0) {
				printf("@LOAD op=%s qd=%u error=io_submit:%s request=%u@\n", op, qd,
				       n < 0 ? strerror(errno) : "none", submitted + done);
				return 1;
			}
			done += n;
		}
		submitted += nready;
		nready = 0;
		double submitted_at = now();
		rounds.submit_s += submitted_at - t;
		long n = syscall(SYS_io_getevents, ctx, 1L, (long)qd, events, NULL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			printf("@LOAD op=%s qd=%u error=io_getevents:%s request=%u@\n", op, qd,
			       n < 0 ? strerror(errno) : "none", completed);
			return 1;
		}
		t = now();
		rounds.wait_s += t - submitted_at;
		rounds.count++;
		for (long i = 0; i < n; i++) {
			if (events[i].res != 4096) {
				printf("@LOAD op=%s qd=%u error=%s request=%u@\n", op, qd,
				       events[i].res < 0 ? strerror(-events[i].res) : "short", completed);
				return 1;
			}
			lat_sum += t - issued[events[i].data];
			completed++;
			if (submitted + nready < count)
				ready[nready++] = &cbs[events[i].data];
		}
	}
	double s = now() - t0;
	syscall(SYS_io_destroy, ctx);
	return rnd_done(op, count, qd, s, lat_sum, &rounds);
}

static int rnd(const char *op, const char *dev, unsigned mib, unsigned count, unsigned qd)
{
	if (!mib || !count || !qd) {
		fprintf(stderr, "rigload: MIB, COUNT and QD are positive\n");
		return 2;
	}
	int fd = open_dev(dev, !strcmp(op, "randwrite") ? O_WRONLY : O_RDONLY);
	uint64_t blocks = (uint64_t)mib * (MIB / 4096);
	return qd == 1 ? rnd_sync(op, fd, blocks, count) : rnd_aio(op, fd, blocks, count, qd);
}

static int recv_bounded(unsigned long long want, int idle_ms, int first_ms, const char *ready)
{
	static char buf[65536];
	unsigned long long got = 0;
	struct pollfd p = { .fd = 0, .events = POLLIN };
	/* Before the sender starts, so that bytes it sends cannot pile up unread and unclocked. */
	if (ready)
		fprintf(stderr, "%s\n", ready);
	double t0 = now(), last = t0;
	while (got < want) {
		int r = poll(&p, 1, got ? idle_ms : first_ms);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		size_t ask = want - got < sizeof(buf) ? want - got : sizeof(buf);
		ssize_t n = read(0, buf, ask);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n <= 0)
			break;
		last = now();
		for (ssize_t done = 0; done < n;) {
			ssize_t w = write(1, buf + done, n - done);
			if (w <= 0)
				return 1;
			done += w;
		}
		got += n;
	}
	fprintf(stderr, "@LOAD op=recv bytes=%llu s=%.6f@\n", got, last - t0);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && (!strcmp(argv[1], "write") || !strcmp(argv[1], "read")))
		return seq(argv[1], argv[2], atoi(argv[3]));
	if ((argc == 5 || argc == 6) && (!strcmp(argv[1], "rand") || !strcmp(argv[1], "randwrite")))
		return rnd(argv[1], argv[2], atoi(argv[3]), atoi(argv[4]), argc == 6 ? atoi(argv[5]) : 1);
	if ((argc == 5 || argc == 6) && !strcmp(argv[1], "recv"))
		return recv_bounded(strtoull(argv[2], NULL, 10), atoi(argv[3]), atoi(argv[4]),
				    argc == 6 ? argv[5] : NULL);
	fprintf(stderr, "usage: rigload write|read DEV MIB | rand|randwrite DEV MIB COUNT [QD] | "
			"recv BYTES IDLE_MS FIRST_MS [READY]\n");
	return 2;
}
