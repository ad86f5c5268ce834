//! The framed protocol between drydock and its helper, over the SSH exec
//! channel's stdin and stdout.
//!
//! A frame is `kind: u8, len: u32 LE, payload, crc32: u32 LE`, the CRC-32
//! covering kind, len and payload: a damaged frame is reported as damaged
//! rather than misread. Payload fields are little-endian integers, 32-byte
//! SHA-256 hashes, and length-prefixed byte strings.
//!
//! The helper speaks first (`Hello` with its protocol version); drydock
//! answers `Open` with its own. Either end refuses a version it does not
//! speak, before any read or write of the disk.

use std::io::{self, Read, Write};

mod error;
mod pages;

pub use error::ProtoError;
pub use pages::{
    SHORT_HASH, apply_pages, changed_pages, is_zero, page_hashes, sha256, short_page_hashes,
};

/// Bumped on any change of frames or their meaning.
pub const VERSION: u32 = 3;
/// Largest payload accepted: a block of 1 MiB that zstd could not shrink,
/// plus headers.
pub const MAX_PAYLOAD: usize = (1 << 20) + (1 << 16);
/// Unit of the manifest, of zero skipping and of a pull's frames.
pub const BLOCK: u64 = 1 << 20;
/// Unit of a push: only the 4 KiB pages that differ are sent.
pub const PAGE: u64 = 4096;
pub const PAGES_PER_BLOCK: usize = (BLOCK / PAGE) as usize;
/// Bytes of a page hash (a truncated SHA-256: it picks pages to send; the
/// data sent is checked with full hashes).
pub const PAGE_HASH: usize = 16;

pub type Hash = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Helper → drydock, first frame.
    Hello { version: u32 },
    /// drydock → helper: open the disk (for writing if `write`).
    Open {
        version: u32,
        device: String,
        write: bool,
    },
    /// Helper → drydock: the disk is open. `direct`: O_DIRECT is in use.
    Opened { size: u64, direct: bool },
    /// drydock → helper: send blocks [first, end), compressed at `level`.
    Read { first: u64, end: u64, level: i32 },
    /// Helper → drydock: `count` blocks of zeros from `first` (not sent).
    Zero { first: u64, count: u64 },
    /// Helper → drydock: block `index`, its SHA-256 as read, its bytes
    /// compressed with zstd.
    Block {
        index: u64,
        hash: Hash,
        data: Vec<u8>,
    },
    /// drydock → helper: hash blocks [first, end), with page hashes if
    /// `pages`.
    HashBlocks { first: u64, end: u64, pages: bool },
    /// Helper → drydock: the hash of block `index` (and of its 4 KiB pages,
    /// `PAGE_HASH` bytes each, when asked).
    BlockHash {
        index: u64,
        hash: Hash,
        pages: Vec<u8>,
    },
    /// drydock → helper: write `len` bytes at `offset` (zstd in `data`),
    /// whose SHA-256 is `hash`; the helper checks it before writing and
    /// reads it back after.
    Write {
        offset: u64,
        len: u32,
        hash: Hash,
        data: Vec<u8>,
    },
    /// Helper → drydock: the range was written, read back with the same
    /// hash.
    Written { offset: u64, len: u32 },
    /// drydock → helper: no more requests; sync and report.
    Finish,
    /// Helper → drydock, last frame: the disk is synced. `peak_rss_kib`
    /// is the helper's own VmHWM.
    Done {
        peak_rss_kib: u64,
        bytes_read: u64,
        bytes_written: u64,
    },
    /// Either way: what went wrong; the sender stops.
    Error { message: String },
    /// drydock → helper: rebuild pages from a package file (see
    /// `package`): fetch `path` from `host` at `addr`, and write the
    /// `pieces` (`package::encode_pieces`) whose hashes match. `more`: the
    /// next Rebuild carries more pieces of the same file. The helper works
    /// on it beside the Writes that follow and answers at RebuildWait.
    Rebuild {
        addr: String,
        host: String,
        path: String,
        /// `package::Format`: a .deb, or a file compressed whole.
        format: u8,
        pieces: Vec<u8>,
        more: bool,
    },
    /// drydock → helper: wait for every Rebuild and answer each with a
    /// Rebuilt, in order.
    RebuildWait,
    /// Helper → drydock: which pieces of one package file were written (a
    /// bit each, least significant first), the bytes fetched, and why it
    /// stopped early (empty if it did not).
    Rebuilt {
        written: Vec<u8>,
        fetched: u64,
        error: String,
    },
    /// drydock → helper: block `index`, sending only its pages whose hash
    /// differs from `old` (`short_page_hashes` of the block it had before,
    /// `SHORT_HASH` bytes a page), compressed at `level`. Answered with
    /// Pages, or with Zero if the block holds only zeros.
    ReadPages {
        index: u64,
        level: i32,
        old: Vec<u8>,
    },
    /// Helper → drydock: block `index`, its SHA-256 as read, which pages
    /// differ (`changed_pages`'s mask) and their bytes, compressed.
    Pages {
        index: u64,
        hash: Hash,
        mask: Vec<u8>,
        data: Vec<u8>,
    },
}

