/*
 * loadgen: IMAP/POP3 load generator for the mailgate benchmark. Prints one JSON object per result.
 *
 *   loadgen [OPTIONS] login PORT COUNT CONCURRENCY SECONDS
 *       CONCURRENCY clients loop until COUNT logins or SECONDS passed:
 *       IMAP: connect, greeting, "a LOGIN user pass", tagged OK, "b LOGOUT", tagged OK;
 *       POP3: connect, greeting, USER, +OK, PASS, +OK, QUIT, +OK;
 *       then wait for the server to close, close.
 *   loadgen [OPTIONS] idle PORT COUNT CONCURRENCY SECONDS
 *       opens COUNT logged-in sessions (CONCURRENCY logins in flight, within SECONDS), prints
 *       {"open": n, ...}, then holds them idle until stdin reaches EOF or a line arrives; then
 *       prints {"dropped": n} (sessions the far end closed meanwhile) and exits.
 *   loadgen throughput PORT SECONDS
 *       one IMAP client logs in, then "c FETCH 1 BODY[]" one at a time until SECONDS passed.
 *
 * OPTIONS
 *   -P imap|pop3     protocol of login and idle (default imap)
 *   -T full|resume   implicit TLS (IMAPS/POP3S). full: a full handshake on every connection;
 *                    resume: offer the last session the server handed out (a TLS 1.3 ticket,
 *                    a TLS 1.2 ticket or session id), as a mail client that reconnects does
 *   -n NAME          the SNI server name to send (default: none)
 *   -s A[,B...]      bind the client sockets to these source addresses in turn, with
 *                    IP_BIND_ADDRESS_NO_PORT so the port is picked at connect() per
 *                    destination: each source address gives another ~28k ports (127.0.0.2
 *                    and up are all on lo)
 *
 * Single thread, epoll, non-blocking sockets; the throughput client uses a blocking socket
 * with a 1 MiB receive buffer. Its own CPU time (getrusage) is in every result so run.py can
 * show that the load generator is not the bottleneck. TLS is OpenSSL's, certificates are not
 * verified (the bench's are self-signed), TLS 1.3 is negotiated when the server offers it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
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

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24   /* linux/in.h, Linux >= 4.2 */
#endif

#define LINE_MAX_LEN 1024     /* longest response line kept (greetings, OKs); longer: truncated */
#define CONN_TIMEOUT 15.0     /* one login session may take this long before it counts as failed */
#define MAX_SOURCES 64

static struct sockaddr_in target;
static struct in_addr sources[MAX_SOURCES];
static int n_sources, next_source;
static int pop3;                 /* protocol: 0 IMAP, 1 POP3 */
static int tls_mode;             /* 0 none, 1 full handshakes, 2 resume */
static const char *sni;
static SSL_CTX *tls_ctx;
static SSL_SESSION *last_session;  /* resume: the newest session the server handed out */
static long handshakes, resumed;

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

/* ---- TLS ---------------------------------------------------------------------------------- */

/* OpenSSL hands over each new session (a TLS 1.3 ticket arrives after the handshake). */
static int keep_session(SSL *ssl, SSL_SESSION *session) {
    (void)ssl;
    if (last_session) SSL_SESSION_free(last_session);
    last_session = session;
    return 1;   /* we own it now */
}

static void tls_init(void) {
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (!tls_ctx) { ERR_print_errors_fp(stderr); exit(1); }
    SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
    /* A server's close without close_notify is an ordinary end of a session here. */
    SSL_CTX_set_options(tls_ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
    if (tls_mode == 2) {
        SSL_CTX_set_session_cache_mode(tls_ctx,
                                       SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
        SSL_CTX_sess_set_new_cb(tls_ctx, keep_session);
    }
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

static void write_all(int fd, const char *s) {
    size_t n = strlen(s);
    while (n) {   /* commands are tiny: a fresh socket buffer always takes them */
        ssize_t w = write(fd, s, n);
        if (w < 0) { if (errno == EINTR || errno == EAGAIN) continue; return; }
        s += w;
        n -= (size_t)w;
    }
}

/* ---- login and idle: many sessions on one epoll ----------------------------------------- */

enum st { CONNECTING, HANDSHAKE, GREETING, LOGIN, USER_SENT, PASS_SENT, LOGOUT, CLOSING, IDLE };

struct sess {
    int fd;
    enum st st;
    double t0;
    SSL *ssl;
    struct reader rd;
};

static int ep;
static double *lat;              /* login latencies, ms */
static long n_lat, ok_logins, failed, dropped;
static int idle_mode;
static const char *USER = "bench@example.com", *PASS = "secret";

static void watch(struct sess *s, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = s};
    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
}

static void send_cmd(struct sess *s, const char *fmt, const char *a, const char *b) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, fmt, a, b);
    if (!s->ssl) { write_all(s->fd, cmd); return; }
    /* A request-response protocol: the socket buffer is empty, the record goes out whole. */
    if (SSL_write(s->ssl, cmd, (int)strlen(cmd)) <= 0) ERR_clear_error();
}

