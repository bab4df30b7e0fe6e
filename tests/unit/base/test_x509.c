/* Tests for waypoint/base/x509.c: SPIFFE id parsing, URI SAN extraction, wp_read_file. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/x509.h"

static const char *pki_dir;

static void pki_setup(void)
{
        pki_dir = check_pki_dir("x509");
}

static void pki_teardown(void)
{
        check_pki_cleanup();
}

static X509 *load_cert(const char *name)
{
        char path[512];
        X509 *x;
        FILE *f;

        snprintf(path, sizeof(path), "%s/%s.pem", pki_dir, name);
        f = fopen(path, "r");
        if (!f)
                return NULL;
        x = PEM_read_X509(f, NULL, NULL, NULL);
        fclose(f);
        return x;
}

struct parse_case {
        const char *uri;
        bool ok;
        const char *td, *ns, *sa;
};

static const struct parse_case parse_cases[] = {
    {"spiffe://cluster.local/ns/default/sa/sleep", true, "cluster.local", "default", "sleep"},
    {"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-waypoint", true, "cluster.local", "bookinfo",
     "bookinfo-waypoint"},
    {"spiffe://td/ns/a/sa/b", true, "td", "a", "b"},
    {"spiffe://my_td-1.example/ns/n.s/sa/S_A-1", true, "my_td-1.example", "n.s", "S_A-1"},
    /* The literal words are path segments too: "ns" and "sa" as values are fine. */
    {"spiffe://td/ns/sa/sa/ns", true, "td", "sa", "ns"},
    {"", false},
    {"spiffe://", false},
    {"spiffe:///ns/a/sa/b", false},   /* empty trust domain */
    {"SPIFFE://td/ns/a/sa/b", false}, /* scheme must be lower-case */
    {"spiffe:/td/ns/a/sa/b", false},
    {"http://td/ns/a/sa/b", false},
    {"spiffe://Cluster.local/ns/a/sa/b", false}, /* upper-case trust domain */
    {"spiffe://td:8080/ns/a/sa/b", false},       /* port */
    {"spiffe://user@td/ns/a/sa/b", false},       /* userinfo */
    {"spiffe://td", false},
    {"spiffe://td/", false},
    {"spiffe://td/ns/a", false}, /* missing /sa/ */
    {"spiffe://td/ns/a/sa", false},
    {"spiffe://td/ns/a/sa/", false},    /* empty sa */
    {"spiffe://td/ns//sa/b", false},    /* empty ns */
    {"spiffe://td/ns/a/sa/b/", false},  /* trailing slash */
    {"spiffe://td/ns/a/sa/b/c", false}, /* extra segment */
    {"spiffe://td/ns/a/sa/b/x/y", false},
    {"spiffe://td/x/ns/a/sa/b", false}, /* segment before ns */
    {"spiffe://td/sa/b/ns/a", false},   /* wrong order */
    {"spiffe://td/NS/a/sa/b", false},
    {"spiffe://td/ns/a/sa/b?x=1", false},  /* query */
    {"spiffe://td/ns/a/sa/b#frag", false}, /* fragment */
    {"spiffe://td/ns/a%2Fb/sa/b", false},  /* percent-encoding */
    {"spiffe://td/ns/a/sa/b%20", false},
    {"spiffe://td/ns/./sa/b", false}, /* dot segments */
    {"spiffe://td/ns/../sa/b", false},
    {"spiffe://td/ns/a/sa/..", false},
    {"spiffe://td/ns/a b/sa/b", false}, /* space */
    {"spiffe://td/ns/a/sa/b\n", false},
    {"spiffe://cluster.local/sleep", false},
    {"spiffe://td/ns/\xc3\xa9/sa/b", false}, /* non-ASCII */
    {" spiffe://td/ns/a/sa/b", false},
};

static void test_spiffe_parse_table(void)
{
        size_t i;

        for (i = 0; i < sizeof(parse_cases) / sizeof(parse_cases[0]); i++) {
                const struct parse_case *c = &parse_cases[i];
                struct wp_spiffe_id id;
                int r;

                memset(&id, 0x5a, sizeof(id));
                r = wp_spiffe_parse(c->uri, strlen(c->uri), &id);
                if (c->ok) {
                        CHECK_INT_EQ(r, 0);
                        if (r == 0) {
                                CHECK_STR_EQ(id.td, c->td);
                                CHECK_STR_EQ(id.ns, c->ns);
                                CHECK_STR_EQ(id.sa, c->sa);
                        }
                } else {
                        if (r != -EINVAL)
                                fprintf(stderr, "accepted or wrong error: \"%s\"\n", c->uri);
                        CHECK_INT_EQ(r, -EINVAL);
                        /* ret untouched on failure */
                        CHECK(id.td[0] == 0x5a);
                }
        }
}

