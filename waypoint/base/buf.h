/*
 * wp_buf: a window over a byte array. Readable data is [pos, last), free space is [last, end)
 * (nghttp2_buf, ngx_buf_t). The buffer does not own memory unless created with wp_buf_new().
 */
#ifndef WP_BUF_H
#define WP_BUF_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct wp_buf {
        uint8_t *begin, *end; /* storage */
        uint8_t *pos, *last;  /* readable data */
};

static inline size_t wp_buf_len(const struct wp_buf *b)
{
        return (size_t)(b->last - b->pos);
}
static inline size_t wp_buf_avail(const struct wp_buf *b)
{
        return (size_t)(b->end - b->last);
}
static inline void wp_buf_wrap(struct wp_buf *b, uint8_t *mem, size_t cap)
{
        b->begin = b->pos = b->last = mem;
        b->end = mem + cap;
}
/* Allocates cap bytes of storage (wp_malloc). Returns 0 or -ENOMEM. */
int wp_buf_init_alloc(struct wp_buf *b, size_t cap);
/* Frees storage allocated by wp_buf_init_alloc(). NULL-safe, idempotent. */
void wp_buf_done(struct wp_buf *b);
/* Moves readable data to the start of storage to make room at the end. */
void wp_buf_compact(struct wp_buf *b);
/* Appends up to n bytes, returns the number appended (may be < n when full). */
size_t wp_buf_append(struct wp_buf *b, const void *data, size_t n);
/* Drops n readable bytes (n <= len). Resets pos/last to begin when empty. */
void wp_buf_consume(struct wp_buf *b, size_t n);

#endif
