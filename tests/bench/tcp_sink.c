/*
 * tcp_sink: the benchmark's destination workload. A TCP server that reads and discards every
 * byte and closes a connection once the peer half-closed (EOF); connections that send nothing
 * stay open (idle tunnels). One thread, epoll, non-blocking sockets.
 *
 *   tcp_sink --listen IP:PORT [--backlog N]
 *
 * Raises RLIMIT_NOFILE to its hard limit. On SIGTERM/SIGINT it prints one JSON line on stdout
 * ({"accepted":..,"closed":..,"open":..,"bytes":..}) and exits 0.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
        stop = 1;
}

static int parse_listen(const char *s, struct sockaddr_in *sin)
{
        char host[64];
        const char *colon = strrchr(s, ':');
        char *end;
        unsigned long port;

        if (!colon || (size_t)(colon - s) >= sizeof(host))
                return -EINVAL;
        memcpy(host, s, (size_t)(colon - s));
        host[colon - s] = 0;
        port = strtoul(colon + 1, &end, 10);
        if (*end || port == 0 || port > 65535)
                return -EINVAL;
        memset(sin, 0, sizeof(*sin));
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1)
                return -EINVAL;
        return 0;
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                {"listen", required_argument, NULL, 'l'},
                {"backlog", required_argument, NULL, 'b'},
                {NULL, 0, NULL, 0},
        };
        static char buf[1 << 18];
        const char *listen_s = NULL;
        int backlog = 65535, c, one = 1, lfd, ep;
        uint64_t accepted = 0, closed = 0, bytes = 0;
        struct sockaddr_in sin;
        struct rlimit rl;
        struct epoll_event ev, evs[256];

        while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
                switch (c) {
                case 'l': listen_s = optarg; break;
                case 'b': backlog = atoi(optarg); break;
                default: return 2;
                }
        }
        if (!listen_s || parse_listen(listen_s, &sin) < 0) {
                fprintf(stderr, "usage: tcp_sink --listen IP:PORT [--backlog N]\n");
                return 2;
        }
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
                rl.rlim_cur = rl.rlim_max;
                setrlimit(RLIMIT_NOFILE, &rl);
        }
        signal(SIGPIPE, SIG_IGN);
        struct sigaction sa = {.sa_handler = on_signal};
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);

        lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (lfd < 0)
                return perror("socket"), 1;
        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(lfd, (struct sockaddr *)&sin, sizeof(sin)) < 0 || listen(lfd, backlog) < 0) {
                fprintf(stderr, "tcp_sink: cannot listen on %s: %s\n", listen_s, strerror(errno));
                return 1;
        }
        ep = epoll_create1(EPOLL_CLOEXEC);
        if (ep < 0)
                return perror("epoll_create1"), 1;
        ev = (struct epoll_event){.events = EPOLLIN, .data.fd = lfd};
        epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);

        while (!stop) {
                int n = epoll_wait(ep, evs, 256, 500);

                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        perror("epoll_wait");
                        return 1;
                }
                for (int i = 0; i < n; i++) {
                        int fd = evs[i].data.fd;

                        if (fd == lfd) {
                                int cfd;

                                while ((cfd = accept4(lfd, NULL, NULL,
                                                      SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                                        ev = (struct epoll_event){.events = EPOLLIN | EPOLLRDHUP,
                                                                  .data.fd = cfd};
                                        if (epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &ev) < 0) {
                                                close(cfd);
                                                continue;
                                        }
                                        accepted++;
                                }
                                if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                                        fprintf(stderr, "tcp_sink: accept: %s\n", strerror(errno));
                                continue;
                        }
                        /* read until EAGAIN; EOF or error closes */
                        for (;;) {
                                ssize_t r = recv(fd, buf, sizeof(buf), 0);

                                if (r > 0) {
                                        bytes += (uint64_t)r;
                                        continue;
                                }
                                if (r < 0 && (errno == EAGAIN || errno == EINTR))
                                        break;
                                close(fd); /* also removes it from the epoll set */
                                closed++;
                                break;
                        }
                }
        }
        printf("{\"accepted\":%llu,\"closed\":%llu,\"open\":%llu,\"bytes\":%llu}\n",
               (unsigned long long)accepted, (unsigned long long)closed,
               (unsigned long long)(accepted - closed), (unsigned long long)bytes);
        return 0;
}
