//! A seccomp-bpf filter for the threads that handle client input.
//!
//! Each device thread installs [`device_thread_filters`] on itself before
//! it accepts its first client; threads it starts later (device workers
//! started when a client opens the device) inherit it. The filter allows
//! what serving a device takes (socket I/O on existing descriptors, epoll,
//! eventfds, memory mapping, positioned file I/O, fallocate and fdatasync
//! for block backends, thread creation) and refuses the rest, in
//! particular running programs (`execve`), opening files or sockets, and
//! tracing. The list comes from what the server was seen to call under
//! strace while its black-box suite ran.
//!
//! A refused call fails with EPERM by default ([`SeccompMode::Errno`]): a
//! device sees an error, the process lives and logs it. `kill` ends the
//! process instead, `log` allows but logs to the kernel audit log (for
//! extending the list). `--no-seccomp` turns the filter off.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::Error;

/// What happens to a system call the filter does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// No filter.
    Off,
    /// The call fails with EPERM.
    #[default]
    Errno,
    /// The process is killed (SIGSYS).
    Kill,
    /// The call is allowed and logged by the kernel.
    Log,
}

/// System calls the device threads and the threads they start may make.
fn allowed() -> Vec<i64> {
    let mut v = vec![
        // client socket and notifications
        libc::SYS_accept4,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_shutdown,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_ppoll,
        libc::SYS_eventfd2,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_fcntl,
        libc::SYS_dup,
        libc::SYS_dup3,
        // client memory and positioned I/O on unsealed files, block
        // backends
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_mincore,
        libc::SYS_brk,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_memfd_create,
        // /proc/self/fd links (checking that a descriptor is an eventfd)
        libc::SYS_readlinkat,
        // the socket file is removed when the device thread ends
        libc::SYS_unlinkat,
        // threads, time, signals, exit
        libc::SYS_futex,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_prctl,
        // adding filters only ever narrows what a thread may do; device
        // threads add theirs under the process-wide one
        libc::SYS_seccomp,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getuid,
        libc::SYS_tgkill,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_epoll_wait,
        libc::SYS_poll,
        libc::SYS_readlink,
        libc::SYS_unlink,
        libc::SYS_stat,
        libc::SYS_lstat,
    ]);
    v
}

fn target_arch() -> Result<TargetArch, Error> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else if cfg!(target_arch = "riscv64") {
        Ok(TargetArch::riscv64)
    } else {
        Err(Error::Config(
            "seccomp is not supported on this architecture; use --no-seccomp".into(),
        ))
    }
}

/// Calls that open files by path. glibc opens
/// `/proc/sys/vm/overcommit_memory` the first time a thread's heap shrinks,
/// so they must fail cleanly (EPERM; glibc then assumes the default) and
/// never reach the `kill` action.
fn open_calls() -> Vec<i64> {
    let mut v = vec![libc::SYS_openat, libc::SYS_mkdirat];
    #[cfg(target_arch = "x86_64")]
    v.extend([libc::SYS_open, libc::SYS_mkdir]);
    v
}

/// The ioctl type of VFIO and of iommufd (`VFIO_TYPE` and `IOMMUFD_TYPE`
/// are both `';'`), in bits 8..16 of the request number.
const VFIO_IOCTL_TYPE: u64 = b';' as u64;

/// ioctl, allowed only for requests whose number `& mask` is `value`.
fn ioctl_rule(mask: u64, value: u64) -> Result<SeccompRule, Error> {
    SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|e| Error::Config(format!("seccomp filter: {e}")))
}

