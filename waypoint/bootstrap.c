#include "waypoint/bootstrap.h"

#include <errno.h>
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/x509.h"

#define ISTIO_VERSION_DEFAULT "1.28.0"

extern char **environ;

static char *keep(struct wp_bootstrap *b, char *s)
{
        if (s && b->nstore < sizeof(b->meta_store) / sizeof(b->meta_store[0]))
                b->meta_store[b->nstore++] = s;
        return s;
}

static void set_default(char **field, const char *env, const char *dflt)
{
        const char *v = env ? getenv(env) : NULL;

        if (*field)
                return;
        if (v && *v)
                *field = wp_strdup(v);
        else if (dflt)
                *field = wp_strdup(dflt);
}

static void add_meta(struct wp_bootstrap *b, const char *key, const char *value, bool is_json)
{
        if (!value || b->nmeta >= WP_BOOTSTRAP_MAX_META)
                return;
        for (size_t i = 0; i < b->nmeta; i++)
                if (!strcmp(b->meta[i].key, key)) {
                        b->meta[i].value = value;
                        b->meta[i].is_json = is_json;
                        return;
                }
        b->meta[b->nmeta++] = (struct xds_node_metadata_entry){key, value, is_json};
}

int wp_bootstrap_downward_json(const char *path, char **ret_json)
{
        char *text = NULL, *line, *save = NULL;
        struct json_object *obj;
        int r;

        r = wp_read_file(path, 1 << 20, &text, NULL);
        if (r < 0)
                return r;
        obj = json_object_new_object();
        for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                char *eq = strchr(line, '='), *v, *out;

                if (!eq || eq == line)
                        continue;
                *eq = 0;
                v = eq + 1;
                if (*v == '"') {
                        size_t n = strlen(v);

                        if (n < 2 || v[n - 1] != '"') {
                                r = -EINVAL;
                                break;
                        }
                        v[n - 1] = 0;
                        v++;
                        /* unescape \" and \\ in place */
                        for (out = v; *v; v++) {
                                if (*v == '\\' && v[1])
                                        v++;
                                *out++ = *v;
                        }
                        *out = 0;
                        v = eq + 2;
                }
                json_object_object_add(obj, line, json_object_new_string(v));
        }
        if (r == 0)
                *ret_json = wp_strdup(json_object_to_json_string_ext(obj, JSON_C_TO_STRING_PLAIN));
        json_object_put(obj);
        wp_free(text);
        return r == 0 && !*ret_json ? -ENOMEM : r;
}

/* PROXY_CONFIG is JSON (ProxyConfig); we read discoveryAddress from it. */
static void from_proxy_config(struct wp_bootstrap *b)
{
        const char *pc = getenv("PROXY_CONFIG");
        struct json_object *o, *v;

        if (!pc || b->xds_address)
                return;
        o = json_tokener_parse(pc);
        if (!o)
                return;
        if (json_object_object_get_ex(o, "discoveryAddress", &v) && json_object_is_type(v, json_type_string))
                b->xds_address = wp_strdup(json_object_get_string(v));
        json_object_put(o);
}

