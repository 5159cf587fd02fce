//! One DMA address space shared by several devices.
//!
//! Devices served to one VM can share an address space (`address_space =
//! "vm1"` in their `[[device]]` tables): one [`DmaSpace`], and so one
//! VFIO container or iommufd IOAS for the passthrough devices among them
//! (the space's IOMMU mirror). vfio-user has one socket per device, and the
//! VMM sends its DMA_MAPs on each; the space owns each mapping once:
//!
//! * a grant identical to one already in the space (same IOVA, size,
//!   protection, file and offset) from another device's session is
//!   counted, not mapped again;
//! * a grant that overlaps a different one is refused (EEXIST), as in one
//!   device's space;
//! * a DMA_UNMAP, or the end of a session, drops that session's holds;
//!   the mapping leaves the space (and the IOMMU, exactly once) when its
//!   last holder drops it;
//! * a device that joins the space later (a passthrough device attached to
//!   the existing container) gets the existing mappings replayed by the
//!   space's mirror.
//!
//! Only file-backed grants can be shared: a grant without a file is served
//! through one client's messages, which the other devices cannot reach.
//! Migration (dirty page logging) of a shared space is not supported.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use vdevd_devices::dma::{DmaError, DmaRange, DmaSpace, MapRequest, Prot};

use crate::error::Error;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What identifies the memory of a grant: the file (device, inode) and
/// the offset in it.
pub type FileId = (u64, u64, u64);

#[derive(Debug)]
struct Grant {
    size: u64,
    prot: Prot,
    file: FileId,
    /// Holder -> holds.
    holders: HashMap<u64, usize>,
}

/// A DMA address space shared by the devices of one VM.
#[derive(Debug)]
pub struct SharedSpace {
    name: String,
    dma: Arc<DmaSpace>,
    grants: Mutex<BTreeMap<u64, Grant>>,
    next_holder: Mutex<u64>,
}

impl SharedSpace {
    /// A shared space called `name` over `dma`.
    pub fn new(name: &str, dma: Arc<DmaSpace>) -> Arc<SharedSpace> {
        dma.set_label(name);
        Arc::new(SharedSpace {
            name: name.to_string(),
            dma,
            grants: Mutex::new(BTreeMap::new()),
            next_holder: Mutex::new(0),
        })
    }

    /// The space's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The DMA space.
    pub fn dma(&self) -> &Arc<DmaSpace> {
        &self.dma
    }

    /// A new holder id (one per device).
    pub fn holder(&self) -> u64 {
        let mut n = lock(&self.next_holder);
        *n += 1;
        *n
    }

    /// Mappings in the space now.
    pub fn len(&self) -> usize {
        lock(&self.grants).len()
    }

    /// Whether the space has no mapping.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Holds on the mapping at `iova`, over all holders.
    pub fn holds(&self, iova: u64) -> usize {
        lock(&self.grants)
            .get(&iova)
            .map(|g| g.holders.values().sum())
            .unwrap_or(0)
    }

    /// `holder` grants `req`, whose file is `file`: the mapping is added, or
    /// an identical one is counted. Returns the range.
    pub fn map(
        &self,
        holder: u64,
        req: MapRequest,
        file: Option<FileId>,
    ) -> Result<DmaRange, Error> {
        let Some(file) = file else {
            return Err(Error::NotSupported(format!(
                "address space {} is shared: only file-backed DMA grants can be shared",
                self.name
            )));
        };
        let mut grants = lock(&self.grants);
        if let Some(g) = grants.get_mut(&req.iova) {
            if g.size == req.size && g.prot == req.prot && g.file == file {
                let mine = g.holders.entry(holder).or_insert(0);
                if *mine > 0 {
                    // The same session mapping the same range twice is an
                    // overlap, as in a space of its own.
                    return Err(DmaError::Overlap {
                        iova: req.iova,
                        size: req.size,
                    }
                    .into());
                }
                *mine = 1;
                log::debug!(
                    "address space {}: {:#x}+{:#x} shared by {} devices",
                    self.name,
                    req.iova,
                    req.size,
                    g.holders.len()
                );
                return self
                    .dma
                    .find(req.iova, req.size)
                    .ok_or_else(|| Error::InvalidState("shared mapping vanished".into()));
            }
        }
        let (iova, size, prot) = (req.iova, req.size, req.prot);
        let range = self.dma.map(req)?;
        grants.insert(
            iova,
            Grant {
                size,
                prot,
                file,
                holders: HashMap::from([(holder, 1)]),
            },
        );
        Ok(range)
    }

