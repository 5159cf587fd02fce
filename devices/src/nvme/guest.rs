//! Guest memory access for the controller's threads.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress};

use crate::dma::{DmaError, DmaMemory, DmaSpace};

/// Guest memory for one batch of work: a lazily taken [`DmaMemory`] view
/// (lock-free, zero-copy access to directly mapped ranges), falling back to
/// [`DmaSpace`]'s own accessors for message-backed ranges. The view is
/// dropped before any message exchange with the client, and must be
/// released with [`Guest::release`] before the thread sleeps, so that an
/// unmap never waits on an idle controller.
pub(crate) struct Guest<'a> {
    space: &'a DmaSpace,
    view: Option<DmaMemory>,
}

impl<'a> Guest<'a> {
    pub(crate) fn new(space: &'a DmaSpace) -> Self {
        Guest { space, view: None }
    }

    /// The view (taken now if not held yet).
    pub(crate) fn view(&mut self) -> &DmaMemory {
        self.view.get_or_insert_with(|| self.space.memory())
    }

    /// Drop the view.
    pub(crate) fn release(&mut self) {
        self.view = None;
    }

    pub(crate) fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        match self.view().read(iova, buf) {
            Err(DmaError::Message(_)) => {
                self.view = None;
                self.space.read(iova, buf)
            }
            r => r,
        }
    }

    pub(crate) fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        match self.view().write(iova, data) {
            Err(DmaError::Message(_)) => {
                self.view = None;
                self.space.write(iova, data)
            }
            r => r,
        }
    }

    /// Store a little-endian dword with release ordering: every write this
    /// thread made before is visible to the guest no later than this one
    /// (completion entries: the phase tag goes last).
    pub(crate) fn store_u32(&mut self, iova: u64, v: u32) -> Result<(), DmaError> {
        if iova % 4 == 0
            && self
                .view()
                .store(v.to_le(), GuestAddress(iova), Ordering::Release)
                .is_ok()
        {
            return Ok(());
        }
        std::sync::atomic::fence(Ordering::Release);
        self.write(iova, &v.to_le_bytes())
    }

    /// Load a little-endian dword with acquire ordering (shadow doorbells).
    pub(crate) fn load_u32(&mut self, iova: u64) -> Result<u32, DmaError> {
        if iova % 4 == 0 {
            if let Ok(v) = self
                .view()
                .load::<u32>(GuestAddress(iova), Ordering::Acquire)
            {
                return Ok(u32::from_le(v));
            }
        }
        let mut b = [0u8; 4];
        self.read(iova, &mut b)?;
        std::sync::atomic::fence(Ordering::Acquire);
        Ok(u32::from_le_bytes(b))
    }
}