static void test_spiffe_parse_respects_length_not_nul(void)
{
        const char s[] = "spiffe://td/ns/a/sa/bEXTRA";
        const char nul[] = "spiffe://td/ns/a/sa/b\0c";
        struct wp_spiffe_id id;

        /* len stops before "EXTRA" */
        CHECK_INT_EQ(wp_spiffe_parse(s, strlen(s) - 5, &id), 0);
        CHECK_STR_EQ(id.sa, "b");
        /* An embedded NUL inside len is rejected, not truncated. */
        CHECK_INT_EQ(wp_spiffe_parse(nul, sizeof(nul) - 1, &id), -EINVAL);
        /* Truncated at every length: only the full string parses. */
        for (size_t n = 0; n < strlen(s) - 5; n++)
                CHECK_INT_EQ(wp_spiffe_parse(s, n, &id), -EINVAL);
        CHECK_INT_EQ(wp_spiffe_parse(NULL, 0, &id), -EINVAL);
        CHECK_INT_EQ(wp_spiffe_parse(s, strlen(s) - 5, NULL), 0);
}

static void test_spiffe_parse_enforces_field_limits(void)
{
        char buf[4096], td[WP_SPIFFE_TD_MAX + 2], seg[WP_SPIFFE_SEG_MAX + 2];
        struct wp_spiffe_id id;

        memset(td, 'a', sizeof(td));
        memset(seg, 'b', sizeof(seg));

        /* Longest accepted trust domain and segments. */
        snprintf(buf, sizeof(buf), "spiffe://%.*s/ns/%.*s/sa/%.*s", WP_SPIFFE_TD_MAX, td,
                 WP_SPIFFE_SEG_MAX, seg, WP_SPIFFE_SEG_MAX, seg);
        CHECK_INT_EQ(wp_spiffe_parse(buf, strlen(buf), &id), 0);
        CHECK_INT_EQ(strlen(id.td), WP_SPIFFE_TD_MAX);
        CHECK_INT_EQ(strlen(id.ns), WP_SPIFFE_SEG_MAX);
        CHECK_INT_EQ(strlen(id.sa), WP_SPIFFE_SEG_MAX);

        /* One more byte in any field is rejected. */
        snprintf(buf, sizeof(buf), "spiffe://%.*s/ns/a/sa/b", WP_SPIFFE_TD_MAX + 1, td);
        CHECK_INT_EQ(wp_spiffe_parse(buf, strlen(buf), &id), -EINVAL);
        snprintf(buf, sizeof(buf), "spiffe://td/ns/%.*s/sa/b", WP_SPIFFE_SEG_MAX + 1, seg);
        CHECK_INT_EQ(wp_spiffe_parse(buf, strlen(buf), &id), -EINVAL);
        snprintf(buf, sizeof(buf), "spiffe://td/ns/a/sa/%.*s", WP_SPIFFE_SEG_MAX + 1, seg);
        CHECK_INT_EQ(wp_spiffe_parse(buf, strlen(buf), &id), -EINVAL);

        /* A huge input is rejected without reading it all as a field. */
        {
                size_t big = 1 << 20;
                char *p = malloc(big);

                REQUIRE(p);
                memset(p, 'a', big);
                memcpy(p, "spiffe://", 9);
                CHECK_INT_EQ(wp_spiffe_parse(p, big, &id), -EINVAL);
                free(p);
        }
}

static void test_x509_spiffe_uri_extracts_single_uri(void)
{
        char out[512];
        X509 *x = load_cert("client");

        REQUIRE(x);
        CHECK_INT_EQ(wp_x509_spiffe_uri(x, out, sizeof(out)), 0);
        CHECK_STR_EQ(out, "spiffe://cluster.local/ns/default/sa/sleep");
        /* Exactly fits: strlen + NUL. */
        CHECK_INT_EQ(
            wp_x509_spiffe_uri(x, out, strlen("spiffe://cluster.local/ns/default/sa/sleep") + 1),
            0);
        CHECK_INT_EQ(
            wp_x509_spiffe_uri(x, out, strlen("spiffe://cluster.local/ns/default/sa/sleep")),
            -ENOSPC);
        CHECK_INT_EQ(wp_x509_spiffe_uri(x, out, 0), -ENOSPC);
        X509_free(x);

        x = load_cert("chained-waypoint");
        REQUIRE(x);
        CHECK_INT_EQ(wp_x509_spiffe_uri(x, out, sizeof(out)), 0);
        CHECK_STR_EQ(out, "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-waypoint");
        X509_free(x);
        CHECK_INT_EQ(ERR_peek_error(), 0);
}

