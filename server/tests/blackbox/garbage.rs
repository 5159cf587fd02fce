//! A guest driving the NVMe controller and the virtio-blk device with
//! garbage: doorbells of queues that do not exist or with values past the
//! queue, submission entries full of random bytes (seeded, so a failure
//! reproduces), data pointers and queues outside the mapped memory, memory
//! unmapped under a queue in use, invalid CC values, descriptor loops,
//! chains outside memory, avail indexes that jump, notifications of queues
//! that do not exist.
//!
//! Every scenario ends with the same checks: the server answers a region
//! read within [`PROMPT`], every garbage command that completed carries an
//! error status (or the device reports itself broken: CSTS.CFS,
//! `DEVICE_NEEDS_RESET`), a reset brings back a working device, and once
//! the client is gone the server holds the descriptors it held before and
//! serves the next client. Every wait is bounded: a hung device fails the
//! test instead of hanging it.

use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use vdevd_protocol::RegionCap;
use vdevd_tests::sample::{BAR0, config_read, config_write, enable_bus_master, enable_msix};
use vdevd_tests::{Client, EventFd, ServerProcess, SharedMemory};

use crate::common::{EVENT_TIMEOUT, ready, vdevd};

/// The longest a region read may take after garbage.
const PROMPT: Duration = Duration::from_secs(1);

/// splitmix64: a small seeded generator, so that a failing run repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, b: &mut [u8]) {
        for chunk in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The server's descriptor count while one fresh client is connected (a
/// client is served only after the previous one is gone, so everything of
/// earlier sessions has been released by then).
fn fds_with_a_client(s: &mut ServerProcess) -> usize {
    assert!(s.is_running(), "vdevd died; log:\n{}", s.log());
    let mut c = ready(s);
    config_read(&mut c, 0, 4)
        .unwrap_or_else(|e| panic!("the next client is not served: {e}; log:\n{}", s.log()));
    s.fd_count().expect("count descriptors")
}

/// No thread of the server panicked, and once the client is gone the
/// server idles: garbage left no thread spinning (a livelock is a hang
/// that a register read does not show).
fn idles(s: &ServerProcess) {
    let log = s.log();
    assert!(
        !log.contains("panicked"),
        "a thread of the server panicked; log:\n{log}"
    );
    const WINDOW: Duration = Duration::from_millis(300);
    let before = s.cpu_time_precise().expect("CPU time");
    std::thread::sleep(WINDOW);
    let used = s
        .cpu_time_precise()
        .expect("CPU time")
        .saturating_sub(before);
    assert!(
        used < WINDOW / 5,
        "the server used {used:?} of CPU in {WINDOW:?} with no client; log:\n{}",
        s.log()
    );
}

/// Map the first sparse-mmap area of `region` (a doorbell or notify page
/// the server shares), as a client that offers it to the guest does.
fn map_sparse_area(c: &mut Client, region: u32) -> SharedMemory {
    let (info, fd) = c.region_info(region).expect("region info");
    let area = info
        .caps
        .iter()
        .find_map(|cap| match cap {
            RegionCap::SparseMmap(areas) => areas.first().copied(),
            _ => None,
        })
        .expect("a sparse-mmap area");
    let fd = fd.expect("the area's descriptor");
    SharedMemory::map_file(File::from(fd), info.offset + area.offset, area.size)
        .expect("mmap the area")
}

mod nvme {
    use super::*;

    pub const RAM: u64 = 0x10_0000;
    pub const RAM_SIZE: u64 = 1 << 20;
    /// A second mapping, unmapped under queues in use.
    pub const RAM2: u64 = 0x40_0000;
    pub const RAM2_SIZE: u64 = 64 << 10;
    /// Never mapped.
    pub const HOLE: u64 = 0x8000_0000;
    // Offsets in RAM.
    pub const ASQ: u64 = 0;
    pub const ACQ: u64 = 0x1000;
    pub const DATA: u64 = 0x2000;
    pub const IOSQ: u64 = 0x4000;
    pub const IOCQ: u64 = 0x5000;
    /// Entries of every queue the tests create.
    pub const QSIZE: u32 = 64;
    // BAR0 registers (NVMe 1.4, 3.1).
    pub const CC: u64 = 0x14;
    pub const CSTS: u64 = 0x1c;
    pub const AQA: u64 = 0x24;
    pub const ASQ_REG: u64 = 0x28;
    pub const ACQ_REG: u64 = 0x30;
    pub const DOORBELLS: u64 = 0x1000;
    pub const RDY: u32 = 1;
    pub const CFS: u32 = 2;
    /// EN, 64-byte SQ entries, 16-byte CQ entries, 4 KiB pages, NVM.
    pub const CC_GOOD: u32 = 1 | (6 << 16) | (4 << 20);
    /// Namespace size: `--size 16M` in 512-byte blocks.
    pub const BLOCKS: u64 = (16 << 20) / 512;

    // Status codes (generic command status unless noted).
    pub const SC_INVALID_OPCODE: u16 = 0x01;
    pub const SC_INVALID_FIELD: u16 = 0x02;
    pub const SC_DATA_TRANSFER: u16 = 0x04;
    pub const SC_INVALID_NAMESPACE: u16 = 0x0b;
    pub const SC_INVALID_PRP_OFFSET: u16 = 0x13;
    pub const SC_LBA_RANGE: u16 = 0x80;

    /// Admin opcodes the controller implements.
    pub const ADMIN_OPCODES: [u8; 12] = [
        0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0a, 0x0c, 0x18, 0x7c,
    ];
    /// I/O opcodes of the NVM command set it implements.
    pub const IO_OPCODES: [u8; 5] = [0x00, 0x01, 0x02, 0x08, 0x09];

    #[derive(Clone, Copy, Debug)]
    pub struct Cqe {
        pub dw0: u32,
        pub sqid: u16,
        pub cid: u16,
        /// The status field (bits 31:17 of DW3): SC, SCT, CRD, M, DNR.
        pub status: u16,
    }

    impl Cqe {
        pub fn sc(&self) -> u16 {
            self.status & 0xff
        }
        pub fn sct(&self) -> u16 {
            (self.status >> 8) & 7
        }
        pub fn ok(&self) -> bool {
            self.status & 0x7ff == 0
        }
    }

    /// The host side of one queue pair: where the next entry goes, where
    /// the next completion comes, and its phase.
    pub struct Pair {
        pub qid: u16,
        pub sq: u64,
        pub cq: u64,
        /// The memory that holds both queues, and the IOVA it is mapped at.
        pub base: u64,
        pub tail: u32,
        pub head: u32,
        pub phase: bool,
    }

    impl Pair {
        pub fn new(qid: u16, base: u64, sq: u64, cq: u64) -> Pair {
            Pair {
                qid,
                sq,
                cq,
                base,
                tail: 0,
                head: 0,
                phase: true,
            }
        }
    }

    /// A server running `vdevd nvme` and a client that drives it.
    pub struct Host {
        pub s: ServerProcess,
        pub c: Client,
        pub mem: SharedMemory,
        pub mem2: SharedMemory,
        pub admin: Pair,
        /// Descriptors the server holds with one fresh client.
        pub baseline: usize,
        _irqs: Vec<EventFd>,
    }

    impl Host {
        pub fn new() -> Host {
            Host::with_args(&[])
        }

        pub fn with_args(args: &[&str]) -> Host {
            let args = [&["--size", "16M"], args].concat();
            let mut s = ServerProcess::start(vdevd(), "nvme", &args, "debug")
                .unwrap_or_else(|e| panic!("cannot start vdevd nvme: {e}"));
            let baseline = fds_with_a_client(&mut s);
            let mut c = ready(&s);
            c.set_timeout(Duration::from_secs(5)).expect("timeout");
            let mem = SharedMemory::new("nvme-ram", RAM_SIZE).expect("memfd");
            c.dma_map_fd(RAM, RAM_SIZE, mem.as_fd(), 0, true)
                .expect("DMA_MAP");
            let mem2 = SharedMemory::new("nvme-ram2", RAM2_SIZE).expect("memfd");
            enable_bus_master(&mut c).expect("bus master");
            let irqs = enable_msix(&mut c, 2).expect("MSI-X");
            Host {
                s,
                c,
                mem,
                mem2,
                admin: Pair::new(0, RAM, ASQ, ACQ),
                baseline,
                _irqs: irqs,
            }
        }

        fn memory(&self, base: u64) -> &SharedMemory {
            if base == RAM2 { &self.mem2 } else { &self.mem }
        }

        pub fn csts(&mut self) -> u32 {
            self.c
                .read32(BAR0, CSTS)
                .unwrap_or_else(|e| panic!("CSTS read failed: {e}; log:\n{}", self.s.log()))
        }

        /// The server answers a register read promptly.
        pub fn prompt(&mut self, after: &str) -> u32 {
            let t0 = Instant::now();
            let v = self.csts();
            assert!(
                t0.elapsed() < PROMPT,
                "after {after}: a CSTS read took {:?}",
                t0.elapsed()
            );
            assert!(self.s.is_running(), "vdevd died after {after}");
            v
        }

        pub fn wait_csts(&mut self, what: &str, cond: impl Fn(u32) -> bool) -> u32 {
            let t0 = Instant::now();
            loop {
                let v = self.csts();
                if cond(v) {
                    return v;
                }
                assert!(
                    t0.elapsed() < EVENT_TIMEOUT,
                    "timed out waiting for {what} (CSTS {v:#x}); log:\n{}",
                    self.s.log()
                );
                std::thread::sleep(Duration::from_micros(500));
            }
        }

