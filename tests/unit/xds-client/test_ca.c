/*
 * Tests for xds-client/ca.c against tests/tools/fake_ca.py (grpcio over TLS on a random
 * 127.x.y.z address), with the PKI from tests/tools/mkpki.py. Skips (77) when /usr/bin/python3
 * lacks grpc, protobuf or cryptography.
 */
#include "xds-client/ca.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/x509.h"

#define SPIFFE     "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-waypoint"
#define TOKEN      "good-token"
#define ISTIOD_DNS "istiod.istio-system.svc"

static char dir[] = "/tmp/wp-test-ca-XXXXXX";
static char token_path[256], mode_path[256], log_path[256], log_bad_path[256];
static char *root_pem;
static unsigned char ip_net; /* our 127.<ip_net>.x.y */

struct fake {
        pid_t pid;
        char addr[64];
};
static struct fake good_ca, untrusted_ca, raw_ca;

/* ---- helpers -------------------------------------------------------------------------------- */

static void write_file(const char *path, const char *data)
{
        char tmp[300];
        FILE *f;

        snprintf(tmp, sizeof(tmp), "%s.tmp", path);
        f = fopen(tmp, "w");
        if (!f || fputs(data, f) < 0 || fclose(f) != 0 || rename(tmp, path) != 0) {
                perror(path);
                exit(99);
        }
}

static char *slurp(const char *path)
{
        char *buf = NULL;
        size_t len;

        if (wp_read_file(path, 1 << 24, &buf, &len) < 0)
                return NULL;
        return buf;
}

static void set_mode(const char *mode)
{
        write_file(mode_path, mode);
}

static void clear_log(void)
{
        write_file(log_path, "");
}

static int count_lines(const char *s)
{
        int n = 0;

        for (; s && *s; s++)
                n += *s == '\n';
        return n;
}

static int start_fake(const char *issuer, const char *log, bool raw, struct fake *ret)
{
        char listen[64], ready[300], script[512], *port;
        const char *src = getenv("WP_TEST_SRCDIR");
        static int n;
        pid_t pid;

        snprintf(listen, sizeof(listen), "127.%u.%u.%u:0", ip_net, (unsigned)(getpid() % 250) + 1,
                 ++n);
        snprintf(ready, sizeof(ready), "%s/ready-%d", dir, n);
        snprintf(script, sizeof(script), "%s/tools/fake_ca.py", src ? src : "tests");
        pid = fork();
        if (pid < 0)
                return -errno;
        if (pid == 0) {
                execl("/usr/bin/python3", "python3", script, "--pki", dir, "--listen", listen,
                      "--ready", ready, "--token", TOKEN, "--log", log, "--mode-file", mode_path,
                      "--serving-issuer", issuer, "--slow-seconds", "3",
                      raw ? "--raw" : (char *)NULL, (char *)NULL);
                _exit(127);
        }
        for (int i = 0; i < 600; i++) { /* 30 s: grpcio starts slowly under load */
                int st;

                if (waitpid(pid, &st, WNOHANG) == pid) {
                        fprintf(stderr, "fake_ca.py exited early (status %d)\n", st);
                        return -ECHILD;
                }
                port = slurp(ready);
                if (port) {
                        char *colon = strrchr(listen, ':');

                        *colon = 0;
                        snprintf(ret->addr, sizeof(ret->addr), "%s:%d", listen, atoi(port));
                        free(port);
                        ret->pid = pid;
                        return 0;
                }
                usleep(50000);
        }
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return -ETIMEDOUT;
}

static void stop_fake(struct fake *f)
{
        if (f->pid > 0) {
                kill(f->pid, SIGTERM);
                waitpid(f->pid, NULL, 0);
                f->pid = 0;
        }
}

static struct xds_ca_config base_cfg(void)
{
        return (struct xds_ca_config){
            .address = good_ca.addr,
            .root_pem = root_pem,
            .token_path = token_path,
            .cluster_id = "Kubernetes",
            .spiffe_uri = SPIFFE,
            .ttl_seconds = 3600,
            .timeout_ms = 15000,
            .tls_server_name = ISTIOD_DNS,
        };
}

static int count_certs(const char *pem)
{
        int n = 0;

        for (const char *p = pem; p && (p = strstr(p, "-----BEGIN CERTIFICATE-----")); p++)
                n++;
        return n;
}

