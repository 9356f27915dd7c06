/*
 * loadgen: IMAP load generator for the mailgate benchmark. Prints one JSON object per result.
 *
 *   loadgen login PORT COUNT CONCURRENCY SECONDS
 *       CONCURRENCY clients loop: connect, greeting, "a LOGIN user pass", tagged OK,
 *       "b LOGOUT", tagged OK, server closes, close; until COUNT logins or SECONDS passed.
 *   loadgen throughput PORT SECONDS
 *       one client logs in, then "c FETCH 1 BODY[]" one at a time until SECONDS passed.
 *   loadgen idle PORT COUNT CONCURRENCY SECONDS
 *       opens COUNT logged-in sessions (CONCURRENCY logins in flight, within SECONDS), prints
 *       {"open": n, ...}, then holds them idle until stdin reaches EOF or a line arrives; then
 *       prints {"dropped": n} (sessions the far end closed meanwhile) and exits.
 *
 * Single thread, epoll, non-blocking sockets; the throughput client uses a blocking socket
 * with a 1 MiB receive buffer. Its own CPU time (getrusage) is in every result so run.py can
 * show that the load generator is not the bottleneck.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_LEN 8192     /* longest response line kept; longer ones are truncated */
#define CONN_TIMEOUT 15.0     /* one login session may take this long before it counts as failed */

