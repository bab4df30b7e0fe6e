/*
 * TLS over memory BIOs (OpenSSL 3), sans-I/O. One SSL_CTX per wp_tls_ctx, shared read-only by
 * every connection; one SSL plus two memory BIOs per wp_tls.
 *
 * Transport profile (ISTIO-CONTRACT §1.1): TLS 1.3 only, AES-GCM suites only, ALPN "h2" only, no
 * SNI, no resumption, no tickets. Identity (§1.2): the chain is verified against the configured
 * roots by OpenSSL, then the leaf must carry exactly one SPIFFE URI SAN in the trust domain. The
 * identity check runs inside the verify callback so that a failure aborts the handshake with an
 * alert to the peer, as rustls' verifiers (ztunnel) and Envoy's SAN matchers do.
 *
 * OpenSSL's error queue is translated here into -errno plus a per-connection description, and
 * is always left empty.
 */
#include "waypoint/base/tls.h"

#include <errno.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/x509.h"

#define TLS_CIPHERSUITES "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"
#define TLS_GROUPS       "X25519:P-256:P-384"
/* root -> (intermediates) -> leaf; Istio plug-in CAs rarely go beyond two intermediates. */
#define TLS_VERIFY_DEPTH 8
/* "spiffe://" + td + "/ns/" + ns + "/sa/" + sa + NUL */
#define URI_CAP (9 + WP_SPIFFE_TD_MAX + 4 + WP_SPIFFE_SEG_MAX + 4 + WP_SPIFFE_SEG_MAX + 1)
#define ERR_CAP 256

static const unsigned char alpn_h2[] = {2, 'h', '2'};

struct wp_tls_ctx {
        atomic_uint refs;
        bool server;
        SSL_CTX *ssl_ctx;
        char *trust_domain; /* NULL: any trust domain */
        char *verify_hostname; /* client: DNS-name verification instead of SPIFFE */
        int64_t own_not_after;
        char own_uri[URI_CAP]; /* "" when our leaf has no valid SPIFFE id */
};

struct wp_tls {
        struct wp_tls_ctx *ctx;
        SSL *ssl;
        BIO *rbio; /* ciphertext from the network (owned by ssl) */
        BIO *wbio; /* ciphertext to the network (owned by ssl) */
        bool done;
        bool failed;
        bool peer_checked;
        const char *alpn;
        char peer_uri[URI_CAP];
        char cb_err[ERR_CAP]; /* set by our callbacks (verify, ClientHello) when they fail */
        char err[ERR_CAP];
};

/* ---- context ----------------------------------------------------------------------------- */

/* Server: accept only "h2" from the client's list (RFC 7301 §3.2: otherwise a fatal
 * no_application_protocol alert, which SSL_TLSEXT_ERR_ALERT_FATAL sends). */
static int on_alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                          const unsigned char *in, unsigned int inlen, void *arg)
{
        unsigned int i = 0;

        while (i < inlen) {
                unsigned int n = in[i];

                if (n == 0 || n > inlen - i - 1)
                        break;
                if (n == 2 && in[i + 1] == 'h' && in[i + 2] == '2') {
                        *out = in + i + 1;
                        *outlen = 2;
                        return SSL_TLSEXT_ERR_OK;
                }
                i += 1 + n;
        }
        return SSL_TLSEXT_ERR_ALERT_FATAL;
}

/* Server: a ClientHello without ALPN at all never reaches on_alpn_select; refuse it here so it
 * fails during the handshake with the same alert instead of after it. */
static int on_client_hello(SSL *ssl, int *al, void *arg)
{
        struct wp_tls *t = SSL_get_app_data(ssl);
        const unsigned char *ext;
        size_t len;

        if (!SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_application_layer_protocol_negotiation,
                                       &ext, &len)) {
                if (t)
                        snprintf(t->cb_err, sizeof(t->cb_err),
                                 "no application protocol (client offered no ALPN)");
                *al = SSL_AD_NO_APPLICATION_PROTOCOL;
                return SSL_CLIENT_HELLO_ERROR;
        }
        return SSL_CLIENT_HELLO_SUCCESS;
}

