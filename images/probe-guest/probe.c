/*
 * The probe guest: a freestanding program sealvm boots through PVH on real KVM. It finds
 * its virtio-mmio devices from the `sealvm.mmio=ADDR:GSI,...` device map sealvm appends to
 * the command line, drives them with interrupts (IOAPIC -> LAPIC), and prints one
 * `PASS name` / `FAIL name: why` line per check on COM1, then powers off through the ACPI
 * sleep control register.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* ---- port and memory I/O ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
typedef unsigned long uptr;
static inline u32 rd32(uptr addr) { return *(volatile u32 *)addr; }
static inline void wr32(uptr addr, u32 v) { *(volatile u32 *)addr = v; }
static inline void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }

/* ---- COM1 ---- */
static void putc(char c) {
    if (c == '\n') putc('\r');
    for (int i = 0; i < 100000 && !(inb(0x3fd) & 0x20); i++) {}
    outb(0x3f8, (u8)c);
}
static void puts(const char *s) { while (*s) putc(*s++); }
static void puthex(u64 v) {
    puts("0x");
    int started = 0;
    for (int i = 60; i >= 0; i -= 4) {
        int d = (v >> i) & 0xf;
        if (d || started || i == 0) { putc("0123456789abcdef"[d]); started = 1; }
    }
}
static void putdec(u32 v) {
    char buf[12]; int n = 0;
    do { buf[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) putc(buf[--n]);
}

static int passes, fails;
static void pass(const char *name) { puts("PASS "); puts(name); putc('\n'); passes++; }
static void fail(const char *name, const char *why) {
    puts("FAIL "); puts(name); puts(": "); puts(why); putc('\n'); fails++;
}
static void check(int ok, const char *name, const char *why) { if (ok) pass(name); else fail(name, why); }

static void *memset(void *d, int c, u32 n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
static int memeq(const void *a, const void *b, u32 n) {
    const u8 *x = a, *y = b;
    while (n--) if (*x++ != *y++) return 0;
    return 1;
}

/* ---- interrupts ---- */
struct idt_entry { u16 off_lo, sel; u8 ist, attr; u16 off_mid; u32 off_hi, zero; } __attribute__((packed));
static struct idt_entry idt[256] __attribute__((aligned(16)));
extern u64 isr_stubs[32], isr_dev_stubs[24], isr_timer_stub, isr_spurious_stub;

#define LAPIC 0xfee00000u
#define IOAPIC 0xfec00000u
#define DEV_VECTOR_BASE 0x30
#define TIMER_VECTOR 0xef

static void idt_set(int v, u64 handler) {
    idt[v].off_lo = handler & 0xffff; idt[v].off_mid = (handler >> 16) & 0xffff;
    idt[v].off_hi = (u32)(handler >> 32);
    idt[v].sel = 0x08; idt[v].ist = 0; idt[v].zero = 0; idt[v].attr = 0x8e;
}

static void ioapic_route(u32 gsi, u8 vector) {
    wr32(IOAPIC, 0x10 + 2 * gsi);     wr32(IOAPIC + 0x10, vector); /* fixed, edge, high, unmasked */
    wr32(IOAPIC, 0x10 + 2 * gsi + 1); wr32(IOAPIC + 0x10, 0);      /* APIC id 0 */
}

static volatile u32 ticks;

/* ---- virtio-mmio ---- */
#define MAX_DEVS 24
#define QSZ 16
struct desc { u64 addr; u32 len; u16 flags, next; } __attribute__((packed));
struct vq {
    struct desc desc[QSZ] __attribute__((aligned(4096)));
    struct { u16 flags, idx, ring[QSZ], used_event; } avail __attribute__((aligned(4096)));
    struct { u16 flags, idx; struct { u32 id, len; } ring[QSZ]; u16 avail_event; } used __attribute__((aligned(4096)));
    u16 last_used;
};
struct dev { uptr base; u32 gsi, type; volatile u32 irqs; struct vq *q; int nq; };
static struct dev devs[MAX_DEVS];
static int ndevs;
static struct vq queues[4] __attribute__((aligned(4096)));
static int queues_used;

void isr(u64 vector) {
    if (vector < 32) {
        puts("FAIL exception "); putdec((u32)vector); putc('\n');
        for (;;) __asm__ volatile("cli; hlt");
    }
    if (vector == TIMER_VECTOR) ticks++;
    if (vector >= DEV_VECTOR_BASE && vector < DEV_VECTOR_BASE + 24) {
        for (int i = 0; i < ndevs; i++) {
            if (devs[i].gsi == vector - DEV_VECTOR_BASE) {
                u32 status = rd32(devs[i].base + 0x60);
                wr32(devs[i].base + 0x64, status);
                devs[i].irqs++;
            }
        }
    }
    if (vector != 0xff) wr32(LAPIC + 0xb0, 0);
}

static void interrupts_init(void) {
    for (int i = 0; i < 32; i++) idt_set(i, isr_stubs[i]);
    for (int i = 0; i < 24; i++) idt_set(DEV_VECTOR_BASE + i, isr_dev_stubs[i]);
    idt_set(TIMER_VECTOR, isr_timer_stub);
    idt_set(0xff, isr_spurious_stub);
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)(uptr)idt };
    __asm__ volatile("lidt %0" ::"m"(idtr));
    outb(0x21, 0xff); outb(0xa1, 0xff);            /* mask the 8259s */
    wr32(LAPIC + 0xf0, 0x100 | 0xff);              /* enable, spurious vector 0xff */
    wr32(LAPIC + 0x80, 0);                         /* task priority: everything */
    /* A periodic LAPIC timer bounds every wait, so a device that never answers is a FAIL. */
    wr32(LAPIC + 0x3e0, 0x3);                      /* divide by 16 */
    wr32(LAPIC + 0x320, 0x20000 | TIMER_VECTOR);   /* periodic */
    wr32(LAPIC + 0x380, 1000000);
    __asm__ volatile("sti");
}