/* Checks a returned certificate: key matches the leaf, SAN, lifetime, chain shape. */
static void check_cert(const struct xds_ca_cert *c, uint32_t ttl, int chain_certs, int root_certs)
{
        char uri[256];
        BIO *bio;
        X509 *leaf;
        EVP_PKEY *key;
        time_t now = time(NULL);

        REQUIRE(c->key_pem && c->chain_pem && c->root_pem);
        CHECK(strncmp(c->key_pem, "-----BEGIN PRIVATE KEY-----", 27) == 0); /* PKCS#8 */
        CHECK_INT_EQ(count_certs(c->chain_pem), chain_certs);
        CHECK_INT_EQ(count_certs(c->root_pem), root_certs);
        CHECK(strstr(c->root_pem, root_pem) != NULL ||
              strncmp(c->root_pem, root_pem, strlen(root_pem)) == 0);
        bio = BIO_new_mem_buf(c->chain_pem, -1);
        leaf = PEM_read_bio_X509(bio, NULL, NULL, NULL);
        BIO_free(bio);
        bio = BIO_new_mem_buf(c->key_pem, -1);
        key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
        BIO_free(bio);
        REQUIRE(leaf && key);
        CHECK(EVP_PKEY_eq(X509_get0_pubkey(leaf), key) == 1);
        CHECK(EVP_PKEY_get_base_id(key) == EVP_PKEY_EC);
        CHECK_INT_EQ(EVP_PKEY_get_bits(key), 256);
        CHECK_INT_EQ(wp_x509_spiffe_uri(leaf, uri, sizeof(uri)), 0);
        CHECK_STR_EQ(uri, SPIFFE);
        CHECK(llabs((long long)(c->not_after - (now + (time_t)ttl))) <= 120);
        CHECK(c->not_before <= now && c->not_before > now - 600);
        X509_free(leaf);
        EVP_PKEY_free(key);
}

/* ---- tests ---------------------------------------------------------------------------------- */

static void test_request_returns_leaf_with_our_key_and_san(void)
{
        struct xds_ca_config cfg = base_cfg();
        struct xds_ca_cert c = {0};
        char *desc = NULL, *log;

        set_mode("normal");
        clear_log();
        int r = xds_ca_request(&cfg, &c, &desc);
        CHECK_INT_EQ(r, 0);
        if (r < 0)
                fprintf(stderr, "  desc: %s\n", desc ? desc : "(null)");
        CHECK(desc == NULL);
        check_cert(&c, 3600, 1, 1);
        CHECK_STR_EQ(c.root_pem, root_pem);
        xds_ca_cert_done(&c);
        CHECK(c.key_pem == NULL && c.chain_pem == NULL && c.root_pem == NULL);
        wp_free(desc);

        /* What the CA saw: our metadata, TTL and a ztunnel-shaped CSR. */
        log = slurp(log_path);
        REQUIRE(log);
        CHECK_INT_EQ(count_lines(log), 1);
        CHECK(strstr(log, "\"authorization\": \"Bearer " TOKEN "\"") != NULL);
        CHECK(strstr(log, "\"clusterid\": \"Kubernetes\"") != NULL);
        CHECK(strstr(log, "\"validity_duration\": 3600") != NULL);
        CHECK(strstr(log, "\"csr_check\": \"ok\"") != NULL);
        CHECK(strstr(log, "\"csr_uri\": [\"" SPIFFE "\"]") != NULL);
        CHECK(strstr(log, "\"has_metadata\": false") != NULL);
        free(log);
}

static void test_request_defaults_ttl_to_one_day(void)
{
        struct xds_ca_config cfg = base_cfg();
        struct xds_ca_cert c = {0};
        char *desc = NULL, *log;

        cfg.ttl_seconds = 0;
        cfg.cluster_id = NULL;
        set_mode("normal");
        clear_log();
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, &desc), 0);
        check_cert(&c, 86400, 1, 1);
        xds_ca_cert_done(&c);
        wp_free(desc);
        log = slurp(log_path);
        REQUIRE(log);
        CHECK(strstr(log, "\"validity_duration\": 86400") != NULL);
        CHECK(strstr(log, "\"clusterid\": null") != NULL);
        free(log);
}

