/*
 * imapd: a tiny, fast IMAP (and POP3) backend for the mailgate benchmark. Not a mail server.
 *
 * One thread, epoll (level-triggered), non-blocking sockets. It speaks just enough IMAP for
 * every benchmark path (direct, the proxies, mailgate, the seed's nginx):
 *   greeting "* OK [CAPABILITY ...]"; LOGIN (quoted atoms or synchronising literals, which is
 *   how nginx logs in: "a LOGIN {5}" ... "+" ... "user {6}" ... "+" ... "secret");
 *   AUTHENTICATE PLAIN (with or without an initial response); CAPABILITY, ID, NOOP;
 *   FETCH -> "* 1 FETCH (BODY[] {N}\r\n" + N bytes from one static buffer + ")\r\n";
 *   LOGOUT -> BYE, tagged OK, then the server closes. Every login succeeds.
 * With -p, the same process also speaks POP3 on a second port: greeting "+OK", USER, PASS,
 *   AUTH PLAIN (with or without an initial response), CAPA, XCLIENT, NOOP, STAT,
 *   RETR -> "+OK N octets" + N bytes + ".", QUIT -> "+OK" and the server closes.
 * A connection's next command is parsed only once its previous reply is fully written, which
 * bounds memory per connection to the input buffer and three output segments.
 *
 * usage: imapd [-p POP3_PORT] [-b BODY_BYTES] IMAP_PORT
 *   (listens on 127.0.0.1; prints "ready IMAP_PORT [POP3_PORT]" when up; port 0 = any free one)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#define INBUF 8192      /* longest command line we accept: plenty for LOGIN and FETCH */
#define SMALL 512       /* untagged header / tagged trailer of one reply */
#define MAX_EVENTS 512

static char *body;      /* the FETCH literal, shared by every connection */
static size_t body_len = 1 << 20;

enum seg { PRE, BODY, POST, NSEG };

struct conn {
    int fd;
    int pop3;                    /* 1 = a POP3 connection, 0 = IMAP */
    int closing;                 /* close once the output is flushed (LOGOUT) */
    size_t lit_skip;             /* client literal bytes still to swallow */
    int pending;                 /* 1 = LOGIN waiting for literal data, 2 = AUTH PLAIN "+",
                                    3 = POP3 AUTH PLAIN "+" */
    char tag[64];
    char in[INBUF];
    size_t in_len;
    char pre[SMALL], post[SMALL];
    struct iovec out[NSEG];      /* PRE, BODY, POST: what is left to write */
};

static int ep;

static void die(const char *what) { perror(what); exit(1); }

static size_t out_left(struct conn *c) {
    return c->out[PRE].iov_len + c->out[BODY].iov_len + c->out[POST].iov_len;
}

