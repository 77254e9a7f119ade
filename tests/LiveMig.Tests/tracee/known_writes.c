/* A process whose writes are known, for measuring `livemig trace record`'s accuracy.
 * usage: known_writes PAGES PHASES PHASE_MS PER_PHASE burst|spread SEED [TAIL_MS]
 * Maps PAGES anonymous pages and touches them all, prints "base ADDR", waits for a line on
 * stdin (the recorder has taken its initial image), then for each phase writes PER_PHASE pages
 * not written before (one byte changed each): all at the phase's start (burst) or evenly over
 * the phase (spread). Prints "phase K T_NS P1 P2 ..." (CLOCK_MONOTONIC, page numbers) per phase.
 * Then it stays quiet for TAIL_MS (default 1000; -1: until a second line on stdin) before exiting, so the recorder's last full interval has
 * seen every write (the interval an exit cuts short is not part of a trace). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void sleep_until(long long t) {
    struct timespec ts = { t / 1000000000LL, t % 1000000000LL };
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0) {}
}

int main(int argc, char **argv) {
    if (argc != 7 && argc != 8) { fprintf(stderr, "usage: known_writes PAGES PHASES PHASE_MS PER_PHASE burst|spread SEED [TAIL_MS]\n"); return 2; }
    long long tail_ms = argc == 8 ? atoll(argv[7]) : 1000;
    long pages = atol(argv[1]), phases = atol(argv[2]), phase_ms = atol(argv[3]), per = atol(argv[4]);
    int spread = strcmp(argv[5], "spread") == 0;
    unsigned long long s = strtoull(argv[6], NULL, 10) | 1;
    if (per * phases > pages) { fprintf(stderr, "PER_PHASE x PHASES must not exceed PAGES\n"); return 2; }
    unsigned char *buf = mmap(NULL, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) { perror("mmap"); return 1; }
    for (long p = 0; p < pages; p++) memset(buf + p * 4096, (int)(p % 251) + 1, 4096);
    long *order = malloc(sizeof(long) * pages);
    for (long p = 0; p < pages; p++) order[p] = p;
    for (long p = pages - 1; p > 0; p--) { /* xorshift64* shuffle: each page written at most once */
        s ^= s >> 12; s ^= s << 25; s ^= s >> 27;
        long j = (long)((s * 2685821657736338717ULL) % (unsigned long long)(p + 1));
        long t = order[p]; order[p] = order[j]; order[j] = t;
    }
    printf("base %lx\n", (unsigned long)buf);
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;
    long long start = now_ns();
    for (long k = 0; k < phases; k++) {
        long long t0 = start + k * phase_ms * 1000000LL;
        sleep_until(t0);
        printf("phase %ld %lld", k, now_ns());
        for (long i = 0; i < per; i++) printf(" %ld", order[k * per + i]);
        printf("\n");
        fflush(stdout);
        for (long i = 0; i < per; i++) {
            if (spread) sleep_until(t0 + (long long)phase_ms * 1000000LL * i / per);
            buf[order[k * per + i] * 4096 + (i * 37) % 4096] += 1;
        }
    }
    sleep_until(start + phases * phase_ms * 1000000LL + (tail_ms < 0 ? 0 : tail_ms * 1000000LL));
    if (tail_ms < 0 && !fgets(line, sizeof line, stdin)) return 1;
    return 0;
}
