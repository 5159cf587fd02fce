//! A fuzz-friendly entry point: the virtio-blk model and the shared queue
//! loop run against guest memory made of arbitrary bytes.
//!
//! The input is the first [`FUZZ_MEMORY`] bytes of a guest's memory (the
//! rest reads as zero), with one split virtqueue of [`FUZZ_QUEUE_SIZE`]
//! entries whose rings sit at fixed addresses inside it: descriptors at
//! [`FUZZ_DESC`], the available ring at [`FUZZ_AVAIL`], the used ring at
//! [`FUZZ_USED`]. So the input chooses the descriptors (addresses, lengths,
//! flags, `next`, indirect tables, loops), the available ring (index and
//! heads) and every request header and payload the chains point to. The
//! first byte also chooses which of EVENT_IDX (bit 0) and INDIRECT_DESC
//! (bit 1) the driver negotiated.
//!
//! The contract under test: whatever the bytes, [`fuzz_queue`] returns,
//! either with chains completed (each with a status) or with the device
//! marked broken, and never panics, hangs or touches memory outside the
//! guest's.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::blk::{Blk, BlkConfig};
use super::{DeviceBroken, QueueRun, VirtioDevice, features, process_queue};
use crate::block::{BlockBackend, MemBackend};

/// Bytes of guest memory (at guest address 0).
pub const FUZZ_MEMORY: usize = 64 * 1024;
/// Entries of the fuzzed queue.
pub const FUZZ_QUEUE_SIZE: u16 = 16;
/// Guest address of the descriptor table.
pub const FUZZ_DESC: u64 = 0;
/// Guest address of the available ring.
pub const FUZZ_AVAIL: u64 = 0x100;
/// Guest address of the used ring.
pub const FUZZ_USED: u64 = 0x200;
/// Size of the disk behind the device (a sparse memory disk).
pub const FUZZ_DISK: u64 = 1 << 20;
/// Chains one call processes at most (the ring may be "refilled" by a
/// wrapping avail index; the budget bounds the work).
const FUZZ_BUDGET: usize = 64;

/// What one fuzz input did: the queue run (or why the device broke) and
/// guest memory afterwards (statuses, data read, the used ring).
#[derive(Debug)]
pub struct FuzzOutcome {
    /// The result of the queue loop.
    pub run: Result<QueueRun, DeviceBroken>,
    /// Guest memory after the run.
    pub memory: Vec<u8>,
}

/// Run the virtio-blk model over one queue described by `data` (see the
/// module documentation). Never panics for any input.
pub fn fuzz_queue(data: &[u8]) -> FuzzOutcome {
    let flags = data.first().copied().unwrap_or(0);
    let mem = match GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), FUZZ_MEMORY)]) {
        Ok(m) => m,
        Err(e) => {
            return FuzzOutcome {
                run: Err(DeviceBroken(format!("fuzz: guest memory: {e}"))),
                memory: Vec::new(),
            };
        }
    };
    let input = data.get(..FUZZ_MEMORY).unwrap_or(data);
    // Cannot fail: the region is FUZZ_MEMORY bytes at 0 and the input fits.
    let _ = mem.write_slice(input, GuestAddress(0));

    let run = run_queue(&mem, flags);
    let mut memory = vec![0u8; FUZZ_MEMORY];
    let _ = mem.read_slice(&mut memory, GuestAddress(0));
    FuzzOutcome { run, memory }
}