/* Waits for the queue to return a buffer; 0 on timeout (about `max_ticks` timer ticks). */
static int wait_used(struct vq *q, u32 max_ticks) {
    u32 start = ticks;
    while (1) {
        barrier();
        if (q->used.idx != q->last_used) { q->last_used++; return 1; }
        if (ticks - start > max_ticks) return 0;
        __asm__ volatile("sti; hlt");
    }
}

static int dev_init(struct dev *d, u64 want, int nq) {
    uptr b = d->base;
    wr32(b + 0x70, 0);
    wr32(b + 0x70, 1);
    wr32(b + 0x70, 1 | 2);
    wr32(b + 0x14, 1); u64 offered = (u64)rd32(b + 0x10) << 32;
    wr32(b + 0x14, 0); offered |= rd32(b + 0x10);
    u64 f = offered & (want | (1ull << 32));
    wr32(b + 0x24, 0); wr32(b + 0x20, (u32)f);
    wr32(b + 0x24, 1); wr32(b + 0x20, (u32)(f >> 32));
    wr32(b + 0x70, 1 | 2 | 8);
    if (!(rd32(b + 0x70) & 8)) return 0;
    if (!d->q) {
        if (queues_used + nq > 4) return 0;
        d->q = &queues[queues_used]; queues_used += nq;
    }
    d->nq = nq;
    for (int i = 0; i < nq; i++) {
        struct vq *q = &d->q[i];
        memset(q, 0, sizeof(*q));
        wr32(b + 0x30, i);
        if (rd32(b + 0x34) < QSZ) return 0;
        wr32(b + 0x38, QSZ);
        wr32(b + 0x80, (u32)(uptr)q->desc);   wr32(b + 0x84, 0);
        wr32(b + 0x90, (u32)(uptr)&q->avail); wr32(b + 0x94, 0);
        wr32(b + 0xa0, (u32)(uptr)&q->used);  wr32(b + 0xa4, 0);
        wr32(b + 0x44, 1);
    }
    wr32(b + 0x70, 1 | 2 | 8 | 4);
    return !(rd32(b + 0x70) & 0x40);
}

