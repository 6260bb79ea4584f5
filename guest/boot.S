/*
 * boot.S — everything the test guest does at CPL 0.
 *
 * On kvm_pvm every CPL 0 instruction is emulated (~1 M instructions/s), so this
 * file does as little as possible at run time: the GDT, TSS (with an all-zero
 * I/O permission bitmap), IDT and the identity page tables (0..4 GiB, 2 MiB
 * pages, all User+Writable) are built by the assembler and linker, not by loops.
 *
 *   PVH entry (32-bit, paging off, EBX = hvm_start_info)
 *     -> load GDT, CR3, PAE, EFER.LME, PG -> 64-bit
 *     -> IDT, TR, mask the 8259, CPUID probes, kvm-clock MSR
 *     -> iretq to CPL 3 (RFLAGS = 0x202) at user_start -> guest_main()
 *
 * The AP trampoline (copied to 0x8000 by CPL 3 code before INIT-SIPI-SIPI)
 * enters protected mode and joins the same 32-bit path with EDI = 1; APs count
 * themselves and park in cli;hlt at CPL 0.
 *
 * Interrupt/exception stubs: exceptions (and unexpected vectors) record what
 * happened and iretq to a CPL 3 reporter (user_fault_entry); the virtio IRQ
 * vectors 0x30..0x37 and the i8042 keyboard vector 0x38 bump a counter, EOI
 * the LAPIC and iretq (CPL 3 code notices the counter move and does the rest).
 */

#define SEL_KCODE   0x08
#define SEL_KDATA   0x10
#define SEL_UDATA   0x1b        /* 0x18 | RPL 3 */
#define SEL_UCODE   0x23        /* 0x20 | RPL 3 */
#define SEL_KCODE32 0x28
#define SEL_TSS     0x30

#define IRQ_VECTOR_BASE 0x30    /* virtio device i -> vector 0x30 + i (i < 8) */
#define KBD_VECTOR      0x38    /* i8042 keyboard, ISA IRQ 1 */
#define SPURIOUS_VECTOR 0x3f
#define NUM_VECTORS     64

#define LAPIC_EOI   0xfee000b0
#define KVM_MSR_SYSTEM_TIME_NEW 0x4b564d01

/* ---------------------------------------------------------------- PVH note */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4                 /* namesz: "Xen\0" */
        .long 8                 /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .balign 4
        .quad pvh_entry         /* 32-bit entry (upper half zero), like Linux */
        .balign 4

/* ------------------------------------------------------- 32-bit entry path */
        .section .text.boot, "ax"
        .code32
        .globl pvh_entry
pvh_entry:
        cli
        cld
        movl %ebx, boot_start_info      /* PVH: flat DS, so plain stores work */
        rdtsc                           /* for the probe job's entry_us */
        movl %eax, boot_entry_tsc
        movl %edx, boot_entry_tsc + 4
        xorl %edi, %edi                 /* EDI = 0: bootstrap processor */
        lgdtl gdt_ptr
        ljmpl $SEL_KCODE32, $common32

/* BSP and APs (EDI = 1) continue here in 32-bit protected mode, paging off. */
common32:
        movl $SEL_KDATA, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        movl $pml4, %eax
        movl %eax, %cr3
        movl %cr4, %eax
        orl  $0x20, %eax                /* PAE */
        movl %eax, %cr4
        movl $0xc0000080, %ecx          /* EFER */
        rdmsr
        orl  $0x100, %eax               /* LME */
        wrmsr
        movl %cr0, %eax
        orl  $0x80000001, %eax          /* PG | PE */
        movl %eax, %cr0
        ljmpl $SEL_KCODE, $long64

/* --------------------------------------------------------- 64-bit, CPL 0 */
        .code64
