/* Tests for xds-client/pbjson.c: the JSON/YAML <-> protobuf-c codec. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "xds-client/pbjson.h"

/* Parses JSON text and decodes it as desc. Returns the decode result; *ret_err gets the error. */
static int decode_text(const ProtobufCMessageDescriptor *desc, const char *text, unsigned flags,
                       ProtobufCMessage **ret, const char **ret_err)
{
        struct json_object *j = NULL;
        int r = xds_json_parse(text, strlen(text), &j, ret_err);
        if (r < 0)
                return r;
        r = xds_pbjson_decode(desc, j, flags, NULL, ret, ret_err);
        json_object_put(j);
        return r;
}

/* Expects decoding to fail with err and exactly the description want. */
static void expect_fail(const ProtobufCMessageDescriptor *desc, const char *text, int err,
                        const char *want)
{
        ProtobufCMessage *m = NULL;
        const char *e = NULL;
        int r = decode_text(desc, text, 0, &m, &e);
        CHECK_INT_EQ(r, err);
        CHECK(m == NULL);
        CHECK_STR_EQ(e, want);
}

#define LISTENER (&envoy__config__listener__v3__listener__descriptor)
#define CLUSTER  (&envoy__config__cluster__v3__cluster__descriptor)
#define SOCKADDR (&envoy__config__core__v3__socket_address__descriptor)
#define FILTER   (&envoy__config__listener__v3__filter__descriptor)

static void test_decode_accepts_proto_and_json_names(void)
{
        ProtobufCMessage *m = NULL;
        const char *e = NULL;
        int r = decode_text(LISTENER,
                            "{\"name\":\"l\",\"filterChains\":[{\"name\":\"a\"}],"
                            "\"listener_filters\":[{\"name\":\"f\"}],\"useOriginalDst\":false}",
                            0, &m, &e);
        REQUIRE(r == 0);
        Envoy__Config__Listener__V3__Listener *l = (void *)m;
        CHECK_STR_EQ(l->name, "l");
        CHECK_INT_EQ(l->n_filter_chains, 1);
        CHECK_STR_EQ(l->filter_chains[0]->name, "a");
        CHECK_INT_EQ(l->n_listener_filters, 1);
        REQUIRE(l->use_original_dst != NULL);
        CHECK_INT_EQ(l->use_original_dst->value, 0);
        xds_pbjson_message_free(m);
}

static void test_decode_rejects_same_field_under_both_names(void)
{
        expect_fail(LISTENER, "{\"stat_prefix\":\"a\",\"statPrefix\":\"b\"}", -EINVAL,
                    "statPrefix: field given twice (as \"stat_prefix\" and its JSON name)");
}

static void test_decode_rejects_unknown_field_with_path(void)
{
        expect_fail(LISTENER,
                    "{\"name\":\"l\",\"filter_chains\":[{\"filters\":[{\"name\":\"a\"},"
                    "{\"name\":\"b\",\"bogus\":1}]}]}",
                    -EINVAL,
                    "filter_chains[0].filters[1].bogus: unknown field (in "
                    "envoy.config.listener.v3.Filter)");
}

static void test_decode_lenient_skips_unknown_fields(void)
{
        ProtobufCMessage *m = NULL;
        const char *e = NULL;
        int r = decode_text(LISTENER,
                            "{\"name\":\"l\",\"bogus\":{\"x\":1},\"drain_type\":\"MODIFY_ONLY\"}",
                            XDS_PBJSON_IGNORE_UNKNOWN, &m, &e);
        REQUIRE(r == 0);
        Envoy__Config__Listener__V3__Listener *l = (void *)m;
        CHECK_STR_EQ(l->name, "l");
        CHECK_INT_EQ(l->drain_type, ENVOY__CONFIG__LISTENER__V3__LISTENER__DRAIN_TYPE__MODIFY_ONLY);
        xds_pbjson_message_free(m);
}

static void test_decode_rejects_string_for_bool(void)
{
        expect_fail(LISTENER, "{\"continue_on_listener_filters_timeout\":\"true\"}", -EINVAL,
                    "continue_on_listener_filters_timeout: expected true or false, got string");
}

