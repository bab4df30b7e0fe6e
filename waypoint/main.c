/*
 * waypoint: argv/env, identity, config, workers, signals. Wiring only.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/log.h"
#include "waypoint/base/tls.h"
#include "waypoint/base/x509.h"
#include "waypoint/bootstrap.h"
#include "waypoint/control.h"
#include "waypoint/daemon.h"
#include "waypoint/metrics.h"
#include "waypoint/snapshot.h"
#include "xds-client/resources.h"

static volatile sig_atomic_t got_signal;

static void on_signal(int sig)
{
        got_signal = sig;
}

static void usage(FILE *f)
{
        fputs("usage: waypoint [options]\n"
              "  --config-file FILE          xDS resources (istiod's JSON/YAML mapping)\n"
              "  --cert-file FILE            own certificate chain (PEM, leaf first)\n"
              "  --key-file FILE             own private key (PEM)\n"
              "  --root-cert FILE            mesh root certificate(s) (PEM)\n"
              "  --trust-domain TD           peers must be spiffe://TD/... (cluster.local)\n"
              "  --hbone-address IP:PORT     HBONE listener (0.0.0.0:15008)\n"
              "  --admin-address IP:PORT     admin (127.0.0.1:15000)\n"
              "  --status-address IP:PORT    /healthz/ready (0.0.0.0:15021)\n"
              "  --metrics-address IP:PORT   merged Prometheus metrics + /healthz/ready (15020)\n"
              "  --prometheus-address IP:PORT Prometheus metrics, Envoy's port (15090)\n"
              "  --max-metric-series N       label sets kept per metric family (10000)\n"
              "  --concurrency N             worker threads (available CPUs)\n"
              "  --io-backend uring|epoll|auto\n"
              "  --log-level LEVEL           trace|debug|info|warn|error|off\n"
              "  --upstream-hbone-port PORT  destination ztunnel port (from config: 15008)\n"
              "  --connect-timeout-ms MS     upstream connect timeout (from config: 10000)\n"
              "  --handshake-timeout-ms MS   TLS handshake deadline (10000)\n"
              "  --max-concurrent-streams N  per downstream connection (100)\n"
              "  --stream-window BYTES       HTTP/2 stream window (4 MiB)\n"
              "  --connection-window BYTES   HTTP/2 connection window (16 MiB)\n"
              "  --pool-idle-ms MS           idle upstream connections close after (300000)\n"
              "  --protocol-detection-ms MS  wait for a tunnel's first bytes on a port of unknown\n"
              "                              protocol (HTTP or not) before taking it as TCP "
              "(1000)\n"
              "  --drain-ms MS               drain period on SIGTERM (5000)\n"
              "without --config-file / --cert-file, config and identity come from istiod:\n"
              "  --xds-address HOST:PORT     istiod (PROXY_CONFIG discoveryAddress, else\n"
              "                              istiod.istio-system.svc:15012)\n"
              "  --ca-address HOST:PORT      Istio CA (CA_ADDR, else the xDS address)\n"
              "  --xds-server-name NAME      istiod's TLS name (istiod.istio-system.svc)\n"
              "  --token-file FILE           bearer token (/var/run/secrets/tokens/istio-token)\n"
              "  --cluster-id ID             (ISTIO_META_CLUSTER_ID, else Kubernetes)\n"
              "  --pod-name, --pod-namespace, --pod-ip, --service-account\n"
              "                              (POD_NAME, POD_NAMESPACE, INSTANCE_IP, "
              "SERVICE_ACCOUNT)\n"
              "  --xds-sotw                  state-of-the-world ADS instead of delta\n"
              "  --cert-ttl-s S              requested certificate lifetime (86400)\n"
              "  --max-xds-message BYTES     largest ADS message accepted (16 MiB)\n",
              f);
}

/* "5s", "1.5s", "300ms", "2m" (a Go/protobuf duration) into milliseconds; -EINVAL. */
static int parse_duration_ms(const char *s, uint32_t *ret)
{
        char *end;
        double v = strtod(s, &end);

        if (end == s || v < 0)
                return -EINVAL;
        if (!strcmp(end, "ms"))
                ;
        else if (!strcmp(end, "s") || !*end)
                v *= 1000;
        else if (!strcmp(end, "m"))
                v *= 60000;
        else
                return -EINVAL;
        if (v > 86400000)
                return -EINVAL;
        *ret = (uint32_t)v;
        return 0;
}

