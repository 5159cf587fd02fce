//! Data pointers: PRP lists and SGLs, turned into a list of guest memory
//! segments. Nothing here trusts the guest: every entry is checked, list
//! walks are bounded, and no allocation happens once the segment vector has
//! grown to the largest transfer.

use super::guest::Guest;
use super::spec::{Command, PSDT_PRP, Status};

/// One piece of a transfer in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seg {
    /// Guest address (unused for a bit bucket).
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
    /// SGL bit bucket: data the host does not want (reads only).
    pub bucket: bool,
}

/// Most SGL descriptors walked for one command.
pub(crate) const MAX_SGL_DESCRIPTORS: usize = 1024;
/// Descriptors read from guest memory at a time.
const SGL_CHUNK: usize = 16;
/// PRP list entries read from guest memory at a time.
const PRP_CHUNK: usize = 256;

const SGL_DATA_BLOCK: u8 = 0x0;
const SGL_BIT_BUCKET: u8 = 0x1;
const SGL_SEGMENT: u8 = 0x2;
const SGL_LAST_SEGMENT: u8 = 0x3;

fn push(out: &mut Vec<Seg>, iova: u64, len: u64, bucket: bool) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.bucket == bucket && (bucket || last.iova.checked_add(last.len) == Some(iova)) {
            last.len += len;
            return;
        }
    }
    out.push(Seg { iova, len, bucket });
}

/// Build the segments of a `len`-byte transfer described by `cmd`'s data
/// pointer. `page` is the host memory page size (CC.MPS). Admin commands
/// take PRPs only; bit buckets are allowed only when `bucket_ok` (data
/// flowing to the host).
pub(crate) fn segments(
    g: &mut Guest<'_>,
    cmd: &Command,
    len: u64,
    page: u64,
    admin: bool,
    bucket_ok: bool,
    out: &mut Vec<Seg>,
) -> Result<(), Status> {
    out.clear();
    match cmd.psdt {
        PSDT_PRP => prp(g, cmd.dptr1, cmd.dptr2, len, page, out),
        // SGL for data; with no metadata, the two SGL forms are the same.
        1 | 2 if !admin => sgl(g, &cmd.dptr_bytes(), len, bucket_ok, out),
        _ => Err(Status::INVALID_FIELD),
    }
}

fn prp(
    g: &mut Guest<'_>,
    prp1: u64,
    prp2: u64,
    len: u64,
    page: u64,
    out: &mut Vec<Seg>,
) -> Result<(), Status> {
    if len == 0 {
        return Ok(());
    }
    if prp1 & 3 != 0 {
        return Err(Status::INVALID_PRP_OFFSET);
    }
    let mask = page - 1;
    let first = len.min(page - (prp1 & mask));
    push(out, prp1, first, false);
    let mut left = len - first;
    if left == 0 {
        return Ok(());
    }
    if left <= page {
        if prp2 & mask != 0 {
            return Err(Status::INVALID_PRP_OFFSET);
        }
        push(out, prp2, left, false);
        return Ok(());
    }
    // PRP2 points to a list; its last entry on a page chains to the next
    // list page when more entries are needed.
    if prp2 & 7 != 0 {
        return Err(Status::INVALID_PRP_OFFSET);
    }
    let mut list = prp2;
    let mut buf = [0u8; PRP_CHUNK * 8];
    loop {
        let in_page = (page - (list & mask)) / 8;
        let needed = left.div_ceil(page);
        // With more entries needed than fit, the last one is a chain.
        let (data_entries, chained) = if needed <= in_page {
            (needed, false)
        } else {
            (in_page - 1, true)
        };
        let to_read = if chained { in_page } else { needed };
        let mut idx = 0u64;
        while idx < to_read {
            let n = (to_read - idx).min(PRP_CHUNK as u64) as usize;
            let at = list
                .checked_add(idx * 8)
                .ok_or(Status::DATA_TRANSFER_ERROR)?;
            g.read(at, &mut buf[..n * 8])
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            for i in 0..n {
                let e = u64::from_le_bytes(
                    buf[i * 8..i * 8 + 8]
                        .try_into()
                        .map_err(|_| Status::INTERNAL)?,
                );
                if e & mask != 0 {
                    return Err(Status::INVALID_PRP_OFFSET);
                }
                let k = idx + i as u64;
                if k < data_entries {
                    let l = left.min(page);
                    push(out, e, l, false);
                    left -= l;
                } else {
                    // the chain entry
                    list = e;
                }
            }
            idx += n as u64;
        }
        if !chained {
            return Ok(());
        }
    }
}

