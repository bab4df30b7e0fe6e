/*
 * RBAC: Envoy's role-based access control (envoy.config.rbac.v3.RBAC) as istiod emits it for
 * AuthorizationPolicy on a waypoint, compiled at config time into an immutable evaluator that
 * allocates nothing per request.
 *
 * Three users:
 *   - the HTTP filter "envoy.filters.http.rbac" (flt_rbac_http_ops, registered in registry.c),
 *     typed_config envoy.extensions.filters.http.rbac.v3.RBAC {rules, shadow_rules, ...};
 *   - network RBAC (envoy.extensions.filters.network.rbac.v3.RBAC) on TCP chains:
 *     flt_rbac_net_new() + flt_rbac_net_check() on connection facts only, called by the daemon
 *     when a tunnel starts;
 *   - anything else holding a bare envoy.config.rbac.v3.RBAC: flt_rbac_engine_new/_eval.
 *
 * Semantics (Envoy's RBAC engine):
 *   - a policy matches when some permission AND some principal match (an empty list matches
 *     nothing); policies are tried in name order and the first match is "the" policy (Envoy
 *     keeps them in a std::map);
 *   - ALLOW: allowed iff some policy matches; DENY: denied iff some policy matches; LOG: never
 *     denies (matched tells whether the request is to be logged);
 *   - shadow rules are evaluated the same way and only reported (flt_stream.shadow_denied);
 *   - a denied HTTP request gets 403 "RBAC: access denied" with details
 *     "rbac_access_denied_matched_policy[<policy>]" ("[none]" when an ALLOW matched nothing;
 *     whitespace in the name becomes '_').
 *
 * What each matcher looks at (struct flt_rbac_facts):
 *   header          request headers; pseudo-headers :method :path :authority :scheme come from
 *                   the request head; several values of one header are joined with ','; no
 *                   request (network RBAC) = every header absent
 *   url_path        :path without query and fragment; no request = no match
 *   uri_template    Envoy's uri_template path matcher ("*" one segment, "**" any rest,
 *                   "{name}", "{name=**}", a suffix after a glob) on that same path (typed_config
 *                   envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig)
 *   destination_ip / destination_port / destination_port_range    facts->dst
 *   direct_remote_ip / remote_ip / source_ip                        facts->src (we have no
 *                   XFF-derived "remote" address: the HBONE peer is the client)
 *   authenticated   facts->peer_principal (NULL = not authenticated = no match; no
 *                   principal_name = any authenticated peer)
 *   filter_state    key "io.istio.peer_principal" only, string_match on facts->peer_principal
 *                   (istiod's waypoint encoding of source.principal/namespace/serviceAccount);
 *                   any other key is a compile error
 *   requested_server_name    facts->sni (NULL = "", as for plaintext inner traffic)
 *   metadata        facts->dyn_meta, see FLT_RBAC_META_SEP below
 * IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) are matched as IPv4.
 *
 * Dynamic metadata (JWT claims) is a flat wp_headers list: each entry's name is the metadata
 * filter name followed, for each path segment, by FLT_RBAC_META_SEP and the segment, e.g.
 *   "envoy.filters.http.jwt_authn\x1fpayload\x1fiss" = "https://issuer"
 * A list value is one entry per element under the same name; a number or a bool is its text
 * ("3", "true"). string_match needs exactly one entry; list_match.one_of tries every entry;
 * present_match needs one; bool_match compares with "true"/"false"; double_match parses the text;
 * null_match never matches (the flat form has no nulls).
 *
 * Compile errors (-EINVAL, and -E2BIG past the limits below) name the field, e.g.
 *   rules.policies["p"].permissions[0].and_rules.rules[1].matcher: not supported
 * Anything we do not implement (CEL conditions and other fields absent from our proto subset,
 * matcher/custom extensions, sourced_metadata, the xds matcher-tree form of the filter, unknown
 * filter_state keys, ignore_case with safe_regex) is an error, never a silent allow or deny.
 *
 * String, regex and header matchers are filters/matcher.h's (shared with the router): RE2 full
 * match through waypoint/re2_shim.h, with a program size limit of WP_MATCH_RE2_MAX_PROGRAM_SIZE
 * (google_re2.max_program_size, when set, wins); header names must be valid header names.
 * The shim lives in libwpcore: whatever links libfilters must also link waypoint/re2_shim.cc.
 *
 * Threading: a compiled engine/conf is immutable and may be evaluated from any thread.
 */
#ifndef FLT_RBAC_H
#define FLT_RBAC_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include <protobuf-c/protobuf-c.h>

#include "filters/filter.h"
#include "waypoint/base/http.h"

/* Limits on a compiled config (istiod is trusted, but a config is still input). */
#define FLT_RBAC_MAX_DEPTH    64     /* nesting of and/or/not */
#define FLT_RBAC_MAX_NODES    100000 /* matchers in one RBAC */
#define FLT_RBAC_MAX_POLICIES 10000

/* Separator between the filter name and path segments in dynamic metadata names. */
#define FLT_RBAC_META_SEP "\x1f"

#define FLT_RBAC_HTTP_NAME     "envoy.filters.http.rbac"
#define FLT_RBAC_HTTP_TYPE_URL "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
#define FLT_RBAC_NET_NAME      "envoy.filters.network.rbac"
#define FLT_RBAC_NET_TYPE_URL  "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"

#define FLT_RBAC_DENIED_BODY "RBAC: access denied"

enum flt_rbac_action {
        FLT_RBAC_ALLOW = 0,
        FLT_RBAC_DENY = 1,
        FLT_RBAC_LOG = 2,
};

