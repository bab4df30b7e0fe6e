/*
 * The admin endpoint's document builders (admin_dump.c), kept apart from the HTTP server
 * (admin.c) so they can be driven without sockets. Each builder reads one snapshot (the caller
 * holds a reference for the duration of the call) and returns a heap body (wp_free) in
 * *ret_body / *ret_len. None of them takes a lock or touches the workers.
 */
#ifndef WP_ADMIN_H
#define WP_ADMIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct wp_snapshot;

/* json-c serialization of every admin JSON document: indented, "key": value, no \/ escapes */
#define WP_ADMIN_JSON_FLAGS                                                                        \
        (JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED | JSON_C_TO_STRING_NOSLASHESCAPE)

/* What /config_dump was asked for (query parameters, already percent-decoded). */
struct wp_admin_dump_req {
        const char *resource;   /* ?resource=: one repeated field, e.g. dynamic_active_clusters */
        const char *mask;       /* ?mask=: comma-separated field paths (a FieldMask) */
        bool include_eds;       /* ?include_eds: add the EndpointsConfigDump */
        bool include_addresses; /* ?include_addresses: add istio.workload.Address resources */
        /* node identity for the BootstrapConfigDump; NULL: the config file's node_id */
        const char *node_id, *node_cluster;
        int64_t last_updated_ms; /* wall clock of the snapshot's publish (0: unknown) */
};

/*
 * Envoy's admin.v3.ConfigDump for snapshot s (may be NULL: only the bootstrap entry), as
 * pretty-printed JSON. Resources are encoded with xds_pbjson_encode (the loader's codec), each
 * wrapped as an Any ("@type" first). Returns 0; -ENOENT when ?resource= names no repeated field
 * of the dump; -EINVAL for an empty mask path; -ENOMEM; or xds_pbjson_encode's error. On error
 * *reterr_desc (static or thread-local text) says why.
 */
int wp_admin_config_dump(const struct wp_snapshot *s, const struct wp_admin_dump_req *req,
                         char **ret_body, size_t *ret_len, const char **reterr_desc);

/* /clusters: Envoy's "cluster::host::key::value" text lines, or with json the
 * admin.v3.Clusters JSON shape. Returns 0 or -ENOMEM. */
int wp_admin_clusters(const struct wp_snapshot *s, bool json, char **ret_body, size_t *ret_len);

/* /listeners: "name::address" lines, or with json admin.v3.Listeners. hbone_addr (may be NULL)
 * replaces connect_terminate's configured address: it is where we really listen. Returns 0 or
 * -ENOMEM. */
int wp_admin_listeners(const struct wp_snapshot *s, const char *hbone_addr, bool json,
                       char **ret_body, size_t *ret_len);

/* Applies a FieldMask (comma-separated dotted paths) to a JSON object in place: keeps "@type"
 * and the listed paths; a path through an array applies to each element. Exported for tests.
 * Returns 0 or -EINVAL (empty path element). */
struct json_object;
int wp_admin_json_mask(struct json_object *obj, const char *mask);

#endif