static struct sockaddr_in target;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_self(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* ---- a response reader: splits lines, skips server literals "{n}" ---------------------- */

struct reader {
    char line[LINE_MAX_LEN];
    size_t len;
    size_t lit;                  /* literal bytes still to skip */
    unsigned long long lit_bytes;
};

typedef int (*on_line)(void *ctx, const char *line, size_t len);

static long trailing_literal(const char *l, size_t n) {
    if (n < 3 || l[n - 1] != '}') return -1;
    size_t i = n - 1;
    while (i > 0 && l[i - 1] >= '0' && l[i - 1] <= '9') i--;
    if (i == 0 || l[i - 1] != '{' || i == n - 1) return -1;
    return strtol(l + i, NULL, 10);
}

/* Feed bytes; calls cb for each complete line (without CRLF). Stops early if cb returns != 0. */
static int feed(struct reader *r, const char *p, size_t n, on_line cb, void *ctx) {
    while (n) {
        if (r->lit) {
            size_t k = n < r->lit ? n : r->lit;
            r->lit -= k;
            r->lit_bytes += k;
            p += k;
            n -= k;
            continue;
        }
        const char *nl = memchr(p, '\n', n);
        size_t take = nl ? (size_t)(nl - p) + 1 : n;
        size_t room = sizeof r->line - r->len;
        memcpy(r->line + r->len, p, take < room ? take : room);
        r->len += take < room ? take : room;
        p += take;
        n -= take;
        if (!nl) continue;
        size_t len = r->len;
        while (len && (r->line[len - 1] == '\n' || r->line[len - 1] == '\r')) len--;
        r->len = 0;
        long lit = trailing_literal(r->line, len);
        if (lit >= 0) { r->lit = (size_t)lit; continue; }
        int rc = cb(ctx, r->line, len);
        if (rc) return rc;
    }
    return 0;
}

static int starts(const char *l, size_t n, const char *prefix) {
    size_t k = strlen(prefix);
    return n >= k && memcmp(l, prefix, k) == 0;
}

static void send_all(int fd, const char *s) {
    size_t n = strlen(s);
    while (n) {   /* commands are tiny: a fresh socket buffer always takes them */
        ssize_t w = write(fd, s, n);
        if (w < 0) { if (errno == EINTR || errno == EAGAIN) continue; return; }
        s += w;
        n -= (size_t)w;
    }
}

/* ---- login and idle: many sessions on one epoll ----------------------------------------- */

enum st { CONNECTING, GREETING, LOGIN, LOGOUT, CLOSING, IDLE };

struct sess {
    int fd;
    enum st st;
    double t0;
    struct reader rd;
};

static int ep;
static double *lat;              /* login latencies, ms */
static long n_lat, ok_logins, failed, dropped;
static int idle_mode;
static const char *LOGIN_CMD = "a LOGIN bench@example.com secret\r\n";

static int sess_line(void *ctx, const char *l, size_t n) {
    struct sess *s = ctx;
    switch (s->st) {
    case GREETING:
        if (!starts(l, n, "* OK")) return -1;
        s->st = LOGIN;
        send_all(s->fd, LOGIN_CMD);
        return 0;
    case LOGIN:
        if (l[0] == '*' || l[0] == '+') return 0;
        if (!starts(l, n, "a OK")) return -1;
        lat[n_lat++] = (now() - s->t0) * 1e3;
        ok_logins++;
        if (idle_mode) { s->st = IDLE; return 1; }
        s->st = LOGOUT;
        send_all(s->fd, "b LOGOUT\r\n");
        return 0;
    case LOGOUT:
        if (l[0] == '*') return 0;
        if (!starts(l, n, "b OK")) return -1;
        s->st = CLOSING;   /* wait for the server to close, as a real client would read EOF */
        return 0;
    default:
        return -1;
    }
}

static int start_session(struct sess *s) {
    memset(s, 0, sizeof *s);
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (s->fd < 0) { perror("socket"); return -1; }
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->t0 = now();
    s->st = CONNECTING;
    if (connect(s->fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        close(s->fd);
        s->fd = -1;
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
    return 0;
}

static void end_session(struct sess *s, int ok) {
    if (!ok) failed++;
    close(s->fd);
    s->fd = -1;
}

/* Handle one readiness event. Returns 1 when the session ended (slot free). */
static int sess_event(struct sess *s, unsigned events) {
    if (s->st == CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) { end_session(s, 0); return 1; }
        s->st = GREETING;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
        epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
        return 0;
    }
    char buf[16384];
    for (;;) {
        ssize_t n = read(s->fd, buf, sizeof buf);
        if (n == 0) {
            if (s->st == IDLE) dropped++;
            end_session(s, s->st == CLOSING || s->st == IDLE);
            return 1;
        }
        if (n < 0) {
            if (errno == EAGAIN) return 0;
            if (s->st == IDLE) dropped++;
            end_session(s, s->st == CLOSING);
            return 1;
        }
        int rc = feed(&s->rd, buf, (size_t)n, sess_line, s);
        if (rc < 0) { end_session(s, 0); return 1; }
        if (rc > 0) return 0;   /* logged in and idle: leave the socket alone */
    }
    (void)events;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, long n, double p) {
    if (n == 0) return 0;
    long i = (long)(p * (n - 1) + 0.5);
    return v[i];
}

static int run_sessions(long count, int conc, double seconds) {
    idle_mode = 0;
    ep = epoll_create1(0);
    lat = calloc((size_t)count + 1, sizeof *lat);
    struct sess *slots = calloc((size_t)conc, sizeof *slots);
    long started = 0, active = 0;
    double t0 = now(), deadline = t0 + seconds;
    for (int i = 0; i < conc && started < count; i++, started++) {
        if (start_session(&slots[i]) == 0) active++; else failed++;
    }
    struct epoll_event evs[256];
    while (active > 0) {
        double t = now();
        if (t > deadline + CONN_TIMEOUT) break;
        int n = epoll_wait(ep, evs, 256, 200);
        for (int i = 0; i < n; i++) {
            struct sess *s = evs[i].data.ptr;
            if (!sess_event(s, evs[i].events)) continue;
            active--;
            if (started < count && now() < deadline && failed < count) {
                started++;
                if (start_session(s) == 0) active++; else failed++;
            }
        }
    }
    double wall = now() - t0;
    qsort(lat, (size_t)n_lat, sizeof *lat, cmp_double);
    printf("{\"mode\": \"login\", \"logins\": %ld, \"failed\": %ld, \"unfinished\": %ld, "
           "\"seconds\": %.4f, \"per_second\": %.1f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, "
           "\"max_ms\": %.3f, \"cpu_s\": %.4f}\n",
           ok_logins, failed, active, wall, ok_logins / wall, pct(lat, n_lat, .5),
           pct(lat, n_lat, .99), pct(lat, n_lat, 1), cpu_self());
    return failed || active ? 1 : 0;
}

static int run_idle(long count, int conc, double seconds) {
    idle_mode = 1;
    ep = epoll_create1(0);
    lat = calloc((size_t)count + 1, sizeof *lat);
    struct sess *slots = calloc((size_t)count, sizeof *slots);
    long started = 0, pending = 0;
    double t0 = now(), deadline = t0 + seconds;
    struct epoll_event evs[256];
    while ((ok_logins < count) && now() < deadline) {
        while (pending < conc && started < count) {
            if (start_session(&slots[started]) == 0) pending++; else failed++;
            started++;
        }
        int n = epoll_wait(ep, evs, 256, 200);
        for (int i = 0; i < n; i++) {
            struct sess *s = evs[i].data.ptr;
            enum st before = s->st;
            int ended = sess_event(s, evs[i].events);
            if (ended && before != IDLE) pending--;
            else if (s->st == IDLE && before != IDLE) pending--;
        }
        if (failed > count / 10 + 10) break;
    }
    double wall = now() - t0;
    qsort(lat, (size_t)n_lat, sizeof *lat, cmp_double);
    long open_now = ok_logins - dropped;
    printf("{\"mode\": \"idle\", \"open\": %ld, \"failed\": %ld, \"seconds\": %.4f, "
           "\"p50_ms\": %.3f, \"p99_ms\": %.3f, \"cpu_s\": %.4f}\n",
           open_now, failed, wall, pct(lat, n_lat, .5), pct(lat, n_lat, .99), cpu_self());
    fflush(stdout);
    /* Hold: watch stdin and the sessions (to count any the far end closes). */
    struct epoll_event in = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &in);
    for (int done = 0; !done;) {
        int n = epoll_wait(ep, evs, 256, 1000);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) { done = 1; continue; }
            sess_event(evs[i].data.ptr, evs[i].events);
        }
    }
    printf("{\"mode\": \"idle-end\", \"dropped\": %ld}\n", dropped);
    return 0;
}

