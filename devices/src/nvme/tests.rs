//! The controller driven by a fake host driver: queues in a memfd-backed
//! DMA space, registers through `bar0_read` / `bar0_write`, interrupts on
//! real eventfds.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::spec::{Command, Completion, Status, admin, csts, feat, io, log_page, reg};
use super::*;
use crate::block::{BlockBackend, BlockError, FileBackend, FileOptions, IoBufs, MemBackend};
use crate::dma::{DmaError, DmaMessenger, DmaSpace, MapRequest, Prot};

const MEM: u64 = 64 << 20;
const PAGE: u64 = 4096;
const TIMEOUT: Duration = Duration::from_secs(5);

struct FakeIrq {
    vectors: Vec<EventFd>,
    msix: AtomicBool,
    level: AtomicBool,
}

impl FakeIrq {
    fn new(n: usize) -> FakeIrq {
        FakeIrq {
            vectors: (0..n)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            msix: AtomicBool::new(true),
            level: AtomicBool::new(false),
        }
    }
    /// Interrupts seen on `v` since the last call.
    fn take(&self, v: usize) -> u64 {
        self.vectors[v].read().unwrap_or(0)
    }
}

impl InterruptSink for FakeIrq {
    fn signal(&self, vector: u16) {
        if let Some(e) = self.vectors.get(usize::from(vector)) {
            e.write(1).unwrap();
        }
    }
    fn msix_enabled(&self) -> bool {
        self.msix.load(Ordering::SeqCst)
    }
    fn set_intx(&self, asserted: bool) {
        self.level.store(asserted, Ordering::SeqCst);
    }
}

