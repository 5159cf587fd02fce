//! Helpers shared by the unit tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory removed (with its contents) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory under the system's temporary directory.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vdevd-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A memfd with a name unique in this process, and that name.
pub fn memfd(tag: &str) -> (std::os::fd::OwnedFd, String) {
    use std::os::fd::FromRawFd;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!("vdevd-test-{tag}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let c = std::ffi::CString::new(name.clone()).unwrap();
    // SAFETY: c is a valid NUL-terminated string.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: memfd_create returned a new descriptor owned by nobody else.
    (unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }, name)
}

/// Number of descriptors of this process open on the memfd called `name`.
pub fn open_fds_named(name: &str) -> usize {
    let want = format!("/memfd:{name} (deleted)");
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|l| l.as_os_str() == want.as_str())
                .unwrap_or(false)
        })
        .count()
}
