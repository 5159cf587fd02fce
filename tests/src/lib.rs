//! Wire-level vfio-user test client for black-box tests.
