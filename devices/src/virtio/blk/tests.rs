//! Tests of the virtio-blk model against fake guest memory and a fake
//! driver, through the same queue loop the transports use.

use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::block::MemBackend;
use crate::virtio::testing::{Buf, Driver, F_INDIRECT, F_NEXT, F_WRITE, blk_header, r, w};
use crate::virtio::{QueueRun, process_queue};

type Mem = GuestMemoryMmap<()>;

const MEM_SIZE: usize = 0x20_0000;
const RING: u64 = 0;
const HDR: u64 = 0x10_000;
const DATA: u64 = 0x20_000;
const STATUS: u64 = 0x1f_000;
const DISK: u64 = 1 << 20;

/// A backend that records what the model asks of it, around a memory disk.
struct Recorder {
    inner: MemBackend,
    flushes: Mutex<u32>,
    fail_flush: AtomicBool,
}

impl BlockBackend for Recorder {
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
        self.inner.write(offset, bufs, fua)
    }
    fn flush(&self) -> Result<(), BlockError> {
        if self.fail_flush.load(Ordering::Relaxed) {
            return Err(BlockError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        *self.flushes.lock().unwrap() += 1;
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
        "recorder".into()
    }
}

struct Bed {
    mem: Mem,
    blk: Blk,
    backend: Arc<Recorder>,
    drv: Driver,
    q: Queue,
}

fn bed_with(config: BlkConfig, event_idx: bool) -> Bed {
    let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let backend = Arc::new(Recorder {
        inner: MemBackend::new(DISK, 512).unwrap(),
        flushes: Mutex::new(0),
        fail_flush: AtomicBool::new(false),
    });
    let blk = Blk::new(backend.clone(), config).unwrap();
    blk.set_features(blk.features());
    let drv = Driver::new(&mem, RING, 16);
    let q = drv.queue(event_idx);
    Bed {
        mem,
        blk,
        backend,
        drv,
        q,
    }
}

fn bed() -> Bed {
    bed_with(BlkConfig::default(), false)
}

impl Bed {
    fn run(&mut self) -> Result<QueueRun, DeviceBroken> {
        process_queue(&self.blk, 0, &self.mem, &mut self.q, 64, &|| false)
    }

    /// Submit one chain and process it; the (status, used len).
    fn submit(&mut self, bufs: &[Buf]) -> (u8, u32) {
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = self.drv.chain(&self.mem, bufs);
        self.drv.publish(&self.mem, head);
        let run = self.run().unwrap();
        assert_eq!(run.completed, 1);
        let used = self.drv.take_used(&self.mem);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        (self.status(), used[0].1)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn fill(&self, at: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(at)).unwrap();
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn write_sectors(&mut self, sector: u64, data: &[u8]) -> u8 {
        blk_header(&self.mem, HDR, req::OUT, sector);
        self.fill(DATA, data);
        self.submit(&[r(HDR, 16), r(DATA, data.len() as u32), w(STATUS, 1)])
            .0
    }

    fn read_sectors(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        blk_header(&self.mem, HDR, req::IN, sector);
        self.fill(DATA, &vec![0xee; len as usize]);
        let (s, used) = self.submit(&[r(HDR, 16), w(DATA, len), w(STATUS, 1)]);
        if s == status::OK {
            assert_eq!(used, len + 1, "used length counts data and status");
        }
        (s, self.read(DATA, len as usize))
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn features_and_config_space() {
    let b = bed_with(
        BlkConfig {
            num_queues: 4,
            queue_size: 128,
            serial: "x".into(),
        },
        false,
    );
    let f = b.blk.features();
    for bit in [
        common::VERSION_1,
        common::RING_EVENT_IDX,
        common::RING_INDIRECT_DESC,
        features::SEG_MAX,
        features::SIZE_MAX,
        features::BLK_SIZE,
        features::FLUSH,
        features::CONFIG_WCE,
        features::MQ,
        features::DISCARD,
        features::WRITE_ZEROES,
    ] {
        assert_ne!(f & bit, 0, "feature {bit:#x} not offered");
    }
    assert_eq!(f & features::RO, 0);
    let mut c = [0u8; config::SIZE];
    b.blk.read_config(0, &mut c);
    let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        DISK / 512,
        "capacity in sectors"
    );
    assert_eq!(u32_at(config::SIZE_MAX), SIZE_MAX);
    assert_eq!(u32_at(config::SEG_MAX), 126);
    assert_eq!(u32_at(config::BLK_SIZE), 512);
    assert_eq!(c[config::WRITEBACK], 1);
    assert_eq!(
        u16::from_le_bytes([c[config::NUM_QUEUES], c[config::NUM_QUEUES + 1]]),
        4
    );
    assert_eq!(u32_at(config::MAX_DISCARD_SEG), MAX_DISCARD_SEGMENTS);
    assert_eq!(u32_at(config::DISCARD_SECTOR_ALIGNMENT), 1);
    assert_eq!(c[config::WRITE_ZEROES_MAY_UNMAP], 1);
    // reads of any size and offset, past the end as zero
    let mut tail = [0xaau8; 8];
    b.blk.read_config(config::SIZE as u64 - 4, &mut tail);
    assert_eq!(tail, [1, 0, 0, 0, 0, 0, 0, 0]);
    let mut cap = [0u8; 2];
    b.blk.read_config(1, &mut cap);
    assert_eq!(cap, [c[1], c[2]]);
    b.blk.read_config(u64::MAX, &mut cap);
    assert_eq!(cap, [0, 0]);
}

#[test]
fn write_cache_follows_flush_and_writeback() {
    let b = bed();
    assert!(b.backend.write_cache());
    b.blk.write_config(config::WRITEBACK as u64, &[0]);
    assert!(!b.backend.write_cache(), "CONFIG_WCE: writeback 0 disables");
    let mut v = [0u8];
    b.blk.read_config(config::WRITEBACK as u64, &mut v);
    assert_eq!(v, [0]);
    b.blk.write_config(config::WRITEBACK as u64 - 1, &[9, 1]);
    assert!(b.backend.write_cache());
    // other fields are read-only
    b.blk.write_config(0, &[0xff; 8]);
    let mut cap = [0u8; 8];
    b.blk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK / 512);
    // without FLUSH the disk is write-through, and WCE writes are ignored
    b.blk.set_features(common::VERSION_1);
    assert!(!b.backend.write_cache());
    b.blk.write_config(config::WRITEBACK as u64, &[1]);
    assert!(!b.backend.write_cache());
    b.blk.reset();
    assert!(b.backend.write_cache());
}

#[test]
fn out_then_in_round_trips_across_odd_descriptor_splits() {
    let mut b = bed();
    let data = pattern(4096, 7);
    assert_eq!(b.write_sectors(3, &data), status::OK);
    // read it back with the header split in two, data in three uneven
    // pieces and the status sharing the last data descriptor
    blk_header(&b.mem, HDR, req::IN, 3);
    b.fill(DATA, &[0; 4096]);
    let last = 0x30_000;
    let (s, used) = {
        b.mem.write_obj(0xffu8, GuestAddress(last + 1000)).unwrap();
        let head = b.drv.chain(
            &b.mem,
            &[
                r(HDR, 5),
                r(HDR + 5, 11),
                w(DATA, 1000),
                w(DATA + 1000, 2096),
                w(last, 1001),
            ],
        );
        b.drv.publish(&b.mem, head);
        b.run().unwrap();
        let used = b.drv.take_used(&b.mem);
        (
            b.mem.read_obj::<u8>(GuestAddress(last + 1000)).unwrap(),
            used[0].1,
        )
    };
    assert_eq!(s, status::OK);
    assert_eq!(used, 4097);
    let mut got = b.read(DATA, 3096);
    got.extend(b.read(last, 1000));
    assert_eq!(got, data);
    // the sectors around were not touched
    let (s, before) = b.read_sectors(2, 512);
    assert_eq!((s, before), (status::OK, vec![0; 512]));
    let (_, after) = b.read_sectors(11, 512);
    assert_eq!(after, vec![0; 512]);
    assert_eq!(b.blk.stats().ok.load(Ordering::Relaxed), 4);
}

#[test]
fn first_and_last_sector() {
    let mut b = bed();
    let last = DISK / 512 - 1;
    assert_eq!(b.write_sectors(0, &pattern(512, 1)), status::OK);
    assert_eq!(b.write_sectors(last, &pattern(512, 2)), status::OK);
    assert_eq!(b.read_sectors(0, 512), (status::OK, pattern(512, 1)));
    assert_eq!(b.read_sectors(last, 512), (status::OK, pattern(512, 2)));
    // one past the end, a request straddling it, and a sector that
    // overflows the byte offset
    assert_eq!(b.read_sectors(last + 1, 512).0, status::IOERR);
    assert_eq!(b.read_sectors(last, 1024).0, status::IOERR);
    assert_eq!(b.write_sectors(last, &[0; 1024]), status::IOERR);
    assert_eq!(b.read_sectors(u64::MAX / 256, 512).0, status::IOERR);
    assert_eq!(b.read_sectors(last, 512), (status::OK, pattern(512, 2)));
}

#[test]
fn lengths_that_are_not_whole_sectors_fail() {
    let mut b = bed();
    assert_eq!(b.read_sectors(0, 100).0, status::IOERR);
    assert_eq!(b.write_sectors(0, &[1; 700]), status::IOERR);
    assert_eq!(b.read_sectors(0, 512), (status::OK, vec![0; 512]));
}

#[test]
fn flush_reaches_the_backend_and_reports_its_failure() {
    let mut b = bed();
    blk_header(&b.mem, HDR, req::FLUSH, 0);
    assert_eq!(b.submit(&[r(HDR, 16), w(STATUS, 1)]), (status::OK, 1));
    assert_eq!(*b.backend.flushes.lock().unwrap(), 1);
    assert_eq!(b.blk.stats().flushes.load(Ordering::Relaxed), 1);
    b.backend.fail_flush.store(true, Ordering::Relaxed);
    assert_eq!(b.submit(&[r(HDR, 16), w(STATUS, 1)]).0, status::IOERR);
}

#[test]
fn get_id_writes_the_serial() {
    let mut b = bed_with(
        BlkConfig {
            serial: "disk-0042".into(),
            ..BlkConfig::default()
        },
        false,
    );
    blk_header(&b.mem, HDR, req::GET_ID, 0);
    b.fill(DATA, &[0xff; 20]);
    let (s, used) = b.submit(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]);
    assert_eq!((s, used), (status::OK, 21));
    let mut want = b"disk-0042".to_vec();
    want.resize(20, 0);
    assert_eq!(b.read(DATA, 20), want);
    // a short buffer gets what fits
    b.fill(DATA, &[0xff; 20]);
    let (s, used) = b.submit(&[r(HDR, 16), w(DATA, 4), w(STATUS, 1)]);
    assert_eq!((s, used), (status::OK, 5));
    assert_eq!(b.read(DATA, 5), b"disk\xff");
    // a serial longer than 20 bytes is refused up front
    let long = BlkConfig {
        serial: "x".repeat(21),
        ..BlkConfig::default()
    };
    assert!(Blk::new(b.backend.clone(), long).is_err());
}

fn segment(mem: &Mem, at: u64, sector: u64, sectors: u32, flags: u32) {
    mem.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(sectors.to_le(), GuestAddress(at + 8))
        .unwrap();
    mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    let mut b = bed();
    let data = pattern(8192, 3);
    assert_eq!(b.write_sectors(0, &data), status::OK);
    // two segments in one DISCARD: sectors 0..2 and 8..10
    blk_header(&b.mem, HDR, req::DISCARD, 0);
    let seg = HDR + 0x100;
    segment(&b.mem, seg, 0, 2, 0);
    segment(&b.mem, seg + 16, 8, 2, 0);
    assert_eq!(
        b.submit(&[r(HDR, 16), r(seg, 32), w(STATUS, 1)]).0,
        status::OK
    );
    let (_, got) = b.read_sectors(0, 8192);
    let mut want = data.clone();
    want[..1024].fill(0);
    want[4096..5120].fill(0);
    assert_eq!(got, want);
    // WRITE_ZEROES with and without unmap
    blk_header(&b.mem, HDR, req::WRITE_ZEROES, 0);
    segment(&b.mem, seg, 2, 1, SEGMENT_FLAG_UNMAP);
    segment(&b.mem, seg + 16, 15, 1, 0);
    assert_eq!(
        b.submit(&[r(HDR, 16), r(seg, 32), w(STATUS, 1)]).0,
        status::OK
    );
    let (_, got) = b.read_sectors(0, 8192);
    want[1024..1536].fill(0);
    want[7680..8192].fill(0);
    assert_eq!(got, want);
}

#[test]
fn discard_errors() {
    let mut b = bed();
    let seg = HDR + 0x100;
    blk_header(&b.mem, HDR, req::DISCARD, 0);
    // the unmap flag on a discard, and unknown flags: UNSUPP
    segment(&b.mem, seg, 0, 1, SEGMENT_FLAG_UNMAP);
    assert_eq!(
        b.submit(&[r(HDR, 16), r(seg, 16), w(STATUS, 1)]).0,
        status::UNSUPP
    );
    blk_header(&b.mem, HDR, req::WRITE_ZEROES, 0);
    segment(&b.mem, seg, 0, 1, 2);
    assert_eq!(
        b.submit(&[r(HDR, 16), r(seg, 16), w(STATUS, 1)]).0,
        status::UNSUPP
    );
    // no segment, a partial segment, too many segments, too long, past the end
    blk_header(&b.mem, HDR, req::DISCARD, 0);
    assert_eq!(b.submit(&[r(HDR, 16), w(STATUS, 1)]).0, status::IOERR);
    segment(&b.mem, seg, 0, 1, 0);
    assert_eq!(
        b.submit(&[r(HDR, 16), r(seg, 12), w(STATUS, 1)]).0,
        status::IOERR
    );
    let many = (MAX_DISCARD_SEGMENTS + 1) * 16;
    assert_eq!(
        b.submit(&[r(HDR, 16), r(seg, many), w(STATUS, 1)]).0,
        status::IOERR
    );
    segment(&b.mem, seg, 0, MAX_DISCARD_SECTORS + 1, 0);
    assert_eq!(
        b.submit(&[r(HDR, 16), r(seg, 16), w(STATUS, 1)]).0,
        status::IOERR
    );
    segment(&b.mem, seg, DISK / 512, 1, 0);
    assert_eq!(
        b.submit(&[r(HDR, 16), r(seg, 16), w(STATUS, 1)]).0,
        status::IOERR
    );
    // a bad second segment stops the whole request before anything happens
    assert_eq!(b.write_sectors(0, &[9; 512]), status::OK);
    segment(&b.mem, seg, 0, 1, 0);
    segment(&b.mem, seg + 16, u64::MAX, 1, 0);
    assert_eq!(
        b.submit(&[r(HDR, 16), r(seg, 32), w(STATUS, 1)]).0,
        status::IOERR
    );
    assert_eq!(b.read_sectors(0, 512).1, vec![9; 512]);
    // not negotiated: UNSUPP
    b.blk.set_features(common::VERSION_1 | features::FLUSH);
    blk_header(&b.mem, HDR, req::DISCARD, 0);
    segment(&b.mem, seg, 0, 1, 0);
    assert_eq!(
        b.submit(&[r(HDR, 16), r(seg, 16), w(STATUS, 1)]).0,
        status::UNSUPP
    );
}

#[test]
fn unknown_request_type_is_unsupported() {
    let mut b = bed();
    for kind in [2, 3, 7, 12, 14, 0xffff_ffff] {
        blk_header(&b.mem, HDR, kind, 0);
        assert_eq!(
            b.submit(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]).0,
            status::UNSUPP,
            "type {kind}"
        );
    }
    assert_eq!(b.blk.stats().unsupp.load(Ordering::Relaxed), 6);
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_data() {
    let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let inner = MemBackend::new(DISK, 512).unwrap();
    // put data on the disk before making it read-only
    {
        let mut st = IoVecStorage::new();
        let mut d = pattern(512, 5);
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut d);
        inner.write(0, &bufs, false).unwrap();
    }
    struct Ro(MemBackend);
    impl BlockBackend for Ro {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn block_size(&self) -> u32 {
            512
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read(&self, o: u64, b: &IoBufs<'_>) -> Result<(), BlockError> {
            self.0.read(o, b)
        }
        fn write(&self, _: u64, _: &IoBufs<'_>, _: bool) -> Result<(), BlockError> {
            Err(BlockError::ReadOnly)
        }
        fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), BlockError> {
            Err(BlockError::ReadOnly)
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), BlockError> {
            Err(BlockError::ReadOnly)
        }
        fn set_write_cache(&self, _: bool) {}
        fn write_cache(&self) -> bool {
            false
        }
        fn describe(&self) -> String {
            "ro".into()
        }
    }
    let blk = Blk::new(Arc::new(Ro(inner)), BlkConfig::default()).unwrap();
    let f = blk.features();
    assert_ne!(f & features::RO, 0);
    assert_eq!(f & (features::DISCARD | features::WRITE_ZEROES), 0);
    blk.set_features(f);
    let mut drv = Driver::new(&mem, RING, 16);
    let mut q = drv.queue(false);
    blk_header(&mem, HDR, req::OUT, 0);
    mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
    let head = drv.chain(&mem, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
    drv.publish(&mem, head);
    blk_header(&mem, HDR + 0x40, req::IN, 0);
    let head = drv.chain(
        &mem,
        &[r(HDR + 0x40, 16), w(DATA + 0x1000, 512), w(STATUS + 1, 1)],
    );
    drv.publish(&mem, head);
    process_queue(&blk, 0, &mem, &mut q, 64, &|| false).unwrap();
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        status::IOERR
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(),
        status::OK
    );
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, pattern(512, 5));
}

