//! VFIO_USER_DEVICE_FEATURE (migration and DMA dirty logging) and the
//! migration data stream: VFIO_USER_MIG_DATA_READ, VFIO_USER_MIG_DATA_WRITE.
//!
//! A DEVICE_FEATURE request is `argsz`, `flags` (feature index in the low
//! 16 bits, then GET/SET/PROBE) and feature data. GET and SET exclude each
//! other except with PROBE; each feature allows only its own operations
//! (MIGRATION: GET; MIG_DEVICE_STATE: GET, SET; DMA_LOGGING_START and
//! DMA_LOGGING_STOP: SET; DMA_LOGGING_REPORT: GET). The reply echoes
//! `flags`; a GET adds the feature's data, a SET or PROBE echoes the
//! request's payload.

use crate::dma::range_fits;
use crate::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
};
use crate::wire::{self, RawLoggingControl, RawLoggingReport, RawTwoU32, RawTwoU64, len32};
use crate::{Error, Fit};

/// Size of the DEVICE_FEATURE fixed part (argsz, flags).
pub const FEATURE_SIZE: usize = size_of::<RawTwoU32>();
/// Size of the MIGRATION and MIG_DEVICE_STATE data.
pub const MIG_FEATURE_DATA_SIZE: usize = 8;
/// Size of the DMA logging control block before its ranges.
pub const DMA_LOGGING_CONTROL_SIZE: usize = size_of::<RawLoggingControl>();
/// Size of one DMA logging range.
pub const DMA_LOGGING_RANGE_SIZE: usize = size_of::<RawTwoU64>();
/// Size of the DMA logging report request (the bitmap follows it in the
/// reply).
pub const DMA_LOGGING_REPORT_SIZE: usize = size_of::<RawLoggingReport>();
/// Most ranges accepted in DMA_LOGGING_START (Linux's drivers allow 256).
pub const MAX_DMA_LOGGING_RANGES: u32 = 256;
/// Size of the MIG_DATA_READ / MIG_DATA_WRITE fixed part (argsz, size).
pub const MIG_DATA_SIZE: usize = size_of::<RawTwoU32>();

/// A migration state (`enum vfio_device_mig_state`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigState {
    /// Failed; needs a reset.
    Error = 0,
    /// Stopped.
    Stop = 1,
    /// Running.
    Running = 2,
    /// Stopped, state being read out.
    StopCopy = 3,
    /// Stopped, state being loaded.
    Resuming = 4,
    /// Running with peer-to-peer quiesced (not used by vfio-user).
    RunningP2p = 5,
    /// Running, state being read out.
    PreCopy = 6,
    /// Pre-copy with peer-to-peer quiesced (not used by vfio-user).
    PreCopyP2p = 7,
}

impl TryFrom<u32> for MigState {
    type Error = Error;

    fn try_from(raw: u32) -> Result<MigState, Error> {
        Ok(match raw {
            0 => MigState::Error,
            1 => MigState::Stop,
            2 => MigState::Running,
            3 => MigState::StopCopy,
            4 => MigState::Resuming,
            5 => MigState::RunningP2p,
            6 => MigState::PreCopy,
            7 => MigState::PreCopyP2p,
            _ => {
                return Err(Error::Value {
                    what: "migration device_state",
                    value: u64::from(raw),
                });
            }
        })
    }
}

/// The MIG_DEVICE_STATE data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MigDeviceState {
    /// The state (current for GET, wanted for SET).
    pub state: MigState,
    /// `data_fd`: unused by vfio-user (migration data goes through
    /// MIG_DATA_READ/WRITE); carried as sent.
    pub data_fd: u32,
}

impl MigDeviceState {
    fn parse(data: &[u8]) -> Result<MigDeviceState, Error> {
        let raw: RawTwoU32 = wire::read_exact(data, "MIG_DEVICE_STATE data")?;
        Ok(MigDeviceState {
            state: MigState::try_from(raw.a)?,
            data_fd: raw.b,
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        wire::put(
            out,
            &RawTwoU32 {
                a: self.state as u32,
                b: self.data_fd,
            },
        );
    }
}

/// One IOVA range to log dirty pages in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaLoggingRange {
    /// Start of the range.
    pub iova: u64,
    /// Length of the range.
    pub length: u64,
}

/// DMA_LOGGING_START data: the tracking granularity and the ranges (none
/// means all of the address space).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DmaLoggingStart {
    /// Requested (in the request) or chosen (in the reply) page size.
    pub page_size: u64,
    /// Ranges to log, at most [`MAX_DMA_LOGGING_RANGES`].
    pub ranges: Vec<DmaLoggingRange>,
}

impl DmaLoggingStart {
    fn parse(data: &[u8]) -> Result<DmaLoggingStart, Error> {
        let (raw, rest) = wire::read::<RawLoggingControl>(data, "DMA_LOGGING_START data")?;
        if raw.num_ranges > MAX_DMA_LOGGING_RANGES {
            return Err(Error::TooLarge {
                what: "DMA_LOGGING_START num_ranges",
                value: u64::from(raw.num_ranges),
                max: u64::from(MAX_DMA_LOGGING_RANGES),
            });
        }
        // At most 256 ranges: no overflow.
        let expected = raw.num_ranges as usize * DMA_LOGGING_RANGE_SIZE;
        if rest.len() != expected {
            return Err(Error::Length {
                what: "DMA_LOGGING_START data",
                expected: DMA_LOGGING_CONTROL_SIZE + expected,
                got: data.len(),
            });
        }
        let mut ranges = Vec::with_capacity(raw.num_ranges as usize);
        for chunk in rest.chunks_exact(DMA_LOGGING_RANGE_SIZE) {
            let range: RawTwoU64 = wire::read_exact(chunk, "DMA logging range")?;
            if !range_fits(range.a, range.b) {
                return Err(Error::Overflow {
                    what: "DMA logging range iova + length",
                });
            }
            ranges.push(DmaLoggingRange {
                iova: range.a,
                length: range.b,
            });
        }
        Ok(DmaLoggingStart {
            page_size: raw.page_size,
            ranges,
        })
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        wire::put(
            out,
            &RawLoggingControl {
                page_size: self.page_size,
                num_ranges: len32(self.ranges.len(), "DMA_LOGGING_START num_ranges")?,
                reserved: 0,
            },
        );
        for range in &self.ranges {
            wire::put(
                out,
                &RawTwoU64 {
                    a: range.iova,
                    b: range.length,
                },
            );
        }
        Ok(())
    }
}