        /// CC.EN 1 with a 64-entry admin queue pair; waits for RDY.
        pub fn enable(&mut self) {
            // Stale completions must not look new to the first pass.
            self.mem.write(ACQ, &[0u8; 4096]).expect("clear ACQ");
            self.admin = Pair::new(0, RAM, ASQ, ACQ);
            let n = QSIZE - 1;
            self.c.write32(BAR0, AQA, (n << 16) | n).expect("AQA");
            self.c.write64(BAR0, ASQ_REG, RAM + ASQ).expect("ASQ");
            self.c.write64(BAR0, ACQ_REG, RAM + ACQ).expect("ACQ");
            self.c.write32(BAR0, CC, CC_GOOD).expect("CC");
            let v = self.wait_csts("CSTS.RDY", |v| v & (RDY | CFS) != 0);
            assert_eq!(v & (RDY | CFS), RDY, "enable with a valid configuration");
        }

        /// CC.EN 0; waits until RDY and CFS are clear.
        pub fn disable(&mut self) {
            self.c.write32(BAR0, CC, 0).expect("CC");
            self.wait_csts("the controller reset", |v| v & (RDY | CFS) == 0);
        }

        /// Controller reset, enable, and an Identify that works.
        pub fn reset_and_identify(&mut self, after: &str) {
            self.prompt(after);
            self.disable();
            self.enable();
            self.identify_works(after);
        }

        pub fn identify_works(&mut self, after: &str) {
            self.mem.write(DATA, &[0u8; 4096]).expect("clear");
            let mut sqe = [0u8; 64];
            sqe[0] = 0x06;
            sqe[2..4].copy_from_slice(&0xbeefu16.to_le_bytes());
            sqe[24..32].copy_from_slice(&(RAM + DATA).to_le_bytes());
            sqe[40] = 1; // CNS 1: controller
            let cqe = self.admin_cmd(&sqe);
            assert!(cqe.ok(), "after {after}: Identify failed: {cqe:?}");
            assert_eq!(cqe.cid, 0xbeef);
            let data = self.mem.read(DATA, 64).expect("read");
            assert!(
                data[24..64].starts_with(b"vdevd NVMe controller"),
                "after {after}: Identify data"
            );
        }

        /// Put `sqe` in the SQ of `p` without ringing.
        pub fn put(&self, p: &mut Pair, sqe: &[u8; 64]) {
            let off = p.sq + u64::from(p.tail) * 64;
            self.memory(p.base).write(off, sqe).expect("write SQE");
            p.tail = (p.tail + 1) % QSIZE;
        }

        pub fn ring_sq(&mut self, qid: u16, tail: u32) {
            self.c
                .write32(BAR0, DOORBELLS + 8 * u64::from(qid), tail)
                .expect("SQ doorbell");
        }

        pub fn ring_cq(&mut self, qid: u16, head: u32) {
            self.c
                .write32(BAR0, DOORBELLS + 8 * u64::from(qid) + 4, head)
                .expect("CQ doorbell");
        }

        /// The next completion of `p` if one has been posted.
        pub fn poll(&mut self, p: &mut Pair) -> Option<Cqe> {
            let off = p.cq + u64::from(p.head) * 16;
            let b = self.memory(p.base).read(off, 16).expect("read CQE");
            let dw0 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let sqid = u16::from_le_bytes([b[10], b[11]]);
            let dw3 = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
            if (dw3 >> 16) & 1 != u32::from(p.phase) {
                return None;
            }
            p.head = (p.head + 1) % QSIZE;
            if p.head == 0 {
                p.phase = !p.phase;
            }
            Some(Cqe {
                dw0,
                sqid,
                cid: dw3 as u16,
                status: (dw3 >> 17) as u16,
            })
        }