/* The drain knobs of the stock template: PROXY_CONFIG terminationDrainDuration,
 * MINIMUM_DRAIN_DURATION and EXIT_ON_ZERO_ACTIVE_CONNECTIONS (pilot-agent's). Our default
 * leaves as soon as nothing is open; an explicit EXIT_ON_ZERO_ACTIVE_CONNECTIONS=false stays
 * for the whole drain duration as pilot-agent does. Flags given later override these. */
static void drain_from_env(struct wp_options *o)
{
        const char *v = getenv("PROXY_CONFIG"), *p;
        uint32_t ms;

        if (v && (p = strstr(v, "\"terminationDrainDuration\""))) {
                char buf[32];

                p = strchr(p + 26, '"');
                if (p && sscanf(p + 1, "%31[^\"]", buf) == 1 && parse_duration_ms(buf, &ms) == 0)
                        o->drain_ms = ms;
        }
        if ((v = getenv("MINIMUM_DRAIN_DURATION")) && parse_duration_ms(v, &ms) == 0)
                o->min_drain_ms = ms;
        if ((v = getenv("EXIT_ON_ZERO_ACTIVE_CONNECTIONS")))
                o->exit_on_zero = strcasecmp(v, "false") != 0;
}

static int parse_u32(const char *s, uint32_t min, uint32_t max, uint32_t *ret)
{
        char *end;
        unsigned long v;

        errno = 0;
        v = strtoul(s, &end, 10);
        if (errno || *end || end == s || v < min || v > max)
                return -EINVAL;
        *ret = (uint32_t)v;
        return 0;
}

enum {
        OPT_CONFIG = 256,
        OPT_CERT,
        OPT_KEY,
        OPT_ROOT,
        OPT_TD,
        OPT_HBONE,
        OPT_ADMIN,
        OPT_STATUS,
        OPT_METRICS,
        OPT_PROM,
        OPT_MAXSERIES,
        OPT_CONC,
        OPT_BACKEND,
        OPT_LOG,
        OPT_UPPORT,
        OPT_CTO,
        OPT_HTO,
        OPT_MCS,
        OPT_SWIN,
        OPT_CWIN,
        OPT_IDLE,
        OPT_SNIFF,
        OPT_DRAIN,
        OPT_XDS,
        OPT_CA,
        OPT_XDS_NAME,
        OPT_TOKEN,
        OPT_CLUSTER,
        OPT_POD_NAME,
        OPT_POD_NS,
        OPT_POD_IP,
        OPT_SA,
        OPT_SOTW,
        OPT_TTL,
        OPT_MAXMSG,
        OPT_IGNORED,
};