/// DMA_LOGGING_REPORT request data: which range, at which granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DmaLoggingReport {
    /// Start of the range.
    pub iova: u64,
    /// Length of the range.
    pub length: u64,
    /// Bytes per bitmap bit; a power of two.
    pub page_size: u64,
}

impl DmaLoggingReport {
    /// Parse the request data: 24 bytes (32 with the kernel struct's unused
    /// `bitmap` pointer), `page_size` a power of two, `iova + length`
    /// within 64 bits.
    fn parse(data: &[u8]) -> Result<DmaLoggingReport, Error> {
        let (raw, rest) = wire::read::<RawLoggingReport>(data, "DMA_LOGGING_REPORT data")?;
        if !rest.is_empty() && rest.len() != size_of::<u64>() {
            return Err(Error::Length {
                what: "DMA_LOGGING_REPORT data",
                expected: DMA_LOGGING_REPORT_SIZE,
                got: data.len(),
            });
        }
        DmaLoggingReport::from_raw(raw)
    }

    fn from_raw(raw: RawLoggingReport) -> Result<DmaLoggingReport, Error> {
        if !raw.page_size.is_power_of_two() {
            return Err(Error::Value {
                what: "DMA_LOGGING_REPORT page_size",
                value: raw.page_size,
            });
        }
        if !range_fits(raw.iova, raw.length) {
            return Err(Error::Overflow {
                what: "DMA_LOGGING_REPORT iova + length",
            });
        }
        Ok(DmaLoggingReport {
            iova: raw.iova,
            length: raw.length,
            page_size: raw.page_size,
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        wire::put(
            out,
            &RawLoggingReport {
                iova: self.iova,
                length: self.length,
                page_size: self.page_size,
            },
        );
    }

    /// Size in bytes of the reply bitmap: one bit per page of the range,
    /// rounded up to whole `u64`s. Fails for a page size of 0.
    pub fn bitmap_size(&self) -> Result<u64, Error> {
        if self.page_size == 0 {
            return Err(Error::Value {
                what: "DMA_LOGGING_REPORT page_size",
                value: 0,
            });
        }
        let pages = self.length.div_ceil(self.page_size);
        Ok(pages.div_ceil(64) * 8)
    }
}

/// What a DEVICE_FEATURE request asks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FeatureRequest {
    /// PROBE: is `feature` (with GET and/or SET if set) supported? Any data
    /// is ignored, as the specification says.
    Probe {
        /// Feature index.
        feature: u16,
        /// GET is probed.
        get: bool,
        /// SET is probed.
        set: bool,
    },
    /// GET of MIGRATION: which migration states the device supports.
    GetMigration,
    /// GET of MIG_DEVICE_STATE: the current migration state.
    GetMigDeviceState,
    /// SET of MIG_DEVICE_STATE: move to a new state.
    SetMigDeviceState(MigDeviceState),
    /// SET of DMA_LOGGING_START.
    DmaLoggingStart(DmaLoggingStart),
    /// SET of DMA_LOGGING_STOP.
    DmaLoggingStop,
    /// GET of DMA_LOGGING_REPORT: the dirty bitmap of a range (and clear
    /// it).
    DmaLoggingReport(DmaLoggingReport),
}

impl FeatureRequest {
    /// The feature index.
    pub fn feature(&self) -> u16 {
        match self {
            FeatureRequest::Probe { feature, .. } => *feature,
            FeatureRequest::GetMigration => VFIO_DEVICE_FEATURE_MIGRATION,
            FeatureRequest::GetMigDeviceState | FeatureRequest::SetMigDeviceState(_) => {
                VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
            }
            FeatureRequest::DmaLoggingStart(_) => VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            FeatureRequest::DmaLoggingStop => VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
            FeatureRequest::DmaLoggingReport(_) => VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
        }
    }

    /// The flags field: feature index and operation bits.
    pub fn flags(&self) -> u32 {
        let op = match self {
            FeatureRequest::Probe { get, set, .. } => {
                VFIO_DEVICE_FEATURE_PROBE
                    | if *get { VFIO_DEVICE_FEATURE_GET } else { 0 }
                    | if *set { VFIO_DEVICE_FEATURE_SET } else { 0 }
            }
            FeatureRequest::GetMigration
            | FeatureRequest::GetMigDeviceState
            | FeatureRequest::DmaLoggingReport(_) => VFIO_DEVICE_FEATURE_GET,
            FeatureRequest::SetMigDeviceState(_)
            | FeatureRequest::DmaLoggingStart(_)
            | FeatureRequest::DmaLoggingStop => VFIO_DEVICE_FEATURE_SET,
        };
        op | u32::from(self.feature())
    }
}

/// Which operations a feature has: (GET, SET). `None` for an index the
/// protocol does not define.
pub fn feature_ops(feature: u16) -> Option<(bool, bool)> {
    match feature {
        VFIO_DEVICE_FEATURE_MIGRATION => Some((true, false)),
        VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => Some((true, true)),
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
            Some((false, true))
        }
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => Some((true, false)),
        _ => None,
    }
}

/// Check DEVICE_FEATURE flags: defined bits only, a known feature, an
/// operation it has, GET and SET together only with PROBE. Returns the
/// feature index and the GET, SET and PROBE bits.
fn check_flags(flags: u32) -> Result<(u16, bool, bool, bool), Error> {
    let ops = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_PROBE;
    if flags & !(VFIO_DEVICE_FEATURE_MASK | ops) != 0 {
        return Err(Error::Flags {
            what: "DEVICE_FEATURE",
            flags: flags & !(VFIO_DEVICE_FEATURE_MASK | ops),
        });
    }
    // The mask keeps 16 bits.
    let feature = (flags & VFIO_DEVICE_FEATURE_MASK) as u16;
    let (can_get, can_set) = feature_ops(feature).ok_or(Error::UnknownFeature(feature))?;
    let get = flags & VFIO_DEVICE_FEATURE_GET != 0;
    let set = flags & VFIO_DEVICE_FEATURE_SET != 0;
    let probe = flags & VFIO_DEVICE_FEATURE_PROBE != 0;
    if (get && !can_get) || (set && !can_set) || (!probe && get == set) {
        return Err(Error::FeatureOp(flags));
    }
    Ok((feature, get, set, probe))
}

