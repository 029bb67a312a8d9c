//! Entry points, prebuilt page tables and descriptor tables (assembly).
//!
//! Two ways in, both ending in the same CPL0 tail that drops to CPL3:
//!
//! * `probe_pvh_start32` (named by the PVH ELF note): 32-bit protected
//!   mode, paging off, flat segments, `ebx` = `struct hvm_start_info`.
//! * `probe_start64` (the ELF `e_entry`): 64-bit long mode on the VMM's
//!   identity page tables, `rsi` = Linux `boot_params` (zero page).
//!
//! Guest CPL0 is emulated instruction by instruction on the project's
//! nested KVM (~1 µs each), so the CPL0 path is straight-line code over
//! tables that are prebuilt in the image: no loops, no runtime table
//! construction. Everything else runs in CPL3 (RFLAGS.IOPL=3, IF=0).
//!
//! CPL0 also runs two small handlers, again straight-line asm:
//!
//! * #GP port I/O emulation: the nested KVM here does not honour IOPL=3
//!   for guest CPL3 (`in`/`out` raise #GP(0); `int n` from CPL3 is not
//!   delivered either, it raises #UD). So the #GP handler performs a
//!   faulting CPL3 `in`/`out` (dx forms: `ec ed ee ef`, `66 ed`, `66 ef`)
//!   itself and returns past it. Where IOPL=3 works (real KVM) the
//!   instructions run natively and this path is never taken;
//! * exception stubs: save the frame to `probe_fault_frame` and `iretq`
//!   into the CPL3 reporter (cpu.rs), which prints it and exits. Rust code
//!   never runs in CPL0: the CPL0 emulator here cannot execute SSE, which
//!   compiled Rust uses freely.
//!
//! The `.boot` section is linked at exactly `BOOT_BASE` (asserted in
//! link.ld), so the assembler can split absolute addresses of `.boot`
//! symbols (TSS base, exception stubs) into descriptor fields as
//! `sym - boot_start + BOOT_BASE`.

use crate::cpu;

