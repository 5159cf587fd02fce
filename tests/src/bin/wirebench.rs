//! wirebench: vdevd's wire performance against a peer measured in the same
//! run.
//!
//! ```text
//! cargo build --release -p vdevd -p vdevd-tests
//! target/release/wirebench [--vdevd PATH] [--ops N] [--pairs N] [--live N]
//!                          [--rounds N] [--no-perf] [--only region|dma]
//! ```
//!
//! Two servers run as processes of their own: `vdevd sample` and the peer,
//! the `vfio_user` crate's `Server` (0.1.7) with a backend of this program
//! that serves the same 4-byte registers (`wirebench peer --socket PATH`,
//! started by wirebench itself). For each scenario and server the client
//! (this process) measures round trips; the server's CPU time comes from
//! the scheduler's per-thread accounting, its system calls from `perf stat`
//! on the syscall tracepoints in a separate, shorter pass (so that counting
//! does not disturb the timed pass).
//!
//! Scenarios:
//! * 4-byte REGION_READ (BAR0 `ID`) and REGION_WRITE (BAR0 `LIVENESS`), with
//!   1 and with 16 requests in flight (each request its own `sendmsg`, as
//!   QEMU's vCPUs send them);
//! * DMA_MAP + DMA_UNMAP of one 4 KiB range with a descriptor, while 16 and
//!   while 65,536 other mappings are live. All ranges come from one memfd
//!   sealed against shrinking, like QEMU's guest RAM: vdevd's zero-copy path
//!   (one mmap per file), not its pread/pwrite path for unsealed files. The
//!   peer's backend only records the range in an ordered map and closes the
//!   descriptor (no mmap), so it does less work per map than vdevd.
//!
//! Figures are the median over `--rounds` rounds; ratios are vdevd / peer.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vdevd_protocol::Command;
use vdevd_protocol::header::FLAG_TYPE_COMMAND;
use vdevd_tests::bench::{self, PerfCounter, Run, Syscalls};
use vdevd_tests::process::find_vdevd;
use vdevd_tests::sample::{BAR0, ID_VALUE, regs};
use vdevd_tests::{Client, Error, ServerProcess, SharedMemory};

const USAGE: &str = "\
usage: wirebench [--vdevd PATH] [--ops N] [--pairs N] [--live N] [--rounds N]
                 [--no-perf] [--only region|dma]
  --vdevd PATH   the vdevd binary (default: $VDEVD_BIN, or next to wirebench)
  --ops N        region operations per round and scenario (default 50000)
  --pairs N      DMA_MAP+DMA_UNMAP pairs per round and scenario (default 5000)
  --live N       live mappings of the large DMA scenario (default 65536)
  --rounds N     rounds per scenario; figures are medians (default 3)
  --no-perf      do not count system calls with perf
  --only WHAT    run only the region or the dma scenarios";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("peer") {
        return peer::serve(&args[1..]);
    }
    let opts = match Options::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("wirebench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wirebench: {e}");
            ExitCode::FAILURE
        }
    }
}

const PAGE: u64 = 4096;
const RAM: u64 = 0x1_0000_0000;

struct Options {
    vdevd: PathBuf,
    ops: u64,
    pairs: u64,
    live: u64,
    rounds: usize,
    perf: bool,
    region: bool,
    dma: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options {
            vdevd: PathBuf::new(),
            ops: 50_000,
            pairs: 5_000,
            live: 65_536,
            rounds: 3,
            perf: true,
            region: true,
            dma: true,
        };
        let mut vdevd = None;
        let mut it = args.iter();
        let num = |v: Option<&String>, name: &str| -> Result<u64, String> {
            v.and_then(|s| s.parse().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{name} needs a positive number"))
        };
        while let Some(a) = it.next() {
            match a.as_str() {
                "--vdevd" => vdevd = Some(PathBuf::from(it.next().ok_or("--vdevd needs a path")?)),
                "--ops" => o.ops = num(it.next(), "--ops")?,
                "--pairs" => o.pairs = num(it.next(), "--pairs")?,
                "--live" => o.live = num(it.next(), "--live")?,
                "--rounds" => o.rounds = num(it.next(), "--rounds")? as usize,
                "--no-perf" => o.perf = false,
                "--only" => match it.next().map(String::as_str) {
                    Some("region") => o.dma = false,
                    Some("dma") => o.region = false,
                    _ => return Err("--only takes region or dma".into()),
                },
                "-h" | "--help" => return Err("help".into()),
                other => return Err(format!("unknown argument {other}")),
            }
        }
        o.vdevd = vdevd
            .or_else(find_vdevd)
            .ok_or("no vdevd binary: build it (cargo build -p vdevd) or pass --vdevd")?;
        Ok(o)
    }
}