#[test]
fn indirect_descriptors() {
    let mut b = bed();
    let table = 0x40_000;
    let data = pattern(2048, 9);
    blk_header(&b.mem, HDR, req::OUT, 100);
    b.fill(DATA, &data);
    let head = b.drv.indirect_chain(
        &b.mem,
        table,
        &[
            r(HDR, 16),
            r(DATA, 1024),
            r(DATA + 1024, 1024),
            w(STATUS, 1),
        ],
    );
    b.drv.publish(&b.mem, head);
    assert_eq!(b.run().unwrap().completed, 1);
    assert_eq!(b.drv.take_used(&b.mem), [(u32::from(head), 1)]);
    assert_eq!(b.status(), status::OK);
    assert_eq!(b.read_sectors(100, 2048), (status::OK, data));
}

#[test]
fn wrong_direction_and_short_header_complete_with_ioerr() {
    let mut b = bed();
    assert_eq!(b.write_sectors(0, &[4; 512]), status::OK);
    // OUT whose data is device-writable: nothing is written
    blk_header(&b.mem, HDR, req::OUT, 0);
    assert_eq!(
        b.submit(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]).0,
        status::IOERR
    );
    // IN whose data is device-readable: nothing is read into it
    blk_header(&b.mem, HDR, req::IN, 0);
    b.fill(DATA, &[0xee; 512]);
    assert_eq!(
        b.submit(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]).0,
        status::IOERR
    );
    assert_eq!(b.read(DATA, 512), vec![0xee; 512]);
    // readable after writable
    assert_eq!(
        b.submit(&[w(DATA, 512), r(HDR, 16), w(STATUS, 1)]).0,
        status::IOERR
    );
    // a header of 8 bytes
    assert_eq!(b.submit(&[r(HDR, 8), w(STATUS, 1)]).0, status::IOERR);
    assert_eq!(b.read_sectors(0, 512), (status::OK, vec![4; 512]));
}

