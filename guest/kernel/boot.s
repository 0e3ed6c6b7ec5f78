# Ring-0 part of our test guest.  Everything here runs in guest kernel mode,
# which the development host's KVM (PVM kind) *emulates* instruction by
# instruction, so this file is written in assembly and uses only instructions
# that emulator handles (no int n, no xsave family, no SSE arithmetic).  The
# workload itself runs in ring 3 (see main.rs).
#
# Boot: PVH entry (32-bit protected mode, paging off, ebx = hvm_start_info),
# so our VMM and QEMU (`-kernel`) boot the same file.  APs are started by the
# BSP with INIT/SIPI through the real-mode trampoline at 0x8000.
#
# Physical layout: trampoline at 0x8000, image at 1 MiB, identity map of the
# first 16 GiB with 2 MiB pages (user-accessible, so ring 3 reaches the LAPIC,
# the pvclock pages and the PVH start info directly).

.set MAX_CPUS, 16
.set KSTACK, 4096
.set USTACK, 65536
.set LAPIC, 0xFEE00000
.set SEL_KCODE, 0x08
.set SEL_KDATA, 0x10
.set SEL_KCODE32, 0x18
.set SEL_UDATA, 0x23
.set SEL_UCODE, 0x2B
.set SEL_TSS0, 0x30
# The virtio-net device's interrupt (main.rs `NET_VECTOR`; cpu 0 routes the
# device's IOAPIC pin to it from ring 3).
.set NET_VECTOR, 0x21

# ---------------------------------------------------------------- PVH note
.section .note.Xen, "a", @note
.p2align 2
.long 4
.long 4
.long 18                     # XEN_ELFNOTE_PHYS32_ENTRY
.asciz "Xen"
.long pvh_start32

# ---------------------------------------------------- AP real-mode trampoline
.section .trampoline, "ax"
.code16
.global ap_tramp16
ap_tramp16:
    cli
    xor ax, ax
    mov ds, ax
    lgdt [tramp_gdt_ptr]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    # ljmpl SEL_KCODE32:ap_start32
    .byte 0x66, 0xEA
    .long ap_start32
    .word SEL_KCODE32
.p2align 3
tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

# ------------------------------------------------------------- 32-bit entry
.section .text.boot32, "ax"
.code32
.global pvh_start32
pvh_start32:
    cli
    cld
    mov dword ptr [start_info_ptr], ebx
    jmp common32

ap_start32:
    cli
    cld
    mov ax, SEL_KDATA               # real-mode segment caches still have 64 KiB limits
    mov ds, ax
    mov es, ax
    mov ss, ax
common32:
    lgdt [gdt_ptr]
    mov ax, SEL_KDATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    mov eax, cr4
    or eax, 0x620                # PAE | OSFXSR | OSXMMEXCPT
    mov cr4, eax
    mov eax, offset pml4
    mov cr3, eax
    mov ecx, 0xC0000080          # EFER
    rdmsr
    or eax, 0x100                # LME
    wrmsr
    mov eax, cr0
    and eax, 0xFFFFFFFB          # clear EM
    or eax, 0x80000003           # PG | MP | PE
    mov cr0, eax
    # a stack of this cpu's own (PVH gives none): kstacks + (apic id + 1) * 4 KiB
    mov esp, dword ptr [0xFEE00020]
    shr esp, 24
    and esp, MAX_CPUS - 1
    inc esp
    shl esp, 12
    add esp, offset kstacks
    push SEL_KCODE
    .byte 0x68                   # push imm32
    .long start64
    retf

# ------------------------------------------------------------- 64-bit code
.text
.code64
start64:
    mov ax, SEL_KDATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rax, LAPIC
    mov edi, dword ptr [rax + 0x20]
    shr edi, 24                  # edi = APIC id = our cpu index
    cmp edi, MAX_CPUS
    jae halt_forever
    mov rsp, rdi
    inc rsp
    shl rsp, 12
    add rsp, offset kstacks      # top of this cpu's kernel stack
    test edi, edi
    jnz ap64
    # How fast does this host run guest kernel-mode code?  20000 instructions,
    # timed with the TSC (natively ~10 us; emulated, as on PVM, ~10 ms).
    rdtsc
    mov esi, eax
    mov r8d, edx
    mov ecx, 10000
