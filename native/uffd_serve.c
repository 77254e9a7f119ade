// LiveMig's userfaultfd fault-service loop (post-copy destination).
//
// Why native: a .NET thread that faults on a missing page in code the JIT made partially
// interruptible cannot be stopped by the garbage collector until its fault is resolved; if the
// thread resolving faults is managed it may itself be waiting for that collection, and the
// process deadlocks (shared/field-notes.md, "Hazard: userfaultfd demand paging inside a .NET
// process"). So the whole path that resolves a fault — poll the userfaultfd, read the fault,
// send the page request on its own socket, receive the page, UFFDIO_COPY it — runs here, on a
// pthread that never calls into managed code and never waits for it. The source answers every
// request on this thread's connection, also for a page whose background push is still on its
// way: that push arrives through the managed main-connection reader, which a collection may
// hold while the collection waits for the faulting thread (the deadlock in docs/reliability.md).
//
// Shared with managed code (src/LiveMig/Memory/UffdDemandPager.cs), through lm_uffd_ctx:
//   present  one bit per page, set (atomically) after a page was placed; pages present from the
//            start whose memory is a hole are zero pages: their faults get UFFDIO_ZEROPAGE here.
//   hashes   xxHash3-64 of each page as this thread placed it (verification).
// The faulting threads may be another process's (a QEMU guest's vCPUs: the userfaultfd is the one
// the agent in QEMU registered, native/qemu_dirty_agent.c 'U', and base is QEMU's address of the
// RAM mapping); nothing here depends on whose they are.
// Wire format: LiveMig frames (docs/protocol.md): PageRequest out, PageBatch (raw/zero) in; on a
// connection secured by TLS, inside the record layer that follows the handshake (docs/protocol.md,
// "After TLS"; src/LiveMig/Transport/AeadStream.cs): u32 length n | n bytes AES-256-GCM | 16-byte
// tag, the length as associated data, nonce = IV xor the record's sequence number. The managed
// stream lends this thread its keys and sequence numbers with the socket.
#define _GNU_SOURCE
#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

// libxxhash.so.0 (Debian libxxhash0): the same XXH3-64 as .NET's System.IO.Hashing.XxHash3.
extern unsigned long long XXH3_64bits(const void *data, size_t len);
extern unsigned long long XXH3_64bits_withSeed(const void *data, size_t len, unsigned long long seed);

#define PAGE 4096
#define FRAME_MAGIC 0x31464D4Cu
#define T_PAGEBATCH 4
#define T_ERROR 11
#define T_PAGEREQUEST 34
#define T_LATEZEROS 39
#define MAX_FRAME ((2 << 20) + 16)
#define MAX_OUT 65536
#define MAX_REQ 4096
#define MAX_RECORD (256 * 1024)
#define TAG 16

// libcrypto (OpenSSL 3, always there: .NET itself needs it): AES-256-GCM through EVP. Declared here
// rather than taken from <openssl/evp.h> so the build needs no -dev package.
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
extern EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
extern void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *c);
extern const EVP_CIPHER *EVP_aes_256_gcm(void);
extern int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *c, int type, int arg, void *ptr);
extern int EVP_EncryptInit_ex(EVP_CIPHER_CTX *c, const EVP_CIPHER *t, void *impl, const unsigned char *key, const unsigned char *iv);
extern int EVP_EncryptUpdate(EVP_CIPHER_CTX *c, unsigned char *out, int *outl, const unsigned char *in, int inl);
extern int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *c, unsigned char *out, int *outl);
extern int EVP_DecryptInit_ex(EVP_CIPHER_CTX *c, const EVP_CIPHER *t, void *impl, const unsigned char *key, const unsigned char *iv);
extern int EVP_DecryptUpdate(EVP_CIPHER_CTX *c, unsigned char *out, int *outl, const unsigned char *in, int inl);
extern int EVP_DecryptFinal_ex(EVP_CIPHER_CTX *c, unsigned char *out, int *outl);
#define EVP_CTRL_GCM_GET_TAG 0x10
#define EVP_CTRL_GCM_SET_TAG 0x11

