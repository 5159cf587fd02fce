//! DMA through the client: VFIO_USER_DMA_READ / DMA_WRITE requests that the
//! server sends for memory the client mapped without a file descriptor.
//!
//! [`Messenger`] implements [`DmaMessenger`] for the device's worker
//! threads. A worker's `read`/`write` is split into chunks of at most the
//! client's `max_data_xfer_size`; each chunk becomes a [`DmaRequest`] with a
//! message id from the server's own id space, queued here, and the device
//! thread is woken through an eventfd. The device thread sends the
//! requests, keeps serving the client, and hands each reply to
//! [`Messenger::complete`], which wakes the waiting worker. A worker waits
//! at most the configured timeout (5 s, like QEMU's own reply timeout);
//! every waiter fails at once when the client goes away
//! ([`Messenger::disconnect`]).
//!
//! The device thread never waits for a reply itself: that is the rule that
//! keeps a client that processes our requests in the same loop as its vCPUs
//! (QEMU) from deadlocking (see docs/ARCHITECTURE.md).
//!
//! Before a range is unmapped, the device thread raises a [`Fence`] over
//! it: requests in the range that are queued or waiting fail at once and
//! new ones are refused until the fence drops, so a worker blocked on a
//! reply cannot hold the range (and with it the DMA_UNMAP reply) hostage.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vdevd_devices::dma::{DmaError, DmaMessenger};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Chunks of one `read`/`write` in flight at once.
const WINDOW: usize = 4;

/// Abandoned request ids are kept this many timeouts long (so that a late
/// reply is recognised), then recycled.
const ABANDONED_LIFETIME_FACTOR: u32 = 4;

/// What a server-to-client request does.
#[derive(Debug, PartialEq, Eq)]
pub enum DmaOp {
    /// DMA_READ of `len` bytes.
    Read {
        /// Bytes to read.
        len: usize,
    },
    /// DMA_WRITE of `data`.
    Write {
        /// Bytes to write.
        data: Vec<u8>,
    },
}

/// A request for the device thread to send.
#[derive(Debug, PartialEq, Eq)]
pub struct DmaRequest {
    /// Message id (the server's id space).
    pub id: u16,
    /// Client address.
    pub iova: u64,
    /// Read or write.
    pub op: DmaOp,
}

/// The client's answer to a request, as the device thread parsed it.
#[derive(Debug)]
pub enum DmaReply<'a> {
    /// Successful DMA_READ reply.
    Read {
        /// Address in the reply.
        iova: u64,
        /// Data in the reply.
        data: &'a [u8],
    },
    /// Successful DMA_WRITE reply, with the address and count it echoes
    /// (older clients echo nothing).
    Write(Option<(u64, u64)>),
    /// Error reply with this errno.
    Error(u32),
}

/// Why a reply could not be matched to a request.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplyMismatch {
    /// No request with this id is outstanding.
    UnknownId,
    /// The reply is for the other command (a DMA_WRITE reply to a
    /// DMA_READ, or the reverse).
    WrongCommand,
}

type Outcome = Result<Vec<u8>, DmaError>;

#[derive(Debug)]
struct Pending {
    iova: u64,
    len: u64,
    write: bool,
    submitted: Instant,
    /// None once the waiter gave up or the request was cancelled: a reply
    /// is still expected and accepted quietly.
    waiter: Option<SyncSender<Outcome>>,
}

#[derive(Debug, Default)]
struct State {
    connected: bool,
    max_chunk: usize,
    next_id: u16,
    queue: VecDeque<DmaRequest>,
    pending: HashMap<u16, Pending>,
    fences: Vec<(u64, u64)>,
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    let a_end = a.saturating_add(alen);
    let b_end = b.saturating_add(blen);
    a < b_end && b < a_end
}

impl State {
    fn fenced(&self, iova: u64, len: u64) -> bool {
        self.fences
            .iter()
            .any(|(f, flen)| overlaps(iova, len, *f, *flen))
    }

