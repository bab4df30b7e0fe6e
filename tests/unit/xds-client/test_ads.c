/*
 * The ADS state machine fed protobuf responses built here from the bookinfo fixture
 * (tests/data/istiod-waypoint-bookinfo.json) and from hand-made resources; the requests it
 * yields are decoded and checked field by field. Delta and SotW.
 */
#include <errno.h>
#include <stdlib.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "xds-client/ads.h"

#define NODE_ID "waypoint~10.0.0.5~bookinfo-waypoint-5d9c7b6f4-q8w2e.bookinfo~bookinfo.svc.cluster.local"
#define HCM_URL "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

typedef Envoy__Service__Discovery__V3__DeltaDiscoveryRequest DReq;
typedef Envoy__Service__Discovery__V3__DiscoveryRequest SReq;

static struct xds_resources *fx;
static bool failalloc_mode;

/* ---- on_update recorder ---- */

struct rec {
        unsigned updates;
        struct xds_resources *last;
        bool fail_next;
};

static int on_update(struct xds_resources *res, char **reterr_desc, void *user)
{
        struct rec *r = user;

        if (r->fail_next) {
                r->fail_next = false;
                xds_resources_free(res);
                *reterr_desc = wp_strdup("rejected by test");
                return -EINVAL;
        }
        r->updates++;
        xds_resources_free(r->last);
        r->last = res;
        return 0;
}

static const struct xds_node_metadata_entry meta[] = {
        {"NAMESPACE", "bookinfo", false},
        {"LABELS", "{\"gateway.networking.k8s.io/gateway-name\": \"bookinfo-waypoint\"}", true},
};

static struct xds_ads *ads_new(struct rec *r, bool delta, size_t max_resources)
{
        struct xds_ads_config cfg = {
                .delta = delta,
                .node_id = NODE_ID,
                .node_cluster = "bookinfo-waypoint.bookinfo",
                .metadata = meta,
                .nmetadata = 2,
                .user_agent_name = "waypoint",
                .user_agent_version = "0.1",
                .max_resources = max_resources,
                .on_update = on_update,
                .user = r,
        };
        struct xds_ads *a = NULL;

        memset(r, 0, sizeof(*r));
        if (xds_ads_new(&cfg, &a) < 0)
                return NULL;
        return a;
}

static void rec_done(struct rec *r)
{
        r->last = xds_resources_free(r->last);
}

/* ---- building responses ---- */

struct ritem {
        char name[200];
        char version[32];
        char type_url[128];
        uint8_t *data;
        size_t len;
};

struct items {
        struct ritem v[64];
        size_t n;
};

static void items_add_msg(struct items *it, const char *name, const char *version,
                          const char *type_url, const ProtobufCMessage *m)
{
        struct ritem *r = &it->v[it->n++];

        snprintf(r->name, sizeof(r->name), "%s", name);
        snprintf(r->version, sizeof(r->version), "%s", version);
        snprintf(r->type_url, sizeof(r->type_url), "%s", type_url);
        r->len = protobuf_c_message_get_packed_size(m);
        r->data = malloc(r->len + 1);
        protobuf_c_message_pack(m, r->data);
}

/* every fixture resource of type t */
static void items_fixture(struct items *it, enum xds_resource_type t, const char *version)
{
        struct xds_resource_list *l = xds_resources_list(fx, t);

        for (size_t i = 0; i < l->n; i++)
                items_add_msg(it, l->items[i].name, version, xds_resource_type_url(t),
                              l->items[i].msg);
}

static void items_free(struct items *it)
{
        for (size_t i = 0; i < it->n; i++)
                free(it->v[i].data);
        it->n = 0;
}

static size_t delta_resp(uint8_t **out, const char *type_url, const char *nonce,
                         const struct items *it, const char **removed, size_t nremoved)
{
        Envoy__Service__Discovery__V3__DeltaDiscoveryResponse m =
            ENVOY__SERVICE__DISCOVERY__V3__DELTA_DISCOVERY_RESPONSE__INIT;
        Envoy__Service__Discovery__V3__Resource res[64], *pres[64];
        Google__Protobuf__Any any[64];
        size_t n = it ? it->n : 0, len;

        for (size_t i = 0; i < n; i++) {
                envoy__service__discovery__v3__resource__init(&res[i]);
                google__protobuf__any__init(&any[i]);
                any[i].type_url = (char *)it->v[i].type_url;
                any[i].value.data = it->v[i].data;
                any[i].value.len = it->v[i].len;
                res[i].name = (char *)it->v[i].name;
                res[i].version = (char *)it->v[i].version;
                res[i].resource = &any[i];
                pres[i] = &res[i];
        }
        m.type_url = (char *)type_url;
        m.nonce = (char *)nonce;
        m.system_version_info = "sys-1";
        m.n_resources = n;
        m.resources = pres;
        m.n_removed_resources = nremoved;
        m.removed_resources = (char **)removed;
        len = protobuf_c_message_get_packed_size(&m.base);
        *out = malloc(len + 1);
        protobuf_c_message_pack(&m.base, *out);
        return len;
}

