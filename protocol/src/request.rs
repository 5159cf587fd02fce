//! Dispatch by command: every client-to-server request, and every reply
//! the server sends back.

use crate::Error;
use crate::dma::{DmaMap, DmaUnmap, DmaUnmapReply};
use crate::feature::{
    DeviceFeature, DeviceFeatureReply, MigDataRead, MigDataReadReply, MigDataWrite,
};
use crate::header::{Command, Direction};
use crate::info::{
    DeviceInfo, DeviceInfoRequest, IrqInfo, IrqInfoRequest, RegionInfo, RegionInfoReply,
    RegionInfoRequest, RegionIoFds, RegionIoFdsReply, RegionIoFdsRequest,
};
use crate::irq::SetIrqs;
use crate::region::{RegionAccess, RegionData, WriteMulti, WriteMultiReply};
use crate::version::Version;
use crate::wire;

/// A request from the client, parsed and checked. Data payloads borrow
/// from the message body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// VFIO_USER_VERSION.
    Version(Version),
    /// VFIO_USER_DMA_MAP.
    DmaMap(DmaMap),
    /// VFIO_USER_DMA_UNMAP.
    DmaUnmap(DmaUnmap),
    /// VFIO_USER_DEVICE_GET_INFO.
    DeviceGetInfo(DeviceInfoRequest),
    /// VFIO_USER_DEVICE_GET_REGION_INFO.
    DeviceGetRegionInfo(RegionInfoRequest),
    /// VFIO_USER_DEVICE_GET_REGION_IO_FDS.
    DeviceGetRegionIoFds(RegionIoFdsRequest),
    /// VFIO_USER_DEVICE_GET_IRQ_INFO.
    DeviceGetIrqInfo(IrqInfoRequest),
    /// VFIO_USER_DEVICE_SET_IRQS.
    DeviceSetIrqs(SetIrqs<'a>),
    /// VFIO_USER_REGION_READ.
    RegionRead(RegionAccess),
    /// VFIO_USER_REGION_WRITE.
    RegionWrite(RegionData<'a>),
    /// VFIO_USER_DEVICE_RESET.
    DeviceReset,
    /// VFIO_USER_REGION_WRITE_MULTI.
    RegionWriteMulti(WriteMulti<'a>),
    /// VFIO_USER_DEVICE_FEATURE.
    DeviceFeature(DeviceFeature),
    /// VFIO_USER_MIG_DATA_READ.
    MigDataRead(MigDataRead),
    /// VFIO_USER_MIG_DATA_WRITE.
    MigDataWrite(MigDataWrite<'a>),
}

impl Request<'_> {
    /// The command this request is.
    pub fn command(&self) -> Command {
        match self {
            Request::Version(_) => Command::Version,
            Request::DmaMap(_) => Command::DmaMap,
            Request::DmaUnmap(_) => Command::DmaUnmap,
            Request::DeviceGetInfo(_) => Command::DeviceGetInfo,
            Request::DeviceGetRegionInfo(_) => Command::DeviceGetRegionInfo,
            Request::DeviceGetRegionIoFds(_) => Command::DeviceGetRegionIoFds,
            Request::DeviceGetIrqInfo(_) => Command::DeviceGetIrqInfo,
            Request::DeviceSetIrqs(_) => Command::DeviceSetIrqs,
            Request::RegionRead(_) => Command::RegionRead,
            Request::RegionWrite(_) => Command::RegionWrite,
            Request::DeviceReset => Command::DeviceReset,
            Request::RegionWriteMulti(_) => Command::RegionWriteMulti,
            Request::DeviceFeature(_) => Command::DeviceFeature,
            Request::MigDataRead(_) => Command::MigDataRead,
            Request::MigDataWrite(_) => Command::MigDataWrite,
        }
    }

    /// Append the request body (what a client sends after the header).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        match self {
            Request::Version(v) => v.encode(out),
            Request::DmaMap(m) => m.encode(out),
            Request::DmaUnmap(u) => u.encode(out),
            Request::DeviceGetInfo(r) => r.encode(out),
            Request::DeviceGetRegionInfo(r) => r.encode(out),
            Request::DeviceGetRegionIoFds(r) => r.encode(out),
            Request::DeviceGetIrqInfo(r) => r.encode(out),
            Request::DeviceSetIrqs(s) => s.encode(out)?,
            Request::RegionRead(a) => a.encode(out),
            Request::RegionWrite(w) => w.encode(out)?,
            Request::DeviceReset => {}
            Request::RegionWriteMulti(m) => m.encode(out)?,
            Request::DeviceFeature(f) => f.encode(out)?,
            Request::MigDataRead(r) => r.encode(out),
            Request::MigDataWrite(w) => w.encode(out)?,
        }
        Ok(())
    }

    /// The request body as a new vector.
    pub fn to_body(&self) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }
}

