#include <errno.h>
#include <string.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/bufq.h"

static const uint8_t digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";

static void test_bufq_is_bounded_and_returns_eagain_when_full(void)
{
        struct wp_bufq q;

        wp_bufq_init(&q, 4, 3);
        CHECK_INT_EQ(wp_bufq_capacity(&q), 12);
        CHECK_INT_EQ(wp_bufq_space(&q), 12);
        CHECK(wp_bufq_empty(&q));
        CHECK_INT_EQ(wp_bufq_write(&q, digits, 10), 10);
        CHECK_INT_EQ(wp_bufq_len(&q), 10);
        CHECK_INT_EQ(wp_bufq_space(&q), 2);
        CHECK_INT_EQ(wp_bufq_write(&q, digits + 10, 5), 2); /* partial */
        CHECK_INT_EQ(wp_bufq_space(&q), 0);
        CHECK_INT_EQ(wp_bufq_write(&q, digits, 1), -EAGAIN);
        CHECK_INT_EQ(wp_bufq_len(&q), 12);
        CHECK_INT_EQ(q.nchunks, 3);
        wp_bufq_done(&q);
}

static void test_bufq_peek_and_skip_cross_chunks(void)
{
        struct wp_bufq q;
        const uint8_t *p;
        uint8_t out[16];

        wp_bufq_init(&q, 4, 4);
        CHECK_INT_EQ(wp_bufq_peek(&q, &p), 0);
        CHECK_INT_EQ(wp_bufq_write(&q, digits, 14), 14);
        REQUIRE(wp_bufq_peek(&q, &p) == 4);
        CHECK(memcmp(p, "0123", 4) == 0);
        wp_bufq_skip(&q, 3);
        REQUIRE(wp_bufq_peek(&q, &p) == 1);
        CHECK(p[0] == '3');
        wp_bufq_skip(&q, 3); /* crosses into the second chunk */
        REQUIRE(wp_bufq_peek(&q, &p) == 2);
        CHECK(memcmp(p, "67", 2) == 0);
        CHECK_INT_EQ(wp_bufq_len(&q), 8);
        /* a drained chunk frees room for a new one */
        CHECK_INT_EQ(wp_bufq_space(&q), 2 + 4);
        CHECK_INT_EQ(wp_bufq_read(&q, out, sizeof(out)), 8);
        CHECK(memcmp(out, "6789abcd", 8) == 0);
        CHECK(wp_bufq_empty(&q));
        CHECK_INT_EQ(q.nchunks, 0);
        CHECK_INT_EQ(wp_bufq_read(&q, out, sizeof(out)), 0);
        wp_bufq_done(&q);
}

static void test_bufq_fifo_order_over_many_cycles(void)
{
        struct wp_bufq q;
        uint8_t in[7], out[7];
        unsigned wseq = 0, rseq = 0;

        wp_bufq_init(&q, 5, 3);
        for (int round = 0; round < 200; round++) {
                for (size_t i = 0; i < sizeof(in); i++)
                        in[i] = (uint8_t)(wseq + i);
                ssize_t w = wp_bufq_write(&q, in, 1 + (size_t)round % sizeof(in));
                if (w > 0)
                        wseq += (unsigned)w;
                else
                        CHECK_INT_EQ(w, -EAGAIN);
                size_t r = wp_bufq_read(&q, out, 1 + (size_t)(round * 3) % sizeof(out));
                for (size_t i = 0; i < r; i++)
                        CHECK_INT_EQ(out[i], (uint8_t)(rseq + i));
                rseq += (unsigned)r;
                CHECK_INT_EQ(wp_bufq_len(&q), wseq - rseq);
                CHECK(q.nchunks <= 3 && q.nspare <= q.spare_max);
        }
        wp_bufq_done(&q);
}

static void test_bufq_write_reports_enomem(void)
{
        struct wp_bufq q;

        wp_bufq_init(&q, 4, 4);
        wp_alloc_fail_at(1);
        CHECK_INT_EQ(wp_bufq_write(&q, digits, 3), -ENOMEM);
        CHECK(wp_alloc_failed());
        CHECK_INT_EQ(wp_bufq_len(&q), 0);
        /* second chunk fails: the bytes that fit are reported */
        wp_alloc_fail_at(2);
        CHECK_INT_EQ(wp_bufq_write(&q, digits, 6), 4);
        wp_alloc_fail_at(0);
        CHECK_INT_EQ(wp_bufq_len(&q), 4);
        CHECK_INT_EQ(wp_bufq_write(&q, digits + 4, 2), 2);
        CHECK_INT_EQ(wp_bufq_len(&q), 6);
        wp_bufq_done(&q);
}

static void test_bufq_reuses_spare_chunks_without_allocating(void)
{
        struct wp_bufq q;
        uint8_t out[8];

        wp_bufq_init(&q, 4, 4);
        CHECK_INT_EQ(wp_bufq_write(&q, digits, 8), 8);
        CHECK_INT_EQ(wp_bufq_read(&q, out, 8), 8);
        CHECK_INT_EQ(q.nspare, 2);
        wp_alloc_fail_at(1); /* any allocation would fail now */
        CHECK_INT_EQ(wp_bufq_write(&q, digits, 8), 8);
        CHECK(!wp_alloc_failed());
        wp_alloc_fail_at(0);
        wp_bufq_done(&q);
        CHECK_INT_EQ(q.nspare, 0);
        CHECK(q.spare == NULL && q.head == NULL);
}

static int write_body(void *arg)
{
        struct wp_bufq q;
        uint8_t big[100];
        ssize_t w;

        memset(big, 'x', sizeof(big));
        wp_bufq_init(&q, 16, 8);
        w = wp_bufq_write(&q, big, sizeof(big));
        wp_bufq_done(&q);
        if (w < 0)
                return (int)w;
        return w == (ssize_t)sizeof(big) ? 0 : -ENOMEM;
}

static void test_bufq_failalloc_on_writes(void)
{
        CHECK_INT_EQ(check_failalloc_run(write_body, NULL), 7);
}

int main(void)
{
        RUN(test_bufq_is_bounded_and_returns_eagain_when_full);
        RUN(test_bufq_peek_and_skip_cross_chunks);
        RUN(test_bufq_fifo_order_over_many_cycles);
        RUN(test_bufq_write_reports_enomem);
        RUN(test_bufq_reuses_spare_chunks_without_allocating);
        RUN(test_bufq_failalloc_on_writes);
        return check_exit();
}