fn memfd(size: u64) -> File {
    // SAFETY: valid name and flags.
    let fd = unsafe { libc::memfd_create(c"nvme-test".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    // SAFETY: F_ADD_SEALS on our own descriptor.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(rc, 0);
    f
}

#[derive(Clone, Copy, Debug)]
struct Pair {
    qid: u16,
    sq: u64,
    cq: u64,
    size: u32,
    sq_tail: u32,
    cq_head: u32,
    phase: bool,
}

impl Pair {
    fn new(qid: u16, sq: u64, cq: u64, size: u32) -> Pair {
        Pair {
            qid,
            sq,
            cq,
            size,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
        }
    }
}

/// A fake host: its memory, the controller, and the queues it created.
struct Host {
    ctrl: NvmeController,
    dma: Arc<DmaSpace>,
    mem: File,
    irq: Arc<FakeIrq>,
    backend: Arc<dyn BlockBackend>,
    next_page: u64,
    pairs: Vec<Option<Pair>>,
    cid: u16,
    /// (shadow doorbells, event indexes) in host memory.
    shadow: Option<(u64, u64)>,
}

fn config() -> NvmeConfig {
    NvmeConfig {
        max_io_queues: 4,
        max_queue_entries: 256,
        io_threads: 2,
        serial: "TESTSERIAL".into(),
        ..NvmeConfig::default()
    }
}

impl Host {
    fn new(backend: Arc<dyn BlockBackend>, cfg: NvmeConfig) -> Host {
        let mem = memfd(MEM);
        let dma = Arc::new(DmaSpace::default());
        dma.map(MapRequest {
            iova: 0,
            size: MEM,
            prot: Prot::RW,
            file: Some((mem.try_clone().unwrap(), 0)),
        })
        .unwrap();
        Self::with_dma(backend, cfg, dma, mem)
    }

    fn with_dma(
        backend: Arc<dyn BlockBackend>,
        cfg: NvmeConfig,
        dma: Arc<DmaSpace>,
        mem: File,
    ) -> Host {
        let irq = Arc::new(FakeIrq::new(usize::from(cfg.msix_vectors())));
        let n = usize::from(cfg.max_io_queues) + 1;
        let ctrl = NvmeController::new(cfg, backend.clone(), dma.clone(), irq.clone()).unwrap();
        Host {
            ctrl,
            dma,
            mem,
            irq,
            backend,
            next_page: 0x10000,
            pairs: vec![None; n],
            cid: 0,
            shadow: None,
        }
    }

    fn mem_disk(blocks: u64) -> Host {
        Host::new(
            Arc::new(MemBackend::new(blocks * 512, 512).unwrap()),
            config(),
        )
    }

    fn alloc(&mut self, pages: u64) -> u64 {
        let a = self.next_page;
        self.next_page += pages * PAGE;
        assert!(self.next_page < MEM);
        a
    }

    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ctrl.bar0_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(&self, off: u64, v: u32) {
        self.ctrl.bar0_write(off, &v.to_le_bytes());
    }

    fn w64(&self, off: u64, v: u64) {
        self.ctrl.bar0_write(off, &v.to_le_bytes());
    }

    fn wait_csts(&self, mask: u32, val: u32) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < TIMEOUT {
            if self.r32(reg::CSTS) & mask == val {
                return true;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        false
    }

    fn enable_with(&mut self, cc_extra: u32, admin_entries: u32) -> bool {
        let sq = self.alloc(4);
        let cq = self.alloc(1);
        self.w32(reg::AQA, ((admin_entries - 1) << 16) | (admin_entries - 1));
        self.w64(reg::ASQ, sq);
        self.w64(reg::ACQ, cq);
        self.pairs[0] = Some(Pair::new(0, sq, cq, admin_entries));
        self.w32(reg::CC, 1 | (6 << 16) | (4 << 20) | cc_extra);
        self.wait_csts(csts::RDY | csts::CFS, csts::RDY)
    }

    fn enable(&mut self) {
        assert!(self.enable_with(0, 32), "controller did not become ready");
    }

    fn next_cid(&mut self) -> u16 {
        self.cid = self.cid.wrapping_add(1);
        self.cid
    }

    fn ring_sq(&self, p: &Pair) {
        let db = reg::DOORBELLS + 8 * u64::from(p.qid);
        match self.shadow {
            Some((dbs, eis)) if p.qid > 0 => {
                // What Linux does: update the shadow, then ring the register
                // only if the controller's event index asks for it.
                let at = 8 * u64::from(p.qid);
                let mut b = [0u8; 4];
                self.mem.read_exact_at(&mut b, dbs + at).unwrap();
                let old = u32::from_le_bytes(b) as u16;
                self.mem
                    .write_all_at(&p.sq_tail.to_le_bytes(), dbs + at)
                    .unwrap();
                std::sync::atomic::fence(Ordering::SeqCst);
                self.mem.read_exact_at(&mut b, eis + at).unwrap();
                let ei = u32::from_le_bytes(b) as u16;
                let new = p.sq_tail as u16;
                if new.wrapping_sub(ei).wrapping_sub(1) < new.wrapping_sub(old) {
                    self.w32(db, p.sq_tail);
                }
            }
            _ => self.w32(db, p.sq_tail),
        }
    }

    fn submit(&mut self, qid: u16, mut cmd: Command) -> u16 {
        cmd.cid = self.next_cid();
        let mut p = self.pairs[usize::from(qid)].unwrap();
        self.mem
            .write_all_at(&cmd.to_bytes(), p.sq + u64::from(p.sq_tail) * 64)
            .unwrap();
        p.sq_tail = (p.sq_tail + 1) % p.size;
        self.pairs[usize::from(qid)] = Some(p);
        self.ring_sq(&p);
        cmd.cid
    }

    /// The next completion on `qid`, if one arrives in time.
    fn try_wait(&mut self, qid: u16, timeout: Duration) -> Option<Completion> {
        let mut p = self.pairs[usize::from(qid)].unwrap();
        let at = p.cq + u64::from(p.cq_head) * 16;
        let t0 = Instant::now();
        loop {
            let mut b = [0u8; 16];
            self.mem.read_exact_at(&mut b, at).unwrap();
            let (c, phase) = Completion::decode(&b);
            if phase == p.phase {
                p.cq_head += 1;
                if p.cq_head == p.size {
                    p.cq_head = 0;
                    p.phase = !p.phase;
                }
                self.pairs[usize::from(qid)] = Some(p);
                self.ring_cq(&p);
                return Some(c);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn ring_cq(&self, p: &Pair) {
        let db = reg::DOORBELLS + 8 * u64::from(p.qid) + 4;
        if let (Some((dbs, _)), true) = (self.shadow, p.qid > 0) {
            self.mem
                .write_all_at(&p.cq_head.to_le_bytes(), dbs + 8 * u64::from(p.qid) + 4)
                .unwrap();
        }
        self.w32(db, p.cq_head);
    }

    fn wait(&mut self, qid: u16) -> Completion {
        self.try_wait(qid, TIMEOUT)
            .unwrap_or_else(|| panic!("no completion on queue {qid}"))
    }

    fn run(&mut self, qid: u16, cmd: Command) -> Completion {
        let cid = self.submit(qid, cmd);
        let c = self.wait(qid);
        assert_eq!(c.cid, cid);
        assert_eq!(c.sqid, qid);
        c
    }

    fn admin(&mut self, cmd: Command) -> Completion {
        self.run(0, cmd)
    }

    fn identify(&mut self, cns: u32, nsid: u32) -> (Status, Vec<u8>) {
        let buf = self.alloc(1);
        let c = self.admin(Command {
            opcode: admin::IDENTIFY,
            nsid,
            dptr1: buf,
            cdw10: cns,
            ..Command::default()
        });
        let mut d = vec![0u8; 4096];
        self.mem.read_exact_at(&mut d, buf).unwrap();
        (c.status, d)
    }

    fn set_feature(&mut self, fid: u8, v: u32) -> Completion {
        self.admin(Command {
            opcode: admin::SET_FEATURES,
            cdw10: u32::from(fid),
            cdw11: v,
            ..Command::default()
        })
    }

    fn get_feature(&mut self, fid: u8, sel: u32, cdw11: u32) -> Completion {
        self.admin(Command {
            opcode: admin::GET_FEATURES,
            cdw10: u32::from(fid) | (sel << 8),
            cdw11,
            ..Command::default()
        })
    }

    fn create_cq(&mut self, qid: u16, size: u32, vector: u16) -> Completion {
        let base = self.alloc((u64::from(size) * 16).div_ceil(PAGE));
        let c = self.admin(Command {
            opcode: admin::CREATE_CQ,
            dptr1: base,
            cdw10: u32::from(qid) | ((size - 1) << 16),
            cdw11: 1 | 2 | (u32::from(vector) << 16),
            ..Command::default()
        });
        if c.status.is_success() {
            let mut p = self.pairs[usize::from(qid)].unwrap_or(Pair::new(qid, 0, 0, size));
            p.cq = base;
            p.size = size;
            p.cq_head = 0;
            p.phase = true;
            self.pairs[usize::from(qid)] = Some(p);
        }
        c
    }

    fn create_sq(&mut self, qid: u16, size: u32, cqid: u16) -> Completion {
        let base = self.alloc((u64::from(size) * 64).div_ceil(PAGE));
        let c = self.admin(Command {
            opcode: admin::CREATE_SQ,
            dptr1: base,
            cdw10: u32::from(qid) | ((size - 1) << 16),
            cdw11: 1 | (u32::from(cqid) << 16),
            ..Command::default()
        });
        if c.status.is_success() {
            let mut p = self.pairs[usize::from(qid)].unwrap_or(Pair::new(qid, 0, 0, size));
            p.sq = base;
            p.sq_tail = 0;
            assert_eq!(p.size, size, "tests pair SQ and CQ of one size");
            self.pairs[usize::from(qid)] = Some(p);
        }
        c
    }

    fn io_pair(&mut self, qid: u16, size: u32) {
        assert_eq!(self.create_cq(qid, size, qid).status, Status::SUCCESS);
        assert_eq!(self.create_sq(qid, size, qid).status, Status::SUCCESS);
    }

    fn rw(
        &mut self,
        qid: u16,
        opcode: u8,
        slba: u64,
        nlb: u32,
        prp1: u64,
        prp2: u64,
    ) -> Completion {
        self.run(
            qid,
            Command {
                opcode,
                nsid: 1,
                dptr1: prp1,
                dptr2: prp2,
                cdw10: slba as u32,
                cdw11: (slba >> 32) as u32,
                cdw12: nlb - 1,
                ..Command::default()
            },
        )
    }

    fn put(&self, at: u64, data: &[u8]) {
        self.mem.write_all_at(data, at).unwrap();
    }

    fn get(&self, at: u64, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        self.mem.read_exact_at(&mut d, at).unwrap();
        d
    }

    fn disk(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        let mut st = crate::block::IoVecStorage::new();
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut d);
        self.backend.read(offset, &bufs).unwrap();
        d
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + 7) as u8) ^ seed ^ ((i >> 9) as u8))
        .collect()
}

#[test]
fn enable_identify_and_registers() {
    let mut h = Host::mem_disk(2048);
    let cap = u64::from(h.r32(0)) | (u64::from(h.r32(4)) << 32);
    assert_eq!(cap & 0xffff, 255, "MQES");
    assert_eq!((cap >> 16) & 1, 1, "CQR");
    assert_eq!((cap >> 37) & 1, 1, "NVM command set");
    assert_eq!(h.r32(reg::VS), 0x0001_0400);
    // byte reads of a register
    let mut b = [0u8; 2];
    h.ctrl.bar0_read(reg::VS + 1, &mut b);
    assert_eq!(b, [0x04, 0x01]);
    assert_eq!(h.r32(reg::CSTS), 0);
    h.enable();
    // The admin vector fired for nothing yet.
    let (st, id) = h.identify(1, 0);
    assert_eq!(st, Status::SUCCESS);
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), 0x1234);
    assert_eq!(&id[4..14], b"TESTSERIAL");
    assert_eq!(id[14], b' ');
    assert_eq!(id[77], 8, "MDTS");
    assert_eq!(id[512], 0x66, "SQES");
    assert_eq!(id[513], 0x44, "CQES");
    assert_eq!(
        u32::from_le_bytes(id[516..520].try_into().unwrap()),
        1,
        "NN"
    );
    assert_eq!(id[256..258], [0, 1], "OACS: doorbell buffer config");
    assert!(id[768..].starts_with(b"nqn."));
    assert!(h.irq.take(0) >= 1, "admin completions raise vector 0");

    let (st, ns) = h.identify(0, 1);
    assert_eq!(st, Status::SUCCESS);
    assert_eq!(u64::from_le_bytes(ns[0..8].try_into().unwrap()), 2048);
    assert_eq!(ns[130], 9, "LBA data size 2^9");
    assert_eq!(ns[33], 0x09, "DLFEAT: deallocated reads zero");

    let (st, list) = h.identify(2, 0);
    assert_eq!(st, Status::SUCCESS);
    assert_eq!(&list[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    let (_, list) = h.identify(2, 1);
    assert!(list.iter().all(|b| *b == 0), "no namespace above 1");

    let (st, desc) = h.identify(3, 1);
    assert_eq!(st, Status::SUCCESS);
    assert_eq!(&desc[0..2], &[1, 8]); // EUI-64
    assert_eq!(&desc[12..14], &[2, 16]); // NGUID
    assert_eq!(&desc[32..34], &[3, 16]); // UUID
    assert_eq!(&ns[104..120], &desc[16..32], "NGUID matches");

    assert_eq!(h.identify(0, 2).0, Status::INVALID_NAMESPACE);
    assert_eq!(h.identify(0, 0).0, Status::INVALID_NAMESPACE);
    assert_eq!(h.identify(3, 0xffff_ffff).0, Status::INVALID_NAMESPACE);
    assert_eq!(h.identify(0x1f, 0).0, Status::INVALID_FIELD);
    // identify into memory that is not mapped
    let c = h.admin(Command {
        opcode: admin::IDENTIFY,
        dptr1: MEM + 0x1000,
        cdw10: 1,
        ..Command::default()
    });
    assert_eq!(c.status, Status::DATA_TRANSFER_ERROR);
}

#[test]
fn invalid_enable_sets_fatal_status_until_reset() {
    let mut h = Host::mem_disk(64);
    // page size 2^(12+5) is above MPSMAX
    assert!(!h.enable_with(5 << 7, 32));
    assert_ne!(h.r32(reg::CSTS) & csts::CFS, 0);
    assert_eq!(h.r32(reg::CSTS) & csts::RDY, 0);
    h.w32(reg::CC, 0);
    assert!(h.wait_csts(csts::CFS | csts::RDY, 0));
    // an admin queue of one entry
    assert!(!h.enable_with(0, 1));
    h.w32(reg::CC, 0);
    assert!(h.wait_csts(csts::CFS | csts::RDY, 0));
    // unaligned ASQ (the low bits are reserved and read back as zero)
    h.w64(reg::ASQ, 0x12345);
    assert_eq!(h.r32(reg::ASQ), 0x12000);
    h.enable();
    assert_eq!(h.identify(1, 0).0, Status::SUCCESS);
}

#[test]
fn queue_creation_and_deletion_errors() {
    let mut h = Host::mem_disk(64);
    h.enable();
    // Number of queues: more than offered is cut down; 0-based values.
    let c = h.set_feature(feat::NUM_QUEUES, (9 << 16) | 1);
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(c.dw0, (3 << 16) | 1, "2 SQs, 4 CQs allocated");
    assert_eq!(h.get_feature(feat::NUM_QUEUES, 0, 0).dw0, (3 << 16) | 1);
    assert_eq!(
        h.set_feature(feat::NUM_QUEUES, 0xffff).status,
        Status::INVALID_FIELD
    );

    assert_eq!(h.create_cq(0, 16, 0).status, Status::INVALID_QID);
    assert_eq!(h.create_cq(5, 16, 0).status, Status::INVALID_QID);
    assert_eq!(h.create_cq(1, 1, 0).status, Status::INVALID_QUEUE_SIZE);
    assert_eq!(h.create_cq(1, 512, 0).status, Status::INVALID_QUEUE_SIZE);
    assert_eq!(h.create_cq(1, 16, 5).status, Status::INVALID_VECTOR);
    let c = h.admin(Command {
        opcode: admin::CREATE_CQ,
        dptr1: 0x20800,
        cdw10: 1 | (15 << 16),
        cdw11: 1,
        ..Command::default()
    });
    assert_eq!(c.status, Status::INVALID_PRP_OFFSET);
    let c = h.admin(Command {
        opcode: admin::CREATE_CQ,
        dptr1: 0x20000,
        cdw10: 1 | (15 << 16),
        cdw11: 0, // not physically contiguous
        ..Command::default()
    });
    assert_eq!(c.status, Status::INVALID_FIELD);
    assert_eq!(h.create_cq(1, 16, 1).status, Status::SUCCESS);
    assert_eq!(h.create_cq(1, 16, 1).status, Status::INVALID_QID);
    assert_eq!(
        h.set_feature(feat::NUM_QUEUES, 0).status,
        Status::COMMAND_SEQUENCE
    );

    assert_eq!(h.create_sq(1, 16, 2).status, Status::CQ_INVALID);
    assert_eq!(h.create_sq(1, 16, 0).status, Status::CQ_INVALID);
    assert_eq!(
        h.create_sq(3, 16, 1).status,
        Status::INVALID_QID,
        "only 2 SQs allocated"
    );
    assert_eq!(h.create_sq(1, 16, 1).status, Status::SUCCESS);
    assert_eq!(h.create_sq(1, 16, 1).status, Status::INVALID_QID);

    let del = |h: &mut Host, op: u8, qid: u32| {
        h.admin(Command {
            opcode: op,
            cdw10: qid,
            ..Command::default()
        })
        .status
    };
    assert_eq!(
        del(&mut h, admin::DELETE_CQ, 1),
        Status::INVALID_QUEUE_DELETION
    );
    assert_eq!(del(&mut h, admin::DELETE_SQ, 0), Status::INVALID_QID);
    assert_eq!(del(&mut h, admin::DELETE_SQ, 2), Status::INVALID_QID);
    assert_eq!(del(&mut h, admin::DELETE_CQ, 0), Status::INVALID_QID);
    assert_eq!(del(&mut h, admin::DELETE_SQ, 1), Status::SUCCESS);
    assert_eq!(del(&mut h, admin::DELETE_SQ, 1), Status::INVALID_QID);
    assert_eq!(del(&mut h, admin::DELETE_CQ, 1), Status::SUCCESS);
    assert_eq!(del(&mut h, admin::DELETE_CQ, 1), Status::INVALID_QID);
    // and the queue id can be used again
    h.io_pair(1, 16);
    h.put(0x200000, &pattern(512, 1));
    assert_eq!(
        h.rw(1, io::WRITE, 0, 1, 0x200000, 0).status,
        Status::SUCCESS
    );

    // Every failure above is in the error log, newest first.
    let buf = h.alloc(1);
    let c = h.admin(Command {
        opcode: admin::GET_LOG_PAGE,
        dptr1: buf,
        cdw10: u32::from(log_page::ERROR) | (15 << 16),
        ..Command::default()
    });
    assert_eq!(c.status, Status::SUCCESS);
    let e = h.get(buf, 64);
    assert!(u64::from_le_bytes(e[0..8].try_into().unwrap()) >= 15);
    assert_eq!(
        u16::from_le_bytes([e[12], e[13]]) >> 1,
        Status::INVALID_QID.0,
        "last error: DELETE_CQ of a missing queue"
    );
}

#[test]
fn read_write_with_prps_and_prp_lists() {
    let mut h = Host::mem_disk(4096);
    h.enable();
    h.io_pair(1, 64);
    // PRP1 only, with an offset inside the page.
    let data = pattern(1024, 1);
    h.put(0x100200, &data);
    assert_eq!(
        h.rw(1, io::WRITE, 10, 2, 0x100200, 0).status,
        Status::SUCCESS
    );
    assert_eq!(h.disk(10 * 512, 1024), data);
    // PRP1 + PRP2 (two pages, first one partial)
    let data = pattern(4096, 2);
    h.put(0x101800, &data[..2048]);
    h.put(0x105000, &data[2048..]);
    assert_eq!(
        h.rw(1, io::WRITE, 100, 8, 0x101800, 0x105000).status,
        Status::SUCCESS
    );
    assert_eq!(h.disk(100 * 512, 4096), data);
    // A PRP list spanning two list pages: 600 data pages.
    let pages = 600u64;
    let data_at = |i: u64| 0x0100_0000 + i * 2 * PAGE;
    let list1: u64 = 0x300000;
    let list2: u64 = 0x301000;
    let mut l1: Vec<u8> = (1..512).flat_map(|i| data_at(i).to_le_bytes()).collect();
    l1.extend_from_slice(&list2.to_le_bytes());
    h.put(list1, &l1);
    let l2: Vec<u8> = (512..pages)
        .flat_map(|i| data_at(i).to_le_bytes())
        .collect();
    h.put(list2, &l2);
    // 600 pages exceed MDTS (1 MiB = 256 pages)
    assert_eq!(
        h.rw(1, io::WRITE, 0, (pages * 8) as u32, data_at(0), list1)
            .status,
        Status::INVALID_FIELD
    );
    // up to MDTS with a list that chains after its first page
    let big = pattern(256 * 4096, 3);
    for i in 0..256u64 {
        h.put(
            data_at(i),
            &big[(i * PAGE) as usize..((i + 1) * PAGE) as usize],
        );
    }
    let list3 = 0x302ff0; // two entries before the page end, then a chain
    let mut l3: Vec<u8> = Vec::new();
    l3.extend_from_slice(&data_at(1).to_le_bytes());
    l3.extend_from_slice(&0x303000u64.to_le_bytes());
    h.put(list3, &l3);
    let l4: Vec<u8> = (2..256).flat_map(|i| data_at(i).to_le_bytes()).collect();
    h.put(0x303000, &l4);
    assert_eq!(
        h.rw(1, io::WRITE, 1000, 2048, data_at(0), list3).status,
        Status::SUCCESS
    );
    assert_eq!(h.disk(1000 * 512, big.len()), big);
    // read it back into other memory, through a plain list
    let back = |i: u64| 0x0200_0000 + i * PAGE;
    let l5: Vec<u8> = (1..256).flat_map(|i| back(i).to_le_bytes()).collect();
    h.put(0x304000, &l5);
    assert_eq!(
        h.rw(1, io::READ, 1000, 2048, back(0), 0x304000).status,
        Status::SUCCESS
    );
    assert_eq!(h.get(back(0), big.len()), big);
    // Bad PRPs.
    assert_eq!(
        h.rw(1, io::READ, 0, 1, 0x100201, 0).status,
        Status::INVALID_PRP_OFFSET
    );
    assert_eq!(
        h.rw(1, io::READ, 0, 16, 0x100000, 0x101100).status,
        Status::INVALID_PRP_OFFSET
    );
    h.put(0x305000, &(0x100010u64).to_le_bytes());
    assert_eq!(
        h.rw(1, io::READ, 0, 24, 0x100000, 0x305000).status,
        Status::INVALID_PRP_OFFSET
    );
    assert_eq!(
        h.rw(1, io::READ, 0, 1, MEM, 0).status,
        Status::DATA_TRANSFER_ERROR
    );
}

fn sgl(addr: u64, len: u32, kind: u8) -> (u64, u64) {
    (addr, u64::from(len) | (u64::from(kind << 4) << 56))
}

#[test]
fn read_write_with_sgls() {
    let mut h = Host::mem_disk(4096);
    h.enable();
    h.io_pair(1, 32);
    let sgl_cmd = |opcode: u8, slba: u32, nlb: u32, d: (u64, u64)| Command {
        opcode,
        psdt: 1,
        nsid: 1,
        dptr1: d.0,
        dptr2: d.1,
        cdw10: slba,
        cdw12: nlb - 1,
        ..Command::default()
    };
    // one data block
    let data = pattern(2048, 4);
    h.put(0x100000, &data);
    let c = h.run(1, sgl_cmd(io::WRITE, 8, 4, sgl(0x100000, 2048, 0)));
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(h.disk(8 * 512, 2048), data);
    // segment -> [data 1000, data 24, last segment] -> [data 512, data 512]
    let desc = |(a, b): (u64, u64)| {
        let mut v = a.to_le_bytes().to_vec();
        v.extend_from_slice(&b.to_le_bytes());
        v
    };
    let mut seg1 = desc(sgl(0x110000, 1000, 0));
    seg1.extend(desc(sgl(0x120000, 24, 0)));
    seg1.extend(desc(sgl(0x130000, 32, 3)));
    h.put(0x140000, &seg1);
    let mut seg2 = desc(sgl(0x150000, 512, 0));
    seg2.extend(desc(sgl(0x160000, 512, 0)));
    h.put(0x130000, &seg2);
    let data = pattern(2048, 5);
    h.put(0x110000, &data[..1000]);
    h.put(0x120000, &data[1000..1024]);
    h.put(0x150000, &data[1024..1536]);
    h.put(0x160000, &data[1536..]);
    let c = h.run(1, sgl_cmd(io::WRITE, 16, 4, sgl(0x140000, 48, 2)));
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(h.disk(16 * 512, 2048), data);
    // read with a bit bucket skipping the middle 1024 bytes
    let mut seg = desc(sgl(0x170000, 512, 0));
    seg.extend(desc(sgl(0, 1024, 1)));
    seg.extend(desc(sgl(0x180000, 512, 0)));
    h.put(0x190000, &seg);
    let c = h.run(1, sgl_cmd(io::READ, 16, 4, sgl(0x190000, 48, 3)));
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(h.get(0x170000, 512), data[..512]);
    assert_eq!(h.get(0x180000, 512), data[1536..]);
    // errors
    let c = h.run(1, sgl_cmd(io::WRITE, 16, 4, sgl(0x190000, 48, 3)));
    assert_eq!(c.status, Status::SGL_INVALID_TYPE, "bit bucket in a write");
    let c = h.run(1, sgl_cmd(io::READ, 16, 8, sgl(0x190000, 48, 3)));
    assert_eq!(c.status, Status::SGL_INVALID_DATA_LENGTH);
    let c = h.run(1, sgl_cmd(io::READ, 16, 4, sgl(0x190000, 40, 3)));
    assert_eq!(c.status, Status::SGL_INVALID_SEGMENT);
    let c = h.run(1, sgl_cmd(io::READ, 16, 4, sgl(0x190000, 2048, 5)));
    assert_eq!(c.status, Status::SGL_INVALID_TYPE);
}

#[test]
fn flush_write_zeroes_and_deallocate_on_a_file() {
    let t = crate::block::TempFile::new(4 << 20);
    let backend: Arc<dyn BlockBackend> =
        Arc::new(FileBackend::open(&t.0, &FileOptions::default()).unwrap());
    let mut h = Host::new(backend, config());
    h.enable();
    h.io_pair(1, 32);
    // fill 1 MiB
    let data = pattern(1 << 20, 6);
    let list: Vec<u8> = (1..256u64)
        .flat_map(|i| (0x400000 + i * PAGE).to_le_bytes())
        .collect();
    h.put(0x3ff000, &list);
    h.put(0x400000, &data);
    assert_eq!(
        h.rw(1, io::WRITE, 0, 2048, 0x400000, 0x3ff000).status,
        Status::SUCCESS
    );
    let flush = Command {
        opcode: io::FLUSH,
        nsid: 1,
        ..Command::default()
    };
    assert_eq!(h.run(1, flush).status, Status::SUCCESS);
    assert_eq!(
        h.run(
            1,
            Command {
                nsid: 0xffff_ffff,
                ..flush
            }
        )
        .status,
        Status::SUCCESS
    );
    assert_eq!(
        h.run(1, Command { nsid: 2, ..flush }).status,
        Status::INVALID_NAMESPACE
    );
    let blocks_before = std::fs::metadata(&t.0).unwrap().blocks();
    // Deallocate 512 KiB in two ranges.
    let mut ranges = Vec::new();
    for (slba, nlb) in [(0u64, 512u32), (1024, 512)] {
        ranges.extend_from_slice(&0u32.to_le_bytes());
        ranges.extend_from_slice(&nlb.to_le_bytes());
        ranges.extend_from_slice(&slba.to_le_bytes());
    }
    h.put(0x300000, &ranges);
    let dsm = Command {
        opcode: io::DSM,
        nsid: 1,
        dptr1: 0x300000,
        cdw10: 1,
        cdw11: 1 << 2,
        ..Command::default()
    };
    assert_eq!(h.run(1, dsm).status, Status::SUCCESS);
    let blocks_after = std::fs::metadata(&t.0).unwrap().blocks();
    assert!(
        blocks_after + 512 * 1024 / 512 <= blocks_before,
        "no hole punched: {blocks_before} -> {blocks_after}"
    );
    let mut expect = data.clone();
    expect[..256 * 1024].fill(0);
    expect[512 * 1024..768 * 1024].fill(0);
    assert_eq!(h.disk(0, 1 << 20), expect);
    // A range out of bounds fails the whole command and changes nothing.
    let mut bad = ranges.clone();
    bad[16 + 8..16 + 16].copy_from_slice(&(8192u64 - 10).to_le_bytes());
    bad[16 + 4..16 + 8].copy_from_slice(&100u32.to_le_bytes());
    h.put(0x300000, &bad);
    assert_eq!(h.run(1, dsm).status, Status::LBA_OUT_OF_RANGE);
    // Write Zeroes with and without deallocate
    let wz = |slba: u32, nlb: u32, deac: bool| Command {
        opcode: io::WRITE_ZEROES,
        nsid: 1,
        cdw10: slba,
        cdw12: (nlb - 1) | (u32::from(deac) << 25),
        ..Command::default()
    };
    assert_eq!(h.run(1, wz(1536, 8, false)).status, Status::SUCCESS);
    assert_eq!(h.run(1, wz(1600, 256, true)).status, Status::SUCCESS);
    assert_eq!(
        h.run(1, wz(8190, 3, false)).status,
        Status::LBA_OUT_OF_RANGE
    );
    expect[1536 * 512..1544 * 512].fill(0);
    expect[1600 * 512..1856 * 512].fill(0);
    assert_eq!(h.disk(0, 1 << 20), expect);
    // The write cache follows Set Features.
    assert!(h.backend.write_cache());
    assert_eq!(h.set_feature(feat::VOLATILE_WC, 0).status, Status::SUCCESS);
    assert!(!h.backend.write_cache());
    assert_eq!(h.get_feature(feat::VOLATILE_WC, 0, 0).dw0, 0);
    assert_eq!(h.get_feature(feat::VOLATILE_WC, 1, 0).dw0, 1, "default");
    h.put(0x400000, &pattern(512, 9));
    assert_eq!(
        h.rw(1, io::WRITE, 3000, 1, 0x400000, 0).status,
        Status::SUCCESS
    );
    let mut on_disk = vec![0u8; 512];
    File::open(&t.0)
        .unwrap()
        .read_exact_at(&mut on_disk, 3000 * 512)
        .unwrap();
    assert_eq!(on_disk, pattern(512, 9));
}

#[test]
fn malformed_io_commands_fail_with_the_right_status() {
    let mut h = Host::mem_disk(1024);
    h.enable();
    h.io_pair(1, 32);
    let base = Command {
        opcode: io::READ,
        nsid: 1,
        dptr1: 0x100000,
        ..Command::default()
    };
    let cases = [
        (
            Command {
                opcode: 0x7f,
                ..base
            },
            Status::INVALID_OPCODE,
        ),
        (
            Command {
                opcode: 0x05,
                ..base
            },
            Status::INVALID_OPCODE,
        ),
        (Command { nsid: 0, ..base }, Status::INVALID_NAMESPACE),
        (Command { nsid: 2, ..base }, Status::INVALID_NAMESPACE),
        (Command { fuse: 1, ..base }, Status::INVALID_FIELD),
        (Command { psdt: 3, ..base }, Status::INVALID_FIELD),
        (
            Command {
                cdw10: 1024,
                ..base
            },
            Status::LBA_OUT_OF_RANGE,
        ),
        (
            Command {
                cdw10: 1020,
                cdw12: 7,
                ..base
            },
            Status::LBA_OUT_OF_RANGE,
        ),
        (
            Command {
                cdw10: u32::MAX,
                cdw11: u32::MAX,
                ..base
            },
            Status::LBA_OUT_OF_RANGE,
        ),
        (
            Command {
                cdw12: 0xffff,
                ..base
            },
            Status::INVALID_FIELD,
        ),
        (
            Command {
                opcode: io::DSM,
                cdw10: 0,
                cdw11: 4,
                dptr1: MEM,
                ..base
            },
            Status::DATA_TRANSFER_ERROR,
        ),
    ];
    for (cmd, want) in cases {
        let c = h.run(1, cmd);
        assert_eq!(c.status, want, "{cmd:?}");
        assert!(c.status.dnr());
    }
    // the queue still works
    assert_eq!(h.rw(1, io::READ, 0, 1, 0x100000, 0).status, Status::SUCCESS);
}

#[test]
fn phase_tag_wraps_and_full_cq_holds_back_completions() {
    let mut h = Host::mem_disk(1024);
    h.enable();
    h.io_pair(1, 4);
    for i in 0..20u32 {
        let c = h.rw(1, io::READ, u64::from(i), 1, 0x100000, 0);
        assert_eq!(c.status, Status::SUCCESS);
        assert_eq!(u32::from(c.sqhd), (i + 1) % 4);
    }
    // A CQ of 2 entries behind an SQ of 8: one completion fits at a time.
    assert_eq!(h.create_cq(2, 2, 2).status, Status::SUCCESS);
    let sq = h.alloc(1);
    let c = h.admin(Command {
        opcode: admin::CREATE_SQ,
        dptr1: sq,
        cdw10: 2 | (7 << 16),
        cdw11: 1 | (2 << 16),
        ..Command::default()
    });
    assert_eq!(c.status, Status::SUCCESS);
    let mut p = h.pairs[2].unwrap();
    p.sq = sq;
    h.pairs[2] = Some(p);
    // Submit 5 reads with the SQ treated as 8 entries.
    let mut cids = Vec::new();
    for i in 0..5u32 {
        let cmd = Command {
            opcode: io::READ,
            nsid: 1,
            dptr1: 0x100000,
            cdw10: i,
            cid: 100 + i as u16,
            ..Command::default()
        };
        h.put(sq + u64::from(i) * 64, &cmd.to_bytes());
        cids.push(cmd.cid);
    }
    h.w32(reg::DOORBELLS + 16, 5);
    std::thread::sleep(Duration::from_millis(50));
    // Only one entry is posted: the queue holds 2 with one always free.
    let cq2 = h.pairs[2].unwrap().cq;
    assert_eq!(h.get(cq2 + 14, 1)[0] & 1, 1, "first entry posted");
    assert_eq!(h.get(cq2 + 16 + 14, 1)[0] & 1, 0, "second slot stays free");
    let mut got = Vec::new();
    for _ in 0..5 {
        let c = h.wait(2);
        assert_eq!(c.status, Status::SUCCESS);
        got.push(c.cid);
    }
    assert_eq!(got, cids);
}

#[test]
fn each_cq_interrupts_on_its_own_msix_vector() {
    let mut h = Host::mem_disk(1024);
    h.enable();
    h.io_pair(1, 16);
    h.io_pair(2, 16);
    h.irq.take(0);
    h.irq.take(1);
    h.irq.take(2);
    for _ in 0..3 {
        h.rw(1, io::READ, 0, 1, 0x100000, 0);
    }
    assert!(h.irq.take(1) >= 1);
    assert_eq!(h.irq.take(2), 0);
    assert_eq!(h.irq.take(0), 0);
    h.rw(2, io::READ, 0, 1, 0x100000, 0);
    assert_eq!(h.irq.take(1), 0);
    assert!(h.irq.take(2) >= 1);
    // A CQ created with interrupts disabled raises none.
    let base = h.alloc(1);
    let c = h.admin(Command {
        opcode: admin::CREATE_CQ,
        dptr1: base,
        cdw10: 3 | (15 << 16),
        cdw11: 1 | (3 << 16),
        ..Command::default()
    });
    assert_eq!(c.status, Status::SUCCESS);
    h.pairs[3] = Some(Pair::new(3, 0, base, 16));
    assert_eq!(h.create_sq(3, 16, 3).status, Status::SUCCESS);
    h.irq.take(3);
    h.rw(3, io::READ, 0, 1, 0x100000, 0);
    assert_eq!(h.irq.take(3), 0);
}

#[test]
fn without_msix_one_interrupt_masked_by_intms() {
    let mut h = Host::mem_disk(1024);
    h.irq.msix.store(false, Ordering::SeqCst);
    h.enable();
    h.io_pair(1, 16);
    h.io_pair(2, 16);
    h.irq.take(0);
    h.rw(2, io::READ, 0, 1, 0x100000, 0);
    assert!(
        h.irq.take(0) >= 1,
        "INTx for CQ 2 goes to the single vector"
    );
    assert_eq!(h.irq.take(2), 0);
    assert!(!h.ctrl.intx_pending(), "host consumed every entry");
    assert!(!h.irq.level.load(Ordering::SeqCst), "line deasserted");
    // Masked: completions arrive without an interrupt; unmasking with
    // entries pending raises one.
    h.w32(reg::INTMS, 1);
    assert_eq!(h.r32(reg::INTMS), 1);
    let cid = h.submit(
        1,
        Command {
            opcode: io::READ,
            nsid: 1,
            dptr1: 0x100000,
            ..Command::default()
        },
    );
    let t0 = Instant::now();
    while h.get(h.pairs[1].unwrap().cq + 12, 4)[2] & 1 == 0 {
        assert!(t0.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(h.irq.take(0), 0);
    assert!(!h.ctrl.intx_pending(), "masked");
    h.w32(reg::INTMC, 1);
    assert!(h.ctrl.intx_pending());
    assert_eq!(h.irq.take(0), 1);
    assert_eq!(h.wait(1).cid, cid);
    assert!(!h.ctrl.intx_pending());
}

#[test]
fn controller_reset_and_reenable() {
    let mut h = Host::mem_disk(1024);
    h.enable();
    h.io_pair(1, 16);
    h.put(0x100000, &pattern(512, 7));
    h.rw(1, io::WRITE, 5, 1, 0x100000, 0);
    assert_eq!(h.set_feature(feat::VOLATILE_WC, 0).status, Status::SUCCESS);
    h.w32(reg::CC, 0);
    assert!(h.wait_csts(csts::RDY, 0));
    // I/O queues are gone: their doorbell is an invalid register now and
    // features are back to defaults.
    assert!(h.backend.write_cache());
    h.pairs = vec![None; 5];
    h.enable();
    assert_eq!(h.get_feature(feat::NUM_QUEUES, 0, 0).dw0, (3 << 16) | 3);
    h.io_pair(1, 16);
    assert_eq!(h.rw(1, io::READ, 5, 1, 0x110000, 0).status, Status::SUCCESS);
    assert_eq!(h.get(0x110000, 512), pattern(512, 7));
    // Function level reset: registers to power-on values.
    h.ctrl.reset();
    assert_eq!(h.r32(reg::CSTS), 0);
    assert_eq!(h.r32(reg::CC), 0);
    assert_eq!(h.r32(reg::AQA), 0);
    h.pairs = vec![None; 5];
    h.enable();
    assert_eq!(h.identify(1, 0).0, Status::SUCCESS);
}

/// Counts flushes, forwards everything to a memory disk.
struct CountingBackend {
    inner: MemBackend,
    flushes: AtomicU64,
}

impl BlockBackend for CountingBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), BlockError> {
        self.inner.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &IoBufs<'_>, fua: bool) -> Result<(), BlockError> {
        if offset == 0 {
            return Err(BlockError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        self.inner.write(offset, bufs, fua)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn set_write_cache(&self, enabled: bool) {
        self.inner.set_write_cache(enabled)
    }
    fn write_cache(&self) -> bool {
        self.inner.write_cache()
    }
    fn describe(&self) -> String {
        "counting".into()
    }
}

#[test]
fn shutdown_flushes_and_reports_complete() {
    let backend = Arc::new(CountingBackend {
        inner: MemBackend::new(1 << 20, 512).unwrap(),
        flushes: AtomicU64::new(0),
    });
    let mut h = Host::new(backend.clone(), config());
    h.enable();
    h.io_pair(1, 16);
    // A host I/O error is a media error the host may retry.
    h.put(0x100000, &pattern(512, 1));
    let c = h.rw(1, io::WRITE, 0, 1, 0x100000, 0);
    assert_eq!(c.status, Status::WRITE_FAULT);
    assert!(!c.status.dnr());
    let flushes = backend.flushes.load(Ordering::SeqCst);
    let ccv = h.r32(reg::CC);
    h.w32(reg::CC, ccv | (1 << 14));
    assert!(h.wait_csts(csts::SHST_MASK, csts::SHST_COMPLETE));
    assert_eq!(backend.flushes.load(Ordering::SeqCst), flushes + 1);
    // Clearing SHN clears SHST; disabling resets.
    h.w32(reg::CC, ccv);
    assert!(h.wait_csts(csts::SHST_MASK, 0));
    h.w32(reg::CC, 0);
    assert!(h.wait_csts(csts::RDY, 0));
}

#[test]
fn async_events_limits_and_masking() {
    let mut h = Host::mem_disk(1024);
    h.enable();
    let aer = Command {
        opcode: admin::ASYNC_EVENT,
        ..Command::default()
    };
    let mut cids = Vec::new();
    for _ in 0..4 {
        cids.push(h.submit(0, aer));
    }
    // A fifth exceeds AERL.
    let c = h.admin(aer);
    assert_eq!(c.status, Status::AER_LIMIT_EXCEEDED);
    // Nothing pending yet.
    assert!(h.try_wait(0, Duration::from_millis(50)).is_none());
    // Enable temperature warnings, then set the over-threshold below the
    // current temperature.
    assert_eq!(
        h.set_feature(feat::ASYNC_EVENT, 1 << 1).status,
        Status::SUCCESS
    );
    let c = h.set_feature(feat::TEMP_THRESH, 300);
    assert_eq!(c.status, Status::SUCCESS);
    let ev = h.wait(0);
    assert_eq!(ev.cid, cids[0]);
    assert_eq!(ev.dw0, 1 | (1 << 8) | (u32::from(log_page::SMART) << 16));
    // SMART log shows the warning; reading it (RAE clear) unmasks SMART
    // events.
    let buf = h.alloc(1);
    let smart = Command {
        opcode: admin::GET_LOG_PAGE,
        nsid: 0xffff_ffff,
        dptr1: buf,
        cdw10: u32::from(log_page::SMART) | (127 << 16),
        ..Command::default()
    };
    assert_eq!(h.admin(smart).status, Status::SUCCESS);
    assert_eq!(h.get(buf, 1)[0] & 2, 2);
    assert_eq!(
        u16::from_le_bytes(h.get(buf + 1, 2).try_into().unwrap()),
        310
    );
    // Invalid doorbell writes raise error events.
    h.w32(reg::DOORBELLS + 8 * 3, 1);
    let ev = h.wait(0);
    assert_eq!(ev.cid, cids[1]);
    assert_eq!(ev.dw0, u32::from(log_page::ERROR) << 16);
    // a second error event is masked until the error log is read
    h.w32(reg::DOORBELLS + 8 * 4 + 4, 1);
    assert!(h.try_wait(0, Duration::from_millis(50)).is_none());
    let errlog = Command {
        opcode: admin::GET_LOG_PAGE,
        dptr1: buf,
        cdw10: u32::from(log_page::ERROR) | (15 << 16),
        ..Command::default()
    };
    assert_eq!(h.admin(errlog).status, Status::SUCCESS);
    // The admin queue stays the same after an AER completes: the next
    // event completes the next AER.
    h.w32(reg::DOORBELLS + 8 * 4 + 4, 1);
    let ev = h.wait(0);
    assert_eq!(ev.cid, cids[2]);
}

#[test]
fn doorbells_written_before_enable_raise_no_event_after_it() {
    let mut h = Host::mem_disk(1024);
    // Every doorbell of the page, while no queue exists.
    for off in (reg::DOORBELLS..reg::DOORBELLS + 0x1000).step_by(4) {
        h.w32(off, 7);
    }
    assert_eq!(h.r32(reg::CSTS), 0);
    h.enable();
    let aer = Command {
        opcode: admin::ASYNC_EVENT,
        ..Command::default()
    };
    let cid = h.submit(0, aer);
    // No stale event completes the AER...
    assert!(h.try_wait(0, Duration::from_millis(50)).is_none());
    let c = h.admin(Command {
        opcode: admin::KEEP_ALIVE,
        ..Command::default()
    });
    assert_eq!(c.status, Status::SUCCESS);
    // ...but a bad doorbell of this session does.
    h.w32(reg::DOORBELLS + 8 * 3, 1);
    let ev = h.wait(0);
    assert_eq!(ev.cid, cid);
    assert_eq!(ev.dw0, u32::from(log_page::ERROR) << 16);
}

#[test]
fn log_pages_features_abort_keep_alive() {
    let mut h = Host::mem_disk(1024);
    h.enable();
    h.io_pair(1, 16);
    for i in 0..3 {
        h.put(0x100000, &pattern(4096, i));
        h.rw(1, io::WRITE, 8, 8, 0x100000, 0);
    }
    h.rw(1, io::READ, 8, 8, 0x100000, 0);
    let buf = h.alloc(2);
    let log = |h: &mut Host, lid: u8, numd: u32, offset: u64| {
        h.admin(Command {
            opcode: admin::GET_LOG_PAGE,
            dptr1: buf,
            dptr2: buf + PAGE,
            cdw10: u32::from(lid) | ((numd - 1) << 16),
            cdw12: offset as u32,
            cdw13: (offset >> 32) as u32,
            ..Command::default()
        })
        .status
    };
    assert_eq!(log(&mut h, log_page::SMART, 128, 0), Status::SUCCESS);
    let smart = h.get(buf, 512);
    let u128_at = |d: &[u8], at: usize| u128::from_le_bytes(d[at..at + 16].try_into().unwrap());
    assert_eq!(u128_at(&smart, 64), 1, "host read commands");
    assert_eq!(u128_at(&smart, 80), 3, "host write commands");
    assert_eq!(u128_at(&smart, 48), 1, "data units written, rounded up");
    assert_eq!(smart[3], 100);
    // firmware slot
    assert_eq!(log(&mut h, log_page::FW_SLOT, 128, 0), Status::SUCCESS);
    assert_eq!(h.get(buf, 1)[0], 1);
    // effects: reads supported, writes change content
    assert_eq!(log(&mut h, log_page::CMD_EFFECTS, 1024, 0), Status::SUCCESS);
    let eff = h.get(buf, 4096);
    assert_eq!(eff[1024 + 4 * 2], 1);
    assert_eq!(eff[1024 + 4], 3);
    assert_eq!(eff[4 * 6], 1, "identify");
    // an offset into the log, and past its end
    assert_eq!(log(&mut h, log_page::FW_SLOT, 2, 8), Status::SUCCESS);
    assert_eq!(&h.get(buf, 1), &[h.ctrl.config().firmware.as_bytes()[0]]);
    assert_eq!(
        log(&mut h, log_page::FW_SLOT, 1, 516),
        Status::INVALID_FIELD
    );
    assert_eq!(log(&mut h, log_page::FW_SLOT, 1, 2), Status::INVALID_FIELD);
    assert_eq!(log(&mut h, 0x70, 1, 0), Status::INVALID_LOG_PAGE);
    // features
    assert_eq!(
        h.set_feature(feat::POWER_MGMT, 1).status,
        Status::INVALID_FIELD
    );
    assert_eq!(h.set_feature(feat::POWER_MGMT, 0).status, Status::SUCCESS);
    assert_eq!(
        h.set_feature(feat::ARBITRATION, 0x0302_0103).status,
        Status::SUCCESS
    );
    assert_eq!(h.get_feature(feat::ARBITRATION, 0, 0).dw0, 0x0302_0103);
    assert_eq!(h.get_feature(feat::ARBITRATION, 1, 0).dw0, 0);
    assert_eq!(h.get_feature(feat::ARBITRATION, 3, 0).dw0, 4, "changeable");
    assert_eq!(
        h.set_feature(feat::IRQ_COALESCE, 0x0a05).status,
        Status::SUCCESS
    );
    assert_eq!(h.get_feature(feat::IRQ_COALESCE, 0, 0).dw0, 0x0a05);
    assert_eq!(
        h.set_feature(feat::IRQ_CONFIG, 2 | (1 << 16)).status,
        Status::SUCCESS
    );
    assert_eq!(h.get_feature(feat::IRQ_CONFIG, 0, 2).dw0, 2 | (1 << 16));
    assert_eq!(
        h.get_feature(feat::IRQ_CONFIG, 0, 9).status,
        Status::INVALID_FIELD
    );
    assert_eq!(
        h.set_feature(feat::TEMP_THRESH, 320 | (1 << 20)).status,
        Status::SUCCESS
    );
    assert_eq!(h.get_feature(feat::TEMP_THRESH, 0, 1 << 20).dw0, 320);
    assert_eq!(h.get_feature(feat::TEMP_THRESH, 0, 0).dw0, 343);
    assert_eq!(
        h.set_feature(feat::TEMP_THRESH, 1 << 16).status,
        Status::INVALID_FIELD
    );
    assert_eq!(h.set_feature(0x7e, 0).status, Status::INVALID_FIELD);
    assert_eq!(h.get_feature(0x7e, 0, 0).status, Status::INVALID_FIELD);
    let saved = h.admin(Command {
        opcode: admin::SET_FEATURES,
        cdw10: u32::from(feat::ARBITRATION) | (1 << 31),
        ..Command::default()
    });
    assert_eq!(saved.status, Status::FEATURE_NOT_SAVEABLE);
    // abort: nothing is ever outstanding
    let c = h.admin(Command {
        opcode: admin::ABORT,
        cdw10: 1 | (5 << 16),
        ..Command::default()
    });
    assert_eq!((c.status, c.dw0), (Status::SUCCESS, 1));
    // keep alive, and the timer it feeds
    assert_eq!(h.set_feature(feat::KATO, 1000).status, Status::SUCCESS);
    assert_eq!(
        h.admin(Command {
            opcode: admin::KEEP_ALIVE,
            ..Command::default()
        })
        .status,
        Status::SUCCESS
    );
    assert_eq!(h.r32(reg::CSTS) & csts::CFS, 0);
    // unknown admin opcode, SGL on an admin command
    assert_eq!(
        h.admin(Command {
            opcode: 0x7f,
            ..Command::default()
        })
        .status,
        Status::INVALID_OPCODE
    );
    assert_eq!(
        h.admin(Command {
            opcode: admin::IDENTIFY,
            psdt: 1,
            cdw10: 1,
            ..Command::default()
        })
        .status,
        Status::INVALID_FIELD
    );
}

#[test]
fn keep_alive_timeout_is_fatal() {
    let mut h = Host::mem_disk(64);
    h.enable();
    assert_eq!(h.set_feature(feat::KATO, 100).status, Status::SUCCESS);
    // KATO 100 ms is rounded up to the 1 s granularity, plus 1 s of slack.
    assert!(h.wait_csts(csts::CFS, csts::CFS));
    h.w32(reg::CC, 0);
    assert!(h.wait_csts(csts::CFS | csts::RDY, 0));
}

#[test]
fn shadow_doorbells_cut_register_writes() {
    let mut h = Host::mem_disk(1024);
    h.enable();
    h.io_pair(1, 64);
    let dbs = h.alloc(1);
    let eis = h.alloc(1);
    let c = h.admin(Command {
        opcode: admin::DBBUF_CONFIG,
        dptr1: dbs,
        dptr2: eis,
        ..Command::default()
    });
    assert_eq!(c.status, Status::SUCCESS);
    h.shadow = Some((dbs, eis));
    for i in 0..40u32 {
        let c = h.rw(1, io::READ, u64::from(i), 1, 0x100000, 0);
        assert_eq!(c.status, Status::SUCCESS);
    }
    // The controller published its position in the event index when it
    // went idle.
    std::thread::sleep(Duration::from_millis(20));
    let ei = u32::from_le_bytes(h.get(eis + 8, 4).try_into().unwrap());
    assert_eq!(ei, 40);
    // Bad configurations.
    let bad = |h: &mut Host, a: u64, b: u64| {
        h.admin(Command {
            opcode: admin::DBBUF_CONFIG,
            dptr1: a,
            dptr2: b,
            ..Command::default()
        })
        .status
    };
    assert_eq!(bad(&mut h, 0, eis), Status::INVALID_FIELD);
    assert_eq!(bad(&mut h, dbs + 8, eis), Status::INVALID_FIELD);
}

#[test]
fn mmap_doorbells_are_polled() {
    let cfg = NvmeConfig {
        doorbells: DoorbellMode::Mmap,
        ..config()
    };
    let mut h = Host::new(Arc::new(MemBackend::new(1 << 20, 512).unwrap()), cfg);
    let fd = h.ctrl.doorbell_fd().expect("mmap mode has a doorbell fd");
    let page = File::from(fd.try_clone().unwrap());
    h.enable();
    let (_, id) = h.identify(1, 0);
    assert_eq!(id[256..258], [0, 0], "no doorbell buffer config");
    h.io_pair(1, 16);
    // Ring the I/O doorbell through the shared page only, as a guest
    // writing the client's mapping does.
    let mut p = h.pairs[1].unwrap();
    let cmd = Command {
        opcode: io::READ,
        nsid: 1,
        cid: 77,
        dptr1: 0x100000,
        ..Command::default()
    };
    h.put(p.sq, &cmd.to_bytes());
    p.sq_tail = 1;
    h.pairs[1] = Some(p);
    page.write_all_at(&1u32.to_le_bytes(), 0x1000 + 8).unwrap();
    let c = h.wait(1);
    assert_eq!((c.cid, c.status), (77, Status::SUCCESS));
    assert_eq!(
        h.admin(Command {
            opcode: admin::DBBUF_CONFIG,
            dptr1: 0x1000,
            dptr2: 0x2000,
            ..Command::default()
        })
        .status,
        Status::INVALID_OPCODE
    );
}

/// A client that serves DMA_READ / DMA_WRITE from a buffer mapped at
/// `CLIENT_BASE`.
struct FakeClient(Mutex<Vec<u8>>);

const CLIENT_BASE: u64 = 1 << 40;

impl DmaMessenger for FakeClient {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let m = self.0.lock().unwrap();
        let at = (iova - CLIENT_BASE) as usize;
        buf.copy_from_slice(m.get(at..at + buf.len()).ok_or(DmaError::Unmapped {
            iova,
            len: buf.len() as u64,
        })?);
        Ok(())
    }
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let mut m = self.0.lock().unwrap();
        let at = (iova - CLIENT_BASE) as usize;
        m.get_mut(at..at + data.len())
            .ok_or(DmaError::Unmapped {
                iova,
                len: data.len() as u64,
            })?
            .copy_from_slice(data);
        Ok(())
    }
}

#[test]
fn data_in_message_backed_memory_goes_through_bounce_buffers() {
    // Queues in a memfd; data buffers in memory reached only by messages.
    let mem = memfd(MEM);
    let dma = Arc::new(DmaSpace::default());
    dma.map(MapRequest {
        iova: 0,
        size: MEM,
        prot: Prot::RW,
        file: Some((mem.try_clone().unwrap(), 0)),
    })
    .unwrap();
    let client = Arc::new(FakeClient(Mutex::new(vec![0; 1 << 20])));
    dma.set_messenger(Some(client.clone()), None);
    dma.map(MapRequest {
        iova: 1 << 40,
        size: 1 << 20,
        prot: Prot::RW,
        file: None,
    })
    .unwrap();
    let backend = Arc::new(MemBackend::new(1 << 20, 512).unwrap());
    let mut h = Host::with_dma(backend, config(), dma, mem);
    h.enable();
    h.io_pair(1, 16);
    let data = pattern(8192, 8);
    client.0.lock().unwrap()[0x1000..0x3000].copy_from_slice(&data);
    let c = h.rw(1, io::WRITE, 16, 16, (1 << 40) + 0x1000, (1 << 40) + 0x2000);
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(h.disk(16 * 512, 8192), data);
    let c = h.rw(1, io::READ, 16, 16, (1 << 40) + 0x8000, (1 << 40) + 0x9000);
    assert_eq!(c.status, Status::SUCCESS);
    assert_eq!(&client.0.lock().unwrap()[0x8000..0xa000], &data[..]);
}

#[test]
fn queue_memory_unmapped_under_the_controller_is_fatal() {
    let mut h = Host::mem_disk(64);
    h.enable();
    h.io_pair(1, 16);
    // Idle controllers hold no view of guest memory: unmap returns at once.
    let t0 = Instant::now();
    h.dma.unmap(0, MEM).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1));
    h.w32(reg::DOORBELLS + 8, 1);
    assert!(h.wait_csts(csts::CFS, csts::CFS));
    // a controller reset recovers
    h.w32(reg::CC, 0);
    assert!(h.wait_csts(csts::CFS | csts::RDY, 0));
}

#[test]
fn fuzz_entry_point_never_panics() {
    let mem = memfd(1 << 20);
    let dma = DmaSpace::default();
    dma.map(MapRequest {
        iova: 0,
        size: 1 << 20,
        prot: Prot::RW,
        file: Some((mem.try_clone().unwrap(), 0)),
    })
    .unwrap();
    let backend = MemBackend::new(1 << 20, 512).unwrap();
    // Fill memory with descriptor-like junk so lists get walked.
    let junk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    mem.write_all_at(&junk, 0).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut successes = 0;
    for i in 0..3000 {
        let mut sqe = [0u8; 64];
        for chunk in sqe.chunks_mut(8) {
            chunk.copy_from_slice(&next().to_le_bytes());
        }
        // Bias towards valid opcodes, namespace and small transfers.
        sqe[0] = [0, 1, 2, 8, 9, sqe[0]][i % 6];
        if i % 2 == 0 {
            sqe[4..8].copy_from_slice(&1u32.to_le_bytes());
            sqe[1] &= 0xc0;
            sqe[48..52].copy_from_slice(&((next() % 16) as u32).to_le_bytes());
            sqe[40..48].copy_from_slice(&(next() % 2048).to_le_bytes());
            sqe[24..32].copy_from_slice(&((next() % (1 << 20)) & !3).to_le_bytes());
            sqe[32..40].copy_from_slice(&((next() % (1 << 20)) & !0xfff).to_le_bytes());
        }
        let c = execute_io_command(&sqe, &dma, &backend);
        if c.status.is_success() {
            successes += 1;
        }
    }
    assert!(successes > 50, "the biased inputs reach the data paths");
}

#[test]
fn counters_account_for_commands_doorbells_and_interrupts() {
    let mut h = Host::mem_disk(64);
    h.enable();
    h.io_pair(1, 16);
    let c = h.ctrl.counters();
    let doorbells = c.trapped_doorbells.load(Ordering::Relaxed);
    assert!(
        doorbells >= 2,
        "enable and queue creation rang the admin SQ"
    );
    assert_eq!(c.io_commands.load(Ordering::Relaxed), 0);
    for lba in 0..5 {
        assert_eq!(
            h.rw(1, io::READ, lba, 1, 0x100000, 0).status,
            Status::SUCCESS
        );
    }
    let c = h.ctrl.counters();
    assert_eq!(c.io_commands.load(Ordering::Relaxed), 5);
    let batches = c.batches.load(Ordering::Relaxed);
    assert!((1..=5).contains(&batches), "{batches} batches");
    assert!(c.interrupts.load(Ordering::Relaxed) >= 1);
    assert!(c.trapped_doorbells.load(Ordering::Relaxed) >= doorbells + 5);
    assert!(
        c.summary().starts_with("5 I/O commands in "),
        "{}",
        c.summary()
    );
}

/// The device side alone, without a guest: 4 KiB random reads from an
/// in-memory disk at queue depth 32, the fake host ringing a trapped
/// doorbell per command and polling the CQ (sleeping 50 us between looks),
/// so a lower bound on the ceiling vdevd's own work sets. As a test it runs
/// briefly and checks every read succeeds and is counted once; as a
/// measurement, give it time and look at the figure it prints:
/// `VDEVD_NVME_DEVICE_SIDE_SECS=2 cargo test -p vdevd-devices nvme::tests::device_side -- --nocapture`
#[test]
fn device_side_4k_randread_qd32() {
    let run_for = std::env::var("VDEVD_NVME_DEVICE_SIDE_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(Duration::from_millis(300), Duration::from_secs_f64);
    let blocks = 1u64 << 18; // 128 MiB
    let mut h = Host::mem_disk(blocks);
    h.enable();
    h.io_pair(1, 64);
    let buf = 0x0100_0000u64;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let t0 = Instant::now();
    let mut done = 0u64;
    while t0.elapsed() < run_for {
        for i in 0..32u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lba = (x % (blocks / 8)) * 8;
            let cmd = Command {
                opcode: io::READ,
                nsid: 1,
                dptr1: buf + i * PAGE,
                cdw10: lba as u32,
                cdw11: (lba >> 32) as u32,
                cdw12: 7,
                ..Command::default()
            };
            h.submit(1, cmd);
        }
        for _ in 0..32 {
            assert_eq!(h.wait(1).status, Status::SUCCESS);
        }
        done += 32;
    }
    let secs = t0.elapsed().as_secs_f64();
    let c = h.ctrl.counters();
    assert_eq!(c.io_commands.load(Ordering::Relaxed), done);
    println!(
        "device side: {done} reads in {secs:.2} s = {:.0} IOPS; {}",
        done as f64 / secs,
        c.summary()
    );
}

/// Wait until CQ `qid` slot `slot` holds an entry of the first pass.
fn wait_cqe(h: &Host, qid: u16, slot: u64) {
    let cq = h.pairs[usize::from(qid)].unwrap().cq;
    let t0 = Instant::now();
    loop {
        let mut b = [0u8; 16];
        h.mem.read_exact_at(&mut b, cq + slot * 16).unwrap();
        if Completion::decode(&b).1 {
            return;
        }
        assert!(t0.elapsed() < TIMEOUT, "no completion in slot {slot}");
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Wait for at least one interrupt on `vector`; returns how many and after
/// how long.
fn wait_irq(h: &Host, vector: usize) -> (u64, Duration) {
    let t0 = Instant::now();
    loop {
        let n = h.irq.take(vector);
        if n > 0 {
            return (n, t0.elapsed());
        }
        assert!(t0.elapsed() < TIMEOUT, "no interrupt on vector {vector}");
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn read_cmd(lba: u32) -> Command {
    Command {
        opcode: io::READ,
        nsid: 1,
        dptr1: 0x100000,
        cdw10: lba,
        ..Command::default()
    }
}

#[test]
fn interrupt_held_back_while_the_host_has_not_handled_the_last() {
    let mut cfg = config();
    cfg.io_threads = 1;
    // The queue thread stays awake (no flush before sleeping) throughout.
    cfg.poll.spin = Duration::from_secs(3);
    let mut h = Host::new(Arc::new(MemBackend::new(1024 * 512, 512).unwrap()), cfg);
    h.enable();
    h.io_pair(1, 16);
    h.irq.take(1);
    h.submit(1, read_cmd(0));
    wait_cqe(&h, 1, 0);
    assert_eq!(wait_irq(&h, 1).0, 1);
    // Two more complete while the host has not moved its CQ head: its
    // handler, still to run, will find them.
    h.submit(1, read_cmd(1));
    h.submit(1, read_cmd(2));
    wait_cqe(&h, 1, 2);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(h.irq.take(1), 0, "held back");
    // The host read all three: nothing left for an interrupt.
    h.w32(reg::DOORBELLS + 8 + 4, 3);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(h.irq.take(1), 0, "nothing left to signal");
    // The next completion interrupts at once.
    h.submit(1, read_cmd(3));
    wait_cqe(&h, 1, 3);
    let (n, after) = wait_irq(&h, 1);
    assert_eq!(n, 1);
    assert!(after < Duration::from_secs(1), "{after:?}");
    // The host consumed only part: the rest gets its interrupt when the
    // head moves.
    h.submit(1, read_cmd(4));
    h.submit(1, read_cmd(5));
    wait_cqe(&h, 1, 5);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(h.irq.take(1), 0, "held back");
    h.w32(reg::DOORBELLS + 8 + 4, 5);
    let (n, after) = wait_irq(&h, 1);
    assert_eq!(n, 1);
    assert!(after < Duration::from_secs(1), "{after:?}");
}

#[test]
fn held_back_interrupt_is_raised_before_the_queue_thread_sleeps() {
    let mut cfg = config();
    cfg.io_threads = 1;
    cfg.poll.spin = Duration::ZERO;
    let mut h = Host::new(Arc::new(MemBackend::new(1024 * 512, 512).unwrap()), cfg);
    h.enable();
    h.io_pair(1, 16);
    h.irq.take(1);
    h.submit(1, read_cmd(0));
    wait_cqe(&h, 1, 0);
    assert_eq!(wait_irq(&h, 1).0, 1);
    // The host never handles it; the next completion still interrupts.
    h.submit(1, read_cmd(1));
    wait_cqe(&h, 1, 1);
    wait_irq(&h, 1);
}

#[test]
fn without_irq_defer_every_batch_interrupts() {
    let mut cfg = config();
    cfg.io_threads = 1;
    cfg.irq_defer = false;
    cfg.poll.spin = Duration::from_secs(3);
    let mut h = Host::new(Arc::new(MemBackend::new(1024 * 512, 512).unwrap()), cfg);
    h.enable();
    h.io_pair(1, 16);
    h.irq.take(1);
    h.submit(1, read_cmd(0));
    wait_cqe(&h, 1, 0);
    assert_eq!(wait_irq(&h, 1).0, 1);
    h.submit(1, read_cmd(1));
    wait_cqe(&h, 1, 1);
    wait_irq(&h, 1);
}
