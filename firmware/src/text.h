/* text.h: building short text lines without printf (no float formatting, no heap). */
#ifndef KWS_TEXT_H
#define KWS_TEXT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    char *buf;
    size_t cap;   /* bytes in buf, including room for a final NUL */
    size_t len;
} text_t;

void text_init(text_t *t, char *buf, size_t cap);
void text_str(text_t *t, const char *s);
void text_u32(text_t *t, uint32_t v);
void text_i32(text_t *t, int32_t v);
void text_hex32(text_t *t, uint32_t v);            /* 0x%08x */
void text_fixed(text_t *t, uint32_t num, uint32_t den, int decimals); /* num/den rounded, e.g. 0.78 */

#ifdef __cplusplus
}
#endif

#endif /* KWS_TEXT_H */