fn build(
    calls: Vec<i64>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, Error> {
    build_with(calls, Vec::new(), mismatch, matched)
}

/// `calls` match whatever their arguments; `ruled` only when one of their
/// rules holds.
fn build_with(
    calls: Vec<i64>,
    ruled: Vec<(i64, Vec<SeccompRule>)>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        calls.into_iter().map(|nr| (nr, Vec::new())).collect();
    rules.extend(ruled);
    let filter = SeccompFilter::new(rules, mismatch, matched, target_arch()?)
        .map_err(|e| Error::Config(format!("seccomp filter: {e}")))?;
    BpfProgram::try_from(filter).map_err(|e| Error::Config(format!("seccomp filter: {e}")))
}

/// The filters of a device thread, to install in order; empty for
/// [`SeccompMode::Off`]. The first refuses opening files with EPERM
/// (whatever the mode), the second allows the list and applies the mode's
/// action to everything else; the kernel takes the stricter answer of the
/// two. `recording`: traffic recording is on (`VDEVD_RECORD_DIR`), which
/// creates files from the device thread; opening files is allowed then.
/// `host_vfio`: the device drives a host device through VFIO
/// ([`vdevd_devices::Device::uses_host_vfio`]): opening files (the VFIO
/// group, cdev and `/dev/iommu` when its first user opens it) and ioctls of
/// the VFIO/iommufd type are allowed too; other ioctls stay refused.
pub fn device_thread_filters(
    mode: SeccompMode,
    recording: bool,
    host_vfio: bool,
) -> Result<Vec<BpfProgram>, Error> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(Vec::new()),
        SeccompMode::Errno => SeccompAction::Errno(libc::EPERM as u32),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut programs = Vec::new();
    if recording {
        log::warn!("traffic recording is on: the device threads may open files");
    } else if host_vfio {
        log::debug!("a passthrough device thread may open files and make VFIO ioctls");
    } else {
        programs.push(build(
            open_calls(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
        )?);
    }
    let mut calls = allowed();
    calls.extend(open_calls());
    // FIONBIO is what `set_nonblocking` on a socket is made of.
    let mut ioctls = vec![ioctl_rule(u64::from(u32::MAX), libc::FIONBIO)?];
    if host_vfio {
        ioctls.push(ioctl_rule(0xff00, VFIO_IOCTL_TYPE << 8)?);
    }
    programs.push(build_with(
        calls,
        vec![(libc::SYS_ioctl, ioctls)],
        mismatch,
        SeccompAction::Allow,
    )?);
    Ok(programs)
}

/// Install `programs`, in order, on every thread of the process (seccomp
/// TSYNC) and on the threads they start.
pub fn apply_all_threads(programs: &[BpfProgram]) -> Result<(), Error> {
    programs.iter().try_for_each(|p| {
        seccompiler::apply_filter_all_threads(p)
            .map_err(|e| Error::Config(format!("seccomp (all threads): {e}")))
    })
}

/// Install `programs` on the calling thread (and the threads it starts
/// from now on), in order.
pub fn apply_all(programs: &[BpfProgram]) -> Result<(), Error> {
    programs.iter().try_for_each(apply)
}

/// Install `program` on the calling thread (and the threads it starts
/// from now on).
pub fn apply(program: &BpfProgram) -> Result<(), Error> {
    seccompiler::apply_filter(program).map_err(|e| {
        let hint = match &e {
            seccompiler::Error::Seccomp(io) if io.raw_os_error() == Some(libc::ENOSYS) => {
                " (this kernel has no seccomp filters, CONFIG_SECCOMP_FILTER: \
                 run with --no-seccomp to serve without the sandbox)"
            }
            _ => "",
        };
        Error::Config(format!("seccomp: {e}{hint}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a thread of its own (the filter stays on the thread), install
    /// the filter and try what a compromised device thread would.
    #[test]
    fn forbidden_calls_are_refused_and_allowed_ones_work() {
        let r = std::thread::spawn(|| {
            apply_all(&device_thread_filters(SeccompMode::Errno, false, false).unwrap()).unwrap();
            // SAFETY: socket takes no pointers.
            let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let sock_err = std::io::Error::last_os_error().raw_os_error();
            // SAFETY: a valid NUL-terminated path and null argv/envp (the
            // call is refused before the kernel looks at them).
            let exec =
                unsafe { libc::execve(c"/bin/true".as_ptr(), std::ptr::null(), std::ptr::null()) };
            let exec_err = std::io::Error::last_os_error().raw_os_error();
            let open = std::fs::File::open("/etc/hostname").map_err(|e| e.raw_os_error());
            // Allowed: eventfds, memfds, threads.
            let ev = vmm_sys_util::eventfd::EventFd::new(0).map(|_| ());
            let t = std::thread::spawn(|| 7).join().ok();
            (sock, sock_err, exec, exec_err, open.err(), ev.is_ok(), t)
        })
        .join()
        .unwrap();
        assert_eq!((r.0, r.1), (-1, Some(libc::EPERM)), "socket refused");
        assert_eq!((r.2, r.3), (-1, Some(libc::EPERM)), "execve refused");
        assert_eq!(r.4, Some(Some(libc::EPERM)), "open refused");
        assert!(r.5, "eventfd allowed");
        assert_eq!(r.6, Some(7), "threads allowed");
        // This thread has no filter.
        // SAFETY: socket takes no pointers.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        // SAFETY: closing the descriptor we just got.
        unsafe { libc::close(fd) };
    }

    /// Under the kill action, opening a file still fails with EPERM (glibc
    /// does it now and then); socket kills (not tested: it would end the
    /// test process).
    #[test]
    fn opening_a_file_is_refused_even_with_the_kill_action() {
        let r = std::thread::spawn(|| {
            apply_all(&device_thread_filters(SeccompMode::Kill, false, false).unwrap()).unwrap();
            let open = std::fs::File::open("/proc/sys/vm/overcommit_memory");
            let ev = vmm_sys_util::eventfd::EventFd::new(0).map(|_| ());
            (open.map_err(|e| e.raw_os_error()).err(), ev.is_ok())
        })
        .join()
        .unwrap();
        assert_eq!(r.0, Some(Some(libc::EPERM)));
        assert!(r.1);
    }

    #[test]
    fn off_means_no_filter() {
        assert!(
            device_thread_filters(SeccompMode::Off, false, false)
                .unwrap()
                .is_empty()
        );
        for m in [SeccompMode::Errno, SeccompMode::Kill, SeccompMode::Log] {
            assert_eq!(device_thread_filters(m, false, false).unwrap().len(), 2);
            assert_eq!(device_thread_filters(m, true, false).unwrap().len(), 1);
            assert_eq!(device_thread_filters(m, false, true).unwrap().len(), 1);
        }
    }

    /// An ioctl on /dev/null as a stand-in: the kernel answers ENOTTY for a
    /// request the file does not know, EPERM means the filter refused it.
    fn ioctl_errno(fd: &std::fs::File, request: u64) -> Option<i32> {
        use std::os::fd::AsRawFd;
        let mut arg = 0u64;
        // SAFETY: `fd` is open; the argument points to 8 writable bytes,
        // more than any of the requests used here reads or writes.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &mut arg) };
        (r < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    #[test]
    fn a_passthrough_thread_may_open_files_and_make_vfio_ioctls_only() {
        // VFIO_GET_API_VERSION is _IO(';', 100); FIONREAD is 0x541B ('T').
        const VFIO_GET_API_VERSION: u64 = (VFIO_IOCTL_TYPE << 8) | 100;
        const FIONREAD: u64 = 0x541B;
        let run = |host_vfio: bool| {
            // Neither request means anything to /dev/null: ENOTTY.
            let f = std::fs::File::open("/dev/null").unwrap();
            std::thread::spawn(move || {
                apply_all(&device_thread_filters(SeccompMode::Errno, false, host_vfio).unwrap())
                    .unwrap();
                let vfio = ioctl_errno(&f, VFIO_GET_API_VERSION);
                let other = ioctl_errno(&f, FIONREAD);
                let open = std::fs::File::open("/proc/self/stat").map(|_| ());
                (vfio, other, open.map_err(|e| e.raw_os_error()))
            })
            .join()
            .unwrap()
        };
        let (vfio, other, open) = run(true);
        assert_ne!(vfio, Some(libc::EPERM), "VFIO ioctl reached the kernel");
        assert_eq!(other, Some(libc::EPERM), "other ioctls stay refused");
        assert_eq!(open, Ok(()));
        let (vfio, other, open) = run(false);
        assert_eq!(vfio, Some(libc::EPERM));
        assert_eq!(other, Some(libc::EPERM));
        assert_eq!(open, Err(Some(libc::EPERM)));
    }
}