#[test]
fn data_outside_guest_memory_is_an_ioerr() {
    let mut b = bed();
    let outside = MEM_SIZE as u64 + 0x1000;
    blk_header(&b.mem, HDR, req::IN, 0);
    assert_eq!(
        b.submit(&[r(HDR, 16), w(outside, 512), w(STATUS, 1)]).0,
        status::IOERR
    );
    blk_header(&b.mem, HDR, req::OUT, 0);
    assert_eq!(
        b.submit(&[r(HDR, 16), r(MEM_SIZE as u64 - 256, 512), w(STATUS, 1)])
            .0,
        status::IOERR
    );
    // a header outside memory
    assert_eq!(b.submit(&[r(outside, 16), w(STATUS, 1)]).0, status::IOERR);
    // address + length wrapping the address space
    assert_eq!(
        b.submit(&[r(HDR, 16), w(u64::MAX - 100, 512), w(STATUS, 1)])
            .0,
        status::IOERR
    );
}

/// Publish a raw chain and expect the device to be broken by it.
fn expect_broken(b: &mut Bed, head: u16, why: &str) -> DeviceBroken {
    b.drv.publish(&b.mem, head);
    match b.run() {
        Err(e) => e,
        Ok(r) => panic!("{why}: not broken, {r:?}"),
    }
}

