/*
 * The ADS client state machine, sans-I/O: what the waypoint subscribes to, what it has, what it
 * acknowledges. It is fed the bodies of DiscoveryResponse / DeltaDiscoveryResponse messages and
 * yields the serialized requests to send; it never sees a socket or a clock.
 *
 * Delta (default, what istiod forces for waypoints) and state-of-the-world (SotW) variants
 * share this interface. Subscriptions (ISTIO-CONTRACT §2.2): Cluster and Listener (wildcard),
 * ClusterLoadAssignment (the service names of EDS clusters, kept in step with CDS),
 * RouteConfiguration (the names RDS HCMs reference, if any), istio.workload.Address (wildcard).
 *
 * Updates: after each response the client state (every resource of every type) is offered to
 * on_update as a new xds_resources set. on_update builds and publishes a snapshot and returns
 * 0 to ACK or a negative errno with a description to NACK (the response's changes are then
 * dropped from the state, the previous snapshot keeps serving, and the NACK carries
 * error_detail {code INVALID_ARGUMENT (3), message}). The first on_update waits until the
 * initial fetch is complete, in Envoy's order: CDS, then EDS for the clusters it named; LDS,
 * then RDS for the routes it named; and WDS.
 *
 * Reconnect: after xds_ads_reset() (new stream), delta requests carry initial_resource_versions
 * for what we hold, SotW requests the last accepted version_info; the state stays until the
 * server says otherwise.
 */
#ifndef XDS_ADS_H
#define XDS_ADS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "xds-client/resources.h"

struct xds_ads;

#define XDS_ADS_DELTA_PATH "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
#define XDS_ADS_SOTW_PATH "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"

struct xds_node_metadata_entry {
        const char *key;
        const char *value; /* string values only; LABELS etc. are JSON-encoded objects: see below */
        bool is_json;      /* value is a JSON object/array to embed as a Struct/ListValue */
};

struct xds_ads_config {
        bool delta;                 /* true: DeltaAggregatedResources; false: SotW */
        const char *node_id;        /* waypoint~<ip>~<pod>.<ns>~<ns>.svc.cluster.local */
        const char *node_cluster;   /* Node.cluster (e.g. "<gateway>.<ns>") */
        const struct xds_node_metadata_entry *metadata;
        size_t nmetadata;
        const char *user_agent_name; /* Node.user_agent_name ("waypoint") */
        const char *user_agent_version;
        size_t max_resources;       /* per type (default XDS_RESOURCES_MAX) */
        /* returns 0 = ACK, < 0 = NACK with *reterr_desc (heap string, freed by the ADS with
         * wp_free). Takes ownership of res in both cases. */
        int (*on_update)(struct xds_resources *res, char **reterr_desc, void *user);
        void *user;
};

struct xds_ads_stats {
        uint64_t responses, acks, nacks;
        uint64_t resources[_XDS_RES_TYPE_MAX];
        char last_nack[256];
};

int xds_ads_new(const struct xds_ads_config *cfg, struct xds_ads **ret);
struct xds_ads *xds_ads_free(struct xds_ads *a); /* NULL-safe, returns NULL */

/* A new stream begins: queue the initial subscriptions (with versions we hold). */
void xds_ads_reset(struct xds_ads *a);
/* One response body (DeltaDiscoveryResponse or DiscoveryResponse per cfg.delta). Returns 0;
 * -EINVAL when the body does not decode (the stream should be restarted; nothing is ACKed),
 * -ENOMEM. A response that decodes but is not acceptable (unknown type URL, Any with another
 * type, duplicate names, too many resources, on_update failure) is NACKed, not an error. */
int xds_ads_on_message(struct xds_ads *a, const uint8_t *body, size_t len);
/* The next serialized request to send, or 0 when none. *ret_body is valid until the next call on
 * a. Returns its length, or -ENOMEM. */
ssize_t xds_ads_next_request(struct xds_ads *a, const uint8_t **ret_body);
/* True once the initial fetch completed and on_update accepted a state. */
bool xds_ads_synced(const struct xds_ads *a);
const struct xds_ads_stats *xds_ads_stats(const struct xds_ads *a);

#endif
