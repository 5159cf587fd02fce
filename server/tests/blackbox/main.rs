//! Black-box tests of the `vdevd` binary: a real server process, driven
//! over its socket by the wire-level client of the `vdevd-tests` crate.
//!
//! They live in the `vdevd` package so that cargo builds the very binary
//! under test before running them and tells them its path
//! (`CARGO_BIN_EXE_vdevd`): a stale binary cannot be tested by mistake.
//! Running the server as a process of its own makes its descriptor count
//! (`/proc/PID/fd`) and any crash visible.
//!
//! * `negative`: the bad-input table (exact errno or clean close, server
//!   alive, next client served, no descriptor leaked).
//! * `commands`: every command's happy path against the sample device.
//! * `interop`: the `vfio_user` crate's client against the server.
//! * `nvme`: `vdevd nvme` enabled and queried like a host driver would.
//! * `garbage`: the NVMe controller and virtio-blk driven with garbage.

mod commands;
mod common;
mod garbage;
mod hostile;
mod interop;
mod limits;
mod negative;
mod nvme;

/// Not a test: the client that `negative` kills mid-message, run in a
/// child process (this binary re-executed with this test selected and
/// the socket in the environment). Does nothing when run normally.
#[test]
#[ignore = "helper process for the killed-client case"]
fn killed_client_child() {
    if let Some(socket) = std::env::var_os(negative::KILL_SOCKET_ENV) {
        negative::killed_client_child(std::path::Path::new(&socket));
    }
}

/// Not a test: a client of the kill loop in `hostile` that is killed with
/// SIGKILL, run in a child process. Does nothing when run normally.
#[test]
#[ignore = "helper process for the kill loop"]
fn sigkill_victim_child() {
    if let Some(socket) = std::env::var_os(hostile::VICTIM_SOCKET_ENV) {
        hostile::sigkill_victim_child(std::path::Path::new(&socket));
    }
}
