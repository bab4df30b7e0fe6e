/*
 * A gRPC client session over HTTP/2 (nghttp2), sans-I/O: fed the plaintext the TLS layer
 * decrypted, drained of the plaintext to encrypt. Carries one or more streams of a single
 * service method each; used by the waypoint for the long-lived ADS stream to istiod.
 *
 * Messages are length-prefixed (1 byte compressed flag, 4 bytes big-endian length); compressed
 * messages are rejected (we never offer grpc-encoding). Each received message is bounded by
 * max_message (default 16 MiB); larger ones end the stream with an error (RESOURCE_EXHAUSTED
 * semantics) instead of being buffered. Trailers give grpc-status / grpc-message; a stream that
 * ends without grpc-status, or with an HTTP status other than 200, or a content-type other than
 * application/grpc*, ends with status INTERNAL (13) / UNKNOWN (2) as gRPC's HTTP mapping says.
 */
#ifndef XDS_GRPC_H
#define XDS_GRPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct xds_grpc_session;
struct xds_grpc_stream;

struct xds_grpc_header {
        const char *name; /* lower case */
        const char *value;
};

struct xds_grpc_callbacks {
        /* one complete message body (without the 5-byte prefix); borrowed for the call.
         * Return 0, or negative to cancel the stream. */
        int (*on_message)(struct xds_grpc_stream *st, const uint8_t *msg, size_t len, void *user);
        /* the stream ended: grpc_status 0 = OK; message is grpc-message (percent-decoded) or a
         * local description (never NULL). The stream is freed after this returns. */
        void (*on_close)(struct xds_grpc_stream *st, int grpc_status, const char *message,
                         void *user);
        /* the peer sent GOAWAY (istiod restarting): open a new session soon. */
        void (*on_goaway)(struct xds_grpc_session *s, uint32_t h2_error, void *session_user);
};

struct xds_grpc_limits {
        size_t max_message;           /* default 16 MiB */
        uint32_t keepalive_interval_ms; /* PING when idle this long (default 30000) */
        uint32_t keepalive_timeout_ms;  /* no ack within this: -ETIMEDOUT from tick (10000) */
        uint32_t initial_window;       /* stream/connection windows (default 4 MiB / 16 MiB) */
};

/* authority: ":authority" (e.g. "istiod.istio-system.svc:15012"). Returns 0 or -ENOMEM. */
int xds_grpc_session_new(const struct xds_grpc_callbacks *cb, const struct xds_grpc_limits *lim,
                         const char *authority, void *session_user,
                         struct xds_grpc_session **ret);
/* Frees the session; open streams are freed WITHOUT on_close. NULL-safe, returns NULL. */
struct xds_grpc_session *xds_grpc_session_free(struct xds_grpc_session *s);

/* Starts a call: path "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
 * headers added after the standard ones (content-type application/grpc, te: trailers,
 * user-agent), e.g. authorization and clusterid. Returns 0, -ENOTCONN after GOAWAY, -ENOMEM. */
int xds_grpc_stream_open(struct xds_grpc_session *s, const char *path,
                         const struct xds_grpc_header *extra, size_t nextra, void *user,
                         struct xds_grpc_stream **ret);
/* Queues one message (framed here). Returns 0, -EPIPE after close/half-close, -ENOMEM. */
int xds_grpc_stream_send(struct xds_grpc_stream *st, const uint8_t *msg, size_t len);
/* Half-closes our side (END_STREAM) once queued messages are out. */
int xds_grpc_stream_finish(struct xds_grpc_stream *st);
/* Cancels (RST_STREAM CANCEL); on_close follows with status CANCELLED (1). */
void xds_grpc_stream_cancel(struct xds_grpc_stream *st);

ssize_t xds_grpc_session_feed(struct xds_grpc_session *s, const uint8_t *in, size_t len);
ssize_t xds_grpc_session_pull(struct xds_grpc_session *s, const uint8_t **ret_data);
bool xds_grpc_session_want_write(const struct xds_grpc_session *s);
/* Keepalive, as hbone_session_tick. Returns 0 (+ *ret_next_ns) or -ETIMEDOUT. */
int xds_grpc_session_tick(struct xds_grpc_session *s, uint64_t now_ns, uint64_t *ret_next_ns);
const char *xds_grpc_session_error(const struct xds_grpc_session *s);

/* Pure helpers, exported for tests: the 5-byte prefix and percent-decoding of grpc-message. */
void xds_grpc_frame_header(uint8_t out[5], size_t len);
int xds_grpc_percent_decode(const char *in, char *out, size_t cap);

#endif