static size_t sotw_resp(uint8_t **out, const char *type_url, const char *version,
                        const char *nonce, const struct items *it)
{
        Envoy__Service__Discovery__V3__DiscoveryResponse m =
            ENVOY__SERVICE__DISCOVERY__V3__DISCOVERY_RESPONSE__INIT;
        Google__Protobuf__Any any[64], *pany[64];
        size_t n = it ? it->n : 0, len;

        for (size_t i = 0; i < n; i++) {
                google__protobuf__any__init(&any[i]);
                any[i].type_url = (char *)it->v[i].type_url;
                any[i].value.data = it->v[i].data;
                any[i].value.len = it->v[i].len;
                pany[i] = &any[i];
        }
        m.type_url = (char *)type_url;
        m.version_info = (char *)version;
        m.nonce = (char *)nonce;
        m.n_resources = n;
        m.resources = pany;
        len = protobuf_c_message_get_packed_size(&m.base);
        *out = malloc(len + 1);
        protobuf_c_message_pack(&m.base, *out);
        return len;
}

/* feeds a delta response made of the fixture resources of t */
static int feed_fixture(struct xds_ads *a, enum xds_resource_type t, const char *nonce)
{
        struct items it = {0};
        uint8_t *b;
        size_t n;
        int r;

        items_fixture(&it, t, "v1");
        n = delta_resp(&b, xds_resource_type_url(t), nonce, &it, NULL, 0);
        r = xds_ads_on_message(a, b, n);
        free(b);
        items_free(&it);
        return r;
}

static int feed_items(struct xds_ads *a, const char *type_url, const char *nonce,
                      const struct items *it, const char **removed, size_t nremoved)
{
        uint8_t *b;
        size_t n = delta_resp(&b, type_url, nonce, it, removed, nremoved);
        int r = xds_ads_on_message(a, b, n);

        free(b);
        return r;
}

/* a cluster of discovery type `type` (EDS: service name = name) */
static void cluster_item(struct items *it, const char *name, const char *version, int type)
{
        Envoy__Config__Cluster__V3__Cluster c = ENVOY__CONFIG__CLUSTER__V3__CLUSTER__INIT;
        Envoy__Config__Cluster__V3__Cluster__EdsClusterConfig eds =
            ENVOY__CONFIG__CLUSTER__V3__CLUSTER__EDS_CLUSTER_CONFIG__INIT;

        c.name = (char *)name;
        c.cluster_discovery_type_case = ENVOY__CONFIG__CLUSTER__V3__CLUSTER__CLUSTER_DISCOVERY_TYPE_TYPE;
        c.type = type;
        if (type == ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__EDS) {
                eds.service_name = (char *)name;
                c.eds_cluster_config = &eds;
        }
        items_add_msg(it, name, version, XDS_TYPE_URL_CLUSTER, &c.base);
}

static void cla_item(struct items *it, const char *name, const char *version)
{
        Envoy__Config__Endpoint__V3__ClusterLoadAssignment c =
            ENVOY__CONFIG__ENDPOINT__V3__CLUSTER_LOAD_ASSIGNMENT__INIT;

        c.cluster_name = (char *)name;
        items_add_msg(it, name, version, XDS_TYPE_URL_CLA, &c.base);
}

/* ---- reading requests ---- */

static DReq *next_dreq(struct xds_ads *a)
{
        const uint8_t *b;
        ssize_t n = xds_ads_next_request(a, &b);

        if (n <= 0)
                return NULL;
        return envoy__service__discovery__v3__delta_discovery_request__unpack(NULL, (size_t)n, b);
}

static SReq *next_sreq(struct xds_ads *a)
{
        const uint8_t *b;
        ssize_t n = xds_ads_next_request(a, &b);

        if (n <= 0)
                return NULL;
        return envoy__service__discovery__v3__discovery_request__unpack(NULL, (size_t)n, b);
}

static void dfree(DReq *q)
{
        if (q)
                protobuf_c_message_free_unpacked(&q->base, NULL);
}

static void sfree(SReq *q)
{
        if (q)
                protobuf_c_message_free_unpacked(&q->base, NULL);
}

static void drain(struct xds_ads *a)
{
        const uint8_t *b;

        while (xds_ads_next_request(a, &b) > 0)
                ;
}

static bool has_name(char **v, size_t n, const char *s)
{
        for (size_t i = 0; i < n; i++)
                if (strcmp(v[i], s) == 0)
                        return true;
        return false;
}

static const char *irv(const DReq *q, const char *key)
{
        for (size_t i = 0; i < q->n_initial_resource_versions; i++)
                if (strcmp(q->initial_resource_versions[i]->key, key) == 0)
                        return q->initial_resource_versions[i]->value;
        return NULL;
}

#define EDS_PRODUCTPAGE "inbound-vip|9080|http|productpage.bookinfo.svc.cluster.local"
#define EDS_RATINGS "inbound-vip|9080|http|ratings.bookinfo.svc.cluster.local"

/* brings a delta ADS to its first update with the whole fixture */
static void sync_fixture(struct xds_ads *a)
{
        drain(a);
        feed_fixture(a, XDS_RES_CLUSTER, "c1");
        drain(a);
        feed_fixture(a, XDS_RES_CLA, "e1");
        feed_fixture(a, XDS_RES_LISTENER, "l1");
        feed_fixture(a, XDS_RES_ADDRESS, "w1");
        drain(a);
}

/* ---- tests ---- */

