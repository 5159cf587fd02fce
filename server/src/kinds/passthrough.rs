//! `vdevd passthrough`: a host PCI device bound to vfio-pci, re-exported
//! over vfio-user (see `vdevd_devices::passthrough`).

use std::sync::Arc;

use serde::Deserialize;
use vdevd_devices::Device;
use vdevd_devices::dma::DmaSpace;
use vdevd_devices::passthrough::{IommuKind, Passthrough as Model, PassthroughOptions, Vfio};

use super::DeviceType;
use crate::error::Error;

/// The passthrough device type.
pub struct Passthrough;

/// The kernel interface used to reach the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IommuChoice {
    /// /dev/vfio/GROUP with a TYPE1v2 container (every VFIO kernel)
    #[default]
    Group,
    /// /dev/vfio/devices/vfioX bound to /dev/iommu (kernels with IOMMUFD
    /// and VFIO_DEVICE_CDEV)
    Iommufd,
}

impl From<IommuChoice> for IommuKind {
    fn from(c: IommuChoice) -> IommuKind {
        match c {
            IommuChoice::Group => IommuKind::Group,
            IommuChoice::Iommufd => IommuKind::Iommufd,
        }
    }
}

/// Options of `vdevd passthrough` (and of `type = "passthrough"` tables).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassthroughArgs {
    /// The host device's PCI address (SSSS:BB:DD.F or BB:DD.F), bound to
    /// vfio-pci
    #[arg(long, value_name = "PCI-ADDRESS")]
    pub device: String,
    /// Kernel interface: the group/container path or the cdev/iommufd path
    #[arg(long, value_enum, default_value_t = IommuChoice::Group)]
    pub iommu: IommuChoice,
    /// Relay every BAR access instead of handing the client the VFIO device
    /// descriptor to mmap the BARs
    #[arg(long)]
    pub no_mmap: bool,
    /// Name of the DMA address space (devices of one VM share one)
    #[arg(long, value_name = "NAME", default_value_t = PassthroughArgs::default().address_space)]
    pub address_space: String,
}

impl Default for PassthroughArgs {
    fn default() -> Self {
        PassthroughArgs {
            device: String::new(),
            iommu: IommuChoice::Group,
            no_mmap: false,
            address_space: "default".into(),
        }
    }
}

impl PassthroughArgs {
    /// The model's options, or why these are invalid.
    pub fn to_options(&self) -> Result<PassthroughOptions, Error> {
        if self.device.is_empty() {
            return Err(Error::Config(
                "passthrough needs the host device: --device SSSS:BB:DD.F".into(),
            ));
        }
        let address = self.device.parse().map_err(Error::Config)?;
        if self.address_space.is_empty() || self.address_space.len() > 64 {
            return Err(Error::Config(
                "address_space must be a name of 1 to 64 characters".into(),
            ));
        }
        Ok(PassthroughOptions {
            address,
            iommu: self.iommu.into(),
            mmap: !self.no_mmap,
            address_space: self.address_space.clone(),
        })
    }
}

impl DeviceType for Passthrough {
    const NAME: &'static str = "passthrough";
    type Options = PassthroughArgs;

    fn build(options: PassthroughArgs, dma: Arc<DmaSpace>) -> Result<Box<dyn Device>, Error> {
        let mut options = options.to_options()?;
        // A shared address space of the configuration names the space.
        let label = dma.label();
        if label.is_empty() {
            dma.set_label(&options.address_space);
        } else {
            options.address_space = label;
        }
        Ok(Box::new(Model::new(&Vfio::host(), &dma, options)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Plan};
    use clap::Parser;

    #[test]
    fn command_line_and_file_agree() {
        let cli = Cli::try_parse_from([
            "vdevd",
            "passthrough",
            "--fd",
            "3",
            "--device",
            "0000:01:00.0",
            "--iommu",
            "iommufd",
        ])
        .unwrap();
        let plan = Plan::from_cli(cli).unwrap();
        assert_eq!(plan.devices[0].kind, "passthrough");
        let from_file: PassthroughArgs =
            toml::from_str("device = \"01:00.0\"\niommu = \"iommufd\"").unwrap();
        let o = from_file.to_options().unwrap();
        assert_eq!(o.address.to_string(), "0000:01:00.0");
        assert_eq!(o.iommu, IommuKind::Iommufd);
        assert!(o.mmap);
        assert_eq!(o.address_space, "default");
        let d: PassthroughArgs = toml::from_str("").unwrap();
        assert_eq!(d, PassthroughArgs::default());
    }

    #[test]
    fn bad_options_are_refused_with_the_reason() {
        let e = PassthroughArgs::default()
            .to_options()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--device"), "{e}");
        let bad = PassthroughArgs {
            device: "0000:01:20.0".into(),
            ..PassthroughArgs::default()
        };
        assert!(
            bad.to_options()
                .unwrap_err()
                .to_string()
                .contains("not a PCI address")
        );
        let bad = PassthroughArgs {
            device: "01:00.0".into(),
            address_space: String::new(),
            ..PassthroughArgs::default()
        };
        assert!(bad.to_options().is_err());
        assert!(toml::from_str::<PassthroughArgs>("iommu = \"vfio\"").is_err());
    }

    #[test]
    fn a_device_missing_from_the_host_is_a_clear_error() {
        // PCI segment ffff does not exist on any host.
        let args = PassthroughArgs {
            device: "ffff:ff:1f.7".into(),
            ..PassthroughArgs::default()
        };
        let e = Passthrough::build(args, Arc::new(DmaSpace::default()))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ffff:ff:1f.7") && e.contains("sysfs"), "{e}");
    }
}
