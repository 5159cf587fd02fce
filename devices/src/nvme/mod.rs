//! An NVMe controller (NVM Express 1.4, NVM command set) with one
//! namespace on a [`crate::block::BlockBackend`].
//!
//! [`NvmeController`] is the transport-agnostic core: BAR0 register and
//! doorbell accesses come in, interrupts go out through an
//! [`InterruptSink`], and guest memory is reached through the
//! [`crate::dma::DmaSpace`] it was built with. Command processing runs on
//! the controller's own threads (see `ctrl.rs`), never on the caller's.

mod admin;
mod ctrl;
mod dptr;
mod guest;
mod io;
mod pci;
mod queue;
pub mod spec;

#[cfg(test)]
mod tests;

pub use ctrl::{
    BAR0_REGS_SIZE, DoorbellMode, InterruptSink, MAX_IO_QUEUES, NvmeConfig, NvmeController,
    PollConfig,
};
pub use io::{NSID, Namespace};
pub use pci::{
    BAR0_SIZE, CLASS_CODE, DEVICE_ID, MSIX_PBA, MSIX_TABLE, NvmeDevice, NvmeFunction, VENDOR_ID,
};

use crate::block::BlockBackend;
use crate::dma::DmaSpace;
use spec::{Command, Completion, SQE_SIZE};

/// Run one I/O submission entry against `dma` and `backend` as the
/// controller's workers do (4 KiB host pages, 1 MiB transfers at most), and
/// return its completion. An entry point for fuzzing and tests: any input
/// must complete with a status, never panic.
pub fn execute_io_command(
    sqe: &[u8; SQE_SIZE],
    dma: &DmaSpace,
    backend: &dyn BlockBackend,
) -> Completion {
    let stats = io::IoStats::default();
    let ctx = io::IoCtx {
        backend,
        ns: Namespace::of(backend),
        page: 4096,
        mdts: 1 << 20,
        stats: &stats,
    };
    let cmd = Command::parse(sqe);
    let mut g = guest::Guest::new(dma);
    let mut scratch = io::Scratch::default();
    let (status, dw0) = io::execute(&ctx, &mut g, &mut scratch, &cmd);
    Completion {
        dw0,
        dw1: 0,
        sqhd: 0,
        sqid: 1,
        cid: cmd.cid,
        status,
    }
}