static void watch(struct conn *c, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void drop(struct conn *c) {
    close(c->fd);
    free(c);
}

/* Queue a reply: optional text, optional body, optional trailer text. */
static void reply(struct conn *c, const char *pre, int with_body, const char *post) {
    size_t n = strlen(pre), m = strlen(post);
    memcpy(c->pre, pre, n);
    memcpy(c->post, post, m);
    c->out[PRE] = (struct iovec){c->pre, n};
    c->out[BODY] = (struct iovec){with_body ? body : NULL, with_body ? body_len : 0};
    c->out[POST] = (struct iovec){c->post, m};
}

/* The size of a trailing client literal "{n}" / "{n+}", or -1; *sync = needs a "+". */
static long trailing_literal(const char *line, size_t len, int *sync) {
    if (len < 3 || line[len - 1] != '}') return -1;
    size_t i = len - 1;
    *sync = 1;
    if (line[i - 1] == '+') { *sync = 0; i--; }
    size_t end = i;
    while (i > 0 && line[i - 1] >= '0' && line[i - 1] <= '9') i--;
    if (i == 0 || line[i - 1] != '{' || i == end) return -1;
    return strtol(line + i, NULL, 10);
}

static void command(struct conn *c, char *line, size_t len) {
    char buf[SMALL];
    int sync = 0;
    if (c->pending == 2) {                   /* the AUTHENTICATE PLAIN response line */
        c->pending = 0;
        snprintf(buf, sizeof buf, "%s OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n", c->tag);
        reply(c, buf, 0, "");
        return;
    }
    long lit = trailing_literal(line, len, &sync);
    if (c->pending == 1) {                   /* continuation of a LOGIN with literals */
        if (lit >= 0) {
            c->lit_skip = (size_t)lit;
            reply(c, sync ? "+ OK\r\n" : "", 0, "");
            return;
        }
        c->pending = 0;
        snprintf(buf, sizeof buf, "%s OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n", c->tag);
        reply(c, buf, 0, "");
        return;
    }
    line[len] = 0;
    char *sp = strchr(line, ' ');
    if (!sp || sp - line >= (long)sizeof c->tag) { reply(c, "* BAD no tag\r\n", 0, ""); return; }
    memcpy(c->tag, line, sp - line);
    c->tag[sp - line] = 0;
    char *cmd = sp + 1, *args = strchr(cmd, ' ');
    size_t clen = args ? (size_t)(args - cmd) : strlen(cmd);
#define IS(word) (clen == sizeof(word) - 1 && strncasecmp(cmd, word, clen) == 0)
    if (IS("LOGIN")) {
        if (lit >= 0) {
            c->pending = 1;
            c->lit_skip = (size_t)lit;
            reply(c, sync ? "+ OK\r\n" : "", 0, "");
            return;
        }
        snprintf(buf, sizeof buf, "%s OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n", c->tag);
        reply(c, buf, 0, "");
    } else if (IS("AUTHENTICATE")) {
        char *ir = args ? strchr(args + 1, ' ') : NULL;
        if (ir) {
            snprintf(buf, sizeof buf, "%s OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n", c->tag);
            reply(c, buf, 0, "");
        } else {
            c->pending = 2;
            reply(c, "+ \r\n", 0, "");
        }
    } else if (IS("FETCH")) {
        snprintf(buf, sizeof buf, "* 1 FETCH (BODY[] {%zu}\r\n", body_len);
        char post[SMALL];
        snprintf(post, sizeof post, ")\r\n%s OK Fetch completed.\r\n", c->tag);
        reply(c, buf, 1, post);
    } else if (IS("LOGOUT")) {
        snprintf(buf, sizeof buf, "* BYE Logging out\r\n%s OK Logout completed.\r\n", c->tag);
        reply(c, buf, 0, "");
        c->closing = 1;
    } else if (IS("NOOP")) {
        snprintf(buf, sizeof buf, "%s OK NOOP completed.\r\n", c->tag);
        reply(c, buf, 0, "");
    } else if (IS("CAPABILITY")) {
        snprintf(buf, sizeof buf, "* CAPABILITY IMAP4rev1 IDLE AUTH=PLAIN\r\n%s OK done\r\n",
                 c->tag);
        reply(c, buf, 0, "");
    } else if (IS("ID")) {
        snprintf(buf, sizeof buf, "* ID NIL\r\n%s OK ID completed.\r\n", c->tag);
        reply(c, buf, 0, "");
    } else {
        snprintf(buf, sizeof buf, "%s BAD unknown command\r\n", c->tag);
        reply(c, buf, 0, "");
    }
#undef IS
}

/* One POP3 command line. Every login succeeds; RETR sends the shared body. */
static void pop3_command(struct conn *c, char *line, size_t len) {
    char buf[SMALL];
    line[len] = 0;
    if (c->pending == 3) {                   /* the AUTH PLAIN response line */
        c->pending = 0;
        reply(c, "+OK Logged in.\r\n", 0, "");
        return;
    }
    char *args = strchr(line, ' ');
    size_t clen = args ? (size_t)(args - line) : len;
#define IS(word) (clen == sizeof(word) - 1 && strncasecmp(line, word, clen) == 0)
    if (IS("USER")) {
        reply(c, "+OK\r\n", 0, "");
    } else if (IS("PASS")) {
        reply(c, "+OK Logged in.\r\n", 0, "");
    } else if (IS("AUTH")) {
        char *ir = args ? strchr(args + 1, ' ') : NULL;
        if (ir) {
            reply(c, "+OK Logged in.\r\n", 0, "");
        } else {
            c->pending = 3;
            reply(c, "+ \r\n", 0, "");
        }
    } else if (IS("CAPA")) {
        reply(c, "+OK\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\n.\r\n", 0, "");
    } else if (IS("STAT")) {
        snprintf(buf, sizeof buf, "+OK 1 %zu\r\n", body_len);
        reply(c, buf, 0, "");
    } else if (IS("RETR")) {
        snprintf(buf, sizeof buf, "+OK %zu octets\r\n", body_len);
        reply(c, buf, 1, "\r\n.\r\n");
    } else if (IS("QUIT")) {
        reply(c, "+OK Logging out.\r\n", 0, "");
        c->closing = 1;
    } else if (IS("NOOP") || IS("XCLIENT")) {
        reply(c, "+OK\r\n", 0, "");
    } else {
        reply(c, "-ERR unknown command\r\n", 0, "");
    }
#undef IS
}

/* Parse buffered input while no reply is pending. */
static void parse(struct conn *c) {
    size_t pos = 0;
    while (pos < c->in_len && out_left(c) == 0 && !c->closing) {
        if (c->lit_skip) {
            size_t n = c->in_len - pos < c->lit_skip ? c->in_len - pos : c->lit_skip;
            pos += n;
            c->lit_skip -= n;
            continue;
        }
        char *nl = memchr(c->in + pos, '\n', c->in_len - pos);
        if (!nl) break;
        size_t len = (size_t)(nl - (c->in + pos));
        if (len && c->in[pos + len - 1] == '\r') len--;
        if (c->pop3) pop3_command(c, c->in + pos, len);
        else command(c, c->in + pos, len);
        pos = (size_t)(nl - c->in) + 1;
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
}

/* Write what is queued. Returns -1 if the connection is gone. */
static int flush(struct conn *c) {
    while (out_left(c)) {
        int first = 0;
        while (c->out[first].iov_len == 0) first++;
        ssize_t n = writev(c->fd, c->out + first, NSEG - first);
        if (n < 0) return errno == EAGAIN ? 0 : -1;
        for (int i = first; i < NSEG && n > 0; i++) {
            size_t k = (size_t)n < c->out[i].iov_len ? (size_t)n : c->out[i].iov_len;
            c->out[i].iov_base = (char *)c->out[i].iov_base + k;
            c->out[i].iov_len -= k;
            n -= (ssize_t)k;
        }
    }
    return 0;
}

/* Read, answer, write until the socket would block; then wait for the right event. */
static void serve(struct conn *c) {
    for (;;) {
        if (flush(c) < 0) { drop(c); return; }
        if (out_left(c)) { watch(c, EPOLLOUT); return; }
        if (c->closing) { drop(c); return; }
        parse(c);
        if (out_left(c) || c->closing) continue;
        if (c->in_len == sizeof c->in) { drop(c); return; }   /* line too long */
        ssize_t n = read(c->fd, c->in + c->in_len, sizeof c->in - c->in_len);
        if (n == 0) { drop(c); return; }
        if (n < 0) {
            if (errno == EAGAIN) { watch(c, EPOLLIN); return; }
            drop(c);
            return;
        }
        c->in_len += (size_t)n;
    }
}

static void accept_all(int lfd, int pop3) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                perror("accept");
            return;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        if (!c) { close(fd); continue; }
        c->fd = fd;
        c->pop3 = pop3;
        struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) { drop(c); continue; }
        if (pop3) reply(c, "+OK imapd POP3 ready.\r\n", 0, "");
        else reply(c, "* OK [CAPABILITY IMAP4rev1 IDLE AUTH=PLAIN] imapd ready.\r\n", 0, "");
        serve(c);
    }
}

