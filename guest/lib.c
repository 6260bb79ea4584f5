/*
 * lib.c — the few libc pieces the guest needs: memory/string helpers, a tiny
 * printf-style formatter, number parsing (Linux memparse/strtoull semantics),
 * a hash mixer and an in-place sort.
 */
#include "guest.h"

void *memset(void *d, int c, size_t n)
{
    void *r = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *r = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n)::"memory");
    return r;
}

void *memmove(void *d, const void *s, size_t n)
{
    if ((uintptr_t)d <= (uintptr_t)s || (uintptr_t)d >= (uintptr_t)s + n)
        return memcpy(d, s, n);
    u8 *dd = d;
    const u8 *ss = s;
    while (n--)
        dd[n] = ss[n];
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

int strneq(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i])
            return 0;
        if (!a[i])
            return 1;
    }
    return 1;
}

/* Supports %s %c %d %u %x %% with optional '0', width and 'l'/'ll'. */
int vfmt(char *buf, int cap, const char *f, va_list ap)
{
    int n = 0;
#define PUT(ch) do { if (n < cap - 1) buf[n] = (ch); n++; } while (0)
    for (; *f; f++) {
        if (*f != '%') {
            PUT(*f);
            continue;
        }
        f++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*f == '0')
            pad = '0', f++;
        while (*f >= '0' && *f <= '9')
            width = width * 10 + (*f++ - '0');
        while (*f == 'l')
            lng++, f++;
        char tmp[24];
        int t = 0, neg = 0;
        u64 v;
        switch (*f) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            int l = (int)strlen(s);
            for (; l < width; width--)
                PUT(' ');
            while (*s)
                PUT(*s++);
            continue;
        }
        case 'c':
            PUT((char)va_arg(ap, int));
            continue;
        case '%':
            PUT('%');
            continue;
        case 'd': {
            i64 sv = lng ? va_arg(ap, i64) : va_arg(ap, int);
            neg = sv < 0;
            v = neg ? (u64)(-sv) : (u64)sv;
            do tmp[t++] = (char)('0' + v % 10); while (v /= 10);
            break;
        }
        case 'u':
            v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned);
            do tmp[t++] = (char)('0' + v % 10); while (v /= 10);
            break;
        case 'x':
            v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned);
            do tmp[t++] = "0123456789abcdef"[v & 15]; while (v >>= 4);
            break;
        default:
            PUT('?');
            continue;
        }
        if (neg)
            PUT('-');
        for (int w = t + neg; w < width; w++)
            PUT(pad);
        while (t)
            PUT(tmp[--t]);
    }
    buf[n < cap ? n : cap - 1] = 0;
    return n < cap ? n : cap - 1;
#undef PUT
}

int fmt(char *buf, int cap, const char *f, ...)
{
    va_list ap;
    va_start(ap, f);
    int n = vfmt(buf, cap, f, ap);
    va_end(ap);
    return n;
}

/* Like strtoull(s, end, 0): "0x" hex, leading "0" octal, else decimal.
 * Returns 0 on success, -1 if there are no digits or it overflows. */
int parse_u64(const char *s, const char **end, u64 *out)
{
    unsigned base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    } else if (s[0] == '0' && s[1] >= '0' && s[1] <= '7') {
        base = 8;
    }
    u64 v = 0;
    int digits = 0;
    for (;; s++, digits++) {
        unsigned d;
        if (*s >= '0' && *s <= '9')
            d = (unsigned)(*s - '0');
        else if (*s >= 'a' && *s <= 'f')
            d = (unsigned)(*s - 'a' + 10);
        else if (*s >= 'A' && *s <= 'F')
            d = (unsigned)(*s - 'A' + 10);
        else
            break;
        if (d >= base)
            break;
        if (v > (~0ull - d) / base)
            return -1;
        v = v * base + d;
    }
    if (end)
        *end = s;
    *out = v;
    return digits ? 0 : -1;
}

/* Like Linux memparse(): a number with an optional K/M/G/T suffix. */
int parse_size(const char *s, const char **end, u64 *out)
{
    const char *e;
    u64 v;
    if (parse_u64(s, &e, &v))
        return -1;
    unsigned shift = 0;
    switch (*e) {
    case 'k': case 'K': shift = 10; break;
    case 'm': case 'M': shift = 20; break;
    case 'g': case 'G': shift = 30; break;
    case 't': case 'T': shift = 40; break;
    }
    if (shift) {
        if (v > (~0ull >> shift))
            return -1;
        v <<= shift;
        e++;
    }
    if (end)
        *end = e;
    *out = v;
    return 0;
}

u64 mix64(u64 x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Heapsort: in place, O(n log n), no recursion. */
static void sift(u32 *a, u64 i, u64 n)
{
    for (;;) {
        u64 c = 2 * i + 1;
        if (c >= n)
            return;
        if (c + 1 < n && a[c + 1] > a[c])
            c++;
        if (a[i] >= a[c])
            return;
        u32 t = a[i];
        a[i] = a[c];
        a[c] = t;
        i = c;
    }
}

void sort_u32(u32 *a, u64 n)
{
    if (n < 2)
        return;
    for (u64 i = n / 2; i-- > 0;)
        sift(a, i, n);
    for (u64 e = n - 1; e > 0; e--) {
        u32 t = a[0];
        a[0] = a[e];
        a[e] = t;
        sift(a, 0, e);
    }
}
