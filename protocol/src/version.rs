//! VFIO_USER_VERSION: protocol version and the capabilities JSON.
//!
//! The same layout serves the client's proposal and the server's reply:
//! major (u16), minor (u16), then optional NUL-terminated UTF-8 JSON of the
//! form `{"capabilities": {...}}`.
//!
//! This module reports what the peer sent, typed, with the specification's
//! defaults for absent keys. Which values are acceptable (range policy) is
//! the server's decision. Unknown keys are not errors; they are listed in
//! [`Capabilities::unknown_keys`] so the receiver can log them.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::Error;
use crate::wire::{self, RawVersion};

/// The protocol major version this crate speaks.
pub const VFIO_USER_MAJOR: u16 = 0;
/// The highest protocol minor version this crate speaks.
pub const VFIO_USER_MINOR: u16 = 0;

/// `max_msg_fds` when absent.
pub const DEFAULT_MAX_MSG_FDS: u64 = 1;
/// `max_data_xfer_size` when absent (1 MiB).
pub const DEFAULT_MAX_DATA_XFER_SIZE: u64 = 1 << 20;
/// `max_dma_maps` when absent.
pub const DEFAULT_MAX_DMA_MAPS: u64 = 65535;
/// `pgsizes` when absent (4 KiB pages only).
pub const DEFAULT_PGSIZES: u64 = 4096;
/// `migration.pgsize` when absent.
pub const DEFAULT_MIGRATION_PGSIZE: u64 = 4096;
/// `migration.max_bitmap_size` when absent (256 MiB).
pub const DEFAULT_MAX_BITMAP_SIZE: u64 = 256 << 20;

/// The `migration` capability object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MigrationCaps {
    /// Page size of dirty bitmaps (`pgsize`).
    pub pgsize: u64,
    /// Largest dirty bitmap the sender handles (`max_bitmap_size`).
    pub max_bitmap_size: u64,
}

impl Default for MigrationCaps {
    fn default() -> Self {
        MigrationCaps {
            pgsize: DEFAULT_MIGRATION_PGSIZE,
            max_bitmap_size: DEFAULT_MAX_BITMAP_SIZE,
        }
    }
}

/// The `twin_socket` capability object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TwinSocket {
    /// The sender supports (client) or enabled (server) twin-socket mode.
    pub supported: bool,
    /// Index, in the reply's file descriptors, of the server-to-client
    /// socket (server reply only).
    pub fd_index: Option<u64>,
}

/// The capabilities a peer announced, with defaults for absent keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// Most file descriptors the sender accepts in one message.
    pub max_msg_fds: u64,
    /// Largest `count` the sender accepts in a data transfer message.
    pub max_data_xfer_size: u64,
    /// Most DMA mappings the sender handles at once.
    pub max_dma_maps: u64,
    /// Page sizes supported for DMA mappings, or'ed together.
    pub pgsizes: u64,
    /// Migration parameters, if the key was present.
    pub migration: Option<MigrationCaps>,
    /// The sender supports VFIO_USER_REGION_WRITE_MULTI.
    pub write_multiple: bool,
    /// Twin-socket parameters, if the key was present.
    pub twin_socket: Option<TwinSocket>,
    /// Keys this crate does not know, as dotted paths (e.g.
    /// `capabilities.foo`), for logging. Never encoded.
    pub unknown_keys: Vec<String>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            max_msg_fds: DEFAULT_MAX_MSG_FDS,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            pgsizes: DEFAULT_PGSIZES,
            migration: None,
            write_multiple: false,
            twin_socket: None,
            unknown_keys: Vec::new(),
        }
    }
}