/// A VFIO_USER_DEVICE_FEATURE request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeviceFeature {
    /// Largest reply payload the client accepts (at least 8).
    pub argsz: u32,
    /// What is asked.
    pub request: FeatureRequest,
}

/// GET data may be absent or be the buffer the kernel interface would
/// fill (of the reply data's size); anything else is an error.
fn get_buffer(data: &[u8], size: usize, what: &'static str) -> Result<(), Error> {
    if data.is_empty() || data.len() == size {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            expected: size,
            got: data.len(),
        })
    }
}

impl DeviceFeature {
    /// Parse a request. See the module documentation for the rules.
    pub fn parse(body: &[u8]) -> Result<DeviceFeature, Error> {
        let (raw, data) = wire::read::<RawTwoU32>(body, "DEVICE_FEATURE")?;
        let (argsz, flags) = (raw.a, raw.b);
        if (argsz as usize) < FEATURE_SIZE {
            return Err(Error::Argsz {
                what: "DEVICE_FEATURE",
                argsz,
                min: FEATURE_SIZE as u64,
            });
        }
        let (feature, get, set, probe) = check_flags(flags)?;
        let request = if probe {
            FeatureRequest::Probe { feature, get, set }
        } else {
            match feature {
                VFIO_DEVICE_FEATURE_MIGRATION => {
                    get_buffer(data, MIG_FEATURE_DATA_SIZE, "MIGRATION GET data")?;
                    FeatureRequest::GetMigration
                }
                VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE if get => {
                    get_buffer(data, MIG_FEATURE_DATA_SIZE, "MIG_DEVICE_STATE GET data")?;
                    FeatureRequest::GetMigDeviceState
                }
                VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => {
                    FeatureRequest::SetMigDeviceState(MigDeviceState::parse(data)?)
                }
                VFIO_DEVICE_FEATURE_DMA_LOGGING_START => {
                    FeatureRequest::DmaLoggingStart(DmaLoggingStart::parse(data)?)
                }
                VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
                    // Linux's STOP has no data; a control block like
                    // START's is accepted if well formed, and ignored.
                    if !data.is_empty() {
                        DmaLoggingStart::parse(data)?;
                    }
                    FeatureRequest::DmaLoggingStop
                }
                _ => FeatureRequest::DmaLoggingReport(DmaLoggingReport::parse(data)?),
            }
        };
        Ok(DeviceFeature { argsz, request })
    }

    /// Append the request body.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        wire::put(
            out,
            &RawTwoU32 {
                a: self.argsz,
                b: self.request.flags(),
            },
        );
        match &self.request {
            FeatureRequest::SetMigDeviceState(state) => state.encode(out),
            FeatureRequest::DmaLoggingStart(start) => start.encode(out)?,
            FeatureRequest::DmaLoggingReport(report) => report.encode(out),
            _ => {}
        }
        Ok(())
    }

    /// Append the reply to this request. `reply` must be the kind this
    /// request calls for:
    ///
    /// | request                | reply                                   |
    /// |------------------------|-----------------------------------------|
    /// | `Probe`                | `Probe` (no data)                       |
    /// | `GetMigration`         | `Migration` (the migration flags)       |
    /// | `GetMigDeviceState`    | `MigDeviceState` (the current state)    |
    /// | `SetMigDeviceState`    | `MigDeviceState` (echo of the request)  |
    /// | `DmaLoggingStart`      | `DmaLoggingStart` (page size chosen)    |
    /// | `DmaLoggingStop`       | `DmaLoggingStop`                        |
    /// | `DmaLoggingReport`     | `DmaLoggingReport` (the request's range |
    /// |                        | and a bitmap of `bitmap_size()` bytes)  |
    ///
    /// The flags are the request's; argsz is the full reply size. When the
    /// client's argsz is smaller, only argsz and flags are written and
    /// [`Fit::Truncated`] returned.
    pub fn encode_reply(&self, reply: &FeatureReply<'_>, out: &mut Vec<u8>) -> Result<Fit, Error> {
        let mut data = Vec::new();
        match (&self.request, reply) {
            (FeatureRequest::Probe { .. }, FeatureReply::Probe) => {}
            (FeatureRequest::GetMigration, FeatureReply::Migration { flags }) => {
                wire::put(&mut data, flags);
            }
            (FeatureRequest::GetMigDeviceState, FeatureReply::MigDeviceState(state)) => {
                state.encode(&mut data);
            }
            (FeatureRequest::SetMigDeviceState(asked), FeatureReply::MigDeviceState(state))
                if asked == state =>
            {
                state.encode(&mut data);
            }
            (FeatureRequest::DmaLoggingStart(asked), FeatureReply::DmaLoggingStart(chosen))
                if asked.ranges == chosen.ranges =>
            {
                chosen.encode(&mut data)?;
            }
            (FeatureRequest::DmaLoggingStop, FeatureReply::DmaLoggingStop) => {}
            (
                FeatureRequest::DmaLoggingReport(asked),
                FeatureReply::DmaLoggingReport { report, bitmap },
            ) if asked == report => {
                let size = report.bitmap_size()?;
                if bitmap.len() as u64 != size {
                    return Err(Error::DataLength {
                        what: "DMA_LOGGING_REPORT bitmap",
                        count: size,
                        got: bitmap.len(),
                    });
                }
                report.encode(&mut data);
                data.extend_from_slice(bitmap);
            }
            _ => {
                return Err(Error::FeatureOp(self.request.flags()));
            }
        }
        let total = data
            .len()
            .checked_add(FEATURE_SIZE)
            .ok_or(Error::Overflow {
                what: "DEVICE_FEATURE reply size",
            })?;
        let argsz = len32(total, "DEVICE_FEATURE reply size")?;
        wire::put(
            out,
            &RawTwoU32 {
                a: argsz,
                b: self.request.flags(),
            },
        );
        if self.argsz < argsz {
            return Ok(Fit::Truncated { needed: argsz });
        }
        out.extend_from_slice(&data);
        Ok(Fit::Full)
    }
}

