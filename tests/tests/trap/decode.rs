//! What a faulting x86_64 instruction does to the window, from iced-x86's decoder.
//!
//! Two ways to replay it. The MOV family (what `read_volatile` and `write_volatile` compile
//! to) is *emulated*, as hvisor emulates a trapped load or store: the reply goes into the
//! destination register and the instruction is skipped. Any other instruction with one
//! memory operand of 1, 2, 4 or 8 bytes is *stepped*: an optimising compiler folds volatile
//! loads into them (`cmp dword [rax+0x44], 0`), and executing them natively is the only
//! exact way to get their flags and results. Everything else is refused.

use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory,
    InstructionInfoOptions, OpAccess, OpKind, Register,
};
use virtio_drivers::PAGE_SIZE;

/// Longest x86 instruction.
const MAX_INSN_LEN: usize = 15;

/// Decodes the instruction at `rip`. The CPU fetched all of it, so its bytes are mapped; the
/// 15-byte read runs into the next page only when the instruction itself does.
pub(super) fn decode_at(rip: u64) -> Instruction {
    let to_page_end = PAGE_SIZE - (rip as usize % PAGE_SIZE);
    let decode = |len: usize| {
        // SAFETY: `rip..rip+len` is mapped code (see above); nothing writes code.
        let bytes = unsafe { std::slice::from_raw_parts(rip as *const u8, len) };
        let mut decoder = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
        let insn = decoder.decode();
        (insn, decoder.last_error())
    };
    match decode(to_page_end.min(MAX_INSN_LEN)) {
        (_, DecoderError::NoMoreBytes) if to_page_end < MAX_INSN_LEN => decode(MAX_INSN_LEN).0,
        (insn, _) => insn,
    }
}

/// The bytes of the instruction at `rip`, for messages (up to 15 of an invalid one).
pub(super) fn insn_bytes(rip: u64, len: usize) -> &'static [u8] {
    let to_page_end = PAGE_SIZE - (rip as usize % PAGE_SIZE);
    let len = if len == 0 {
        MAX_INSN_LEN.min(to_page_end)
    } else {
        len
    };
    // SAFETY: as in `decode_at`: the CPU fetched these bytes, or they lie on its page.
    unsafe { std::slice::from_raw_parts(rip as *const u8, len) }
}

/// A load or store the handler emulates.
#[derive(Debug, Clone, Copy)]
pub(super) struct Emulated {
    /// Bytes: 1, 2, 4 or 8.
    pub width: u8,
    pub kind: EmulatedKind,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum EmulatedKind {
    Load { dest: Gpr, extend: Extend },
    Store { source: StoreSource },
}

#[derive(Debug, Clone, Copy)]
pub(super) enum StoreSource {
    Register(Gpr),
    Immediate(u64),
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Extend {
    Zero,
    Sign,
}

impl Extend {
    /// The loaded `width`-byte value extended to 64 bits.
    pub fn apply(self, value: u64, width: u8) -> u64 {
        let bits = u32::from(width) * 8;
        let value = value & mask(width);
        match self {
            Extend::Sign if bits < 64 => (((value << (64 - bits)) as i64) >> (64 - bits)) as u64,
            _ => value,
        }
    }
}

/// The low `width` bytes.
pub(super) fn mask(width: u8) -> u64 {
    if width >= 8 {
        u64::MAX
    } else {
        (1u64 << (u32::from(width) * 8)) - 1
    }
}

/// A general-purpose register operand: where it lives in the saved context.
#[derive(Debug, Clone, Copy)]
pub(super) struct Gpr {
    /// Index into `uc_mcontext.gregs`.
    pub slot: usize,
    /// Operand size in bytes.
    pub size: u8,
    /// AH, CH, DH or BH: bits 8..16 of the full register.
    pub high_byte: bool,
}

/// `gregs` slots of RAX, RCX, ... R15, in the x86 register-number order of iced's `Register`.
const GREG_SLOTS: [libc::c_int; 16] = [
    libc::REG_RAX,
    libc::REG_RCX,
    libc::REG_RDX,
    libc::REG_RBX,
    libc::REG_RSP,
    libc::REG_RBP,
    libc::REG_RSI,
    libc::REG_RDI,
    libc::REG_R8,
    libc::REG_R9,
    libc::REG_R10,
    libc::REG_R11,
    libc::REG_R12,
    libc::REG_R13,
    libc::REG_R14,
    libc::REG_R15,
];

impl Gpr {
    pub fn of(register: Register) -> Option<Gpr> {
        let n = register as usize;
        let within = |first: Register, last: Register| {
            (first as usize..=last as usize)
                .contains(&n)
                .then(|| n - first as usize)
        };
        let (number, size, high_byte) = if let Some(i) = within(Register::AL, Register::BL) {
            (i, 1, false)
        } else if let Some(i) = within(Register::AH, Register::BH) {
            (i, 1, true)
        } else if let Some(i) = within(Register::SPL, Register::R15L) {
            (i + 4, 1, false)
        } else if let Some(i) = within(Register::AX, Register::R15W) {
            (i, 2, false)
        } else if let Some(i) = within(Register::EAX, Register::R15D) {
            (i, 4, false)
        } else if let Some(i) = within(Register::RAX, Register::R15) {
            (i, 8, false)
        } else {
            return None;
        };
        Some(Gpr {
            slot: GREG_SLOTS[number] as usize,
            size,
            high_byte,
        })
    }

