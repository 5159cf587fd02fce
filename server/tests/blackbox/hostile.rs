//! Dying and hostile clients against the `vdevd` binary.
//!
//! * 1,000 connections, each cut off right after a different kind of
//!   message (with or without reading the reply), some of them by a real
//!   SIGKILL of a client process: the server keeps serving, and its
//!   descriptor count and resident memory come back to their baseline.
//! * A client that sends half a message and stalls does not hold up
//!   another device of the same process, nor the process's shutdown.
//! * A client that truncates an unsealed memfd it mapped for DMA: the DMA
//!   ends with an error status, the server lives and serves the next
//!   client; a sealed memfd cannot be truncated at all.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vdevd_protocol::dma::DMA_MAP_SIZE;
use vdevd_protocol::vfio::*;
use vdevd_protocol::{
    DeviceInfoRequest, DmaMap, DmaUnmap, IrqAction, IrqData, IrqInfoRequest, RegionAccess,
    RegionData, RegionInfoRequest, Request, SetIrqs, UnmapKind,
};
use vdevd_tests::sample::{self, BAR0, BAR2, CONFIG, regs};
use vdevd_tests::{Client, EventFd, Proposal, SharedMemory};

use crate::common::{EVENT_TIMEOUT, Fixture};

const SEALED_IOVA: u64 = 0x10_0000;
const UNSEALED_IOVA: u64 = 0x20_0000;
const MSG_IOVA: u64 = 0x4000_0000;
const MEM: u64 = 1 << 20;
/// The sample device signals a finished DMA on MSI-X vector 1.
const DMA_VECTOR: usize = 1;

/// The steps of a client's life, in the order QEMU takes them; a client
/// of the kill loop stops after one of them.
const STEPS: usize = 14;

/// What a client of the kill loop holds: dropping it is what the kernel
/// does when the process dies.
struct Victim {
    c: Client,
    sealed: SharedMemory,
    unsealed: SharedMemory,
    irqs: Vec<EventFd>,
}

impl Victim {
    fn new(socket: &Path) -> Victim {
        Victim {
            c: Client::connect(socket).expect("connect"),
            sealed: SharedMemory::new("victim-sealed", MEM).expect("memfd"),
            unsealed: SharedMemory::unsealed("victim-unsealed", MEM).expect("memfd"),
            irqs: (0..4).map(|_| EventFd::new().expect("eventfd")).collect(),
        }
    }

