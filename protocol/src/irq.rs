//! VFIO_USER_DEVICE_SET_IRQS.

use crate::Error;
use crate::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK,
};
use crate::wire::{self, RawIrqSet, len32, size32};

/// Size of the fixed part of SET_IRQS (`struct vfio_irq_set` without data).
pub const IRQ_SET_SIZE: usize = size_of::<RawIrqSet>();

/// What SET_IRQS does to the vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqAction {
    /// VFIO_IRQ_SET_ACTION_MASK.
    Mask,
    /// VFIO_IRQ_SET_ACTION_UNMASK.
    Unmask,
    /// VFIO_IRQ_SET_ACTION_TRIGGER.
    Trigger,
}

impl IrqAction {
    fn flag(self) -> u32 {
        match self {
            IrqAction::Mask => VFIO_IRQ_SET_ACTION_MASK,
            IrqAction::Unmask => VFIO_IRQ_SET_ACTION_UNMASK,
            IrqAction::Trigger => VFIO_IRQ_SET_ACTION_TRIGGER,
        }
    }
}

/// The data of a SET_IRQS request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqData<'a> {
    /// VFIO_IRQ_SET_DATA_NONE: act on every vector of the range. With
    /// `count == 0` and [`IrqAction::Trigger`]: disable the whole index.
    None,
    /// VFIO_IRQ_SET_DATA_BOOL: one byte per vector, act where non-zero.
    Bool(&'a [u8]),
    /// VFIO_IRQ_SET_DATA_EVENTFD: the eventfds travel out of band, one per
    /// vector; none at all de-assigns the range's eventfds (what QEMU sends
    /// to disarm). The receiver checks the number it got against `count`.
    Eventfd,
}

impl IrqData<'_> {
    fn flag(&self) -> u32 {
        match self {
            IrqData::None => VFIO_IRQ_SET_DATA_NONE,
            IrqData::Bool(_) => VFIO_IRQ_SET_DATA_BOOL,
            IrqData::Eventfd => VFIO_IRQ_SET_DATA_EVENTFD,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            IrqData::Bool(bytes) => bytes,
            _ => &[],
        }
    }
}

/// A VFIO_USER_DEVICE_SET_IRQS request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SetIrqs<'a> {
    /// `argsz` as sent: the request payload size including data.
    pub argsz: u32,
    /// Interrupt index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors.
    pub count: u32,
    /// The action.
    pub action: IrqAction,
    /// The data (borrowed from the message).
    pub data: IrqData<'a>,
}

