//! Drive the server's real dispatch with a conversation of messages and
//! descriptors, as a client would over its socket.
//!
//! The input is a sequence of records (`vdevd::record::Record`: a byte
//! with the number and kinds of descriptors, a 32-bit length, the message
//! bytes), the format `VDEVD_RECORD_DIR` writes, so conversations recorded
//! from QEMU or the test client are seeds as they are. Each record is sent
//! over a socketpair with descriptors of the recorded kinds (eventfds,
//! sealed or unsealed memfds, or something else), read back by the
//! server's `Reader` and handed to `vdevd::server::dispatch`, the function
//! the device thread runs, against a sample device. Replies and the
//! server's own DMA requests are drained as a client would.
//!
//! Checked: no panic, no hang (dispatch never waits for the client), every
//! command that wants a reply gets one, and when the client goes away
//! every DMA mapping is gone.

#![no_main]

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vdevd::kinds::DeviceType;
use vdevd::kinds::sample::{Sample, SampleOptions};
use vdevd::options::ServerOptions;
use vdevd::record::{FdKind, Record};
use vdevd::server::{dispatch, dma_space, output_limit};
use vdevd::session::{self, DeviceState, Session};
use vdevd::wire::{Fill, OutMessage, Reader, Stats, Writer};
use vdevd_protocol::{HEADER_SIZE, Header, MessageKind};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of the memory files handed over as guest RAM: sparse, so only the
/// pages the device touches cost anything. Large enough for the offsets
/// QEMU uses for a small guest.
const MEMORY_SIZE: u64 = 1 << 30;
/// Most records of one input that are sent.
const MAX_RECORDS: usize = 256;

fuzz_target!(|data: &[u8]| {
    let records = Record::decode_all(data);
    let options = ServerOptions {
        dma_timeout: Duration::from_millis(20),
        ..ServerOptions::default()
    };
    let dma = dma_space(&options);
    let sample = SampleOptions {
        msix_vectors: 4,
        buffer_size: 4096,
    };
    let Ok(device) = Sample::build(sample, dma.clone()) else {
        return;
    };
    let Ok(mut dev) = DeviceState::new(device, dma, options.clone()) else {
        return;
    };
    // As on the device thread: message-backed DMA from here is refused.
    dev.dma.set_messenger(
        Some(dev.messenger.clone()),
        Some(std::thread::current().id()),
    );
    let (client, server) = UnixStream::pair().expect("socketpair");
    client.set_nonblocking(true).expect("nonblocking");
    server.set_nonblocking(true).expect("nonblocking");
    let stats = Stats::default();
    let mut session = Session::new();
    let mut reader = Reader::new(session.max_message());
    let mut writer = Writer::new(output_limit(session::max_message(
        options.max_data_xfer_size,
    )));
    let mut sink = vec![0u8; 1 << 16];

    let mut pumped = 0u64;
    'conversation: for rec in records.iter().take(MAX_RECORDS) {
        let fds: Vec<OwnedFd> = rec.fds.iter().filter_map(|k| make_fd(*k)).collect();
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let check_reply = wants_reply(rec.bytes) && reader.buffered() == 0;
        let sent_before = Stats::get(&stats.messages_sent);
        let pumped_before = pumped;
        let mut sent = 0;
        let mut fds_sent = raw.is_empty();
        while sent < rec.bytes.len() || !fds_sent {
            let chunk = &rec.bytes[sent..];
            let attach: &[i32] = if fds_sent { &[] } else { &raw };
            match client.send_with_fds(&[chunk], attach) {
                Ok(n) => {
                    sent += n;
                    fds_sent = true;
                }
                Err(e) if e.errno() == libc::EAGAIN => {} // full: the server reads first
                Err(_) => break 'conversation,
            }
            // Let the server take everything that arrived.
            loop {
                match reader.fill(server.as_fd(), &stats) {
                    Ok(Fill::Data(_)) => {}
                    Ok(Fill::WouldBlock) => break,
                    Ok(Fill::Eof) | Err(_) => break 'conversation,
                }
                let done = dispatch(
                    &mut session,
                    &mut dev,
                    &mut reader,
                    &mut writer,
                    &stats,
                    None,
                );
                if done.close.is_some() {
                    break 'conversation;
                }
                pumped += pump(&dev, &session, &mut writer);
                drain(&mut writer, &server, &client, &stats, &mut sink);
            }
        }
        drop(fds);
        drain(&mut writer, &server, &client, &stats, &mut sink);
        // A whole command that wants a reply, read and handled, was answered.
        if check_reply && reader.buffered() == 0 {
            let replies =
                (Stats::get(&stats.messages_sent) - sent_before) - (pumped - pumped_before);
            assert!(replies >= 1, "a command that wants a reply got none");
        }
    }
    session.end(&mut dev);
    assert!(
        dev.dma.ranges().is_empty(),
        "DMA mappings left after the client went away"
    );
    dev.dma.set_messenger(None, None);
});

/// Whether `bytes` is one complete command whose header asks for a reply.
fn wants_reply(bytes: &[u8]) -> bool {
    let Ok(h) = Header::parse(bytes) else {
        return false;
    };
    if h.size as usize != bytes.len() || bytes.len() < HEADER_SIZE {
        return false;
    }
    matches!(h.kind(), Ok(MessageKind::Command { no_reply: false }))
}

/// Move the server's DMA requests to its output, as the device thread does;
/// returns how many were queued.
fn pump(dev: &DeviceState, session: &Session, writer: &mut Writer) -> u64 {
    if !session.negotiated() {
        return 0;
    }
    let mut n = 0;
    for r in dev.messenger.take_requests(16) {
        if let Ok(bytes) = session::encode_dma_request(&r) {
            if writer
                .push(OutMessage {
                    bytes,
                    fds: Vec::new(),
                })
                .is_ok()
            {
                n += 1;
            }
        }
    }
    n
}

/// Send what the server queued and read it on the client side (descriptors
/// that come with it are closed by the kernel).
fn drain(
    writer: &mut Writer,
    server: &UnixStream,
    client: &UnixStream,
    stats: &Stats,
    sink: &mut [u8],
) {
    loop {
        let done = writer.flush(server.as_fd(), stats).unwrap_or(true);
        while matches!((&*client).read(sink), Ok(n) if n > 0) {}
        if done {
            return;
        }
    }
}

fn make_fd(kind: FdKind) -> Option<OwnedFd> {
    match kind {
        FdKind::EventFd => {
            // SAFETY: eventfd takes no pointers; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            // SAFETY: a new descriptor that nothing else owns.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        }
        FdKind::SealedMemory | FdKind::UnsealedMemory => {
            // SAFETY: a NUL-terminated name and valid flags; checked below.
            let fd = unsafe {
                libc::memfd_create(
                    c"fuzz".as_ptr(),
                    libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
                )
            };
            if fd < 0 {
                return None;
            }
            // SAFETY: a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: ftruncate on our descriptor; no pointers.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), MEMORY_SIZE as libc::off_t) } != 0 {
                return None;
            }
            if kind == FdKind::SealedMemory {
                // SAFETY: F_ADD_SEALS on our descriptor with a valid mask.
                unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
            }
            Some(fd)
        }
        FdKind::Other => {
            let f = std::fs::File::open("/dev/null").ok()?;
            Some(OwnedFd::from(f))
        }
    }
}