/// The data of a DEVICE_FEATURE reply.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FeatureReply<'a> {
    /// Reply to a probe: the feature is supported as asked.
    Probe,
    /// MIGRATION data: VFIO_MIGRATION_* flags.
    Migration {
        /// STOP_COPY / P2P / PRE_COPY.
        flags: u64,
    },
    /// MIG_DEVICE_STATE data.
    MigDeviceState(MigDeviceState),
    /// DMA_LOGGING_START echo, with the page size the device chose.
    DmaLoggingStart(DmaLoggingStart),
    /// DMA_LOGGING_STOP acknowledged.
    DmaLoggingStop,
    /// DMA_LOGGING_REPORT: the range and its dirty bitmap (u64 words, bit
    /// n of the array for page n of the range).
    DmaLoggingReport {
        /// The range reported.
        report: DmaLoggingReport,
        /// The bitmap, borrowed.
        bitmap: &'a [u8],
    },
}

/// A parsed DEVICE_FEATURE reply (client side).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeviceFeatureReply<'a> {
    /// Size of the full reply payload.
    pub argsz: u32,
    /// The flags echoed.
    pub flags: u32,
    /// The data; `None` when the reply was truncated (retry with argsz).
    pub reply: Option<FeatureReply<'a>>,
}

impl<'a> DeviceFeatureReply<'a> {
    /// Parse a reply; the echoed flags say which data to expect.
    pub fn parse(body: &'a [u8]) -> Result<DeviceFeatureReply<'a>, Error> {
        let (raw, data) = wire::read::<RawTwoU32>(body, "DEVICE_FEATURE reply")?;
        let (argsz, flags) = (raw.a, raw.b);
        if data.is_empty() && argsz as usize > FEATURE_SIZE {
            return Ok(DeviceFeatureReply {
                argsz,
                flags,
                reply: None,
            });
        }
        if body.len() != argsz as usize {
            return Err(Error::Length {
                what: "DEVICE_FEATURE reply",
                expected: argsz as usize,
                got: body.len(),
            });
        }
        let (feature, _, _, probe) = check_flags(flags)?;
        let reply = if probe {
            wire::empty(data, "DEVICE_FEATURE probe reply")?;
            FeatureReply::Probe
        } else {
            match feature {
                VFIO_DEVICE_FEATURE_MIGRATION => FeatureReply::Migration {
                    flags: wire::read_exact(data, "MIGRATION reply data")?,
                },
                VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => {
                    FeatureReply::MigDeviceState(MigDeviceState::parse(data)?)
                }
                VFIO_DEVICE_FEATURE_DMA_LOGGING_START => {
                    FeatureReply::DmaLoggingStart(DmaLoggingStart::parse(data)?)
                }
                VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
                    wire::empty(data, "DMA_LOGGING_STOP reply")?;
                    FeatureReply::DmaLoggingStop
                }
                _ => {
                    let (head, bitmap) =
                        wire::read::<RawLoggingReport>(data, "DMA_LOGGING_REPORT reply")?;
                    let report = DmaLoggingReport::from_raw(head)?;
                    let size = report.bitmap_size()?;
                    if bitmap.len() as u64 != size {
                        return Err(Error::DataLength {
                            what: "DMA_LOGGING_REPORT bitmap",
                            count: size,
                            got: bitmap.len(),
                        });
                    }
                    FeatureReply::DmaLoggingReport { report, bitmap }
                }
            }
        };
        Ok(DeviceFeatureReply {
            argsz,
            flags,
            reply: Some(reply),
        })
    }
}

/// A VFIO_USER_MIG_DATA_READ request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MigDataRead {
    /// Largest reply payload the client accepts (at least 8).
    pub argsz: u32,
    /// Bytes of migration data wanted.
    pub size: u32,
}

impl MigDataRead {
    /// Parse: exactly 8 bytes, argsz at least 8.
    pub fn parse(body: &[u8]) -> Result<MigDataRead, Error> {
        let raw: RawTwoU32 = wire::read_exact(body, "MIG_DATA_READ")?;
        if (raw.a as usize) < MIG_DATA_SIZE {
            return Err(Error::Argsz {
                what: "MIG_DATA_READ",
                argsz: raw.a,
                min: MIG_DATA_SIZE as u64,
            });
        }
        Ok(MigDataRead {
            argsz: raw.a,
            size: raw.b,
        })
    }

    /// Append the request body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        wire::put(
            out,
            &RawTwoU32 {
                a: self.argsz,
                b: self.size,
            },
        );
    }

    /// The most data bytes a reply can carry: `size`, capped by what the
    /// client's argsz leaves after the 8-byte fixed part. Take no more from
    /// the device's stream than this.
    pub fn max_data_len(&self) -> u32 {
        self.size
            .min(self.argsz.saturating_sub(MIG_DATA_SIZE as u32))
    }

    /// Append the reply: argsz (8 + data), size (data length), data. The
    /// data may be shorter than asked (end of the stream) but not longer.
    /// If it does not fit the client's argsz, only the fixed part is
    /// written and [`Fit::Truncated`] returned; the data is then lost to
    /// the stream, so read at most [`MigDataRead::max_data_len`] bytes.
    pub fn encode_reply(&self, data: &[u8], out: &mut Vec<u8>) -> Result<Fit, Error> {
        let size = len32(data.len(), "MIG_DATA_READ reply size")?;
        if size > self.size {
            return Err(Error::DataLength {
                what: "MIG_DATA_READ reply",
                count: u64::from(self.size),
                got: data.len(),
            });
        }
        let argsz = size
            .checked_add(MIG_DATA_SIZE as u32)
            .ok_or(Error::Overflow {
                what: "MIG_DATA_READ reply size",
            })?;
        wire::put(out, &RawTwoU32 { a: argsz, b: size });
        if self.argsz < argsz {
            return Ok(Fit::Truncated { needed: argsz });
        }
        out.extend_from_slice(data);
        Ok(Fit::Full)
    }
}