1:  dec ecx
    jnz 1b
    rdtsc
    shl rdx, 32
    or rax, rdx
    shl r8, 32
    or rsi, r8
    sub rax, rsi
    mov qword ptr [kmode_loop_tsc], rax
    call build_tables
    # Mask the legacy PICs: firmware (SeaBIOS under QEMU) leaves IRQ0 unmasked at vector 8.
    mov al, 0xff
    out 0xa1, al
    out 0x21, al
    call cpu_init
    # start every AP: INIT, then SIPI to 0x8000, to all but self
    mov rax, LAPIC
    mov dword ptr [rax + 0x310], 0
    mov dword ptr [rax + 0x300], 0xC4500
    call short_delay             # INIT must land before the SIPI
    mov dword ptr [rax + 0x300], 0xC4608
    call short_delay
    mov dword ptr [rax + 0x300], 0xC4608   # second SIPI, as the MP spec asks
    xor edi, edi
    jmp enter_user

ap64:
    call cpu_init
    lock inc qword ptr [aps_online]
    jmp enter_user

# edi = cpu.  Fills IDT and the TSS descriptors (BSP only).
build_tables:
    push rdi
    xor ecx, ecx
1:  cmp ecx, 32
    jae 2f
    lea rax, [exc_stubs + rcx*8]
    jmp 3f
2:  mov rax, offset irq_generic
3:  cmp ecx, 13
    jne 4f
    mov rax, offset gp_isr
4:  cmp ecx, 0x20
    jne 5f
    mov rax, offset timer_isr
5:  cmp ecx, NET_VECTOR
    jne 11f
    mov rax, offset net_isr
11: cmp ecx, 0xFF
    jne 6f
    mov rax, offset spurious_isr
6:  mov rdx, rcx
    shl rdx, 4
    add rdx, offset idt
    mov word ptr [rdx], ax
    mov word ptr [rdx + 2], SEL_KCODE
    mov word ptr [rdx + 4], 0x8E00
    shr rax, 16
    mov word ptr [rdx + 6], ax
    shr rax, 16
    mov dword ptr [rdx + 8], eax
    mov dword ptr [rdx + 12], 0
    inc ecx
    cmp ecx, 256
    jb 1b
    # TSS i: rsp0 = top of kernel stack i, iomap base beyond the limit
    xor ecx, ecx
7:  mov rdx, rcx
    imul rdx, rdx, 128
    add rdx, offset tss
    mov rax, rcx
    inc rax
    shl rax, 12
    add rax, offset kstacks
    mov qword ptr [rdx + 4], rax
    mov word ptr [rdx + 102], 104
    # descriptor at gdt + 0x30 + 16*i
    mov rsi, rcx
    shl rsi, 4
    add rsi, offset gdt + SEL_TSS0
    mov rax, rdx
    shl rax, 16
    or rax, 103                  # limit
    mov dword ptr [rsi], eax     # limit[15:0] | base[15:0] << 16
    mov rax, rdx
    shr rax, 16
    mov byte ptr [rsi + 4], al   # base[23:16]
    mov byte ptr [rsi + 5], 0x89 # present, 64-bit available TSS
    mov byte ptr [rsi + 6], 0
    shr rax, 8
    mov byte ptr [rsi + 7], al   # base[31:24]
    mov rax, rdx
    shr rax, 32
    mov dword ptr [rsi + 8], eax
    mov dword ptr [rsi + 12], 0
    inc ecx
    cmp ecx, MAX_CPUS
    jb 7b
    pop rdi
    ret

