#include "waypoint/wds.h"

#include <errno.h>
#include <netinet/in.h>
#include <string.h>

#include "envoy/config/cluster/v3/cluster.pb-c.h"
#include "waypoint/base/alloc.h"
#include "xds-client/resources.h"

struct slot {
        uint8_t len; /* 4 or 16; 0 = empty */
        uint8_t ip[16];
        const Istio__Workload__Workload *w;
};

struct wp_wds {
        struct slot *slots;
        size_t cap; /* power of two */
};

static uint64_t hash_ip(const uint8_t *ip, size_t len)
{
        uint64_t h = 1469598103934665603ULL;

        for (size_t i = 0; i < len; i++)
                h = (h ^ ip[i]) * 1099511628211ULL;
        return h;
}

static struct slot *find(const struct wp_wds *w, const uint8_t *ip, size_t len)
{
        size_t i = hash_ip(ip, len) & (w->cap - 1);

        for (;;) {
                struct slot *s = &w->slots[i];

                if (!s->len || (s->len == len && !memcmp(s->ip, ip, len)))
                        return s;
                i = (i + 1) & (w->cap - 1);
        }
}

int wp_wds_build(const struct xds_resources *res, struct wp_wds **ret)
{
        const struct xds_resource_list *l = &res->addresses;
        struct wp_wds *w;
        size_t n = 0;

        *ret = NULL;
        for (size_t i = 0; i < l->n; i++) {
                const Istio__Workload__Address *a = (const Istio__Workload__Address *)l->items[i].msg;

                if (a->type_case == ISTIO__WORKLOAD__ADDRESS__TYPE_WORKLOAD && a->workload)
                        n += a->workload->n_addresses;
        }
        if (!n)
                return 0;
        w = wp_calloc(1, sizeof(*w));
        if (!w)
                return -ENOMEM;
        for (w->cap = 16; w->cap < 2 * n; w->cap *= 2)
                ;
        w->slots = wp_calloc(w->cap, sizeof(*w->slots));
        if (!w->slots) {
                wp_free(w);
                return -ENOMEM;
        }
        for (size_t i = 0; i < l->n; i++) {
                const Istio__Workload__Address *a = (const Istio__Workload__Address *)l->items[i].msg;

                if (a->type_case != ISTIO__WORKLOAD__ADDRESS__TYPE_WORKLOAD || !a->workload)
                        continue;
                for (size_t j = 0; j < a->workload->n_addresses; j++) {
                        const ProtobufCBinaryData *ip = &a->workload->addresses[j];
                        struct slot *s;

                        if (ip->len != 4 && ip->len != 16)
                                continue; /* malformed address bytes: not indexed */
                        s = find(w, ip->data, ip->len);
                        if (!s->len) {
                                s->len = (uint8_t)ip->len;
                                memcpy(s->ip, ip->data, ip->len);
                        }
                        s->w = a->workload;
                }
        }
        *ret = w;
        return 0;
}

struct wp_wds *wp_wds_free(struct wp_wds *w)
{
        if (w) {
                wp_free(w->slots);
                wp_free(w);
        }
        return NULL;
}

const Istio__Workload__Workload *wp_wds_lookup(const struct wp_wds *w, const struct sockaddr *addr)
{
        const uint8_t *ip;
        size_t len;
        struct slot *s;

        if (!w)
                return NULL;
        if (addr->sa_family == AF_INET) {
                ip = (const uint8_t *)&((const struct sockaddr_in *)addr)->sin_addr;
                len = 4;
        } else if (addr->sa_family == AF_INET6) {
                const struct in6_addr *a6 = &((const struct sockaddr_in6 *)addr)->sin6_addr;

                if (IN6_IS_ADDR_V4MAPPED(a6)) {
                        ip = a6->s6_addr + 12;
                        len = 4;
                } else {
                        ip = a6->s6_addr;
                        len = 16;
                }
        } else {
                return NULL;
        }
        s = find(w, ip, len);
        return s->len ? s->w : NULL;
}

static const Google__Protobuf__Value *field(const Google__Protobuf__Struct *st, const char *key)
{
        if (!st)
                return NULL;
        for (size_t i = 0; i < st->n_fields; i++)
                if (st->fields[i]->key && !strcmp(st->fields[i]->key, key))
                        return st->fields[i]->value;
        return NULL;
}

static const char *string_field(const Google__Protobuf__Struct *st, const char *key)
{
        const Google__Protobuf__Value *v = field(st, key);

        return v && v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE ? v->string_value
                                                                               : NULL;
}

void wp_cluster_service_meta(const struct xds_resources *res, const char *cluster,
                             struct wp_service_meta *ret)
{
        const Envoy__Config__Cluster__V3__Cluster *c;
        const Google__Protobuf__Struct *istio = NULL;
        const Google__Protobuf__Value *svcs;

        memset(ret, 0, sizeof(*ret));
        c = (const Envoy__Config__Cluster__V3__Cluster *)xds_resources_find(res, XDS_RES_CLUSTER,
                                                                            cluster);
        if (!c || !c->metadata)
                return;
        for (size_t i = 0; i < c->metadata->n_filter_metadata; i++)
                if (!strcmp(c->metadata->filter_metadata[i]->key, "istio"))
                        istio = c->metadata->filter_metadata[i]->value;
        svcs = field(istio, "services");
        if (!svcs || svcs->kind_case != GOOGLE__PROTOBUF__VALUE__KIND_LIST_VALUE ||
            !svcs->list_value->n_values ||
            svcs->list_value->values[0]->kind_case != GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE)
                return;
        ret->host = string_field(svcs->list_value->values[0]->struct_value, "host");
        ret->name = string_field(svcs->list_value->values[0]->struct_value, "name");
        ret->namespace_ = string_field(svcs->list_value->values[0]->struct_value, "namespace");
}