/// Parse the body of a client-to-server request. Commands the server
/// sends (DMA_READ, DMA_WRITE) are [`Error::WrongDirection`].
pub fn parse_request(command: Command, body: &[u8]) -> Result<Request<'_>, Error> {
    if command.direction() != Direction::ClientToServer {
        return Err(Error::WrongDirection(command));
    }
    Ok(match command {
        Command::Version => Request::Version(Version::parse(body)?),
        Command::DmaMap => Request::DmaMap(DmaMap::parse(body)?),
        Command::DmaUnmap => Request::DmaUnmap(DmaUnmap::parse(body)?),
        Command::DeviceGetInfo => Request::DeviceGetInfo(DeviceInfoRequest::parse(body)?),
        Command::DeviceGetRegionInfo => {
            Request::DeviceGetRegionInfo(RegionInfoRequest::parse(body)?)
        }
        Command::DeviceGetRegionIoFds => {
            Request::DeviceGetRegionIoFds(RegionIoFdsRequest::parse(body)?)
        }
        Command::DeviceGetIrqInfo => Request::DeviceGetIrqInfo(IrqInfoRequest::parse(body)?),
        Command::DeviceSetIrqs => Request::DeviceSetIrqs(SetIrqs::parse(body)?),
        Command::RegionRead => Request::RegionRead(RegionAccess::parse(body, "REGION_READ")?),
        Command::RegionWrite => Request::RegionWrite(RegionData::parse(body, "REGION_WRITE")?),
        Command::DeviceReset => {
            wire::empty(body, "DEVICE_RESET")?;
            Request::DeviceReset
        }
        Command::RegionWriteMulti => Request::RegionWriteMulti(WriteMulti::parse(body)?),
        Command::DeviceFeature => Request::DeviceFeature(DeviceFeature::parse(body)?),
        Command::MigDataRead => Request::MigDataRead(MigDataRead::parse(body)?),
        Command::MigDataWrite => Request::MigDataWrite(MigDataWrite::parse(body)?),
        Command::DmaRead | Command::DmaWrite => return Err(Error::WrongDirection(command)),
    })
}

