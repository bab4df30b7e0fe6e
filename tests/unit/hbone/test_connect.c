/* hbone_target_parse / hbone_target_format: accept/reject tables. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>

#include "check.h"
#include "hbone/hbone.h"

struct accept_case {
        const char *in;
        const char *host;
        unsigned port;
        bool is_ip;
};

static void test_connect_accepts_valid_authorities(void)
{
        static const struct accept_case cases[] = {
                {"10.96.3.4:80", "10.96.3.4", 80, true},
                {"1.2.3.4:1", "1.2.3.4", 1, true},
                {"255.255.255.255:65535", "255.255.255.255", 65535, true},
                {"0.0.0.0:15008", "0.0.0.0", 15008, true},
                {"[::1]:80", "::1", 80, true},
                {"[fd00::1:2]:8080", "fd00::1:2", 8080, true},
                {"[::ffff:1.2.3.4]:443", "::ffff:1.2.3.4", 443, true},
                {"reviews.default.svc.cluster.local:9080", "reviews.default.svc.cluster.local",
                 9080, false},
                {"a:1", "a", 1, false},
                {"my-svc:80", "my-svc", 80, false},
                {"X1.Example.COM:443", "X1.Example.COM", 443, false},
                {"1.2.3.4:0080", "1.2.3.4", 80, true},
                {"host.1a:5", "host.1a", 5, false},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct hbone_target t;
                int r = hbone_target_parse(cases[i].in, strlen(cases[i].in), &t);

                CHECK_INT_EQ(r, 0);
                if (r < 0) {
                        fprintf(stderr, "  rejected: %s\n", cases[i].in);
                        continue;
                }
                CHECK_STR_EQ(t.host, cases[i].host);
                CHECK_INT_EQ(t.port, cases[i].port);
                CHECK_INT_EQ(t.is_ip, cases[i].is_ip);
                if (t.is_ip) {
                        int fam = ((struct sockaddr *)&t.addr)->sa_family;
                        CHECK(fam == AF_INET || fam == AF_INET6);
                        if (fam == AF_INET)
                                CHECK_INT_EQ(ntohs(((struct sockaddr_in *)&t.addr)->sin_port),
                                             cases[i].port);
                        else
                                CHECK_INT_EQ(ntohs(((struct sockaddr_in6 *)&t.addr)->sin6_port),
                                             cases[i].port);
                }
        }
}

static void test_connect_rejects_invalid_authorities(void)
{
        static const char *const cases[] = {
                "",
                ":",
                ":80",
                "1.2.3.4",
                "1.2.3.4:",
                "1.2.3.4:0",
                "1.2.3.4:65536",
                "1.2.3.4:99999",
                "1.2.3.4:000080",
                "1.2.3.4:8a",
                "1.2.3.4:-1",
                "1.2.3.4:+80",
                "1.2.3.4: 80",
                " 1.2.3.4:80",
                "1.2.3.4:80 ",
                "user@1.2.3.4:80",
                "1.2.3.4:80/path",
                "host/x:80",
                "host?q:80",
                "::1:80",
                "fd00::1",
                "[::1]",
                "[::1]:",
                "[::1:80",
                "::1]:80",
                "[::1]80",
                "[]:80",
                "[1.2.3.4]:80",
                "[fe80::1%eth0]:80",
                "[::1]:80:90",
                "1.2.3.256:80",
                "01.2.3.4:80",
                "1.2.3:80",
                "-host:80",
                "host-:80",
                "ho_st:80",
                "host..x:80",
                ".host:80",
                "host.:80",
                "a.b.123:80",
                "http://1.2.3.4:80",
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct hbone_target t;
                int r = hbone_target_parse(cases[i], strlen(cases[i]), &t);

                CHECK_INT_EQ(r, -EINVAL);
                if (r != -EINVAL)
                        fprintf(stderr, "  accepted: \"%s\"\n", cases[i]);
        }
}

static void test_connect_rejects_embedded_nul(void)
{
        struct hbone_target t;

        CHECK_INT_EQ(hbone_target_parse("1.2.3.4\0:80", 11, &t), -EINVAL);
        CHECK_INT_EQ(hbone_target_parse("ho\0st:80", 8, &t), -EINVAL);
        CHECK_INT_EQ(hbone_target_parse("[::1\0]:80", 9, &t), -EINVAL);
        /* len is authoritative: a shorter len cuts the port */
        CHECK_INT_EQ(hbone_target_parse("1.2.3.4:80", 8, &t), -EINVAL);
        CHECK_INT_EQ(hbone_target_parse("1.2.3.4:80", 9, &t), 0);
        CHECK_INT_EQ(t.port, 8);
}