static void test_decode_unsigned_ranges(void)
{
        ProtobufCMessage *m = NULL;
        const char *e = NULL;
        int r;

        /* 70000 fits a uint32 (the port range is the snapshot's business, not the codec's). */
        r = decode_text(SOCKADDR, "{\"address\":\"1.2.3.4\",\"port_value\":70000}", 0, &m, &e);
        REQUIRE(r == 0);
        CHECK_INT_EQ(((Envoy__Config__Core__V3__SocketAddress *)m)->port_value, 70000);
        m = xds_pbjson_message_free(m);

        /* Numeric strings are accepted for numeric fields. */
        r = decode_text(SOCKADDR, "{\"port_value\":\"15008\"}", 0, &m, &e);
        REQUIRE(r == 0);
        CHECK_INT_EQ(((Envoy__Config__Core__V3__SocketAddress *)m)->port_value, 15008);
        m = xds_pbjson_message_free(m);

        expect_fail(SOCKADDR, "{\"port_value\":-1}", -EINVAL,
                    "port_value: negative value -1 for an unsigned field");
        expect_fail(SOCKADDR, "{\"port_value\":\"-7\"}", -EINVAL,
                    "port_value: negative value \"-7\" for an unsigned field");
        expect_fail(SOCKADDR, "{\"port_value\":4294967296}", -EINVAL,
                    "port_value: integer 4294967296 out of range");
        expect_fail(SOCKADDR, "{\"port_value\":1.5}", -EINVAL,
                    "port_value: expected an integer, got 1.5");
        expect_fail(SOCKADDR, "{\"port_value\":\"12ab\"}", -EINVAL,
                    "port_value: expected an unsigned integer, got \"12ab\"");
}

static void test_decode_int64_as_string_and_number(void)
{
        const ProtobufCMessageDescriptor *d = &envoy__config__route__v3__retry_policy__descriptor;
        ProtobufCMessage *m = NULL;
        const char *e = NULL;

        REQUIRE(decode_text(d, "{\"host_selection_retry_max_attempts\":\"-9223372036854775808\"}",
                            0, &m, &e) == 0);
        CHECK(((Envoy__Config__Route__V3__RetryPolicy *)m)->host_selection_retry_max_attempts ==
              INT64_MIN);
        m = xds_pbjson_message_free(m);
        REQUIRE(decode_text(d, "{\"host_selection_retry_max_attempts\":5}", 0, &m, &e) == 0);
        CHECK_INT_EQ(
            ((Envoy__Config__Route__V3__RetryPolicy *)m)->host_selection_retry_max_attempts, 5);
        m = xds_pbjson_message_free(m);
        expect_fail(d, "{\"host_selection_retry_max_attempts\":\"9223372036854775808\"}", -EINVAL,
                    "host_selection_retry_max_attempts: integer out of range: "
                    "\"9223372036854775808\"");
}

static void test_decode_rejects_bad_enum_name(void)
{
        expect_fail(
            CLUSTER, "{\"name\":\"c\",\"type\":\"BOGUS\"}", -EINVAL,
            "type: unknown value \"BOGUS\" for enum envoy.config.cluster.v3.Cluster.DiscoveryType");
}

static void test_decode_enum_by_number(void)
{
        ProtobufCMessage *m = NULL;
        const char *e = NULL;

        REQUIRE(decode_text(CLUSTER,
                            "{\"name\":\"c\",\"type\":3,\"lb_policy\":\"CLUSTER_PROVIDED\"}", 0, &m,
                            &e) == 0);
        Envoy__Config__Cluster__V3__Cluster *c = (void *)m;
        CHECK_INT_EQ(c->cluster_discovery_type_case,
                     ENVOY__CONFIG__CLUSTER__V3__CLUSTER__CLUSTER_DISCOVERY_TYPE_TYPE);
        CHECK_INT_EQ(c->type, ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__EDS);
        CHECK_INT_EQ(c->lb_policy,
                     ENVOY__CONFIG__CLUSTER__V3__CLUSTER__LB_POLICY__CLUSTER_PROVIDED);
        xds_pbjson_message_free(m);
}

