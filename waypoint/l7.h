/*
 * L7: HTTP inside HBONE tunnels for WP_CHAIN_HTTP chains (istiod's http_connection_manager).
 *
 * A tunnel to an HTTP chain is answered 200 at once (as Envoy does). Its bytes are HTTP/1.1
 * requests, one at a time (pipelined bytes wait in the receive buffer, their HTTP/2 credit
 * withheld), or, when they start with the HTTP/2 preface (h2c prior knowledge), an inner
 * HTTP/2 connection (waypoint/h2.h) whose streams are independent requests (up to 100 at once,
 * credit returned as their bodies are consumed). Either way each request runs the chain's
 * filters (RBAC), is routed (router.h), balanced over the cluster (lb.h, per-worker state) and
 * forwarded in the cluster's protocol (HttpProtocolOptions, snapshot.h): HTTP/1.1 over a
 * connection of its own (a CONNECT tunnel on the worker's HBONE pool for HBONE endpoints, TCP
 * otherwise), kept per worker and endpoint while idle and reused (keep-alive); or HTTP/2 as a
 * stream of the worker's session to that endpoint, shared by many requests. Messages are
 * translated between the two protocols both ways (chunked <-> DATA, trailers, TE: trailers).
 * gRPC requests get gRPC-shaped local replies. Routes may mirror requests (shadows whose
 * responses are dropped).
 *
 * Drain (wp_l7_worker_drain): inner HTTP/2 connections get GOAWAY(NO_ERROR) and end once their
 * streams are done; inner HTTP/1.1 responses say "connection: close"; idle upstream connections
 * and sessions close.
 *
 * Threading: everything runs on the worker thread that owns the downstream connection; the
 * per-worker parts (idle upstream connections, HTTP/2 sessions, LB state) are thread-local.
 */
#ifndef WP_L7_H
#define WP_L7_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "hbone/conn.h"
#include "hbone/hbone.h"
#include "waypoint/base/list.h"
#include "waypoint/base/loop.h"

struct wp_worker;
struct wp_snapshot;
struct wp_chain;

/* What the worker hands over for a tunnel to an HTTP chain. */
struct wp_l7_start {
        struct wp_worker *w;
        struct wp_loop *loop;
        struct hbone_conn *conn; /* downstream HBONE connection */
        struct hbone_stream *st; /* the tunnel (not answered yet) */
        const struct hbone_request *req;
        struct wp_snapshot *snap; /* a reference is taken */
        const struct wp_chain *chain;
        uint64_t id;                 /* for logs */
        uint32_t pool_idle_ms;       /* idle upstream connections are closed after this */
        uint32_t connect_timeout_ms; /* 0: the cluster's */
        uint32_t sniff_ms;           /* wp_l7_sniff_start: give up waiting for bytes after */
};

/* Takes the tunnel: answers 200 and serves HTTP (1.1 or h2c) on it. Returns 0, or -ENOMEM (the
 * tunnel was not touched: the caller answers it). */
int wp_l7_tunnel_start(const struct wp_l7_start *s);

/* The tunnel's destination port has an unknown protocol (istiod's ApplicationProtocolInput
 * matcher: HTTP and TCP chains): answers 200, reads the first bytes as Envoy's http_inspector
 * does (HTTP/2 preface: 'h2c'; an HTTP/1.x request line: 'http/1.1' or 'http/1.0'; anything
 * else, end of stream, or nothing within s->sniff_ms for server-first protocols: none), looks
 * the chain up again with that and hands the tunnel with its bytes to the HTTP path or to the
 * worker's L4 path (wp_worker_tunnel_adopt). s->chain is unused. Returns 0 or -ENOMEM. */
int wp_l7_sniff_start(const struct wp_l7_start *s);
/* The classification wp_l7_sniff_start applies to a tunnel's first n bytes: "'h2c'",
 * "'http/1.1'", "'http/1.0'", "" (not HTTP), or NULL when more bytes are needed (never when
 * final: no more bytes will come). */
const char *wp_l7_sniff_proto(const uint8_t *p, size_t n, bool final);

/* hbone_callbacks members for the worker's downstream and upstream sessions: streams owned by
 * this module carry a tagged stream_user; every other stream goes to hbone_relay_on_*. */
