/*
 * The control thread: identity from the Istio CA and config from istiod's ADS, applied to the
 * runtime without disturbing traffic. Blocking I/O with poll(): it is not on the data path.
 *
 *   identity: CSR -> CreateCertificate -> new TLS contexts published to the workers (new
 *             connections use them at once, open ones keep theirs); renewed at half the
 *             lifetime with jitter; on failure retried with backoff, the old certificate kept
 *             until it expires.
 *   config:   TCP + TLS (istiod verified against the mesh root and its DNS name) + HTTP/2 gRPC
 *             stream DeltaAggregatedResources (or SotW); every accepted update becomes a
 *             snapshot before it is ACKed; a resource set that does not compile is NACKed with
 *             the compiler's message and the old snapshot keeps serving. Reconnects with
 *             jittered exponential backoff; the bearer token is re-read for every stream.
 *   ready:    once a certificate and a first complete snapshot are in place.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/log.h"
#include "waypoint/base/time.h"
#include "waypoint/base/tls.h"
#include "waypoint/base/x509.h"
#include "waypoint/bootstrap.h"
#include "waypoint/control.h"
#include "waypoint/daemon.h"
#include "waypoint/snapshot.h"
#include "xds-client/ads.h"
#include "xds-client/ca.h"
#include "xds-client/grpc.h"

#define BACKOFF_MIN_MS 500
#define BACKOFF_MAX_MS 30000
#define IO_BUF (64 * 1024)

struct wp_control {
        struct wp_runtime *rt;
        struct wp_bootstrap *bs;
        bool static_identity; /* --cert-file: no CA */
        bool static_config;   /* --config-file: no ADS */
        pthread_t thread;
        int stop_fd;
        _Atomic bool stop;

        /* identity */
        char *root_pem;
        bool have_cert;
        int64_t cert_not_after;
        int64_t renew_at;     /* wall clock seconds */
        uint32_t ca_backoff_ms;
        uint64_t rotations;

        /* config */
        struct wp_tls_ctx *xds_tls;
        struct xds_ads *ads;
        bool have_snapshot;
        uint32_t xds_backoff_ms;
        uint64_t updates, rejects;

        /* one stream's I/O */
        int fd;
        struct wp_tls *tls;
        struct xds_grpc_session *grpc;
        struct xds_grpc_stream *stream;
        bool stream_closed;
        bool stream_failed_fatal;
};

static uint64_t rnd64(void)
{
        static __thread uint64_t x;

        if (!x)
                x = wp_now_ns() | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        return x;
}

static uint32_t backoff_next(uint32_t *b)
{
        uint32_t base = *b ? *b : BACKOFF_MIN_MS, wait;

        /* full jitter in [base/2, base] */
        wait = base / 2 + (uint32_t)(rnd64() % (base / 2 + 1));
        *b = base * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : base * 2;
        return wait;
}

/* Sleeps up to ms, waking early on stop. */
static void nap(struct wp_control *c, uint32_t ms)
{
        struct pollfd p = {.fd = c->stop_fd, .events = POLLIN};

        poll(&p, 1, (int)ms);
}

static void update_ready(struct wp_control *c)
{
        bool ready = (c->static_identity || c->have_cert) && (c->static_config || c->have_snapshot);

        if (ready && !atomic_load(&c->rt->ready)) {
                atomic_store(&c->rt->ready, true);
                wp_info("control", "ready: certificate and first complete config in place");
        }
}

/* ---- identity ---- */

static int publish_identity(struct wp_control *c, const struct xds_ca_cert *cert)
{
        struct wp_tls_ctx *server = NULL, *client = NULL;
        const char *err = NULL;
        struct wp_tls_ctx_config cfg = {
                .server = true,
                .cert_chain_pem = cert->chain_pem,
                .key_pem = cert->key_pem,
                .root_pem = c->root_pem,
                .trust_domain = c->rt->opts.trust_domain,
                .require_peer_cert = true,
        };
        int r;

        r = wp_tls_ctx_new(&cfg, &server, &err);
        if (r < 0) {
                wp_error("ca", "new certificate unusable (server): %s", err);
                return r;
        }
        cfg.server = false;
        r = wp_tls_ctx_new(&cfg, &client, &err);
        if (r < 0) {
                wp_error("ca", "new certificate unusable (client): %s", err);
                wp_tls_ctx_unref(server);
                return r;
        }
        wp_runtime_set_tls(c->rt, server, client);
        return 0;
}

