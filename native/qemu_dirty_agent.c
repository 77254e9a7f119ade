// LiveMig's agent inside QEMU (LD_PRELOAD), for a QEMU guest's RAM file: dirty-page tracking
// (pre-copy, the source) and the userfaultfd of post-copy's demand paging (the destination).
//
// Why inside QEMU: userfaultfd asynchronous write-protect with PAGEMAP_SCAN finds exactly the
// pages written since the last scan, cheaply (0.1 ms per 64 MiB here), but only for a mapping
// in the process that registered it: writes through QEMU's own mapping of the RAM file are
// invisible to a registration in LiveMig's process (shared/field-notes.md). So this small
// library is preloaded into QEMU (QemuProcess sets LD_PRELOAD) and serves LiveMig on a Unix
// socket; LiveMig's side is src/LiveMig/Qemu/QemuAgentDirtyLog.cs (and QemuAgentFaults.cs for 'U'/'R'). Without it (or where the
// kernel lacks the mechanism) LiveMig compares page hashes instead (PageHashDirtyLog).
//
// Environment (set by LiveMig; without both the agent does nothing):
//   LIVEMIG_AGENT_SOCKET  the socket to listen on (in the guest's private run directory)
//   LIVEMIG_AGENT_RAM     the RAM file whose shared mapping (QEMU's memory-backend-file) to track
//
// Protocol, one client at a time, each request one byte, each answer:
//   u8 status ('O' ok, 'E' error) | u64 n (little-endian) | payload
//   'S' start:   find the mapping, register it (UFFDIO_REGISTER_MODE_WP), write-protect it;
//                n = its size in pages. Every page starts clean.
//   'H' harvest: PAGEMAP_SCAN (written pages, re-protected in the same ioctl), in batches:
//                answers with n >= 1 ranges each (u64 first page | u64 page count, pages of the
//                mapping), then one answer with n = 0 that ends the harvest.
//   'X' stop:    unregister; n = 0.
//   'U' faults:  (post-copy destination, before QEMU loads the device state) register the mapping
//                with a new userfaultfd in MISSING mode and hand LiveMig the descriptor
//                (SCM_RIGHTS on this answer's header, as CRIU's lazy-pages daemon receives one);
//                n = 2, payload u64 mapping address | u64 mapping length in bytes. LiveMig serves
//                QEMU's faults from its native loop (native/uffd_serve.c) with UFFDIO_COPY at
//                these addresses: the descriptor carries QEMU's address space. The agent keeps its
//                own copy open until 'R': should LiveMig die, QEMU's faulting threads keep waiting
//                (until QEMU is killed) rather than being woken onto zero pages.
//   'R' release: unregister the MISSING range and close the agent's copy (every page has arrived); n = 0.
//   An error's payload is n bytes of text (one line). The thread never touches guest memory.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define PAGE 4096

// Newer than the libc headers of Debian 12: the ABI of include/uapi/linux/userfaultfd.h and fs.h (6.7+).
#define LM_UFFD_USER_MODE_ONLY 1
#define LM_FEATURE_WP_HUGETLBFS_SHMEM (1ULL << 12)
#define LM_FEATURE_WP_UNPOPULATED (1ULL << 13)
#define LM_FEATURE_WP_ASYNC (1ULL << 15)
#define LM_PAGEMAP_SCAN 0xC0606610UL
#define LM_PM_SCAN_WP_MATCHING 1ULL
#define LM_PM_SCAN_CHECK_WPASYNC 2ULL
#define LM_PAGE_IS_WRITTEN (1ULL << 1)
#define REGIONS 4096

struct lm_page_region { uint64_t start, end, categories; };
struct lm_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

static char ram_path[4096];
static uint64_t base, length;
static int uffd = -1, pagemap = -1;
static int fault_uffd = -1;   // 'U': MISSING registration, kept until 'R'
static uint64_t fault_base, fault_length;
static struct lm_page_region regions[REGIONS];
static uint64_t out[2 * REGIONS];

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n > 0) {
        ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        c += w; n -= (size_t)w;
    }
    return 0;
}

static int answer(int fd, char status, uint64_t n, const void *payload, size_t bytes) {
    char head[9];
    head[0] = status;
    memcpy(head + 1, &n, 8); // x86_64: little-endian
    if (write_all(fd, head, sizeof head) != 0) return -1;
    return bytes ? write_all(fd, payload, bytes) : 0;
}

