//! Rough per-message cost of decoding and encoding the hot messages.
//!
//! `cargo run --release -p vdevd-protocol --example decode_speed`
//! (numbers depend on the machine and its load; they are indications).

use std::hint::black_box;
use std::time::Instant;

use vdevd_protocol::{
    Command, Header, RegionAccess, RegionCap, RegionData, RegionInfo, Request, SparseArea,
    command_message, parse_request, reply_message,
};

fn measure(name: &str, iterations: u32, mut f: impl FnMut()) {
    for _ in 0..iterations / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..iterations {
        f();
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(iterations);
    println!("{name:<48} {ns:8.1} ns/op");
}

fn main() {
    let mut body = Vec::new();
    RegionData {
        offset: 0x1000,
        region: 0,
        data: &[1, 2, 3, 4],
    }
    .encode(&mut body)
    .expect("encodes");
    let write = command_message(7, Command::RegionWrite, true, &body).expect("message");
    measure("header + REGION_WRITE (4 bytes) parse", 5_000_000, || {
        let header = Header::parse(black_box(&write)).expect("header");
        let command = header.command().expect("command");
        let request = parse_request(command, &write[16..]).expect("request");
        black_box(request);
    });

    let read = RegionAccess {
        offset: 0x10,
        region: 7,
        count: 4,
    }
    .to_bytes();
    let request = Header::parse(&write).expect("header");
    let mut out = Vec::with_capacity(64);
    measure("REGION_READ parse + 4-byte reply encode", 5_000_000, || {
        let Ok(Request::RegionRead(access)) = parse_request(Command::RegionRead, black_box(&read))
        else {
            unreachable!()
        };
        out.clear();
        RegionData {
            offset: access.offset,
            region: access.region,
            data: &[0x86, 0x80, 0x00, 0x10],
        }
        .encode(&mut out)
        .expect("encodes");
        black_box(reply_message(&request, &out).expect("reply"));
    });

    let info = RegionInfo {
        index: 0,
        flags: 7,
        size: 0x4000,
        offset: 0,
        caps: vec![RegionCap::SparseMmap(vec![SparseArea {
            offset: 0x1000,
            size: 0x3000,
        }])],
    };
    measure(
        "region info with sparse mmap encode + parse",
        1_000_000,
        || {
            out.clear();
            info.encode(64, &mut out).expect("encodes");
            black_box(RegionInfo::parse(&out).expect("parses"));
        },
    );

    let mut version = vec![0u8; 4];
    version.extend_from_slice(
        b"{\"capabilities\":{\"pgsizes\":4096,\"max_msg_fds\":16,\"max_dma_maps\":65535,\
          \"max_data_xfer_size\":1048576,\"migration\":{\"max_bitmap_size\":268435456,\
          \"pgsize\":4096},\"write_multiple\":true}}\0",
    );
    measure("VERSION (QEMU's JSON) parse", 200_000, || {
        black_box(parse_request(Command::Version, black_box(&version)).expect("parses"));
    });
}