/// A server reply, parsed (client side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// VFIO_USER_VERSION.
    Version(Version),
    /// VFIO_USER_DMA_MAP (no payload).
    DmaMap,
    /// VFIO_USER_DMA_UNMAP.
    DmaUnmap(DmaUnmapReply<'a>),
    /// VFIO_USER_DEVICE_GET_INFO.
    DeviceGetInfo(DeviceInfo),
    /// VFIO_USER_DEVICE_GET_REGION_INFO.
    DeviceGetRegionInfo(RegionInfoReply),
    /// VFIO_USER_DEVICE_GET_REGION_IO_FDS.
    DeviceGetRegionIoFds(RegionIoFdsReply),
    /// VFIO_USER_DEVICE_GET_IRQ_INFO.
    DeviceGetIrqInfo(IrqInfo),
    /// VFIO_USER_DEVICE_SET_IRQS (no payload).
    DeviceSetIrqs,
    /// VFIO_USER_REGION_READ: the data read.
    RegionRead(RegionData<'a>),
    /// VFIO_USER_REGION_WRITE.
    RegionWrite(RegionAccess),
    /// VFIO_USER_DEVICE_RESET (no payload).
    DeviceReset,
    /// VFIO_USER_REGION_WRITE_MULTI.
    RegionWriteMulti(WriteMultiReply),
    /// VFIO_USER_DEVICE_FEATURE.
    DeviceFeature(DeviceFeatureReply<'a>),
    /// VFIO_USER_MIG_DATA_READ.
    MigDataRead(MigDataReadReply<'a>),
    /// VFIO_USER_MIG_DATA_WRITE (no payload).
    MigDataWrite,
}

/// Parse the body of a successful reply to a client-to-server command
/// (error replies have no body: check [`crate::Header::is_error`] first).
/// Replies to DMA_READ/DMA_WRITE go the other way: see
/// [`crate::parse_dma_reply`].
pub fn parse_reply(command: Command, body: &[u8]) -> Result<Reply<'_>, Error> {
    if command.direction() != Direction::ClientToServer {
        return Err(Error::WrongDirection(command));
    }
    Ok(match command {
        Command::Version => Reply::Version(Version::parse(body)?),
        Command::DmaMap => {
            wire::empty(body, "DMA_MAP reply")?;
            Reply::DmaMap
        }
        Command::DmaUnmap => Reply::DmaUnmap(DmaUnmapReply::parse(body)?),
        Command::DeviceGetInfo => Reply::DeviceGetInfo(DeviceInfo::parse(body)?),
        Command::DeviceGetRegionInfo => Reply::DeviceGetRegionInfo(RegionInfo::parse(body)?),
        Command::DeviceGetRegionIoFds => Reply::DeviceGetRegionIoFds(RegionIoFds::parse(body)?),
        Command::DeviceGetIrqInfo => Reply::DeviceGetIrqInfo(IrqInfo::parse(body)?),
        Command::DeviceSetIrqs => {
            wire::empty(body, "DEVICE_SET_IRQS reply")?;
            Reply::DeviceSetIrqs
        }
        Command::RegionRead => Reply::RegionRead(RegionData::parse(body, "REGION_READ reply")?),
        Command::RegionWrite => {
            Reply::RegionWrite(RegionAccess::parse(body, "REGION_WRITE reply")?)
        }
        Command::DeviceReset => {
            wire::empty(body, "DEVICE_RESET reply")?;
            Reply::DeviceReset
        }
        Command::RegionWriteMulti => Reply::RegionWriteMulti(WriteMultiReply::parse(body)?),
        Command::DeviceFeature => Reply::DeviceFeature(DeviceFeatureReply::parse(body)?),
        Command::MigDataRead => Reply::MigDataRead(MigDataReadReply::parse(body)?),
        Command::MigDataWrite => {
            wire::empty(body, "MIG_DATA_WRITE reply")?;
            Reply::MigDataWrite
        }
        Command::DmaRead | Command::DmaWrite => return Err(Error::WrongDirection(command)),
    })
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;
    use crate::dma::UnmapKind;
    use crate::feature::FeatureRequest;
    use crate::irq::{IrqAction, IrqData};
    use crate::version::Capabilities;

    fn requests() -> Vec<Request<'static>> {
        vec![
            Request::Version(Version {
                major: 0,
                minor: 0,
                capabilities: Capabilities::default(),
            }),
            Request::DmaMap(DmaMap {
                argsz: 32,
                read: true,
                write: false,
                offset: 0,
                address: 0x1000,
                size: 0x1000,
            }),
            Request::DmaUnmap(DmaUnmap {
                argsz: 24,
                address: 0x1000,
                size: 0x1000,
                kind: UnmapKind::Range,
            }),
            Request::DeviceGetInfo(DeviceInfoRequest { argsz: 16 }),
            Request::DeviceGetRegionInfo(RegionInfoRequest {
                argsz: 32,
                index: 0,
            }),
            Request::DeviceGetRegionIoFds(RegionIoFdsRequest {
                argsz: 16,
                index: 0,
            }),
            Request::DeviceGetIrqInfo(IrqInfoRequest {
                argsz: 16,
                index: 2,
            }),
            Request::DeviceSetIrqs(SetIrqs {
                argsz: 20,
                index: 2,
                start: 0,
                count: 1,
                action: IrqAction::Trigger,
                data: IrqData::Eventfd,
            }),
            Request::RegionRead(RegionAccess {
                offset: 0,
                region: 7,
                count: 4,
            }),
            Request::RegionWrite(RegionData {
                offset: 4,
                region: 7,
                data: &[1, 2],
            }),
            Request::DeviceReset,
            Request::RegionWriteMulti(WriteMulti {
                writes: vec![RegionData {
                    offset: 0,
                    region: 0,
                    data: &[9],
                }],
            }),
            Request::DeviceFeature(DeviceFeature {
                argsz: 16,
                request: FeatureRequest::GetMigration,
            }),
            Request::MigDataRead(MigDataRead {
                argsz: 4104,
                size: 4096,
            }),
            Request::MigDataWrite(MigDataWrite {
                argsz: 8,
                data: &[1, 2, 3],
            }),
        ]
    }

    #[test]
    fn every_request_round_trips_through_its_command() {
        let all = requests();
        assert_eq!(all.len(), 15);
        for request in &all {
            let body = request.to_body().unwrap();
            assert_eq!(
                parse_request(request.command(), &body).as_ref(),
                Ok(request),
                "{:?}",
                request.command()
            );
        }
    }

    #[test]
    fn server_to_client_commands_are_refused() {
        for command in [Command::DmaRead, Command::DmaWrite] {
            assert_eq!(
                parse_request(command, &[0; 16]),
                Err(Error::WrongDirection(command))
            );
            assert_eq!(
                parse_reply(command, &[0; 16]),
                Err(Error::WrongDirection(command))
            );
        }
    }

    #[test]
    fn bodies_are_checked_per_command() {
        assert_eq!(
            parse_request(Command::DeviceReset, &[0]),
            Err(Error::Length {
                what: "DEVICE_RESET",
                expected: 0,
                got: 1
            })
        );
        // A DMA_MAP body sent as DMA_UNMAP is too long for it.
        let map = requests()[1].to_body().unwrap();
        assert!(parse_request(Command::DmaUnmap, &map).is_err());
        for command in Command::ALL {
            if command.direction() == Direction::ClientToServer && command != Command::DeviceReset {
                assert!(parse_request(command, &[]).is_err(), "{command:?}");
            }
        }
    }

    #[test]
    fn replies() {
        let mut region = Vec::new();
        RegionData {
            offset: 0,
            region: 7,
            data: &[0x86, 0x80],
        }
        .encode(&mut region)
        .unwrap();
        assert!(matches!(
            parse_reply(Command::RegionRead, &region),
            Ok(Reply::RegionRead(RegionData {
                data: &[0x86, 0x80],
                ..
            }))
        ));
        assert_eq!(parse_reply(Command::DmaMap, &[]), Ok(Reply::DmaMap));
        assert_eq!(
            parse_reply(Command::DeviceSetIrqs, &[]),
            Ok(Reply::DeviceSetIrqs)
        );
        assert_eq!(
            parse_reply(Command::DeviceReset, &[]),
            Ok(Reply::DeviceReset)
        );
        assert!(matches!(
            parse_reply(Command::DmaMap, &[0]),
            Err(Error::Length { .. })
        ));
        let mut info = Vec::new();
        DeviceInfo {
            flags: 3,
            num_regions: 9,
            num_irqs: 5,
        }
        .encode(&mut info);
        assert!(matches!(
            parse_reply(Command::DeviceGetInfo, &info),
            Ok(Reply::DeviceGetInfo(DeviceInfo { num_regions: 9, .. }))
        ));
    }
}