#[test]
fn looping_chain_breaks_the_device() {
    let mut b = bed();
    blk_header(&b.mem, HDR, req::IN, 0);
    b.drv.write_desc(&b.mem, 0, HDR, 16, F_NEXT, 1);
    b.drv.write_desc(&b.mem, 1, DATA, 512, F_NEXT | F_WRITE, 0);
    let e = expect_broken(&mut b, 0, "loop");
    assert!(e.0.contains("loops"), "{e}");
    assert_eq!(b.drv.used_idx(&b.mem), 0, "nothing completed");
}

#[test]
fn chain_errors_that_break_the_device() {
    // next index past the queue
    let mut b = bed();
    b.drv.write_desc(&b.mem, 0, HDR, 16, F_NEXT, 200);
    expect_broken(&mut b, 0, "next out of range");
    // head index past the queue
    let mut b = bed();
    expect_broken(&mut b, 16, "head out of range");
    // no writable byte at all
    let mut b = bed();
    blk_header(&b.mem, HDR, req::FLUSH, 0);
    b.drv.write_desc(&b.mem, 0, HDR, 16, 0, 0);
    let e = expect_broken(&mut b, 0, "no status");
    assert!(e.0.contains("status"), "{e}");
    // a status byte outside guest memory
    let mut b = bed();
    let head = b
        .drv
        .chain(&b.mem, &[r(HDR, 16), w(MEM_SIZE as u64 + 8, 1)]);
    expect_broken(&mut b, head, "status outside memory");
    // an indirect table that is itself indirect
    let mut b = bed();
    let table = 0x40_000;
    Driver::write_desc_at(&b.mem, table, 0, 0x41_000, 16, F_INDIRECT, 0);
    b.drv.write_desc(&b.mem, 0, table, 16, F_INDIRECT, 0);
    expect_broken(&mut b, 0, "nested indirect");
    // an indirect table outside memory
    let mut b = bed();
    b.drv.write_desc(&b.mem, 0, HDR, 16, F_NEXT, 1);
    b.drv
        .write_desc(&b.mem, 1, MEM_SIZE as u64, 32, F_INDIRECT, 0);
    expect_broken(&mut b, 0, "indirect table outside memory");
}