int wp_l7_cb_on_data(struct hbone_stream *st, const uint8_t *data, size_t len, void *user);
void wp_l7_cb_on_eof(struct hbone_stream *st, void *user);
void wp_l7_cb_on_writable(struct hbone_stream *st, void *user);
void wp_l7_cb_on_close(struct hbone_stream *st, uint32_t h2_error, void *user);
void wp_l7_cb_on_response(struct hbone_stream *st, unsigned status, void *user);

/* The worker drains: GOAWAY to inner HTTP/2 clients, "connection: close" to inner HTTP/1.1 ones;
 * close this thread's idle upstream connections and sessions and keep no new ones. */
void wp_l7_worker_drain(void);
/* The worker thread ends: frees this thread's L7 state (HTTP/2 sessions, LB states); runs the
 * loop until the sessions' transports are gone. */
void wp_l7_worker_done(void);

/*
 * Telemetry shared by L4 tunnels (worker.c) and L7 requests (implemented in worker.c).
 */
struct wp_metrics_labels;
struct wp_metrics_shard;
struct wp_al_ctx;

/* What a tunnel or request is labelled from (every pointer may be NULL). */
struct wp_telemetry_peer {
        const struct sockaddr *src; /* downstream peer address (WDS lookup) */
        const char *peer_uri;       /* its certificate's URI SAN */
        const char *baggage;        /* the CONNECT's baggage header */
        const struct sockaddr *dst; /* the chosen endpoint's address */
        const char *cluster;        /* the cluster the endpoint belongs to */
};

/* Sets the Istio labels common to TCP and HTTP in *l (zero it first): source_* from WDS by
 * source IP, else from baggage, and the peer's SAN; destination_* from the endpoint's WDS
 * workload and destination_service* from the cluster's istio metadata (left unset when the
 * cluster has none); connection_security_policy mutual_tls. Views borrow from snap, p and
 * principal_buf (the destination principal is formatted there). */
void wp_worker_metric_labels(const struct wp_snapshot *snap, const struct wp_telemetry_peer *p,
                             struct wp_metrics_labels *l, char *principal_buf, size_t cap);
/* Starts an L4 tunnel on an answered stream (after sniffing) to chain, first relaying data
 * (len bytes the client sent meanwhile, not credited back yet) and its end of stream. Returns 0
 * or -ENOMEM (the stream is untouched: the caller resets it). Implemented in worker.c. */
int wp_worker_tunnel_adopt(struct wp_worker *w, struct hbone_conn *conn, struct hbone_stream *st,
                           const char *authority, const struct sockaddr_storage *dst,
                           const char *baggage, const struct wp_chain *chain,
                           const uint8_t *data, size_t len, bool eof);
/* The worker's metrics shard, or NULL when metrics are off. */
struct wp_metrics_shard *wp_worker_mshard(struct wp_worker *w);
/* Writes c's line (one write(2) each) to every access log of chain ch whose filter matches,
 * rendered into a per-worker buffer. */
void wp_worker_access_log(struct wp_worker *w, const struct wp_chain *ch,
                          const struct wp_al_ctx *c);

/*
 * Access to the worker's upstream HBONE pool (implemented in worker.c). A request for a
 * connection to addr (pod IP; the port is replaced by hbone_port) counts as a user of the
 * pooled connection until wp_worker_pool_put().
 */
struct wp_pool_req {
        /* called once the connection is established (conn) or failed (conn NULL, err -errno) */
        void (*on_ready)(struct wp_pool_req *pr, struct hbone_conn *conn, int err);
        /* private to worker.c */
        void *pc;
        struct wp_list link;
        bool waiting;
};

/* Returns 1 with an established connection (wp_worker_pool_conn), 0 when on_ready will follow,
 * or -ECONNREFUSED (no connection could be started). */
int wp_worker_pool_get(struct wp_worker *w, const struct sockaddr_storage *addr, socklen_t len,
                       uint16_t hbone_port, struct wp_pool_req *pr);
struct hbone_conn *wp_worker_pool_conn(const struct wp_pool_req *pr);
/* Done with the connection (or no longer waiting). NULL-safe on an unused request. */
void wp_worker_pool_put(struct wp_worker *w, struct wp_pool_req *pr);
/* The connection refused a new stream (-EAGAIN/-ENOTCONN): never pick it again, then put. */
void wp_worker_pool_full(struct wp_worker *w, struct wp_pool_req *pr);

#endif
