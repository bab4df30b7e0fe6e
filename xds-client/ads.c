/*
 * ADS client state machine (see ads.h). Decisions a reader needs (tests in
 * tests/unit/xds-client/test_ads.c):
 *
 *   - State: per type, a hash table name -> {version, serialized resource, dependency names}.
 *     Each on_update gets a fresh xds_resources unpacked from these bytes (sorted by name, so
 *     the order is deterministic). A response is validated whole before anything changes, then
 *     applied with an undo journal; a NACK (ours or on_update's) replays the journal backwards.
 *   - Delta wildcard (CDS, LDS, WDS): the first request of the stream subscribes "*" explicitly.
 *     The xDS protocol also treats an empty first subscription as wildcard (legacy), and istiod's
 *     deltaWatchedResources accepts both, but only "*" stays wildcard when the same request
 *     carries initial_resource_versions, so it is the unambiguous choice. EDS/RDS are never
 *     requested with an empty subscription (that would be a wildcard): their first request waits
 *     until CDS/LDS named something.
 *   - Delta subscription changes (EDS names following CDS, RDS names following LDS) go in their
 *     own request without response_nonce: istiod treats a subscription change carried by an ACK
 *     as a protocol error. ACKs/NACKs carry only type_url, response_nonce and error_detail.
 *     When a name is unsubscribed its resource is dropped here at once (istiod does not send a
 *     removal for it), in the same journaled change as the CDS/LDS response that caused it.
 *     EDS/RDS resources the server sends for names we do not (or no longer) subscribe are
 *     ignored.
 *   - SotW: CDS, LDS and WDS responses replace the type's state; EDS/RDS responses update only
 *     the resources they carry. Every request carries the last accepted version_info and the
 *     last nonce received; a NACK keeps the old version_info.
 *   - Several responses of one type before next_request is called are answered by one request
 *     for the latest nonce (istiod considers the older nonces expired anyway).
 *   - Initial fetch: on_update is first called once CDS, LDS and WDS each had a response, and
 *     EDS (RDS) either holds every subscribed name or answered since the last names were added
 *     (istiod omits names it has nothing for: those count as empty).
 *   - Limits: max_resources per type (after applying the response), duplicate names in one
 *     response, Any type differing from the response type, a resource without a name or that
 *     does not unpack, an unsupported type URL: each NACKs the whole response naming the culprit.
 *   - -ENOMEM from xds_ads_on_message leaves the state as before the response, but the response
 *     is neither ACKed nor NACKed: the caller restarts the stream (xds_ads_reset).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "waypoint/base/alloc.h"
#include "xds-client/ads.h"

#define EXTRA_NACKS_MAX 8
#define STATUS_INVALID_ARGUMENT 3
#define DUP_NAMES_IN_MSG 8

static const char *const type_short[_XDS_RES_TYPE_MAX] = {
        [XDS_RES_LISTENER] = "Listener",
        [XDS_RES_CLUSTER] = "Cluster",
        [XDS_RES_CLA] = "ClusterLoadAssignment",
        [XDS_RES_ROUTE] = "RouteConfiguration",
        [XDS_RES_ADDRESS] = "Address",
};

/* request order on a new stream (Envoy's: CDS, EDS, LDS, RDS, then the rest) */
static const enum xds_resource_type type_order[_XDS_RES_TYPE_MAX] = {
        XDS_RES_CLUSTER, XDS_RES_CLA, XDS_RES_LISTENER, XDS_RES_ROUTE, XDS_RES_ADDRESS,
};

struct entry {
        struct entry *next; /* hash chain */
        uint32_t hash;
        char *name;
        char *version;
        uint8_t *data;
        size_t len;
        char **deps; /* Cluster: its EDS service name; Listener: RDS route names */
        size_t ndeps;
};

struct table {
        struct entry **b;
        size_t nb, n;
};

struct names {
        char **v; /* sorted, unique, owned */
        size_t n;
};

struct jrec {
        struct table *tab;
        struct entry *old, *new_;
};

struct typestate {
        struct table tab;
        bool wildcard;
        enum xds_resource_type child; /* type whose names our resources name, or -1 */
        struct names want;            /* EDS/RDS: names to subscribe (from the parent type) */
        struct names sent;            /* delta: names the server knows we subscribe */
        bool need_initial, requested; /* requested: a request went out on this stream */
        bool sub_dirty;
        bool received;       /* a response was accepted (gating) */
        bool resp_since_sub; /* a response was accepted since names were added */
        bool ack_pending, nack;
        char *nack_msg; /* owned; NULL with nack: generic text */
        char *nonce;    /* last nonce received on this stream */
        char *version;  /* SotW: last accepted version_info */
};

struct extra_nack {
        char *type_url, *nonce, *msg;
};

struct xds_ads {
        struct xds_ads_config cfg;
        char *node_id, *node_cluster, *ua_name, *ua_version;
        Envoy__Config__Core__V3__Node node;
        ProtobufCMessage *node_metadata;
        bool node_sent;
        bool synced;
        struct typestate ts[_XDS_RES_TYPE_MAX];
        struct extra_nack extra[EXTRA_NACKS_MAX];
        size_t nextra;
        struct jrec *j;
        size_t nj, jcap;
        uint8_t *out;
        struct xds_ads_stats stats;
};

/* ---- small helpers ---- */

static char *strfmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *strfmt(const char *fmt, ...)
{
        va_list ap;
        char *p;
        int n;

        va_start(ap, fmt);
        n = vsnprintf(NULL, 0, fmt, ap);
        va_end(ap);
        if (n < 0)
                return NULL;
        p = wp_malloc((size_t)n + 1);
        if (!p)
                return NULL;
        va_start(ap, fmt);
        vsnprintf(p, (size_t)n + 1, fmt, ap);
        va_end(ap);
        return p;
}

static uint32_t hash_str(const char *s)
{
        uint32_t h = 2166136261u;

        for (; *s; s++)
                h = (h ^ (uint8_t)*s) * 16777619u;
        return h;
}

static int cmp_str(const void *a, const void *b)
{
        return strcmp(*(char *const *)a, *(char *const *)b);
}