static u64 dev_features(struct dev *d) {
    wr32(d->base + 0x14, 0);
    return rd32(d->base + 0x10);
}

/* Posts a chain of up to 4 buffers; flags per buffer: 2 = device-writable. */
static void submit(struct dev *d, int qi, int n, const uptr *addr, const u32 *len, const u16 *flags) {
    struct vq *q = &d->q[qi];
    for (int i = 0; i < n; i++) {
        q->desc[i].addr = addr[i];
        q->desc[i].len = len[i];
        q->desc[i].flags = flags[i] | (i + 1 < n ? 1 : 0);
        q->desc[i].next = (u16)(i + 1);
    }
    q->avail.ring[q->avail.idx % QSZ] = 0;
    barrier();
    q->avail.idx++;
    barrier();
    wr32(d->base + 0x50, qi);
}

/* ---- virtio-blk ---- */
struct blk_hdr { u32 type, reserved; u64 sector; } __attribute__((packed));
static struct blk_hdr hdr;
static u8 data[4096] __attribute__((aligned(4096)));
static u8 pattern[4096];
static volatile u8 status;
#define SECTOR 2048

static int blk_request(struct dev *d, u32 type, u64 sector, u32 len, int device_writes) {
    hdr.type = type; hdr.reserved = 0; hdr.sector = sector;
    status = 0xff;
    uptr addr[3] = { (uptr)&hdr, (uptr)data, (uptr)&status };
    u32 lens[3] = { sizeof(hdr), len, 1 };
    u16 flags[3] = { 0, (u16)(device_writes ? 2 : 0), 2 };
    if (len) {
        submit(d, 0, 3, addr, lens, flags);
    } else {
        uptr a2[2] = { addr[0], addr[2] };
        u32 l2[2] = { lens[0], 1 };
        u16 f2[2] = { 0, 2 };
        submit(d, 0, 2, a2, l2, f2);
    }
    if (!wait_used(&d->q[0], 200)) return -1;
    return status;
}

