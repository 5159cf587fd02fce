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
/// Default of `max_dma_bytes`: 1 TiB.
pub const DEFAULT_MAX_DMA_BYTES: u64 = 1 << 40;
/// Largest listen backlog (the kernel caps it at net.core.somaxconn too).
pub const MAX_LISTEN_BACKLOG: u32 = 4096;

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
    /// Most bytes a client may have mapped for DMA at once, summed over
    /// its mappings.
    pub max_dma_bytes: u64,
    /// Connections that may wait in a device socket's backlog while its
    /// client is served (listen(2)).
    pub listen_backlog: u32,
    /// Warnings one client may cause per second; more are counted and
    /// summarised (0: no limit).
    pub log_warnings_per_sec: u32,
    /// Permission bits of socket files vdevd creates.
    pub socket_mode: u32,
    /// If not empty, only clients running as one of these user ids are
    /// served (checked with SO_PEERCRED); others are disconnected at once.
    pub allow_uids: Vec<u32>,
    /// The seccomp filter of the device threads.
    pub seccomp: crate::sandbox::SeccompMode,
    /// Switch the process to this user (name or uid) once its sockets and
    /// devices are open.
    pub user: Option<String>,
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
            max_dma_bytes: DEFAULT_MAX_DMA_BYTES,
            listen_backlog: 16,
            log_warnings_per_sec: 20,
            socket_mode: 0o600,
            allow_uids: Vec::new(),
            seccomp: crate::sandbox::SeccompMode::default(),
            user: None,
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
        if self.max_dma_bytes == 0 {
            return bad("max_dma_bytes", "must be above zero".into());
        }
        if self.listen_backlog == 0 || self.listen_backlog > MAX_LISTEN_BACKLOG {
            return bad(
                "listen_backlog",
                format!(
                    "{} is outside 1..={MAX_LISTEN_BACKLOG}",
                    self.listen_backlog
                ),
            );
        }
        if self.socket_mode & !0o777 != 0 || self.socket_mode & 0o600 != 0o600 {
            return bad(
                "socket_mode",
                format!(
                    "{:#o} must be permission bits that include 0600 (the owner reads and writes)",
                    self.socket_mode
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
    /// Most bytes a client may map for DMA at once, summed over its
    /// mappings [default: 1099511627776]
    #[arg(long, value_name = "BYTES", global = true, value_parser = parse_u64)]
    pub max_dma_bytes: Option<u64>,
    /// Connections that may wait in a device socket's backlog while its
    /// client is served [default: 16]
    #[arg(long, value_name = "N", global = true)]
    pub listen_backlog: Option<u32>,
    /// Warnings one client may cause per second; more are counted and
    /// summarised, 0 for no limit [default: 20]
    #[arg(long, value_name = "N", global = true)]
    pub log_warnings_per_sec: Option<u32>,
    /// Permission bits of the socket files, in octal; must include 0600
    /// [default: 600]
    #[arg(long, value_name = "OCTAL", global = true, value_parser = parse_mode)]
    #[serde(default, deserialize_with = "mode_from_toml")]
    pub socket_mode: Option<u32>,
    /// Serve only clients running as this user id (SO_PEERCRED); repeat
    /// for several. Default: any client that can open the socket
    #[arg(long = "allow-uid", value_name = "UID", global = true)]
    #[serde(default, rename = "allow_uids")]
    pub allow_uids: Vec<u32>,
    /// What the seccomp filter of the threads that handle client input
    /// does with a system call it does not allow: errno (EPERM), kill
    /// (the process), log (allow and log), or off [default: errno]
    #[arg(long, value_name = "ACTION", global = true)]
    pub seccomp: Option<crate::sandbox::SeccompMode>,
    /// No seccomp filter (same as --seccomp off)
    #[arg(long, global = true, conflicts_with = "seccomp")]
    #[serde(default)]
    pub no_seccomp: bool,
    /// Once the sockets and devices are open, switch to this user (name or
    /// uid) and its group, dropping supplementary groups; the socket files
    /// are given to that user first
    #[arg(long, value_name = "USER", global = true)]
    pub user: Option<String>,
}

/// Parse permission bits written in octal ("660", "0o660" or "0660").
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    u32::from_str_radix(digits, 8).map_err(|e| format!("{s}: {e} (an octal mode such as 660)"))
}

/// In TOML the mode is a string ("660") or an integer written in octal
/// (0o660).
fn mode_from_toml<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mode {
        Text(String),
        Number(u32),
    }
    match Option::<Mode>::deserialize(d)? {
        None => Ok(None),
        Some(Mode::Number(n)) => Ok(Some(n)),
        Some(Mode::Text(t)) => parse_mode(&t).map(Some).map_err(serde::de::Error::custom),
    }
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
        if let Some(v) = self.max_dma_bytes {
            o.max_dma_bytes = v;
        }
        if let Some(v) = self.listen_backlog {
            o.listen_backlog = v;
        }
        if let Some(v) = self.log_warnings_per_sec {
            o.log_warnings_per_sec = v;
        }
        if let Some(v) = self.socket_mode {
            o.socket_mode = v;
        }
        if !self.allow_uids.is_empty() {
            o.allow_uids.clone_from(&self.allow_uids);
        }
        if let Some(v) = self.seccomp {
            o.seccomp = v;
        }
        if self.no_seccomp {
            o.seccomp = crate::sandbox::SeccompMode::Off;
        }
        if let Some(v) = &self.user {
            o.user = Some(v.clone());
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
        check(&|o| o.max_dma_bytes = 0, "max_dma_bytes");
        check(&|o| o.listen_backlog = 0, "listen_backlog");
        check(&|o| o.socket_mode = 0o400, "socket_mode");
        check(&|o| o.socket_mode = 0o1600, "socket_mode");
        check(
            &|o| o.listen_backlog = MAX_LISTEN_BACKLOG + 1,
            "listen_backlog",
        );
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
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        assert!(parse_mode("9").is_err());
        let t: OptionOverrides =
            toml::from_str("socket_mode = \"660\"\nallow_uids = [0, 1000]").unwrap();
        assert_eq!(t.socket_mode, Some(0o660));
        assert_eq!(t.allow_uids, vec![0, 1000]);
        let t: OptionOverrides = toml::from_str("socket_mode = 0o640").unwrap();
        assert_eq!(t.socket_mode, Some(0o640));
        assert_eq!(parse_u64("8192"), Ok(8192));
        assert!(parse_u64("x").is_err());
    }
}