/// The servers, vdevd first.
const NAMES: [&str; 2] = ["vdevd", "peer"];

/// One server's figures for one scenario: the median of the rounds.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    ops_per_sec: f64,
    p50: f64,
    p99: f64,
    cpu_per_op: f64,
    /// System calls per operation: recvmsg, other reads, sendmsg, other
    /// writes, all.
    syscalls: Option<[f64; 5]>,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn figures(runs: &[Run], syscalls: Option<(Syscalls, u64)>) -> Figures {
    Figures {
        ops_per_sec: bench::median(runs.iter().map(Run::ops_per_sec).collect()),
        p50: bench::median(runs.iter().map(|r| us(r.percentile(50.0))).collect()),
        p99: bench::median(runs.iter().map(|r| us(r.percentile(99.0))).collect()),
        cpu_per_op: bench::median(runs.iter().map(|r| us(r.cpu_per_op())).collect()),
        syscalls: syscalls.map(|(s, ops)| {
            [s.recvmsg, s.read, s.sendmsg, s.write, s.total].map(|n| n as f64 / ops.max(1) as f64)
        }),
    }
}

fn run(o: &Options) -> Result<(), Error> {
    let me = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
    let max_maps = (o.live + 64).to_string();
    let mut servers = [
        ServerProcess::start(&o.vdevd, "sample", &["--max-dma-maps", &max_maps], "warn")?,
        ServerProcess::start(&me, "peer", &[], "warn")?,
    ];
    let perf = o.perf && perf_works(servers[0].pid());
    println!(
        "wirebench: vdevd {} (pid {}) vs the vfio_user 0.1.7 Server (pid {}), same run",
        o.vdevd.display(),
        servers[0].pid(),
        servers[1].pid()
    );
    println!(
        "{} rounds per scenario, the two servers alternating; medians of the rounds. Latency: the \
         client's round trip. CPU: all server threads. Syscalls: {}.",
        o.rounds,
        if perf {
            "perf stat on the syscall tracepoints, in a separate pass of a quarter of the operations"
        } else {
            "not counted (perf unavailable or --no-perf)"
        }
    );
    println!();
    println!(
        "{:<30} {:<6} {:>9} {:>7} {:>7} {:>7} {:>7} {:>5} {:>7} {:>5} {:>5}",
        "", "", "", "", "", "server", "", "", "", "", "all"
    );
    println!(
        "{:<30} {:<6} {:>9} {:>7} {:>7} {:>7} {:>7} {:>5} {:>7} {:>5} {:>5}",
        "scenario (per op)",
        "server",
        "ops/s",
        "p50 us",
        "p99 us",
        "CPU us",
        "recvmsg",
        "read",
        "sendmsg",
        "write",
        "sys"
    );
    if o.region {
        for (write, depth) in [(false, 1), (false, 16), (true, 1), (true, 16)] {
            let name = format!(
                "{} 4 B, {depth} in flight",
                if write { "REGION_WRITE" } else { "REGION_READ" }
            );
            let got = region_scenario(&mut servers, write, depth, o, perf)?;
            for (who, f) in NAMES.iter().zip(&got) {
                print_row(&name, who, f);
            }
            print_ratio(&got[0], &got[1]);
        }
    }
    if o.dma {
        let mut by_live = Vec::new();
        for live in [16, o.live] {
            let name = format!("MAP+UNMAP fd, {live} live");
            let got = dma_scenario(&mut servers, live, o, perf)?;
            for (who, f) in NAMES.iter().zip(&got) {
                print_row(&name, who, &f.pair);
                println!(
                    "{:<30} {:<6} DMA_MAP p50 {:.1} us, DMA_UNMAP p50 {:.1} us",
                    "", "", f.map_p50, f.unmap_p50
                );
            }
            print_ratio(&got[0].pair, &got[1].pair);
            by_live.push(got);
        }
        if let [small, large] = by_live.as_slice() {
            println!();
            for (i, who) in NAMES.iter().enumerate() {
                println!(
                    "{who}: at {} live mappings vs 16: DMA_MAP p50 {:.2}x, server CPU per \
                     map+unmap {:.2}x",
                    o.live,
                    large[i].map_p50 / small[i].map_p50.max(f64::MIN_POSITIVE),
                    large[i].pair.cpu_per_op / small[i].pair.cpu_per_op.max(f64::MIN_POSITIVE)
                );
            }
        }
    }
    let _ = std::io::stdout().flush();
    for (who, server) in NAMES.iter().zip(servers.iter_mut()) {
        if !server.is_running() {
            return Err(Error::Unexpected(format!(
                "{who} died; log:\n{}",
                server.log()
            )));
        }
    }
    Ok(())
}

