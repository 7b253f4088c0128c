/* responder.c: see responder.h. */
#include "responder.h"

#include "board.h"
#include "text.h"

void responder_detection(const char *label, int32_t score, uint32_t time_ms)
{
    char buf[64];
    text_t t;
    text_init(&t, buf, sizeof(buf));
    text_str(&t, "DET ");
    text_str(&t, label);
    text_str(&t, " ");
    text_fixed(&t, (uint32_t)(score < 0 ? 0 : score), 256u, 2);
    text_str(&t, " ");
    text_u32(&t, time_ms);
    text_str(&t, "\n");
    board_write(buf, t.len);
}

void responder_note(const char *text)
{
    board_write("# ", 2);
    while (*text) {
        const char *p = text;
        while (*p && *p != '\n') p++;
        board_write(text, (size_t)(p - text));
        text = *p ? p + 1 : p;
    }
    board_write("\n", 1);
}
