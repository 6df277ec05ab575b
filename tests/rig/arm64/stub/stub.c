/*
 * The rig's EL2 stub: plays hvisor's part for one zone under QEMU TCG.
 *
 *  - stage-2 identity map of the zone RAM (minus the stub's own region, which also holds the
 *    bridge page) and of the device space, with the pages of the zone's virtio windows left
 *    unmapped;
 *  - every data abort in a window becomes a device_req in the bridge page, exactly as hvisor's
 *    mmio_virtio_handler builds it; synchronous accesses spin on cfg_flags[cpu];
 *  - res_list entries become pending SPIs in the GIC distributor (guest interrupts are not
 *    routed to EL2, so the guest takes them directly); WFI is trapped so an idle guest still
 *    sees a result within a bounded time;
 *  - PSCI SMCs are passed through, CPU_ON is intercepted so secondaries also start under
 *    stage 2 at EL1;
 *  - one more trapped page, outside every window, is the counter page: the guest's benchmark
 *    reads the statistics there (RIG_COUNTER_PAGE, see counter_word).
 *
 * Runs with the EL2 MMU off: every access here is Device memory, so code is built with
 * -mstrict-align and the bridge page is accessed field by field.
 */
#include <stddef.h>
#include <stdint.h>

#include "rig_config.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define UART_BASE 0x09000000UL
#define GICD_BASE 0x08000000UL
#define GICD_ISPENDR 0x200
#define GICD_CTLR 0x0
#define GICD_CTLR_RWP (1U << 31)
#define GICD_CTLR_ARE (1U << 4)
#define GICD_CTLR_ENABLE_G0 (1U << 0) /* single security state */
#define GICD_IGROUPR 0x80
#define GICD_ISENABLER 0x100
#define GICD_ICENABLER 0x180
#define GICD_IPRIORITYR 0x400
#define GICD_IROUTER 0x6000
#define GICD_IROUTER_ANY (1UL << 31)
#define AFFINITY_MASK 0xff00ffffffUL /* MPIDR Aff3..Aff0 */

/* The doorbell: QEMU virt's second PL011, whose input the host provider writes a byte to on
 * every FINISH_REQ. Its SPI is made a Group 0 (FIQ) interrupt, enabled only while the stub
 * waits in WFI, so it wakes the stub and never reaches the guest. Its output is hvisor's wakeup
 * IPI: one byte after a push while the bridge has need_wakeup set. */
#define DOORBELL_UART 0x09040000UL
#define DOORBELL_INTID 40
#define UART_DR 0x00
#define UART_FR 0x18
#define UART_FR_RXFE (1U << 4)
#define UART_FR_TXFF (1U << 5)
#define UART_LCR_H 0x2c
#define UART_CR 0x30
#define UART_IMSC 0x38
#define UART_ICR 0x44

#define PSCI_CPU_ON_64 0xc4000003UL
#define PSCI_SYSTEM_OFF 0x84000008UL
#define PSCI_SYSTEM_RESET 0x84000009UL

#define EC_WFX 0x01
#define EC_HVC64 0x16
#define EC_SMC64 0x17
#define EC_DABT_LOW 0x24

#define QUEUE_NOTIFY_OFFSET 0x50
#define VIRTIO_MAGIC 0x74726976 /* "virt" */