fn print_row(name: &str, who: &str, f: &Figures) {
    let sys = match f.syscalls {
        Some(v) => v.map(|x| format!("{x:.2}")),
        None => Default::default(),
    };
    println!(
        "{name:<30} {who:<6} {:>9.0} {:>7.1} {:>7.1} {:>7.2} {:>7} {:>5} {:>7} {:>5} {:>5}",
        f.ops_per_sec, f.p50, f.p99, f.cpu_per_op, sys[0], sys[1], sys[2], sys[3], sys[4]
    );
}

fn print_ratio(v: &Figures, p: &Figures) {
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}x", a / b)
        } else {
            "-".into()
        }
    };
    let total = match (v.syscalls, p.syscalls) {
        (Some(a), Some(b)) => ratio(a[4], b[4]),
        _ => "-".into(),
    };
    println!(
        "{:<30} {:<6} {:>9} {:>7} {:>7} {:>7} {:>7} {:>5} {:>7} {:>5} {:>5}",
        "",
        "v/peer",
        ratio(v.ops_per_sec, p.ops_per_sec),
        ratio(v.p50, p.p50),
        ratio(v.p99, p.p99),
        ratio(v.cpu_per_op, p.cpu_per_op),
        "",
        "",
        "",
        "",
        total
    );
}

/// Whether perf can count this process's system calls.
fn perf_works(pid: u32) -> bool {
    let check = || -> Result<Syscalls, Error> {
        let mut p = PerfCounter::attach(pid)?;
        p.enable()?;
        p.disable()?;
        p.finish()
    };
    match check() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("wirebench: not counting system calls: {e}");
            false
        }
    }
}

/// A client that has completed VERSION with QEMU's proposal.
fn client(server: &ServerProcess) -> Result<Client, Error> {
    let mut c = server.connect()?;
    c.version()?;
    Ok(c)
}

/// Time `f` against `server`: wall clock, server CPU, latencies.
fn timed(
    server: &ServerProcess,
    f: impl FnOnce() -> Result<Vec<Duration>, Error>,
) -> Result<Run, Error> {
    let cpu0 = server.cpu_time_precise()?;
    let t0 = Instant::now();
    let lat = f()?;
    let wall = t0.elapsed();
    let cpu = server.cpu_time_precise()?.saturating_sub(cpu0);
    Ok(Run::new(wall, cpu, lat))
}

/// Count `server`'s system calls while `f` runs.
fn counted(
    server: &ServerProcess,
    f: impl FnOnce() -> Result<u64, Error>,
) -> Result<(Syscalls, u64), Error> {
    let mut p = PerfCounter::attach(server.pid())?;
    p.enable()?;
    let ops = f()?;
    p.disable()?;
    Ok((p.finish()?, ops))
}

