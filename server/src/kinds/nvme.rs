//! `vdevd nvme`: an NVMe controller with one namespace (see
//! `vdevd_devices::nvme`), on a raw image file or in memory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use vdevd_devices::Device;
use vdevd_devices::block::{BlockBackend, FileBackend, FileOptions, MemBackend};
use vdevd_devices::dma::DmaSpace;
use vdevd_devices::nvme::{DoorbellMode, MAX_IO_QUEUES, NvmeConfig, NvmeFunction, PollConfig};

use super::DeviceType;
use crate::error::Error;

/// The NVMe device type.
pub struct Nvme;

/// How guest doorbell writes reach vdevd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Doorbells {
    /// Trapped register writes, with shadow doorbells so the guest writes
    /// the register only when the controller is idle
    Trap,
    /// A doorbell page the VMM maps: no message per write, vdevd polls it
    Mmap,
}

impl std::fmt::Display for Doorbells {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Doorbells::Trap => "trap",
            Doorbells::Mmap => "mmap",
        })
    }
}

/// Parse a size: bytes, or a number with a K, M, G or T suffix (powers of
/// 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown size suffix {c:?}")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (bytes, or a number with K/M/G/T)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn size_from_file<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// Options of `vdevd nvme` (and of `type = "nvme"` tables).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvmeOptions {
    /// Raw image file or block device backing the namespace. Without it
    /// the namespace lives in memory (sparse; lost on exit)
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Size of the in-memory namespace: bytes, or with a K/M/G/T suffix
    /// (not with --image)
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "1G")]
    #[serde(deserialize_with = "size_from_file")]
    pub size: u64,
    /// Most I/O queue pairs the guest may create (1 to 511); the guest asks
    /// for as many as it wants up to this
    #[arg(long, value_name = "N", default_value_t = NvmeOptions::default().queues)]
    pub queues: u16,
    /// Open the image with O_DIRECT (bypass the host page cache)
    #[arg(long)]
    pub direct: bool,
    /// Refuse writes
    #[arg(long)]
    pub read_only: bool,
    /// Logical block size, 512 or 4096 (default: 512, or the O_DIRECT
    /// alignment of the image if larger)
    #[arg(long, value_name = "BYTES")]
    pub block_size: Option<u32>,
    /// How guest doorbell writes arrive
    #[arg(long, value_name = "MODE", default_value_t = NvmeOptions::default().doorbells)]
    pub doorbells: Doorbells,
    /// Threads processing I/O queues (1 to --queues)
    #[arg(long, value_name = "N", default_value_t = NvmeOptions::default().io_threads)]
    pub io_threads: usize,
    /// Keep polling the queues this many microseconds after the last
    /// command before sleeping
    #[arg(long, value_name = "US", default_value_t = NvmeOptions::default().poll_spin_us)]
    pub poll_spin_us: u64,
    /// With --doorbells mmap: longest sleep between polls in microseconds
    /// (the latency an idle device can add, and what sets its idle CPU use)
    #[arg(long, value_name = "US", default_value_t = NvmeOptions::default().poll_max_sleep_us)]
    pub poll_max_sleep_us: u64,
    /// Raise a completion queue's interrupt for every batch of completions,
    /// even while the guest has not yet handled the previous one (by
    /// default it is held back until the guest's handler has run)
    #[arg(long)]
    pub no_irq_defer: bool,
    /// Serial number, up to 20 characters (default: derived from the image
    /// path, or random for an in-memory namespace)
    #[arg(long, value_name = "TEXT")]
    pub serial: Option<String>,
}

impl Default for NvmeOptions {
    fn default() -> Self {
        let c = NvmeConfig::default();
        NvmeOptions {
            image: None,
            size: 1 << 30,
            queues: c.max_io_queues,
            direct: false,
            read_only: false,
            block_size: None,
            doorbells: match c.doorbells {
                DoorbellMode::Trap => Doorbells::Trap,
                DoorbellMode::Mmap => Doorbells::Mmap,
            },
            io_threads: c.io_threads,
            poll_spin_us: c.poll.spin.as_micros() as u64,
            poll_max_sleep_us: c.poll.max_sleep.as_micros() as u64,
            no_irq_defer: !c.irq_defer,
            serial: None,
        }
    }
}

fn fnv(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// A serial number stable for an image (its canonical path), unique enough
/// for an in-memory disk (time and process).
fn default_serial(image: Option<&PathBuf>) -> String {
    match image {
        Some(p) => {
            let canon = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
            format!("VD{:016X}", fnv(canon.as_os_str().as_encoded_bytes()))
        }
        None => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let seed = format!("{t}-{}", std::process::id());
            format!("VM{:016X}", fnv(seed.as_bytes()))
        }
    }
}