static void test_block(struct dev *d, int evil) {
    if (!dev_init(d, (1u << 9) | (1u << 5), 1)) { fail("blk-init", "device refused initialisation"); return; }
    u64 capacity = (u64)rd32(d->base + 0x100) | ((u64)rd32(d->base + 0x104) << 32);
    puts("INFO blk-capacity "); putdec((u32)capacity); puts(" sectors\n");
    check(capacity > SECTOR + 8, "blk-init", "capacity too small");
    u64 features = dev_features(d);
    int ro = (features >> 5) & 1;
    for (u32 j = 0; j < 4096; j++) pattern[j] = (u8)((j * 7 + 0x5a) & 0xff);
    const char *magic = "SEALVM-PROBE-OK!";
    for (int j = 0; j < 16; j++) pattern[j] = (u8)magic[j];
    u32 irqs_before = d->irqs;
    int requests = 0;
    if (!ro) {
        for (u32 j = 0; j < 4096; j++) data[j] = pattern[j];
        int st = blk_request(d, 1, SECTOR, 4096, 0); requests++;
        check(st == 0, "blk-write", st < 0 ? "no completion" : "bad status");
    }
    memset(data, 0, 4096);
    int st = blk_request(d, 0, SECTOR, 4096, 1); requests++;
    if (ro) {
        check(st == 0, "blk-read", "read of a read-only disk failed");
    } else {
        check(st == 0 && memeq(data, pattern, 4096), "blk-read", st ? "bad status" : "data differs");
    }
    if (ro) {
        for (u32 j = 0; j < 4096; j++) data[j] = 0xee;
        st = blk_request(d, 1, SECTOR, 4096, 0); requests++;
        check(st == 1 || st == 2, "blk-readonly", "a write to a read-only disk was not refused");
    } else if ((features >> 9) & 1) {
        st = blk_request(d, 4, 0, 0, 0); requests++;
        check(st == 0, "blk-flush", "flush failed");
    } else {
        fail("blk-flush", "not offered");
    }
    memset(data, 0, 20);
    st = blk_request(d, 8, 0, 20, 1); requests++;
    if (st == 0) { puts("INFO blk-id "); data[20] = 0; puts((const char *)data); putc('\n'); }
    check(st == 0, "blk-get-id", "GET_ID failed");
    check(d->irqs - irqs_before >= 1 && d->irqs - irqs_before <= (u32)requests * 2,
          "blk-interrupts", "no interrupt for completed requests");
    puts("INFO blk-irqs "); putdec(d->irqs - irqs_before); puts(" for "); putdec(requests); puts(" requests\n");

    if (!evil) return;
    /* Malformed requests: each must fail (or be dropped), and the VMM must live on. */
    int bad_ok = 1;
    hdr.type = 0; hdr.sector = SECTOR; status = 0xff;
    {   /* (a) data buffer outside guest RAM */
        uptr a[3] = { (uptr)&hdr, 0xfff00000u, (uptr)&status };
        u32 l[3] = { 16, 4096, 1 };
        u16 f[3] = { 0, 2, 2 };
        submit(d, 0, 3, a, l, f);
        if (wait_used(&d->q[0], 100) && status == 0) bad_ok = 0;
    }
    status = 0xff;
    {   /* (b) a header of 8 bytes */
        uptr a[3] = { (uptr)&hdr, (uptr)data, (uptr)&status };
        u32 l[3] = { 8, 512, 1 };
        u16 f[3] = { 0, 2, 2 };
        submit(d, 0, 3, a, l, f);
        if (wait_used(&d->q[0], 100) && status == 0) bad_ok = 0;
    }
    status = 0xff;
    {   /* (c) a chain whose next index is outside the queue */
        struct vq *q = &d->q[0];
        q->desc[0].addr = (uptr)&hdr; q->desc[0].len = 16; q->desc[0].flags = 1; q->desc[0].next = 200;
        q->avail.ring[q->avail.idx % QSZ] = 0;
        barrier(); q->avail.idx++; barrier();
        wr32(d->base + 0x50, 0);
        if (wait_used(q, 100) && status == 0) bad_ok = 0;
    }
    check(bad_ok, "blk-evil", "a malformed request succeeded");
    if (rd32(d->base + 0x70) & 0x40) {
        puts("INFO blk device needs reset after the malformed requests; resetting\n");
    }
    /* Whatever state the queue is in now, start over and read again. */
    dev_init(d, (1u << 9) | (1u << 5), 1);
    memset(data, 0, 4096);
    st = blk_request(d, 0, SECTOR, 4096, 1);
    check(st == 0 && (ro || memeq(data, pattern, 4096)), "blk-after-evil", "device unusable after malformed requests");
}

/* ---- virtio-console ---- */
static u8 rxbuf[64];
static const char hello[] = "probe says hello over virtio-console\n";

static void test_console(struct dev *d) {
    if (!dev_init(d, 0, 2)) { fail("console-init", "device refused initialisation"); return; }
    /* Post the receive buffer first, so nothing the host sends is lost. */
    struct vq *rx = &d->q[0];
    memset(rxbuf, 0, sizeof(rxbuf));
    rx->desc[0].addr = (uptr)rxbuf; rx->desc[0].len = sizeof(rxbuf) - 1; rx->desc[0].flags = 2;
    rx->avail.ring[0] = 0; barrier(); rx->avail.idx = 1; barrier();
    wr32(d->base + 0x50, 0);
    uptr a[1] = { (uptr)hello };
    u32 l[1] = { sizeof(hello) - 1 };
    u16 f[1] = { 0 };
    submit(d, 1, 1, a, l, f);
    check(wait_used(&d->q[1], 200), "console-tx", "transmit buffer not returned");
    if (wait_used(rx, 600)) {
        puts("INFO console-rx ");
        for (u32 i = 0; i < rx->used.ring[0].len && i < sizeof(rxbuf) - 1; i++)
            if (rxbuf[i] >= 0x20 && rxbuf[i] < 0x7f) putc((char)rxbuf[i]);
        putc('\n');
        pass("console-rx");
    } else {
        fail("console-rx", "nothing arrived from the host");
    }
}