#define read_sysreg(r)                                                                            \
	({                                                                                        \
		u64 __v;                                                                          \
		asm volatile("mrs %0, " #r : "=r"(__v));                                          \
		__v;                                                                              \
	})
#define write_sysreg(r, v) asm volatile("msr " #r ", %0" ::"r"((u64)(v)))
#define dmb_ish() asm volatile("dmb ish" ::: "memory")
#define isb() asm volatile("isb" ::: "memory")
#define cpu_relax() asm volatile("yield" ::: "memory")

/* ---- the bridge page (hvisor's struct virtio_bridge, MAX_REQ = 32, MAX_DEVS = 8, MAX_CPUS = 32) */
#define MAX_REQ 32
#define MAX_DEVS 8
#define MAX_CPUS 32

struct device_req {
	u64 src_cpu;
	u64 address;
	u64 size;
	u64 value;
	u32 src_zone;
	u8 is_write;
	u8 need_interrupt;
	u16 padding;
};

struct device_res {
	u32 target_zone;
	u32 irq_id;
};

struct virtio_bridge {
	u32 req_front;
	u32 req_rear;
	u32 res_front;
	u32 res_rear;
	struct device_req req_list[MAX_REQ];
	struct device_res res_list[MAX_REQ];
	u64 cfg_flags[MAX_CPUS];
	u64 cfg_values[MAX_CPUS];
	u64 mmio_addrs[MAX_DEVS];
	u8 mmio_avail;
	u8 need_wakeup;
};

_Static_assert(sizeof(struct device_req) == 40, "device_req layout");
_Static_assert(offsetof(struct virtio_bridge, req_list) == 0x10, "req_list offset");
_Static_assert(offsetof(struct virtio_bridge, res_list) == 0x510, "res_list offset");
_Static_assert(offsetof(struct virtio_bridge, cfg_flags) == 0x610, "cfg_flags offset");
_Static_assert(offsetof(struct virtio_bridge, cfg_values) == 0x710, "cfg_values offset");
_Static_assert(offsetof(struct virtio_bridge, mmio_addrs) == 0x810, "mmio_addrs offset");
_Static_assert(offsetof(struct virtio_bridge, need_wakeup) == 0x851, "need_wakeup offset");
_Static_assert(sizeof(struct virtio_bridge) == 2136, "virtio_bridge size");
_Static_assert(RIG_MAX_CPUS <= MAX_CPUS, "cfg slots are per physical CPU");

static volatile struct virtio_bridge *const bridge = (volatile struct virtio_bridge *)RIG_BRIDGE_GPA;

struct window {
	u64 base;
	u64 size;
};
static const struct window windows[RIG_NUM_WINDOWS] = RIG_WINDOWS;
static const u64 hole_pages[RIG_NUM_HOLES] = RIG_HOLES;
static const u32 device_irqs[RIG_NUM_IRQS] = RIG_IRQS;

struct frame {
	u64 x[31];
	u64 pad;
};

/* ---- statistics, printed at SYSTEM_OFF ---- */
static struct {
	u64 traps;
	u64 reads;
	u64 writes;
	u64 async_notifies;
	u64 outside_windows;
	u64 ring_full_backoffs;
	u64 results;
	u64 bad_results;
	u64 wfi;
	u64 smc;
	u64 slow_replies;
	u64 doorbell_waits;
	u64 doorbell_wakes;
	u64 sync_waits;      /* synchronous accesses answered by the bridge */
	u64 sync_wait_ticks; /* generic-counter ticks from the push to cfg_flags moving */
	u64 window_ticks;    /* ticks spent at EL2 handling window accesses, push to return */
	u64 counter_reads;   /* guest reads of the counter page */
	u64 wfi_ticks;       /* ticks spent at EL2 on trapped WFIs (the guest idling) */
	u64 kicks;           /* wakeup bytes sent to the host (need_wakeup was set) */
	u64 per_cpu_accesses[RIG_MAX_CPUS];
} stats;

#define STAT_ADD(field, n) __atomic_fetch_add(&stats.field, (n), __ATOMIC_RELAXED)

/* Several CPUs may trap at once. */
#define STAT_INC(field) __atomic_fetch_add(&stats.field, 1, __ATOMIC_RELAXED)

/* ---- minimal console on the PL011 (shared with the guest; used at boot, exit and on errors) */
static void uart_putc(char c)
{
	volatile u32 *uart = (volatile u32 *)UART_BASE;
	while (uart[0x18 / 4] & (1 << 5)) /* FR.TXFF */
		;
	uart[0] = (u32)c;
}

static void puts_(const char *s)
{
	for (; *s; s++) {
		if (*s == '\n')
			uart_putc('\r');
		uart_putc(*s);
	}
}

static void puthex(u64 v)
{
	puts_("0x");
	int started = 0;
	for (int shift = 60; shift >= 0; shift -= 4) {
		unsigned d = (v >> shift) & 0xf;
		if (d || started || shift == 0) {
			uart_putc((char)(d < 10 ? '0' + d : 'a' + d - 10));
			started = 1;
		}
	}
}

static void putdec(u64 v)
{
	char buf[21];
	int i = 20;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	puts_(&buf[i]);
}

/* ---- tiny spin lock (ldaxr/stxr; QEMU implements exclusives regardless of memory type) */
static void lock(volatile u32 *l)
{
	while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
		while (*l)
			cpu_relax();
}

static void unlock(volatile u32 *l)
{
	__atomic_store_n(l, 0, __ATOMIC_RELEASE);
}

static volatile u32 req_lock, res_lock, print_lock;

/* The generic counter: the "bridge is slow" warning, the WFI polling bound and the timing
 * statistics (the guest's CNTVCT reads the same count: CNTVOFF_EL2 is 0). */
static u64 now_ticks(void)
{
	isb();
	return read_sysreg(cntpct_el0);
}

static u64 ticks_per_ms(void)
{
	return read_sysreg(cntfrq_el0) / 1000;
}

static unsigned cpu_index(void)
{
	u64 mpidr = read_sysreg(mpidr_el1);
	/* QEMU virt with GICv3 packs 16 CPUs per Aff1 cluster. */
	return (unsigned)((mpidr & 0xff) + 16 * ((mpidr >> 8) & 0xff));
}

static void psci_smc(u64 regs[4])
{
	register u64 x0 asm("x0") = regs[0];
	register u64 x1 asm("x1") = regs[1];
	register u64 x2 asm("x2") = regs[2];
	register u64 x3 asm("x3") = regs[3];
	asm volatile("smc #0" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3)::"memory");
	regs[0] = x0;
	regs[1] = x1;
	regs[2] = x2;
	regs[3] = x3;
}