#[test]
fn an_avail_index_jumping_past_the_queue_breaks_the_device() {
    let mut b = bed();
    b.drv.set_avail_idx(&b.mem, 17);
    let e = b.run().unwrap_err();
    assert!(e.0.contains("queue 0"), "{e}");
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let mut b = bed_with(BlkConfig::default(), true);
    blk_header(&b.mem, HDR, req::FLUSH, 0);
    // the driver wants an interrupt only after the third completion
    b.drv.set_used_event(&b.mem, 2);
    let mut notified = Vec::new();
    for i in 0..4 {
        let head = b.drv.chain(&b.mem, &[r(HDR, 16), w(STATUS + i, 1)]);
        b.drv.publish(&b.mem, head);
        notified.push(b.run().unwrap().notify);
        // the device asks to be kicked for the next chain
        assert_eq!(b.drv.avail_event(&b.mem), i as u16 + 1);
    }
    assert_eq!(notified, [false, false, true, false]);
    // used flags are never set with EVENT_IDX
    assert_eq!(b.drv.used_flags(&b.mem), 0);
}

#[test]
fn no_interrupt_flag_is_honoured_without_event_idx() {
    let mut b = bed();
    blk_header(&b.mem, HDR, req::FLUSH, 0);
    let head = b.drv.chain(&b.mem, &[r(HDR, 16), w(STATUS, 1)]);
    b.drv.publish(&b.mem, head);
    assert!(b.run().unwrap().notify);
    b.drv.set_avail_flags(&b.mem, 1);
    let head = b.drv.chain(&b.mem, &[r(HDR, 16), w(STATUS, 1)]);
    b.drv.publish(&b.mem, head);
    let run = b.run().unwrap();
    assert_eq!((run.completed, run.notify), (1, false));
    // notifications are enabled again after the batch
    assert_eq!(b.drv.used_flags(&b.mem), 0);
}

