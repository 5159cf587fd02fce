//! Measuring servers from outside, for the `wirebench` program: latency
//! statistics, CPU time, and system calls counted with `perf stat` on the
//! kernel's syscall tracepoints (cheap per call, and the counting window is
//! opened and closed exactly through perf's control FIFO).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Error, TempDir, sys};

/// Latencies of one run, sorted, with its wall-clock and server CPU time.
#[derive(Clone, Debug)]
pub struct Run {
    /// Operations completed.
    pub ops: u64,
    /// Wall-clock time of the run.
    pub wall: Duration,
    /// Server CPU time (all threads) spent during the run.
    pub cpu: Duration,
    /// Round-trip latency of each operation, sorted.
    pub latencies: Vec<Duration>,
}

impl Run {
    /// A run from unsorted latencies.
    pub fn new(wall: Duration, cpu: Duration, mut latencies: Vec<Duration>) -> Run {
        latencies.sort_unstable();
        Run {
            ops: latencies.len() as u64,
            wall,
            cpu,
            latencies,
        }
    }

    /// Operations per second of wall-clock time.
    pub fn ops_per_sec(&self) -> f64 {
        let s = self.wall.as_secs_f64();
        if s > 0.0 { self.ops as f64 / s } else { 0.0 }
    }

    /// The latency below which `p` percent of operations completed
    /// (nearest rank).
    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }

    /// Mean latency.
    pub fn mean(&self) -> Duration {
        let total: Duration = self.latencies.iter().sum();
        total
            .checked_div(u32::try_from(self.latencies.len()).unwrap_or(u32::MAX))
            .unwrap_or_default()
    }

    /// Server CPU time per operation.
    pub fn cpu_per_op(&self) -> Duration {
        per_op(self.cpu, self.ops)
    }
}

/// `total / ops` (zero for no operations).
pub fn per_op(total: Duration, ops: u64) -> Duration {
    if ops == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos((total.as_nanos() / u128::from(ops)) as u64)
}

/// Nearest-rank percentile of sorted values (zero for none).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of some values (the lower middle for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n => values[(n - 1) / 2],
    }
}

/// System calls a server made in a counting window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Syscalls {
    /// recvmsg.
    pub recvmsg: u64,
    /// Other reads: read, readv, recvfrom (of sockets, eventfds, files).
    pub read: u64,
    /// sendmsg.
    pub sendmsg: u64,
    /// Other writes: write, writev, sendto.
    pub write: u64,
    /// Every system call.
    pub total: u64,
}

/// Which field of [`Syscalls`] a tracepoint counts into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// [`Syscalls::recvmsg`].
    Recvmsg,
    /// [`Syscalls::read`].
    Read,
    /// [`Syscalls::sendmsg`].
    Sendmsg,
    /// [`Syscalls::write`].
    Write,
    /// [`Syscalls::total`].
    Total,
}

/// The tracepoints counted.
pub const EVENTS: [(&str, Slot); 9] = [
    ("syscalls:sys_enter_recvmsg", Slot::Recvmsg),
    ("syscalls:sys_enter_recvfrom", Slot::Read),
    ("syscalls:sys_enter_read", Slot::Read),
    ("syscalls:sys_enter_readv", Slot::Read),
    ("syscalls:sys_enter_sendmsg", Slot::Sendmsg),
    ("syscalls:sys_enter_sendto", Slot::Write),
    ("syscalls:sys_enter_write", Slot::Write),
    ("syscalls:sys_enter_writev", Slot::Write),
    ("raw_syscalls:sys_enter", Slot::Total),
];

/// Parse `perf stat -x,` output into counts.
pub fn parse_perf_csv(text: &str) -> Result<Syscalls, Error> {
    let mut s = Syscalls::default();
    let mut seen = 0;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        let (Some(count), Some(event)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        let Some((_, slot)) = EVENTS.iter().find(|(name, _)| name == event) else {
            continue;
        };
        // "<not counted>": the process made no such call in the window.
        let n: u64 = count.trim().parse().unwrap_or(0);
        let field = match slot {
            Slot::Recvmsg => &mut s.recvmsg,
            Slot::Read => &mut s.read,
            Slot::Sendmsg => &mut s.sendmsg,
            Slot::Write => &mut s.write,
            Slot::Total => &mut s.total,
        };
        *field += n;
        seen += 1;
    }
    if seen != EVENTS.len() {
        return Err(Error::Unexpected(format!(
            "perf reported {seen} of {} events:\n{text}",
            EVENTS.len()
        )));
    }
    Ok(s)
}

/// `perf stat` attached to a process, counting only while enabled.
#[derive(Debug)]
pub struct PerfCounter {
    child: Child,
    ctl: File,
    ack: File,
    out: PathBuf,
    _dir: TempDir,
}

