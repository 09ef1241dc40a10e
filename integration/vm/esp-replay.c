/*
 * esp-replay: the replay attacker of the VM tests (runs in the switch namespace, never
 * outside the VM). Captures the first IPv4 ESP frame that leaves IFACE (towards the
 * receiving host), prints its SPI and sequence number, then sends that exact frame COUNT
 * more times out of IFACE, so the receiver gets COUNT replays of a packet it already took.
 *
 *   esp-replay IFACE COUNT [TIMEOUT_SECS]       (exit 0 after injecting, 1 on error/timeout)
 *
 * Built static by integration/vm/test-xfrm.sh (gcc -static); a test tool, not shipped.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: esp-replay IFACE COUNT [TIMEOUT_SECS]\n");
        return 2;
    }
    const char *ifname = argv[1];
    int count = atoi(argv[2]);
    double timeout = argc > 3 ? atof(argv[3]) : 20;
    unsigned ifindex = if_nametoindex(ifname);
    if (!ifindex) {
        fprintf(stderr, "esp-replay: no interface %s: %s\n", ifname, strerror(errno));
        return 1;
    }
    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (fd < 0) {
        perror("esp-replay: socket(AF_PACKET)");
        return 1;
    }
    struct sockaddr_ll sll = {0};
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = ifindex;
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) {
        perror("esp-replay: bind");
        return 1;
    }
    printf("esp-replay: listening on %s\n", ifname);
    fflush(stdout);
    unsigned char frame[2048];
    double end = now() + timeout;
    for (;;) {
        double left = end - now();
        if (left <= 0) {
            fprintf(stderr, "esp-replay: no ESP frame left %s within %.0f s\n", ifname, timeout);
            return 1;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, (int)(left * 1000) + 1) <= 0)
            continue;
        struct sockaddr_ll from;
        socklen_t fl = sizeof from;
        ssize_t n = recvfrom(fd, frame, sizeof frame, 0, (struct sockaddr *)&from, &fl);
        if (n < 14 + 20 + 8)
            continue;
        if (from.sll_pkttype != PACKET_OUTGOING)
            continue;
        if (frame[12] != 0x08 || frame[13] != 0x00) /* IPv4 */
            continue;
        unsigned ihl = (frame[14] & 0x0f) * 4;
        if (frame[14 + 9] != 50 /* ESP */ || n < (ssize_t)(14 + ihl + 8))
            continue;
        const unsigned char *esp = frame + 14 + ihl;
        unsigned spi = (unsigned)esp[0] << 24 | esp[1] << 16 | esp[2] << 8 | esp[3];
        unsigned seq = (unsigned)esp[4] << 24 | esp[5] << 16 | esp[6] << 8 | esp[7];
        printf("esp-replay: captured spi 0x%08x seq %u (%zd bytes)\n", spi, seq, n);
        fflush(stdout);
        sleep(1); /* let the original be processed (and counted) first */
        struct sockaddr_ll to = {0};
        to.sll_family = AF_PACKET;
        to.sll_ifindex = ifindex;
        to.sll_halen = ETH_ALEN;
        memcpy(to.sll_addr, frame, ETH_ALEN);
        for (int i = 0; i < count; i++) {
            if (sendto(fd, frame, n, 0, (struct sockaddr *)&to, sizeof to) != n) {
                perror("esp-replay: sendto");
                return 1;
            }
            usleep(20 * 1000);
        }
        printf("esp-replay: injected %d copies of spi 0x%08x seq %u\n", count, spi, seq);
        return 0;
    }
}