    /// `holder` drops its grant of `iova`+`size`; the mapping leaves the
    /// space with its last holder. ENOENT if `holder` holds no such grant.
    pub fn unmap(&self, holder: u64, iova: u64, size: u64) -> Result<(), Error> {
        let mut grants = lock(&self.grants);
        let not_found = || Error::from(DmaError::NotFound { iova, size });
        let g = grants.get_mut(&iova).ok_or_else(not_found)?;
        if g.size != size || !g.holders.contains_key(&holder) {
            return Err(not_found());
        }
        g.holders.remove(&holder);
        if g.holders.is_empty() {
            grants.remove(&iova);
            self.dma.unmap(iova, size)?;
        }
        Ok(())
    }

    /// The ranges `holder` holds.
    pub fn held_by(&self, holder: u64) -> Vec<DmaRange> {
        lock(&self.grants)
            .iter()
            .filter(|(_, g)| g.holders.contains_key(&holder))
            .filter_map(|(iova, g)| self.dma.find(*iova, g.size))
            .collect()
    }
}

/// The shared space a device uses, and its holder id in it.
#[derive(Clone, Debug)]
pub struct SharedMember {
    /// The space.
    pub space: Arc<SharedSpace>,
    /// This device's holder id.
    pub holder: u64,
}

impl SharedMember {
    /// Whether this device holds `range`.
    pub fn held_by_me(&self, range: &DmaRange) -> bool {
        lock(&self.space.grants)
            .get(&range.iova)
            .is_some_and(|g| g.size == range.size && g.holders.contains_key(&self.holder))
    }
}

/// The named shared spaces of a process.
#[derive(Debug, Default)]
pub struct SharedSpaces {
    spaces: Mutex<HashMap<String, Arc<SharedSpace>>>,
}

