/*
 * http_backend: a minimal HTTP/1.1 keep-alive server for the L7 benchmark (destination app
 * stand-in). One thread, epoll, non-blocking sockets. Every request gets the same answer:
 *
 *   HTTP/1.1 200 OK / content-type: text/plain / content-length: N / body of N bytes
 *
 *   http_backend --listen IP:PORT [--body-bytes N (default 1024)]
 *
 * Requests are parsed only as far as framing needs: the head ends at the blank line, and a
 * Content-Length body (if any) is skipped; pipelined requests are answered in order. Chunked
 * request bodies, heads over 16 KiB or a malformed Content-Length close the connection. Runs
 * until SIGTERM/SIGINT, then prints {"connections":..,"requests":..} on stdout.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_HEAD 16384
#define OUT_MAX (1 << 20)

struct client {
        struct client *prev, *next; /* every open connection, for the exit cleanup */
        int fd;
        size_t inlen;
        uint64_t skip; /* request body bytes still to discard */
        char *out;
        size_t outlen, outoff, outcap;
        bool want_out;
        char in[MAX_HEAD];
};

static volatile sig_atomic_t stop;
static char *resp;
static size_t resp_len;
static unsigned long long n_conns, n_reqs;
static struct client *clients;

static void on_signal(int sig)
{
        stop = sig;
}

static void client_free(int ep, struct client *c)
{
        if (c->prev)
                c->prev->next = c->next;
        else
                clients = c->next;
        if (c->next)
                c->next->prev = c->prev;
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        free(c->out);
        free(c);
}

static int queue_response(struct client *c)
{
        if (c->outlen + resp_len > c->outcap) {
                if (c->outlen + resp_len > OUT_MAX)
                        return -ENOBUFS; /* the peer pipelines without reading */
                size_t cap = c->outcap ? c->outcap * 2 : 4096;

                while (cap < c->outlen + resp_len)
                        cap *= 2;
                char *p = realloc(c->out, cap);

                if (!p)
                        return -ENOMEM;
                c->out = p;
                c->outcap = cap;
        }
        memcpy(c->out + c->outlen, resp, resp_len);
        c->outlen += resp_len;
        n_reqs++;
        return 0;
}

/* consumes complete requests from c->in; returns 0 or -errno (close) */
static int parse_requests(struct client *c)
{
        size_t off = 0;

        for (;;) {
                if (c->skip) {
                        size_t take = c->inlen - off < c->skip ? c->inlen - off : (size_t)c->skip;

                        off += take;
                        c->skip -= take;
                        if (c->skip)
                                break;
                }
                char *end = memmem(c->in + off, c->inlen - off, "\r\n\r\n", 4);

                if (!end) {
                        if (c->inlen - off >= MAX_HEAD)
                                return -E2BIG;
                        break;
                }
                size_t head_len = (size_t)(end - (c->in + off)) + 4;
                const char *line = memchr(c->in + off, '\n', head_len);

                while (line && line < end) {
                        line++;
                        size_t left = (size_t)(end + 2 - line);

                        if (left > 15 && strncasecmp(line, "content-length:", 15) == 0) {
                                char *e;
                                unsigned long long v = strtoull(line + 15, &e, 10);

                                if (e == line + 15 || v > (1ULL << 40))
                                        return -EPROTO;
                                c->skip = v;
                        } else if (left > 18 && strncasecmp(line, "transfer-encoding:", 18) == 0) {
                                return -EPROTO;
                        }
                        line = memchr(line, '\n', (size_t)(end + 2 - line));
                }
                off += head_len;
                int r = queue_response(c);

                if (r < 0)
                        return r;
        }
        memmove(c->in, c->in + off, c->inlen - off);
        c->inlen -= off;
        return 0;
}

static int flush_out(int ep, struct client *c)
{
        while (c->outoff < c->outlen) {
                ssize_t n = send(c->fd, c->out + c->outoff, c->outlen - c->outoff, MSG_NOSIGNAL);

                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                break;
                        return -errno;
                }
                c->outoff += (size_t)n;
        }
        if (c->outoff == c->outlen)
                c->outoff = c->outlen = 0;
        bool want = c->outlen > 0;

        if (want != c->want_out) {
                struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};

                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                c->want_out = want;
        }
        return 0;
}

