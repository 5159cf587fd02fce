//! Every resource limit of the server, hit by a client, and the socket's
//! access control: each limit is set on the command line, hit, and the
//! server is seen to refuse cleanly and keep serving.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vdevd_protocol::Request;
use vdevd_protocol::region::RegionAccess;
use vdevd_tests::sample::{self, BAR0, BAR2};
use vdevd_tests::{Proposal, SharedMemory};

use crate::common::{Fixture, start};

const MIB: u64 = 1 << 20;

#[test]
fn mapped_bytes_are_capped_per_client() {
    let mut f = Fixture::new(&["--max-dma-bytes", "2097152"]);
    {
        let (mut c, _) = f.served();
        let mem = SharedMemory::new("cap", 3 * MIB).expect("memfd");
        c.dma_map_fd(0x10_0000, MIB, mem.file().as_fd(), 0, true)
            .expect("first MiB");
        c.dma_map_fd(0x20_0000, MIB, mem.file().as_fd(), MIB, true)
            .expect("second MiB");
        let e = c
            .dma_map_fd(0x30_0000, MIB, mem.file().as_fd(), 2 * MIB, true)
            .expect_err("a third MiB is above the cap");
        assert_eq!(e.errno(), Some(libc::ENOSPC as u32), "{e}");
        // Unmapping makes room again.
        c.call(
            &Request::DmaUnmap(vdevd_protocol::DmaUnmap {
                argsz: 24,
                address: 0x10_0000,
                size: MIB,
                kind: vdevd_protocol::UnmapKind::Range,
            }),
            &[],
        )
        .expect("unmap");
        c.dma_map_fd(0x30_0000, MIB, mem.file().as_fd(), 2 * MIB, true)
            .expect("room again");
    }
    f.check_clean("the mapped-bytes cap");
}

#[test]
fn transfers_above_max_data_xfer_size_are_refused() {
    let mut f = Fixture::new(&["--max-data-xfer-size", "4096"]);
    {
        let (mut c, _) = f.served();
        let e = c
            .region_read(BAR2, 0, 8192)
            .expect_err("8 KiB read above a 4 KiB limit");
        assert_eq!(e.errno(), Some(libc::E2BIG as u32), "{e}");
        assert_eq!(c.region_read(BAR2, 0, 4096).expect("4 KiB").len(), 4096);
    }
    f.check_clean("oversized transfers");
}

#[test]
fn a_client_that_never_reads_its_replies_is_cut_off() {
    // Replies not yet read by the client are the server's in-flight
    // requests: bounded by the output queue (16 MiB at least), after
    // which the client is disconnected rather than buffered without end.
    let mut f = Fixture::new(&[
        "--max-data-xfer-size",
        "1048576",
        "--buffer-size",
        "1048576",
    ]);
    {
        let (mut c, _) = f.served();
        let req = Request::RegionRead(RegionAccess {
            offset: 0,
            region: BAR2,
            count: MIB as u32,
        });
        let started = Instant::now();
        let mut sent = 0;
        let mut cut_off = false;
        // 64 MiB of replies asked for, none read.
        for _ in 0..64 {
            if c.send_request(&req, &[], false).is_err() {
                cut_off = true;
                break;
            }
            sent += 1;
        }
        if !cut_off {
            // The server has closed: the socket reads EOF after whatever
            // replies it managed to send.
            c.set_timeout(Duration::from_secs(10)).expect("timeout");
            cut_off = c.expect_close().is_ok();
        }
        assert!(
            cut_off,
            "the server kept a client that read nothing after {sent} 1 MiB reads"
        );
        assert!(started.elapsed() < Duration::from_secs(20));
    }
    f.check_clean("a client that does not read");
    assert!(
        f.server.log().contains("output"),
        "the reason is logged:\n{}",
        f.server.log()
    );
}

/// A non-blocking connect to `path`: whether the kernel queued it.
fn try_connect(path: &Path) -> Option<OwnedFd> {
    // SAFETY: socket takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    assert!(fd >= 0);
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: addr is a valid sockaddr_un of the size given.
    let r = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    (r == 0).then_some(fd)
}

