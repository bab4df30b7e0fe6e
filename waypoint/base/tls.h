/*
 * TLS over memory BIOs (OpenSSL 3). Never sees a file descriptor: the caller feeds ciphertext in
 * and takes ciphertext out. TLS 1.3 only, ALPN "h2" only, AES-GCM suites. This file and x509.c are
 * the only users of the OpenSSL headers in the project.
 *
 * Identity (ISTIO-CONTRACT §1.2): both sides present a certificate chain; the peer chain is
 * verified against the mesh root and the peer leaf must carry exactly one SPIFFE URI SAN in the
 * configured trust domain (spiffe://<td>/ns/<ns>/sa/<sa>), checked once after the handshake.
 */
#ifndef WP_TLS_H
#define WP_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct wp_tls_ctx;
struct wp_tls;

struct wp_tls_ctx_config {
        bool server;
        const char *cert_chain_pem; /* leaf first, then intermediates; NUL-terminated PEM */
        const char *key_pem;        /* private key PEM */
        const char *root_pem;       /* trust anchors (one or more certificates) */
        const char *trust_domain;   /* peer SAN must be spiffe://<trust_domain>/...; NULL = any */
        bool require_peer_cert;     /* server: client certificate required (always for HBONE) */
        /* client only: verify the server by DNS name instead of SPIFFE identity (istiod's
         * serving certificate, e.g. "istiod.istio-system.svc"); also sent as SNI. */
        const char *verify_hostname;
};

/* Builds a shared, immutable context (thread-safe to use from many connections). Returns 0,
 * -EINVAL (bad PEM, key does not match cert), -ENOMEM. *reterr_desc: static or thread-local text. */
int wp_tls_ctx_new(const struct wp_tls_ctx_config *cfg, struct wp_tls_ctx **ret,
                   const char **reterr_desc);
struct wp_tls_ctx *wp_tls_ctx_ref(struct wp_tls_ctx *ctx);
struct wp_tls_ctx *wp_tls_ctx_unref(struct wp_tls_ctx *ctx); /* atomic refcount; returns NULL */
/* The SPIFFE URI of our own leaf certificate (borrowed, lives as long as ctx). */
const char *wp_tls_ctx_own_uri(const struct wp_tls_ctx *ctx);
/* notAfter of our own leaf certificate, seconds since the epoch. */
int64_t wp_tls_ctx_own_not_after(const struct wp_tls_ctx *ctx);

/* wp_tls_ctx_new() from PEM files (certificate chain, key, roots; each at most 1 MiB). The
 * description of a failure is written to errbuf ("cannot read <path>: ..." or the context's
 * error). Returns 0 or -errno. */
int wp_tls_ctx_new_from_files(bool server, const char *cert_file, const char *key_file,
                              const char *root_file, const char *trust_domain,
                              struct wp_tls_ctx **ret, char *errbuf, size_t errcap);

/* One connection. Takes a reference on ctx. Returns 0 or -ENOMEM. */
int wp_tls_new(struct wp_tls_ctx *ctx, struct wp_tls **ret);
struct wp_tls *wp_tls_free(struct wp_tls *t); /* NULL-safe, returns NULL */

/* Ciphertext from the network. Returns n or -ENOMEM. */
ssize_t wp_tls_feed(struct wp_tls *t, const uint8_t *cipher, size_t n);
/* Drives the handshake. Returns 0 when complete (peer verified), -EAGAIN when it needs more
 * input (send wp_tls_output() first), -EPROTO on failure (wp_tls_error() says why, e.g. "peer
 * certificate not in trust domain", "no ALPN h2", "protocol version"). */
int wp_tls_handshake(struct wp_tls *t);
bool wp_tls_handshake_done(const struct wp_tls *t);
/* Plaintext out of the connection. Returns bytes (> 0), 0 when the peer sent close_notify,
 * -EAGAIN when no complete record is buffered, -EPROTO on a fatal error. */
ssize_t wp_tls_read(struct wp_tls *t, uint8_t *out, size_t cap);
/* Encrypts plaintext (all of it). Returns n or -EPROTO/-ENOMEM. Only after the handshake. */
ssize_t wp_tls_write(struct wp_tls *t, const uint8_t *plain, size_t n);
/* Queues close_notify. */
void wp_tls_shutdown(struct wp_tls *t);
/* Ciphertext waiting to be sent. */
size_t wp_tls_output_pending(const struct wp_tls *t);
/* Moves up to cap bytes of pending ciphertext into out. Returns bytes copied. */
size_t wp_tls_output(struct wp_tls *t, uint8_t *out, size_t cap);

const char *wp_tls_error(const struct wp_tls *t);
/* After the handshake: the verified peer SPIFFE URI (borrowed, lives as long as t), or NULL. */
const char *wp_tls_peer_uri(const struct wp_tls *t);
/* Negotiated ALPN ("h2") or NULL. */
const char *wp_tls_alpn(const struct wp_tls *t);
const char *wp_tls_version(const struct wp_tls *t); /* "TLSv1.3" */

#endif