static void test_decode_durations(void)
{
        static const struct {
                const char *in;
                int64_t s;
                int32_t ns;
        } ok[] = {
            {"\"10s\"", 10, 0},         {"\"1.5s\"", 1, 500000000}, {"\"-0.25s\"", 0, -250000000},
            {"\"0.000000001s\"", 0, 1}, {"\"0s\"", 0, 0},
        };
        static const char *bad[] = {
            "\"10\"", "\"1.s\"", "\"s\"", "\"1.0000000001s\"", "\"1m\"", "10", "\"315576000001s\""};
        char buf[128];

        for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
                ProtobufCMessage *m = NULL;
                const char *e = NULL;
                snprintf(buf, sizeof(buf), "{\"connect_timeout\":%s}", ok[i].in);
                REQUIRE(decode_text(CLUSTER, buf, 0, &m, &e) == 0);
                Envoy__Config__Cluster__V3__Cluster *c = (void *)m;
                REQUIRE(c->connect_timeout != NULL);
                CHECK_INT_EQ(c->connect_timeout->seconds, ok[i].s);
                CHECK_INT_EQ(c->connect_timeout->nanos, ok[i].ns);
                xds_pbjson_message_free(m);
        }
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                ProtobufCMessage *m = NULL;
                const char *e = NULL;
                snprintf(buf, sizeof(buf), "{\"connect_timeout\":%s}", bad[i]);
                CHECK_INT_EQ(decode_text(CLUSTER, buf, 0, &m, &e), -EINVAL);
                CHECK(e && strncmp(e, "connect_timeout: ", 17) == 0);
        }
        expect_fail(CLUSTER, "{\"connect_timeout\":\"1m\"}", -EINVAL,
                    "connect_timeout: invalid duration \"1m\" (expected e.g. \"1.5s\")");
}

static void test_decode_bytes_base64(void)
{
        const ProtobufCMessageDescriptor *d = &istio__workload__network_address__descriptor;
        ProtobufCMessage *m = NULL;
        const char *e = NULL;

        REQUIRE(decode_text(d, "{\"address\":\"f8gAPA==\"}", 0, &m, &e) == 0);
        Istio__Workload__NetworkAddress *a = (void *)m;
        REQUIRE(a->address.len == 4);
        CHECK(memcmp(a->address.data, "\x7f\xc8\x00\x3c", 4) == 0);
        m = xds_pbjson_message_free(m);
        /* URL-safe alphabet, no padding. */
        REQUIRE(decode_text(d, "{\"address\":\"-_8\"}", 0, &m, &e) == 0);
        a = (void *)m;
        REQUIRE(a->address.len == 2);
        CHECK(a->address.data[0] == 0xfb && a->address.data[1] == 0xff);
        m = xds_pbjson_message_free(m);
        expect_fail(d, "{\"address\":\"f8gA*A==\"}", -EINVAL, "address: invalid base64");
        expect_fail(d, "{\"address\":\"f\"}", -EINVAL, "address: invalid base64");
        expect_fail(d, "{\"address\":\"f8g=A===\"}", -EINVAL, "address: invalid base64");
}

static void test_decode_rejects_unknown_type_url(void)
{
        expect_fail(LISTENER,
                    "{\"filter_chains\":[{},{\"filters\":[{\"name\":\"a\",\"typed_config\":"
                    "{\"@type\":\"type.googleapis.com/foo.Bar\",\"x\":1}}]}]}",
                    -EINVAL,
                    "filter_chains[1].filters[0].typed_config: unknown type URL "
                    "type.googleapis.com/foo.Bar");
}

static void test_decode_rejects_any_without_type(void)
{
        expect_fail(FILTER, "{\"name\":\"a\",\"typed_config\":{\"stat_prefix\":\"x\"}}", -EINVAL,
                    "typed_config: Any without \"@type\"");
}

static void test_decode_any_inner_error_has_full_path(void)
{
        expect_fail(FILTER,
                    "{\"name\":\"a\",\"typed_config\":{\"@type\":\"type.googleapis.com/"
                    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\",\"cluster\":7}}",
                    -EINVAL, "typed_config.cluster: expected a string, got int");
}

