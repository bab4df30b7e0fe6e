/*
 * Bootstrap: who this waypoint is and where istiod is, from flags, then the environment the
 * stock `waypoint` Deployment template sets for pilot-agent (POD_NAME, POD_NAMESPACE,
 * INSTANCE_IP, SERVICE_ACCOUNT, ISTIO_META_*, CA_ADDR, PROXY_CONFIG, TRUST_DOMAIN), then Istio's
 * defaults and file paths (ISTIO-CONTRACT §2.1, §3).
 */
#ifndef WP_BOOTSTRAP_H
#define WP_BOOTSTRAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "xds-client/ads.h"

#define WP_BOOTSTRAP_MAX_META 64

struct wp_bootstrap {
        /* set by flags first (NULL = take from the environment / defaults) */
        char *pod_name, *pod_namespace, *pod_ip, *service_account, *trust_domain;
        char *cluster_id, *mesh_id, *network, *istio_version;
        char *xds_address, *ca_address, *xds_server_name;
        char *token_file, *root_cert_file;
        char *labels_file, *annotations_file;
        bool sotw;
        uint32_t cert_ttl_s;
        size_t max_xds_message;
        /* derived */
        char *node_id;     /* waypoint~<ip>~<pod>.<ns>~<ns>.svc.cluster.local */
        char *node_cluster; /* <sa>.<ns>, as --serviceCluster */
        char *spiffe_uri;   /* spiffe://<td>/ns/<ns>/sa/<sa> */
        struct xds_node_metadata_entry meta[WP_BOOTSTRAP_MAX_META];
        size_t nmeta;
        char *meta_store[2 * WP_BOOTSTRAP_MAX_META];
        size_t nstore;
};

/* Fills the unset fields from the environment and defaults, derives the node identity.
 * Returns 0, or -EINVAL with *reterr_desc (static text) when something required is missing. */
int wp_bootstrap_resolve(struct wp_bootstrap *b, const char **reterr_desc);
void wp_bootstrap_done(struct wp_bootstrap *b);

/* Parses a downward-API file (key="value" per line, value with \" and \\ escapes) into a JSON
 * object text (heap). Returns 0, -ENOENT, -EINVAL. Exported for tests. */
int wp_bootstrap_downward_json(const char *path, char **ret_json);

#endif
