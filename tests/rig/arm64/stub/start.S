/*
 * EL2 entry, exception vectors and the guest entry for the rig's EL2 stub.
 * QEMU starts the boot CPU here at EL2 (ELF -kernel); secondaries arrive through PSCI CPU_ON
 * (intercepted by the stub) at secondary_entry with x0 = their CPU index.
 */
#include "rig_config.h"

#define FRAME_SIZE 256 /* x0..x30 + padding, 16-byte aligned */

	.section .text.boot, "ax"
	.global _start
_start:
	msr	daifset, #0xf
	mov	x19, #0				/* boot CPU index */
	bl	set_stack
	/* clear .bss (the linker script keeps it 16-byte aligned and sized) */
	ldr	x1, =__bss_start
	ldr	x2, =__bss_end
1:	cmp	x1, x2
	b.hs	2f
	stp	xzr, xzr, [x1], #16
	b	1b
2:	ldr	x1, =el2_vectors
	msr	vbar_el2, x1
	isb
	mov	x0, x19
	bl	stub_main_boot
	b	.

	.global secondary_entry
secondary_entry:
	msr	daifset, #0xf
	mov	x19, x0
	bl	set_stack
	ldr	x1, =el2_vectors
	msr	vbar_el2, x1
	isb
	mov	x0, x19
	bl	stub_main_secondary
	b	.

/* sp = __stacks_top - cpu * RIG_STACK_SIZE, for the CPU index in x19 */
set_stack:
	ldr	x1, =__stacks_top
	mov	x2, #RIG_STACK_SIZE
	msub	x1, x2, x19, x1
	mov	sp, x1
	ret

/* enter_guest(entry, x0_value): drop to EL1h with interrupts masked, as a boot loader would. */
	.global enter_guest
enter_guest:
	msr	elr_el2, x0
	mov	x2, #0x3c5			/* EL1h, DAIF masked */
	msr	spsr_el2, x2
	mov	x0, x1
	mov	x1, #0
	mov	x2, #0
	mov	x3, #0
	isb
	eret

.macro save_and_call kind
	sub	sp, sp, #FRAME_SIZE
	stp	x0, x1, [sp, #0]
	stp	x2, x3, [sp, #16]
	stp	x4, x5, [sp, #32]
	stp	x6, x7, [sp, #48]
	stp	x8, x9, [sp, #64]
	stp	x10, x11, [sp, #80]
	stp	x12, x13, [sp, #96]
	stp	x14, x15, [sp, #112]
	stp	x16, x17, [sp, #128]
	stp	x18, x19, [sp, #144]
	stp	x20, x21, [sp, #160]
	stp	x22, x23, [sp, #176]
	stp	x24, x25, [sp, #192]
	stp	x26, x27, [sp, #208]
	stp	x28, x29, [sp, #224]
	str	x30, [sp, #240]
	mov	x0, sp
	mov	x1, #\kind
	bl	handle_exception
	b	restore_and_eret
.endm

	.balign 2048
el2_vectors:
	/* current EL with SP_EL0 */
	.balign 0x80
	save_and_call 0
	.balign 0x80
	save_and_call 1
	.balign 0x80
	save_and_call 2
	.balign 0x80
	save_and_call 3
	/* current EL with SP_ELx */
	.balign 0x80
	save_and_call 4
	.balign 0x80
	save_and_call 5
	.balign 0x80
	save_and_call 6
	.balign 0x80
	save_and_call 7
	/* lower EL, AArch64: 8 = synchronous (traps), 9 = IRQ, 10 = FIQ, 11 = SError */
	.balign 0x80
	save_and_call 8
	.balign 0x80
	save_and_call 9
	.balign 0x80
	save_and_call 10
	.balign 0x80
	save_and_call 11
	/* lower EL, AArch32 */
	.balign 0x80
	save_and_call 12
	.balign 0x80
	save_and_call 13
	.balign 0x80
	save_and_call 14
	.balign 0x80
	save_and_call 15

restore_and_eret:
	ldp	x0, x1, [sp, #0]
	ldp	x2, x3, [sp, #16]
	ldp	x4, x5, [sp, #32]
	ldp	x6, x7, [sp, #48]
	ldp	x8, x9, [sp, #64]
	ldp	x10, x11, [sp, #80]
	ldp	x12, x13, [sp, #96]
	ldp	x14, x15, [sp, #112]
	ldp	x16, x17, [sp, #128]
	ldp	x18, x19, [sp, #144]
	ldp	x20, x21, [sp, #160]
	ldp	x22, x23, [sp, #176]
	ldp	x24, x25, [sp, #192]
	ldp	x26, x27, [sp, #208]
	ldp	x28, x29, [sp, #224]
	ldr	x30, [sp, #240]
	add	sp, sp, #FRAME_SIZE
	eret
