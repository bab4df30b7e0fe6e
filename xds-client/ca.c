/*
 * Istio CA client (see ca.h): key + CSR, one unary CreateCertificate call over libcurl, and the
 * checks on the answer. All libcurl use, and the CURLcode -> -errno translation, live here.
 *
 * What istiod expects and does (ISTIO-CONTRACT §3): the CSR's public key is all it keeps; the SAN
 * comes from the bearer token's service account (the CSR's SAN is ignored), so we check that the
 * leaf carries the identity we asked for. cert_chain is leaf first, root last, and istiod splits
 * multi-certificate PEMs into one element each (security/pkg/server/ca/server.go); an element
 * with several PEM blocks is still accepted here. A root bundle of several roots (root rotation)
 * also arrives as several trailing elements, so after the leaf every self-issued certificate is
 * a root (xds_ca_cert.root_pem, all of them) and the others are intermediates (chain_pem).
 */
#include "xds-client/ca.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "security/v1alpha1/ca.pb-c.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/x509.h"

#define CA_DEFAULT_ADDRESS "istiod.istio-system.svc:15012"
#define CA_DEFAULT_TTL     86400u
#define CA_DEFAULT_TIMEOUT 10000u
#define CA_PATH            "/istio.v1.auth.IstioCertificateService/CreateCertificate"
#define CA_MAX_RESPONSE    (1u << 20) /* body bytes we buffer from istiod */
#define CA_MAX_TOKEN       (64u << 10)
#define CA_MAX_CERTS       16 /* certificates in one answer */
#define CA_MAX_GRPC_MSG    512
#define CA_MAX_HOST        253

/* ---- errors --------------------------------------------------------------------------------- */

static int fail(char **reterr_desc, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(char **reterr_desc, int err, const char *fmt, ...)
{
        va_list ap;
        int n;

        if (!reterr_desc)
                return err;
        va_start(ap, fmt);
        n = vsnprintf(NULL, 0, fmt, ap);
        va_end(ap);
        *reterr_desc = n >= 0 ? wp_malloc((size_t)n + 1) : NULL;
        if (*reterr_desc) {
                va_start(ap, fmt);
                vsnprintf(*reterr_desc, (size_t)n + 1, fmt, ap);
                va_end(ap);
        }
        return err;
}

/* The first OpenSSL error, for descriptions; clears the queue. */
static const char *ssl_err(char *buf, size_t cap)
{
        unsigned long e = ERR_get_error();

        if (!e)
                snprintf(buf, cap, "unknown error");
        else
                ERR_error_string_n(e, buf, cap);
        ERR_clear_error();
        return buf;
}

/* ---- small string buffer -------------------------------------------------------------------- */

struct sbuf {
        char *p;
        size_t len, cap;
        bool overflow; /* a bounded append was refused */
};

static int sbuf_add(struct sbuf *b, const void *data, size_t n)
{
        if (n > SIZE_MAX / 2 - b->len - 1)
                return -ENOMEM;
        if (b->len + n + 1 > b->cap) {
                size_t ncap = b->cap ? b->cap : 256;
                char *np;

                while (ncap < b->len + n + 1)
                        ncap *= 2;
                np = wp_realloc(b->p, ncap);
                if (!np)
                        return -ENOMEM;
                b->p = np;
                b->cap = ncap;
        }
        memcpy(b->p + b->len, data, n);
        b->len += n;
        b->p[b->len] = 0;
        return 0;
}

/* Appends the PEM form of a certificate. */
static int sbuf_add_cert(struct sbuf *b, X509 *c)
{
        BIO *bio = BIO_new(BIO_s_mem());
        char *data;
        long n;
        int r = -ENOMEM;

        if (!bio)
                return -ENOMEM;
        if (PEM_write_bio_X509(bio, c) == 1) {
                n = BIO_get_mem_data(bio, &data);
                if (n > 0)
                        r = sbuf_add(b, data, (size_t)n);
        }
        BIO_free(bio);
        ERR_clear_error();
        return r;
}

/* ---- configuration checks ------------------------------------------------------------------- */

/* DNS name or IPv4 literal: what we put in a URL and in CURLOPT_CONNECT_TO. */
static bool host_ok(const char *h, size_t n)
{
        if (n == 0 || n > CA_MAX_HOST)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!isalnum((unsigned char)h[i]) && h[i] != '.' && h[i] != '-' && h[i] != '_')
                        return false;
        return true;
}

static bool ip6_ok(const char *h, size_t n)
{
        if (n == 0 || n > 45)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!isxdigit((unsigned char)h[i]) && h[i] != ':' && h[i] != '.')
                        return false;
        return true;
}

struct target {
        char host[CA_MAX_HOST + 3]; /* as written in a URL: IPv6 keeps its brackets */
        char name[CA_MAX_HOST + 3]; /* URL host = TLS name */
        unsigned port;
};

