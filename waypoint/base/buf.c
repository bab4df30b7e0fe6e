#include "waypoint/base/buf.h"

#include <errno.h>
#include <string.h>

#include "waypoint/base/alloc.h"

int wp_buf_init_alloc(struct wp_buf *b, size_t cap)
{
        uint8_t *mem = wp_malloc(cap);

        if (!mem)
                return -ENOMEM;
        wp_buf_wrap(b, mem, cap);
        return 0;
}

void wp_buf_done(struct wp_buf *b)
{
        if (!b)
                return;
        wp_free(b->begin);
        *b = (struct wp_buf){0};
}

void wp_buf_compact(struct wp_buf *b)
{
        size_t len = wp_buf_len(b);

        if (b->pos == b->begin)
                return;
        if (len)
                memmove(b->begin, b->pos, len);
        b->pos = b->begin;
        b->last = b->begin + len;
}

size_t wp_buf_append(struct wp_buf *b, const void *data, size_t n)
{
        size_t k = n;

        if (k > wp_buf_avail(b))
                k = wp_buf_avail(b);
        if (k) {
                memcpy(b->last, data, k);
                b->last += k;
        }
        return k;
}

void wp_buf_consume(struct wp_buf *b, size_t n)
{
        if (n > wp_buf_len(b))
                n = wp_buf_len(b);
        b->pos += n;
        if (b->pos == b->last)
                b->pos = b->last = b->begin;
}
