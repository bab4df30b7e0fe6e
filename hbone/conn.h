/*
 * hbone_conn: one HBONE connection on an event loop. The I/O glue between a socket (wp_loop ops),
 * TLS (wp_tls, memory BIOs) and an hbone_session. It owns the fd, the TLS object and the
 * session; tunnels are reported through the hbone_callbacks given at creation (session_user is
 * the hbone_conn's user pointer).
 *
 * Lifecycle: hbone_conn_accept() (server, fd from accept) or hbone_conn_connect() (client, starts
 * a non-blocking connect). The session's session_user (the last argument of on_tunnel_request and
 * on_goaway) is the struct hbone_conn itself; hbone_conn_user() gives the owner's pointer.
 * on_established runs once TLS is verified and the session exists; it
 * is the first moment hbone_conn_session() is non-NULL. on_closed runs exactly once when the
 * connection is finished (error, peer close, drain complete) and every in-flight op has
 * completed; the owner frees the connection from there with hbone_conn_free().
 *
 * Output is batched: anything that changes the session (stream writes, consume, respond) must be
 * followed by hbone_conn_kick(), which flushes once at the end of the loop iteration.
 */
#ifndef HBONE_CONN_H
#define HBONE_CONN_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include "hbone/hbone.h"
#include "waypoint/base/loop.h"
#include "waypoint/base/tls.h"

struct hbone_conn;

struct hbone_conn_ops {
        void (*on_established)(struct hbone_conn *c, void *user);
        /* err: 0 for a clean close, else -errno; why: short text (static or owned by c). */
        void (*on_closed)(struct hbone_conn *c, int err, const char *why, void *user);
};

struct hbone_conn_config {
        struct wp_loop *loop;
        struct wp_tls_ctx *tls_ctx;     /* referenced for the connection's lifetime */
        const struct hbone_limits *lim; /* copied */
        const struct hbone_callbacks *cb;
        const struct hbone_conn_ops *ops;
        void *user;
        uint32_t handshake_timeout_ms; /* TLS + HTTP/2 preface must complete within this */
        uint32_t connect_timeout_ms;   /* client: TCP connect + handshake */
        uint64_t id;                   /* for logs */
};

/* Server: takes ownership of a connected, non-blocking fd (closed on failure too). */
int hbone_conn_accept(const struct hbone_conn_config *cfg, int fd, struct hbone_conn **ret);
/* Client: socket + non-blocking connect to addr, then TLS and the HTTP/2 preface. Streams may be
 * opened (hbone_session_open) only after on_established. */
int hbone_conn_connect(const struct hbone_conn_config *cfg, const struct sockaddr *addr,
                       socklen_t addrlen, struct hbone_conn **ret);
/* Frees a connection; only valid from on_closed or before any op was submitted. NULL-safe. */
struct hbone_conn *hbone_conn_free(struct hbone_conn *c);

struct hbone_session *hbone_conn_session(const struct hbone_conn *c);
void *hbone_conn_user(const struct hbone_conn *c);
uint64_t hbone_conn_id(const struct hbone_conn *c);
/* The verified peer SPIFFE URI, after on_established. */
const char *hbone_conn_peer_uri(const struct hbone_conn *c);
const struct sockaddr_storage *hbone_conn_peer_addr(const struct hbone_conn *c);
const struct sockaddr_storage *hbone_conn_local_addr(const struct hbone_conn *c);
bool hbone_conn_established(const struct hbone_conn *c);
bool hbone_conn_closing(const struct hbone_conn *c);

/* Schedules an output flush at the end of the current loop iteration. */
void hbone_conn_kick(struct hbone_conn *c);
/* Graceful drain: GOAWAY, let streams finish, then close. */
void hbone_conn_drain(struct hbone_conn *c);
/* Immediate close: open streams are aborted (on_tunnel_close CANCEL), fd closed once ops end. */
void hbone_conn_close(struct hbone_conn *c, int err, const char *why);

#endif
