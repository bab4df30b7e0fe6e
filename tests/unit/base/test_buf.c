#include <errno.h>
#include <string.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/buf.h"

static void test_buf_append_stops_when_full(void)
{
        uint8_t mem[8];
        struct wp_buf b;

        wp_buf_wrap(&b, mem, sizeof(mem));
        CHECK_INT_EQ(wp_buf_len(&b), 0);
        CHECK_INT_EQ(wp_buf_avail(&b), 8);
        CHECK_INT_EQ(wp_buf_append(&b, "hello", 5), 5);
        CHECK_INT_EQ(wp_buf_append(&b, "world", 5), 3);
        CHECK_INT_EQ(wp_buf_len(&b), 8);
        CHECK_INT_EQ(wp_buf_avail(&b), 0);
        CHECK_INT_EQ(wp_buf_append(&b, "x", 1), 0);
        CHECK(memcmp(b.pos, "hellowor", 8) == 0);
}

static void test_buf_consume_resets_when_empty(void)
{
        uint8_t mem[8];
        struct wp_buf b;

        wp_buf_wrap(&b, mem, sizeof(mem));
        wp_buf_append(&b, "abcdef", 6);
        wp_buf_consume(&b, 2);
        CHECK_INT_EQ(wp_buf_len(&b), 4);
        CHECK(b.pos == mem + 2);
        CHECK(memcmp(b.pos, "cdef", 4) == 0);
        wp_buf_consume(&b, 4);
        CHECK_INT_EQ(wp_buf_len(&b), 0);
        CHECK(b.pos == mem && b.last == mem);
        CHECK_INT_EQ(wp_buf_avail(&b), 8);
}

static void test_buf_compact_makes_room(void)
{
        uint8_t mem[8];
        struct wp_buf b;

        wp_buf_wrap(&b, mem, sizeof(mem));
        wp_buf_append(&b, "abcdefgh", 8);
        wp_buf_consume(&b, 5);
        CHECK_INT_EQ(wp_buf_avail(&b), 0);
        wp_buf_compact(&b);
        CHECK(b.pos == mem);
        CHECK_INT_EQ(wp_buf_len(&b), 3);
        CHECK_INT_EQ(wp_buf_avail(&b), 5);
        CHECK(memcmp(b.pos, "fgh", 3) == 0);
        CHECK_INT_EQ(wp_buf_append(&b, "12345", 5), 5);
        CHECK(memcmp(b.pos, "fgh12345", 8) == 0);
        /* compacting an already compact buffer changes nothing */
        wp_buf_compact(&b);
        CHECK(memcmp(b.pos, "fgh12345", 8) == 0);
}

static void test_buf_init_alloc_and_done(void)
{
        struct wp_buf b;

        REQUIRE(wp_buf_init_alloc(&b, 1024) == 0);
        CHECK_INT_EQ(wp_buf_avail(&b), 1024);
        CHECK_INT_EQ(wp_buf_append(&b, "x", 1), 1);
        wp_buf_done(&b);
        CHECK(b.begin == NULL);
        wp_buf_done(&b); /* idempotent */
        wp_buf_done(NULL);
}

static int alloc_body(void *arg)
{
        struct wp_buf b;
        int r = wp_buf_init_alloc(&b, 4096);

        if (r < 0)
                return r;
        wp_buf_done(&b);
        return 0;
}

static void test_buf_init_alloc_fails_cleanly(void)
{
        struct wp_buf b;

        wp_alloc_fail_at(1);
        CHECK_INT_EQ(wp_buf_init_alloc(&b, 64), -ENOMEM);
        wp_alloc_fail_at(0);
        CHECK_INT_EQ(check_failalloc_run(alloc_body, NULL), 1);
}

int main(void)
{
        RUN(test_buf_append_stops_when_full);
        RUN(test_buf_consume_resets_when_empty);
        RUN(test_buf_compact_makes_room);
        RUN(test_buf_init_alloc_and_done);
        RUN(test_buf_init_alloc_fails_cleanly);
        return check_exit();
}
