//! The controller: registers, the controller thread (enable / disable /
//! shutdown, admin queue, asynchronous events) and the I/O worker threads.
//!
//! Threads:
//! * The transport's thread calls [`NvmeController`]'s register accessors.
//!   They update atomics and wake a thread, and return at once; they never
//!   wait for the guest or the client.
//! * One controller thread runs the CC state machine and the admin queue.
//!   It creates and deletes I/O queues by sending [`Control`] messages to
//!   the workers and waiting for them to be applied.
//! * `io_threads` worker threads each own a set of I/O queue pairs (the
//!   completion queue decides: CQ `q` goes to worker `(q - 1) % io_threads`,
//!   and an SQ to the worker of its CQ). A worker's queues are plain data it
//!   alone touches: the I/O path takes no lock.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use super::guest::Guest;
use super::io::{self, IoCtx, IoStats, Namespace, Scratch};
use super::queue::{Cq, DOORBELL_PAGE, Doorbells, Sq};
use super::spec::{Completion, Status, cc, csts, reg};
use crate::Error;
use crate::block::BlockBackend;
use crate::dma::DmaSpace;

/// Where the controller raises interrupts: the PCI function's MSI-X
/// vectors, or its single INTx / MSI interrupt when MSI-X is off.
pub trait InterruptSink: Send + Sync {
    /// Raise MSI-X vector `vector`; with MSI-X disabled, raise the
    /// function's single interrupt instead.
    fn signal(&self, vector: u16);
    /// Whether MSI-X is enabled. When it is not, all completion queues
    /// share one interrupt, which INTMS/INTMC can mask.
    fn msix_enabled(&self) -> bool;
    /// Set the level of the single interrupt (used while MSI-X is off):
    /// asserted while a completion queue with interrupts enabled holds
    /// entries the host has not consumed and INTMS does not mask it.
    fn set_intx(&self, asserted: bool);
}

/// How guest doorbell writes reach the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoorbellMode {
    /// Doorbells are trapped registers: each write is a region write that
    /// wakes the queue's thread. Shadow doorbells (Doorbell Buffer Config)
    /// are offered, so a Linux guest only writes the register when the
    /// controller is about to sleep.
    Trap,
    /// The doorbell page is shared memory the client maps: guest writes
    /// cost no message, and the queue threads poll it (spinning briefly,
    /// then sleeping with exponential back-off).
    Mmap,
}

impl std::str::FromStr for DoorbellMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "trap" => Ok(DoorbellMode::Trap),
            "mmap" => Ok(DoorbellMode::Mmap),
            _ => Err(format!("doorbell mode {s:?} is not \"trap\" or \"mmap\"")),
        }
    }
}

/// How idle queue threads look for work (mmap doorbells cannot wake them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollConfig {
    /// Keep polling this long after the last command before sleeping.
    pub spin: Duration,
    /// First sleep of the back-off (mmap doorbells).
    pub min_sleep: Duration,
    /// Longest sleep while the queues saw work within `active_window`:
    /// the latency a command can gain while the guest is busy.
    pub active_sleep: Duration,
    /// How long after the last command the queues count as active.
    pub active_window: Duration,
    /// Longest sleep of the back-off once idle (mmap doorbells): the worst
    /// added latency for the first command after an idle period, and what
    /// sets the CPU an idle device costs.
    pub max_sleep: Duration,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            spin: Duration::from_micros(50),
            min_sleep: Duration::from_micros(20),
            // A shorter cap measured worse on a 2-core TCG host: polling
            // took CPU from the guest's vCPU thread.
            active_sleep: Duration::from_millis(1),
            active_window: Duration::from_millis(100),
            max_sleep: Duration::from_millis(1),
        }
    }
}

/// The controller's fixed parameters.
#[derive(Clone, Debug)]
pub struct NvmeConfig {
    /// Most I/O queue pairs the guest may create (1 to 511).
    pub max_io_queues: u16,
    /// Most entries in one queue (2 to 65536).
    pub max_queue_entries: u32,
    /// Worker threads serving I/O queues (1 to `max_io_queues`).
    pub io_threads: usize,
    /// How doorbell writes arrive.
    pub doorbells: DoorbellMode,
    /// Polling behaviour of the queue threads.
    pub poll: PollConfig,
    /// With MSI-X, hold back a completion queue's interrupt while the host
    /// has not handled the previous one (its handler will see the new
    /// entries), raising it at the latest before the queue thread sleeps.
    pub irq_defer: bool,
    /// Serial number (up to 20 ASCII characters).
    pub serial: String,
    /// Model number (up to 40 ASCII characters).
    pub model: String,
    /// Firmware revision (up to 8 ASCII characters).
    pub firmware: String,
    /// PCI vendor ID, repeated in Identify Controller.
    pub vendor_id: u16,
    /// PCI subsystem vendor ID, repeated in Identify Controller.
    pub subsystem_vendor_id: u16,
    /// Maximum data transfer size: 2^mdts pages of 4 KiB (1 to 10).
    pub mdts: u8,
}

impl Default for NvmeConfig {
    fn default() -> Self {
        NvmeConfig {
            max_io_queues: 4,
            max_queue_entries: 1024,
            io_threads: 1,
            doorbells: DoorbellMode::Trap,
            poll: PollConfig::default(),
            irq_defer: true,
            serial: "VDEVD0001".into(),
            model: "vdevd NVMe controller".into(),
            firmware: env!("CARGO_PKG_VERSION").into(),
            vendor_id: super::pci::VENDOR_ID,
            subsystem_vendor_id: super::pci::VENDOR_ID,
            mdts: 8,
        }
    }
}

/// Most I/O queue pairs: the doorbell page holds 512 pairs, one is admin.
pub const MAX_IO_QUEUES: u16 = (DOORBELL_PAGE / 8 - 1) as u16;

impl NvmeConfig {
    /// MSI-X vectors the function needs: one per completion queue.
    pub fn msix_vectors(&self) -> u16 {
        self.max_io_queues + 1
    }

    /// Maximum data transfer size in bytes.
    pub fn mdts_bytes(&self) -> u64 {
        4096u64 << self.mdts
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.max_io_queues == 0 || self.max_io_queues > MAX_IO_QUEUES {
            return bad(format!(
                "{} I/O queues: must be 1 to {MAX_IO_QUEUES}",
                self.max_io_queues
            ));
        }
        if !(2..=65536).contains(&self.max_queue_entries) {
            return bad(format!(
                "{} queue entries: must be 2 to 65536",
                self.max_queue_entries
            ));
        }
        if self.io_threads == 0 || self.io_threads > usize::from(self.max_io_queues) {
            return bad(format!(
                "{} I/O threads: must be 1 to the number of I/O queues ({})",
                self.io_threads, self.max_io_queues
            ));
        }
        if !(1..=10).contains(&self.mdts) {
            return bad(format!("MDTS {}: must be 1 to 10", self.mdts));
        }
        for (what, s, max) in [
            ("serial", &self.serial, 20),
            ("model", &self.model, 40),
            ("firmware", &self.firmware, 8),
        ] {
            if s.len() > max || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                return bad(format!(
                    "{what} {s:?}: must be up to {max} printable ASCII characters"
                ));
            }
        }
        Ok(())
    }
}

