//! IOMMU address spaces and IOMMU groups: what devices attach to.
//!
//! An [`IommuSpace`] is the kernel side of one vdevd DMA address space (a
//! [`DmaSpace`]): a VFIO container with a TYPE1v2 IOMMU (group path) or an
//! iommufd IOAS (cdev path). It is the space's [`DmaMirror`]: it is told
//! about every file-backed range once when the client grants it and once
//! when the grant ends, and keeps the list (its *windows*). The kernel
//! object behind it (the *backend*) exists only while at least one device
//! is attached:
//!
//! * the first attach creates it and replays every window onto it;
//! * a later attach joins it (the kernel then gives the new device every
//!   existing mapping: a container replays onto the group's domain, an IOAS
//!   is shared); a member attached twice is refused (EBUSY), a device of
//!   the other IOMMU type, or one whose IOMMU would change the page sizes
//!   in use, is refused (EPERM);
//! * the last detach unmaps every window from the kernel (each exactly
//!   once) and releases the backend; the windows stay, for the next attach.
//!
//! A [`Group`] is an open `/dev/vfio/N`, shared by every device of the
//! group that vdevd serves (the kernel lets a group be opened once). It is
//! attached to one space at a time, while any of its devices is open.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    VFIO_API_VERSION, VFIO_GROUP_FLAGS_VIABLE, VFIO_TYPE1v2_IOMMU,
};
use vm_memory::{FileOffset, MmapRegion};

use super::Vfio;
use super::sys::{PciAddress, VfioSys};
use crate::Error;
use crate::dma::{DmaError, DmaMirror, DmaRange, DmaSpace, Prot};

/// Which kernel interface an address space uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IommuKind {
    /// VFIO container and groups with the TYPE1v2 IOMMU.
    Group,
    /// iommufd IOAS and VFIO device cdevs.
    Iommufd,
}

impl IommuKind {
    /// The name used on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            IommuKind::Group => "group",
            IommuKind::Iommufd => "iommufd",
        }
    }
}

/// Counters of what a space asked of the kernel, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuStats {
    /// Ranges mapped into the kernel (including replays).
    pub kernel_maps: u64,
    /// Ranges unmapped from the kernel.
    pub kernel_unmaps: u64,
    /// Of `kernel_maps`, the replays onto a new backend.
    pub replays: u64,
    /// Backends (containers or IOASes) created.
    pub backends_created: u64,
    /// Members (groups or devices) attached now.
    pub members: usize,
    /// Windows (granted file-backed ranges) known now.
    pub windows: usize,
    /// Windows mapped in the kernel now.
    pub mapped: usize,
}

/// A granted file-backed range.
struct Window {
    size: u64,
    prot: Prot,
    file: Arc<File>,
    offset: u64,
    /// This process's mapping of the range, for the vaddr-based map ioctls.
    host: Option<MmapRegion<()>>,
    /// Mapped in the current backend.
    in_kernel: bool,
}

enum Backend {
    Container { fd: OwnedFd, pgsizes: u64 },
    Ioas { iommufd: Arc<OwnedFd>, id: u32 },
}

#[derive(Default)]
struct Inner {
    backend: Option<Backend>,
    /// "group N" or the device address, in attach order.
    members: Vec<String>,
    windows: BTreeMap<u64, Window>,
    stats: IommuStats,
    /// IOMMU_IOAS_MAP_FILE was refused as unknown (kernel before 6.13).
    no_map_file: bool,
}

/// The kernel side of one DMA address space. See the module docs.
pub struct IommuSpace {
    vfio: Arc<Vfio>,
    name: String,
    kind: IommuKind,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for IommuSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuSpace")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Vfio { what, source }
}

/// An errno meaning "the kernel does not know this ioctl".
fn unknown_ioctl(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP)
    )
}