static void test_request_accepts_intermediate_and_root_bundles(void)
{
        static const struct {
                const char *mode;
                int chain, roots;
        } cases[] = {
            {"intermediate", 2, 1}, /* leaf + intermediate; root */
            {"multi-root", 1, 2},   /* istiod expands a root bundle into trailing elements */
            {"concatenated", 2, 1}, /* [leaf, intermediate + root] in one element */
        };

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct xds_ca_config cfg = base_cfg();
                struct xds_ca_cert c = {0};
                char *desc = NULL;
                int r;

                set_mode(cases[i].mode);
                r = xds_ca_request(&cfg, &c, &desc);
                CHECK_INT_EQ(r, 0);
                if (r < 0)
                        fprintf(stderr, "  %s: %s\n", cases[i].mode, desc ? desc : "(null)");
                if (r == 0)
                        check_cert(&c, 3600, cases[i].chain, cases[i].roots);
                xds_ca_cert_done(&c);
                wp_free(desc);
        }
}

static void test_request_rereads_token_each_call(void)
{
        struct xds_ca_config cfg = base_cfg();
        struct xds_ca_cert c = {0};
        char *desc = NULL, *log, *first, *second;

        set_mode("normal");
        clear_log();
        write_file(token_path, "  " TOKEN "\n");
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, &desc), 0);
        xds_ca_cert_done(&c);
        wp_free(desc);
        desc = NULL;

        /* kubelet rotated the token: the next call must send the new one (and fail here). */
        write_file(token_path, "rotated-token\r\n");
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, &desc), -EACCES);
        CHECK(c.key_pem == NULL);
        wp_free(desc);
        write_file(token_path, TOKEN "\n");

        log = slurp(log_path);
        REQUIRE(log);
        CHECK_INT_EQ(count_lines(log), 2);
        first = strstr(log, "\"Bearer " TOKEN "\"");
        second = strstr(log, "\"Bearer rotated-token\"");
        CHECK(first && second && first < second);
        free(log);
}

static void test_wrong_token_is_eacces_with_grpc_message(void)
{
        struct xds_ca_config cfg = base_cfg();
        struct xds_ca_cert c = {0};
        char *desc = NULL;

        set_mode("normal");
        write_file(token_path, "not-the-token");
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, &desc), -EACCES);
        REQUIRE(desc);
        CHECK(strstr(desc, "token not accepted (fake_ca)") != NULL);
        CHECK(strstr(desc, "16") != NULL); /* UNAUTHENTICATED */
        wp_free(desc);
        write_file(token_path, TOKEN "\n");
}

/* gRPC statuses the CA may answer, and answers that must not be accepted. */
static void test_bad_answers_map_to_errnos(void)
{
        static const struct {
                const char *mode;
                int err;
                const char *desc;
        } cases[] = {
            {"deny", -EACCES, "denied by fake_ca"},
            {"internal", -EIO, "CSR signing error (fake)"},
            {"garbage", -EPROTO, "not a PEM certificate"},
            {"wrong-san", -EPROTO, "spiffe://cluster.local/ns/evil/sa/other"},
            {"wrong-key", -EPROTO, "not for our key"},
            {"untrusted-chain", -EPROTO, "does not verify"},
            {"leaf-only", -EPROTO, "does not end with a root"},
            {"empty", -EPROTO, "empty cert_chain"},
            {"oversize", -EPROTO, "larger than"},
        };

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct xds_ca_config cfg = base_cfg();
                struct xds_ca_cert c = {0};
                char *desc = NULL;
                int r;

                set_mode(cases[i].mode);
                r = xds_ca_request(&cfg, &c, &desc);
                CHECK_INT_EQ(r, cases[i].err);
                CHECK(c.key_pem == NULL && c.chain_pem == NULL);
                CHECK(desc && strstr(desc, cases[i].desc));
                if (getenv("WP_TEST_VERBOSE") || r != cases[i].err || !desc ||
                    !strstr(desc, cases[i].desc))
                        fprintf(stderr, "  mode %s: %d %s\n", cases[i].mode, r,
                                desc ? desc : "(null)");
                wp_free(desc);
        }
}

