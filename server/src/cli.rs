//! The command line and the configuration file.
//!
//! ```text
//! vdevd [OPTIONS] <DEVICE> [--socket PATH | --socket-path PATH | --fd N] [DEVICE OPTIONS]
//! vdevd [OPTIONS] --config FILE.toml
//! ```
//!
//! Both forms produce a [`Plan`]: the server options and, for every device,
//! where it listens and how to build it.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

use crate::error::Error;
use crate::kinds::{self, Builder, DeviceCommand};
use crate::options::{OptionOverrides, ServerOptions};

const EXAMPLES: &str = "\
Examples:
  Serve the sample device on the default socket and print the QEMU option:
    vdevd sample

  Serve it on a chosen socket, with debug logs of every message:
    RUST_LOG=debug vdevd sample --socket /run/vdevd/sample0.sock

  Then start QEMU with (guest RAM shared so the device can reach it directly):
    qemu-system-x86_64 ... \\
      -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem \\
      -device '{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"/run/vdevd/sample0.sock\"}}'

  Several devices in one process, each on its own socket:
    vdevd --config /etc/vdevd/devices.toml

  A configuration file:
    [server]                     # optional; same names as the options below
    max_data_xfer_size = 1048576

    [[device]]
    type = \"sample\"
    socket = \"/run/vdevd/sample0.sock\"   # or: fd = 3

    [[device]]
    type = \"sample\"
    socket = \"/run/vdevd/sample1.sock\"

  External users (a management process keeping devices open across VMM
  reconnects) through a control socket:
    vdevd --config devices.toml --ctl-socket /run/vdevd/ctl.sock
    vdevd ctl --socket /run/vdevd/ctl.sock status
    vdevd ctl --socket /run/vdevd/ctl.sock hold sample0   # until killed
  Config keys of a [[device]] for this: name = \"sample0\", device_set = \"slot3\"
  (devices of one set are opened and closed under one lock).

Signals: SIGTERM or SIGINT stop every device, disconnect their clients and
remove their sockets.";

/// vdevd: serve virtual PCI devices to a VMM over vfio-user.
///
/// vdevd listens on a Unix socket per device. A vfio-user client (QEMU's
/// vfio-user-pci, cloud-hypervisor, ...) connects, and the guest drives the
/// device with its own drivers. One client per device at a time; when it
/// leaves, the next one is served.
#[derive(Debug, Parser)]
#[command(name = "vdevd", version, about, long_about, after_long_help = EXAMPLES)]
#[command(arg_required_else_help = true)]
pub struct Cli {
    /// Serve every device described in this TOML file (instead of a DEVICE)
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,

    /// Listen for external users (`vdevd ctl`) on this Unix socket: they
    /// take references that keep devices open across client reconnects
    #[arg(long, value_name = "PATH")]
    pub ctl_socket: Option<PathBuf>,

    #[command(flatten, next_help_heading = "Server options (also after the DEVICE)")]
    pub overrides: OptionOverrides,

    /// The device to serve
    #[command(subcommand)]
    pub device: Option<DeviceCommand>,
}

/// Where a device listens: pick one (the vfio-user backend conventions name
/// `--socket-path` and `--fd`; `--socket` is the same as `--socket-path`).
#[derive(Clone, Debug, Default, clap::Args)]
#[group(multiple = false)]
pub struct SocketArgs {
    /// Listen on this Unix socket path (created with mode 0600; a stale
    /// socket file is replaced, a live one refused). Default:
    /// $XDG_RUNTIME_DIR/vdevd/DEVICE.sock, or /run/vdevd/DEVICE.sock for
    /// root, or /tmp/vdevd-UID/DEVICE.sock
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Same as --socket
    #[arg(long = "socket-path", value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// Serve on this inherited, already listening Unix socket
    #[arg(long, value_name = "FDNUM")]
    pub fd: Option<RawFd>,
}