static void print_stats(const char *why)
{
	lock(&print_lock);
	puts_("[stub] ");
	puts_(why);
	puts_(": traps=");
	putdec(stats.traps);
	puts_(" reads=");
	putdec(stats.reads);
	puts_(" writes=");
	putdec(stats.writes);
	puts_(" async_notifies=");
	putdec(stats.async_notifies);
	puts_(" outside_windows=");
	putdec(stats.outside_windows);
	puts_(" ring_full_backoffs=");
	putdec(stats.ring_full_backoffs);
	puts_(" irqs=");
	putdec(stats.results);
	puts_(" bad_results=");
	putdec(stats.bad_results);
	puts_(" wfi=");
	putdec(stats.wfi);
	puts_(" smc=");
	putdec(stats.smc);
	puts_(" slow_replies=");
	putdec(stats.slow_replies);
	puts_(" doorbell_waits=");
	putdec(stats.doorbell_waits);
	puts_(" doorbell_wakes=");
	putdec(stats.doorbell_wakes);
	puts_(" sync_waits=");
	putdec(stats.sync_waits);
	puts_(" sync_wait_ticks=");
	putdec(stats.sync_wait_ticks);
	puts_(" window_ticks=");
	putdec(stats.window_ticks);
	puts_(" counter_reads=");
	putdec(stats.counter_reads);
	puts_(" wfi_ticks=");
	putdec(stats.wfi_ticks);
	puts_(" kicks=");
	putdec(stats.kicks);
	puts_(" cntfrq=");
	putdec(read_sysreg(cntfrq_el0));
	puts_(" per_cpu_accesses=");
	for (int i = 0; i < RIG_MAX_CPUS; i++) {
		if (i)
			puts_("/");
		putdec(stats.per_cpu_accesses[i]);
	}
	puts_("\n");
	unlock(&print_lock);
}

static void __attribute__((noreturn)) power_off(void)
{
	u64 regs[4] = {PSCI_SYSTEM_OFF, 0, 0, 0};
	psci_smc(regs);
	for (;;)
		asm volatile("wfi");
}

static void __attribute__((noreturn)) fatal(const char *what, u64 esr)
{
	lock(&print_lock);
	puts_("[stub] FATAL ");
	puts_(what);
	puts_(" cpu=");
	putdec(cpu_index());
	puts_(" ESR=");
	puthex(esr);
	puts_(" ELR=");
	puthex(read_sysreg(elr_el2));
	puts_(" FAR=");
	puthex(read_sysreg(far_el2));
	puts_(" HPFAR=");
	puthex(read_sysreg(hpfar_el2));
	puts_("\n");
	unlock(&print_lock);
	power_off();
}

/* ---- stage 2: 40-bit IPA, 4 KiB granule, starting at level 1 (two concatenated tables) ---- */
#define S2_VALID (1UL << 0)
#define S2_TABLE (1UL << 1) /* table (levels 1-2) or page (level 3) */
#define S2_MEMATTR_NORMAL_WB (0xfUL << 2)
#define S2_MEMATTR_DEVICE_nGnRE (0x1UL << 2)
#define S2_AP_RW (3UL << 6)
#define S2_SH_INNER (3UL << 8)
#define S2_AF (1UL << 10)
#define S2_XN (2UL << 53)

#define S2_NORMAL (S2_VALID | S2_MEMATTR_NORMAL_WB | S2_AP_RW | S2_SH_INNER | S2_AF)
#define S2_DEVICE (S2_VALID | S2_MEMATTR_DEVICE_nGnRE | S2_AP_RW | S2_AF | S2_XN)

#define GIB (1UL << 30)
#define MIB2 (1UL << 21)
#define PAGE (1UL << 12)
#define IPA_BITS 40
#define L1_ENTRIES (1UL << (IPA_BITS - 30)) /* 1024: two concatenated level-1 tables */

#define RAM_END (RIG_RAM_BASE + RIG_RAM_SIZE)
#define RAM_FIRST_GIB (RIG_RAM_BASE / GIB)
#define RAM_GIBS ((RAM_END + GIB - 1) / GIB - RAM_FIRST_GIB)