static void test_initial_subscriptions_delta(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        DReq *q;

        REQUIRE(a);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLUSTER);
        REQUIRE(q->node);
        CHECK_STR_EQ(q->node->id, NODE_ID);
        CHECK_STR_EQ(q->node->cluster, "bookinfo-waypoint.bookinfo");
        CHECK_STR_EQ(q->node->user_agent_name, "waypoint");
        CHECK_STR_EQ(q->node->user_agent_version, "0.1");
        REQUIRE(q->node->metadata);
        CHECK_INT_EQ(q->node->metadata->n_fields, 2);
        for (size_t i = 0; i < q->node->metadata->n_fields; i++) {
                Google__Protobuf__Struct__FieldsEntry *f = q->node->metadata->fields[i];

                if (strcmp(f->key, "NAMESPACE") == 0) {
                        CHECK_INT_EQ(f->value->kind_case, GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE);
                        CHECK_STR_EQ(f->value->string_value, "bookinfo");
                } else {
                        CHECK_STR_EQ(f->key, "LABELS");
                        CHECK_INT_EQ(f->value->kind_case, GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE);
                }
        }
        CHECK_INT_EQ(q->n_resource_names_subscribe, 1);
        CHECK_STR_EQ(q->resource_names_subscribe[0], "*");
        CHECK_STR_EQ(q->response_nonce, "");
        CHECK_INT_EQ(q->n_initial_resource_versions, 0);
        dfree(q);

        q = next_dreq(a); /* no EDS yet: nothing to name */
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_LISTENER);
        CHECK(q->node == NULL);
        CHECK_INT_EQ(q->n_resource_names_subscribe, 1);
        dfree(q);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_ADDRESS);
        CHECK(q->node == NULL);
        CHECK_STR_EQ(q->resource_names_subscribe[0], "*");
        dfree(q);
        CHECK(next_dreq(a) == NULL);
        CHECK(!xds_ads_synced(a));
        xds_ads_free(a);
        rec_done(&r);
}

static void test_cds_then_eds_ordering_and_ack(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        DReq *q;

        REQUIRE(a);
        drain(a);
        CHECK_INT_EQ(feed_fixture(a, XDS_RES_CLUSTER, "c1"), 0);
        CHECK_INT_EQ(r.updates, 0);
        q = next_dreq(a); /* ACK first */
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLUSTER);
        CHECK_STR_EQ(q->response_nonce, "c1");
        CHECK(q->error_detail == NULL);
        CHECK_INT_EQ(q->n_resource_names_subscribe, 0);
        dfree(q);
        q = next_dreq(a); /* then the EDS subscription, nonce-less */
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLA);
        CHECK_STR_EQ(q->response_nonce, "");
        CHECK_INT_EQ(q->n_resource_names_subscribe, 7);
        CHECK(has_name(q->resource_names_subscribe, q->n_resource_names_subscribe,
                       EDS_PRODUCTPAGE));
        CHECK(!has_name(q->resource_names_subscribe, q->n_resource_names_subscribe, "encap"));
        dfree(q);
        CHECK(next_dreq(a) == NULL);

        CHECK_INT_EQ(feed_fixture(a, XDS_RES_LISTENER, "l1"), 0);
        CHECK_INT_EQ(feed_fixture(a, XDS_RES_ADDRESS, "w1"), 0);
        CHECK_INT_EQ(r.updates, 0); /* EDS still missing */
        CHECK_INT_EQ(feed_fixture(a, XDS_RES_CLA, "e1"), 0);
        CHECK_INT_EQ(r.updates, 1);
        CHECK(xds_ads_synced(a));
        REQUIRE(r.last);
        CHECK_INT_EQ(r.last->clusters.n, 10);
        CHECK_INT_EQ(r.last->cluster_load_assignments.n, 7);
        CHECK_INT_EQ(r.last->listeners.n, 3);
        CHECK_INT_EQ(r.last->addresses.n, 16);
        CHECK(xds_resources_find(r.last, XDS_RES_ADDRESS,
                                 "bookinfo/productpage.bookinfo.svc.cluster.local") != NULL);
        CHECK(xds_resources_find(r.last, XDS_RES_ADDRESS,
                                 "Kubernetes//Pod/bookinfo/ratings-v1-5f6a7-eeeee") != NULL);
        /* ACKs for L, W, E in type order: E before L, W */
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLA);
        CHECK_STR_EQ(q->response_nonce, "e1");
        dfree(q);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->response_nonce, "l1");
        dfree(q);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->response_nonce, "w1");
        dfree(q);
        CHECK(next_dreq(a) == NULL);
        CHECK_INT_EQ(xds_ads_stats(a)->acks, 4);
        CHECK_INT_EQ(xds_ads_stats(a)->responses, 4);
        CHECK_INT_EQ(xds_ads_stats(a)->resources[XDS_RES_CLUSTER], 10);
        xds_ads_free(a);
        rec_done(&r);
}

static void test_eds_response_missing_names_counts_as_empty(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        struct items it = {0};

        REQUIRE(a);
        drain(a);
        feed_fixture(a, XDS_RES_CLUSTER, "c1");
        feed_fixture(a, XDS_RES_LISTENER, "l1");
        feed_fixture(a, XDS_RES_ADDRESS, "w1");
        CHECK_INT_EQ(r.updates, 0);
        cla_item(&it, EDS_PRODUCTPAGE, "1");
        CHECK_INT_EQ(feed_items(a, XDS_TYPE_URL_CLA, "e1", &it, NULL, 0), 0);
        CHECK_INT_EQ(r.updates, 1);
        REQUIRE(r.last);
        CHECK_INT_EQ(r.last->cluster_load_assignments.n, 1);
        items_free(&it);
        xds_ads_free(a);
        rec_done(&r);
}

