/*
 * Admin documents built from one config snapshot: /config_dump in Envoy's admin.v3.ConfigDump
 * shape (envoy/admin/v3/config_dump{,_shared}.proto: BootstrapConfigDump, ClustersConfigDump,
 * ListenersConfigDump, RoutesConfigDump, EndpointsConfigDump), /clusters and /listeners.
 *
 * Resources are encoded with xds_pbjson_encode, the codec the loader decodes with, so a dump's
 * resources, taken out of their wrappers, load back into the same snapshot. Everything here
 * runs on the admin thread against a snapshot the caller holds a reference on; snapshots and
 * their resources are immutable, so no lock is needed.
 *
 * Our one addition to Envoy's shape: with ?include_addresses, an entry of type
 * type.googleapis.com/waypoint.admin.v1.AddressesConfigDump carries the istio.workload.Address
 * resources (WDS) as "dynamic_addresses": [{name, version_info, address, last_updated}]. It is
 * off by default so that tools which resolve every "@type" see only Envoy's types.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <json-c/json.h>

#include "hbone/hbone.h"
#include "waypoint/admin.h"
#include "waypoint/base/alloc.h"
#include "waypoint/snapshot.h"
#include "xds-client/resources.h"

#define T_ADMIN     "type.googleapis.com/envoy.admin.v3."
#define T_BOOTSTRAP T_ADMIN "BootstrapConfigDump"
#define T_CLUSTERS  T_ADMIN "ClustersConfigDump"
#define T_LISTENERS T_ADMIN "ListenersConfigDump"
#define T_ROUTES    T_ADMIN "RoutesConfigDump"
#define T_ENDPOINTS T_ADMIN "EndpointsConfigDump"
#define T_ADDRESSES "type.googleapis.com/waypoint.admin.v1.AddressesConfigDump"

#define MASK_PATHS_MAX 64

/* ?resource= names: the repeated fields of the dump entries and their element types */
static const struct {
        const char *field;
        const char *dump_type;
        const char *elem;
} resource_fields[] = {
    {"static_clusters", T_CLUSTERS, "StaticCluster"},
    {"dynamic_active_clusters", T_CLUSTERS, "DynamicCluster"},
    {"dynamic_warming_clusters", T_CLUSTERS, "DynamicCluster"},
    {"static_listeners", T_LISTENERS, "StaticListener"},
    {"dynamic_listeners", T_LISTENERS, "DynamicListener"},
    {"static_route_configs", T_ROUTES, "StaticRouteConfig"},
    {"dynamic_route_configs", T_ROUTES, "DynamicRouteConfig"},
    {"static_endpoint_configs", T_ENDPOINTS, "StaticEndpointConfig"},
    {"dynamic_endpoint_configs", T_ENDPOINTS, "DynamicEndpointConfig"},
    {"dynamic_addresses", T_ADDRESSES, "DynamicAddress"},
};

/* ---- json-c helpers: every add checks for allocation failure ---- */

/* Adds v (consumed, may be NULL = allocation failed) under k. */
static int add(struct json_object *o, const char *k, struct json_object *v)
{
        if (!v)
                return -ENOMEM;
        if (json_object_object_add(o, k, v) < 0) {
                json_object_put(v);
                return -ENOMEM;
        }
        return 0;
}

static int append(struct json_object *a, struct json_object *v)
{
        if (!v)
                return -ENOMEM;
        if (json_object_array_add(a, v) < 0) {
                json_object_put(v);
                return -ENOMEM;
        }
        return 0;
}

static int add_str(struct json_object *o, const char *k, const char *s)
{
        return add(o, k, json_object_new_string(s ? s : ""));
}

/* A new object {"@type": url, <members of v>}; consumes v. */
static struct json_object *any_wrap(const char *url, struct json_object *v)
{
        struct json_object *o = json_object_new_object();

        if (!o || add_str(o, "@type", url) < 0)
                goto fail;
        json_object_object_foreach(v, k, val)
        {
                if (add(o, k, json_object_get(val)) < 0)
                        goto fail;
        }
        json_object_put(v);
        return o;
fail:
        json_object_put(o);
        json_object_put(v);
        return NULL;
}

