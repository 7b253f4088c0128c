/* text.c: see text.h. Truncates rather than overflows. */
#include "text.h"

void text_init(text_t *t, char *buf, size_t cap)
{
    t->buf = buf;
    t->cap = cap;
    t->len = 0;
    if (cap) buf[0] = '\0';
}

static void put(text_t *t, char c)
{
    if (t->len + 1 < t->cap) {
        t->buf[t->len++] = c;
        t->buf[t->len] = '\0';
    }
}

void text_str(text_t *t, const char *s)
{
    while (*s) put(t, *s++);
}

void text_u32(text_t *t, uint32_t v)
{
    char tmp[10];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10u);
        v /= 10u;
    } while (v);
    while (n) put(t, tmp[--n]);
}

void text_i32(text_t *t, int32_t v)
{
    if (v < 0) {
        put(t, '-');
        text_u32(t, (uint32_t)0 - (uint32_t)v);
    } else {
        text_u32(t, (uint32_t)v);
    }
}

void text_hex32(text_t *t, uint32_t v)
{
    static const char digits[] = "0123456789abcdef";
    int i;
    text_str(t, "0x");
    for (i = 7; i >= 0; i--) put(t, digits[(v >> (4 * i)) & 0xFu]);
}

void text_fixed(text_t *t, uint32_t num, uint32_t den, int decimals)
{
    uint32_t scale = 1, scaled;
    int i;
    for (i = 0; i < decimals; i++) scale *= 10u;
    scaled = (uint32_t)(((uint64_t)num * scale + den / 2u) / den);
    text_u32(t, scaled / scale);
    if (decimals > 0) {
        uint32_t frac = scaled % scale, div = scale / 10u;
        put(t, '.');
        for (i = 0; i < decimals; i++) {
            put(t, (char)('0' + frac / div));
            frac %= div;
            div = div ? div / 10u : 1u;
        }
    }
}