_Static_assert(RIG_RAM_BASE % GIB == 0, "RAM base is GiB aligned on QEMU virt");
_Static_assert(RIG_STUB_BASE % MIB2 == 0 && RIG_STUB_BASE >= RIG_RAM_BASE && RIG_STUB_BASE < RAM_END,
	       "stub region is 2 MiB aligned inside RAM");
_Static_assert(RAM_END <= (1UL << IPA_BITS), "RAM fits the IPA space");
_Static_assert(RIG_RAM_BASE >= GIB, "GiB 0 is device space");

static u64 s2_l1[L1_ENTRIES] __attribute__((aligned(8192)));
static u64 s2_l2_dev[512] __attribute__((aligned(4096)));
static u64 s2_l2_ram[RAM_GIBS][512] __attribute__((aligned(4096)));
static u64 s2_l3[RIG_NUM_HOLES][512] __attribute__((aligned(4096)));

static int is_hole(u64 page)
{
	for (int i = 0; i < RIG_NUM_HOLES; i++)
		if (hole_pages[i] == page)
			return 1;
	return 0;
}

static void build_stage2(void)
{
	int l3_used = 0;

	for (u64 g = 0; g < L1_ENTRIES; g++)
		s2_l1[g] = (g * GIB) | S2_DEVICE; /* 1 GiB device blocks (PCIe windows etc.) */

	/* GiB 0: device space in 2 MiB blocks; a block holding a window page gets a level-3 table. */
	for (u64 b = 0; b < 512; b++) {
		u64 base = b * MIB2;
		int split = 0;
		for (int i = 0; i < RIG_NUM_HOLES; i++)
			if (hole_pages[i] / MIB2 == b)
				split = 1;
		if (!split) {
			s2_l2_dev[b] = base | S2_DEVICE;
			continue;
		}
		u64 *l3 = s2_l3[l3_used++];
		for (u64 p = 0; p < 512; p++) {
			u64 page = base + p * PAGE;
			l3[p] = is_hole(page) ? 0 : (page | S2_DEVICE | S2_TABLE);
		}
		s2_l2_dev[b] = (u64)l3 | S2_VALID | S2_TABLE;
	}
	s2_l1[0] = (u64)s2_l2_dev | S2_VALID | S2_TABLE;

	/* RAM in 2 MiB normal blocks, except the stub's own region at the top (never mapped). */
	for (u64 g = 0; g < RAM_GIBS; g++) {
		for (u64 b = 0; b < 512; b++) {
			u64 base = (RAM_FIRST_GIB + g) * GIB + b * MIB2;
			if (base >= RIG_RAM_BASE && base < RIG_STUB_BASE)
				s2_l2_ram[g][b] = base | S2_NORMAL;
			else
				s2_l2_ram[g][b] = 0; /* the stub's region, or no RAM there */
		}
		s2_l1[RAM_FIRST_GIB + g] = (u64)s2_l2_ram[g] | S2_VALID | S2_TABLE;
	}
	dmb_ish();
}

/* VTCR_EL2: T0SZ=24 (40-bit IPA), SL0=1 (start at level 1), WBWA inner/outer, inner shareable,
 * 4 KiB granule, PS=40 bits, RES1 bit 31. */
#define VTCR_VALUE 0x80023558UL

/* HCR_EL2: VM (stage 2), TWI (trap WFI), TSC (trap SMC), RW (EL1 is AArch64), APK/API (no
 * pointer-auth traps). IMO/FMO stay 0: physical interrupts go straight to EL1. */
#define HCR_VM (1UL << 0)
#define HCR_TWI (1UL << 13)
#define HCR_TSC (1UL << 19)
#define HCR_RW (1UL << 31)
#define HCR_APK (1UL << 40)
#define HCR_API (1UL << 41)
#define HCR_VALUE (HCR_VM | HCR_TWI | HCR_TSC | HCR_RW | HCR_APK | HCR_API)

static void setup_el2_for_guest(void)
{
	write_sysreg(vtcr_el2, VTCR_VALUE);
	write_sysreg(vttbr_el2, (u64)s2_l1);
	write_sysreg(hcr_el2, HCR_VALUE);
	write_sysreg(cptr_el2, 0x33ffUL); /* RES1 bits; FP/SIMD not trapped */
	write_sysreg(hstr_el2, 0);
	write_sysreg(cnthctl_el2, 3); /* EL1 may use the physical counter and timer */
	write_sysreg(cntvoff_el2, 0);
	write_sysreg(vpidr_el2, read_sysreg(midr_el1));
	write_sysreg(vmpidr_el2, read_sysreg(mpidr_el1));
	write_sysreg(S3_4_C12_C9_5, 0xfUL); /* ICC_SRE_EL2: SRE | DFB | DIB | Enable (EL1 may use SRE) */
	write_sysreg(sctlr_el1, 0x30d00800UL); /* RES1 bits, MMU off */
	isb();
	asm volatile("tlbi vmalls12e1\n dsb ish\n isb" ::: "memory");
}