impl IommuSpace {
    /// The IOMMU space of `dma`, created (as `kind`, named `name` in logs)
    /// and attached as its mirror if it has none. A space of the other
    /// kind is refused (EPERM): one address space, one IOMMU type.
    pub fn for_dma(
        vfio: &Arc<Vfio>,
        dma: &DmaSpace,
        name: &str,
        kind: IommuKind,
    ) -> Result<Arc<IommuSpace>, Error> {
        loop {
            if let Some(m) = dma.mirror() {
                let space = m.as_any().downcast::<IommuSpace>().map_err(|_| {
                    Error::IncompatibleAddressSpace(format!(
                        "address space {name} already mirrors its mappings elsewhere"
                    ))
                })?;
                if space.kind != kind {
                    return Err(Error::IncompatibleAddressSpace(format!(
                        "address space {} uses the {} IOMMU interface, this device asks for {}",
                        space.name,
                        space.kind.name(),
                        kind.name()
                    )));
                }
                if !Arc::ptr_eq(&space.vfio, vfio) {
                    return Err(Error::IncompatibleAddressSpace(format!(
                        "address space {} belongs to another VFIO host",
                        space.name
                    )));
                }
                return Ok(space);
            }
            let space = Arc::new(IommuSpace {
                vfio: vfio.clone(),
                name: name.to_string(),
                kind,
                inner: Mutex::new(Inner::default()),
            });
            match dma.set_mirror(space.clone()) {
                Ok(()) => return Ok(space),
                // Another device attached one meanwhile: use that.
                Err(DmaError::Mirror { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The space's name (for logs).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The IOMMU interface the space uses.
    pub fn kind(&self) -> IommuKind {
        self.kind
    }

    /// What the space has done so far.
    pub fn stats(&self) -> IommuStats {
        let inner = lock(&self.inner);
        let mut s = inner.stats;
        s.members = inner.members.len();
        s.windows = inner.windows.len();
        s.mapped = inner.windows.values().filter(|w| w.in_kernel).count();
        s
    }

    fn sys(&self) -> &dyn VfioSys {
        self.vfio.sys()
    }

    /// Map one window into the backend.
    fn map_window(
        &self,
        backend: &Backend,
        no_map_file: &mut bool,
        iova: u64,
        w: &mut Window,
    ) -> Result<(), io::Error> {
        if let Backend::Ioas { iommufd, id } = backend {
            if !*no_map_file {
                match self.sys().ioas_map_file(
                    iommufd.as_fd(),
                    *id,
                    w.file.as_fd(),
                    w.offset,
                    iova,
                    w.size,
                    w.prot,
                ) {
                    Ok(()) => return Ok(()),
                    Err(e) if unknown_ioctl(&e) => {
                        log::info!(
                            "address space {}: this kernel has no IOMMU_IOAS_MAP_FILE ({e}); \
                             mapping client memory through a mapping of this process",
                            self.name
                        );
                        *no_map_file = true;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let vaddr = match &w.host {
            Some(m) => m.as_ptr() as u64,
            None => {
                let len = usize::try_from(w.size)
                    .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
                let mut prot = libc::PROT_READ;
                if w.prot.write {
                    prot |= libc::PROT_WRITE;
                }
                let m = MmapRegion::build(
                    Some(FileOffset::from_arc(w.file.clone(), w.offset)),
                    len,
                    prot,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                )
                .map_err(io::Error::other)?;
                let vaddr = m.as_ptr() as u64;
                w.host = Some(m);
                vaddr
            }
        };
        match backend {
            Backend::Container { fd, .. } => {
                self.sys()
                    .container_map(fd.as_fd(), vaddr, iova, w.size, w.prot)
            }
            Backend::Ioas { iommufd, id } => {
                self.sys()
                    .ioas_map(iommufd.as_fd(), *id, vaddr, iova, w.size, w.prot)
            }
        }
    }

    fn unmap_window(&self, backend: &Backend, iova: u64, size: u64) -> io::Result<()> {
        match backend {
            Backend::Container { fd, .. } => self.sys().container_unmap(fd.as_fd(), iova, size),
            Backend::Ioas { iommufd, id } => {
                self.sys().ioas_unmap(iommufd.as_fd(), *id, iova, size)
            }
        }
    }

    /// Map every window into a new backend; on failure, unmap what was
    /// mapped (in reverse) and report the error.
    fn replay(&self, inner: &mut Inner, backend: &Backend) -> Result<(), Error> {
        let Inner {
            windows,
            stats,
            no_map_file,
            ..
        } = inner;
        let mut done: Vec<(u64, u64)> = Vec::new();
        let mut failed = None;
        for (&iova, w) in windows.iter_mut() {
            match self.map_window(backend, no_map_file, iova, w) {
                Ok(()) => {
                    w.in_kernel = true;
                    stats.kernel_maps += 1;
                    stats.replays += 1;
                    done.push((iova, w.size));
                }
                Err(e) => {
                    failed = Some((iova, w.size, e));
                    break;
                }
            }
        }
        if let Some((iova, size, e)) = failed {
            for &(at, len) in done.iter().rev() {
                if let Err(e) = self.unmap_window(backend, at, len) {
                    log::error!(
                        "address space {}: undoing the replay of {at:#x}+{len:#x}: {e}",
                        self.name
                    );
                }
                stats.kernel_unmaps += 1;
                if let Some(w) = windows.get_mut(&at) {
                    w.in_kernel = false;
                }
            }
            return Err(Error::Vfio {
                what: format!(
                    "address space {}: replaying mapping {iova:#x}+{size:#x}",
                    self.name
                ),
                source: e,
            });
        }
        if !done.is_empty() {
            log::info!(
                "address space {}: replayed {} existing mapping(s) onto the new {}",
                self.name,
                done.len(),
                match backend {
                    Backend::Container { .. } => "container",
                    Backend::Ioas { .. } => "IOAS",
                }
            );
        }
        Ok(())
    }

    /// Unmap every window from the backend (each once) and drop it.
    fn teardown(&self, inner: &mut Inner) {
        let Some(backend) = inner.backend.take() else {
            return;
        };
        let mut n = 0;
        for (&iova, w) in inner.windows.iter_mut() {
            if !w.in_kernel {
                continue;
            }
            if let Err(e) = self.unmap_window(&backend, iova, w.size) {
                log::error!(
                    "address space {}: unmapping {iova:#x}+{:#x}: {e}",
                    self.name,
                    w.size
                );
            }
            w.in_kernel = false;
            w.host = None;
            inner.stats.kernel_unmaps += 1;
            n += 1;
        }
        match backend {
            Backend::Container { fd, .. } => drop(fd),
            Backend::Ioas { iommufd, id } => {
                if let Err(e) = self.sys().ioas_destroy(iommufd.as_fd(), id) {
                    log::error!("address space {}: destroying IOAS {id}: {e}", self.name);
                }
            }
        }
        self.vfio.backend_released();
        log::info!(
            "address space {}: last device detached; {n} mapping(s) unmapped, {} released",
            self.name,
            match self.kind {
                IommuKind::Group => "container",
                IommuKind::Iommufd => "IOAS",
            }
        );
    }

    /// Attach `group` (its first open device). See the module docs.
    pub(crate) fn attach_group(&self, group: &Group) -> Result<(), Error> {
        let key = format!("group {}", group.number);
        if self.kind != IommuKind::Group {
            return Err(Error::IncompatibleAddressSpace(format!(
                "{key}: address space {} uses iommufd, not VFIO groups",
                self.name
            )));
        }
        let mut inner = lock(&self.inner);
        if inner.members.contains(&key) {
            return Err(Error::Busy(format!(
                "{key} is already attached to address space {}",
                self.name
            )));
        }
        let gfd = group.fd()?;
        match &inner.backend {
            Some(Backend::Container { fd, pgsizes }) => {
                let before = *pgsizes;
                self.sys()
                    .group_set_container(gfd, fd.as_fd())
                    .map_err(|e| attach_error(&key, &self.name, e))?;
                let after = self.sys().iommu_pgsizes(fd.as_fd());
                if after.as_ref().ok() != Some(&before) {
                    if let Err(e) = self.sys().group_unset_container(gfd) {
                        log::error!("{key}: leaving container of {}: {e}", self.name);
                    }
                    return Err(Error::IncompatibleAddressSpace(match after {
                        Ok(after) => format!(
                            "{key}: its IOMMU supports page sizes {after:#x}, address space {} \
                             uses {before:#x}",
                            self.name
                        ),
                        Err(e) => format!("{key}: page sizes after attaching: {e}"),
                    }));
                }
            }
            Some(Backend::Ioas { .. }) => {
                return Err(Error::IncompatibleAddressSpace(format!(
                    "{key}: address space {} is an IOAS",
                    self.name
                )));
            }
            None => {
                let backend = self.new_container(gfd, &key)?;
                if let Err(e) = self.replay(&mut inner, &backend) {
                    if let Err(e) = self.sys().group_unset_container(gfd) {
                        log::error!("{key}: leaving container of {}: {e}", self.name);
                    }
                    self.vfio.backend_released();
                    return Err(e);
                }
                inner.backend = Some(backend);
                inner.stats.backends_created += 1;
            }
        }
        inner.members.push(key.clone());
        log::info!(
            "address space {}: {key} attached ({} member(s), {} mapping(s))",
            self.name,
            inner.members.len(),
            inner.windows.len()
        );
        Ok(())
    }

    /// A new container with `group` in it and the TYPE1v2 IOMMU set.
    fn new_container(&self, group: BorrowedFd<'_>, key: &str) -> Result<Backend, Error> {
        self.vfio.backend_acquire(&self.name)?;
        let r = (|| {
            let fd = self
                .sys()
                .open_container()
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOENT) | Some(libc::ENODEV) => Error::NoIommu(format!(
                        "no /dev/vfio/vfio ({e}): load vfio and vfio_iommu_type1"
                    )),
                    Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM) => {
                        Error::AddressSpacesExhausted(format!("opening a VFIO container: {e}"))
                    }
                    _ => Error::Vfio {
                        what: "open /dev/vfio/vfio".into(),
                        source: e,
                    },
                })?;
            let api = self
                .sys()
                .api_version(fd.as_fd())
                .map_err(sys_err("VFIO_GET_API_VERSION"))?;
            if api != VFIO_API_VERSION as i32 {
                return Err(Error::NoIommu(format!(
                    "VFIO API version {api}, vdevd speaks {VFIO_API_VERSION}"
                )));
            }
            let type1v2 = self
                .sys()
                .check_extension(fd.as_fd(), VFIO_TYPE1v2_IOMMU)
                .map_err(sys_err("VFIO_CHECK_EXTENSION"))?;
            if !type1v2 {
                return Err(Error::NoIommu(
                    "the host's VFIO has no TYPE1v2 IOMMU (load vfio_iommu_type1)".into(),
                ));
            }
            self.sys()
                .group_set_container(group, fd.as_fd())
                .map_err(|e| attach_error(key, &self.name, e))?;
            let set = self
                .sys()
                .set_iommu(fd.as_fd(), VFIO_TYPE1v2_IOMMU)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ENODEV) | Some(libc::EINVAL) => {
                        Error::NoIommu(format!("{key}: VFIO_SET_IOMMU(TYPE1v2) refused: {e}"))
                    }
                    _ => Error::Vfio {
                        what: format!("{key}: VFIO_SET_IOMMU"),
                        source: e,
                    },
                })
                .and_then(|()| {
                    self.sys()
                        .iommu_pgsizes(fd.as_fd())
                        .map_err(sys_err("VFIO_IOMMU_GET_INFO"))
                });
            match set {
                Ok(pgsizes) => {
                    log::info!(
                        "address space {}: new VFIO container (TYPE1v2, page sizes {pgsizes:#x})",
                        self.name
                    );
                    Ok(Backend::Container { fd, pgsizes })
                }
                Err(e) => {
                    if let Err(e) = self.sys().group_unset_container(group) {
                        log::error!("{key}: leaving the new container: {e}");
                    }
                    Err(e)
                }
            }
        })();
        if r.is_err() {
            self.vfio.backend_released();
        }
        r
    }

    /// Detach `group` (its last device closed).
    pub(crate) fn detach_group(&self, group: &Group) {
        let key = format!("group {}", group.number);
        let mut inner = lock(&self.inner);
        let Some(i) = inner.members.iter().position(|m| *m == key) else {
            log::error!("address space {}: {key} detached twice", self.name);
            return;
        };
        inner.members.remove(i);
        if inner.members.is_empty() {
            // Unmap first: the mappings are freed by us, exactly once, not
            // implicitly by the kernel when the container empties.
            self.teardown(&mut inner);
        }
        match group.fd() {
            Ok(fd) => {
                if let Err(e) = self.sys().group_unset_container(fd) {
                    log::error!("{key}: VFIO_GROUP_UNSET_CONTAINER: {e}");
                }
            }
            Err(e) => log::error!("{key}: {e}"),
        }
        log::info!(
            "address space {}: {key} detached ({} member(s) left)",
            self.name,
            inner.members.len()
        );
    }

    /// Bind the device `fd` (a VFIO cdev) to the space's iommufd and attach
    /// it to the IOAS. Returns the device's iommufd id.
    pub(crate) fn attach_device(
        &self,
        address: &PciAddress,
        fd: BorrowedFd<'_>,
    ) -> Result<u32, Error> {
        let key = address.to_string();
        if self.kind != IommuKind::Iommufd {
            return Err(Error::IncompatibleAddressSpace(format!(
                "{key}: address space {} uses VFIO containers, not iommufd",
                self.name
            )));
        }
        let mut inner = lock(&self.inner);
        if inner.members.contains(&key) {
            return Err(Error::Busy(format!(
                "{key} is already attached to address space {}",
                self.name
            )));
        }
        let created = match &inner.backend {
            Some(_) => None,
            None => {
                let backend = self.new_ioas()?;
                if let Err(e) = self.replay(&mut inner, &backend) {
                    self.destroy_ioas(backend);
                    return Err(e);
                }
                Some(backend)
            }
        };
        let target = match created.as_ref().or(inner.backend.as_ref()) {
            Some(Backend::Ioas { iommufd, id }) => Ok((iommufd.clone(), *id)),
            Some(Backend::Container { .. }) => Err(Error::IncompatibleAddressSpace(format!(
                "{key}: address space {} is a VFIO container",
                self.name
            ))),
            None => Err(Error::BadState(format!(
                "address space {} has no IOAS",
                self.name
            ))),
        };
        let r = target.and_then(|(iommufd, id)| {
            let devid = self
                .sys()
                .bind_iommufd(fd, iommufd.as_fd())
                .map_err(|e| bind_error(&key, e))?;
            self.sys()
                .attach_ioas(fd, id)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                        Error::IncompatibleAddressSpace(format!(
                            "{key}: the kernel refused to attach it to IOAS {id} of address \
                             space {}: {e}",
                            self.name
                        ))
                    }
                    _ => Error::Vfio {
                        what: format!("{key}: VFIO_DEVICE_ATTACH_IOMMUFD_PT"),
                        source: e,
                    },
                })?;
            Ok(devid)
        });
        match r {
            Ok(devid) => {
                if let Some(b) = created {
                    inner.backend = Some(b);
                    inner.stats.backends_created += 1;
                }
                inner.members.push(key.clone());
                log::info!(
                    "address space {}: {key} bound (iommufd device id {devid}) and attached \
                     ({} member(s), {} mapping(s))",
                    self.name,
                    inner.members.len(),
                    inner.windows.len()
                );
                Ok(devid)
            }
            Err(e) => {
                if let Some(b) = created {
                    // Unmap the replayed windows ourselves (each once)
                    // before the IOAS goes.
                    let Inner { windows, stats, .. } = &mut *inner;
                    for (&iova, w) in windows.iter_mut() {
                        if !w.in_kernel {
                            continue;
                        }
                        if let Err(e) = self.unmap_window(&b, iova, w.size) {
                            log::error!(
                                "address space {}: unmapping {iova:#x}+{:#x}: {e}",
                                self.name,
                                w.size
                            );
                        }
                        w.in_kernel = false;
                        stats.kernel_unmaps += 1;
                    }
                    self.destroy_ioas(b);
                }
                Err(e)
            }
        }
    }

    fn new_ioas(&self) -> Result<Backend, Error> {
        self.vfio.backend_acquire(&self.name)?;
        let r = (|| {
            let iommufd = self.vfio.iommufd_for(&self.name)?;
            let id =
                self.sys()
                    .ioas_alloc(iommufd.as_fd())
                    .map_err(|e| match e.raw_os_error() {
                        Some(libc::ENOSPC) | Some(libc::ENOMEM) => Error::AddressSpacesExhausted(
                            format!("IOMMU_IOAS_ALLOC for address space {}: {e}", self.name),
                        ),
                        _ => Error::Vfio {
                            what: "IOMMU_IOAS_ALLOC".into(),
                            source: e,
                        },
                    })?;
            log::info!("address space {}: new iommufd IOAS {id}", self.name);
            Ok(Backend::Ioas { iommufd, id })
        })();
        if r.is_err() {
            self.vfio.backend_released();
        }
        r
    }

    fn destroy_ioas(&self, backend: Backend) {
        if let Backend::Ioas { iommufd, id } = backend {
            if let Err(e) = self.sys().ioas_destroy(iommufd.as_fd(), id) {
                log::error!("address space {}: destroying IOAS {id}: {e}", self.name);
            }
        }
        self.vfio.backend_released();
    }

    /// Detach the device `fd` from the IOAS (before it is closed).
    pub(crate) fn detach_device(&self, address: &PciAddress, fd: BorrowedFd<'_>) {
        let key = address.to_string();
        let mut inner = lock(&self.inner);
        let Some(i) = inner.members.iter().position(|m| *m == key) else {
            log::error!("address space {}: {key} detached twice", self.name);
            return;
        };
        inner.members.remove(i);
        if let Err(e) = self.sys().detach_ioas(fd) {
            log::error!("{key}: VFIO_DEVICE_DETACH_IOMMUFD_PT: {e}");
        }
        if inner.members.is_empty() {
            self.teardown(&mut inner);
        }
        log::info!(
            "address space {}: {key} detached ({} member(s) left)",
            self.name,
            inner.members.len()
        );
    }
}

