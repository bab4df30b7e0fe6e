/*
 * Resource set: decoding xDS resources from files (JSON/YAML) and holding them by type.
 */
#include "xds-client/resources.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "waypoint/base/alloc.h"

static __thread char reserr[1024];

static int rfail(const char **reterr_desc, int err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int rfail(const char **reterr_desc, int err, const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(reserr, sizeof(reserr), fmt, ap);
        va_end(ap);
        if (reterr_desc)
                *reterr_desc = reserr;
        return err;
}

static const struct {
        const char *url;
        const ProtobufCMessageDescriptor *desc;
} types[_XDS_RES_TYPE_MAX] = {
    [XDS_RES_LISTENER] = {XDS_TYPE_URL_LISTENER,
                          &envoy__config__listener__v3__listener__descriptor},
    [XDS_RES_CLUSTER] = {XDS_TYPE_URL_CLUSTER, &envoy__config__cluster__v3__cluster__descriptor},
    [XDS_RES_CLA] = {XDS_TYPE_URL_CLA,
                     &envoy__config__endpoint__v3__cluster_load_assignment__descriptor},
    [XDS_RES_ROUTE] = {XDS_TYPE_URL_ROUTE,
                       &envoy__config__route__v3__route_configuration__descriptor},
    [XDS_RES_ADDRESS] = {XDS_TYPE_URL_ADDRESS, &istio__workload__address__descriptor},
};

const char *xds_resource_type_url(enum xds_resource_type t)
{
        return (unsigned)t < _XDS_RES_TYPE_MAX ? types[t].url : NULL;
}

const ProtobufCMessageDescriptor *xds_resource_type_descriptor(enum xds_resource_type t)
{
        return (unsigned)t < _XDS_RES_TYPE_MAX ? types[t].desc : NULL;
}

enum xds_resource_type xds_resource_type_from_url(const char *type_url)
{
        int t;

        if (!type_url)
                return _XDS_RES_TYPE_INVALID;
        for (t = 0; t < _XDS_RES_TYPE_MAX; t++)
                if (strcmp(type_url, types[t].url) == 0)
                        return (enum xds_resource_type)t;
        return _XDS_RES_TYPE_INVALID;
}

struct xds_resource_list *xds_resources_list(struct xds_resources *res, enum xds_resource_type t)
{
        switch (t) {
        case XDS_RES_LISTENER:
                return &res->listeners;
        case XDS_RES_CLUSTER:
                return &res->clusters;
        case XDS_RES_CLA:
                return &res->cluster_load_assignments;
        case XDS_RES_ROUTE:
                return &res->route_configurations;
        case XDS_RES_ADDRESS:
                return &res->addresses;
        default:
                return NULL;
        }
}

static const struct xds_resource_list *list_const(const struct xds_resources *res,
                                                  enum xds_resource_type t)
{
        return xds_resources_list((struct xds_resources *)res, t);
}

/*
 * Name index, one per type: open addressing over item positions, so that the duplicate check of
 * xds_resources_add and xds_resources_find are O(1) rather than a scan (a snapshot of thousands
 * of clusters made both quadratic). It lives beside the public struct (allocated together by
 * xds_resources_new) because struct xds_resource_list is public: code outside this file may
 * empty a list (ads.c resets its scratch set with l->n = 0), so the index records how many items
 * it covers and is rebuilt when that no longer matches, and every hit is confirmed by comparing
 * the name. Without an index (its allocation failed) lookups fall back to the scan.
 */
struct name_index {
        uint32_t *slots; /* item position + 1; 0 = empty. cap is a power of two */
        size_t cap;
        size_t covered; /* the list's n when the index was last in step */
};

struct resources_impl {
        struct xds_resources pub; /* first: the pointer handed out */
        struct name_index idx[_XDS_RES_TYPE_MAX];
};

static struct name_index *index_of(const struct xds_resources *res, enum xds_resource_type t)
{
        return &((struct resources_impl *)(void *)res)->idx[t];
}

static uint32_t name_hash(const char *s)
{
        uint32_t h = 2166136261u;

        for (; *s; s++)
                h = (h ^ (uint8_t)*s) * 16777619u;
        return h ^ (h >> 15);
}

static void index_insert(struct name_index *ix, const struct xds_resource_list *l, size_t pos)
{
        size_t mask = ix->cap - 1, i = name_hash(l->items[pos].name) & mask;

        while (ix->slots[i])
                i = (i + 1) & mask;
        ix->slots[i] = (uint32_t)pos + 1;
}

/* Brings the index of list l in step for l->n + more items. Returns false when there is no
 * index (allocation failed): callers scan instead. */
static bool index_sync(struct name_index *ix, const struct xds_resource_list *l, size_t more)
{
        size_t want = l->n + more, cap;
        uint32_t *slots;

        if (ix->slots && ix->covered == l->n && want * 2 <= ix->cap)
                return true;
        cap = ix->cap ? ix->cap : 16;
        while (cap < want * 2)
                cap *= 2;
        if (cap != ix->cap || !ix->slots) {
                slots = wp_calloc(cap, sizeof(*slots));
                if (!slots) {
                        wp_free(ix->slots);
                        *ix = (struct name_index){0};
                        return false;
                }
                wp_free(ix->slots);
                ix->slots = slots;
                ix->cap = cap;
        } else {
                memset(ix->slots, 0, cap * sizeof(*ix->slots));
        }
        for (size_t i = 0; i < l->n; i++)
                index_insert(ix, l, i);
        ix->covered = l->n;
        return true;
}

/* Position of name in l, or -1. */
static ssize_t list_find(const struct name_index *ix, const struct xds_resource_list *l,
                         const char *name)
{
        if (ix->slots && ix->covered == l->n) {
                size_t mask = ix->cap - 1, i = name_hash(name) & mask;

                for (; ix->slots[i]; i = (i + 1) & mask) {
                        size_t pos = ix->slots[i] - 1;

                        if (strcmp(l->items[pos].name, name) == 0)
                                return (ssize_t)pos;
                }
                return -1;
        }
        for (size_t i = 0; i < l->n; i++)
                if (strcmp(l->items[i].name, name) == 0)
                        return (ssize_t)i;
        return -1;
}

int xds_resources_new(struct xds_resources **ret)
{
        struct resources_impl *ri = wp_calloc(1, sizeof(*ri));

        if (!ri)
                return -ENOMEM;
        *ret = &ri->pub;
        return 0;
}

struct xds_resources *xds_resources_free(struct xds_resources *res)
{
        int t;

        if (!res)
                return NULL;
        for (t = 0; t < _XDS_RES_TYPE_MAX; t++) {
                struct xds_resource_list *l = xds_resources_list(res, (enum xds_resource_type)t);
                for (size_t i = 0; i < l->n; i++) {
                        wp_free(l->items[i].name);
                        xds_pbjson_message_free(l->items[i].msg);
                }
                wp_free(l->items);
                wp_free(index_of(res, (enum xds_resource_type)t)->slots);
        }
        wp_free(res->node_id);
        wp_free(res);
        return NULL;
}

static size_t total(const struct xds_resources *res)
{
        size_t n = 0;

        for (int t = 0; t < _XDS_RES_TYPE_MAX; t++)
                n += list_const(res, (enum xds_resource_type)t)->n;
        return n;
}

/* The resource's own name. Writes into buf for composed names. Returns "" when absent. */
static const char *own_name(enum xds_resource_type t, const ProtobufCMessage *msg, char *buf,
                            size_t cap)
{
        switch (t) {
        case XDS_RES_LISTENER:
                return ((const Envoy__Config__Listener__V3__Listener *)msg)->name;
        case XDS_RES_CLUSTER:
                return ((const Envoy__Config__Cluster__V3__Cluster *)msg)->name;
        case XDS_RES_CLA:
                return ((const Envoy__Config__Endpoint__V3__ClusterLoadAssignment *)msg)
                    ->cluster_name;
        case XDS_RES_ROUTE:
                return ((const Envoy__Config__Route__V3__RouteConfiguration *)msg)->name;
        case XDS_RES_ADDRESS: {
                const Istio__Workload__Address *a = (const Istio__Workload__Address *)msg;
                if (a->type_case == ISTIO__WORKLOAD__ADDRESS__TYPE_WORKLOAD && a->workload)
                        return a->workload->uid;
                if (a->type_case == ISTIO__WORKLOAD__ADDRESS__TYPE_SERVICE && a->service) {
                        int n = snprintf(buf, cap, "%s/%s", a->service->namespace_,
                                         a->service->hostname);
                        if (n < 0 || (size_t)n >= cap || !*a->service->hostname)
                                return "";
                        return buf;
                }
                return "";
        }
        default:
                return "";
        }
}

int xds_resources_add(struct xds_resources *res, const char *type_url, const char *name,
                      ProtobufCMessage *msg, const char **reterr_desc)
{
        enum xds_resource_type t = xds_resource_type_from_url(type_url);
        struct xds_resource_list *l;
        struct name_index *ix;
        bool indexed;
        char buf[1024];
        const char *own;
        char *dup;

        if (t < 0)
                return rfail(reterr_desc, -EINVAL, "unsupported resource type %s",
                             type_url ? type_url : "(null)");
        if (!msg || msg->descriptor != types[t].desc)
                return rfail(reterr_desc, -EINVAL, "resource is not a %s", types[t].desc->name);
        own = own_name(t, msg, buf, sizeof(buf));
        if (!own || !*own)
                return rfail(reterr_desc, -EINVAL, "%s resource without a name%s%s",
                             types[t].desc->short_name, name ? " given as " : "", name ? name : "");
        if (name && strcmp(name, own) != 0)
                return rfail(reterr_desc, -EINVAL,
                             "%s resource named \"%s\" is listed under \"%s\"",
                             types[t].desc->short_name, own, name);
        if (total(res) >= XDS_RESOURCES_MAX)
                return rfail(reterr_desc, -E2BIG, "more than %d resources", XDS_RESOURCES_MAX);
        l = xds_resources_list(res, t);
        ix = index_of(res, t);
        indexed = index_sync(ix, l, 1);
        if (list_find(ix, l, own) >= 0)
                return rfail(reterr_desc, -EINVAL, "duplicate %s resource \"%s\"",
                             types[t].desc->short_name, own);
        if (l->n == l->cap) {
                size_t cap = l->cap ? l->cap * 2 : 8;
                struct xds_resource *items = wp_realloc(l->items, cap * sizeof(*items));
                if (!items)
                        return rfail(reterr_desc, -ENOMEM, "out of memory");
                l->items = items;
                l->cap = cap;
        }
        dup = wp_strdup(own);
        if (!dup)
                return rfail(reterr_desc, -ENOMEM, "out of memory");
        l->items[l->n].name = dup;
        l->items[l->n].msg = msg;
        l->n++;
        if (indexed) {
                index_insert(ix, l, l->n - 1);
                ix->covered = l->n;
        }
        return 0;
}

int xds_resources_add_packed(struct xds_resources *res, const char *type_url, const char *name,
                             const uint8_t *data, size_t len, const char **reterr_desc)
{
        enum xds_resource_type t = xds_resource_type_from_url(type_url);
        ProtobufCMessage *msg;
        int r;

        if (t < 0)
                return rfail(reterr_desc, -EINVAL, "unsupported resource type %s",
                             type_url ? type_url : "(null)");
        r = xds_pb_unpack(types[t].desc, data, len, &msg, reterr_desc);
        if (r < 0)
                return r;
        r = xds_resources_add(res, type_url, name, msg, reterr_desc);
        if (r < 0)
                xds_pbjson_message_free(msg);
        return r;
}

ProtobufCMessage *xds_resources_find(const struct xds_resources *res, enum xds_resource_type t,
                                     const char *name)
{
        const struct xds_resource_list *l = list_const(res, t);
        ssize_t pos;

        if (!l || !name)
                return NULL;
        pos = list_find(index_of(res, t), l, name);
        return pos < 0 ? NULL : l->items[pos].msg;
}

/* Shape (a): "resources": {"<type URL>": {"<name>": {...}}}. */
static int load_map(struct xds_resources *res, struct json_object *rmap, unsigned flags,
                    const char **reterr_desc)
{
        json_object_object_foreach(rmap, url, byname)
        {
                enum xds_resource_type t = xds_resource_type_from_url(url);

                if (t < 0)
                        return rfail(reterr_desc, -EINVAL,
                                     "resources[\"%s\"]: unsupported resource type", url);
                if (json_object_get_type(byname) == json_type_null)
                        continue;
                if (!json_object_is_type(byname, json_type_object))
                        return rfail(reterr_desc, -EINVAL,
                                     "resources[\"%s\"]: expected an object of resources by name",
                                     url);
                json_object_object_foreach(byname, name, v)
                {
                        char prefix[768];
                        ProtobufCMessage *msg;
                        int r;

                        snprintf(prefix, sizeof(prefix), "resources[\"%s\"][\"%s\"]", url, name);
                        r = xds_pbjson_decode(types[t].desc, v, flags, prefix, &msg, reterr_desc);
                        if (r < 0)
                                return r;
                        r = xds_resources_add(res, url, name, msg, reterr_desc);
                        if (r < 0) {
                                char tmp[sizeof(reserr)];
                                xds_pbjson_message_free(msg);
                                snprintf(tmp, sizeof(tmp), "%s", reserr);
                                return rfail(reterr_desc, r, "%s: %s", prefix, tmp);
                        }
                }
        }
        return 0;
}

/* Shape (b): "resources": [{"@type": "<type URL>", ...}, ...]. */
static int load_list(struct xds_resources *res, struct json_object *arr, unsigned flags,
                     const char **reterr_desc)
{
        size_t n = json_object_array_length(arr);

        for (size_t i = 0; i < n; i++) {
                struct json_object *v = json_object_array_get_idx(arr, i), *t;
                Google__Protobuf__Any *any;
                ProtobufCMessage *msg;
                char prefix[64];
                int r;

                snprintf(prefix, sizeof(prefix), "resources[%zu]", i);
                if (!json_object_is_type(v, json_type_object))
                        return rfail(reterr_desc, -EINVAL, "%s: expected an object", prefix);
                if (!json_object_object_get_ex(v, "@type", &t))
                        return rfail(reterr_desc, -EINVAL, "%s: resource without \"@type\"",
                                     prefix);
                if (xds_resource_type_from_url(json_object_get_string(t)) < 0)
                        return rfail(reterr_desc, -EINVAL, "%s: unsupported resource type %s",
                                     prefix, json_object_get_string(t));
                /* Decode as an Any: this resolves "@type" exactly as for nested typed configs. */
                r = xds_pbjson_decode(&google__protobuf__any__descriptor, v, flags, prefix,
                                      (ProtobufCMessage **)&any, reterr_desc);
                if (r < 0)
                        return r;
                r = xds_any_unpack(any, NULL, &msg, reterr_desc);
                if (r < 0) {
                        xds_pbjson_message_free(&any->base);
                        return r;
                }
                r = xds_resources_add(res, any->type_url, NULL, msg, reterr_desc);
                xds_pbjson_message_free(&any->base);
                if (r < 0) {
                        char tmp[sizeof(reserr)];
                        xds_pbjson_message_free(msg);
                        snprintf(tmp, sizeof(tmp), "%s", reserr);
                        return rfail(reterr_desc, r, "%s: %s", prefix, tmp);
                }
        }
        return 0;
}

int xds_resources_from_json(struct json_object *root, unsigned flags, struct xds_resources **ret,
                            const char **reterr_desc)
{
        struct xds_resources *res;
        struct json_object *rs = NULL;
        int r;

        if (!json_object_is_type(root, json_type_object))
                return rfail(reterr_desc, -EINVAL, "expected a JSON object at the top level");
        r = xds_resources_new(&res);
        if (r < 0)
                return rfail(reterr_desc, r, "out of memory");

        json_object_object_foreach(root, key, val)
        {
                if (strcmp(key, "resources") == 0) {
                        rs = val;
                } else if (strcmp(key, "node_id") == 0) {
                        if (!json_object_is_type(val, json_type_string)) {
                                r = rfail(reterr_desc, -EINVAL, "node_id: expected a string");
                                goto err_free;
                        }
                        res->node_id = wp_strdup(json_object_get_string(val));
                        if (!res->node_id) {
                                r = rfail(reterr_desc, -ENOMEM, "out of memory");
                                goto err_free;
                        }
                } else if (!(flags & XDS_PBJSON_IGNORE_UNKNOWN)) {
                        r = rfail(reterr_desc, -EINVAL, "%s: unknown top-level field", key);
                        goto err_free;
                }
        }
        if (json_object_is_type(rs, json_type_object))
                r = load_map(res, rs, flags, reterr_desc);
        else if (json_object_is_type(rs, json_type_array))
                r = load_list(res, rs, flags, reterr_desc);
        else
                r = rfail(reterr_desc, -EINVAL,
                          "resources: expected an object (by type URL) or an array");
        if (r < 0)
                goto err_free;
        *ret = res;
        return 0;

err_free:
        xds_resources_free(res);
        return r;
}

int xds_resources_load_buffer(const char *text, size_t len, int format, unsigned flags,
                              struct xds_resources **ret, const char **reterr_desc)
{
        struct json_object *root = NULL;
        int r;

        if (format == XDS_FORMAT_AUTO) {
                size_t i = 0;
                while (i < len &&
                       (text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r'))
                        i++;
                format = i < len && (text[i] == '{' || text[i] == '[') ? XDS_FORMAT_JSON
                                                                       : XDS_FORMAT_YAML;
        }
        if (format == XDS_FORMAT_JSON)
                r = xds_json_parse(text, len, &root, reterr_desc);
        else
                r = xds_yaml_parse(text, len, &root, reterr_desc);
        if (r < 0)
                return r;
        r = xds_resources_from_json(root, flags, ret, reterr_desc);
        json_object_put(root);
        return r;
}

static bool has_suffix(const char *s, const char *suf)
{
        size_t n = strlen(s), m = strlen(suf);
        return n >= m && strcmp(s + n - m, suf) == 0;
}

int xds_resources_load_file(const char *path, struct xds_resources **ret, const char **reterr_desc)
{
        const char *desc = NULL;
        struct stat st;
        char *buf = NULL, tmp[sizeof(reserr)];
        size_t got = 0;
        int fd, r, format = XDS_FORMAT_AUTO;

        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return rfail(reterr_desc, -errno, "%s: %s", path, strerror(errno));
        if (fstat(fd, &st) < 0) {
                r = rfail(reterr_desc, -errno, "%s: %s", path, strerror(errno));
                goto out;
        }
        if (!S_ISREG(st.st_mode) || st.st_size > (off_t)XDS_PBJSON_MAX_TEXT) {
                r = rfail(reterr_desc, S_ISREG(st.st_mode) ? -E2BIG : -EINVAL,
                          "%s: not a regular file of at most %u bytes", path, XDS_PBJSON_MAX_TEXT);
                goto out;
        }
        buf = wp_malloc((size_t)st.st_size + 1);
        if (!buf) {
                r = rfail(reterr_desc, -ENOMEM, "out of memory");
                goto out;
        }
        while (got < (size_t)st.st_size) {
                ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        r = rfail(reterr_desc, -errno, "%s: %s", path, strerror(errno));
                        goto out;
                }
                if (n == 0)
                        break;
                got += (size_t)n;
        }
        if (has_suffix(path, ".yaml") || has_suffix(path, ".yml"))
                format = XDS_FORMAT_YAML;
        else if (has_suffix(path, ".json"))
                format = XDS_FORMAT_JSON;
        r = xds_resources_load_buffer(buf, got, format, 0, ret, &desc);
        if (r < 0) {
                snprintf(tmp, sizeof(tmp), "%s", desc ? desc : "error");
                rfail(reterr_desc, r, "%s: %s", path, tmp);
        }
out:
        wp_free(buf);
        close(fd);
        return r;
}

int xds_resources_to_json(const struct xds_resources *res, struct json_object **ret,
                          const char **reterr_desc)
{
        struct json_object *root = json_object_new_object(), *rs = json_object_new_object();
        int r = -ENOMEM;

        if (!root || !rs) {
                json_object_put(rs);
                rs = NULL;
                goto err_nomem;
        }
        if (json_object_object_add(root, "resources", rs) < 0) {
                json_object_put(rs);
                goto err_nomem;
        }
        if (res->node_id) {
                struct json_object *s = json_object_new_string(res->node_id);
                if (!s || json_object_object_add(root, "node_id", s) < 0) {
                        json_object_put(s);
                        goto err_nomem;
                }
        }
        for (int t = 0; t < _XDS_RES_TYPE_MAX; t++) {
                const struct xds_resource_list *l = list_const(res, (enum xds_resource_type)t);
                struct json_object *byname = json_object_new_object();

                if (!byname || json_object_object_add(rs, types[t].url, byname) < 0) {
                        json_object_put(byname);
                        goto err_nomem;
                }
                for (size_t i = 0; i < l->n; i++) {
                        struct json_object *v;
                        r = xds_pbjson_encode(l->items[i].msg, 0, &v, reterr_desc);
                        if (r < 0)
                                goto err;
                        if (json_object_object_add(byname, l->items[i].name, v) < 0) {
                                json_object_put(v);
                                goto err_nomem;
                        }
                }
        }
        *ret = root;
        return 0;
err_nomem:
        r = rfail(reterr_desc, -ENOMEM, "out of memory");
err:
        json_object_put(root);
        return r;
}