/// A parsed MIG_DATA_READ reply (client side).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MigDataReadReply<'a> {
    /// Size of the full reply payload.
    pub argsz: u32,
    /// Migration data bytes in the full reply.
    pub size: u32,
    /// The data (empty in a truncated reply).
    pub data: &'a [u8],
}

impl<'a> MigDataReadReply<'a> {
    /// Parse: the fixed part, then exactly `size` bytes (argsz being 8 +
    /// size), or the fixed part alone when truncated.
    pub fn parse(body: &'a [u8]) -> Result<MigDataReadReply<'a>, Error> {
        let (raw, data) = wire::read::<RawTwoU32>(body, "MIG_DATA_READ reply")?;
        let reply = MigDataReadReply {
            argsz: raw.a,
            size: raw.b,
            data,
        };
        let full = u64::from(raw.b) + MIG_DATA_SIZE as u64;
        if u64::from(raw.a) != full {
            return Err(Error::Length {
                what: "MIG_DATA_READ reply argsz",
                expected: full as usize,
                got: raw.a as usize,
            });
        }
        if data.is_empty() || data.len() == raw.b as usize {
            Ok(reply)
        } else {
            Err(Error::DataLength {
                what: "MIG_DATA_READ reply",
                count: u64::from(raw.b),
                got: data.len(),
            })
        }
    }

    /// The reply held only the fixed part; retry with this argsz.
    pub fn needed(&self) -> Option<u32> {
        (self.data.len() != self.size as usize).then_some(self.argsz)
    }
}

/// A VFIO_USER_MIG_DATA_WRITE request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MigDataWrite<'a> {
    /// `argsz` as sent (at least 8; the reply has no payload).
    pub argsz: u32,
    /// The migration data (its length is the `size` field).
    pub data: &'a [u8],
}

impl<'a> MigDataWrite<'a> {
    /// Parse: argsz, size, then exactly `size` data bytes.
    pub fn parse(body: &'a [u8]) -> Result<MigDataWrite<'a>, Error> {
        let (raw, data) = wire::read::<RawTwoU32>(body, "MIG_DATA_WRITE")?;
        if (raw.a as usize) < MIG_DATA_SIZE {
            return Err(Error::Argsz {
                what: "MIG_DATA_WRITE",
                argsz: raw.a,
                min: MIG_DATA_SIZE as u64,
            });
        }
        if data.len() != raw.b as usize {
            return Err(Error::DataLength {
                what: "MIG_DATA_WRITE",
                count: u64::from(raw.b),
                got: data.len(),
            });
        }
        Ok(MigDataWrite { argsz: raw.a, data })
    }

    /// Append the request body.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        wire::put(
            out,
            &RawTwoU32 {
                a: self.argsz,
                b: len32(self.data.len(), "MIG_DATA_WRITE size")?,
            },
        );
        out.extend_from_slice(self.data);
        Ok(())
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;
    use crate::vfio::{VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY};

    fn parse(bytes: &[u8]) -> Result<FeatureRequest, Error> {
        DeviceFeature::parse(bytes).map(|f| f.request)
    }

    fn header(argsz: u32, flags: u32) -> Vec<u8> {
        let mut b = argsz.to_le_bytes().to_vec();
        b.extend_from_slice(&flags.to_le_bytes());
        b
    }

    #[test]
    fn get_migration() {
        let bytes = [
            0x10, 0x00, 0x00, 0x00, // argsz = 16
            0x01, 0x00, 0x01, 0x00, // flags = GET | MIGRATION
        ];
        let f = DeviceFeature::parse(&bytes).unwrap();
        assert_eq!(
            f,
            DeviceFeature {
                argsz: 16,
                request: FeatureRequest::GetMigration
            }
        );
        let mut out = Vec::new();
        f.encode(&mut out).unwrap();
        assert_eq!(out, bytes);
        // The kernel-style request with an 8-byte buffer also parses.
        let mut with_buffer = bytes.to_vec();
        with_buffer.extend_from_slice(&[0; 8]);
        assert_eq!(parse(&with_buffer), Ok(FeatureRequest::GetMigration));
        with_buffer.push(0);
        assert!(matches!(parse(&with_buffer), Err(Error::Length { .. })));

        let reply = FeatureReply::Migration {
            flags: VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
        };
        let mut out = Vec::new();
        assert_eq!(f.encode_reply(&reply, &mut out), Ok(Fit::Full));
        assert_eq!(
            out,
            [
                0x10, 0x00, 0x00, 0x00, // argsz = 16
                0x01, 0x00, 0x01, 0x00, // flags = GET | MIGRATION
                0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // STOP_COPY | PRE_COPY
            ]
        );
        let parsed = DeviceFeatureReply::parse(&out).unwrap();
        assert_eq!((parsed.argsz, parsed.flags), (16, 0x1_0001));
        assert_eq!(parsed.reply, Some(reply.clone()));

        // argsz 8 leaves no room for the data: truncated reply.
        let small = DeviceFeature { argsz: 8, ..f };
        let mut out = Vec::new();
        assert_eq!(
            small.encode_reply(&reply, &mut out),
            Ok(Fit::Truncated { needed: 16 })
        );
        assert_eq!(
            out,
            [
                0x10, 0x00, 0x00, 0x00, // argsz = 16 needed
                0x01, 0x00, 0x01, 0x00, // flags
            ]
        );
        assert_eq!(DeviceFeatureReply::parse(&out).unwrap().reply, None);
    }

