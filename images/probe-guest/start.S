/*
 * Entry of the probe guest. sealvm enters at _start through PVH: 32-bit protected mode,
 * paging off, EBX = hvm_start_info. We switch to 64-bit long mode (identity-mapped first
 * 4 GiB, 2 MiB pages) because that is the mode a KVM guest is expected to run its
 * interrupts in, then call probe_main(start_info).
 */

.section .note.pvh, "a"
.align 4
.long 4              /* namesz: "Xen\0" */
.long 4              /* descsz */
.long 18             /* XEN_ELFNOTE_PHYS32_ENTRY */
.asciz "Xen"
.long _start

.text
.code32
.globl _start
_start:
    cli
    mov %ebx, %esi               /* keep the start info */
    /* PML4[0] -> PDPT; PDPT[0..3] -> PD0..PD3; each PD maps 1 GiB with 2 MiB pages. */
    mov $pml4, %edi
    lea pdpt + 0x3, %eax
    mov %eax, (%edi)
    mov $pdpt, %edi
    lea pd + 0x3, %eax
    mov $4, %ecx
1:  mov %eax, (%edi)
    add $0x1000, %eax
    add $8, %edi
    loop 1b
    mov $pd, %edi
    mov $0x83, %eax              /* present, writable, 2 MiB */
    xor %edx, %edx
    mov $2048, %ecx
2:  mov %eax, (%edi)
    mov %edx, 4(%edi)
    add $0x200000, %eax
    adc $0, %edx
    add $8, %edi
    loop 2b
    lgdt gdt_ptr
    mov %cr4, %eax
    or $0x20, %eax               /* PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx        /* EFER */
    rdmsr
    or $0x100, %eax              /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax         /* PG | PE */
    mov %eax, %cr0
    ljmp $0x08, $long_entry

.code64
long_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $stack_top, %rsp
    mov %esi, %edi               /* probe_main(start_info) */
    call probe_main
3:  cli
    hlt
    jmp 3b

/* One stub per vector: push the vector, save the caller-saved registers (and rbx, used
   to realign the stack), call isr(vector).
   Exceptions with an error code never return (the C handler halts). */
.macro stub n
isr_stub_\n:
    push $\n
    jmp isr_common
.endm

.irp n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
stub \n
.endr
.irp n,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63,64,65,66,67,68,69,70,71,239,255
stub \n
.endr

isr_common:
    push %rbx
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    mov 80(%rsp), %rdi           /* the vector */
    mov %rsp, %rbx
    and $-16, %rsp
    call isr
    mov %rbx, %rsp
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    pop %rbx
    add $8, %rsp                 /* drop the vector */
    iretq

.data
.align 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff     /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff     /* 0x10: data */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

.globl isr_stubs
isr_stubs:
.irp n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
.quad isr_stub_\n
.endr
.globl isr_dev_stubs
isr_dev_stubs:
.irp n,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63,64,65,66,67,68,69,70,71
.quad isr_stub_\n
.endr
.globl isr_timer_stub
isr_timer_stub: .quad isr_stub_239
.globl isr_spurious_stub
isr_spurious_stub: .quad isr_stub_255

.bss
.align 4096
pml4: .space 4096
pdpt: .space 4096
pd:   .space 4096 * 4
.align 16
.space 16384
stack_top:

.section .note.GNU-stack, "", @progbits