static void test_x509_spiffe_uri_rejects_bad_sans(void)
{
        char out[512];
        X509 *x;

        /* DNS SAN only: no URI. */
        x = load_cert("no-san-client");
        REQUIRE(x);
        CHECK_INT_EQ(wp_x509_spiffe_uri(x, out, sizeof(out)), -ENOENT);
        X509_free(x);

        /* CA certs have no SAN extension at all. */
        x = load_cert("root");
        REQUIRE(x);
        CHECK_INT_EQ(wp_x509_spiffe_uri(x, out, sizeof(out)), -ENOENT);
        X509_free(x);

        x = load_cert("two-uri-client");
        REQUIRE(x);
        CHECK_INT_EQ(wp_x509_spiffe_uri(x, out, sizeof(out)), -EINVAL);
        X509_free(x);

        x = load_cert("bad-spiffe-client");
        REQUIRE(x);
        CHECK_INT_EQ(wp_x509_spiffe_uri(x, out, sizeof(out)), -EINVAL);
        X509_free(x);

        /* Other trust domain is still a valid SPIFFE id: the trust-domain policy is tls.c's. */
        x = load_cert("other-td-client");
        REQUIRE(x);
        CHECK_INT_EQ(wp_x509_spiffe_uri(x, out, sizeof(out)), 0);
        CHECK_STR_EQ(out, "spiffe://evil.example/ns/default/sa/sleep");
        X509_free(x);

        CHECK_INT_EQ(wp_x509_spiffe_uri(NULL, out, sizeof(out)), -EINVAL);
        CHECK_INT_EQ(ERR_peek_error(), 0);
}

static void test_mkpki_leaf_option_adds_leaf(void)
{
        const char *src = getenv("WP_TEST_SRCDIR");
        char cmd[1024], out[512];
        X509 *x;

        snprintf(cmd, sizeof(cmd),
                 "/usr/bin/python3 '%s/tools/mkpki.py' '%s' --leaf extra "
                 "spiffe://cluster.local/ns/extra/sa/extra-sa >&2",
                 src ? src : "tests", pki_dir);
        REQUIRE(system(cmd) == 0);
        x = load_cert("extra");
        REQUIRE(x);
        CHECK_INT_EQ(wp_x509_spiffe_uri(x, out, sizeof(out)), 0);
        CHECK_STR_EQ(out, "spiffe://cluster.local/ns/extra/sa/extra-sa");
        X509_free(x);
}

static void test_read_file_reads_whole_file(void)
{
        char path[512], *data = NULL;
        size_t len = 0;

        snprintf(path, sizeof(path), "%s/root.pem", pki_dir);
        CHECK_INT_EQ(wp_read_file(path, 1 << 20, &data, &len), 0);
        REQUIRE(data);
        CHECK(len > 100);
        CHECK_INT_EQ(strlen(data), len);
        CHECK(strncmp(data, "-----BEGIN CERTIFICATE-----", 27) == 0);
        wp_free(data);

        /* Exactly at the limit is fine; one byte less is -EFBIG. */
        data = NULL;
        CHECK_INT_EQ(wp_read_file(path, len, &data, NULL), 0);
        wp_free(data);
        data = NULL;
        CHECK_INT_EQ(wp_read_file(path, len - 1, &data, NULL), -EFBIG);
        CHECK(data == NULL);
        CHECK_INT_EQ(wp_read_file(path, 0, &data, NULL), -EFBIG);

        snprintf(path, sizeof(path), "%s/does-not-exist.pem", pki_dir);
        CHECK_INT_EQ(wp_read_file(path, 100, &data, &len), -ENOENT);
        CHECK_INT_EQ(wp_read_file(pki_dir, 100, &data, &len), -EISDIR);
}

static void test_read_file_handles_unsized_files(void)
{
        char *data = NULL;
        size_t len = 0;

        /* procfs reports st_size 0: the read loop must still get everything. */
        CHECK_INT_EQ(wp_read_file("/proc/self/status", 1 << 20, &data, &len), 0);
        REQUIRE(data);
        CHECK(len > 100);
        CHECK(strstr(data, "Name:") != NULL);
        wp_free(data);
        data = NULL;
        CHECK_INT_EQ(wp_read_file("/proc/self/status", 10, &data, &len), -EFBIG);
        CHECK_INT_EQ(wp_read_file("/dev/null", 10, &data, &len), 0);
        CHECK_INT_EQ(len, 0);
        CHECK_STR_EQ(data, "");
        wp_free(data);
}

static int read_file_body(void *arg)
{
        char *data = NULL;
        size_t len;
        int r = wp_read_file(arg, 1 << 20, &data, &len);

        if (r == 0)
                wp_free(data);
        return r;
}

static void test_read_file_failalloc(void)
{
        char path[512];

        snprintf(path, sizeof(path), "%s/client.pem", pki_dir);
        CHECK(check_failalloc_run(read_file_body, path) >= 1);
        CHECK(check_failalloc_run(read_file_body, "/proc/self/status") >= 2);
}

int main(void)
{
        pki_setup();
        RUN(test_spiffe_parse_table);
        RUN(test_spiffe_parse_respects_length_not_nul);
        RUN(test_spiffe_parse_enforces_field_limits);
        RUN(test_x509_spiffe_uri_extracts_single_uri);
        RUN(test_x509_spiffe_uri_rejects_bad_sans);
        RUN(test_mkpki_leaf_option_adds_leaf);
        RUN(test_read_file_reads_whole_file);
        RUN(test_read_file_handles_unsized_files);
        RUN(test_read_file_failalloc);
        pki_teardown();
        return check_exit();
}