static int count_uri_sans(const X509 *x)
{
        GENERAL_NAMES *names = X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL);
        int i, n = 0;

        if (!names) {
                ERR_clear_error();
                return 0;
        }
        for (i = 0; i < sk_GENERAL_NAME_num(names); i++)
                if (sk_GENERAL_NAME_value(names, i)->type == GEN_URI)
                        n++;
        GENERAL_NAMES_free(names);
        return n;
}

/* The SPIFFE check on a verified peer leaf. Fills t->peer_uri, or t->cb_err and -EPROTO. */
static int check_peer(struct wp_tls *t, X509 *leaf)
{
        struct wp_spiffe_id id;
        int r;

        t->peer_uri[0] = 0;
        if (t->ctx->verify_hostname) {
                /* OpenSSL matched the DNS name (X509_VERIFY_PARAM_set1_host) */
                t->peer_checked = true;
                return 0;
        }
        r = wp_x509_spiffe_uri(leaf, t->peer_uri, sizeof(t->peer_uri));
        if (r == -ENOENT) {
                snprintf(t->cb_err, sizeof(t->cb_err),
                         "peer certificate has no URI SAN (SPIFFE identity required)");
                return -EPROTO;
        }
        if (r == -EINVAL && count_uri_sans(leaf) > 1) {
                snprintf(t->cb_err, sizeof(t->cb_err),
                         "peer certificate has more than one URI SAN");
                return -EPROTO;
        }
        if (r < 0) {
                snprintf(t->cb_err, sizeof(t->cb_err),
                         "peer certificate URI SAN is not a valid SPIFFE identity "
                         "(spiffe://<td>/ns/<ns>/sa/<sa>)");
                t->peer_uri[0] = 0;
                return -EPROTO;
        }
        r = wp_spiffe_parse(t->peer_uri, strlen(t->peer_uri), &id);
        if (r < 0) { /* cannot happen: wp_x509_spiffe_uri validated it */
                snprintf(t->cb_err, sizeof(t->cb_err), "peer identity is not valid");
                t->peer_uri[0] = 0;
                return -EPROTO;
        }
        if (t->ctx->trust_domain && strcmp(id.td, t->ctx->trust_domain) != 0) {
                /* Safe to quote: the URI passed the SPIFFE charset check. */
                snprintf(t->cb_err, sizeof(t->cb_err),
                         "peer identity %.120s not in trust domain %.100s", t->peer_uri,
                         t->ctx->trust_domain);
                t->peer_uri[0] = 0;
                return -EPROTO;
        }
        t->peer_checked = true;
        return 0;
}

/* Runs once per chain element after OpenSSL's own check; at depth 0 with a valid chain we add
 * the SPIFFE identity check, so that its failure aborts the handshake with an alert. */
static int on_verify(int ok, X509_STORE_CTX *xs)
{
        SSL *ssl = X509_STORE_CTX_get_ex_data(xs, SSL_get_ex_data_X509_STORE_CTX_idx());
        struct wp_tls *t = ssl ? SSL_get_app_data(ssl) : NULL;

        if (!ok || !t)
                return ok;
        if (X509_STORE_CTX_get_error_depth(xs) != 0)
                return 1;
        if (check_peer(t, X509_STORE_CTX_get_current_cert(xs)) < 0) {
                X509_STORE_CTX_set_error(xs, X509_V_ERR_APPLICATION_VERIFICATION);
                return 0;
        }
        return 1;
}