/* protobuf Timestamp JSON: RFC 3339, UTC, milliseconds. */
static void format_time(int64_t ms, char *out, size_t cap)
{
        time_t sec = (time_t)(ms / 1000);
        struct tm tm;

        if (ms <= 0 || !gmtime_r(&sec, &tm)) {
                snprintf(out, cap, "1970-01-01T00:00:00Z");
                return;
        }
        snprintf(out, cap, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(ms % 1000));
}

/* Serializes root (consumed) into a heap body with a final newline. */
static int finish(struct json_object *root, char **ret_body, size_t *ret_len)
{
        size_t n = 0;
        const char *text = json_object_to_json_string_length(root, WP_ADMIN_JSON_FLAGS, &n);
        char *body;

        if (!text) {
                json_object_put(root);
                return -ENOMEM;
        }
        body = wp_malloc(n + 2);
        if (!body) {
                json_object_put(root);
                return -ENOMEM;
        }
        memcpy(body, text, n);
        body[n++] = '\n';
        body[n] = 0;
        json_object_put(root);
        *ret_body = body;
        *ret_len = n;
        return 0;
}

/* ---- /config_dump ---- */

struct dump {
        const struct wp_snapshot *s;
        const struct wp_admin_dump_req *req;
        char version[32];
        char updated[40];
        const char *err;
};

/* The resource as an Any: encoded with the loader's codec, "@type" first. */
static struct json_object *encode_any(struct dump *d, enum xds_resource_type t,
                                      const struct xds_resource *r, int *ret_err)
{
        struct json_object *v = NULL;
        int e = xds_pbjson_encode(r->msg, 0, &v, &d->err);

        if (e < 0) {
                *ret_err = e;
                return NULL;
        }
        v = any_wrap(xds_resource_type_url(t), v);
        if (!v)
                *ret_err = -ENOMEM;
        return v;
}

/* {"version_info", <field>: Any, "last_updated"} for each resource of t into array `arr`
 * of entry `entry` (created only when there are resources: proto3 JSON omits empty lists).
 * listener_shape: the Listener wrapper {"name", "active_state": {...}}. */
static int dump_list(struct dump *d, struct json_object *entry, const char *arr_name,
                     enum xds_resource_type t, const char *field, bool listener_shape)
{
        struct xds_resource_list *l = xds_resources_list((struct xds_resources *)d->s->res, t);
        struct json_object *arr;
        int r = 0;

        if (!l || l->n == 0)
                return 0;
        arr = json_object_new_array_ext((int)l->n);
        if (!arr || (r = add(entry, arr_name, arr)) < 0)
                return r < 0 ? r : -ENOMEM;
        for (size_t i = 0; i < l->n; i++) {
                struct json_object *state = json_object_new_object(), *item = state, *v;

                if (!state)
                        return -ENOMEM;
                if (listener_shape) {
                        item = json_object_new_object();
                        if (!item || add_str(item, "name", l->items[i].name) < 0 ||
                            add(item, "active_state", state) < 0) {
                                json_object_put(item);
                                return -ENOMEM;
                        }
                } else if (t == XDS_RES_ADDRESS && add_str(state, "name", l->items[i].name) < 0) {
                        json_object_put(state);
                        return -ENOMEM;
                }
                if (append(arr, item) < 0)
                        return -ENOMEM;
                if (add_str(state, "version_info", d->version) < 0)
                        return -ENOMEM;
                r = -ENOMEM;
                v = encode_any(d, t, &l->items[i], &r);
                if (!v || add(state, field, v) < 0)
                        return r;
                if (add_str(state, "last_updated", d->updated) < 0)
                        return -ENOMEM;
        }
        return 0;
}

static struct json_object *new_entry(const char *type, const char *version)
{
        struct json_object *o = json_object_new_object();

        if (!o || add_str(o, "@type", type) < 0 ||
            (version && add_str(o, "version_info", version) < 0)) {
                json_object_put(o);
                return NULL;
        }
        return o;
}

static int dump_bootstrap(struct dump *d, struct json_object *configs)
{
        const struct wp_admin_dump_req *q = d->req;
        struct json_object *e = new_entry(T_BOOTSTRAP, NULL), *b, *node;
        const char *id = q->node_id;

        if (!id && d->s && d->s->res)
                id = d->s->res->node_id;
        if (!e || append(configs, e) < 0)
                return -ENOMEM;
        b = json_object_new_object();
        if (add(e, "bootstrap", b) < 0)
                return -ENOMEM;
        node = json_object_new_object();
        if (add(b, "node", node) < 0)
                return -ENOMEM;
        if ((id && add_str(node, "id", id) < 0) ||
            (q->node_cluster && add_str(node, "cluster", q->node_cluster) < 0) ||
            add_str(node, "user_agent_name", "waypoint") < 0 ||
            add_str(node, "user_agent_version", "0.1.0") < 0)
                return -ENOMEM;
        return add_str(e, "last_updated", d->updated);
}