// --- region accesses ------------------------------------------------------

fn region_body(write: bool) -> (u16, Vec<u8>) {
    let (offset, count) = if write {
        (regs::LIVENESS, 4u32)
    } else {
        (regs::ID, 4u32)
    };
    let mut b = offset.to_ne_bytes().to_vec();
    b.extend_from_slice(&BAR0.to_ne_bytes());
    b.extend_from_slice(&count.to_ne_bytes());
    if write {
        b.extend_from_slice(&0x5a5a_5a5au32.to_le_bytes());
        (Command::RegionWrite.into(), b)
    } else {
        (Command::RegionRead.into(), b)
    }
}

/// `ops` requests with `depth` in flight; the latency of each.
fn region_ops(c: &mut Client, write: bool, depth: usize, ops: u64) -> Result<Vec<Duration>, Error> {
    let (command, body) = region_body(write);
    let mut sent_at: Vec<Option<Instant>> = vec![None; 1 << 16];
    let mut latencies = Vec::with_capacity(ops as usize);
    let (mut sent, mut in_flight) = (0u64, 0usize);
    while (latencies.len() as u64) < ops {
        while in_flight < depth && sent < ops {
            let t = Instant::now();
            let id = c.send(command, FLAG_TYPE_COMMAND, &body, &[])?;
            sent_at[usize::from(id)] = Some(t);
            in_flight += 1;
            sent += 1;
        }
        let m = c.recv()?;
        let t = sent_at[usize::from(m.header.msg_id)]
            .take()
            .ok_or_else(|| Error::Unexpected(format!("reply id {}", m.header.msg_id)))?;
        latencies.push(t.elapsed());
        in_flight -= 1;
        if let Some(e) = m.errno() {
            return Err(Error::Errno { command, errno: e });
        }
        if !write && m.body.get(16..20) != Some(&ID_VALUE.to_le_bytes()[..]) {
            return Err(Error::Unexpected(format!("REGION_READ reply {:?}", m.body)));
        }
    }
    Ok(latencies)
}

fn region_scenario(
    servers: &mut [ServerProcess; 2],
    write: bool,
    depth: usize,
    o: &Options,
    perf: bool,
) -> Result<[Figures; 2], Error> {
    let mut clients = [client(&servers[0])?, client(&servers[1])?];
    for c in &mut clients {
        region_ops(c, write, depth, (o.ops / 10).max(100))?;
    }
    let mut runs: [Vec<Run>; 2] = Default::default();
    for _ in 0..o.rounds {
        for i in 0..2 {
            let c = &mut clients[i];
            runs[i].push(timed(&servers[i], || region_ops(c, write, depth, o.ops))?);
        }
    }
    let mut out = [Figures::default(); 2];
    for i in 0..2 {
        let syscalls = if perf {
            let n = (o.ops / 4).max(100);
            let c = &mut clients[i];
            Some(counted(&servers[i], || {
                region_ops(c, write, depth, n).map(|_| n)
            })?)
        } else {
            None
        };
        out[i] = figures(&runs[i], syscalls);
    }
    Ok(out)
}

// --- DMA map/unmap --------------------------------------------------------

#[derive(Clone, Copy, Debug, Default)]
struct DmaFigures {
    /// Per map+unmap pair.
    pair: Figures,
    map_p50: f64,
    unmap_p50: f64,
}

fn map_body(iova: u64, offset: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&32u32.to_ne_bytes());
    b.extend_from_slice(&3u32.to_ne_bytes()); // READ | WRITE
    for v in [offset, iova, PAGE] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    b
}

fn unmap_body(iova: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(&24u32.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&iova.to_ne_bytes());
    b.extend_from_slice(&PAGE.to_ne_bytes());
    b
}