/* Loads our leaf + intermediates. The intermediates are sent in the handshake. */
static int load_chain(struct wp_tls_ctx *c, const char *pem, X509 **ret_leaf,
                      const char **reterr_desc)
{
        BIO *bio;
        X509 *leaf, *x;
        int r = 0;

        bio = BIO_new_mem_buf(pem, -1);
        if (!bio) {
                *reterr_desc = "out of memory";
                return -ENOMEM;
        }
        leaf = PEM_read_bio_X509(bio, NULL, NULL, NULL);
        if (!leaf) {
                *reterr_desc = "cannot parse certificate chain PEM (no certificate)";
                r = -EINVAL;
                goto out_bio;
        }
        if (SSL_CTX_use_certificate(c->ssl_ctx, leaf) != 1) {
                *reterr_desc = "certificate rejected (unsupported key or too weak)";
                r = -EINVAL;
                goto out_leaf;
        }
        while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL))) {
                if (SSL_CTX_add0_chain_cert(c->ssl_ctx, x) != 1) {
                        X509_free(x);
                        *reterr_desc = "cannot add intermediate certificate";
                        r = -EINVAL;
                        goto out_leaf;
                }
        }
        /* The loop ends on "no start line" at the end of the input; anything else is garbage
         * between or inside certificates. */
        if (ERR_GET_REASON(ERR_peek_last_error()) != PEM_R_NO_START_LINE) {
                *reterr_desc = "cannot parse certificate chain PEM (bad intermediate)";
                r = -EINVAL;
                goto out_leaf;
        }
        *ret_leaf = leaf;
        leaf = NULL;
out_leaf:
        X509_free(leaf);
out_bio:
        BIO_free(bio);
        ERR_clear_error();
        return r;
}

static int load_key(struct wp_tls_ctx *c, const char *pem, const char **reterr_desc)
{
        EVP_PKEY *key;
        BIO *bio;
        int r = 0;

        bio = BIO_new_mem_buf(pem, -1);
        if (!bio) {
                *reterr_desc = "out of memory";
                return -ENOMEM;
        }
        key = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
        if (!key) {
                *reterr_desc = "cannot parse private key PEM";
                r = -EINVAL;
                goto out_bio;
        }
        if (SSL_CTX_use_PrivateKey(c->ssl_ctx, key) != 1 ||
            SSL_CTX_check_private_key(c->ssl_ctx) != 1) {
                *reterr_desc = "private key does not match certificate";
                r = -EINVAL;
        }
        EVP_PKEY_free(key);
out_bio:
        BIO_free(bio);
        ERR_clear_error();
        return r;
}

static int load_roots(struct wp_tls_ctx *c, const char *pem, const char **reterr_desc)
{
        X509_STORE *store = SSL_CTX_get_cert_store(c->ssl_ctx);
        BIO *bio;
        X509 *x;
        int n = 0, r = 0;

        bio = BIO_new_mem_buf(pem, -1);
        if (!bio) {
                *reterr_desc = "out of memory";
                return -ENOMEM;
        }
        while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL))) {
                int ok = X509_STORE_add_cert(store, x);

                X509_free(x);
                if (!ok) {
                        *reterr_desc = "cannot add root certificate";
                        r = -EINVAL;
                        goto out_bio;
                }
                n++;
        }
        if (n == 0 || ERR_GET_REASON(ERR_peek_last_error()) != PEM_R_NO_START_LINE) {
                *reterr_desc = "cannot parse root certificates PEM";
                r = -EINVAL;
        }
out_bio:
        BIO_free(bio);
        ERR_clear_error();
        return r;
}

static int64_t cert_not_after(const X509 *x)
{
        struct tm tm;

        memset(&tm, 0, sizeof(tm));
        if (ASN1_TIME_to_tm(X509_get0_notAfter(x), &tm) != 1) {
                ERR_clear_error();
                return 0;
        }
        return (int64_t)timegm(&tm);
}