/// Owner value of a queue nobody services.
pub(crate) const OWNER_NONE: u16 = u16::MAX;
/// Owner value of the controller thread (admin queue).
pub(crate) const OWNER_CTRL: u16 = 0;

/// A queue change for an I/O worker.
#[derive(Debug)]
pub(crate) enum Control {
    CreateCq(Cq),
    CreateSq(Sq),
    DeleteSq(u16),
    DeleteCq(u16),
    /// Shadow doorbell and EventIdx buffers (None: off).
    Dbbuf(Option<(u64, u64)>),
    /// Drop every queue and the shadow doorbells.
    Reset,
}

#[derive(Default)]
struct CtlState {
    queue: Vec<Control>,
    submitted: u64,
    done: u64,
}

/// The mailbox of one I/O worker.
#[derive(Default)]
pub(crate) struct WorkerCtl {
    pending: AtomicBool,
    state: Mutex<CtlState>,
    cv: Condvar,
}

/// An asynchronous event waiting for an Asynchronous Event Request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Event {
    pub kind: u8,
    pub info: u8,
    pub log: u8,
}

/// Most events queued for delivery; more are dropped (a guest hammering
/// bad doorbells must not grow memory).
const MAX_EVENTS: usize = 16;
/// Error log entries kept.
pub(crate) const ERROR_LOG_ENTRIES: usize = 64;

#[derive(Default)]
pub(crate) struct ErrorLog {
    pub count: u64,
    pub entries: VecDeque<[u8; 64]>,
}

/// State shared by the transport thread, the controller thread and the
/// workers.
pub(crate) struct Shared {
    pub cfg: NvmeConfig,
    pub ns: Namespace,
    pub backend: Arc<dyn BlockBackend>,
    pub dma: Arc<DmaSpace>,
    pub irq: Arc<dyn InterruptSink>,
    pub cap: u64,
    pub cc: AtomicU32,
    pub csts: AtomicU32,
    pub aqa: AtomicU32,
    pub asq: AtomicU64,
    pub acq: AtomicU64,
    pub intms: AtomicU32,
    /// CC.EN fell since the controller thread last looked.
    pub reset_pending: AtomicBool,
    /// CC.SHN was set since the controller thread last looked.
    pub shutdown_pending: AtomicBool,
    /// Host memory page size in bytes (from CC.MPS at enable).
    pub page: AtomicU64,
    pub db: Doorbells,
    /// Thread servicing each SQ / CQ, by queue id.
    pub sq_owner: Vec<AtomicU16>,
    pub cq_owner: Vec<AtomicU16>,
    /// Published CQ tails and interrupt enables (INTx level).
    pub cq_tail: Vec<AtomicU32>,
    pub cq_ien: Vec<AtomicBool>,
    /// Shadow doorbell buffer address (0: none).
    pub shadow: AtomicU64,
    /// Controller thread at 0, workers at 1...
    pub threads: Vec<OnceLock<Thread>>,
    pub ctl: Vec<WorkerCtl>,
    pub stats: Vec<IoStats>,
    /// Where the time goes: logged when the controller goes away.
    pub counters: Counters,
    pub events: Mutex<VecDeque<Event>>,
    pub errors: Mutex<ErrorLog>,
    /// Function level resets: (requested, done).
    flr: Mutex<(u64, u64)>,
    flr_cv: Condvar,
    pub stop: AtomicBool,
    /// PCI Command.Bus_Master: no DMA while clear.
    pub bus_master: AtomicBool,
    pub started: Instant,
}

/// Event counts of the command path, for the log line at exit.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Doorbell writes that arrived as trapped register writes.
    pub trapped_doorbells: AtomicU64,
    /// I/O commands completed.
    pub io_commands: AtomicU64,
    /// Worker passes over the queues that found commands.
    pub batches: AtomicU64,
    /// Interrupts raised for I/O completion queues.
    pub interrupts: AtomicU64,
    /// Times an I/O worker went to sleep.
    pub sleeps: AtomicU64,
}

impl Counters {
    pub(crate) fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let cmds = get(&self.io_commands);
        let per = |n: u64| {
            if n == 0 {
                "-".to_string()
            } else {
                format!("{:.1}", cmds as f64 / n as f64)
            }
        };
        format!(
            "{cmds} I/O commands in {} batches ({} per batch), {} interrupts ({} per interrupt), \
             {} trapped doorbell writes ({} per write), {} worker sleeps",
            get(&self.batches),
            per(get(&self.batches)),
            get(&self.interrupts),
            per(get(&self.interrupts)),
            get(&self.trapped_doorbells),
            per(get(&self.trapped_doorbells)),
            get(&self.sleeps),
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The error log, locked.
pub(crate) fn lock_errors(sh: &Shared) -> MutexGuard<'_, ErrorLog> {
    lock(&sh.errors)
}

impl Shared {
    pub(crate) fn wake(&self, owner: u16) {
        if let Some(t) = self.threads.get(usize::from(owner)).and_then(OnceLock::get) {
            t.unpark();
        }
    }

    /// Queue an asynchronous event for the controller thread.
    pub(crate) fn raise_event(&self, ev: Event) {
        {
            let mut q = lock(&self.events);
            if q.len() >= MAX_EVENTS || q.contains(&ev) {
                return;
            }
            q.push_back(ev);
        }
        self.wake(OWNER_CTRL);
    }

    /// Add an entry to the error information log.
    pub(crate) fn record_error(&self, sqid: u16, cid: u16, status: Status, nsid: u32) {
        let mut log = lock(&self.errors);
        log.count += 1;
        let mut e = [0u8; 64];
        e[0..8].copy_from_slice(&log.count.to_le_bytes());
        e[8..10].copy_from_slice(&sqid.to_le_bytes());
        e[10..12].copy_from_slice(&cid.to_le_bytes());
        e[12..14].copy_from_slice(&(status.0 << 1).to_le_bytes());
        // parameter error location: not given
        e[14..16].copy_from_slice(&0xffffu16.to_le_bytes());
        e[24..28].copy_from_slice(&nsid.to_le_bytes());
        if log.entries.len() >= ERROR_LOG_ENTRIES {
            log.entries.pop_back();
        }
        log.entries.push_front(e);
    }

    /// The controller hit an error it cannot report through a queue
    /// (guest memory for a queue vanished): CSTS.CFS, until a reset.
    pub(crate) fn fatal(&self, why: &str) {
        let old = self.csts.fetch_or(csts::CFS, Ordering::SeqCst);
        if old & csts::CFS == 0 {
            log::error!("nvme: controller fatal status: {why}");
        }
    }

    pub(crate) fn is_fatal(&self) -> bool {
        self.csts.load(Ordering::Acquire) & csts::CFS != 0
    }

    /// Interrupt for completions posted to `cq`.
    pub(crate) fn signal_cq(&self, cq: &mut Cq) {
        if !cq.notify {
            return;
        }
        cq.notify = false;
        if let Some(t) = self.cq_tail.get(usize::from(cq.qid)) {
            t.store(cq.tail, Ordering::Release);
        }
        if !cq.ien {
            return;
        }
        if self.irq.msix_enabled() {
            self.irq.signal(cq.vector);
        } else if self.intms.load(Ordering::Acquire) & 1 == 0 {
            self.irq.signal(0);
        }
    }

