//! A raw image file (or block device) as a disk.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{BlockBackend, BlockError, IoBufs, ZEROES, ZEROES_LEN, check_range};

/// Most iovecs one system call takes (Linux UIO_MAXIOV).
const IOV_MAX: usize = 1024;
/// Size of the per-thread aligned buffer used when guest buffers do not meet
/// the `O_DIRECT` alignment.
const BOUNCE_LEN: usize = 1 << 20;

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct FileOptions {
    /// Bypass the host page cache (`O_DIRECT`).
    pub direct: bool,
    /// Open read-only; writes fail with [`BlockError::ReadOnly`].
    pub read_only: bool,
    /// Logical block size to expose (512 or 4096). Default: 512, or the
    /// `O_DIRECT` offset alignment of the file if that is larger.
    pub block_size: Option<u32>,
}

/// A raw image file or block device. See the module documentation of
/// [`crate::block`].
pub struct FileBackend {
    file: File,
    path: PathBuf,
    size: u64,
    block_size: u32,
    direct: bool,
    /// Memory alignment `O_DIRECT` needs for each buffer.
    mem_align: usize,
    /// File offset and length alignment `O_DIRECT` needs.
    offset_align: u64,
    read_only: bool,
    write_cache: AtomicBool,
    can_punch: AtomicBool,
    can_zero_range: AtomicBool,
}

impl std::fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBackend")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .field("direct", &self.direct)
            .finish()
    }
}

/// One page of the bounce buffer; a vector of these is page aligned.
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4096))]
struct BouncePage([u8; 4096]);

thread_local! {
    static BOUNCE: RefCell<Vec<BouncePage>> = const { RefCell::new(Vec::new()) };
}