static void identity_refresh(struct wp_control *c)
{
        struct xds_ca_cert cert = {0};
        struct xds_ca_config cfg = {
                .address = c->bs->ca_address,
                .root_pem = c->root_pem,
                .token_path = c->bs->token_file,
                .cluster_id = c->bs->cluster_id,
                .spiffe_uri = c->bs->spiffe_uri,
                .ttl_seconds = c->bs->cert_ttl_s,
                .timeout_ms = 10000,
                .tls_server_name = c->bs->xds_server_name,
        };
        char *err = NULL;
        int64_t now = (int64_t)time(NULL);
        int r;

        r = xds_ca_request(&cfg, &cert, &err);
        if (r == 0)
                r = publish_identity(c, &cert);
        if (r < 0) {
                uint32_t wait = backoff_next(&c->ca_backoff_ms);

                wp_warn("ca", "certificate request to %s failed: %s; retrying in %u ms%s",
                        cfg.address, err ? err : strerror(-r), wait,
                        c->have_cert && c->cert_not_after > now ? " (current certificate still valid)"
                                                                : "");
                wp_free(err);
                xds_ca_cert_done(&cert);
                c->renew_at = now + (wait + 999) / 1000;
                return;
        }
        c->ca_backoff_ms = 0;
        c->rotations += c->have_cert;
        c->have_cert = true;
        c->cert_not_after = cert.not_after;
        c->renew_at = xds_ca_renew_at(cert.not_before, cert.not_after,
                                      (double)(rnd64() % 1000) / 1000.0);
        wp_info("ca", "certificate for %s valid until %ld, renewal at %ld", c->bs->spiffe_uri,
                (long)cert.not_after, (long)c->renew_at);
        xds_ca_cert_done(&cert);
        update_ready(c);
}

/* ---- config ---- */

static int on_update(struct xds_resources *res, char **reterr_desc, void *user)
{
        struct wp_control *c = user;
        struct wp_snapshot *s = NULL;
        uint64_t t0 = wp_now_ns();
        int r;

        r = wp_snapshot_build(res, &s, reterr_desc);
        if (r < 0) {
                xds_resources_free(res);
                c->rejects++;
                wp_warn("xds", "config rejected (NACK): %s", *reterr_desc ? *reterr_desc : "?");
                return r;
        }
        if (c->rt->opts.upstream_hbone_port)
                s->hbone_port = c->rt->opts.upstream_hbone_port;
        wp_info("xds", "config v%lu: %zu chains, %zu clusters, built in %lu us",
                (unsigned long)s->version, s->nchains, s->nclusters,
                (unsigned long)((wp_now_ns() - t0) / 1000));
        wp_runtime_publish(c->rt, s);
        c->updates++;
        c->have_snapshot = true;
        update_ready(c);
        return 0;
}

static int on_grpc_message(struct xds_grpc_stream *st, const uint8_t *msg, size_t len, void *user)
{
        struct wp_control *c = user;

        if (xds_ads_on_message(c->ads, msg, len) < 0) {
                wp_warn("xds", "undecodable ADS response (%zu bytes): restarting the stream", len);
                xds_grpc_stream_cancel(st);
        }
        return 0;
}

static void on_grpc_close(struct xds_grpc_stream *st, int status, const char *message, void *user)
{
        struct wp_control *c = user;

        c->stream = NULL;
        c->stream_closed = true;
        if (status == 16 || status == 7) /* UNAUTHENTICATED, PERMISSION_DENIED */
                wp_error("xds", "istiod refused the stream (grpc-status %d): %s", status, message);
        else
                wp_warn("xds", "ADS stream closed (grpc-status %d): %s", status, message);
}

static void on_grpc_goaway(struct xds_grpc_session *s, uint32_t err, void *user)
{
        wp_info("xds", "istiod sent GOAWAY (%u): reconnecting after the stream ends", err);
}

static const struct xds_grpc_callbacks grpc_cb = {
        .on_message = on_grpc_message,
        .on_close = on_grpc_close,
        .on_goaway = on_grpc_goaway,
};