static void doorbell_uart_init(void);
static void kick_bridge(void);
extern void enter_guest(u64 entry, u64 x0) __attribute__((noreturn));
extern char secondary_entry[];

/* Where each secondary CPU enters the guest, recorded at its intercepted CPU_ON. */
static volatile u64 secondary_guest_entry[RIG_MAX_CPUS];
static volatile u64 secondary_guest_context[RIG_MAX_CPUS];

void stub_main_boot(void)
{
	puts_("[stub] EL2 stub: zone ");
	putdec(RIG_ZONE_ID);
	puts_(", bridge page ");
	puthex(RIG_BRIDGE_GPA);
	puts_(", windows");
	for (int i = 0; i < RIG_NUM_WINDOWS; i++) {
		puts_(" ");
		puthex(windows[i].base);
		puts_("+");
		puthex(windows[i].size);
	}
	puts_(RIG_LOCAL_EMPTY ? " (answered locally as empty)" : " (forwarded to the bridge)");
	puts_(RIG_FENCED ? ", need_wakeup ordering: fenced" : ", need_wakeup ordering: hvisor");
	puts_(RIG_SYNC_NOTIFY_READS ? ", 0x50 reads: sync\n" : ", 0x50 reads: async\n");
	build_stage2();
	if (RIG_DOORBELL)
		doorbell_uart_init();
	setup_el2_for_guest();
	puts_("[stub] entering Linux at EL1, entry=");
	puthex(RIG_KERNEL_ADDR);
	puts_(" dtb=");
	puthex(RIG_DTB_ADDR);
	puts_("\n");
	enter_guest(RIG_KERNEL_ADDR, RIG_DTB_ADDR);
}

void stub_main_secondary(u64 cpu)
{
	if (cpu >= RIG_MAX_CPUS)
		fatal("secondary CPU index out of range", cpu);
	setup_el2_for_guest();
	enter_guest(secondary_guest_entry[cpu], secondary_guest_context[cpu]);
}

/* ---- results: res_list entries become pending SPIs ---- */
static int drain_results(void)
{
	int delivered = 0;

	lock(&res_lock);
	u32 front = bridge->res_front % MAX_REQ;
	for (;;) {
		u32 rear = bridge->res_rear % MAX_REQ;
		if (front == rear)
			break;
		dmb_ish(); /* acquire: the entry was written before res_rear */
		u32 zone = bridge->res_list[front].target_zone;
		u32 irq = bridge->res_list[front].irq_id;
		if (zone == RIG_ZONE_ID && irq >= 32 && irq < 1020) {
			volatile u32 *ispendr = (volatile u32 *)(GICD_BASE + GICD_ISPENDR + 4 * (irq / 32));
			*ispendr = 1U << (irq % 32);
			STAT_INC(results);
			delivered = 1;
		} else {
			STAT_INC(bad_results);
		}
		front = (front + 1) % MAX_REQ;
		dmb_ish(); /* release: the entry is consumed before the slot is handed back */
		bridge->res_front = front;
	}
	unlock(&res_lock);
	return delivered;
}

/* ---- requests: hvisor's mmio_virtio_handler ---- */
static void push_request(const struct device_req *r)
{
	unsigned backoff = 1;

	for (;;) {
		lock(&req_lock);
		u32 rear = bridge->req_rear % MAX_REQ;
		u32 front = bridge->req_front % MAX_REQ;
		dmb_ish(); /* the consumer finished with the slot before it moved req_front */
		if ((rear + 1) % MAX_REQ != front) {
			volatile struct device_req *slot = &bridge->req_list[rear];
			slot->src_cpu = r->src_cpu;
			slot->address = r->address;
			slot->size = r->size;
			slot->value = r->value;
			slot->src_zone = r->src_zone;
			slot->is_write = r->is_write;
			slot->need_interrupt = r->need_interrupt;
			slot->padding = 0;
			dmb_ish(); /* release: the slot is complete before req_rear moves */
			bridge->req_rear = (rear + 1) % MAX_REQ;
			unlock(&req_lock);
			/* hvisor reads need_wakeup right after this store with no StoreLoad barrier,
			 * so its load may return a stale 0 and the wakeup is lost until the daemon's
			 * guard timeout: RIG_FENCED=0 plays that. RIG_FENCED=1 orders the req_rear
			 * store before the load, for comparison. */
			if (RIG_FENCED)
				dmb_ish();
			return;
		}
		unlock(&req_lock);
		STAT_INC(ring_full_backoffs);
		for (unsigned i = 0; i < backoff; i++)
			cpu_relax();
		if (backoff < 1024)
			backoff *= 2;
	}
}

