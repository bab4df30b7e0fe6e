/*
 * Istio CA client: requests a workload certificate from istiod's
 * istio.v1.auth.IstioCertificateService/CreateCertificate (unary gRPC over HTTP/2 + TLS, via
 * libcurl). The key is ECDSA P-256 and the CSR carries only the URI SAN (ISTIO-CONTRACT §3).
 * Blocking; runs on the control thread.
 */
#ifndef XDS_CA_H
#define XDS_CA_H

#include <stdint.h>

struct xds_ca_config {
        const char *address;    /* "host:port" of istiod (default istiod.istio-system.svc:15012) */
        const char *root_pem;   /* trust anchors for istiod's serving certificate */
        const char *token_path; /* bearer token, re-read on every request (kubelet rotates it) */
        const char *cluster_id; /* "clusterid" metadata, e.g. Kubernetes */
        const char *spiffe_uri; /* spiffe://<td>/ns/<ns>/sa/<sa> */
        uint32_t ttl_seconds;   /* validity_duration (default 86400) */
        uint32_t timeout_ms;    /* whole request (default 10000) */
        const char *tls_server_name; /* verify istiod's certificate against this DNS name (NULL:
                                        host part of address) */
};

struct xds_ca_cert {
        char *key_pem;   /* PKCS#8 private key */
        char *chain_pem; /* leaf first, then intermediates (without the root) */
        char *root_pem;  /* last element of the returned chain */
        int64_t not_before, not_after; /* of the leaf, seconds since the epoch */
};

/* Generates a key and CSR, calls CreateCertificate, checks the answer (leaf matches our key and
 * carries our URI SAN, chain verifies to the returned root). Returns 0 and fills *ret (free with
 * xds_ca_cert_done), or -errno with *reterr_desc (heap string; caller frees with wp_free):
 * -ECONNREFUSED/-ETIMEDOUT (transport), -EACCES (grpc-status UNAUTHENTICATED/PERMISSION_DENIED),
 * -EPROTO (bad answer), -ENOENT (token file missing). */
int xds_ca_request(const struct xds_ca_config *cfg, struct xds_ca_cert *ret, char **reterr_desc);
void xds_ca_cert_done(struct xds_ca_cert *c);

/* When to renew a certificate valid [not_before, not_after): at half its lifetime, minus up to
 * 10% jitter (jitter in [0,1)). Pure. */
int64_t xds_ca_renew_at(int64_t not_before, int64_t not_after, double jitter);

#endif