    /// Whether the single (INTx / MSI) interrupt should be asserted: some
    /// completion queue with interrupts enabled holds entries the host has
    /// not consumed, and INTMS does not mask it.
    pub(crate) fn intx_pending(&self) -> bool {
        let sh = self;
        if sh.intms.load(Ordering::Acquire) & 1 != 0 {
            return false;
        }
        let shadow = sh.shadow.load(Ordering::Acquire);
        let view = (shadow != 0).then(|| sh.dma.memory());
        for (q, owner) in sh.cq_owner.iter().enumerate() {
            if owner.load(Ordering::Acquire) == OWNER_NONE
                || !sh.cq_ien.get(q).is_some_and(|i| i.load(Ordering::Acquire))
            {
                continue;
            }
            let tail = sh.cq_tail.get(q).map_or(0, |t| t.load(Ordering::Acquire));
            let mut head = sh.db.cq_head(q as u16);
            if let (Some(view), true) = (&view, q > 0) {
                let mut b = [0u8; 4];
                if view.read(shadow + 8 * q as u64 + 4, &mut b).is_ok() {
                    head = u32::from_le_bytes(b);
                }
            }
            if head != tail {
                return true;
            }
        }
        false
    }

    /// Recompute the single interrupt's level (MSI-X off).
    pub(crate) fn update_intx(&self) {
        if !self.irq.msix_enabled() {
            self.irq.set_intx(self.intx_pending());
        }
    }

    pub(crate) fn set_owner(&self, sq: bool, qid: u16, owner: u16) {
        let v = if sq { &self.sq_owner } else { &self.cq_owner };
        if let Some(o) = v.get(usize::from(qid)) {
            o.store(owner, Ordering::SeqCst);
        }
    }

    pub(crate) fn io_ctx(&self, worker: usize) -> Option<IoCtx<'_>> {
        Some(IoCtx {
            backend: self.backend.as_ref(),
            ns: self.ns,
            page: self.page.load(Ordering::Acquire),
            mdts: self.cfg.mdts_bytes(),
            stats: self.stats.get(worker)?,
        })
    }
}

impl WorkerCtl {
    /// Hand `c` to worker `w` and wait until it has been applied.
    pub(crate) fn submit(&self, sh: &Shared, w: usize, c: Control) {
        let mut st = lock(&self.state);
        st.queue.push(c);
        st.submitted += 1;
        let mine = st.submitted;
        self.pending.store(true, Ordering::SeqCst);
        sh.wake(w as u16 + 1);
        while st.done < mine && !sh.stop.load(Ordering::Acquire) {
            st = match self.cv.wait_timeout(st, Duration::from_millis(100)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    fn take(&self) -> Option<(Vec<Control>, u64)> {
        if !self.pending.swap(false, Ordering::SeqCst) {
            return None;
        }
        let mut st = lock(&self.state);
        Some((std::mem::take(&mut st.queue), st.submitted))
    }

    fn ack(&self, upto: u64) {
        let mut st = lock(&self.state);
        st.done = st.done.max(upto);
        self.cv.notify_all();
    }
}

/// Idle handling for a queue thread: poll for `spin`, then sleep; with
/// doorbells that are not trapped, sleep in exponentially growing steps,
/// capped low while the queues were recently busy and higher once idle.
pub(crate) struct Idle {
    cfg: PollConfig,
    trap: bool,
    since: Option<Instant>,
    sleep: Duration,
    last_work: Instant,
}

impl Idle {
    pub(crate) fn new(cfg: PollConfig, trap: bool) -> Idle {
        Idle {
            cfg,
            trap,
            since: None,
            sleep: cfg.min_sleep,
            last_work: Instant::now(),
        }
    }

    pub(crate) fn busy(&mut self) {
        self.since = None;
        self.sleep = self.cfg.min_sleep;
        self.last_work = Instant::now();
    }

    /// Whether the spin window is over (time to sleep).
    pub(crate) fn should_sleep(&mut self) -> bool {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) < self.cfg.spin {
            std::hint::spin_loop();
            return false;
        }
        true
    }

    /// The next sleep of the back-off (mmap doorbells).
    pub(crate) fn next_sleep(&mut self) -> Duration {
        let cap = if self.last_work.elapsed() < self.cfg.active_window {
            self.cfg.active_sleep
        } else {
            self.cfg.max_sleep
        };
        let d = self.sleep.min(cap);
        self.sleep = (self.sleep * 2).min(cap.max(self.cfg.min_sleep));
        d
    }

    /// Sleep until woken (trap) or for the next back-off step (mmap), never
    /// past `deadline`.
    pub(crate) fn sleep(&mut self, deadline: Option<Duration>) {
        if self.trap {
            match deadline {
                Some(d) => std::thread::park_timeout(d),
                None => std::thread::park(),
            }
        } else {
            let step = self.next_sleep();
            std::thread::park_timeout(deadline.map_or(step, |d| d.min(step)));
        }
    }
}

/// Let a queue thread's timed sleeps be precise (default slack is 50 us).
fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64, 0u64, 0u64, 0u64);
    }
}

/// A worker's queues.
struct IoWorker {
    sh: Arc<Shared>,
    idx: usize,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    active: Vec<u16>,
    /// (shadow doorbells, EventIdx) buffers.
    dbbuf: Option<(u64, u64)>,
    scratch: Scratch,
}

/// Commands taken from one SQ before moving to the next (fairness).
const BUDGET: usize = 64;

impl IoWorker {
    fn new(sh: Arc<Shared>, idx: usize) -> IoWorker {
        let n = usize::from(sh.cfg.max_io_queues) + 1;
        IoWorker {
            sh,
            idx,
            sqs: vec![None; n],
            cqs: vec![None; n],
            active: Vec::new(),
            dbbuf: None,
            scratch: Scratch::default(),
        }
    }

    fn ctl(&self) -> Option<&WorkerCtl> {
        self.sh.ctl.get(self.idx)
    }

    fn apply_controls(&mut self) {
        let Some((cmds, upto)) = self.ctl().and_then(WorkerCtl::take) else {
            return;
        };
        let sh = self.sh.clone();
        let mut g = Guest::new(&sh.dma);
        for c in cmds {
            match c {
                Control::CreateCq(cq) => {
                    let q = usize::from(cq.qid);
                    if let Some(t) = sh.cq_tail.get(q) {
                        t.store(0, Ordering::Release);
                    }
                    if let Some(i) = sh.cq_ien.get(q) {
                        i.store(cq.ien, Ordering::Release);
                    }
                    if let Some(slot) = self.cqs.get_mut(q) {
                        *slot = Some(cq);
                    }
                }
                Control::CreateSq(sq) => {
                    let qid = sq.qid;
                    if let Some((_, eis)) = self.dbbuf {
                        let _ = g.store_u32(eis + 8 * u64::from(qid), 0);
                    }
                    if let Some(slot) = self.sqs.get_mut(usize::from(qid)) {
                        *slot = Some(sq);
                        self.active.push(qid);
                    }
                }
                Control::DeleteSq(qid) => {
                    if let Some(slot) = self.sqs.get_mut(usize::from(qid)) {
                        *slot = None;
                    }
                    self.active.retain(|q| *q != qid);
                }
                Control::DeleteCq(qid) => {
                    if let Some(slot) = self.cqs.get_mut(usize::from(qid)) {
                        *slot = None;
                    }
                }
                Control::Dbbuf(cfg) => {
                    self.dbbuf = cfg;
                    if let Some((dbs, eis)) = cfg {
                        // Start the shadow values where the queues are.
                        for sq in self.sqs.iter().flatten() {
                            let at = 8 * u64::from(sq.qid);
                            let _ = g.store_u32(dbs + at, sq.tail);
                            let _ = g.store_u32(eis + at, sq.tail);
                        }
                        for cq in self.cqs.iter().flatten() {
                            let at = 8 * u64::from(cq.qid) + 4;
                            let _ = g.store_u32(dbs + at, cq.head);
                            let _ = g.store_u32(eis + at, cq.head);
                        }
                    }
                }
                Control::Reset => {
                    self.sqs.iter_mut().for_each(|s| *s = None);
                    self.cqs.iter_mut().for_each(|c| *c = None);
                    self.active.clear();
                    self.dbbuf = None;
                }
            }
        }
        g.release();
        if let Some(ctl) = self.ctl() {
            ctl.ack(upto);
        }
    }