/* ---- TPM 2.0 over CRB (sealvm.tpm=ADDR) ---- */
#define NV_INDEX 0x01500016u
static const char nv_data[16] = "sealvm-probe-nv!";
static u8 tpm_rsp[256];
static u32 tpm_rsp_len;

static void be16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static void be32(u8 *p, u32 v) { p[0] = (u8)(v >> 24); p[1] = (u8)(v >> 16); p[2] = (u8)(v >> 8); p[3] = (u8)v; }
static u32 rbe32(const u8 *p) { return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3]; }

/* Sends `len` bytes of `cmd` (its size field is filled in) and returns the response code,
   or 0xffffffff when the TPM did not answer. */
static u32 tpm_send(uptr crb, u8 *cmd, u32 len) {
    be32(cmd + 2, len);
    wr32(crb + 0x40, 1);                                   /* cmdReady */
    for (u32 i = 0; i < len; i++) *(volatile u8 *)(crb + 0x80 + i) = cmd[i];
    wr32(crb + 0x4c, 1);                                   /* start */
    u32 start = ticks;
    while (rd32(crb + 0x4c) & 1) {
        if (ticks - start > 300) return 0xffffffffu;
        __asm__ volatile("sti; hlt");
    }
    for (u32 i = 0; i < 10; i++) tpm_rsp[i] = *(volatile u8 *)(crb + 0x80 + i);
    tpm_rsp_len = rbe32(tpm_rsp + 2);
    if (tpm_rsp_len > sizeof(tpm_rsp)) tpm_rsp_len = sizeof(tpm_rsp);
    for (u32 i = 10; i < tpm_rsp_len; i++) tpm_rsp[i] = *(volatile u8 *)(crb + 0x80 + i);
    wr32(crb + 0x40, 2);                                   /* goIdle */
    return rbe32(tpm_rsp + 6);
}

/* The password session for an empty owner authorization. */
static u32 put_pw_session(u8 *p) {
    be32(p, 9);                                            /* authorizationSize */
    be32(p + 4, 0x40000009);                               /* TPM_RS_PW */
    be16(p + 8, 0);                                        /* nonce */
    p[10] = 0;                                             /* attributes */
    be16(p + 11, 0);                                       /* hmac */
    return 13;
}

static u32 nv_read(uptr crb) {
    u8 c[64]; u32 n = 0;
    be16(c, 0x8002); n = 6; be32(c + n, 0x0000014e); n += 4;
    be32(c + n, 0x40000001); n += 4;                       /* authHandle: owner */
    be32(c + n, NV_INDEX); n += 4;
    n += put_pw_session(c + n);
    be16(c + n, sizeof(nv_data)); n += 2;                  /* size */
    be16(c + n, 0); n += 2;                                /* offset */
    return tpm_send(crb, c, n);
}

/* TPM2_PCR_Read of PCR 16 in the SHA-256 bank; 1 and the digest on success. */
static int pcr16_read(uptr crb, u8 *digest) {
    u8 c[32]; u32 n = 0;
    be16(c, 0x8001); n = 6; be32(c + n, 0x0000017e); n += 4;
    be32(c + n, 1); n += 4;                                /* one selection */
    be16(c + n, 0x000b); n += 2;                           /* sha256 */
    c[n++] = 3; c[n++] = 0x00; c[n++] = 0x00; c[n++] = 0x01; /* PCR 16 */
    if (tpm_send(crb, c, n) != 0) return 0;
    /* updateCounter(4), selection out (4 + 2 + 1 + 3), digest count (4), size (2), digest */
    u32 at = 10 + 4 + 10 + 4;
    if (tpm_rsp_len < at + 2 + 32) return 0;
    for (int i = 0; i < 32; i++) digest[i] = tpm_rsp[at + 2 + i];
    return 1;
}

