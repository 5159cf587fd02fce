//! `ptcheck`: the VMM side of the passthrough end-to-end checks.
//!
//! Runs inside a guest where QEMU's `edu` devices are bound to vfio-pci
//! and served by `vdevd passthrough`; speaks vfio-user to vdevd the way a
//! VMM does and drives the edu device through it. One line per check on
//! stdout, `PASS name` or `FAIL name: reason`; the exit status is 1 if a
//! check failed.
//!
//! ```text
//! ptcheck basic SOCKET            ID, liveness, factorial, DMA both ways
//!                                 through the real IOMMU, MSI to an eventfd,
//!                                 DEVICE_RESET
//! ptcheck set-fact SOCKET N       start factorial(N) and leave it there
//! ptcheck get-fact SOCKET VALUE   the factorial register holds VALUE
//! ptcheck shared SOCKET_A SOCKET_B
//!                                 client A maps memory on device A; client
//!                                 B, which maps nothing, runs DMA on device
//!                                 B from and to that memory (one address
//!                                 space shared by both devices)
//! ```

use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vdevd_tests::{Client, EventFd, SharedMemory};

const BAR0: u32 = 0;
const CONFIG: u32 = 7;
const MSI_INDEX: u32 = 1;
const EDU_ID: u32 = 0x0100_00ed;
const EDU_BUF: u64 = 0x40000;
/// Below the edu device's 28-bit DMA mask.
const IOVA: u64 = 0x10_0000;
const MEM_SIZE: u64 = 0x2000;

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

struct Checks {
    failed: bool,
}

impl Checks {
    fn run(&mut self, name: &str, f: impl FnOnce() -> Res<()>) {
        match f() {
            Ok(()) => println!("PASS {name}"),
            Err(e) => {
                println!("FAIL {name}: {e}");
                self.failed = true;
            }
        }
    }
}

fn connect(path: &str) -> Res<Client> {
    let mut c = Client::connect(Path::new(path)).map_err(err("connect"))?;
    c.set_timeout(Duration::from_secs(30))
        .map_err(err("timeout"))?;
    c.version().map_err(err("VERSION"))?;
    Ok(c)
}

fn bus_master(c: &mut Client) -> Res<()> {
    let b = c.region_read(CONFIG, 4, 2).map_err(err("config read"))?;
    let cmd = u16::from_le_bytes([b[0], b[1]]) | 0x6;
    c.region_write(CONFIG, 4, &cmd.to_le_bytes())
        .map_err(err("config write"))
}

fn wait_clear(c: &mut Client, offset: u64, bit: u32) -> Res<()> {
    let t0 = Instant::now();
    while c.read32(BAR0, offset).map_err(err("poll"))? & bit != 0 {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!("register {offset:#x} bit {bit:#x} stays set"));
        }
    }
    Ok(())
}

fn dma(c: &mut Client, src: u64, dst: u64, len: u64, cmd: u64) -> Res<()> {
    c.write64(BAR0, 0x80, src).map_err(err("DMA src"))?;
    c.write64(BAR0, 0x88, dst).map_err(err("DMA dst"))?;
    c.write64(BAR0, 0x90, len).map_err(err("DMA count"))?;
    c.write64(BAR0, 0x98, cmd).map_err(err("DMA cmd"))?;
    wait_clear(c, 0x98, 1)
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..256u32)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// DMA the pattern at IOVA into the device, then back to IOVA + 0x1000
/// (with an MSI on completion if `irq`), through `c`'s device.
fn round_trip(c: &mut Client, mem: &SharedMemory, seed: u8, irq: bool) -> Res<()> {
    let p = pattern(seed);
    mem.write(0, &p).map_err(err("fill"))?;
    mem.write(0x1000, &[0u8; 256]).map_err(err("clear"))?;
    dma(c, IOVA, EDU_BUF, 256, 0x1)?;
    dma(c, EDU_BUF, IOVA + 0x1000, 256, if irq { 0x7 } else { 0x3 })?;
    let back = mem.read(0x1000, 256).map_err(err("read back"))?;
    if back != p {
        return Err(format!(
            "memory at iova {:#x} after the round trip: {:02x?}... want {:02x?}...",
            IOVA + 0x1000,
            &back[..8],
            &p[..8]
        ));
    }
    Ok(())
}