#[test]
fn queued_connections_are_bounded_by_the_backlog() {
    let mut f = Fixture::new(&["--listen-backlog", "2"]);
    let (c, _) = f.served();
    // The device serves `c`; further connections wait in the backlog
    // until it is full, then are refused at once (EAGAIN), not hung.
    let mut queued = Vec::new();
    for _ in 0..20 {
        match try_connect(f.server.socket()) {
            Some(fd) => queued.push(fd),
            None => break,
        }
    }
    // Linux queues backlog + 1.
    assert!(
        (2..=3).contains(&queued.len()),
        "{} connections queued with a backlog of 2",
        queued.len()
    );
    drop(queued);
    drop(c);
    f.check_clean("a full backlog");
}

#[test]
fn warnings_of_a_flood_of_bad_messages_are_rate_limited() {
    let mut f = Fixture::new(&["--log-warnings-per-sec", "5"]);
    {
        let (mut c, _) = f.served();
        f.server.new_log();
        // A second of bad requests: a region that does not exist.
        let started = Instant::now();
        let mut sent = 0;
        while started.elapsed() < Duration::from_millis(800) {
            let e = c.region_read(42, 0, 4).expect_err("no region 42");
            assert_eq!(e.errno(), Some(libc::EINVAL as u32), "{e}");
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1100));
        // The next warning reports how many were held back.
        let _ = c.region_read(42, 0, 4);
        let _ = c.read32(BAR0, sample::regs::ID).expect("still served");
        let log = f.server.new_log();
        let warnings = log.lines().filter(|l| l.contains(" WARN ")).count();
        assert!(sent > 100, "only {sent} requests sent");
        assert!(
            warnings <= 5 * 2 + 2,
            "{warnings} warnings for {sent} bad requests:\n{log}"
        );
        assert!(
            log.contains("more warnings about this client suppressed"),
            "the suppressed count is logged:\n{log}"
        );
    }
    f.check_clean("a flood of bad messages");
}

#[test]
fn the_socket_mode_is_0600_unless_configured() {
    let s = start(&[]);
    let mode = std::fs::metadata(s.socket())
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let s = start(&["--socket-mode", "660"]);
    let mode = std::fs::metadata(s.socket())
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
}

#[test]
fn only_allowed_uids_are_served() {
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let other = me.wrapping_add(4242).to_string();
    let mut s = start(&["--allow-uid", &other]);
    let mut c = s.connect().expect("connect");
    c.set_timeout(Duration::from_secs(5)).expect("timeout");
    assert!(
        c.negotiate(&Proposal::qemu()).is_err(),
        "a client of another uid is not served"
    );
    assert!(s.is_running());
    assert!(s.log().contains("not in --allow-uid"), "{}", s.log());
    let mine = me.to_string();
    let s = start(&["--allow-uid", &other, "--allow-uid", &mine]);
    let mut c = s.connect().expect("connect");
    c.version().expect("our own uid is served");
}

/// The `Seccomp:` mode of the process's thread called `name` (2: filter).
fn seccomp_mode(pid: u32, name: &str) -> Option<u32> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let t = t.ok()?.path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(t.join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .and_then(|v| v.trim().parse().ok());
        }
    }
    None
}

#[test]
fn every_thread_runs_under_seccomp_unless_turned_off() {
    let mut f = Fixture::new(&[]);
    let pid = f.server.pid();
    assert_eq!(seccomp_mode(pid, "vdevd-sample"), Some(2), "filter mode");
    // Every other thread too: the main thread, and the sample device's DMA
    // engine, started while the device was built.
    let modes = seccomp_modes(pid);
    assert!(modes.len() >= 3, "{modes:?}");
    assert!(modes.iter().all(|(_, m)| *m == 2), "{modes:?}");
    // Everything a client does still works under the filter.
    {
        let (mut c, _) = f.served();
        let mem = SharedMemory::unsealed("seccomp", MIB).expect("memfd");
        c.dma_map_fd(0x10_0000, MIB, mem.file().as_fd(), 0, true)
            .expect("map");
        assert_eq!(c.region_read(BAR2, 0, 16).expect("read").len(), 16);
    }
    f.check_clean("a session under seccomp");
    let s = start(&["--no-seccomp"]);
    assert_eq!(seccomp_mode(s.pid(), "vdevd-sample"), Some(0));
    let modes = seccomp_modes(s.pid());
    assert!(modes.iter().all(|(_, m)| *m == 0), "{modes:?}");
}