fn attach_error(key: &str, space: &str, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EBUSY) => Error::Busy(format!(
            "{key} is attached to another container (another address space or process)"
        )),
        Some(libc::EPERM) | Some(libc::EINVAL) => Error::IncompatibleAddressSpace(format!(
            "{key} cannot join the container of address space {space}: {e}"
        )),
        _ => Error::Vfio {
            what: format!("{key}: VFIO_GROUP_SET_CONTAINER"),
            source: e,
        },
    }
}

fn bind_error(key: &str, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EBUSY) => Error::Busy(format!(
            "{key}: VFIO_DEVICE_BIND_IOMMUFD refused: its group is open (the group path and the \
             cdev path exclude each other) or it is bound elsewhere"
        )),
        _ => Error::Vfio {
            what: format!("{key}: VFIO_DEVICE_BIND_IOMMUFD"),
            source: e,
        },
    }
}

impl DmaMirror for IommuSpace {
    fn map(&self, range: &DmaRange, file: &Arc<File>, offset: u64) -> Result<(), DmaError> {
        let mut inner = lock(&self.inner);
        let mut w = Window {
            size: range.size,
            prot: range.prot,
            file: file.clone(),
            offset,
            host: None,
            in_kernel: false,
        };
        let Inner {
            backend,
            no_map_file,
            stats,
            ..
        } = &mut *inner;
        if let Some(b) = backend.as_ref() {
            self.map_window(b, no_map_file, range.iova, &mut w)
                .map_err(|source| DmaError::Mirror {
                    iova: range.iova,
                    size: range.size,
                    source,
                })?;
            w.in_kernel = true;
            stats.kernel_maps += 1;
        }
        inner.windows.insert(range.iova, w);
        Ok(())
    }