static void test_nack_carries_error_detail_and_rolls_back(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        struct items it = {0};
        DReq *q;

        REQUIRE(a);
        sync_fixture(a);
        REQUIRE(r.updates == 1);
        cluster_item(&it, "bad-cluster", "1", ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__STATIC);
        r.fail_next = true;
        CHECK_INT_EQ(feed_items(a, XDS_TYPE_URL_CLUSTER, "c2", &it, NULL, 0), 0);
        items_free(&it);
        CHECK_INT_EQ(r.updates, 1);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLUSTER);
        CHECK_STR_EQ(q->response_nonce, "c2");
        REQUIRE(q->error_detail);
        CHECK_INT_EQ(q->error_detail->code, 3);
        CHECK_STR_EQ(q->error_detail->message, "rejected by test");
        dfree(q);
        CHECK(next_dreq(a) == NULL);
        CHECK_INT_EQ(xds_ads_stats(a)->nacks, 1);
        CHECK(strstr(xds_ads_stats(a)->last_nack, "rejected by test") != NULL);

        cluster_item(&it, "good-cluster", "1", ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__STATIC);
        CHECK_INT_EQ(feed_items(a, XDS_TYPE_URL_CLUSTER, "c3", &it, NULL, 0), 0);
        items_free(&it);
        CHECK_INT_EQ(r.updates, 2);
        REQUIRE(r.last);
        CHECK(xds_resources_find(r.last, XDS_RES_CLUSTER, "good-cluster") != NULL);
        CHECK(xds_resources_find(r.last, XDS_RES_CLUSTER, "bad-cluster") == NULL);
        CHECK_INT_EQ(r.last->clusters.n, 11);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->response_nonce, "c3");
        CHECK(q->error_detail == NULL);
        dfree(q);
        xds_ads_free(a);
        rec_done(&r);
}


/* The first complete state is rejected (e.g. istiod has nothing for us yet): the NACK ends the
 * initial fetch of that type, so the next good update is offered instead of waiting forever. */
static void test_nack_of_initial_state_does_not_block_later_updates(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);

        REQUIRE(a);
        drain(a);
        feed_fixture(a, XDS_RES_CLUSTER, "c1");
        drain(a);
        feed_fixture(a, XDS_RES_CLA, "e1");
        feed_fixture(a, XDS_RES_LISTENER, "l1");
        r.fail_next = true; /* the state completed by WDS is rejected */
        feed_fixture(a, XDS_RES_ADDRESS, "w1");
        drain(a);
        CHECK_INT_EQ(r.updates, 0);
        CHECK_INT_EQ(xds_ads_stats(a)->nacks, 1);
        CHECK(!xds_ads_synced(a));
        /* a later listener update completes a state that is accepted */
        feed_fixture(a, XDS_RES_LISTENER, "l2");
        drain(a);
        CHECK_INT_EQ(r.updates, 1);
        CHECK(xds_ads_synced(a));
        REQUIRE(r.last);
        CHECK(xds_resources_find(r.last, XDS_RES_LISTENER, "main_internal") != NULL);
        xds_ads_free(a);
        rec_done(&r);
}

static void test_removed_resources_leave_the_state(void)
{
        static const char *rm[] = {"encap", EDS_RATINGS, "not-there"};
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        DReq *q;

        REQUIRE(a);
        sync_fixture(a);
        CHECK_INT_EQ(feed_items(a, XDS_TYPE_URL_CLUSTER, "c2", NULL, rm, 3), 0);
        CHECK_INT_EQ(r.updates, 2);
        REQUIRE(r.last);
        CHECK_INT_EQ(r.last->clusters.n, 8);
        CHECK(xds_resources_find(r.last, XDS_RES_CLUSTER, "encap") == NULL);
        /* the EDS cluster's endpoints go with it */
        CHECK(xds_resources_find(r.last, XDS_RES_CLA, EDS_RATINGS) == NULL);
        CHECK_INT_EQ(r.last->cluster_load_assignments.n, 6);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->response_nonce, "c2");
        dfree(q);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLA);
        CHECK_INT_EQ(q->n_resource_names_subscribe, 0);
        CHECK_INT_EQ(q->n_resource_names_unsubscribe, 1);
        CHECK_STR_EQ(q->resource_names_unsubscribe[0], EDS_RATINGS);
        CHECK_STR_EQ(q->response_nonce, "");
        dfree(q);
        CHECK(next_dreq(a) == NULL);
        xds_ads_free(a);
        rec_done(&r);
}