impl Capabilities {
    /// Parse the JSON text (without its NUL).
    pub fn from_json(text: &str) -> Result<Capabilities, Error> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| Error::Json(format!("invalid JSON: {e}")))?;
        let Value::Object(top) = value else {
            return Err(Error::Json("not a JSON object".into()));
        };
        let mut caps = Capabilities::default();
        for (key, value) in &top {
            if key == "capabilities" {
                caps.read_capabilities(object(value, "capabilities")?)?;
            } else {
                caps.unknown_keys.push(key.clone());
            }
        }
        Ok(caps)
    }

    fn read_capabilities(&mut self, map: &Map<String, Value>) -> Result<(), Error> {
        for (key, value) in map {
            match key.as_str() {
                "max_msg_fds" => self.max_msg_fds = number(value, "capabilities.max_msg_fds")?,
                "max_data_xfer_size" => {
                    self.max_data_xfer_size = number(value, "capabilities.max_data_xfer_size")?
                }
                "max_dma_maps" => self.max_dma_maps = number(value, "capabilities.max_dma_maps")?,
                "pgsizes" => self.pgsizes = number(value, "capabilities.pgsizes")?,
                "write_multiple" => {
                    self.write_multiple = boolean(value, "capabilities.write_multiple")?
                }
                "migration" => {
                    let mut migration = MigrationCaps::default();
                    for (key, value) in object(value, "capabilities.migration")? {
                        match key.as_str() {
                            "pgsize" => {
                                migration.pgsize = number(value, "capabilities.migration.pgsize")?
                            }
                            "max_bitmap_size" => {
                                migration.max_bitmap_size =
                                    number(value, "capabilities.migration.max_bitmap_size")?
                            }
                            _ => self
                                .unknown_keys
                                .push(format!("capabilities.migration.{key}")),
                        }
                    }
                    self.migration = Some(migration);
                }
                "twin_socket" => {
                    let mut twin = TwinSocket::default();
                    for (key, value) in object(value, "capabilities.twin_socket")? {
                        match key.as_str() {
                            "supported" => {
                                twin.supported =
                                    boolean(value, "capabilities.twin_socket.supported")?
                            }
                            "fd_index" => {
                                twin.fd_index =
                                    Some(number(value, "capabilities.twin_socket.fd_index")?)
                            }
                            _ => self
                                .unknown_keys
                                .push(format!("capabilities.twin_socket.{key}")),
                        }
                    }
                    self.twin_socket = Some(twin);
                }
                _ => self.unknown_keys.push(format!("capabilities.{key}")),
            }
        }
        Ok(())
    }

    /// The JSON text, compact, without NUL: `{"capabilities":{...}}`.
    /// Every known capability is written (absent optional objects are
    /// left out); [`Capabilities::unknown_keys`] is not.
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(160);
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "{{\"capabilities\":{{\"max_msg_fds\":{},\"max_data_xfer_size\":{},\
             \"pgsizes\":{},\"max_dma_maps\":{}",
            self.max_msg_fds, self.max_data_xfer_size, self.pgsizes, self.max_dma_maps
        );
        if let Some(migration) = &self.migration {
            let _ = write!(
                s,
                ",\"migration\":{{\"pgsize\":{},\"max_bitmap_size\":{}}}",
                migration.pgsize, migration.max_bitmap_size
            );
        }
        if let Some(twin) = &self.twin_socket {
            let _ = write!(s, ",\"twin_socket\":{{\"supported\":{}", twin.supported);
            if let Some(index) = twin.fd_index {
                let _ = write!(s, ",\"fd_index\":{index}");
            }
            s.push('}');
        }
        let _ = write!(s, ",\"write_multiple\":{}}}}}", self.write_multiple);
        s
    }
}

fn object<'a>(value: &'a Value, key: &str) -> Result<&'a Map<String, Value>, Error> {
    value.as_object().ok_or_else(|| Error::Capability {
        key: key.into(),
        expected: "an object",
    })
}

fn number(value: &Value, key: &str) -> Result<u64, Error> {
    value.as_u64().ok_or_else(|| Error::Capability {
        key: key.into(),
        expected: "an integer from 0 to 2^64-1",
    })
}

fn boolean(value: &Value, key: &str) -> Result<bool, Error> {
    value.as_bool().ok_or_else(|| Error::Capability {
        key: key.into(),
        expected: "a boolean",
    })
}

/// A VFIO_USER_VERSION message body (request or reply).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// Capabilities: those sent, defaults for the rest (all defaults when
    /// the message carries no JSON).
    pub capabilities: Capabilities,
}