/* "host:port" or "[v6]:port" -> target. */
static int parse_address(const char *addr, const char *tls_name, struct target *t,
                         char **reterr_desc)
{
        const char *colon, *host = addr, *port;
        size_t hlen;
        char *end;
        unsigned long p;

        if (addr[0] == '[') {
                const char *rb = strchr(addr, ']');

                if (!rb || rb[1] != ':' || !ip6_ok(addr + 1, (size_t)(rb - addr - 1)))
                        goto bad;
                hlen = (size_t)(rb - addr) + 1;
                port = rb + 2;
        } else {
                colon = strrchr(addr, ':');
                if (!colon || !host_ok(addr, (size_t)(colon - addr)))
                        goto bad;
                hlen = (size_t)(colon - addr);
                port = colon + 1;
        }
        if (!isdigit((unsigned char)port[0]))
                goto bad;
        errno = 0;
        p = strtoul(port, &end, 10);
        if (errno || *end || p == 0 || p > 65535)
                goto bad;
        memcpy(t->host, host, hlen);
        t->host[hlen] = 0;
        t->port = (unsigned)p;
        if (tls_name) {
                if (!host_ok(tls_name, strlen(tls_name)))
                        return fail(reterr_desc, -EINVAL, "CA: bad TLS server name \"%s\"",
                                    tls_name);
                snprintf(t->name, sizeof(t->name), "%s", tls_name);
        } else {
                memcpy(t->name, t->host, hlen + 1);
        }
        return 0;
bad:
        return fail(reterr_desc, -EINVAL, "CA: bad address \"%s\" (want host:port)", addr);
}

/* Header values must not smuggle in other headers. */
static bool header_value_ok(const char *v, size_t n)
{
        for (size_t i = 0; i < n; i++)
                if ((unsigned char)v[i] < 0x20 || v[i] == 0x7f)
                        return false;
        return true;
}

/* Reads the token, trimmed of surrounding white space, into a heap string. */
static int read_token(const char *path, char **ret, char **reterr_desc)
{
        char *buf, *s, *e;
        size_t len;
        int r;

        r = wp_read_file(path, CA_MAX_TOKEN, &buf, &len);
        if (r < 0)
                return fail(reterr_desc, r, "CA: reading token %s: %s", path, strerror(-r));
        if (strlen(buf) != len) {
                r = fail(reterr_desc, -EINVAL, "CA: token %s contains a NUL byte", path);
                goto out_free;
        }
        s = buf;
        e = buf + len;
        while (s < e && isspace((unsigned char)*s))
                s++;
        while (e > s && isspace((unsigned char)e[-1]))
                e--;
        if (s == e) {
                r = fail(reterr_desc, -EINVAL, "CA: token %s is empty", path);
                goto out_free;
        }
        if (!header_value_ok(s, (size_t)(e - s))) {
                r = fail(reterr_desc, -EINVAL, "CA: token %s contains control characters", path);
                goto out_free;
        }
        memmove(buf, s, (size_t)(e - s));
        buf[e - s] = 0;
        *ret = buf;
        return 0;
out_free:
        wp_free(buf);
        return r;
}

/* ---- key and CSR ---------------------------------------------------------------------------- */

/* ECDSA P-256 key and a CSR with an empty subject and one critical URI SAN, as ztunnel sends
 * (istio/ztunnel src/tls/csr.rs): istiod only reads the public key. */
static int make_csr(const char *spiffe_uri, EVP_PKEY **ret_key, char **ret_csr_pem,
                    char **reterr_desc)
{
        char ebuf[256], *san = NULL, *data;
        STACK_OF(X509_EXTENSION) *exts = NULL;
        X509_EXTENSION *ext = NULL;
        X509_REQ *req = NULL;
        EVP_PKEY *key;
        BIO *bio = NULL;
        long n;
        int r = -ENOMEM;

        key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
        if (!key)
                return fail(reterr_desc, -ENOMEM, "CA: key generation: %s",
                            ssl_err(ebuf, sizeof(ebuf)));
        req = X509_REQ_new();
        if (!req || X509_REQ_set_version(req, X509_REQ_VERSION_1) != 1 ||
            X509_REQ_set_pubkey(req, key) != 1)
                goto err_ssl;
        san = wp_malloc(strlen(spiffe_uri) + 5);
        if (!san)
                goto err_free;
        sprintf(san, "URI:%s", spiffe_uri);
        ext = X509V3_EXT_conf_nid(NULL, NULL, NID_subject_alt_name, san);
        if (!ext || X509_EXTENSION_set_critical(ext, 1) != 1)
                goto err_ssl;
        exts = sk_X509_EXTENSION_new_null();
        if (!exts || !sk_X509_EXTENSION_push(exts, ext))
                goto err_ssl;
        ext = NULL; /* owned by exts now */
        if (X509_REQ_add_extensions(req, exts) != 1 || X509_REQ_sign(req, key, EVP_sha256()) <= 0)
                goto err_ssl;
        bio = BIO_new(BIO_s_mem());
        if (!bio || PEM_write_bio_X509_REQ(bio, req) != 1)
                goto err_ssl;
        n = BIO_get_mem_data(bio, &data);
        if (n <= 0)
                goto err_ssl;
        *ret_csr_pem = wp_strndup(data, (size_t)n);
        if (!*ret_csr_pem)
                goto err_free;
        *ret_key = key;
        key = NULL;
        r = 0;
        goto out;
err_ssl:
        r = fail(reterr_desc, -ENOMEM, "CA: building CSR: %s", ssl_err(ebuf, sizeof(ebuf)));
        goto out;
err_free:
        r = fail(reterr_desc, -ENOMEM, "CA: building CSR: out of memory");
out:
        BIO_free(bio);
        sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
        X509_EXTENSION_free(ext);
        wp_free(san);
        X509_REQ_free(req);
        EVP_PKEY_free(key);
        ERR_clear_error();
        return r;
}