static void test_version_churn_replaces_resource(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        struct items it = {0};
        Envoy__Config__Cluster__V3__Cluster *c;
        DReq *q;

        REQUIRE(a);
        sync_fixture(a);
        cluster_item(&it, "churn", "1", ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__STATIC);
        feed_items(a, XDS_TYPE_URL_CLUSTER, "c2", &it, NULL, 0);
        items_free(&it);
        cluster_item(&it, "churn", "2", ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__STRICT_DNS);
        feed_items(a, XDS_TYPE_URL_CLUSTER, "c3", &it, NULL, 0);
        items_free(&it);
        CHECK_INT_EQ(r.updates, 3);
        REQUIRE(r.last);
        CHECK_INT_EQ(r.last->clusters.n, 11);
        c = (void *)xds_resources_find(r.last, XDS_RES_CLUSTER, "churn");
        REQUIRE(c);
        CHECK_INT_EQ(c->type, ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__STRICT_DNS);
        drain(a);
        xds_ads_reset(a);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(irv(q, "churn"), "2");
        dfree(q);
        xds_ads_free(a);
        rec_done(&r);
}

static void test_eds_subscription_follows_cds(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        struct items it = {0};
        static const char *rm[] = {"new-eds"};
        DReq *q;

        REQUIRE(a);
        sync_fixture(a);
        cluster_item(&it, "new-eds", "1", ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__EDS);
        feed_items(a, XDS_TYPE_URL_CLUSTER, "c2", &it, NULL, 0);
        items_free(&it);
        CHECK_INT_EQ(r.updates, 2); /* after the initial sync: every response */
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->response_nonce, "c2");
        dfree(q);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLA);
        CHECK_INT_EQ(q->n_resource_names_subscribe, 1);
        CHECK_STR_EQ(q->resource_names_subscribe[0], "new-eds");
        CHECK_INT_EQ(q->n_resource_names_unsubscribe, 0);
        CHECK(q->node == NULL);
        dfree(q);
        CHECK(next_dreq(a) == NULL);

        cla_item(&it, "new-eds", "1");
        cla_item(&it, "never-asked", "1"); /* ignored */
        feed_items(a, XDS_TYPE_URL_CLA, "e2", &it, NULL, 0);
        items_free(&it);
        REQUIRE(r.last);
        CHECK(xds_resources_find(r.last, XDS_RES_CLA, "new-eds") != NULL);
        CHECK(xds_resources_find(r.last, XDS_RES_CLA, "never-asked") == NULL);
        drain(a);

        feed_items(a, XDS_TYPE_URL_CLUSTER, "c3", NULL, rm, 1);
        REQUIRE(r.last);
        CHECK(xds_resources_find(r.last, XDS_RES_CLA, "new-eds") == NULL);
        q = next_dreq(a);
        dfree(q);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLA);
        CHECK_INT_EQ(q->n_resource_names_unsubscribe, 1);
        CHECK_STR_EQ(q->resource_names_unsubscribe[0], "new-eds");
        dfree(q);
        xds_ads_free(a);
        rec_done(&r);
}

static void test_reconnect_sends_initial_resource_versions(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        DReq *q;

        REQUIRE(a);
        sync_fixture(a);
        xds_ads_reset(a);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLUSTER);
        CHECK(q->node != NULL);
        CHECK_INT_EQ(q->n_resource_names_subscribe, 1);
        CHECK_STR_EQ(q->resource_names_subscribe[0], "*");
        CHECK_INT_EQ(q->n_initial_resource_versions, 10);
        CHECK_STR_EQ(irv(q, "encap"), "v1");
        CHECK_STR_EQ(q->response_nonce, "");
        dfree(q);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLA);
        CHECK(q->node == NULL);
        CHECK_INT_EQ(q->n_resource_names_subscribe, 7);
        CHECK_INT_EQ(q->n_initial_resource_versions, 7);
        CHECK_STR_EQ(irv(q, EDS_PRODUCTPAGE), "v1");
        dfree(q);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_LISTENER);
        CHECK_INT_EQ(q->n_initial_resource_versions, 3);
        dfree(q);
        q = next_dreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_ADDRESS);
        CHECK_INT_EQ(q->n_initial_resource_versions, 16);
        dfree(q);
        CHECK(next_dreq(a) == NULL);
        CHECK(xds_ads_synced(a)); /* the state stays */
        xds_ads_free(a);
        rec_done(&r);
}

