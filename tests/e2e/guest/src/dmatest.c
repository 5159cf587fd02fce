/*
 * dmatest: device DMA to and from guest memory, driven from guest user space
 * with no driver bound. A page is allocated, locked, and its guest-physical
 * address read from /proc/self/pagemap; with no IOMMU in the guest that
 * address is what the device uses. The device's registers are reached by
 * mmap of /sys/bus/pci/devices/BDF/resourceN. Bus mastering must be on.
 *
 *   dmatest sample BDF     vdevd's sample device (devices/src/sample):
 *                          buffer -> memory, memory -> buffer (started through
 *                          DMA_CMD and through the BAR2 doorbell), and the
 *                          errors for an unmapped address and for bus
 *                          mastering off
 *   dmatest edu BDF        QEMU's edu device (memory -> device -> memory),
 *                          to prove this tool against a known-good device
 *
 * Exit status 0 if every step behaved, 1 otherwise (each failure printed).
 * DMATEST_NO_MASTER=1 leaves bus mastering as it is (the harness's
 * self-test: a device that cannot DMA must make this tool fail).
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
#include <time.h>
#include <unistd.h>

#define PAGE 4096u

static int failures;

#define FAIL(...)                                                                                                      \
	do {                                                                                                           \
		fprintf(stderr, "dmatest: " __VA_ARGS__);                                                              \
		fputc('\n', stderr);                                                                                   \
		failures++;                                                                                            \
	} while (0)

static void die(const char *what)
{
	fprintf(stderr, "dmatest: %s: %s\n", what, strerror(errno));
	exit(1);
}

struct bar {
	volatile uint8_t *base;
	uint64_t size;
};

static struct bar map_bar(const char *bdf, int n)
{
	char path[256];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource%d", bdf, n);
	int fd = open(path, O_RDWR | O_SYNC);
	if (fd < 0)
		die(path);
	struct stat st;
	if (fstat(fd, &st) < 0 || st.st_size <= 0)
		die(path);
	void *p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		die(path);
	close(fd);
	return (struct bar){ p, (uint64_t)st.st_size };
}

static uint32_t rd32(struct bar b, uint64_t off) { return *(volatile uint32_t *)(b.base + off); }
static void wr32(struct bar b, uint64_t off, uint32_t v) { *(volatile uint32_t *)(b.base + off) = v; }
static void wr64(struct bar b, uint64_t off, uint64_t v) { *(volatile uint64_t *)(b.base + off) = v; }

/* A locked page of guest memory and its guest-physical address. */
struct page {
	uint8_t *va;
	uint64_t pa;
};

static struct page dma_page(void)
{
	void *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap page");
	if (mlock(p, PAGE) < 0)
		die("mlock");
	memset(p, 0, PAGE);
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		die("/proc/self/pagemap");
	uint64_t entry;
	if (pread(fd, &entry, sizeof(entry), (off_t)((uintptr_t)p / PAGE * sizeof(entry))) != sizeof(entry))
		die("pagemap read");
	close(fd);
	if (!(entry >> 63) || (entry & ((1ull << 55) - 1)) == 0) {
		fprintf(stderr, "dmatest: page not present or PFN hidden (not root?)\n");
		exit(1);
	}
	return (struct page){ p, (entry & ((1ull << 55) - 1)) * PAGE };
}

static void fill(volatile uint8_t *p, uint32_t n, uint32_t seed)
{
	for (uint32_t i = 0; i < n; i += 4)
		*(volatile uint32_t *)(p + i) = seed * 2654435761u + i * 40503u;
}

static int same(const volatile uint8_t *p, uint32_t n, uint32_t seed, const char *what)
{
	for (uint32_t i = 0; i < n; i += 4) {
		uint32_t want = seed * 2654435761u + i * 40503u, got = *(const volatile uint32_t *)(p + i);
		if (got != want) {
			FAIL("%s: offset %u is 0x%08x, expected 0x%08x", what, i, got, want);
			return 0;
		}
	}
	return 1;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };
	nanosleep(&ts, NULL);
}

