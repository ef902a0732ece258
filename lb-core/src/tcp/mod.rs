//! TCP forwarding on a worker, written once for both engines: accepting
//! ([`accept`]), the life of a connection ([`connection`]) and the copy
//! loop ([`copy`]).

mod accept;
mod connection;
mod copy;

pub use accept::{accept_loop, adopt};

/// Connect attempts per client connection (each on a different backend).
pub const MAX_CONNECT_ATTEMPTS: usize = 3;