/// Map `live` pages (every other page of the file), 64 requests in flight.
fn populate(c: &mut Client, mem: &SharedMemory, live: u64) -> Result<(), Error> {
    let fd = mem.as_raw_fd();
    let (mut sent, mut done, mut in_flight) = (0u64, 0u64, 0u64);
    while done < live {
        while in_flight < 64 && sent < live {
            let off = 2 * sent * PAGE;
            c.send(
                Command::DmaMap.into(),
                FLAG_TYPE_COMMAND,
                &map_body(RAM + off, off),
                &[fd],
            )?;
            sent += 1;
            in_flight += 1;
        }
        let m = c.recv()?;
        if let Some(e) = m.errno() {
            return Err(Error::Errno {
                command: Command::DmaMap.into(),
                errno: e,
            });
        }
        done += 1;
        in_flight -= 1;
    }
    Ok(())
}

/// `pairs` map+unmap pairs in the gaps between the live mappings; the
/// latency of each map, of each unmap, and of each pair.
fn map_pairs(
    c: &mut Client,
    mem: &SharedMemory,
    live: u64,
    pairs: u64,
    start: u64,
) -> Result<[Vec<Duration>; 3], Error> {
    let fd = mem.as_raw_fd();
    let mut out: [Vec<Duration>; 3] = Default::default();
    for k in start..start + pairs {
        let slot = k.wrapping_mul(7919) % live;
        let off = (2 * slot + 1) * PAGE;
        let t0 = Instant::now();
        c.call_raw(Command::DmaMap.into(), &map_body(RAM + off, off), &[fd])?;
        let t1 = Instant::now();
        c.call_raw(Command::DmaUnmap.into(), &unmap_body(RAM + off), &[])?;
        let t2 = Instant::now();
        out[0].push(t1 - t0);
        out[1].push(t2 - t1);
        out[2].push(t2 - t0);
    }
    Ok(out)
}

fn dma_scenario(
    servers: &mut [ServerProcess; 2],
    live: u64,
    o: &Options,
    perf: bool,
) -> Result<[DmaFigures; 2], Error> {
    let mem = SharedMemory::new("wirebench-ram", (2 * live + 2) * PAGE)?;
    let mut clients = [client(&servers[0])?, client(&servers[1])?];
    for c in &mut clients {
        populate(c, &mem, live)?;
        map_pairs(c, &mem, live, (o.pairs / 10).max(16), 0)?;
    }
    let mut runs: [Vec<Run>; 2] = Default::default();
    let mut map_p50: [Vec<f64>; 2] = Default::default();
    let mut unmap_p50: [Vec<f64>; 2] = Default::default();
    for round in 0..o.rounds as u64 {
        for i in 0..2 {
            let c = &mut clients[i];
            let mut parts = None;
            let run = timed(&servers[i], || {
                let [maps, unmaps, pairs] = map_pairs(c, &mem, live, o.pairs, round * o.pairs)?;
                parts = Some((maps, unmaps));
                Ok(pairs)
            })?;
            if let Some((mut maps, mut unmaps)) = parts {
                maps.sort_unstable();
                unmaps.sort_unstable();
                map_p50[i].push(us(bench::percentile(&maps, 50.0)));
                unmap_p50[i].push(us(bench::percentile(&unmaps, 50.0)));
            }
            runs[i].push(run);
        }
    }
    let mut out = [DmaFigures::default(); 2];
    for i in 0..2 {
        let syscalls = if perf {
            let n = (o.pairs / 4).max(16);
            let c = &mut clients[i];
            Some(counted(&servers[i], || {
                map_pairs(c, &mem, live, n, 1 << 40).map(|_| n)
            })?)
        } else {
            None
        };
        out[i] = DmaFigures {
            pair: figures(&runs[i], syscalls),
            map_p50: bench::median(std::mem::take(&mut map_p50[i])),
            unmap_p50: bench::median(std::mem::take(&mut unmap_p50[i])),
        };
    }
    // Leaving drops every mapping (not measured).
    drop(clients);
    Ok(out)
}

/// The peer: the `vfio_user` crate's server with a backend that serves
/// the sample device's `ID` and `LIVENESS` registers and records DMA
/// mappings in an ordered map.
mod peer {
    use std::collections::BTreeMap;
    use std::fs::File;
    use std::io::{self, Write};
    use std::path::Path;
    use std::process::ExitCode;