    /// Take step `k`; wait for its reply if `wait`.
    fn step(&mut self, k: usize, wait: bool) {
        let map = |address, size| {
            Request::DmaMap(DmaMap {
                argsz: DMA_MAP_SIZE as u32,
                read: true,
                write: true,
                offset: 0,
                address,
                size,
            })
        };
        let cmd = u32::from(sample::pci::COMMAND_MEMORY | sample::pci::COMMAND_MASTER);
        let data;
        let (req, fds): (Request<'_>, Vec<RawFd>) = match k {
            0 => {
                if wait {
                    self.c.version().expect("VERSION");
                } else {
                    let body = Proposal::qemu().body();
                    self.c.send(1, 0, &body, &[]).expect("send VERSION");
                }
                return;
            }
            1 => (map(SEALED_IOVA, MEM), vec![self.sealed.file().as_raw_fd()]),
            2 => (
                map(UNSEALED_IOVA, MEM),
                vec![self.unsealed.file().as_raw_fd()],
            ),
            3 => {
                if wait {
                    self.c.dma_map_msg(MSG_IOVA, 0x10000, true).expect("map");
                    return;
                }
                (map(MSG_IOVA, 0x10000), vec![])
            }
            4 => (
                Request::DeviceGetInfo(DeviceInfoRequest { argsz: 24 }),
                vec![],
            ),
            5 => (
                Request::DeviceGetRegionInfo(RegionInfoRequest {
                    argsz: 32,
                    index: BAR2,
                }),
                vec![],
            ),
            6 => (
                Request::DeviceGetIrqInfo(IrqInfoRequest {
                    argsz: 16,
                    index: VFIO_PCI_MSIX_IRQ_INDEX,
                }),
                vec![],
            ),
            7 => (
                Request::DeviceSetIrqs(SetIrqs {
                    argsz: 20,
                    index: VFIO_PCI_MSIX_IRQ_INDEX,
                    start: 0,
                    count: 4,
                    action: IrqAction::Trigger,
                    data: IrqData::Eventfd,
                }),
                self.irqs.iter().map(|e| e.as_fd().as_raw_fd()).collect(),
            ),
            8 => {
                data = cmd.to_le_bytes();
                (
                    Request::RegionWrite(RegionData {
                        offset: sample::pci::COMMAND as u64,
                        region: CONFIG,
                        data: &data[..2],
                    }),
                    vec![],
                )
            }
            9 => {
                // A DMA from message-backed memory: the server sends
                // DMA_READs this client may never answer.
                if wait {
                    sample::start_dma(&mut self.c, MSG_IOVA, 0, 0x8000, false).expect("DMA");
                    return;
                }
                sample::program_dma(&mut self.c, MSG_IOVA, 0, 0x8000, false).expect("program");
                data = (regs::DMA_CMD_START).to_le_bytes();
                (
                    Request::RegionWrite(RegionData {
                        offset: regs::DMA_CMD,
                        region: BAR0,
                        data: &data,
                    }),
                    vec![],
                )
            }
            10 => (
                Request::RegionRead(RegionAccess {
                    offset: 0,
                    region: BAR2,
                    count: 4096,
                }),
                vec![],
            ),
            11 => (
                Request::DmaUnmap(DmaUnmap {
                    argsz: 24,
                    address: SEALED_IOVA,
                    size: MEM,
                    kind: UnmapKind::Range,
                }),
                vec![],
            ),
            12 => (Request::DeviceReset, vec![]),
            _ => {
                // Half a DMA_MAP, with its descriptor.
                let mut b = Vec::new();
                let size = (16 + DMA_MAP_SIZE) as u32;
                b.extend_from_slice(&0x7777u16.to_ne_bytes());
                b.extend_from_slice(&2u16.to_ne_bytes());
                b.extend_from_slice(&size.to_ne_bytes());
                b.extend_from_slice(&[0; 8]);
                b.extend_from_slice(&[0; 10]);
                self.c
                    .send_raw(&b, &[self.sealed.file().as_raw_fd()])
                    .expect("send half");
                return;
            }
        };
        if wait {
            // Errors are fine (a step may not apply after an earlier
            // one failed); the server must answer.
            let _ = self.c.call(&req, &fds);
        } else {
            self.c.send_request(&req, &fds, false).expect("send");
        }
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// The environment variable that makes `sigkill_victim_child` act.
pub const VICTIM_SOCKET_ENV: &str = "VDEVD_HOSTILE_VICTIM_SOCKET";
const VICTIM_STEP_ENV: &str = "VDEVD_HOSTILE_VICTIM_STEP";
const READY: &str = "VICTIM-READY";

/// The child's part of a real SIGKILL: take the steps up to the one given,
/// the last without waiting for its reply, and wait to be killed.
pub fn sigkill_victim_child(socket: &Path) {
    let last: usize = std::env::var(VICTIM_STEP_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut v = Victim::new(socket);
    for k in 0..last {
        v.step(k, true);
    }
    v.step(last, false);
    println!("{READY}");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn sigkill_victim(socket: &Path, step: usize) {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args([
            "sigkill_victim_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(VICTIM_SOCKET_ENV, socket)
        .env(VICTIM_STEP_ENV, step.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the victim");
    let mut out = child.stdout.take().expect("stdout");
    let mut text = String::new();
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while !text.contains(READY) {
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = vdevd_tests::sys::poll_readable(&[out.as_fd()], left).expect("poll");
        let mut buf = [0u8; 256];
        let n = if ready[0] {
            out.read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the victim (step {step}) never got ready: {text}");
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
}

#[test]
fn a_thousand_clients_cut_off_after_every_kind_of_message() {
    const CONNECTIONS: usize = 1000;
    // Every this many connections, the client is a process killed with
    // SIGKILL instead of one whose socket and descriptors are dropped.
    const SIGKILL_EVERY: usize = 50;
    // Under `--seccomp kill`: a system call missing from the device
    // thread's allow-list on any of these paths would end the server.
    let mut f = Fixture::new(&["--buffer-size", "65536", "--seccomp", "kill"]);
    let pid = f.server.pid();
    let socket = f.server.socket().to_path_buf();
    let started = Instant::now();
    let mut rss_base = 0;
    for i in 0..CONNECTIONS {
        let last = i % STEPS;
        if i % SIGKILL_EVERY == SIGKILL_EVERY - 1 {
            sigkill_victim(&socket, last);
        } else {
            let mut v = Victim::new(&socket);
            for k in 0..last {
                v.step(k, true);
            }
            // Half the time the reply of the last step is read.
            v.step(last, (i / STEPS) % 2 == 0);
            drop(v);
        }
        if i == 2 * STEPS * 2 {
            // Warmed up: every path has run once; allocator arenas and
            // caches have grown to their working size.
            f.check_clean("the warm-up connections");
            rss_base = rss_kib(pid);
        }
    }
    let elapsed = started.elapsed();
    f.check_clean("1,000 clients cut off");
    let rss_end = rss_kib(pid);
    eprintln!(
        "{CONNECTIONS} connections in {elapsed:?}; RSS {rss_base} KiB after warm-up, {rss_end} KiB at the end"
    );
    // A leak of one page per connection would add 4 MB.
    assert!(
        rss_end <= rss_base + 2048,
        "RSS grew from {rss_base} KiB to {rss_end} KiB; log:\n{}",
        f.server.log()
    );
    // The device works: a DMA through shared memory completes.
    let (mut c, _) = f.served();
    let mem = SharedMemory::new("after-kill-loop", MEM).expect("memfd");
    mem.write(0, b"still alive").expect("write");
    c.dma_map_fd(SEALED_IOVA, MEM, mem.file().as_fd(), 0, true)
        .expect("map");
    sample::enable_bus_master(&mut c).expect("bus master");
    let irqs = sample::enable_msix(&mut c, 2).expect("msix");
    c.write32(BAR0, regs::IRQ_ENABLE, regs::IRQ_DMA)
        .expect("IRQ_ENABLE");
    sample::start_dma(&mut c, SEALED_IOVA, 0, 11, false).expect("dma");
    sample::wait_irq(&mut c, &irqs[DMA_VECTOR], EVENT_TIMEOUT).expect("completion interrupt");
    assert_eq!(c.region_read(BAR2, 0, 11).expect("read"), b"still alive");
}

/// Spawn `vdevd --config` serving two sample devices with a control
/// socket `ctl.sock`; returns the child and the device sockets once they
/// listen.
fn two_devices(dir: &Path) -> (Child, PathBuf, PathBuf) {
    let a = dir.join("a.sock");
    let b = dir.join("b.sock");
    let ctl = dir.join("ctl.sock");
    let config = dir.join("two.toml");
    std::fs::write(
        &config,
        format!(
            "ctl_socket = \"{}\"\n\n\
             [server]\nhandshake_timeout_ms = 60000\n\n\
             [[device]]\ntype = \"sample\"\nsocket = \"{}\"\n\n\
             [[device]]\ntype = \"sample\"\nsocket = \"{}\"\n",
            ctl.display(),
            a.display(),
            b.display()
        ),
    )
    .expect("write config");
    let log = std::fs::File::create(dir.join("vdevd.log")).expect("log");
    let child = Command::new(crate::common::vdevd())
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn vdevd");
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while !(a.exists() && b.exists() && ctl.exists()) {
        assert!(Instant::now() < deadline, "vdevd did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, a, b)
}

#[test]
fn a_stalled_half_message_holds_up_no_other_device_nor_the_control_socket() {
    let dir = vdevd_tests::TempDir::new("stall").expect("tempdir");
    let (mut child, a, b) = two_devices(dir.path());
    // Device A: negotiated, then half of a REGION_READ, and silence.
    let mut stalled = Client::connect(&a).expect("connect A");
    stalled.version().expect("VERSION");
    let mut half = Vec::new();
    half.extend_from_slice(&1u16.to_ne_bytes());
    half.extend_from_slice(&9u16.to_ne_bytes());
    half.extend_from_slice(&32u32.to_ne_bytes());
    half.extend_from_slice(&[0; 8]);
    half.extend_from_slice(&[0; 6]);
    stalled.send_raw(&half, &[]).expect("send half");
    // A second client of A waits in the backlog (one client per device).
    let _waiting = std::os::unix::net::UnixStream::connect(&a).expect("connect A");
    // Device B serves a full session meanwhile, promptly.
    let t = Instant::now();
    let mut c = Client::connect(&b).expect("connect B");
    c.version().expect("VERSION on B");
    for _ in 0..100 {
        assert_eq!(
            c.read32(BAR0, regs::ID).expect("read on B"),
            sample::ID_VALUE
        );
    }
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "B was slow: {took:?}");
    // The control socket answers for both devices, A's included, while a
    // control client of its own stalls mid-line.
    let ctl = dir.path().join("ctl.sock");
    let mut half_line = std::os::unix::net::UnixStream::connect(&ctl).expect("connect ctl");
    std::io::Write::write_all(&mut half_line, b"sta").expect("half a line");
    let t = Instant::now();
    let ctl_client = std::os::unix::net::UnixStream::connect(&ctl).expect("connect ctl");
    ctl_client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    std::io::Write::write_all(&mut &ctl_client, b"status\n").expect("status");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&ctl_client), &mut line)
        .expect("status reply");
    assert!(line.starts_with("ok ["), "status of all devices: {line}");
    assert!(
        line.matches("\"name\"").count() >= 2,
        "both devices answered: {line}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the control socket was slow"
    );
    drop(half_line);
    // SIGTERM stops the process although A's client never finishes.
    // SAFETY: kill takes no pointers; the child is ours and not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vdevd did not stop with a stalled client");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "vdevd exited with {status}");
    assert!(!a.exists() && !b.exists(), "sockets removed");
}

#[test]
fn a_truncated_unsealed_memfd_gives_a_dma_error_not_a_crash() {
    let mut f = Fixture::new(&[]);
    {
        let (mut c, _) = f.served();
        let mem = SharedMemory::unsealed("truncated", MEM).expect("memfd");
        mem.write(0, &[0x5a; 4096]).expect("write");
        c.dma_map_fd(UNSEALED_IOVA, MEM, mem.file().as_fd(), 0, true)
            .expect("map");
        sample::enable_bus_master(&mut c).expect("bus master");
        let irqs = sample::enable_msix(&mut c, 2).expect("msix");
        c.write32(BAR0, regs::IRQ_ENABLE, regs::IRQ_DMA)
            .expect("IRQ_ENABLE");
        c.write32(BAR0, regs::IRQ_ENABLE, regs::IRQ_DMA)
            .expect("IRQ_ENABLE");
        // Works while the file is whole.
        sample::start_dma(&mut c, UNSEALED_IOVA, 0, 4096, false).expect("dma");
        sample::wait_irq(&mut c, &irqs[DMA_VECTOR], EVENT_TIMEOUT).expect("interrupt");
        assert_eq!(sample::dma_status(&mut c).expect("status").1, 0);
        // The client truncates its file under the mapping.
        mem.file().set_len(0).expect("truncate");
        sample::start_dma(&mut c, UNSEALED_IOVA, 0, 4096, false).expect("dma");
        sample::wait_irq(&mut c, &irqs[DMA_VECTOR], EVENT_TIMEOUT).expect("interrupt");
        let (_, err) = sample::dma_status(&mut c).expect("status");
        assert_ne!(err, 0, "a DMA from a truncated file reports an error");
        // Device to memory too.
        sample::start_dma(&mut c, 0, UNSEALED_IOVA, 4096, true).expect("dma");
        sample::wait_irq(&mut c, &irqs[DMA_VECTOR], EVENT_TIMEOUT).expect("interrupt");
        let (_, err) = sample::dma_status(&mut c).expect("status");
        // Writing past the end of a file grows it; what matters is that
        // the server is alive and answered.
        let _ = err;
        assert_eq!(c.read32(BAR0, regs::ID).expect("ID"), sample::ID_VALUE);
    }
    {
        // A sealed file cannot be shrunk under the server's mapping.
        let mem = SharedMemory::new("sealed", MEM).expect("memfd");
        assert!(mem.file().set_len(0).is_err(), "F_SEAL_SHRINK holds");
    }
    f.check_clean("a truncated memfd");
}
