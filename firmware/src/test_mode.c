/* test_mode.c: the framed serial protocol of test_mode.h. */
#include "test_mode.h"

#include <string.h>

#include "board.h"
#include "kws_features.h"
#include "main_functions.h"
#include "model_runner.h"
#include "text.h"

enum { HUNT0, HUNT1, HEADER, PAYLOAD, CRC };

static union {                       /* the payload: bytes in, int16 samples out (C99 union punning) */
    int16_t pcm[TM_MAX_PAYLOAD / 2];
    uint8_t bytes[TM_MAX_PAYLOAD];
} s_rx;
static uint8_t s_header[6];          /* type, flags, length */
static uint8_t s_crc_bytes[4];
static int s_state;
static uint32_t s_got, s_len, s_last_ms;

/* ------------------------------------------------------------------ CRC-32 (zlib's), 4 bits at a time */

uint32_t tm_crc32(uint32_t crc, const void *data, size_t n)
{
    static const uint32_t nibble[16] = {
        0x00000000u, 0x1db71064u, 0x3b6e20c8u, 0x26d930acu, 0x76dc4190u, 0x6b6b51f4u, 0x4db26158u, 0x5005713cu,
        0xedb88320u, 0xf00f9344u, 0xd6d6a3e8u, 0xcb61b38cu, 0x9b64c2b0u, 0x86d3d2d4u, 0xa00ae278u, 0xbdbdf21cu};
    const uint8_t *p = (const uint8_t *)data;
    crc = ~crc;
    while (n--) {
        crc ^= *p++;
        crc = (crc >> 4) ^ nibble[crc & 15u];
        crc = (crc >> 4) ^ nibble[crc & 15u];
    }
    return ~crc;
}

/* ------------------------------------------------------------------ replies */

static uint32_t s_tx_crc;

static void put_u32(uint8_t *b, uint32_t v)
{
    b[0] = (uint8_t)v; b[1] = (uint8_t)(v >> 8); b[2] = (uint8_t)(v >> 16); b[3] = (uint8_t)(v >> 24);
}

static void reply_begin(uint8_t type, uint8_t flags, uint32_t len)
{
    uint8_t h[8] = {TM_MAGIC0, TM_MAGIC1, 0, 0, 0, 0, 0, 0};
    h[2] = type;
    h[3] = flags;
    put_u32(h + 4, len);
    board_write(h, sizeof(h));
    s_tx_crc = tm_crc32(0, h + 2, 6);
}

static void reply_data(const void *data, uint32_t n)
{
    board_write(data, n);
    s_tx_crc = tm_crc32(s_tx_crc, data, n);
}

static void reply_u32(uint32_t v)
{
    uint8_t b[4];
    put_u32(b, v);
    reply_data(b, 4);
}

static void reply_end(void)
{
    uint8_t b[4];
    put_u32(b, s_tx_crc);
    board_write(b, 4);
}

static void reply_error(uint8_t code, const char *msg)
{
    uint32_t n = (uint32_t)strlen(msg);
    reply_begin('e', 0, 1 + n);
    reply_data(&code, 1);
    reply_data(msg, n);
    reply_end();
}

/* ------------------------------------------------------------------ handlers */

static void kv(text_t *t, const char *key, const char *value)
{
    text_str(t, key);
    text_str(t, "=");
    text_str(t, value);
    text_str(t, "\n");
}

static void kv_u32(text_t *t, const char *key, uint32_t value)
{
    text_str(t, key);
    text_str(t, "=");
    text_u32(t, value);
    text_str(t, "\n");
}

static uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static void handle_info(void)
{
    static char buf[768];
    text_t t;
    int i;
    text_init(&t, buf, sizeof(buf));
    kv(&t, "firmware", "tierkit-kws " KWS_FIRMWARE_VERSION);
    kv(&t, "board", board_name());
    kv_u32(&t, "counter_hz", board_counter_hz());
    kv(&t, "counter_unit", board_counter_unit());
    kv_u32(&t, "classes", (uint32_t)model_num_classes());
    kv_u32(&t, "inputs", (uint32_t)model_input_size());
    text_str(&t, "input_scale_bits=");
    text_hex32(&t, float_bits(model_input_scale()));
    text_str(&t, "\ninput_zero_point=");
    text_i32(&t, model_input_zero_point());
    text_str(&t, "\noutput_scale_bits=");
    text_hex32(&t, float_bits(model_output_scale()));
    text_str(&t, "\noutput_zero_point=");
    text_i32(&t, model_output_zero_point());
    text_str(&t, "\n");
    kv_u32(&t, "arena_bytes", model_arena_bytes());
    kv_u32(&t, "const_bytes", model_const_bytes());
    kv_u32(&t, "max_payload", TM_MAX_PAYLOAD);
    kv_u32(&t, "stream_max_samples", TM_STREAM_MAX_SAMPLES);
    text_str(&t, "labels=");
    for (i = 0; i < model_num_classes(); i++) {
        if (i) text_str(&t, ",");
        text_str(&t, model_label(i));
    }
    text_str(&t, "\n");
    reply_begin('i', 0, (uint32_t)t.len);
    reply_data(buf, (uint32_t)t.len);
    reply_end();
}