// Keep in step with UffdDemandPager.Ctx (sequential layout, 8-byte fields).
typedef struct {
    int64_t uffd, ctl, notify;
    uint64_t base, page_count;
    uint64_t *present;
    uint64_t *hashes;       // may be NULL
    int64_t *lat_ns;        // latency samples (fault read -> page placed), ns
    uint64_t lat_cap;
    // commands, under mu
    int64_t next_sock;      // socket to use from now on (-1: none)
    uint64_t sock_gen;      // bumped by lm_uffd_set_socket
    uint64_t sock_ack;      // the generation the thread has adopted
    int64_t stop, abandon;
    // status
    int64_t sock;
    uint64_t lat_count, faults, zero_faults, requests, placed, eexist, frames_in, dropped, errors;
    uint64_t placed_zero;   // of placed: zero markers (the rest were raw pages)
    uint64_t bytes_in;      // bytes read from page-request sockets
    uint64_t thread;        // pthread_t
    char error[256];
    char why[256];          // why the last connection was dropped
    // The record layer of the next socket (set with it, read when the thread adopts it).
    int64_t next_aead;      // 1: TLS records, with the keys below; 0: plain frames
    uint64_t next_send_seq, next_recv_seq;
    uint8_t next_send_key[32], next_recv_key[32];
    uint8_t next_send_iv[16], next_recv_iv[16]; // 12 bytes used
    uint64_t late_zero;     // of placed: pages a LateZeros frame made present (nothing placed)
} lm_uffd_ctx;

// One connection's record layer, as this thread keeps it.
typedef struct {
    int on;
    EVP_CIPHER_CTX *enc, *dec;
    uint8_t send_iv[12], recv_iv[12];
    uint64_t send_seq, recv_seq;
} aead;

static void aead_nonce(uint8_t *nonce, const uint8_t *iv, uint64_t seq) {
    memcpy(nonce, iv, 12);
    for (int i = 0; i < 8; i++) nonce[11 - i] ^= (uint8_t)(seq >> (8 * i)); // big-endian seq into the last 8 bytes
}

// Adopts the socket's record layer from the context (under mu); 0, or -1 when libcrypto refuses.
static int aead_adopt(aead *a, lm_uffd_ctx *c) {
    a->on = (int)c->next_aead;
    if (!a->on) return 0;
    memcpy(a->send_iv, c->next_send_iv, 12);
    memcpy(a->recv_iv, c->next_recv_iv, 12);
    a->send_seq = c->next_send_seq;
    a->recv_seq = c->next_recv_seq;
    if (!a->enc) a->enc = EVP_CIPHER_CTX_new();
    if (!a->dec) a->dec = EVP_CIPHER_CTX_new();
    if (!a->enc || !a->dec) return -1;
    if (EVP_EncryptInit_ex(a->enc, EVP_aes_256_gcm(), NULL, c->next_send_key, NULL) != 1) return -1;
    if (EVP_DecryptInit_ex(a->dec, EVP_aes_256_gcm(), NULL, c->next_recv_key, NULL) != 1) return -1;
    return 0;
}

// Seals plain[0..n) as one record into out (4 + n + 16 bytes); the record's size, or -1.
static int aead_seal(aead *a, const uint8_t *plain, int n, uint8_t *out) {
    uint8_t nonce[12];
    int l = 0;
    uint32_t len = (uint32_t)n;
    memcpy(out, &len, 4);
    aead_nonce(nonce, a->send_iv, a->send_seq);
    if (EVP_EncryptInit_ex(a->enc, NULL, NULL, NULL, nonce) != 1) return -1;
    if (EVP_EncryptUpdate(a->enc, NULL, &l, out, 4) != 1) return -1;
    if (EVP_EncryptUpdate(a->enc, out + 4, &l, plain, n) != 1 || l != n) return -1;
    if (EVP_EncryptFinal_ex(a->enc, out + 4 + n, &l) != 1) return -1;
    if (EVP_CIPHER_CTX_ctrl(a->enc, EVP_CTRL_GCM_GET_TAG, TAG, out + 4 + n) != 1) return -1;
    a->send_seq++;
    return 4 + n + TAG;
}

