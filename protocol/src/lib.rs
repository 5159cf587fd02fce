//! The vfio-user wire format (placeholder until the protocol crate lands).