/* Returns the value for a read (unmasked); for writes the return value is unused. */
static u64 forward_access(unsigned cpu, u64 ipa, u64 offset, unsigned size, int is_write, u64 value)
{
	struct device_req req = {
		.src_cpu = cpu,
		.address = ipa,
		.size = size,
		.value = is_write ? value : 0,
		.src_zone = RIG_ZONE_ID,
		.is_write = (u8)is_write,
		/* hvisor does not look at the direction: a read at window offset 0x50 is sent
		 * asynchronously too and returns 0 without a reply. RIG_SYNC_NOTIFY_READS=1 makes
		 * it wait for the bridge like any other read. */
		.need_interrupt = (u8)(offset == QUEUE_NOTIFY_OFFSET && (is_write || !RIG_SYNC_NOTIFY_READS)),
	};

	if (RIG_LOCAL_EMPTY) {
		/* A virtio-mmio v2 transport with DeviceID 0: Linux probes it and skips it. */
		if (is_write)
			return 0;
		return offset == 0 ? VIRTIO_MAGIC : offset == 4 ? 2 : 0;
	}

	u64 old = bridge->cfg_flags[cpu];
	dmb_ish();
	u64 start = now_ticks();
	push_request(&req);
	/* hvisor's wakeup IPI: a sleeping bridge has need_wakeup set. With RIG_FENCED,
	 * push_request ended with the barrier that orders its req_rear store before this load;
	 * the bridge sets the flag and then re-checks the ring, so either it sees the request or
	 * this sees the flag. Without it (hvisor's order) both may miss. */
	if (RIG_KICK && bridge->need_wakeup)
		kick_bridge();
	if (req.need_interrupt) {
		STAT_INC(async_notifies);
		return 0;
	}

	u64 warn_after = 5000 * ticks_per_ms();
	int warned = 0;
	while (bridge->cfg_flags[cpu] == old) {
		/* The bridge may be waiting for room in res_list: keep draining it. */
		drain_results();
		cpu_relax();
		if (!warned && now_ticks() - start > warn_after) {
			warned = 1;
			STAT_INC(slow_replies);
			lock(&print_lock);
			puts_("[stub] still waiting for the bridge: cpu=");
			putdec(cpu);
			puts_(" addr=");
			puthex(ipa);
			puts_(is_write ? " write\n" : " read\n");
			unlock(&print_lock);
		}
	}
	dmb_ish(); /* acquire: cfg_values was written before cfg_flags moved */
	STAT_INC(sync_waits);
	STAT_ADD(sync_wait_ticks, now_ticks() - start);
	return bridge->cfg_values[cpu];
}

/* The counter page: a trapped page outside every window, read by the guest's benchmark to
 * sample the counters without powering off. 64-bit words, in this order; writes are ignored. */
static u64 counter_word(u64 index)
{
	switch (index) {
	case 0: return stats.traps;
	case 1: return stats.reads;
	case 2: return stats.writes;
	case 3: return stats.async_notifies;
	case 4: return stats.results;
	case 5: return stats.sync_waits;
	case 6: return stats.sync_wait_ticks;
	case 7: return stats.window_ticks;
	case 8: return read_sysreg(cntfrq_el0);
	case 9: return stats.wfi;
	case 10: return stats.doorbell_waits;
	case 11: return stats.counter_reads;
	case 12: return stats.wfi_ticks;
	case 13: return stats.kicks;
	default: return 0;
	}
}

static void handle_dabt(struct frame *f, u64 esr)
{
	if (!(esr & (1UL << 24)))
		fatal("data abort without ISV (instruction not decodable from ESR)", esr);

	unsigned sas = (esr >> 22) & 3;
	int sse = (esr >> 21) & 1;
	unsigned srt = (esr >> 16) & 0x1f;
	int sf = (esr >> 15) & 1;
	int is_write = (esr >> 6) & 1;
	unsigned size = 1U << sas;
	u64 mask = size == 8 ? ~0UL : (1UL << (8 * size)) - 1;
	u64 ipa = ((read_sysreg(hpfar_el2) & ~0xfUL) << 8) | (read_sysreg(far_el2) & 0xfff);
	unsigned cpu = cpu_index();

	if (cpu >= RIG_MAX_CPUS)
		fatal("CPU index out of range", cpu);
	if ((ipa & ~(PAGE - 1)) == RIG_COUNTER_PAGE) {
		STAT_INC(counter_reads);
		if (!is_write && srt != 31) {
			u64 word = counter_word((ipa & (PAGE - 1)) / 8);
			f->x[srt] = (size == 8 ? word : word >> (8 * (ipa & 4))) & mask;
		}
		return;
	}
	if (!is_hole(ipa & ~(PAGE - 1)))
		fatal("stage-2 fault outside the virtio window pages", esr);

	const struct window *w = 0;
	for (int i = 0; i < RIG_NUM_WINDOWS; i++)
		if (ipa >= windows[i].base && ipa - windows[i].base < windows[i].size)
			w = &windows[i];

	if (is_write)
		STAT_INC(writes);
	else
		STAT_INC(reads);
	STAT_INC(per_cpu_accesses[cpu]);

	if (!w) {
		/* In a trapped page but in no window (an unused 0x200 slot): reads as 0, writes dropped. */
		STAT_INC(outside_windows);
		if (!is_write && srt != 31)
			f->x[srt] = 0;
		return;
	}

	u64 wvalue = (srt == 31 ? 0 : f->x[srt]) & mask;
	u64 start = now_ticks();
	u64 v = forward_access(cpu, ipa, ipa - w->base, size, is_write, wvalue);
	STAT_ADD(window_ticks, now_ticks() - start);
	if (is_write || srt == 31)
		return;
	v &= mask;
	if (sse && size < 8 && (v >> (8 * size - 1)) & 1)
		v |= ~mask;
	if (!sf)
		v &= 0xffffffffUL;
	f->x[srt] = v;
}

