//! The device types vdevd can serve.
//!
//! Each type lives in its own module: it declares its options (for the
//! command line with clap, for a configuration file with serde) and builds
//! its [`Device`]. Adding a type means adding a module, a variant of
//! [`DeviceCommand`] and an arm in [`from_table`]; the server core is not
//! touched.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use vdevd_devices::Device;
use vdevd_devices::dma::DmaSpace;

use vmm_sys_util::eventfd::EventFd;

use crate::cli::SocketArgs;
use crate::error::Error;
use crate::listener::Listener;
use crate::vhost_user::VhostUserServer;

pub mod nvme;
pub mod passthrough;
pub mod sample;
pub mod virtio_blk;

/// A device type: its name, its options and how to build it.
///
/// The options struct serves both the command line and configuration
/// files, so its defaults must agree: implement `Default`, mark the struct
/// `#[serde(deny_unknown_fields, default)]` and take each clap
/// `default_value_t` from `Default`.
pub trait DeviceType {
    /// Name on the command line and in configuration files.
    const NAME: &'static str;
    /// The type's options.
    type Options: clap::Args + DeserializeOwned + Send + 'static;
    /// Build a device that reaches client memory through `dma`.
    fn build(options: Self::Options, dma: Arc<DmaSpace>) -> Result<Box<dyn Device>, Error>;

    /// How to serve a device with these options: over vfio-user (with
    /// [`DeviceType::build`]) unless the type can also be served over
    /// vhost-user and the options ask for it.
    fn builder(options: Self::Options) -> Builder
    where
        Self: Sized + 'static,
    {
        Builder::VfioUser(Box::new(move |dma| Self::build(options, dma)))
    }
}

/// Builds a vfio-user device once its DMA address space exists.
pub type VfioUserBuilder = Box<dyn FnOnce(Arc<DmaSpace>) -> Result<Box<dyn Device>, Error> + Send>;

/// Starts a vhost-user server on its bound listener; `exited` is
/// signalled when it ends.
pub struct VhostUserBuilder {
    /// The QEMU device that connects to it (for the start-up banner).
    pub qemu_device: &'static str,
    /// Number of queues (for the banner's `num-queues`).
    pub queues: u16,
    /// Start serving.
    #[allow(clippy::type_complexity)]
    pub start:
        Box<dyn FnOnce(Listener, Option<Arc<EventFd>>) -> Result<VhostUserServer, Error> + Send>,
}

/// How a planned device is served.
pub enum Builder {
    /// A PCI device over vfio-user.
    VfioUser(VfioUserBuilder),
    /// A virtio device over vhost-user.
    VhostUser(VhostUserBuilder),
}

fn builder<T: DeviceType + 'static>(options: T::Options) -> Builder {
    T::builder(options)
}

/// The socket options and the type's own options of a device subcommand.
#[derive(Debug, clap::Args)]
pub struct DeviceArgs<O: clap::Args> {
    /// Where to listen.
    #[command(flatten, next_help_heading = "Socket (one of)")]
    pub socket: SocketArgs,
    /// The device's options.
    #[command(flatten, next_help_heading = "Device options")]
    pub options: O,
}

const VIRTIO_BLK_EXAMPLES: &str = "\
Examples:
  A 1 GiB memory disk over vfio-user (QEMU: -device vfio-user-pci):
    vdevd virtio-blk --socket /run/vdevd/vblk0.sock --size 1G --queues 2
  An image file with O_DIRECT, notify page polled instead of trapped:
    vdevd virtio-blk --socket /run/vdevd/vblk0.sock --image disk.raw --direct --kick poll
  The same disk over vhost-user (QEMU: -device vhost-user-blk-pci):
    vdevd virtio-blk --vhost-user /run/vdevd/vblk0-vu.sock --image disk.raw --queues 4
    qemu-system-x86_64 ... \\
      -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem \\
      -chardev socket,id=vu0,path=/run/vdevd/vblk0-vu.sock,reconnect-ms=1000 \\
      -device vhost-user-blk-pci,chardev=vu0,num-queues=4
  In a configuration file:
    [[device]]
    type = \"virtio-blk\"
    socket = \"/run/vdevd/vblk0-vu.sock\"
    transport = \"vhost-user\"      # or \"vfio-user\" (default)
    image = \"/var/lib/vm/disk.raw\"
    queues = 4";

const SAMPLE_EXAMPLES: &str = "\
Examples:
  vdevd sample
  vdevd sample --socket /run/vdevd/sample0.sock --msix-vectors 8 --buffer-size 1048576
  vdevd sample --fd 3        # a listening socket inherited from the parent";

const PASSTHROUGH_EXAMPLES: &str = "\
Examples:
  Re-export the host device 0000:01:00.0 (bound to vfio-pci):
    vdevd passthrough --socket /run/vdevd/nic0.sock --device 0000:01:00.0
  The same over the device cdev and /dev/iommu:
    vdevd passthrough --socket /run/vdevd/nic0.sock --device 01:00.0 --iommu iommufd

vdevd pins the client's memory for the IOMMU: give it RLIMIT_MEMLOCK of at
least the guest's RAM (or CAP_IPC_LOCK).";