/* Advance one session by one server line. -1: the session failed; 1: logged in and idle. */
static int sess_line(void *ctx, const char *l, size_t n) {
    struct sess *s = ctx;
    int ok = pop3 ? starts(l, n, "+OK") : 0;
    switch (s->st) {
    case GREETING:
        if (!starts(l, n, pop3 ? "+OK" : "* OK")) return -1;
        if (pop3) { s->st = USER_SENT; send_cmd(s, "USER %s\r\n", USER, ""); return 0; }
        s->st = LOGIN;
        send_cmd(s, "a LOGIN %s %s\r\n", USER, PASS);
        return 0;
    case USER_SENT:
        if (!ok) return -1;
        s->st = PASS_SENT;
        send_cmd(s, "PASS %s\r\n", PASS, "");
        return 0;
    case LOGIN:
    case PASS_SENT:
        if (!pop3 && (l[0] == '*' || l[0] == '+')) return 0;
        if (!(pop3 ? ok : starts(l, n, "a OK"))) return -1;
        lat[n_lat++] = (now() - s->t0) * 1e3;
        ok_logins++;
        if (idle_mode) { s->st = IDLE; return 1; }
        s->st = LOGOUT;
        send_cmd(s, pop3 ? "QUIT\r\n" : "b LOGOUT\r\n", "", "");
        return 0;
    case LOGOUT:
        if (!pop3 && l[0] == '*') return 0;
        if (!(pop3 ? ok : starts(l, n, "b OK"))) return -1;
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
    if (n_sources) {
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr = sources[next_source]};
        next_source = (next_source + 1) % n_sources;
        setsockopt(s->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(s->fd, (struct sockaddr *)&src, sizeof src) < 0) {
            perror("bind");
            close(s->fd);
            s->fd = -1;
            return -1;
        }
    }
    s->t0 = now();
    s->st = CONNECTING;
    if (connect(s->fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        if (errno != ECONNREFUSED) perror("connect");
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
    if (s->ssl) {
        SSL_shutdown(s->ssl);   /* one close_notify, as a polite client sends; no waiting */
        SSL_free(s->ssl);
        s->ssl = NULL;
        ERR_clear_error();
    }
    close(s->fd);
    s->fd = -1;
}

/* Drive the TLS handshake. 1: done; 0: waiting for the socket; -1: failed. */
static int handshake(struct sess *s) {
    int r = SSL_connect(s->ssl);
    if (r == 1) {
        handshakes++;
        if (SSL_session_reused(s->ssl)) resumed++;
        s->st = GREETING;
        watch(s, EPOLLIN);
        return 1;
    }
    int err = SSL_get_error(s->ssl, r);
    if (err == SSL_ERROR_WANT_READ) { watch(s, EPOLLIN); return 0; }
    if (err == SSL_ERROR_WANT_WRITE) { watch(s, EPOLLOUT); return 0; }
    ERR_clear_error();
    return -1;
}

/* Read what is there: > 0 bytes, 0 EOF, -1 nothing more for now, -2 error. */
static ssize_t sess_read(struct sess *s, char *buf, size_t cap) {
    if (!s->ssl) {
        ssize_t n = read(s->fd, buf, cap);
        if (n < 0) return errno == EAGAIN ? -1 : -2;
        return n;
    }
    int n = SSL_read(s->ssl, buf, (int)cap);
    if (n > 0) return n;
    int err = SSL_get_error(s->ssl, n);
    ERR_clear_error();
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return -1;
    if (err == SSL_ERROR_ZERO_RETURN) return 0;
    return -2;
}

/* Handle one readiness event. Returns 1 when the session ended (slot free). */
static int sess_event(struct sess *s) {
    if (s->st == CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) { end_session(s, 0); return 1; }
        if (tls_mode) {
            s->ssl = SSL_new(tls_ctx);
            SSL_set_fd(s->ssl, s->fd);
            if (sni) SSL_set_tlsext_host_name(s->ssl, sni);
            if (tls_mode == 2 && last_session) SSL_set_session(s->ssl, last_session);
            s->st = HANDSHAKE;
        } else {
            s->st = GREETING;
            watch(s, EPOLLIN);
            return 0;
        }
    }
    if (s->st == HANDSHAKE) {
        int r = handshake(s);
        if (r < 0) { end_session(s, 0); return 1; }
        if (r == 0) return 0;
        /* fall through: the greeting may already be here */
    }
    char buf[16384];
    for (;;) {
        ssize_t n = sess_read(s, buf, sizeof buf);
        if (n == 0 || n == -2) {
            if (s->st == IDLE) dropped++;
            end_session(s, s->st == CLOSING || s->st == IDLE);
            return 1;
        }
        if (n == -1) return 0;
        int rc = feed(&s->rd, buf, (size_t)n, sess_line, s);
        if (rc < 0) { end_session(s, 0); return 1; }
        if (rc > 0) return 0;   /* logged in and idle: leave the socket alone */
    }
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
            if (!sess_event(s)) continue;
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
           "\"max_ms\": %.3f, \"handshakes\": %ld, \"resumed\": %ld, \"cpu_s\": %.4f}\n",
           ok_logins, failed, active, wall, ok_logins / wall, pct(lat, n_lat, .5),
           pct(lat, n_lat, .99), pct(lat, n_lat, 1), handshakes, resumed, cpu_self());
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
            int ended = sess_event(s);
            if (ended && before != IDLE) pending--;
            else if (s->st == IDLE && before != IDLE) pending--;
        }
        if (failed > count / 10 + 10) break;
        if (started == count && pending == 0) break;   /* all answered, some failed */
    }
    double wall = now() - t0;
    qsort(lat, (size_t)n_lat, sizeof *lat, cmp_double);
    long open_now = ok_logins - dropped;
    printf("{\"mode\": \"idle\", \"open\": %ld, \"failed\": %ld, \"seconds\": %.4f, "
           "\"p50_ms\": %.3f, \"p99_ms\": %.3f, \"max_ms\": %.3f, \"cpu_s\": %.4f}\n",
           open_now, failed, wall, pct(lat, n_lat, .5), pct(lat, n_lat, .99),
           pct(lat, n_lat, 1), cpu_self());
    fflush(stdout);
    /* Hold: watch stdin and the sessions (to count any the far end closes). */
    struct epoll_event in = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &in);
    for (int done = 0; !done;) {
        int n = epoll_wait(ep, evs, 256, 1000);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) { done = 1; continue; }
            sess_event(evs[i].data.ptr);
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
    char login[256];
    snprintf(login, sizeof login, "a LOGIN %s %s\r\n", USER, PASS);
    write_all(fd, login);
    if (await(fd, &rd, "a", buf, sizeof buf)) { fprintf(stderr, "login failed\n"); return 1; }
    double *flat = calloc(1 << 20, sizeof *flat);
    long fetches = 0;
    unsigned long long before = rd.lit_bytes;
    double t0 = now(), end = t0 + seconds;
    while (now() < end && fetches < (1 << 20)) {
        double t = now();
        write_all(fd, "c FETCH 1 BODY[]\r\n");
        if (await(fd, &rd, "c", buf, sizeof buf)) { fprintf(stderr, "fetch failed\n"); return 1; }
        flat[fetches++] = (now() - t) * 1e3;
    }
    double wall = now() - t0;
    unsigned long long bytes = rd.lit_bytes - before;
    write_all(fd, "d LOGOUT\r\n");
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

