/*
 * Is the machine pausing, with no broker involved?
 *
 * One thread spins reading the clock and counts gaps over 2 ms (time it was not running);
 * the main thread, when asked, appends 8 KiB and fdatasyncs in a loop, as a group-commit
 * broker does. On the project's 2-core Firecracker VM (2026-11-23) the spinner alone, or
 * two spinners, saw almost no gaps; the fsync loop alone saw almost no slow fsyncs; the
 * spinner *with* the fsync loop saw ~40 gaps totalling ~490 ms in 4 s, ending at the same
 * phase of a 100 ms wall-clock period: the host pauses the whole VM when CPU plus its I/O
 * work exceed a quota. Broker latency tails of 5-15 ms at any rate are these pauses.
 *
 *   gcc -O2 -o /tmp/spin-and-fsync bench/probes/spin-and-fsync.c -lpthread -lm
 *   cd /var/tmp && /tmp/spin-and-fsync 1 0   # one spinner, no I/O
 *   cd /var/tmp && /tmp/spin-and-fsync 1 1   # one spinner and an fsync loop
 */
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double ms(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static volatile int stop = 0;

static void *spin(void *arg) {
    (void)arg;
    double last = ms(CLOCK_MONOTONIC), total = 0;
    int gaps = 0, phases[10] = {0};
    while (!stop) {
        double now = ms(CLOCK_MONOTONIC);
        if (now - last > 2.0) {
            gaps++;
            total += now - last;
            phases[(int)(fmod(ms(CLOCK_REALTIME), 100.0) / 10)]++;
        }
        last = now;
    }
    printf("spinner: %d gaps > 2 ms, %.0f ms in all; by 10 ms phase of 100 ms:", gaps, total);
    for (int i = 0; i < 10; i++) printf(" %d", phases[i]);
    printf("\n");
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s SPINNERS FSYNC(0|1)\n", argv[0]);
        return 2;
    }
    int spinners = atoi(argv[1]), fsync_loop = atoi(argv[2]);
    pthread_t threads[8];
    if (spinners > 8) spinners = 8;
    for (int i = 0; i < spinners; i++) pthread_create(&threads[i], NULL, spin, NULL);
    int fd = open("spin-and-fsync.dat", O_RDWR | O_CREAT | O_TRUNC, 0644);
    char buf[8192];
    memset(buf, 'x', sizeof buf);
    double start = ms(CLOCK_MONOTONIC);
    int syncs = 0, slow = 0;
    while (ms(CLOCK_MONOTONIC) - start < 4000) {
        if (!fsync_loop) {
            usleep(1000);
            continue;
        }
        if (write(fd, buf, sizeof buf) < 0) return 1;
        double t0 = ms(CLOCK_MONOTONIC);
        fdatasync(fd);
        if (ms(CLOCK_MONOTONIC) - t0 > 3) slow++;
        syncs++;
    }
    stop = 1;
    for (int i = 0; i < spinners; i++) pthread_join(threads[i], NULL);
    close(fd);
    unlink("spin-and-fsync.dat");
    printf("%d spinner(s), fsync loop %s: %d fsync/s, %d over 3 ms\n", spinners,
           fsync_loop ? "on" : "off", syncs / 4, slow);
    return 0;
}
