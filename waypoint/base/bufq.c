#include "waypoint/base/bufq.h"

#include <errno.h>
#include <string.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/util.h"

/* Readable bytes of a chunk are [r, w); free space is [w, chunk_size). */
struct wp_bufq_chunk {
        struct wp_bufq_chunk *next;
        size_t r, w;
        uint8_t data[];
};

void wp_bufq_init(struct wp_bufq *q, size_t chunk_size, size_t max_chunks)
{
        *q = (struct wp_bufq){
            .chunk_size = chunk_size,
            .max_chunks = max_chunks,
            .spare_max = WP_MIN(max_chunks, (size_t)2),
        };
}

static void chunk_list_free(struct wp_bufq_chunk *c)
{
        while (c) {
                struct wp_bufq_chunk *next = c->next;
                wp_free(c);
                c = next;
        }
}

void wp_bufq_done(struct wp_bufq *q)
{
        chunk_list_free(q->head);
        chunk_list_free(q->spare);
        q->head = q->tail = q->spare = NULL;
        q->nchunks = q->nspare = q->len = 0;
}

size_t wp_bufq_capacity(const struct wp_bufq *q)
{
        return q->chunk_size * q->max_chunks;
}

size_t wp_bufq_space(const struct wp_bufq *q)
{
        size_t n = 0;

        if (q->tail)
                n = q->chunk_size - q->tail->w;
        if (q->nchunks < q->max_chunks)
                n += (q->max_chunks - q->nchunks) * q->chunk_size;
        return n;
}

/* Appends an empty chunk at the tail. Returns 0, -EAGAIN at the bound, -ENOMEM. */
static int chunk_add(struct wp_bufq *q)
{
        struct wp_bufq_chunk *c;

        if (q->nchunks >= q->max_chunks)
                return -EAGAIN;
        if (q->spare) {
                c = q->spare;
                q->spare = c->next;
                q->nspare--;
        } else {
                c = wp_malloc(sizeof(*c) + q->chunk_size);
                if (!c)
                        return -ENOMEM;
        }
        c->next = NULL;
        c->r = c->w = 0;
        if (q->tail)
                q->tail->next = c;
        else
                q->head = c;
        q->tail = c;
        q->nchunks++;
        return 0;
}

/* Removes the (drained) head chunk, keeping it as a spare when there is room. */
static void chunk_pop(struct wp_bufq *q)
{
        struct wp_bufq_chunk *c = q->head;

        q->head = c->next;
        if (!q->head)
                q->tail = NULL;
        q->nchunks--;
        if (q->nspare < q->spare_max) {
                c->next = q->spare;
                q->spare = c;
                q->nspare++;
        } else {
                wp_free(c);
        }
}

ssize_t wp_bufq_write(struct wp_bufq *q, const uint8_t *data, size_t n)
{
        size_t done = 0;

        while (done < n) {
                if (!q->tail || q->tail->w == q->chunk_size) {
                        int r = chunk_add(q);
                        if (r < 0)
                                return done ? (ssize_t)done : r;
                }
                struct wp_bufq_chunk *c = q->tail;
                size_t k = WP_MIN(n - done, q->chunk_size - c->w);
                memcpy(c->data + c->w, data + done, k);
                c->w += k;
                done += k;
                q->len += k;
        }
        return (ssize_t)done;
}

size_t wp_bufq_peek(const struct wp_bufq *q, const uint8_t **ret)
{
        const struct wp_bufq_chunk *c = q->head;

        if (!c || c->r == c->w) {
                *ret = NULL;
                return 0;
        }
        *ret = c->data + c->r;
        return c->w - c->r;
}

void wp_bufq_skip(struct wp_bufq *q, size_t n)
{
        if (n > q->len)
                n = q->len;
        while (n > 0) {
                struct wp_bufq_chunk *c = q->head;
                size_t k = WP_MIN(n, c->w - c->r);
                c->r += k;
                q->len -= k;
                n -= k;
                if (c->r == c->w)
                        chunk_pop(q);
        }
        /* An empty head chunk left by a zero-length tail is recycled too. */
        if (q->len == 0 && q->head)
                while (q->head)
                        chunk_pop(q);
}

size_t wp_bufq_read(struct wp_bufq *q, uint8_t *out, size_t n)
{
        size_t done = 0;

        while (done < n && q->len > 0) {
                const uint8_t *p;
                size_t k = wp_bufq_peek(q, &p);
                k = WP_MIN(k, n - done);
                memcpy(out + done, p, k);
                wp_bufq_skip(q, k);
                done += k;
        }
        return done;
}
