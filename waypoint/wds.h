/*
 * Peer metadata for telemetry: an index of istio.workload.Address (WDS) workloads by IP, built
 * with each snapshot (as Envoy's workload_discovery extension keeps one), and the `istio`
 * metadata istiod attaches to clusters (the service a cluster stands for).
 */
#ifndef WP_WDS_H
#define WP_WDS_H

#include <sys/socket.h>

#include "istio/workload/workload.pb-c.h"

struct xds_resources;
struct wp_wds;

/* Indexes every workload address of res (borrowed: res must outlive the index). Returns 0
 * (*ret may be NULL when there are no workloads) or -ENOMEM. */
int wp_wds_build(const struct xds_resources *res, struct wp_wds **ret);
struct wp_wds *wp_wds_free(struct wp_wds *w); /* NULL-safe */
/* The workload with IP addr (AF_INET/AF_INET6; port ignored), or NULL. */
const Istio__Workload__Workload *wp_wds_lookup(const struct wp_wds *w, const struct sockaddr *addr);

struct wp_service_meta {
        const char *host, *name, *namespace_; /* borrowed from res; NULL when absent */
};
/* filter_metadata["istio"].services[0] of cluster `name`: what the cluster serves. */
void wp_cluster_service_meta(const struct xds_resources *res, const char *cluster,
                             struct wp_service_meta *ret);

#endif