# Per-cpu ring-0 setup.  edi = cpu.
cpu_init:
    lidt [idt_ptr]
    mov eax, edi
    shl eax, 4
    add eax, SEL_TSS0
    ltr ax
    # LAPIC: software enable (spurious vector 0xFF), periodic timer on 0x20
    mov rax, LAPIC
    mov dword ptr [rax + 0xF0], 0x1FF
    mov dword ptr [rax + 0x350], 0x10000   # LINT0 masked (no ExtINT from the PIC)
    mov dword ptr [rax + 0x3E0], 0x3
    mov dword ptr [rax + 0x320], 0x20020
    mov edx, dword ptr [timer_initial_count]
    mov dword ptr [rax + 0x380], edx
    # kvmclock, when the hypervisor offers it
    push rdi
    mov eax, 0x40000000
    cpuid
    cmp ebx, 0x4B4D564B          # "KVMK"
    jne 9f
    mov eax, 0x40000001
    cpuid
    pop rdi
    push rdi
    mov ecx, 0x4B564D01          # MSR_KVM_SYSTEM_TIME_NEW
    test eax, 8
    jnz 8f
    mov ecx, 0x12                # MSR_KVM_SYSTEM_TIME
    test eax, 1
    jz 9f
8:  mov rax, rdi
    shl rax, 6
    add rax, offset pvclock
    or rax, 1
    xor edx, edx
    wrmsr
    mov byte ptr [kvmclock_ok], 1
9:  # AVX: OSXSAVE and XCR0 = x87|SSE|AVX, when the CPU has XSAVE and AVX
    mov eax, 1
    cpuid
    mov eax, ecx
    and eax, 0x14000000
    cmp eax, 0x14000000
    jne 10f
    mov rax, cr4
    or rax, 0x40000
    mov cr4, rax
    xor ecx, ecx
    mov eax, 7
    xor edx, edx
    xsetbv
    mov byte ptr [avx_ok], 1
10: pop rdi
    ret

# edi = cpu: drop to ring 3 (IOPL 3, interrupts on) at user_main(cpu).
enter_user:
    mov rax, rdi
    inc rax
    shl rax, 16
    add rax, offset ustacks
    sub rax, 8
    push SEL_UDATA
    push rax
    push 0x3202                  # IF | IOPL=3 | reserved bit 1
    push SEL_UCODE
    mov rax, offset user_main
    push rax
    iretq

# A few ms (emulated ring 0) to microseconds (hardware); keeps rax.
short_delay:
    mov ecx, 20000
1:  pause
    dec ecx
    jnz 1b
    ret

halt_forever:
    cli
    hlt
    jmp halt_forever

# ----------------------------------------------------------------- handlers
# Timer: count a tick for this cpu (found from the kernel stack it runs on).
timer_isr:
    push rax
    mov rax, rsp
    sub rax, offset kstacks
    shr rax, 12
    lock inc qword ptr [ticks + rax*8]
    mov rax, LAPIC
    mov dword ptr [rax + 0xB0], 0
    pop rax
    iretq

# Device interrupt (virtio-net, routed to cpu 0): no tick, only a wake-up
# mark for this cpu, so its next idle `hlt` returns at once (the interrupt
# may come in ring 3 between the driver's last look at the rings and its
# `hlt`, which would otherwise sleep until the next timer tick).  Ring 3
# clears the mark just before it polls the device.
net_isr:
    push rax
    mov rax, rsp
    sub rax, offset kstacks
    shr rax, 12
    mov byte ptr [irq_wake + rax], 1
    mov rax, LAPIC
    mov dword ptr [rax + 0xB0], 0
    pop rax
    iretq

irq_generic:
    push rax
    mov rax, LAPIC
    mov dword ptr [rax + 0xB0], 0
    pop rax
    iretq

spurious_isr:
    iretq

# #GP from ring 3.  Two things land here by design:
# - `hlt`: the workload's way to idle (syscall and int n do not work from
#   user mode on the development host): wait here for the next interrupt
#   (any: the timer's or a device's), unless a device interrupt already
#   came since ring 3 last polled (irq_wake, set by net_isr);
# - `out dx, al` / `in al, dx`: hosts whose KVM keeps ring 3 at IOPL 0 no
#   matter what the guest sets (PVM) fault on port I/O; do it here instead.
#   (Where IOPL 3 holds, as with QEMU/KVM on hardware, these never fault.)
# Either way return past the instruction.  Anything else is fatal.
gp_isr:
    push rax
    mov rax, qword ptr [rsp + 16]     # rip
    movzx eax, byte ptr [rax]
    cmp eax, 0xF4
    je 2f
    cmp eax, 0xEE
    je 3f
    cmp eax, 0xEC
    je 4f
    pop rax
    push 13
    jmp exc_common