static void names_clear(struct names *n)
{
        for (size_t i = 0; i < n->n; i++)
                wp_free(n->v[i]);
        wp_free(n->v);
        n->v = NULL;
        n->n = 0;
}

static bool names_has(const struct names *n, const char *s)
{
        return n->n && bsearch(&s, n->v, n->n, sizeof(char *), cmp_str);
}

static int names_copy(const struct names *from, struct names *to)
{
        struct names r = {0};

        if (from->n) {
                r.v = wp_calloc(from->n, sizeof(char *));
                if (!r.v)
                        return -ENOMEM;
                for (; r.n < from->n; r.n++) {
                        r.v[r.n] = wp_strdup(from->v[r.n]);
                        if (!r.v[r.n]) {
                                names_clear(&r);
                                return -ENOMEM;
                        }
                }
        }
        *to = r;
        return 0;
}

static bool names_equal(const struct names *a, const struct names *b)
{
        if (a->n != b->n)
                return false;
        for (size_t i = 0; i < a->n; i++)
                if (strcmp(a->v[i], b->v[i]) != 0)
                        return false;
        return true;
}

/* ---- entries and tables ---- */

static void entry_free(struct entry *e)
{
        if (!e)
                return;
        for (size_t i = 0; i < e->ndeps; i++)
                wp_free(e->deps[i]);
        wp_free(e->deps);
        wp_free(e->name);
        wp_free(e->version);
        wp_free(e->data);
        wp_free(e);
}

static void table_clear(struct table *t)
{
        for (size_t i = 0; i < t->nb; i++) {
                struct entry *e = t->b[i], *next;

                for (; e; e = next) {
                        next = e->next;
                        entry_free(e);
                }
        }
        wp_free(t->b);
        *t = (struct table){0};
}

static struct entry *table_find(const struct table *t, const char *name)
{
        uint32_t h;

        if (!t->nb)
                return NULL;
        h = hash_str(name);
        for (struct entry *e = t->b[h % t->nb]; e; e = e->next)
                if (e->hash == h && strcmp(e->name, name) == 0)
                        return e;
        return NULL;
}

/* Makes room for n more entries without further allocation. */
static int table_reserve(struct table *t, size_t more)
{
        size_t want = t->n + more, nb;
        struct entry **b;

        if (want <= t->nb)
                return 0;
        nb = t->nb ? t->nb : 16;
        while (nb < want)
                nb *= 2;
        b = wp_calloc(nb, sizeof(*b));
        if (!b)
                return -ENOMEM;
        for (size_t i = 0; i < t->nb; i++) {
                struct entry *e = t->b[i], *next;

                for (; e; e = next) {
                        next = e->next;
                        e->next = b[e->hash % nb];
                        b[e->hash % nb] = e;
                }
        }
        wp_free(t->b);
        t->b = b;
        t->nb = nb;
        return 0;
}

/* Inserts e (room reserved), returning the entry of the same name it replaced, or NULL. */
static struct entry *table_put(struct table *t, struct entry *e)
{
        struct entry **pp = &t->b[e->hash % t->nb];

        for (; *pp; pp = &(*pp)->next) {
                struct entry *old = *pp;

                if (old->hash == e->hash && strcmp(old->name, e->name) == 0) {
                        e->next = old->next;
                        *pp = e;
                        old->next = NULL;
                        return old;
                }
        }
        e->next = NULL;
        *pp = e;
        t->n++;
        return NULL;
}

static struct entry *table_del(struct table *t, const char *name)
{
        uint32_t h;

        if (!t->nb)
                return NULL;
        h = hash_str(name);
        for (struct entry **pp = &t->b[h % t->nb]; *pp; pp = &(*pp)->next) {
                struct entry *e = *pp;

                if (e->hash == h && strcmp(e->name, name) == 0) {
                        *pp = e->next;
                        e->next = NULL;
                        t->n--;
                        return e;
                }
        }
        return NULL;
}

/* ---- journal ---- */

static int journal_reserve(struct xds_ads *a, size_t more)
{
        size_t want = a->nj + more;
        struct jrec *j;

        if (want <= a->jcap)
                return 0;
        j = wp_realloc(a->j, want * sizeof(*j));
        if (!j)
                return -ENOMEM;
        a->j = j;
        a->jcap = want;
        return 0;
}

static void journal_add(struct xds_ads *a, struct table *tab, struct entry *old, struct entry *new_)
{
        a->j[a->nj++] = (struct jrec){tab, old, new_};
}

static void journal_rollback(struct xds_ads *a)
{
        while (a->nj) {
                struct jrec *r = &a->j[--a->nj];

                if (r->new_)
                        entry_free(table_del(r->tab, r->new_->name));
                if (r->old)
                        table_put(r->tab, r->old);
        }
}

static void journal_commit(struct xds_ads *a)
{
        for (size_t i = 0; i < a->nj; i++)
                entry_free(a->j[i].old);
        a->nj = 0;
}

/* Removes (journaled) every entry of tab whose name is not in keep. */
static void table_keep_only(struct xds_ads *a, struct table *tab, char *const *keep, size_t nkeep)
{
        for (size_t i = 0; i < tab->nb; i++) {
                struct entry **pp = &tab->b[i];

                while (*pp) {
                        struct entry *e = *pp;

                        if (nkeep && bsearch(&e->name, keep, nkeep, sizeof(char *), cmp_str)) {
                                pp = &e->next;
                                continue;
                        }
                        *pp = e->next;
                        e->next = NULL;
                        tab->n--;
                        journal_add(a, tab, e, NULL);
                }
        }
}

/* ---- dependencies ---- */

static int deps_add(struct entry *e, const char *name)
{
        char **d;

        if (!name || !*name)
                return 0;
        for (size_t i = 0; i < e->ndeps; i++)
                if (strcmp(e->deps[i], name) == 0)
                        return 0;
        d = wp_realloc(e->deps, (e->ndeps + 1) * sizeof(char *));
        if (!d)
                return -ENOMEM;
        e->deps = d;
        d[e->ndeps] = wp_strdup(name);
        if (!d[e->ndeps])
                return -ENOMEM;
        e->ndeps++;
        return 0;
}