/// Where a device listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSpec {
    /// Bind this path.
    Path(PathBuf),
    /// Use this inherited listening socket.
    Fd(RawFd),
}

/// One device to serve.
pub struct DevicePlan {
    /// The device type.
    pub kind: &'static str,
    /// Where it listens.
    pub socket: SocketSpec,
    /// Builds the device.
    pub build: Builder,
    /// Its name on the control socket (default: the device's own name).
    pub name: Option<String>,
    /// The device set it joins (default: its reset domain, or a set of
    /// its own).
    pub device_set: Option<String>,
    /// The shared DMA address space it joins (default: one of its own).
    pub address_space: Option<String>,
}

impl std::fmt::Debug for DevicePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePlan")
            .field("kind", &self.kind)
            .field("socket", &self.socket)
            .field("name", &self.name)
            .field("device_set", &self.device_set)
            .field("address_space", &self.address_space)
            .finish_non_exhaustive()
    }
}

/// Everything the process will serve.
#[derive(Debug)]
pub struct Plan {
    /// Options shared by every device server.
    pub options: ServerOptions,
    /// The devices.
    pub devices: Vec<DevicePlan>,
    /// The control socket for external users, if any.
    pub ctl_socket: Option<PathBuf>,
}

/// The directory for default socket paths, created (mode 0700) if needed.
pub fn default_socket_dir() -> Result<PathBuf, Error> {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() => d.join("vdevd"),
        _ if uid == 0 => PathBuf::from("/run/vdevd"),
        _ => std::env::temp_dir().join(format!("vdevd-{uid}")),
    };
    create_private_dir(&dir, uid)?;
    Ok(dir)
}

fn create_private_dir(dir: &Path, uid: u32) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(Error::io(format!("create {}", dir.display()), e)),
    }
    // In a shared directory such as /tmp, make sure the directory is ours
    // and not a symlink someone else planted.
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("stat {}", dir.display()), e))?;
    if !meta.is_dir() || meta.uid() != uid {
        return Err(Error::Config(format!(
            "{} is not a directory owned by uid {uid}; pass --socket",
            dir.display()
        )));
    }
    Ok(())
}

fn socket_spec(args: SocketArgs, kind: &str) -> Result<SocketSpec, Error> {
    if let Some(fd) = args.fd {
        if fd < 0 {
            return Err(Error::Config(format!("--fd {fd} is not a descriptor")));
        }
        return Ok(SocketSpec::Fd(fd));
    }
    match args.socket.or(args.socket_path) {
        Some(p) => Ok(SocketSpec::Path(p)),
        None => Ok(SocketSpec::Path(
            default_socket_dir()?.join(format!("{kind}.sock")),
        )),
    }
}

/// The `[server]` and `[[device]]` tables of a configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    server: OptionOverrides,
    #[serde(default)]
    device: Vec<toml::Table>,
    #[serde(default)]
    ctl_socket: Option<PathBuf>,
}

