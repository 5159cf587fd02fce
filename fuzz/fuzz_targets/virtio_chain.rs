//! Feed arbitrary guest memory to the virtio-blk model: the input holds a
//! split virtqueue's descriptor table and available ring at fixed
//! addresses, and every request header, payload, indirect table and loop
//! they point to (see `vdevd_devices::virtio::fuzz`). Besides "no panic,
//! no hang", it checks that the used index moves by exactly the chains the
//! loop says it completed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vdevd_devices::virtio::fuzz::{FUZZ_USED, fuzz_queue};

fuzz_target!(|data: &[u8]| {
    let out = fuzz_queue(data);
    if let Ok(run) = out.run {
        let u = FUZZ_USED as usize;
        // Bytes past the input's end read as zero in guest memory.
        let byte = |m: &[u8], i: usize| m.get(i).copied().unwrap_or(0);
        let at = |m: &[u8]| u16::from_le_bytes([byte(m, u + 2), byte(m, u + 3)]);
        // The queue starts at used index 0: after completions the index is
        // their count; without any, the driver's bytes are left alone.
        let want = if run.completed > 0 { run.completed as u16 } else { at(data) };
        assert_eq!(at(&out.memory), want);
    }
});