    #[test]
    fn mig_device_state() {
        let set = [
            0x10, 0x00, 0x00, 0x00, // argsz = 16
            0x02, 0x00, 0x02, 0x00, // flags = SET | MIG_DEVICE_STATE
            0x03, 0x00, 0x00, 0x00, // device_state = STOP_COPY
            0xff, 0xff, 0xff, 0xff, // data_fd = -1 (unused)
        ];
        let f = DeviceFeature::parse(&set).unwrap();
        let state = MigDeviceState {
            state: MigState::StopCopy,
            data_fd: u32::MAX,
        };
        assert_eq!(f.request, FeatureRequest::SetMigDeviceState(state));
        let mut out = Vec::new();
        f.encode(&mut out).unwrap();
        assert_eq!(out, set);
        // The reply echoes the request.
        let mut out = Vec::new();
        assert_eq!(
            f.encode_reply(&FeatureReply::MigDeviceState(state), &mut out),
            Ok(Fit::Full)
        );
        assert_eq!(out, set);
        // ... and only the request.
        let other = MigDeviceState {
            state: MigState::Running,
            data_fd: u32::MAX,
        };
        assert_eq!(
            f.encode_reply(&FeatureReply::MigDeviceState(other), &mut Vec::new()),
            Err(Error::FeatureOp(0x2_0002))
        );

        let get = [
            0x10, 0x00, 0x00, 0x00, // argsz = 16
            0x02, 0x00, 0x01, 0x00, // flags = GET | MIG_DEVICE_STATE
        ];
        let f = DeviceFeature::parse(&get).unwrap();
        assert_eq!(f.request, FeatureRequest::GetMigDeviceState);
        let running = MigDeviceState {
            state: MigState::Running,
            data_fd: 0,
        };
        let mut out = Vec::new();
        assert_eq!(
            f.encode_reply(&FeatureReply::MigDeviceState(running), &mut out),
            Ok(Fit::Full)
        );
        assert_eq!(
            out,
            [
                0x10, 0x00, 0x00, 0x00, // argsz = 16
                0x02, 0x00, 0x01, 0x00, // flags = GET | MIG_DEVICE_STATE
                0x02, 0x00, 0x00, 0x00, // device_state = RUNNING
                0x00, 0x00, 0x00, 0x00, // data_fd
            ]
        );
        assert_eq!(
            DeviceFeatureReply::parse(&out).unwrap().reply,
            Some(FeatureReply::MigDeviceState(running))
        );

        // Unknown state, short data.
        let mut bad = set;
        bad[8] = 8;
        assert_eq!(
            parse(&bad),
            Err(Error::Value {
                what: "migration device_state",
                value: 8
            })
        );
        assert!(matches!(parse(&set[..12]), Err(Error::Short { .. })));
        for raw in 0..8 {
            assert_eq!(MigState::try_from(raw).map(|s| s as u32), Ok(raw));
        }
    }

    fn logging_start_bytes() -> Vec<u8> {
        vec![
            0x38, 0x00, 0x00, 0x00, // argsz = 8 + 16 + 2 * 16 = 56
            0x06, 0x00, 0x02, 0x00, // flags = SET | DMA_LOGGING_START
            0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // page_size = 4096
            0x02, 0x00, 0x00, 0x00, // num_ranges = 2
            0x00, 0x00, 0x00, 0x00, // reserved
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // iova = 0
            0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, // length = 2 GiB
            0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // iova = 4 GiB
            0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, // length = 1 GiB
        ]
    }

    #[test]
    fn dma_logging_start_and_stop() {
        let bytes = logging_start_bytes();
        let f = DeviceFeature::parse(&bytes).unwrap();
        let start = DmaLoggingStart {
            page_size: 4096,
            ranges: vec![
                DmaLoggingRange {
                    iova: 0,
                    length: 0x8000_0000,
                },
                DmaLoggingRange {
                    iova: 0x1_0000_0000,
                    length: 0x4000_0000,
                },
            ],
        };
        assert_eq!(f.request, FeatureRequest::DmaLoggingStart(start.clone()));
        let mut out = Vec::new();
        f.encode(&mut out).unwrap();
        assert_eq!(out, bytes);
        // The reply reports the page size chosen.
        let chosen = DmaLoggingStart {
            page_size: 2 << 20,
            ..start.clone()
        };
        let mut out = Vec::new();
        assert_eq!(
            f.encode_reply(&FeatureReply::DmaLoggingStart(chosen.clone()), &mut out),
            Ok(Fit::Full)
        );
        let mut expected = bytes.clone();
        expected[8..16].copy_from_slice(&(2u64 << 20).to_le_bytes());
        assert_eq!(out, expected);
        assert_eq!(
            DeviceFeatureReply::parse(&out).unwrap().reply,
            Some(FeatureReply::DmaLoggingStart(chosen))
        );

        // Stop: no data (as QEMU sends it for kernel devices).
        let stop = [
            0x08, 0x00, 0x00, 0x00, // argsz = 8
            0x07, 0x00, 0x02, 0x00, // flags = SET | DMA_LOGGING_STOP
        ];
        let f = DeviceFeature::parse(&stop).unwrap();
        assert_eq!(f.request, FeatureRequest::DmaLoggingStop);
        let mut out = Vec::new();
        assert_eq!(
            f.encode_reply(&FeatureReply::DmaLoggingStop, &mut out),
            Ok(Fit::Full)
        );
        assert_eq!(out, stop);
        // A control block with STOP is accepted when well formed.
        let mut with_block = stop.to_vec();
        with_block.extend_from_slice(&bytes[8..]);
        assert_eq!(parse(&with_block), Ok(FeatureRequest::DmaLoggingStop));
        with_block.pop();
        assert!(parse(&with_block).is_err());
    }

