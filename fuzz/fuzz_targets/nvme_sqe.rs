//! Feed one NVMe I/O submission entry, and the guest memory it points into,
//! to the controller's command path (`vdevd_devices::nvme::execute_io_command`):
//! opcode and namespace checks, LBA ranges, PRP1/PRP2, PRP lists chained
//! across pages, SGL descriptors (data block, bit bucket, segment, last
//! segment), Dataset Management ranges, against a sparse in-memory disk.
//! Whatever the input, the command must complete with a status, never panic
//! or hang.
//!
//! Input: byte 0 holds flags (bit 0: 4096-byte logical blocks, else 512;
//! bit 1: fold the data pointer into the mapped window; bit 2: namespace 1
//! and at most 16 blocks), bytes 1..65 the submission entry, the rest the
//! first bytes of guest memory at IOVA 0 (zeroes after it).

#![no_main]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use vdevd_devices::block::MemBackend;
use vdevd_devices::dma::{DmaSpace, MapRequest, Prot};
use vdevd_devices::nvme::execute_io_command;

/// Guest memory mapped at IOVA 0: 16 pages, enough for PRP lists and SGL
/// segments to chain; anything past it is unmapped.
const MEM: u64 = 64 * 1024;
/// The disk behind namespace 1.
const DISK: u64 = 1 << 20;

struct Fixture {
    mem: File,
    dma: DmaSpace,
    /// How much of `mem` the previous input dirtied.
    dirty: Mutex<usize>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // SAFETY: a valid NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"nvme-fuzz".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: a fresh descriptor nothing else owns.
        let mem = unsafe { File::from_raw_fd(fd) };
        mem.set_len(MEM).expect("memfd size");
        let dma = DmaSpace::default();
        dma.map(MapRequest {
            iova: 0,
            size: MEM,
            prot: Prot::RW,
            file: Some((mem.try_clone().expect("dup"), 0)),
        })
        .expect("map guest memory");
        Fixture {
            mem,
            dma,
            dirty: Mutex::new(0),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some(sqe) = rest.get(..64) else {
        return;
    };
    let mut sqe: [u8; 64] = sqe.try_into().expect("64 bytes");
    let image = &rest[64..];
    let image = &image[..image.len().min(MEM as usize)];

    if flags & 2 != 0 {
        for off in [24usize, 32] {
            let v = u64::from_le_bytes(sqe[off..off + 8].try_into().expect("8 bytes"));
            sqe[off..off + 8].copy_from_slice(&(v % (2 * MEM)).to_le_bytes());
        }
    }
    if flags & 4 != 0 {
        sqe[4..8].copy_from_slice(&1u32.to_le_bytes());
        let nlb = u16::from(sqe[48] & 0xf);
        sqe[48..50].copy_from_slice(&nlb.to_le_bytes());
    }

    let f = fixture();
    let mut dirty = f.dirty.lock().expect("not poisoned");
    f.mem.write_all_at(image, 0).expect("fill guest memory");
    if *dirty > image.len() {
        let zeroes = vec![0u8; *dirty - image.len()];
        f.mem
            .write_all_at(&zeroes, image.len() as u64)
            .expect("clear guest memory");
    }
    *dirty = image.len();

    let lbs = if flags & 1 != 0 { 4096 } else { 512 };
    let backend = MemBackend::new(DISK, lbs).expect("in-memory disk");
    let cqe = execute_io_command(&sqe, &f.dma, &backend);
    // The completion answers the command it was given.
    assert_eq!(cqe.cid, u16::from_le_bytes([sqe[2], sqe[3]]));
});
