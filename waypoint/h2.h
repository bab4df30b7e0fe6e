/*
 * HTTP/2 codec for the traffic inside HBONE tunnels (h2c prior knowledge), sans-I/O, on
 * nghttp2: the server side of an inner connection (requests from the downstream) and the client
 * side of an upstream connection (requests towards an HTTP/2 cluster). Messages are converted
 * to and from wp_http_request / wp_http_response (waypoint/base/http.h), so the request
 * pipeline (filters, router, LB, upstream) does not depend on the wire protocol.
 *
 * Bytes in: wp_h2_feed(). Bytes out: wp_h2_pull() until it returns 0. Callbacks run from feed()
 * (heads, body, end, close) and from pull() (close of a stream whose last frame went out,
 * writable). The user must not call feed() or pull() from a callback, and must expect
 * on_close of any stream during either call.
 *
 * Decisions (each has a case in tests/unit/waypoint/h2/test_h2.c):
 *  - nghttp2's HTTP messaging checks stay on: missing/duplicated/unknown pseudo-headers,
 *    pseudo-headers after regular ones, upper-case names, connection-specific fields
 *    (connection, keep-alive, proxy-connection, transfer-encoding, upgrade, te other than
 *    "trailers"), invalid characters, a content-length the DATA does not match: the stream is
 *    reset with PROTOCOL_ERROR (RFC 9113 §8.1.1, §8.2.2) and the user never sees it.
 *    A request without :authority and host, or whose :path is not origin-form, is reset the
 *    same way by nghttp2 (the codec answers 400 should one get through).
 *  - server: a request whose header list exceeds max_header_list_size (counted as RFC 9113
 *    §6.5.2 does) is answered 431 by the codec. A response that ends while the request is still
 *    open is followed by RST_STREAM(NO_ERROR) (§8.1).
 *  - flow control: received DATA is credited back (WINDOW_UPDATE) only as the user calls
 *    wp_h2_consume(); a peer that sends beyond the window gets FLOW_CONTROL_ERROR from nghttp2.
 *  - rapid reset (CVE-2023-44487): RST_STREAM frames from the peer are counted per
 *    rst_flood_window_ms; beyond rst_flood_max the session sends GOAWAY(ENHANCE_YOUR_CALM) and
 *    feed() returns -EPROTO.
 *  - drain: wp_h2_goaway(NO_ERROR) tells the peer the last stream processed; open streams go on.
 */
#ifndef WP_H2_H
#define WP_H2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "waypoint/base/http.h"

struct wp_h2;

enum {
        WP_H2_NO_ERROR = 0x0,
        WP_H2_PROTOCOL_ERROR = 0x1,
        WP_H2_INTERNAL_ERROR = 0x2,
        WP_H2_FLOW_CONTROL_ERROR = 0x3,
        WP_H2_REFUSED_STREAM = 0x7,
        WP_H2_CANCEL = 0x8,
        WP_H2_CONNECT_ERROR = 0xa,
        WP_H2_ENHANCE_YOUR_CALM = 0xb,
};

struct wp_h2_limits {
        uint32_t max_concurrent_streams; /* 100 (advertised by a server, respected by a client) */
        uint32_t initial_stream_window;  /* 1 MiB */
        uint32_t initial_conn_window;    /* 8 MiB */
        uint32_t max_header_list_size;   /* 60 KiB (Envoy's max_request_headers_kb) */
        uint32_t stream_send_buffer;     /* 64 KiB: on_writable once below half of it */
        uint32_t rst_flood_max;          /* 100 resets ... */
        uint32_t rst_flood_window_ms;    /* ... per 1000 ms */
};