        /// Wait for `n` completions of `p` and ring its CQ head doorbell.
        pub fn reap(&mut self, p: &mut Pair, n: usize) -> Vec<Cqe> {
            let mut out = Vec::with_capacity(n);
            let t0 = Instant::now();
            while out.len() < n {
                match self.poll(p) {
                    Some(c) => out.push(c),
                    None => {
                        assert!(
                            t0.elapsed() < EVENT_TIMEOUT,
                            "{} of {n} completions on queue {} (CSTS {:#x}); log:\n{}",
                            out.len(),
                            p.qid,
                            self.csts(),
                            self.s.log()
                        );
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
            }
            let head = p.head;
            self.ring_cq(p.qid, head);
            out
        }

        /// One admin command, waited for.
        pub fn admin_cmd(&mut self, sqe: &[u8; 64]) -> Cqe {
            let mut p = std::mem::replace(&mut self.admin, Pair::new(0, RAM, ASQ, ACQ));
            self.put(&mut p, sqe);
            let tail = p.tail;
            self.ring_sq(0, tail);
            let c = self.reap(&mut p, 1);
            self.admin = p;
            c[0]
        }

        /// Create I/O CQ and SQ `qid` at these addresses (IOVAs).
        pub fn create_pair(&mut self, qid: u16, sq: u64, cq: u64) -> (Cqe, Cqe) {
            let mut e = [0u8; 64];
            e[0] = 0x05;
            e[2..4].copy_from_slice(&0x100u16.to_le_bytes());
            e[24..32].copy_from_slice(&cq.to_le_bytes());
            let dw10 = ((QSIZE - 1) << 16) | u32::from(qid);
            e[40..44].copy_from_slice(&dw10.to_le_bytes());
            e[44..48].copy_from_slice(&1u32.to_le_bytes()); // PC, no interrupts
            let c1 = self.admin_cmd(&e);
            let mut e = [0u8; 64];
            e[0] = 0x01;
            e[2..4].copy_from_slice(&0x101u16.to_le_bytes());
            e[24..32].copy_from_slice(&sq.to_le_bytes());
            e[40..44].copy_from_slice(&dw10.to_le_bytes());
            let dw11 = (u32::from(qid) << 16) | 1; // CQID, PC
            e[44..48].copy_from_slice(&dw11.to_le_bytes());
            let c2 = self.admin_cmd(&e);
            (c1, c2)
        }

        /// The server lives, serves the next client, and holds `baseline`
        /// descriptors.
        pub fn finish(self) {
            let Host {
                mut s, c, baseline, ..
            } = self;
            drop(c);
            let now = fds_with_a_client(&mut s);
            assert_eq!(now, baseline, "descriptors after the garbage");
            idles(&s);
        }
    }

    pub fn flush(cid: u16) -> [u8; 64] {
        let mut e = [0u8; 64];
        e[0] = 0x00;
        e[2..4].copy_from_slice(&cid.to_le_bytes());
        e[4..8].copy_from_slice(&1u32.to_le_bytes());
        e
    }

    pub fn aer(cid: u16) -> [u8; 64] {
        let mut e = [0u8; 64];
        e[0] = 0x0c;
        e[2..4].copy_from_slice(&cid.to_le_bytes());
        e
    }

    /// Get Log Page Error Information (clears the masked error event).
    pub fn error_log(cid: u16) -> [u8; 64] {
        let mut e = [0u8; 64];
        e[0] = 0x02;
        e[2..4].copy_from_slice(&cid.to_le_bytes());
        e[4..8].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        e[24..32].copy_from_slice(&(RAM + DATA).to_le_bytes());
        // LID 1, NUMDL 15: 64 bytes.
        e[40..44].copy_from_slice(&(1u32 | (15 << 16)).to_le_bytes());
        e
    }

    /// A data pointer that is not in mapped memory.
    pub fn outside(rng: &mut Rng) -> u64 {
        match rng.below(6) {
            0 => rng.next(),
            1 => HOLE + (rng.below(1 << 20) & !3),
            // Starts in RAM, runs past its end.
            2 => RAM + RAM_SIZE - 0x100,
            3 => RAM + RAM_SIZE + (rng.below(1 << 20) & !0xfff),
            4 => !0xfff,
            _ => rng.below(RAM) & !3,
        }
    }
}

use nvme::*;

/// Doorbells before the controller is enabled, of queues that do not
/// exist, with tail and head values past the queue: nothing hangs, the
/// writes that are reported come as "invalid doorbell" asynchronous
/// events, and the controller goes on.
#[test]
fn nvme_garbage_doorbells() {
    let mut h = Host::new();
    let mut rng = Rng(0x0d00_be11);
    // Before the controller is enabled: every doorbell of the page.
    for off in (DOORBELLS..0x2000).step_by(4) {
        h.c.write32(BAR0, off, rng.next() as u32).expect("doorbell");
    }
    assert_eq!(h.prompt("doorbells while disabled"), 0, "CSTS untouched");
    h.enable();
    // An AER armed now must not complete with an event from before the
    // controller was enabled.
    let mut p = std::mem::replace(&mut h.admin, Pair::new(0, RAM, ASQ, ACQ));
    h.put(&mut p, &aer(0xa0));
    let tail = p.tail;
    h.ring_sq(0, tail);
    h.admin = p;
    h.identify_works("doorbells while disabled");
    std::thread::sleep(Duration::from_millis(20));
    let mut p = std::mem::replace(&mut h.admin, Pair::new(0, RAM, ASQ, ACQ));
    let stale = h.poll(&mut p);
    h.admin = p;
    assert!(
        stale.is_none(),
        "the AER completed with an event of before the enable: {stale:?}"
    );

    // A doorbell of an SQ that does not exist: Invalid Doorbell Register.
    h.ring_sq(3, 1);
    let mut p = std::mem::replace(&mut h.admin, Pair::new(0, RAM, ASQ, ACQ));
    let c = h.reap(&mut p, 1)[0];
    h.admin = p;
    assert_eq!(c.cid, 0xa0, "the AER completes");
    assert!(c.ok());
    assert_eq!(
        c.dw0 & 0xffff,
        0x0000,
        "error event, invalid doorbell register"
    );
    assert_eq!((c.dw0 >> 16) & 0xff, 1, "error log page");
    h.prompt("a doorbell of a queue that does not exist");
    assert!(h.admin_cmd(&error_log(0xa1)).ok(), "error log read");

    // The admin SQ tail past the queue: Invalid Doorbell Write Value.
    // The AER is fetched before the Identify behind it completes.
    let mut p = std::mem::replace(&mut h.admin, Pair::new(0, RAM, ASQ, ACQ));
    h.put(&mut p, &aer(0xa2));
    h.admin = p;
    h.identify_works("an AER");
    h.ring_sq(0, QSIZE + 1000);
    let mut p = std::mem::replace(&mut h.admin, Pair::new(0, RAM, ASQ, ACQ));
    let c = h.reap(&mut p, 1)[0];
    h.admin = p;
    assert_eq!(c.cid, 0xa2);
    assert_eq!(
        c.dw0 & 0xffff,
        0x0100,
        "error event, invalid doorbell value"
    );
    h.prompt("an SQ tail past the queue");
    assert!(h.admin_cmd(&error_log(0xa3)).ok());
    h.identify_works("an SQ tail past the queue");

    // CQ head past the queue, then a flood of random doorbells, some to
    // queues that exist: no hang, no death.
    h.ring_cq(0, 5000);
    h.create_pair(1, RAM + IOSQ, RAM + IOCQ);
    for _ in 0..500 {
        let qid = rng.below(8) as u16;
        let v = match rng.below(3) {
            0 => rng.next() as u32,
            1 => QSIZE + rng.below(1000) as u32,
            _ => u32::MAX,
        };
        if rng.below(2) == 0 {
            h.ring_sq(qid, v);
        } else {
            h.ring_cq(qid, v);
        }
    }
    let csts = h.prompt("random doorbells");
    assert_eq!(csts & RDY, RDY);
    h.reset_and_identify("random doorbells");
    h.finish();
}

/// Invalid CC values: each enable with a configuration the controller
/// does not support sets CSTS.CFS and not RDY; random CC writes do not
/// wedge it; CC.EN 0 then 1 brings it back.
#[test]
fn nvme_invalid_cc_values() {
    let mut h = Host::new();
    let n = QSIZE - 1;
    let good_aqa = (n << 16) | n;
    // (what, AQA, ASQ, CC)
    let cases: [(&str, u32, u64, u32); 7] = [
        ("command set 1", good_aqa, RAM, CC_GOOD | (1 << 4)),
        ("command set 7", good_aqa, RAM, CC_GOOD | (7 << 4)),
        ("page size 2^17", good_aqa, RAM, CC_GOOD | (5 << 7)),
        ("page size 2^27", good_aqa, RAM, CC_GOOD | (15 << 7)),
        ("arbitration 7", good_aqa, RAM, CC_GOOD | (7 << 11)),
        ("admin SQ at 0", good_aqa, 0, CC_GOOD),
        ("1-entry admin queues", 0, RAM, CC_GOOD),
    ];
    for (what, aqa, asq, cc) in cases {
        h.c.write32(BAR0, AQA, aqa).expect("AQA");
        h.c.write64(BAR0, ASQ_REG, asq).expect("ASQ");
        h.c.write64(BAR0, ACQ_REG, RAM + ACQ).expect("ACQ");
        h.c.write32(BAR0, CC, cc).expect("CC");
        let v = h.wait_csts(what, |v| v & (RDY | CFS) != 0);
        assert_eq!(v & (RDY | CFS), CFS, "{what}: CFS, not ready");
        h.disable();
    }
    // Too many entries for CAP.MQES (1024): 4096.
    h.c.write32(BAR0, AQA, 0x0fff_0fff).expect("AQA");
    h.c.write32(BAR0, CC, CC_GOOD).expect("CC");
    let v = h.wait_csts("AQA above MQES", |v| v & (RDY | CFS) != 0);
    assert_eq!(v & (RDY | CFS), CFS, "admin queues above MQES");
    h.disable();
    h.enable();
    h.identify_works("invalid CC values");
    // Random CC values, flipping EN and SHN, while the queues are set up.
    let mut rng = Rng(0xcc);
    for _ in 0..300 {
        h.c.write32(BAR0, CC, rng.next() as u32).expect("CC");
    }
    h.prompt("random CC values");
    h.c.write32(BAR0, CC, 0).expect("CC");
    h.wait_csts("reset after random CC values", |v| v & (RDY | CFS) == 0);
    h.enable();
    h.identify_works("random CC values");
    h.finish();
}

/// Thousands of admin submission entries of random bytes: each completes
/// with the command identifier it was given and an error status unless it
/// is an implemented command that transfers no data to memory that is not
/// mapped.
#[test]
fn nvme_random_admin_commands() {
    let mut h = Host::new();
    h.enable();
    let mut rng = Rng(0xad31);
    const TOTAL: usize = 3200;
    const BATCH: usize = 16;
    let mut sent = 0usize;
    let (mut failed, mut succeeded) = (0usize, 0usize);
    while sent < TOTAL {
        let mut p = std::mem::replace(&mut h.admin, Pair::new(0, RAM, ASQ, ACQ));
        let mut batch = Vec::new();
        for _ in 0..BATCH {
            let mut e = [0u8; 64];
            rng.fill(&mut e);
            // Command identifiers say which entry a completion answers;
            // AERs (which complete only on an event) are left out so that
            // every entry sent gets its completion in this batch.
            let cid = sent as u16;
            e[2..4].copy_from_slice(&cid.to_le_bytes());
            if e[0] == 0x0c {
                e[0] = 0x0d;
            }
            h.put(&mut p, &e);
            batch.push(e);
            sent += 1;
        }
        let tail = p.tail;
        h.ring_sq(0, tail);
        let done = h.reap(&mut p, BATCH);
        h.admin = p;
        for c in done {
            assert_eq!(c.sqid, 0);
            let i = batch
                .iter()
                .position(|e| u16::from_le_bytes([e[2], e[3]]) == c.cid)
                .unwrap_or_else(|| panic!("completion for a command not sent: {c:?}"));
            let e = batch.swap_remove(i);
            let opcode = e[0];
            let prp1 = u64::from_le_bytes(e[24..32].try_into().expect("8"));
            let in_ram = (RAM..RAM + RAM_SIZE).contains(&prp1);
            if !ADMIN_OPCODES.contains(&opcode) {
                assert!(
                    !c.ok() && c.sct() == 0,
                    "opcode {opcode:#x} is not implemented: {c:?}"
                );
                assert!(
                    [SC_INVALID_OPCODE, SC_INVALID_FIELD].contains(&c.sc()),
                    "opcode {opcode:#x}: {c:?}"
                );
            } else if matches!(opcode, 0x02 | 0x06) && !in_ram {
                assert!(!c.ok(), "opcode {opcode:#x} with PRP1 {prp1:#x}: {c:?}");
            }
            if c.ok() {
                succeeded += 1;
            } else {
                failed += 1;
            }
        }
        assert!(batch.is_empty(), "commands without completion: {batch:?}");
    }
    assert_eq!(failed + succeeded, TOTAL);
    assert!(failed > TOTAL * 9 / 10, "{failed} of {TOTAL} failed");
    let csts = h.prompt("random admin commands");
    assert_eq!(csts & (RDY | CFS), RDY, "no fatal status for bad commands");
    h.identify_works("random admin commands");
    h.reset_and_identify("random admin commands");
    h.finish();
}

/// Random I/O submission entries, and reads and writes whose PRPs (or
/// SGLs) point outside the mapped memory.
#[test]
fn nvme_random_io_commands_and_pointers_outside_memory() {
    let mut h = Host::new();
    h.enable();
    let (c1, c2) = h.create_pair(1, RAM + IOSQ, RAM + IOCQ);
    assert!(c1.ok() && c2.ok(), "I/O queues: {c1:?} {c2:?}");
    let mut q = Pair::new(1, RAM, IOSQ, IOCQ);
    let mut rng = Rng(0x10);
    const TOTAL: usize = 4000;
    const BATCH: usize = 32;
    let mut sent = 0usize;
    let mut failed = 0usize;
    while sent < TOTAL {
        let mut batch = Vec::new();
        for _ in 0..BATCH {
            let mut e = [0u8; 64];
            rng.fill(&mut e);
            if sent % 2 == 1 {
                // A read or write of the namespace, data outside memory.
                e[0] = if rng.below(2) == 0 { 0x02 } else { 0x01 };
                e[1] &= 0xc0; // no fused operation
                e[4..8].copy_from_slice(&1u32.to_le_bytes());
                let slba = rng.below(BLOCKS - 64);
                e[40..48].copy_from_slice(&slba.to_le_bytes());
                let nlb = rng.below(32) as u32; // up to 16 KiB
                e[48..52].copy_from_slice(&nlb.to_le_bytes());
                e[24..32].copy_from_slice(&outside(&mut rng).to_le_bytes());
                e[32..40].copy_from_slice(&outside(&mut rng).to_le_bytes());
            }
            e[2..4].copy_from_slice(&(sent as u16).to_le_bytes());
            h.put(&mut q, &e);
            batch.push(e);
            sent += 1;
        }
        let tail = q.tail;
        h.ring_sq(1, tail);
        let done = h.reap(&mut q, BATCH);
        for c in done {
            assert_eq!(c.sqid, 1);
            let i = batch
                .iter()
                .position(|e| u16::from_le_bytes([e[2], e[3]]) == c.cid)
                .unwrap_or_else(|| panic!("completion for a command not sent: {c:?}"));
            let e = batch.swap_remove(i);
            let opcode = e[0];
            let nsid = u32::from_le_bytes(e[4..8].try_into().expect("4"));
            let psdt = (e[1] >> 6) & 3;
            if !IO_OPCODES.contains(&opcode) {
                assert!(!c.ok(), "opcode {opcode:#x} is not implemented: {c:?}");
            } else if nsid != 1 && nsid != 0xffff_ffff {
                assert!(
                    !c.ok() && [SC_INVALID_NAMESPACE, SC_INVALID_FIELD].contains(&c.sc()),
                    "nsid {nsid}: {c:?}"
                );
            } else if matches!(opcode, 0x01 | 0x02) && psdt == 0 && nsid == 1 {
                // PRPs outside mapped memory (or an LBA range past the
                // end, for the random ones).
                assert!(!c.ok(), "{opcode:#x} with PRPs outside memory: {c:?}");
                assert!(
                    [
                        SC_DATA_TRANSFER,
                        SC_INVALID_PRP_OFFSET,
                        SC_INVALID_FIELD,
                        SC_LBA_RANGE
                    ]
                    .contains(&c.sc())
                        && c.sct() == 0,
                    "{opcode:#x} with PRPs outside memory: {c:?}"
                );
            } else if matches!(opcode, 0x01 | 0x02) {
                assert!(!c.ok(), "{opcode:#x} with an SGL outside memory: {c:?}");
            }
            if !c.ok() {
                failed += 1;
            }
        }
        assert!(batch.is_empty(), "commands without completion: {batch:?}");
    }
    assert!(failed > TOTAL * 9 / 10, "{failed} of {TOTAL} failed");
    let csts = h.prompt("random I/O commands");
    assert_eq!(csts & (RDY | CFS), RDY, "no fatal status for bad commands");
    // Pointers outside memory one kind at a time, with the exact status:
    // a 12 KiB read (PRP1 and a PRP list), or 512 bytes through an SGL.
    const LIST: u64 = 0x7000;
    let entries: Vec<u8> = [HOLE, HOLE + 0x1000]
        .iter()
        .flat_map(|a| a.to_le_bytes())
        .collect();
    h.mem.write(LIST, &entries).expect("PRP list");
    // An SGL segment whose only descriptor is a data block in the hole.
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&HOLE.to_le_bytes());
    seg[8..12].copy_from_slice(&512u32.to_le_bytes());
    h.mem.write(LIST + 0x100, &seg).expect("SGL segment");
    let cases: [(&str, u8, u32, u64, u64, u16); 6] = [
        // (what, PSDT, NLB, DPTR low, DPTR high, status)
        ("PRP1 in the hole", 0, 0, HOLE, 0, SC_DATA_TRANSFER),
        (
            "PRP list in the hole",
            0,
            23,
            RAM + DATA,
            HOLE,
            SC_DATA_TRANSFER,
        ),
        (
            "PRP list entries in the hole",
            0,
            23,
            RAM + DATA,
            RAM + LIST,
            SC_DATA_TRANSFER,
        ),
        (
            "PRP1 at an odd offset",
            0,
            0,
            RAM + DATA + 1,
            0,
            SC_INVALID_PRP_OFFSET,
        ),
        (
            "an SGL data block in the hole",
            1,
            0,
            HOLE,
            512,
            SC_DATA_TRANSFER,
        ),
        (
            "an SGL last segment whose data block is in the hole",
            1,
            0,
            RAM + LIST + 0x100,
            16 | (0x30 << 56),
            SC_DATA_TRANSFER,
        ),
    ];
    for (i, (what, psdt, nlb, d1, d2, want)) in cases.into_iter().enumerate() {
        for opcode in [0x02u8, 0x01] {
            let mut e = [0u8; 64];
            e[0] = opcode;
            e[1] = psdt << 6;
            let cid = 0xe000 + (i as u16) * 2 + u16::from(opcode);
            e[2..4].copy_from_slice(&cid.to_le_bytes());
            e[4..8].copy_from_slice(&1u32.to_le_bytes());
            e[24..32].copy_from_slice(&d1.to_le_bytes());
            e[32..40].copy_from_slice(&d2.to_le_bytes());
            e[48..52].copy_from_slice(&nlb.to_le_bytes());
            h.put(&mut q, &e);
            let tail = q.tail;
            h.ring_sq(1, tail);
            let c = h.reap(&mut q, 1)[0];
            assert_eq!(c.cid, cid);
            assert_eq!(
                (c.sct(), c.sc()),
                (0, want),
                "{what}, opcode {opcode:#x}: {c:?}"
            );
        }
    }
    // The queue still works: a flush succeeds.
    h.put(&mut q, &flush(0xf1));
    let tail = q.tail;
    h.ring_sq(1, tail);
    let c = h.reap(&mut q, 1)[0];
    assert!(c.ok() && c.cid == 0xf1, "flush after the garbage: {c:?}");
    h.reset_and_identify("random I/O commands");
    h.finish();
}

/// Queues whose memory is not mapped, or is unmapped while they are in
/// use: the controller cannot fetch or post, so it reports Controller
/// Fatal Status (NVMe 1.4, 10.5), and a controller reset recovers.
#[test]
fn nvme_queues_outside_memory_or_unmapped_in_use() {
    let mut h = Host::new();
    // An SQ in a hole.
    h.enable();
    let (c1, c2) = h.create_pair(1, HOLE, RAM + IOCQ);
    assert!(c1.ok() && c2.ok(), "creation cannot check the memory");
    h.ring_sq(1, 1);
    h.wait_csts("CFS for an SQ outside memory", |v| v & CFS != 0);
    h.reset_and_identify("an SQ outside memory");

    // A CQ in a hole.
    let (c1, c2) = h.create_pair(1, RAM + IOSQ, HOLE);
    assert!(c1.ok() && c2.ok());
    let mut q = Pair::new(1, RAM, IOSQ, IOCQ);
    h.put(&mut q, &flush(1));
    h.ring_sq(1, 1);
    h.wait_csts("CFS for a CQ outside memory", |v| v & CFS != 0);
    h.reset_and_identify("a CQ outside memory");

    // The admin queues in a hole.
    h.disable();
    h.c.write64(BAR0, ASQ_REG, HOLE).expect("ASQ");
    h.c.write32(BAR0, CC, CC_GOOD).expect("CC");
    h.wait_csts("RDY", |v| v & RDY != 0);
    h.ring_sq(0, 1);
    h.wait_csts("CFS for an admin SQ outside memory", |v| v & CFS != 0);
    h.reset_and_identify("an admin SQ outside memory");

    // Queues in the second mapping, which is unmapped while they work.
    for round in 0..2 {
        h.c.dma_map_fd(RAM2, RAM2_SIZE, h.mem2.as_fd(), 0, true)
            .expect("DMA_MAP");
        h.mem2.write(0x1000, &[0u8; 4096]).expect("clear CQ");
        let (c1, c2) = h.create_pair(1, RAM2, RAM2 + 0x1000);
        assert!(c1.ok() && c2.ok());
        let mut q = Pair::new(1, RAM2, 0, 0x1000);
        for i in 0..4 {
            h.put(&mut q, &flush(i));
        }
        let tail = q.tail;
        h.ring_sq(1, tail);
        let done = h.reap(&mut q, 4);
        assert!(
            done.iter().all(Cqe::ok),
            "flushes before the unmap: {done:?}"
        );
        // Round 0: commands are waiting when the memory goes; round 1:
        // the doorbell comes after.
        if round == 0 {
            for i in 0..8 {
                h.put(&mut q, &flush(0x10 + i));
            }
            let tail = q.tail;
            h.ring_sq(1, tail);
        }
        h.c.dma_unmap(RAM2, RAM2_SIZE).expect("DMA_UNMAP");
        if round == 1 {
            h.put(&mut q, &flush(0x20));
            let tail = q.tail;
            h.ring_sq(1, tail);
        }
        let t0 = Instant::now();
        // Either the commands were done before the unmap, or the
        // controller finds the memory gone: no hang either way.
        loop {
            let csts = h.prompt("an unmap under a queue in use");
            if csts & CFS != 0 {
                break;
            }
            if round == 0 {
                let b = h.mem2.read(0x1000 + 11 * 16, 16).expect("read");
                if (b[14] & 1) == 1 {
                    break;
                }
            }
            assert!(
                t0.elapsed() < EVENT_TIMEOUT,
                "neither CFS nor completions after the unmap; log:\n{}",
                h.s.log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        if round == 1 {
            assert_ne!(h.csts() & CFS, 0);
        }
        h.reset_and_identify("an unmap under a queue in use");
    }
    h.finish();
}

mod vblk {
    use super::*;
    use vdevd_tests::sample::find_capability;

    pub const RAM: u64 = 0x10_0000;
    pub const RAM_SIZE: u64 = 1 << 20;
    pub const HOLE: u64 = 0x8000_0000;
    // Offsets in RAM.
    pub const DESC: u64 = 0x0000;
    pub const AVAIL: u64 = 0x1000;
    pub const USED: u64 = 0x2000;
    pub const HEADER: u64 = 0x3000;
    pub const DATA: u64 = 0x4000;
    pub const STATUS: u64 = 0x5000;
    /// Queue size the driver sets.
    pub const QSIZE: u16 = 16;
    /// Disk size: `--size 16M` in sectors.
    pub const SECTORS: u64 = (16 << 20) / 512;

    // virtio-pci common configuration (virtio 1.2, 4.1.4.3).
    pub const DEVICE_FEATURE_SELECT: u64 = 0;
    pub const DEVICE_FEATURE: u64 = 4;
    pub const DRIVER_FEATURE_SELECT: u64 = 8;
    pub const DRIVER_FEATURE: u64 = 12;
    pub const DEVICE_STATUS: u64 = 20;
    pub const QUEUE_SELECT: u64 = 22;
    pub const QUEUE_SIZE: u64 = 24;
    pub const QUEUE_MSIX_VECTOR: u64 = 26;
    pub const QUEUE_ENABLE: u64 = 28;
    pub const QUEUE_NOTIFY_OFF: u64 = 30;
    pub const QUEUE_DESC: u64 = 32;
    pub const QUEUE_DRIVER: u64 = 40;
    pub const QUEUE_DEVICE: u64 = 48;

    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 0x40;

    pub const F_NEXT: u16 = 1;
    pub const F_WRITE: u16 = 2;
    pub const F_INDIRECT: u16 = 4;
    /// VIRTIO_F_RING_INDIRECT_DESC.
    pub const INDIRECT_DESC: u32 = 1 << 28;

    pub const T_IN: u32 = 0;
    pub const T_OUT: u32 = 1;
    pub const S_OK: u8 = 0;
    pub const S_IOERR: u8 = 1;
    pub const S_UNSUPP: u8 = 2;

    /// A BAR and offset inside it, as a virtio capability gives them.
    #[derive(Clone, Copy, Debug)]
    pub struct Area {
        pub region: u32,
        pub offset: u64,
    }

    /// What the driver found in config space.
    pub struct Layout {
        pub common: Area,
        pub notify: Area,
        pub multiplier: u32,
    }

    /// Walk the vendor-specific capabilities of config space (virtio 1.2,
    /// 4.1.4) for the common configuration and notification areas.
    pub fn layout(c: &mut Client) -> Layout {
        let mut pos = config_read(c, 0x34, 1).expect("capability pointer") & 0xfc;
        let mut common = None;
        let mut notify = None;
        let mut multiplier = 0;
        for _ in 0..48 {
            if pos == 0 {
                break;
            }
            let p = u64::from(pos);
            let id = config_read(c, p, 1).expect("cap id");
            if id == 0x09 {
                let cfg_type = config_read(c, p + 3, 1).expect("cfg_type");
                let bar = config_read(c, p + 4, 1).expect("bar");
                let offset = u64::from(config_read(c, p + 8, 4).expect("offset"));
                let area = Area {
                    region: bar,
                    offset,
                };
                match cfg_type {
                    1 => common = common.or(Some(area)),
                    2 => {
                        notify = notify.or(Some(area));
                        multiplier = config_read(c, p + 16, 4).expect("multiplier");
                    }
                    _ => {}
                }
            }
            pos = config_read(c, p + 1, 1).expect("next") & 0xfc;
        }
        // The MSI-X capability is there too (the helpers find it).
        find_capability(c, 0x11).expect("MSI-X capability");
        Layout {
            common: common.expect("common configuration capability"),
            notify: notify.expect("notification capability"),
            multiplier,
        }
    }

    /// The config-space offset of the PCI configuration access capability.
    pub fn pci_cfg_capability(c: &mut Client) -> u64 {
        let mut pos = config_read(c, 0x34, 1).expect("capability pointer") & 0xfc;
        for _ in 0..48 {
            if pos == 0 {
                break;
            }
            let p = u64::from(pos);
            if config_read(c, p, 1).expect("id") == 0x09
                && config_read(c, p + 3, 1).expect("cfg_type") == 5
            {
                return p;
            }
            pos = config_read(c, p + 1, 1).expect("next") & 0xfc;
        }
        panic!("no VIRTIO_PCI_CAP_PCI_CFG capability");
    }

    pub struct Host {
        pub s: ServerProcess,
        pub c: Client,
        pub mem: SharedMemory,
        pub l: Layout,
        pub notify_off: u16,
        pub avail_idx: u16,
        pub used_seen: u16,
        /// Feature bits 0-31 the driver accepts (VERSION_1 is always on).
        pub low_features: u32,
        pub baseline: usize,
        _irqs: Vec<EventFd>,
    }

    impl Host {
        pub fn new() -> Host {
            Host::with_args(&[])
        }

        pub fn with_args(args: &[&str]) -> Host {
            let args = [&["--size", "16M"], args].concat();
            let mut s = ServerProcess::start(vdevd(), "virtio-blk", &args, "debug")
                .unwrap_or_else(|e| panic!("cannot start vdevd virtio-blk: {e}"));
            let baseline = fds_with_a_client(&mut s);
            let mut c = ready(&s);
            c.set_timeout(Duration::from_secs(5)).expect("timeout");
            let mem = SharedMemory::new("vblk-ram", RAM_SIZE).expect("memfd");
            c.dma_map_fd(RAM, RAM_SIZE, mem.as_fd(), 0, true)
                .expect("DMA_MAP");
            enable_bus_master(&mut c).expect("bus master");
            let irqs = enable_msix(&mut c, 2).expect("MSI-X");
            let l = layout(&mut c);
            let mut h = Host {
                s,
                c,
                mem,
                l,
                notify_off: 0,
                avail_idx: 0,
                used_seen: 0,
                low_features: 0,
                baseline,
                _irqs: irqs,
            };
            h.init();
            h
        }

        pub fn r8(&mut self, off: u64) -> u8 {
            let a = self.l.common;
            let b = self
                .c
                .region_read(a.region, a.offset + off, 1)
                .unwrap_or_else(|e| panic!("common config read: {e}; log:\n{}", self.s.log()));
            b[0]
        }

        pub fn r16(&mut self, off: u64) -> u16 {
            let a = self.l.common;
            let b = self
                .c
                .region_read(a.region, a.offset + off, 2)
                .expect("common config read");
            u16::from_le_bytes([b[0], b[1]])
        }

        pub fn r32(&mut self, off: u64) -> u32 {
            let a = self.l.common;
            self.c.read32(a.region, a.offset + off).expect("read")
        }

        pub fn w8(&mut self, off: u64, v: u8) {
            let a = self.l.common;
            self.c
                .region_write(a.region, a.offset + off, &[v])
                .expect("common config write");
        }

        pub fn w16(&mut self, off: u64, v: u16) {
            let a = self.l.common;
            self.c
                .region_write(a.region, a.offset + off, &v.to_le_bytes())
                .expect("common config write");
        }

        pub fn w32(&mut self, off: u64, v: u32) {
            let a = self.l.common;
            self.c.write32(a.region, a.offset + off, v).expect("write");
        }

        pub fn w_raw(&mut self, off: u64, data: &[u8]) {
            let a = self.l.common;
            self.c
                .region_write(a.region, a.offset + off, data)
                .expect("common config write");
        }

        pub fn w64(&mut self, off: u64, v: u64) {
            self.w32(off, v as u32);
            self.w32(off + 4, (v >> 32) as u32);
        }

        /// The device status, read promptly.
        pub fn prompt(&mut self, after: &str) -> u8 {
            let t0 = Instant::now();
            let v = self.r8(DEVICE_STATUS);
            assert!(
                t0.elapsed() < PROMPT,
                "after {after}: a status read took {:?}",
                t0.elapsed()
            );
            assert!(self.s.is_running(), "vdevd died after {after}");
            v
        }

        /// Reset the device and bring queue 0 up the way a driver does:
        /// VERSION_1 only, a 16-entry split queue, no interrupts (the
        /// used ring is polled).
        /// [`Host::init`], negotiating these feature bits (of the low 32)
        /// as well from now on.
        pub fn init_with(&mut self, low_features: u32) {
            self.low_features = low_features;
            self.init();
        }

        pub fn init(&mut self) {
            let low_features = self.low_features;
            self.w8(DEVICE_STATUS, 0);
            let t0 = Instant::now();
            while self.r8(DEVICE_STATUS) != 0 {
                assert!(t0.elapsed() < EVENT_TIMEOUT, "the reset never completes");
                std::thread::sleep(Duration::from_micros(200));
            }
            self.w8(DEVICE_STATUS, ACKNOWLEDGE | DRIVER);
            self.w32(DEVICE_FEATURE_SELECT, 1);
            assert_ne!(self.r32(DEVICE_FEATURE) & 1, 0, "VERSION_1 offered");
            self.w32(DEVICE_FEATURE_SELECT, 0);
            let offered = self.r32(DEVICE_FEATURE);
            assert_eq!(offered & low_features, low_features, "features offered");
            self.w32(DRIVER_FEATURE_SELECT, 0);
            self.w32(DRIVER_FEATURE, low_features);
            self.w32(DRIVER_FEATURE_SELECT, 1);
            self.w32(DRIVER_FEATURE, 1);
            self.w8(DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
            assert_ne!(self.r8(DEVICE_STATUS) & FEATURES_OK, 0, "FEATURES_OK");
            self.mem.write(0, &[0u8; 0x6000]).expect("clear rings");
            self.w16(QUEUE_SELECT, 0);
            assert!(self.r16(QUEUE_SIZE) >= QSIZE);
            self.w16(QUEUE_SIZE, QSIZE);
            self.w16(QUEUE_MSIX_VECTOR, 0xffff);
            self.w64(QUEUE_DESC, RAM + DESC);
            self.w64(QUEUE_DRIVER, RAM + AVAIL);
            self.w64(QUEUE_DEVICE, RAM + USED);
            self.notify_off = self.r16(QUEUE_NOTIFY_OFF);
            self.w16(QUEUE_ENABLE, 1);
            self.w8(
                DEVICE_STATUS,
                ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
            );
            self.avail_idx = 0;
            self.used_seen = 0;
        }

        pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write(DESC + 16 * u64::from(i), &d)
                .expect("write descriptor");
        }

        pub fn header(&self, at: u64, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write(at, &h).expect("write header");
        }

        /// Offer chain `head` and set avail.idx to `idx` (normally the
        /// next index).
        pub fn offer(&mut self, head: u16, idx: u16) {
            let slot = u64::from(self.avail_idx % QSIZE);
            self.mem
                .write(AVAIL + 4 + 2 * slot, &head.to_le_bytes())
                .expect("avail ring");
            self.avail_idx = idx;
            self.mem
                .write(AVAIL + 2, &idx.to_le_bytes())
                .expect("avail idx");
        }

        pub fn notify_queue(&mut self, q: u16, off: u16) {
            let a = self.l.notify;
            let at = a.offset + u64::from(off) * u64::from(self.l.multiplier);
            self.c
                .region_write(a.region, at, &q.to_le_bytes())
                .expect("notify");
        }

        pub fn kick(&mut self) {
            let off = self.notify_off;
            self.notify_queue(0, off);
        }

        pub fn used_idx(&self) -> u16 {
            let b = self.mem.read(USED + 2, 2).expect("used idx");
            u16::from_le_bytes([b[0], b[1]])
        }

        /// Wait until `n` more chains are used, or the device needs a
        /// reset. Returns whether they were used.
        pub fn wait_used(&mut self, n: u16, what: &str) -> bool {
            let want = self.used_seen.wrapping_add(n);
            let t0 = Instant::now();
            loop {
                if self.used_idx() == want {
                    self.used_seen = want;
                    return true;
                }
                if self.r8(DEVICE_STATUS) & NEEDS_RESET != 0 {
                    return false;
                }
                assert!(
                    t0.elapsed() < EVENT_TIMEOUT,
                    "{what}: neither used nor DEVICE_NEEDS_RESET; log:\n{}",
                    self.s.log()
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }

        /// A request the ordinary way: header, data, status in three
        /// descriptors starting at `head`. Returns the status byte, or
        /// None if the device needs a reset.
        pub fn request(
            &mut self,
            head: u16,
            kind: u32,
            sector: u64,
            data: u64,
            len: u32,
        ) -> Option<u8> {
            let (d1, d2) = ((head + 1) % QSIZE, (head + 2) % QSIZE);
            self.header(HEADER, kind, sector);
            self.mem.write(STATUS, &[0xff]).expect("status");
            self.desc(head, RAM + HEADER, 16, F_NEXT, d1);
            let wr = if kind == T_IN { F_WRITE } else { 0 };
            self.desc(d1, data, len, F_NEXT | wr, d2);
            self.desc(d2, RAM + STATUS, 1, F_WRITE, 0);
            let idx = self.avail_idx.wrapping_add(1);
            self.offer(head, idx);
            self.kick();
            if !self.wait_used(1, "a request") {
                return None;
            }
            Some(self.mem.read(STATUS, 1).expect("status")[0])
        }

        /// Write a pattern to a sector and read it back.
        pub fn read_works(&mut self, after: &str) {
            let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
            self.mem.write(DATA, &pattern).expect("pattern");
            let st = self.request(0, T_OUT, 9, RAM + DATA, 512);
            assert_eq!(st, Some(S_OK), "after {after}: a write");
            self.mem.write(DATA, &[0u8; 512]).expect("clear");
            let st = self.request(3, T_IN, 9, RAM + DATA, 512);
            assert_eq!(st, Some(S_OK), "after {after}: a read");
            assert_eq!(self.mem.read(DATA, 512).expect("data"), pattern);
        }

        /// The device needs a reset (or is about to say so); then reset
        /// it, and a read works.
        pub fn expect_broken(&mut self, what: &str) {
            let t0 = Instant::now();
            while self.prompt(what) & NEEDS_RESET == 0 {
                assert!(
                    t0.elapsed() < EVENT_TIMEOUT,
                    "{what}: no DEVICE_NEEDS_RESET; log:\n{}",
                    self.s.log()
                );
                std::thread::sleep(Duration::from_micros(200));
            }
            self.reset_and_read(what);
        }

        pub fn reset_and_read(&mut self, what: &str) {
            self.prompt(what);
            self.init();
            self.read_works(what);
        }

        pub fn finish(self) {
            let Host {
                mut s, c, baseline, ..
            } = self;
            drop(c);
            let now = fds_with_a_client(&mut s);
            assert_eq!(now, baseline, "descriptors after the garbage");
            idles(&s);
        }
    }
}

/// Descriptor loops, chains and rings outside the mapped memory, avail
/// indexes that jump and heads past the queue: each either completes with
/// an error status or marks the device `DEVICE_NEEDS_RESET`; a reset
/// brings back a device that reads.
#[test]
fn virtio_blk_broken_chains_and_rings() {
    use vblk::*;
    let mut h = Host::new();
    h.read_works("start");

    // A two-descriptor loop.
    h.desc(0, RAM + HEADER, 16, F_NEXT, 1);
    h.desc(1, RAM + DATA, 512, F_NEXT | F_WRITE, 0);
    h.offer(0, 1);
    h.kick();
    assert!(!h.wait_used(1, "a loop"), "a loop is not completed");
    h.expect_broken("a descriptor loop");

    // A descriptor that points at itself.
    h.desc(5, RAM + HEADER, 16, F_NEXT, 5);
    h.offer(5, 1);
    h.kick();
    assert!(!h.wait_used(1, "a self loop"));
    h.expect_broken("a descriptor pointing at itself");

    // A next index past the queue.
    h.desc(0, RAM + HEADER, 16, F_NEXT, 999);
    h.offer(0, 1);
    h.kick();
    assert!(!h.wait_used(1, "next past the queue"));
    h.expect_broken("a next index past the queue");

    // Data outside memory: an I/O error, the device goes on.
    for (i, addr) in [HOLE, RAM + RAM_SIZE - 256, u64::MAX - 100, 0]
        .into_iter()
        .enumerate()
    {
        for kind in [T_IN, T_OUT] {
            let st = h.request((i as u16 * 3) % QSIZE, kind, 0, addr, 512);
            assert_eq!(st, Some(S_IOERR), "data at {addr:#x}, type {kind}");
        }
    }
    assert_eq!(h.prompt("data outside memory") & NEEDS_RESET, 0);
    h.read_works("data outside memory");

    // The header outside memory: the request cannot be read; an error
    // status.
    h.mem.write(STATUS, &[0xff]).expect("status");
    h.desc(0, HOLE, 16, F_NEXT, 1);
    h.desc(1, RAM + STATUS, 1, F_WRITE, 0);
    let idx = h.avail_idx.wrapping_add(1);
    h.offer(0, idx);
    h.kick();
    if h.wait_used(1, "a header outside memory") {
        assert_eq!(h.mem.read(STATUS, 1).expect("status")[0], S_IOERR);
        h.read_works("a header outside memory");
    } else {
        h.expect_broken("a header outside memory");
    }

    // The status byte outside memory: nowhere to answer.
    h.desc(0, RAM + HEADER, 16, F_NEXT, 1);
    h.desc(1, HOLE, 1, F_WRITE, 0);
    h.header(HEADER, T_IN, 0);
    let idx = h.avail_idx.wrapping_add(1);
    h.offer(0, idx);
    h.kick();
    assert!(!h.wait_used(1, "a status byte outside memory"));
    h.expect_broken("a status byte outside memory");

    // No device-writable descriptor at all.
    h.desc(0, RAM + HEADER, 16, 0, 0);
    let idx = h.avail_idx.wrapping_add(1);
    h.offer(0, idx);
    h.kick();
    assert!(!h.wait_used(1, "no status byte"));
    h.expect_broken("a chain without a status byte");

    // A head index past the queue.
    h.offer(200, 1);
    h.kick();
    assert!(!h.wait_used(1, "a head past the queue"));
    h.expect_broken("a head index past the queue");

    // avail.idx jumping far beyond the queue size.
    // (u16::MAX: one step backwards.)
    for jump in [QSIZE + 1, 1000, u16::MAX] {
        h.desc(0, RAM + HEADER, 16, F_NEXT, 1);
        h.desc(1, RAM + STATUS, 1, F_WRITE, 0);
        let idx = h.avail_idx.wrapping_add(jump);
        h.offer(0, idx);
        h.kick();
        assert!(!h.wait_used(1, "avail.idx jump"), "avail.idx {jump}");
        h.expect_broken("an avail index past the queue size");
    }

    // The rings themselves outside memory.
    for (what, field) in [
        ("descriptor table", QUEUE_DESC),
        ("avail ring", QUEUE_DRIVER),
        ("used ring", QUEUE_DEVICE),
    ] {
        // Bring the queue up with one ring moved into the hole.
        h.mem.write(0, &[0u8; 0x6000]).expect("clear rings");
        h.w8(DEVICE_STATUS, 0);
        h.w8(DEVICE_STATUS, ACKNOWLEDGE | DRIVER);
        h.w32(DRIVER_FEATURE_SELECT, 1);
        h.w32(DRIVER_FEATURE, 1);
        h.w8(DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        h.w16(QUEUE_SELECT, 0);
        h.w16(QUEUE_SIZE, QSIZE);
        h.w64(QUEUE_DESC, RAM + DESC);
        h.w64(QUEUE_DRIVER, RAM + AVAIL);
        h.w64(QUEUE_DEVICE, RAM + USED);
        h.w64(field, HOLE);
        h.w16(QUEUE_ENABLE, 1);
        h.w8(
            DEVICE_STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        h.avail_idx = 0;
        h.used_seen = 0;
        h.desc(0, RAM + HEADER, 16, F_NEXT, 1);
        h.desc(1, RAM + STATUS, 1, F_WRITE, 0);
        h.offer(0, 1);
        h.kick();
        let t0 = Instant::now();
        // The avail ring in the hole: the device sees no request (it
        // cannot read the index) or reports itself broken.
        while h.prompt(what) & NEEDS_RESET == 0 && t0.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let st = h.prompt(what);
        if field != QUEUE_DRIVER {
            assert_ne!(st & NEEDS_RESET, 0, "{what} outside memory");
        }
        assert_eq!(h.used_idx(), 0, "{what} outside memory: nothing used");
        h.reset_and_read(what);
    }
    h.finish();
}

/// Requests with random headers and random chains, and notifications of
/// queues that do not exist: error statuses or DEVICE_NEEDS_RESET, never
/// a hang.
#[test]
fn virtio_blk_random_requests_and_notifications() {
    use vblk::*;
    let mut h = Host::new();
    let mut rng = Rng(0xb1c);
    // Notifications of queues that do not exist, and of queue 0 at every
    // offset of the notify area.
    for _ in 0..300 {
        let off = rng.below(1024) as u16;
        let v = rng.next() as u16;
        h.notify_queue(v, off);
    }
    // Queue registers of queues that do not exist.
    for q in [1u16, 2, 7, 0xffff] {
        h.w16(QUEUE_SELECT, q);
        h.w16(QUEUE_SIZE, 4);
        h.w64(QUEUE_DESC, HOLE);
        h.w16(QUEUE_ENABLE, 1);
        assert_eq!(h.r16(QUEUE_SIZE), 0, "queue {q} does not exist");
    }
    h.w16(QUEUE_SELECT, 0);
    assert_eq!(
        h.prompt("notifications of queues that do not exist") & NEEDS_RESET,
        0
    );
    h.read_works("notifications of queues that do not exist");

    // Well-formed chains with random headers.
    let (mut unsupp, mut ioerr, mut ok) = (0, 0, 0);
    for i in 0..600u32 {
        let kind = match i % 3 {
            0 => rng.next() as u32,
            1 => T_IN,
            _ => T_OUT,
        };
        let sector = if rng.below(4) == 0 {
            rng.below(SECTORS)
        } else {
            rng.next()
        };
        let head = (i % u32::from(QSIZE)) as u16;
        let st = h
            .request(head, kind, sector, RAM + DATA, 512)
            .unwrap_or_else(|| panic!("request {i}: a well-formed chain broke the device"));
        match kind {
            T_IN | T_OUT if sector < SECTORS => assert_eq!(st, S_OK, "request {i}"),
            T_IN | T_OUT => assert_eq!(st, S_IOERR, "request {i}: sector {sector:#x}"),
            4 | 8 | 11 | 13 => assert!([S_OK, S_IOERR, S_UNSUPP].contains(&st)),
            _ => assert_eq!(st, S_UNSUPP, "request {i}: type {kind:#x}"),
        }
        match st {
            S_OK => ok += 1,
            S_IOERR => ioerr += 1,
            _ => unsupp += 1,
        }
    }
    assert!(
        unsupp > 150 && ioerr > 200 && ok > 50,
        "{ok} / {ioerr} / {unsupp}"
    );
    h.read_works("random headers");

    // Descriptor tables of random bytes behind random heads: whatever
    // completes has its status written, the rest breaks the device; no
    // hang, and a reset recovers.
    let mut broken = 0;
    for round in 0..40 {
        let mut table = vec![0u8; 16 * usize::from(QSIZE)];
        rng.fill(&mut table);
        // Half the descriptors point into a scratch part of RAM, so
        // chains get further than their first descriptor.
        for d in table.chunks_mut(16) {
            if rng.below(2) == 0 {
                let addr = RAM + 0x8_0000 + rng.below(0x7_0000);
                d[0..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&(rng.below(4096) as u32).to_le_bytes());
                d[12] &= 3;
                d[14..16].copy_from_slice(&(rng.below(u64::from(QSIZE) + 2) as u16).to_le_bytes());
            }
        }
        h.mem.write(DESC, &table).expect("table");
        let n = 1 + rng.below(8) as u16;
        for _ in 0..n {
            let head = rng.below(u64::from(QSIZE)) as u16;
            let idx = h.avail_idx.wrapping_add(1);
            h.offer(head, idx);
        }
        h.kick();
        if !h.wait_used(n, "random descriptors") {
            broken += 1;
            h.expect_broken(&format!("random descriptor table {round}"));
        } else {
            assert_eq!(h.prompt("random descriptors") & NEEDS_RESET, 0);
        }
    }
    assert!(
        broken > 0,
        "random descriptor tables never broke the device"
    );
    h.reset_and_read("random descriptor tables");
    h.finish();
}

/// `--doorbells mmap`: the doorbell page is shared memory the guest
/// writes without a message. Random values in every doorbell, before the
/// enable and while queues exist: no hang, and a reset recovers.
#[test]
fn nvme_garbage_in_the_mapped_doorbell_page() {
    let mut h = Host::with_args(&["--doorbells", "mmap"]);
    let page = map_sparse_area(&mut h.c, BAR0);
    let mut rng = Rng(0xd0b);
    let mut garbage = vec![0u8; 4096];
    rng.fill(&mut garbage);
    page.write(0, &garbage).expect("doorbell page");
    assert_eq!(h.prompt("a page of garbage doorbells while disabled"), 0);
    h.enable();
    h.identify_works("a page of garbage doorbells while disabled");
    let (c1, c2) = h.create_pair(1, RAM + IOSQ, RAM + IOCQ);
    assert!(c1.ok() && c2.ok());
    for _ in 0..20 {
        rng.fill(&mut garbage);
        page.write(0, &garbage).expect("doorbell page");
        std::thread::sleep(Duration::from_millis(2));
        h.prompt("a page of garbage doorbells");
    }
    h.reset_and_identify("a page of garbage doorbells");
    h.finish();
}

/// `--kick poll`: the notify page is shared memory the server scans.
/// Random values in it (every queue slot, queues that do not exist):
/// no hang, and the device still reads.
#[test]
fn virtio_blk_garbage_in_the_mapped_notify_page() {
    use vblk::*;
    let mut h = Host::with_args(&["--kick", "poll"]);
    let region = h.l.notify.region;
    let page = map_sparse_area(&mut h.c, region);
    let mut rng = Rng(0x90);
    let mut garbage = vec![0u8; page.len() as usize];
    for _ in 0..20 {
        rng.fill(&mut garbage);
        page.write(0, &garbage).expect("notify page");
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(h.prompt("a page of garbage notifications") & NEEDS_RESET, 0);
    }
    h.read_works("a page of garbage notifications");
    h.reset_and_read("a page of garbage notifications");
    h.finish();
}

/// Indirect descriptor tables (negotiated) that loop, nest, sit outside
/// memory or claim absurd lengths: DEVICE_NEEDS_RESET or an error status,
/// and a reset recovers.
#[test]
fn virtio_blk_broken_indirect_tables() {
    use vblk::*;
    let mut h = Host::new();
    h.init_with(INDIRECT_DESC);
    h.read_works("indirect descriptors negotiated");
    const TABLE: u64 = 0x6000;
    let put = |h: &Host, i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        h.mem
            .write(TABLE + 16 * i, &d)
            .expect("indirect descriptor");
    };
    // A working request through an indirect table first.
    h.header(HEADER, T_IN, 1);
    put(&h, 0, RAM + HEADER, 16, F_NEXT, 1);
    put(&h, 1, RAM + DATA, 512, F_NEXT | F_WRITE, 2);
    put(&h, 2, RAM + STATUS, 1, F_WRITE, 0);
    h.mem.write(STATUS, &[0xff]).expect("status");
    h.desc(0, RAM + TABLE, 48, F_INDIRECT, 0);
    let idx = h.avail_idx.wrapping_add(1);
    h.offer(0, idx);
    h.kick();
    assert!(h.wait_used(1, "an indirect request"));
    assert_eq!(h.mem.read(STATUS, 1).expect("status")[0], S_OK);

    // (what, table entries, the indirect descriptor's address and length)
    type Entry = (u64, u32, u16, u16);
    let request: [Entry; 3] = [
        (RAM + HEADER, 16, F_NEXT, 1),
        (RAM + DATA, 512, F_NEXT | F_WRITE, 2),
        (RAM + STATUS, 1, F_WRITE, 0),
    ];
    let looping: [Entry; 2] = [(RAM + HEADER, 16, F_NEXT, 1), (RAM + DATA, 512, F_NEXT, 0)];
    let nested: [Entry; 2] = [
        (RAM + HEADER, 16, F_NEXT, 1),
        (RAM + TABLE, 48, F_INDIRECT, 0),
    ];
    let past: [Entry; 2] = [(RAM + HEADER, 16, F_NEXT, 7), (RAM + STATUS, 1, F_WRITE, 0)];
    let cases: [(&str, &[Entry], u64, u32); 8] = [
        ("an indirect table that loops", &looping, RAM + TABLE, 32),
        ("an indirect table in the hole", &[], HOLE, 48),
        (
            "an indirect table running past memory",
            &[],
            RAM + RAM_SIZE - 16,
            48,
        ),
        (
            "an indirect table of a length not a multiple of 16",
            &request,
            RAM + TABLE,
            40,
        ),
        (
            "an indirect table of 4 GiB",
            &request,
            RAM + TABLE,
            0xffff_fff0,
        ),
        ("an empty indirect table", &[], RAM + TABLE, 0),
        (
            "an indirect descriptor in an indirect table",
            &nested,
            RAM + TABLE,
            32,
        ),
        (
            "a next index past the indirect table",
            &past,
            RAM + TABLE,
            32,
        ),
    ];
    for (what, entries, addr, len) in cases {
        for (i, &(a, l, f, n)) in entries.iter().enumerate() {
            put(&h, i as u64, a, l, f, n);
        }
        h.header(HEADER, T_IN, 1);
        h.mem.write(STATUS, &[0xff]).expect("status");
        h.desc(0, addr, len, F_INDIRECT, 0);
        let idx = h.avail_idx.wrapping_add(1);
        h.offer(0, idx);
        h.kick();
        if h.wait_used(1, what) {
            let st = h.mem.read(STATUS, 1).expect("status")[0];
            assert_eq!(st, S_IOERR, "{what}: used, so with an error status");
            assert_eq!(h.prompt(what) & NEEDS_RESET, 0);
            h.read_works(what);
        } else {
            h.expect_broken(what);
        }
    }
    h.finish();
}

/// Random writes of every size to the register page (CC, AQA, ASQ, ACQ,
/// INTMS, read-only registers, unaligned offsets), then a device reset
/// (VFIO_USER_DEVICE_RESET) from a fatal state: the controller comes
/// back at its power-on values and identifies.
#[test]
fn nvme_random_register_writes_and_a_device_reset() {
    let mut h = Host::new();
    h.enable();
    let mut rng = Rng(0x4e9);
    for _ in 0..2000 {
        let len = [1usize, 2, 4, 8][rng.below(4) as usize];
        let off = rng.below(0x40);
        let v = rng.next().to_le_bytes();
        h.c.region_write(BAR0, off, &v[..len])
            .expect("register write");
    }
    h.prompt("random register writes");
    h.disable();
    h.enable();
    h.identify_works("random register writes");
    // Fatal status (an SQ in the hole), then a device reset.
    let (c1, c2) = h.create_pair(1, HOLE, RAM + IOCQ);
    assert!(c1.ok() && c2.ok());
    h.ring_sq(1, 1);
    h.wait_csts("CFS for an SQ outside memory", |v| v & CFS != 0);
    h.c.reset().expect("DEVICE_RESET");
    assert_eq!(h.prompt("a device reset"), 0, "power-on CSTS");
    assert_eq!(h.c.read32(BAR0, CC).expect("CC"), 0, "power-on CC");
    enable_bus_master(&mut h.c).expect("bus master");
    h.enable();
    h.identify_works("a device reset");
    h.finish();
}

/// A driver writing random values of random sizes all over the common
/// configuration (feature selects, status, queue select and registers,
/// queue enable), then notifying: no hang, nothing used in the wrong
/// place, and after a reset the device reads. A device reset
/// (VFIO_USER_DEVICE_RESET) from the broken state works too.
#[test]
fn virtio_blk_random_common_config_writes_and_a_device_reset() {
    use vblk::*;
    let mut h = Host::new();
    let mut rng = Rng(0xc0c);
    for round in 0..10 {
        for _ in 0..200 {
            let len = [1usize, 2, 4][rng.below(3) as usize];
            let off = rng.below(0x38);
            let v = if off == QUEUE_DESC || off == QUEUE_DRIVER || off == QUEUE_DEVICE {
                // Sometimes an address in RAM, so queues get enabled
                // somewhere the device can reach.
                (RAM + rng.below(RAM_SIZE)).to_le_bytes()
            } else {
                rng.next().to_le_bytes()
            };
            h.w_raw(off, &v[..len]);
        }
        let off = rng.below(64) as u16;
        h.notify_queue(0, off);
        h.prompt(&format!("random common config writes, round {round}"));
    }
    h.reset_and_read("random common config writes");
    // The same through the PCI configuration access capability (virtio
    // 1.2, 4.1.4.9): random BARs, offsets and lengths in the window, then
    // accesses of random sizes to its data.
    let cap = pci_cfg_capability(&mut h.c);
    for _ in 0..500 {
        let bar = if rng.below(4) == 0 {
            rng.next() as u8
        } else {
            4
        };
        let offset = match rng.below(3) {
            0 => rng.next() as u32,
            1 => u32::MAX - rng.below(4) as u32,
            _ => rng.below(0x4000) as u32,
        };
        let length = [1u32, 2, 4, rng.next() as u32][rng.below(4) as usize];
        config_write(&mut h.c, cap + 4, u32::from(bar), 1).expect("bar");
        config_write(&mut h.c, cap + 8, offset, 4).expect("offset");
        config_write(&mut h.c, cap + 12, length, 4).expect("length");
        let size = [1usize, 2, 4][rng.below(3) as usize];
        let at = cap + 16 + rng.below(5 - size as u64);
        if rng.below(2) == 0 {
            config_write(&mut h.c, at, rng.next() as u32, size).expect("window write");
        } else {
            config_read(&mut h.c, at, size as u32).expect("window read");
        }
    }
    h.prompt("random accesses through the PCI_CFG window");
    h.reset_and_read("random accesses through the PCI_CFG window");
    // The window is real: it reads the device status the BAR reads.
    let common = h.l.common;
    config_write(&mut h.c, cap + 4, common.region, 1).expect("bar");
    config_write(&mut h.c, cap + 8, (common.offset + DEVICE_STATUS) as u32, 4).expect("offset");
    config_write(&mut h.c, cap + 12, 1, 4).expect("length");
    let through = config_read(&mut h.c, cap + 16, 1).expect("window read");
    let status = h.r8(DEVICE_STATUS);
    assert_eq!(status, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(through, u32::from(status), "the status through the window");
    // Broken, then a device reset instead of a status write.
    h.desc(0, RAM + HEADER, 16, F_NEXT, 0);
    h.offer(0, h.avail_idx.wrapping_add(1));
    h.kick();
    assert!(!h.wait_used(1, "a loop"));
    h.c.reset().expect("DEVICE_RESET");
    assert_eq!(h.prompt("a device reset"), 0, "status after a device reset");
    enable_bus_master(&mut h.c).expect("bus master");
    h.init();
    h.read_works("a device reset");
    h.finish();
}

/// Four I/O queue pairs on two worker threads, random entries in all of
/// them and random doorbells in between (the controller's idea of each
/// tail is whatever the garbage left): the admin queue keeps working,
/// a CQ with an SQ on it cannot be deleted, every queue can be deleted,
/// and a reset recovers.
#[test]
fn nvme_garbage_on_four_queues_and_their_deletion() {
    let mut h = Host::with_args(&["--queues", "4", "--io-threads", "2"]);
    h.enable();
    let base = |q: u16| 0x1_0000 + u64::from(q) * 0x2000;
    let mut pairs = Vec::new();
    for q in 1..=4u16 {
        let (c1, c2) = h.create_pair(q, RAM + base(q), RAM + base(q) + 0x1000);
        assert!(c1.ok() && c2.ok(), "queue pair {q}: {c1:?} {c2:?}");
        pairs.push(Pair::new(q, RAM, base(q), base(q) + 0x1000));
    }
    let mut rng = Rng(0x4444);
    for _ in 0..20 {
        for p in pairs.iter_mut() {
            for _ in 0..8 {
                let mut e = [0u8; 64];
                rng.fill(&mut e);
                h.put(p, &e);
            }
            let (qid, tail) = (p.qid, p.tail);
            h.ring_sq(qid, tail);
            let qid = 1 + rng.below(6) as u16;
            let v = rng.below(u64::from(QSIZE) + 8) as u32;
            if rng.below(2) == 0 {
                h.ring_sq(qid, v);
            } else {
                h.ring_cq(qid, v);
            }
        }
        h.prompt("random entries and doorbells on four queues");
    }
    h.identify_works("random entries and doorbells on four queues");
    let delete = |op: u8, qid: u16| {
        let mut e = [0u8; 64];
        e[0] = op;
        e[2..4].copy_from_slice(&(0x200 + u16::from(op) * 8 + qid).to_le_bytes());
        e[40..44].copy_from_slice(&u32::from(qid).to_le_bytes());
        e
    };
    // Delete I/O CQ (0x04) while its SQ exists: Invalid Queue Deletion
    // (command specific status 0x0c).
    let c = h.admin_cmd(&delete(0x04, 1));
    assert_eq!((c.sct(), c.sc()), (1, 0x0c), "CQ 1 still has SQ 1: {c:?}");
    for q in 1..=4u16 {
        let c = h.admin_cmd(&delete(0x00, q));
        assert!(c.ok(), "delete SQ {q}: {c:?}");
        let c = h.admin_cmd(&delete(0x04, q));
        assert!(c.ok(), "delete CQ {q}: {c:?}");
    }
    // Gone: deleting again is an invalid queue identifier (0x01).
    let c = h.admin_cmd(&delete(0x00, 2));
    assert_eq!((c.sct(), c.sc()), (1, 0x01), "SQ 2 is gone: {c:?}");
    assert_eq!(h.prompt("queue deletion") & (RDY | CFS), RDY);
    h.reset_and_identify("queue deletion after garbage");
    h.finish();
}