long64:
        xorl %eax, %eax
        movl %eax, %fs
        movl %eax, %gs
        lidt idt_ptr
        testl %edi, %edi
        jnz  ap_park

        movq $kstack_top, %rsp
        movw $SEL_TSS, %ax
        ltr  %ax
        movb $0xff, %al                 /* mask both 8259s before IF=1 */
        outb %al, $0x21
        outb %al, $0xa1

        movl $1, %eax                   /* CPUID probes: CPUID may trap at CPL 3 */
        cpuid
        movl %ecx, boot_cpuid1_ecx
        movl $0x40000000, %eax
        cpuid
        cmpl $0x4b4d564b, %ebx          /* "KVMK" */
        jne  1f
        cmpl $0x564b4d56, %ecx          /* "VMKV" */
        jne  1f
        cmpl $0x0000004d, %edx          /* "M\0\0\0" */
        jne  1f
        cmpl $0x40000001, %eax
        jb   1f
        movl $0x40000001, %eax
        cpuid
        movl %eax, boot_kvm_features
        testl $8, %eax                  /* KVM_FEATURE_CLOCKSOURCE2 */
        jz   1f
        movl $KVM_MSR_SYSTEM_TIME_NEW, %ecx
        movl $pvclock, %eax
        orl  $1, %eax                   /* enable */
        xorl %edx, %edx
        wrmsr
        movl $1, boot_kvmclock_ok
1:
        pushq $SEL_UDATA                /* drop to CPL 3, IF set */
        pushq $ustack_top
        pushq $0x202
        pushq $SEL_UCODE
        pushq $user_start
        iretq

/* APs: count ourselves and park; a halted vCPU costs no host CPU. */
ap_park:
        lock incl boot_ap_count
2:      cli
        hlt
        jmp 2b

/* ------------------------------------------------------ CPL 3 entry points */
        .globl user_start
user_start:
        call guest_main
3:      pause
        jmp 3b

user_fault_entry:
        call fault_report               /* C, CPL 3, fresh stack; noreturn */
4:      pause
        jmp 4b

/* -------------------------------------------------- interrupt/exception stubs
 * One 32-byte stub per vector, at isr_table + 32 * vector, so the IDT below can
 * be built by the assembler from two link-time constants (isr_lo16/isr_hi16).
 */
        .balign 4096
        .globl isr_table, isr_table_end, tss
isr_table:
.macro exc_stub vec
        .balign 32
        .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
        .else
        pushq $0                        /* no error code: push a dummy */
        .endif
        pushq $\vec
        jmp exc_common
.endm
.macro irq_stub idx
        .balign 32
        pushq %rax
        lock incl boot_irq_count + 4 * \idx(%rip)
        movl $LAPIC_EOI, %eax
        movl $0, (%rax)
        popq %rax
        iretq
.endm
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        exc_stub \v
        .endr
        .irp v, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
        exc_stub \v                     /* unexpected interrupt: reported */
        .endr
        .irp n, 0,1,2,3,4,5,6,7
        irq_stub \n                    /* 0x30..0x37: virtio devices */
        .endr
        .balign 32                      /* 0x38: i8042 keyboard (ISA IRQ 1) */
        pushq %rax
        lock incl boot_kbd_count(%rip)
        movl $LAPIC_EOI, %eax
        movl $0, (%rax)
        popq %rax
        iretq
        .irp v, 57,58,59,60,61,62
        exc_stub \v
        .endr
        .balign 32                      /* 0x3f: LAPIC spurious, no EOI */
        iretq
        .balign 32
isr_table_end:

/* Record the fault, then iretq into the CPL 3 reporter (user_fault_entry)
 * on its own stack. A fault while reporting powers off with "fail". */
exc_common:
        incl boot_fault_depth
        cmpl $1, boot_fault_depth
        jne  9f
        movq 0(%rsp), %rax
        movq %rax, boot_fault + 0       /* vector */
        movq 8(%rsp), %rax
        movq %rax, boot_fault + 8       /* error code */
        movq 16(%rsp), %rax
        movq %rax, boot_fault + 16      /* rip */
        movq 24(%rsp), %rax
        movq %rax, boot_fault + 24      /* cs */
        movq 40(%rsp), %rax
        movq %rax, boot_fault + 32      /* rsp */
        movq %cr2, %rax
        movq %rax, boot_fault + 40      /* cr2 */
        pushq $SEL_UDATA
        pushq $fstack_top
        pushq $0x202
        pushq $SEL_UCODE
        pushq $user_fault_entry
        iretq
9:      movb $0x11, %al
        outb %al, $0xf4
8:      cli
        hlt
        jmp 8b

/* ------------------------------------------------------- AP trampoline
 * Real-mode code, position independent within its page: CPL 3 code copies
 * [ap_tramp_start, ap_tramp_end) to 0x8000 and sends SIPI vector 0x08.
 */
        .globl ap_tramp_start, ap_tramp_end
        .code16