int wp_bootstrap_resolve(struct wp_bootstrap *b, const char **reterr_desc)
{
        char buf[1024];
        char *labels = NULL, *annotations = NULL;
        struct wp_spiffe_id id;

        set_default(&b->pod_name, "POD_NAME", NULL);
        set_default(&b->pod_namespace, "POD_NAMESPACE", NULL);
        set_default(&b->pod_ip, "INSTANCE_IP", NULL);
        set_default(&b->service_account, "SERVICE_ACCOUNT", NULL);
        set_default(&b->trust_domain, "TRUST_DOMAIN", "cluster.local");
        set_default(&b->cluster_id, "ISTIO_META_CLUSTER_ID", "Kubernetes");
        set_default(&b->mesh_id, "ISTIO_META_MESH_ID", NULL);
        set_default(&b->network, "ISTIO_META_NETWORK", NULL);
        set_default(&b->istio_version, "ISTIO_VERSION", ISTIO_VERSION_DEFAULT);
        from_proxy_config(b);
        set_default(&b->xds_address, NULL, "istiod.istio-system.svc:15012");
        set_default(&b->ca_address, "CA_ADDR", NULL);
        if (!b->ca_address)
                b->ca_address = wp_strdup(b->xds_address);
        set_default(&b->token_file, NULL, "/var/run/secrets/tokens/istio-token");
        set_default(&b->root_cert_file, NULL, "/var/run/secrets/istio/root-cert.pem");
        set_default(&b->labels_file, NULL, "/etc/istio/pod/labels");
        set_default(&b->annotations_file, NULL, "/etc/istio/pod/annotations");
        if (!b->xds_server_name) {
                /* istiod's serving certificate names istiod.<ns>.svc; an IP address
                 * (tests, or a discoveryAddress given as IP) still verifies against that */
                char host[256];
                const char *colon = strrchr(b->xds_address, ':');
                size_t n = colon ? (size_t)(colon - b->xds_address) : strlen(b->xds_address);

                snprintf(host, sizeof(host), "%.*s", (int)n, b->xds_address);
                if (host[0] && (host[0] < '0' || host[0] > '9') && host[0] != '[')
                        b->xds_server_name = wp_strdup(host);
                else
                        b->xds_server_name = wp_strdup("istiod.istio-system.svc");
        }
        if (!b->cert_ttl_s)
                b->cert_ttl_s = 86400;
        if (!b->pod_name || !b->pod_namespace || !b->pod_ip || !b->service_account) {
                *reterr_desc = "pod identity incomplete: need POD_NAME, POD_NAMESPACE, "
                               "INSTANCE_IP, SERVICE_ACCOUNT (or --pod-name, --pod-namespace, "
                               "--pod-ip, --service-account)";
                return -EINVAL;
        }
        snprintf(buf, sizeof(buf), "waypoint~%s~%s.%s~%s.svc.cluster.local", b->pod_ip,
                 b->pod_name, b->pod_namespace, b->pod_namespace);
        b->node_id = wp_strdup(buf);
        snprintf(buf, sizeof(buf), "%s.%s", b->service_account, b->pod_namespace);
        b->node_cluster = wp_strdup(buf);
        snprintf(buf, sizeof(buf), "spiffe://%s/ns/%s/sa/%s", b->trust_domain, b->pod_namespace,
                 b->service_account);
        b->spiffe_uri = wp_strdup(buf);
        if (wp_spiffe_parse(b->spiffe_uri, strlen(b->spiffe_uri), &id) < 0) {
                *reterr_desc = "trust domain, namespace or service account do not form a valid "
                               "SPIFFE identity";
                return -EINVAL;
        }

        /* Node metadata as pilot-agent sends it for a waypoint (ISTIO-CONTRACT §2.1) */
        add_meta(b, "ISTIO_VERSION", b->istio_version, false);
        add_meta(b, "NAMESPACE", b->pod_namespace, false);
        add_meta(b, "NAME", b->pod_name, false);
        add_meta(b, "INSTANCE_IPS", b->pod_ip, false);
        add_meta(b, "SERVICE_ACCOUNT", b->service_account, false);
        add_meta(b, "CLUSTER_ID", b->cluster_id, false);
        add_meta(b, "MESH_ID", b->mesh_id ? b->mesh_id : b->trust_domain, false);
        add_meta(b, "NETWORK", b->network, false);
        add_meta(b, "INTERCEPTION_MODE", "REDIRECT", false);
        add_meta(b, "WORKLOAD_NAME", getenv("ISTIO_META_WORKLOAD_NAME"), false);
        add_meta(b, "NODE_NAME", getenv("NODE_NAME"), false);
        if (wp_bootstrap_downward_json(b->labels_file, &labels) == 0)
                add_meta(b, "LABELS", keep(b, labels), true);
        if (wp_bootstrap_downward_json(b->annotations_file, &annotations) == 0)
                add_meta(b, "ANNOTATIONS", keep(b, annotations), true);
        /* every other ISTIO_META_* variable, as pilot-agent forwards them */
        for (char **e = environ; e && *e; e++) {
                const char *kv = *e, *eq;
                char *key, *val;

                if (strncmp(kv, "ISTIO_META_", 11) != 0 || !(eq = strchr(kv, '=')))
                        continue;
                key = keep(b, wp_strndup(kv + 11, (size_t)(eq - kv - 11)));
                val = keep(b, wp_strdup(eq + 1));
                if (!key || !val || !*key)
                        continue;
                /* JSON-valued ones (e.g. ISTIO_META_..._JSON) are sent as strings */
                bool seen = false;
                for (size_t i = 0; i < b->nmeta; i++)
                        seen |= !strcmp(b->meta[i].key, key);
                if (!seen)
                        add_meta(b, key, val, false);
        }
        return 0;
}

void wp_bootstrap_done(struct wp_bootstrap *b)
{
        char **fields[] = {&b->pod_name, &b->pod_namespace, &b->pod_ip, &b->service_account,
                           &b->trust_domain, &b->cluster_id, &b->mesh_id, &b->network,
                           &b->istio_version, &b->xds_address, &b->ca_address,
                           &b->xds_server_name, &b->token_file, &b->root_cert_file,
                           &b->labels_file, &b->annotations_file, &b->node_id,
                           &b->node_cluster, &b->spiffe_uri};

        for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
                wp_free(*fields[i]);
                *fields[i] = NULL;
        }
        for (size_t i = 0; i < b->nstore; i++)
                wp_free(b->meta_store[i]);
        b->nstore = 0;
        b->nmeta = 0;
}