fn basic(sock: &str) -> Res<bool> {
    let mut checks = Checks { failed: false };
    let mut c = connect(sock)?;
    checks.run("id-register", || {
        let id = c.read32(BAR0, 0).map_err(err("read"))?;
        (id == EDU_ID)
            .then_some(())
            .ok_or(format!("ID {id:#010x}, want {EDU_ID:#010x}"))
    });
    checks.run("liveness", || {
        c.write32(BAR0, 4, 0x1234_5678).map_err(err("write"))?;
        let v = c.read32(BAR0, 4).map_err(err("read"))?;
        (v == !0x1234_5678u32)
            .then_some(())
            .ok_or(format!("liveness {v:#x}"))
    });
    checks.run("factorial", || {
        c.write32(BAR0, 8, 10).map_err(err("write"))?;
        wait_clear(&mut c, 0x20, 1)?;
        let v = c.read32(BAR0, 8).map_err(err("read"))?;
        (v == 3_628_800)
            .then_some(())
            .ok_or(format!("factorial(10) = {v}"))
    });
    let mem = SharedMemory::new("ptcheck", MEM_SIZE).map_err(err("memfd"))?;
    let efd = EventFd::new().map_err(err("eventfd"))?;
    checks.run("dma", || {
        bus_master(&mut c)?;
        c.dma_map_fd(IOVA, MEM_SIZE, mem.file().as_fd(), 0, true)
            .map_err(err("DMA_MAP"))?;
        round_trip(&mut c, &mem, 1, false)
    });
    checks.run("msi", || {
        c.set_irq_eventfds(MSI_INDEX, 0, &[&efd])
            .map_err(err("SET_IRQS MSI"))?;
        round_trip(&mut c, &mem, 2, true)?;
        let n = efd
            .wait(Duration::from_secs(10))
            .map_err(err("no MSI on the eventfd"))?;
        let status = c.read32(BAR0, 0x24).map_err(err("irq status"))?;
        c.write32(BAR0, 0x64, status).map_err(err("irq ack"))?;
        (n >= 1 && status & 0x100 != 0)
            .then_some(())
            .ok_or(format!("eventfd count {n}, irq status {status:#x}"))
    });
    checks.run("reset", || {
        // DEVICE_RESET: edu has no function reset, so vdevd resets its
        // reset domain (a hot reset of the bus behind the bridge, or of the
        // device alone); the device answers again afterwards.
        c.reset().map_err(err("DEVICE_RESET"))?;
        let id = c.read32(BAR0, 0).map_err(err("read after reset"))?;
        (id == EDU_ID)
            .then_some(())
            .ok_or(format!("ID {id:#010x} after reset"))
    });
    Ok(!checks.failed)
}

fn factorial(n: u32) -> u32 {
    (1..=n).fold(1u32, |a, b| a.wrapping_mul(b))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let result: Res<bool> = match argv.as_slice() {
        ["basic", sock] => basic(sock),
        ["set-fact", sock, n] => (|| {
            let n: u32 = n.parse().map_err(err("N"))?;
            let mut c = connect(sock)?;
            c.write32(BAR0, 8, n).map_err(err("write"))?;
            wait_clear(&mut c, 0x20, 1)?;
            let v = c.read32(BAR0, 8).map_err(err("read"))?;
            println!("factorial({n}) = {v}");
            Ok(v == factorial(n))
        })(),
        ["get-fact", sock, want] => (|| {
            let want: u32 = want.parse().map_err(err("VALUE"))?;
            let mut c = connect(sock)?;
            let v = c.read32(BAR0, 8).map_err(err("read"))?;
            println!("factorial register = {v}");
            Ok(v == want)
        })(),
        ["shared", a, b] => (|| {
            let mut ca = connect(a)?;
            let mem = SharedMemory::new("ptcheck-shared", MEM_SIZE).map_err(err("memfd"))?;
            ca.dma_map_fd(IOVA, MEM_SIZE, mem.file().as_fd(), 0, true)
                .map_err(err("DMA_MAP on A"))?;
            let mut cb = connect(b)?;
            bus_master(&mut cb)?;
            let mut checks = Checks { failed: false };
            checks.run("shared-address-space", || {
                round_trip(&mut cb, &mem, 3, false)
            });
            Ok(!checks.failed)
        })(),
        _ => Err(
            "usage: ptcheck basic SOCK | set-fact SOCK N | get-fact SOCK VALUE | \
                  shared SOCK_A SOCK_B"
                .into(),
        ),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!("FAIL ptcheck: {e}");
            ExitCode::FAILURE
        }
    }
}
