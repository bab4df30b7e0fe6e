/*
 * The set of xDS resources a snapshot is built from, decoded into protobuf-c messages and
 * grouped by type. Filled from a config file (JSON or YAML, see xds_resources_load_file) or,
 * one resource at a time, by the ADS client (xds_resources_add / xds_resources_add_packed).
 *
 * Accepted file shapes (JSON, or the same in YAML):
 *   (a) {"node_id": "...", "resources": {"<type URL>": {"<name>": <resource>, ...}, ...}}
 *       (the shape of /work/shared/fixtures/istiod-waypoint-bookinfo.json); the name given as
 *       the key must equal the resource's own name;
 *   (b) {"resources": [{"@type": "<type URL>", <resource fields>...}, ...]}.
 * Supported type URLs are the five XDS_TYPE_URL_* below; any other is an error. Duplicate
 * names within one type are an error.
 *
 * Error descriptions (reterr_desc) live in a thread-local buffer valid until the next call into
 * xds-client on the same thread, and name the JSON path of the problem, e.g.
 *   resources["type.googleapis.com/envoy.config.listener.v3.Listener"]["main_internal"]
 *     .filter_chains[0].filters[0].typed_config: unknown type URL type.googleapis.com/foo.Bar
 */
#ifndef XDS_RESOURCES_H
#define XDS_RESOURCES_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#include "xds-client/pbjson.h" /* xds_any_unpack, xds_registry_lookup, xds_pbjson_* */

#define XDS_TYPE_URL_LISTENER "type.googleapis.com/envoy.config.listener.v3.Listener"
#define XDS_TYPE_URL_CLUSTER  "type.googleapis.com/envoy.config.cluster.v3.Cluster"
#define XDS_TYPE_URL_CLA      "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
#define XDS_TYPE_URL_ROUTE    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
#define XDS_TYPE_URL_ADDRESS  "type.googleapis.com/istio.workload.Address"

/* Most resources accepted in one xds_resources (all types together). */
#define XDS_RESOURCES_MAX 100000

enum xds_resource_type {
        XDS_RES_LISTENER,
        XDS_RES_CLUSTER,
        XDS_RES_CLA,
        XDS_RES_ROUTE,
        XDS_RES_ADDRESS,
        _XDS_RES_TYPE_MAX,
        _XDS_RES_TYPE_INVALID = -EINVAL,
};

struct xds_resource {
        char *name; /* resource name (Listener.name, CLA.cluster_name, Address: see below) */
        ProtobufCMessage *msg; /* owned; cast to the type's struct, e.g.
                                  (Envoy__Config__Listener__V3__Listener *)r->msg */
};

struct xds_resource_list {
        struct xds_resource *items; /* in insertion order (file order) */
        size_t n;
        size_t cap;
};

struct xds_resources {
        char *node_id;                      /* from the file, or NULL */
        struct xds_resource_list listeners; /* Envoy__Config__Listener__V3__Listener */
        struct xds_resource_list clusters;  /* Envoy__Config__Cluster__V3__Cluster */
        struct xds_resource_list
            cluster_load_assignments; /* ..._Endpoint__V3__ClusterLoadAssignment */
        struct xds_resource_list
            route_configurations;           /* Envoy__Config__Route__V3__RouteConfiguration */
        struct xds_resource_list addresses; /* Istio__Workload__Address; name = workload
                                               uid, or "<namespace>/<hostname>" for a
                                               service */
};

/* Type URL of t, or NULL when out of range. */
const char *xds_resource_type_url(enum xds_resource_type t);

/* Resource type for a type URL, or -EINVAL when it is not one we accept. */
enum xds_resource_type xds_resource_type_from_url(const char *type_url);

/* Message descriptor of t, or NULL when out of range. */
const ProtobufCMessageDescriptor *xds_resource_type_descriptor(enum xds_resource_type t);

/* The list of t in res (NULL when t is out of range). Borrowed. */
struct xds_resource_list *xds_resources_list(struct xds_resources *res, enum xds_resource_type t);

/* Allocates an empty set. Returns 0 or -ENOMEM. */
int xds_resources_new(struct xds_resources **ret);

/* Frees res and every message in it. NULL-safe; returns NULL. */
struct xds_resources *xds_resources_free(struct xds_resources *res);

/*
 * Adds msg (of the type named by type_url) to res, taking ownership of msg on success only.
 * name may be NULL (the resource's own name is used); when given it must equal the resource's
 * own name. Returns 0, -EINVAL (unsupported type URL, message of another type, empty name,
 * name mismatch, duplicate name), -E2BIG (more than XDS_RESOURCES_MAX), -ENOMEM.
 */
int xds_resources_add(struct xds_resources *res, const char *type_url, const char *name,
                      ProtobufCMessage *msg, const char **reterr_desc);

/* Same, from the serialized resource (e.g. DeltaDiscoveryResponse.resources[i].resource.value).
 * Returns -EINVAL also when the bytes do not parse. */
int xds_resources_add_packed(struct xds_resources *res, const char *type_url, const char *name,
                             const uint8_t *data, size_t len, const char **reterr_desc);

/* Finds a resource by type and name. Returns the borrowed message or NULL. */
ProtobufCMessage *xds_resources_find(const struct xds_resources *res, enum xds_resource_type t,
                                     const char *name);

/*
 * Builds resources from an already parsed JSON document of shape (a) or (b) above.
 * flags: XDS_PBJSON_IGNORE_UNKNOWN skips unknown fields (top-level keys too).
 * Returns 0 and a new set in *ret, or -EINVAL / -E2BIG / -ENOMEM.
 */
int xds_resources_from_json(struct json_object *root, unsigned flags, struct xds_resources **ret,
                            const char **reterr_desc);

enum {
        XDS_FORMAT_AUTO = 0, /* JSON if the first non-blank character is '{' or '[', else YAML */
        XDS_FORMAT_JSON = 1,
        XDS_FORMAT_YAML = 2,
};

/* Parses text (len bytes, not necessarily NUL-terminated) in format (XDS_FORMAT_*) and builds
 * resources from it. Same returns as xds_resources_from_json. */
int xds_resources_load_buffer(const char *text, size_t len, int format, unsigned flags,
                              struct xds_resources **ret, const char **reterr_desc);

/*
 * Reads the file at path (at most XDS_PBJSON_MAX_TEXT bytes) and loads it in strict mode. The
 * format is chosen by extension (.yaml/.yml: YAML, .json: JSON) else by content. Errors are
 * prefixed with the path. Returns 0, -errno from open/read, -EINVAL, -E2BIG, -ENOMEM.
 */
int xds_resources_load_file(const char *path, struct xds_resources **ret, const char **reterr_desc);

/* Encodes res back into shape (a) (for /config_dump and tests). Returns 0 and a new json-c
 * object in *ret (caller puts it), or a negative errno from xds_pbjson_encode. */
int xds_resources_to_json(const struct xds_resources *res, struct json_object **ret,
                          const char **reterr_desc);

#endif