static int connect_tcp(const char *address, uint32_t timeout_ms, int *ret_fd)
{
        char host[256], port[16];
        const char *colon = strrchr(address, ':');
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai = NULL, *p;
        int fd = -1, r = -EHOSTUNREACH;

        if (!colon || (size_t)(colon - address) >= sizeof(host))
                return -EINVAL;
        snprintf(host, sizeof(host), "%.*s", (int)(colon - address), address);
        snprintf(port, sizeof(port), "%s", colon + 1);
        if (host[0] == '[') { /* [v6] */
                memmove(host, host + 1, strlen(host));
                host[strlen(host) - 1] = 0;
        }
        if (getaddrinfo(host, port, &hints, &ai) != 0)
                return -EHOSTUNREACH;
        for (p = ai; p; p = p->ai_next) {
                struct pollfd pfd;
                int err = 0;
                socklen_t len = sizeof(err);

                fd = socket(p->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
                if (fd < 0)
                        continue;
                if (connect(fd, p->ai_addr, p->ai_addrlen) < 0 && errno != EINPROGRESS) {
                        r = -errno;
                        close(fd);
                        fd = -1;
                        continue;
                }
                pfd = (struct pollfd){.fd = fd, .events = POLLOUT};
                if (poll(&pfd, 1, (int)timeout_ms) <= 0) {
                        r = -ETIMEDOUT;
                        close(fd);
                        fd = -1;
                        continue;
                }
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                        r = -err;
                        close(fd);
                        fd = -1;
                        continue;
                }
                r = 0;
                break;
        }
        freeaddrinfo(ai);
        if (r == 0)
                *ret_fd = fd;
        return r;
}

static int send_all(int fd, const uint8_t *p, size_t n)
{
        while (n > 0) {
                ssize_t w = send(fd, p, n, MSG_NOSIGNAL);

                if (w < 0) {
                        if (errno == EAGAIN || errno == EINTR) {
                                struct pollfd pfd = {.fd = fd, .events = POLLOUT};

                                poll(&pfd, 1, 1000);
                                continue;
                        }
                        return -errno;
                }
                p += w;
                n -= (size_t)w;
        }
        return 0;
}

static int flush_tls(struct wp_control *c)
{
        uint8_t buf[IO_BUF];
        size_t n;

        while ((n = wp_tls_output(c->tls, buf, sizeof(buf))) > 0) {
                int r = send_all(c->fd, buf, n);

                if (r < 0)
                        return r;
        }
        return 0;
}

/* Moves ADS requests into the gRPC stream and gRPC output into TLS and the socket. */
static int pump_out(struct wp_control *c)
{
        const uint8_t *data;
        ssize_t n;

        while (c->stream && (n = xds_ads_next_request(c->ads, &data)) > 0)
                if (xds_grpc_stream_send(c->stream, data, (size_t)n) < 0)
                        break;
        while ((n = xds_grpc_session_pull(c->grpc, &data)) > 0)
                if (wp_tls_write(c->tls, data, (size_t)n) < 0)
                        return -EPROTO;
        if (n < 0)
                return -EPROTO;
        return flush_tls(c);
}

static int tls_handshake(struct wp_control *c, uint32_t timeout_ms)
{
        uint8_t buf[IO_BUF];
        uint64_t deadline = wp_now_ns() + timeout_ms * WP_NSEC_PER_MSEC;

        for (;;) {
                int r = wp_tls_handshake(c->tls);
                struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
                ssize_t n;

                if (flush_tls(c) < 0)
                        return -EPIPE;
                if (r == 0)
                        return 0;
                if (r != -EAGAIN) {
                        wp_warn("xds", "TLS handshake with istiod failed: %s", wp_tls_error(c->tls));
                        return r;
                }
                if (wp_now_ns() >= deadline)
                        return -ETIMEDOUT;
                if (poll(&pfd, 1, 200) <= 0)
                        continue;
                n = recv(c->fd, buf, sizeof(buf), 0);
                if (n <= 0)
                        return n == 0 ? -ECONNRESET : -errno;
                wp_tls_feed(c->tls, buf, (size_t)n);
        }
}

static void stream_teardown(struct wp_control *c)
{
        c->grpc = xds_grpc_session_free(c->grpc);
        c->stream = NULL;
        c->tls = wp_tls_free(c->tls);
        if (c->fd >= 0)
                close(c->fd);
        c->fd = -1;
}