    /// This operand's value in the full register `full`.
    pub fn read(self, full: u64) -> u64 {
        if self.high_byte {
            (full >> 8) & 0xff
        } else {
            full & mask(self.size)
        }
    }

    /// The full register after writing `value` to this operand: a 32-bit write clears the
    /// upper half, an 8- or 16-bit write keeps the other bits.
    pub fn merge(self, full: u64, value: u64) -> u64 {
        match (self.size, self.high_byte) {
            (_, true) => (full & !0xff00) | ((value & 0xff) << 8),
            (8, _) => value,
            (4, _) => value & 0xffff_ffff,
            (size, _) => (full & !mask(size)) | (value & mask(size)),
        }
    }
}

impl Emulated {
    /// The access `insn` makes, if it is a MOV between memory and a register or an
    /// immediate, or a MOVZX/MOVSX/MOVSXD load.
    pub fn of(insn: &Instruction) -> Option<Emulated> {
        use Code::*;
        let (width, load) = match insn.code() {
            Mov_rm8_r8 | Mov_rm8_imm8 => (1, None),
            Mov_rm16_r16 | Mov_rm16_imm16 => (2, None),
            Mov_rm32_r32 | Mov_rm32_imm32 => (4, None),
            Mov_rm64_r64 | Mov_rm64_imm32 => (8, None),
            Mov_r8_rm8 | Movzx_r16_rm8 | Movzx_r32_rm8 | Movzx_r64_rm8 => (1, Some(Extend::Zero)),
            Mov_r16_rm16 | Movzx_r16_rm16 | Movzx_r32_rm16 | Movzx_r64_rm16 => {
                (2, Some(Extend::Zero))
            }
            Mov_r32_rm32 => (4, Some(Extend::Zero)),
            Mov_r64_rm64 => (8, Some(Extend::Zero)),
            Movsx_r16_rm8 | Movsx_r32_rm8 | Movsx_r64_rm8 => (1, Some(Extend::Sign)),
            Movsx_r16_rm16 | Movsx_r32_rm16 | Movsx_r64_rm16 => (2, Some(Extend::Sign)),
            Movsxd_r64_rm32 => (4, Some(Extend::Sign)),
            _ => return None,
        };
        let kind = match load {
            Some(extend) => {
                if insn.op1_kind() != OpKind::Memory || insn.op0_kind() != OpKind::Register {
                    return None;
                }
                EmulatedKind::Load {
                    dest: Gpr::of(insn.op_register(0))?,
                    extend,
                }
            }
            None => {
                if insn.op0_kind() != OpKind::Memory {
                    return None;
                }
                let source = match insn.op1_kind() {
                    OpKind::Register => StoreSource::Register(Gpr::of(insn.op_register(1))?),
                    OpKind::Immediate8
                    | OpKind::Immediate16
                    | OpKind::Immediate32
                    | OpKind::Immediate32to64 => StoreSource::Immediate(insn.immediate(1)),
                    _ => return None,
                };
                EmulatedKind::Store { source }
            }
        };
        Some(Emulated { width, kind })
    }
}

/// An access the handler single-steps: the instruction runs natively on the window page,
/// made accessible for that one instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stepped {
    /// Bytes: 1, 2, 4 or 8.
    pub width: u8,
    /// The instruction reads the operand (the device is read before the step).
    pub reads: bool,
    /// The instruction writes the operand (the device is written after the step).
    pub writes: bool,
}

impl Stepped {
    /// The access `insn` makes, if it has exactly one explicit memory operand of 1, 2, 4 or 8
    /// bytes that it reads, writes or both unconditionally, and it falls through to the next
    /// instruction. `info` must not allocate here: asking for operand accesses only, it
    /// fills no vector.
    pub fn of(insn: &Instruction, info: &mut InstructionInfoFactory) -> Option<Stepped> {
        let mut memory_operands =
            (0..insn.op_count()).filter(|&op| insn.op_kind(op) == OpKind::Memory);
        let operand = memory_operands.next()?;
        if memory_operands.next().is_some() || insn.flow_control() != FlowControl::Next {
            return None;
        }
        let width = match insn.memory_size().size() {
            size @ (1 | 2 | 4 | 8) => size as u8,
            _ => return None,
        };
        let options =
            InstructionInfoOptions::NO_MEMORY_USAGE | InstructionInfoOptions::NO_REGISTER_USAGE;
        let (reads, writes) = match info.info_options(insn, options).op_access(operand) {
            OpAccess::Read => (true, false),
            OpAccess::Write => (false, true),
            OpAccess::ReadWrite => (true, true),
            _ => return None,
        };
        Some(Stepped {
            width,
            reads,
            writes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE).decode()
    }

    fn emulated(bytes: &[u8]) -> Option<Emulated> {
        Emulated::of(&insn(bytes))
    }

    fn stepped(bytes: &[u8]) -> Option<Stepped> {
        Stepped::of(&insn(bytes), &mut InstructionInfoFactory::new())
    }

    #[test]
    fn moves_are_emulated_with_their_width_register_and_extension() {
        // mov eax, [rdi+0x70]
        let a = emulated(&[0x8b, 0x47, 0x70]).unwrap();
        assert!(
            matches!(a.kind, EmulatedKind::Load { dest, extend: Extend::Zero }
            if dest.slot == libc::REG_RAX as usize && dest.size == 4)
        );
        assert_eq!(a.width, 4);
        // movzx r9d, word [rsi]
        let a = emulated(&[0x44, 0x0f, 0xb7, 0x0e]).unwrap();
        assert!(
            matches!(a.kind, EmulatedKind::Load { dest, .. } if dest.slot == libc::REG_R9 as usize)
        );
        assert_eq!(a.width, 2);
        // movsx rcx, byte [rdx]
        let a = emulated(&[0x48, 0x0f, 0xbe, 0x0a]).unwrap();
        assert!(
            matches!(a.kind, EmulatedKind::Load { dest, extend: Extend::Sign }
            if dest.slot == libc::REG_RCX as usize && dest.size == 8)
        );
        // mov ah, [rcx]
        let a = emulated(&[0x8a, 0x21]).unwrap();
        assert!(matches!(a.kind, EmulatedKind::Load { dest, .. } if dest.high_byte));
        // mov dword [rax+0x50], 1
        let a = emulated(&[0xc7, 0x40, 0x50, 1, 0, 0, 0]).unwrap();
        assert!(matches!(
            a.kind,
            EmulatedKind::Store {
                source: StoreSource::Immediate(1)
            }
        ));
        // mov qword [rax], -1 (imm32 sign-extended)
        let a = emulated(&[0x48, 0xc7, 0x00, 0xff, 0xff, 0xff, 0xff]).unwrap();
        assert!(matches!(
            a.kind,
            EmulatedKind::Store {
                source: StoreSource::Immediate(u64::MAX)
            }
        ));
        assert_eq!(a.width, 8);
        // mov [rdx], r12b
        let a = emulated(&[0x44, 0x88, 0x22]).unwrap();
        assert!(
            matches!(a.kind, EmulatedKind::Store { source: StoreSource::Register(r) }
            if r.slot == libc::REG_R12 as usize && r.size == 1)
        );
        // mov eax, ecx: no memory operand
        assert!(emulated(&[0x89, 0xc8]).is_none());
    }

    #[test]
    fn other_memory_instructions_are_stepped_with_their_access() {
        let plan = |width, reads, writes| {
            Some(Stepped {
                width,
                reads,
                writes,
            })
        };
        // cmp dword [rax+rcx*4+0x40], 0: a folded volatile load, as rustc emits it
        assert_eq!(
            stepped(&[0x83, 0x7c, 0x88, 0x40, 0x00]),
            plan(4, true, false)
        );
        // test byte [rdi+0x60], 1
        assert_eq!(stepped(&[0xf6, 0x47, 0x60, 0x01]), plan(1, true, false));
        // add eax, [rcx]
        assert_eq!(stepped(&[0x03, 0x01]), plan(4, true, false));
        // or dword [rdi], 1: read, then write
        assert_eq!(stepped(&[0x83, 0x0f, 0x01]), plan(4, true, true));
        // setz byte [rdi]
        assert_eq!(stepped(&[0x0f, 0x94, 0x07]), plan(1, false, true));
        // cmovz eax, [rdi]: the load happens whatever the condition
        assert_eq!(stepped(&[0x0f, 0x44, 0x07]), plan(4, true, false));
    }

    #[test]
    fn anything_else_is_refused() {
        for bytes in [
            &[0x0f, 0x10, 0x07][..],   // movups xmm0, [rdi]: 16 bytes
            &[0xff, 0x20],             // jmp qword [rax]: leaves the fall-through path
            &[0x48, 0x8d, 0x07],       // lea rax, [rdi]: no access
            &[0xf3, 0xa4],             // rep movsb: no explicit memory operand
            &[0xff, 0xff, 0xff, 0xff], // invalid
        ] {
            assert!(emulated(bytes).is_none(), "{bytes:02x?}");
            assert!(stepped(bytes).is_none(), "{bytes:02x?}");
        }
    }

    #[test]
    fn registers_merge_as_the_cpu_writes_them() {
        let eax = Gpr::of(Register::EAX).unwrap();
        assert_eq!(
            eax.merge(u64::MAX, 0x1234),
            0x1234,
            "32-bit writes zero-extend"
        );
        let ax = Gpr::of(Register::AX).unwrap();
        assert_eq!(ax.merge(u64::MAX, 0x1234), 0xffff_ffff_ffff_1234);
        let ah = Gpr::of(Register::AH).unwrap();
        assert_eq!(ah.merge(0, 0xab), 0xab00);
        assert_eq!(ah.read(0xab00), 0xab);
        let r15b = Gpr::of(Register::R15L).unwrap();
        assert_eq!(r15b.slot, libc::REG_R15 as usize);
        assert_eq!(Extend::Sign.apply(0x80, 1), u64::MAX - 0x7f);
        assert_eq!(Extend::Zero.apply(0xffff_8000, 2), 0x8000);
        assert!(Gpr::of(Register::XMM0).is_none());
    }
}