fn run_queue(mem: &GuestMemoryMmap<()>, flags: u8) -> Result<QueueRun, DeviceBroken> {
    let fail = |what: &str, e: &dyn std::fmt::Display| DeviceBroken(format!("fuzz: {what}: {e}"));
    let backend: Arc<dyn BlockBackend> =
        Arc::new(MemBackend::new(FUZZ_DISK, 512).map_err(|e| fail("memory disk", &e))?);
    let blk = Blk::new(
        backend,
        BlkConfig {
            num_queues: 1,
            queue_size: FUZZ_QUEUE_SIZE,
            ..BlkConfig::default()
        },
    )
    .map_err(|e| fail("device", &e))?;
    let mut acked = blk.features();
    if flags & 1 == 0 {
        acked &= !features::RING_EVENT_IDX;
    }
    if flags & 2 == 0 {
        acked &= !features::RING_INDIRECT_DESC;
    }
    blk.set_features(acked);

    let mut queue = Queue::new(FUZZ_QUEUE_SIZE).map_err(|e| fail("queue", &e))?;
    queue.set_size(FUZZ_QUEUE_SIZE);
    queue.set_desc_table_address(Some(FUZZ_DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(FUZZ_AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(FUZZ_USED as u32), Some(0));
    queue.set_event_idx(acked & features::RING_EVENT_IDX != 0);
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return Err(DeviceBroken("fuzz: queue layout rejected".into()));
    }
    process_queue(&blk, 0, mem, &mut queue, FUZZ_BUDGET, &|| false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor at index `i` of the table in `m`.
    fn desc(m: &mut [u8], i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let at = FUZZ_DESC as usize + 16 * i;
        m[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        m[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        m[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        m[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    }
    fn publish(m: &mut [u8], heads: &[u16]) {
        let a = FUZZ_AVAIL as usize;
        m[a + 2..a + 4].copy_from_slice(&(heads.len() as u16).to_le_bytes());
        for (i, h) in heads.iter().enumerate() {
            m[a + 4 + 2 * i..a + 6 + 2 * i].copy_from_slice(&h.to_le_bytes());
        }
    }
    fn header(m: &mut [u8], at: usize, kind: u32, sector: u64) {
        m[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        m[at + 8..at + 16].copy_from_slice(&sector.to_le_bytes());
    }

    #[test]
    fn empty_input_completes_nothing() {
        let out = fuzz_queue(&[]);
        assert_eq!(out.run.unwrap().completed, 0);
        assert_eq!(out.memory.len(), FUZZ_MEMORY);
    }

    #[test]
    fn a_well_formed_write_then_read_round_trips() {
        let mut m = vec![0u8; 0x4000];
        m[0] = 0; // no EVENT_IDX, no indirect (descriptor 0's addr low byte: 0 anyway)
        // Chain 0 (OUT): header, 512 data bytes, status. Chain 1 (IN) the same sector.
        desc(&mut m, 0, 0x1000, 16, 1, 1);
        desc(&mut m, 1, 0x1100, 512, 1, 2);
        desc(&mut m, 2, 0x1400, 1, 2, 0);
        desc(&mut m, 3, 0x2000, 16, 1, 4);
        desc(&mut m, 4, 0x2100, 512, 3, 5);
        desc(&mut m, 5, 0x2400, 1, 2, 0);
        header(&mut m, 0x1000, 1, 7);
        header(&mut m, 0x2000, 0, 7);
        for (i, b) in m[0x1100..0x1300].iter_mut().enumerate() {
            *b = i as u8 ^ 0x5a;
        }
        m[0x1400] = 0xff;
        m[0x2400] = 0xff;
        publish(&mut m, &[0, 3]);
        let out = fuzz_queue(&m);
        assert_eq!(out.run.unwrap().completed, 2);
        assert_eq!(out.memory[0x1400], 0, "OUT status");
        assert_eq!(out.memory[0x2400], 0, "IN status");
        assert_eq!(out.memory[0x2100..0x2300], m[0x1100..0x1300]);
        // used ring: idx 2, ids 0 and 3, IN wrote 513 bytes
        let u = FUZZ_USED as usize;
        assert_eq!(&out.memory[u + 2..u + 4], &2u16.to_le_bytes());
        assert_eq!(&out.memory[u + 12..u + 16], &3u32.to_le_bytes());
        assert_eq!(&out.memory[u + 16..u + 20], &513u32.to_le_bytes());
    }

    #[test]
    fn a_descriptor_loop_or_wild_address_never_panics() {
        // Descriptor 0 chains to itself forever.
        let mut m = vec![0u8; 0x1000];
        desc(&mut m, 0, 0x800, 16, 1, 0);
        publish(&mut m, &[0]);
        let _ = fuzz_queue(&m).run;
        // A header far outside guest memory, with a status inside it.
        let mut m = vec![0u8; 0x1000];
        desc(&mut m, 0, u64::MAX - 8, 16, 1, 1);
        desc(&mut m, 1, 0x800, 1, 2, 0);
        m[0x800] = 0xff;
        publish(&mut m, &[0]);
        let out = fuzz_queue(&m);
        if let Ok(run) = out.run {
            assert_eq!(run.completed, 1);
            assert_ne!(
                out.memory[0x800], 0,
                "a header outside memory cannot succeed"
            );
        }
        // Head index past the queue size, avail idx far ahead.
        let mut m = vec![0xffu8; 0x400];
        m[0] = 3;
        let _ = fuzz_queue(&m).run;
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep (the fuzz target goes much further).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in [0usize, 1, 17, 300, 0x400, 0x3000] {
            for _ in 0..20 {
                let data: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x & 0xff) as u8
                    })
                    .collect();
                let _ = fuzz_queue(&data);
            }
        }
    }
}
