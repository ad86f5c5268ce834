//! What can go wrong reading a frame.

use std::fmt;
use std::io;

#[derive(Debug)]
pub enum ProtoError {
    Io(io::Error),
    /// The stream ended inside a frame (`got` of `want` bytes).
    Truncated {
        got: usize,
        want: usize,
    },
    Checksum {
        kind: u8,
        len: usize,
    },
    TooLarge(usize),
    UnknownKind(u8),
    Malformed(u8, &'static str),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Io(e) => write!(f, "{e}"),
            ProtoError::Truncated { got, want } => write!(
                f,
                "the stream ended inside a frame ({got} of {want} bytes): the other end stopped or the connection broke"
            ),
            ProtoError::Checksum { kind, len } => write!(
                f,
                "a frame arrived damaged (kind {kind}, {len} bytes, checksum mismatch)"
            ),
            ProtoError::TooLarge(n) => write!(
                f,
                "a frame claims {n} bytes, more than the protocol allows: the stream is not drydock's or is damaged"
            ),
            ProtoError::UnknownKind(k) => write!(f, "a frame of unknown kind {k}"),
            ProtoError::Malformed(k, why) => write!(f, "a malformed frame of kind {k}: {why}"),
        }
    }
}

impl std::error::Error for ProtoError {}

impl From<io::Error> for ProtoError {
    fn from(e: io::Error) -> Self {
        ProtoError::Io(e)
    }
}