impl PerfCounter {
    /// Attach to `pid` with counting disabled. Fails if `perf` is missing
    /// or cannot trace the process.
    pub fn attach(pid: u32) -> Result<PerfCounter, Error> {
        let dir = TempDir::new("perf")?;
        let ctl_path = dir.path().join("ctl");
        let ack_path = dir.path().join("ack");
        for p in [&ctl_path, &ack_path] {
            sys::mkfifo(p).map_err(|e| Error::io("mkfifo", e))?;
        }
        // Read-write opens of a FIFO do not wait for the other side.
        let open = |p: &PathBuf| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(p)
                .map_err(|e| Error::io(format!("open {}", p.display()), e))
        };
        let ctl = open(&ctl_path)?;
        let ack = open(&ack_path)?;
        let out = dir.path().join("perf.csv");
        let events: Vec<&str> = EVENTS.iter().map(|(e, _)| *e).collect();
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-D", "-1", "--control"])
            .arg(format!(
                "fifo:{},{}",
                ctl_path.display(),
                ack_path.display()
            ))
            .arg("-o")
            .arg(&out)
            .args(["-e", &events.join(",")])
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::io("spawn perf", e))?;
        let mut p = PerfCounter {
            child,
            ctl,
            ack,
            out,
            _dir: dir,
        };
        // A round trip on the control FIFO proves perf is attached.
        p.command("disable")?;
        Ok(p)
    }

    fn command(&mut self, what: &str) -> Result<(), Error> {
        self.ctl
            .write_all(format!("{what}\n").as_bytes())
            .map_err(|e| Error::io("perf control", e))?;
        let timeout = Duration::from_secs(10);
        let ready =
            sys::poll_readable(&[self.ack.as_fd()], timeout).map_err(|e| Error::io("poll", e))?;
        if !ready.first().copied().unwrap_or(false) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return Err(Error::Timeout {
                timeout,
                what: format!("perf to acknowledge {what}"),
            });
        }
        let mut buf = [0u8; 16];
        let n = self
            .ack
            .read(&mut buf)
            .map_err(|e| Error::io("perf ack", e))?;
        if !buf[..n].starts_with(b"ack") {
            return Err(Error::Unexpected(format!(
                "perf answered {:?}",
                String::from_utf8_lossy(&buf[..n])
            )));
        }
        Ok(())
    }

    /// Start counting.
    pub fn enable(&mut self) -> Result<(), Error> {
        self.command("enable")
    }

    /// Stop counting.
    pub fn disable(&mut self) -> Result<(), Error> {
        self.command("disable")
    }

    /// Stop perf and read what it counted.
    pub fn finish(mut self) -> Result<Syscalls, Error> {
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|_| Error::Unexpected("pid out of range".into()))?;
        // SAFETY: kill takes no pointers; the pid is our unreaped child.
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            return Err(Error::io("kill perf", std::io::Error::last_os_error()));
        }
        self.child.wait().map_err(|e| Error::io("wait perf", e))?;
        let text = std::fs::read_to_string(&self.out).map_err(|e| Error::io("perf output", e))?;
        parse_perf_csv(&text)
    }
}

impl Drop for PerfCounter {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(v: u64) -> Duration {
        Duration::from_micros(v)
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let r = Run::new(
            Duration::from_secs(2),
            us(50),
            (1..=100).rev().map(us).collect(),
        );
        assert_eq!(r.ops, 100);
        assert_eq!(r.percentile(50.0), us(50));
        assert_eq!(r.percentile(99.0), us(99));
        assert_eq!(r.percentile(100.0), us(100));
        assert_eq!(r.percentile(0.0), us(1));
        assert_eq!(r.mean(), Duration::from_nanos(50_500));
        assert_eq!(r.ops_per_sec(), 50.0);
        assert_eq!(r.cpu_per_op(), Duration::from_nanos(500));
        let empty = Run::new(Duration::ZERO, Duration::ZERO, Vec::new());
        assert_eq!(
            (empty.percentile(50.0), empty.mean(), empty.ops_per_sec()),
            (Duration::ZERO, Duration::ZERO, 0.0)
        );
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.0);
    }

    #[test]
    fn perf_csv_is_summed_by_direction() {
        let text = "# started on Sat\n\n\
            10,,syscalls:sys_enter_recvmsg,100,100.00,,\n\
            <not counted>,,syscalls:sys_enter_recvfrom,0,0.00,,\n\
            5,,syscalls:sys_enter_read,100,100.00,,\n\
            0,,syscalls:sys_enter_readv,100,100.00,,\n\
            7,,syscalls:sys_enter_sendmsg,100,100.00,,\n\
            0,,syscalls:sys_enter_sendto,100,100.00,,\n\
            2,,syscalls:sys_enter_write,100,100.00,,\n\
            0,,syscalls:sys_enter_writev,100,100.00,,\n\
            40,,raw_syscalls:sys_enter,100,100.00,,\n";
        assert_eq!(
            parse_perf_csv(text).unwrap(),
            Syscalls {
                recvmsg: 10,
                read: 5,
                sendmsg: 7,
                write: 2,
                total: 40
            }
        );
        assert!(parse_perf_csv("1,,raw_syscalls:sys_enter,1,100.00,,\n").is_err());
    }
}