impl Msg {
    fn kind(&self) -> u8 {
        match self {
            Msg::Hello { .. } => 1,
            Msg::Open { .. } => 2,
            Msg::Opened { .. } => 3,
            Msg::Read { .. } => 4,
            Msg::Zero { .. } => 5,
            Msg::Block { .. } => 6,
            Msg::HashBlocks { .. } => 7,
            Msg::BlockHash { .. } => 8,
            Msg::Write { .. } => 9,
            Msg::Written { .. } => 10,
            Msg::Finish => 11,
            Msg::Done { .. } => 12,
            Msg::Error { .. } => 13,
            Msg::Rebuild { .. } => 14,
            Msg::RebuildWait => 15,
            Msg::Rebuilt { .. } => 16,
            Msg::ReadPages { .. } => 17,
            Msg::Pages { .. } => 18,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Open { .. } => "Open",
            Msg::Opened { .. } => "Opened",
            Msg::Read { .. } => "Read",
            Msg::Zero { .. } => "Zero",
            Msg::Block { .. } => "Block",
            Msg::HashBlocks { .. } => "HashBlocks",
            Msg::BlockHash { .. } => "BlockHash",
            Msg::Write { .. } => "Write",
            Msg::Written { .. } => "Written",
            Msg::Finish => "Finish",
            Msg::Done { .. } => "Done",
            Msg::Error { .. } => "Error",
            Msg::Rebuild { .. } => "Rebuild",
            Msg::RebuildWait => "RebuildWait",
            Msg::Rebuilt { .. } => "Rebuilt",
            Msg::ReadPages { .. } => "ReadPages",
            Msg::Pages { .. } => "Pages",
        }
    }

    /// Append this message's fields to P, in the order `decode` reads them.
    /// Over 80 lines: one arm per message kind (18 of them), each a few puts;
    /// split, the arms would no longer read side by side with `decode`'s.
    fn payload(&self, p: &mut Vec<u8>) {
        match self {
            Msg::Hello { version } => put_u32(p, *version),
            Msg::Open {
                version,
                device,
                write,
            } => {
                put_u32(p, *version);
                put_bytes(p, device.as_bytes());
                p.push(*write as u8);
            }
            Msg::Opened { size, direct } => {
                put_u64(p, *size);
                p.push(*direct as u8);
            }
            Msg::Read { first, end, level } => {
                put_u64(p, *first);
                put_u64(p, *end);
                put_u32(p, *level as u32);
            }
            Msg::Zero { first, count } => {
                put_u64(p, *first);
                put_u64(p, *count);
            }
            Msg::Block { index, hash, data } => {
                put_u64(p, *index);
                p.extend_from_slice(hash);
                put_bytes(p, data);
            }
            Msg::HashBlocks { first, end, pages } => {
                put_u64(p, *first);
                put_u64(p, *end);
                p.push(*pages as u8);
            }
            Msg::BlockHash { index, hash, pages } => {
                put_u64(p, *index);
                p.extend_from_slice(hash);
                put_bytes(p, pages);
            }
            Msg::Write {
                offset,
                len,
                hash,
                data,
            } => {
                put_u64(p, *offset);
                put_u32(p, *len);
                p.extend_from_slice(hash);
                put_bytes(p, data);
            }
            Msg::Written { offset, len } => {
                put_u64(p, *offset);
                put_u32(p, *len);
            }
            Msg::Finish => {}
            Msg::Done {
                peak_rss_kib,
                bytes_read,
                bytes_written,
            } => {
                put_u64(p, *peak_rss_kib);
                put_u64(p, *bytes_read);
                put_u64(p, *bytes_written);
            }
            Msg::Error { message } => put_bytes(p, message.as_bytes()),
            Msg::Rebuild {
                addr,
                host,
                path,
                format,
                pieces,
                more,
            } => {
                put_bytes(p, addr.as_bytes());
                put_bytes(p, host.as_bytes());
                put_bytes(p, path.as_bytes());
                p.push(*format);
                put_bytes(p, pieces);
                p.push(*more as u8);
            }
            Msg::RebuildWait => {}
            Msg::Rebuilt {
                written,
                fetched,
                error,
            } => {
                put_bytes(p, written);
                put_u64(p, *fetched);
                put_bytes(p, error.as_bytes());
            }
            Msg::ReadPages { index, level, old } => {
                put_u64(p, *index);
                put_u32(p, *level as u32);
                put_bytes(p, old);
            }
            Msg::Pages {
                index,
                hash,
                mask,
                data,
            } => {
                put_u64(p, *index);
                p.extend_from_slice(hash);
                put_bytes(p, mask);
                put_bytes(p, data);
            }
        }
    }