/* Answers grpcio would never send, from the python3-h2 server. */
static void test_hostile_http2_answers_are_rejected(void)
{
        static const struct {
                const char *mode;
                int err;
                const char *desc;
        } cases[] = {
            {"raw-ok", 0, NULL},
            {"raw-http-500", -EPROTO, "HTTP status 500"},
            {"raw-http-401", -EACCES, "HTTP status 401"},
            {"raw-undecodable", -EPROTO, "undecodable"},
            {"raw-percent-message", -EACCES, "bad token?%zz%"},
            {"raw-no-status", -EPROTO, "without grpc-status"},
            {"raw-bad-status", -EPROTO, "bad grpc-status"},
            {"raw-dup-status", -EPROTO, "bad grpc-status"},
            {"raw-compressed", -EPROTO, "compressed"},
            {"raw-short-frame", -EPROTO, "framing"},
            {"raw-two-messages", -EPROTO, "framing"},
            {"raw-no-message", -EPROTO, "no response message"},
            {"raw-content-type", -EPROTO, "content-type"},
            {"raw-http1", -EPROTO, "HTTP/2"},
            {"wrong-san", -EPROTO, "evil"},
        };

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct xds_ca_config cfg = base_cfg();
                struct xds_ca_cert c = {0};
                char *desc = NULL;
                int r;

                cfg.address = raw_ca.addr;
                set_mode(cases[i].mode);
                r = xds_ca_request(&cfg, &c, &desc);
                CHECK_INT_EQ(r, cases[i].err);
                if (cases[i].desc)
                        CHECK(desc && strstr(desc, cases[i].desc));
                if (r == 0)
                        check_cert(&c, 3600, 1, 1);
                else
                        CHECK(c.key_pem == NULL);
                if (getenv("WP_TEST_VERBOSE") || r != cases[i].err ||
                    (cases[i].desc && (!desc || !strstr(desc, cases[i].desc))))
                        fprintf(stderr, "  mode %s: %d %s\n", cases[i].mode, r,
                                desc ? desc : "(null)");
                xds_ca_cert_done(&c);
                wp_free(desc);
        }
        set_mode("normal");
}

static void test_untrusted_server_certificate_is_transport_error(void)
{
        struct xds_ca_config cfg = base_cfg();
        struct xds_ca_cert c = {0};
        char *desc = NULL, *log;

        write_file(log_bad_path, "");
        cfg.address = untrusted_ca.addr;
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, &desc), -EKEYREJECTED);
        CHECK(desc && strstr(desc, untrusted_ca.addr));
        wp_free(desc);
        log = slurp(log_bad_path);
        CHECK(log && log[0] == 0); /* never got as far as the request */
        free(log);
}

static void test_server_name_is_checked(void)
{
        struct xds_ca_config cfg = base_cfg();
        struct xds_ca_cert c = {0};
        char *desc = NULL;

        set_mode("normal");
        cfg.tls_server_name = "istiod.other-ns.svc";
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, &desc), -EKEYREJECTED);
        wp_free(desc);
        desc = NULL;
        /* Without tls_server_name the address's host (an IP the certificate does not name). */
        cfg.tls_server_name = NULL;
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, &desc), -EKEYREJECTED);
        wp_free(desc);
}

static void test_missing_token_file_is_enoent(void)
{
        struct xds_ca_config cfg = base_cfg();
        struct xds_ca_cert c = {0};
        char *desc = NULL, missing[300];

        snprintf(missing, sizeof(missing), "%s/no-such-token", dir);
        cfg.token_path = missing;
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, &desc), -ENOENT);
        CHECK(desc && strstr(desc, "no-such-token"));
        wp_free(desc);
}

static void test_bad_token_contents_are_einval(void)
{
        static const char *const tokens[] = {"", " \n\t",
                                             "abc\x01"
                                             "def",
                                             "abc\ndef"};

        for (size_t i = 0; i < sizeof(tokens) / sizeof(tokens[0]); i++) {
                struct xds_ca_config cfg = base_cfg();
                struct xds_ca_cert c = {0};
                char *desc = NULL;

                write_file(token_path, tokens[i]);
                CHECK_INT_EQ(xds_ca_request(&cfg, &c, &desc), -EINVAL);
                CHECK(desc != NULL);
                wp_free(desc);
        }
        write_file(token_path, TOKEN "\n");
}

