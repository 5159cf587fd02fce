//! vdevd: a vfio-user device server.
//!
//! The library behind the `vdevd` binary: listening sockets, message
//! framing with descriptor passing, one session per client, dispatch of
//! vfio-user commands to a [`vdevd_devices::Device`], and the command line
//! and configuration file.
//!
//! Start a device server from code (tests do this) with
//! [`DeviceServer::serve`], which binds a socket, builds the device on a
//! fresh DMA address space and serves it on a thread of its own:
//!
//! ```no_run
//! use vdevd::DeviceServer;
//! use vdevd::kinds::{DeviceType, sample::{Sample, SampleOptions}};
//! use vdevd::options::ServerOptions;
//!
//! let server = DeviceServer::serve(
//!     "/tmp/sample.sock".as_ref(),
//!     ServerOptions::default(),
//!     |dma| Sample::build(SampleOptions::default(), dma),
//! )?;
//! // ... connect a vfio-user client to /tmp/sample.sock ...
//! server.stop()?; // disconnects the client, removes the socket
//! # Ok::<(), vdevd::Error>(())
//! ```
//!
//! Module map: [`listener`] (sockets), [`wire`] (framing, batching),
//! [`session`] (VERSION and dispatch), [`server`] (the device thread and
//! its epoll loop), [`messenger`] (DMA_READ/DMA_WRITE for worker threads),
//! [`migration`] (the migration state machine), [`error`] (the errno of
//! every error reply), [`options`], [`cli`], [`kinds`] (device types),
//! [`daemon`] (the process and its signals), [`vhost_user`] (virtio
//! devices over vhost-user), [`sandbox`] (the device threads' seccomp
//! filter), [`privileges`] (`--user`), [`record`] (recording client
//! traffic as fuzzing seeds).

pub mod aspace;
pub mod cli;
pub mod ctl;
pub mod daemon;
pub mod devset;
pub mod error;
pub mod kinds;
pub mod listener;
pub mod messenger;
pub mod migration;
pub mod options;
pub mod privileges;
pub mod record;
pub mod sandbox;
pub mod server;
pub mod session;
pub mod vhost_user;
pub mod wire;

#[cfg(test)]
mod testutil;

pub use error::Error;
pub use server::DeviceServer;