static const struct option long_opts[] = {
        {"config-file", required_argument, NULL, OPT_CONFIG},
        {"cert-file", required_argument, NULL, OPT_CERT},
        {"key-file", required_argument, NULL, OPT_KEY},
        {"root-cert", required_argument, NULL, OPT_ROOT},
        {"trust-domain", required_argument, NULL, OPT_TD},
        {"hbone-address", required_argument, NULL, OPT_HBONE},
        {"admin-address", required_argument, NULL, OPT_ADMIN},
        {"status-address", required_argument, NULL, OPT_STATUS},
        {"metrics-address", required_argument, NULL, OPT_METRICS},
        {"prometheus-address", required_argument, NULL, OPT_PROM},
        {"max-metric-series", required_argument, NULL, OPT_MAXSERIES},
        {"concurrency", required_argument, NULL, OPT_CONC},
        {"io-backend", required_argument, NULL, OPT_BACKEND},
        {"log-level", required_argument, NULL, OPT_LOG},
        {"upstream-hbone-port", required_argument, NULL, OPT_UPPORT},
        {"connect-timeout-ms", required_argument, NULL, OPT_CTO},
        {"handshake-timeout-ms", required_argument, NULL, OPT_HTO},
        {"max-concurrent-streams", required_argument, NULL, OPT_MCS},
        {"stream-window", required_argument, NULL, OPT_SWIN},
        {"connection-window", required_argument, NULL, OPT_CWIN},
        {"pool-idle-ms", required_argument, NULL, OPT_IDLE},
        {"protocol-detection-ms", required_argument, NULL, OPT_SNIFF},
        {"drain-ms", required_argument, NULL, OPT_DRAIN},
        {"xds-address", required_argument, NULL, OPT_XDS},
        {"ca-address", required_argument, NULL, OPT_CA},
        {"xds-server-name", required_argument, NULL, OPT_XDS_NAME},
        {"token-file", required_argument, NULL, OPT_TOKEN},
        {"cluster-id", required_argument, NULL, OPT_CLUSTER},
        {"pod-name", required_argument, NULL, OPT_POD_NAME},
        {"pod-namespace", required_argument, NULL, OPT_POD_NS},
        {"pod-ip", required_argument, NULL, OPT_POD_IP},
        {"service-account", required_argument, NULL, OPT_SA},
        {"xds-sotw", no_argument, NULL, OPT_SOTW},
        {"cert-ttl-s", required_argument, NULL, OPT_TTL},
        {"max-xds-message", required_argument, NULL, OPT_MAXMSG},
        /* accepted for the stock Deployment's pilot-agent argv */
        {"domain", required_argument, NULL, OPT_IGNORED},
        {"serviceCluster", required_argument, NULL, OPT_IGNORED},
        {"proxyLogLevel", required_argument, NULL, OPT_IGNORED},
        {"proxyComponentLogLevel", required_argument, NULL, OPT_IGNORED},
        {"log_output_level", required_argument, NULL, OPT_IGNORED},
        {"log_as_json", no_argument, NULL, OPT_IGNORED},
        {"outlierLogPath", required_argument, NULL, OPT_IGNORED},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
};

static struct wp_bootstrap bs;