/// The name and `Seccomp:` mode of every thread of `pid`.
fn seccomp_modes(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let t = t.expect("task").path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(u32::MAX);
        out.push((comm.trim().to_string(), mode));
    }
    out
}

/// The real, effective, saved and fs uids of every thread of `pid`.
fn thread_uids(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let status =
            std::fs::read_to_string(t.expect("task").path().join("status")).unwrap_or_default();
        if let Some(l) = status.lines().find(|l| l.starts_with("Uid:")) {
            out.push(l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "));
        }
    }
    out
}

#[test]
fn the_server_drops_to_the_user_given_after_opening_its_socket() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        // Only root can switch users: as anyone else --user must fail
        // loudly, not run with the wrong identity.
        let e = vdevd_tests::ServerProcess::start(
            crate::common::vdevd(),
            "sample",
            &["--user", "65534"],
            "info",
        )
        .expect_err("--user without root");
        assert!(e.to_string().contains("drop privileges"), "{e}");
        return;
    }
    let mut s = start(&["--user", "65534"]);
    let uids = thread_uids(s.pid());
    assert!(!uids.is_empty());
    for u in &uids {
        assert_eq!(
            u, "65534 65534 65534 65534",
            "every thread switched: {uids:?}"
        );
    }
    let meta = std::fs::metadata(s.socket()).expect("stat socket");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        65534,
        "the socket is the user's"
    );
    // Root (this test) may still connect; the device is served.
    let mut c = s.connect().expect("connect");
    c.version().expect("VERSION");
    assert_eq!(
        c.read32(BAR0, sample::regs::ID).expect("ID"),
        sample::ID_VALUE
    );
    drop(c);
    assert!(s.stop().expect("stop").success(), "{}", s.log());
}

#[test]
fn a_whole_session_runs_with_the_kill_action() {
    // With `--seccomp kill` any call missing from the allow-list ends the
    // process: a DMA session, an abrupt disconnect and a second session
    // show the list covers what serving takes.
    let mut f = Fixture::new(&["--seccomp", "kill"]);
    for round in 0..2 {
        let (mut c, _) = f.served();
        let sealed = SharedMemory::new("kill-sealed", MIB).expect("memfd");
        let unsealed = SharedMemory::unsealed("kill-unsealed", MIB).expect("memfd");
        unsealed.write(0, b"through pread").expect("write");
        c.dma_map_fd(0x10_0000, MIB, sealed.file().as_fd(), 0, true)
            .expect("map sealed");
        c.dma_map_fd(0x20_0000, MIB, unsealed.file().as_fd(), 0, true)
            .expect("map unsealed");
        c.dma_map_msg(0x4000_0000, 0x10000, true).expect("map msg");
        sample::enable_bus_master(&mut c).expect("bus master");
        let irqs = sample::enable_msix(&mut c, 2).expect("msix");
        c.write32(BAR0, sample::regs::IRQ_ENABLE, sample::regs::IRQ_DMA)
            .expect("IRQ_ENABLE");
        for src in [0x10_0000u64, 0x20_0000, 0x4000_0000] {
            sample::start_dma(&mut c, src, 0, 13, false).expect("dma");
            sample::wait_irq(&mut c, &irqs[1], Duration::from_secs(10)).expect("interrupt");
        }
        assert_eq!(c.region_read(BAR2, 0, 13).expect("read"), vec![0; 13]);
        sample::start_dma(&mut c, 0x20_0000, 0, 13, false).expect("dma");
        sample::wait_irq(&mut c, &irqs[1], Duration::from_secs(10)).expect("interrupt");
        assert_eq!(c.region_read(BAR2, 0, 13).expect("read"), b"through pread");
        c.reset().expect("reset");
        assert!(f.server.is_running(), "round {round}: {}", f.server.log());
        // Cut off without unmapping.
        drop(c);
    }
    f.check_clean("sessions under --seccomp kill");
}