// Opens the record at rec (its header says n bytes) into plain; 0, or -1 when it fails authentication.
static int aead_open(aead *a, const uint8_t *rec, int n, uint8_t *plain) {
    uint8_t nonce[12], tag[TAG];
    int l = 0;
    aead_nonce(nonce, a->recv_iv, a->recv_seq);
    memcpy(tag, rec + 4 + n, TAG);
    if (EVP_DecryptInit_ex(a->dec, NULL, NULL, NULL, nonce) != 1) return -1;
    if (EVP_DecryptUpdate(a->dec, NULL, &l, rec, 4) != 1) return -1;
    if (EVP_DecryptUpdate(a->dec, plain, &l, rec + 4, n) != 1 || l != n) return -1;
    if (EVP_CIPHER_CTX_ctrl(a->dec, EVP_CTRL_GCM_SET_TAG, TAG, tag) != 1) return -1;
    if (EVP_DecryptFinal_ex(a->dec, plain + n, &l) != 1) return -1;
    a->recv_seq++;
    return 0;
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int test_bit(const uint64_t *w, uint64_t p) {
    return (__atomic_load_n(&w[p >> 6], __ATOMIC_ACQUIRE) >> (p & 63)) & 1;
}

static void set_bit(uint64_t *w, uint64_t p) {
    __atomic_fetch_or(&w[p >> 6], 1ull << (p & 63), __ATOMIC_SEQ_CST);
}

static void signal_fd(int64_t fd) {
    uint64_t one = 1;
    ssize_t r = write((int)fd, &one, sizeof one);
    (void)r;
}

static void fail(lm_uffd_ctx *c, const char *what, int err) {
    __atomic_fetch_add(&c->errors, 1, __ATOMIC_RELAXED);
    snprintf(c->error, sizeof c->error, "%s: %s (errno %d)", what, strerror(err), err);
}

// Places zeros; 0 on success, 1 if the page was already there, -1 on error.
static int zeropage(lm_uffd_ctx *c, uint64_t page, const uint8_t *zero) {
    struct uffdio_zeropage z = { .range = { .start = c->base + page * PAGE, .len = PAGE }, .mode = 0 };
    for (;;) {
        if (ioctl((int)c->uffd, UFFDIO_ZEROPAGE, &z) == 0) return 0;
        if (errno == EEXIST) return 1;
        if (errno == EAGAIN || errno == EINTR) continue;
        if (errno == EINVAL) { // some kernels lack ZEROPAGE on shmem: copy a zero page instead
            struct uffdio_copy cp = { .dst = c->base + page * PAGE, .src = (uint64_t)zero, .len = PAGE, .mode = 0 };
            if (ioctl((int)c->uffd, UFFDIO_COPY, &cp) == 0) return 0;
            if (errno == EEXIST) return 1;
            if (errno == EAGAIN || errno == EINTR) { z.zeropage = 0; continue; }
        }
        fail(c, "UFFDIO_ZEROPAGE", errno);
        return -1;
    }
}

static int copypage(lm_uffd_ctx *c, uint64_t page, const uint8_t *src) {
    struct uffdio_copy cp = { .dst = c->base + page * PAGE, .src = (uint64_t)src, .len = PAGE, .mode = 0 };
    for (;;) {
        if (ioctl((int)c->uffd, UFFDIO_COPY, &cp) == 0) return 0;
        if (errno == EEXIST) return 1;
        if (errno == EAGAIN || errno == EINTR) { cp.copy = 0; continue; }
        fail(c, "UFFDIO_COPY", errno);
        return -1;
    }
}

static void wake(lm_uffd_ctx *c, uint64_t page) {
    struct uffdio_range r = { .start = c->base + page * PAGE, .len = PAGE };
    ioctl((int)c->uffd, UFFDIO_WAKE, &r);
}

static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static int send_all(int sock, const uint8_t *b, size_t n) {
    while (n > 0) {
        ssize_t r = send(sock, b, n, MSG_NOSIGNAL);
        if (r > 0) { b += r; n -= (size_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd p = { .fd = sock, .events = POLLOUT };
            if (poll(&p, 1, 5000) <= 0) return -1;
            continue;
        }
        return -1;
    }
    return 0;
}

#define REQ_BUF (16 + 4 + MAX_REQ * 4)

// One PageRequest frame for pages[0..n), built in buf (REQ_BUF bytes; one per thread: several
// pagers may serve at once in one process), sealed into sealed (REQ_BUF + 4 + TAG bytes) under TLS.
static int send_request(uint8_t *buf, uint8_t *sealed, aead *a, int sock, const uint64_t *pages, int n) {
    uint32_t len = 4 + 4 * (uint32_t)n;
    uint8_t *p = buf + 16;
    uint32_t cnt = (uint32_t)n;
    memcpy(p, &cnt, 4);
    for (int i = 0; i < n; i++) { uint32_t pg = (uint32_t)pages[i]; memcpy(p + 4 + 4 * i, &pg, 4); }
    uint32_t magic = FRAME_MAGIC;
    memcpy(buf, &magic, 4);
    buf[4] = T_PAGEREQUEST; buf[5] = 0; buf[6] = 0; buf[7] = 0;
    memcpy(buf + 8, &len, 4);
    uint32_t sum = (uint32_t)XXH3_64bits_withSeed(p, len, rd64(buf));
    memcpy(buf + 12, &sum, 4);
    if (!a->on) return send_all(sock, buf, 16 + len);
    int r = aead_seal(a, buf, (int)(16 + len), sealed);
    if (r < 0) { errno = EPROTO; return -1; }
    return send_all(sock, sealed, (size_t)r);
}

typedef struct { uint64_t page, t; } outstanding;

// A LateZeros frame (S->D): u64 first page (a multiple of 64) | u32 n | n x u64 bitmap words.
// The pages whose bits are set were announced as still to come at the switch and turned out
// zero (the source learned it after the resume): they become present as zero pages without
// being placed (they are holes: a later fault gets UFFDIO_ZEROPAGE above). Pages already
// present are left alone. 0, or -1 for a malformed frame.
static int mark_zero(lm_uffd_ctx *c, const uint8_t *pl, uint32_t len, uint64_t zero_hash) {
    if (len < 12) return -1;
    uint64_t first = rd64(pl);
    uint32_t n = rd32(pl + 8);
    if (first % 64 || len != 12 + (uint64_t)n * 8) return -1;
    uint64_t words = (c->page_count + 63) / 64;
    if (first / 64 > words || n > words - first / 64) return -1;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t bits = rd64(pl + 12 + (size_t)i * 8);
        while (bits) {
            uint64_t page = first + (uint64_t)i * 64 + (uint64_t)__builtin_ctzll(bits);
            bits &= bits - 1;
            if (page >= c->page_count) return -1;
            if (test_bit(c->present, page)) continue;
            if (c->hashes) c->hashes[page] = zero_hash;
            set_bit(c->present, page);
            __atomic_fetch_add(&c->late_zero, 1, __ATOMIC_RELAXED);
            __atomic_fetch_add(&c->placed, 1, __ATOMIC_SEQ_CST);
        }
    }
    return 0;
}

static void *serve(void *arg) {
    lm_uffd_ctx *c = arg;
    // Faulting vCPUs wait on this thread: a higher weight than the push, placing and guest threads
    // (nice -10; needs root or CAP_SYS_NICE, else it stays at 0).
    (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), -10); // not permitted: the default weight
    // Room for the largest frame, and under TLS one more record after a partial frame (so every record opens).
    uint8_t *rx = malloc(MAX_FRAME + MAX_RECORD);
    uint8_t *bounce = aligned_alloc(PAGE, PAGE);
    uint8_t *zero = aligned_alloc(PAGE, PAGE);
    outstanding *out = malloc(sizeof(outstanding) * MAX_OUT);
    uint64_t *req = malloc(sizeof(uint64_t) * MAX_REQ);
    uint8_t *reqbuf = malloc(REQ_BUF);
    uint8_t *sealed = malloc(REQ_BUF + 4 + TAG);
    // Under TLS: records as they come off the socket, before they are opened into rx.
    const size_t crx_cap = 2 * (4 + MAX_RECORD + TAG);
    uint8_t *crx = malloc(crx_cap);
    size_t crx_len = 0;
    aead tls = { 0 };
    size_t rx_len = 0;
    int n_out = 0, sock = -1, abandoned = 0;
    uint64_t my_gen = 0;
    memset(zero, 0, PAGE);
    uint64_t zero_hash = XXH3_64bits(zero, PAGE);
    if (!rx || !bounce || !zero || !out || !req || !reqbuf || !sealed || !crx) { fail(c, "malloc", ENOMEM); goto done; }

    for (;;) {
        struct pollfd p[3] = { { .fd = (int)c->uffd, .events = POLLIN }, { .fd = (int)c->ctl, .events = POLLIN }, { .fd = sock, .events = POLLIN } };
        int r = poll(p, sock >= 0 ? 3 : 2, -1);
        if (r < 0) { if (errno == EINTR) continue; fail(c, "poll", errno); break; }

        if (p[1].revents & POLLIN) {
            uint64_t v;
            ssize_t rr = read((int)c->ctl, &v, sizeof v);
            (void)rr;
            pthread_mutex_lock(&mu);
            int stop = (int)c->stop;
            abandoned = (int)c->abandon;
            if (c->sock_gen != my_gen) {
                my_gen = c->sock_gen;
                sock = (int)c->next_sock;
                if (sock >= 0 && aead_adopt(&tls, c) != 0) { fail(c, "libcrypto AES-256-GCM setup", EPROTO); sock = -1; }
                c->sock = sock;
                rx_len = 0;
                crx_len = 0;
                c->sock_ack = my_gen;
                pthread_cond_broadcast(&cv);
            }
            pthread_mutex_unlock(&mu);
            if (stop) break;
            if (abandoned) {
                // The migration is over without these pages: release the waiting vCPUs (the
                // managed access path sees the page is still not present and stops the vCPU).
                for (int i = 0; i < n_out; i++) zeropage(c, out[i].page, zero);
                n_out = 0;
            } else if (sock >= 0 && n_out > 0) {
                // A new connection: ask again for every page still awaited.
                int k = 0;
                for (int i = 0; i < n_out; i++) {
                    if (test_bit(c->present, out[i].page)) continue;
                    req[k++] = out[i].page;
                    if (k == MAX_REQ) { if (send_request(reqbuf, sealed, &tls, sock, req, k) == 0) c->requests += k; k = 0; }
                }
                if (k > 0 && send_request(reqbuf, sealed, &tls, sock, req, k) == 0) c->requests += k;
            }
        }

        if (p[0].revents & POLLIN) {
            struct uffd_msg msgs[64];
            ssize_t n = read((int)c->uffd, msgs, sizeof msgs);
            int k = 0;
            for (ssize_t i = 0; n > 0 && i < n / (ssize_t)sizeof(struct uffd_msg); i++) {
                if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
                uint64_t page = (msgs[i].arg.pagefault.address - c->base) / PAGE;
                if (page >= c->page_count) continue;
                __atomic_fetch_add(&c->faults, 1, __ATOMIC_RELAXED);
                if (test_bit(c->present, page) || abandoned) {
                    // Final content is zero (a hole that was never going to come), or the page
                    // was placed meanwhile (then ZEROPAGE finds it there and we only wake).
                    if (!abandoned) __atomic_fetch_add(&c->zero_faults, 1, __ATOMIC_RELAXED);
                    if (zeropage(c, page, zero) == 1) wake(c, page);
                    continue;
                }
                int known = 0;
                for (int j = 0; j < n_out; j++) if (out[j].page == page) { known = 1; break; }
                if (known) continue; // a second vCPU on the same page: already asked
                if (n_out < MAX_OUT) { out[n_out].page = page; out[n_out].t = now_ns(); n_out++; }
                if (k < MAX_REQ) req[k++] = page;
            }
            if (k > 0 && sock >= 0) {
                if (send_request(reqbuf, sealed, &tls, sock, req, k) == 0) __atomic_fetch_add(&c->requests, k, __ATOMIC_RELAXED);
                else { snprintf(c->why, sizeof c->why, "sending a request: %s", strerror(errno)); sock = -1; c->sock = -1; c->dropped++; signal_fd(c->notify); }
            }
        }

        if (sock >= 0 && (p[2].revents & POLLNVAL)) { snprintf(c->why, sizeof c->why, "socket closed under the thread"); sock = -1; c->sock = -1; c->dropped++; signal_fd(c->notify); continue; }
        if (sock >= 0 && (p[2].revents & (POLLIN | POLLHUP | POLLERR))) {
            ssize_t n = tls.on ? recv(sock, crx + crx_len, crx_cap - crx_len, MSG_DONTWAIT) : recv(sock, rx + rx_len, MAX_FRAME - rx_len, MSG_DONTWAIT);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                // The connection is gone: keep the faults, wait for the next one.
                snprintf(c->why, sizeof c->why, "%s", n == 0 ? "end of stream" : strerror(errno));
                sock = -1; c->sock = -1; c->dropped++; signal_fd(c->notify);
                continue;
            }
            if (n > 0) { if (tls.on) crx_len += (size_t)n; else rx_len += (size_t)n; __atomic_fetch_add(&c->bytes_in, (uint64_t)n, __ATOMIC_RELAXED); }
            int bad = 0;
            char tls_bad[200] = "";
            // Under TLS: open the records that fit into rx, place the frames they complete, and again
            // while records wait for room (a frame may span several records; rx holds the largest frame).
            for (int again = 1; again && !bad;) {
                again = 0;
                size_t at = 0;
                if (tls.on) {
                    size_t cat = 0;
                    while (crx_len - cat >= 4) {
                        uint32_t rn = rd32(crx + cat);
                        if (rn == 0 || rn > MAX_RECORD) { bad = 1; snprintf(tls_bad, sizeof tls_bad, "TLS record %llu: length %u outside 1..%d", (unsigned long long)tls.recv_seq, rn, MAX_RECORD); break; }
                        if (crx_len - cat < 4 + (size_t)rn + TAG) break;
                        if (rx_len + rn > MAX_FRAME + MAX_RECORD) { again = 1; break; } // place the frames before it first
                        if (aead_open(&tls, crx + cat, (int)rn, rx + rx_len) != 0) { bad = 1; snprintf(tls_bad, sizeof tls_bad, "TLS record %llu failed authentication: changed, dropped or replayed in transit", (unsigned long long)tls.recv_seq); break; }
                        rx_len += rn;
                        cat += 4 + rn + TAG;
                    }
                    memmove(crx, crx + cat, crx_len - cat);
                    crx_len -= cat;
                }
                while (!bad && rx_len - at >= 16) {
                    const uint8_t *h = rx + at;
                    uint32_t len = rd32(h + 8);
                    if (rd32(h) != FRAME_MAGIC || h[5] || h[6] || h[7] || len > MAX_FRAME - 16) { bad = 1; break; }
                    if (rx_len - at < 16 + (size_t)len) break;
                    const uint8_t *pl = h + 16;
                    if ((uint32_t)XXH3_64bits_withSeed(pl, len, rd64(h)) != rd32(h + 12) || (h[4] != T_PAGEBATCH && h[4] != T_LATEZEROS) || len < 8) { bad = 1; break; }
                    c->frames_in++;
                    if (h[4] == T_LATEZEROS) {
                        if (mark_zero(c, pl, len, zero_hash) != 0) { bad = 1; break; }
                        at += 16 + len;
                        continue;
                    }
                    uint32_t count = rd32(pl + 4);
                    size_t e = 8;
                    uint64_t t = 0;
                    for (uint32_t i = 0; i < count && !bad; i++) {
                        if (len - e < 8) { bad = 1; break; }
                        uint64_t page = rd32(pl + e);
                        uint8_t enc = pl[e + 4];
                        uint16_t plen = rd16(pl + e + 6);
                        e += 8;
                        if (page >= c->page_count || pl[e - 3] != 0 || len - e < plen) { bad = 1; break; }
                        int res;
                        uint64_t hash;
                        // Present already: placed by the push, or marked zero by a LateZeros frame (then absent
                        // from memory, and a thread may wait on it: placing it wakes that thread; its content is
                        // zero either way). Not counted again.
                        if (test_bit(c->present, page)) {
                            if (enc == 1 && plen == 0) res = zeropage(c, page, zero);
                            else if (enc == 0 && plen == PAGE) { memcpy(bounce, pl + e, PAGE); res = copypage(c, page, bounce); }
                            else { bad = 1; break; }
                            if (res == 1) wake(c, page);
                            if (res >= 0) res = 1;
                            hash = 0;
                        }
                        else if (enc == 1 && plen == 0) { res = zeropage(c, page, zero); hash = zero_hash; }
                        else if (enc == 0 && plen == PAGE) { memcpy(bounce, pl + e, PAGE); res = copypage(c, page, bounce); hash = res == 0 ? XXH3_64bits(bounce, PAGE) : 0; }
                        else { bad = 1; break; }
                        e += plen;
                        if (res < 0) { bad = 1; break; }
                        if (res == 1) { c->eexist++; continue; }
                        if (c->hashes) c->hashes[page] = hash;
                        set_bit(c->present, page);
                        if (enc == 1) __atomic_fetch_add(&c->placed_zero, 1, __ATOMIC_RELAXED);
                        __atomic_fetch_add(&c->placed, 1, __ATOMIC_SEQ_CST);
                        for (int j = 0; j < n_out; j++) {
                            if (out[j].page != page) continue;
                            if (!t) t = now_ns();
                            uint64_t idx = __atomic_fetch_add(&c->lat_count, 1, __ATOMIC_RELAXED);
                            if (idx < c->lat_cap) c->lat_ns[idx] = (int64_t)(t - out[j].t);
                            out[j] = out[--n_out];
                            break;
                        }
                    }
                    if (bad || e != len) { bad = 1; break; }
                    at += 16 + len;
                }
                if (bad) break;
                memmove(rx, rx + at, rx_len - at);
                rx_len -= at;
                if (at == 0) again = 0; // no frame completed: more bytes must come first
            }
            if (bad) {
                snprintf(c->error, sizeof c->error, "%s", tls_bad[0] ? tls_bad : "bad frame on the page-request connection");
                c->errors++;
                sock = -1; c->sock = -1; c->dropped++; signal_fd(c->notify);
                rx_len = 0;
                crx_len = 0;
                continue;
            }
        }

        // Faults resolved by the background push (managed UFFDIO_COPY woke the vCPU): timed as
        // they are noticed here — at the latest when their own answer arrives (the source answers
        // every request), so an upper bound — and forgotten.
        uint64_t noticed = 0;
        for (int j = 0; j < n_out;) {
            if (test_bit(c->present, out[j].page)) {
                if (!noticed) noticed = now_ns();
                uint64_t idx = __atomic_fetch_add(&c->lat_count, 1, __ATOMIC_RELAXED);
                if (idx < c->lat_cap) c->lat_ns[idx] = (int64_t)(noticed - out[j].t);
                out[j] = out[--n_out];
            }
            else j++;
        }
    }
