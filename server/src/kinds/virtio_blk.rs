//! `vdevd virtio-blk`: a virtio block device (see
//! `vdevd_devices::virtio::blk`), served over vfio-user as a virtio-pci
//! function or over vhost-user, on a memory disk or an image file.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use vdevd_devices::Device;
use vdevd_devices::block::{BlockBackend, FileBackend, FileOptions, MemBackend};
use vdevd_devices::dma::DmaSpace;
use vdevd_devices::virtio::blk::{Blk, BlkConfig};
use vdevd_devices::virtio::pci::{self, KickMode, VirtioPciOptions};

use super::{Builder, DeviceType, VhostUserBuilder};
use crate::error::Error;
use crate::vhost_user::VhostUserServer;

/// The virtio-blk device type.
pub struct VirtioBlk;

/// Which protocol serves the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// A virtio-pci function over vfio-user (QEMU `vfio-user-pci`).
    #[default]
    VfioUser,
    /// vhost-user (QEMU `vhost-user-blk-pci`).
    VhostUser,
}

/// How queue notifications reach vdevd over vfio-user.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Kick {
    /// Every notification is a trapped region write.
    #[default]
    Trap,
    /// The client maps the notify page; vdevd polls it.
    Poll,
}

/// Default size of a memory disk.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Options of `vdevd virtio-blk` (and of `type = "virtio-blk"` tables).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VirtioBlkOptions {
    /// Serve over vhost-user on this socket (for QEMU's vhost-user-blk-pci)
    /// instead of vfio-user
    #[arg(long, value_name = "PATH", conflicts_with_all = ["socket", "socket_path", "fd"])]
    #[serde(skip)]
    pub vhost_user: Option<PathBuf>,
    /// Transport, in configuration files: "vfio-user" (default) or
    /// "vhost-user"
    #[arg(skip)]
    pub transport: Transport,
    /// Raw image file or block device to serve
    #[arg(long, value_name = "FILE", conflicts_with = "size")]
    pub image: Option<PathBuf>,
    /// Size of a memory disk (without --image), in bytes; K, M, G, T
    /// suffixes are powers of 1024 [default: 1G]
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub size: Option<u64>,
    /// Number of request queues (1..=64)
    #[arg(long, value_name = "N", default_value_t = VirtioBlkOptions::default().queues)]
    pub queues: u16,
    /// Largest queue size the driver may use (a power of two)
    #[arg(long, value_name = "N", default_value_t = VirtioBlkOptions::default().queue_size)]
    pub queue_size: u16,
    /// Open the image with O_DIRECT (bypass the host page cache)
    #[arg(long)]
    pub direct: bool,
    /// Refuse writes (the guest sees a read-only disk)
    #[arg(long)]
    pub read_only: bool,
    /// Logical block size: 512 or 4096 [default: 512, or what O_DIRECT needs]
    #[arg(long, value_name = "BYTES")]
    pub block_size: Option<u32>,
    /// Device ID string the guest reads (at most 20 bytes)
    #[arg(long, value_name = "TEXT", default_value_t = VirtioBlkOptions::default().serial)]
    pub serial: String,
    /// vfio-user only: how queue notifications arrive (trap: a message per
    /// notification; poll: the client maps the notify page and vdevd polls
    /// it)
    #[arg(long, value_enum, default_value_t = Kick::default())]
    pub kick: Kick,
}

impl Default for VirtioBlkOptions {
    fn default() -> Self {
        let c = BlkConfig::default();
        VirtioBlkOptions {
            vhost_user: None,
            transport: Transport::default(),
            image: None,
            size: None,
            queues: c.num_queues,
            queue_size: c.queue_size,
            direct: false,
            read_only: false,
            block_size: None,
            serial: c.serial,
            kick: Kick::default(),
        }
    }
}

/// Parse a size with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s}: unknown size suffix {c:?}")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|e| format!("{s}: {e}"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s}: too large"))
}

impl VirtioBlkOptions {
    fn transport(&self) -> Transport {
        if self.vhost_user.is_some() {
            Transport::VhostUser
        } else {
            self.transport
        }
    }

    fn backend(&self) -> Result<Arc<dyn BlockBackend>, Error> {
        match &self.image {
            Some(path) => {
                let opts = FileOptions {
                    direct: self.direct,
                    read_only: self.read_only,
                    block_size: self.block_size,
                };
                let b = FileBackend::open(path, &opts)
                    .map_err(|e| Error::Config(format!("virtio-blk: {e}")))?;
                Ok(Arc::new(b))
            }
            None => {
                if self.direct || self.read_only {
                    return Err(Error::Config(
                        "virtio-blk: --direct and --read-only need --image".into(),
                    ));
                }
                let size = self.size.unwrap_or(DEFAULT_SIZE);
                let b = MemBackend::new(size, self.block_size.unwrap_or(512))
                    .map_err(|e| Error::Config(format!("virtio-blk: memory disk: {e}")))?;
                Ok(Arc::new(b))
            }
        }
    }

    /// The device model these options describe.
    pub fn model(&self) -> Result<Blk, Error> {
        let backend = self.backend()?;
        log::info!("virtio-blk: {}", backend.describe());
        Ok(Blk::new(
            backend,
            BlkConfig {
                num_queues: self.queues,
                queue_size: self.queue_size,
                serial: self.serial.clone(),
            },
        )?)
    }
}

impl DeviceType for VirtioBlk {
    const NAME: &'static str = "virtio-blk";
    type Options = VirtioBlkOptions;

