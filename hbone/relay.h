/*
 * hbone_relay: splices one HBONE tunnel stream (the "down" end) with an upstream (the "up" end):
 * either a stream on another HBONE connection, or a plain TCP socket. Used by the waypoint for
 * every L4 tunnel and by the `hbone` tool.
 *
 * Flow control is end to end: bytes received from one end are written into the other end's
 * bounded send queue; flow-control credit (HTTP/2 WINDOW_UPDATE) goes back to a stream peer only
 * for bytes the other end accepted, and a TCP end stops receiving while the other end is full.
 * Memory per direction is bounded by the receiving window plus the sending queue.
 *
 * Half-close propagates (END_STREAM <-> FIN), resets propagate (RST_STREAM <-> TCP RST), and
 * on_done runs once both ends are finished; the owner frees the relay from there.
 *
 * Streams carried by relays must use the hbone_relay_on_* functions as their hbone_callbacks
 * for data, eof, writable, close and (upstream) response; stream_user is owned by the relay.
 */
#ifndef HBONE_RELAY_H
#define HBONE_RELAY_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include "hbone/conn.h"
#include "hbone/hbone.h"
#include "waypoint/base/loop.h"

struct hbone_relay;

enum hbone_relay_result {
        HBONE_RELAY_OK,
        HBONE_RELAY_UPSTREAM_REFUSED,  /* TCP refused/unreachable, HBONE connection failed */
        HBONE_RELAY_UPSTREAM_TIMEOUT,  /* connect timeout */
        HBONE_RELAY_UPSTREAM_STATUS,   /* upstream HBONE answered non-200 */
        HBONE_RELAY_UPSTREAM_RESET,    /* upstream reset the stream before answering */
        HBONE_RELAY_DOWNSTREAM_GONE,   /* downstream went away before the upstream was ready */
        _HBONE_RELAY_RESULT_MAX
};

struct hbone_relay_ops {
        /* The upstream is ready and the downstream got its 200 (or failed: result != OK and the
         * downstream got the status chosen by on_upstream_failed). Optional. */
        void (*on_upstream_result)(struct hbone_relay *r, enum hbone_relay_result res,
                                   unsigned upstream_status, void *user);
        /* Both ends finished. The owner frees the relay (hbone_relay_free) here or later. */
        void (*on_done)(struct hbone_relay *r, void *user);
};

struct hbone_relay_config {
        struct wp_loop *loop;
        const struct hbone_relay_ops *ops;
        void *user;
        size_t tcp_send_queue;      /* bytes queued towards a TCP upstream (default 256 KiB) */
        uint32_t connect_timeout_ms; /* TCP upstream connect */
        /* Header naming the failure reason on non-200 answers (e.g. "x-waypoint-error"). */
        const char *error_header;
};

/* Creates a relay for the down stream. If down_answered is false the relay answers the down
 * stream: 200 once the upstream is ready, or an error status. Returns 0 or -ENOMEM. */
int hbone_relay_new(const struct hbone_relay_config *cfg, struct hbone_conn *down_conn,
                    struct hbone_stream *down, bool down_answered, struct hbone_relay **ret);
/* Frees the relay. Only valid once on_done ran (or before any upstream was started and after
 * the down stream is closed). NULL-safe. */
struct hbone_relay *hbone_relay_free(struct hbone_relay *r);

/* Upstream, pick one: */
/* non-blocking TCP connect to addr; the relay owns the socket. */
int hbone_relay_connect_tcp(struct hbone_relay *r, const struct sockaddr *addr, socklen_t len);
/* an already connected, non-blocking fd (the relay owns it from now on). */
int hbone_relay_attach_tcp(struct hbone_relay *r, int fd);
/* a new tunnel on an established client connection. Returns 0, or the hbone_session_open()
 * error (-EAGAIN: the connection is full; the caller picks another). */
int hbone_relay_open_hbone(struct hbone_relay *r, struct hbone_conn *up_conn,
                           const char *authority, const struct hbone_header *extra,
                           size_t nextra);
/* The upstream could not be reached (e.g. the pooled connection failed): answers the down
 * stream with status and reason, or resets it when it was answered already, and finishes. */
void hbone_relay_fail(struct hbone_relay *r, unsigned status, const char *reason);
/* True while the relay waits for an upstream (none started, or connecting). */
bool hbone_relay_waiting(const struct hbone_relay *r);
bool hbone_relay_down_closed(const struct hbone_relay *r);

uint64_t hbone_relay_bytes_sent_up(const struct hbone_relay *r);   /* down -> up */
uint64_t hbone_relay_bytes_sent_down(const struct hbone_relay *r); /* up -> down */
void *hbone_relay_user(const struct hbone_relay *r);

/* hbone_callbacks members for streams owned by relays. */
int hbone_relay_on_data(struct hbone_stream *st, const uint8_t *data, size_t len, void *user);
void hbone_relay_on_eof(struct hbone_stream *st, void *user);
void hbone_relay_on_writable(struct hbone_stream *st, void *user);
void hbone_relay_on_close(struct hbone_stream *st, uint32_t h2_error, void *user);
void hbone_relay_on_response(struct hbone_stream *st, unsigned status, void *user);

#endif
