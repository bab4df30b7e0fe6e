/* Module-private types of libhbone. Only session.c and the tests include this. */
#ifndef HBONE_INTERNAL_H
#define HBONE_INTERNAL_H

#include <nghttp2/nghttp2.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hbone/hbone.h"

/* Send-queue chunk: [r, w) readable. Chunks are recycled through the session's spare list, so the
 * steady-state data path allocates nothing. */
#define HBONE_CHUNK_SIZE 16384

struct hbone_chunk {
        struct hbone_chunk *next;
        size_t r, w;
        uint8_t data[HBONE_CHUNK_SIZE];
};

/* Request headers kept (as nghttp2 refcounted buffers, no copy) until on_tunnel_request. */
enum {
        HBONE_HDR_METHOD,
        HBONE_HDR_AUTHORITY,
        HBONE_HDR_BAGGAGE,
        HBONE_HDR_FORWARDED,
        HBONE_HDR_TRACEPARENT,
        _HBONE_HDR_MAX,
};

struct hbone_stream {
        struct hbone_session *session;
        int32_t id;
        void *user;
        struct hbone_stream *prev, *next;           /* session's list of all streams */
        struct hbone_stream *wprev, *wnext;         /* pending on_tunnel_writable list */
        bool on_wlist;

        struct hbone_chunk *qhead, *qtail;
        size_t queued;
        size_t unconsumed; /* bytes handed to on_tunnel_data, credit not yet returned */

        nghttp2_rcbuf *hdr[_HBONE_HDR_MAX];
        size_t hdr_bytes;  /* RFC 9113 §6.5.2 accounting (name + value + 32) */
        unsigned status;   /* client: :status of the response */
        bool hdr_bad;      /* duplicate of a header we keep, or a bad :status */
        bool hdr_too_big;

        bool known;       /* the user holds this stream (on_tunnel_close will be called) */
        bool answered;    /* server: response submitted; client: final response received */
        bool established; /* 200 sent/received: DATA may flow */
        bool deferred;    /* data provider returned NGHTTP2_ERR_DEFERRED */
        bool provider;    /* a data provider is attached (we have an open send side) */
        bool shutdown;    /* hbone_stream_shutdown() called */
        bool reset;       /* RST_STREAM submitted by us */
        bool eof_seen;    /* END_STREAM received */
        bool closed;      /* inside on_stream_close */
        bool want_writable;
        bool rst_after_response; /* non-2xx sent before END_STREAM received */
};

struct hbone_session {
        nghttp2_session *ng;
        struct hbone_callbacks cb;
        struct hbone_limits lim;
        void *user;
        bool server;

        struct hbone_stream *streams; /* all live streams */
        unsigned nstreams;
        struct hbone_stream *wlist;   /* streams owed on_tunnel_writable */

        struct hbone_chunk *spare;
        unsigned nspare;

        bool dead;          /* fatal error: feed refuses, finished() is true */
        bool goaway_recv;
        bool goaway_sent;   /* drain */
        uint32_t fatal_code;

        /* keepalive */
        bool ticked;
        bool ping_outstanding;
        uint64_t ping_sent_ns, last_ok_ns;
        uint64_t ping_counter;

        /* abuse accounting */
        uint64_t flood_window_start_ns;
        uint32_t rst_count;
        uint32_t empty_data_count;

        char err[160];
};

#endif