static void test_sotw_version_nonce_and_nack(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, false, 0);
        struct items it = {0};
        uint8_t *b;
        size_t n;
        SReq *q;

        REQUIRE(a);
        q = next_sreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLUSTER);
        CHECK(q->node != NULL);
        CHECK_STR_EQ(q->version_info, "");
        CHECK_INT_EQ(q->n_resource_names, 0);
        sfree(q);
        q = next_sreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_LISTENER);
        CHECK(q->node == NULL);
        sfree(q);
        q = next_sreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_ADDRESS);
        sfree(q);
        CHECK(next_sreq(a) == NULL);

        items_fixture(&it, XDS_RES_CLUSTER, "");
        n = sotw_resp(&b, XDS_TYPE_URL_CLUSTER, "v1", "n1", &it);
        CHECK_INT_EQ(xds_ads_on_message(a, b, n), 0);
        free(b);
        items_free(&it);
        q = next_sreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLUSTER);
        CHECK_STR_EQ(q->version_info, "v1");
        CHECK_STR_EQ(q->response_nonce, "n1");
        CHECK(q->error_detail == NULL);
        sfree(q);
        q = next_sreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLA);
        CHECK_INT_EQ(q->n_resource_names, 7);
        CHECK_STR_EQ(q->version_info, "");
        sfree(q);

        items_fixture(&it, XDS_RES_CLA, "");
        n = sotw_resp(&b, XDS_TYPE_URL_CLA, "e1", "ne1", &it);
        xds_ads_on_message(a, b, n);
        free(b);
        items_free(&it);
        items_fixture(&it, XDS_RES_LISTENER, "");
        n = sotw_resp(&b, XDS_TYPE_URL_LISTENER, "l1", "nl1", &it);
        xds_ads_on_message(a, b, n);
        free(b);
        items_free(&it);
        items_fixture(&it, XDS_RES_ADDRESS, "");
        n = sotw_resp(&b, XDS_TYPE_URL_ADDRESS, "w1", "nw1", &it);
        xds_ads_on_message(a, b, n);
        free(b);
        items_free(&it);
        CHECK_INT_EQ(r.updates, 1);
        drain(a);

        /* NACK: version_info stays v1, nonce is the new one */
        items_fixture(&it, XDS_RES_CLUSTER, "");
        free(it.v[--it.n].data); /* full state without one cluster */
        r.fail_next = true;
        n = sotw_resp(&b, XDS_TYPE_URL_CLUSTER, "v2", "n2", &it);
        xds_ads_on_message(a, b, n);
        free(b);
        q = next_sreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->version_info, "v1");
        CHECK_STR_EQ(q->response_nonce, "n2");
        REQUIRE(q->error_detail);
        CHECK_STR_EQ(q->error_detail->message, "rejected by test");
        sfree(q);
        CHECK(next_sreq(a) == NULL);

        /* accepted: SotW CDS replaces the whole type */
        n = sotw_resp(&b, XDS_TYPE_URL_CLUSTER, "v3", "n3", &it);
        xds_ads_on_message(a, b, n);
        free(b);
        items_free(&it);
        CHECK_INT_EQ(r.updates, 2);
        REQUIRE(r.last);
        CHECK_INT_EQ(r.last->clusters.n, 9);
        q = next_sreq(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->version_info, "v3");
        CHECK_STR_EQ(q->response_nonce, "n3");
        sfree(q);

        xds_ads_reset(a);
        q = next_sreq(a);
        REQUIRE(q);
        CHECK(q->node != NULL);
        CHECK_STR_EQ(q->version_info, "v3");
        CHECK_STR_EQ(q->response_nonce, "");
        sfree(q);
        xds_ads_free(a);
        rec_done(&r);
}

static void test_rds_follows_lds(void)
{
        Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpConnectionManager hcm =
            ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_CONNECTION_MANAGER__INIT;
        Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__Rds rds =
            ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__RDS__INIT;
        Envoy__Config__Listener__V3__Listener l = ENVOY__CONFIG__LISTENER__V3__LISTENER__INIT;
        Envoy__Config__Listener__V3__FilterChain fc = ENVOY__CONFIG__LISTENER__V3__FILTER_CHAIN__INIT,
                                                 *pfc = &fc;
        Envoy__Config__Listener__V3__Filter f = ENVOY__CONFIG__LISTENER__V3__FILTER__INIT, *pf = &f;
        Envoy__Config__Route__V3__RouteConfiguration rc =
            ENVOY__CONFIG__ROUTE__V3__ROUTE_CONFIGURATION__INIT;
        Google__Protobuf__Any any = GOOGLE__PROTOBUF__ANY__INIT;
        struct items it = {0};
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        DReq *q;

        REQUIRE(a);
        rds.route_config_name = "r1";
        hcm.route_specifier_case =
            ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_CONNECTION_MANAGER__ROUTE_SPECIFIER_RDS;
        hcm.rds = &rds;
        any.type_url = HCM_URL;
        any.value.len = protobuf_c_message_get_packed_size(&hcm.base);
        any.value.data = malloc(any.value.len + 1);
        protobuf_c_message_pack(&hcm.base, any.value.data);
        f.name = "envoy.filters.network.http_connection_manager";
        f.config_type_case = ENVOY__CONFIG__LISTENER__V3__FILTER__CONFIG_TYPE_TYPED_CONFIG;
        f.typed_config = &any;
        fc.n_filters = 1;
        fc.filters = &pf;
        l.name = "rds-listener";
        l.n_filter_chains = 1;
        l.filter_chains = &pfc;

        drain(a);
        feed_fixture(a, XDS_RES_CLUSTER, "c1");
        feed_fixture(a, XDS_RES_CLA, "e0"); /* before the subscription: dropped */
        items_add_msg(&it, "rds-listener", "1", XDS_TYPE_URL_LISTENER, &l.base);
        feed_items(a, XDS_TYPE_URL_LISTENER, "l1", &it, NULL, 0);
        items_free(&it);
        feed_fixture(a, XDS_RES_ADDRESS, "w1");
        feed_fixture(a, XDS_RES_CLA, "e1");
        CHECK_INT_EQ(r.updates, 0); /* RDS missing */
        drain(a);
        rc.name = "r1";
        items_add_msg(&it, "r1", "1", XDS_TYPE_URL_ROUTE, &rc.base);
        feed_items(a, XDS_TYPE_URL_ROUTE, "r1", &it, NULL, 0);
        items_free(&it);
        CHECK_INT_EQ(r.updates, 1);
        REQUIRE(r.last);
        CHECK(xds_resources_find(r.last, XDS_RES_ROUTE, "r1") != NULL);
        CHECK_INT_EQ(r.last->listeners.n, 1);
        xds_ads_reset(a);
        for (int i = 0; i < 5 && (q = next_dreq(a)); i++) {
                if (strcmp(q->type_url, XDS_TYPE_URL_ROUTE) == 0) {
                        CHECK_INT_EQ(q->n_resource_names_subscribe, 1);
                        CHECK_STR_EQ(q->resource_names_subscribe[0], "r1");
                        CHECK_STR_EQ(irv(q, "r1"), "1");
                }
                dfree(q);
        }
        free(any.value.data);
        xds_ads_free(a);
        rec_done(&r);
}