static void test_tpm(uptr crb) {
    wr32(crb + 0x08, 1);                                   /* request locality 0 */
    check(rd32(crb + 0x0c) & 1, "tpm-locality", "locality 0 not granted");
    check((rd32(crb + 0x30) & 0xf) == 1, "tpm-crb-interface", "INTF_ID is not CRB");
    u8 c[96]; u32 n;
    /* TPM2_Startup(CLEAR): sealvm's swtpm may already be started (TPM_RC_INITIALIZE). */
    be16(c, 0x8001); be32(c + 6, 0x00000144); be16(c + 10, 0);
    u32 rc = tpm_send(crb, c, 12);
    check(rc == 0 || rc == 0x100, "tpm-startup", rc == 0xffffffffu ? "no answer" : "TPM2_Startup failed");
    be16(c, 0x8001); be32(c + 6, 0x0000017b); be16(c + 10, 8);
    rc = tpm_send(crb, c, 12);
    check(rc == 0 && tpm_rsp_len == 20 && rbe32(tpm_rsp + 10) >> 16 == 8, "tpm-getrandom",
          rc == 0xffffffffu ? "no answer" : "TPM2_GetRandom failed");
    /* PCR 16: read, extend with a SHA-256 digest, read again; it must change. */
    u8 before[32], after[32];
    int read_ok = pcr16_read(crb, before);
    n = 0; be16(c, 0x8002); n = 6; be32(c + n, 0x00000182); n += 4;    /* PCR_Extend */
    be32(c + n, 16); n += 4;
    n += put_pw_session(c + n);
    be32(c + n, 1); n += 4;                                /* one digest */
    be16(c + n, 0x000b); n += 2;                           /* sha256 */
    for (int i = 0; i < 32; i++) c[n++] = (u8)(0xa0 + i);
    rc = tpm_send(crb, c, n);
    check(rc == 0, "tpm-pcr-extend", "TPM2_PCR_Extend failed");
    int changed = read_ok && pcr16_read(crb, after) && !memeq(before, after, 32);
    if (changed) {
        puts("INFO tpm-pcr16 ");
        for (int i = 0; i < 32; i++) { putc("0123456789abcdef"[after[i] >> 4]); putc("0123456789abcdef"[after[i] & 15]); }
        putc('\n');
    }
    check(changed, "tpm-pcr-read", "PCR 16 did not change after the extend");
    rc = nv_read(crb);
    if (rc == 0 && tpm_rsp_len >= 16 + 16 && memeq(tpm_rsp + 16, nv_data, 16)) {
        pass("tpm-nv-persisted");                          /* written by an earlier boot */
        return;
    }
    /* First boot: define the index and write it. */
    n = 0; be16(c, 0x8002); n = 6; be32(c + n, 0x0000012a); n += 4;
    be32(c + n, 0x40000001); n += 4;
    n += put_pw_session(c + n);
    be16(c + n, 0); n += 2;                                /* auth */
    be16(c + n, 14); n += 2;                               /* TPM2B_NV_PUBLIC size */
    be32(c + n, NV_INDEX); n += 4;
    be16(c + n, 0x000b); n += 2;                           /* sha256 */
    be32(c + n, (1u << 1) | (1u << 17)); n += 4;           /* OWNERWRITE | OWNERREAD */
    be16(c + n, 0); n += 2;                                /* authPolicy */
    be16(c + n, sizeof(nv_data)); n += 2;                  /* dataSize */
    rc = tpm_send(crb, c, n);
    check(rc == 0, "tpm-nv-define", "TPM2_NV_DefineSpace failed");
    n = 0; be16(c, 0x8002); n = 6; be32(c + n, 0x00000137); n += 4;
    be32(c + n, 0x40000001); n += 4;
    be32(c + n, NV_INDEX); n += 4;
    n += put_pw_session(c + n);
    be16(c + n, sizeof(nv_data)); n += 2;
    for (u32 i = 0; i < sizeof(nv_data); i++) c[n++] = (u8)nv_data[i];
    be16(c + n, 0); n += 2;
    rc = tpm_send(crb, c, n);
    check(rc == 0, "tpm-nv-write", "TPM2_NV_Write failed");
    rc = nv_read(crb);
    check(rc == 0 && memeq(tpm_rsp + 16, nv_data, 16), "tpm-nv-read", "TPM2_NV_Read returned other data");
}