static void test_decode_rejects_two_oneof_members(void)
{
        expect_fail(SOCKADDR, "{\"port_value\":1,\"named_port\":\"x\"}", -EINVAL,
                    "named_port: oneof conflict: \"port_value\" and \"named_port\" both set");
        expect_fail(&envoy__config__core__v3__address__descriptor,
                    "{\"socket_address\":{\"address\":\"1.1.1.1\"},\"pipe\":{\"path\":\"/x\"}}",
                    -EINVAL, "pipe: oneof conflict: \"socket_address\" and \"pipe\" both set");
}

static void test_decode_rejects_wrong_json_types(void)
{
        expect_fail(LISTENER, "{\"filter_chains\":{}}", -EINVAL,
                    "filter_chains: expected an array, got object");
        expect_fail(LISTENER, "{\"address\":[]}", -EINVAL,
                    "address: expected an object (envoy.config.core.v3.Address), got array");
        expect_fail(LISTENER, "[]", -EINVAL,
                    "expected an object (envoy.config.listener.v3.Listener), got array");
        expect_fail(LISTENER, "{\"filter_chains\":[null]}", -EINVAL,
                    "filter_chains[0]: null array element");
        expect_fail(LISTENER, "{\"use_original_dst\":{\"value\":true}}", -EINVAL,
                    "use_original_dst: expected a bare BoolValue value, got object");
}

static void test_decode_rejects_nul_and_bad_utf8(void)
{
        expect_fail(LISTENER, "{\"name\":\"a\\u0000b\"}", -EINVAL,
                    "name: string contains a NUL character");
        expect_fail(LISTENER, "{\"name\":\"\xc3\x28\"}", -EINVAL,
                    "name: string is not valid UTF-8");
}

static void test_decode_rejects_huge_string(void)
{
        size_t n = XDS_PBJSON_MAX_STRING + 1;
        char *text = malloc(n + 32);
        ProtobufCMessage *m = NULL;
        const char *e = NULL;

        REQUIRE(text);
        strcpy(text, "{\"name\":\"");
        memset(text + 9, 'a', n);
        strcpy(text + 9 + n, "\"}");
        CHECK_INT_EQ(decode_text(LISTENER, text, 0, &m, &e), -E2BIG);
        CHECK_STR_EQ(e, "name: string longer than 1048576 bytes");
        free(text);
}

static void test_json_parse_rejects_truncated_and_trailing(void)
{
        struct json_object *j = NULL;
        const char *e = NULL;
        const char *t = "{\"name\": [1, 2";

        CHECK_INT_EQ(xds_json_parse(t, strlen(t), &j, &e), -EINVAL);
        CHECK_STR_EQ(e, "JSON: unexpected end of input (truncated?)");
        t = "{\"a\":1} x";
        CHECK_INT_EQ(xds_json_parse(t, strlen(t), &j, &e), -EINVAL);
        CHECK_STR_EQ(e, "JSON: trailing data at offset 8");
        t = "{\"a\":1}\n ";
        CHECK_INT_EQ(xds_json_parse(t, strlen(t), &j, &e), 0);
        json_object_put(j);
        CHECK_INT_EQ(xds_json_parse("{\"a\":\0}", 7, &j, &e), -EINVAL);
        CHECK_STR_EQ(e, "JSON text contains a NUL byte");
}

static void test_json_parse_rejects_nesting_bomb(void)
{
        size_t n = 10000;
        char *t = malloc(2 * n);
        struct json_object *j = NULL;
        const char *e = NULL;

        REQUIRE(t);
        memset(t, '[', n);
        memset(t + n, ']', n);
        CHECK_INT_EQ(xds_json_parse(t, 2 * n, &j, &e), -E2BIG);
        CHECK(e && strstr(e, "nesting") != NULL);
        CHECK_INT_EQ(xds_yaml_parse(t, 2 * n, &j, &e), -E2BIG);
        CHECK(e && strstr(e, "nesting deeper than 128") != NULL);
        free(t);
}