static int parse_sources(char *list) {
    for (char *a = strtok(list, ","); a; a = strtok(NULL, ",")) {
        if (n_sources == MAX_SOURCES || inet_pton(AF_INET, a, &sources[n_sources]) != 1) {
            fprintf(stderr, "bad source address %s\n", a);
            return -1;
        }
        n_sources++;
    }
    return 0;
}

static int usage(void) {
    fprintf(stderr, "usage: loadgen [-P imap|pop3] [-T full|resume] [-n SNI] [-s ADDR,...] "
                    "login|idle PORT COUNT CONCURRENCY SECONDS\n"
                    "       loadgen throughput PORT SECONDS\n");
    return 2;
}

int main(int argc, char **argv) {
    int opt;
    while ((opt = getopt(argc, argv, "+P:T:n:s:")) != -1) {
        if (opt == 'P') pop3 = strcmp(optarg, "pop3") == 0;
        else if (opt == 'T') tls_mode = strcmp(optarg, "resume") == 0 ? 2 : 1;
        else if (opt == 'n') sni = optarg;
        else if (opt == 's') { if (parse_sources(optarg)) return 2; }
        else return usage();
    }
    argc -= optind;
    argv += optind;
    if (argc < 3) return usage();
    signal(SIGPIPE, SIG_IGN);
    if (tls_mode) tls_init();
    target.sin_family = AF_INET;
    target.sin_port = htons(atoi(argv[1]));
    target.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (strcmp(argv[0], "throughput") == 0) return run_throughput(atof(argv[2]));
    if (argc < 5) return usage();
    long count = atol(argv[2]);
    int conc = atoi(argv[3]);
    double seconds = atof(argv[4]);
    if (strcmp(argv[0], "login") == 0) return run_sessions(count, conc, seconds);
    if (strcmp(argv[0], "idle") == 0) return run_idle(count, conc, seconds);
    return usage();
}
