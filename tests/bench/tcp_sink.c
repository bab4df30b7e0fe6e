/*
 * tcp_sink: the benchmark's destination workload. A TCP server that reads and discards every
 * byte and closes a connection once the peer half-closed (EOF); connections that send nothing
 * stay open (idle tunnels). One thread, epoll, non-blocking sockets.
 *
 *   tcp_sink --listen IP:PORT [--backlog N] [--connect]
 *
 * --connect: each connection starts with an HTTP/1.1 CONNECT request (what an HTTP proxy that
 * terminates HBONE, e.g. HAProxy, sends its server); the head up to the blank line is answered
 * with "HTTP/1.1 200 OK" and not counted, everything after it is sunk as usual.
 *
 * Raises RLIMIT_NOFILE to its hard limit. On SIGTERM/SIGINT it prints one JSON line on stdout
 * ({"accepted":..,"closed":..,"open":..,"bytes":..}) and exits 0.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
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

#define OK_200 "HTTP/1.1 200 OK\r\n\r\n"

/* --connect: consumes request-head bytes from buf until the blank line. *st is 1 + how much of
 * "\r\n\r\n" is matched (0 once the head is over). Returns the head bytes used (<= n). */
static ssize_t skip_head(uint8_t *st, const char *buf, ssize_t n)
{
        static const char end[4] = {'\r', '\n', '\r', '\n'};
        ssize_t i;

        for (i = 0; i < n && *st; i++) {
                unsigned m = *st - 1u;

                if (buf[i] == end[m])
                        m++;
                else
                        m = buf[i] == '\r' ? 1 : 0;
                *st = m == 4 ? 0 : (uint8_t)(m + 1);
        }
        return i;
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
                {"connect", no_argument, NULL, 'C'},
                {NULL, 0, NULL, 0},
        };
        static char buf[1 << 18];
        const char *listen_s = NULL;
        int backlog = 65535, c, one = 1, lfd, ep;
        uint64_t accepted = 0, closed = 0, bytes = 0, heads = 0;
        bool connect_mode = false;
        uint8_t *head_state = NULL; /* --connect: per fd, 1 + bytes of "\r\n\r\n" matched */
        struct sockaddr_in sin;
        struct rlimit rl;
        struct epoll_event ev, evs[256];

        while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
                switch (c) {
                case 'l':
                        listen_s = optarg;
                        break;
                case 'b':
                        backlog = atoi(optarg);
                        break;
                case 'C':
                        connect_mode = true;
                        break;
                default:
                        return 2;
                }
        }
        if (!listen_s || parse_listen(listen_s, &sin) < 0) {
                fprintf(stderr, "usage: tcp_sink --listen IP:PORT [--backlog N] [--connect]\n");
                return 2;
        }
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
                rl.rlim_cur = rl.rlim_max;
                setrlimit(RLIMIT_NOFILE, &rl);
        }
        if (connect_mode)
                head_state = calloc((size_t)(rl.rlim_cur > 0 ? rl.rlim_cur : 65536), 1);
        if (connect_mode && !head_state)
                return perror("calloc"), 1;
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
                                        if (head_state && (rlim_t)cfd < rl.rlim_cur)
                                                head_state[cfd] = 1;
                                }
                                if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                                        fprintf(stderr, "tcp_sink: accept: %s\n", strerror(errno));
                                continue;
                        }
                        /* read until EAGAIN; EOF or error closes */
                        for (;;) {
                                ssize_t r = recv(fd, buf, sizeof(buf), 0);

                                if (r > 0 && head_state && head_state[fd]) {
                                        ssize_t k = skip_head(&head_state[fd], buf, r);

                                        if (head_state[fd])
                                                continue; /* the head goes on */
                                        heads++;
                                        if (send(fd, OK_200, sizeof(OK_200) - 1, 0) !=
                                            sizeof(OK_200) - 1) {
                                                r = -1; /* cannot answer: close */
                                                errno = EPIPE;
                                        } else if (k == r) {
                                                continue;
                                        } else {
                                                r -= k;
                                        }
                                }
                                if (r > 0) {
                                        bytes += (uint64_t)r;
                                        continue;
                                }
                                if (r < 0 && (errno == EAGAIN || errno == EINTR))
                                        break;
                                if (head_state)
                                        head_state[fd] = 0;
                                close(fd); /* also removes it from the epoll set */
                                closed++;
                                break;
                        }
                }
        }
        printf("{\"accepted\":%llu,\"closed\":%llu,\"open\":%llu,\"bytes\":%llu,"
               "\"connect_heads\":%llu}\n",
               (unsigned long long)accepted, (unsigned long long)closed,
               (unsigned long long)(accepted - closed), (unsigned long long)bytes,
               (unsigned long long)heads);
        fflush(stdout); /* before any exit-time checker (LeakSanitizer) can end the process */
        free(head_state);
        return 0;
}
