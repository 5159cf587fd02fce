//! Recording of client traffic, for fuzzing seeds.
//!
//! When the environment variable `VDEVD_RECORD_DIR` names a directory, every
//! connection writes what its client sends there, in two forms:
//!
//! * `dispatch/<pid>-<device>-<connection>`: the whole conversation, one
//!   [`Record`] per message, the input format of the `dispatch` fuzz target;
//! * `protocol_decode/<pid>-<device>-<connection>-<n>`: each message on its
//!   own, the input of the `protocol_decode` fuzz target.
//!
//! A record is `kinds: u8, len: u32 (little endian), bytes[len]`. The low two
//! bits of `kinds` are the number of descriptors that came with the message
//! (at most 3 are described; more are recorded as 3), and each following pair
//! of bits, from bit 2 up, the [`FdKind`] of one of them. The fuzz target
//! recreates descriptors of the same kind in place of the client's.
//!
//! Files are created on the device thread: while the variable is set, its
//! seccomp filter also allows opening files.
//!
//! Recording is for development: it writes every byte the client sends,
//! guest data included, so it is off unless the variable is set, and a
//! failure to write only logs a warning.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The environment variable that turns recording on.
pub const RECORD_DIR_ENV: &str = "VDEVD_RECORD_DIR";

/// Whether traffic recording is on (`VDEVD_RECORD_DIR` is set).
pub fn enabled() -> bool {
    std::env::var_os(RECORD_DIR_ENV).is_some()
}

/// Most descriptors a record describes.
pub const MAX_RECORD_FDS: usize = 3;

/// What kind of descriptor came with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    /// An eventfd (interrupts, ioeventfds).
    EventFd = 0,
    /// A memory file sealed against shrinking (mapped directly).
    SealedMemory = 1,
    /// A memory file without seals (positioned I/O).
    UnsealedMemory = 2,
    /// Anything else.
    Other = 3,
}

impl FdKind {
    /// The kind from its two-bit code.
    pub fn from_bits(bits: u8) -> FdKind {
        match bits & 3 {
            0 => FdKind::EventFd,
            1 => FdKind::SealedMemory,
            2 => FdKind::UnsealedMemory,
            _ => FdKind::Other,
        }
    }

    /// The kind of an open descriptor.
    pub fn of(fd: &OwnedFd) -> FdKind {
        let raw = fd.as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{raw}")).unwrap_or_default();
        if link.as_os_str() == "anon_inode:[eventfd]" {
            return FdKind::EventFd;
        }
        // SAFETY: F_GET_SEALS only queries the open file; no pointers.
        let seals = unsafe { libc::fcntl(raw, libc::F_GET_SEALS) };
        if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
            return FdKind::SealedMemory;
        }
        // SAFETY: fstat fills the zeroed struct we pass; it outlives the call.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes only into `st`, valid for the call.
        if unsafe { libc::fstat(raw, &mut st) } == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG {
            return FdKind::UnsealedMemory;
        }
        FdKind::Other
    }
}

/// One recorded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Kinds of the descriptors that came with it (at most three).
    pub fds: Vec<FdKind>,
    /// The message, header included.
    pub bytes: &'a [u8],
}

impl<'a> Record<'a> {
    /// Append the record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let n = self.fds.len().min(MAX_RECORD_FDS);
        let mut kinds = n as u8;
        for (i, k) in self.fds.iter().take(n).enumerate() {
            kinds |= (*k as u8) << (2 + 2 * i);
        }
        out.push(kinds);
        let len = u32::try_from(self.bytes.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(self.bytes.get(..len as usize).unwrap_or(self.bytes));
    }

    /// Split `data` into records. A record whose length runs past the end
    /// takes what is left; a trailing partial length field is ignored.
    pub fn decode_all(mut data: &'a [u8]) -> Vec<Record<'a>> {
        let mut out = Vec::new();
        while let Some((&kinds, rest)) = data.split_first() {
            let Some(len) = rest.get(..4) else {
                break;
            };
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let rest = rest.get(4..).unwrap_or_default();
            let take = len.min(rest.len());
            let (bytes, tail) = rest.split_at(take);
            let n = usize::from(kinds & 3);
            let fds = (0..n)
                .map(|i| FdKind::from_bits(kinds >> (2 + 2 * i)))
                .collect();
            out.push(Record { fds, bytes });
            data = tail;
        }
        out
    }
}

/// Writes one connection's messages into the recording directory.
#[derive(Debug)]
pub struct Recorder {
    conversation: File,
    single_dir: PathBuf,
    stem: String,
    count: u64,
}

impl Recorder {
    /// A recorder for connection `connection` of `device`, if recording is
    /// on (see the module documentation).
    pub fn from_env(device: &str, connection: u64) -> Option<Recorder> {
        let dir = std::env::var_os(RECORD_DIR_ENV)?;
        match Recorder::new(Path::new(&dir), device, connection) {
            Ok(r) => Some(r),
            Err(e) => {
                log::warn!("cannot record traffic to {}: {e}", dir.to_string_lossy());
                None
            }
        }
    }