static volatile u32 *gicd32(u64 offset)
{
	return (volatile u32 *)(GICD_BASE + offset);
}

static volatile u32 *uart32(u64 base, u64 offset)
{
	return (volatile u32 *)(base + offset);
}

/* Whether the guest routes any of the zone's virtio SPIs to this CPU (GICD_IROUTER). */
static int is_virtio_irq_target(void)
{
	u64 me = read_sysreg(mpidr_el1) & AFFINITY_MASK;
	for (int i = 0; i < RIG_NUM_IRQS; i++) {
		u64 route = *(volatile u64 *)(GICD_BASE + GICD_IROUTER + 8 * (u64)device_irqs[i]);
		if ((route & GICD_IROUTER_ANY) || (route & AFFINITY_MASK) == me)
			return 1;
	}
	return 0;
}

static void doorbell_uart_init(void)
{
	*uart32(DOORBELL_UART, UART_CR) = 0;
	*uart32(DOORBELL_UART, UART_LCR_H) = 0x60; /* 8N1, no FIFO: every byte raises RX */
	*uart32(DOORBELL_UART, UART_IMSC) = 1U << 4; /* RXIM */
	*uart32(DOORBELL_UART, UART_ICR) = 0x7ff;
	*uart32(DOORBELL_UART, UART_CR) = (1U << 9) | (1U << 8) | 1U; /* RXE | TXE | UARTEN */
}

static void kick_bridge(void)
{
	while (*uart32(DOORBELL_UART, UART_FR) & UART_FR_TXFF)
		cpu_relax();
	*uart32(DOORBELL_UART, UART_DR) = 1;
	STAT_INC(kicks);
}

static void doorbell_clear(void)
{
	/* Bounded: QEMU refills the holding register from the socket as it is read. */
	for (int i = 0; i < 64 && !(*uart32(DOORBELL_UART, UART_FR) & UART_FR_RXFE); i++)
		(void)*uart32(DOORBELL_UART, UART_DR);
	*uart32(DOORBELL_UART, UART_ICR) = 0x7ff;
}

static void gicd_wait_rwp(void)
{
	while (*gicd32(GICD_CTLR) & GICD_CTLR_RWP)
		cpu_relax();
}

/* Group 0, top priority, routed to this CPU, enabled. Linux configures every SPI once in its
 * distributor init (all Group 1) and then enables ARE; after that it leaves unclaimed SPIs
 * alone, so the group and priority set here stay. Returns 0 before Linux's GIC init. */
static int doorbell_arm(void)
{
	static volatile u32 configured;

	if (!(*gicd32(GICD_CTLR) & GICD_CTLR_ARE))
		return 0;
	if (!configured) {
		lock(&res_lock);
		*gicd32(GICD_IGROUPR + 4 * (DOORBELL_INTID / 32)) &= ~(1U << (DOORBELL_INTID % 32));
		*(volatile u8 *)(GICD_BASE + GICD_IPRIORITYR + DOORBELL_INTID) = 0;
		*gicd32(GICD_CTLR) |= GICD_CTLR_ENABLE_G0;
		gicd_wait_rwp();
		configured = 1;
		unlock(&res_lock);
	}
	*(volatile u64 *)(GICD_BASE + GICD_IROUTER + 8 * DOORBELL_INTID) = read_sysreg(mpidr_el1) & AFFINITY_MASK;
	write_sysreg(S3_0_C12_C12_6, 1); /* ICC_IGRPEN0_EL1: Group 0 (FIQ) on for this CPU */
	isb();
	*gicd32(GICD_ISENABLER + 4 * (DOORBELL_INTID / 32)) = 1U << (DOORBELL_INTID % 32);
	gicd_wait_rwp();
	return 1;
}