static int key_pem(EVP_PKEY *key, char **ret)
{
        BIO *bio = BIO_new(BIO_s_mem());
        char *data;
        long n;
        int r = -ENOMEM;

        if (!bio)
                return -ENOMEM;
        /* PEM_write_bio_PrivateKey writes PKCS#8 ("BEGIN PRIVATE KEY") in OpenSSL 3. */
        if (PEM_write_bio_PrivateKey(bio, key, NULL, NULL, 0, NULL, NULL) == 1) {
                n = BIO_get_mem_data(bio, &data);
                if (n > 0) {
                        *ret = wp_strndup(data, (size_t)n);
                        r = *ret ? 0 : -ENOMEM;
                }
        }
        BIO_free_all(bio);
        ERR_clear_error();
        return r;
}

/* ---- transport (libcurl) -------------------------------------------------------------------- */

struct call {
        struct sbuf body;
        long grpc_status; /* -1: not seen */
        char grpc_message[CA_MAX_GRPC_MSG];
        char content_type[64];
        bool dup_status;
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc;

static void curl_init(void)
{
        curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static size_t on_body(char *data, size_t size, size_t n, void *user)
{
        struct call *c = user;

        /* size is always 1 for write callbacks. */
        if (n > CA_MAX_RESPONSE - c->body.len) {
                c->body.overflow = true;
                return 0; /* CURLE_WRITE_ERROR */
        }
        if (sbuf_add(&c->body, data, n) < 0)
                return 0;
        return n;
}

/* grpc-message is percent-encoded (gRPC over HTTP/2, "Percent-Encoded"); invalid escapes are
 * kept literally, non-printable bytes become '?'. */
static void percent_decode(const char *in, size_t n, char *out, size_t cap)
{
        size_t o = 0;

        for (size_t i = 0; i < n && o + 1 < cap; i++) {
                unsigned char ch = (unsigned char)in[i];

                if (ch == '%' && i + 2 < n && isxdigit((unsigned char)in[i + 1]) &&
                    isxdigit((unsigned char)in[i + 2])) {
                        char hex[3] = {in[i + 1], in[i + 2], 0};

                        ch = (unsigned char)strtoul(hex, NULL, 16);
                        i += 2;
                }
                out[o++] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
        }
        out[o] = 0;
}

/* Called once per header line, for the response headers and, after the body, for the trailers
 * (HTTP/2); a Trailers-Only answer puts grpc-status in the headers. */
static size_t on_header(char *data, size_t size, size_t n, void *user)
{
        struct call *c = user;
        const char *colon = memchr(data, ':', n), *v, *e;
        size_t nlen;

        if (!colon)
                return n; /* status line or the blank line */
        nlen = (size_t)(colon - data);
        v = colon + 1;
        e = data + n;
        while (v < e && (*v == ' ' || *v == '\t'))
                v++;
        while (e > v && (e[-1] == '\r' || e[-1] == '\n' || e[-1] == ' ' || e[-1] == '\t'))
                e--;
        if (nlen == 11 && strncasecmp(data, "grpc-status", 11) == 0) {
                char num[8];
                size_t vl = (size_t)(e - v);
                char *end;
                long s;

                if (c->grpc_status != -1)
                        c->dup_status = true;
                if (vl == 0 || vl >= sizeof(num)) {
                        c->grpc_status = 1000; /* unparsable: reported as a bad answer */
                        return n;
                }
                memcpy(num, v, vl);
                num[vl] = 0;
                s = strtol(num, &end, 10);
                c->grpc_status = (*end || !isdigit((unsigned char)num[0]) || s > 999) ? 1000 : s;
        } else if (nlen == 12 && strncasecmp(data, "grpc-message", 12) == 0) {
                percent_decode(v, (size_t)(e - v), c->grpc_message, sizeof(c->grpc_message));
        } else if (nlen == 12 && strncasecmp(data, "content-type", 12) == 0) {
                size_t vl = (size_t)(e - v);

                if (vl >= sizeof(c->content_type))
                        vl = sizeof(c->content_type) - 1;
                memcpy(c->content_type, v, vl);
                c->content_type[vl] = 0;
        }
        return n;
}

/* The one translation of CURLcode to -errno (STYLE §2.5). */
static int curl_errno(CURL *h, CURLcode rc, bool overflow)
{
        long os_errno = 0;

        if (overflow)
                return -EPROTO;
        switch (rc) {
        case CURLE_OUT_OF_MEMORY:
                return -ENOMEM;
        case CURLE_OPERATION_TIMEDOUT:
                return -ETIMEDOUT;
        case CURLE_COULDNT_RESOLVE_HOST:
        case CURLE_COULDNT_RESOLVE_PROXY:
                return -EHOSTUNREACH;
        case CURLE_COULDNT_CONNECT:
                curl_easy_getinfo(h, CURLINFO_OS_ERRNO, &os_errno);
                return os_errno > 0 ? -(int)os_errno : -ECONNREFUSED;
        case CURLE_PEER_FAILED_VERIFICATION:
                return -EKEYREJECTED; /* istiod's certificate does not verify against root_pem */
        case CURLE_SSL_CONNECT_ERROR:
        case CURLE_SSL_CERTPROBLEM:
        case CURLE_SSL_CIPHER:
        case CURLE_SSL_CACERT_BADFILE:
        case CURLE_SSL_ISSUER_ERROR:
        case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
        case CURLE_SSL_INVALIDCERTSTATUS:
        case CURLE_SSL_ENGINE_INITFAILED:
        case CURLE_USE_SSL_FAILED:
                return -ECONNABORTED;
        case CURLE_SEND_ERROR:
        case CURLE_RECV_ERROR:
        case CURLE_GOT_NOTHING:
        case CURLE_PARTIAL_FILE:
                curl_easy_getinfo(h, CURLINFO_OS_ERRNO, &os_errno);
                return os_errno > 0 ? -(int)os_errno : -ECONNRESET;
        case CURLE_HTTP2:
        case CURLE_HTTP2_STREAM:
        case CURLE_WEIRD_SERVER_REPLY:
        case CURLE_BAD_CONTENT_ENCODING:
                return -EPROTO;
        case CURLE_UNSUPPORTED_PROTOCOL:
        case CURLE_URL_MALFORMAT:
        case CURLE_BAD_FUNCTION_ARGUMENT:
                return -EINVAL;
        case CURLE_NOT_BUILT_IN:
        case CURLE_UNKNOWN_OPTION:
                return -EOPNOTSUPP;
        default:
                return -EIO;
        }
}

/* gRPC status codes (grpc/doc/statuscodes.md) -> -errno. */
static int grpc_errno(long status)
{
        switch (status) {
        case 1: /* CANCELLED */
                return -ECANCELED;
        case 3:  /* INVALID_ARGUMENT: istiod's answer to a bad CSR or TTL */
        case 9:  /* FAILED_PRECONDITION */
        case 11: /* OUT_OF_RANGE */
                return -EINVAL;
        case 4: /* DEADLINE_EXCEEDED */
                return -ETIMEDOUT;
        case 5: /* NOT_FOUND */
                return -ENOENT;
        case 7:  /* PERMISSION_DENIED */
        case 16: /* UNAUTHENTICATED */
                return -EACCES;
        case 8:  /* RESOURCE_EXHAUSTED */
        case 10: /* ABORTED */
        case 14: /* UNAVAILABLE */
                return -EAGAIN;
        case 12: /* UNIMPLEMENTED */
                return -EOPNOTSUPP;
        default: /* UNKNOWN, INTERNAL (istiod's signing failures), DATA_LOSS, out of range */
                return -EIO;
        }
}

/* POSTs one framed request; fills c. Returns 0 when a complete HTTP/2 response arrived. */
static int transport(const struct xds_ca_config *cfg, const struct target *t, const char *token,
                     const uint8_t *frame, size_t frame_len, struct call *c, char **reterr_desc)
{
        char url[CA_MAX_HOST + 128], connect_to[2 * CA_MAX_HOST + 32], errbuf[CURL_ERROR_SIZE];
        struct curl_blob ca = {
            .data = (void *)cfg->root_pem, .len = strlen(cfg->root_pem), .flags = CURL_BLOB_COPY};
        struct curl_slist *hdrs = NULL, *cto = NULL, *n;
        struct sbuf auth = {0};
        long http_version = 0, code = 0;
        CURLcode rc;
        CURL *h;
        int r;

        pthread_once(&curl_once, curl_init);
        if (curl_init_rc != CURLE_OK)
                return fail(reterr_desc, -ENOMEM, "CA: curl_global_init: %s",
                            curl_easy_strerror(curl_init_rc));
        h = curl_easy_init();
        if (!h)
                return fail(reterr_desc, -ENOMEM, "CA: curl_easy_init failed");
        snprintf(url, sizeof(url), "https://%s:%u" CA_PATH, t->name, t->port);
        if (sbuf_add(&auth, "authorization: Bearer ", 22) < 0 ||
            sbuf_add(&auth, token, strlen(token)) < 0) {
                r = fail(reterr_desc, -ENOMEM, "CA: out of memory");
                goto out;
        }
        static const char *const fixed[] = {"content-type: application/grpc", "te: trailers",
                                            "grpc-accept-encoding: identity", "Expect:", "Accept:"};
        for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++) {
                n = curl_slist_append(hdrs, fixed[i]);
                if (!n)
                        goto err_nomem;
                hdrs = n;
        }
        n = curl_slist_append(hdrs, auth.p);
        if (!n)
                goto err_nomem;
        hdrs = n;
        if (cfg->cluster_id && cfg->cluster_id[0]) {
                char cid[300];

                snprintf(cid, sizeof(cid), "clusterid: %s", cfg->cluster_id);
                n = curl_slist_append(hdrs, cid);
                if (!n)
                        goto err_nomem;
                hdrs = n;
        }
        if (strcmp(t->name, t->host) != 0) {
                /* Connect to the address while the URL (SNI, certificate check, :authority)
                 * names tls_server_name. */
                snprintf(connect_to, sizeof(connect_to), "%s:%u:%s:%u", t->name, t->port, t->host,
                         t->port);
                cto = curl_slist_append(NULL, connect_to);
                if (!cto)
                        goto err_nomem;
        }

        errbuf[0] = 0;
        rc = CURLE_OK;
#define SETOPT(opt, val)                                                                           \
        do {                                                                                       \
                if (rc == CURLE_OK)                                                                \
                        rc = curl_easy_setopt(h, opt, val);                                        \
        } while (0)
        SETOPT(CURLOPT_URL, url);
        SETOPT(CURLOPT_PROTOCOLS_STR, "https");
        SETOPT(CURLOPT_PROXY, ""); /* never an environment proxy */
        SETOPT(CURLOPT_NOSIGNAL, 1L);
        SETOPT(CURLOPT_ERRORBUFFER, errbuf);
        SETOPT(CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
        SETOPT(CURLOPT_SSL_VERIFYPEER, 1L);
        SETOPT(CURLOPT_SSL_VERIFYHOST, 2L);
        SETOPT(CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
        /* Trust root_pem only: drop the built-in CA file and directory. */
        SETOPT(CURLOPT_CAINFO, (char *)NULL);
        SETOPT(CURLOPT_CAPATH, (char *)NULL);
        SETOPT(CURLOPT_CAINFO_BLOB, &ca);
        if (cto)
                SETOPT(CURLOPT_CONNECT_TO, cto);
        SETOPT(CURLOPT_HTTPHEADER, hdrs);
        SETOPT(CURLOPT_USERAGENT, "waypoint-ca/0.1");
        SETOPT(CURLOPT_POST, 1L);
        SETOPT(CURLOPT_POSTFIELDS, (const char *)frame);
        SETOPT(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)frame_len);
        SETOPT(CURLOPT_TIMEOUT_MS, (long)cfg->timeout_ms);
        SETOPT(CURLOPT_CONNECTTIMEOUT_MS, (long)cfg->timeout_ms);
        SETOPT(CURLOPT_WRITEFUNCTION, on_body);
        SETOPT(CURLOPT_WRITEDATA, c);
        SETOPT(CURLOPT_HEADERFUNCTION, on_header);
        SETOPT(CURLOPT_HEADERDATA, c);
        SETOPT(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)CA_MAX_RESPONSE);
#undef SETOPT
        if (rc != CURLE_OK) {
                r = fail(reterr_desc, curl_errno(h, rc, false), "CA: curl setup: %s",
                         curl_easy_strerror(rc));
                goto out;
        }
        rc = curl_easy_perform(h);
        if (rc != CURLE_OK) {
                r = curl_errno(h, rc, c->body.overflow);
                if (c->body.overflow)
                        r = fail(reterr_desc, r, "CA %s: response larger than %u bytes", url,
                                 CA_MAX_RESPONSE);
                else
                        r = fail(reterr_desc, r, "CA %s (via %s:%u): %s%s%s", url, t->host, t->port,
                                 curl_easy_strerror(rc), errbuf[0] ? ": " : "", errbuf);
                goto out;
        }
        curl_easy_getinfo(h, CURLINFO_HTTP_VERSION, &http_version);
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
        if (http_version != CURL_HTTP_VERSION_2_0) {
                r = fail(reterr_desc, -EPROTO, "CA %s: server did not negotiate HTTP/2", url);
                goto out;
        }
        if (code != 200) {
                /* gRPC's HTTP-to-status mapping: 401 UNAUTHENTICATED, 403 PERMISSION_DENIED. */
                r = fail(reterr_desc, code == 401 || code == 403 ? -EACCES : -EPROTO,
                         "CA %s: HTTP status %ld", url, code);
                goto out;
        }
        r = 0;
        goto out;
err_nomem:
        r = fail(reterr_desc, -ENOMEM, "CA: out of memory");
out:
        curl_easy_cleanup(h);
        curl_slist_free_all(hdrs);
        curl_slist_free_all(cto);
        wp_free(auth.p);
        return r;
}

/* ---- answer checks -------------------------------------------------------------------------- */

static void *pb_alloc(void *data, size_t size)
{
        return wp_malloc(size ? size : 1);
}

static void pb_free(void *data, void *p)
{
        wp_free(p);
}

static ProtobufCAllocator pb_allocator = {.alloc = pb_alloc, .free = pb_free};

/* Appends every certificate of one PEM string to sk. An element must hold at least one
 * certificate and nothing but certificates: only white space may surround the blocks
 * (PEM_read_bio_X509 alone would skip any text before a block). */
static int parse_pems(const char *pem, STACK_OF(X509) * sk, const char *what, size_t idx,
                      char **reterr_desc)
{
        static const char begin[] = "-----BEGIN CERTIFICATE-----";
        static const char end[] = "-----END CERTIFICATE-----";
        const char *p = pem;
        size_t count = 0;

        if (strlen(pem) > CA_MAX_RESPONSE)
                return fail(reterr_desc, -EPROTO, "CA: %s[%zu] too large", what, idx);
        for (;;) {
                const char *e;
                char ebuf[256];
                BIO *bio;
                X509 *x;

                while (*p && isspace((unsigned char)*p))
                        p++;
                if (!*p && count > 0)
                        return 0;
                if (strncmp(p, begin, sizeof(begin) - 1) != 0)
                        return fail(reterr_desc, -EPROTO,
                                    "CA: %s[%zu] is not a PEM certificate (at byte %zu)", what, idx,
                                    (size_t)(p - pem));
                e = strstr(p, end);
                if (!e)
                        return fail(reterr_desc, -EPROTO, "CA: %s[%zu]: unterminated PEM block",
                                    what, idx);
                e += sizeof(end) - 1;
                if (*e == '\r')
                        e++;
                if (*e == '\n')
                        e++;
                if (sk_X509_num(sk) >= CA_MAX_CERTS)
                        return fail(reterr_desc, -EPROTO, "CA: more than %d certificates",
                                    CA_MAX_CERTS);
                bio = BIO_new_mem_buf(p, (int)(e - p));
                if (!bio)
                        return fail(reterr_desc, -ENOMEM, "CA: out of memory");
                x = PEM_read_bio_X509(bio, NULL, NULL, NULL);
                BIO_free(bio);
                if (!x)
                        return fail(reterr_desc, -EPROTO, "CA: %s[%zu]: certificate %zu: %s", what,
                                    idx, count, ssl_err(ebuf, sizeof(ebuf)));
                if (!sk_X509_push(sk, x)) {
                        X509_free(x);
                        return fail(reterr_desc, -ENOMEM, "CA: out of memory");
                }
                count++;
                p = e;
        }
}

static int64_t asn1_time_epoch(const ASN1_TIME *t, bool *ok)
{
        struct tm tm;

        if (!t || ASN1_TIME_to_tm(t, &tm) != 1) {
                *ok = false;
                return 0;
        }
        return (int64_t)timegm(&tm);
}

static bool self_issued(X509 *c)
{
        return X509_check_issued(c, c) == X509_V_OK;
}

/* Checks the answer and fills ret (key, chain and roots as PEM, leaf validity). */
static int check_answer(const struct xds_ca_config *cfg, EVP_PKEY *key,
                        const Istio__V1__Auth__IstioCertificateResponse *resp,
                        struct xds_ca_cert *ret, char **reterr_desc)
{
        STACK_OF(X509) *all = NULL, *inter = NULL;
        struct sbuf chain = {0}, roots = {0};
        X509_STORE_CTX *ctx = NULL;
        X509_STORE *store = NULL;
        char uri[512];
        bool tok = true;
        X509 *leaf;
        int r, n;

