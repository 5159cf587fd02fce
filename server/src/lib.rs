//! vdevd: a vfio-user device server.
//!
//! The library behind the `vdevd` binary: listening sockets, message
//! framing with descriptor passing, one session per client, dispatch of
//! vfio-user commands to a [`vdevd_devices::Device`], and the command line
//! and configuration file.

pub mod cli;
pub mod error;
pub mod kinds;
pub mod listener;
pub mod messenger;
pub mod options;
pub mod wire;

#[cfg(test)]
mod testutil;

pub use error::Error;