static void doorbell_disarm(void)
{
	*gicd32(GICD_ICENABLER + 4 * (DOORBELL_INTID / 32)) = 1U << (DOORBELL_INTID % 32);
	gicd_wait_rwp();
	doorbell_clear();
}

static int results_pending(void)
{
	return bridge->res_front != bridge->res_rear;
}

/* An idle guest CPU (trapped WFI).
 * - A CPU that takes none of the virtio SPIs executes a real WFI: its own interrupts wake it,
 *   including a virtio SPI another CPU's drain made pending for it.
 * - The CPU that takes them must also wake for new results. With the doorbell it arms it and
 *   executes a real WFI (the host CPU is free for the bridge and backends meanwhile). Without
 *   it, it polls res_list and ISR_EL1 for up to 1 ms and lets the guest run again (the guest
 *   re-enters its idle loop and traps here again). */
static void handle_wfi(void)
{
	STAT_INC(wfi);
	if (drain_results())
		return;
	if (!is_virtio_irq_target() || RIG_LOCAL_EMPTY || RIG_NUM_WINDOWS == 0) {
		asm volatile("dsb sy\n wfi" ::: "memory");
		return;
	}
	if (RIG_DOORBELL && doorbell_arm()) {
		/* A result published before arming has had its doorbell byte drained already. */
		if (!results_pending() && !read_sysreg(isr_el1)) {
			asm volatile("dsb sy\n wfi" ::: "memory");
			STAT_INC(doorbell_waits);
			if (!(*uart32(DOORBELL_UART, UART_FR) & UART_FR_RXFE))
				STAT_INC(doorbell_wakes);
		}
		doorbell_disarm();
		drain_results();
		return;
	}
	u64 start = now_ticks();
	u64 limit = ticks_per_ms();
	while (now_ticks() - start < limit) {
		if (read_sysreg(isr_el1))
			return;
		if (results_pending()) {
			drain_results();
			return;
		}
		cpu_relax();
	}
}

static void handle_smc(struct frame *f)
{
	u64 regs[4] = {f->x[0], f->x[1], f->x[2], f->x[3]};
	STAT_INC(smc);

	if (regs[0] == PSCI_SYSTEM_OFF || regs[0] == PSCI_SYSTEM_RESET) {
		print_stats(regs[0] == PSCI_SYSTEM_OFF ? "guest PSCI SYSTEM_OFF" : "guest PSCI SYSTEM_RESET");
	} else if (regs[0] == PSCI_CPU_ON_64) {
		/* Start the target at the stub's own entry, at EL2, so it also gets stage 2. */
		u64 target = (regs[1] & 0xff) + 16 * ((regs[1] >> 8) & 0xff);
		if (target >= RIG_MAX_CPUS) {
			f->x[0] = (u64)-2; /* PSCI INVALID_PARAMETERS */
			return;
		}
		secondary_guest_entry[target] = regs[2];
		secondary_guest_context[target] = regs[3];
		dmb_ish();
		regs[2] = (u64)secondary_entry;
		regs[3] = target;
	}
	psci_smc(regs);
	f->x[0] = regs[0];
	f->x[1] = regs[1];
	f->x[2] = regs[2];
	f->x[3] = regs[3];
}

void handle_exception(struct frame *f, u64 kind)
{
	u64 esr = read_sysreg(esr_el2);

	if (kind != 8)
		fatal(kind == 9 || kind == 10 ? "unexpected interrupt at EL2" : "unexpected exception", esr);

	STAT_INC(traps);
	switch (esr >> 26) {
	case EC_DABT_LOW:
		handle_dabt(f, esr);
		write_sysreg(elr_el2, read_sysreg(elr_el2) + 4);
		break;
	case EC_WFX: {
		u64 start = now_ticks();
		handle_wfi();
		STAT_ADD(wfi_ticks, now_ticks() - start);
		write_sysreg(elr_el2, read_sysreg(elr_el2) + 4);
		break;
	}
	case EC_SMC64:
		handle_smc(f);
		/* a trapped SMC returns to the SMC itself: skip it */
		write_sysreg(elr_el2, read_sysreg(elr_el2) + 4);
		break;
	case EC_HVC64:
		f->x[0] = (u64)-1; /* no hypervisor calls here: PSCI NOT_SUPPORTED */
		break;
	default:
		fatal("unhandled trap from EL1", esr);
	}
	drain_results();
}

/* The compiler may emit calls to these for struct copies and zeroing. */
void *memset(void *d, int c, size_t n)
{
	volatile u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	volatile u8 *p = d;
	const volatile u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}