static void test_unreachable_address_is_econnrefused(void)
{
        struct sockaddr_in sa = {.sin_family = AF_INET};
        socklen_t sl = sizeof(sa);
        struct xds_ca_config cfg = base_cfg();
        struct xds_ca_cert c = {0};
        char *desc = NULL, addr[64];
        int fd;

        /* A port that was just free on our address: nothing listens there. */
        sa.sin_addr.s_addr = htonl(0x7f000000u | (unsigned)ip_net << 16 | 0xfe01u);
        fd = socket(AF_INET, SOCK_STREAM, 0);
        REQUIRE(fd >= 0);
        REQUIRE(bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
        REQUIRE(getsockname(fd, (struct sockaddr *)&sa, &sl) == 0);
        close(fd);
        snprintf(addr, sizeof(addr), "127.%u.254.1:%u", ip_net, ntohs(sa.sin_port));
        cfg.address = addr;
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, &desc), -ECONNREFUSED);
        CHECK(desc != NULL);
        wp_free(desc);
}

static void test_slow_server_times_out(void)
{
        struct xds_ca_config cfg = base_cfg();
        struct xds_ca_cert c = {0};
        struct timespec t0, t1;
        char *desc = NULL;
        double secs;

        set_mode("slow");
        cfg.timeout_ms = 700;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, &desc), -ETIMEDOUT);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
        CHECK(secs >= 0.6 && secs < 2.5);
        CHECK(desc != NULL);
        wp_free(desc);
        set_mode("normal");
}

static void test_invalid_config_is_einval(void)
{
        static const char *const bad_addrs[] = {
            "nohostport", "host:",      "host:0", "host:65536", "host:12ab", ":15012",
            "[::1",       "[::1]15012", "a/b:80", "a b:80",     "[zz]:80",
        };
        struct xds_ca_config cfg;
        struct xds_ca_cert c = {0};
        char *desc = NULL;

        CHECK_INT_EQ(xds_ca_request(NULL, &c, &desc), -EINVAL);
        wp_free(desc);
        for (size_t i = 0; i < sizeof(bad_addrs) / sizeof(bad_addrs[0]); i++) {
                cfg = base_cfg();
                cfg.address = bad_addrs[i];
                desc = NULL;
                CHECK_INT_EQ(xds_ca_request(&cfg, &c, &desc), -EINVAL);
                CHECK(desc && strstr(desc, "bad address"));
                wp_free(desc);
        }
        cfg = base_cfg();
        cfg.spiffe_uri = "spiffe://cluster.local/sleep";
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, NULL), -EINVAL);
        cfg = base_cfg();
        cfg.spiffe_uri = NULL;
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, NULL), -EINVAL);
        cfg = base_cfg();
        cfg.root_pem = NULL;
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, NULL), -EINVAL);
        cfg = base_cfg();
        cfg.token_path = NULL;
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, NULL), -EINVAL);
        cfg = base_cfg();
        cfg.cluster_id = "Kube\r\nx-evil: 1";
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, NULL), -EINVAL);
        cfg = base_cfg();
        cfg.tls_server_name = "istiod:15012";
        CHECK_INT_EQ(xds_ca_request(&cfg, &c, NULL), -EINVAL);
        CHECK(c.key_pem == NULL);
}

static void test_cert_done_is_null_safe(void)
{
        struct xds_ca_cert c = {0};

        xds_ca_cert_done(NULL);
        xds_ca_cert_done(&c);
        CHECK(c.key_pem == NULL);
}

static void test_renew_at_is_half_life_minus_jitter(void)
{
        static const struct {
                int64_t nb, na;
                double jitter;
                int64_t want;
        } cases[] = {
            {0, 86400, 0.0, 43200},
            {1000, 87400, 0.0, 44200},
            {0, 86400, 0.5, 43200 - 4320},
            {0, 86400, 0.999, 43200 - 8631},
            {0, 86400, 1.0, 43200 - 8639}, /* clamped below 1 */
            {0, 86400, 7.0, 43200 - 8639},
            {0, 86400, -0.5, 43200}, /* clamped to 0 */
            {0, 86400, NAN, 43200},
            {0, 1, 0.0, 0},
            {500, 500, 0.3, 500},                   /* empty window: now */
            {500, 100, 0.3, 500},                   /* inverted: now */
            {INT64_MIN, INT64_MAX, 0.0, INT64_MIN}, /* too wide to compute: now */
            {1700000000, 1700003600, 0.25, 1700000000 + 1800 - 90},
        };

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                int64_t got = xds_ca_renew_at(cases[i].nb, cases[i].na, cases[i].jitter);

                CHECK_INT_EQ(got, cases[i].want);
                if (got != cases[i].want)
                        fprintf(stderr, "  case %zu\n", i);
        }
        /* Always inside [not_before + 0.4 life, not_before + 0.5 life]. */
        for (int j = 0; j < 100; j++) {
                double jit = j / 100.0;
                int64_t got = xds_ca_renew_at(100, 100 + 3600, jit);

                CHECK(got <= 100 + 1800 && got >= 100 + 1440);
        }
}