    fn alloc_id(&mut self, timeout: Duration) -> Option<u16> {
        if self.pending.len() > 1024 {
            let limit = timeout * ABANDONED_LIFETIME_FACTOR;
            self.pending
                .retain(|_, p| p.waiter.is_some() || p.submitted.elapsed() < limit);
        }
        for _ in 0..=u16::MAX as u32 {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if !self.pending.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }
}

/// The session's [`DmaMessenger`]. See the module documentation.
#[derive(Debug)]
pub struct Messenger {
    state: Mutex<State>,
    wake: EventFd,
    timeout: Duration,
}

impl Messenger {
    /// A messenger whose waiters give up after `timeout`.
    pub fn new(timeout: Duration) -> io::Result<Messenger> {
        Ok(Messenger {
            state: Mutex::new(State::default()),
            wake: EventFd::new(EFD_NONBLOCK)?,
            timeout,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic in a holder (every
        // update is a single insert/remove), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The eventfd the device thread polls: readable when requests wait.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// A client completed VERSION: accept requests, in chunks of at most
    /// `max_chunk` bytes.
    pub fn connect(&self, max_chunk: usize) {
        let mut s = self.lock();
        s.connected = true;
        s.max_chunk = max_chunk.max(1);
    }

    /// The client is gone: every waiter fails now, new requests fail at
    /// once until the next [`Messenger::connect`].
    pub fn disconnect(&self) {
        let (queue, pending) = {
            let mut s = self.lock();
            s.connected = false;
            s.fences.clear();
            (std::mem::take(&mut s.queue), std::mem::take(&mut s.pending))
        };
        // Dropping the senders (outside the lock) wakes every waiter with
        // a disconnection error.
        drop(queue);
        drop(pending);
        let _ = self.wake.read();
    }

    /// Clear the wake eventfd. The device thread calls this when the
    /// eventfd fired, before it takes the requests: a request queued after
    /// that sets it again, so none is missed, and the thread's other calls
    /// to [`Messenger::take_requests`] (after each batch of client
    /// messages) cost no system call.
    pub fn clear_wake(&self) {
        let _ = self.wake.read();
    }

    /// Requests waiting to be sent, at most `max` of them (the device
    /// thread takes fewer when its output queue is full, and comes back for
    /// the rest when it drains).
    pub fn take_requests(&self, max: usize) -> Vec<DmaRequest> {
        let mut s = self.lock();
        let n = max.min(s.queue.len());
        s.queue.drain(..n).collect()
    }

    /// Requests waiting to be sent.
    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Number of requests sent or queued and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.lock().pending.len()
    }

    /// Hand the reply to request `id` to its waiter. A reply that matches
    /// no outstanding request is an error of the client (the caller logs
    /// it); a reply to a request whose waiter gave up is accepted quietly.
    pub fn complete(&self, id: u16, reply: DmaReply<'_>) -> Result<(), ReplyMismatch> {
        let pending = {
            let mut s = self.lock();
            let is_write = match s.pending.get(&id) {
                None => return Err(ReplyMismatch::UnknownId),
                Some(p) => p.write,
            };
            let matches_kind = match reply {
                DmaReply::Read { .. } => !is_write,
                DmaReply::Write(_) => is_write,
                DmaReply::Error(_) => true,
            };
            if !matches_kind {
                return Err(ReplyMismatch::WrongCommand);
            }
            match s.pending.remove(&id) {
                Some(p) => p,
                None => return Err(ReplyMismatch::UnknownId),
            }
        };
        let Some(waiter) = pending.waiter else {
            log::debug!("late reply to DMA request {id} dropped (its waiter gave up)");
            return Ok(());
        };
        let outcome = match reply {
            DmaReply::Error(errno) => Err(DmaError::Message(format!(
                "client answered DMA {} at {:#x} with error {}",
                if pending.write { "write" } else { "read" },
                pending.iova,
                io::Error::from_raw_os_error(errno as i32)
            ))),
            DmaReply::Read { iova, data } => {
                if iova != pending.iova || data.len() as u64 != pending.len {
                    Err(DmaError::Message(format!(
                        "DMA_READ reply for {iova:#x}+{:#x} does not match the request {:#x}+{:#x}",
                        data.len(),
                        pending.iova,
                        pending.len
                    )))
                } else {
                    Ok(data.to_vec())
                }
            }
            DmaReply::Write(None) => Ok(Vec::new()),
            DmaReply::Write(Some((iova, count))) => {
                if iova != pending.iova || count != pending.len {
                    Err(DmaError::Message(format!(
                        "DMA_WRITE reply for {iova:#x}+{count:#x} does not match the request {:#x}+{:#x}",
                        pending.iova, pending.len
                    )))
                } else {
                    Ok(Vec::new())
                }
            }
        };
        // The waiter may have timed out just now: nothing to do then.
        let _ = waiter.try_send(outcome);
        Ok(())
    }

    /// Refuse DMA in `[iova, iova+size)` until the returned fence drops, and
    /// fail every request in the range that is queued or waiting.
    pub fn fence(&self, iova: u64, size: u64) -> Fence<'_> {
        let mut cancelled = Vec::new();
        {
            let mut s = self.lock();
            s.fences.push((iova, size));
            let State { queue, pending, .. } = &mut *s;
            queue.retain(|r| {
                let len = match &r.op {
                    DmaOp::Read { len } => *len as u64,
                    DmaOp::Write { data } => data.len() as u64,
                };
                if overlaps(r.iova, len, iova, size) {
                    // Never sent: no reply will come, forget the id.
                    if let Some(p) = pending.remove(&r.id) {
                        cancelled.extend(p.waiter);
                    }
                    false
                } else {
                    true
                }
            });
            for p in pending.values_mut() {
                if overlaps(p.iova, p.len, iova, size) {
                    cancelled.extend(p.waiter.take());
                }
            }
        }
        for w in cancelled {
            let _ = w.try_send(Err(DmaError::Message(format!(
                "DMA range {iova:#x}+{size:#x} is being unmapped"
            ))));
        }
        Fence {
            messenger: self,
            range: (iova, size),
        }
    }

    fn submit(&self, iova: u64, op: DmaOp) -> Result<Receiver<Outcome>, DmaError> {
        let (len, write) = match &op {
            DmaOp::Read { len } => (*len as u64, false),
            DmaOp::Write { data } => (data.len() as u64, true),
        };
        let (tx, rx) = sync_channel(1);
        {
            let mut s = self.lock();
            if !s.connected {
                return Err(DmaError::Message("no client connected".into()));
            }
            if s.fenced(iova, len) {
                return Err(DmaError::Message(format!(
                    "DMA range {iova:#x}+{len:#x} is being unmapped"
                )));
            }
            let id = s
                .alloc_id(self.timeout)
                .ok_or_else(|| DmaError::Message("too many DMA requests in flight".into()))?;
            s.pending.insert(
                id,
                Pending {
                    iova,
                    len,
                    write,
                    submitted: Instant::now(),
                    waiter: Some(tx),
                },
            );
            s.queue.push_back(DmaRequest { id, iova, op });
        }
        self.wake
            .write(1)
            .map_err(|e| DmaError::Message(format!("cannot wake the device thread: {e}")))?;
        Ok(rx)
    }

    fn wait(&self, rx: &Receiver<Outcome>, iova: u64) -> Outcome {
        match rx.recv_timeout(self.timeout) {
            Ok(outcome) => outcome,
            Err(RecvTimeoutError::Timeout) => Err(DmaError::Message(format!(
                "no reply from the client to DMA at {iova:#x} within {} ms",
                self.timeout.as_millis()
            ))),
            Err(RecvTimeoutError::Disconnected) => {
                Err(DmaError::Message("the client went away during DMA".into()))
            }
        }
    }

    fn max_chunk(&self) -> Result<usize, DmaError> {
        let s = self.lock();
        if !s.connected {
            return Err(DmaError::Message("no client connected".into()));
        }
        Ok(s.max_chunk)
    }
}

/// See [`Messenger::fence`].
#[derive(Debug)]
pub struct Fence<'a> {
    messenger: &'a Messenger,
    range: (u64, u64),
}

impl Drop for Fence<'_> {
    fn drop(&mut self) {
        let mut s = self.messenger.lock();
        if let Some(i) = s.fences.iter().position(|f| *f == self.range) {
            s.fences.swap_remove(i);
        }
    }
}

impl DmaMessenger for Messenger {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let chunk = self.max_chunk()?;
        let mut inflight: VecDeque<(usize, usize, Receiver<Outcome>)> = VecDeque::new();
        let mut offset = 0usize;
        loop {
            while offset < buf.len() && inflight.len() < WINDOW {
                let len = chunk.min(buf.len() - offset);
                let at = iova
                    .checked_add(offset as u64)
                    .ok_or(DmaError::InvalidRange {
                        iova,
                        size: buf.len() as u64,
                    })?;
                inflight.push_back((offset, len, self.submit(at, DmaOp::Read { len })?));
                offset += len;
            }
            let Some((off, len, rx)) = inflight.pop_front() else {
                return Ok(());
            };
            let data = self.wait(&rx, iova + off as u64)?;
            let dst = buf
                .get_mut(off..off + len)
                .filter(|d| d.len() == data.len())
                .ok_or_else(|| DmaError::Message("DMA_READ reply of the wrong size".into()))?;
            dst.copy_from_slice(&data);
        }
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let chunk = self.max_chunk()?;
        let mut inflight: VecDeque<(u64, Receiver<Outcome>)> = VecDeque::new();
        let mut pieces = data.chunks(chunk).enumerate();
        loop {
            while inflight.len() < WINDOW {
                let Some((i, piece)) = pieces.next() else {
                    break;
                };
                let at = iova
                    .checked_add((i * chunk) as u64)
                    .ok_or(DmaError::InvalidRange {
                        iova,
                        size: data.len() as u64,
                    })?;
                let rx = self.submit(
                    at,
                    DmaOp::Write {
                        data: piece.to_vec(),
                    },
                )?;
                inflight.push_back((at, rx));
            }
            let Some((at, rx)) = inflight.pop_front() else {
                return Ok(());
            };
            self.wait(&rx, at)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A fake device thread + client: serves requests from `mem`.
    fn serve(
        m: Arc<Messenger>,
        mem: Arc<Mutex<Vec<u8>>>,
        stop: Arc<AtomicBool>,
        log: Arc<Mutex<Vec<(u64, usize)>>>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let reqs = m.take_requests(usize::MAX);
                if reqs.is_empty() {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                for r in reqs {
                    let mut mem = mem.lock().unwrap();
                    match r.op {
                        DmaOp::Read { len } => {
                            log.lock().unwrap().push((r.iova, len));
                            let a = r.iova as usize;
                            let data = mem[a..a + len].to_vec();
                            m.complete(
                                r.id,
                                DmaReply::Read {
                                    iova: r.iova,
                                    data: &data,
                                },
                            )
                            .unwrap();
                        }
                        DmaOp::Write { data } => {
                            log.lock().unwrap().push((r.iova, data.len()));
                            let a = r.iova as usize;
                            mem[a..a + data.len()].copy_from_slice(&data);
                            m.complete(r.id, DmaReply::Write(Some((r.iova, data.len() as u64))))
                                .unwrap();
                        }
                    }
                }
            }
        })
    }

