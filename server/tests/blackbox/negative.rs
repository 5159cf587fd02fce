//! Bad input from a client, one table row per case. Each case is sent on a
//! connection of its own to one long-lived `vdevd sample`; the table checks
//! the exact errno of the error reply (and that the connection keeps
//! working), or that the server closes the connection (after an error
//! reply when the message was a command), and after every case that
//!
//! * the server process is alive,
//! * the next client completes VERSION and a register read,
//! * the server holds exactly as many descriptors as before the case
//!   (descriptors we passed with bad messages included),
//! * the server logged it (a warning for every error reply, the unread
//!   bytes for a connection cut mid-message).

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vdevd_protocol::Header;
use vdevd_protocol::header::{FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_REPLY};
use vdevd_protocol::vfio::*;
use vdevd_tests::sample::{BAR0, regs};
use vdevd_tests::{Client, EventFd, Proposal, SharedMemory};

use crate::common::{EVENT_TIMEOUT, Fixture};

const EINVAL: i32 = libc::EINVAL;
const ENOSYS: i32 = libc::ENOSYS;
const E2BIG: i32 = libc::E2BIG;

// Command numbers, raw (the table sends malformed messages by number).
const VERSION: u16 = 1;
const DMA_MAP: u16 = 2;
const DMA_UNMAP: u16 = 3;
const GET_INFO: u16 = 4;
const GET_REGION_INFO: u16 = 5;
const GET_REGION_IO_FDS: u16 = 6;
const GET_IRQ_INFO: u16 = 7;
const SET_IRQS: u16 = 8;
const REGION_READ: u16 = 9;
const REGION_WRITE: u16 = 10;
const DMA_READ: u16 = 11;
const DMA_WRITE: u16 = 12;
const RESET: u16 = 13;
const WRITE_MULTI: u16 = 15;
const FEATURE: u16 = 16;
const MIG_DATA_READ: u16 = 17;
const MIG_DATA_WRITE: u16 = 18;

/// The server under test limits DMA mappings to this many.
const MAX_MAPS: u32 = 8;
/// Its max_data_xfer_size (the default).
const MAX_XFER: u32 = 1 << 20;
/// The largest VERSION message the server takes before negotiation: the
/// header, the versions and 16 KiB of JSON.
const VERSION_LIMIT: u32 = 16 + 4 + (16 << 10);
/// Where the cases map client memory.
const IOVA: u64 = 0x10_0000;
/// Size of the shared memfd the cases map.
const MEM: u64 = 1 << 20;

/// How a case's connection starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Connected, nothing sent yet.
    Fresh,
    /// VERSION done with QEMU's proposal.
    Qemu,
    /// VERSION done with `{}` (no write_multiple, no migration).
    Plain,
}

/// What the server must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// An error reply with this errno; the connection keeps working.
    Errno(i32),
    /// An error reply with this errno, then the server closes.
    ErrnoThenClose(i32),
    /// The message was sent with NO_REPLY: no reply at all, and the
    /// connection keeps working.
    NoReply,
}

struct Ctx<'a> {
    c: Client,
    mem: &'a SharedMemory,
}