#[test]
fn budget_leaves_the_rest_for_the_next_call() {
    let mut b = bed();
    blk_header(&b.mem, HDR, req::FLUSH, 0);
    for i in 0..5 {
        let head = b.drv.chain(&b.mem, &[r(HDR, 16), w(STATUS + i, 1)]);
        b.drv.publish(&b.mem, head);
    }
    let run = process_queue(&b.blk, 0, &b.mem, &mut b.q, 3, &|| false).unwrap();
    assert_eq!((run.completed, run.more), (3, true));
    let run = process_queue(&b.blk, 0, &b.mem, &mut b.q, 3, &|| false).unwrap();
    assert_eq!((run.completed, run.more), (2, false));
    let run = process_queue(&b.blk, 0, &b.mem, &mut b.q, 3, &|| false).unwrap();
    assert_eq!(run, QueueRun::default());
    assert_eq!(b.drv.take_used(&b.mem).len(), 5);
}

#[test]
fn a_queue_that_is_not_ready_is_left_alone() {
    let mut b = bed();
    b.q.set_ready(false);
    blk_header(&b.mem, HDR, req::FLUSH, 0);
    let head = b.drv.chain(&b.mem, &[r(HDR, 16), w(STATUS, 1)]);
    b.drv.publish(&b.mem, head);
    assert_eq!(b.run().unwrap(), QueueRun::default());
}