struct wp_h2_callbacks {
        /* server: a request head. req (and its strings) stay valid until on_close. Return 0 and
         * set the stream's user (wp_h2_set_user), or a negative value: the stream is reset with
         * REFUSED_STREAM. end_stream: the request has no body. */
        int (*on_request)(struct wp_h2 *h, int32_t id, struct wp_http_request *req, bool end_stream,
                          void *conn_user);
        /* client: a response head (interim 1xx ones too). Valid until on_close. */
        void (*on_response)(struct wp_h2 *h, void *su, struct wp_http_response *resp,
                            bool end_stream);
        /* body bytes; their credit comes back with wp_h2_consume(). A negative return resets
         * the stream (INTERNAL_ERROR). */
        int (*on_data)(struct wp_h2 *h, void *su, const uint8_t *d, size_t n);
        /* the peer ended its side; trailers: the trailer section, or NULL. */
        void (*on_end)(struct wp_h2 *h, void *su, struct wp_headers *trailers);
        /* the stream is gone (error: the RST_STREAM code, 0 after a clean close). Last call for
         * su. */
        void (*on_close)(struct wp_h2 *h, void *su, uint32_t error);
        /* the stream's send queue went below half of stream_send_buffer */
        void (*on_writable)(struct wp_h2 *h, void *su);
        /* GOAWAY received: streams above last_id were not processed (they get on_close with
         * REFUSED_STREAM) */
        void (*on_goaway)(struct wp_h2 *h, int32_t last_id, uint32_t error, void *conn_user);
};

void wp_h2_limits_default(struct wp_h2_limits *lim);

/* Returns 0 or -ENOMEM. lim may be NULL (defaults). The initial SETTINGS are queued (and, for a
 * client, the preface). */
int wp_h2_new(const struct wp_h2_callbacks *cb, const struct wp_h2_limits *lim, bool server,
              void *conn_user, struct wp_h2 **ret);
/* Frees the session. No callback runs. NULL-safe. */
void wp_h2_free(struct wp_h2 *h);

/* Feeds received bytes (all are consumed). Returns 0, or -EPROTO on a connection error (a GOAWAY
 * is queued: pull it, then close), or -ENOMEM. */
int wp_h2_feed(struct wp_h2 *h, const uint8_t *in, size_t len);
/* Next bytes to send (valid until the next call), 0 when there is nothing, or -EPROTO / -ENOMEM.
 */
ssize_t wp_h2_pull(struct wp_h2 *h, const uint8_t **out);
/* The session is over (GOAWAY sent or received and no stream left, or a fatal error). */
bool wp_h2_finished(const struct wp_h2 *h);
/* Why the session failed (static or session-owned string; "" if it did not). */
const char *wp_h2_error(const struct wp_h2 *h);

void wp_h2_set_user(struct wp_h2 *h, int32_t id, void *su);

/* server: the response head. end_stream: no body follows. Returns 0, -EINVAL (a field nghttp2
 * refuses), -ENOMEM, -ENOENT (no such stream). */
int wp_h2_respond(struct wp_h2 *h, int32_t id, const struct wp_http_response *resp,
                  bool end_stream);
/* client: opens a stream with req (headers converted; connection-specific fields dropped).
 * Returns the stream id (> 0), -EAGAIN (the peer's MAX_CONCURRENT_STREAMS is reached or the
 * session goes away), -EINVAL, -ENOMEM. */
int32_t wp_h2_request(struct wp_h2 *h, const struct wp_http_request *req, bool end_stream,
                      void *su);
/* Queues body bytes (copied). Returns 0, -ENOMEM, -EPIPE (the stream is gone or ended). */
int wp_h2_send(struct wp_h2 *h, int32_t id, const void *d, size_t n);
/* Ends our side after the queued bytes, with trailers (may be NULL or empty; copied). */
int wp_h2_end(struct wp_h2 *h, int32_t id, const struct wp_headers *trailers);
/* Bytes queued on the stream, not yet framed. */
size_t wp_h2_queued(const struct wp_h2 *h, int32_t id);
/* RST_STREAM(code). No more callbacks for the stream but on_close. */
void wp_h2_reset(struct wp_h2 *h, int32_t id, uint32_t code);
/* n body bytes of the stream were consumed: credit back to the peer. */
void wp_h2_consume(struct wp_h2 *h, int32_t id, size_t n);
/* GOAWAY(code) with the last stream processed; NO_ERROR lets open streams finish. */
void wp_h2_goaway(struct wp_h2 *h, uint32_t code);
/* client: can another stream be opened now? */
bool wp_h2_can_open(const struct wp_h2 *h);
/* client: how many streams may be open at once (the peer's SETTINGS_MAX_CONCURRENT_STREAMS,
 * capped by our max_concurrent_streams); 0 once the session goes away. */
unsigned wp_h2_stream_limit(const struct wp_h2 *h);
/* Open streams. */
unsigned wp_h2_nstreams(const struct wp_h2 *h);

#endif