impl NvmeOptions {
    fn backend(&self) -> Result<Arc<dyn BlockBackend>, Error> {
        match &self.image {
            Some(path) => {
                let b = FileBackend::open(
                    path,
                    &FileOptions {
                        direct: self.direct,
                        read_only: self.read_only,
                        block_size: self.block_size,
                    },
                )
                .map_err(vdevd_devices::Error::Io)?;
                Ok(Arc::new(b))
            }
            None => {
                if self.direct {
                    return Err(Error::Config("nvme: --direct needs --image".into()));
                }
                if self.read_only {
                    return Err(Error::Config("nvme: --read-only needs --image".into()));
                }
                let bs = self.block_size.unwrap_or(512);
                let b = MemBackend::new(self.size, bs).map_err(vdevd_devices::Error::Io)?;
                Ok(Arc::new(b))
            }
        }
    }

    fn config(&self) -> Result<NvmeConfig, Error> {
        if self.queues == 0 || self.queues > MAX_IO_QUEUES {
            return Err(Error::Config(format!(
                "nvme: --queues {} (1 to {MAX_IO_QUEUES})",
                self.queues
            )));
        }
        if self.poll_max_sleep_us == 0 || self.poll_max_sleep_us > 1_000_000 {
            return Err(Error::Config(format!(
                "nvme: --poll-max-sleep-us {} (1 to 1000000)",
                self.poll_max_sleep_us
            )));
        }
        let defaults = NvmeConfig::default().poll;
        let max_sleep = Duration::from_micros(self.poll_max_sleep_us);
        let poll = PollConfig {
            spin: Duration::from_micros(self.poll_spin_us.min(1_000_000)),
            min_sleep: defaults.min_sleep.min(max_sleep),
            active_sleep: defaults.active_sleep.min(max_sleep),
            max_sleep,
            ..defaults
        };
        Ok(NvmeConfig {
            max_io_queues: self.queues,
            poll,
            irq_defer: !self.no_irq_defer,
            io_threads: self.io_threads,
            doorbells: match self.doorbells {
                Doorbells::Trap => DoorbellMode::Trap,
                Doorbells::Mmap => DoorbellMode::Mmap,
            },
            serial: self
                .serial
                .clone()
                .unwrap_or_else(|| default_serial(self.image.as_ref())),
            ..NvmeConfig::default()
        })
    }
}

impl DeviceType for Nvme {
    const NAME: &'static str = "nvme";
    type Options = NvmeOptions;

    fn build(options: NvmeOptions, dma: Arc<DmaSpace>) -> Result<Box<dyn Device>, Error> {
        let config = options.config()?;
        let backend = options.backend()?;
        Ok(Box::new(NvmeFunction::create(config, backend, dma)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Plan};
    use clap::Parser;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size(" 2T "), Ok(2 << 40));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn options_from_the_command_line_and_a_file_agree_on_defaults() {
        let cli = Cli::try_parse_from(["vdevd", "nvme", "--fd", "3"]).unwrap();
        let plan = Plan::from_cli(cli).unwrap();
        assert_eq!(plan.devices[0].kind, "nvme");
        let from_file: NvmeOptions = toml::from_str("").unwrap();
        assert_eq!(from_file, NvmeOptions::default());
        let o: NvmeOptions =
            toml::from_str("size = \"64M\"\nqueues = 2\ndoorbells = \"mmap\"").unwrap();
        assert_eq!(o.size, 64 << 20);
        assert_eq!(o.queues, 2);
        assert_eq!(o.doorbells, Doorbells::Mmap);
        assert!(toml::from_str::<NvmeOptions>("sise = 1").is_err());
        assert!(NvmeOptions::default().config().unwrap().irq_defer);
        let o: NvmeOptions = toml::from_str("no_irq_defer = true").unwrap();
        assert!(!o.config().unwrap().irq_defer);
    }

    #[test]
    fn builds_in_memory_and_refuses_bad_options() {
        let dma = Arc::new(DmaSpace::default());
        let dev = Nvme::build(NvmeOptions::default(), dma.clone()).unwrap();
        assert_eq!(dev.info().num_regions, 9);
        for bad in [
            NvmeOptions {
                queues: 0,
                ..NvmeOptions::default()
            },
            NvmeOptions {
                queues: 600,
                ..NvmeOptions::default()
            },
            NvmeOptions {
                size: 1000,
                ..NvmeOptions::default()
            },
            NvmeOptions {
                direct: true,
                ..NvmeOptions::default()
            },
            NvmeOptions {
                io_threads: 9,
                ..NvmeOptions::default()
            },
            NvmeOptions {
                image: Some("/nonexistent/disk.img".into()),
                ..NvmeOptions::default()
            },
            NvmeOptions {
                serial: Some("x".repeat(21)),
                ..NvmeOptions::default()
            },
            NvmeOptions {
                poll_max_sleep_us: 0,
                ..NvmeOptions::default()
            },
        ] {
            assert!(Nvme::build(bad.clone(), dma.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serials_are_stable_per_image() {
        let p = PathBuf::from("/tmp/some-image.raw");
        assert_eq!(default_serial(Some(&p)), default_serial(Some(&p)));
        assert_eq!(default_serial(Some(&p)).len(), 18);
        assert_ne!(
            default_serial(Some(&p)),
            default_serial(Some(&PathBuf::from("/tmp/other.raw")))
        );
    }
}