impl<'a> SetIrqs<'a> {
    /// Parse the request.
    ///
    /// Rules: only the six defined flags, exactly one DATA and exactly one
    /// ACTION flag; `start + count` fits in `u32`; DATA_BOOL carries exactly
    /// `count` bytes, DATA_NONE and DATA_EVENTFD none; argsz covers the
    /// fixed part and the data (QEMU and the `vfio_user` crate send 20 for
    /// eventfds, whose data is out of band).
    pub fn parse(body: &'a [u8]) -> Result<SetIrqs<'a>, Error> {
        let (raw, data) = wire::read::<RawIrqSet>(body, "DEVICE_SET_IRQS")?;
        let known = VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if raw.flags & !known != 0 {
            return Err(Error::Flags {
                what: "DEVICE_SET_IRQS",
                flags: raw.flags & !known,
            });
        }
        let action = match raw.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK {
            VFIO_IRQ_SET_ACTION_MASK => IrqAction::Mask,
            VFIO_IRQ_SET_ACTION_UNMASK => IrqAction::Unmask,
            VFIO_IRQ_SET_ACTION_TRIGGER => IrqAction::Trigger,
            _ => return Err(Error::IrqFlags(raw.flags)),
        };
        if raw.start.checked_add(raw.count).is_none() {
            return Err(Error::Overflow {
                what: "DEVICE_SET_IRQS start + count",
            });
        }
        let data = match raw.flags & VFIO_IRQ_SET_DATA_TYPE_MASK {
            VFIO_IRQ_SET_DATA_NONE => {
                wire::empty(data, "DEVICE_SET_IRQS with DATA_NONE")?;
                IrqData::None
            }
            VFIO_IRQ_SET_DATA_EVENTFD => {
                wire::empty(data, "DEVICE_SET_IRQS with DATA_EVENTFD")?;
                IrqData::Eventfd
            }
            VFIO_IRQ_SET_DATA_BOOL => {
                if data.len() != raw.count as usize {
                    return Err(Error::DataLength {
                        what: "DEVICE_SET_IRQS with DATA_BOOL",
                        count: u64::from(raw.count),
                        got: data.len(),
                    });
                }
                IrqData::Bool(data)
            }
            _ => return Err(Error::IrqFlags(raw.flags)),
        };
        // The data length is at most the body length, far below u64::MAX.
        let min = IRQ_SET_SIZE as u64 + data.bytes().len() as u64;
        if u64::from(raw.argsz) < min {
            return Err(Error::Argsz {
                what: "DEVICE_SET_IRQS",
                argsz: raw.argsz,
                min,
            });
        }
        Ok(SetIrqs {
            argsz: raw.argsz,
            index: raw.index,
            start: raw.start,
            count: raw.count,
            action,
            data,
        })
    }

    /// Append the request body. `count` and the DATA_BOOL length must
    /// agree.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        if let IrqData::Bool(bytes) = self.data {
            if bytes.len() != self.count as usize {
                return Err(Error::DataLength {
                    what: "DEVICE_SET_IRQS with DATA_BOOL",
                    count: u64::from(self.count),
                    got: bytes.len(),
                });
            }
        }
        wire::put(
            out,
            &RawIrqSet {
                argsz: self.argsz,
                flags: self.data.flag() | self.action.flag(),
                index: self.index,
                start: self.start,
                count: self.count,
            },
        );
        out.extend_from_slice(self.data.bytes());
        Ok(())
    }

    /// The argsz a client sends for `data`: the fixed part plus the data
    /// bytes.
    pub fn argsz_for(data: &IrqData<'_>) -> Result<u32, Error> {
        len32(data.bytes().len(), "DEVICE_SET_IRQS data")?
            .checked_add(size32::<RawIrqSet>())
            .ok_or(Error::Overflow {
                what: "DEVICE_SET_IRQS argsz",
            })
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    /// QEMU arming three MSI-X vectors: TRIGGER | EVENTFD, argsz 20, the
    /// three eventfds out of band.
    const QEMU_ARM: [u8; 20] = [
        0x14, 0x00, 0x00, 0x00, // argsz = 20
        0x24, 0x00, 0x00, 0x00, // flags = DATA_EVENTFD | ACTION_TRIGGER
        0x02, 0x00, 0x00, 0x00, // index = MSIX
        0x00, 0x00, 0x00, 0x00, // start = 0
        0x03, 0x00, 0x00, 0x00, // count = 3
    ];

    #[test]
    fn parses_qemus_arm_and_disarm() {
        let s = SetIrqs::parse(&QEMU_ARM).unwrap();
        assert_eq!(
            s,
            SetIrqs {
                argsz: 20,
                index: 2,
                start: 0,
                count: 3,
                action: IrqAction::Trigger,
                data: IrqData::Eventfd
            }
        );
        let mut out = Vec::new();
        s.encode(&mut out).unwrap();
        assert_eq!(out, QEMU_ARM);
        // Disarm: TRIGGER | NONE with count 0 disables the index.
        let disarm = [
            0x14, 0x00, 0x00, 0x00, // argsz = 20
            0x21, 0x00, 0x00, 0x00, // flags = DATA_NONE | ACTION_TRIGGER
            0x02, 0x00, 0x00, 0x00, // index = MSIX
            0x00, 0x00, 0x00, 0x00, // start = 0
            0x00, 0x00, 0x00, 0x00, // count = 0
        ];
        let s = SetIrqs::parse(&disarm).unwrap();
        assert_eq!(
            (s.action, s.data, s.count),
            (IrqAction::Trigger, IrqData::None, 0)
        );
    }

    #[test]
    fn parses_data_bool() {
        let bytes = [
            0x17, 0x00, 0x00, 0x00, // argsz = 20 + 3
            0x0a, 0x00, 0x00, 0x00, // flags = DATA_BOOL | ACTION_MASK
            0x00, 0x00, 0x00, 0x00, // index = INTX
            0x00, 0x00, 0x00, 0x00, // start = 0
            0x03, 0x00, 0x00, 0x00, // count = 3
            0x01, 0x00, 0x01, // data: mask vectors 0 and 2
        ];
        let s = SetIrqs::parse(&bytes).unwrap();
        assert_eq!(s.action, IrqAction::Mask);
        assert_eq!(s.data, IrqData::Bool(&[1, 0, 1]));
        assert_eq!(SetIrqs::argsz_for(&s.data), Ok(23));
        let mut out = Vec::new();
        s.encode(&mut out).unwrap();
        assert_eq!(out, bytes);
    }

    #[test]
    fn every_action_and_data_combination_round_trips() {
        let bools = [1u8, 0];
        for action in [IrqAction::Mask, IrqAction::Unmask, IrqAction::Trigger] {
            for data in [IrqData::None, IrqData::Bool(&bools), IrqData::Eventfd] {
                let count = if matches!(data, IrqData::Bool(_)) {
                    2
                } else {
                    5
                };
                let s = SetIrqs {
                    argsz: SetIrqs::argsz_for(&data).unwrap(),
                    index: 1,
                    start: 3,
                    count,
                    action,
                    data,
                };
                let mut out = Vec::new();
                s.encode(&mut out).unwrap();
                let flags = u32::from_le_bytes([out[4], out[5], out[6], out[7]]);
                assert_eq!(flags.count_ones(), 2, "{flags:#x}");
                assert_eq!(SetIrqs::parse(&out), Ok(s));
            }
        }
    }

    fn with_flags(flags: u32) -> [u8; 20] {
        let mut b = QEMU_ARM;
        b[4..8].copy_from_slice(&flags.to_le_bytes());
        b
    }

    #[test]
    fn needs_exactly_one_data_and_one_action_flag() {
        for flags in [
            0x20, // no DATA
            0x04, // no ACTION
            0x00, // neither
            0x25, // NONE | EVENTFD
            0x23, // NONE | BOOL
            0x2c, // MASK | TRIGGER
            0x3c, // all three actions
        ] {
            assert_eq!(
                SetIrqs::parse(&with_flags(flags)),
                Err(Error::IrqFlags(flags)),
                "{flags:#x}"
            );
        }
        assert_eq!(
            SetIrqs::parse(&with_flags(0x64)),
            Err(Error::Flags {
                what: "DEVICE_SET_IRQS",
                flags: 0x40
            })
        );
    }

    #[test]
    fn rejects_bad_sizes() {
        // start + count overflows.
        let mut b = QEMU_ARM;
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            SetIrqs::parse(&b),
            Err(Error::Overflow {
                what: "DEVICE_SET_IRQS start + count"
            })
        );
        // start + count == u32::MAX is fine.
        b[16..20].copy_from_slice(&0u32.to_le_bytes());
        assert!(SetIrqs::parse(&b).is_ok());
        // argsz below the fixed part.
        let mut b = QEMU_ARM;
        b[0] = 19;
        assert_eq!(
            SetIrqs::parse(&b),
            Err(Error::Argsz {
                what: "DEVICE_SET_IRQS",
                argsz: 19,
                min: 20
            })
        );
        // Data with DATA_EVENTFD / DATA_NONE.
        let mut long = QEMU_ARM.to_vec();
        long.extend_from_slice(&[0; 12]);
        assert!(matches!(
            SetIrqs::parse(&long),
            Err(Error::Length {
                expected: 0,
                got: 12,
                ..
            })
        ));
        let mut long = with_flags(0x21).to_vec();
        long.push(1);
        assert!(matches!(SetIrqs::parse(&long), Err(Error::Length { .. })));
        // DATA_BOOL with too few / too many bytes, or too small argsz.
        let mut b = with_flags(0x22).to_vec();
        b.extend_from_slice(&[1, 1]);
        assert_eq!(
            SetIrqs::parse(&b),
            Err(Error::DataLength {
                what: "DEVICE_SET_IRQS with DATA_BOOL",
                count: 3,
                got: 2
            })
        );
        b.extend_from_slice(&[1, 1]);
        assert!(matches!(
            SetIrqs::parse(&b),
            Err(Error::DataLength { got: 4, .. })
        ));
        b.pop();
        assert_eq!(
            SetIrqs::parse(&b),
            Err(Error::Argsz {
                what: "DEVICE_SET_IRQS",
                argsz: 20,
                min: 23
            })
        );
        assert!(matches!(
            SetIrqs::parse(&QEMU_ARM[..19]),
            Err(Error::Short { .. })
        ));
    }

    #[test]
    fn encode_checks_bool_length() {
        let s = SetIrqs {
            argsz: 22,
            index: 0,
            start: 0,
            count: 3,
            action: IrqAction::Unmask,
            data: IrqData::Bool(&[1, 1]),
        };
        let mut out = Vec::new();
        assert!(matches!(s.encode(&mut out), Err(Error::DataLength { .. })));
        assert!(out.is_empty());
    }
}
