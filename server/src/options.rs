//! What a device server offers its clients and the limits it applies.

use std::time::Duration;

use serde::Deserialize;

use crate::error::Error;

/// Largest `max_msg_fds` QEMU's client accepts from a server.
pub const QEMU_MAX_MSG_FDS: u32 = 16;
/// Largest `max_data_xfer_size` QEMU's client accepts from a server.
pub const QEMU_MAX_DATA_XFER_SIZE: u32 = 64 << 20;
/// Largest `max_dma_maps` QEMU's client accepts from a server.
pub const QEMU_MAX_DMA_MAPS: u32 = 65535;
/// Largest `max_dma_maps` vdevd offers. Above [`QEMU_MAX_DMA_MAPS`] only
/// for other clients: QEMU refuses such a server (a warning is logged).
pub const MAX_DMA_MAPS: u32 = 1 << 20;
/// Smallest `max_data_xfer_size` vdevd offers: one page.
pub const MIN_DATA_XFER_SIZE: u32 = 4096;

/// The capabilities a server offers in its VERSION reply, and its timeouts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// Most descriptors the client may send in one message.
    pub max_msg_fds: u32,
    /// Most data bytes in one REGION_READ/WRITE or MIG_DATA message from
    /// the client (and the most we send in one DMA message, together with
    /// the client's own limit).
    pub max_data_xfer_size: u32,
    /// Most DMA mappings alive at once.
    pub max_dma_maps: u32,
    /// Page sizes supported for DMA mappings, or'ed together.
    pub pgsizes: u64,
    /// A connection that does not complete VERSION within this time is
    /// dropped, so it cannot hold the device.
    pub handshake_timeout: Duration,
    /// How long a DMA_READ/DMA_WRITE waits for the client's reply.
    pub dma_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_msg_fds: QEMU_MAX_MSG_FDS,
            max_data_xfer_size: 1 << 20,
            max_dma_maps: QEMU_MAX_DMA_MAPS,
            pgsizes: 4096,
            handshake_timeout: Duration::from_secs(5),
            dma_timeout: Duration::from_secs(5),
        }
    }
}

impl ServerOptions {
    /// Check the values against what vdevd supports and today's clients
    /// accept.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: &str, why: String| Err(Error::Config(format!("{what}: {why}")));
        if self.max_msg_fds == 0 || self.max_msg_fds > QEMU_MAX_MSG_FDS {
            return bad(
                "max_msg_fds",
                format!(
                    "{} is outside 1..={QEMU_MAX_MSG_FDS} (QEMU refuses a server offering more)",
                    self.max_msg_fds
                ),
            );
        }
        if !(MIN_DATA_XFER_SIZE..=QEMU_MAX_DATA_XFER_SIZE).contains(&self.max_data_xfer_size) {
            return bad(
                "max_data_xfer_size",
                format!(
                    "{} is outside {MIN_DATA_XFER_SIZE}..={QEMU_MAX_DATA_XFER_SIZE}",
                    self.max_data_xfer_size
                ),
            );
        }
        if self.max_dma_maps == 0 || self.max_dma_maps > MAX_DMA_MAPS {
            return bad(
                "max_dma_maps",
                format!("{} is outside 1..={MAX_DMA_MAPS}", self.max_dma_maps),
            );
        }
        if self.pgsizes == 0 || self.pgsizes & 0xfff != 0 {
            return bad(
                "pgsizes",
                format!(
                    "{:#x} must be a non-empty set of page sizes of at least 4096",
                    self.pgsizes
                ),
            );
        }
        if self.handshake_timeout.is_zero() || self.dma_timeout.is_zero() {
            return bad("timeouts", "must be above zero".into());
        }
        if self.max_dma_maps > QEMU_MAX_DMA_MAPS {
            log::warn!(
                "max_dma_maps {} is above {QEMU_MAX_DMA_MAPS}: QEMU's client will refuse this server",
                self.max_dma_maps
            );
        }
        Ok(())
    }

    /// The smallest supported page size: what fd-backed DMA mappings must be
    /// aligned to.
    pub fn page_size(&self) -> u64 {
        1u64 << self.pgsizes.trailing_zeros().min(63)
    }
}