/* What the matchers look at. Every pointer may be NULL (= absent). Borrowed for one call. */
struct flt_rbac_facts {
        const struct wp_http_request *req;  /* NULL for network RBAC */
        const char *peer_principal;         /* "spiffe://td/ns/x/sa/y" or NULL */
        const struct sockaddr_storage *src; /* downstream peer */
        const struct sockaddr_storage *dst; /* destination (VIP:port) */
        const char *sni;                    /* requested server name, NULL = "" */
        const struct wp_headers *dyn_meta;  /* dynamic metadata, see FLT_RBAC_META_SEP */
};

/* Outcome of one engine. Strings are borrowed from the engine (valid while it lives). */
struct flt_rbac_result {
        bool allowed;        /* ALLOW: matched; DENY: !matched; LOG: true */
        bool matched;        /* some policy matched (LOG: the request is to be logged) */
        const char *policy;  /* the first matching policy's name, or NULL */
        const char *details; /* when !allowed: "rbac_access_denied_matched_policy[...]" */
};

struct flt_rbac_engine;

/*
 * Compiles one envoy.config.rbac.v3.RBAC. field names the config in error descriptions (e.g.
 * "rules"; may be NULL). The engine copies what it needs: cfg may be freed afterwards.
 * Returns 0 and *ret, or -EINVAL (unsupported or malformed; *reterr_desc names the field),
 * -E2BIG (a limit above), -ENOMEM. *reterr_desc is heap (wp_free it) iff *reterr_heap.
 */
int flt_rbac_engine_new(const ProtobufCMessage *cfg, const char *field,
                        struct flt_rbac_engine **ret, const char **reterr_desc, bool *reterr_heap);

/* NULL-safe; returns NULL. */
struct flt_rbac_engine *flt_rbac_engine_free(struct flt_rbac_engine *e);

/* The engine's action. */
enum flt_rbac_action flt_rbac_engine_action(const struct flt_rbac_engine *e);

/* Number of policies (after merging duplicate names, last one wins as in a protobuf map). */
unsigned flt_rbac_engine_policy_count(const struct flt_rbac_engine *e);

/*
 * Evaluates e against f into *ret. Allocates nothing (RE2 may, internally) except to join a
 * header's several values when they exceed 4 KiB. Returns 0, or -ENOMEM (then *ret is not set;
 * callers must fail closed).
 */
int flt_rbac_engine_eval(const struct flt_rbac_engine *e, const struct flt_rbac_facts *f,
                         struct flt_rbac_result *ret);

/* ---- HTTP filter ---- */

/* The compiled typed_config of envoy.filters.http.rbac (the filter's conf). */
struct flt_rbac_conf {
        struct flt_rbac_engine *rules;  /* NULL: nothing enforced */
        struct flt_rbac_engine *shadow; /* NULL: no shadow rules */
        char *rules_stat_prefix;        /* "" when unset */
        char *shadow_rules_stat_prefix; /* "" when unset */
        bool track_per_rule_stats;
};

/* Per-stream state (flt_stream.state) after on_request_headers: for logs and metrics. */
struct flt_rbac_stream_state {
        bool evaluated;            /* an engine ran */
        bool denied;               /* the enforced engine denied (403 sent) */
        bool logged;               /* LOG action matched */
        const char *policy;        /* enforced engine's matching policy, or NULL */
        bool shadow_evaluated;     /* shadow rules ran */
        bool shadow_denied;        /* = flt_stream.shadow_denied */
        const char *shadow_policy; /* shadow engine's matching policy, or NULL */
};

/* flt_ops for "envoy.filters.http.rbac": conf_new takes the unpacked
 * envoy.extensions.filters.http.rbac.v3.RBAC. */
extern const struct flt_ops flt_rbac_http_ops;

/* Compiles the HTTP filter config (what flt_rbac_http_ops.conf_new does). Same returns as
 * flt_rbac_engine_new. */
int flt_rbac_conf_new(const ProtobufCMessage *cfg, struct flt_rbac_conf **ret,
                      const char **reterr_desc, bool *reterr_heap);
struct flt_rbac_conf *flt_rbac_conf_free(struct flt_rbac_conf *c);

/* ---- network RBAC ---- */

struct flt_rbac_net;

/* What flt_rbac_net_check() decided. Strings borrowed from the flt_rbac_net. */
struct flt_rbac_net_decision {
        bool allowed;        /* false: close the tunnel/connection */
        const char *policy;  /* enforced engine's matching policy, or NULL */
        const char *details; /* when !allowed: "rbac_access_denied_matched_policy[...]" */
        bool logged;         /* LOG action matched */
        bool shadow_evaluated;
        bool shadow_denied;
        const char *shadow_policy;
};

/*
 * Compiles envoy.extensions.filters.network.rbac.v3.RBAC (cfg). Same returns as
 * flt_rbac_engine_new. enforcement_type (ONE_TIME_ON_FIRST_BYTE / CONTINUOUS) makes no
 * difference here: the facts do not change during a connection.
 */
int flt_rbac_net_new(const ProtobufCMessage *cfg, struct flt_rbac_net **ret,
                     const char **reterr_desc, bool *reterr_heap);
struct flt_rbac_net *flt_rbac_net_free(struct flt_rbac_net *n);

/* stat_prefix of the config ("" when unset). */
const char *flt_rbac_net_stat_prefix(const struct flt_rbac_net *n);
/* delay_deny in milliseconds (0 = close at once). */
uint64_t flt_rbac_net_delay_deny_ms(const struct flt_rbac_net *n);

/*
 * Decides a new connection/tunnel from connection facts (peer principal, source, destination,
 * SNI; f->req must be NULL or is ignored, so header matchers see no headers). Returns 0 and
 * *ret, or -ENOMEM (fail closed).
 */
int flt_rbac_net_check(const struct flt_rbac_net *n, const struct flt_rbac_facts *f,
                       struct flt_rbac_net_decision *ret);

#endif