#[test]
fn file_backend_flush_makes_writes_visible_in_the_file() {
    use crate::block::{FileBackend, FileOptions};
    let dir = std::env::temp_dir().join(format!("vdevd-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(DISK).unwrap();
    let backend = Arc::new(FileBackend::open(&path, &FileOptions::default()).unwrap());
    let blk = Blk::new(backend, BlkConfig::default()).unwrap();
    blk.set_features(blk.features());
    let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut drv = Driver::new(&mem, RING, 16);
    let mut q = drv.queue(true);
    let data = pattern(4096, 11);
    blk_header(&mem, HDR, req::OUT, 8);
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let head = drv.chain(&mem, &[r(HDR, 16), r(DATA, 4096), w(STATUS, 1)]);
    drv.publish(&mem, head);
    blk_header(&mem, HDR + 0x40, req::FLUSH, 0);
    let head = drv.chain(&mem, &[r(HDR + 0x40, 16), w(STATUS + 1, 1)]);
    drv.publish(&mem, head);
    assert_eq!(
        process_queue(&blk, 0, &mem, &mut q, 64, &|| false)
            .unwrap()
            .completed,
        2
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(),
        status::OK
    );
    assert_eq!(blk.stats().flushes.load(Ordering::Relaxed), 1);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[8 * 512..8 * 512 + 4096], &data[..]);
    std::fs::remove_dir_all(&dir).unwrap();
}