int wp_tls_ctx_new(const struct wp_tls_ctx_config *cfg, struct wp_tls_ctx **ret,
                   const char **reterr_desc)
{
        const char *dummy;
        struct wp_tls_ctx *c;
        X509 *leaf = NULL;
        long opts;
        int r;

        if (!reterr_desc)
                reterr_desc = &dummy;
        if (!cfg || !ret || !cfg->root_pem || !cfg->cert_chain_pem != !cfg->key_pem ||
            (cfg->server && !cfg->cert_chain_pem)) {
                *reterr_desc = "incomplete TLS configuration";
                return -EINVAL;
        }
        if (cfg->trust_domain &&
            (cfg->trust_domain[0] == 0 || strlen(cfg->trust_domain) > WP_SPIFFE_TD_MAX)) {
                *reterr_desc = "bad trust domain";
                return -EINVAL;
        }

        c = wp_calloc(1, sizeof(*c));
        if (!c)
                goto err_nomem;
        atomic_init(&c->refs, 1);
        c->server = cfg->server;
        if (cfg->trust_domain) {
                c->trust_domain = wp_strdup(cfg->trust_domain);
                if (!c->trust_domain)
                        goto err_nomem_free;
        }
        c->ssl_ctx = SSL_CTX_new(cfg->server ? TLS_server_method() : TLS_client_method());
        if (!c->ssl_ctx)
                goto err_nomem_free;

        if (SSL_CTX_set_min_proto_version(c->ssl_ctx, TLS1_3_VERSION) != 1 ||
            SSL_CTX_set_max_proto_version(c->ssl_ctx, TLS1_3_VERSION) != 1 ||
            SSL_CTX_set_ciphersuites(c->ssl_ctx, TLS_CIPHERSUITES) != 1 ||
            SSL_CTX_set1_groups_list(c->ssl_ctx, TLS_GROUPS) != 1) {
                *reterr_desc = "OpenSSL rejected the TLS 1.3 profile";
                r = -ENOMEM; /* the strings are constant: only allocation can fail here */
                goto err_free;
        }
        /* ISTIO-CONTRACT §1.1: no resumption (ztunnel disables it) and no tickets. */
        opts = SSL_OP_NO_TICKET | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE;
        SSL_CTX_set_options(c->ssl_ctx, opts);
        SSL_CTX_set_session_cache_mode(c->ssl_ctx, SSL_SESS_CACHE_OFF);
        SSL_CTX_set_num_tickets(c->ssl_ctx, 0);
        /* SSL_MODE_RELEASE_BUFFERS: an idle connection gives back its two ~17 KB record buffers
         * (33 KB per connection, most of an idle HBONE connection's memory); the price is one
         * allocation per record while data flows, small next to the record's AES-GCM. */
        SSL_CTX_set_mode(c->ssl_ctx, SSL_MODE_AUTO_RETRY | SSL_MODE_RELEASE_BUFFERS);

        if (cfg->cert_chain_pem) {
                r = load_chain(c, cfg->cert_chain_pem, &leaf, reterr_desc);
                if (r < 0)
                        goto err_free;
                r = load_key(c, cfg->key_pem, reterr_desc);
                if (r < 0)
                        goto err_leaf;
                /* Our own identity: used by the daemon for the CONNECT path and for rotation.
                 * Not fatal here; the daemon decides whether a non-SPIFFE cert is acceptable. */
                if (wp_x509_spiffe_uri(leaf, c->own_uri, sizeof(c->own_uri)) < 0)
                        c->own_uri[0] = 0;
                c->own_not_after = cert_not_after(leaf);
                X509_free(leaf);
                leaf = NULL;
        }
        r = load_roots(c, cfg->root_pem, reterr_desc);
        if (r < 0)
                goto err_free;

        if (cfg->server) {
                int mode = SSL_VERIFY_PEER;

                if (cfg->require_peer_cert)
                        mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
                SSL_CTX_set_verify(c->ssl_ctx, mode, on_verify);
                SSL_CTX_set_alpn_select_cb(c->ssl_ctx, on_alpn_select, NULL);
                SSL_CTX_set_client_hello_cb(c->ssl_ctx, on_client_hello, NULL);
        } else {
                SSL_CTX_set_verify(c->ssl_ctx, SSL_VERIFY_PEER, on_verify);
                if (cfg->verify_hostname) {
                        c->verify_hostname = wp_strdup(cfg->verify_hostname);
                        if (!c->verify_hostname ||
                            X509_VERIFY_PARAM_set1_host(SSL_CTX_get0_param(c->ssl_ctx),
                                                        cfg->verify_hostname, 0) != 1) {
                                *reterr_desc = "cannot set the verified host name";
                                r = -ENOMEM;
                                goto err_free;
                        }
                }
                /* Note the inverted convention: 0 is success. */
                if (SSL_CTX_set_alpn_protos(c->ssl_ctx, alpn_h2, sizeof(alpn_h2)) != 0) {
                        *reterr_desc = "out of memory";
                        r = -ENOMEM;
                        goto err_free;
                }
        }
        SSL_CTX_set_verify_depth(c->ssl_ctx, TLS_VERIFY_DEPTH);
        ERR_clear_error();
        *ret = c;
        return 0;

err_leaf:
        X509_free(leaf);
err_free:
        ERR_clear_error();
        wp_tls_ctx_unref(c);
        return r;
err_nomem_free:
        ERR_clear_error();
        wp_tls_ctx_unref(c);
err_nomem:
        *reterr_desc = "out of memory";
        return -ENOMEM;
}