static void test_connect_rejects_oversized(void)
{
        char buf[600], label[70];
        struct hbone_target t;
        size_t n;

        /* label of 63 ok, 64 not */
        memset(label, 'a', 63);
        label[63] = 0;
        n = (size_t)snprintf(buf, sizeof(buf), "%s.example:80", label);
        CHECK_INT_EQ(hbone_target_parse(buf, n, &t), 0);
        n = (size_t)snprintf(buf, sizeof(buf), "%sa.example:80", label);
        CHECK_INT_EQ(hbone_target_parse(buf, n, &t), -EINVAL);

        /* host of 255 bytes ok (4 labels of 63 + 3 dots), 256 not */
        n = (size_t)snprintf(buf, sizeof(buf), "%s.%s.%s.%s:443", label, label, label, label);
        CHECK_INT_EQ(n, 255 + 4);
        CHECK_INT_EQ(hbone_target_parse(buf, n, &t), 0);
        CHECK_INT_EQ(strlen(t.host), 255);
        n = (size_t)snprintf(buf, sizeof(buf), "%s.%s.%s.%s.b:443", label, label, label, label);
        CHECK_INT_EQ(hbone_target_parse(buf, n, &t), -EINVAL);

        memset(buf, '1', sizeof(buf));
        CHECK_INT_EQ(hbone_target_parse(buf, sizeof(buf), &t), -EINVAL);
        memcpy(buf, "[::1]:", 6);
        CHECK_INT_EQ(hbone_target_parse(buf, 12, &t), -EINVAL);
}

static void test_connect_format_roundtrips(void)
{
        struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons(15008)};
        struct sockaddr_in6 sin6 = {.sin6_family = AF_INET6, .sin6_port = htons(80)};
        struct sockaddr sa = {.sa_family = AF_UNIX};
        struct hbone_target t;
        char out[64];

        inet_pton(AF_INET, "10.1.2.3", &sin.sin_addr);
        CHECK_INT_EQ(hbone_target_format((struct sockaddr *)&sin, out, sizeof(out)), 14);
        CHECK_STR_EQ(out, "10.1.2.3:15008");
        CHECK_INT_EQ(hbone_target_parse(out, strlen(out), &t), 0);
        CHECK(memcmp(&t.addr, &sin, sizeof(sin)) == 0);

        inet_pton(AF_INET6, "fd00::7", &sin6.sin6_addr);
        CHECK_INT_EQ(hbone_target_format((struct sockaddr *)&sin6, out, sizeof(out)), 12);
        CHECK_STR_EQ(out, "[fd00::7]:80");
        CHECK_INT_EQ(hbone_target_parse(out, strlen(out), &t), 0);
        CHECK(memcmp(&((struct sockaddr_in6 *)&t.addr)->sin6_addr, &sin6.sin6_addr, 16) == 0);

        CHECK_INT_EQ(hbone_target_format((struct sockaddr *)&sin, out, 14), -ENOSPC);
        CHECK_INT_EQ(hbone_target_format((struct sockaddr *)&sin, out, 15), 14);
        CHECK_INT_EQ(hbone_target_format((struct sockaddr *)&sin, out, 16), 14);
        CHECK_INT_EQ(hbone_target_format(&sa, out, sizeof(out)), -EINVAL);
}

int main(void)
{
        RUN(test_connect_accepts_valid_authorities);
        RUN(test_connect_rejects_invalid_authorities);
        RUN(test_connect_rejects_embedded_nul);
        RUN(test_connect_rejects_oversized);
        RUN(test_connect_format_roundtrips);
        return check_exit();
}