    /// The whole frame, checksum included.
    pub fn encode(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(64);
        f.push(self.kind());
        f.extend_from_slice(&[0; 4]);
        self.payload(&mut f);
        let len = (f.len() - 5) as u32;
        f[1..5].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&f);
        f.extend_from_slice(&crc.to_le_bytes());
        f
    }

    /// The message of KIND from PAYLOAD, every byte of it used; an unknown kind
    /// or bytes left over are errors.
    /// Over 80 lines: one arm per message kind (18 of them), its fields in the
    /// order `payload` writes them; split, the kind numbers and field orders
    /// would no longer read side by side with `kind` and `payload`.
    fn decode(kind: u8, payload: &[u8]) -> Result<Msg, ProtoError> {
        let mut c = Cursor { b: payload, kind };
        let m = match kind {
            1 => Msg::Hello { version: c.u32()? },
            2 => Msg::Open {
                version: c.u32()?,
                device: c.string()?,
                write: c.bool()?,
            },
            3 => Msg::Opened {
                size: c.u64()?,
                direct: c.bool()?,
            },
            4 => Msg::Read {
                first: c.u64()?,
                end: c.u64()?,
                level: c.u32()? as i32,
            },
            5 => Msg::Zero {
                first: c.u64()?,
                count: c.u64()?,
            },
            6 => Msg::Block {
                index: c.u64()?,
                hash: c.hash()?,
                data: c.bytes()?,
            },
            7 => Msg::HashBlocks {
                first: c.u64()?,
                end: c.u64()?,
                pages: c.bool()?,
            },
            8 => Msg::BlockHash {
                index: c.u64()?,
                hash: c.hash()?,
                pages: c.bytes()?,
            },
            9 => Msg::Write {
                offset: c.u64()?,
                len: c.u32()?,
                hash: c.hash()?,
                data: c.bytes()?,
            },
            10 => Msg::Written {
                offset: c.u64()?,
                len: c.u32()?,
            },
            11 => Msg::Finish,
            12 => Msg::Done {
                peak_rss_kib: c.u64()?,
                bytes_read: c.u64()?,
                bytes_written: c.u64()?,
            },
            13 => Msg::Error {
                message: c.string()?,
            },
            14 => Msg::Rebuild {
                addr: c.string()?,
                host: c.string()?,
                path: c.string()?,
                format: c.take(1)?[0],
                pieces: c.bytes()?,
                more: c.bool()?,
            },
            15 => Msg::RebuildWait,
            16 => Msg::Rebuilt {
                written: c.bytes()?,
                fetched: c.u64()?,
                error: c.string()?,
            },
            17 => Msg::ReadPages {
                index: c.u64()?,
                level: c.u32()? as i32,
                old: c.bytes()?,
            },
            18 => Msg::Pages {
                index: c.u64()?,
                hash: c.hash()?,
                mask: c.bytes()?,
                data: c.bytes()?,
            },
            k => return Err(ProtoError::UnknownKind(k)),
        };
        if !c.b.is_empty() {
            return Err(ProtoError::Malformed(kind, "bytes left over"));
        }
        Ok(m)
    }
}