    fn sq_tail_now(&self, g: &mut Guest<'_>, qid: u16) -> Option<u32> {
        match self.dbbuf {
            Some((dbs, _)) => g.load_u32(dbs + 8 * u64::from(qid)).ok(),
            None => Some(self.sh.db.sq_tail(qid)),
        }
    }

    fn cq_head_now(
        dbbuf: Option<(u64, u64)>,
        sh: &Shared,
        g: &mut Guest<'_>,
        qid: u16,
    ) -> Option<u32> {
        match dbbuf {
            Some((dbs, _)) => g.load_u32(dbs + 8 * u64::from(qid) + 4).ok(),
            None => Some(sh.db.cq_head(qid)),
        }
    }

    /// Process what the queues hold. Returns whether anything was done.
    fn service(&mut self) -> bool {
        if self.sh.is_fatal() || !self.sh.bus_master.load(Ordering::Acquire) {
            return false;
        }
        let sh = self.sh.clone();
        let Some(ctx) = sh.io_ctx(self.idx) else {
            return false;
        };
        let mut g = Guest::new(&sh.dma);
        let mut work = false;
        for i in 0..self.active.len() {
            let Some(&qid) = self.active.get(i) else {
                break;
            };
            let tail = self.sq_tail_now(&mut g, qid);
            let dbbuf = self.dbbuf;
            let Some(Some(sq)) = self.sqs.get_mut(usize::from(qid)) else {
                continue;
            };
            if let Some(t) = tail {
                if let Err(first) = sq.set_tail(t) {
                    if first {
                        log::warn!("nvme: SQ {qid} tail doorbell {t} is outside the queue");
                        sh.raise_event(bad_doorbell_value());
                    }
                }
            }
            let Some(Some(cq)) = self.cqs.get_mut(usize::from(sq.cqid)) else {
                continue;
            };
            let mut n = 0usize;
            while sq.has_work() && n < BUDGET {
                if cq.is_full() {
                    if let Some(h) = Self::cq_head_now(dbbuf, &sh, &mut g, cq.qid) {
                        if let Err(true) = cq.set_head(h) {
                            log::warn!("nvme: CQ {} head doorbell {h} is invalid", cq.qid);
                            sh.raise_event(bad_doorbell_value());
                        }
                    }
                    if cq.is_full() {
                        break;
                    }
                }
                let cmd = match sq.fetch(&mut g) {
                    Ok(c) => c,
                    Err(e) => {
                        sh.fatal(&format!("cannot read SQ {qid}: {e}"));
                        return true;
                    }
                };
                let (status, dw0) = io::execute(&ctx, &mut g, &mut self.scratch, &cmd);
                if !status.is_success() {
                    sh.record_error(qid, cmd.cid, status, cmd.nsid);
                }
                let c = Completion {
                    dw0,
                    dw1: 0,
                    sqhd: sq.head as u16,
                    sqid: qid,
                    cid: cmd.cid,
                    status,
                };
                if let Err(e) = cq.post(&mut g, &c) {
                    sh.fatal(&format!("cannot write CQ {}: {e}", cq.qid));
                    return true;
                }
                n += 1;
            }
            if n > 0 {
                work = true;
                sh.counters
                    .io_commands
                    .fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
            }
        }
        if work {
            sh.counters.batches.fetch_add(1, Ordering::Relaxed);
        }
        self.interrupts(&mut g, false);
        g.release();
        work
    }

    /// Raise the interrupts completions posted call for. With MSI-X and
    /// `irq_defer`, a CQ whose previous interrupt the host has not yet
    /// handled (its head has not moved since) gets none now: the handler,
    /// when it runs, reads every entry posted so far. When the head moves,
    /// entries left over get their interrupt, and a host that consumed
    /// them all needs none. `flush` raises every pending one regardless:
    /// the thread calls it before it sleeps, so nothing waits on a
    /// sleeping thread.
    fn interrupts(&mut self, g: &mut Guest<'_>, flush: bool) {
        let sh = &self.sh;
        let defer = sh.cfg.irq_defer && sh.irq.msix_enabled();
        for cq in self.cqs.iter_mut().flatten() {
            if !(cq.notify && cq.ien) {
                // Nothing to raise (or interrupts off: publish the tail).
                sh.signal_cq(cq);
                continue;
            }
            if defer {
                if let Some(h0) = cq.irq_unacked {
                    let head = Self::cq_head_now(self.dbbuf, sh, g, cq.qid);
                    match head {
                        Some(h) if h == h0 && !flush => continue,
                        Some(h) if h == cq.tail => {
                            // The host read everything posted.
                            cq.irq_unacked = None;
                            cq.notify = false;
                            continue;
                        }
                        _ => {}
                    }
                }
            }
            sh.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            sh.signal_cq(cq);
            // Only an interrupt with entries behind it holds back the next:
            // a host already at the tail has nothing left to handle.
            cq.irq_unacked = if defer {
                Self::cq_head_now(self.dbbuf, sh, g, cq.qid).filter(|&h| h != cq.tail)
            } else {
                None
            };
        }
    }

    /// Before sleeping with shadow doorbells: ask the host to ring the
    /// doorbell register for the next command, then look once more.
    /// Returns whether there is work after all.
    fn arm_event_idx(&mut self) -> bool {
        let Some((dbs, eis)) = self.dbbuf else {
            return false;
        };
        let sh = self.sh.clone();
        let mut g = Guest::new(&sh.dma);
        for &qid in &self.active {
            if let Some(Some(sq)) = self.sqs.get(usize::from(qid)) {
                let _ = g.store_u32(eis + 8 * u64::from(qid), sq.head);
            }
        }
        for cq in self.cqs.iter().flatten() {
            if cq.is_full() {
                let _ = g.store_u32(eis + 8 * u64::from(cq.qid) + 4, cq.head);
            }
        }
        fence(Ordering::SeqCst);
        let mut more = false;
        for &qid in &self.active {
            if let Some(Some(sq)) = self.sqs.get(usize::from(qid)) {
                if let Ok(t) = g.load_u32(dbs + 8 * u64::from(qid)) {
                    more |= t != sq.head && t < sq.size;
                }
            }
        }
        for cq in self.cqs.iter().flatten() {
            if cq.is_full() {
                if let Ok(h) = g.load_u32(dbs + 8 * u64::from(cq.qid) + 4) {
                    more |= h != cq.head;
                }
            }
        }
        g.release();
        more
    }