core::arch::global_asm!(
    r#"
    .set BOOT_BASE, 0x200000

    .set SEL_KCODE, {kcode}
    .set SEL_KDATA, {kdata}
    .set SEL_UDATA, {udata}
    .set SEL_UCODE, {ucode}
    .set SEL_TSS, {tss}

    .set EXCEPTION_BASE, {exception_base}
    .set EXIT_PORT, {exit_port}

    .set BOOT_PVH, {boot_pvh}
    .set BOOT_LINUX64, {boot_linux64}

    .set CR0_PE, 1 << 0
    .set CR0_MP, 1 << 1
    .set CR0_EM, 1 << 2
    .set CR0_TS, 1 << 3
    .set CR0_NE, 1 << 5
    .set CR0_PG, 1 << 31
    .set CR4_TSD, 1 << 2
    .set CR4_PAE, 1 << 5
    .set CR4_OSFXSR, 1 << 9
    .set CR4_OSXMMEXCPT, 1 << 10
    .set MSR_EFER, 0xc0000080
    .set EFER_LME, 1 << 8

    // Page-table entry bits: present, writable, user, (PD) 2 MiB page.
    .set PTE_PWU, 0x7
    .set PDE_LARGE, 0x87

    // RFLAGS for CPL3: IOPL=3, IF=0, reserved bit 1.
    .set USER_RFLAGS, 0x3002

    // ------------------------------------------------------------------
    .section .boot, "awx", @progbits
    .balign 4096
boot_start:

    // Identity map of 0..4 GiB with 2 MiB pages; U bit at every level.
probe_pml4:
    .quad probe_pdpt + PTE_PWU
    .fill 511, 8, 0
probe_pdpt:
    .quad probe_pd + 0x0000 + PTE_PWU
    .quad probe_pd + 0x1000 + PTE_PWU
    .quad probe_pd + 0x2000 + PTE_PWU
    .quad probe_pd + 0x3000 + PTE_PWU
    .fill 508, 8, 0
probe_pd:
    .set pde, PDE_LARGE
    .rept 2048
    .quad pde
    .set pde, pde + 0x200000
    .endr

    // GDT: null, kernel code64, kernel data, user data, user code64, TSS.
    // (Accessed bits preset so the CPU never writes descriptors.)
    .balign 16
probe_gdt:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
    .quad 0x00cff3000000ffff
    .quad 0x00affb000000ffff
    .word probe_tss_end - probe_tss - 1
    .word (probe_tss - boot_start + BOOT_BASE) & 0xffff
    .byte ((probe_tss - boot_start + BOOT_BASE) >> 16) & 0xff
    .byte 0x89
    .byte 0
    .byte ((probe_tss - boot_start + BOOT_BASE) >> 24) & 0xff
    .long (probe_tss - boot_start + BOOT_BASE) >> 32
    .long 0
probe_gdt_end:

    // Pseudo-descriptor; 32-bit lgdt reads the low 4 bytes of the base.
    .balign 16
probe_gdt_desc:
    .word probe_gdt_end - probe_gdt - 1
    .quad probe_gdt

    // 64-bit TSS: rsp0 for CPL3->CPL0, IST1 for NMI/#DF/#MC, no I/O bitmap.
    .balign 16
probe_tss:
    .long 0
    .quad probe_kstack_top
    .quad 0, 0
    .quad 0
    .quad probe_ist1_top
    .quad 0, 0, 0, 0, 0, 0
    .quad 0
    .word 0
    .word probe_tss_end - probe_tss
probe_tss_end:

    // IDT: exceptions 0..31 (interrupt gates, DPL0; NMI, #DF, #MC on
    // IST1; #GP first tries port I/O emulation). Other vectors are #GP.
    .macro idt_gate handler, ist
    .word (\handler - boot_start + BOOT_BASE) & 0xffff
    .word SEL_KCODE
    .byte \ist
    .byte 0x8e
    .word ((\handler - boot_start + BOOT_BASE) >> 16) & 0xffff
    .long (\handler - boot_start + BOOT_BASE) >> 32
    .long 0
    .endm

    .balign 16
probe_idt:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .if (\v == 2) || (\v == 8) || (\v == 18)
    idt_gate probe_isr_\v, 1
    .elseif \v == 13
    idt_gate probe_gp_io, 0
    .else
    idt_gate probe_isr_\v, 0
    .endif
    .endr
probe_idt_end:

    .balign 16
probe_idt_desc:
    .word probe_idt_end - probe_idt - 1
    .quad probe_idt

    // ------------------------------------------------------------------
    // PVH entry: 32-bit protected mode, paging off, ebx = hvm_start_info.
    .code32
    .balign 16
    .globl probe_pvh_start32
probe_pvh_start32:
    cli
    mov %ebx, %esi
    mov $BOOT_PVH, %edi
    mov $probe_kstack_top, %esp
    lgdt probe_gdt_desc
    mov $probe_pml4, %eax
    mov %eax, %cr3
    mov $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    mov %eax, %cr4
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    and $~(CR0_EM | CR0_TS), %eax
    or $(CR0_PG | CR0_NE | CR0_MP | CR0_PE), %eax
    mov %eax, %cr0
    ljmp $SEL_KCODE, $probe_pvh_long

    .code64
probe_pvh_long:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    // Upper halves are undefined after compatibility mode.
    mov %esi, %esi
    mov %edi, %edi
    mov %esp, %esp
    jmp probe_common64

    // ------------------------------------------------------------------
    // Linux 64-bit entry: long mode, VMM paging, rsi = boot_params.
    .balign 16
    .globl probe_start64
probe_start64:
    cli
    mov $BOOT_LINUX64, %edi
    lea probe_kstack_top(%rip), %rsp
    lgdt probe_gdt_desc(%rip)
    lea probe_pml4(%rip), %rax
    mov %rax, %cr3
    mov %cr4, %rax
    // TSD clear: `rdtsc` must work in CPL3 (tsc.rs).
    and $~CR4_TSD, %rax
    or $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %rax
    mov %rax, %cr4
    mov %cr0, %rax
    and $~(CR0_EM | CR0_TS), %rax
    or $(CR0_NE | CR0_MP), %rax
    mov %rax, %cr0
    // Reload CS from our GDT.
    pushq $SEL_KCODE
    lea 2f(%rip), %rax
    pushq %rax
    lretq
2:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss

    // ------------------------------------------------------------------
    // Common CPL0 tail: IDT, TSS, then iretq to CPL3 with IOPL=3, IF=0.
    // rdi = boot protocol, rsi = boot info pointer (passed to CPL3).
probe_common64:
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    lidt probe_idt_desc(%rip)
    mov $SEL_TSS, %eax
    ltr %ax
    pushq $(SEL_UDATA | 3)
    lea probe_ustack_top(%rip), %rax
    pushq %rax
    pushq $USER_RFLAGS
    pushq $(SEL_UCODE | 3)
    lea probe_user_start(%rip), %rax
    pushq %rax
    iretq

    // ------------------------------------------------------------------
    // #GP: emulate a CPL3 `in`/`out` (dx forms) that faulted for lack of
    // I/O privilege, else report the #GP. Stack: error, rip, cs, ...
    .balign 16
probe_gp_io:
    cmpq $0, (%rsp)
    jne probe_isr_13
    testb $3, 16(%rsp)
    jz probe_isr_13
    push %rcx
    mov 16(%rsp), %rcx
    movzbl (%rcx), %ecx
    cmp $0xee, %ecx
    je 10f
    cmp $0xec, %ecx
    je 11f
    cmp $0xef, %ecx
    je 12f
    cmp $0xed, %ecx
    je 13f
    cmp $0x66, %ecx
    je 14f
15:
    pop %rcx
    jmp probe_isr_13
10:
    out %al, %dx
    jmp 20f
11:
    in %dx, %al
    jmp 20f
12:
    out %eax, %dx
    jmp 20f
13:
    in %dx, %eax
    jmp 20f
14:
    mov 16(%rsp), %rcx
    movzbl 1(%rcx), %ecx
    cmp $0xef, %ecx
    je 16f
    cmp $0xed, %ecx
    jne 15b
    in %dx, %ax
    jmp 21f
16:
    out %ax, %dx
21:
    incq 16(%rsp)
20:
    incq 16(%rsp)
    pop %rcx
    add $8, %rsp
    iretq

    // ------------------------------------------------------------------
    // Exception stubs (CPL0): push a dummy error code where the CPU
    // pushes none, then the vector.
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
probe_isr_\v:
    .if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 13) || (\v == 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    pushq $0
    .endif
    pushq $\v
    jmp probe_isr_common
    .endr

    // Stack: vector, error, rip, cs, rflags, rsp, ss. Move it (and CR2)
    // to probe_fault_frame and continue in the CPL3 reporter on its own
    // stack. An exception while reporting one exits from here directly.
probe_isr_common:
    cmpb $0, probe_fault_active(%rip)
    jne probe_isr_nested
    movb $1, probe_fault_active(%rip)
    popq probe_fault_frame + 0(%rip)
    popq probe_fault_frame + 8(%rip)
    popq probe_fault_frame + 16(%rip)
    popq probe_fault_frame + 24(%rip)
    popq probe_fault_frame + 32(%rip)
    popq probe_fault_frame + 40(%rip)
    popq probe_fault_frame + 48(%rip)
    mov %cr2, %rax
    mov %rax, probe_fault_frame + 56(%rip)
    pushq $(SEL_UDATA | 3)
    lea probe_fault_stack_top(%rip), %rax
    pushq %rax
    pushq $USER_RFLAGS
    pushq $(SEL_UCODE | 3)
    lea probe_fault_user(%rip), %rax
    pushq %rax
    iretq

probe_isr_nested:
    mov (%rsp), %eax
    and $0x1f, %eax
    add $EXCEPTION_BASE, %eax
    mov $EXIT_PORT, %edx
    out %al, %dx
2:
    hlt
    jmp 2b

    // ------------------------------------------------------------------
    // First CPL3 code: zero .bss (natively fast here), call Rust.
    .section .text.probe_user_start, "ax", @progbits
    .balign 16
probe_user_start:
    mov %rdi, %r12
    mov %rsi, %r13
    lea __probe_bss_start(%rip), %rdi
    lea __probe_bss_end(%rip), %rcx
    sub %rdi, %rcx
    xor %eax, %eax
    cld
    rep stosb
    mov %r12, %rdi
    mov %r13, %rsi
    xor %ebp, %ebp
    call {main}
    ud2

    // CPL3 exception reporter entry (from probe_isr_common).
    .balign 16
probe_fault_user:
    lea probe_fault_frame(%rip), %rdi
    xor %ebp, %ebp
    call {exception_report}
    ud2

    // Written by CPL0 on an exception, read by the CPL3 reporter.
    .section .bss.probe_fault, "aw", @nobits
    .balign 16
probe_fault_frame:
    .skip 64
probe_fault_active:
    .skip 1

    // ------------------------------------------------------------------
    // Stacks (not loaded, not zeroed).
    .section .stack, "aw", @nobits
    .balign 4096
    .skip {kstack_size}
probe_kstack_top:
    .skip {ist_size}
probe_ist1_top:
    .skip {ustack_size}
probe_ustack_top:
    .skip {fault_stack_size}
probe_fault_stack_top:

    // ------------------------------------------------------------------
    // PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), 32-bit entry address.
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long probe_pvh_start32
    .balign 4
"#,
    kcode = const cpu::SEL_KCODE,
    kdata = const cpu::SEL_KDATA,
    udata = const cpu::SEL_UDATA,
    ucode = const cpu::SEL_UCODE,
    tss = const cpu::SEL_TSS,
    boot_pvh = const crate::bootinfo::BOOT_PVH,
    boot_linux64 = const crate::bootinfo::BOOT_LINUX64,
    kstack_size = const cpu::KSTACK_SIZE,
    ist_size = const cpu::IST_STACK_SIZE,
    ustack_size = const cpu::USTACK_SIZE,
    fault_stack_size = const cpu::FAULT_STACK_SIZE,
    exception_base = const crate::status::EXCEPTION_BASE,
    exit_port = const crate::io::EXIT_PORT,
    exception_report = sym cpu::exception_report,
    main = sym crate::probe_main,
    options(att_syntax)
);