        if (resp->n_cert_chain == 0)
                return fail(reterr_desc, -EPROTO, "CA: empty cert_chain");
        all = sk_X509_new_null();
        inter = sk_X509_new_null();
        store = X509_STORE_new();
        ctx = X509_STORE_CTX_new();
        if (!all || !inter || !store || !ctx) {
                r = fail(reterr_desc, -ENOMEM, "CA: out of memory");
                goto out;
        }
        for (size_t i = 0; i < resp->n_cert_chain; i++) {
                r = parse_pems(resp->cert_chain[i], all, "cert_chain", i, reterr_desc);
                if (r < 0)
                        goto out;
        }
        n = sk_X509_num(all);
        leaf = sk_X509_value(all, 0);
        /* Root last: the answer ends with a self-issued certificate that is not the leaf. */
        if (n < 2 || !self_issued(sk_X509_value(all, n - 1))) {
                ERR_clear_error();
                r = fail(reterr_desc, -EPROTO,
                         "CA: cert_chain (%d certificate(s)) does not end "
                         "with a root after the leaf",
                         n);
                goto out;
        }

        /* The leaf: our key, our identity, a sane validity. */
        if (EVP_PKEY_eq(X509_get0_pubkey(leaf), key) != 1) {
                r = fail(reterr_desc, -EPROTO, "CA: leaf certificate is not for our key");
                goto out;
        }
        r = wp_x509_spiffe_uri(leaf, uri, sizeof(uri));
        if (r < 0) {
                r = fail(reterr_desc, -EPROTO, "CA: leaf certificate URI SAN: %s",
                         r == -ENOENT   ? "none"
                         : r == -ENOSPC ? "too long"
                                        : "several, or not SPIFFE");
                goto out;
        }
        if (strcmp(uri, cfg->spiffe_uri) != 0) {
                r = fail(reterr_desc, -EPROTO, "CA: leaf certificate is for %s, we asked for %s",
                         uri, cfg->spiffe_uri);
                goto out;
        }
        ret->not_before = asn1_time_epoch(X509_get0_notBefore(leaf), &tok);
        ret->not_after = asn1_time_epoch(X509_get0_notAfter(leaf), &tok);
        if (!tok || ret->not_after <= ret->not_before || ret->not_after <= (int64_t)time(NULL)) {
                r = fail(reterr_desc, -EPROTO, "CA: leaf certificate validity is bad or over");
                goto out;
        }