static int chain_rds_names(struct entry *e, const Envoy__Config__Listener__V3__FilterChain *fc)
{
        const ProtobufCMessageDescriptor *hcm_desc =
            &envoy__extensions__filters__network__http_connection_manager__v3__http_connection_manager__descriptor;
        char url[256];

        if (!fc)
                return 0;
        if (xds_type_url(hcm_desc, url, sizeof(url)) < 0)
                return 0;
        for (size_t i = 0; i < fc->n_filters; i++) {
                const Envoy__Config__Listener__V3__Filter *f = fc->filters[i];
                Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpConnectionManager
                    *hcm;
                ProtobufCMessage *m;
                const char *desc;
                int r;

                if (f->config_type_case !=
                        ENVOY__CONFIG__LISTENER__V3__FILTER__CONFIG_TYPE_TYPED_CONFIG ||
                    !f->typed_config || strcmp(f->typed_config->type_url, url) != 0)
                        continue;
                r = xds_any_unpack(f->typed_config, hcm_desc, &m, &desc);
                if (r == -ENOMEM)
                        return r;
                if (r < 0)
                        continue; /* the snapshot builder reports it */
                hcm = (void *)m;
                r = 0;
                if (hcm->route_specifier_case ==
                        ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_CONNECTION_MANAGER__ROUTE_SPECIFIER_RDS &&
                    hcm->rds)
                        r = deps_add(e, hcm->rds->route_config_name);
                xds_pbjson_message_free(m);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int entry_deps(struct entry *e, enum xds_resource_type t, const ProtobufCMessage *msg)
{
        if (t == XDS_RES_CLUSTER) {
                const Envoy__Config__Cluster__V3__Cluster *c = (const void *)msg;

                if (c->cluster_discovery_type_case !=
                        ENVOY__CONFIG__CLUSTER__V3__CLUSTER__CLUSTER_DISCOVERY_TYPE_TYPE ||
                    c->type != ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__EDS)
                        return 0;
                if (c->eds_cluster_config && c->eds_cluster_config->service_name &&
                    *c->eds_cluster_config->service_name)
                        return deps_add(e, c->eds_cluster_config->service_name);
                return deps_add(e, c->name);
        }
        if (t == XDS_RES_LISTENER) {
                const Envoy__Config__Listener__V3__Listener *l = (const void *)msg;
                int r;

                for (size_t i = 0; i < l->n_filter_chains; i++) {
                        r = chain_rds_names(e, l->filter_chains[i]);
                        if (r < 0)
                                return r;
                }
                return chain_rds_names(e, l->default_filter_chain);
        }
        return 0;
}

/* The sorted union of the dependency names of every entry of tab. */
static int collect_deps(const struct table *tab, struct names *ret)
{
        struct names r = {0};
        size_t cap = 0, k = 0;

        for (size_t i = 0; i < tab->nb; i++)
                for (struct entry *e = tab->b[i]; e; e = e->next)
                        cap += e->ndeps;
        if (cap) {
                r.v = wp_calloc(cap, sizeof(char *));
                if (!r.v)
                        return -ENOMEM;
                for (size_t i = 0; i < tab->nb; i++)
                        for (struct entry *e = tab->b[i]; e; e = e->next)
                                for (size_t d = 0; d < e->ndeps; d++)
                                        r.v[r.n++] = e->deps[d]; /* borrowed for now */
                qsort(r.v, r.n, sizeof(char *), cmp_str);
                for (size_t i = 0; i < r.n; i++)
                        if (k == 0 || strcmp(r.v[k - 1], r.v[i]) != 0)
                                r.v[k++] = r.v[i];
                r.n = k;
                for (k = 0; k < r.n; k++) {
                        r.v[k] = wp_strdup(r.v[k]);
                        if (!r.v[k]) {
                                for (size_t i = 0; i < k; i++)
                                        wp_free(r.v[i]);
                                wp_free(r.v);
                                return -ENOMEM;
                        }
                }
        }
        *ret = r;
        return 0;
}

/* ---- lifecycle ---- */

static int build_metadata(struct xds_ads *a)
{
        struct json_object *obj;
        const char *desc;
        int r = 0;

        if (!a->cfg.nmetadata)
                return 0;
        obj = json_object_new_object();
        if (!obj)
                return -ENOMEM;
        for (size_t i = 0; i < a->cfg.nmetadata && r == 0; i++) {
                const struct xds_node_metadata_entry *m = &a->cfg.metadata[i];
                struct json_object *v = NULL;

                if (!m->key || !m->value) {
                        r = -EINVAL;
                        break;
                }
                if (m->is_json)
                        r = xds_json_parse(m->value, strlen(m->value), &v, &desc);
                else if (!(v = json_object_new_string(m->value)))
                        r = -ENOMEM;
                if (r < 0)
                        break;
                if (json_object_object_add(obj, m->key, v) != 0) {
                        json_object_put(v);
                        r = -ENOMEM;
                }
        }
        if (r == 0)
                r = xds_pbjson_decode(&google__protobuf__struct__descriptor, obj, 0,
                                      "node.metadata", &a->node_metadata, &desc);
        json_object_put(obj);
        return r;
}

int xds_ads_new(const struct xds_ads_config *cfg, struct xds_ads **ret)
{
        struct xds_ads *a;
        int r = -ENOMEM;

        if (!cfg || !ret || !cfg->node_id || !*cfg->node_id || !cfg->on_update)
                return -EINVAL;
        a = wp_calloc(1, sizeof(*a));
        if (!a)
                return -ENOMEM;
        a->cfg = *cfg;
        a->cfg.metadata = NULL; /* borrowed only for the call */
        if (!a->cfg.max_resources)
                a->cfg.max_resources = XDS_RESOURCES_MAX;
        a->node_id = wp_strdup(cfg->node_id);
        a->node_cluster = wp_strdup(cfg->node_cluster ? cfg->node_cluster : "");
        a->ua_name = wp_strdup(cfg->user_agent_name ? cfg->user_agent_name : "waypoint");
        a->ua_version = wp_strdup(cfg->user_agent_version ? cfg->user_agent_version : "");
        if (!a->node_id || !a->node_cluster || !a->ua_name || !a->ua_version)
                goto err_free;
        a->cfg.metadata = cfg->metadata;
        r = build_metadata(a);
        a->cfg.metadata = NULL;
        a->cfg.nmetadata = 0;
        if (r < 0)
                goto err_free;

        envoy__config__core__v3__node__init(&a->node);
        a->node.id = a->node_id;
        a->node.cluster = a->node_cluster;
        a->node.user_agent_name = a->ua_name;
        a->node.metadata = (Google__Protobuf__Struct *)a->node_metadata;
        if (*a->ua_version) {
                a->node.user_agent_version_type_case =
                    ENVOY__CONFIG__CORE__V3__NODE__USER_AGENT_VERSION_TYPE_USER_AGENT_VERSION;
                a->node.user_agent_version = a->ua_version;
        }
        for (int t = 0; t < _XDS_RES_TYPE_MAX; t++)
                a->ts[t].child = -1;
        a->ts[XDS_RES_CLUSTER].wildcard = true;
        a->ts[XDS_RES_CLUSTER].child = XDS_RES_CLA;
        a->ts[XDS_RES_LISTENER].wildcard = true;
        a->ts[XDS_RES_LISTENER].child = XDS_RES_ROUTE;
        a->ts[XDS_RES_ADDRESS].wildcard = true;
        xds_ads_reset(a);
        *ret = a;
        return 0;

err_free:
        xds_ads_free(a);
        return r;
}

static void extra_clear(struct xds_ads *a)
{
        for (size_t i = 0; i < a->nextra; i++) {
                wp_free(a->extra[i].type_url);
                wp_free(a->extra[i].nonce);
                wp_free(a->extra[i].msg);
        }
        a->nextra = 0;
}

struct xds_ads *xds_ads_free(struct xds_ads *a)
{
        if (!a)
                return NULL;
        for (int t = 0; t < _XDS_RES_TYPE_MAX; t++) {
                struct typestate *ts = &a->ts[t];

                table_clear(&ts->tab);
                names_clear(&ts->want);
                names_clear(&ts->sent);
                wp_free(ts->nack_msg);
                wp_free(ts->nonce);
                wp_free(ts->version);
        }
        extra_clear(a);
        xds_pbjson_message_free(a->node_metadata);
        wp_free(a->node_id);
        wp_free(a->node_cluster);
        wp_free(a->ua_name);
        wp_free(a->ua_version);
        wp_free(a->j);
        wp_free(a->out);
        wp_free(a);
        return NULL;
}

void xds_ads_reset(struct xds_ads *a)
{
        a->node_sent = false;
        extra_clear(a);
        for (int t = 0; t < _XDS_RES_TYPE_MAX; t++) {
                struct typestate *ts = &a->ts[t];

                ts->need_initial = true;
                ts->requested = false;
                ts->sub_dirty = false;
                ts->ack_pending = ts->nack = false;
                wp_free(ts->nack_msg);
                ts->nack_msg = NULL;
                wp_free(ts->nonce);
                ts->nonce = NULL;
                names_clear(&ts->sent);
        }
}

bool xds_ads_synced(const struct xds_ads *a)
{
        return a->synced;
}

const struct xds_ads_stats *xds_ads_stats(const struct xds_ads *a)
{
        return &a->stats;
}

/* ---- responses ---- */

struct item {
        const char *name; /* NULL: SotW, the resource's own name */
        const char *version;
        const Google__Protobuf__Any *any;
};

struct response {
        const char *type_url;
        const char *nonce;
        const char *version; /* SotW version_info; NULL for delta */
        struct item *items;
        size_t nitems;
        const char **removed;
        size_t nremoved;
};

static void note_nack(struct xds_ads *a, const char *type_url, const char *msg)
{
        a->stats.nacks++;
        snprintf(a->stats.last_nack, sizeof(a->stats.last_nack), "%s: %s", type_url,
                 msg ? msg : "rejected");
}

/* NACK for a type we do not know (kept apart from the per-type state). */
static int nack_unknown_type(struct xds_ads *a, const struct response *rs)
{
        struct extra_nack x;

        x.type_url = wp_strdup(rs->type_url);
        x.nonce = wp_strdup(rs->nonce);
        x.msg = strfmt("unsupported type %s", rs->type_url);
        if (!x.type_url || !x.nonce || !x.msg) {
                wp_free(x.type_url);
                wp_free(x.nonce);
                wp_free(x.msg);
                return -ENOMEM;
        }
        if (a->nextra == EXTRA_NACKS_MAX) {
                /* a peer repeating this: keep the newest */
                wp_free(a->extra[0].type_url);
                wp_free(a->extra[0].nonce);
                wp_free(a->extra[0].msg);
                memmove(&a->extra[0], &a->extra[1], (EXTRA_NACKS_MAX - 1) * sizeof(x));
                a->nextra--;
        }
        a->extra[a->nextra++] = x;
        note_nack(a, rs->type_url, x.msg);
        return 0;
}

/* Records the pending NACK of ts (takes msg and nonce). */
static void set_nack(struct xds_ads *a, struct typestate *ts, const char *type_url, char *nonce,
                     char *msg)
{
        wp_free(ts->nonce);
        ts->nonce = nonce;
        wp_free(ts->nack_msg);
        ts->nack_msg = msg;
        ts->ack_pending = true;
        ts->nack = true;
        note_nack(a, type_url, msg);
}

static void free_staging(struct entry **st, size_t n)
{
        for (size_t i = 0; i < n; i++)
                entry_free(st[i]);
        wp_free(st);
}

static int cmp_entry_name(const void *a, const void *b)
{
        return strcmp((*(struct entry *const *)a)->name, (*(struct entry *const *)b)->name);
}

/*
 * Validates one resource and makes its entry. Returns 1 with *ret (NULL when the resource is to
 * be ignored), 0 with *retmsg (heap) when the response must be NACKed, or -ENOMEM.
 */
static int make_entry(struct xds_ads *a, enum xds_resource_type t, const struct response *rs,
                      size_t idx, struct xds_resources *scratch, struct entry **ret,
                      char **retmsg)
{
        const struct item *it = &rs->items[idx];
        struct xds_resource_list *l = xds_resources_list(scratch, t);
        struct entry *e = NULL;
        const char *desc = NULL;
        char label[64];
        int r;

        *ret = NULL;
        if (it->name && *it->name)
                snprintf(label, sizeof(label), "resource \"%.40s\"", it->name);
        else
                snprintf(label, sizeof(label), "resource %zu", idx);
        if (it->name && !*it->name) {
                *retmsg = strfmt("%s: resource without a name", label);
                return *retmsg ? 0 : -ENOMEM;
        }
        if (!it->any) {
                *retmsg = strfmt("%s has no body", label);
                return *retmsg ? 0 : -ENOMEM;
        }
        if (!it->any->type_url || strcmp(it->any->type_url, rs->type_url) != 0) {
                *retmsg = strfmt("%s has type %s in a %s response", label,
                                 it->any->type_url ? it->any->type_url : "(none)", rs->type_url);
                return *retmsg ? 0 : -ENOMEM;
        }
        r = xds_resources_add_packed(scratch, rs->type_url, it->name, it->any->value.data,
                                     it->any->value.len, &desc);
        if (r == -ENOMEM)
                return r;
        if (r < 0) {
                *retmsg = strfmt("%s: %s", label, desc ? desc : "invalid");
                return *retmsg ? 0 : -ENOMEM;
        }
        /* the scratch set holds just this one: its own name and decoded message */
        e = wp_calloc(1, sizeof(*e));
        if (!e)
                goto err_nomem;
        e->name = wp_strdup(l->items[0].name);
        e->version = wp_strdup(it->version ? it->version : "");
        e->len = it->any->value.len;
        e->data = wp_malloc(e->len ? e->len : 1);
        if (!e->name || !e->version || !e->data)
                goto err_nomem;
        if (e->len)
                memcpy(e->data, it->any->value.data, e->len);
        e->hash = hash_str(e->name);
        if (entry_deps(e, t, l->items[0].msg) < 0)
                goto err_nomem;
        /* EDS/RDS: only what we subscribe */
        if ((t == XDS_RES_CLA || t == XDS_RES_ROUTE) && !names_has(&a->ts[t].want, e->name)) {
                entry_free(e);
                e = NULL;
        }
        r = 1;
        goto out;
err_nomem:
        entry_free(e);
        e = NULL;
        r = -ENOMEM;
out:
        xds_pbjson_message_free(l->items[0].msg);
        wp_free(l->items[0].name);
        l->n = 0;
        *ret = e;
        return r;
}

static bool child_complete(const struct typestate *c)
{
        if (c->resp_since_sub)
                return true;
        for (size_t i = 0; i < c->want.n; i++)
                if (!table_find(&c->tab, c->want.v[i]))
                        return false;
        return true;
}

static bool initial_complete(const struct xds_ads *a)
{
        return a->ts[XDS_RES_CLUSTER].received && a->ts[XDS_RES_LISTENER].received &&
               a->ts[XDS_RES_ADDRESS].received && child_complete(&a->ts[XDS_RES_CLA]) &&
               child_complete(&a->ts[XDS_RES_ROUTE]);
}

/* A fresh resource set from the stored bytes, each type sorted by name. */
static int build_state(struct xds_ads *a, struct xds_resources **ret, char **retmsg)
{
        struct xds_resources *res;
        struct entry **v = NULL;
        size_t cap = 0;
        const char *desc = NULL;
        int r;

        r = xds_resources_new(&res);
        if (r < 0)
                return r;
        for (int t = 0; t < _XDS_RES_TYPE_MAX; t++) {
                struct table *tab = &a->ts[t].tab;
                size_t n = 0;

                if (tab->n > cap) {
                        struct entry **nv = wp_realloc(v, tab->n * sizeof(*v));

                        if (!nv) {
                                r = -ENOMEM;
                                goto err;
                        }
                        v = nv;
                        cap = tab->n;
                }
                for (size_t i = 0; i < tab->nb; i++)
                        for (struct entry *e = tab->b[i]; e; e = e->next)
                                v[n++] = e;
                if (n > 1)
                        qsort(v, n, sizeof(*v), cmp_entry_name);
                for (size_t i = 0; i < n; i++) {
                        r = xds_resources_add_packed(res, xds_resource_type_url(t), v[i]->name,
                                                     v[i]->data, v[i]->len, &desc);
                        if (r < 0) {
                                if (r != -ENOMEM) {
                                        *retmsg = strfmt("%s", desc ? desc : "invalid state");
                                        if (!*retmsg)
                                                r = -ENOMEM;
                                }
                                goto err;
                        }
                }
        }
        wp_free(v);
        *ret = res;
        return 0;
err:
        wp_free(v);
        xds_resources_free(res);
        return r;
}

static int process(struct xds_ads *a, const struct response *rs)
{
        enum xds_resource_type t = xds_resource_type_from_url(rs->type_url);
        struct typestate *ts, *cs = NULL;
        struct xds_resources *scratch = NULL, *state = NULL;
        struct entry **staging = NULL;
        struct names newwant = {0};
        size_t nstaging = 0;
        char *nonce = NULL, *version = NULL, *msg = NULL;
        bool saved_received, saved_rss, want_changed = false, added = false;
        int r;

        a->stats.responses++;
        if (t < 0)
                return nack_unknown_type(a, rs);
        ts = &a->ts[t];
        if (ts->child >= 0)
                cs = &a->ts[ts->child];
        nonce = wp_strdup(rs->nonce ? rs->nonce : "");
        if (rs->version)
                version = wp_strdup(rs->version);
        if (!nonce || (rs->version && !version))
                goto err_nomem;

        /* 1. validate everything, building the new entries */
        if (rs->nitems) {
                staging = wp_calloc(rs->nitems, sizeof(*staging));
                if (!staging)
                        goto err_nomem;
        }
        r = xds_resources_new(&scratch);
        if (r < 0)
                goto err_nomem;
        for (size_t i = 0; i < rs->nitems; i++) {
                struct entry *e;

                r = make_entry(a, t, rs, i, scratch, &e, &msg);
                if (r < 0)
                        goto err_nomem;
                if (r == 0)
                        goto nack;
                if (e)
                        staging[nstaging++] = e;
        }
        scratch = xds_resources_free(scratch);
        if (nstaging > 1) {
                size_t ndup = 0, len = 0;
                char buf[512];

                qsort(staging, nstaging, sizeof(*staging), cmp_entry_name);
                buf[0] = 0;
                for (size_t i = 1; i < nstaging; i++) {
                        if (strcmp(staging[i - 1]->name, staging[i]->name) != 0)
                                continue;
                        if (i >= 2 && strcmp(staging[i - 2]->name, staging[i]->name) == 0)
                                continue;
                        if (ndup++ < DUP_NAMES_IN_MSG && len < sizeof(buf))
                                len += (size_t)snprintf(buf + len, sizeof(buf) - len, "%s\"%s\"",
                                                        ndup > 1 ? ", " : "",
                                                        staging[i]->name);
                }
                if (ndup) {
                        msg = strfmt("duplicate resource names in one response: %s%s", buf,
                                     ndup > DUP_NAMES_IN_MSG ? ", ..." : "");
                        if (!msg)
                                goto err_nomem;
                        goto nack;
                }
        }

        /* 2. apply, journaled */
        if (table_reserve(&ts->tab, nstaging) < 0 ||
            journal_reserve(a, nstaging + rs->nremoved + ts->tab.n + (cs ? cs->tab.n : 0)) < 0)
                goto err_nomem;
        for (size_t i = 0; i < rs->nremoved; i++) {
                struct entry *old = table_del(&ts->tab, rs->removed[i]);

                if (old)
                        journal_add(a, &ts->tab, old, NULL);
        }
        if (rs->version && ts->wildcard) {
                /* SotW wildcard types: the response is the whole state */
                char **keep = NULL;

                if (nstaging) {
                        keep = wp_calloc(nstaging, sizeof(char *));
                        if (!keep)
                                goto err_rollback_nomem;
                        for (size_t i = 0; i < nstaging; i++)
                                keep[i] = staging[i]->name; /* sorted */
                }
                table_keep_only(a, &ts->tab, keep, nstaging);
                wp_free(keep);
        }
        for (size_t i = 0; i < nstaging; i++) {
                struct entry *old = table_put(&ts->tab, staging[i]);

                journal_add(a, &ts->tab, old, staging[i]);
                staging[i] = NULL;
        }
        if (cs) {
                if (collect_deps(&ts->tab, &newwant) < 0)
                        goto err_rollback_nomem;
                want_changed = !names_equal(&newwant, &cs->want);
                for (size_t i = 0; want_changed && i < newwant.n && !added; i++)
                        if (!names_has(&cs->want, newwant.v[i]))
                                added = true;
                if (want_changed)
                        table_keep_only(a, &cs->tab, newwant.v, newwant.n);
        }
        if (ts->tab.n > a->cfg.max_resources) {
                msg = strfmt("too many %s resources: %zu, limit %zu", type_short[t], ts->tab.n,
                             a->cfg.max_resources);
                journal_rollback(a);
                names_clear(&newwant);
                if (!msg)
                        goto err_nomem;
                goto nack;
        }

        /* 3. offer the state */
        saved_received = ts->received;
        saved_rss = ts->resp_since_sub;
        ts->received = true;
        ts->resp_since_sub = true;
        {
                /* initial_complete() must see the child's new names: swap them in provisionally */
                struct names oldwant = {0};
                bool old_rss = false, complete;

                if (cs && want_changed) {
                        oldwant = cs->want;
                        cs->want = newwant;
                        old_rss = cs->resp_since_sub;
                        if (added)
                                cs->resp_since_sub = false;
                }
                complete = a->synced || initial_complete(a);
                if (cs && want_changed) {
                        newwant = cs->want;
                        cs->want = oldwant;
                        cs->resp_since_sub = old_rss;
                }
                if (complete) {
                        r = build_state(a, &state, &msg);
                        if (r < 0) {
                                ts->received = saved_received;
                                ts->resp_since_sub = saved_rss;
                                journal_rollback(a);
                                names_clear(&newwant);
                                if (r == -ENOMEM)
                                        goto err_nomem;
                                goto nack;
                        }
                        r = a->cfg.on_update(state, &msg, a->cfg.user);
                        if (r < 0) {
                                /* the server has answered this type even though we rejected
                                 * the answer: like Envoy, a NACK ends the initial fetch of the
                                 * type (its state stays what it was), so later updates of
                                 * other types are not held back forever */
                                ts->resp_since_sub = saved_rss;
                                journal_rollback(a);
                                names_clear(&newwant);
                                if (!msg)
                                        msg = strfmt("update rejected: %s", strerror(-r));
                                goto nack; /* a NULL msg is fine: generic text */
                        }
                        a->synced = true;
                }
        }

        /* 4. commit */
        journal_commit(a);
        if (cs && want_changed) {
                names_clear(&cs->want);
                cs->want = newwant;
                cs->sub_dirty = true;
                if (added)
                        cs->resp_since_sub = false;
        } else {
                names_clear(&newwant);
        }
        wp_free(ts->nonce);
        ts->nonce = nonce;
        if (version) {
                wp_free(ts->version);
                ts->version = version;
        }
        wp_free(ts->nack_msg);
        ts->nack_msg = NULL;
        ts->nack = false;
        ts->ack_pending = true;
        a->stats.acks++;
        for (int i = 0; i < _XDS_RES_TYPE_MAX; i++)
                a->stats.resources[i] = a->ts[i].tab.n;
        free_staging(staging, nstaging);
        return 0;

nack:
        xds_resources_free(scratch);
        free_staging(staging, nstaging);
        wp_free(version);
        set_nack(a, ts, rs->type_url, nonce, msg);
        for (int i = 0; i < _XDS_RES_TYPE_MAX; i++)
                a->stats.resources[i] = a->ts[i].tab.n;
        return 0;

err_rollback_nomem:
        journal_rollback(a);
err_nomem:
        names_clear(&newwant);
        xds_resources_free(scratch);
        free_staging(staging, nstaging);
        wp_free(nonce);
        wp_free(version);
        wp_free(msg);
        return -ENOMEM;
}

int xds_ads_on_message(struct xds_ads *a, const uint8_t *body, size_t len)
{
        struct response rs = {0};
        ProtobufCMessage *m;
        int r;

        if (!a || (len && !body))
                return -EINVAL;
        if (a->cfg.delta) {
                Envoy__Service__Discovery__V3__DeltaDiscoveryResponse *d;
                size_t k = 0;

                m = protobuf_c_message_unpack(
                    &envoy__service__discovery__v3__delta_discovery_response__descriptor,
                    &xds_pb_allocator, len, body);
                if (!m)
                        return -EINVAL;
                d = (void *)m;
                rs.type_url = d->type_url;
                rs.nonce = d->nonce;
                rs.nitems = d->n_resources;
                rs.nremoved = d->n_removed_resources + d->n_removed_resource_names;
                rs.items = rs.nitems ? wp_calloc(rs.nitems, sizeof(*rs.items)) : NULL;
                rs.removed = rs.nremoved ? wp_calloc(rs.nremoved, sizeof(char *)) : NULL;
                if ((rs.nitems && !rs.items) || (rs.nremoved && !rs.removed)) {
                        r = -ENOMEM;
                        goto out;
                }
                for (size_t i = 0; i < d->n_resources; i++) {
                        const Envoy__Service__Discovery__V3__Resource *x = d->resources[i];

                        rs.items[i].name = x->name;
                        if (!*x->name && x->resource_name)
                                rs.items[i].name = x->resource_name->name;
                        rs.items[i].version = x->version;
                        rs.items[i].any = x->resource;
                }
                for (size_t i = 0; i < d->n_removed_resources; i++)
                        rs.removed[k++] = d->removed_resources[i];
                for (size_t i = 0; i < d->n_removed_resource_names; i++)
                        rs.removed[k++] = d->removed_resource_names[i]->name;
        } else {
                Envoy__Service__Discovery__V3__DiscoveryResponse *d;

                m = protobuf_c_message_unpack(
                    &envoy__service__discovery__v3__discovery_response__descriptor,
                    &xds_pb_allocator, len, body);
                if (!m)
                        return -EINVAL;
                d = (void *)m;
                rs.type_url = d->type_url;
                rs.nonce = d->nonce;
                rs.version = d->version_info;
                rs.nitems = d->n_resources;
                rs.items = rs.nitems ? wp_calloc(rs.nitems, sizeof(*rs.items)) : NULL;
                if (rs.nitems && !rs.items) {
                        r = -ENOMEM;
                        goto out;
                }
                for (size_t i = 0; i < d->n_resources; i++) {
                        rs.items[i].version = d->version_info;
                        rs.items[i].any = d->resources[i];
                }
        }
        r = process(a, &rs);
out:
        wp_free(rs.items);
        wp_free(rs.removed);
        xds_pbjson_message_free(m);
        return r;
}

/* ---- requests ---- */

enum req_kind { REQ_INITIAL, REQ_ACK, REQ_SUB };

static int pack_out(struct xds_ads *a, const ProtobufCMessage *msg)
{
        size_t n = protobuf_c_message_get_packed_size(msg);

        a->out = wp_malloc(n ? n : 1);
        if (!a->out)
                return -ENOMEM;
        protobuf_c_message_pack(msg, a->out);
        a->node_sent = true;
        return (int)n;
}

/* want \ have (sorted inputs), as borrowed pointers. */
static int names_diff(const struct names *want, const struct names *have, char ***ret, size_t *retn)
{
        char **v = NULL;
        size_t n = 0;

        *ret = NULL;
        *retn = 0;
        if (!want->n)
                return 0;
        v = wp_calloc(want->n, sizeof(char *));
        if (!v)
                return -ENOMEM;
        for (size_t i = 0; i < want->n; i++)
                if (!names_has(have, want->v[i]))
                        v[n++] = want->v[i];
        if (!n) {
                wp_free(v);
                return 0;
        }
        *ret = v;
        *retn = n;
        return 0;
}

static ssize_t emit_delta(struct xds_ads *a, enum xds_resource_type t, enum req_kind kind)
{
        struct typestate *ts = &a->ts[t];
        Envoy__Service__Discovery__V3__DeltaDiscoveryRequest req =
            ENVOY__SERVICE__DISCOVERY__V3__DELTA_DISCOVERY_REQUEST__INIT;
        Envoy__Service__Discovery__V3__DeltaDiscoveryRequest__InitialResourceVersionsEntry *iv = NULL;
        Google__Rpc__Status st = GOOGLE__RPC__STATUS__INIT;
        static char *star[] = {"*"};
        struct names newsent = {0};
        char **sub = NULL, **unsub = NULL;
        size_t nsub = 0, nunsub = 0;
        int r = -ENOMEM;

        req.type_url = (char *)xds_resource_type_url(t);
        if (!a->node_sent)
                req.node = &a->node;
        if (kind == REQ_ACK) {
                req.response_nonce = ts->nonce ? ts->nonce : "";
                if (ts->nack) {
                        st.code = STATUS_INVALID_ARGUMENT;
                        st.message = ts->nack_msg ? ts->nack_msg : "rejected";
                        req.error_detail = &st;
                }
        } else {
                if (names_copy(&ts->want, &newsent) < 0)
                        goto out;
                if (kind == REQ_INITIAL && ts->wildcard) {
                        req.resource_names_subscribe = star;
                        req.n_resource_names_subscribe = 1;
                } else {
                        if (names_diff(&ts->want, &ts->sent, &sub, &nsub) < 0 ||
                            names_diff(&ts->sent, &ts->want, &unsub, &nunsub) < 0)
                                goto out;
                        req.resource_names_subscribe = sub;
                        req.n_resource_names_subscribe = nsub;
                        req.resource_names_unsubscribe = unsub;
                        req.n_resource_names_unsubscribe = nunsub;
                }
                if (kind == REQ_INITIAL && ts->tab.n) {
                        size_t k = 0;

                        iv = wp_calloc(ts->tab.n, sizeof(*iv));
                        req.initial_resource_versions = wp_calloc(ts->tab.n, sizeof(void *));
                        if (!iv || !req.initial_resource_versions)
                                goto out;
                        for (size_t i = 0; i < ts->tab.nb; i++)
                                for (struct entry *e = ts->tab.b[i]; e; e = e->next) {
                                        envoy__service__discovery__v3__delta_discovery_request__initial_resource_versions_entry__init(
                                            &iv[k]);
                                        iv[k].key = e->name;
                                        iv[k].value = e->version;
                                        req.initial_resource_versions[k] = &iv[k];
                                        k++;
                                }
                        req.n_initial_resource_versions = k;
                }
        }
        r = pack_out(a, &req.base);
        if (r < 0)
                goto out;
        if (kind == REQ_ACK) {
                ts->ack_pending = ts->nack = false;
                wp_free(ts->nack_msg);
                ts->nack_msg = NULL;
        } else {
                names_clear(&ts->sent);
                ts->sent = newsent;
                newsent = (struct names){0};
                ts->requested = true;
                ts->sub_dirty = false;
                if (kind == REQ_INITIAL)
                        ts->need_initial = false;
        }
out:
        names_clear(&newsent);
        wp_free(sub);
        wp_free(unsub);
        wp_free(iv);
        wp_free(req.initial_resource_versions);
        return r;
}

static ssize_t emit_sotw(struct xds_ads *a, enum xds_resource_type t, enum req_kind kind)
{
        struct typestate *ts = &a->ts[t];
        Envoy__Service__Discovery__V3__DiscoveryRequest req =
            ENVOY__SERVICE__DISCOVERY__V3__DISCOVERY_REQUEST__INIT;
        Google__Rpc__Status st = GOOGLE__RPC__STATUS__INIT;
        struct names newsent = {0};
        int r = -ENOMEM;

        req.type_url = (char *)xds_resource_type_url(t);
        if (!a->node_sent)
                req.node = &a->node;
        req.version_info = ts->version ? ts->version : "";
        req.response_nonce = ts->nonce ? ts->nonce : "";
        if (!ts->wildcard) {
                if (names_copy(&ts->want, &newsent) < 0)
                        goto out;
                req.resource_names = ts->want.v;
                req.n_resource_names = ts->want.n;
        }
        if (kind == REQ_ACK && ts->nack) {
                st.code = STATUS_INVALID_ARGUMENT;
                st.message = ts->nack_msg ? ts->nack_msg : "rejected";
                req.error_detail = &st;
        }
        r = pack_out(a, &req.base);
        if (r < 0)
                goto out;
        if (kind == REQ_ACK) {
                ts->ack_pending = ts->nack = false;
                wp_free(ts->nack_msg);
                ts->nack_msg = NULL;
        }
        names_clear(&ts->sent);
        ts->sent = newsent;
        newsent = (struct names){0};
        ts->requested = true;
        ts->sub_dirty = false;
        ts->need_initial = false;
out:
        names_clear(&newsent);
        return r;
}

static ssize_t emit_extra(struct xds_ads *a)
{
        struct extra_nack *x = &a->extra[0];
        Google__Rpc__Status st = GOOGLE__RPC__STATUS__INIT;
        int r;

        st.code = STATUS_INVALID_ARGUMENT;
        st.message = x->msg;
        if (a->cfg.delta) {
                Envoy__Service__Discovery__V3__DeltaDiscoveryRequest req =
                    ENVOY__SERVICE__DISCOVERY__V3__DELTA_DISCOVERY_REQUEST__INIT;

                req.type_url = x->type_url;
                req.response_nonce = x->nonce;
                req.error_detail = &st;
                if (!a->node_sent)
                        req.node = &a->node;
                r = pack_out(a, &req.base);
        } else {
                Envoy__Service__Discovery__V3__DiscoveryRequest req =
                    ENVOY__SERVICE__DISCOVERY__V3__DISCOVERY_REQUEST__INIT;

                req.type_url = x->type_url;
                req.response_nonce = x->nonce;
                req.error_detail = &st;
                if (!a->node_sent)
                        req.node = &a->node;
                r = pack_out(a, &req.base);
        }
        if (r < 0)
                return r;
        wp_free(x->type_url);
        wp_free(x->nonce);
        wp_free(x->msg);
        memmove(&a->extra[0], &a->extra[1], (a->nextra - 1) * sizeof(*x));
        a->nextra--;
        return r;
}

ssize_t xds_ads_next_request(struct xds_ads *a, const uint8_t **ret_body)
{
        ssize_t (*emit)(struct xds_ads *, enum xds_resource_type, enum req_kind) =
            a->cfg.delta ? emit_delta : emit_sotw;
        ssize_t r = 0;

        wp_free(a->out);
        a->out = NULL;
        for (int k = 0; k < _XDS_RES_TYPE_MAX && !a->out; k++) {
                enum xds_resource_type t = type_order[k];
                struct typestate *ts = &a->ts[t];

                if (!ts->need_initial)
                        continue;
                /* an empty EDS/RDS subscription would read as wildcard: wait for names */
                if (!ts->wildcard && !ts->want.n) {
                        ts->need_initial = false;
                        continue;
                }
                r = emit(a, t, REQ_INITIAL);
                if (r < 0)
                        return r;
        }
        for (int k = 0; k < _XDS_RES_TYPE_MAX && !a->out; k++) {
                enum xds_resource_type t = type_order[k];

                if (a->ts[t].ack_pending) {
                        r = emit(a, t, REQ_ACK);
                        if (r < 0)
                                return r;
                }
        }
        for (int k = 0; k < _XDS_RES_TYPE_MAX && !a->out; k++) {
                enum xds_resource_type t = type_order[k];
                struct typestate *ts = &a->ts[t];

                if (!ts->sub_dirty)
                        continue;
                if (names_equal(&ts->want, &ts->sent) || (!ts->requested && !ts->want.n)) {
                        ts->sub_dirty = false;
                        continue;
                }
                r = emit(a, t, REQ_SUB);
                if (r < 0)
                        return r;
        }
        if (!a->out && a->nextra) {
                r = emit_extra(a);
                if (r < 0)
                        return r;
        }
        if (!a->out)
                return 0;
        *ret_body = a->out;
        return r;
}