/* One ADS stream, until it ends. Returns 0 if it got far enough to be synced. */
static int run_stream(struct wp_control *c)
{
        const char *path = c->bs->sotw ? XDS_ADS_SOTW_PATH : XDS_ADS_DELTA_PATH;
        char *token = NULL, auth[8192];
        uint8_t buf[IO_BUF];
        bool synced = false;
        int r;

        c->stream_closed = false;
        r = connect_tcp(c->bs->xds_address, 10000, &c->fd);
        if (r < 0) {
                wp_warn("xds", "cannot connect to istiod at %s: %s", c->bs->xds_address,
                        strerror(-r));
                return r;
        }
        r = wp_tls_new(c->xds_tls, &c->tls);
        if (r < 0 || (r = tls_handshake(c, 10000)) < 0)
                goto out;
        struct xds_grpc_limits lim = {.max_message = c->bs->max_xds_message};
        r = xds_grpc_session_new(&grpc_cb, &lim, c->bs->xds_server_name, c, &c->grpc);
        if (r < 0)
                goto out;
        /* the token is re-read for every stream: kubelet rotates it */
        r = wp_read_file(c->bs->token_file, 64 * 1024, &token, NULL);
        if (r < 0) {
                wp_error("xds", "cannot read token %s: %s", c->bs->token_file, strerror(-r));
                goto out;
        }
        while (*token && (token[strlen(token) - 1] == '\n' || token[strlen(token) - 1] == ' '))
                token[strlen(token) - 1] = 0;
        snprintf(auth, sizeof(auth), "Bearer %s", token);
        wp_free(token);
        struct xds_grpc_header hdrs[] = {
                {"authorization", auth},
                {"clusterid", c->bs->cluster_id},
        };
        r = xds_grpc_stream_open(c->grpc, path, hdrs, 2, c, &c->stream);
        if (r < 0)
                goto out;
        xds_ads_reset(c->ads);
        wp_info("xds", "ADS stream open to %s (%s)", c->bs->xds_address,
                c->bs->sotw ? "state of the world" : "delta");
        for (;;) {
                struct pollfd pfd[2] = {{.fd = c->fd, .events = POLLIN}, {.fd = c->stop_fd, .events = POLLIN}};
                uint64_t next = 0, now = wp_now_ns();
                int timeout = 1000;
                ssize_t n;

                if ((r = pump_out(c)) < 0)
                        break;
                if (c->stream_closed) {
                        r = -ECONNRESET;
                        break;
                }
                if (!synced && xds_ads_synced(c->ads)) {
                        synced = true;
                        c->xds_backoff_ms = 0;
                }
                wp_snapshot_reap();
                if (xds_grpc_session_tick(c->grpc, now, &next) < 0) {
                        wp_warn("xds", "istiod did not answer keepalive PINGs");
                        r = -ETIMEDOUT;
                        break;
                }
                if (next && next > now && (next - now) / WP_NSEC_PER_MSEC < (uint64_t)timeout)
                        timeout = (int)((next - now) / WP_NSEC_PER_MSEC) + 1;
                if (!c->static_identity && (int64_t)time(NULL) >= c->renew_at) {
                        identity_refresh(c);
                        continue;
                }
                if (poll(pfd, 2, timeout) < 0 && errno != EINTR) {
                        r = -errno;
                        break;
                }
                if (atomic_load(&c->stop)) {
                        r = 0;
                        break;
                }
                if (!(pfd[0].revents & (POLLIN | POLLHUP | POLLERR)))
                        continue;
                n = recv(c->fd, buf, sizeof(buf), 0);
                if (n <= 0) {
                        r = n == 0 ? -ECONNRESET : -errno;
                        if (r != -EAGAIN)
                                break;
                        continue;
                }
                wp_tls_feed(c->tls, buf, (size_t)n);
                for (;;) {
                        uint8_t plain[IO_BUF];
                        ssize_t m = wp_tls_read(c->tls, plain, sizeof(plain));

                        if (m == -EAGAIN)
                                break;
                        if (m <= 0) {
                                r = m == 0 ? -ECONNRESET : -EPROTO;
                                goto out;
                        }
                        if (xds_grpc_session_feed(c->grpc, plain, (size_t)m) < 0) {
                                wp_warn("xds", "HTTP/2 error from istiod: %s",
                                        xds_grpc_session_error(c->grpc));
                                r = -EPROTO;
                                goto out;
                        }
                }
        }
out:
        if (c->stream)
                xds_grpc_stream_cancel(c->stream);
        pump_out(c);
        stream_teardown(c);
        return synced ? 0 : (r ? r : -ECONNRESET);
}

