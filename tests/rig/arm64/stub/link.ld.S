/* Preprocessed with rig_config.h: the stub lives at the start of the RAM carved out for it. */
#include "rig_config.h"

ENTRY(_start)
SECTIONS
{
	. = RIG_STUB_BASE;
	.text : { *(.text.boot) *(.text*) }
	.rodata : { *(.rodata*) }
	.data : { *(.data*) }
	. = ALIGN(16);
	__bss_start = .;
	.bss : { *(.bss*) *(COMMON) }
	. = ALIGN(4096);
	__bss_end = .;
	. += RIG_STACK_SIZE * RIG_MAX_CPUS;
	__stacks_top = .;
	ASSERT(__stacks_top <= RIG_BRIDGE_GPA, "stub image overlaps the bridge page")
	/DISCARD/ : { *(.comment) *(.note*) *(.eh_frame*) }
}