/* ---- bad input ---- */

static DReq *nack_of(struct xds_ads *a)
{
        DReq *q = next_dreq(a);

        if (q && !q->error_detail) {
                dfree(q);
                return NULL;
        }
        return q;
}

static void test_undecodable_body_is_einval(void)
{
        static const uint8_t junk[] = {0x12, 0xff, 0xff, 0xff, 0x0f, 0x01};
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);

        REQUIRE(a);
        drain(a);
        CHECK_INT_EQ(xds_ads_on_message(a, junk, sizeof(junk)), -EINVAL);
        CHECK(next_dreq(a) == NULL);
        CHECK_INT_EQ(xds_ads_stats(a)->nacks, 0);
        xds_ads_free(a);
        rec_done(&r);
}

static void test_unknown_type_url_is_nacked(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        DReq *q;

        REQUIRE(a);
        drain(a);
        CHECK_INT_EQ(feed_items(a, "type.googleapis.com/foo.Bar", "x1", NULL, NULL, 0), 0);
        q = nack_of(a);
        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, "type.googleapis.com/foo.Bar");
        CHECK_STR_EQ(q->response_nonce, "x1");
        CHECK(strstr(q->error_detail->message, "unsupported type") != NULL);
        dfree(q);
        CHECK_INT_EQ(xds_ads_stats(a)->nacks, 1);
        xds_ads_free(a);
        rec_done(&r);
}

static void check_cds_nack(struct xds_ads *a, const char *needle)
{
        DReq *q = nack_of(a);

        REQUIRE(q);
        CHECK_STR_EQ(q->type_url, XDS_TYPE_URL_CLUSTER);
        CHECK_STR_EQ(q->response_nonce, "bad");
        CHECK_INT_EQ(q->error_detail->code, 3);
        if (!strstr(q->error_detail->message, needle)) {
                fprintf(stderr, "NACK message \"%s\" lacks \"%s\"\n", q->error_detail->message,
                        needle);
                CHECK(0);
        }
        dfree(q);
        CHECK(next_dreq(a) == NULL); /* no EDS subscription from a rejected CDS */
        CHECK_INT_EQ(xds_ads_stats(a)->resources[XDS_RES_CLUSTER], 0);
}

static void test_any_type_mismatch_is_nacked(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        struct items it = {0};

        REQUIRE(a);
        drain(a);
        cluster_item(&it, "c", "1", 0);
        snprintf(it.v[0].type_url, sizeof(it.v[0].type_url), "%s", XDS_TYPE_URL_LISTENER);
        feed_items(a, XDS_TYPE_URL_CLUSTER, "bad", &it, NULL, 0);
        items_free(&it);
        check_cds_nack(a, "resource \"c\" has type " XDS_TYPE_URL_LISTENER);
        xds_ads_free(a);
        rec_done(&r);
}

static void test_duplicate_names_are_nacked(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        struct items it = {0};

        REQUIRE(a);
        drain(a);
        cluster_item(&it, "encap", "1", 0);
        cluster_item(&it, "other", "1", 0);
        cluster_item(&it, "encap", "2", 0);
        feed_items(a, XDS_TYPE_URL_CLUSTER, "bad", &it, NULL, 0);
        items_free(&it);
        check_cds_nack(a, "duplicate resource names in one response: \"encap\"");
        xds_ads_free(a);
        rec_done(&r);
}

static void test_too_many_resources_are_nacked(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 5);
        struct items it = {0};

        REQUIRE(a);
        drain(a);
        items_fixture(&it, XDS_RES_CLUSTER, "1");
        feed_items(a, XDS_TYPE_URL_CLUSTER, "bad", &it, NULL, 0);
        items_free(&it);
        check_cds_nack(a, "too many Cluster resources: 10, limit 5");
        xds_ads_free(a);
        rec_done(&r);
}

static void test_resource_without_name_is_nacked(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        struct items it = {0};

        REQUIRE(a);
        drain(a);
        cluster_item(&it, "c", "1", 0);
        it.v[0].name[0] = 0;
        feed_items(a, XDS_TYPE_URL_CLUSTER, "bad", &it, NULL, 0);
        items_free(&it);
        check_cds_nack(a, "without a name");
        xds_ads_free(a);
        rec_done(&r);
}

static void test_resource_name_mismatch_is_nacked(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        struct items it = {0};

        REQUIRE(a);
        drain(a);
        cluster_item(&it, "c", "1", 0);
        snprintf(it.v[0].name, sizeof(it.v[0].name), "d");
        feed_items(a, XDS_TYPE_URL_CLUSTER, "bad", &it, NULL, 0);
        items_free(&it);
        check_cds_nack(a, "resource \"d\"");
        xds_ads_free(a);
        rec_done(&r);
}