        /* After the leaf: self-issued certificates are the roots (several during a root
         * rotation, which istiod sends as separate trailing elements), the others are
         * intermediates, kept in order. */
        if (sbuf_add_cert(&chain, leaf) < 0) {
                r = fail(reterr_desc, -ENOMEM, "CA: out of memory");
                goto out;
        }
        for (int i = 1; i < n; i++) {
                X509 *c = sk_X509_value(all, i);
                bool root = self_issued(c);

                ERR_clear_error();
                if ((root ? X509_STORE_add_cert(store, c) != 1 : !sk_X509_push(inter, c)) ||
                    sbuf_add_cert(root ? &roots : &chain, c) < 0) {
                        r = fail(reterr_desc, -ENOMEM, "CA: out of memory");
                        goto out;
                }
        }
        /* Validity times of CA certificates are istiod's business, and a fresh leaf may start a
         * little in the future under clock skew: check the signatures only (not_after above). */
        if (X509_STORE_CTX_init(ctx, store, leaf, inter) != 1) {
                r = fail(reterr_desc, -ENOMEM, "CA: out of memory");
                goto out;
        }
        X509_STORE_CTX_set_flags(ctx, X509_V_FLAG_NO_CHECK_TIME);
        if (X509_verify_cert(ctx) != 1) {
                int e = X509_STORE_CTX_get_error(ctx);

                r = fail(reterr_desc, -EPROTO, "CA: returned chain does not verify to its root: %s",
                         X509_verify_cert_error_string(e));
                goto out;
        }