    fn run(mut self) {
        tighten_timer_slack();
        let trap = self.sh.cfg.doorbells == DoorbellMode::Trap;
        let mut idle = Idle::new(self.sh.cfg.poll, trap);
        while !self.sh.stop.load(Ordering::Acquire) {
            self.apply_controls();
            if self.service() {
                idle.busy();
                continue;
            }
            if !idle.should_sleep() {
                continue;
            }
            if self.arm_event_idx() {
                continue;
            }
            if self.ctl().is_some_and(|c| c.pending.load(Ordering::SeqCst)) {
                continue;
            }
            if self.cqs.iter().flatten().any(|cq| cq.notify) {
                let sh = self.sh.clone();
                let mut g = Guest::new(&sh.dma);
                self.interrupts(&mut g, true);
                g.release();
            }
            self.sh.counters.sleeps.fetch_add(1, Ordering::Relaxed);
            idle.sleep(None);
        }
    }
}

fn bad_doorbell_value() -> Event {
    Event {
        kind: super::spec::aer::TYPE_ERROR,
        info: super::spec::aer::ERR_INVALID_DB_VALUE,
        log: super::spec::log_page::ERROR,
    }
}

/// Feature values (Get / Set Features).
#[derive(Clone, Debug)]
pub(crate) struct Features {
    pub arbitration: u32,
    pub power_state: u32,
    pub temp_over: u16,
    pub temp_under: u16,
    pub error_recovery: u32,
    /// Allocated (SQs, CQs), 1-based.
    pub queues: (u16, u16),
    pub irq_coalesce: u32,
    /// Coalescing disable per vector.
    pub irq_cd: Vec<bool>,
    pub write_atomicity: u32,
    pub aec: u32,
    pub kato: u32,
}

/// Composite temperature reported, in Kelvin.
pub(crate) const TEMPERATURE: u16 = 310;
/// Warning composite temperature threshold, Kelvin.
pub(crate) const WCTEMP: u16 = 343;
/// Critical composite temperature threshold, Kelvin.
pub(crate) const CCTEMP: u16 = 353;

impl Features {
    pub(crate) fn defaults(cfg: &NvmeConfig) -> Features {
        Features {
            arbitration: 0,
            power_state: 0,
            temp_over: WCTEMP,
            temp_under: 0,
            error_recovery: 0,
            queues: (cfg.max_io_queues, cfg.max_io_queues),
            irq_coalesce: 0,
            irq_cd: vec![false; usize::from(cfg.msix_vectors())],
            write_atomicity: 0,
            aec: 0,
            kato: 0,
        }
    }
}

/// What the controller thread knows of an I/O SQ.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SqInfo {
    pub cqid: u16,
}

/// What the controller thread knows of an I/O CQ.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CqInfo {
    pub worker: usize,
    pub sqs: u32,
}

/// The controller thread's state.
pub(crate) struct CtrlThread {
    pub sh: Arc<Shared>,
    pub enabled: bool,
    pub asq: Option<Sq>,
    pub acq: Option<Cq>,
    pub feat: Features,
    pub sqs: Vec<Option<SqInfo>>,
    pub cqs: Vec<Option<CqInfo>>,
    pub io_queues_created: bool,
    /// Outstanding Asynchronous Event Requests (command ids).
    pub aers: Vec<u16>,
    /// Event types reported and not yet cleared by reading their log.
    pub masked_events: u8,
    pub dbbuf: Option<(u64, u64)>,
    pub last_keep_alive: Instant,
    pub scratch: Scratch,
    pub changed_ns: Vec<u32>,
}

impl CtrlThread {
    fn new(sh: Arc<Shared>) -> CtrlThread {
        let n = usize::from(sh.cfg.max_io_queues) + 1;
        CtrlThread {
            feat: Features::defaults(&sh.cfg),
            sh,
            enabled: false,
            asq: None,
            acq: None,
            sqs: vec![None; n],
            cqs: vec![None; n],
            io_queues_created: false,
            aers: Vec::new(),
            masked_events: 0,
            dbbuf: None,
            last_keep_alive: Instant::now(),
            scratch: Scratch::default(),
            changed_ns: Vec::new(),
        }
    }

    pub(crate) fn page(&self) -> u64 {
        self.sh.page.load(Ordering::Acquire)
    }

    fn each_worker(&self, c: impl Fn() -> Control) {
        for (w, ctl) in self.sh.ctl.iter().enumerate() {
            ctl.submit(&self.sh, w, c());
        }
    }

    /// CC.EN 1 -> 0: delete every queue, forget outstanding commands and
    /// return features to their defaults. Registers other than CSTS stay.
    fn controller_reset(&mut self) {
        self.each_worker(|| Control::Reset);
        self.enabled = false;
        self.asq = None;
        self.acq = None;
        self.aers.clear();
        self.masked_events = 0;
        lock(&self.sh.events).clear();
        self.feat = Features::defaults(&self.sh.cfg);
        self.sh.backend.set_write_cache(true);
        self.sqs.iter_mut().for_each(|s| *s = None);
        self.cqs.iter_mut().for_each(|c| *c = None);
        for o in self.sh.sq_owner.iter().chain(self.sh.cq_owner.iter()) {
            o.store(OWNER_NONE, Ordering::SeqCst);
        }
        self.io_queues_created = false;
        self.dbbuf = None;
        self.sh.shadow.store(0, Ordering::Release);
        self.sh.db.clear_all();
        self.sh
            .csts
            .fetch_and(!(csts::RDY | csts::CFS), Ordering::SeqCst);
    }

    /// Power-on state: a controller reset plus every register.
    fn function_reset(&mut self) {
        self.controller_reset();
        let sh = &self.sh;
        sh.cc.store(0, Ordering::SeqCst);
        sh.csts.store(0, Ordering::SeqCst);
        sh.aqa.store(0, Ordering::SeqCst);
        sh.asq.store(0, Ordering::SeqCst);
        sh.acq.store(0, Ordering::SeqCst);
        sh.intms.store(0, Ordering::SeqCst);
        sh.reset_pending.store(false, Ordering::SeqCst);
        sh.shutdown_pending.store(false, Ordering::SeqCst);
    }