static void test_decode_rejects_message_nesting_past_limit(void)
{
        /* Permission.not_rule nested 100 deep: within the JSON text limit, beyond the codec's. */
        const ProtobufCMessageDescriptor *d = &envoy__config__rbac__v3__permission__descriptor;
        struct json_object *root = json_object_new_object(), *cur = root;
        ProtobufCMessage *m = NULL;
        const char *e = NULL;

        for (int i = 0; i < 100; i++) {
                struct json_object *next = json_object_new_object();
                json_object_object_add(cur, "not_rule", next);
                cur = next;
        }
        json_object_object_add(cur, "any", json_object_new_boolean(1));
        CHECK_INT_EQ(xds_pbjson_decode(d, root, 0, NULL, &m, &e), -E2BIG);
        CHECK(e && strstr(e, "nesting deeper than 64 messages") != NULL);
        CHECK(e && strncmp(e, "not_rule.not_rule.", 18) == 0);
        json_object_put(root);
}

static void test_struct_value_round_trip(void)
{
        const char *in = "{\"filter_metadata\":{\"istio\":{\"a\":null,\"b\":true,\"c\":1.5,"
                         "\"d\":\"s\",\"e\":[2.5,\"x\",{\"f\":[]}],\"g\":{}}}}";
        const ProtobufCMessageDescriptor *d = &envoy__config__core__v3__metadata__descriptor;
        ProtobufCMessage *m = NULL;
        struct json_object *out = NULL, *want = NULL;
        const char *e = NULL;

        REQUIRE(decode_text(d, in, 0, &m, &e) == 0);
        Envoy__Config__Core__V3__Metadata *md = (void *)m;
        REQUIRE(md->n_filter_metadata == 1);
        CHECK_STR_EQ(md->filter_metadata[0]->key, "istio");
        REQUIRE(md->filter_metadata[0]->value->n_fields == 6);
        CHECK_INT_EQ(md->filter_metadata[0]->value->fields[0]->value->kind_case,
                     GOOGLE__PROTOBUF__VALUE__KIND_NULL_VALUE);
        REQUIRE(xds_pbjson_encode(m, 0, &out, &e) == 0);
        REQUIRE(xds_json_parse(in, strlen(in), &want, &e) == 0);
        CHECK(json_object_equal(out, want));
        if (!json_object_equal(out, want))
                fprintf(stderr, "got %s\n", json_object_to_json_string(out));
        json_object_put(out);
        json_object_put(want);
        xds_pbjson_message_free(m);
}

static void test_encode_canonical_forms(void)
{
        const char *in = "{\"name\":\"c\",\"connect_timeout\":\"1.500s\",\"type\":\"EDS\","
                         "\"typed_extension_protocol_options\":{\"k\":{\"@type\":"
                         "\"type.googleapis.com/google.protobuf.StringValue\",\"value\":\"v\"}},"
                         "\"per_connection_buffer_limit_bytes\":32768,"
                         "\"cleanup_interval\":\"-0.000001s\"}";
        ProtobufCMessage *m = NULL;
        struct json_object *out = NULL, *v;
        const char *e = NULL;

        REQUIRE(decode_text(CLUSTER, in, 0, &m, &e) == 0);
        REQUIRE(xds_pbjson_encode(m, 0, &out, &e) == 0);
        CHECK(json_object_object_get_ex(out, "connect_timeout", &v));
        CHECK_STR_EQ(json_object_get_string(v), "1.500s");
        CHECK(json_object_object_get_ex(out, "cleanup_interval", &v));
        CHECK_STR_EQ(json_object_get_string(v), "-0.000001s");
        CHECK(json_object_object_get_ex(out, "type", &v));
        CHECK_STR_EQ(json_object_get_string(v), "EDS");
        CHECK(json_object_object_get_ex(out, "per_connection_buffer_limit_bytes", &v));
        CHECK(json_object_is_type(v, json_type_int) && json_object_get_int(v) == 32768);
        CHECK(json_object_object_get_ex(out, "typed_extension_protocol_options", &v));
        CHECK_STR_EQ(json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN |
                                                           JSON_C_TO_STRING_NOSLASHESCAPE),
                     "{\"k\":{\"@type\":\"type.googleapis.com/google.protobuf.StringValue\","
                     "\"value\":\"v\"}}");
        /* proto3 defaults are left out */
        CHECK(!json_object_object_get_ex(out, "lb_policy", &v));
        json_object_put(out);

        /* int64 is emitted as a string */
        m = xds_pbjson_message_free(m);
        REQUIRE(decode_text(&envoy__config__route__v3__retry_policy__descriptor,
                            "{\"host_selection_retry_max_attempts\":5}", 0, &m, &e) == 0);
        REQUIRE(xds_pbjson_encode(m, 0, &out, &e) == 0);
        CHECK_STR_EQ(json_object_to_json_string_ext(out, JSON_C_TO_STRING_PLAIN),
                     "{\"host_selection_retry_max_attempts\":\"5\"}");
        json_object_put(out);
        xds_pbjson_message_free(m);
}

