/* WDS index by IP and cluster service metadata, against the istiod fixture. */
#include <arpa/inet.h>
#include <string.h>

#include "check.h"
#include "waypoint/wds.h"
#include "xds-client/resources.h"

static struct xds_resources *res;

static const Istio__Workload__Workload *lookup(const struct wp_wds *w, const char *ip)
{
        struct sockaddr_storage ss = {0};
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;

        if (inet_pton(AF_INET, ip, &sin->sin_addr) == 1) {
                sin->sin_family = AF_INET;
        } else {
                inet_pton(AF_INET6, ip, &sin6->sin6_addr);
                sin6->sin6_family = AF_INET6;
        }
        return wp_wds_lookup(w, (struct sockaddr *)&ss);
}

static void test_workloads_are_found_by_ip(void)
{
        struct wp_wds *w = NULL;
        const Istio__Workload__Workload *wl;

        REQUIRE(wp_wds_build(res, &w) == 0);
        REQUIRE(w != NULL);
        wl = lookup(w, "127.0.22.1");
        REQUIRE(wl != NULL);
        CHECK_STR_EQ(wl->name, "reviews-v1-7c8d9-bbbbb");
        CHECK_STR_EQ(wl->canonical_revision, "v1");
        wl = lookup(w, "127.0.22.3");
        REQUIRE(wl != NULL);
        CHECK_STR_EQ(wl->canonical_revision, "v3");
        /* IPv4-mapped IPv6 is the same workload */
        wl = lookup(w, "::ffff:127.0.22.1");
        REQUIRE(wl != NULL);
        CHECK_STR_EQ(wl->name, "reviews-v1-7c8d9-bbbbb");
        /* unknown addresses, a service VIP (not a workload), another family */
        CHECK(lookup(w, "127.0.22.9") == NULL);
        CHECK(lookup(w, "127.200.0.2") == NULL);
        CHECK(lookup(w, "::1") == NULL);
        wp_wds_free(w);
}

static void test_no_workloads_gives_no_index(void)
{
        struct xds_resources *empty = NULL;
        struct wp_wds *w = (struct wp_wds *)1;

        REQUIRE(xds_resources_new(&empty) == 0);
        CHECK(wp_wds_build(empty, &w) == 0);
        CHECK(w == NULL);
        CHECK(lookup(w, "127.0.22.1") == NULL);
        xds_resources_free(empty);
}

static void test_malformed_address_bytes_are_not_indexed(void)
{
        static const char cfg[] =
                "{\"resources\": {\"type.googleapis.com/istio.workload.Address\": {"
                "\"a\": {\"workload\": {\"uid\": \"a\", \"name\": \"bad\", \"addresses\": "
                "[\"AQIDBAU=\", \"fwAAAQ==\"]}}}}}";
        struct xds_resources *r = NULL;
        struct wp_wds *w = NULL;
        const char *err = NULL;

        REQUIRE(xds_resources_load_buffer(cfg, strlen(cfg), XDS_FORMAT_JSON, 0, &r, &err) == 0);
        REQUIRE(wp_wds_build(r, &w) == 0);
        /* the 5-byte address is skipped, the good one indexed */
        CHECK(lookup(w, "1.2.3.4") == NULL);
        CHECK(lookup(w, "127.0.0.1") != NULL);
        wp_wds_free(w);
        xds_resources_free(r);
}

static void test_cluster_service_metadata(void)
{
        struct wp_service_meta m;

        wp_cluster_service_meta(res, "inbound-vip|27017|tcp|mongodb.bookinfo.svc.cluster.local",
                                &m);
        CHECK_STR_EQ(m.host, "mongodb.bookinfo.svc.cluster.local");
        CHECK_STR_EQ(m.name, "mongodb");
        CHECK_STR_EQ(m.namespace_, "bookinfo");
        wp_cluster_service_meta(res, "connect_originate", &m);
        CHECK(m.host == NULL && m.name == NULL && m.namespace_ == NULL);
        wp_cluster_service_meta(res, "no-such-cluster", &m);
        CHECK(m.host == NULL);
}

static int build_once(void *arg)
{
        struct wp_wds *w = NULL;
        int r = wp_wds_build(res, &w);

        wp_wds_free(w);
        return r;
}

static void test_build_survives_allocation_failures(void)
{
        CHECK(check_failalloc_run(build_once, NULL) >= 2);
}

int main(void)
{
        const char *err = NULL;
        char path[4096];

        snprintf(path, sizeof(path), "%s/data/istiod-waypoint-bookinfo.json",
                 getenv("WP_TEST_SRCDIR") ? getenv("WP_TEST_SRCDIR") : "tests");
        if (xds_resources_load_file(path, &res, &err) < 0) {
                fprintf(stderr, "%s\n", err);
                return 99;
        }
        RUN(test_workloads_are_found_by_ip);
        RUN(test_no_workloads_gives_no_index);
        RUN(test_malformed_address_bytes_are_not_indexed);
        RUN(test_cluster_service_metadata);
        RUN(test_build_survives_allocation_failures);
        xds_resources_free(res);
        return check_exit();
}
