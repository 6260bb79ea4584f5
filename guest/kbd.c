/*
 * kbd.c — the i8042 keyboard controller (data 0x60, status 0x64), only for
 * the host's Ctrl-Alt-Del: the guest then powers off cleanly, like a passing
 * run. At boot the IOAPIC pin of ISA IRQ 1 is routed (edge, active high, to
 * the BSP) to vector 0x38, whose CPL 0 stub only counts (boot.S). clock_ns(),
 * which every wait loop of the guest calls, compares that counter with the
 * last one handled (a memory read) and calls kbd_irq() when it moved: the
 * controller's output buffer is drained (bounded) and decoded: Delete
 * (extended) pressed while a Ctrl and an Alt key are held, in scancode set 2
 * (what Godwit and Firecracker send: 14 11 e0 71) or set 1 (an i8042 that
 * translates: 1d 38 e0 53). Everything else only updates which modifiers are
 * held. The guest never writes to the controller (its command byte keeps
 * the VMM's default).
 */
#include "guest.h"

#define KBD_DATA 0x60
#define KBD_STATUS 0x64
#define KBD_OBF 0x01        /* status: output buffer full */
#define KBD_AUX 0x20        /* status: the byte is from the mouse port */
#define KBD_VECTOR 0x38
#define KBD_ISA_IRQ 1
#define KBD_DRAIN_MAX 32    /* bytes per drain (Godwit buffers 16) */

/* Ctrl (left, right), Alt (left, right) held: bits of held[]. */
#define M_CTRL 3
#define M_ALT 12

u32 kbd_seen;
static int handling;

/* One decoder per scancode set, both fed every byte (a stream in one set
 * does not spell Ctrl+Alt+Delete in the other). Make and break codes are
 * followed, so "Ctrl up, Alt, Delete" (f0 14 11 e0 71) is not taken for it. */
static struct {
    u8 ext, brk, held;
} dec[3]; /* [1] set 1, [2] set 2 */

static u8 mod_bit(u32 key, u32 lctrl, u32 lalt)
{
    if (key == lctrl)
        return 1;
    if (key == (0x100 | lctrl))
        return 2;
    if (key == lalt)
        return 4;
    if (key == (0x100 | lalt))
        return 8;
    return 0;
}

/* Returns 1 if this key event is Delete (extended) pressed with Ctrl and Alt held. */
static int key_event(int set, u32 key, int down)
{
    u8 m = set == 2 ? mod_bit(key, 0x14, 0x11) : mod_bit(key, 0x1d, 0x38);
    if (m) {
        dec[set].held = down ? dec[set].held | m : dec[set].held & (u8)~m;
        return 0;
    }
    return down && key == (set == 2 ? 0x171u : 0x153u) && (dec[set].held & M_CTRL) && (dec[set].held & M_ALT);
}

/* 2 or 1 (the set) if byte b completes Ctrl+Alt+Delete, else 0. */
static int feed(u8 b)
{
    int hit = 0;
    /* set 2: e0 = extended, f0 = break; fa/fe/aa/ee/00/ff are controller/keyboard replies */
    if (b == 0xe0)
        dec[2].ext = 1;
    else if (b == 0xf0)
        dec[2].brk = 1;
    else if (b == 0xe1 || b == 0xfa || b == 0xfe || b == 0xaa || b == 0xee || b == 0 || b == 0xff)
        dec[2].ext = dec[2].brk = 0;
    else {
        if (key_event(2, (u32)dec[2].ext << 8 | b, !dec[2].brk))
            hit = 2;
        dec[2].ext = dec[2].brk = 0;
    }
    /* set 1: e0 = extended, bit 7 = break */
    if (b == 0xe0)
        dec[1].ext = 1;
    else if (b == 0xe1 || b == 0xfa || b == 0xfe || b == 0xee || b == 0 || b == 0xff)
        dec[1].ext = 0;
    else {
        if (key_event(1, (u32)dec[1].ext << 8 | (b & 0x7f), !(b & 0x80)))
            hit = hit ? hit : 1;
        dec[1].ext = 0;
    }
    return hit;
}

static NORETURN void ctrl_alt_del(int set)
{
    handling = 1; /* for good: no second report from the clock reads below */
    if (serial_mid_line) /* e.g. after the shell's prompt */
        serial_write("\n", 1);
    emit("ctrl-alt-del", "action=poweroff scancode_set=%d", set);
    finish(1, "ctrl-alt-del");
}

/* Reads what the controller holds; 2 or 1 (the scancode set) if it held
 * Ctrl-Alt-Del, else 0. */
static int drain(void)
{
    for (int i = 0; i < KBD_DRAIN_MAX; i++) {
        u8 st = inb(KBD_STATUS);
        if (st == 0xff || !(st & KBD_OBF)) /* 0xff: no controller at this port */
            break;
        u8 b = inb(KBD_DATA);
        if (st & KBD_AUX)
            continue;
        int set = feed(b);
        if (set)
            return set;
    }
    return 0;
}

void kbd_irq(void)
{
    if (handling)
        return; /* clock_ns() called while draining or reporting */
    handling = 1;
    kbd_seen = boot_kbd_count;
    int cad = drain();
    handling = 0;
    if (cad)
        ctrl_alt_del(cad);
}

/* Route the pin and take whatever the controller already holds: an edge
 * that came while the pin was still masked is lost, its bytes are not. */
void kbd_init(void)
{
    u32 pin = isa_irq_pin(KBD_ISA_IRQ);
    u32 pins = ((ioapic_read(1) >> 16) & 0xff) + 1;
    if (pin >= pins) {
        say("i8042: IOAPIC pin %u beyond its %u pins; Ctrl-Alt-Del is not handled", pin, pins);
        return;
    }
    u32 apic_id = mmio_r32(lapic_base() + 0x20) >> 24;
    ioapic_write(0x10 + 2 * pin + 1, apic_id << 24);
    ioapic_write(0x10 + 2 * pin, KBD_VECTOR); /* fixed, physical, active high, edge, unmasked */
    kbd_irq();
}
