/*
 * uioirq: legacy INTx end to end, from guest user space, through Linux's
 * uio_pci_generic (bound to the device beforehand). Each round unmasks INTx
 * (clears Interrupt Disable, bit 10 of the command register, through the
 * config file: uio_pci_generic has no irqcontrol), makes the device raise
 * the interrupt with a register write, waits for it (poll on /dev/uioN, 5 s),
 * checks the event count moved, then acknowledges it at the device.
 * uio_pci_generic counts an interrupt only if the status register's
 * Interrupt Status bit is set, and masks INTx when it fires, so this checks
 * those two bits too.
 *
 *   uioirq UIO_DEV CONFIG RESOURCE ROUNDS ENABLE RAISE ACK
 * ENABLE, RAISE, ACK are OFFSET=VALUE 32-bit register writes in RESOURCE
 * (ENABLE may be "-": the device has no enable register).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct regw {
	int set;
	uint64_t off;
	uint32_t val;
};

static struct regw parse(const char *s)
{
	struct regw w = { 0, 0, 0 };
	if (strcmp(s, "-") == 0)
		return w;
	char *end;
	w.off = strtoull(s, &end, 0);
	if (*end != '=') {
		fprintf(stderr, "uioirq: %s: want OFFSET=VALUE\n", s);
		exit(2);
	}
	w.val = (uint32_t)strtoul(end + 1, &end, 0);
	if (*end) {
		fprintf(stderr, "uioirq: %s: want OFFSET=VALUE\n", s);
		exit(2);
	}
	w.set = 1;
	return w;
}

int main(int argc, char **argv)
{
	if (argc != 8) {
		fprintf(stderr, "usage: uioirq UIO_DEV CONFIG RESOURCE ROUNDS ENABLE RAISE ACK\n");
		return 2;
	}
	int rounds = atoi(argv[4]);
	struct regw en = parse(argv[5]), raise = parse(argv[6]), ack = parse(argv[7]);
	int uio = open(argv[1], O_RDWR);
	int cfg = open(argv[2], O_RDWR);
	int res = open(argv[3], O_RDWR | O_SYNC);
	if (uio < 0 || cfg < 0 || res < 0) {
		fprintf(stderr, "uioirq: open: %s\n", strerror(errno));
		return 1;
	}
	struct stat st;
	if (fstat(res, &st) < 0 || st.st_size <= 0) {
		fprintf(stderr, "uioirq: %s: no size\n", argv[3]);
		return 1;
	}
	volatile uint8_t *bar = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, res, 0);
	if (bar == MAP_FAILED) {
		fprintf(stderr, "uioirq: mmap: %s\n", strerror(errno));
		return 1;
	}
	if ((en.set && en.off + 4 > (uint64_t)st.st_size) || !raise.set || raise.off + 4 > (uint64_t)st.st_size ||
	    !ack.set || ack.off + 4 > (uint64_t)st.st_size) {
		fprintf(stderr, "uioirq: register offsets outside the BAR\n");
		return 2;
	}
	if (en.set)
		*(volatile uint32_t *)(bar + en.off) = en.val;
	uint32_t last = 0, count;
	for (int i = 0; i < rounds; i++) {
		uint16_t cmd;
		if (pread(cfg, &cmd, 2, 4) != 2) {
			fprintf(stderr, "uioirq: read COMMAND: %s\n", strerror(errno));
			return 1;
		}
		cmd &= (uint16_t)~0x400;
		if (pwrite(cfg, &cmd, 2, 4) != 2) {
			fprintf(stderr, "uioirq: unmask INTx: %s\n", strerror(errno));
			return 1;
		}
		*(volatile uint32_t *)(bar + raise.off) = raise.val;
		struct pollfd p = { uio, POLLIN, 0 };
		int n = poll(&p, 1, 5000);
		if (n <= 0) {
			fprintf(stderr, "uioirq: round %d: no interrupt within 5 s\n", i);
			return 1;
		}
		if (read(uio, &count, sizeof(count)) != sizeof(count)) {
			fprintf(stderr, "uioirq: read: %s\n", strerror(errno));
			return 1;
		}
		if (i > 0 && count == last) {
			fprintf(stderr, "uioirq: round %d: event count did not move (%u)\n", i, count);
			return 1;
		}
		last = count;
		*(volatile uint32_t *)(bar + ack.off) = ack.val;
	}
	printf("uioirq: %d interrupts, event count %u\n", rounds, last);
	return 0;
}