struct wp_tls_ctx *wp_tls_ctx_ref(struct wp_tls_ctx *ctx)
{
        if (ctx)
                atomic_fetch_add_explicit(&ctx->refs, 1, memory_order_relaxed);
        return ctx;
}

struct wp_tls_ctx *wp_tls_ctx_unref(struct wp_tls_ctx *ctx)
{
        if (!ctx)
                return NULL;
        if (atomic_fetch_sub_explicit(&ctx->refs, 1, memory_order_acq_rel) != 1)
                return NULL;
        SSL_CTX_free(ctx->ssl_ctx);
        wp_free(ctx->trust_domain);
        wp_free(ctx->verify_hostname);
        wp_free(ctx);
        return NULL;
}

const char *wp_tls_ctx_own_uri(const struct wp_tls_ctx *ctx)
{
        return ctx && ctx->own_uri[0] ? ctx->own_uri : NULL;
}

int64_t wp_tls_ctx_own_not_after(const struct wp_tls_ctx *ctx)
{
        return ctx ? ctx->own_not_after : 0;
}

/* ---- connection -------------------------------------------------------------------------- */

int wp_tls_new(struct wp_tls_ctx *ctx, struct wp_tls **ret)
{
        struct wp_tls *t;

        if (!ctx || !ret)
                return -EINVAL;
        t = wp_calloc(1, sizeof(*t));
        if (!t)
                return -ENOMEM;
        t->ssl = SSL_new(ctx->ssl_ctx);
        if (!t->ssl)
                goto err_free;
        t->rbio = BIO_new(BIO_s_mem());
        if (!t->rbio)
                goto err_ssl;
        t->wbio = BIO_new(BIO_s_mem());
        if (!t->wbio)
                goto err_rbio;
        /* An empty memory BIO means "retry later", not EOF: the caller feeds more. */
        BIO_set_mem_eof_return(t->rbio, -1);
        BIO_set_mem_eof_return(t->wbio, -1);
        if (!SSL_set_app_data(t->ssl, t))
                goto err_wbio;
        SSL_set_bio(t->ssl, t->rbio, t->wbio); /* ssl owns both from here */
        if (ctx->server) {
                SSL_set_accept_state(t->ssl);
        } else {
                SSL_set_connect_state(t->ssl);
                if (ctx->verify_hostname)
                        SSL_set_tlsext_host_name(t->ssl, ctx->verify_hostname);
        }
        t->ctx = wp_tls_ctx_ref(ctx);
        *ret = t;
        return 0;

err_wbio:
        BIO_free(t->wbio);
err_rbio:
        BIO_free(t->rbio);
err_ssl:
        SSL_free(t->ssl);
err_free:
        wp_free(t);
        ERR_clear_error();
        return -ENOMEM;
}

struct wp_tls *wp_tls_free(struct wp_tls *t)
{
        if (!t)
                return NULL;
        SSL_free(t->ssl);
        ERR_clear_error();
        wp_tls_ctx_unref(t->ctx);
        wp_free(t);
        return NULL;
}

ssize_t wp_tls_feed(struct wp_tls *t, const uint8_t *cipher, size_t n)
{
        size_t off = 0;

        while (off < n) {
                int chunk = n - off > INT_MAX ? INT_MAX : (int)(n - off);
                int w = BIO_write(t->rbio, cipher + off, chunk);

                if (w <= 0) {
                        ERR_clear_error();
                        return -ENOMEM;
                }
                off += (size_t)w;
        }
        return (ssize_t)n;
}

