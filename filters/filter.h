/*
 * The HTTP filter chain (HAProxy's phased ops + h2o's registration + nginx's call-next).
 *
 * A filter is a set of hooks called for each HTTP request of a service-port's chain. Chains
 * are immutable arrays of {ops, conf} built when a snapshot is compiled (conf_new from the
 * filter's typed_config) and shared by all workers. Per-stream state (stream_state_size bytes,
 * zeroed) is carved from the stream's arena.
 *
 * Hooks return FLT_CONTINUE (next filter), FLT_PAUSE (async work: the stream calls flt_resume()
 * later), FLT_REPLY (the filter set a local reply with flt_reply(); the chain stops), or a
 * negative errno (500). A NULL hook means pass through.
 *
 * What a request looks like to filters: struct flt_request (below) gives the request head and
 * the connection-level facts filters match on (peer principal from the HBONE client
 * certificate, source/destination addresses, the downstream port).
 */
#ifndef FLT_FILTER_H
#define FLT_FILTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include <protobuf-c/protobuf-c.h>

#include "waypoint/base/http.h"

enum { FLT_CONTINUE = 0, FLT_PAUSE = 1, FLT_REPLY = 2 };

struct flt_stream;

/* Connection and request facts a filter may read. Owned by the stream. */
struct flt_request {
        struct wp_http_request *req;          /* mutable: filters may add/remove headers */
        const char *peer_principal;           /* URI SAN of the HBONE client, e.g.
                                                 spiffe://cluster.local/ns/a/sa/b, or NULL */
        const struct sockaddr_storage *src;   /* source address (HBONE peer) */
        const struct sockaddr_storage *dst;   /* destination (the tunnel's target VIP:port) */
        const struct wp_headers *dyn_meta;    /* dynamic metadata (e.g. JWT claims), or NULL */
};

struct flt_ops {
        const char *name;      /* xDS filter name, e.g. "envoy.filters.http.rbac" */
        const char *type_url;  /* typed_config type URL it accepts */
        size_t stream_state_size;
        /* Compiles cfg (the unpacked typed_config). Returns 0 and *ret_conf, or -EINVAL with
         * *reterr_desc (static or heap via wp_strdup: set *reterr_heap = true). */
        int (*conf_new)(const ProtobufCMessage *cfg, void **ret_conf, const char **reterr_desc,
                        bool *reterr_heap);
        void (*conf_free)(void *conf);
        int (*on_request_headers)(struct flt_stream *fs, struct flt_request *r, bool end_stream);
        int (*on_response_headers)(struct flt_stream *fs, struct wp_http_response *resp,
                                   bool end_stream);
        void (*on_stream_done)(struct flt_stream *fs);
};

struct flt_stream {
        const struct flt_ops *ops;
        void *conf;  /* the filter's compiled config */
        void *state; /* stream_state_size bytes, zeroed */
        /* set by flt_reply() */
        unsigned reply_status;
        const char *reply_body;     /* static or arena */
        const char *reply_details;  /* response flag / details for logs, e.g. "rbac_access_denied" */
        bool shadow_denied;         /* shadow (AUDIT) rules matched: logged, not enforced */
};

/* Local reply: status + body (e.g. 403 "RBAC: access denied"). Returns FLT_REPLY. */
static inline int flt_reply(struct flt_stream *fs, unsigned status, const char *body,
                            const char *details)
{
        fs->reply_status = status;
        fs->reply_body = body;
        fs->reply_details = details;
        return FLT_REPLY;
}

/* Registry: the filters we implement, by xDS name. Returns NULL when unknown. */
const struct flt_ops *flt_registry_lookup(const char *name);

#endif