    #[test]
    fn dma_logging_start_limits() {
        let mut bytes = logging_start_bytes();
        bytes.pop();
        assert!(matches!(
            parse(&bytes),
            Err(Error::Length {
                expected: 48,
                got: 47,
                ..
            })
        ));
        let mut bytes = logging_start_bytes();
        bytes[16..20].copy_from_slice(&257u32.to_le_bytes());
        assert_eq!(
            parse(&bytes),
            Err(Error::TooLarge {
                what: "DMA_LOGGING_START num_ranges",
                value: 257,
                max: 256
            })
        );
        let mut bytes = logging_start_bytes();
        bytes[16..20].copy_from_slice(&1u32.to_le_bytes());
        assert!(matches!(parse(&bytes), Err(Error::Length { .. })));
        let mut bytes = logging_start_bytes();
        bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            parse(&bytes),
            Err(Error::Overflow {
                what: "DMA logging range iova + length"
            })
        );
        // Zero ranges: log everything.
        let mut bytes = logging_start_bytes();
        bytes.truncate(24);
        bytes[16..20].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            parse(&bytes),
            Ok(FeatureRequest::DmaLoggingStart(DmaLoggingStart {
                page_size: 4096,
                ranges: vec![]
            }))
        );
    }

    #[test]
    fn dma_logging_report() {
        let bytes = [
            0x20, 0x00, 0x00, 0x00, // argsz = 8 + 24 + 8 (bitmap of 64 pages)
            0x08, 0x00, 0x01, 0x00, // flags = GET | DMA_LOGGING_REPORT
            0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // iova = 1 MiB
            0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, // length = 256 KiB
            0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // page_size = 4096
        ];
        let f = DeviceFeature::parse(&bytes).unwrap();
        let report = DmaLoggingReport {
            iova: 0x10_0000,
            length: 0x4_0000,
            page_size: 4096,
        };
        assert_eq!(f.request, FeatureRequest::DmaLoggingReport(report));
        assert_eq!(report.bitmap_size(), Ok(8));
        let mut out = Vec::new();
        f.encode(&mut out).unwrap();
        assert_eq!(out, bytes);

        // argsz 32 is 8 short of the reply with its bitmap.
        let bitmap = [0x01, 0, 0, 0, 0, 0, 0, 0x80];
        let reply = FeatureReply::DmaLoggingReport {
            report,
            bitmap: &bitmap,
        };
        let mut out = Vec::new();
        assert_eq!(
            f.encode_reply(&reply, &mut out),
            Ok(Fit::Truncated { needed: 40 })
        );
        assert_eq!(
            out,
            [
                0x28, 0x00, 0x00, 0x00, // argsz = 40 needed
                0x08, 0x00, 0x01, 0x00, // flags
            ]
        );
        let roomy = DeviceFeature {
            argsz: 40,
            ..f.clone()
        };
        let mut out = Vec::new();
        assert_eq!(roomy.encode_reply(&reply, &mut out), Ok(Fit::Full));
        let mut expected = bytes.to_vec();
        expected[0] = 0x28;
        expected.extend_from_slice(&bitmap);
        assert_eq!(out, expected);
        assert_eq!(DeviceFeatureReply::parse(&out).unwrap().reply, Some(reply));

        // Wrong bitmap size.
        assert!(matches!(
            roomy.encode_reply(
                &FeatureReply::DmaLoggingReport {
                    report,
                    bitmap: &bitmap[..7]
                },
                &mut Vec::new()
            ),
            Err(Error::DataLength {
                count: 8,
                got: 7,
                ..
            })
        ));
        // The kernel struct's bitmap pointer is tolerated, more is not.
        let mut long = bytes.to_vec();
        long.extend_from_slice(&[0; 8]);
        assert_eq!(parse(&long), Ok(FeatureRequest::DmaLoggingReport(report)));
        long.push(0);
        assert!(matches!(parse(&long), Err(Error::Length { .. })));
        // page_size must be a power of two; iova + length must fit.
        for page_size in [0u64, 3, 4097] {
            let mut bad = bytes;
            bad[24..32].copy_from_slice(&page_size.to_le_bytes());
            assert_eq!(
                parse(&bad),
                Err(Error::Value {
                    what: "DMA_LOGGING_REPORT page_size",
                    value: page_size
                })
            );
        }
        let mut bad = bytes;
        bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(parse(&bad), Err(Error::Overflow { .. })));
    }

    #[test]
    fn bitmap_sizes() {
        let r = |length, page_size| DmaLoggingReport {
            iova: 0,
            length,
            page_size,
        };
        assert_eq!(r(0, 4096).bitmap_size(), Ok(0));
        assert_eq!(r(1, 4096).bitmap_size(), Ok(8));
        assert_eq!(r(64 * 4096, 4096).bitmap_size(), Ok(8));
        assert_eq!(r(64 * 4096 + 1, 4096).bitmap_size(), Ok(16));
        assert_eq!(r(u64::MAX, 1).bitmap_size(), Ok(1 << 61));
        assert!(r(1, 0).bitmap_size().is_err());
    }

    #[test]
    fn probes() {
        let probe = [
            0x08, 0x00, 0x00, 0x00, // argsz = 8
            0x06, 0x00, 0x06, 0x00, // flags = PROBE | SET | DMA_LOGGING_START
        ];
        let f = DeviceFeature::parse(&probe).unwrap();
        assert_eq!(
            f.request,
            FeatureRequest::Probe {
                feature: 6,
                get: false,
                set: true
            }
        );
        let mut out = Vec::new();
        f.encode(&mut out).unwrap();
        assert_eq!(out, probe);
        let mut out = Vec::new();
        assert_eq!(
            f.encode_reply(&FeatureReply::Probe, &mut out),
            Ok(Fit::Full)
        );
        assert_eq!(out, probe);
        assert_eq!(
            DeviceFeatureReply::parse(&out).unwrap().reply,
            Some(FeatureReply::Probe)
        );
        // GET and SET together are allowed with PROBE.
        assert_eq!(
            parse(&header(8, 0x7_0002)),
            Ok(FeatureRequest::Probe {
                feature: 2,
                get: true,
                set: true
            })
        );
        // Plain PROBE; data is ignored.
        let mut with_data = header(8, 0x4_0001);
        with_data.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            parse(&with_data),
            Ok(FeatureRequest::Probe {
                feature: 1,
                get: false,
                set: false
            })
        );
    }

    #[test]
    fn rejects_bad_operations() {
        for flags in [
            0x0_0001, // no operation
            0x3_0002, // GET | SET without PROBE
            0x2_0001, // SET of MIGRATION
            0x1_0006, // GET of DMA_LOGGING_START
            0x1_0007, // GET of DMA_LOGGING_STOP
            0x2_0008, // SET of DMA_LOGGING_REPORT
            0x6_0001, // PROBE | SET of MIGRATION
        ] {
            assert_eq!(
                parse(&header(8, flags)),
                Err(Error::FeatureOp(flags)),
                "{flags:#x}"
            );
        }
        for feature in [0u32, 3, 4, 5, 9, 0xffff] {
            assert_eq!(
                parse(&header(8, 0x1_0000 | feature)),
                Err(Error::UnknownFeature(feature as u16))
            );
        }
        assert_eq!(
            parse(&header(8, 0x8_0001)),
            Err(Error::Flags {
                what: "DEVICE_FEATURE",
                flags: 0x8_0000
            })
        );
        assert_eq!(
            parse(&header(7, 0x1_0001)),
            Err(Error::Argsz {
                what: "DEVICE_FEATURE",
                argsz: 7,
                min: 8
            })
        );
        assert!(matches!(parse(&[8, 0, 0, 0]), Err(Error::Short { .. })));
    }

    #[test]
    fn reply_kind_must_match_the_request() {
        let get = DeviceFeature {
            argsz: 64,
            request: FeatureRequest::GetMigration,
        };
        assert_eq!(
            get.encode_reply(&FeatureReply::Probe, &mut Vec::new()),
            Err(Error::FeatureOp(0x1_0001))
        );
        assert!(
            get.encode_reply(&FeatureReply::DmaLoggingStop, &mut Vec::new())
                .is_err()
        );
    }

    #[test]
    fn feature_reply_parse_rejects_bad_input() {
        // Length not argsz.
        let mut r = header(16, 0x1_0001);
        r.extend_from_slice(&[0; 4]);
        assert!(matches!(
            DeviceFeatureReply::parse(&r),
            Err(Error::Length { .. })
        ));
        // Flags of an unknown feature.
        assert_eq!(
            DeviceFeatureReply::parse(&header(8, 0x1_0009)),
            Err(Error::UnknownFeature(9))
        );
        // A probe reply with data.
        let mut r = header(9, 0x4_0001);
        r.push(0);
        assert!(matches!(
            DeviceFeatureReply::parse(&r),
            Err(Error::Length { .. })
        ));
    }

    #[test]
    fn mig_data_read() {
        let request = [
            0x08, 0x10, 0x00, 0x00, // argsz = 4104
            0x00, 0x10, 0x00, 0x00, // size = 4096
        ];
        let r = MigDataRead::parse(&request).unwrap();
        assert_eq!(
            r,
            MigDataRead {
                argsz: 4104,
                size: 4096
            }
        );
        assert_eq!(r.max_data_len(), 4096);
        let mut out = Vec::new();
        r.encode(&mut out);
        assert_eq!(out, request);

        // End of stream: fewer bytes than asked.
        let mut out = Vec::new();
        assert_eq!(r.encode_reply(&[0xaa, 0xbb, 0xcc], &mut out), Ok(Fit::Full));
        assert_eq!(
            out,
            [
                0x0b, 0x00, 0x00, 0x00, // argsz = 8 + 3
                0x03, 0x00, 0x00, 0x00, // size = 3
                0xaa, 0xbb, 0xcc, // data
            ]
        );
        let parsed = MigDataReadReply::parse(&out).unwrap();
        assert_eq!(
            (parsed.size, parsed.data, parsed.needed()),
            (3, &[0xaa, 0xbb, 0xcc][..], None)
        );
        // More than asked is a server bug.
        assert!(matches!(
            MigDataRead {
                argsz: 4104,
                size: 2
            }
            .encode_reply(&[0; 3], &mut Vec::new()),
            Err(Error::DataLength {
                count: 2,
                got: 3,
                ..
            })
        ));
        // argsz smaller than the data.
        let tight = MigDataRead { argsz: 10, size: 4 };
        assert_eq!(tight.max_data_len(), 2);
        let mut out = Vec::new();
        assert_eq!(
            tight.encode_reply(&[1, 2, 3], &mut out),
            Ok(Fit::Truncated { needed: 11 })
        );
        assert_eq!(MigDataReadReply::parse(&out).unwrap().needed(), Some(11));
        assert_eq!(MigDataRead { argsz: 8, size: 9 }.max_data_len(), 0);
        // Bad requests.
        assert!(matches!(
            MigDataRead::parse(&[7, 0, 0, 0, 1, 0, 0, 0]),
            Err(Error::Argsz {
                argsz: 7,
                min: 8,
                ..
            })
        ));
        assert!(matches!(
            MigDataRead::parse(&request[..7]),
            Err(Error::Short { .. })
        ));
        // Bad replies.
        assert!(MigDataReadReply::parse(&[11, 0, 0, 0, 3, 0, 0, 0, 1, 2]).is_err());
        assert!(MigDataReadReply::parse(&[12, 0, 0, 0, 3, 0, 0, 0, 1, 2, 3]).is_err());
    }

    #[test]
    fn mig_data_write() {
        let bytes = [
            0x08, 0x00, 0x00, 0x00, // argsz = 8
            0x04, 0x00, 0x00, 0x00, // size = 4
            0xde, 0xad, 0xbe, 0xef, // data
        ];
        let w = MigDataWrite::parse(&bytes).unwrap();
        assert_eq!(
            w,
            MigDataWrite {
                argsz: 8,
                data: &[0xde, 0xad, 0xbe, 0xef]
            }
        );
        let mut out = Vec::new();
        w.encode(&mut out).unwrap();
        assert_eq!(out, bytes);
        assert!(matches!(
            MigDataWrite::parse(&bytes[..11]),
            Err(Error::DataLength {
                count: 4,
                got: 3,
                ..
            })
        ));
        let mut long = bytes.to_vec();
        long.push(0);
        assert!(matches!(
            MigDataWrite::parse(&long),
            Err(Error::DataLength {
                count: 4,
                got: 5,
                ..
            })
        ));
        let mut bad = bytes;
        bad[0] = 4;
        assert!(matches!(
            MigDataWrite::parse(&bad),
            Err(Error::Argsz { .. })
        ));
    }
}