/* Translates a failed SSL_* call into -EAGAIN, 0 (close_notify) or -EPROTO/-ENOMEM with t->err
 * describing the first error on the queue. Leaves the queue empty. */
static int fail(struct wp_tls *t, int ssl_ret)
{
        int e = SSL_get_error(t->ssl, ssl_ret);
        unsigned long err;
        const char *reason;
        int r = -EPROTO;

        switch (e) {
        case SSL_ERROR_WANT_READ:
        case SSL_ERROR_WANT_WRITE: /* memory BIOs never block on write; be safe anyway */
                ERR_clear_error();
                return -EAGAIN;
        case SSL_ERROR_ZERO_RETURN:
                ERR_clear_error();
                return 0;
        default:
                break;
        }
        /* The earliest entry is the root cause; later ones are the call stack unwinding. */
        err = ERR_peek_error();
        if (t->cb_err[0] && (err == 0 || ERR_GET_REASON(err) == SSL_R_CERTIFICATE_VERIFY_FAILED ||
                             ERR_GET_REASON(err) == SSL_R_CALLBACK_FAILED)) {
                snprintf(t->err, sizeof(t->err), "%s", t->cb_err);
        } else if (err && ERR_GET_LIB(err) == ERR_LIB_SSL &&
                   ERR_GET_REASON(err) == SSL_R_CERTIFICATE_VERIFY_FAILED) {
                snprintf(t->err, sizeof(t->err), "certificate verify failed: %s",
                         X509_verify_cert_error_string(SSL_get_verify_result(t->ssl)));
        } else if (err && ERR_GET_REASON(err) == ERR_R_MALLOC_FAILURE) {
                snprintf(t->err, sizeof(t->err), "out of memory");
                r = -ENOMEM;
        } else if (err) {
                reason = ERR_reason_error_string(err);
                if (reason)
                        snprintf(t->err, sizeof(t->err), "%s", reason);
                else
                        snprintf(t->err, sizeof(t->err), "TLS error %s:%d",
                                 ERR_lib_error_string(err) ? ERR_lib_error_string(err) : "?",
                                 ERR_GET_REASON(err));
        } else if (e == SSL_ERROR_SYSCALL) {
                snprintf(t->err, sizeof(t->err), "unexpected end of TLS stream");
        } else {
                snprintf(t->err, sizeof(t->err), "TLS error %d", e);
        }
        ERR_clear_error();
        t->failed = true;
        t->peer_uri[0] = 0;
        return r;
}

static int fail_desc(struct wp_tls *t, const char *desc)
{
        snprintf(t->err, sizeof(t->err), "%s", desc);
        t->failed = true;
        t->peer_uri[0] = 0;
        ERR_clear_error();
        return -EPROTO;
}

/* Checks that run once the handshake has completed. */
static int handshake_finished(struct wp_tls *t)
{
        const unsigned char *alpn = NULL;
        unsigned int alpn_len = 0;
        X509 *peer;

        SSL_get0_alpn_selected(t->ssl, &alpn, &alpn_len);
        if (alpn_len != 2 || memcmp(alpn, "h2", 2) != 0)
                return fail_desc(t, t->ctx->server ? "no application protocol (client did not "
                                                     "offer ALPN h2)"
                                                   : "server did not select ALPN h2");
        t->alpn = "h2";
        /* Belt and braces: the verify callback normally did all of this already. */
        peer = SSL_get0_peer_certificate(t->ssl);
        if (peer) {
                if (SSL_get_verify_result(t->ssl) != X509_V_OK)
                        return fail_desc(t, "peer certificate not verified");
                if (!t->peer_checked && check_peer(t, peer) < 0)
                        return fail_desc(t, t->cb_err);
        } else if (!t->ctx->server) {
                return fail_desc(t, "server sent no certificate");
        }
        t->done = true;
        return 0;
}