    fn unmap(&self, range: &DmaRange) {
        let mut inner = lock(&self.inner);
        let Some(w) = inner.windows.remove(&range.iova) else {
            log::error!(
                "address space {}: unmap of {:#x}+{:#x}, which it never mapped",
                self.name,
                range.iova,
                range.size
            );
            return;
        };
        if w.in_kernel {
            if let Some(b) = inner.backend.as_ref() {
                if let Err(e) = self.unmap_window(b, range.iova, w.size) {
                    log::error!(
                        "address space {}: unmapping {:#x}+{:#x}: {e}",
                        self.name,
                        range.iova,
                        w.size
                    );
                }
            }
            inner.stats.kernel_unmaps += 1;
        }
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

/// An open IOMMU group (`/dev/vfio/N`), shared by its devices.
pub struct Group {
    vfio: Arc<Vfio>,
    number: u32,
    /// Taken (closed) only by `Drop`, under the group registry's lock.
    fd: Option<OwnedFd>,
    state: Mutex<GroupState>,
}

#[derive(Default)]
struct GroupState {
    space: Option<Arc<IommuSpace>>,
    /// Open devices of the group.
    devices: usize,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("number", &self.number)
            .finish_non_exhaustive()
    }
}

impl Group {
    /// Open group `number` and check that it is viable.
    pub(crate) fn open(vfio: &Arc<Vfio>, number: u32) -> Result<Group, Error> {
        let fd = vfio
            .sys()
            .open_group(number)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) => Error::NoIommu(format!(
                    "no /dev/vfio/{number}: is the device bound to vfio-pci?"
                )),
                Some(libc::EBUSY) => Error::Busy(format!(
                    "/dev/vfio/{number} is open elsewhere (another process, or the device is \
                     bound through its cdev)"
                )),
                _ => Error::Vfio {
                    what: format!("open /dev/vfio/{number}"),
                    source: e,
                },
            })?;
        let flags = vfio
            .sys()
            .group_status(fd.as_fd())
            .map_err(sys_err(format!("group {number}: VFIO_GROUP_GET_STATUS")))?;
        if flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(Error::BadState(format!(
                "IOMMU group {number} is not viable: every device in it must be bound to \
                 vfio-pci (or to no driver)"
            )));
        }
        Ok(Group {
            vfio: vfio.clone(),
            number,
            fd: Some(fd),
            state: Mutex::new(GroupState::default()),
        })
    }

    /// The group number.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The group descriptor (open for the group's whole life).
    pub(crate) fn fd(&self) -> Result<BorrowedFd<'_>, Error> {
        self.fd
            .as_ref()
            .map(|f| f.as_fd())
            .ok_or_else(|| Error::BadState(format!("IOMMU group {} is closing", self.number)))
    }

    /// A device of the group opens: attach the group to `space` if it is
    /// its first; refuse (EBUSY) if the group is in another space.
    pub(crate) fn attach(&self, space: &Arc<IommuSpace>) -> Result<(), Error> {
        let mut st = lock(&self.state);
        match &st.space {
            Some(s) if Arc::ptr_eq(s, space) => {}
            Some(s) => {
                return Err(Error::Busy(format!(
                    "IOMMU group {} is attached to address space {}; one group, one address \
                     space",
                    self.number, s.name
                )));
            }
            None => {
                space.attach_group(self)?;
                st.space = Some(space.clone());
            }
        }
        st.devices += 1;
        Ok(())
    }

    /// A device of the group closed: detach the group with its last one.
    pub(crate) fn detach(&self) {
        let mut st = lock(&self.state);
        st.devices = st.devices.saturating_sub(1);
        if st.devices == 0 {
            if let Some(space) = st.space.take() {
                space.detach_group(self);
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Close the descriptor while holding the registry's lock, so that
        // nobody reopens the group (EBUSY) before it is closed.
        let mut groups = lock(self.vfio.groups());
        if groups
            .get(&self.number)
            .is_some_and(|w| w.strong_count() == 0)
        {
            groups.remove(&self.number);
        }
        drop(self.fd.take());
    }
}

/// The live group `number`, or a newly opened one.
pub(crate) fn group(vfio: &Arc<Vfio>, number: u32) -> Result<Arc<Group>, Error> {
    let mut g = lock(vfio.groups());
    if let Some(live) = g.get(&number).and_then(std::sync::Weak::upgrade) {
        return Ok(live);
    }
    let group = Arc::new(Group::open(vfio, number)?);
    g.insert(number, Arc::downgrade(&group));
    Ok(group)
}