static void set_bus_master(const char *bdf, int on)
{
	const char *keep = getenv("DMATEST_NO_MASTER");
	if (keep && strcmp(keep, "1") == 0)
		return;
	char path[256];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/config", bdf);
	int fd = open(path, O_RDWR);
	if (fd < 0)
		die(path);
	uint16_t cmd;
	if (pread(fd, &cmd, 2, 4) != 2)
		die("read COMMAND");
	cmd = on ? (cmd | 0x6) : (uint16_t)((cmd | 0x2) & ~0x4);
	if (pwrite(fd, &cmd, 2, 4) != 2)
		die("write COMMAND");
	close(fd);
}

/* vdevd sample device registers (devices/src/sample/mod.rs). */
enum {
	S_ID = 0x00, S_BUFFER_SIZE = 0x08, S_DMA_SRC = 0x30, S_DMA_DST = 0x38, S_DMA_COUNT = 0x40,
	S_DMA_CMD = 0x44, S_DMA_STATUS = 0x48, S_DOORBELL_COUNT = 0x4c,
	S_START = 1, S_FROM_DEVICE = 2, S_DONE = 2, S_ERROR = 3,
};

/* Wait for the sample DMA engine to leave busy; return DMA_STATUS. */
static uint32_t sample_wait(struct bar r)
{
	for (int i = 0; i < 5000; i++) {
		uint32_t st = rd32(r, S_DMA_STATUS);
		if ((st & 0xff) != 1 && !(rd32(r, S_DMA_CMD) & S_START))
			return st;
		sleep_ms(1);
	}
	FAIL("DMA still busy after 5 s");
	return rd32(r, S_DMA_STATUS);
}

static void sample_xfer(struct bar r, uint64_t src, uint64_t dst, uint32_t count, uint32_t cmd)
{
	wr64(r, S_DMA_SRC, src);
	wr64(r, S_DMA_DST, dst);
	wr32(r, S_DMA_COUNT, count);
	wr32(r, S_DMA_CMD, cmd);
}

static int run_sample(const char *bdf)
{
	struct bar r = map_bar(bdf, 0), b = map_bar(bdf, 2);
	uint32_t bufsz = rd32(r, S_BUFFER_SIZE), st;
	if (rd32(r, S_ID) != 0x53440100 || bufsz < 2 * PAGE || bufsz > b.size / 2) {
		FAIL("not the sample device or odd buffer size (ID 0x%08x, buffer %u, BAR2 %" PRIu64 ")", rd32(r, S_ID),
		     bufsz, b.size);
		return 1;
	}
	struct page pg = dma_page();
	printf("page at guest-physical 0x%" PRIx64 ", buffer %u bytes\n", pg.pa, bufsz);
	set_bus_master(bdf, 1);

	/* buffer -> memory */
	fill(b.base, PAGE, 11);
	sample_xfer(r, 0, pg.pa, PAGE, S_START | S_FROM_DEVICE);
	st = sample_wait(r);
	if ((st & 0xff) != S_DONE)
		FAIL("buffer->memory: DMA_STATUS 0x%x", st);
	same(pg.va, PAGE, 11, "buffer->memory");

	/* memory -> buffer (second page of the buffer) */
	fill(pg.va, PAGE, 22);
	sample_xfer(r, pg.pa, PAGE, PAGE, S_START);
	st = sample_wait(r);
	if ((st & 0xff) != S_DONE)
		FAIL("memory->buffer: DMA_STATUS 0x%x", st);
	same(b.base + PAGE, PAGE, 22, "memory->buffer");

	/* Started through the doorbell (BAR2 after the buffer), direction from
	 * DMA_CMD as last written: to the device. */
	uint32_t rings = rd32(r, S_DOORBELL_COUNT);
	fill(pg.va, PAGE, 33);
	wr64(r, S_DMA_SRC, pg.pa);
	wr64(r, S_DMA_DST, 0);
	wr32(r, S_DMA_COUNT, PAGE);
	*(volatile uint32_t *)(b.base + bufsz) = 1; /* the doorbell: BAR2 + buffer size */
	sleep_ms(10);
	st = sample_wait(r);
	if ((st & 0xff) != S_DONE)
		FAIL("doorbell transfer: DMA_STATUS 0x%x", st);
	same(b.base, PAGE, 33, "doorbell memory->buffer");
	if (rd32(r, S_DOORBELL_COUNT) == rings)
		FAIL("DOORBELL_COUNT did not move after a doorbell write");

	/* An address no memory backs: error code 2 (unmapped). */
	sample_xfer(r, 0, 0xfffffff000ull, PAGE, S_START | S_FROM_DEVICE);
	st = sample_wait(r);
	if ((st & 0xff) != S_ERROR || ((st >> 8) & 0xff) != 2)
		FAIL("DMA to an unmapped address: DMA_STATUS 0x%x, expected error code 2", st);

	/* Bus mastering off: error code 4, memory untouched. */
	fill(pg.va, PAGE, 44);
	set_bus_master(bdf, 0);
	fill(b.base, PAGE, 55);
	sample_xfer(r, 0, pg.pa, PAGE, S_START | S_FROM_DEVICE);
	st = sample_wait(r);
	if ((st & 0xff) != S_ERROR || ((st >> 8) & 0xff) != 4)
		FAIL("DMA with bus mastering off: DMA_STATUS 0x%x, expected error code 4", st);
	same(pg.va, PAGE, 44, "memory after a refused DMA");
	set_bus_master(bdf, 1);
	return failures ? 1 : 0;
}

/* QEMU edu (docs/specs/edu.rst): DMA between memory and a 4 KiB buffer at
 * device address 0x40000; the address must fit the 28-bit DMA mask. */
enum { E_SRC = 0x80, E_DST = 0x88, E_CNT = 0x90, E_CMD = 0x98, E_BUF = 0x40000 };

static void edu_xfer(struct bar r, uint64_t src, uint64_t dst, uint64_t cnt, uint64_t cmd)
{
	*(volatile uint64_t *)(r.base + E_SRC) = src;
	*(volatile uint64_t *)(r.base + E_DST) = dst;
	*(volatile uint64_t *)(r.base + E_CNT) = cnt;
	*(volatile uint64_t *)(r.base + E_CMD) = cmd;
	for (int i = 0; i < 5000 && (*(volatile uint64_t *)(r.base + E_CMD) & 1); i++)
		sleep_ms(1);
	if (*(volatile uint64_t *)(r.base + E_CMD) & 1)
		FAIL("edu DMA still running after 5 s");
}

static int run_edu(const char *bdf)
{
	struct bar r = map_bar(bdf, 0);
	struct page a = dma_page(), b = dma_page();
	if (a.pa >= (1u << 28) || b.pa >= (1u << 28)) {
		FAIL("pages above edu's 28-bit DMA mask (0x%" PRIx64 ", 0x%" PRIx64 ")", a.pa, b.pa);
		return 1;
	}
	printf("pages at guest-physical 0x%" PRIx64 " and 0x%" PRIx64 "\n", a.pa, b.pa);
	set_bus_master(bdf, 1);
	fill(a.va, PAGE, 77);
	edu_xfer(r, a.pa, E_BUF, PAGE, 1);     /* memory -> device */
	edu_xfer(r, E_BUF, b.pa, PAGE, 1 | 2); /* device -> memory */
	same(b.va, PAGE, 77, "edu memory->device->memory");
	return failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: dmatest sample|edu BDF\n");
		return 2;
	}
	if (strcmp(argv[1], "sample") == 0)
		return run_sample(argv[2]);
	if (strcmp(argv[1], "edu") == 0)
		return run_edu(argv[2]);
	fprintf(stderr, "dmatest: unknown device kind %s\n", argv[1]);
	return 2;
}