/* A non-blocking listener on 127.0.0.1:port (0: any free port); returns the fd, *port set. */
static int listen_on(int *port) {
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(*port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    socklen_t al = sizeof a;
    getsockname(lfd, (struct sockaddr *)&a, &al);
    *port = ntohs(a.sin_port);
    return lfd;
}

/* epoll data of the two listeners: these addresses are never a struct conn. */
static int imap_tag, pop3_tag;

int main(int argc, char **argv) {
    int pop3_port = -1, opt;
    while ((opt = getopt(argc, argv, "p:b:")) != -1) {
        if (opt == 'p') pop3_port = atoi(optarg);
        else if (opt == 'b') body_len = strtoul(optarg, NULL, 10);
        else return 2;
    }
    if (optind >= argc) {
        fprintf(stderr, "usage: imapd [-p POP3_PORT] [-b BODY_BYTES] IMAP_PORT\n");
        return 2;
    }
    int imap_port = atoi(argv[optind]);
    signal(SIGPIPE, SIG_IGN);
    body = malloc(body_len);
    if (!body) die("malloc");
    for (size_t i = 0; i < body_len; i++)   /* printable, with a CRLF every 78 bytes */
        body[i] = (i % 80 == 78) ? '\r' : (i % 80 == 79) ? '\n' : (char)('A' + i % 26);

    ep = epoll_create1(0);
    int imap_fd = listen_on(&imap_port), pop3_fd = -1;
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &imap_tag};
    epoll_ctl(ep, EPOLL_CTL_ADD, imap_fd, &lev);
    if (pop3_port >= 0) {
        pop3_fd = listen_on(&pop3_port);
        struct epoll_event pev = {.events = EPOLLIN, .data.ptr = &pop3_tag};
        epoll_ctl(ep, EPOLL_CTL_ADD, pop3_fd, &pev);
        printf("ready %d %d\n", imap_port, pop3_port);
    } else {
        printf("ready %d\n", imap_port);
    }
    fflush(stdout);

    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == &imap_tag) accept_all(imap_fd, 0);
            else if (evs[i].data.ptr == &pop3_tag) accept_all(pop3_fd, 1);
            else serve(evs[i].data.ptr);
        }
    }
}