done:
    free(rx); free(bounce); free(zero); free(out); free(req); free(reqbuf); free(sealed); free(crx);
    if (tls.enc) EVP_CIPHER_CTX_free(tls.enc);
    if (tls.dec) EVP_CIPHER_CTX_free(tls.dec);
    pthread_mutex_lock(&mu);
    c->sock = -1;
    c->sock_ack = c->sock_gen;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    signal_fd(c->notify);
    return NULL;
}

int lm_uffd_start(lm_uffd_ctx *c) {
    pthread_t t;
    c->sock = -1;
    int r = pthread_create(&t, NULL, serve, c);
    if (r != 0) return -r;
    c->thread = (uint64_t)t;
    pthread_setname_np(t, "livemig-uffd"); // for stacks and /proc: not the name of the managed thread that made it
    return 0;
}

// Hands the thread a new socket (-1: none) and waits until it uses it and no longer the old one.
void lm_uffd_set_socket(lm_uffd_ctx *c, int64_t sock) {
    pthread_mutex_lock(&mu);
    c->next_sock = sock;
    uint64_t gen = ++c->sock_gen;
    signal_fd(c->ctl);
    while (c->sock_ack < gen) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
}

// Stops using sock if it is the socket in use (or about to be); then the caller may close it.
void lm_uffd_release_socket(lm_uffd_ctx *c, int64_t sock) {
    pthread_mutex_lock(&mu);
    if (c->next_sock == sock && (c->sock == sock || c->sock_ack < c->sock_gen)) {
        c->next_sock = -1;
        uint64_t gen = ++c->sock_gen;
        signal_fd(c->ctl);
        while (c->sock_ack < gen) pthread_cond_wait(&cv, &mu);
    }
    pthread_mutex_unlock(&mu);
}

// Releases every waiting vCPU without its page (the migration failed for good).
void lm_uffd_abandon(lm_uffd_ctx *c) {
    pthread_mutex_lock(&mu);
    c->abandon = 1;
    pthread_mutex_unlock(&mu);
    signal_fd(c->ctl);
}

// Waits up to timeout_ms for the thread to report something (a dropped connection, its end); 1 if it did.
int lm_uffd_wait(lm_uffd_ctx *c, int timeout_ms) {
    struct pollfd p = { .fd = (int)c->notify, .events = POLLIN };
    int r = poll(&p, 1, timeout_ms);
    if (r > 0) { uint64_t v; ssize_t rr = read((int)c->notify, &v, sizeof v); (void)rr; return 1; }
    return 0;
}

void lm_uffd_stop(lm_uffd_ctx *c) {
    pthread_mutex_lock(&mu);
    c->stop = 1;
    pthread_mutex_unlock(&mu);
    signal_fd(c->ctl);
    pthread_join((pthread_t)c->thread, NULL);
}

// For the managed side: the struct size it must allocate (checked at start-up).
int64_t lm_uffd_ctx_size(void) { return (int64_t)sizeof(lm_uffd_ctx); }
