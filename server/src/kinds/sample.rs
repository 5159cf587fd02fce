//! `vdevd sample`: the sample PCI device (see `vdevd_devices::sample`).

use std::sync::Arc;

use serde::Deserialize;
use vdevd_devices::Device;
use vdevd_devices::dma::DmaSpace;
use vdevd_devices::sample::{Sample as SampleModel, SampleConfig};

use super::DeviceType;
use crate::error::Error;

/// The sample device type.
pub struct Sample;

/// Options of `vdevd sample` (and of `type = "sample"` tables).
#[derive(Clone, Debug, PartialEq, Eq, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleOptions {
    /// MSI-X vectors, 1..=64
    #[arg(long, value_name = "N", default_value_t = SampleOptions::default().msix_vectors)]
    pub msix_vectors: u16,
    /// Size of the device buffer (BAR2) in bytes: a power of two from 4096
    /// to 64 MiB
    #[arg(long, value_name = "BYTES", default_value_t = SampleOptions::default().buffer_size)]
    pub buffer_size: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        let c = SampleConfig::default();
        SampleOptions {
            msix_vectors: c.msix_vectors,
            buffer_size: c.buffer_size,
        }
    }
}

impl DeviceType for Sample {
    const NAME: &'static str = "sample";
    type Options = SampleOptions;

    fn build(options: SampleOptions, dma: Arc<DmaSpace>) -> Result<Box<dyn Device>, Error> {
        let config = SampleConfig {
            msix_vectors: options.msix_vectors,
            buffer_size: options.buffer_size,
        };
        Ok(Box::new(SampleModel::create(config, dma)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Plan};
    use clap::Parser;

    #[test]
    fn options_from_the_command_line_and_a_file_agree_on_defaults() {
        let cli = Cli::try_parse_from(["vdevd", "sample", "--fd", "3"]).unwrap();
        let plan = Plan::from_cli(cli).unwrap();
        assert_eq!(plan.devices[0].kind, "sample");
        let from_file: SampleOptions = toml::from_str("").unwrap();
        assert_eq!(from_file, SampleOptions::default());
    }

    #[test]
    fn invalid_options_are_refused_by_the_model() {
        let dma = Arc::new(DmaSpace::default());
        let bad = SampleOptions {
            msix_vectors: 0,
            ..SampleOptions::default()
        };
        let e = Sample::build(bad, dma.clone()).err().unwrap().to_string();
        assert!(e.contains("MSI-X"), "{e}");
        let bad = SampleOptions {
            buffer_size: 5000,
            ..SampleOptions::default()
        };
        assert!(Sample::build(bad, dma.clone()).is_err());
        let dev = Sample::build(SampleOptions::default(), dma).unwrap();
        assert_eq!(dev.info().num_regions, 9);
    }
}