static int failalloc_body(void *arg)
{
        struct xds_ca_config cfg = base_cfg();
        struct xds_ca_cert c = {0};
        char *desc = NULL;
        int r;

        r = xds_ca_request(&cfg, &c, &desc);
        if (r == 0)
                check_cert(&c, 3600, 1, 1);
        xds_ca_cert_done(&c);
        wp_free(desc);
        return r;
}

static void test_request_survives_allocation_failures(void)
{
        unsigned n;

        set_mode("normal");
        n = check_failalloc_run(failalloc_body, NULL);
        fprintf(stderr, "  %u allocation points\n", n);
        CHECK(n > 5);
}

/* ---- setup ---------------------------------------------------------------------------------- */

static void cleanup(void)
{
        char cmd[300];

        stop_fake(&good_ca);
        stop_fake(&untrusted_ca);
        stop_fake(&raw_ca);
        free(root_pem);
        root_pem = NULL;
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
        if (system(cmd) != 0)
                fprintf(stderr, "cannot remove %s\n", dir);
}

int main(void)
{
        const char *src = getenv("WP_TEST_SRCDIR");
        char cmd[1024], path[300];

        if (system("/usr/bin/python3 -c 'import grpc, google.protobuf, cryptography' "
                   ">/dev/null 2>&1") != 0) {
                fprintf(stderr, "SKIP: /usr/bin/python3 lacks grpc/protobuf/cryptography\n");
                return 77;
        }
        signal(SIGPIPE, SIG_IGN);
        if (!mkdtemp(dir)) {
                perror("mkdtemp");
                return 99;
        }
        snprintf(cmd, sizeof(cmd), "/usr/bin/python3 '%s/tools/mkpki.py' '%s' >&2",
                 src ? src : "tests", dir);
        if (system(cmd) != 0) {
                fprintf(stderr, "mkpki.py failed\n");
                cleanup();
                return 99;
        }
        snprintf(path, sizeof(path), "%s/root.pem", dir);
        root_pem = slurp(path);
        snprintf(token_path, sizeof(token_path), "%s/istio-token", dir);
        snprintf(mode_path, sizeof(mode_path), "%s/mode", dir);
        snprintf(log_path, sizeof(log_path), "%s/requests.log", dir);
        snprintf(log_bad_path, sizeof(log_bad_path), "%s/requests-untrusted.log", dir);
        write_file(token_path, TOKEN "\n");
        set_mode("normal");
        srand((unsigned)(time(NULL) ^ getpid()));
        ip_net = (unsigned char)(rand() % 200 + 20);
        if (!root_pem || start_fake("root", log_path, false, &good_ca) < 0 ||
            start_fake("other-root", log_bad_path, false, &untrusted_ca) < 0 ||
            start_fake("root", log_path, true, &raw_ca) < 0) {
                fprintf(stderr, "cannot start fake_ca.py\n");
                cleanup();
                return 99;
        }

        RUN(test_request_returns_leaf_with_our_key_and_san);
        RUN(test_request_defaults_ttl_to_one_day);
        RUN(test_request_accepts_intermediate_and_root_bundles);
        RUN(test_request_rereads_token_each_call);
        RUN(test_wrong_token_is_eacces_with_grpc_message);
        RUN(test_bad_answers_map_to_errnos);
        RUN(test_hostile_http2_answers_are_rejected);
        RUN(test_untrusted_server_certificate_is_transport_error);
        RUN(test_server_name_is_checked);
        RUN(test_missing_token_file_is_enoent);
        RUN(test_bad_token_contents_are_einval);
        RUN(test_unreachable_address_is_econnrefused);
        RUN(test_slow_server_times_out);
        RUN(test_invalid_config_is_einval);
        RUN(test_cert_done_is_null_safe);
        RUN(test_renew_at_is_half_life_minus_jitter);
        RUN(test_request_survives_allocation_failures);

        cleanup();
        return check_exit();
}
