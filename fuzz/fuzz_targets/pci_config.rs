//! Config-space and region accesses on the PCI core, through the `Device`
//! interface the session uses, against the sample device (the PCI core
//! with MSI-X, a power-management capability, BARs and a ROM).
//!
//! The input is a list of operations: config-space reads and writes of
//! any offset and length (out-of-range ones included), accesses to the
//! other regions, resets, and save/load of the device state into a fresh
//! device. Checked, besides "no panic": the IDs never change, the
//! capability list stays a finite chain inside config space, and a saved
//! state loads into a new device that then reads the same config space.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vdevd_devices::Device;
use vdevd_devices::dma::DmaSpace;
use vdevd_devices::pci::{CONFIG_REGION, NUM_REGIONS};
use vdevd_devices::sample::{Sample, SampleConfig, SampleDevice};

/// The standard config space the invariants look at.
const HEADER: usize = 256;

fn device() -> Option<SampleDevice> {
    let config = SampleConfig {
        msix_vectors: 4,
        buffer_size: 4096,
    };
    Sample::create(config, Arc::new(DmaSpace::default())).ok()
}

fn config(dev: &mut SampleDevice) -> [u8; HEADER] {
    let mut out = [0u8; HEADER];
    for (i, chunk) in out.chunks_mut(4).enumerate() {
        // Every aligned dword of the standard header is readable.
        dev.region_read(CONFIG_REGION, (i * 4) as u64, chunk)
            .expect("config dword read");
    }
    out
}

/// Walk the capability list: it must end within 48 entries, each inside
/// the device-specific part of config space.
fn check_caps(cfg: &[u8; HEADER]) {
    const STATUS_CAP_LIST: u8 = 0x10;
    if cfg[6] & STATUS_CAP_LIST == 0 {
        return;
    }
    let mut ptr = cfg[0x34] & !3;
    let mut seen = 0;
    while ptr != 0 {
        assert!(ptr >= 0x40, "capability pointer {ptr:#x} in the header");
        seen += 1;
        assert!(seen <= 48, "capability list loops");
        ptr = cfg[usize::from(ptr) + 1] & !3;
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes([
            self.byte()?,
            self.byte()?,
            self.byte()?,
            self.byte()?,
        ]))
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        a.to_vec()
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(mut dev) = device() else {
        return;
    };
    let initial = config(&mut dev);
    let ids = initial[..4].to_vec();
    let mut input = Input(data);
    let mut ops = 0;
    while let Some(op) = input.byte() {
        ops += 1;
        if ops > 512 {
            break;
        }
        match op % 8 {
            // config reads and writes, any offset and length
            0 | 1 => {
                let (Some(off), Some(len)) = (input.u16(), input.byte()) else {
                    break;
                };
                let len = usize::from(len % 9);
                if op % 8 == 0 {
                    let mut buf = vec![0u8; len];
                    let _ = dev.region_read(CONFIG_REGION, u64::from(off), &mut buf);
                } else {
                    let data = input.bytes(len);
                    let _ = dev.region_write(CONFIG_REGION, u64::from(off), &data);
                }
            }
            // a config write in the standard header (where the
            // interesting registers are)
            2 => {
                let (Some(off), Some(len)) = (input.byte(), input.byte()) else {
                    break;
                };
                let data = input.bytes(usize::from(len % 5));
                let _ = dev.region_write(CONFIG_REGION, u64::from(off), &data);
            }
            // other regions: BARs, ROM, VGA, and indexes past the end
            3 | 4 => {
                let (Some(index), Some(off), Some(len)) = (input.byte(), input.u32(), input.byte())
                else {
                    break;
                };
                let index = u32::from(index) % (NUM_REGIONS + 2);
                let len = usize::from(len % 9);
                if op % 8 == 3 {
                    let mut buf = vec![0u8; len];
                    let _ = dev.region_read(index, u64::from(off), &mut buf);
                } else {
                    let data = input.bytes(len);
                    let _ = dev.region_write(index, u64::from(off), &data);
                }
            }
            5 => {
                let _ = dev.reset();
            }
            6 => {
                let _ = dev.region_info(u32::from(input.byte().unwrap_or(0)));
            }
            _ => {
                // Save, load into a fresh device: the same config space.
                let before = config(&mut dev);
                let Some(m) = dev.migration() else {
                    continue;
                };
                if m.stop().is_err() {
                    continue;
                }
                let Ok(state) = m.save() else {
                    let _ = m.run();
                    continue;
                };
                let _ = m.run();
                let Some(mut other) = device() else {
                    continue;
                };
                if let Some(om) = other.migration() {
                    if om.stop().is_ok() && om.load(&state).is_ok() {
                        let _ = om.run();
                        assert_eq!(
                            config(&mut other)[..],
                            before[..],
                            "a loaded state reads differently"
                        );
                    }
                }
            }
        }
        let now = config(&mut dev);
        assert_eq!(now[..4], ids[..], "vendor or device ID changed");
        check_caps(&now);
    }
});