    use vdevd_protocol::vfio::*;
    use vdevd_tests::sample::{ID_VALUE, regs};
    use vfio_bindings::bindings::vfio::vfio_region_info;
    use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

    #[derive(Default)]
    struct Backend {
        liveness: u32,
        /// IOVA -> (size, file offset).
        maps: BTreeMap<u64, (u64, u64)>,
    }

    fn invalid(what: &str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
    }

    impl ServerBackend for Backend {
        fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
            data.fill(0);
            if region == VFIO_PCI_BAR0_REGION_INDEX {
                let value = match offset {
                    regs::ID => ID_VALUE,
                    regs::LIVENESS => !self.liveness,
                    _ => 0,
                };
                let bytes = value.to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&bytes[..n]);
            }
            Ok(())
        }

        fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
            if region == VFIO_PCI_BAR0_REGION_INDEX && offset == regs::LIVENESS {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    self.liveness = u32::from_le_bytes(b);
                }
            }
            Ok(())
        }

        fn dma_map(
            &mut self,
            _flags: DmaMapFlags,
            offset: u64,
            address: u64,
            size: u64,
            fd: Option<File>,
        ) -> io::Result<()> {
            let end = address
                .checked_add(size)
                .filter(|_| size != 0)
                .ok_or_else(|| invalid("range"))?;
            if let Some((&start, &(len, _))) = self.maps.range(..end).next_back() {
                if start + len > address {
                    return Err(invalid("overlap"));
                }
            }
            self.maps.insert(address, (size, offset));
            // The descriptor is closed here: no mmap, no file kept.
            drop(fd);
            Ok(())
        }

        fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
            // The crate names bit 2 UNMAP_ALL; VFIO's is bit 1.
            if flags.bits() & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
                self.maps.clear();
                return Ok(());
            }
            match self.maps.get(&address) {
                Some(&(len, _)) if len == size => {
                    self.maps.remove(&address);
                    Ok(())
                }
                _ => Err(invalid("no such mapping")),
            }
        }

        fn reset(&mut self) -> io::Result<()> {
            self.liveness = 0;
            Ok(())
        }

        fn set_irqs(
            &mut self,
            _index: u32,
            _flags: u32,
            _start: u32,
            _count: u32,
            _fds: Vec<File>,
        ) -> io::Result<()> {
            Ok(())
        }
    }

    fn region(index: u32, size: u64) -> ServerRegion {
        let flags = if size == 0 {
            0
        } else {
            VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
        };
        ServerRegion {
            region_info: vfio_region_info {
                argsz: 32,
                flags,
                index,
                cap_offset: 0,
                size,
                offset: 0,
            },
            sparse_areas: Vec::new(),
            mmap_fd: None,
        }
    }

    /// `wirebench peer --socket PATH`: serve clients one after another.
    pub fn serve(args: &[String]) -> ExitCode {
        let Some(path) = args
            .iter()
            .position(|a| a == "--socket")
            .and_then(|i| args.get(i + 1))
        else {
            eprintln!("wirebench peer: --socket PATH is required");
            return ExitCode::from(2);
        };
        let regions = (0..VFIO_PCI_NUM_REGIONS)
            .map(|i| {
                let size = match i {
                    VFIO_PCI_BAR0_REGION_INDEX => 0x1000,
                    VFIO_PCI_CONFIG_REGION_INDEX => 4096,
                    _ => 0,
                };
                region(i, size)
            })
            .collect();
        let irqs = (0..VFIO_PCI_NUM_IRQS)
            .map(|index| IrqInfo {
                index,
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                    4
                } else {
                    1
                },
            })
            .collect();
        let server = match Server::new(Path::new(path), true, irqs, regions) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("wirebench peer: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("wirebench: serving peer (vfio_user 0.1.7 Server) on {path}");
        let _ = io::stdout().flush();
        loop {
            let mut backend = Backend::default();
            if let Err(e) = server.run(&mut backend) {
                eprintln!("wirebench peer: {e}");
            }
        }
    }
}