/* ---- command line ---- */
static const char *find(const char *s, const char *key) {
    for (; *s; s++) {
        const char *a = s, *b = key;
        while (*b && *a == *b) { a++; b++; }
        if (!*b) return a;
    }
    return 0;
}
static u32 parse_num(const char **p) {
    const char *s = *p; u32 v = 0;
    if (s[0] == '0' && s[1] == 'x') {
        s += 2;
        for (;; s++) {
            char c = *s; int d;
            if (c >= '0' && c <= '9') d = c - '0';
            else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
            else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
            else break;
            v = v * 16 + (u32)d;
        }
    } else {
        while (*s >= '0' && *s <= '9') v = v * 10 + (u32)(*s++ - '0');
    }
    *p = s;
    return v;
}

struct start_info { u32 magic, version, flags, nr_modules; u64 modlist, cmdline, rsdp, memmap; u32 memmap_entries, reserved; };

void probe_main(struct start_info *info);
void isr(u64 vector);

void probe_main(struct start_info *info) {
    puts("sealvm probe guest\n");
    if (info->magic != 0x336ec578 || !info->cmdline) { fail("boot", "no PVH start info"); goto done; }
    const char *cmdline = (const char *)(uptr)info->cmdline;
    puts("INFO cmdline "); puts(cmdline); putc('\n');
    pass("boot");
    interrupts_init();
    const char *p = find(cmdline, "sealvm.mmio=");
    while (p && ndevs < MAX_DEVS) {
        uptr base = parse_num(&p);
        if (*p != ':') break;
        p++;
        u32 gsi = parse_num(&p);
        if (rd32(base) == 0x74726976 && rd32(base + 4) == 2) {
            devs[ndevs].base = base; devs[ndevs].gsi = gsi; devs[ndevs].type = rd32(base + 8);
            ioapic_route(gsi, (u8)(DEV_VECTOR_BASE + gsi));
            ndevs++;
        } else {
            puts("INFO no virtio-mmio device at "); puthex(base); putc('\n');
        }
        if (*p != ',') break;
        p++;
    }
    int evil = find(cmdline, "probe.evil=1") != 0;
    struct dev *blk = 0, *con = 0;
    for (int i = 0; i < ndevs; i++) {
        if (devs[i].type == 2 && !blk) blk = &devs[i];
        if (devs[i].type == 3 && !con) con = &devs[i];
    }
    if (blk) test_block(blk, evil); else puts("INFO no block device\n");
    if (con) test_console(con); else puts("INFO no console device\n");
    const char *t = find(cmdline, "sealvm.tpm=");
    if (t) test_tpm(parse_num(&t)); else puts("INFO no TPM\n");
done:
    puts("PROBE DONE pass="); putdec((u32)passes); puts(" fail="); putdec((u32)fails); putc('\n');
    /* probe.linger=1 keeps the guest running (idle, timer ticking) for API tests. */
    if (info->magic == 0x336ec578 && find((const char *)(uptr)info->cmdline, "probe.linger=1"))
        for (;;) __asm__ volatile("sti; hlt");
    outb(0x600, (5 << 2) | (1 << 5));
}