    /// CC.EN 0 -> 1.
    fn enable(&mut self, ccv: u32) {
        let sh = self.sh.clone();
        let cap = sh.cap;
        let mqes = (cap & 0xffff) as u32 + 1;
        let mpsmin = ((cap >> 48) & 0xf) as u32;
        let mpsmax = ((cap >> 52) & 0xf) as u32;
        let aqa = sh.aqa.load(Ordering::Acquire);
        let asq = sh.asq.load(Ordering::Acquire);
        let acq = sh.acq.load(Ordering::Acquire);
        let sq_size = (aqa & 0xfff) + 1;
        let cq_size = ((aqa >> 16) & 0xfff) + 1;
        let problem = if cc::css(ccv) != 0 {
            Some(format!("command set {} is not NVM", cc::css(ccv)))
        } else if cc::mps(ccv) < mpsmin || cc::mps(ccv) > mpsmax {
            Some(format!(
                "page size 2^{} is not supported",
                12 + cc::mps(ccv)
            ))
        } else if cc::ams(ccv) != 0 {
            Some(format!(
                "arbitration mechanism {} is not supported",
                cc::ams(ccv)
            ))
        } else if asq == 0 || acq == 0 || asq & 0xfff != 0 || acq & 0xfff != 0 {
            Some(format!(
                "admin queue addresses {asq:#x} / {acq:#x} are not page aligned"
            ))
        } else if sq_size < 2 || cq_size < 2 || sq_size > mqes || cq_size > mqes {
            Some(format!(
                "admin queue sizes {sq_size} / {cq_size} are not within 2 to {mqes}"
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            log::warn!("nvme: guest enabled the controller with an invalid configuration: {p}");
            sh.csts.fetch_or(csts::CFS, Ordering::SeqCst);
            return;
        }
        sh.page.store(4096 << cc::mps(ccv), Ordering::Release);
        sh.db.clear_pair(0);
        self.asq = Some(Sq::new(0, asq, sq_size, 0));
        self.acq = Some(Cq::new(0, acq, cq_size, 0, true));
        if let Some(i) = sh.cq_ien.first() {
            i.store(true, Ordering::Release);
        }
        if let Some(t) = sh.cq_tail.first() {
            t.store(0, Ordering::Release);
        }
        sh.set_owner(true, 0, OWNER_CTRL);
        sh.set_owner(false, 0, OWNER_CTRL);
        self.last_keep_alive = Instant::now();
        self.enabled = true;
        sh.csts.fetch_or(csts::RDY, Ordering::SeqCst);
        log::info!(
            "nvme: controller enabled (admin queues {sq_size}/{cq_size} entries, {} byte pages)",
            4096u32 << cc::mps(ccv)
        );
    }

    fn shutdown(&mut self) {
        let sh = &self.sh;
        sh.csts.fetch_and(!csts::SHST_MASK, Ordering::SeqCst);
        sh.csts.fetch_or(csts::SHST_OCCURRING, Ordering::SeqCst);
        if let Err(e) = sh.backend.flush() {
            log::error!("nvme: flush at shutdown failed: {e}");
        }
        sh.csts.fetch_and(!csts::SHST_MASK, Ordering::SeqCst);
        sh.csts.fetch_or(csts::SHST_COMPLETE, Ordering::SeqCst);
        log::info!("nvme: shutdown complete");
    }

    /// Post a completion on the admin CQ. `false` if the queue is full.
    pub(crate) fn complete_admin(&mut self, g: &mut Guest<'_>, c: Completion) -> bool {
        let sh = self.sh.clone();
        let Some(acq) = self.acq.as_mut() else {
            return false;
        };
        if acq.is_full() {
            if let Err(true) = acq.set_head(sh.db.cq_head(0)) {
                sh.raise_event(bad_doorbell_value());
            }
            if acq.is_full() {
                return false;
            }
        }
        if let Err(e) = acq.post(g, &c) {
            sh.fatal(&format!("cannot write the admin CQ: {e}"));
            return false;
        }
        true
    }

    fn service_admin(&mut self) -> bool {
        let sh = self.sh.clone();
        if !self.enabled || sh.is_fatal() || !sh.bus_master.load(Ordering::Acquire) {
            return false;
        }
        let mut g = Guest::new(&sh.dma);
        let mut work = false;
        if let Some(acq) = self.acq.as_mut() {
            if let Err(true) = acq.set_head(sh.db.cq_head(0)) {
                log::warn!(
                    "nvme: admin CQ head doorbell {} is invalid",
                    sh.db.cq_head(0)
                );
                sh.raise_event(bad_doorbell_value());
            }
        }
        if let Some(asq) = self.asq.as_mut() {
            if let Err(true) = asq.set_tail(sh.db.sq_tail(0)) {
                log::warn!(
                    "nvme: admin SQ tail doorbell {} is invalid",
                    sh.db.sq_tail(0)
                );
                sh.raise_event(bad_doorbell_value());
            }
        }
        for _ in 0..BUDGET {
            let Some(asq) = self.asq.as_mut() else { break };
            if !asq.has_work() {
                break;
            }
            if self.acq.as_ref().is_none_or(Cq::is_full) {
                // Wait for the host to make room (it rings the CQ doorbell).
                if let Some(acq) = self.acq.as_mut() {
                    let _ = acq.set_head(sh.db.cq_head(0));
                    if acq.is_full() {
                        break;
                    }
                }
            }
            let cmd = match asq.fetch(&mut g) {
                Ok(c) => c,
                Err(e) => {
                    sh.fatal(&format!("cannot read the admin SQ: {e}"));
                    break;
                }
            };
            let sqhd = asq.head as u16;
            work = true;
            let Some((status, dw0)) = self.admin(&mut g, &cmd) else {
                continue;
            };
            if !status.is_success() {
                sh.record_error(0, cmd.cid, status, cmd.nsid);
            }
            self.complete_admin(
                &mut g,
                Completion {
                    dw0,
                    dw1: 0,
                    sqhd,
                    sqid: 0,
                    cid: cmd.cid,
                    status,
                },
            );
        }
        work |= self.deliver_events(&mut g);
        if let Some(acq) = self.acq.as_mut() {
            sh.signal_cq(acq);
        }
        g.release();
        work
    }

    /// Complete outstanding AERs with queued events whose type is not
    /// masked.
    fn deliver_events(&mut self, g: &mut Guest<'_>) -> bool {
        let mut done = false;
        while !self.aers.is_empty() {
            let ev = {
                let mut q = lock(&self.sh.events);
                let pos = q
                    .iter()
                    .position(|e| self.masked_events & (1 << e.kind) == 0);
                match pos {
                    Some(p) => q.remove(p),
                    None => None,
                }
            };
            let Some(ev) = ev else { break };
            let cid = self.aers.remove(0);
            let sqhd = self.asq.as_ref().map_or(0, |q| q.head as u16);
            self.masked_events |= 1 << ev.kind;
            let dw0 = u32::from(ev.kind) | (u32::from(ev.info) << 8) | (u32::from(ev.log) << 16);
            if !self.complete_admin(
                g,
                Completion {
                    dw0,
                    dw1: 0,
                    sqhd,
                    sqid: 0,
                    cid,
                    status: Status::SUCCESS,
                },
            ) {
                // No room: try again later.
                self.aers.insert(0, cid);
                self.masked_events &= !(1 << ev.kind);
                lock(&self.sh.events).push_front(ev);
                break;
            }
            done = true;
        }
        done
    }

    /// Time left before the keep-alive timer expires, if it runs.
    fn keep_alive(&mut self) -> Option<Duration> {
        if !self.enabled || self.feat.kato == 0 || self.sh.is_fatal() {
            return None;
        }
        // KATO rounded up to the 1 s granularity advertised (KAS), plus one
        // granularity of slack.
        let kato = Duration::from_millis(u64::from(self.feat.kato).div_ceil(1000) * 1000 + 1000);
        let elapsed = self.last_keep_alive.elapsed();
        if elapsed >= kato {
            self.sh.fatal(&format!(
                "no Keep Alive for {} ms (KATO {} ms)",
                elapsed.as_millis(),
                self.feat.kato
            ));
            return None;
        }
        Some(kato - elapsed)
    }

    fn run(mut self) {
        tighten_timer_slack();
        let trap = self.sh.cfg.doorbells == DoorbellMode::Trap;
        let mut idle = Idle::new(self.sh.cfg.poll, trap);
        while !self.sh.stop.load(Ordering::Acquire) {
            let sh = self.sh.clone();
            let mut work = false;
            let flr = {
                let f = lock(&sh.flr);
                (f.0 > f.1).then_some(f.0)
            };
            if let Some(generation) = flr {
                self.function_reset();
                let mut f = lock(&sh.flr);
                f.1 = f.1.max(generation);
                sh.flr_cv.notify_all();
                work = true;
            }
            if sh.reset_pending.swap(false, Ordering::SeqCst) {
                self.controller_reset();
                log::info!("nvme: controller reset");
                work = true;
            }
            let ccv = sh.cc.load(Ordering::Acquire);
            let st = sh.csts.load(Ordering::Acquire);
            if ccv & cc::EN != 0 && !self.enabled && st & (csts::RDY | csts::CFS) == 0 {
                self.enable(ccv);
                work = true;
            }
            if sh.shutdown_pending.swap(false, Ordering::SeqCst) {
                self.shutdown();
                work = true;
            } else if cc::shn(ccv) == 0 && st & csts::SHST_MASK != 0 {
                sh.csts.fetch_and(!csts::SHST_MASK, Ordering::SeqCst);
            }
            work |= self.service_admin();
            if !trap {
                // CQ head doorbells are not trapped: follow them here.
                sh.update_intx();
            }
            let deadline = self.keep_alive();
            if work {
                idle.busy();
                continue;
            }
            if !idle.should_sleep() {
                continue;
            }
            idle.sleep(Some(deadline.unwrap_or(Duration::from_secs(1))));
        }
    }
}

/// An NVMe controller, independent of its transport: BAR0 register
/// accesses in, interrupts out through an [`InterruptSink`], guest memory
/// through the [`DmaSpace`] it was built with.
pub struct NvmeController {
    sh: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for NvmeController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeController")
            .field("backend", &self.sh.backend.describe())
            .field("config", &self.sh.cfg)
            .finish()
    }
}

/// Size of BAR0's register and doorbell part: the register page and the
/// doorbell page.
pub const BAR0_REGS_SIZE: u64 = 0x2000;

impl NvmeController {
    /// Build a controller and start its threads.
    pub fn new(
        cfg: NvmeConfig,
        backend: Arc<dyn BlockBackend>,
        dma: Arc<DmaSpace>,
        irq: Arc<dyn InterruptSink>,
    ) -> Result<NvmeController, Error> {
        cfg.validate()?;
        let ns = Namespace::of(backend.as_ref());
        if ns.blocks == 0 {
            return Err(Error::InvalidArgument("the disk has no blocks".into()));
        }
        let db = Doorbells::new(cfg.doorbells == DoorbellMode::Mmap)?;
        let mqes = u64::from(cfg.max_queue_entries - 1);
        let cap = mqes
            | (1 << 16) // CQR: queues must be physically contiguous
            | (20u64 << 24) // TO: 10 s to become ready
            | (1u64 << 37) // CSS: NVM command set
            | (4u64 << 52); // MPSMAX 64 KiB, MPSMIN 4 KiB
        let n = usize::from(cfg.max_io_queues) + 1;
        let workers = cfg.io_threads;
        let sh = Arc::new(Shared {
            ns,
            backend,
            dma,
            irq,
            cap,
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            aqa: AtomicU32::new(0),
            asq: AtomicU64::new(0),
            acq: AtomicU64::new(0),
            intms: AtomicU32::new(0),
            reset_pending: AtomicBool::new(false),
            shutdown_pending: AtomicBool::new(false),
            page: AtomicU64::new(4096),
            db,
            sq_owner: (0..n).map(|_| AtomicU16::new(OWNER_NONE)).collect(),
            cq_owner: (0..n).map(|_| AtomicU16::new(OWNER_NONE)).collect(),
            cq_tail: (0..n).map(|_| AtomicU32::new(0)).collect(),
            cq_ien: (0..n).map(|_| AtomicBool::new(false)).collect(),
            shadow: AtomicU64::new(0),
            threads: (0..=workers).map(|_| OnceLock::new()).collect(),
            ctl: (0..workers).map(|_| WorkerCtl::default()).collect(),
            stats: (0..workers).map(|_| IoStats::default()).collect(),
            counters: Counters::default(),
            events: Mutex::new(VecDeque::new()),
            errors: Mutex::new(ErrorLog::default()),
            flr: Mutex::new((0, 0)),
            flr_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            bus_master: AtomicBool::new(true),
            started: Instant::now(),
            cfg,
        });
        let mut ctrl = NvmeController {
            sh: sh.clone(),
            threads: Vec::new(),
        };
        let c = CtrlThread::new(sh.clone());
        let h = std::thread::Builder::new()
            .name("nvme-ctrl".into())
            .spawn(move || c.run())?;
        let _ = sh.threads[0].set(h.thread().clone());
        ctrl.threads.push(h);
        for w in 0..workers {
            let worker = IoWorker::new(sh.clone(), w);
            let h = std::thread::Builder::new()
                .name(format!("nvme-io{w}"))
                .spawn(move || worker.run())?;
            let _ = sh.threads[w + 1].set(h.thread().clone());
            ctrl.threads.push(h);
        }
        log::info!(
            "nvme: {} ({} blocks of {} bytes), {} I/O queues, {} I/O threads, {:?} doorbells",
            sh.backend.describe(),
            ns.blocks,
            1u32 << ns.lba_shift,
            sh.cfg.max_io_queues,
            workers,
            sh.cfg.doorbells
        );
        Ok(ctrl)
    }

