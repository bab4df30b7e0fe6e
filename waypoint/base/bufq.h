/*
 * wp_bufq: a bounded FIFO of fixed-size chunks (curl's bufq). Bytes in, bytes out; memory is
 * allocated chunk by chunk and bounded by max_chunks. Writing to a full queue returns -EAGAIN.
 * Freed chunks are kept on a small spare list (up to spare_max) to avoid allocator churn.
 */
#ifndef WP_BUFQ_H
#define WP_BUFQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct wp_bufq_chunk;

struct wp_bufq {
        struct wp_bufq_chunk *head, *tail, *spare;
        size_t chunk_size, max_chunks, nchunks, nspare, spare_max;
        size_t len; /* readable bytes */
};

/* Initialises an empty queue. chunk_size > 0, max_chunks > 0. Never fails (allocates lazily). */
void wp_bufq_init(struct wp_bufq *q, size_t chunk_size, size_t max_chunks);
/* Frees all chunks. The queue may be reused after wp_bufq_init(). */
void wp_bufq_done(struct wp_bufq *q);
static inline size_t wp_bufq_len(const struct wp_bufq *q)
{
        return q->len;
}
static inline bool wp_bufq_empty(const struct wp_bufq *q)
{
        return q->len == 0;
}
/* Capacity in bytes (chunk_size * max_chunks). */
size_t wp_bufq_capacity(const struct wp_bufq *q);
/* Bytes that can be written now without exceeding the bound. */
size_t wp_bufq_space(const struct wp_bufq *q);
/* Appends up to n bytes. Returns bytes written (> 0), -EAGAIN if full, -ENOMEM. */
ssize_t wp_bufq_write(struct wp_bufq *q, const uint8_t *data, size_t n);
/* Points *ret at the first contiguous readable run and returns its length (0 when empty). The
 * pointer is valid until the next write/skip/done on the queue. */
size_t wp_bufq_peek(const struct wp_bufq *q, const uint8_t **ret);
/* Copies up to n bytes out and removes them. Returns bytes read (0 when empty). */
size_t wp_bufq_read(struct wp_bufq *q, uint8_t *out, size_t n);
/* Removes n readable bytes (n <= len). */
void wp_bufq_skip(struct wp_bufq *q, size_t n);

#endif