static void test_resource_that_does_not_unpack_is_nacked(void)
{
        struct rec r;
        struct xds_ads *a = ads_new(&r, true, 0);
        struct items it = {0};

        REQUIRE(a);
        drain(a);
        cluster_item(&it, "c", "1", 0);
        it.v[0].data[0] = 0xff; /* field 31, wire type 7: invalid */
        feed_items(a, XDS_TYPE_URL_CLUSTER, "bad", &it, NULL, 0);
        items_free(&it);
        check_cds_nack(a, "resource \"c\"");
        xds_ads_free(a);
        rec_done(&r);
}

static void test_new_rejects_bad_config(void)
{
        struct xds_ads_config cfg = {.delta = true, .node_id = "x", .on_update = on_update};
        struct xds_node_metadata_entry bad[] = {{"LABELS", "{not json", true}};
        struct xds_ads *a = NULL;

        CHECK_INT_EQ(xds_ads_new(&cfg, NULL), -EINVAL);
        cfg.node_id = "";
        CHECK_INT_EQ(xds_ads_new(&cfg, &a), -EINVAL);
        cfg.node_id = "x";
        cfg.metadata = bad;
        cfg.nmetadata = 1;
        CHECK_INT_EQ(xds_ads_new(&cfg, &a), -EINVAL);
        CHECK(a == NULL);
        CHECK(xds_ads_free(NULL) == NULL);
}

/* ---- failalloc ---- */

static int fa_body(void *arg)
{
        bool delta = arg != NULL;
        struct rec r;
        struct xds_ads *a = ads_new(&r, delta, 0);
        static const char *rm[] = {"encap"};
        const uint8_t *b;
        int ret = 0;
        ssize_t n;

        if (!a)
                return -ENOMEM;
        for (int step = 0; step < 6 && ret == 0; step++) {
                while ((n = xds_ads_next_request(a, &b)) > 0)
                        ;
                if (n < 0) {
                        ret = (int)n;
                        break;
                }
                if (delta) {
                        static const enum xds_resource_type order[] = {
                                XDS_RES_CLUSTER, XDS_RES_LISTENER, XDS_RES_ADDRESS, XDS_RES_CLA};
                        if (step < 4)
                                ret = feed_fixture(a, order[step], "n");
                        else if (step == 4)
                                ret = feed_items(a, XDS_TYPE_URL_CLUSTER, "n2", NULL, rm, 1);
                        else
                                xds_ads_reset(a);
                } else {
                        static const enum xds_resource_type order[] = {
                                XDS_RES_CLUSTER, XDS_RES_LISTENER, XDS_RES_ADDRESS, XDS_RES_CLA,
                                XDS_RES_CLUSTER};
                        if (step < 5) {
                                struct items it = {0};
                                uint8_t *buf;
                                size_t len;

                                items_fixture(&it, order[step], "");
                                len = sotw_resp(&buf, xds_resource_type_url(order[step]), "v",
                                                "n", &it);
                                ret = xds_ads_on_message(a, buf, len);
                                free(buf);
                                items_free(&it);
                        } else {
                                xds_ads_reset(a);
                        }
                }
        }
        if (ret == 0) {
                while ((n = xds_ads_next_request(a, &b)) > 0)
                        ;
                if (n < 0)
                        ret = (int)n;
        }
        xds_ads_free(a);
        rec_done(&r);
        return ret;
}

static void test_failalloc_on_message(void)
{
        failalloc_mode = true;
        CHECK(check_failalloc_run(fa_body, (void *)1) > 50);
        CHECK(check_failalloc_run(fa_body, NULL) > 50);
        failalloc_mode = false;
}

int main(void)
{
        const char *desc = NULL;
        const char *dir = getenv("WP_TEST_SRCDIR");
        char path[4096];

        snprintf(path, sizeof(path), "%s/data/istiod-waypoint-bookinfo.json", dir ? dir : "tests");
        if (xds_resources_load_file(path, &fx, &desc) < 0) {
                fprintf(stderr, "cannot load %s: %s\n", path, desc ? desc : "?");
                return 99;
        }
        RUN(test_initial_subscriptions_delta);
        RUN(test_cds_then_eds_ordering_and_ack);
        RUN(test_eds_response_missing_names_counts_as_empty);
        RUN(test_nack_carries_error_detail_and_rolls_back);
        RUN(test_nack_of_initial_state_does_not_block_later_updates);
        RUN(test_removed_resources_leave_the_state);
        RUN(test_version_churn_replaces_resource);
        RUN(test_eds_subscription_follows_cds);
        RUN(test_reconnect_sends_initial_resource_versions);
        RUN(test_sotw_version_nonce_and_nack);
        RUN(test_rds_follows_lds);
        RUN(test_undecodable_body_is_einval);
        RUN(test_unknown_type_url_is_nacked);
        RUN(test_any_type_mismatch_is_nacked);
        RUN(test_duplicate_names_are_nacked);
        RUN(test_too_many_resources_are_nacked);
        RUN(test_resource_without_name_is_nacked);
        RUN(test_resource_name_mismatch_is_nacked);
        RUN(test_resource_that_does_not_unpack_is_nacked);
        RUN(test_new_rejects_bad_config);
        RUN(test_failalloc_on_message);
        xds_resources_free(fx);
        return check_exit();
}