static void test_any_pack_and_unpack(void)
{
        ProtobufCMessage *m = NULL, *inner = NULL;
        const char *e = NULL;

        REQUIRE(decode_text(FILTER,
                            "{\"name\":\"tcp\",\"typed_config\":{\"@type\":\"type.googleapis.com/"
                            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\","
                            "\"statPrefix\":\"s\",\"cluster\":\"c\",\"idle_timeout\":\"3600s\"}}",
                            0, &m, &e) == 0);
        Envoy__Config__Listener__V3__Filter *f = (void *)m;
        REQUIRE(f->config_type_case ==
                ENVOY__CONFIG__LISTENER__V3__FILTER__CONFIG_TYPE_TYPED_CONFIG);
        CHECK(xds_any_unpack(
                  f->typed_config,
                  &envoy__extensions__filters__network__tcp_proxy__v3__tcp_proxy__descriptor,
                  &inner, &e) == 0);
        Envoy__Extensions__Filters__Network__TcpProxy__V3__TcpProxy *tp = (void *)inner;
        REQUIRE(tp != NULL);
        CHECK_STR_EQ(tp->stat_prefix, "s");
        CHECK_STR_EQ(tp->cluster, "c");
        CHECK_INT_EQ(tp->idle_timeout->seconds, 3600);
        inner = xds_pbjson_message_free(inner);
        /* wrong expected type */
        CHECK_INT_EQ(xds_any_unpack(f->typed_config, &google__protobuf__string_value__descriptor,
                                    &inner, &e),
                     -EINVAL);
        CHECK_STR_EQ(e,
                     "expected type google.protobuf.StringValue, got "
                     "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy");
        xds_pbjson_message_free(m);
}

static void test_registry_lookup(void)
{
        CHECK(xds_registry_lookup("type.googleapis.com/envoy.config.listener.v3.Listener") ==
              LISTENER);
        CHECK(xds_registry_lookup("example.com/x/y/xds.type.matcher.v3.IPMatcher") ==
              &xds__type__matcher__v3__ipmatcher__descriptor);
        CHECK(xds_registry_lookup("envoy.config.listener.v3.Listener") == NULL);
        CHECK(xds_registry_lookup("type.googleapis.com/") == NULL);
        CHECK(xds_registry_lookup_name("google.protobuf.Duration") ==
              &google__protobuf__duration__descriptor);
        /* sorted: every entry is findable */
        for (size_t i = 0; i < xdsproto_n_descriptors; i++)
                CHECK(xds_registry_lookup_name(xdsproto_descriptors[i]->name) ==
                      xdsproto_descriptors[i]);
        char buf[128];
        CHECK(xds_type_url(LISTENER, buf, sizeof(buf)) > 0);
        CHECK_STR_EQ(buf, "type.googleapis.com/envoy.config.listener.v3.Listener");
        CHECK_INT_EQ(xds_type_url(LISTENER, buf, 10), -ENOSPC);
}