/// The `O_DIRECT` alignment of an open file: (memory, offset), if the
/// kernel reports it.
fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid empty C string, AT_EMPTY_PATH makes the
    // call refer to the descriptor we own, and `stx` is a writable statx.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align.max(1), stx.stx_dio_offset_align))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl FileBackend {
    /// Open the image at `path`.
    pub fn open(path: &Path, opts: &FileOptions) -> io::Result<Self> {
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|e| {
                if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "{}: the file system does not support O_DIRECT",
                            path.display()
                        ),
                    )
                } else {
                    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                }
            })?;
        Self::from_file(file, path.to_path_buf(), opts)
    }

    /// Use an already open file. `opts.direct` must say whether it was
    /// opened with `O_DIRECT`.
    pub fn from_file(mut file: File, path: PathBuf, opts: &FileOptions) -> io::Result<Self> {
        let meta = file.metadata()?;
        let raw_size = if meta.file_type().is_block_device() {
            file.seek(SeekFrom::End(0))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(invalid(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        };
        let (mem_align, offset_align) = if opts.direct {
            dio_alignment(&file).unwrap_or((4096, 4096))
        } else {
            (1, 1)
        };
        let block_size = opts
            .block_size
            .unwrap_or_else(|| offset_align.clamp(512, 4096));
        if !(block_size == 512 || block_size == 4096) {
            return Err(invalid(format!(
                "block size {block_size} is not 512 or 4096"
            )));
        }
        if block_size < offset_align || offset_align > 4096 {
            return Err(invalid(format!(
                "{}: O_DIRECT needs {offset_align}-byte aligned I/O, more than the block size {block_size}",
                path.display()
            )));
        }
        if mem_align > 4096 {
            return Err(invalid(format!(
                "{}: O_DIRECT needs {mem_align}-byte aligned memory",
                path.display()
            )));
        }
        let size = raw_size / u64::from(block_size) * u64::from(block_size);
        if size == 0 {
            return Err(invalid(format!(
                "{} is smaller than one {block_size}-byte block",
                path.display()
            )));
        }
        if size != raw_size {
            log::warn!(
                "{}: size {raw_size} is not a multiple of {block_size}; the last {} bytes are not used",
                path.display(),
                raw_size - size
            );
        }
        Ok(FileBackend {
            file,
            path,
            size,
            block_size,
            direct: opts.direct,
            mem_align: mem_align as usize,
            offset_align: u64::from(offset_align),
            read_only: opts.read_only,
            write_cache: AtomicBool::new(true),
            can_punch: AtomicBool::new(true),
            can_zero_range: AtomicBool::new(true),
        })
    }

    /// Whether the file was opened with `O_DIRECT`.
    pub fn direct(&self) -> bool {
        self.direct
    }

    fn sync_flags(&self, fua: bool) -> libc::c_int {
        if fua || !self.write_cache.load(Ordering::Relaxed) {
            libc::RWF_DSYNC
        } else {
            0
        }
    }

    /// Whether `bufs` at `offset` can go to the kernel as is.
    fn dio_ok(&self, offset: u64, bufs: &IoBufs<'_>) -> bool {
        if !self.direct {
            return true;
        }
        if offset % self.offset_align != 0 {
            return false;
        }
        bufs.iovecs().iter().all(|v| {
            (v.iov_base as usize) % self.mem_align == 0
                && (v.iov_len as u64) % self.offset_align == 0
        })
    }

    /// preadv2/pwritev2 the whole list, resuming after short transfers.
    fn transfer(
        &self,
        write: bool,
        mut offset: u64,
        iov: &[libc::iovec],
        flags: libc::c_int,
    ) -> io::Result<()> {
        let mut owned: Vec<libc::iovec> = Vec::new();
        let mut use_owned = false;
        let mut pos = 0usize;
        loop {
            let list: &[libc::iovec] = if use_owned {
                owned.get(pos..).unwrap_or(&[])
            } else {
                iov.get(pos..).unwrap_or(&[])
            };
            if list.is_empty() {
                return Ok(());
            }
            let n = list.len().min(IOV_MAX);
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            let fd = self.file.as_raw_fd();
            let rc = if write {
                // SAFETY: `list[..n]` are valid iovecs, each pointing to
                // memory the caller's `IoBufs` keeps alive; the kernel only
                // reads it. `n` fits in c_int.
                unsafe { libc::pwritev2(fd, list.as_ptr(), n as i32, off, flags) }
            } else {
                // SAFETY: as above; the kernel writes the memory, which the
                // caller's `IoBufs` lends for writing.
                unsafe { libc::preadv2(fd, list.as_ptr(), n as i32, off, flags) }
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc == 0 {
                return Err(if write {
                    io::Error::from(io::ErrorKind::WriteZero)
                } else {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "image file shorter than the disk",
                    )
                });
            }
            let done = rc as usize;
            offset += done as u64;
            let mut left = done;
            let mut i = 0;
            while i < n && left >= list[i].iov_len {
                left -= list[i].iov_len;
                i += 1;
            }
            if left == 0 {
                pos += i;
                continue;
            }
            // A transfer that ended inside a buffer: continue from there.
            let mut rest = list[i..].to_vec();
            rest[0].iov_base = (rest[0].iov_base as usize + left) as *mut libc::c_void;
            rest[0].iov_len -= left;
            owned = rest;
            use_owned = true;
            pos = 0;
        }
    }

    fn pwrite_bytes(&self, offset: u64, data: &[u8], flags: libc::c_int) -> io::Result<()> {
        let iov = [libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }];
        // The kernel only reads from this buffer.
        self.transfer(true, offset, &iov, flags)
    }

    fn pread_bytes(&self, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let iov = [libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        }];
        self.transfer(false, offset, &iov, 0)
    }

    /// Run `f` with this thread's aligned bounce buffer.
    fn with_bounce<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
        BOUNCE.with(|b| {
            let mut pages = b.borrow_mut();
            if pages.is_empty() {
                pages.resize(BOUNCE_LEN / 4096, BouncePage([0; 4096]));
            }
            f(pages.as_mut_slice().as_mut_bytes())
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let l = libc::off_t::try_from(len)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        loop {
            // SAFETY: fallocate on a descriptor we own, with plain integers.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Try an fallocate mode the file may not support; `Ok(false)` (and the
    /// mode is not tried again) when it does not.
    fn try_fallocate(
        &self,
        supported: &AtomicBool,
        mode: libc::c_int,
        offset: u64,
        len: u64,
    ) -> Result<bool, BlockError> {
        if !supported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match self.fallocate(mode, offset, len) {
            Ok(()) => {
                if !self.write_cache.load(Ordering::Relaxed) {
                    self.file.sync_data().map_err(BlockError::from_io)?;
                }
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
                ) =>
            {
                supported.store(false, Ordering::Relaxed);
                log::info!(
                    "{}: fallocate mode {mode:#x} not supported ({e}); writing zeroes instead",
                    self.path.display()
                );
                Ok(false)
            }
            Err(e) => Err(BlockError::from_io(e)),
        }
    }

    fn write_zero_data(&self, mut offset: u64, len: u64) -> Result<(), BlockError> {
        let flags = self.sync_flags(false);
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZEROES_LEN as u64) as usize;
            self.pwrite_bytes(offset, &ZEROES.0[..n], flags)
                .map_err(BlockError::from_io)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.size, self.block_size)?;
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(())
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, bufs: &IoBufs<'_>) -> Result<(), BlockError> {
        check_range(offset, bufs.len() as u64, self.size, self.block_size)?;
        if self.dio_ok(offset, bufs) {
            return self
                .transfer(false, offset, bufs.iovecs(), 0)
                .map_err(BlockError::from_io);
        }
        Self::with_bounce(|bounce| {
            let mut done = 0usize;
            while done < bufs.len() {
                let n = (bufs.len() - done).min(bounce.len());
                self.pread_bytes(offset + done as u64, &mut bounce[..n])
                    .map_err(BlockError::from_io)?;
                bufs.copy_in(done, &bounce[..n]);
                done += n;
            }
            Ok(())
        })
    }

    fn write(&self, offset: u64, bufs: &IoBufs<'_>, fua: bool) -> Result<(), BlockError> {
        self.check_write(offset, bufs.len() as u64)?;
        let flags = self.sync_flags(fua);
        if self.dio_ok(offset, bufs) {
            return self
                .transfer(true, offset, bufs.iovecs(), flags)
                .map_err(BlockError::from_io);
        }
        Self::with_bounce(|bounce| {
            let mut done = 0usize;
            while done < bufs.len() {
                let n = (bufs.len() - done).min(bounce.len());
                bufs.copy_out(done, &mut bounce[..n]);
                self.pwrite_bytes(offset + done as u64, &bounce[..n], flags)
                    .map_err(BlockError::from_io)?;
                done += n;
            }
            Ok(())
        })
    }

    fn flush(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(BlockError::from_io)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if self.try_fallocate(&self.can_punch, punch, offset, len)? {
            return Ok(());
        }
        self.write_zeroes(offset, len, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if unmap {
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            if self.try_fallocate(&self.can_punch, punch, offset, len)? {
                return Ok(());
            }
        }
        let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if self.try_fallocate(&self.can_zero_range, zero, offset, len)? {
            return Ok(());
        }
        self.write_zero_data(offset, len)
    }

    fn set_write_cache(&self, enabled: bool) {
        let was = self.write_cache.swap(enabled, Ordering::Relaxed);
        if was && !enabled {
            // Writes that completed while the cache was on become durable
            // now, as a real drive flushes its cache when it is disabled.
            if let Err(e) = self.file.sync_data() {
                log::warn!(
                    "{}: flush on write cache disable failed: {e}",
                    self.path.display()
                );
            }
        }
    }

    fn write_cache(&self) -> bool {
        self.write_cache.load(Ordering::Relaxed)
    }

    fn describe(&self) -> String {
        format!(
            "file {} ({} bytes, {}-byte blocks{}{})",
            self.path.display(),
            self.size,
            self.block_size,
            if self.direct { ", O_DIRECT" } else { "" },
            if self.read_only { ", read-only" } else { "" }
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::block::IoVecStorage;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::AtomicU32;

    /// A file in the temporary directory, removed on drop.
    pub(crate) struct TempFile(pub(crate) PathBuf);

    impl TempFile {
        pub(crate) fn new(size: u64) -> TempFile {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "vdevd-block-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let f = File::create(&p).unwrap();
            f.set_len(size).unwrap();
            TempFile(p)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn buffered_roundtrip_vectored() {
        let t = TempFile::new(1 << 20);
        let b = FileBackend::open(&t.0, &FileOptions::default()).unwrap();
        assert_eq!(b.size(), 1 << 20);
        assert_eq!(b.block_size(), 512);
        let mut st = IoVecStorage::new();
        let mut data = pattern(3 * 4096, 1);
        let (x, rest) = data.split_at_mut(100);
        let (y, z) = rest.split_at_mut(5000);
        let mut bufs = st.bufs();
        bufs.push_bytes(x);
        bufs.push_bytes(y);
        bufs.push_bytes(z);
        b.write(8192, &bufs, false).unwrap();
        let mut on_disk = vec![0u8; 3 * 4096];
        File::open(&t.0)
            .unwrap()
            .read_exact_at_compat(&mut on_disk, 8192);
        assert_eq!(on_disk, pattern(3 * 4096, 1));
        let mut back = vec![0u8; 3 * 4096];
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut back);
        b.read(8192, &bufs).unwrap();
        assert_eq!(back, pattern(3 * 4096, 1));
    }

    trait ReadAt {
        fn read_exact_at_compat(&self, buf: &mut [u8], off: u64);
    }
    impl ReadAt for File {
        fn read_exact_at_compat(&self, buf: &mut [u8], off: u64) {
            std::os::unix::fs::FileExt::read_exact_at(self, buf, off).unwrap();
        }
    }

    #[test]
    fn direct_io_aligned_and_bounced() {
        let t = TempFile::new(1 << 20);
        let b = match FileBackend::open(
            &t.0,
            &FileOptions {
                direct: true,
                ..FileOptions::default()
            },
        ) {
            Ok(b) => b,
            Err(e) => panic!("O_DIRECT open on the test file system failed: {e}"),
        };
        assert!(b.direct());
        let mut st = IoVecStorage::new();
        // Aligned: a page-aligned buffer goes straight to the kernel.
        let mut pages = vec![BouncePage([0; 4096]); 2];
        pages
            .as_mut_slice()
            .as_mut_bytes()
            .copy_from_slice(&pattern(8192, 3));
        let mut bufs = st.bufs();
        bufs.push_bytes(pages.as_mut_slice().as_mut_bytes());
        assert!(b.dio_ok(0, &bufs));
        b.write(0, &bufs, false).unwrap();
        // Misaligned: an odd offset into a heap buffer is bounced.
        let mut raw = vec![0u8; 8192 + 3];
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut raw[3..]);
        assert!(!b.dio_ok(0, &bufs));
        b.read(0, &bufs).unwrap();
        assert_eq!(&raw[3..], &pattern(8192, 3)[..]);
        raw[3..].copy_from_slice(&pattern(8192, 9));
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut raw[3..]);
        b.write(4096, &bufs, true).unwrap();
        let mut check = vec![0u8; 8192];
        File::open(&t.0)
            .unwrap()
            .read_exact_at_compat(&mut check, 4096);
        assert_eq!(check, pattern(8192, 9));
    }

    #[test]
    fn discard_punches_a_hole_and_reads_zero() {
        let t = TempFile::new(1 << 20);
        let b = FileBackend::open(&t.0, &FileOptions::default()).unwrap();
        let mut st = IoVecStorage::new();
        let mut data = pattern(256 * 1024, 5);
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut data);
        b.write(0, &bufs, false).unwrap();
        b.flush().unwrap();
        let before = std::fs::metadata(&t.0).unwrap().blocks();
        b.discard(64 * 1024, 128 * 1024).unwrap();
        let after = std::fs::metadata(&t.0).unwrap().blocks();
        assert!(
            after + 128 * 1024 / 512 <= before,
            "no hole punched: {before} -> {after} blocks"
        );
        assert_eq!(std::fs::metadata(&t.0).unwrap().len(), 1 << 20);
        let mut back = vec![0xffu8; 256 * 1024];
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut back);
        b.read(0, &bufs).unwrap();
        let mut expect = pattern(256 * 1024, 5);
        expect[64 * 1024..192 * 1024].fill(0);
        assert_eq!(back, expect);
    }

    #[test]
    fn write_zeroes_with_and_without_unmap() {
        let t = TempFile::new(64 * 1024);
        let b = FileBackend::open(&t.0, &FileOptions::default()).unwrap();
        let mut st = IoVecStorage::new();
        let mut data = pattern(64 * 1024, 2);
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut data);
        b.write(0, &bufs, false).unwrap();
        b.write_zeroes(512, 1024, false).unwrap();
        b.write_zeroes(8192, 8192, true).unwrap();
        // The fallback path (no fallocate) writes zeroes by hand.
        b.can_zero_range.store(false, Ordering::Relaxed);
        b.write_zeroes(32768, 1536, false).unwrap();
        let mut back = vec![0xffu8; 64 * 1024];
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut back);
        b.read(0, &bufs).unwrap();
        let mut expect = pattern(64 * 1024, 2);
        expect[512..1536].fill(0);
        expect[8192..16384].fill(0);
        expect[32768..32768 + 1536].fill(0);
        assert_eq!(back, expect);
    }

    #[test]
    fn read_only_and_range_errors() {
        let t = TempFile::new(8192 + 100);
        let b = FileBackend::open(
            &t.0,
            &FileOptions {
                read_only: true,
                ..FileOptions::default()
            },
        )
        .unwrap();
        // The partial last block is not used.
        assert_eq!(b.size(), 8192);
        let mut st = IoVecStorage::new();
        let mut data = vec![0u8; 512];
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut data);
        assert!(matches!(
            b.write(0, &bufs, false),
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(b.discard(0, 512), Err(BlockError::ReadOnly)));
        assert!(matches!(
            b.read(8192, &bufs),
            Err(BlockError::OutOfRange { .. })
        ));
        b.read(8192 - 512, &bufs).unwrap();
        assert!(FileBackend::open(Path::new("/nonexistent/x"), &FileOptions::default()).is_err());
        let tiny = TempFile::new(100);
        assert!(FileBackend::open(&tiny.0, &FileOptions::default()).is_err());
    }

    #[test]
    fn write_through_when_cache_disabled() {
        let t = TempFile::new(8192);
        let b = FileBackend::open(&t.0, &FileOptions::default()).unwrap();
        assert!(b.write_cache());
        assert_eq!(b.sync_flags(false), 0);
        assert_eq!(b.sync_flags(true), libc::RWF_DSYNC);
        b.set_write_cache(false);
        assert_eq!(b.sync_flags(false), libc::RWF_DSYNC);
        let mut st = IoVecStorage::new();
        let mut data = vec![1u8; 512];
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut data);
        b.write(0, &bufs, false).unwrap();
    }

    #[test]
    fn transfer_resumes_inside_a_buffer() {
        // A short read at the end of a file that shrank under us.
        let t = TempFile::new(8192);
        let b = FileBackend::open(&t.0, &FileOptions::default()).unwrap();
        let f = OpenOptions::new().write(true).open(&t.0).unwrap();
        f.set_len(4096 + 100).unwrap();
        let mut st = IoVecStorage::new();
        let mut data = vec![0u8; 8192];
        let mut bufs = st.bufs();
        bufs.push_bytes(&mut data);
        match b.read(0, &bufs) {
            Err(BlockError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("expected EOF, got {other:?}"),
        }
    }
}