static int build_dump(struct dump *d, struct json_object *configs)
{
        struct json_object *e;
        int r;

        r = dump_bootstrap(d, configs);
        if (r < 0 || !d->s || !d->s->res)
                return r;

        e = new_entry(T_CLUSTERS, d->version);
        if (!e || append(configs, e) < 0)
                return -ENOMEM;
        r = dump_list(d, e, "dynamic_active_clusters", XDS_RES_CLUSTER, "cluster", false);
        if (r < 0)
                return r;

        e = new_entry(T_LISTENERS, d->version);
        if (!e || append(configs, e) < 0)
                return -ENOMEM;
        r = dump_list(d, e, "dynamic_listeners", XDS_RES_LISTENER, "listener", true);
        if (r < 0)
                return r;

        e = new_entry(T_ROUTES, NULL);
        if (!e || append(configs, e) < 0)
                return -ENOMEM;
        r = dump_list(d, e, "dynamic_route_configs", XDS_RES_ROUTE, "route_config", false);
        if (r < 0)
                return r;

        if (d->req->include_eds) {
                e = new_entry(T_ENDPOINTS, NULL);
                if (!e || append(configs, e) < 0)
                        return -ENOMEM;
                r = dump_list(d, e, "dynamic_endpoint_configs", XDS_RES_CLA, "endpoint_config",
                              false);
                if (r < 0)
                        return r;
        }
        if (d->req->include_addresses) {
                e = new_entry(T_ADDRESSES, NULL);
                if (!e || append(configs, e) < 0)
                        return -ENOMEM;
                r = dump_list(d, e, "dynamic_addresses", XDS_RES_ADDRESS, "address", false);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* ?resource=: a ConfigDump of the elements of one repeated field, each an Any of the element
 * type ("...ClustersConfigDump.DynamicCluster"). */
static int select_resource(struct json_object *configs, const char *field, struct json_object **ret,
                           const char **reterr_desc)
{
        struct json_object *out;
        size_t k;

        for (k = 0; k < sizeof(resource_fields) / sizeof(resource_fields[0]); k++)
                if (!strcmp(resource_fields[k].field, field))
                        break;
        if (k == sizeof(resource_fields) / sizeof(resource_fields[0])) {
                *reterr_desc = "resource: not a repeated field of the config dump";
                return -ENOENT;
        }
        out = json_object_new_array();
        if (!out)
                return -ENOMEM;
        for (size_t i = 0; i < json_object_array_length(configs); i++) {
                struct json_object *c = json_object_array_get_idx(configs, i), *arr, *t;
                char url[160];

                if (!json_object_object_get_ex(c, "@type", &t) ||
                    strcmp(json_object_get_string(t), resource_fields[k].dump_type) ||
                    !json_object_object_get_ex(c, field, &arr))
                        continue;
                snprintf(url, sizeof(url), "%s.%s", resource_fields[k].dump_type,
                         resource_fields[k].elem);
                for (size_t j = 0; j < json_object_array_length(arr); j++) {
                        struct json_object *el =
                            any_wrap(url, json_object_get(json_object_array_get_idx(arr, j)));

                        if (append(out, el) < 0) {
                                json_object_put(out);
                                return -ENOMEM;
                        }
                }
        }
        *ret = out;
        return 0;
}

int wp_admin_config_dump(const struct wp_snapshot *s, const struct wp_admin_dump_req *req,
                         char **ret_body, size_t *ret_len, const char **reterr_desc)
{
        struct dump d = {.s = s, .req = req};
        struct json_object *root = json_object_new_object(), *configs = json_object_new_array();
        int r;

        *reterr_desc = NULL;
        if (!root || add(root, "configs", configs) < 0) {
                json_object_put(root);
                *reterr_desc = "out of memory";
                return -ENOMEM;
        }
        snprintf(d.version, sizeof(d.version), "%" PRIu64, s ? s->version : 0);
        format_time(req->last_updated_ms, d.updated, sizeof(d.updated));
        r = build_dump(&d, configs);
        if (r < 0) {
                *reterr_desc = d.err ? d.err : "out of memory";
                goto err;
        }
        if (req->resource && req->resource[0]) {
                struct json_object *sel = NULL;

                r = select_resource(configs, req->resource, &sel, reterr_desc);
                if (r < 0)
                        goto err;
                if (add(root, "configs", sel) < 0) {
                        r = -ENOMEM;
                        goto err;
                }
                configs = sel;
        }
        if (req->mask && req->mask[0]) {
                for (size_t i = 0; i < json_object_array_length(configs); i++) {
                        r = wp_admin_json_mask(json_object_array_get_idx(configs, i), req->mask);
                        if (r < 0) {
                                *reterr_desc = "mask: empty path";
                                goto err;
                        }
                }
        }
        r = finish(root, ret_body, ret_len);
        if (r < 0)
                *reterr_desc = "out of memory";
        return r;
err:
        if (!*reterr_desc)
                *reterr_desc = "out of memory";
        json_object_put(root);
        return r;
}

/* ---- FieldMask ---- */

static int mask_apply(struct json_object *obj, const char *const *paths, size_t n, int depth)
{
        const char *drop[256];
        size_t ndrop = 0;
        bool more = false;

        if (!json_object_is_type(obj, json_type_object) || depth > 32)
                return 0;
        do {
                more = false;
                ndrop = 0;
                json_object_object_foreach(obj, k, v)
                {
                        const char *sub[MASK_PATHS_MAX];
                        size_t nsub = 0, kl = strlen(k);
                        bool whole = !strcmp(k, "@type");

                        for (size_t i = 0; i < n && !whole; i++) {
                                if (!strcmp(paths[i], k))
                                        whole = true;
                                else if (!strncmp(paths[i], k, kl) && paths[i][kl] == '.')
                                        sub[nsub++] = paths[i] + kl + 1;
                        }
                        if (whole)
                                continue;
                        if (nsub == 0) {
                                if (ndrop == sizeof(drop) / sizeof(drop[0])) {
                                        more = true;
                                        break;
                                }
                                drop[ndrop++] = k;
                                continue;
                        }
                        if (json_object_is_type(v, json_type_array)) {
                                for (size_t j = 0; j < json_object_array_length(v); j++)
                                        mask_apply(json_object_array_get_idx(v, j), sub, nsub,
                                                   depth + 1);
                        } else {
                                mask_apply(v, sub, nsub, depth + 1);
                        }
                }
                /* keys are owned by the object: delete after the walk, one batch at a time */
                for (size_t i = 0; i < ndrop; i++)
                        json_object_object_del(obj, drop[i]);
        } while (more);
        return 0;
}

int wp_admin_json_mask(struct json_object *obj, const char *mask)
{
        char buf[1024];
        const char *paths[MASK_PATHS_MAX];
        size_t n = 0;
        char *save = NULL, *tok;

        if (strlen(mask) >= sizeof(buf))
                return -EINVAL;
        memcpy(buf, mask, strlen(mask) + 1);
        for (const char *p = buf; *p; p++)
                if (*p == ',' && (p == buf || p[1] == 0 || p[1] == ','))
                        return -EINVAL;
        for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                size_t l = strlen(tok);

                if (n == MASK_PATHS_MAX || l == 0 || tok[0] == '.' || tok[l - 1] == '.' ||
                    strstr(tok, ".."))
                        return -EINVAL;
                paths[n++] = tok;
        }
        if (n == 0)
                return -EINVAL;
        return mask_apply(obj, paths, n, 0);
}

/* ---- /clusters ---- */

static const struct wp_cluster *compiled(const struct wp_snapshot *s, size_t *j, const char *name)
{
        /* snapshot clusters are compiled in resource order, some skipped: one merge walk */
        if (*j < s->nclusters && !strcmp(s->clusters[*j].name, name))
                return &s->clusters[(*j)++];
        return NULL;
}

static void ep_text_addr(const struct wp_endpoint *ep, char *out, size_t cap)
{
        if (ep->hbone)
                snprintf(out, cap, "envoy://connect_originate/%s", ep->authority);
        else
                snprintf(out, cap, "%s", ep->authority);
}

/* {"socket_address": {...}} for "ip:port", or Envoy's internal address for HBONE. */
static struct json_object *ep_json_addr(const char *authority, bool hbone)
{
        struct json_object *a = json_object_new_object(), *in = json_object_new_object();
        struct hbone_target t;

        if (!a || add(a, hbone ? "envoy_internal_address" : "socket_address", in) < 0)
                goto fail;
        if (hbone) {
                if (add_str(in, "server_listener_name", "connect_originate") < 0 ||
                    add_str(in, "endpoint_id", authority) < 0)
                        goto fail;
                return a;
        }
        if (hbone_target_parse(authority, strlen(authority), &t) < 0)
                t = (struct hbone_target){.port = 0};
        if (add_str(in, "address", t.host) < 0 ||
            add(in, "port_value", json_object_new_int(t.port)) < 0)
                goto fail;
        return a;
fail:
        json_object_put(a);
        return NULL;
}

static int clusters_json(const struct wp_snapshot *s, char **ret_body, size_t *ret_len)
{
        struct json_object *root = json_object_new_object(), *arr = json_object_new_array();
        const struct xds_resource_list *l = s && s->res ? &s->res->clusters : NULL;
        size_t j = 0;

        if (!root || add(root, "cluster_statuses", arr) < 0)
                goto nomem;
        for (size_t i = 0; l && i < l->n; i++) {
                const struct wp_cluster *c = compiled(s, &j, l->items[i].name);
                struct json_object *cs = json_object_new_object(), *hosts;

                if (append(arr, cs) < 0 || add_str(cs, "name", l->items[i].name) < 0 ||
                    add_str(cs, "observability_name", l->items[i].name) < 0 ||
                    add(cs, "added_via_api", json_object_new_boolean(1)) < 0)
                        goto nomem;
                if (!c || c->neps == 0)
                        continue;
                hosts = json_object_new_array();
                if (add(cs, "host_statuses", hosts) < 0)
                        goto nomem;
                for (size_t k = 0; k < c->neps; k++) {
                        const struct wp_endpoint *ep = &c->eps[k];
                        struct json_object *h = json_object_new_object(), *hs;

                        if (append(hosts, h) < 0 ||
                            add(h, "address", ep_json_addr(ep->authority, ep->hbone)) < 0)
                                goto nomem;
                        hs = json_object_new_object();
                        if (add(h, "health_status", hs) < 0 ||
                            add_str(hs, "eds_health_status",
                                    ep->healthy ? "HEALTHY" : "UNHEALTHY") < 0 ||
                            add(h, "weight", json_object_new_int64(ep->weight)) < 0 ||
                            (ep->priority &&
                             add(h, "priority", json_object_new_int64(ep->priority)) < 0))
                                goto nomem;
                }
        }
        return finish(root, ret_body, ret_len);
nomem:
        json_object_put(root);
        return -ENOMEM;
}

int wp_admin_clusters(const struct wp_snapshot *s, bool json, char **ret_body, size_t *ret_len)
{
        const struct xds_resource_list *l = s && s->res ? &s->res->clusters : NULL;
        char *buf = NULL;
        size_t len = 0, j = 0;
        FILE *f;

        if (json)
                return clusters_json(s, ret_body, ret_len);
        f = open_memstream(&buf, &len);
        if (!f)
                return -ENOMEM;
        for (size_t i = 0; l && i < l->n; i++) {
                const char *name = l->items[i].name;
                const struct wp_cluster *c = compiled(s, &j, name);

                fprintf(f, "%s::observability_name::%s\n", name, name);
                fprintf(f, "%s::added_via_api::true\n", name);
                if (c)
                        fprintf(f, "%s::healthy_hosts::%zu\n", name, c->nhealthy);
                for (size_t k = 0; c && k < c->neps; k++) {
                        const struct wp_endpoint *ep = &c->eps[k];
                        char a[WP_AUTHORITY_MAX + 40];

                        ep_text_addr(ep, a, sizeof(a));
                        fprintf(f, "%s::%s::health_flags::%s\n", name, a,
                                ep->healthy ? "healthy" : "/failed_eds_health");
                        fprintf(f, "%s::%s::weight::%u\n", name, a, ep->weight);
                        fprintf(f, "%s::%s::priority::%u\n", name, a, ep->priority);
                        fprintf(f, "%s::%s::hbone::%s\n", name, a, ep->hbone ? "true" : "false");
                }
        }
        if (fclose(f) != 0) {
                free(buf);
                return -ENOMEM;
        }
        /* hand out a wp_malloc'd copy so every body is freed the same way */
        *ret_body = wp_malloc(len + 1);
        if (!*ret_body) {
                free(buf);
                return -ENOMEM;
        }
        memcpy(*ret_body, buf, len + 1);
        *ret_len = len;
        free(buf);
        return 0;
}

/* ---- /listeners ---- */

static void listener_text_addr(const Envoy__Config__Listener__V3__Listener *li, char *out,
                               size_t cap)
{
        const Envoy__Config__Core__V3__Address *a = li->address;

        if (a && a->address_case == ENVOY__CONFIG__CORE__V3__ADDRESS__ADDRESS_SOCKET_ADDRESS) {
                const char *ip = a->socket_address->address;

                snprintf(out, cap, strchr(ip, ':') ? "[%s]:%u" : "%s:%u", ip,
                         a->socket_address->port_value);
        } else if (a && a->address_case == ENVOY__CONFIG__CORE__V3__ADDRESS__ADDRESS_PIPE) {
                snprintf(out, cap, "%s", a->pipe->path);
        } else {
                /* internal listeners (and addresses we do not model) */
                snprintf(out, cap, "envoy://%s/", li->name);
        }
}

int wp_admin_listeners(const struct wp_snapshot *s, const char *hbone_addr, bool json,
                       char **ret_body, size_t *ret_len)
{
        const struct xds_resource_list *l = s && s->res ? &s->res->listeners : NULL;
        struct json_object *root = json_object_new_object(), *arr = json_object_new_array();
        struct json_object *lines = json_object_new_array();
        char *body;
        size_t len = 0;

        if (!root || !lines || add(root, "listener_statuses", arr) < 0)
                goto nomem;
        for (size_t i = 0; l && i < l->n; i++) {
                const Envoy__Config__Listener__V3__Listener *li =
                    (const Envoy__Config__Listener__V3__Listener *)l->items[i].msg;
                bool ours = hbone_addr && !strcmp(li->name, "connect_terminate");
                struct json_object *ls = json_object_new_object(), *a = NULL;
                const char *err;
                char text[512];

                if (append(arr, ls) < 0 || add_str(ls, "name", li->name) < 0)
                        goto nomem;
                if (ours) {
                        a = ep_json_addr(hbone_addr, false);
                        snprintf(text, sizeof(text), "%s::%s", li->name, hbone_addr);
                } else if (li->address && xds_pbjson_encode(&li->address->base, 0, &a, &err) < 0) {
                        goto nomem;
                } else if (!li->address) {
                        struct json_object *in = json_object_new_object();

                        a = json_object_new_object();
                        if (a && add(a, "envoy_internal_address", in) < 0) {
                                json_object_put(a);
                                goto nomem;
                        }
                        if (add_str(in, "server_listener_name", li->name) < 0) {
                                json_object_put(a);
                                goto nomem;
                        }
                }
                if (!ours) {
                        char addr[400];

                        listener_text_addr(li, addr, sizeof(addr));
                        snprintf(text, sizeof(text), "%s::%s", li->name, addr);
                }
                if (add(ls, "local_address", a) < 0 ||
                    append(lines, json_object_new_string(text)) < 0)
                        goto nomem;
        }
        if (json) {
                json_object_put(lines);
                return finish(root, ret_body, ret_len);
        }
        for (size_t i = 0; i < json_object_array_length(lines); i++)
                len += strlen(json_object_get_string(json_object_array_get_idx(lines, i))) + 1;
        body = wp_malloc(len + 1);
        if (!body)
                goto nomem;
        len = 0;
        for (size_t i = 0; i < json_object_array_length(lines); i++) {
                const char *t = json_object_get_string(json_object_array_get_idx(lines, i));
                size_t n = strlen(t);

                memcpy(body + len, t, n);
                len += n;
                body[len++] = '\n';
        }
        body[len] = 0;
        json_object_put(lines);
        json_object_put(root);
        *ret_body = body;
        *ret_len = len;
        return 0;
nomem:
        json_object_put(lines);
        json_object_put(root);
        return -ENOMEM;
}