static void test_yaml_scalars_follow_core_schema(void)
{
        const char *y = "a: 15008\n"
                        "b: '15008'\n"
                        "c: true\n"
                        "d: ~\n"
                        "e: 1.5\n"
                        "f: 127.0.0.1:80\n"
                        "g: 0x10\n"
                        "h: !!str 12\n"
                        "i: \"x\"\n"
                        "j: [1, two]\n"
                        "k: -3\n";
        struct json_object *j = NULL, *v;
        const char *e = NULL;

        REQUIRE(xds_yaml_parse(y, strlen(y), &j, &e) == 0);
        CHECK(json_object_object_get_ex(j, "a", &v) && json_object_is_type(v, json_type_int) &&
              json_object_get_int(v) == 15008);
        CHECK(json_object_object_get_ex(j, "b", &v) && json_object_is_type(v, json_type_string));
        CHECK(json_object_object_get_ex(j, "c", &v) && json_object_is_type(v, json_type_boolean));
        CHECK(json_object_object_get_ex(j, "d", &v) && v == NULL);
        CHECK(json_object_object_get_ex(j, "e", &v) && json_object_is_type(v, json_type_double));
        CHECK(json_object_object_get_ex(j, "f", &v) && json_object_is_type(v, json_type_string));
        CHECK(json_object_object_get_ex(j, "g", &v) && json_object_get_int(v) == 16);
        CHECK(json_object_object_get_ex(j, "h", &v) && json_object_is_type(v, json_type_string));
        CHECK(json_object_object_get_ex(j, "i", &v) && json_object_is_type(v, json_type_string));
        CHECK(json_object_object_get_ex(j, "j", &v) && json_object_array_length(v) == 2);
        CHECK(json_object_object_get_ex(j, "k", &v) && json_object_get_int(v) == -3);
        json_object_put(j);
}

static void test_yaml_rejects_duplicates_aliases_and_multi_docs(void)
{
        struct json_object *j = NULL;
        const char *e = NULL;
        const char *y;

        y = "a: 1\nb: 2\na: 3\n";
        CHECK_INT_EQ(xds_yaml_parse(y, strlen(y), &j, &e), -EINVAL);
        CHECK_STR_EQ(e, "YAML: duplicate key \"a\" at line 3");
        y = "a: &x {b: 1}\nc: *x\n";
        CHECK_INT_EQ(xds_yaml_parse(y, strlen(y), &j, &e), -EINVAL);
        CHECK_STR_EQ(e, "YAML: aliases are not supported (line 2)");
        y = "a: 1\n---\nb: 2\n";
        CHECK_INT_EQ(xds_yaml_parse(y, strlen(y), &j, &e), -EINVAL);
        CHECK_STR_EQ(e, "YAML: more than one document (line 2)");
        y = "? [a]\n: 1\n";
        CHECK_INT_EQ(xds_yaml_parse(y, strlen(y), &j, &e), -EINVAL);
        CHECK_STR_EQ(e, "YAML: non-scalar mapping key at line 1");
        y = "a: [1, 2\n";
        CHECK_INT_EQ(xds_yaml_parse(y, strlen(y), &j, &e), -EINVAL);
        CHECK(e && strncmp(e, "YAML: ", 6) == 0);
        CHECK_INT_EQ(xds_yaml_parse("", 0, &j, &e), -EINVAL);
        CHECK_STR_EQ(e, "YAML: empty document");
}

static void test_yaml_decodes_like_json(void)
{
        const char *y =
            "name: l\n"
            "address: {socket_address: {address: 0.0.0.0, port_value: '15008'}}\n"
            "listener_filters:\n"
            "- name: envoy.filters.listener.original_dst\n"
            "  typed_config:\n"
            "    '@type': "
            "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst\n";
        const char *js = "{\"name\":\"l\",\"address\":{\"socket_address\":{\"address\":\"0.0.0.0\","
                         "\"port_value\":15008}},\"listener_filters\":[{\"name\":"
                         "\"envoy.filters.listener.original_dst\",\"typed_config\":{\"@type\":"
                         "\"type.googleapis.com/"
                         "envoy.extensions.filters.listener.original_dst.v3.OriginalDst\"}}]}";
        struct json_object *jy = NULL;
        ProtobufCMessage *a = NULL, *b = NULL;
        const char *e = NULL;
        uint8_t ba[512], bb[512];

        REQUIRE(xds_yaml_parse(y, strlen(y), &jy, &e) == 0);
        REQUIRE(xds_pbjson_decode(LISTENER, jy, 0, NULL, &a, &e) == 0);
        json_object_put(jy);
        REQUIRE(decode_text(LISTENER, js, 0, &b, &e) == 0);
        size_t la = protobuf_c_message_get_packed_size(a),
               lb = protobuf_c_message_get_packed_size(b);
        REQUIRE(la == lb && la < sizeof(ba));
        protobuf_c_message_pack(a, ba);
        protobuf_c_message_pack(b, bb);
        CHECK(memcmp(ba, bb, la) == 0);
        xds_pbjson_message_free(a);
        xds_pbjson_message_free(b);
}

