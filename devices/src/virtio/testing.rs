//! A fake virtio driver for tests: builds descriptor chains, publishes
//! them in the avail ring and reads the used ring, in any guest memory.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Descriptor flag: another descriptor follows.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// One buffer of a chain: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// Device-readable buffer.
pub fn r(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

/// Device-writable buffer.
pub fn w(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

/// The driver side of one split virtqueue.
pub struct Driver {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    /// A queue of `size` entries with its rings in the page-aligned area at
    /// `base` (needs `size * 16 + 2 pages + size * 8` bytes or so).
    pub fn new<M: GuestMemory>(mem: &M, base: u64, size: u16) -> Driver {
        let n = u64::from(size);
        let desc = base;
        let avail = (desc + 16 * n).next_multiple_of(4096);
        let used = (avail + 6 + 2 * n).next_multiple_of(4096);
        let d = Driver {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        for off in 0..(used + 6 + 8 * n - base) {
            mem.write_obj(0u8, GuestAddress(base + off)).unwrap();
        }
        d
    }

    /// A device-side queue configured like this one, ready.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        self.configure(&mut q);
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// Set size and ring addresses of `q`.
    pub fn configure(&self, q: &mut Queue) {
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
    }

    /// Write descriptor `i` of the table at `table`.
    pub fn write_desc_at<M: GuestMemory>(
        mem: &M,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = table + 16 * u64::from(i);
        mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
    }

    /// Write descriptor `i` of the queue's table.
    pub fn write_desc<M: GuestMemory>(
        &self,
        mem: &M,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        Self::write_desc_at(mem, self.desc, i, addr, len, flags, next);
    }

    fn alloc(&mut self, n: u16) -> u16 {
        if u32::from(self.next_desc) + u32::from(n) > u32::from(self.size) {
            self.next_desc = 0;
        }
        let first = self.next_desc;
        self.next_desc += n;
        first
    }

    /// Put `bufs` in consecutive descriptors; returns the head.
    pub fn chain<M: GuestMemory>(&mut self, mem: &M, bufs: &[Buf]) -> u16 {
        let n = bufs.len() as u16;
        let first = self.alloc(n);
        for (i, b) in bufs.iter().enumerate() {
            let i = first + i as u16;
            let mut flags = if b.write { F_WRITE } else { 0 };
            if i + 1 < first + n {
                flags |= F_NEXT;
            }
            self.write_desc(mem, i, b.addr, b.len, flags, i + 1);
        }
        first
    }

    /// Put `bufs` in an indirect table at `table`, referenced by one
    /// descriptor of the queue; returns the head.
    pub fn indirect_chain<M: GuestMemory>(&mut self, mem: &M, table: u64, bufs: &[Buf]) -> u16 {
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            Self::write_desc_at(mem, table, i as u16, b.addr, b.len, flags, i as u16 + 1);
        }
        let head = self.alloc(1);
        self.write_desc(mem, head, table, 16 * bufs.len() as u32, F_INDIRECT, 0);
        head
    }

    /// Make `head` available (and bump the avail index).
    pub fn publish<M: GuestMemory>(&mut self, mem: &M, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Write the avail index (tests of bogus indexes use it directly).
    pub fn set_avail_idx<M: GuestMemory>(&self, mem: &M, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Set the avail ring flags (VRING_AVAIL_F_NO_INTERRUPT = 1).
    pub fn set_avail_flags<M: GuestMemory>(&self, mem: &M, flags: u16) {
        mem.write_obj(flags.to_le(), GuestAddress(self.avail))
            .unwrap();
    }

    /// Set `used_event` (EVENT_IDX): interrupt when the used index passes it.
    pub fn set_used_event<M: GuestMemory>(&self, mem: &M, v: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(v.to_le(), GuestAddress(at)).unwrap();
    }

    /// The device's `avail_event` (EVENT_IDX).
    pub fn avail_event<M: GuestMemory>(&self, mem: &M) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        u16::from_le(mem.read_obj(GuestAddress(at)).unwrap())
    }

    /// The used ring flags (VRING_USED_F_NO_NOTIFY = 1).
    pub fn used_flags<M: GuestMemory>(&self, mem: &M) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used)).unwrap())
    }

    /// The used index.
    pub fn used_idx<M: GuestMemory>(&self, mem: &M) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// Used entries published since the last call: (id, len). Like a
    /// driver using EVENT_IDX, asks for an interrupt at the next completion.
    pub fn take_used<M: GuestMemory>(&mut self, mem: &M) -> Vec<(u32, u32)> {
        let idx = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let at = self.used + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((u32::from_le(id), u32::from_le(len)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        self.set_used_event(mem, self.used_seen);
        out
    }
}

/// Write a virtio-blk request header at `at`.
pub fn blk_header<M: GuestMemory>(mem: &M, at: u64, kind: u32, sector: u64) {
    mem.write_obj(kind.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
}
