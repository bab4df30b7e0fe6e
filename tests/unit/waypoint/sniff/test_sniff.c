/* wp_l7_sniff_proto: the http_inspector-like classification of a tunnel's first bytes, fed
 * whole and growing byte by byte (every prefix of an HTTP start must stay undecided). */
#include <string.h>

#include "tests/lib/check.h"
#include "waypoint/l7.h"

struct sniff_case {
        const char *bytes;
        const char *want; /* with all bytes, not final */
        const char *want_final;
        size_t len; /* 0: strlen(bytes) */
};

static const struct sniff_case cases[] = {
        {"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "'h2c'", "'h2c'"},
        {"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04", "'h2c'", "'h2c'",
         28},                             /* holds a NUL */
        {"PRI * HTTP/2.0\r\n", NULL, ""}, /* a preface cut short */
        {"GET / HTTP/1.1\r\n", "'http/1.1'", "'http/1.1'"},
        {"GET / HTTP/1.1\n", "'http/1.1'", "'http/1.1'"},
        {"POST /a?b=c HTTP/1.0\r\nHost: x\r\n", "'http/1.0'", "'http/1.0'"},
        {"M-SEARCH * HTTP/1.1\r\n", "'http/1.1'", "'http/1.1'"},
        {"OPTIONS http://h/x HTTP/1.1\r\n", "'http/1.1'", "'http/1.1'"},
        {"GET / HTTP/1.1", NULL, ""}, /* no line end yet */
        {"GET /x", NULL, ""},         /* target not finished */
        {"GET", NULL, ""},
        {"GET / HTTP/2.0\r\n", "", ""}, /* not HTTP/1.x */
        {"GET / HTTP/1.2\r\n", "", ""},
        {"GET / SPDY/3\r\n", "", ""},
        {"GET  / HTTP/1.1\r\n", "", ""}, /* empty target */
        {"GET / HTTP/1.1 \r\n", "", ""},
        {"get / HTTP/1.1\r\n", "'http/1.1'", "'http/1.1'"}, /* methods are tokens */
        {" GET / HTTP/1.1\r\n", "", ""},
        {"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "", ""}, /* TLS ClientHello */
        {"HELO mail.example\r\n", "", ""},
        {"SSH-2.0-OpenSSH_9.2\r\n", "", ""},
        {"GET /\x01x HTTP/1.1\r\n", "", ""}, /* control character in the target */
        {"", NULL, ""},
};

static void test_table(void)
{
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                const struct sniff_case *c = &cases[i];
                size_t n = c->len ? c->len : strlen(c->bytes);
                const uint8_t *p = (const uint8_t *)c->bytes;
                const char *got, *gotf;

                got = wp_l7_sniff_proto(p, n, false);
                gotf = wp_l7_sniff_proto(p, n, true);
                CHECK((got == NULL) == (c->want == NULL));
                if (got && c->want)
                        CHECK(strcmp(got, c->want) == 0);
                REQUIRE(gotf != NULL);
                CHECK(strcmp(gotf, c->want_final) == 0);
        }
}

/* Bytes arriving one at a time: an HTTP start is undecided until its line ends, and the
 * decision, once made, does not change as more bytes come. */
static void test_prefixes(void)
{
        static const char *const starts[] = {
                "GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n",
                "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        };

        for (size_t s = 0; s < 2; s++) {
                const uint8_t *p = (const uint8_t *)starts[s];
                size_t len = strlen(starts[s]), decided_at = 0;
                const char *first = NULL;

                for (size_t n = 1; n <= len; n++) {
                        const char *got = wp_l7_sniff_proto(p, n, false);

                        if (!first && got) {
                                first = got;
                                decided_at = n;
                        } else if (first) {
                                CHECK(got && strcmp(got, first) == 0);
                        }
                }
                REQUIRE(first != NULL);
                CHECK(strcmp(first, s == 0 ? "'http/1.1'" : "'h2c'") == 0);
                /* decided exactly at the line end / the preface's last byte */
                CHECK(decided_at == (s == 0 ? strlen("GET /index.html HTTP/1.1\r") : 24));
        }
}

/* A request-target longer than the sniffing limit is not taken as HTTP. */
static void test_limits(void)
{
        static uint8_t buf[9000];

        memcpy(buf, "GET /", 5);
        memset(buf + 5, 'a', sizeof(buf) - 5);
        CHECK(wp_l7_sniff_proto(buf, 4000, false) == NULL);
        CHECK(strcmp(wp_l7_sniff_proto(buf, sizeof(buf), false), "") == 0);
        memset(buf, 'A', 40); /* a 40-character "method" */
        CHECK(strcmp(wp_l7_sniff_proto(buf, 40, false), "") == 0);
}

int main(void)
{
        RUN(test_table);
        RUN(test_prefixes);
        RUN(test_limits);
        return check_exit();
}