impl Plan {
    /// The plan for a parsed command line.
    pub fn from_cli(cli: Cli) -> Result<Plan, Error> {
        match (cli.config, cli.device) {
            (Some(_), Some(_)) => Err(Error::Config(
                "give either a DEVICE or --config, not both".into(),
            )),
            (None, None) => Err(Error::Config(
                "give a DEVICE to serve or --config FILE.toml (see --help)".into(),
            )),
            (None, Some(device)) => {
                let mut options = ServerOptions::default();
                cli.overrides.apply(&mut options);
                options.validate()?;
                let (kind, socket, build) = device.into_parts();
                Ok(Plan {
                    options,
                    devices: vec![DevicePlan {
                        kind,
                        socket: socket_spec(socket, kind)?,
                        build,
                        name: None,
                        device_set: None,
                        address_space: None,
                    }],
                    ctl_socket: cli.ctl_socket,
                })
            }
            (Some(path), None) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
                let mut plan = Plan::from_config(&text, &cli.overrides)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
                if cli.ctl_socket.is_some() {
                    plan.ctl_socket = cli.ctl_socket;
                }
                Ok(plan)
            }
        }
    }

    /// The plan for the text of a configuration file; `overrides` (from the
    /// command line) win over its `[server]` table.
    pub fn from_config(text: &str, overrides: &OptionOverrides) -> Result<Plan, Error> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        let mut options = ServerOptions::default();
        file.server.apply(&mut options);
        overrides.apply(&mut options);
        options.validate()?;
        if file.device.is_empty() {
            return Err(Error::Config("no [[device]] table".into()));
        }
        let mut devices = Vec::new();
        for (i, mut table) in file.device.into_iter().enumerate() {
            let n = i + 1;
            let kind = match table.remove("type") {
                Some(toml::Value::String(s)) => s,
                Some(_) => return Err(Error::Config(format!("device #{n}: type is not a string"))),
                None => return Err(Error::Config(format!("device #{n}: no type"))),
            };
            let socket = match (table.remove("socket"), table.remove("fd")) {
                (Some(toml::Value::String(s)), None) => SocketSpec::Path(PathBuf::from(s)),
                (None, Some(toml::Value::Integer(fd))) => {
                    SocketSpec::Fd(RawFd::try_from(fd).ok().filter(|f| *f >= 0).ok_or_else(
                        || Error::Config(format!("device #{n}: fd {fd} is not a descriptor")),
                    )?)
                }
                (Some(_), Some(_)) => {
                    return Err(Error::Config(format!(
                        "device #{n}: give socket or fd, not both"
                    )));
                }
                (None, None) => {
                    return Err(Error::Config(format!(
                        "device #{n} ({kind}): socket (a path) or fd is required"
                    )));
                }
                _ => {
                    return Err(Error::Config(format!(
                        "device #{n}: socket must be a string, fd an integer"
                    )));
                }
            };
            if devices.iter().any(|d: &DevicePlan| d.socket == socket) {
                return Err(Error::Config(format!(
                    "device #{n}: {socket:?} is used by another device"
                )));
            }
            let mut text_key = |key: &str| match table.remove(key) {
                None => Ok(None),
                Some(toml::Value::String(v)) if !v.is_empty() && v.len() <= 64 => Ok(Some(v)),
                Some(_) => Err(Error::Config(format!(
                    "device #{n}: {key} must be a string of 1 to 64 characters"
                ))),
            };
            let name = text_key("name")?;
            let device_set = text_key("device_set")?;
            let address_space = text_key("address_space")?;
            if let Some(nm) = &name {
                if devices
                    .iter()
                    .any(|d: &DevicePlan| d.name.as_ref() == Some(nm))
                {
                    return Err(Error::Config(format!(
                        "device #{n}: the name {nm:?} is used by another device"
                    )));
                }
            }
            let build = kinds::from_table(&kind, table)
                .map_err(|e| Error::Config(format!("device #{n}: {e}")))?;
            let kind = kinds::names()
                .into_iter()
                .find(|k| *k == kind)
                .unwrap_or("unknown");
            devices.push(DevicePlan {
                kind,
                socket,
                build,
                name,
                device_set,
                address_space,
            });
        }
        Ok(Plan {
            options,
            devices,
            ctl_socket: file.ctl_socket,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::sync::Arc;
    use vdevd_devices::dma::DmaSpace;

    fn parse(args: &[&str]) -> Result<Plan, Error> {
        let cli = Cli::try_parse_from(args).map_err(|e| Error::Config(e.to_string()))?;
        Plan::from_cli(cli)
    }

    fn build_message(p: DevicePlan) -> String {
        let kinds::Builder::VfioUser(build) = p.build else {
            return "vhost-user".into();
        };
        match build(Arc::new(DmaSpace::default())) {
            Ok(_) => "built".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn device_with_socket_and_options() {
        let mut p = parse(&[
            "vdevd",
            "fake",
            "--socket",
            "/tmp/x.sock",
            "--level",
            "7",
            "--max-msg-fds",
            "8",
        ])
        .unwrap();
        assert_eq!(p.options.max_msg_fds, 8);
        let d = p.devices.pop().unwrap();
        assert_eq!(d.kind, "fake");
        assert_eq!(d.socket, SocketSpec::Path("/tmp/x.sock".into()));
        assert!(build_message(d).contains("level 7"));
    }

    #[test]
    fn backend_convention_options() {
        let mut p = parse(&["vdevd", "fake", "--socket-path=/tmp/y.sock"]).unwrap();
        assert_eq!(
            p.devices.pop().unwrap().socket,
            SocketSpec::Path("/tmp/y.sock".into())
        );
        let mut p = parse(&["vdevd", "fake", "--fd=3"]).unwrap();
        assert_eq!(p.devices.pop().unwrap().socket, SocketSpec::Fd(3));
        // global options also before the device
        let p = parse(&["vdevd", "--max-dma-maps", "100", "fake", "--fd", "3"]).unwrap();
        assert_eq!(p.options.max_dma_maps, 100);
        // only one way to give the socket
        assert!(parse(&["vdevd", "fake", "--fd=3", "--socket=/tmp/z"]).is_err());
        assert!(parse(&["vdevd", "fake", "--socket=/a", "--socket-path=/b"]).is_err());
        assert!(parse(&["vdevd", "fake", "--fd=-1"]).is_err());
    }

    #[test]
    fn invalid_limits_are_refused_with_the_reason() {
        let e = parse(&["vdevd", "fake", "--fd=3", "--max-msg-fds", "64"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_msg_fds") && e.contains("QEMU"), "{e}");
        let e = parse(&["vdevd", "fake", "--fd=3", "--pgsizes", "0x800"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("pgsizes"), "{e}");
    }

    #[test]
    fn default_socket_is_under_the_runtime_dir() {
        let mut p = parse(&["vdevd", "fake"]).unwrap();
        let SocketSpec::Path(path) = p.devices.pop().unwrap().socket else {
            panic!("expected a path");
        };
        assert!(path.ends_with("fake.sock"), "{}", path.display());
        assert!(path.parent().unwrap().is_dir());
    }

    #[test]
    fn either_a_device_or_a_config() {
        assert!(parse(&["vdevd", "--config", "/nonexistent.toml", "fake"]).is_err());
        let e = parse(&["vdevd", "--max-msg-fds", "4"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("DEVICE"), "{e}");
        let e = parse(&["vdevd", "--config", "/nonexistent/x.toml"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/x.toml"), "{e}");
    }

    #[test]
    fn help_explains_every_option_with_examples() {
        let help = Cli::command().render_long_help().to_string();
        for word in [
            "--config",
            "--max-msg-fds",
            "--max-data-xfer-size",
            "--max-dma-maps",
            "--pgsizes",
            "--handshake-timeout-ms",
            "--dma-timeout-ms",
            "Examples:",
            "vfio-user-pci",
        ] {
            assert!(help.contains(word), "help lacks {word}:\n{help}");
        }
        let mut cmd = Cli::command();
        let sub = cmd.find_subcommand_mut("fake").unwrap();
        let help = sub.render_long_help().to_string();
        for word in ["--socket", "--socket-path", "--fd", "--level"] {
            assert!(help.contains(word), "device help lacks {word}:\n{help}");
        }
    }

    #[test]
    fn config_file_with_several_devices() {
        let text = r#"
            [server]
            max_data_xfer_size = 65536

            [[device]]
            type = "fake"
            socket = "/tmp/a.sock"
            level = 3

            [[device]]
            type = "fake"
            fd = 4
        "#;
        let overrides = OptionOverrides {
            max_msg_fds: Some(2),
            ..OptionOverrides::default()
        };
        let p = Plan::from_config(text, &overrides).unwrap();
        assert_eq!(p.options.max_data_xfer_size, 65536);
        assert_eq!(p.options.max_msg_fds, 2);
        assert_eq!(p.devices.len(), 2);
        let mut it = p.devices.into_iter();
        let a = it.next().unwrap();
        assert_eq!(a.socket, SocketSpec::Path("/tmp/a.sock".into()));
        assert!(build_message(a).contains("level 3"));
        let b = it.next().unwrap();
        assert_eq!(b.socket, SocketSpec::Fd(4));
        assert!(build_message(b).contains("level 1"));
    }

    #[test]
    fn config_names_device_sets_and_the_control_socket() {
        let text = r#"
            ctl_socket = "/tmp/ctl.sock"
            [[device]]
            type = "fake"
            socket = "/tmp/a.sock"
            name = "a"
            device_set = "slot3"
            address_space = "vm1"
            [[device]]
            type = "fake"
            socket = "/tmp/b.sock"
        "#;
        let p = Plan::from_config(text, &OptionOverrides::default()).unwrap();
        assert_eq!(p.ctl_socket, Some(PathBuf::from("/tmp/ctl.sock")));
        assert_eq!(p.devices[0].name.as_deref(), Some("a"));
        assert_eq!(p.devices[0].device_set.as_deref(), Some("slot3"));
        assert_eq!(p.devices[1].name, None);
        assert_eq!(p.devices[1].device_set, None);
        assert_eq!(p.devices[0].address_space.as_deref(), Some("vm1"));
        assert_eq!(p.devices[1].address_space, None);
        let dup = "[[device]]\ntype = \"fake\"\nsocket = \"/a\"\nname = \"x\"\n\
                   [[device]]\ntype = \"fake\"\nsocket = \"/b\"\nname = \"x\"";
        let e = Plan::from_config(dup, &OptionOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"x\" is used"), "{e}");
        let bad = "[[device]]\ntype = \"fake\"\nsocket = \"/a\"\ndevice_set = 3";
        let e = Plan::from_config(bad, &OptionOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("device_set must be a string"), "{e}");
        let p = parse(&["vdevd", "--ctl-socket", "/tmp/c.sock", "fake", "--fd", "3"]).unwrap();
        assert_eq!(p.ctl_socket, Some(PathBuf::from("/tmp/c.sock")));
        let ctl = crate::ctl::CtlCli::try_parse_from(["ctl", "--socket", "/s", "hold", "a", "b"])
            .unwrap();
        assert!(
            matches!(ctl.command, crate::ctl::CtlCommand::Hold { ref names } if names.len() == 2)
        );
        assert!(crate::ctl::CtlCli::try_parse_from(["ctl", "--socket", "/s", "hold"]).is_err());
    }

    #[test]
    fn config_file_errors_name_the_device_and_the_problem() {
        let cases = [
            ("", "no [[device]]"),
            ("[[device]]\nsocket = \"/a\"", "no type"),
            (
                "[[device]]\ntype = \"fake\"",
                "socket (a path) or fd is required",
            ),
            (
                "[[device]]\ntype = \"nvme9\"\nsocket = \"/a\"",
                "unknown device type \"nvme9\"",
            ),
            (
                "[[device]]\ntype = \"fake\"\nsocket = \"/a\"\ncolour = 1",
                "colour",
            ),
            (
                "[[device]]\ntype = \"fake\"\nsocket = \"/a\"\n[[device]]\ntype = \"fake\"\nsocket = \"/a\"",
                "device #2",
            ),
            (
                "[[device]]\ntype = \"fake\"\nsocket = \"/a\"\nfd = 3",
                "not both",
            ),
            (
                "[server]\nmax_msg_fds = 99\n[[device]]\ntype = \"fake\"\nfd = 3",
                "max_msg_fds",
            ),
            ("[server]\nspeed = 1\n", "speed"),
            ("[[device]]\ntype = \"fake\"\nfd = -2", "not a descriptor"),
        ];
        for (text, want) in cases {
            let e = Plan::from_config(text, &OptionOverrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