/* ---- throughput: one session, sequential FETCHes ---------------------------------------- */

struct fetch_ctx { const char *tag; int done; int ok; };

static int fetch_line(void *ctx, const char *l, size_t n) {
    struct fetch_ctx *f = ctx;
    size_t k = strlen(f->tag);
    if (n > k && memcmp(l, f->tag, k) == 0 && l[k] == ' ') {
        f->done = 1;
        f->ok = starts(l + k + 1, n - k - 1, "OK");
        return 1;
    }
    return 0;
}

/* Read until the tagged reply for `tag`. Returns 0 on OK. */
static int await(int fd, struct reader *rd, const char *tag, char *buf, size_t cap) {
    struct fetch_ctx f = {tag, 0, 0};
    while (!f.done) {
        ssize_t n = read(fd, buf, cap);
        if (n <= 0) return -1;
        feed(rd, buf, (size_t)n, fetch_line, &f);
    }
    return f.ok ? 0 : -1;
}

static int run_throughput(double seconds) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1, rcv = 1 << 20;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) { perror("connect"); return 1; }
    static char buf[1 << 18];
    struct reader rd = {0};
    /* The greeting is untagged: wait for its line with a tag nobody uses, via "* OK". */
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0 || !starts(buf, (size_t)n, "* OK")) { fprintf(stderr, "no greeting\n"); return 1; }
    send_all(fd, LOGIN_CMD);
    if (await(fd, &rd, "a", buf, sizeof buf)) { fprintf(stderr, "login failed\n"); return 1; }
    double *flat = calloc(1 << 20, sizeof *flat);
    long fetches = 0;
    unsigned long long before = rd.lit_bytes;
    double t0 = now(), end = t0 + seconds;
    while (now() < end && fetches < (1 << 20)) {
        double t = now();
        send_all(fd, "c FETCH 1 BODY[]\r\n");
        if (await(fd, &rd, "c", buf, sizeof buf)) { fprintf(stderr, "fetch failed\n"); return 1; }
        flat[fetches++] = (now() - t) * 1e3;
    }
    double wall = now() - t0;
    unsigned long long bytes = rd.lit_bytes - before;
    send_all(fd, "d LOGOUT\r\n");
    await(fd, &rd, "d", buf, sizeof buf);
    close(fd);
    qsort(flat, (size_t)fetches, sizeof *flat, cmp_double);
    printf("{\"mode\": \"throughput\", \"fetches\": %ld, \"bytes\": %llu, \"seconds\": %.4f, "
           "\"mb_per_s\": %.1f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, \"max_ms\": %.3f, "
           "\"cpu_s\": %.4f}\n",
           fetches, bytes, wall, bytes / wall / 1e6, pct(flat, fetches, .5),
           pct(flat, fetches, .99), pct(flat, fetches, 1), cpu_self());
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: loadgen login|idle PORT COUNT CONCURRENCY SECONDS\n"
                        "       loadgen throughput PORT SECONDS\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    target.sin_family = AF_INET;
    target.sin_port = htons(atoi(argv[2]));
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (strcmp(argv[1], "throughput") == 0) return run_throughput(atof(argv[3]));
    if (argc < 6) return 2;
    long count = atol(argv[3]);
    int conc = atoi(argv[4]);
    double seconds = atof(argv[5]);
    if (strcmp(argv[1], "login") == 0) return run_sessions(count, conc, seconds);
    if (strcmp(argv[1], "idle") == 0) return run_idle(count, conc, seconds);
    return 2;
}