    /// The configuration the controller runs with.
    pub fn config(&self) -> &NvmeConfig {
        &self.sh.cfg
    }

    /// The namespace it serves.
    pub fn namespace(&self) -> Namespace {
        self.sh.ns
    }

    /// The memfd holding the doorbell page (mmap doorbells): the client
    /// maps it at BAR0 offset [`reg::DOORBELLS`], 4096 bytes.
    pub fn doorbell_fd(&self) -> Option<Arc<OwnedFd>> {
        self.sh.db.fd().cloned()
    }

    fn reg_dword(&self, off: u64) -> u32 {
        let sh = &self.sh;
        match off {
            0x00 => sh.cap as u32,
            0x04 => (sh.cap >> 32) as u32,
            0x08 => 0x0001_0400, // 1.4.0
            reg::INTMS | reg::INTMC => sh.intms.load(Ordering::Acquire),
            reg::CC => sh.cc.load(Ordering::Acquire),
            reg::CSTS => sh.csts.load(Ordering::Acquire),
            reg::AQA => sh.aqa.load(Ordering::Acquire),
            0x28 => sh.asq.load(Ordering::Acquire) as u32,
            0x2c => (sh.asq.load(Ordering::Acquire) >> 32) as u32,
            0x30 => sh.acq.load(Ordering::Acquire) as u32,
            0x34 => (sh.acq.load(Ordering::Acquire) >> 32) as u32,
            _ => 0,
        }
    }