static void handle_classify(uint8_t flags)
{
    int8_t scores[MODEL_MAX_CLASSES];
    app_timing_t tm;
    uint8_t head[4];
    uint16_t n_in = (uint16_t)model_input_size();
    uint8_t n_out = (uint8_t)model_num_classes();
    uint32_t len;
    if (s_len != 2u * KWS_CLIP_SAMPLES) {
        reply_error(TM_ERR_LENGTH, "classify takes 16000 int16 samples (32000 bytes)");
        return;
    }
    app_classify(s_rx.pcm, scores, &tm);
    if (tm.status != 0) {
        reply_error(TM_ERR_MODEL, "the model failed (an empty pooling window?)");
        return;
    }
    len = 4u + n_out + 12u + ((flags & 1u) ? n_in : 0u) + ((flags & 2u) ? 4u * n_in : 0u);
    head[0] = n_out; head[1] = flags & 3u; head[2] = (uint8_t)n_in; head[3] = (uint8_t)(n_in >> 8);
    reply_begin('s', flags & 3u, len);
    reply_data(head, 4);
    reply_data(scores, n_out);
    reply_u32(tm.feature_count);
    reply_u32(tm.invoke_count);
    reply_u32((uint32_t)tm.status);
    if (flags & 1u) reply_data(app_last_input(), n_in);
    if (flags & 2u) reply_data(app_last_features(), 4u * n_in);   /* little-endian float32 */
    reply_end();
}

static void handle_stream(uint8_t flags)
{
    static int8_t scores[MODEL_MAX_CLASSES];   /* the last inference's, kept across frames */
    app_timing_t tm;
    uint32_t samples, inferences, detections, len;
    uint8_t tail[2];
    int ran;
    if ((s_len & 1u) || s_len / 2u > TM_STREAM_MAX_SAMPLES) {
        reply_error(TM_ERR_LENGTH, "stream frames carry up to 4096 int16 samples");
        return;
    }
    if (flags & 4u) memset(scores, 0, sizeof(scores));
    ran = app_stream(s_rx.pcm, s_len / 2u, (flags & 4u) != 0, scores, &tm);
    app_stream_stats(&samples, &inferences, &detections);
    len = 16u + 2u + (uint32_t)model_num_classes() + ((flags & 1u) ? (uint32_t)model_input_size() : 0u);
    reply_begin('a', flags & 1u, len);
    reply_u32(samples);
    reply_u32(inferences);
    reply_u32(detections);
    reply_u32(ran ? tm.invoke_count : 0u);
    tail[0] = (uint8_t)ran;
    tail[1] = (uint8_t)model_num_classes();
    reply_data(tail, 2);
    reply_data(scores, (uint32_t)model_num_classes());
    if (flags & 1u) reply_data(app_last_input(), (uint32_t)model_input_size());
    reply_end();
}

static void handle_frame(void)
{
    uint8_t type = s_header[0], flags = s_header[1];
    if (type != 'L') app_set_live(0);
    switch (type) {
    case 'I': handle_info(); break;
    case 'C': handle_classify(flags); break;
    case 'A': handle_stream(flags); break;
    case 'L': {
        uint8_t st = app_set_live(1) == 0 ? 0 : 1;
        reply_begin('l', 0, 1);
        reply_data(&st, 1);
        reply_end();
        break;
    }
    case 'Q': {
        int code = s_len >= 1 ? s_rx.bytes[0] : 0;
        reply_begin('q', 0, 0);
        reply_end();
        board_exit(code);
        break;
    }
    default: reply_error(TM_ERR_TYPE, "unknown frame type; see firmware/src/test_mode.h"); break;
    }
}

/* ------------------------------------------------------------------ the parser */

void test_mode_init(void)
{
    s_state = HUNT0;
    s_got = 0;
}

static void byte_in(uint8_t c)
{
    switch (s_state) {
    case HUNT0:
        if (c == TM_MAGIC0) s_state = HUNT1;
        return;
    case HUNT1:
        s_state = c == TM_MAGIC1 ? HEADER : (c == TM_MAGIC0 ? HUNT1 : HUNT0);
        s_got = 0;
        return;
    case HEADER:
        s_header[s_got++] = c;
        if (s_got < 6) return;
        s_len = (uint32_t)s_header[2] | ((uint32_t)s_header[3] << 8) | ((uint32_t)s_header[4] << 16)
                | ((uint32_t)s_header[5] << 24);
        s_got = 0;
        if (s_len > TM_MAX_PAYLOAD) {
            reply_error(TM_ERR_TOO_LONG, "frame longer than max_payload; resynchronising");
            s_state = HUNT0;
            return;
        }
        s_state = s_len ? PAYLOAD : CRC;
        return;
    case PAYLOAD:
        s_rx.bytes[s_got++] = c;
        if (s_got == s_len) {
            s_state = CRC;
            s_got = 0;
        }
        return;
    default: /* CRC */
        s_crc_bytes[s_got++] = c;
        if (s_got < 4) return;
        s_state = HUNT0;
        {
            uint32_t want = (uint32_t)s_crc_bytes[0] | ((uint32_t)s_crc_bytes[1] << 8)
                            | ((uint32_t)s_crc_bytes[2] << 16) | ((uint32_t)s_crc_bytes[3] << 24);
            uint32_t have = tm_crc32(tm_crc32(0, s_header, 6), s_rx.bytes, s_len);
            if (want != have) reply_error(TM_ERR_CRC, "bad CRC; frame dropped");
            else handle_frame();
        }
        return;
    }
}

void test_mode_poll(void)
{
    uint8_t buf[64];
    size_t n, i;
    uint32_t now = board_millis();
    while ((n = board_read(buf, sizeof(buf))) > 0) {
        for (i = 0; i < n; i++) byte_in(buf[i]);
        now = board_millis();
        s_last_ms = now;
    }
    if (s_state != HUNT0 && s_state != HUNT1 && now - s_last_ms > TM_TIMEOUT_MS) {
        reply_error(TM_ERR_TIMEOUT, "incomplete frame timed out; dropped");
        s_state = HUNT0;
    }
}