static int on_readable(int ep, struct client *c)
{
        for (;;) {
                if (c->inlen == MAX_HEAD)
                        return -E2BIG;
                ssize_t n = recv(c->fd, c->in + c->inlen, MAX_HEAD - c->inlen, 0);

                if (n == 0)
                        return -ECONNRESET; /* peer closed: we have nothing left to say */
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                break;
                        return -errno;
                }
                c->inlen += (size_t)n;
                int r = parse_requests(c);

                if (r < 0)
                        return r;
                if ((size_t)n < MAX_HEAD - (c->inlen))
                        break; /* short read: the socket is likely empty */
        }
        return flush_out(ep, c);
}

static int parse_addr(const char *s, struct sockaddr_in *sa)
{
        char host[64];
        const char *colon = strrchr(s, ':');

        if (!colon || (size_t)(colon - s) >= sizeof(host))
                return -EINVAL;
        memcpy(host, s, (size_t)(colon - s));
        host[colon - s] = 0;
        memset(sa, 0, sizeof(*sa));
        sa->sin_family = AF_INET;
        sa->sin_port = htons((uint16_t)atoi(colon + 1));
        return inet_pton(AF_INET, host, &sa->sin_addr) == 1 ? 0 : -EINVAL;
}

int main(int argc, char **argv)
{
        static const struct option opts[] = {
                {"listen", required_argument, NULL, 'l'},
                {"body-bytes", required_argument, NULL, 'b'},
                {NULL, 0, NULL, 0},
        };
        const char *listen_at = NULL;
        size_t body = 1024;
        struct sockaddr_in sa;
        int c;

        while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
                switch (c) {
                case 'l': listen_at = optarg; break;
                case 'b': body = strtoul(optarg, NULL, 10); break;
                default: goto usage;
                }
        }
        if (!listen_at || parse_addr(listen_at, &sa) < 0 || body > (1 << 20) || optind != argc)
                goto usage;

        char head[128];
        int hl = snprintf(head, sizeof(head),
                          "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %zu\r\n\r\n",
                          body);

        resp_len = (size_t)hl + body;
        resp = malloc(resp_len);
        if (!resp)
                return 1;
        memcpy(resp, head, (size_t)hl);
        for (size_t i = 0; i < body; i++)
                resp[hl + i] = (char)('a' + i % 26);

        struct sigaction act = {.sa_handler = on_signal};
        sigaction(SIGTERM, &act, NULL);
        sigaction(SIGINT, &act, NULL);
        signal(SIGPIPE, SIG_IGN);

        int one = 1;
        int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

        setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 1024) < 0) {
                perror("http_backend: listen");
                return 1;
        }
        int ep = epoll_create1(EPOLL_CLOEXEC);
        struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};

        epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
        while (!stop) {
                struct epoll_event evs[64];
                int n = epoll_wait(ep, evs, 64, 500);

                for (int i = 0; i < n; i++) {
                        struct client *cl = evs[i].data.ptr;

                        if (!cl) {
                                int fd;

                                while ((fd = accept4(lfd, NULL, NULL,
                                                     SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                                        struct client *nc = calloc(1, sizeof(*nc));

                                        if (!nc) {
                                                close(fd);
                                                continue;
                                        }
                                        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                                        nc->fd = fd;
                                        nc->next = clients;
                                        if (clients)
                                                clients->prev = nc;
                                        clients = nc;
                                        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};

                                        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                                        n_conns++;
                                }
                                continue;
                        }
                        int r = 0;

                        if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                                r = on_readable(ep, cl);
                        else if (evs[i].events & EPOLLOUT)
                                r = flush_out(ep, cl);
                        if (r < 0)
                                client_free(ep, cl);
                }
        }
        printf("{\"connections\":%llu,\"requests\":%llu}\n", n_conns, n_reqs);
        while (clients)
                client_free(ep, clients);
        close(ep);
        close(lfd);
        free(resp);
        return 0;
usage:
        fputs("usage: http_backend --listen IP:PORT [--body-bytes N]\n", stderr);
        return 2;
}