    /// Read BAR0 (registers and doorbells) at `offset`. Any size and
    /// alignment within the first [`BAR0_REGS_SIZE`] bytes; doorbells read
    /// as zero.
    pub fn bar0_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                *b = 0;
                continue;
            };
            *b = if at < reg::DOORBELLS {
                let dw = self.reg_dword(at & !3);
                (dw >> (8 * (at & 3))) as u8
            } else {
                0
            };
        }
    }

    /// Write BAR0 at `offset`. Registers take aligned 4-byte writes (and
    /// 8-byte writes to ASQ / ACQ); other writes are ignored, as hardware
    /// does, and logged.
    pub fn bar0_write(&self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (o, 4) if o % 4 == 0 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                if o >= reg::DOORBELLS {
                    self.doorbell_write(o, v);
                } else {
                    self.reg_write(o, v);
                }
            }
            (o @ (reg::ASQ | reg::ACQ | reg::CAP), 8) => {
                let lo = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                let hi = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
                self.reg_write(o, lo);
                self.reg_write(o + 4, hi);
            }
            (o, n) => log::debug!("nvme: ignoring {n}-byte BAR0 write at {o:#x}"),
        }
    }

    fn reg_write(&self, off: u64, v: u32) {
        let sh = &self.sh;
        let set_lo = |r: &AtomicU64, v: u32| {
            let old = r.load(Ordering::Acquire);
            r.store((old & !0xffff_ffff) | u64::from(v), Ordering::Release);
        };
        let set_hi = |r: &AtomicU64, v: u32| {
            let old = r.load(Ordering::Acquire);
            r.store(
                (old & 0xffff_ffff) | (u64::from(v) << 32),
                Ordering::Release,
            );
        };
        match off {
            reg::INTMS => {
                sh.intms.fetch_or(v, Ordering::SeqCst);
                sh.update_intx();
            }
            reg::INTMC => {
                let old = sh.intms.fetch_and(!v, Ordering::SeqCst);
                if old & v & 1 != 0 && !sh.irq.msix_enabled() && sh.intx_pending() {
                    sh.irq.signal(0);
                }
            }
            reg::CC => {
                let old = sh.cc.swap(v, Ordering::SeqCst);
                if old & cc::EN != 0 && v & cc::EN == 0 {
                    sh.reset_pending.store(true, Ordering::SeqCst);
                }
                if cc::shn(old) == 0 && cc::shn(v) != 0 {
                    sh.shutdown_pending.store(true, Ordering::SeqCst);
                }
                sh.wake(OWNER_CTRL);
            }
            reg::AQA => sh.aqa.store(v & 0x0fff_0fff, Ordering::Release),
            0x28 => set_lo(&sh.asq, v & !0xfff),
            0x2c => set_hi(&sh.asq, v),
            0x30 => set_lo(&sh.acq, v & !0xfff),
            0x34 => set_hi(&sh.acq, v),
            reg::NSSR => log::debug!("nvme: NVM subsystem reset is not supported"),
            _ => log::debug!("nvme: ignoring write of {v:#x} to read-only register {off:#x}"),
        }
    }

    fn doorbell_write(&self, off: u64, v: u32) {
        let sh = &self.sh;
        let idx = ((off - reg::DOORBELLS) / 4) as usize;
        let qid = idx / 2;
        let sq = idx % 2 == 0;
        let owners = if sq { &sh.sq_owner } else { &sh.cq_owner };
        let owner = owners
            .get(qid)
            .map_or(OWNER_NONE, |o| o.load(Ordering::SeqCst));
        if sh.csts.load(Ordering::Acquire) & csts::RDY == 0 {
            // No queue exists while the controller is not ready: nothing
            // to ring, and nothing to report through an asynchronous event
            // (it would reach the first AER after the next enable and
            // blame that session for a write of an earlier one).
            log::debug!(
                "nvme: doorbell write of {v} at {off:#x} while the controller is not ready"
            );
            return;
        }
        if owner == OWNER_NONE {
            log::debug!(
                "nvme: write of {v} to the doorbell of {} {qid}, which does not exist",
                if sq { "SQ" } else { "CQ" }
            );
            sh.raise_event(Event {
                kind: super::spec::aer::TYPE_ERROR,
                info: super::spec::aer::ERR_INVALID_DB_REGISTER,
                log: super::spec::log_page::ERROR,
            });
            return;
        }
        sh.counters
            .trapped_doorbells
            .fetch_add(1, Ordering::Relaxed);
        sh.db.set(idx, v);
        sh.wake(owner);
        if !sq {
            // The host consumed completions: the INTx level may drop.
            sh.update_intx();
        }
    }

    /// Whether the single (INTx / MSI) interrupt should be asserted: some
    /// completion queue with interrupts enabled holds entries the host has
    /// not consumed, and INTMS does not mask it.
    pub fn intx_pending(&self) -> bool {
        self.sh.intx_pending()
    }

    /// Event counts of the command path (logged when the controller goes).
    #[cfg(test)]
    pub(crate) fn counters(&self) -> &Counters {
        &self.sh.counters
    }

    /// PCI Command.Bus_Master changed: the controller does no DMA while it
    /// is clear.
    pub fn set_bus_master(&self, enabled: bool) {
        self.sh.bus_master.store(enabled, Ordering::SeqCst);
        if enabled {
            for t in self.sh.threads.iter().filter_map(OnceLock::get) {
                t.unpark();
            }
        }
    }

    /// Function level reset: back to the power-on state. Waits (bounded)
    /// for the controller's threads to drop every queue.
    pub fn reset(&self) {
        let generation = {
            let mut f = lock(&self.sh.flr);
            f.0 += 1;
            f.0
        };
        self.sh.wake(OWNER_CTRL);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut f = lock(&self.sh.flr);
        while f.1 < generation {
            let now = Instant::now();
            if now >= deadline {
                log::warn!("nvme: reset still in progress after 2 s; continuing");
                return;
            }
            f = match self.sh.flr_cv.wait_timeout(f, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

impl Drop for NvmeController {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::SeqCst);
        for t in self.sh.threads.iter().filter_map(OnceLock::get) {
            t.unpark();
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
        log::info!("nvme: {}", self.sh.counters.summary());
    }
}

#[cfg(test)]
mod idle_tests {
    use super::*;

    #[test]
    fn backoff_stays_short_while_active_and_grows_when_idle() {
        let cfg = PollConfig {
            spin: Duration::ZERO,
            min_sleep: Duration::from_micros(10),
            active_sleep: Duration::from_micros(40),
            active_window: Duration::from_millis(30),
            max_sleep: Duration::from_millis(1),
        };
        let mut idle = Idle::new(cfg, false);
        idle.busy();
        let steps: Vec<u128> = (0..5).map(|_| idle.next_sleep().as_micros()).collect();
        assert_eq!(steps, vec![10, 20, 40, 40, 40]);
        std::thread::sleep(Duration::from_millis(40));
        let steps: Vec<u128> = (0..8).map(|_| idle.next_sleep().as_micros()).collect();
        assert_eq!(steps, vec![40, 80, 160, 320, 640, 1000, 1000, 1000]);
        idle.busy();
        assert_eq!(idle.next_sleep().as_micros(), 10);
        assert!(idle.should_sleep(), "no spin window configured");
    }
}