        r = key_pem(key, &ret->key_pem);
        if (r < 0) {
                r = fail(reterr_desc, r, "CA: out of memory");
                goto out;
        }
        ret->chain_pem = chain.p;
        ret->root_pem = roots.p;
        chain.p = roots.p = NULL;
        r = 0;
out:
        ERR_clear_error();
        X509_STORE_CTX_free(ctx);
        X509_STORE_free(store);
        sk_X509_free(inter); /* borrowed from all */
        sk_X509_pop_free(all, X509_free);
        wp_free(chain.p);
        wp_free(roots.p);
        return r;
}

/* The body must be exactly one uncompressed gRPC message. */
static int parse_body(const struct call *c, Istio__V1__Auth__IstioCertificateResponse **ret,
                      char **reterr_desc)
{
        const uint8_t *b = (const uint8_t *)c->body.p;
        uint32_t mlen;

        if (c->body.len < 5)
                return fail(reterr_desc, -EPROTO, "CA: no response message (%zu bytes)",
                            c->body.len);
        if (b[0] != 0)
                return fail(reterr_desc, -EPROTO, "CA: compressed response (flag %u)", b[0]);
        mlen = (uint32_t)b[1] << 24 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 8 | b[4];
        if ((size_t)mlen != c->body.len - 5)
                return fail(reterr_desc, -EPROTO,
                            "CA: response framing: message of %u bytes in a %zu-byte body", mlen,
                            c->body.len);
        *ret = istio__v1__auth__istio_certificate_response__unpack(&pb_allocator, mlen, b + 5);
        if (!*ret)
                return fail(reterr_desc, -EPROTO, "CA: undecodable IstioCertificateResponse");
        return 0;
}

/* ---- entry points --------------------------------------------------------------------------- */

int xds_ca_request(const struct xds_ca_config *cfg_in, struct xds_ca_cert *ret, char **reterr_desc)
{
        Istio__V1__Auth__IstioCertificateRequest req =
            ISTIO__V1__AUTH__ISTIO_CERTIFICATE_REQUEST__INIT;
        Istio__V1__Auth__IstioCertificateResponse *resp = NULL;
        struct xds_ca_config cfg;
        struct xds_ca_cert out = {0};
        struct call call = {.grpc_status = -1};
        char *token = NULL, *csr = NULL;
        uint8_t *frame = NULL;
        EVP_PKEY *key = NULL;
        struct target t;
        size_t plen;
        int r;

        if (reterr_desc)
                *reterr_desc = NULL;
        if (!cfg_in || !ret)
                return fail(reterr_desc, -EINVAL, "CA: no configuration");
        cfg = *cfg_in;
        if (!cfg.address || !cfg.address[0])
                cfg.address = CA_DEFAULT_ADDRESS;
        if (!cfg.ttl_seconds)
                cfg.ttl_seconds = CA_DEFAULT_TTL;
        if (!cfg.timeout_ms)
                cfg.timeout_ms = CA_DEFAULT_TIMEOUT;
        if (!cfg.root_pem || !cfg.root_pem[0])
                return fail(reterr_desc, -EINVAL, "CA: no root certificate for istiod");
        if (!cfg.token_path || !cfg.token_path[0])
                return fail(reterr_desc, -EINVAL, "CA: no token path");
        if (!cfg.spiffe_uri || wp_spiffe_parse(cfg.spiffe_uri, strlen(cfg.spiffe_uri), NULL) < 0)
                return fail(reterr_desc, -EINVAL, "CA: bad SPIFFE identity \"%s\"",
                            cfg.spiffe_uri ? cfg.spiffe_uri : "(null)");
        if (cfg.cluster_id && (strlen(cfg.cluster_id) > 253 ||
                               !header_value_ok(cfg.cluster_id, strlen(cfg.cluster_id))))
                return fail(reterr_desc, -EINVAL, "CA: bad cluster id");
        r = parse_address(cfg.address, cfg.tls_server_name, &t, reterr_desc);
        if (r < 0)
                return r;
        /* Re-read on every request: kubelet rotates the projected token. */
        r = read_token(cfg.token_path, &token, reterr_desc);
        if (r < 0)
                return r;
        r = make_csr(cfg.spiffe_uri, &key, &csr, reterr_desc);
        if (r < 0)
                goto out;

        req.csr = csr;
        req.validity_duration = (int64_t)cfg.ttl_seconds;
        plen = istio__v1__auth__istio_certificate_request__get_packed_size(&req);
        frame = wp_malloc(plen + 5);
        if (!frame) {
                r = fail(reterr_desc, -ENOMEM, "CA: out of memory");
                goto out;
        }
        frame[0] = 0;
        frame[1] = (uint8_t)(plen >> 24);
        frame[2] = (uint8_t)(plen >> 16);
        frame[3] = (uint8_t)(plen >> 8);
        frame[4] = (uint8_t)plen;
        istio__v1__auth__istio_certificate_request__pack(&req, frame + 5);

        r = transport(&cfg, &t, token, frame, plen + 5, &call, reterr_desc);
        if (r < 0)
                goto out;
        if (call.dup_status || call.grpc_status == 1000) {
                r = fail(reterr_desc, -EPROTO, "CA: bad grpc-status trailer");
                goto out;
        }
        if (call.grpc_status < 0) {
                r = fail(reterr_desc, -EPROTO, "CA: answer without grpc-status");
                goto out;
        }
        if (call.grpc_status != 0) {
                r = fail(reterr_desc, grpc_errno(call.grpc_status),
                         "CA: CreateCertificate failed: grpc-status %ld: %s", call.grpc_status,
                         call.grpc_message[0] ? call.grpc_message : "(no grpc-message)");
                goto out;
        }
        if (strncmp(call.content_type, "application/grpc", 16) != 0 ||
            (call.content_type[16] && call.content_type[16] != '+' &&
             call.content_type[16] != ';')) {
                r = fail(reterr_desc, -EPROTO, "CA: content-type \"%s\" is not gRPC",
                         call.content_type);
                goto out;
        }
        r = parse_body(&call, &resp, reterr_desc);
        if (r < 0)
                goto out;
        r = check_answer(&cfg, key, resp, &out, reterr_desc);
        if (r < 0)
                goto out;
        *ret = out;
        memset(&out, 0, sizeof(out));
out:
        xds_ca_cert_done(&out);
        if (resp)
                istio__v1__auth__istio_certificate_response__free_unpacked(resp, &pb_allocator);
        wp_free(call.body.p);
        wp_free(frame);
        wp_free(csr);
        EVP_PKEY_free(key);
        if (token) {
                OPENSSL_cleanse(token, strlen(token));
                wp_free(token);
        }
        return r;
}

void xds_ca_cert_done(struct xds_ca_cert *c)
{
        if (!c)
                return;
        if (c->key_pem) {
                OPENSSL_cleanse(c->key_pem, strlen(c->key_pem));
                wp_free(c->key_pem);
        }
        wp_free(c->chain_pem);
        wp_free(c->root_pem);
        memset(c, 0, sizeof(*c));
}

int64_t xds_ca_renew_at(int64_t not_before, int64_t not_after, double jitter)
{
        int64_t life;

        /* An empty or inverted window, or one too wide to compute: renew now. */
        if (not_after <= not_before || __builtin_sub_overflow(not_after, not_before, &life))
                return not_before;
        if (!(jitter > 0.0)) /* also NaN */
                jitter = 0.0;
        if (jitter >= 1.0)
                jitter = nextafter(1.0, 0.0);
        return not_before + life / 2 - (int64_t)((double)life * 0.1 * jitter);
}