int wp_tls_handshake(struct wp_tls *t)
{
        int r;

        if (t->failed)
                return -EPROTO;
        if (t->done)
                return 0;
        ERR_clear_error();
        r = SSL_do_handshake(t->ssl);
        if (r == 1)
                return handshake_finished(t);
        r = fail(t, r);
        return r == 0 ? fail_desc(t, "connection closed during handshake") : r;
}

bool wp_tls_handshake_done(const struct wp_tls *t)
{
        return t->done && !t->failed;
}

ssize_t wp_tls_read(struct wp_tls *t, uint8_t *out, size_t cap)
{
        size_t n = 0;
        int r;

        if (!t->done) {
                r = wp_tls_handshake(t);
                if (r < 0)
                        return r;
        }
        if (t->failed)
                return -EPROTO;
        if (cap == 0)
                return -EAGAIN;
        /* Stale errors from other OpenSSL users on this thread would make SSL_get_error lie. */
        ERR_clear_error();
        r = SSL_read_ex(t->ssl, out, cap, &n);
        if (r == 1)
                return (ssize_t)n;
        return fail(t, r);
}

ssize_t wp_tls_write(struct wp_tls *t, const uint8_t *plain, size_t n)
{
        size_t written = 0;
        int r;

        if (t->failed)
                return -EPROTO;
        if (!t->done)
                return fail_desc(t, "write before the TLS handshake completed");
        if (n == 0)
                return 0;
        ERR_clear_error();
        /* Memory BIOs grow, so one call writes everything (no partial writes). */
        r = SSL_write_ex(t->ssl, plain, n, &written);
        if (r == 1 && written == n)
                return (ssize_t)n;
        r = fail(t, r);
        return r < 0 && r != -EAGAIN ? r : fail_desc(t, "short TLS write");
}

void wp_tls_shutdown(struct wp_tls *t)
{
        if (t->failed || !t->done)
                return;
        ERR_clear_error();
        (void)SSL_shutdown(t->ssl);
        ERR_clear_error();
}

size_t wp_tls_output_pending(const struct wp_tls *t)
{
        return BIO_ctrl_pending(t->wbio);
}

size_t wp_tls_output(struct wp_tls *t, uint8_t *out, size_t cap)
{
        int n;

        if (cap == 0)
                return 0;
        n = BIO_read(t->wbio, out, cap > INT_MAX ? INT_MAX : (int)cap);
        if (n <= 0) {
                ERR_clear_error();
                return 0;
        }
        return (size_t)n;
}

const char *wp_tls_error(const struct wp_tls *t)
{
        return t->err[0] ? t->err : NULL;
}

const char *wp_tls_peer_uri(const struct wp_tls *t)
{
        return t->done && !t->failed && t->peer_uri[0] ? t->peer_uri : NULL;
}

const char *wp_tls_alpn(const struct wp_tls *t)
{
        return t->done && !t->failed ? t->alpn : NULL;
}

const char *wp_tls_version(const struct wp_tls *t)
{
        return SSL_get_version(t->ssl);
}

int wp_tls_ctx_new_from_files(bool server, const char *cert_file, const char *key_file,
                              const char *root_file, const char *trust_domain,
                              struct wp_tls_ctx **ret, char *errbuf, size_t errcap)
{
        const char *files[3] = {cert_file, key_file, root_file};
        char *pem[3] = {NULL, NULL, NULL};
        const char *err = NULL;
        int r = 0;

        for (int i = 0; i < 3 && r >= 0; i++) {
                r = wp_read_file(files[i], 1 << 20, &pem[i], NULL);
                if (r < 0)
                        snprintf(errbuf, errcap, "cannot read %s: %s", files[i], strerror(-r));
        }
        if (r >= 0) {
                struct wp_tls_ctx_config cfg = {
                        .server = server,
                        .cert_chain_pem = pem[0],
                        .key_pem = pem[1],
                        .root_pem = pem[2],
                        .trust_domain = trust_domain,
                        .require_peer_cert = true,
                };

                r = wp_tls_ctx_new(&cfg, ret, &err);
                if (r < 0)
                        snprintf(errbuf, errcap, "%s", err ? err : strerror(-r));
        }
        for (int i = 0; i < 3; i++)
                wp_free(pem[i]);
        return r;
}