const NVME_EXAMPLES: &str = "\
Examples:
  vdevd nvme --socket /run/vdevd/nvme0.sock                  # 1 GiB in memory
  vdevd nvme --socket /run/vdevd/nvme0.sock --image disk.raw --direct --queues 8
  vdevd nvme --socket /run/vdevd/nvme0.sock --size 16G --doorbells mmap";

/// The device subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DeviceCommand {
    /// The sample PCI device: registers, a DMA engine, an mmappable buffer,
    /// MSI-X/MSI/INTx (vendor 1234, device 5344)
    #[command(after_long_help = SAMPLE_EXAMPLES)]
    Sample(DeviceArgs<sample::SampleOptions>),
    /// A virtio block device (1af4:1042) on a memory disk or an image
    /// file, over vfio-user (virtio-pci) or vhost-user
    #[command(after_long_help = VIRTIO_BLK_EXAMPLES)]
    VirtioBlk(DeviceArgs<virtio_blk::VirtioBlkOptions>),
    /// A host PCI device bound to vfio-pci, re-exported over vfio-user (the
    /// VMM needs no access to /dev/vfio)
    #[command(after_long_help = PASSTHROUGH_EXAMPLES)]
    Passthrough(DeviceArgs<passthrough::PassthroughArgs>),
    /// An NVMe controller with one namespace on a raw image or in memory
    /// (class 010802; the guest's nvme driver binds to it)
    #[command(after_long_help = NVME_EXAMPLES)]
    Nvme(DeviceArgs<nvme::NvmeOptions>),
    #[cfg(test)]
    /// A device for the command line tests.
    Fake(DeviceArgs<tests::FakeOptions>),
}

impl DeviceCommand {
    /// The type's name, where to listen, and the builder.
    pub fn into_parts(self) -> (&'static str, SocketArgs, Builder) {
        match self {
            DeviceCommand::Sample(a) => (
                sample::Sample::NAME,
                a.socket,
                builder::<sample::Sample>(a.options),
            ),
            DeviceCommand::VirtioBlk(a) => {
                let socket = match &a.options.vhost_user {
                    Some(path) => SocketArgs {
                        socket: Some(path.clone()),
                        ..SocketArgs::default()
                    },
                    None => a.socket,
                };
                (
                    virtio_blk::VirtioBlk::NAME,
                    socket,
                    builder::<virtio_blk::VirtioBlk>(a.options),
                )
            }
            DeviceCommand::Passthrough(a) => (
                passthrough::Passthrough::NAME,
                a.socket,
                builder::<passthrough::Passthrough>(a.options),
            ),
            DeviceCommand::Nvme(a) => {
                (nvme::Nvme::NAME, a.socket, builder::<nvme::Nvme>(a.options))
            }
            #[cfg(test)]
            DeviceCommand::Fake(a) => (
                tests::Fake::NAME,
                a.socket,
                builder::<tests::Fake>(a.options),
            ),
        }
    }
}

/// Names of every device type.
pub fn names() -> Vec<&'static str> {
    vec![
        sample::Sample::NAME,
        virtio_blk::VirtioBlk::NAME,
        passthrough::Passthrough::NAME,
        nvme::Nvme::NAME,
        #[cfg(test)]
        tests::Fake::NAME,
    ]
}

fn parse<T: DeviceType + 'static>(table: toml::Table) -> Result<Builder, Error> {
    let options: T::Options = toml::Value::Table(table)
        .try_into()
        .map_err(|e| Error::Config(format!("{} options: {e}", T::NAME)))?;
    Ok(builder::<T>(options))
}

/// The builder for a `[[device]]` table of type `kind` (its remaining
/// keys are the type's options).
pub fn from_table(kind: &str, table: toml::Table) -> Result<Builder, Error> {
    if kind == sample::Sample::NAME {
        return parse::<sample::Sample>(table);
    }
    if kind == virtio_blk::VirtioBlk::NAME {
        return parse::<virtio_blk::VirtioBlk>(table);
    }
    if kind == passthrough::Passthrough::NAME {
        return parse::<passthrough::Passthrough>(table);
    }
    if kind == nvme::Nvme::NAME {
        return parse::<nvme::Nvme>(table);
    }
    #[cfg(test)]
    if kind == tests::Fake::NAME {
        return parse::<tests::Fake>(table);
    }
    Err(Error::Config(format!(
        "unknown device type {kind:?} (known: {})",
        names().join(", ")
    )))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde::Deserialize;

    /// A device type whose build only records its options.
    pub struct Fake;

    #[derive(Clone, Debug, clap::Args, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    pub struct FakeOptions {
        /// A number.
        #[arg(long, default_value_t = FakeOptions::default().level)]
        pub level: u32,
    }

    impl Default for FakeOptions {
        fn default() -> Self {
            FakeOptions { level: 1 }
        }
    }

    impl DeviceType for Fake {
        const NAME: &'static str = "fake";
        type Options = FakeOptions;
        fn build(options: FakeOptions, _dma: Arc<DmaSpace>) -> Result<Box<dyn Device>, Error> {
            Err(Error::Config(format!(
                "fake device level {}",
                options.level
            )))
        }
    }
}