/// Overrides of [`ServerOptions`], from the command line or the `[server]`
/// table of a configuration file. Unset fields keep their value.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptionOverrides {
    /// File descriptors a client may send per message (offered in VERSION;
    /// QEMU accepts at most 16) [default: 16]
    #[arg(long, value_name = "N", global = true)]
    pub max_msg_fds: Option<u32>,
    /// Largest data transfer per message, in bytes (offered in VERSION;
    /// QEMU accepts at most 64 MiB) [default: 1048576]
    #[arg(long, value_name = "BYTES", global = true)]
    pub max_data_xfer_size: Option<u32>,
    /// DMA mappings a client may hold at once (offered in VERSION; QEMU
    /// refuses a server offering more than 65535) [default: 65535]
    #[arg(long, value_name = "N", global = true)]
    pub max_dma_maps: Option<u32>,
    /// Supported DMA page sizes, or'ed together, multiples of 4096
    /// [default: 4096]
    #[arg(long, value_name = "MASK", global = true, value_parser = parse_u64)]
    pub pgsizes: Option<u64>,
    /// Drop a connection that has not sent VERSION after this many
    /// milliseconds [default: 5000]
    #[arg(long, value_name = "MS", global = true)]
    pub handshake_timeout_ms: Option<u64>,
    /// Give up on a DMA_READ/DMA_WRITE the client has not answered after
    /// this many milliseconds [default: 5000]
    #[arg(long, value_name = "MS", global = true)]
    pub dma_timeout_ms: Option<u64>,
}

/// Parse a number given in decimal or with a 0x prefix.
fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s}: {e}"))
}

impl OptionOverrides {
    /// Apply the fields that are set.
    pub fn apply(&self, o: &mut ServerOptions) {
        if let Some(v) = self.max_msg_fds {
            o.max_msg_fds = v;
        }
        if let Some(v) = self.max_data_xfer_size {
            o.max_data_xfer_size = v;
        }
        if let Some(v) = self.max_dma_maps {
            o.max_dma_maps = v;
        }
        if let Some(v) = self.pgsizes {
            o.pgsizes = v;
        }
        if let Some(v) = self.handshake_timeout_ms {
            o.handshake_timeout = Duration::from_millis(v);
        }
        if let Some(v) = self.dma_timeout_ms {
            o.dma_timeout = Duration::from_millis(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_what_qemu_accepts() {
        let o = ServerOptions::default();
        o.validate().unwrap();
        assert!(o.max_msg_fds <= QEMU_MAX_MSG_FDS);
        assert!(o.max_data_xfer_size <= QEMU_MAX_DATA_XFER_SIZE);
        assert!(o.max_dma_maps <= QEMU_MAX_DMA_MAPS);
        // more mappings are allowed, for clients other than QEMU
        ServerOptions {
            max_dma_maps: 1 << 17,
            ..ServerOptions::default()
        }
        .validate()
        .unwrap();
        assert_eq!(o.pgsizes % 4096, 0);
        assert_eq!(o.page_size(), 4096);
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let check = |f: &dyn Fn(&mut ServerOptions), what: &str| {
            let mut o = ServerOptions::default();
            f(&mut o);
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        check(&|o| o.max_msg_fds = 0, "max_msg_fds");
        check(&|o| o.max_msg_fds = 17, "max_msg_fds");
        check(&|o| o.max_data_xfer_size = 4095, "max_data_xfer_size");
        check(
            &|o| o.max_data_xfer_size = (64 << 20) + 1,
            "max_data_xfer_size",
        );
        check(&|o| o.max_dma_maps = 0, "max_dma_maps");
        check(&|o| o.max_dma_maps = MAX_DMA_MAPS + 1, "max_dma_maps");
        check(&|o| o.pgsizes = 0x800, "pgsizes");
        check(&|o| o.pgsizes = 0x1800, "pgsizes");
        check(&|o| o.handshake_timeout = Duration::ZERO, "timeouts");
    }

    #[test]
    fn page_size_is_the_smallest_offered() {
        let o = ServerOptions {
            pgsizes: 0x1000 | 0x200000,
            ..ServerOptions::default()
        };
        assert_eq!(o.page_size(), 0x1000);
        let o = ServerOptions {
            pgsizes: 0x10000,
            ..ServerOptions::default()
        };
        assert_eq!(o.page_size(), 0x10000);
    }

    #[test]
    fn overrides_apply_only_what_is_set() {
        let mut o = ServerOptions::default();
        OptionOverrides {
            max_msg_fds: Some(4),
            dma_timeout_ms: Some(250),
            ..OptionOverrides::default()
        }
        .apply(&mut o);
        assert_eq!(o.max_msg_fds, 4);
        assert_eq!(o.dma_timeout, Duration::from_millis(250));
        assert_eq!(o.max_dma_maps, ServerOptions::default().max_dma_maps);
        assert_eq!(parse_u64("0x1000"), Ok(4096));
        assert_eq!(parse_u64("8192"), Ok(8192));
        assert!(parse_u64("x").is_err());
    }
}