ap_tramp_start:
        cli
        movw %cs, %ax
        movw %ax, %ds
        lgdtl (ap_gdt_ptr - ap_tramp_start)
        movl %cr0, %eax
        orl  $1, %eax
        movl %eax, %cr0
        movl $1, %edi                   /* EDI = 1: application processor */
        ljmpl $SEL_KCODE32, $common32
        .balign 4
ap_gdt_ptr:
        .word gdt_end - gdt - 1
        .long gdt
ap_tramp_end:
        .code64

/* ----------------------------------------------------------------- data */
        .section .data, "aw"

        .balign 16
gdt:
        .quad 0
        .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
        .quad 0x00cf92000000ffff        /* 0x10 kernel data */
        .quad 0x00cff2000000ffff        /* 0x18 user data (DPL 3) */
        .quad 0x00affa000000ffff        /* 0x20 user code, 64-bit (DPL 3) */
        .quad 0x00cf9a000000ffff        /* 0x28 kernel code, 32-bit (boot, APs) */
        .word tss_end - tss - 1         /* 0x30 64-bit TSS descriptor */
        .word tss_lo16
        .byte tss_b16
        .byte 0x89                      /* present, type 9 (available TSS) */
        .byte 0
        .byte tss_b24
        .long 0
        .long 0
gdt_end:

        .balign 8
        .word 0
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt

        .balign 8
        .word 0
idt_ptr:
        .word idt_end - idt - 1
        .quad idt

        .balign 16
idt:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63
        .word isr_lo16 + 32 * \v        /* offset 15:0 (table is 4 KiB aligned) */
        .word SEL_KCODE
        .byte 0                         /* IST */
        .byte 0x8e                      /* present, DPL 0, interrupt gate */
        .word isr_hi16                  /* offset 31:16 */
        .long 0                         /* offset 63:32 */
        .long 0
        .endr
idt_end:

/* TSS: RSP0 for interrupts from CPL 3, and an all-zero I/O permission bitmap
 * (IOPL 3 is ignored on kvm_pvm; this is what makes CPL 3 in/out work). */
        .balign 16
tss:
        .long 0
        .quad kstack_top                /* rsp0 */
        .quad 0, 0                      /* rsp1, rsp2 */
        .quad 0
        .quad 0, 0, 0, 0, 0, 0, 0       /* ist1..7 */
        .quad 0
        .word 0
        .word 104                       /* I/O bitmap offset */
        .fill 8192, 1, 0                /* ports 0..0xffff allowed */
        .byte 0xff                      /* terminator */
tss_end:

/* Values written at CPL 0 and read by C at CPL 3 (so they live in .data,
 * outside the BSS that C zeroes). */
        .balign 8
        .globl boot_start_info, boot_cpuid1_ecx, boot_kvm_features, boot_kvmclock_ok
        .globl boot_ap_count, boot_irq_count, boot_kbd_count, boot_fault, boot_fault_depth, pvclock, boot_entry_tsc
boot_start_info:    .long 0
boot_cpuid1_ecx:    .long 0
boot_kvm_features:  .long 0
boot_kvmclock_ok:   .long 0
boot_ap_count:      .long 0
boot_fault_depth:   .long 0
boot_irq_count:     .fill 8, 4, 0
boot_kbd_count:     .long 0             /* vector 0x38 interrupts */
boot_fault:         .fill 6, 8, 0       /* vector, error, rip, cs, rsp, cr2 */
boot_entry_tsc:     .quad 0

        .balign 64
pvclock:            .fill 64, 1, 0      /* struct pvclock_vcpu_time_info (BSP) */

/* Identity map of 0..4 GiB with 2 MiB pages: present, writable, user
 * (0x87); the top GiB (MMIO: virtio windows, IOAPIC, LAPIC) also PCD. */
        .balign 4096
pml4:
        .quad pdpt + 0x07
        .fill 511, 8, 0
pdpt:
        .quad pd + 0x0000 + 0x07
        .quad pd + 0x1000 + 0x07
        .quad pd + 0x2000 + 0x07
        .quad pd + 0x3000 + 0x07
        .fill 508, 8, 0
pd:
        .set i, 0
        .rept 2048
        .quad (i << 21) | 0x87 | (((i >> 10) & (i >> 9) & 1) << 4)
        .set i, i + 1
        .endr

/* Stacks: not zeroed, not loaded (see guest.ld). */
        .section .noinit, "aw", @nobits
        .balign 16
        .space 16384
kstack_top:
        .space 16384
fstack_top:
        .space 65536
ustack_top:
