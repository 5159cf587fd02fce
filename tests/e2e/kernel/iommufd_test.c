/* Device-centric VFIO (cdev + iommufd) check for QEMU's "edu" device, run
 * inside the e2e guest built by build.sh. Also exercises the group/container
 * path on a second edu device and the exclusion between the two paths.
 *
 * Usage: iommufd_test BDF_A BDF_B     (two edu devices bound to vfio-pci)
 *
 * Result lines (stdout, which init copies to the console):
 *   E2E-PASS <check>            E2E-FAIL <check> <reason>
 *   E2E-INFO <key> <value...>
 * A failed check that later checks depend on ends the program (exit 1); the
 * host compares the PASS lines with the list of checks it expects.
 *
 * The ioctls are those of the kernel's include/uapi/linux/vfio.h and
 * iommufd.h (the trixie root's linux-libc-dev, the same 6.12 release).
 *
 * edu (QEMU hw/misc/edu.c), BAR0: 0x00 id (0x010000ed), 0x04 liveness (reads
 * back inverted), 0x08 factorial, 0x20 status (bit 0 busy), 0x24 irq status,
 * 0x64 irq ack, 0x80/0x88/0x90/0x98 DMA source/destination/count/command
 * (command bit 0 start, bit 1 edu->RAM, bit 2 raise irq 0x100 when done); the
 * device's own buffer is at DMA address 0x40000; its DMA mask is 28 bits.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/iommufd.h>
#include <linux/vfio.h>

#define EDU_ID 0x00
#define EDU_LIVE 0x04
#define EDU_FACT 0x08
#define EDU_STATUS 0x20
#define EDU_IRQ_STATUS 0x24
#define EDU_IRQ_ACK 0x64
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_CNT 0x90
#define EDU_DMA_CMD 0x98
#define EDU_BUF 0x40000
#define EDU_ID_VALUE 0x010000edu

#define IOVA 0x100000ull /* below the edu's 28-bit DMA mask */
#define DMA_BYTES 256

static void pass(const char *check) { printf("E2E-PASS %s\n", check); fflush(stdout); }
static void info(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("E2E-INFO ");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
}
static void fail(const char *check, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("E2E-FAIL %s ", check);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
}
/* A failed check the rest depends on: report and stop. */
#define FATAL(check, ...) do { fail(check, __VA_ARGS__); exit(1); } while (0)
/* errno as "EBUSY(16)" */
static const char *en(int e)
{
    static char b[4][48];
    static int i;
    i = (i + 1) % 4;
    snprintf(b[i], sizeof b[i], "%s(%d)", strerrorname_np(e) ? strerrorname_np(e) : "?", e);
    return b[i];
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

struct edu {
    const char *bdf;
    int fd;                     /* device fd */
    volatile uint8_t *bar;      /* BAR0, mmapped */
    size_t bar_size;
    uint64_t bar_offset;        /* BAR0 in the device fd */
    uint64_t cfg_offset;        /* config space in the device fd */
    int efd;                    /* MSI eventfd */
};

static uint32_t rd(struct edu *d, unsigned off) { return *(volatile uint32_t *)(d->bar + off); }
static void wr(struct edu *d, unsigned off, uint32_t v) { *(volatile uint32_t *)(d->bar + off) = v; }
static void wr64(struct edu *d, unsigned off, uint64_t v) { *(volatile uint64_t *)(d->bar + off) = v; }

/* wait until (reg & mask) == 0; 0 on success, -1 after 5 s */
static int wait_clear(struct edu *d, unsigned reg, uint32_t mask)
{
    double t0 = now();
    while (rd(d, reg) & mask)
        if (now() - t0 > 5.0)
            return -1;
    return 0;
}

static int group_of(const char *bdf)
{
    char path[256], link[256];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", bdf);
    ssize_t n = readlink(path, link, sizeof link - 1);
    if (n <= 0)
        return -1;
    link[n] = 0;
    return atoi(basename(link));
}

/* /dev/vfio/devices/vfioN of a device, from /sys/bus/pci/devices/BDF/vfio-dev/ */
static int cdev_of(const char *bdf, char *out, size_t len)
{
    char path[256];
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/vfio-dev", bdf);
    DIR *dir = opendir(path);
    if (!dir)
        return -1;
    struct dirent *e;
    int found = -1;
    while ((e = readdir(dir)))
        if (strncmp(e->d_name, "vfio", 4) == 0) {
            snprintf(out, len, "/dev/vfio/devices/%s", e->d_name);
            found = 0;
            break;
        }
    closedir(dir);
    return found;
}

static int is_chr(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISCHR(st.st_mode);
}

/* Region info, BAR0 mmap, bus master on, id and liveness through the mmap
 * and the id once more through pread. Reports under CHECK. */
static void edu_setup_bar(struct edu *d, const char *check)
{
    struct vfio_device_info di = { .argsz = sizeof di };
    if (ioctl(d->fd, VFIO_DEVICE_GET_INFO, &di))
        FATAL(check, "VFIO_DEVICE_GET_INFO: %s", en(errno));
    if (!(di.flags & VFIO_DEVICE_FLAGS_PCI) || di.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX)
        FATAL(check, "not a PCI device: flags 0x%x regions %u", di.flags, di.num_regions);
    struct vfio_region_info ri = { .argsz = sizeof ri, .index = VFIO_PCI_BAR0_REGION_INDEX };
    if (ioctl(d->fd, VFIO_DEVICE_GET_REGION_INFO, &ri))
        FATAL(check, "GET_REGION_INFO BAR0: %s", en(errno));
    if (!(ri.flags & VFIO_REGION_INFO_FLAG_MMAP))
        FATAL(check, "BAR0 not mmappable: flags 0x%x", ri.flags);
    d->bar_size = ri.size;
    d->bar_offset = ri.offset;
    struct vfio_region_info ci = { .argsz = sizeof ci, .index = VFIO_PCI_CONFIG_REGION_INDEX };
    if (ioctl(d->fd, VFIO_DEVICE_GET_REGION_INFO, &ci))
        FATAL(check, "GET_REGION_INFO config: %s", en(errno));
    d->cfg_offset = ci.offset;
    void *p = mmap(NULL, ri.size, PROT_READ | PROT_WRITE, MAP_SHARED, d->fd, ri.offset);
    if (p == MAP_FAILED)
        FATAL(check, "mmap BAR0: %s", en(errno));
    d->bar = p;
    uint16_t cmd;
    if (pread(d->fd, &cmd, 2, d->cfg_offset + 4) != 2)
        FATAL(check, "pread PCI_COMMAND: %s", en(errno));
    cmd |= 0x6; /* memory space, bus master */
    if (pwrite(d->fd, &cmd, 2, d->cfg_offset + 4) != 2)
        FATAL(check, "pwrite PCI_COMMAND: %s", en(errno));
    uint32_t id = rd(d, EDU_ID), id_pread = 0;
    if (pread(d->fd, &id_pread, 4, d->bar_offset + EDU_ID) != 4)
        FATAL(check, "pread BAR0 id: %s", en(errno));
    wr(d, EDU_LIVE, 0x12345678);
    uint32_t live = rd(d, EDU_LIVE);
    info("%s %s: device flags 0x%x regions %u irqs %u; BAR0 size 0x%llx flags 0x%x; id 0x%08x (pread 0x%08x) liveness 0x%08x",
         check, d->bdf, di.flags, di.num_regions, di.num_irqs, (unsigned long long)ri.size, ri.flags, id, id_pread, live);
    if (id != EDU_ID_VALUE || id_pread != EDU_ID_VALUE || live != ~0x12345678u)
        FATAL(check, "edu id 0x%08x pread 0x%08x liveness 0x%08x", id, id_pread, live);
    pass(check);
}

static void edu_factorial(struct edu *d, const char *check)
{
    wr(d, EDU_FACT, 10);
    if (wait_clear(d, EDU_STATUS, 1))
        FATAL(check, "factorial still busy after 5 s");
    uint32_t f = rd(d, EDU_FACT);
    if (f != 3628800)
        FATAL(check, "factorial(10) = %u", f);
    info("%s %s: factorial(10) = %u", check, d->bdf, f);
    pass(check);
}

static void edu_msi(struct edu *d, const char *check)
{
    d->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (d->efd < 0)
        FATAL(check, "eventfd: %s", en(errno));
    struct vfio_irq_info ii = { .argsz = sizeof ii, .index = VFIO_PCI_MSI_IRQ_INDEX };
    if (ioctl(d->fd, VFIO_DEVICE_GET_IRQ_INFO, &ii))
        FATAL(check, "GET_IRQ_INFO MSI: %s", en(errno));
    if (ii.count < 1)
        FATAL(check, "no MSI vector (count %u)", ii.count);
    char buf[sizeof(struct vfio_irq_set) + sizeof(int)];
    struct vfio_irq_set *is = (void *)buf;
    is->argsz = sizeof buf;
    is->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    is->index = VFIO_PCI_MSI_IRQ_INDEX;
    is->start = 0;
    is->count = 1;
    memcpy(is->data, &d->efd, sizeof(int));
    if (ioctl(d->fd, VFIO_DEVICE_SET_IRQS, is))
        FATAL(check, "SET_IRQS MSI eventfd: %s", en(errno));
    info("%s %s: MSI vectors %u flags 0x%x, eventfd armed", check, d->bdf, ii.count, ii.flags);
    pass(check);
}

/* RAM(iova) -> edu buffer -> RAM(iova + 0x1000), raising the MSI at the end;
 * MEM is the CPU view of the IOVA range. */
static void edu_dma(struct edu *d, uint8_t *mem, uint64_t iova, uint8_t seed, const char *check, const char *msi_check)
{
    for (int i = 0; i < DMA_BYTES; i++) {
        mem[i] = (uint8_t)(i * 7 + seed);
        mem[0x1000 + i] = 0;
    }
    wr64(d, EDU_DMA_SRC, iova);
    wr64(d, EDU_DMA_DST, EDU_BUF);
    wr64(d, EDU_DMA_CNT, DMA_BYTES);
    wr64(d, EDU_DMA_CMD, 0x1);
    if (wait_clear(d, EDU_DMA_CMD, 1))
        FATAL(check, "DMA RAM->edu still running after 5 s");
    wr64(d, EDU_DMA_SRC, EDU_BUF);
    wr64(d, EDU_DMA_DST, iova + 0x1000);
    wr64(d, EDU_DMA_CNT, DMA_BYTES);
    wr64(d, EDU_DMA_CMD, 0x1 | 0x2 | 0x4);
    if (wait_clear(d, EDU_DMA_CMD, 1))
        FATAL(check, "DMA edu->RAM still running after 5 s");
    if (memcmp(mem, mem + 0x1000, DMA_BYTES))
        FATAL(check, "data read back through iova 0x%llx differs (first bytes %02x %02x, want %02x %02x)",
              (unsigned long long)(iova + 0x1000), mem[0x1000], mem[0x1001], mem[0], mem[1]);
    info("%s %s: %d bytes iova 0x%llx -> edu -> iova 0x%llx", check, d->bdf, DMA_BYTES,
         (unsigned long long)iova, (unsigned long long)(iova + 0x1000));
    pass(check);

    struct pollfd p = { .fd = d->efd, .events = POLLIN };
    int r = poll(&p, 1, 5000);
    uint64_t cnt = 0;
    if (r == 1 && read(d->efd, &cnt, 8) != 8)
        cnt = 0;
    uint32_t st = rd(d, EDU_IRQ_STATUS);
    wr(d, EDU_IRQ_ACK, st);
    if (r != 1 || cnt < 1)
        FATAL(msi_check, "no MSI on the eventfd within 5 s (poll %d, edu irq status 0x%x)", r, st);
    info("%s %s: eventfd count %llu, edu irq status 0x%x", msi_check, d->bdf, (unsigned long long)cnt, st);
    pass(msi_check);
}

/* 8 KiB of anonymous memory for DMA */
static uint8_t *dma_buffer(void)
{
    uint8_t *m = mmap(NULL, 0x2000, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        FATAL("dma-buffer", "mmap: %s", en(errno));
    return m;
}

static int ioas_map(int iommufd, uint32_t ioas, void *va, uint64_t iova, uint64_t len)
{
    struct iommu_ioas_map m = {
        .size = sizeof m,
        .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        .ioas_id = ioas,
        .user_va = (uintptr_t)va,
        .length = len,
        .iova = iova,
    };
    return ioctl(iommufd, IOMMU_IOAS_MAP, &m);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s BDF_A BDF_B (two edu devices bound to vfio-pci)\n", argv[0]);
        return 2;
    }
    struct edu a = { .bdf = argv[1], .fd = -1, .efd = -1 }, b = { .bdf = argv[2], .fd = -1, .efd = -1 };
    char cdev_a[300], cdev_b[300], path[128];
    int grp_a = group_of(a.bdf), grp_b = group_of(b.bdf);

    /* --- the device nodes of both paths */
    if (cdev_of(a.bdf, cdev_a, sizeof cdev_a) || cdev_of(b.bdf, cdev_b, sizeof cdev_b))
        FATAL("dev-nodes", "no vfio-dev/vfioN under /sys/bus/pci/devices/{%s,%s} (not bound to vfio-pci, or no VFIO_DEVICE_CDEV)", a.bdf, b.bdf);
    if (!is_chr("/dev/iommu") || !is_chr(cdev_a) || !is_chr(cdev_b) || !is_chr("/dev/vfio/vfio"))
        FATAL("dev-nodes", "missing character device: /dev/iommu %d %s %d %s %d /dev/vfio/vfio %d",
              is_chr("/dev/iommu"), cdev_a, is_chr(cdev_a), cdev_b, is_chr(cdev_b), is_chr("/dev/vfio/vfio"));
    if (grp_a < 0 || grp_b < 0 || grp_a == grp_b)
        FATAL("dev-nodes", "iommu groups %d and %d: want two distinct groups", grp_a, grp_b);
    info("dev-nodes %s: %s group %d; %s: %s group %d; /dev/iommu; /dev/vfio/vfio", a.bdf, cdev_a, grp_a, b.bdf, cdev_b, grp_b);
    pass("dev-nodes");

    /* --- A through the cdev: everything but BIND_IOMMUFD is refused until the bind */
    a.fd = open(cdev_a, O_RDWR | O_CLOEXEC);
    if (a.fd < 0)
        FATAL("cdev-open", "open %s: %s", cdev_a, en(errno));
    pass("cdev-open");
    {
        struct vfio_device_info di = { .argsz = sizeof di };
        int r_info = ioctl(a.fd, VFIO_DEVICE_GET_INFO, &di), e_info = errno;
        struct vfio_region_info ri = { .argsz = sizeof ri, .index = VFIO_PCI_CONFIG_REGION_INDEX };
        int r_reg = ioctl(a.fd, VFIO_DEVICE_GET_REGION_INFO, &ri), e_reg = errno;
        uint32_t v;
        /* vfio-pci's fixed region layout: index << 40 (VFIO_PCI_OFFSET_SHIFT) */
        ssize_t r_rd = pread(a.fd, &v, 4, (uint64_t)VFIO_PCI_CONFIG_REGION_INDEX << 40);
        int e_rd = errno;
        ssize_t r_wr = pwrite(a.fd, &v, 4, (uint64_t)VFIO_PCI_CONFIG_REGION_INDEX << 40);
        int e_wr = errno;
        void *m = mmap(NULL, 4096, PROT_READ, MAP_SHARED, a.fd, (uint64_t)VFIO_PCI_BAR0_REGION_INDEX << 40);
        int e_mm = errno;
        struct vfio_device_attach_iommufd_pt at = { .argsz = sizeof at, .pt_id = 1 };
        int r_at = ioctl(a.fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at), e_at = errno;
        int r_rst = ioctl(a.fd, VFIO_DEVICE_RESET), e_rst = errno;
        info("cdev-refuses-before-bind GET_INFO %d %s; GET_REGION_INFO %d %s; pread %zd %s; pwrite %zd %s; mmap %s %s; ATTACH_IOMMUFD_PT %d %s; RESET %d %s",
             r_info, r_info ? en(e_info) : "-", r_reg, r_reg ? en(e_reg) : "-", r_rd, r_rd < 0 ? en(e_rd) : "-",
             r_wr, r_wr < 0 ? en(e_wr) : "-", m == MAP_FAILED ? "failed" : "MAPPED", m == MAP_FAILED ? en(e_mm) : "-",
             r_at, r_at ? en(e_at) : "-", r_rst, r_rst ? en(e_rst) : "-");
        if (r_info == 0 || r_reg == 0 || r_rd >= 0 || r_wr >= 0 || m != MAP_FAILED || r_at == 0 || r_rst == 0)
            FATAL("cdev-refuses-before-bind", "an access succeeded before VFIO_DEVICE_BIND_IOMMUFD (see the INFO line)");
        pass("cdev-refuses-before-bind");
    }

    /* --- the two paths exclude each other at VFIO_DEVICE_BIND_IOMMUFD, not at
     * open(): in 6.12 opening the cdev takes nothing (drivers/vfio/device_cdev.c),
     * the bind claims the group (vfio_device_block_group: EBUSY if the group is
     * open), and opening the group fails with EBUSY while a cdev is bound. */
    snprintf(path, sizeof path, "/dev/vfio/%d", grp_a);
    int iommufd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
    if (iommufd < 0)
        FATAL("cdev-bind", "open /dev/iommu: %s", en(errno));
    {
        int g = open(path, O_RDWR | O_CLOEXEC), e = errno;
        if (g < 0)
            FATAL("group-open-while-cdev-unbound", "open %s with %s open, not bound: %s", path, cdev_a, en(e));
        info("group-open-while-cdev-unbound open %s with %s open (not bound): succeeds", path, cdev_a);
        pass("group-open-while-cdev-unbound");
        struct vfio_device_bind_iommufd bind = { .argsz = sizeof bind, .iommufd = iommufd };
        int r = ioctl(a.fd, VFIO_DEVICE_BIND_IOMMUFD, &bind);
        e = errno;
        if (r == 0)
            FATAL("cdev-bind-refused-while-group-open", "VFIO_DEVICE_BIND_IOMMUFD succeeded while %s is open", path);
        info("cdev-bind-refused-while-group-open VFIO_DEVICE_BIND_IOMMUFD with %s open: %s", path, en(e));
        if (e != EBUSY)
            FATAL("cdev-bind-refused-while-group-open", "want EBUSY, got %s", en(e));
        pass("cdev-bind-refused-while-group-open");
        close(g);
    }

    /* --- bind A to an iommufd, allocate an IOAS, attach */
    struct vfio_device_bind_iommufd bind = { .argsz = sizeof bind, .iommufd = iommufd };
    if (ioctl(a.fd, VFIO_DEVICE_BIND_IOMMUFD, &bind))
        FATAL("cdev-bind", "VFIO_DEVICE_BIND_IOMMUFD: %s", en(errno));
    info("cdev-bind %s devid %u", a.bdf, bind.out_devid);
    pass("cdev-bind");
    {
        struct vfio_device_bind_iommufd again = { .argsz = sizeof again, .iommufd = iommufd };
        int r = ioctl(a.fd, VFIO_DEVICE_BIND_IOMMUFD, &again), e = errno;
        info("cdev-bind second VFIO_DEVICE_BIND_IOMMUFD on the same fd: %d %s", r, r ? en(e) : "-");
    }
    {
        int g = open(path, O_RDWR | O_CLOEXEC), e = errno;
        if (g >= 0)
            FATAL("group-refused-while-cdev-bound", "open %s succeeded while %s is bound", path, cdev_a);
        info("group-refused-while-cdev-bound open %s: %s", path, en(e));
        if (e != EBUSY)
            FATAL("group-refused-while-cdev-bound", "want EBUSY, got %s", en(e));
        pass("group-refused-while-cdev-bound");
    }

    struct iommu_ioas_alloc alloc = { .size = sizeof alloc };
    if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc))
        FATAL("ioas-attach", "IOMMU_IOAS_ALLOC: %s", en(errno));
    struct vfio_device_attach_iommufd_pt at = { .argsz = sizeof at, .pt_id = alloc.out_ioas_id };
    if (ioctl(a.fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at))
        FATAL("ioas-attach", "VFIO_DEVICE_ATTACH_IOMMUFD_PT(ioas %u): %s", alloc.out_ioas_id, en(errno));
    info("ioas-attach ioas %u, attached page table (hwpt) %u", alloc.out_ioas_id, at.pt_id);
    pass("ioas-attach");

    /* --- A's registers, interrupt and DMA through the IOAS */
    edu_setup_bar(&a, "cdev-bar");
    edu_factorial(&a, "cdev-factorial");
    edu_msi(&a, "cdev-msi-setup");
    uint8_t *mem = dma_buffer();
    if (ioas_map(iommufd, alloc.out_ioas_id, mem, IOVA, 0x2000))
        FATAL("ioas-map", "IOMMU_IOAS_MAP iova 0x%llx: %s", IOVA, en(errno));
    info("ioas-map ioas %u: va %p -> iova 0x%llx, 0x2000 bytes", alloc.out_ioas_id, (void *)mem, IOVA);
    pass("ioas-map");
    edu_dma(&a, mem, IOVA, 1, "cdev-dma", "cdev-msi");

    /* --- B through the group/container path (type1), and the cdev refused meanwhile */
    snprintf(path, sizeof path, "/dev/vfio/%d", grp_b);
    int group = open(path, O_RDWR | O_CLOEXEC);
    if (group < 0)
        FATAL("group-open", "open %s: %s", path, en(errno));
    pass("group-open");
    {
        /* the cdev opens (nothing is claimed before a bind); it is closed unused */
        int c = open(cdev_b, O_RDWR | O_CLOEXEC), e = errno;
        if (c < 0)
            FATAL("cdev-open-while-group-open", "open %s with %s open: %s", cdev_b, path, en(e));
        info("cdev-open-while-group-open open %s with %s open: succeeds", cdev_b, path);
        close(c);
        pass("cdev-open-while-group-open");
    }
    int container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
    if (container < 0)
        FATAL("group-container", "open /dev/vfio/vfio: %s", en(errno));
    struct vfio_group_status gs = { .argsz = sizeof gs };
    if (ioctl(group, VFIO_GROUP_GET_STATUS, &gs) || !(gs.flags & VFIO_GROUP_FLAGS_VIABLE))
        FATAL("group-container", "group %d not viable (flags 0x%x): %s", grp_b, gs.flags, en(errno));
    if (ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) != 1)
        FATAL("group-container", "container lacks VFIO_TYPE1v2_IOMMU");
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container))
        FATAL("group-container", "VFIO_GROUP_SET_CONTAINER: %s", en(errno));
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
        FATAL("group-container", "VFIO_SET_IOMMU type1v2: %s", en(errno));
    b.fd = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, b.bdf);
    if (b.fd < 0)
        FATAL("group-container", "VFIO_GROUP_GET_DEVICE_FD %s: %s", b.bdf, en(errno));
    info("group-container api %d, group %d, type1v2", ioctl(container, VFIO_GET_API_VERSION), grp_b);
    pass("group-container");
    edu_setup_bar(&b, "group-bar");
    edu_msi(&b, "group-msi-setup");
    uint8_t *mem_b = dma_buffer();
    struct vfio_iommu_type1_dma_map dm = { .argsz = sizeof dm,
        .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        .vaddr = (uintptr_t)mem_b, .iova = IOVA, .size = 0x2000 };
    if (ioctl(container, VFIO_IOMMU_MAP_DMA, &dm))
        FATAL("group-dma", "VFIO_IOMMU_MAP_DMA: %s", en(errno));
    edu_dma(&b, mem_b, IOVA, 3, "group-dma", "group-msi");
    struct vfio_iommu_type1_dma_unmap du = { .argsz = sizeof du, .iova = IOVA, .size = 0x2000 };
    if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &du))
        FATAL("group-dma", "VFIO_IOMMU_UNMAP_DMA: %s", en(errno));
    munmap((void *)b.bar, b.bar_size);
    close(b.efd);
    close(b.fd);
    close(group);
    close(container);

    /* --- B, now through its cdev, joins A's IOAS (one address space, two devices) */
    b.fd = open(cdev_b, O_RDWR | O_CLOEXEC);
    if (b.fd < 0)
        FATAL("shared-ioas", "open %s after the group was closed: %s", cdev_b, en(errno));
    struct vfio_device_bind_iommufd bind_b = { .argsz = sizeof bind_b, .iommufd = iommufd };
    if (ioctl(b.fd, VFIO_DEVICE_BIND_IOMMUFD, &bind_b))
        FATAL("shared-ioas", "VFIO_DEVICE_BIND_IOMMUFD %s: %s", b.bdf, en(errno));
    struct vfio_device_attach_iommufd_pt at_b = { .argsz = sizeof at_b, .pt_id = alloc.out_ioas_id };
    if (ioctl(b.fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at_b))
        FATAL("shared-ioas", "VFIO_DEVICE_ATTACH_IOMMUFD_PT %s (ioas %u): %s", b.bdf, alloc.out_ioas_id, en(errno));
    info("shared-ioas %s devid %u attached to ioas %u (hwpt %u; %s has hwpt %u)", b.bdf, bind_b.out_devid,
         alloc.out_ioas_id, at_b.pt_id, a.bdf, at.pt_id);
    edu_setup_bar(&b, "shared-ioas-bar");
    edu_msi(&b, "shared-ioas-msi-setup");
    edu_dma(&b, mem, IOVA, 5, "shared-ioas-dma", "shared-ioas-msi");
    edu_dma(&a, mem, IOVA, 9, "shared-ioas-dma-a-again", "shared-ioas-msi-a-again");

    /* --- unmap: the range goes away exactly once */
    struct iommu_ioas_unmap um = { .size = sizeof um, .ioas_id = alloc.out_ioas_id, .iova = IOVA, .length = 0x2000 };
    if (ioctl(iommufd, IOMMU_IOAS_UNMAP, &um))
        FATAL("ioas-unmap", "IOMMU_IOAS_UNMAP: %s", en(errno));
    struct iommu_ioas_unmap um2 = um;
    int r2 = ioctl(iommufd, IOMMU_IOAS_UNMAP, &um2), e2 = errno;
    info("ioas-unmap unmapped 0x%llx bytes; unmapping again: %d %s", (unsigned long long)um.length, r2, r2 ? en(e2) : "-");
    if (um.length != 0x2000 || r2 == 0)
        FATAL("ioas-unmap", "first unmap length 0x%llx, second returned %d", (unsigned long long)um.length, r2);
    pass("ioas-unmap");

    /* --- closing the cdev opens the group path again */
    munmap((void *)a.bar, a.bar_size);
    close(a.efd);
    close(a.fd);
    snprintf(path, sizeof path, "/dev/vfio/%d", grp_a);
    int g = open(path, O_RDWR | O_CLOEXEC);
    if (g < 0)
        FATAL("group-after-cdev-close", "open %s after closing %s: %s", path, cdev_a, en(errno));
    close(g);
    pass("group-after-cdev-close");
    close(b.efd);
    close(b.fd);
    close(iommufd);
    printf("E2E-INFO iommufd_test done\n");
    return 0;
}
