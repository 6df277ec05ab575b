/*
 * The load program of the real-hvisor rig's benchmark (bench.sh): direct I/O on a zone1 disk
 * timed by zone1's own clock, and a bounded reader for zone0's end of the console transfer.
 * Built static for aarch64 by bench.sh; one "@LOAD key=value ...@" line per run on stdout.
 *
 *   rigload write DEV MIB          MIB MiB in 1 MiB blocks, O_DIRECT, then fsync
 *   rigload read DEV MIB           MIB MiB in 1 MiB blocks, O_DIRECT
 *   rigload rand DEV MIB COUNT     COUNT 4 KiB O_DIRECT reads at random offsets in the first MIB MiB
 *   rigload recv BYTES IDLE_MS FIRST_MS
 *                                  copies stdin to stdout until BYTES arrived, or nothing came
 *                                  for IDLE_MS after the first byte (FIRST_MS before it): a
 *                                  transfer that lost bytes ends instead of waiting forever
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static int seq(const char *op, const char *dev, unsigned mib)
{
	int wr = op[0] == 'w';
	int fd = open_dev(dev, wr ? O_WRONLY : O_RDONLY);
	uint64_t *buf = aligned(MIB);
	for (size_t i = 0; i < MIB / 8; i++)
		buf[i] = next();
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

static int rnd(const char *dev, unsigned mib, unsigned count)
{
	int fd = open_dev(dev, O_RDONLY);
	void *buf = aligned(4096);
	uint64_t blocks = (uint64_t)mib * (MIB / 4096);
	double t0 = now();
	for (unsigned i = 0; i < count; i++) {
		off_t off = (off_t)(next() % blocks) * 4096;
		if (pread(fd, buf, 4096, off) != 4096) {
			printf("@LOAD op=rand error=%s request=%u@\n", strerror(errno), i);
			return 1;
		}
	}
	double s = now() - t0;
	printf("@LOAD op=rand requests=%u s=%.6f iops=%.1f lat_us=%.1f@\n", count, s, count / s,
	       s * 1e6 / count);
	return 0;
}

static int recv_bounded(unsigned long long want, int idle_ms, int first_ms)
{
	static char buf[65536];
	unsigned long long got = 0;
	struct pollfd p = { .fd = 0, .events = POLLIN };
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
		for (ssize_t done = 0; done < n;) {
			ssize_t w = write(1, buf + done, n - done);
			if (w <= 0)
				return 1;
			done += w;
		}
		got += n;
	}
	fprintf(stderr, "@LOAD op=recv bytes=%llu@\n", got);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && (!strcmp(argv[1], "write") || !strcmp(argv[1], "read")))
		return seq(argv[1], argv[2], atoi(argv[3]));
	if (argc == 5 && !strcmp(argv[1], "rand"))
		return rnd(argv[2], atoi(argv[3]), atoi(argv[4]));
	if (argc == 5 && !strcmp(argv[1], "recv"))
		return recv_bounded(strtoull(argv[2], NULL, 10), atoi(argv[3]), atoi(argv[4]));
	fprintf(stderr, "usage: rigload write|read DEV MIB | rand DEV MIB COUNT | recv BYTES IDLE_MS FIRST_MS\n");
	return 2;
}