impl Version {
    /// Parse a VERSION body. The JSON, if present, must be UTF-8, end with
    /// the message's only NUL byte, and be an object.
    pub fn parse(body: &[u8]) -> Result<Version, Error> {
        let (raw, data) = wire::read::<RawVersion>(body, "VERSION")?;
        let capabilities = if data.is_empty() {
            Capabilities::default()
        } else {
            let Some((&0, text)) = data.split_last() else {
                return Err(Error::Json("missing terminating NUL".into()));
            };
            if text.contains(&0) {
                return Err(Error::Json("NUL byte inside the JSON text".into()));
            }
            let text =
                std::str::from_utf8(text).map_err(|e| Error::Json(format!("not UTF-8: {e}")))?;
            Capabilities::from_json(text)?
        };
        Ok(Version {
            major: raw.major,
            minor: raw.minor,
            capabilities,
        })
    }

    /// Append the body: versions, JSON, NUL.
    ///
    /// QEMU receives the server's reply into the buffer of its own request,
    /// so a reply must not be longer than the client's VERSION message; the
    /// compact JSON written here is about 120 bytes, QEMU's about 200.
    pub fn encode(&self, out: &mut Vec<u8>) {
        wire::put(
            out,
            &RawVersion {
                major: self.major,
                minor: self.minor,
            },
        );
        out.extend_from_slice(self.capabilities.to_json().as_bytes());
        out.push(0);
    }
}

