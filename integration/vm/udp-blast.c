/*
 * udp-blast: the traffic source of the VM datapath benchmark (bench-datapath.sh; runs only
 * inside the VM, between namespaces the benchmark made).
 *
 *   udp-blast ROUNDS CHUNK NETNS,SRC,DST,PORT [NETNS,SRC,DST,PORT ...]
 *
 * Opens one UDP socket per target inside network namespace NETNS (/run/netns/NETNS), bound
 * to SRC, then for ROUNDS rounds sends CHUNK 64-byte datagrams to DST:PORT from each target
 * in turn (the first target of a round rotates), with sendto() on an unconnected socket so
 * every datagram takes the whole output path (netfilter, routing, XFRM policy lookup, ESP)
 * instead of a socket's cached route. Interleaving short chunks of all targets in one
 * process puts the same machine noise on every target of a round (the VM runs under TCG
 * on a shared host, where the rate of one target alone varies several-fold in seconds).
 * Prints one line per round and target:
 *
 *   round=R target=T sent=N failed=F seconds=S rate=X        (X = N / S per second)
 *
 * Exit 0 when every target sent at least one datagram. Built static by bench-datapath.sh
 * (gcc -static); a test tool, not shipped.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_TARGETS 32

struct target {
    int fd;
    struct sockaddr_in dst;
    long sent_total;
};

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int addr(const char *text, int port, struct sockaddr_in *a)
{
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    return inet_pton(AF_INET, text, &a->sin_addr) == 1 ? 0 : -1;
}

/* "NETNS,SRC,DST,PORT" -> a socket in NETNS bound to SRC. */
static int open_target(char *spec, struct target *t)
{
    char *ns = strtok(spec, ","), *src = strtok(NULL, ","), *dst = strtok(NULL, ","),
         *port = strtok(NULL, ",");
    struct sockaddr_in s;
    if (!port || addr(src, 0, &s) || addr(dst, atoi(port), &t->dst)) {
        fprintf(stderr, "udp-blast: bad target (want NETNS,SRC,DST,PORT)\n");
        return -1;
    }
    char path[256];
    snprintf(path, sizeof path, "/run/netns/%s", ns);
    int nsfd = open(path, O_RDONLY | O_CLOEXEC);
    if (nsfd < 0 || setns(nsfd, CLONE_NEWNET) < 0) {
        fprintf(stderr, "udp-blast: enter %s: %s\n", path, strerror(errno));
        return -1;
    }
    close(nsfd);
    t->fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (t->fd < 0 || bind(t->fd, (struct sockaddr *)&s, sizeof s) < 0) {
        fprintf(stderr, "udp-blast: socket/bind %s in %s: %s\n", src, ns, strerror(errno));
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc - 3 > MAX_TARGETS) {
        fprintf(stderr, "usage: udp-blast ROUNDS CHUNK NETNS,SRC,DST,PORT [...] (at most %d)\n",
                MAX_TARGETS);
        return 2;
    }
    long rounds = strtol(argv[1], NULL, 10), chunk = strtol(argv[2], NULL, 10);
    int n = argc - 3;
    if (rounds <= 0 || chunk <= 0) {
        fprintf(stderr, "udp-blast: ROUNDS and CHUNK must be positive\n");
        return 2;
    }
    struct target t[MAX_TARGETS];
    for (int i = 0; i < n; i++)
        if (open_target(argv[3 + i], &t[i]))
            return 1;
    char buf[64] = {0};
    for (long r = 0; r < rounds; r++) {
        for (int k = 0; k < n; k++) {
            int i = (int)((k + r) % n);
            long sent = 0, failed = 0;
            int first_errno = 0;
            double t0 = now();
            for (long j = 0; j < chunk; j++) {
                if (sendto(t[i].fd, buf, sizeof buf, 0, (struct sockaddr *)&t[i].dst,
                           sizeof t[i].dst) == sizeof buf) {
                    sent++;
                } else {
                    if (!first_errno)
                        first_errno = errno;
                    failed++;
                }
            }
            double dt = now() - t0;
            t[i].sent_total += sent;
            printf("round=%ld target=%d sent=%ld failed=%ld seconds=%.6f rate=%.0f", r + 1, i,
                   sent, failed, dt, dt > 0 ? sent / dt : 0);
            if (failed)
                printf(" first_error=\"%s\"", strerror(first_errno));
            printf("\n");
        }
        fflush(stdout);
    }
    for (int i = 0; i < n; i++)
        if (t[i].sent_total == 0)
            return 1;
    return 0;
}
