//! drydock's helper: a small static executable that drydock copies to the
//! VPS's tmpfs, runs over SSH, and removes afterwards. It reads and writes
//! the disk itself (O_DIRECT), hashes every block where it is read and
//! checks every block where it is written, and speaks a framed, versioned
//! protocol ([`proto`]) on stdin and stdout. The library half is shared
//! with drydock, which speaks the other side.

pub mod carry;
pub mod package;
pub mod proto;
pub mod server;
