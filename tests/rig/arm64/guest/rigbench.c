/*
 * The arm64 rig's guest benchmark helper: a static, libc-free aarch64 program (raw syscalls)
 * so it needs nothing beyond the cross compiler.
 *
 *   rigbench counters PAGE       one line: ns=<counter time> and the EL2 stub's counters, read
 *                                from its counter page at physical address PAGE (/dev/mem)
 *   rigbench read ADDR COUNT     COUNT 32-bit reads of the register at physical address ADDR;
 *                                prints reads=, ns= (total) and the last value
 *   rigbench vsock-cid           prints the guest's own vsock CID (from the device's config)
 *   rigbench vsock-send CID PORT connects an AF_VSOCK stream, sends stdin to EOF, closes;
 *                                prints bytes= (busybox has no vsock client)
 *   rigbench vsock-recv CID PORT connects an AF_VSOCK stream, copies it to stdout until the
 *                                peer closes
 *
 * Time comes from the generic counter (CNTVCT_EL0, which the stub leaves at the physical count),
 * the same clock the stub uses for its own tick counters.
 */
typedef unsigned long u64;
typedef unsigned int u32;

#define SYS_IOCTL 29
#define SYS_OPENAT 56
#define SYS_CLOSE 57
#define SYS_READ 63
#define SYS_WRITE 64
#define SYS_SOCKET 198
#define SYS_CONNECT 203
#define AF_VSOCK 40
#define SOCK_STREAM 1
#define IOCTL_VM_SOCKETS_GET_LOCAL_CID 0x7b9
#define O_RDONLY 0
#define SYS_EXIT 93
#define SYS_MMAP 222
#define AT_FDCWD (-100)
#define O_RDWR 2
#define O_SYNC 04010000
#define PROT_READ 1
#define MAP_SHARED 1
#define PAGE 4096UL

