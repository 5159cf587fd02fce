//! What every black-box test needs: the `vdevd` binary cargo built for
//! this test run, a server process, and the check that a server is alive,
//! serves the next client and holds no more descriptors than before.

use std::path::Path;
use std::time::Duration;

use vdevd_tests::sample::{self, BAR0};
use vdevd_tests::{Client, ServerProcess};

/// The binary under test, built by cargo for this test run (so it is never
/// stale).
pub fn vdevd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vdevd"))
}

/// Start `vdevd sample` with these extra arguments, logging at debug level
/// (the log is printed when a test fails).
pub fn start(args: &[&str]) -> ServerProcess {
    match ServerProcess::start(vdevd(), "sample", args, "debug") {
        Ok(s) => s,
        Err(e) => panic!("cannot start vdevd sample {args:?}: {e}"),
    }
}

/// A client that has completed VERSION with QEMU's proposal.
pub fn ready(server: &ServerProcess) -> Client {
    let mut c = server.connect().expect("connect");
    c.version().expect("VERSION");
    c
}

/// A server and its descriptor count while one negotiated client is
/// connected.
pub struct Fixture {
    pub server: ServerProcess,
    pub baseline: usize,
    baseline_fds: Vec<(u32, String)>,
}

impl Fixture {
    pub fn new(args: &[&str]) -> Fixture {
        let server = start(args);
        let mut f = Fixture {
            server,
            baseline: 0,
            baseline_fds: Vec::new(),
        };
        let (c, count) = f.served();
        f.baseline_fds = f.server.fds().unwrap_or_default();
        drop(c);
        f.baseline = count;
        f
    }

    /// A fresh client completes VERSION and a register read; returns it
    /// and the server's descriptor count while it is connected. The server
    /// accepts a client only after it has finished with the previous one,
    /// so every descriptor of earlier sessions has been released by then.
    pub fn served(&mut self) -> (Client, usize) {
        assert!(
            self.server.is_running(),
            "vdevd died; log:\n{}",
            self.server.log()
        );
        let mut c = self.server.connect().expect("connect");
        if let Err(e) = c.version() {
            panic!(
                "the next client was not served: {e}; log:\n{}",
                self.server.log()
            );
        }
        let id = c.read32(BAR0, sample::regs::ID).expect("read ID");
        assert_eq!(id, sample::ID_VALUE);
        let count = self.server.fd_count().expect("count descriptors");
        (c, count)
    }

    /// The server is alive, serves a new client, and holds the baseline
    /// number of descriptors.
    pub fn check_clean(&mut self, after: &str) {
        let (c, count) = self.served();
        if count != self.baseline {
            let now = self.server.fds().unwrap_or_default();
            let gone: Vec<_> = self
                .baseline_fds
                .iter()
                .filter(|f| !now.contains(f))
                .collect();
            let new: Vec<_> = now
                .iter()
                .filter(|f| !self.baseline_fds.contains(f))
                .collect();
            panic!(
                "after {after}: the server holds {count} descriptors, {} before; \
                 new: {new:?}, gone: {gone:?}\nlog:\n{}",
                self.baseline,
                self.server.log()
            );
        }
        drop(c);
    }
}

/// A generous guard for events that must happen (interrupts, DMA).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