impl SharedSpaces {
    /// The space `name`, created over `make()` the first time.
    pub fn get(&self, name: &str, make: impl FnOnce() -> Arc<DmaSpace>) -> Arc<SharedSpace> {
        lock(&self.spaces)
            .entry(name.to_string())
            .or_insert_with(|| SharedSpace::new(name, make()))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;

    fn memfd(size: u64) -> File {
        // SAFETY: the name is a valid C string; no other pointer.
        let fd = unsafe { libc::memfd_create(c"aspace".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    fn req(f: &File, iova: u64, size: u64, offset: u64) -> (MapRequest, Option<FileId>) {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata().unwrap();
        (
            MapRequest {
                iova,
                size,
                prot: Prot::RW,
                file: Some((f.try_clone().unwrap(), offset)),
            },
            Some((m.dev(), m.ino(), offset)),
        )
    }

    #[test]
    fn identical_grants_are_counted_and_freed_once() {
        let space = SharedSpace::new("vm1", Arc::new(DmaSpace::default()));
        let (a, b) = (space.holder(), space.holder());
        let f = memfd(0x10000);
        let (r, id) = req(&f, 0x10000, 0x4000, 0);
        space.map(a, r, id).unwrap();
        let (r, id) = req(&f, 0x10000, 0x4000, 0);
        space.map(b, r, id).unwrap();
        assert_eq!(space.holds(0x10000), 2);
        assert_eq!(space.dma().len(), 1, "mapped once");
        // the same holder twice: overlap
        let (r, id) = req(&f, 0x10000, 0x4000, 0);
        let e = space.map(a, r, id).unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST);
        space.unmap(a, 0x10000, 0x4000).unwrap();
        assert_eq!(space.dma().len(), 1, "b still holds it");
        // a holder cannot drop what it does not hold
        assert_eq!(
            space.unmap(a, 0x10000, 0x4000).unwrap_err().errno(),
            libc::ENOENT
        );
        assert_eq!(space.held_by(b).len(), 1);
        space.unmap(b, 0x10000, 0x4000).unwrap();
        assert!(space.dma().is_empty());
        assert!(space.is_empty());
    }

    #[test]
    fn conflicting_grants_are_refused() {
        let space = SharedSpace::new("vm1", Arc::new(DmaSpace::default()));
        let (a, b) = (space.holder(), space.holder());
        let f = memfd(0x10000);
        let (r, id) = req(&f, 0x10000, 0x4000, 0);
        space.map(a, r, id).unwrap();
        // same range, other offset in the file
        let (r, id) = req(&f, 0x10000, 0x4000, 0x4000);
        assert_eq!(space.map(b, r, id).unwrap_err().errno(), libc::EEXIST);
        // overlapping range
        let (r, id) = req(&f, 0x12000, 0x4000, 0);
        assert_eq!(space.map(b, r, id).unwrap_err().errno(), libc::EEXIST);
        // another file
        let g = memfd(0x10000);
        let (r, id) = req(&g, 0x10000, 0x4000, 0);
        assert_eq!(space.map(b, r, id).unwrap_err().errno(), libc::EEXIST);
        // no file
        let r = MapRequest {
            iova: 0x80000,
            size: 0x1000,
            prot: Prot::RW,
            file: None,
        };
        assert_eq!(space.map(b, r, None).unwrap_err().errno(), libc::ENOTSUP);
        assert_eq!(space.holds(0x10000), 1);
    }

    #[test]
    fn spaces_are_found_by_name() {
        let spaces = SharedSpaces::default();
        let a = spaces.get("vm1", || Arc::new(DmaSpace::default()));
        let b = spaces.get("vm1", || panic!("made once"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.dma().label(), "vm1");
    }

    /// Two device servers on one shared space, each with its own client
    /// sending the same DMA_MAP, as QEMU does for the devices of one VM.
    #[test]
    fn two_sessions_share_one_mapping_end_to_end() {
        use crate::devset::DeviceSets;
        use crate::listener::Listener;
        use crate::options::ServerOptions;
        use crate::server::{DeviceServer, Placement, dma_space};
        use crate::testutil::{Client, FakeDevice, TempDir, memfd as test_memfd};
        use std::os::fd::AsRawFd;
        use vdevd_protocol::{self as proto, Request};

        let dir = TempDir::new("aspace");
        let options = ServerOptions::default();
        let spaces = SharedSpaces::default();
        let sets = DeviceSets::new();
        let mut servers = Vec::new();
        let mut logs = Vec::new();
        for i in 0..2 {
            let space = spaces.get("vm1", || dma_space(&options));
            let (device, log) = FakeDevice::new(false);
            logs.push(log);
            servers.push(
                DeviceServer::start_in_set(
                    Listener::bind(&dir.path().join(format!("d{i}.sock"))).unwrap(),
                    space.dma().clone(),
                    Box::new(device),
                    options.clone(),
                    None,
                    Placement {
                        set: sets.join(&format!("s{i}")),
                        name: format!("d{i}"),
                        shared: Some(SharedMember {
                            holder: space.holder(),
                            space,
                        }),
                    },
                )
                .unwrap(),
            );
        }
        let space = spaces.get("vm1", || panic!("exists"));
        let (mem, _) = test_memfd("guest");
        File::from(mem.try_clone().unwrap())
            .set_len(0x10000)
            .unwrap();
        let map = |c: &mut Client, offset: u64| {
            c.call_with(
                &Request::DmaMap(proto::DmaMap {
                    argsz: 32,
                    read: true,
                    write: true,
                    offset,
                    address: 0x100000,
                    size: 0x8000,
                }),
                &[mem.as_raw_fd()],
            )
            .map(|_| ())
        };
        let mut clients: Vec<Client> = (0..2)
            .map(|i| Client::connect(&dir.path().join(format!("d{i}.sock"))))
            .collect();
        for c in &mut clients {
            c.version();
            map(c, 0).unwrap();
        }
        assert_eq!(space.dma().len(), 1);
        assert_eq!(space.holds(0x100000), 2);
        // both devices were told about the range
        assert!(logs.iter().all(|l| l.lock().unwrap().maps.len() == 1));
        // a conflicting grant from the first client: EEXIST
        let e = map(&mut clients[0], 0x8000).unwrap_err();
        assert_eq!(e, libc::EEXIST as u32);
        // the first client leaves: its hold goes, the mapping stays
        drop(clients.remove(0));
        let t0 = std::time::Instant::now();
        while space.holds(0x100000) != 1 {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(space.dma().len(), 1);
        assert_eq!(logs[0].lock().unwrap().unmaps.len(), 1);
        // the second unmaps: the mapping leaves the space
        clients[0]
            .call(&Request::DmaUnmap(proto::DmaUnmap {
                argsz: 24,
                address: 0x100000,
                size: 0x8000,
                kind: proto::UnmapKind::Range,
            }))
            .unwrap();
        assert!(space.dma().is_empty());
        assert!(space.is_empty());
    }
}