struct Desc {
    addr: u64,
    len: u32,
    kind: u8,
    subtype: u8,
}

fn desc(b: &[u8]) -> Desc {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[0..8]);
    let mut l = [0u8; 4];
    l.copy_from_slice(&b[8..12]);
    Desc {
        addr: u64::from_le_bytes(a),
        len: u32::from_le_bytes(l),
        kind: b[15] >> 4,
        subtype: b[15] & 0xf,
    }
}

fn sgl(
    g: &mut Guest<'_>,
    sgl1: &[u8; 16],
    len: u64,
    bucket_ok: bool,
    out: &mut Vec<Seg>,
) -> Result<(), Status> {
    let mut total = 0u64;
    let mut seen = 0usize;
    let mut add = |d: &Desc, out: &mut Vec<Seg>| -> Result<(), Status> {
        if d.subtype != 0 {
            return Err(Status::SGL_INVALID_TYPE);
        }
        let bucket = match d.kind {
            SGL_DATA_BLOCK => false,
            SGL_BIT_BUCKET if bucket_ok => true,
            _ => return Err(Status::SGL_INVALID_TYPE),
        };
        let l = u64::from(d.len);
        total = total
            .checked_add(l)
            .filter(|t| *t <= len)
            .ok_or(Status::SGL_INVALID_DATA_LENGTH)?;
        if !bucket && d.addr.checked_add(l).is_none() {
            return Err(Status::DATA_TRANSFER_ERROR);
        }
        push(out, d.addr, l, bucket);
        Ok(())
    };
    let first = desc(sgl1);
    let mut next = match first.kind {
        SGL_DATA_BLOCK | SGL_BIT_BUCKET => {
            add(&first, out)?;
            None
        }
        SGL_SEGMENT | SGL_LAST_SEGMENT => Some(first),
        _ => return Err(Status::SGL_INVALID_TYPE),
    };
    let mut buf = [0u8; SGL_CHUNK * 16];
    while let Some(seg) = next.take() {
        if seg.subtype != 0 {
            return Err(Status::SGL_INVALID_TYPE);
        }
        if seg.len == 0 || seg.len % 16 != 0 {
            return Err(Status::SGL_INVALID_SEGMENT);
        }
        let last_segment = seg.kind == SGL_LAST_SEGMENT;
        let count = (seg.len / 16) as usize;
        let mut i = 0usize;
        while i < count {
            let n = (count - i).min(SGL_CHUNK);
            let at = seg
                .addr
                .checked_add(i as u64 * 16)
                .ok_or(Status::DATA_TRANSFER_ERROR)?;
            g.read(at, &mut buf[..n * 16])
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            for j in 0..n {
                seen += 1;
                if seen > MAX_SGL_DESCRIPTORS {
                    return Err(Status::SGL_INVALID_COUNT);
                }
                let d = desc(&buf[j * 16..j * 16 + 16]);
                match d.kind {
                    SGL_SEGMENT | SGL_LAST_SEGMENT => {
                        // Only the last descriptor of a segment that is not
                        // itself the last one may chain.
                        if last_segment || i + j + 1 != count {
                            return Err(Status::SGL_INVALID_SEGMENT);
                        }
                        next = Some(d);
                    }
                    _ => add(&d, out)?,
                }
            }
            i += n;
        }
    }
    if total != len {
        return Err(Status::SGL_INVALID_DATA_LENGTH);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::{DmaSpace, MapRequest, Prot};
    use std::ffi::CString;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;

    const PAGE: u64 = 4096;

    fn space(size: u64) -> (DmaSpace, File) {
        let name = CString::new("dptr-test").unwrap();
        // SAFETY: valid name and flags.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        // SAFETY: F_ADD_SEALS on our own descriptor.
        let rc = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(rc, 0);
        let s = DmaSpace::default();
        s.map(MapRequest {
            iova: 0,
            size,
            prot: Prot::RW,
            file: Some((f.try_clone().unwrap(), 0)),
        })
        .unwrap();
        (s, f)
    }

    fn put_u64s(f: &File, at: u64, v: &[u64]) {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        f.write_all_at(&b, at).unwrap();
    }

    fn cmd(psdt: u8, d1: u64, d2: u64) -> Command {
        Command {
            psdt,
            dptr1: d1,
            dptr2: d2,
            ..Command::default()
        }
    }

    fn run(s: &DmaSpace, c: &Command, len: u64, bucket_ok: bool) -> Result<Vec<Seg>, Status> {
        let mut g = Guest::new(s);
        let mut out = Vec::new();
        segments(&mut g, c, len, PAGE, false, bucket_ok, &mut out).map(|_| out)
    }

    fn seg(iova: u64, len: u64) -> Seg {
        Seg {
            iova,
            len,
            bucket: false,
        }
    }

    #[test]
    fn prp1_only_and_prp2_as_second_page() {
        let (s, _f) = space(1 << 20);
        assert_eq!(
            run(&s, &cmd(0, 0x10200, 0), 512, false).unwrap(),
            vec![seg(0x10200, 512)]
        );
        assert_eq!(
            run(&s, &cmd(0, 0x10800, 0x30000), 4096, false).unwrap(),
            vec![seg(0x10800, 2048), seg(0x30000, 2048)]
        );
        // adjacent pages merge
        assert_eq!(
            run(&s, &cmd(0, 0x10000, 0x11000), 8192, false).unwrap(),
            vec![seg(0x10000, 8192)]
        );
        assert_eq!(
            run(&s, &cmd(0, 0x10002, 0), 512, false),
            Err(Status::INVALID_PRP_OFFSET)
        );
        assert_eq!(
            run(&s, &cmd(0, 0x10000, 0x30010), 8192, false),
            Err(Status::INVALID_PRP_OFFSET)
        );
    }

    #[test]
    fn prp_list_spanning_pages() {
        let (s, f) = space(4 << 20);
        // 520 pages of data: prp1 + 519 list entries -> the first list page
        // holds 511 data entries and a chain to a second page.
        let pages = 520u64;
        let data = |i: u64| 0x100000 + i * 2 * PAGE; // never adjacent
        let mut list1: Vec<u64> = (1..512).map(data).collect();
        list1.push(0x5000);
        put_u64s(&f, 0x4000, &list1);
        let list2: Vec<u64> = (512..pages).map(data).collect();
        put_u64s(&f, 0x5000, &list2);
        let segs = run(&s, &cmd(0, data(0), 0x4000), pages * PAGE, false).unwrap();
        assert_eq!(segs.len(), pages as usize);
        for (i, sg) in segs.iter().enumerate() {
            assert_eq!(*sg, seg(data(i as u64), PAGE));
        }
        // a list that starts mid-page: fewer entries before the chain
        put_u64s(&f, 0x6ff0, &[data(1), 0x7000]);
        put_u64s(&f, 0x7000, &[data(2), data(3)]);
        let segs = run(&s, &cmd(0, data(0) + 0x800, 0x6ff0), 3 * PAGE, false).unwrap();
        assert_eq!(
            segs,
            vec![
                seg(data(0) + 0x800, 0x800),
                seg(data(1), PAGE),
                seg(data(2), PAGE),
                seg(data(3), PAGE - 0x800)
            ]
        );
        // a misaligned entry inside the list
        put_u64s(&f, 0x8000, &[data(1), data(2) + 8]);
        assert_eq!(
            run(&s, &cmd(0, data(0), 0x8000), 3 * PAGE, false),
            Err(Status::INVALID_PRP_OFFSET)
        );
        // a list pointer that is not qword aligned
        assert_eq!(
            run(&s, &cmd(0, data(0), 0x8004), 3 * PAGE, false),
            Err(Status::INVALID_PRP_OFFSET)
        );
        // a list in unmapped memory
        assert_eq!(
            run(&s, &cmd(0, data(0), 0x7fff_0000), 3 * PAGE, false),
            Err(Status::DATA_TRANSFER_ERROR)
        );
    }

    fn sgl_desc(addr: u64, len: u32, kind: u8) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[15] = kind << 4;
        d
    }

    fn sgl_cmd(d: [u8; 16]) -> Command {
        cmd(
            1,
            u64::from_le_bytes(d[..8].try_into().unwrap()),
            u64::from_le_bytes(d[8..].try_into().unwrap()),
        )
    }

    fn put_descs(f: &File, at: u64, ds: &[[u8; 16]]) {
        let b: Vec<u8> = ds.iter().flatten().copied().collect();
        f.write_all_at(&b, at).unwrap();
    }

    #[test]
    fn sgl_data_block_segment_and_last_segment() {
        let (s, f) = space(1 << 20);
        assert_eq!(
            run(&s, &sgl_cmd(sgl_desc(0x20000, 4096, 0)), 4096, false).unwrap(),
            vec![seg(0x20000, 4096)]
        );
        // segment -> [data, data, last segment] -> [data, bit bucket]
        put_descs(
            &f,
            0x1000,
            &[
                sgl_desc(0x20000, 1000, 0),
                sgl_desc(0x40000, 24, 0),
                sgl_desc(0x2000, 32, 3),
            ],
        );
        put_descs(
            &f,
            0x2000,
            &[sgl_desc(0x50000, 512, 0), sgl_desc(0, 512, 1)],
        );
        let c = sgl_cmd(sgl_desc(0x1000, 48, 2));
        assert_eq!(
            run(&s, &c, 2048, true).unwrap(),
            vec![
                seg(0x20000, 1000),
                seg(0x40000, 24),
                seg(0x50000, 512),
                Seg {
                    iova: 0,
                    len: 512,
                    bucket: true
                }
            ]
        );
        // bit buckets are refused where data flows to the device
        assert_eq!(run(&s, &c, 2048, false), Err(Status::SGL_INVALID_TYPE));
        // too little data, too much data
        assert_eq!(
            run(&s, &c, 4096, true),
            Err(Status::SGL_INVALID_DATA_LENGTH)
        );
        assert_eq!(
            run(&s, &c, 1024, true),
            Err(Status::SGL_INVALID_DATA_LENGTH)
        );
        // a segment descriptor inside a last segment
        put_descs(&f, 0x3000, &[sgl_desc(0x1000, 48, 2)]);
        assert_eq!(
            run(&s, &sgl_cmd(sgl_desc(0x3000, 16, 3)), 2048, true),
            Err(Status::SGL_INVALID_SEGMENT)
        );
        // a chain that is not the last descriptor of its segment
        put_descs(
            &f,
            0x4000,
            &[sgl_desc(0x2000, 32, 3), sgl_desc(0x20000, 512, 0)],
        );
        assert_eq!(
            run(&s, &sgl_cmd(sgl_desc(0x4000, 32, 2)), 512, true),
            Err(Status::SGL_INVALID_SEGMENT)
        );
        // a segment length that is not a multiple of 16
        assert_eq!(
            run(&s, &sgl_cmd(sgl_desc(0x1000, 40, 2)), 2048, true),
            Err(Status::SGL_INVALID_SEGMENT)
        );
        // unknown descriptor types and subtypes
        assert_eq!(
            run(&s, &sgl_cmd(sgl_desc(0x1000, 16, 4)), 16, true),
            Err(Status::SGL_INVALID_TYPE)
        );
        let mut d = sgl_desc(0x20000, 512, 0);
        d[15] |= 1;
        assert_eq!(
            run(&s, &sgl_cmd(d), 512, true),
            Err(Status::SGL_INVALID_TYPE)
        );
        // SGLs are not for admin commands
        let mut g = Guest::new(&s);
        let mut out = Vec::new();
        assert_eq!(
            segments(
                &mut g,
                &sgl_cmd(sgl_desc(0x20000, 512, 0)),
                512,
                PAGE,
                true,
                false,
                &mut out
            ),
            Err(Status::INVALID_FIELD)
        );
        assert_eq!(
            run(&s, &cmd(3, 0, 0), 512, false),
            Err(Status::INVALID_FIELD)
        );
    }

    #[test]
    fn sgl_loops_are_bounded() {
        let (s, f) = space(1 << 20);
        // a segment that chains to itself forever
        put_descs(
            &f,
            0x1000,
            &[sgl_desc(0x20000, 16, 0), sgl_desc(0x1000, 32, 2)],
        );
        assert_eq!(
            run(&s, &sgl_cmd(sgl_desc(0x1000, 32, 2)), 1 << 20, false),
            Err(Status::SGL_INVALID_COUNT)
        );
        // a huge segment length is walked only until the count runs out
        assert_eq!(
            run(&s, &sgl_cmd(sgl_desc(0x10000, 0xffff_fff0, 3)), 512, false),
            Err(Status::SGL_INVALID_COUNT)
        );
    }
}