fn put_u32(p: &mut Vec<u8>, v: u32) {
    p.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(p: &mut Vec<u8>, v: u64) {
    p.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(p: &mut Vec<u8>, b: &[u8]) {
    put_u32(p, b.len() as u32);
    p.extend_from_slice(b);
}

struct Cursor<'a> {
    b: &'a [u8],
    kind: u8,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], ProtoError> {
        if self.b.len() < n {
            return Err(ProtoError::Malformed(self.kind, "too short"));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn bool(&mut self) -> Result<bool, ProtoError> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtoError::Malformed(self.kind, "not a boolean")),
        }
    }
    fn hash(&mut self) -> Result<Hash, ProtoError> {
        Ok(self.take(32)?.try_into().expect("32"))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, ProtoError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, ProtoError> {
        String::from_utf8(self.bytes()?).map_err(|_| ProtoError::Malformed(self.kind, "not UTF-8"))
    }
}

/// Read one frame; `Ok(None)` on a clean end of stream between frames.
pub fn read_msg(r: &mut impl Read) -> Result<Option<Msg>, ProtoError> {
    let mut head = [0u8; 5];
    let got = read_full(r, &mut head)?;
    if got == 0 {
        return Ok(None);
    }
    if got < head.len() {
        return Err(ProtoError::Truncated { got, want: 5 });
    }
    let len = u32::from_le_bytes(head[1..5].try_into().expect("4")) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge(len));
    }
    let mut rest = vec![0u8; len + 4];
    let got = read_full(r, &mut rest)?;
    if got < rest.len() {
        return Err(ProtoError::Truncated {
            got: got + 5,
            want: len + 9,
        });
    }
    Frame::check(&head, &rest).map(Some)
}

struct Frame;

impl Frame {
    fn check(head: &[u8; 5], rest: &[u8]) -> Result<Msg, ProtoError> {
        let len = rest.len() - 4;
        let mut h = crc32fast::Hasher::new();
        h.update(head);
        h.update(&rest[..len]);
        let want = u32::from_le_bytes(rest[len..].try_into().expect("4"));
        if h.finalize() != want {
            return Err(ProtoError::Checksum { kind: head[0], len });
        }
        Msg::decode(head[0], &rest[..len])
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub fn write_msg(w: &mut impl Write, m: &Msg) -> io::Result<()> {
    w.write_all(&m.encode())
}

/// A `Block` frame written from borrowed data (the pull's hot path: no
/// copy of the compressed bytes into a message).
pub fn write_block(w: &mut impl Write, index: u64, hash: &Hash, data: &[u8]) -> io::Result<()> {
    let mut head = Vec::with_capacity(5 + 8 + 32 + 4);
    head.push(6);
    put_u32(&mut head, (8 + 32 + 4 + data.len()) as u32);
    put_u64(&mut head, index);
    head.extend_from_slice(hash);
    put_u32(&mut head, data.len() as u32);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    crc.update(data);
    w.write_all(&head)?;
    w.write_all(data)?;
    w.write_all(&crc.finalize().to_le_bytes())
}

/// Frames from a stream that arrives in pieces (the SSH channel's data
/// messages): feed bytes, take whole frames.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
}

impl Decoder {
    pub fn feed(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, if one has arrived.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, ProtoError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < 5 {
            self.compact();
            return Ok(None);
        }
        let len = u32::from_le_bytes(avail[1..5].try_into().expect("4")) as usize;
        if len > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge(len));
        }
        if avail.len() < len + 9 {
            self.compact();
            return Ok(None);
        }
        let head: [u8; 5] = avail[..5].try_into().expect("5");
        let m = Frame::check(&head, &avail[5..len + 9])?;
        self.pos += len + 9;
        Ok(Some(m))
    }

    /// Bytes of an unfinished frame (non-zero at the end of a stream means
    /// it was cut).
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }
}

#[cfg(test)]
mod tests;