    fn build(options: VirtioBlkOptions, dma: Arc<DmaSpace>) -> Result<Box<dyn Device>, Error> {
        if options.transport() != Transport::VfioUser {
            return Err(Error::Config(
                "virtio-blk: this device is configured for vhost-user".into(),
            ));
        }
        let kick = match options.kick {
            Kick::Trap => KickMode::Trap,
            Kick::Poll => KickMode::Poll,
        };
        let blk = Arc::new(options.model()?);
        Ok(Box::new(pci::create(blk, dma, VirtioPciOptions { kick })?))
    }

    fn builder(options: VirtioBlkOptions) -> Builder {
        match options.transport() {
            Transport::VfioUser => {
                Builder::VfioUser(Box::new(move |dma| Self::build(options, dma)))
            }
            Transport::VhostUser => Builder::VhostUser(VhostUserBuilder {
                qemu_device: "vhost-user-blk-pci",
                queues: options.queues,
                start: Box::new(move |listener, exited| {
                    let blk = Arc::new(options.model()?);
                    VhostUserServer::start(listener, blk, exited)
                }),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Plan, SocketSpec};
    use clap::Parser;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        Plan::from_cli(cli).map_err(|e| e.to_string())
    }

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn vfio_user_by_default_and_vhost_user_on_request() {
        let mut p = plan(&["vdevd", "virtio-blk", "--socket", "/tmp/vb.sock"]).unwrap();
        let d = p.devices.pop().unwrap();
        assert_eq!(d.kind, "virtio-blk");
        assert_eq!(d.socket, SocketSpec::Path("/tmp/vb.sock".into()));
        assert!(matches!(d.build, Builder::VfioUser(_)));
        let mut p = plan(&[
            "vdevd",
            "virtio-blk",
            "--vhost-user",
            "/tmp/vu.sock",
            "--queues",
            "4",
        ])
        .unwrap();
        let d = p.devices.pop().unwrap();
        assert_eq!(d.socket, SocketSpec::Path("/tmp/vu.sock".into()));
        match d.build {
            Builder::VhostUser(b) => {
                assert_eq!((b.qemu_device, b.queues), ("vhost-user-blk-pci", 4))
            }
            Builder::VfioUser(_) => panic!("expected vhost-user"),
        }
        // one socket only
        assert!(
            plan(&[
                "vdevd",
                "virtio-blk",
                "--vhost-user",
                "/a",
                "--socket",
                "/b"
            ])
            .is_err()
        );
        assert!(plan(&["vdevd", "virtio-blk", "--image", "/x", "--size", "1M"]).is_err());
    }

    #[test]
    fn config_file_selects_the_transport() {
        let text = r#"
            [[device]]
            type = "virtio-blk"
            socket = "/tmp/a.sock"
            size = 1048576
            queues = 2
            kick = "poll"

            [[device]]
            type = "virtio-blk"
            socket = "/tmp/b.sock"
            transport = "vhost-user"
        "#;
        let p = Plan::from_config(text, &Default::default()).unwrap();
        assert!(matches!(p.devices[0].build, Builder::VfioUser(_)));
        assert!(matches!(p.devices[1].build, Builder::VhostUser(_)));
        let e = Plan::from_config(
            "[[device]]\ntype = \"virtio-blk\"\nsocket = \"/a\"\ntransport = \"pigeon\"",
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("pigeon"), "{e}");
        let from_file: VirtioBlkOptions = toml::from_str("").unwrap();
        assert_eq!(from_file, VirtioBlkOptions::default());
    }

    #[test]
    fn the_model_refuses_bad_options_with_the_reason() {
        let dma = Arc::new(DmaSpace::default());
        let build = |o: VirtioBlkOptions| {
            VirtioBlk::build(o, dma.clone())
                .err()
                .map(|e| e.to_string())
        };
        let small = VirtioBlkOptions {
            size: Some(1 << 20),
            ..VirtioBlkOptions::default()
        };
        assert_eq!(build(small.clone()), None);
        let e = build(VirtioBlkOptions {
            queues: 0,
            ..small.clone()
        })
        .unwrap();
        assert!(e.contains("queues"), "{e}");
        let e = build(VirtioBlkOptions {
            queue_size: 100,
            ..small.clone()
        })
        .unwrap();
        assert!(e.contains("queue size"), "{e}");
        let e = build(VirtioBlkOptions {
            direct: true,
            ..small.clone()
        })
        .unwrap();
        assert!(e.contains("--image"), "{e}");
        let e = build(VirtioBlkOptions {
            image: Some("/nonexistent/disk.img".into()),
            ..small.clone()
        })
        .unwrap();
        assert!(e.contains("/nonexistent/disk.img"), "{e}");
        let e = build(VirtioBlkOptions {
            serial: "x".repeat(21),
            ..small
        })
        .unwrap();
        assert!(e.contains("serial"), "{e}");
    }

    #[test]
    fn built_device_is_a_virtio_pci_function() {
        let dma = Arc::new(DmaSpace::default());
        let o = VirtioBlkOptions {
            size: Some(1 << 20),
            queues: 2,
            ..VirtioBlkOptions::default()
        };
        let mut dev = VirtioBlk::build(o, dma).unwrap();
        let mut id = [0u8; 4];
        dev.region_read(vdevd_devices::pci::CONFIG_REGION, 0, &mut id)
            .unwrap();
        assert_eq!(id, [0xf4, 0x1a, 0x42, 0x10]);
        assert_eq!(dev.irq_info(vdevd_devices::pci::MSIX_IRQ).unwrap().count, 3);
    }
}