    /// A recorder writing under `dir`.
    pub fn new(dir: &Path, device: &str, connection: u64) -> std::io::Result<Recorder> {
        let conv_dir = dir.join("dispatch");
        let single_dir = dir.join("protocol_decode");
        std::fs::create_dir_all(&conv_dir)?;
        std::fs::create_dir_all(&single_dir)?;
        let stem = format!("{}-{device}-{connection}", std::process::id());
        let conversation = File::create(conv_dir.join(&stem))?;
        Ok(Recorder {
            conversation,
            single_dir,
            stem,
            count: 0,
        })
    }

    /// Record one message and the descriptors that came with it.
    pub fn record(&mut self, bytes: &[u8], fds: &[OwnedFd]) {
        let record = Record {
            fds: fds.iter().take(MAX_RECORD_FDS).map(FdKind::of).collect(),
            bytes,
        };
        let mut buf = Vec::with_capacity(bytes.len() + 5);
        record.encode(&mut buf);
        self.count += 1;
        let single = self
            .single_dir
            .join(format!("{}-{}", self.stem, self.count));
        let r = self
            .conversation
            .write_all(&buf)
            .and_then(|()| std::fs::write(single, bytes));
        if let Err(e) = r {
            log::warn!("recording traffic: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[test]
    fn records_round_trip() {
        let a = Record {
            fds: vec![FdKind::SealedMemory, FdKind::EventFd, FdKind::Other],
            bytes: &[1, 2, 3],
        };
        let b = Record {
            fds: vec![],
            bytes: &[],
        };
        let c = Record {
            fds: vec![FdKind::UnsealedMemory],
            bytes: &[9; 300],
        };
        let mut buf = Vec::new();
        for r in [&a, &b, &c] {
            r.encode(&mut buf);
        }
        assert_eq!(buf.len(), 3 * 5 + 3 + 300);
        assert_eq!(Record::decode_all(&buf), vec![a, b, c]);
    }

    #[test]
    fn truncated_records_take_what_is_left() {
        // length 10, only 2 bytes follow
        let buf = [0x01, 10, 0, 0, 0, 7, 8];
        let r = Record::decode_all(&buf);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].bytes, &[7, 8]);
        assert_eq!(r[0].fds, vec![FdKind::EventFd]);
        // a partial length field is ignored
        assert!(Record::decode_all(&[0, 1, 2]).is_empty());
        assert!(Record::decode_all(&[]).is_empty());
    }

    #[test]
    fn descriptor_kinds_are_recognised() {
        let ev = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        // SAFETY: dup takes no pointers.
        let dup = unsafe { libc::dup(ev.as_raw_fd()) };
        assert!(dup >= 0);
        // SAFETY: dup returned a new descriptor that we own.
        let ev = unsafe { OwnedFd::from_raw_fd(dup) };
        assert_eq!(FdKind::of(&ev), FdKind::EventFd);
        let (plain, _) = crate::testutil::memfd("rec");
        assert_eq!(FdKind::of(&plain), FdKind::UnsealedMemory);
        // SAFETY: F_ADD_SEALS on a descriptor we own.
        let r = unsafe { libc::fcntl(plain.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        if r == 0 {
            assert_eq!(FdKind::of(&plain), FdKind::SealedMemory);
        }
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(FdKind::of(&OwnedFd::from(a)), FdKind::Other);
    }

    #[test]
    fn a_recorder_writes_both_corpora() {
        let dir = crate::testutil::TempDir::new("record");
        let mut r = Recorder::new(dir.path(), "dev", 1).unwrap();
        r.record(&[1; 16], &[]);
        r.record(&[2; 20], &[]);
        drop(r);
        let stem = format!("{}-dev-1", std::process::id());
        let conv = std::fs::read(dir.path().join("dispatch").join(&stem)).unwrap();
        let recs = Record::decode_all(&conv);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].bytes, &[2; 20]);
        let one =
            std::fs::read(dir.path().join("protocol_decode").join(format!("{stem}-2"))).unwrap();
        assert_eq!(one, vec![2; 20]);
    }
}
