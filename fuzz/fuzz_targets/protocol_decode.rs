//! Feed arbitrary bytes to every decoder of the vfio-user wire format:
//! the header, every request and reply parser, the server-to-client DMA
//! messages and the capabilities JSON. Besides "no panic, no hang", it
//! checks that whatever parses re-encodes to something that parses to the
//! same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vdevd_protocol::{
    Capabilities, Command, Fit, Header, RegionInfo, RegionIoFds, Reply, Request, dma,
    parse_dma_reply, parse_reply, parse_request, parse_server_request,
};

fuzz_target!(|data: &[u8]| {
    // The header, and the body it frames.
    if let Ok(header) = Header::parse(data) {
        let _ = header.kind();
        assert_eq!(Header::parse(&header.encode()), Ok(header));
        let end = header.size.min(data.len() as u32) as usize;
        if let (Ok(command), Some(body)) = (header.command(), data.get(16..end)) {
            decode(command, body);
        }
    }
    // The whole input as the body of every command.
    for command in Command::ALL {
        decode(command, data);
    }
    // The input as the VERSION JSON text.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(caps) = Capabilities::from_json(text) {
            let again = Capabilities::from_json(&caps.to_json()).expect("own JSON parses");
            assert_eq!(
                again,
                Capabilities {
                    unknown_keys: Vec::new(),
                    ..caps
                }
            );
        }
    }
});

fn decode(command: Command, body: &[u8]) {
    if let Ok(request) = parse_request(command, body) {
        let encoded = request.to_body().expect("a parsed request encodes");
        let again = parse_request(command, &encoded).expect("its encoding parses");
        assert_eq!(normalize(again), normalize(request));
    }
    match parse_reply(command, body) {
        Ok(Reply::DeviceGetRegionInfo(reply)) => {
            let info = reply.info;
            let mut out = Vec::new();
            // Unknown capabilities cannot be encoded; the rest round-trips.
            if let Ok(fit) = info.encode(u32::MAX, &mut out) {
                assert_eq!(fit, Fit::Full);
                assert_eq!(RegionInfo::parse(&out).expect("own reply parses").info, info);
            }
        }
        Ok(Reply::DeviceGetRegionIoFds(reply)) => {
            let mut out = Vec::new();
            if reply.io_fds.encode(u32::MAX, &mut out) == Ok(Fit::Full) {
                assert_eq!(RegionIoFds::parse(&out).expect("own reply parses").io_fds, reply.io_fds);
            }
        }
        _ => {}
    }
    if let Ok(request) = parse_server_request(command, body) {
        let mut out = Vec::new();
        request.encode(&mut out);
        assert_eq!(parse_server_request(command, &out), Ok(request));
    }
    let _ = parse_dma_reply(command, body);
    let _ = dma::DmaAccess::parse_write_reply(body);
}

/// Version drops unknown keys when re-encoded; everything else must match.
fn normalize(request: Request<'_>) -> Request<'_> {
    match request {
        Request::Version(mut version) => {
            version.capabilities.unknown_keys.clear();
            Request::Version(version)
        }
        other => other,
    }
}