/* failalloc: every allocation on a decode + encode + unpack path fails once in turn. */
static struct json_object *fa_json;

static int fa_decode_body(void *arg)
{
        ProtobufCMessage *m = NULL, *inner = NULL;
        struct json_object *out = NULL;
        const char *e = NULL;
        int r;

        (void)arg;
        r = xds_pbjson_decode(CLUSTER, fa_json, 0, NULL, &m, &e);
        if (r < 0)
                return r == -ENOMEM ? r : -1000;
        Envoy__Config__Cluster__V3__Cluster *c = (void *)m;
        r = xds_any_unpack(c->typed_extension_protocol_options[0]->value, NULL, &inner, &e);
        if (r < 0)
                goto out;
        r = xds_pbjson_encode(m, 0, &out, &e);
        json_object_put(out);
out:
        xds_pbjson_message_free(inner);
        xds_pbjson_message_free(m);
        /* protobuf-c reports failed allocations during unpack as parse errors */
        return r == -EINVAL && wp_alloc_failed() ? -ENOMEM : r;
}

static void test_decode_survives_allocation_failures(void)
{
        const char *in =
            "{\"name\":\"c\",\"type\":\"EDS\",\"connect_timeout\":\"1s\","
            "\"metadata\":{\"filter_metadata\":{\"istio\":{\"services\":[{\"host\":\"h\"}]}}},"
            "\"typed_extension_protocol_options\":{\"envoy.extensions.upstreams.http.v3."
            "HttpProtocolOptions\":{\"@type\":\"type.googleapis.com/envoy.extensions.upstreams."
            "http.v3.HttpProtocolOptions\",\"explicit_http_config\":{\"http2_protocol_options\":"
            "{\"allow_connect\":true}}}},"
            "\"load_assignment\":{\"cluster_name\":\"c\",\"endpoints\":[{\"lb_endpoints\":[{"
            "\"endpoint\":{\"address\":{\"socket_address\":{\"address\":\"1.2.3.4\","
            "\"port_value\":80}}}}]}]}}";
        const char *e = NULL;

        REQUIRE(xds_json_parse(in, strlen(in), &fa_json, &e) == 0);
        CHECK_INT_EQ(fa_decode_body(NULL), 0);
        unsigned n = check_failalloc_run(fa_decode_body, NULL);
        CHECK(n > 10);
        json_object_put(fa_json);
}

int main(void)
{
        RUN(test_decode_accepts_proto_and_json_names);
        RUN(test_decode_rejects_same_field_under_both_names);
        RUN(test_decode_rejects_unknown_field_with_path);
        RUN(test_decode_lenient_skips_unknown_fields);
        RUN(test_decode_rejects_string_for_bool);
        RUN(test_decode_unsigned_ranges);
        RUN(test_decode_int64_as_string_and_number);
        RUN(test_decode_rejects_bad_enum_name);
        RUN(test_decode_enum_by_number);
        RUN(test_decode_durations);
        RUN(test_decode_bytes_base64);
        RUN(test_decode_rejects_unknown_type_url);
        RUN(test_decode_rejects_any_without_type);
        RUN(test_decode_any_inner_error_has_full_path);
        RUN(test_decode_rejects_two_oneof_members);
        RUN(test_decode_rejects_wrong_json_types);
        RUN(test_decode_rejects_nul_and_bad_utf8);
        RUN(test_decode_rejects_huge_string);
        RUN(test_json_parse_rejects_truncated_and_trailing);
        RUN(test_json_parse_rejects_nesting_bomb);
        RUN(test_decode_rejects_message_nesting_past_limit);
        RUN(test_struct_value_round_trip);
        RUN(test_encode_canonical_forms);
        RUN(test_any_pack_and_unpack);
        RUN(test_registry_lookup);
        RUN(test_yaml_scalars_follow_core_schema);
        RUN(test_yaml_rejects_duplicates_aliases_and_multi_docs);
        RUN(test_yaml_decodes_like_json);
        RUN(test_decode_survives_allocation_failures);
        return check_exit();
}
