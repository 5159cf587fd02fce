//! vdevd server library (session, sockets, dispatch).