#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    /// The JSON QEMU 11.1's client sends (see DESIGN.md).
    const QEMU_JSON: &str = "{\"capabilities\":{\"pgsizes\":4096,\"max_msg_fds\":16,\
        \"max_dma_maps\":65535,\"max_data_xfer_size\":1048576,\"migration\":\
        {\"max_bitmap_size\":268435456,\"pgsize\":4096},\"write_multiple\":true}}";

    /// The JSON the `vfio_user` crate's client sends (serde of its
    /// `CapabilitiesData` default on a 4 KiB-page host).
    const VFIO_USER_CRATE_JSON: &str = "{\"capabilities\":{\"max_msg_fds\":1,\
        \"max_data_xfer_size\":1048576,\"migration\":{\"pgsize\":4096}}}";

    fn body(major: u16, minor: u16, json: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&major.to_le_bytes());
        b.extend_from_slice(&minor.to_le_bytes());
        b.extend_from_slice(json);
        b
    }

    fn with_nul(json: &str) -> Vec<u8> {
        let mut v = json.as_bytes().to_vec();
        v.push(0);
        v
    }

    #[test]
    fn parses_qemus_proposal() {
        let mut b = vec![
            0x00, 0x00, // major = 0
            0x00, 0x00, // minor = 0
        ];
        b.extend_from_slice(&with_nul(QEMU_JSON));
        assert_eq!(b.len(), 183);
        let v = Version::parse(&b).unwrap();
        assert_eq!((v.major, v.minor), (0, 0));
        assert_eq!(
            v.capabilities,
            Capabilities {
                max_msg_fds: 16,
                max_data_xfer_size: 1 << 20,
                max_dma_maps: 65535,
                pgsizes: 4096,
                migration: Some(MigrationCaps {
                    pgsize: 4096,
                    max_bitmap_size: 256 << 20
                }),
                write_multiple: true,
                twin_socket: None,
                unknown_keys: vec![],
            }
        );
    }

    #[test]
    fn parses_the_vfio_user_crates_proposal() {
        let b = body(0, 1, &with_nul(VFIO_USER_CRATE_JSON));
        let v = Version::parse(&b).unwrap();
        assert_eq!((v.major, v.minor), (0, 1));
        let c = v.capabilities;
        assert_eq!(c.max_msg_fds, 1);
        assert_eq!(c.max_data_xfer_size, 1 << 20);
        // Absent keys take the specification's defaults.
        assert_eq!(c.max_dma_maps, DEFAULT_MAX_DMA_MAPS);
        assert_eq!(c.pgsizes, DEFAULT_PGSIZES);
        assert!(!c.write_multiple);
        assert_eq!(
            c.migration,
            Some(MigrationCaps {
                pgsize: 4096,
                max_bitmap_size: DEFAULT_MAX_BITMAP_SIZE
            })
        );
    }

    #[test]
    fn no_json_means_defaults() {
        let v = Version::parse(&[0x00, 0x00, 0x00, 0x00]).unwrap();
        assert_eq!(v.capabilities, Capabilities::default());
        assert_eq!(v.capabilities.max_msg_fds, 1);
        assert_eq!(v.capabilities.max_data_xfer_size, 1048576);
        assert_eq!(v.capabilities.max_dma_maps, 65535);
        assert_eq!(v.capabilities.pgsizes, 4096);
        assert_eq!(v.capabilities.migration, None);
        // An object without "capabilities" also means defaults.
        let v = Version::parse(&body(0, 0, b"{}\0")).unwrap();
        assert_eq!(v.capabilities, Capabilities::default());
    }

    #[test]
    fn encodes_the_server_reply() {
        let v = Version {
            major: 0,
            minor: 0,
            capabilities: Capabilities {
                max_msg_fds: 16,
                write_multiple: true,
                ..Capabilities::default()
            },
        };
        let mut out = Vec::new();
        v.encode(&mut out);
        let json = "{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576,\
                    \"pgsizes\":4096,\"max_dma_maps\":65535,\"write_multiple\":true}}";
        assert_eq!(out, body(0, 0, &with_nul(json)));
        // QEMU reads the reply into the buffer of its 183-byte request body.
        assert!(out.len() <= 183, "{} bytes", out.len());
        assert_eq!(Version::parse(&out).unwrap(), v);
    }

    #[test]
    fn encodes_optional_objects() {
        let caps = Capabilities {
            migration: Some(MigrationCaps::default()),
            twin_socket: Some(TwinSocket {
                supported: true,
                fd_index: Some(0),
            }),
            ..Capabilities::default()
        };
        assert_eq!(
            caps.to_json(),
            "{\"capabilities\":{\"max_msg_fds\":1,\"max_data_xfer_size\":1048576,\
             \"pgsizes\":4096,\"max_dma_maps\":65535,\
             \"migration\":{\"pgsize\":4096,\"max_bitmap_size\":268435456},\
             \"twin_socket\":{\"supported\":true,\"fd_index\":0},\"write_multiple\":false}}"
        );
        assert_eq!(Capabilities::from_json(&caps.to_json()).unwrap(), caps);
        let no_index = Capabilities {
            twin_socket: Some(TwinSocket::default()),
            ..Capabilities::default()
        };
        assert!(
            no_index
                .to_json()
                .contains("\"twin_socket\":{\"supported\":false}")
        );
        assert_eq!(
            Capabilities::from_json(&no_index.to_json()).unwrap(),
            no_index
        );
    }

    #[test]
    fn parses_twin_socket() {
        let c = Capabilities::from_json(
            "{\"capabilities\":{\"twin_socket\":{\"supported\":true,\"fd_index\":1}}}",
        )
        .unwrap();
        assert_eq!(
            c.twin_socket,
            Some(TwinSocket {
                supported: true,
                fd_index: Some(1)
            })
        );
        let c = Capabilities::from_json("{\"capabilities\":{\"twin_socket\":{}}}").unwrap();
        assert_eq!(c.twin_socket, Some(TwinSocket::default()));
    }

    #[test]
    fn reports_unknown_keys() {
        let c = Capabilities::from_json(
            "{\"capabilities\":{\"max_msg_fds\":8,\"shiny\":[1,2],\
             \"migration\":{\"pgsize\":8192,\"extra\":null},\
             \"twin_socket\":{\"other\":1}},\"top\":\"x\"}",
        )
        .unwrap();
        assert_eq!(c.max_msg_fds, 8);
        assert_eq!(c.migration.unwrap().pgsize, 8192);
        let mut keys = c.unknown_keys.clone();
        keys.sort();
        assert_eq!(
            keys,
            [
                "capabilities.migration.extra",
                "capabilities.shiny",
                "capabilities.twin_socket.other",
                "top"
            ]
        );
    }

    #[test]
    fn rejects_broken_framing() {
        // Too short for major/minor.
        assert_eq!(
            Version::parse(&[0x00, 0x00, 0x00]),
            Err(Error::Short {
                what: "VERSION",
                need: 4,
                got: 3
            })
        );
        // JSON without its NUL.
        assert_eq!(
            Version::parse(&body(0, 0, b"{}")),
            Err(Error::Json("missing terminating NUL".into()))
        );
        // A NUL inside, or data after the NUL.
        assert_eq!(
            Version::parse(&body(0, 0, b"{}\0{}\0")),
            Err(Error::Json("NUL byte inside the JSON text".into()))
        );
        assert!(matches!(
            Version::parse(&body(0, 0, b"{}\0x")),
            Err(Error::Json(_))
        ));
        // Invalid UTF-8.
        let err = Version::parse(&body(0, 0, b"{\"\xff\":1}\0")).unwrap_err();
        assert!(
            matches!(&err, Error::Json(r) if r.starts_with("not UTF-8")),
            "{err}"
        );
        // Only a NUL: empty JSON text.
        let err = Version::parse(&body(0, 0, b"\0")).unwrap_err();
        assert!(
            matches!(&err, Error::Json(r) if r.starts_with("invalid JSON")),
            "{err}"
        );
    }

    #[test]
    fn rejects_broken_json() {
        for text in ["{", "{\"capabilities\":}", "nul", "{\"a\":1,}", "{} {}"] {
            let err = Capabilities::from_json(text).unwrap_err();
            assert!(
                matches!(&err, Error::Json(r) if r.starts_with("invalid JSON")),
                "{text}: {err}"
            );
        }
        for text in ["[]", "1", "\"capabilities\"", "null", "true"] {
            assert_eq!(
                Capabilities::from_json(text),
                Err(Error::Json("not a JSON object".into())),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_wrong_types_and_ranges() {
        let cases: &[(&str, &str, &str)] = &[
            ("{\"capabilities\":[]}", "capabilities", "an object"),
            (
                "{\"capabilities\":{\"max_msg_fds\":-1}}",
                "capabilities.max_msg_fds",
                "an integer from 0 to 2^64-1",
            ),
            (
                "{\"capabilities\":{\"max_msg_fds\":1.5}}",
                "capabilities.max_msg_fds",
                "an integer from 0 to 2^64-1",
            ),
            (
                "{\"capabilities\":{\"max_msg_fds\":\"16\"}}",
                "capabilities.max_msg_fds",
                "an integer from 0 to 2^64-1",
            ),
            (
                "{\"capabilities\":{\"max_data_xfer_size\":18446744073709551616}}",
                "capabilities.max_data_xfer_size",
                "an integer from 0 to 2^64-1",
            ),
            (
                "{\"capabilities\":{\"max_dma_maps\":1e3}}",
                "capabilities.max_dma_maps",
                "an integer from 0 to 2^64-1",
            ),
            (
                "{\"capabilities\":{\"pgsizes\":null}}",
                "capabilities.pgsizes",
                "an integer from 0 to 2^64-1",
            ),
            (
                "{\"capabilities\":{\"write_multiple\":1}}",
                "capabilities.write_multiple",
                "a boolean",
            ),
            (
                "{\"capabilities\":{\"migration\":4096}}",
                "capabilities.migration",
                "an object",
            ),
            (
                "{\"capabilities\":{\"migration\":{\"pgsize\":-4096}}}",
                "capabilities.migration.pgsize",
                "an integer from 0 to 2^64-1",
            ),
            (
                "{\"capabilities\":{\"migration\":{\"max_bitmap_size\":true}}}",
                "capabilities.migration.max_bitmap_size",
                "an integer from 0 to 2^64-1",
            ),
            (
                "{\"capabilities\":{\"twin_socket\":true}}",
                "capabilities.twin_socket",
                "an object",
            ),
            (
                "{\"capabilities\":{\"twin_socket\":{\"supported\":\"yes\"}}}",
                "capabilities.twin_socket.supported",
                "a boolean",
            ),
            (
                "{\"capabilities\":{\"twin_socket\":{\"fd_index\":-1}}}",
                "capabilities.twin_socket.fd_index",
                "an integer from 0 to 2^64-1",
            ),
        ];
        for (text, key, expected) in cases {
            assert_eq!(
                Capabilities::from_json(text),
                Err(Error::Capability {
                    key: (*key).into(),
                    expected
                }),
                "{text}"
            );
        }
    }

    #[test]
    fn accepts_the_full_u64_range() {
        let c = Capabilities::from_json(
            "{\"capabilities\":{\"max_data_xfer_size\":18446744073709551615,\"max_msg_fds\":0}}",
        )
        .unwrap();
        assert_eq!(c.max_data_xfer_size, u64::MAX);
        assert_eq!(c.max_msg_fds, 0);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let text = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            Capabilities::from_json(&text),
            Err(Error::Json(_))
        ));
    }
}