static int fail(int fd, const char *what) {
    char msg[512];
    int n = snprintf(msg, sizeof msg, "%s: %s", what, strerror(errno));
    if (n < 0) n = 0;
    if (n > (int)sizeof msg - 1) n = sizeof msg - 1;
    return answer(fd, 'E', (uint64_t)n, msg, (size_t)n);
}

// The shared mapping of the RAM file in /proc/self/maps (QEMU maps it once, read-write, shared).
static int find_mapping(void) {
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f) return -1;
    char line[8192];
    base = length = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char perms[8];
        int path_at = 0;
        if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %n", &lo, &hi, perms, &path_at) < 3 || path_at == 0) continue;
        char *path = line + path_at;
        path[strcspn(path, "\n")] = 0;
        if (strcmp(path, ram_path) != 0 || perms[1] != 'w' || perms[3] != 's') continue;
        if (hi - lo > length) { base = lo; length = hi - lo; }
    }
    fclose(f);
    if (length == 0) { errno = ENOENT; return -1; }
    return 0;
}

static void stop_tracking(void) {
    if (uffd >= 0) {
        struct uffdio_range r = { .start = base, .len = length };
        ioctl(uffd, UFFDIO_UNREGISTER, &r);
        close(uffd);
        uffd = -1;
    }
    if (pagemap >= 0) { close(pagemap); pagemap = -1; }
}

static int start_tracking(int fd) {
    stop_tracking();
    if (find_mapping() != 0) return fail(fd, "no shared writable mapping of the RAM file in QEMU");
    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0) uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | LM_UFFD_USER_MODE_ONLY);
    if (uffd < 0) return fail(fd, "userfaultfd");
    struct uffdio_api api = { .api = UFFD_API, .features = LM_FEATURE_WP_ASYNC | LM_FEATURE_WP_UNPOPULATED | LM_FEATURE_WP_HUGETLBFS_SHMEM };
    if (ioctl(uffd, UFFDIO_API, &api) != 0) { int e = errno; stop_tracking(); errno = e; return fail(fd, "UFFDIO_API with asynchronous write-protect (kernel older than 6.7?)"); }
    struct uffdio_register reg = { .range = { .start = base, .len = length }, .mode = UFFDIO_REGISTER_MODE_WP };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) { int e = errno; stop_tracking(); errno = e; return fail(fd, "UFFDIO_REGISTER(WP) of the RAM mapping"); }
    struct uffdio_writeprotect wp = { .range = { .start = base, .len = length }, .mode = UFFDIO_WRITEPROTECT_MODE_WP };
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) != 0) { int e = errno; stop_tracking(); errno = e; return fail(fd, "UFFDIO_WRITEPROTECT"); }
    pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pagemap < 0) { int e = errno; stop_tracking(); errno = e; return fail(fd, "open /proc/self/pagemap"); }
    return answer(fd, 'O', length / PAGE, NULL, 0);
}

static int harvest(int fd) {
    if (uffd < 0) { errno = EINVAL; return fail(fd, "harvest before start"); }
    // Ranges are sent in batches of at most REGIONS: a count, then the pairs; a final count of 0 ends it.
    uint64_t start = base, end = base + length;
    while (start < end) {
        struct lm_pm_scan_arg arg = {
            .size = sizeof arg, .flags = LM_PM_SCAN_WP_MATCHING | LM_PM_SCAN_CHECK_WPASYNC,
            .start = start, .end = end, .vec = (uint64_t)(uintptr_t)regions, .vec_len = REGIONS,
            .category_mask = LM_PAGE_IS_WRITTEN, .return_mask = LM_PAGE_IS_WRITTEN,
        };
        int n = ioctl(pagemap, LM_PAGEMAP_SCAN, &arg);
        if (n < 0) return fail(fd, "PAGEMAP_SCAN");
        for (int i = 0; i < n; i++) {
            out[2 * i] = (regions[i].start - base) / PAGE;
            out[2 * i + 1] = (regions[i].end - regions[i].start) / PAGE;
        }
        if (n > 0 && answer(fd, 'O', (uint64_t)n, out, (size_t)n * 16) != 0) return -1;
        if (arg.walk_end <= start) break;
        start = arg.walk_end;
    }
    return answer(fd, 'O', 0, NULL, 0);
}

