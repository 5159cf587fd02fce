/*
 * pcimem: read and write a PCI memory BAR from guest user space through
 * sysfs (/sys/bus/pci/devices/BDF/resourceN), the way a user-space driver
 * would: mmap the resource file and access it with loads and stores of the
 * given width. Built static in the trixie root and put into guest images.
 *
 *   pcimem RESOURCE OFFSET [WIDTH [VALUE]]      one access; prints 0x%x
 *   pcimem RESOURCE OFFSET fill LEN SEED        write LEN bytes of a pattern
 *   pcimem RESOURCE OFFSET check LEN SEED       compare; exit 1 on mismatch
 *
 * WIDTH is 8, 16, 32 (default) or 64. The pattern is 32-bit words
 * w[i] = (SEED * 2654435761 + i * 40503) mod 2^32, stored with 32-bit
 * accesses, so a BAR that drops, reorders or aliases words is caught.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void usage(void)
{
	fprintf(stderr, "usage: pcimem RESOURCE OFFSET [WIDTH [VALUE]]\n"
			"       pcimem RESOURCE OFFSET fill|check LEN SEED\n");
	exit(2);
}

static uint64_t number(const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || *s == '\0' || *end != '\0') {
		fprintf(stderr, "pcimem: not a number: %s\n", s);
		exit(2);
	}
	return v;
}

static uint32_t word(uint64_t seed, uint64_t i)
{
	return (uint32_t)(seed * 2654435761u + i * 40503u);
}

int main(int argc, char **argv)
{
	if (argc < 3)
		usage();
	const char *path = argv[1];
	uint64_t off = number(argv[2]);
	int fd = open(path, O_RDWR | O_SYNC);
	if (fd < 0) {
		fprintf(stderr, "pcimem: open %s: %s\n", path, strerror(errno));
		return 1;
	}
	struct stat st;
	if (fstat(fd, &st) < 0 || st.st_size <= 0) {
		fprintf(stderr, "pcimem: %s: cannot tell the resource size\n", path);
		return 1;
	}
	uint64_t size = (uint64_t)st.st_size;
	void *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (map == MAP_FAILED) {
		fprintf(stderr, "pcimem: mmap %s (%" PRIu64 " bytes): %s\n", path, size, strerror(errno));
		return 1;
	}
	volatile uint8_t *base = map;

	if (argc >= 4 && (strcmp(argv[3], "fill") == 0 || strcmp(argv[3], "check") == 0)) {
		if (argc != 6)
			usage();
		uint64_t len = number(argv[4]), seed = number(argv[5]);
		if (off % 4 || len % 4 || off > size || len > size - off) {
			fprintf(stderr, "pcimem: range 0x%" PRIx64 "+0x%" PRIx64 " not aligned or outside the %" PRIu64 "-byte BAR\n",
				off, len, size);
			return 2;
		}
		volatile uint32_t *w = (volatile uint32_t *)(base + off);
		uint64_t n = len / 4, bad = 0;
		for (uint64_t i = 0; i < n; i++) {
			if (argv[3][0] == 'f') {
				w[i] = word(seed, i);
			} else if (w[i] != word(seed, i)) {
				if (bad++ < 8)
					fprintf(stderr, "pcimem: offset 0x%" PRIx64 ": 0x%08x, expected 0x%08x\n",
						off + i * 4, w[i], word(seed, i));
			}
		}
		if (bad) {
			fprintf(stderr, "pcimem: %" PRIu64 " of %" PRIu64 " words differ\n", bad, n);
			return 1;
		}
		return 0;
	}

	unsigned width = argc >= 4 ? (unsigned)number(argv[3]) : 32;
	if ((width != 8 && width != 16 && width != 32 && width != 64) || off % (width / 8) ||
	    width / 8 > size || off > size - width / 8) {
		fprintf(stderr, "pcimem: bad width %u or offset 0x%" PRIx64 " for a %" PRIu64 "-byte BAR\n", width, off,
			size);
		return 2;
	}
	if (argc >= 5) {
		uint64_t v = number(argv[4]);
		switch (width) {
		case 8: *(volatile uint8_t *)(base + off) = (uint8_t)v; break;
		case 16: *(volatile uint16_t *)(base + off) = (uint16_t)v; break;
		case 32: *(volatile uint32_t *)(base + off) = (uint32_t)v; break;
		case 64: *(volatile uint64_t *)(base + off) = v; break;
		}
		return 0;
	}
	uint64_t v = 0;
	switch (width) {
	case 8: v = *(volatile uint8_t *)(base + off); break;
	case 16: v = *(volatile uint16_t *)(base + off); break;
	case 32: v = *(volatile uint32_t *)(base + off); break;
	case 64: v = *(volatile uint64_t *)(base + off); break;
	}
	printf("0x%" PRIx64 "\n", v);
	return 0;
}