static int parse_args(int argc, char **argv, struct wp_options *o)
{
        uint32_t v;
        int c, lvl;

        while ((c = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
                switch (c) {
                case OPT_CONFIG:
                        o->config_file = optarg;
                        break;
                case OPT_CERT:
                        o->cert_file = optarg;
                        break;
                case OPT_KEY:
                        o->key_file = optarg;
                        break;
                case OPT_ROOT:
                        o->root_cert = optarg;
                        break;
                case OPT_TD:
                        o->trust_domain = optarg;
                        break;
                case OPT_HBONE:
                case OPT_ADMIN:
                case OPT_STATUS:
                case OPT_METRICS:
                case OPT_PROM: {
                        struct wp_addr *a = c == OPT_HBONE     ? &o->hbone_addr
                                            : c == OPT_ADMIN   ? &o->admin_addr
                                            : c == OPT_STATUS  ? &o->status_addr
                                            : c == OPT_METRICS ? &o->metrics_addr
                                                               : &o->prometheus_addr;
                        if (wp_addr_parse(optarg, a) < 0) {
                                fprintf(stderr, "invalid address: %s\n", optarg);
                                return -EINVAL;
                        }
                        break;
                }
                case OPT_MAXSERIES:
                        if (parse_u32(optarg, 1, 1u << 24, &o->max_metric_series) < 0)
                                goto bad;
                        break;
                case OPT_CONC:
                        if (parse_u32(optarg, 1, 1024, &v) < 0)
                                goto bad;
                        o->concurrency = v;
                        break;
                case OPT_BACKEND:
                        lvl = wp_io_backend_parse(optarg);
                        if (lvl < 0)
                                goto bad;
                        o->io_backend = (enum wp_io_backend)lvl;
                        break;
                case OPT_LOG:
                        lvl = wp_log_level_parse(optarg);
                        if (lvl < 0)
                                goto bad;
                        wp_log_set_level((enum wp_log_level)lvl);
                        break;
                case OPT_UPPORT:
                        if (parse_u32(optarg, 1, 65535, &v) < 0)
                                goto bad;
                        o->upstream_hbone_port = (uint16_t)v;
                        break;
                case OPT_CTO:
                        if (parse_u32(optarg, 1, 3600000, &o->connect_timeout_ms) < 0)
                                goto bad;
                        break;
                case OPT_HTO:
                        if (parse_u32(optarg, 1, 3600000, &o->handshake_timeout_ms) < 0)
                                goto bad;
                        break;
                case OPT_MCS:
                        if (parse_u32(optarg, 1, 1u << 20, &o->lim.max_concurrent_streams) < 0)
                                goto bad;
                        break;
                case OPT_SWIN:
                        if (parse_u32(optarg, 65535, 0x7fffffff, &o->lim.initial_stream_window) < 0)
                                goto bad;
                        break;
                case OPT_CWIN:
                        if (parse_u32(optarg, 65535, 0x7fffffff, &o->lim.initial_conn_window) < 0)
                                goto bad;
                        break;
                case OPT_IDLE:
                        if (parse_u32(optarg, 1, 86400000, &o->pool_idle_ms) < 0)
                                goto bad;
                        break;
                case OPT_SNIFF:
                        if (parse_u32(optarg, 1, 3600000, &o->sniff_ms) < 0)
                                goto bad;
                        break;
                case OPT_DRAIN:
                        if (parse_u32(optarg, 0, 86400000, &o->drain_ms) < 0)
                                goto bad;
                        break;
                case OPT_XDS:
                        bs.xds_address = wp_strdup(optarg);
                        break;
                case OPT_CA:
                        bs.ca_address = wp_strdup(optarg);
                        break;
                case OPT_XDS_NAME:
                        bs.xds_server_name = wp_strdup(optarg);
                        break;
                case OPT_TOKEN:
                        bs.token_file = wp_strdup(optarg);
                        break;
                case OPT_CLUSTER:
                        bs.cluster_id = wp_strdup(optarg);
                        break;
                case OPT_POD_NAME:
                        bs.pod_name = wp_strdup(optarg);
                        break;
                case OPT_POD_NS:
                        bs.pod_namespace = wp_strdup(optarg);
                        break;
                case OPT_POD_IP:
                        bs.pod_ip = wp_strdup(optarg);
                        break;
                case OPT_SA:
                        bs.service_account = wp_strdup(optarg);
                        break;
                case OPT_SOTW:
                        bs.sotw = true;
                        break;
                case OPT_TTL:
                        if (parse_u32(optarg, 60, 30 * 86400, &bs.cert_ttl_s) < 0 &&
                            parse_u32(optarg, 1, 30 * 86400, &bs.cert_ttl_s) < 0)
                                goto bad;
                        break;
                case OPT_MAXMSG:
                        if (parse_u32(optarg, 1024, 1u << 30, &v) < 0)
                                goto bad;
                        bs.max_xds_message = v;
                        break;
                case OPT_IGNORED:
                        break;
                case 'h':
                        usage(stdout);
                        exit(0);
                default:
                        usage(stderr);
                        return -EINVAL;
                }
                continue;
        bad:
                fprintf(stderr, "invalid value for --%s: %s\n", long_opts[c - OPT_CONFIG].name,
                        optarg);
                return -EINVAL;
        }
        /* pilot-agent's positional "proxy waypoint" */
        for (int i = optind; i < argc; i++)
                if (strcmp(argv[i], "proxy") && strcmp(argv[i], "waypoint")) {
                        fprintf(stderr, "unexpected argument: %s\n", argv[i]);
                        return -EINVAL;
                }
        return 0;
}

static int load_tls(struct wp_runtime *rt)
{
        const struct wp_options *o = &rt->opts;
        char err[256];

        if (!o->cert_file || !o->key_file || !o->root_cert) {
                wp_error("main", "--cert-file, --key-file and --root-cert go together");
                return -EINVAL;
        }
        if (wp_tls_ctx_new_from_files(true, o->cert_file, o->key_file, o->root_cert,
                                      o->trust_domain, &rt->server_tls, err, sizeof(err)) < 0 ||
            wp_tls_ctx_new_from_files(false, o->cert_file, o->key_file, o->root_cert,
                                      o->trust_domain, &rt->client_tls, err, sizeof(err)) < 0) {
                wp_error("main", "identity: %s", err);
                return -EINVAL;
        }
        wp_info("main", "identity %s", wp_tls_ctx_own_uri(rt->server_tls));
        return 0;
}

static int load_config(struct wp_runtime *rt)
{
        struct xds_resources *res = NULL;
        struct wp_snapshot *s = NULL;
        const char *err = NULL;
        char *berr = NULL;
        int r;

        r = xds_resources_load_file(rt->opts.config_file, &res, &err);
        if (r < 0) {
                wp_error("config", "%s: %s", rt->opts.config_file, err ? err : strerror(-r));
                return r;
        }
        r = wp_snapshot_build(res, &s, &berr);
        if (r < 0) {
                wp_error("config", "%s: rejected: %s", rt->opts.config_file,
                         berr ? berr : strerror(-r));
                wp_free(berr);
                xds_resources_free(res);
                return r;
        }
        if (rt->opts.upstream_hbone_port)
                s->hbone_port = rt->opts.upstream_hbone_port;
        wp_info("config", "%s: %zu chains, %zu clusters", rt->opts.config_file, s->nchains,
                s->nclusters);
        for (size_t i = 0; i < s->nchains; i++)
                if (s->chains[i].kind == WP_CHAIN_UNSUPPORTED)
                        wp_warn("config", "chain %s: %s not supported yet: its tunnels get 501",
                                s->chains[i].name, s->chains[i].unsupported);
        wp_runtime_publish(rt, s);
        return 0;
}

int main(int argc, char **argv)
{
        static struct wp_runtime rt;
        struct wp_options *o = &rt.opts;
        struct wp_control *control = NULL;
        long ncpu;
        int r;

        setvbuf(stdout, NULL, _IOLBF, 0);
        signal(SIGPIPE, SIG_IGN);
        pthread_mutex_init(&rt.snap_lock, NULL);
        rt.start_time = (int64_t)time(NULL);
        hbone_limits_default(&o->lim);
        o->trust_domain = "cluster.local";
        o->io_backend = WP_IO_AUTO;
        o->handshake_timeout_ms = 10000;
        o->pool_idle_ms = 300000;
        o->sniff_ms = 1000;
        o->drain_ms = 5000;
        o->exit_on_zero = true;
        drain_from_env(o);
        wp_addr_parse("0.0.0.0:15008", &o->hbone_addr);
        wp_addr_parse("127.0.0.1:15000", &o->admin_addr);
        wp_addr_parse("0.0.0.0:15021", &o->status_addr);
        o->status_addr.set = false;
        o->admin_addr.set = false;
        o->hbone_addr.set = false;
        if (parse_args(argc, argv, o) < 0)
                return 2;
        if (!o->concurrency) {
                ncpu = sysconf(_SC_NPROCESSORS_ONLN);
                o->concurrency = ncpu > 0 ? (unsigned)ncpu : 1;
        }
        bool static_identity = o->cert_file != NULL, static_config = o->config_file != NULL;

        if (static_identity && load_tls(&rt) < 0)
                return 1;
        if (static_config && load_config(&rt) < 0)
                return 1;
        if (!static_identity || !static_config) {
                const char *err = NULL;

                if (!bs.trust_domain)
                        bs.trust_domain = wp_strdup(o->trust_domain);
                if (!bs.root_cert_file && o->root_cert)
                        bs.root_cert_file = wp_strdup(o->root_cert);
                if (wp_bootstrap_resolve(&bs, &err) < 0) {
                        wp_error("main", "%s", err);
                        return 1;
                }
                o->node_id = bs.node_id;
                o->service_cluster = bs.node_cluster;
                if (!static_config && !o->status_addr.set)
                        wp_addr_parse("0.0.0.0:15021", &o->status_addr);
                /* in a pod (config from istiod) the metrics ports are the pod's contract */
                if (!static_config && !o->metrics_addr.set)
                        wp_addr_parse("0.0.0.0:15020", &o->metrics_addr);
                if (!static_config && !o->prometheus_addr.set)
                        wp_addr_parse("0.0.0.0:15090", &o->prometheus_addr);
        }

        struct wp_metrics_config mc = {
                .n_shards = o->concurrency,
                .max_series = o->max_metric_series,
                .istio_version = bs.istio_version,
                .local_namespace = bs.pod_namespace,
                .local_cluster = bs.cluster_id,
        };
        if (wp_metrics_new(&mc, &rt.metrics) < 0) {
                wp_error("main", "cannot create the metrics registry");
                return 1;
        }
        rt.workers = wp_xcalloc(o->concurrency, sizeof(*rt.workers));
        for (unsigned i = 0; i < o->concurrency; i++) {
                const char *err = NULL;

                r = wp_worker_start(&rt, i, &rt.workers[i], &err);
                if (r < 0) {
                        wp_error("main", "worker %u: %s: %s", i, err, strerror(-r));
                        return 1;
                }
                rt.nworkers = i + 1;
        }
        if (rt.backend_note)
                wp_warn("main", "%s", rt.backend_note);
        wp_info("main", "%u workers on %s, HBONE on port %u", rt.nworkers,
                wp_io_backend_name(rt.backend),
                ntohs(((struct sockaddr_in *)&o->hbone_addr.ss)->sin_port));
        if (wp_admin_start(&rt, &o->admin_addr, WP_ADMIN_FULL) < 0 ||
            (o->status_addr.set && wp_admin_start(&rt, &o->status_addr, WP_ADMIN_STATUS) < 0) ||
            (o->metrics_addr.set && wp_admin_start(&rt, &o->metrics_addr, WP_ADMIN_METRICS) < 0) ||
            (o->prometheus_addr.set &&
             wp_admin_start(&rt, &o->prometheus_addr, WP_ADMIN_PROMETHEUS) < 0))
                return 1;
        if (static_identity && static_config) {
                atomic_store(&rt.ready, true);
        } else if (wp_control_start(&rt, &bs, static_identity, static_config, &control) < 0) {
                wp_error("main", "cannot start the control thread");
                return 1;
        }

        struct sigaction sa = {.sa_handler = on_signal};
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        while (!got_signal && !atomic_load(&rt.draining))
                pause();
        wp_info("main", "draining (%s), up to %u ms", got_signal ? strsignal(got_signal) : "admin",
                o->drain_ms);
        atomic_store(&rt.ready, false);
        atomic_store(&rt.draining, true);
        wp_control_stop(control);
        for (unsigned i = 0; i < rt.nworkers; i++)
                wp_worker_wake(rt.workers[i]);
        for (unsigned i = 0; i < rt.nworkers; i++)
                wp_worker_join(rt.workers[i]);
        /* The admin threads keep serving until the process exits and read the workers'
         * counters, the metrics registry and the bootstrap's strings: those stay (reachable
         * from statics) rather than being freed under them. Refcounted state goes (with no
         * workers left to wake). */
        rt.nworkers = 0;
        wp_runtime_publish(&rt, NULL);
        wp_snapshot_reap(); /* whatever workers queued before the reaper stopped */
        wp_tls_ctx_unref(rt.server_tls);
        wp_tls_ctx_unref(rt.client_tls);
        wp_info("main", "exit");
        return 0;
}