    #[test]
    fn reads_and_writes_are_chunked_by_the_clients_limit() {
        let m = Arc::new(Messenger::new(Duration::from_secs(5)).unwrap());
        m.connect(100);
        let mem = Arc::new(Mutex::new(vec![0u8; 4096]));
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let t = serve(m.clone(), mem.clone(), stop.clone(), log.clone());
        let data: Vec<u8> = (0..1000).map(|i| i as u8).collect();
        m.write(0x100, &data).unwrap();
        assert_eq!(&mem.lock().unwrap()[0x100..0x100 + 1000], &data[..]);
        let mut back = vec![0u8; 1000];
        m.read(0x100, &mut back).unwrap();
        assert_eq!(back, data);
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 20);
        assert!(log.iter().all(|(_, len)| *len == 100));
        assert_eq!(log[1].0, 0x100 + 100);
        assert_eq!(m.outstanding(), 0);
    }

    #[test]
    fn disconnect_fails_every_waiter_at_once() {
        let m = Arc::new(Messenger::new(Duration::from_secs(30)).unwrap());
        m.connect(4096);
        let workers: Vec<_> = (0..4)
            .map(|i| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let t0 = Instant::now();
                    let mut b = [0u8; 8];
                    let r = m.read(i * 8, &mut b);
                    (r, t0.elapsed())
                })
            })
            .collect();
        while m.outstanding() < 4 {
            std::thread::sleep(Duration::from_millis(1));
        }
        m.disconnect();
        for w in workers {
            let (r, took) = w.join().unwrap();
            assert!(matches!(r, Err(DmaError::Message(_))));
            assert!(took < Duration::from_secs(5));
        }
        // and new requests fail without waiting
        let mut b = [0u8; 8];
        assert!(m.read(0, &mut b).is_err());
        assert_eq!(m.outstanding(), 0);
    }

    #[test]
    fn a_silent_client_times_out_and_its_late_reply_is_accepted_quietly() {
        let m = Arc::new(Messenger::new(Duration::from_millis(50)).unwrap());
        m.connect(4096);
        let mut b = [0u8; 4];
        let t0 = Instant::now();
        let e = m.read(0x40, &mut b).unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert!(e.to_string().contains("no reply"), "{e}");
        let reqs = m.take_requests(usize::MAX);
        assert_eq!(reqs.len(), 1);
        // A late reply is not an error of the client ...
        assert_eq!(
            m.complete(
                reqs[0].id,
                DmaReply::Read {
                    iova: 0x40,
                    data: &[0; 4]
                }
            ),
            Ok(())
        );
        // ... but a reply to nothing is.
        assert_eq!(
            m.complete(reqs[0].id, DmaReply::Error(5)),
            Err(ReplyMismatch::UnknownId)
        );
    }

    #[test]
    fn replies_must_match_their_request() {
        let m = Arc::new(Messenger::new(Duration::from_secs(5)).unwrap());
        m.connect(4096);
        let w = {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 4];
                m.read(0x40, &mut b)
            })
        };
        let req = loop {
            if let Some(r) = m.take_requests(1).pop() {
                break r;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(req.op, DmaOp::Read { len: 4 });
        assert_eq!(
            m.complete(req.id, DmaReply::Write(Some((0x40, 4)))),
            Err(ReplyMismatch::WrongCommand)
        );
        // wrong length: the waiter gets an error, the reply is consumed
        m.complete(
            req.id,
            DmaReply::Read {
                iova: 0x40,
                data: &[1, 2],
            },
        )
        .unwrap();
        let e = w.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }

    #[test]
    fn an_error_reply_carries_the_clients_errno() {
        let m = Arc::new(Messenger::new(Duration::from_secs(5)).unwrap());
        m.connect(4096);
        let w = {
            let m = m.clone();
            std::thread::spawn(move || m.write(0x10, b"abc"))
        };
        let req = loop {
            if let Some(r) = m.take_requests(1).pop() {
                break r;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        m.complete(req.id, DmaReply::Error(libc::EPERM as u32))
            .unwrap();
        let e = w.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("Operation not permitted"), "{e}");
    }

    #[test]
    fn a_fence_fails_requests_in_its_range_and_refuses_new_ones() {
        let m = Arc::new(Messenger::new(Duration::from_secs(30)).unwrap());
        m.connect(4096);
        let spawn = |iova: u64| {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 8];
                m.read(iova, &mut b)
            })
        };
        let inside_sent = spawn(0x1000);
        while m.outstanding() < 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let sent = m.take_requests(usize::MAX);
        assert_eq!(sent.len(), 1);
        let inside_queued = spawn(0x1ff8);
        let outside = spawn(0x3000);
        while m.outstanding() < 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        {
            let _fence = m.fence(0x1000, 0x1000);
            assert!(inside_sent.join().unwrap().is_err());
            assert!(inside_queued.join().unwrap().is_err());
            let mut b = [0u8; 1];
            assert!(m.read(0x1800, &mut b).is_err(), "fenced range refused");
            // the request outside the fence is still queued
            let left = m.take_requests(usize::MAX);
            assert_eq!(left.len(), 1);
            assert_eq!(left[0].iova, 0x3000);
            m.complete(
                left[0].id,
                DmaReply::Read {
                    iova: 0x3000,
                    data: &[9; 8],
                },
            )
            .unwrap();
            assert!(outside.join().unwrap().is_ok());
        }
        // The reply to the cancelled, already sent request is still known.
        assert_eq!(
            m.complete(
                sent[0].id,
                DmaReply::Read {
                    iova: 0x1000,
                    data: &[0; 8]
                }
            ),
            Ok(())
        );
        // After the fence, the range works again.
        let again = spawn(0x1000);
        let r = loop {
            if let Some(r) = m.take_requests(1).pop() {
                break r;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        m.complete(
            r.id,
            DmaReply::Read {
                iova: 0x1000,
                data: &[1; 8],
            },
        )
        .unwrap();
        assert!(again.join().unwrap().is_ok());
    }

    #[test]
    fn take_requests_respects_its_limit_and_clear_wake_clears_the_wakeup() {
        let m = Arc::new(Messenger::new(Duration::from_millis(200)).unwrap());
        m.connect(1);
        let w = {
            let m = m.clone();
            std::thread::spawn(move || m.write(0, &[0; 3]))
        };
        while m.queued() < 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        m.clear_wake();
        assert_eq!(m.take_requests(2).len(), 2);
        assert!(m.wake.read().is_err(), "no wakeup left");
        assert_eq!(m.queued(), 1);
        assert_eq!(m.take_requests(5).len(), 1);
        assert_eq!(m.queued(), 0);
        assert!(w.join().unwrap().is_err()); // nobody answered
    }
}