enum Run {
    /// Send the bad input on the case's client; returns the id of the
    /// message the reply answers (if any).
    Client(Phase, Expect, fn(&mut Ctx<'_>) -> u16),
    /// The case manages its own client(s) and checks; it gets the socket.
    Alone(fn(&Path, &SharedMemory)),
}

struct Case {
    name: &'static str,
    run: Run,
}

fn case(name: &'static str, phase: Phase, expect: Expect, f: fn(&mut Ctx<'_>) -> u16) -> Case {
    Case {
        name,
        run: Run::Client(phase, expect, f),
    }
}

// --- message builders --------------------------------------------------

fn header(id: u16, command: u16, size: u32, flags: u32) -> Vec<u8> {
    Header {
        msg_id: id,
        command,
        size,
        flags,
        error: 0,
    }
    .encode()
    .to_vec()
}

fn u32s(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

fn access(offset: u64, region: u32, count: u32) -> Vec<u8> {
    let mut b = offset.to_ne_bytes().to_vec();
    b.extend(u32s(&[region, count]));
    b
}

/// One REGION_WRITE_MULTI entry: access header and 8 data bytes.
fn entry(offset: u64, region: u32, count: u32) -> Vec<u8> {
    let mut b = access(offset, region, count);
    b.extend_from_slice(&[0x5a; 8]);
    b
}

/// A REGION_WRITE_MULTI body: `wr_cnt`, then `entries` as given.
fn multi(wr_cnt: u64, entries: &[u8]) -> Vec<u8> {
    let mut b = wr_cnt.to_ne_bytes().to_vec();
    b.extend_from_slice(entries);
    b
}

fn map_body(argsz: u32, flags: u32, offset: u64, address: u64, size: u64) -> Vec<u8> {
    let mut b = u32s(&[argsz, flags]);
    for v in [offset, address, size] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    b
}

fn unmap_body(argsz: u32, flags: u32, address: u64, size: u64) -> Vec<u8> {
    let mut b = u32s(&[argsz, flags]);
    b.extend_from_slice(&address.to_ne_bytes());
    b.extend_from_slice(&size.to_ne_bytes());
    b
}

fn region_info_body(argsz: u32, index: u32) -> Vec<u8> {
    let mut b = u32s(&[argsz, 0, index, 0]);
    b.extend_from_slice(&[0; 16]);
    b
}

const RW: u32 = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
const ARM: u32 = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;

fn send(x: &mut Ctx<'_>, command: u16, body: &[u8], fds: &[RawFd]) -> u16 {
    x.c.send(command, 0, body, fds).expect("send")
}

fn send_flags(x: &mut Ctx<'_>, command: u16, flags: u32, body: &[u8]) -> u16 {
    x.c.send(command, flags, body, &[]).expect("send")
}

/// Send raw bytes that start with a header carrying id 0x4242.
fn send_raw(x: &mut Ctx<'_>, bytes: &[u8], fds: &[RawFd]) -> u16 {
    // The server may close before taking every byte; that is its right.
    match x.c.send_raw(bytes, fds) {
        Ok(()) | Err(vdevd_tests::Error::Closed { .. }) => {}
        Err(e) => panic!("send: {e}"),
    }
    0x4242
}

fn version_json(x: &mut Ctx<'_>, json: &str) -> u16 {
    send(x, VERSION, &Proposal::json(json).body(), &[])
}

fn eventfds(n: usize) -> Vec<EventFd> {
    (0..n).map(|_| EventFd::new().expect("eventfd")).collect()
}

fn map_ok(x: &mut Ctx<'_>, iova: u64, size: u64) {
    let fd = x.mem.as_fd();
    x.c.dma_map_fd(iova, size, fd, 0, true).expect("setup map");
}

/// Every bad-input case. The closing note of the issue reports
/// `cases().len()`.
fn cases() -> Vec<Case> {
    use Expect::*;
    use Phase::*;
    vec![
        // --- framing -------------------------------------------------------
        Case {
            name: "short header, then EOF",
            run: Run::Alone(|socket, _| {
                let mut c = Client::connect(socket).expect("connect");
                c.version().expect("VERSION");
                c.send_raw(&header(7, GET_INFO, 32, 0)[..8], &[])
                    .expect("send");
                c.stream()
                    .shutdown(std::net::Shutdown::Write)
                    .expect("shutdown");
                let got = c.expect_close().expect("close");
                assert!(got.is_empty(), "no reply to half a header: {got:?}");
            }),
        },
        case(
            "size 8, under the header",
            Qemu,
            ErrnoThenClose(EINVAL),
            |x| send_raw(x, &header(0x4242, GET_INFO, 8, 0), &[]),
        ),
        case("size 0", Qemu, ErrnoThenClose(EINVAL), |x| {
            send_raw(x, &header(0x4242, GET_INFO, 0, 0), &[])
        }),
        case("size over the limit", Qemu, ErrnoThenClose(E2BIG), |x| {
            send_raw(x, &header(0x4242, REGION_WRITE, 0x7fff_fff0, 0), &[])
        }),
        case(
            "size over the limit before VERSION",
            Fresh,
            ErrnoThenClose(E2BIG),
            |x| send_raw(x, &header(0x4242, VERSION, VERSION_LIMIT + 1, 0), &[]),
        ),
        case("reply flag on a request", Qemu, Errno(EINVAL), |x| {
            send_flags(x, GET_INFO, FLAG_TYPE_REPLY, &u32s(&[16, 0, 0, 0]))
        }),
        case("error flag on a request", Qemu, Errno(EINVAL), |x| {
            send_flags(x, GET_INFO, FLAG_ERROR, &u32s(&[16, 0, 0, 0]))
        }),
        case("undefined header flag", Qemu, Errno(EINVAL), |x| {
            send_flags(x, GET_INFO, 0x100, &u32s(&[16, 0, 0, 0]))
        }),
        case("message type 2", Qemu, Errno(EINVAL), |x| {
            send_flags(x, GET_INFO, 2, &u32s(&[16, 0, 0, 0]))
        }),
        case("unknown command 14 with a body", Qemu, Errno(ENOSYS), |x| {
            send(x, 14, &[0xaa; 40], &[])
        }),
        case("unknown command 0xffff", Qemu, Errno(ENOSYS), |x| {
            send(x, 0xffff, &[], &[])
        }),
        case("unknown command 0", Qemu, Errno(ENOSYS), |x| {
            send(x, 0, &[1, 2, 3], &[])
        }),
        case("DMA_READ from the client", Qemu, Errno(ENOSYS), |x| {
            send(x, DMA_READ, &[0; 16], &[])
        }),
        case("DMA_WRITE from the client", Qemu, Errno(ENOSYS), |x| {
            let mut b = vec![0u8; 16];
            b[8] = 4;
            b.extend_from_slice(&[1, 2, 3, 4]);
            send(x, DMA_WRITE, &b, &[])
        }),
        // --- before VERSION -----------------------------------------------
        case(
            "DEVICE_GET_INFO before VERSION",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| send(x, GET_INFO, &u32s(&[16, 0, 0, 0]), &[]),
        ),
        case(
            "REGION_READ before VERSION",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| send(x, REGION_READ, &access(0, 0, 4), &[]),
        ),
        case(
            "DMA_MAP with an fd before VERSION",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| {
                let fd = x.mem.as_raw_fd();
                send(x, DMA_MAP, &map_body(32, RW, 0, IOVA, 0x1000), &[fd])
            },
        ),
        case(
            "unknown command before VERSION",
            Fresh,
            ErrnoThenClose(ENOSYS),
            |x| send(x, 99, &[], &[]),
        ),
        // --- malformed VERSION --------------------------------------------
        case(
            "VERSION major 1",
            Fresh,
            ErrnoThenClose(libc::ENOTSUP),
            |x| send(x, VERSION, &Proposal::raw(1, 0, b"{}\0").body(), &[]),
        ),
        case(
            "VERSION body of 2 bytes",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| send(x, VERSION, &[0, 0], &[]),
        ),
        case(
            "VERSION JSON without its NUL",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| {
                let json = vdevd_tests::client::QEMU_VERSION_JSON.as_bytes();
                send(x, VERSION, &Proposal::raw(0, 0, json).body(), &[])
            },
        ),
        case("VERSION broken JSON", Fresh, ErrnoThenClose(EINVAL), |x| {
            version_json(x, "{\"capabilities\":{\"max_msg_fds\":")
        }),
        case(
            "VERSION JSON not an object",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| version_json(x, "[1,2]"),
        ),
        case(
            "VERSION NUL inside the JSON",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| send(x, VERSION, &Proposal::raw(0, 0, b"{}\0{}\0").body(), &[]),
        ),
        case(
            "VERSION JSON not UTF-8",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| {
                send(
                    x,
                    VERSION,
                    &Proposal::raw(0, 0, b"{\"\xff\":1}\0").body(),
                    &[],
                )
            },
        ),
        case(
            "VERSION capabilities not an object",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| version_json(x, "{\"capabilities\":16}"),
        ),
        case(
            "VERSION max_msg_fds a string",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| version_json(x, "{\"capabilities\":{\"max_msg_fds\":\"16\"}}"),
        ),
        case(
            "VERSION max_msg_fds negative",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| version_json(x, "{\"capabilities\":{\"max_msg_fds\":-1}}"),
        ),
        case(
            "VERSION max_data_xfer_size fractional",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| version_json(x, "{\"capabilities\":{\"max_data_xfer_size\":4096.5}}"),
        ),
        case(
            "VERSION write_multiple a number",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| version_json(x, "{\"capabilities\":{\"write_multiple\":1}}"),
        ),
        case(
            "VERSION migration not an object",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| version_json(x, "{\"capabilities\":{\"migration\":4096}}"),
        ),
        case(
            "VERSION migration pgsize a string",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| version_json(x, "{\"capabilities\":{\"migration\":{\"pgsize\":\"4k\"}}}"),
        ),
        case(
            "VERSION pgsizes below 4096",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| version_json(x, "{\"capabilities\":{\"pgsizes\":2048}}"),
        ),
        case("VERSION pgsizes 0", Fresh, ErrnoThenClose(EINVAL), |x| {
            version_json(x, "{\"capabilities\":{\"pgsizes\":0}}")
        }),
        case(
            "VERSION pgsizes none in common",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| version_json(x, "{\"capabilities\":{\"pgsizes\":8192}}"),
        ),
        case(
            "VERSION max_data_xfer_size 0",
            Fresh,
            ErrnoThenClose(EINVAL),
            |x| version_json(x, "{\"capabilities\":{\"max_data_xfer_size\":0}}"),
        ),
        case("VERSION with an fd", Fresh, ErrnoThenClose(EINVAL), |x| {
            let fd = x.mem.as_raw_fd();
            send(x, VERSION, &Proposal::qemu().body(), &[fd])
        }),
        case("second VERSION", Qemu, Errno(EINVAL), |x| {
            send(x, VERSION, &Proposal::qemu().body(), &[])
        }),
        // --- region I/O ---------------------------------------------------
        case("REGION_READ short payload", Qemu, Errno(EINVAL), |x| {
            send(x, REGION_READ, &access(0, 0, 4)[..8], &[])
        }),
        case("REGION_READ with trailing data", Qemu, Errno(EINVAL), |x| {
            let mut b = access(0, 0, 4);
            b.extend_from_slice(&[0; 4]);
            send(x, REGION_READ, &b, &[])
        }),
        case("REGION_WRITE short payload", Qemu, Errno(EINVAL), |x| {
            send(x, REGION_WRITE, &access(0, 0, 0)[..12], &[])
        }),
        case(
            "REGION_READ count over the limit",
            Qemu,
            Errno(E2BIG),
            |x| send(x, REGION_READ, &access(0, 2, MAX_XFER + 1), &[]),
        ),
        case("REGION_READ count u32::MAX", Qemu, Errno(E2BIG), |x| {
            send(x, REGION_READ, &access(0, 2, u32::MAX), &[])
        }),
        case(
            "REGION_WRITE over the limit",
            Qemu,
            ErrnoThenClose(E2BIG),
            |x| {
                let count = MAX_XFER * 2;
                let mut b = header(0x4242, REGION_WRITE, 16 + 16 + count, 0);
                b.extend(access(0, 2, count));
                send_raw(x, &b, &[])
            },
        ),
        case(
            "REGION_WRITE data shorter than count",
            Qemu,
            Errno(EINVAL),
            |x| {
                let mut b = access(regs::LIVENESS, 0, 8);
                b.extend_from_slice(&[1, 2, 3, 4]);
                send(x, REGION_WRITE, &b, &[])
            },
        ),
        case(
            "REGION_WRITE data longer than count",
            Qemu,
            Errno(EINVAL),
            |x| {
                let mut b = access(regs::LIVENESS, 0, 2);
                b.extend_from_slice(&[1, 2, 3, 4]);
                send(x, REGION_WRITE, &b, &[])
            },
        ),
        case("REGION_READ bad index 9", Qemu, Errno(EINVAL), |x| {
            send(x, REGION_READ, &access(0, 9, 4), &[])
        }),
        case(
            "REGION_WRITE bad index u32::MAX",
            Qemu,
            Errno(EINVAL),
            |x| {
                let mut b = access(0, u32::MAX, 4);
                b.extend_from_slice(&[0; 4]);
                send(x, REGION_WRITE, &b, &[])
            },
        ),
        case(
            "REGION_READ offset + count overflows",
            Qemu,
            Errno(EINVAL),
            |x| send(x, REGION_READ, &access(u64::MAX - 1, 0, 4), &[]),
        ),
        case(
            "REGION_WRITE offset + count overflows",
            Qemu,
            Errno(EINVAL),
            |x| {
                let mut b = access(u64::MAX - 1, 0, 4);
                b.extend_from_slice(&[0; 4]);
                send(x, REGION_WRITE, &b, &[])
            },
        ),
        case(
            "REGION_READ past the end of BAR0",
            Qemu,
            Errno(EINVAL),
            |x| send(x, REGION_READ, &access(0xffc, 0, 8), &[]),
        ),
        case("REGION_READ of an absent BAR", Qemu, Errno(EINVAL), |x| {
            send(x, REGION_READ, &access(0, 1, 4), &[])
        }),
        case("posted REGION_WRITE to a bad region", Qemu, NoReply, |x| {
            let mut b = access(0, 9, 4);
            b.extend_from_slice(&[0; 4]);
            x.c.send(REGION_WRITE, FLAG_NO_REPLY, &b, &[])
                .expect("send")
        }),
        case(
            "posted REGION_WRITE past the end of BAR0",
            Qemu,
            NoReply,
            |x| {
                let mut b = access(0xffe, 0, 4);
                b.extend_from_slice(&[0; 4]);
                x.c.send(REGION_WRITE, FLAG_NO_REPLY, &b, &[])
                    .expect("send")
            },
        ),
        case("REGION_WRITE with an fd", Qemu, Errno(EINVAL), |x| {
            let fd = x.mem.as_raw_fd();
            let mut b = access(regs::LIVENESS, 0, 4);
            b.extend_from_slice(&[0; 4]);
            send(x, REGION_WRITE, &b, &[fd])
        }),
        case("REGION_READ with 200 fds", Qemu, Errno(EINVAL), |x| {
            let e = eventfds(200);
            let fds: Vec<RawFd> = e.iter().map(|f| f.as_raw_fd()).collect();
            send(x, REGION_READ, &access(0, 0, 4), &fds)
        }),
        // --- info queries -------------------------------------------------
        case("DEVICE_GET_INFO short payload", Qemu, Errno(EINVAL), |x| {
            send(x, GET_INFO, &u32s(&[16]), &[])
        }),
        case("DEVICE_GET_INFO argsz 8", Qemu, Errno(EINVAL), |x| {
            send(x, GET_INFO, &u32s(&[8, 0, 0, 0]), &[])
        }),
        case("GET_REGION_INFO short payload", Qemu, Errno(EINVAL), |x| {
            send(x, GET_REGION_INFO, &region_info_body(32, 0)[..16], &[])
        }),
        case("GET_REGION_INFO argsz 16", Qemu, Errno(EINVAL), |x| {
            send(x, GET_REGION_INFO, &region_info_body(16, 0), &[])
        }),
        case("GET_REGION_INFO bad index", Qemu, Errno(EINVAL), |x| {
            send(x, GET_REGION_INFO, &region_info_body(32, 9), &[])
        }),
        case("GET_IRQ_INFO short payload", Qemu, Errno(EINVAL), |x| {
            send(x, GET_IRQ_INFO, &u32s(&[16, 0]), &[])
        }),
        case("GET_IRQ_INFO argsz 4", Qemu, Errno(EINVAL), |x| {
            send(x, GET_IRQ_INFO, &u32s(&[4, 0, 2, 0]), &[])
        }),
        case("GET_IRQ_INFO bad index", Qemu, Errno(EINVAL), |x| {
            send(x, GET_IRQ_INFO, &u32s(&[16, 0, 5, 0]), &[])
        }),
        case(
            "GET_REGION_IO_FDS short payload",
            Qemu,
            Errno(EINVAL),
            |x| send(x, GET_REGION_IO_FDS, &u32s(&[16, 0, 2]), &[]),
        ),
        case("GET_REGION_IO_FDS bad index", Qemu, Errno(EINVAL), |x| {
            send(x, GET_REGION_IO_FDS, &u32s(&[16, 0, 9, 0]), &[])
        }),
        // --- SET_IRQS -----------------------------------------------------
        case("SET_IRQS bad index", Qemu, Errno(EINVAL), |x| {
            let e = eventfds(1);
            send(x, SET_IRQS, &u32s(&[20, ARM, 5, 0, 1]), &[e[0].as_raw_fd()])
        }),
        case("SET_IRQS two DATA flags", Qemu, Errno(EINVAL), |x| {
            let flags =
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
            send(x, SET_IRQS, &u32s(&[20, flags, 2, 0, 1]), &[])
        }),
        case("SET_IRQS two ACTION flags", Qemu, Errno(EINVAL), |x| {
            let flags =
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_TRIGGER;
            send(x, SET_IRQS, &u32s(&[20, flags, 2, 0, 1]), &[])
        }),
        case("SET_IRQS no ACTION flag", Qemu, Errno(EINVAL), |x| {
            send(
                x,
                SET_IRQS,
                &u32s(&[20, VFIO_IRQ_SET_DATA_NONE, 2, 0, 1]),
                &[],
            )
        }),
        case("SET_IRQS undefined flag", Qemu, Errno(EINVAL), |x| {
            send(x, SET_IRQS, &u32s(&[20, ARM | 0x100, 2, 0, 0]), &[])
        }),
        case(
            "SET_IRQS start + count overflows",
            Qemu,
            Errno(EINVAL),
            |x| {
                let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
                send(x, SET_IRQS, &u32s(&[20, flags, 2, u32::MAX, 2]), &[])
            },
        ),
        case(
            "SET_IRQS vectors beyond the index",
            Qemu,
            Errno(EINVAL),
            |x| {
                let e = eventfds(4);
                let fds: Vec<RawFd> = e.iter().map(|f| f.as_raw_fd()).collect();
                send(x, SET_IRQS, &u32s(&[20, ARM, 2, 2, 4]), &fds)
            },
        ),
        case("SET_IRQS fewer fds than count", Qemu, Errno(EINVAL), |x| {
            let e = eventfds(1);
            send(x, SET_IRQS, &u32s(&[20, ARM, 2, 0, 2]), &[e[0].as_raw_fd()])
        }),
        case("SET_IRQS more fds than count", Qemu, Errno(EINVAL), |x| {
            let e = eventfds(2);
            let fds: Vec<RawFd> = e.iter().map(|f| f.as_raw_fd()).collect();
            send(x, SET_IRQS, &u32s(&[20, ARM, 2, 0, 1]), &fds)
        }),
        case("SET_IRQS fds with DATA_NONE", Qemu, Errno(EINVAL), |x| {
            let e = eventfds(1);
            let flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
            send(
                x,
                SET_IRQS,
                &u32s(&[20, flags, 2, 0, 1]),
                &[e[0].as_raw_fd()],
            )
        }),
        case(
            "SET_IRQS more fds than max_msg_fds",
            Qemu,
            Errno(EINVAL),
            |x| {
                let e = eventfds(17);
                let fds: Vec<RawFd> = e.iter().map(|f| f.as_raw_fd()).collect();
                send(x, SET_IRQS, &u32s(&[20, ARM, 2, 0, 17]), &fds)
            },
        ),
        case(
            "SET_IRQS a memfd for an eventfd",
            Qemu,
            Errno(EINVAL),
            |x| {
                let fd = x.mem.as_raw_fd();
                send(x, SET_IRQS, &u32s(&[20, ARM, 2, 0, 1]), &[fd])
            },
        ),
        case(
            "SET_IRQS DATA_BOOL of the wrong length",
            Qemu,
            Errno(EINVAL),
            |x| {
                let flags = VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER;
                let mut b = u32s(&[22, flags, 2, 0, 1]);
                b.extend_from_slice(&[1, 1]);
                send(x, SET_IRQS, &b, &[])
            },
        ),
        case("SET_IRQS argsz below the data", Qemu, Errno(EINVAL), |x| {
            let flags = VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER;
            let mut b = u32s(&[20, flags, 2, 0, 1]);
            b.push(1);
            send(x, SET_IRQS, &b, &[])
        }),
        // --- DMA_MAP ------------------------------------------------------
        case("DMA_MAP short payload", Qemu, Errno(EINVAL), |x| {
            send(x, DMA_MAP, &map_body(32, RW, 0, IOVA, 0x1000)[..24], &[])
        }),
        case("DMA_MAP argsz 16", Qemu, Errno(EINVAL), |x| {
            send(x, DMA_MAP, &map_body(16, RW, 0, IOVA, 0x1000), &[])
        }),
        case("DMA_MAP unknown flags", Qemu, Errno(EINVAL), |x| {
            send(x, DMA_MAP, &map_body(32, RW | 4, 0, IOVA, 0x1000), &[])
        }),
        case("DMA_MAP without READ or WRITE", Qemu, Errno(EINVAL), |x| {
            send(x, DMA_MAP, &map_body(32, 0, 0, IOVA, 0x1000), &[])
        }),
        case("DMA_MAP zero size", Qemu, Errno(EINVAL), |x| {
            send(x, DMA_MAP, &map_body(32, RW, 0, IOVA, 0), &[])
        }),
        case("DMA_MAP address + size wraps", Qemu, Errno(EINVAL), |x| {
            send(
                x,
                DMA_MAP,
                &map_body(32, RW, 0, u64::MAX - 0xfff, 0x2000),
                &[],
            )
        }),
        case("DMA_MAP offset + size wraps", Qemu, Errno(EINVAL), |x| {
            let fd = x.mem.as_raw_fd();
            send(
                x,
                DMA_MAP,
                &map_body(32, RW, u64::MAX - 0xfff, IOVA, 0x2000),
                &[fd],
            )
        }),
        case("DMA_MAP unaligned address", Qemu, Errno(EINVAL), |x| {
            let fd = x.mem.as_raw_fd();
            send(x, DMA_MAP, &map_body(32, RW, 0, IOVA + 1, 0x1000), &[fd])
        }),
        case("DMA_MAP unaligned size", Qemu, Errno(EINVAL), |x| {
            let fd = x.mem.as_raw_fd();
            send(x, DMA_MAP, &map_body(32, RW, 0, IOVA, 0x1800), &[fd])
        }),
        case("DMA_MAP unaligned offset", Qemu, Errno(EINVAL), |x| {
            let fd = x.mem.as_raw_fd();
            send(x, DMA_MAP, &map_body(32, RW, 0x10, IOVA, 0x1000), &[fd])
        }),
        case(
            "DMA_MAP overlapping a mapping",
            Qemu,
            Errno(libc::EEXIST),
            |x| {
                map_ok(x, IOVA, 0x10000);
                let fd = x.mem.as_raw_fd();
                send(
                    x,
                    DMA_MAP,
                    &map_body(32, RW, 0, IOVA + 0x8000, 0x10000),
                    &[fd],
                )
            },
        ),
        case(
            "DMA_MAP overlapping a message-backed mapping",
            Qemu,
            Errno(libc::EEXIST),
            |x| {
                x.c.dma_map_msg(IOVA, 0x10000, true).expect("setup map");
                send(x, DMA_MAP, &map_body(32, RW, 0, IOVA - 0x1000, 0x2000), &[])
            },
        ),
        case(
            "DMA_MAP offset past the end of the fd",
            Qemu,
            Errno(EINVAL),
            |x| {
                let fd = x.mem.as_raw_fd();
                send(x, DMA_MAP, &map_body(32, RW, MEM, IOVA, 0x1000), &[fd])
            },
        ),
        case(
            "DMA_MAP range past the end of the fd",
            Qemu,
            Errno(EINVAL),
            |x| {
                let fd = x.mem.as_raw_fd();
                send(
                    x,
                    DMA_MAP,
                    &map_body(32, RW, MEM - 0x1000, IOVA, 0x2000),
                    &[fd],
                )
            },
        ),
        case("DMA_MAP an eventfd", Qemu, Errno(EINVAL), |x| {
            let e = eventfds(1);
            send(
                x,
                DMA_MAP,
                &map_body(32, RW, 0, IOVA, 0x1000),
                &[e[0].as_raw_fd()],
            )
        }),
        case("DMA_MAP one too many", Qemu, Errno(libc::ENOSPC), |x| {
            for i in 0..u64::from(MAX_MAPS) {
                map_ok(x, IOVA + i * 0x1000, 0x1000);
            }
            let fd = x.mem.as_raw_fd();
            send(
                x,
                DMA_MAP,
                &map_body(32, RW, 0, IOVA + 0x10_0000, 0x1000),
                &[fd],
            )
        }),
        case("DMA_MAP with two fds", Qemu, Errno(EINVAL), |x| {
            let a = x.mem.as_raw_fd();
            let e = eventfds(1);
            send(
                x,
                DMA_MAP,
                &map_body(32, RW, 0, IOVA, 0x1000),
                &[a, e[0].as_raw_fd()],
            )
        }),
        // --- DMA_UNMAP ----------------------------------------------------
        case(
            "DMA_UNMAP of an unknown range",
            Qemu,
            Errno(libc::ENOENT),
            |x| send(x, DMA_UNMAP, &unmap_body(24, 0, IOVA, 0x1000), &[]),
        ),
        case(
            "DMA_UNMAP of part of a mapping",
            Qemu,
            Errno(libc::ENOENT),
            |x| {
                map_ok(x, IOVA, 0x2000);
                send(x, DMA_UNMAP, &unmap_body(24, 0, IOVA, 0x1000), &[])
            },
        ),
        case(
            "DMA_UNMAP spanning two mappings",
            Qemu,
            Errno(libc::ENOENT),
            |x| {
                map_ok(x, IOVA, 0x1000);
                map_ok(x, IOVA + 0x1000, 0x1000);
                send(x, DMA_UNMAP, &unmap_body(24, 0, IOVA, 0x2000), &[])
            },
        ),
        case("DMA_UNMAP all with an address", Qemu, Errno(EINVAL), |x| {
            let flags = VFIO_DMA_UNMAP_FLAG_ALL;
            send(x, DMA_UNMAP, &unmap_body(24, flags, IOVA, 0), &[])
        }),
        case("DMA_UNMAP all with a size", Qemu, Errno(EINVAL), |x| {
            let flags = VFIO_DMA_UNMAP_FLAG_ALL;
            send(x, DMA_UNMAP, &unmap_body(24, flags, 0, 0x1000), &[])
        }),
        case(
            "DMA_UNMAP all and dirty bitmap together",
            Qemu,
            Errno(EINVAL),
            |x| {
                let flags = VFIO_DMA_UNMAP_FLAG_ALL | VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
                let mut b = unmap_body(40, flags, 0, 0);
                b.extend_from_slice(&[0; 16]);
                send(x, DMA_UNMAP, &b, &[])
            },
        ),
        case(
            "DMA_UNMAP dirty bitmap without logging",
            Qemu,
            Errno(EINVAL),
            |x| {
                map_ok(x, IOVA, 0x10000);
                let flags = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
                let mut b = unmap_body(48, flags, IOVA, 0x10000);
                b.extend_from_slice(&4096u64.to_ne_bytes());
                b.extend_from_slice(&8u64.to_ne_bytes());
                send(x, DMA_UNMAP, &b, &[])
            },
        ),
        case("DMA_UNMAP short payload", Qemu, Errno(EINVAL), |x| {
            send(x, DMA_UNMAP, &unmap_body(24, 0, IOVA, 0x1000)[..20], &[])
        }),
        case("DMA_UNMAP with an fd", Qemu, Errno(EINVAL), |x| {
            map_ok(x, IOVA, 0x1000);
            let fd = x.mem.as_raw_fd();
            send(x, DMA_UNMAP, &unmap_body(24, 0, IOVA, 0x1000), &[fd])
        }),
        // --- other commands -----------------------------------------------
        case("DEVICE_RESET with a body", Qemu, Errno(EINVAL), |x| {
            send(x, RESET, &[0; 4], &[])
        }),
        case(
            "REGION_WRITE_MULTI not negotiated",
            Plain,
            Errno(libc::ENOTSUP),
            |x| send(x, WRITE_MULTI, &multi(1, &entry(regs::LIVENESS, 0, 4)), &[]),
        ),
        case(
            "REGION_WRITE_MULTI entry count 9",
            Qemu,
            Errno(E2BIG),
            |x| send(x, WRITE_MULTI, &multi(1, &entry(regs::LIVENESS, 0, 9)), &[]),
        ),
        case("REGION_WRITE_MULTI 201 entries", Qemu, Errno(E2BIG), |x| {
            let one = entry(regs::LIVENESS, 0, 4);
            send(x, WRITE_MULTI, &multi(201, &one.repeat(201)), &[])
        }),
        case(
            "REGION_WRITE_MULTI partial entry",
            Qemu,
            Errno(EINVAL),
            |x| {
                send(
                    x,
                    WRITE_MULTI,
                    &multi(1, &entry(regs::LIVENESS, 0, 4)[..20]),
                    &[],
                )
            },
        ),
        case(
            "REGION_WRITE_MULTI fewer entries than wr_cnt",
            Qemu,
            Errno(EINVAL),
            |x| send(x, WRITE_MULTI, &multi(2, &entry(regs::LIVENESS, 0, 4)), &[]),
        ),
        case("REGION_WRITE_MULTI bad region", Qemu, Errno(EINVAL), |x| {
            send(x, WRITE_MULTI, &multi(1, &entry(0, 12, 4)), &[])
        }),
        case(
            "DEVICE_FEATURE unknown feature",
            Qemu,
            Errno(libc::ENOTTY),
            |x| {
                send(
                    x,
                    FEATURE,
                    &u32s(&[16, VFIO_DEVICE_FEATURE_GET | 3, 0, 0]),
                    &[],
                )
            },
        ),
        case(
            "DEVICE_FEATURE GET and SET without PROBE",
            Qemu,
            Errno(EINVAL),
            |x| {
                let flags = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | 2;
                send(x, FEATURE, &u32s(&[16, flags, 0, 0]), &[])
            },
        ),
        case("DEVICE_FEATURE argsz 4", Qemu, Errno(EINVAL), |x| {
            send(x, FEATURE, &u32s(&[4, VFIO_DEVICE_FEATURE_GET | 1]), &[])
        }),
        case(
            "DEVICE_FEATURE invalid migration state",
            Qemu,
            Errno(EINVAL),
            |x| {
                send(
                    x,
                    FEATURE,
                    &u32s(&[16, VFIO_DEVICE_FEATURE_SET | 2, 99, 0]),
                    &[],
                )
            },
        ),
        case(
            "DMA_LOGGING_REPORT without logging",
            Qemu,
            Errno(EINVAL),
            |x| {
                let mut b = u32s(&[40, VFIO_DEVICE_FEATURE_GET | 8]);
                for v in [IOVA, 0x10000, 4096] {
                    b.extend_from_slice(&u64::to_ne_bytes(v));
                }
                send(x, FEATURE, &b, &[])
            },
        ),
        case("MIG_DATA_READ while running", Qemu, Errno(EINVAL), |x| {
            send(x, MIG_DATA_READ, &u32s(&[4104, 4096]), &[])
        }),
        case("MIG_DATA_WRITE while running", Qemu, Errno(EINVAL), |x| {
            let mut b = u32s(&[8, 4]);
            b.extend_from_slice(b"data");
            send(x, MIG_DATA_WRITE, &b, &[])
        }),
        case(
            "MIG_DATA_WRITE size beyond the data",
            Qemu,
            Errno(EINVAL),
            |x| {
                let mut b = u32s(&[8, 100]);
                b.extend_from_slice(b"data");
                send(x, MIG_DATA_WRITE, &b, &[])
            },
        ),
        // --- cut off mid-message ------------------------------------------
        Case {
            name: "truncated message, then EOF",
            run: Run::Alone(|socket, _| {
                let mut c = Client::connect(socket).expect("connect");
                c.version().expect("VERSION");
                let mut b = header(9, REGION_WRITE, 16 + 16 + 16, 0);
                b.extend(access(0, 2, 16));
                b.extend_from_slice(&[0xee; 10]);
                c.send_raw(&b, &[]).expect("send");
                c.stream()
                    .shutdown(std::net::Shutdown::Write)
                    .expect("shutdown");
                let got = c.expect_close().expect("close");
                assert!(got.is_empty(), "no reply to a truncated message: {got:?}");
            }),
        },
        Case {
            name: "truncated DMA_MAP with its fd, then EOF",
            run: Run::Alone(|socket, mem| {
                let mut c = Client::connect(socket).expect("connect");
                c.version().expect("VERSION");
                let mut b = header(9, DMA_MAP, 16 + 32, 0);
                b.extend_from_slice(&map_body(32, RW, 0, IOVA, 0x1000)[..20]);
                c.send_raw(&b, &[mem.as_raw_fd()]).expect("send");
                c.stream()
                    .shutdown(std::net::Shutdown::Write)
                    .expect("shutdown");
                let got = c.expect_close().expect("close");
                assert!(got.is_empty(), "no reply to a truncated message: {got:?}");
            }),
        },
        Case {
            name: "client killed mid-message, holding mappings and interrupts",
            run: Run::Alone(|socket, _| killed_client(socket)),
        },
    ]
}

/// The environment variable that makes `killed_client_child` act.
pub const KILL_SOCKET_ENV: &str = "VDEVD_BLACKBOX_KILL_SOCKET";
/// What the child prints when it is ready to be killed.
pub const READY: &str = "READY-TO-BE-KILLED";

/// The child's part (run in a separate process by re-executing this test
/// binary): negotiate, map shared and message-backed memory, arm MSI-X
/// eventfds, send half a DMA_MAP with a memfd, and wait to be killed.
pub fn killed_client_child(socket: &Path) {
    let mut c = Client::connect(socket).expect("connect");
    c.version().expect("VERSION");
    let mem = SharedMemory::new("killed-client", 1 << 20).expect("memfd");
    c.dma_map_fd(IOVA, 1 << 20, mem.as_fd(), 0, true)
        .expect("map");
    c.dma_map_msg(0x4000_0000, 0x10000, true).expect("map");
    let irqs = eventfds(4);
    let refs: Vec<&EventFd> = irqs.iter().collect();
    c.set_irq_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, &refs)
        .expect("arm");
    let more = SharedMemory::new("killed-client-in-flight", 0x1000).expect("memfd");
    let mut b = header(99, DMA_MAP, 16 + 32, 0);
    b.extend_from_slice(&map_body(32, RW, 0, 0x8000_0000, 0x1000)[..20]);
    c.send_raw(&b, &[more.as_raw_fd()]).expect("send");
    println!("{READY}");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Run [`killed_client_child`] in a child process, SIGKILL it once it is
/// ready.
fn killed_client(socket: &Path) {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args([
            "killed_client_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(KILL_SOCKET_ENV, socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child client");
    let mut out = child.stdout.take().expect("stdout");
    let deadline = Instant::now() + EVENT_TIMEOUT * 3;
    let mut text = String::new();
    while !text.contains(READY) {
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = vdevd_tests::sys::poll_readable(&[out.as_fd()], left).expect("poll");
        if !ready[0] {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child client never got ready: {text}");
        }
        let mut buf = [0u8; 512];
        let n = out.read(&mut buf).expect("read");
        if n == 0 {
            let status = child.wait();
            panic!("the child client exited ({status:?}) before it was ready: {text}");
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the child was killed");
}

/// Run one table case against the fixture.
fn run_case(f: &mut Fixture, mem: &SharedMemory, case: &Case) {
    let name = case.name;
    match case.run {
        Run::Alone(run) => {
            run(f.server.socket(), mem);
            f.check_clean(name);
            let log = f.server.new_log();
            assert!(
                log.contains("unread"),
                "{name}: the log says nothing of the bytes left unread:\n{log}"
            );
        }
        Run::Client(phase, expect, run) => {
            let mut c = f.server.connect().expect("connect");
            match phase {
                Phase::Fresh => {}
                Phase::Qemu => {
                    c.version().expect("VERSION");
                }
                Phase::Plain => {
                    c.negotiate(&Proposal::json("{}")).expect("VERSION");
                }
            }
            let mut x = Ctx { c, mem };
            let id = run(&mut x);
            let mut c = x.c;
            match expect {
                Expect::Errno(errno) => {
                    let m = match c.wait_reply(id) {
                        Ok(m) => m,
                        Err(e) => panic!("{name}: {e}; log:\n{}", f.server.log()),
                    };
                    assert!(m.header.is_reply(), "{name}: {m:?}");
                    assert_eq!(
                        m.errno(),
                        Some(errno as u32),
                        "{name}: errno {:?} instead of {errno}",
                        m.errno()
                    );
                    assert!(m.body.is_empty(), "{name}: error reply with a body");
                    assert!(m.fds.is_empty(), "{name}: error reply with descriptors");
                    // the connection still works
                    let v = c.read32(BAR0, regs::ID);
                    assert_eq!(v.ok(), Some(vdevd_tests::sample::ID_VALUE), "{name}");
                }
                Expect::ErrnoThenClose(errno) => {
                    let got = match c.expect_close() {
                        Ok(g) => g,
                        Err(e) => panic!("{name}: not closed: {e}; log:\n{}", f.server.log()),
                    };
                    assert_eq!(got.len(), 1, "{name}: one error reply, then EOF: {got:?}");
                    assert_eq!(got[0].header.msg_id, id, "{name}");
                    assert_eq!(got[0].errno(), Some(errno as u32), "{name}: {got:?}");
                }
                Expect::NoReply => {
                    // The next reply must be the one to this read (the
                    // client fails on a reply with another id).
                    let v = c.read32(BAR0, regs::ID);
                    assert_eq!(v.ok(), Some(vdevd_tests::sample::ID_VALUE), "{name}");
                }
            }
            drop(c);
            f.check_clean(name);
            // A warning, or the error with its errno (refusals of what is
            // merely unsupported are logged at info level).
            let log = f.server.new_log();
            let errno = match expect {
                Expect::Errno(e) | Expect::ErrnoThenClose(e) => e,
                Expect::NoReply => EINVAL,
            };
            assert!(
                log.contains("WARN") || log.contains(&format!("(errno {errno})")),
                "{name}: the log does not mention it:\n{log}"
            );
        }
    }
}

/// Every case of the table, in order, against one server. A failing case
/// names itself.
#[test]
fn bad_input_gets_the_right_errno_or_a_clean_close() {
    let max_maps = MAX_MAPS.to_string();
    let mut f = Fixture::new(&["--max-dma-maps", &max_maps]);
    let mem = SharedMemory::new("negative-tests", MEM).expect("memfd");
    let all = cases();
    for case in &all {
        run_case(&mut f, &mem, case);
    }
    let mut names: Vec<&str> = all.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), all.len(), "case names are unique");
    eprintln!("{} bad-input cases passed", all.len());
    assert!(f.server.is_running());
    let status = f.server.stop().expect("stop");
    assert!(
        status.success(),
        "vdevd exits cleanly on SIGTERM: {status:?}"
    );
}