2:  inc qword ptr [rsp + 16]
    mov rax, rsp
    sub rax, offset kstacks
    shr rax, 12
    cmp byte ptr [irq_wake + rax], 0
    jne 5f
    sti
    hlt
    cli
    jmp 5f
3:  mov rax, qword ptr [rsp]
    out dx, al
    inc qword ptr [rsp + 16]
    jmp 5f
4:  in al, dx
    mov byte ptr [rsp], al
    inc qword ptr [rsp + 16]
5:  pop rax
    add rsp, 8                        # error code
    iretq

.p2align 3
exc_stubs:
.set vec, 0
.rept 32
    .p2align 3
    push vec
    jmp exc_common
    .set vec, vec + 1
.endr

# Print "EXC vv a=<rsp+8> b=<rsp+16> c=<rsp+24>" on COM1 and stop this cpu.
exc_common:
    mov rbx, rsp
    mov al, 'E'
    call kputc
    mov al, 'X'
    call kputc
    mov al, 'C'
    call kputc
    mov rax, qword ptr [rbx]
    call kputhex
    mov rax, qword ptr [rbx + 8]
    call kputhex
    mov rax, qword ptr [rbx + 16]
    call kputhex
    mov rax, qword ptr [rbx + 24]
    call kputhex
    mov rax, qword ptr [rbx + 32]
    call kputhex
    mov al, 10
    call kputc
    jmp halt_forever

kputc:
    mov dx, 0x3F8
    out dx, al
    ret

kputhex:
    mov rsi, rax
    mov al, ' '
    call kputc
    mov ecx, 16
1:  rol rsi, 4
    mov eax, esi
    and eax, 15
    cmp eax, 10
    jb 2f
    add eax, 'a' - 10 - '0'
2:  add eax, '0'
    push rcx
    call kputc
    pop rcx
    dec ecx
    jnz 1b
    ret

# -------------------------------------------------------------------- data
.data
.p2align 4
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF     # 0x08 kernel code 64
    .quad 0x00CF92000000FFFF     # 0x10 kernel data
    .quad 0x00CF9A000000FFFF     # 0x18 kernel code 32
    .quad 0x00CFF2000000FFFF     # 0x20 user data
    .quad 0x00AFFA000000FFFF     # 0x28 user code 64
    .fill MAX_CPUS * 2, 8, 0     # 0x30.. TSS descriptors
gdt_end:
.p2align 3
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
.p2align 3
idt_ptr:
    .word 256 * 16 - 1
    .quad idt

.global kmode_loop_tsc, start_info_ptr, aps_online, ticks, pvclock, kvmclock_ok, avx_ok, timer_initial_count, irq_wake
.p2align 3
start_info_ptr: .quad 0
kmode_loop_tsc: .quad 0
aps_online:     .quad 0
# 1 kHz with KVM's 1 GHz APIC bus and divide-by-16
timer_initial_count: .long 62500
kvmclock_ok:    .byte 0
avx_ok:         .byte 0
.p2align 6
ticks:          .fill MAX_CPUS, 8, 0
# Per cpu: 1 when a device interrupt came since ring 3 last cleared it.
.p2align 6
irq_wake:       .fill MAX_CPUS, 1, 0
.p2align 6
pvclock:        .fill MAX_CPUS * 64, 1, 0

# Identity map of 16 GiB: PML4 -> one PDPT -> 16 PDs of 2 MiB pages.
.section .data.pagetables, "aw"
.p2align 12
pml4:
    .quad pdpt + 7
    .fill 511, 8, 0
pdpt:
.set i, 0
.rept 16
    .quad pd + i * 4096 + 7
    .set i, i + 1
.endr
    .fill 496, 8, 0
pd:
.set i, 0
.rept 16 * 512
    .quad (i << 21) + 0x87       # present | writable | user | 2 MiB
    .set i, i + 1
.endr

.bss
.p2align 12
idt:     .skip 256 * 16
.p2align 6
tss:     .skip MAX_CPUS * 128
.p2align 12
kstacks: .skip MAX_CPUS * KSTACK
.p2align 12
ustacks: .skip MAX_CPUS * USTACK
