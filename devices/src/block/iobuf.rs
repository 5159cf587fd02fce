//! Scatter-gather lists of memory buffers for block requests.

use std::marker::PhantomData;

use vm_memory::VolatileSlice;

/// Reusable storage for the `iovec` array of an [`IoBufs`], so that building
/// a request allocates nothing once the storage has grown to the largest
/// request seen.
#[derive(Default)]
pub struct IoVecStorage {
    iov: Vec<libc::iovec>,
}

// SAFETY: the stored iovecs are only dereferenced through an `IoBufs`, which
// borrows this storage mutably and the memory its entries point to for its
// whole lifetime; once that borrow ends the entries are stale integers that
// are cleared before the storage is used again. Moving the storage to
// another thread therefore moves no live reference.
unsafe impl Send for IoVecStorage {}

impl std::fmt::Debug for IoVecStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoVecStorage")
            .field("capacity", &self.iov.capacity())
            .finish()
    }
}

impl IoVecStorage {
    /// Empty storage.
    pub fn new() -> Self {
        IoVecStorage::default()
    }

    /// Start a new, empty buffer list in this storage.
    pub fn bufs<'a>(&'a mut self) -> IoBufs<'a> {
        self.iov.clear();
        IoBufs {
            iov: &mut self.iov,
            len: 0,
            _mem: PhantomData,
        }
    }
}

/// A list of memory buffers, each valid for `'a`, that a block request
/// reads into or writes from. Buffers are guest memory ([`VolatileSlice`]s
/// from a DMA view) or plain host memory (bounce buffers).
pub struct IoBufs<'a> {
    iov: &'a mut Vec<libc::iovec>,
    len: usize,
    // The list stands for borrows of memory others may change concurrently.
    _mem: PhantomData<&'a [std::cell::Cell<u8>]>,
}

impl std::fmt::Debug for IoBufs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBufs")
            .field("segments", &self.iov.len())
            .field("len", &self.len)
            .finish()
    }
}

impl<'a> IoBufs<'a> {
    fn push_raw(&mut self, base: *mut u8, len: usize) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.iov.last_mut() {
            if (last.iov_base as usize).checked_add(last.iov_len) == Some(base as usize) {
                last.iov_len += len;
                self.len += len;
                return;
            }
        }
        self.iov.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        });
        self.len += len;
    }

    /// Append a slice of guest memory (merged with the previous buffer when
    /// the two are adjacent).
    pub fn push_slice(&mut self, slice: VolatileSlice<'a>) {
        let base = slice.ptr_guard_mut().as_ptr();
        self.push_raw(base, slice.len());
    }

    /// Append host memory.
    pub fn push_bytes(&mut self, buf: &'a mut [u8]) {
        self.push_raw(buf.as_mut_ptr(), buf.len());
    }

    /// Empty the list (keeping its storage).
    pub fn clear(&mut self) {
        self.iov.clear();
        self.len = 0;
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the list holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of (merged) buffers.
    pub fn segments(&self) -> usize {
        self.iov.len()
    }

    /// The buffers as an `iovec` array for `preadv`/`pwritev`. Every entry
    /// points to memory that stays valid while `self` is borrowed.
    pub fn iovecs(&self) -> &[libc::iovec] {
        self.iov
    }

    /// The buffers as volatile slices.
    pub fn slices(&self) -> impl Iterator<Item = VolatileSlice<'_>> + '_ {
        self.iov.iter().map(|v| {
            // SAFETY: every entry was made from a `VolatileSlice<'a>` or a
            // `&'a mut [u8]` of exactly this base and length (or a merge of
            // adjacent ones), and `self` (which cannot outlive 'a) is
            // borrowed for the returned slice's lifetime. Guest memory is
            // only ever accessed with volatile copies.
            unsafe { VolatileSlice::new(v.iov_base.cast(), v.iov_len) }
        })
    }

    /// Copy `src` into the buffers, starting `at` bytes into the list.
    /// Returns the number of bytes copied (less than `src.len()` at the end
    /// of the list).
    pub fn copy_in(&self, at: usize, src: &[u8]) -> usize {
        let mut skip = at;
        let mut done = 0;
        for s in self.slices() {
            if done == src.len() {
                break;
            }
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            let n = (s.len() - skip).min(src.len() - done);
            if let Ok(dst) = s.subslice(skip, n) {
                dst.copy_from(&src[done..done + n]);
            }
            skip = 0;
            done += n;
        }
        done
    }

    /// Copy from the buffers, starting `at` bytes into the list, into `dst`.
    /// Returns the number of bytes copied.
    pub fn copy_out(&self, at: usize, dst: &mut [u8]) -> usize {
        let mut skip = at;
        let mut done = 0;
        for s in self.slices() {
            if done == dst.len() {
                break;
            }
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            let n = (s.len() - skip).min(dst.len() - done);
            if let Ok(src) = s.subslice(skip, n) {
                src.copy_to(&mut dst[done..done + n]);
            }
            skip = 0;
            done += n;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_buffers_merge_and_copies_cross_boundaries() {
        let mut backing = [0u8; 100];
        let mut st = IoVecStorage::new();
        {
            let (a, rest) = backing.split_at_mut(32);
            let (b, rest) = rest.split_at_mut(32);
            let (_gap, rest) = rest.split_at_mut(4);
            let (c, _) = rest.split_at_mut(16);
            let mut bufs = st.bufs();
            bufs.push_bytes(a);
            bufs.push_bytes(b);
            bufs.push_bytes(c);
            assert_eq!(bufs.segments(), 2);
            assert_eq!(bufs.len(), 80);
            let data: Vec<u8> = (0..80).collect();
            assert_eq!(bufs.copy_in(0, &data), 80);
            let mut back = [0u8; 20];
            assert_eq!(bufs.copy_out(60, &mut back), 20);
            assert_eq!(back.to_vec(), (60..80).collect::<Vec<u8>>());
            assert_eq!(bufs.copy_in(70, &[0xee; 20]), 10);
        }
        assert_eq!(backing[63], 63);
        assert_eq!(&backing[64..68], &[0, 0, 0, 0]);
        assert_eq!(backing[68], 64);
        assert_eq!(backing[73], 69);
        assert_eq!(backing[74], 0xee);
        assert_eq!(backing[83], 0xee);
        assert_eq!(backing[84], 0);
    }

    #[test]
    fn storage_is_reused() {
        let mut st = IoVecStorage::new();
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        {
            let mut bufs = st.bufs();
            bufs.push_bytes(&mut a);
            bufs.push_bytes(&mut []);
        }
        let bufs = st.bufs();
        assert!(bufs.is_empty());
        assert_eq!(bufs.segments(), 0);
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut b);
        assert_eq!(bufs.len(), 8);
    }
}
