; LiveMig's self-checking boot-sector guest (nasm), in the style of QEMU's migration test guest.
;
; It switches to 32-bit protected mode and then loops for ever over the guest-physical range
; [RANGE_START, RANGE_END): in every 4 KiB page it checks the page's first byte against the
; pass counter (the byte must hold the number of passes made so far, mod 256) and increments
; it; at boot every page's byte is set to 0 (the firmware leaves bytes in that range). A page
; whose byte is wrong (a page the migration lost or delivered stale) counts as an error and
; is set right, so one bad page counts once. It reports on the first serial port (COM1, 0x3f8):
;   "livemig-bootsector range START-END\n"     once, at boot
;   "passes XXXXXXXX errors XXXXXXXX\n"         every REPORT_EVERY passes, and after every
;                                               pass that found a new error (hexadecimal)
; The pass and error counters live in registers (esi, edi), so they travel with the vCPU
; state: a migrated guest continues its count where the source stopped, and its error
; counter proves on the destination that every page arrived as the source left it.
;
; Build: nasm -f bin -DRANGE_END=... -o bootsector.img bootsector.asm (guests/bootsector/build.sh)

%ifndef RANGE_START
%define RANGE_START 0x00100000          ; 1 MiB: above the BIOS, the boot sector and the stack
%endif
%ifndef RANGE_END
%define RANGE_END   0x06500000          ; 101 MiB: 100 MiB of pages (a guest of at least 128 MiB)
%endif
%ifndef REPORT_EVERY
%define REPORT_EVERY 64                 ; passes between two reports (a power of two): a few a second under TCG
%endif
%define COM1 0x3f8
%define PAGE 4096

        bits 16
        org 0x7c00

start:
        cli
        xor ax, ax
        mov ds, ax
        in al, 0x92                     ; fast A20 gate: address memory above 1 MiB
        or al, 2
        and al, 0xfe                    ; (bit 0 would reset the machine)
        out 0x92, al
        lgdt [gdt_descriptor]
        mov eax, cr0
        or eax, 1                       ; protected mode on
        mov cr0, eax
        jmp dword 0x08:protected

        bits 32
protected:
        mov ax, 0x10                    ; flat 4 GiB data segment
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov esp, 0x7c00
        mov ebx, banner
        call print_string
        mov eax, RANGE_START
        call print_hex
        mov al, '-'
        call print_char
        mov eax, RANGE_END
        call print_hex
        mov al, 10
        call print_char

        mov ebx, RANGE_START            ; the firmware may have left bytes in the range: start every page at 0
clear:
        mov byte [ebx], 0
        add ebx, PAGE
        cmp ebx, RANGE_END
        jb clear

        xor esi, esi                    ; passes completed
        xor edi, edi                    ; errors found
pass:
        mov ebp, edi                    ; errors before this pass
        mov edx, esi                    ; dl: what every page's byte must hold now
        mov ebx, RANGE_START
page:
        mov al, [ebx]
        cmp al, dl
        je .good
        inc edi                         ; a stale or lost page: count it and set it right
        mov al, dl
.good:
        inc al
        mov [ebx], al
        add ebx, PAGE
        cmp ebx, RANGE_END
        jb page
        inc esi
        cmp edi, ebp
        jne .report                     ; a new error is reported at once
        test esi, REPORT_EVERY - 1
        jnz pass
.report:
        call report
        jmp pass

; "passes XXXXXXXX errors XXXXXXXX\n"
report:
        mov ebx, passes_text
        call print_string
        mov eax, esi
        call print_hex
        mov ebx, errors_text
        call print_string
        mov eax, edi
        call print_hex
        mov al, 10
        call print_char
        ret

; the NUL-terminated string at ebx
print_string:
        mov al, [ebx]
        test al, al
        jz .done
        call print_char
        inc ebx
        jmp print_string
.done:
        ret

; eax as 8 hexadecimal digits
print_hex:
        mov ecx, 8
.digit:
        rol eax, 4
        push eax
        and al, 0x0f
        add al, '0'
        cmp al, '9'
        jbe .out
        add al, 'a' - '9' - 1
.out:
        call print_char
        pop eax
        loop .digit
        ret

; al to COM1 (QEMU's UART needs no set-up; wait for the transmitter to be free)
print_char:
        push edx
        push eax
        mov dx, COM1 + 5
.wait:
        in al, dx
        test al, 0x20
        jz .wait
        pop eax
        mov dx, COM1
        out dx, al
        pop edx
        ret

banner:      db "livemig-bootsector range ", 0
passes_text: db "passes ", 0
errors_text: db " errors ", 0

        align 8
gdt:
        dq 0                            ; null descriptor
        dq 0x00cf9a000000ffff           ; 0x08: code, base 0, limit 4 GiB, 32-bit
        dq 0x00cf92000000ffff           ; 0x10: data, base 0, limit 4 GiB
gdt_descriptor:
        dw gdt_descriptor - gdt - 1
        dd gdt

        times 510 - ($ - $$) db 0
        dw 0xaa55                       ; the BIOS boots a sector that ends in this