static void *control_main(void *arg)
{
        struct wp_control *c = arg;

        while (!atomic_load(&c->stop)) {
                wp_snapshot_reap();
                if (!c->static_identity && !c->have_cert) {
                        identity_refresh(c);
                        if (!c->have_cert) {
                                nap(c, (uint32_t)((c->renew_at - (int64_t)time(NULL)) * 1000));
                                continue;
                        }
                }
                if (c->static_config) {
                        /* nothing to stream: just keep the certificate fresh */
                        int64_t wait = c->static_identity ? 3600 : c->renew_at - (int64_t)time(NULL);

                        if (!c->static_identity && wait <= 0) {
                                identity_refresh(c);
                                continue;
                        }
                        nap(c, (uint32_t)(wait > 3600 ? 3600000 : wait * 1000));
                        continue;
                }
                if (run_stream(c) < 0 && !atomic_load(&c->stop)) {
                        uint32_t wait = backoff_next(&c->xds_backoff_ms);

                        wp_info("xds", "reconnecting to istiod in %u ms", wait);
                        nap(c, wait);
                } else if (!atomic_load(&c->stop)) {
                        nap(c, backoff_next(&c->xds_backoff_ms) / 4);
                }
        }
        return NULL;
}

int wp_control_start(struct wp_runtime *rt, struct wp_bootstrap *bs, bool static_identity,
                     bool static_config, struct wp_control **ret)
{
        struct wp_control *c = wp_xcalloc(1, sizeof(*c));
        int r;

        c->rt = rt;
        c->bs = bs;
        c->static_identity = static_identity;
        c->static_config = static_config;
        c->fd = -1;
        c->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (c->stop_fd < 0) {
                r = -errno;
                goto err;
        }
        if (!static_identity || !static_config) {
                r = wp_read_file(bs->root_cert_file, 1 << 20, &c->root_pem, NULL);
                if (r < 0) {
                        wp_error("control", "cannot read the mesh root %s: %s",
                                 bs->root_cert_file, strerror(-r));
                        goto err;
                }
        }
        if (!static_config) {
                const char *err = NULL;
                struct wp_tls_ctx_config tc = {
                        .server = false,
                        .root_pem = c->root_pem,
                        .verify_hostname = bs->xds_server_name,
                };
                struct xds_ads_config ac = {
                        .delta = !bs->sotw,
                        .node_id = bs->node_id,
                        .node_cluster = bs->node_cluster,
                        .metadata = bs->meta,
                        .nmetadata = bs->nmeta,
                        .user_agent_name = "waypoint",
                        .user_agent_version = "0.1.0",
                        .on_update = on_update,
                        .user = c,
                };

                r = wp_tls_ctx_new(&tc, &c->xds_tls, &err);
                if (r < 0) {
                        wp_error("control", "istiod TLS: %s", err);
                        goto err;
                }
                r = xds_ads_new(&ac, &c->ads);
                if (r < 0)
                        goto err;
                wp_info("control", "node %s, xDS %s (%s), CA %s", bs->node_id, bs->xds_address,
                        bs->sotw ? "SotW" : "delta", static_identity ? "static" : bs->ca_address);
        }
        wp_snapshot_reaper_enable(true);
        r = -pthread_create(&c->thread, NULL, control_main, c);
        if (r < 0)
                goto err;
        *ret = c;
        return 0;
err:
        wp_control_stop(c);
        return r;
}

void wp_control_stop(struct wp_control *c)
{
        uint64_t one = 1;

        if (!c)
                return;
        if (c->thread) {
                atomic_store(&c->stop, true);
                wp_snapshot_reaper_enable(false);
                if (write(c->stop_fd, &one, sizeof(one)) < 0) {
                        /* eventfd write cannot fail short of overflow */
                }
                pthread_join(c->thread, NULL);
                wp_snapshot_reap();
        }
        stream_teardown(c);
        c->ads = xds_ads_free(c->ads);
        c->xds_tls = wp_tls_ctx_unref(c->xds_tls);
        wp_free(c->root_pem);
        if (c->stop_fd >= 0)
                close(c->stop_fd);
        wp_free(c);
}

void wp_control_stats(const struct wp_control *c, struct wp_control_stats *st)
{
        memset(st, 0, sizeof(*st));
        if (!c)
                return;
        st->have_cert = c->have_cert;
        st->cert_not_after = c->cert_not_after;
        st->rotations = c->rotations;
        st->updates = c->updates;
        st->rejects = c->rejects;
        if (c->ads) {
                const struct xds_ads_stats *as = xds_ads_stats(c->ads);

                st->acks = as->acks;
                st->nacks = as->nacks;
                snprintf(st->last_nack, sizeof(st->last_nack), "%s", as->last_nack);
        }
}