static long syscall6(long nr, long a, long b, long c, long d, long e, long f)
{
	register long x8 asm("x8") = nr;
	register long x0 asm("x0") = a;
	register long x1 asm("x1") = b;
	register long x2 asm("x2") = c;
	register long x3 asm("x3") = d;
	register long x4 asm("x4") = e;
	register long x5 asm("x5") = f;
	asm volatile("svc #0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5) : "memory");
	return x0;
}

static void out(const char *s)
{
	long n = 0;
	while (s[n])
		n++;
	syscall6(SYS_WRITE, 1, (long)s, n, 0, 0, 0);
}

static void out_dec(u64 v)
{
	char buf[21];
	int i = 20;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	out(&buf[i]);
}

static void out_hex(u64 v)
{
	char buf[19];
	int i = 18;
	buf[i] = 0;
	do {
		unsigned d = v & 0xf;
		buf[--i] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v >>= 4;
	} while (v);
	buf[--i] = 'x';
	buf[--i] = '0';
	out(&buf[i]);
}

static void __attribute__((noreturn)) leave(int code)
{
	syscall6(SYS_EXIT, code, 0, 0, 0, 0, 0);
	__builtin_unreachable();
}

static void __attribute__((noreturn)) die(const char *why)
{
	out("rigbench: ");
	out(why);
	out("\n");
	leave(1);
}

static int parse(const char *s, u64 *v)
{
	u64 base = 10, r = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	if (!*s)
		return 0;
	for (; *s; s++) {
		u64 d;
		if (*s >= '0' && *s <= '9')
			d = (u64)(*s - '0');
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = (u64)(*s - 'a' + 10);
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = (u64)(*s - 'A' + 10);
		else
			return 0;
		r = r * base + d;
	}
	*v = r;
	return 1;
}

static int same(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static u64 ticks(void)
{
	u64 v;
	asm volatile("isb\n mrs %0, cntvct_el0" : "=r"(v)::"memory");
	return v;
}

static u64 freq(void)
{
	u64 v;
	asm volatile("mrs %0, cntfrq_el0" : "=r"(v));
	return v;
}

static u64 ticks_to_ns(u64 t)
{
	u64 f = freq();
	return t / f * 1000000000UL + t % f * 1000000000UL / f;
}

/* Maps the page holding physical address `addr` (device memory: /dev/mem maps non-RAM
 * uncached) and returns a pointer to `addr` in it. */
static volatile void *map_phys(u64 addr)
{
	long fd = syscall6(SYS_OPENAT, AT_FDCWD, (long)"/dev/mem", O_RDWR | O_SYNC, 0, 0, 0);
	if (fd < 0)
		die("cannot open /dev/mem");
	long p = syscall6(SYS_MMAP, 0, PAGE, PROT_READ, MAP_SHARED, fd, (long)(addr & ~(PAGE - 1)));
	if (p < 0 && p > -4096)
		die("cannot map the page (claimed by a driver? STRICT_DEVMEM allows only free MMIO)");
	return (volatile char *)p + (addr & (PAGE - 1));
}

static const char *const counter_names[] = {
	"traps", "reads", "writes", "async_notifies", "irqs", "sync_waits", "sync_wait_ticks",
	"window_ticks", "cntfrq", "wfi", "doorbell_waits", "counter_reads", "wfi_ticks", "kicks",
};

static void counters(u64 page)
{
	volatile u64 *words = map_phys(page);
	u64 now = ticks();
	out("ns=");
	out_dec(ticks_to_ns(now));
	for (unsigned i = 0; i < sizeof(counter_names) / sizeof(counter_names[0]); i++) {
		out(" ");
		out(counter_names[i]);
		out("=");
		out_dec(words[i]);
	}
	out("\n");
}

static void reads(u64 addr, u64 count)
{
	volatile u32 *reg = map_phys(addr);
	u32 last = 0;
	u64 t0 = ticks();
	for (u64 i = 0; i < count; i++)
		last = *reg;
	u64 t1 = ticks();
	out("reads=");
	out_dec(count);
	out(" ns=");
	out_dec(ticks_to_ns(t1 - t0));
	out(" value=");
	out_hex(last);
	out("\n");
}

/* struct sockaddr_vm */
struct vsock_addr {
	unsigned short family, reserved;
	u32 port, cid;
	unsigned char zero[4];
};

static unsigned char io_buf[65536];

static void write_all(long fd, const unsigned char *p, long n)
{
	while (n > 0) {
		long w = syscall6(SYS_WRITE, fd, (long)p, n, 0, 0, 0);
		if (w <= 0)
			die("write failed");
		p += w;
		n -= w;
	}
}

static long vsock_connect(u64 cid, u64 port)
{
	struct vsock_addr a = { .family = AF_VSOCK, .port = (u32)port, .cid = (u32)cid };
	long fd = syscall6(SYS_SOCKET, AF_VSOCK, SOCK_STREAM, 0, 0, 0, 0);
	if (fd < 0)
		die("socket(AF_VSOCK) failed");
	if (syscall6(SYS_CONNECT, fd, (long)&a, sizeof(a), 0, 0, 0) < 0)
		die("vsock connect failed");
	return fd;
}

/* Copies `from` to `to` until EOF; returns the byte count. */
static u64 copy(long from, long to)
{
	u64 total = 0;
	for (;;) {
		long r = syscall6(SYS_READ, from, (long)io_buf, sizeof(io_buf), 0, 0, 0);
		if (r < 0)
			die("read failed");
		if (r == 0)
			return total;
		write_all(to, io_buf, r);
		total += (u64)r;
	}
}

static void vsock_cid(void)
{
	u32 cid = 0;
	long fd = syscall6(SYS_OPENAT, AT_FDCWD, (long)"/dev/vsock", O_RDONLY, 0, 0, 0);
	if (fd < 0)
		die("cannot open /dev/vsock");
	if (syscall6(SYS_IOCTL, fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, (long)&cid, 0, 0, 0) < 0)
		die("IOCTL_VM_SOCKETS_GET_LOCAL_CID failed");
	out("cid=");
	out_dec(cid);
	out("\n");
}

void rigbench_main(long argc, char **argv)
{
	u64 a, b;
	if (argc == 3 && same(argv[1], "counters") && parse(argv[2], &a))
		counters(a);
	else if (argc == 4 && same(argv[1], "read") && parse(argv[2], &a) && parse(argv[3], &b) && b > 0)
		reads(a, b);
	else if (argc == 2 && same(argv[1], "vsock-cid"))
		vsock_cid();
	else if (argc == 4 && same(argv[1], "vsock-send") && parse(argv[2], &a) && parse(argv[3], &b)) {
		long fd = vsock_connect(a, b);
		u64 n = copy(0, fd);
		syscall6(SYS_CLOSE, fd, 0, 0, 0, 0, 0);
		out("bytes=");
		out_dec(n);
		out("\n");
	} else if (argc == 4 && same(argv[1], "vsock-recv") && parse(argv[2], &a) && parse(argv[3], &b))
		copy(vsock_connect(a, b), 1);
	else
		die("usage: rigbench counters PAGE | read ADDR COUNT | vsock-cid | vsock-send CID PORT | vsock-recv CID PORT");
	leave(0);
}

/* The kernel starts us with sp -> argc, argv[0], ... */
asm(".global _start\n"
    "_start:\n"
    "	ldr x0, [sp]\n"
    "	add x1, sp, #8\n"
    "	and sp, x1, #~15\n"
    "	bl rigbench_main\n"
    "	b .\n");