static void release_faults(void) {
    if (fault_uffd < 0) return;
    struct uffdio_range r = { .start = fault_base, .len = fault_length };
    ioctl(fault_uffd, UFFDIO_UNREGISTER, &r);
    close(fault_uffd);
    fault_uffd = -1;
}

// The answer to 'U', with the descriptor attached to its header.
static int answer_with_fd(int fd, int passed) {
    char head[9] = { 'O' };
    uint64_t n = 2, payload[2] = { fault_base, fault_length };
    memcpy(head + 1, &n, 8);
    struct iovec io = { .iov_base = head, .iov_len = sizeof head };
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } control;
    memset(&control, 0, sizeof control);
    struct msghdr m = { .msg_iov = &io, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf };
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &passed, sizeof passed);
    ssize_t w;
    do w = sendmsg(fd, &m, MSG_NOSIGNAL); while (w < 0 && errno == EINTR);
    if (w != (ssize_t)sizeof head) return -1;
    return write_all(fd, payload, sizeof payload);
}

static int open_faults(int fd) {
    release_faults();
    if (find_mapping() != 0) return fail(fd, "no shared writable mapping of the RAM file in QEMU");
    // Not UFFD_USER_MODE_ONLY: QEMU may touch guest RAM inside a system call, and that fault must wait too.
    int u = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (u < 0) return fail(fd, "userfaultfd (needs root or vm.unprivileged_userfaultfd=1)");
    struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_MISSING_SHMEM };
    if (ioctl(u, UFFDIO_API, &api) != 0) { int e = errno; close(u); errno = e; return fail(fd, "UFFDIO_API (MISSING_SHMEM)"); }
    struct uffdio_register reg = { .range = { .start = base, .len = length }, .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(u, UFFDIO_REGISTER, &reg) != 0) { int e = errno; close(u); errno = e; return fail(fd, "UFFDIO_REGISTER(MISSING) of the RAM mapping"); }
    const uint64_t need = (1ULL << _UFFDIO_COPY) | (1ULL << _UFFDIO_ZEROPAGE);
    if ((reg.ioctls & need) != need) {
        ioctl(u, UFFDIO_UNREGISTER, &reg.range);
        close(u);
        errno = EOPNOTSUPP;
        return fail(fd, "this kernel offers no UFFDIO_COPY/UFFDIO_ZEROPAGE on shared memory");
    }
    fault_uffd = u;
    fault_base = base;
    fault_length = length;
    return answer_with_fd(fd, u);
}

static void serve(int client) {
    char cmd;
    for (;;) {
        ssize_t r = recv(client, &cmd, 1, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        int rc;
        switch (cmd) {
            case 'S': rc = start_tracking(client); break;
            case 'H': rc = harvest(client); break;
            case 'X': stop_tracking(); rc = answer(client, 'O', 0, NULL, 0); break;
            case 'U': rc = open_faults(client); break;
            case 'R': release_faults(); rc = answer(client, 'O', 0, NULL, 0); break;
            default: errno = EINVAL; rc = fail(client, "unknown request");
        }
        if (rc != 0) break;
    }
    close(client);
}

static void *agent_thread(void *arg) {
    int listener = (int)(intptr_t)arg;
    for (;;) {
        int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (client < 0) { if (errno == EINTR || errno == ECONNABORTED) continue; break; }
        serve(client);
    }
    return NULL;
}

__attribute__((constructor)) static void livemig_agent_init(void) {
    const char *sock = getenv("LIVEMIG_AGENT_SOCKET"), *ram = getenv("LIVEMIG_AGENT_RAM");
    // QEMU's children (helpers it may run) get neither the agent nor its settings.
    unsetenv("LD_PRELOAD");
    if (!sock || !ram || strlen(ram) >= sizeof ram_path) return;
    strcpy(ram_path, ram);
    unsetenv("LIVEMIG_AGENT_SOCKET");
    unsetenv("LIVEMIG_AGENT_RAM");
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(sock) >= sizeof addr.sun_path) return;
    strcpy(addr.sun_path, sock);
    int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0) return;
    mode_t old = umask(0077);
    int ok = bind(listener, (struct sockaddr *)&addr, sizeof addr) == 0 && listen(listener, 1) == 0;
    umask(old);
    if (!ok) { close(listener); return; }
    // The thread takes no signal: QEMU's handlers stay with QEMU's threads.
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, agent_thread, (void *)(intptr_t)listener) != 0) close(listener);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
}
