//! Pages rebuilt from package files (issue 18): most of what a release
//! upgrade writes is the files of the packages it installed. The VPS can
//! fetch those package files from its own mirror far faster than a home
//! uplink carries the pages, so drydock names, for each package file, the
//! pages of the disk that a 4 KiB-aligned piece of its data archive
//! rebuilds; the helper fetches the file, decompresses its data archive as
//! a stream and writes a piece only when its SHA-256 is the one drydock
//! sent (the hash of the page in the upgraded image). A page that is not
//! rebuilt, for any reason, is sent as any other.
//!
//! The helper does not parse the tar archive: drydock sends each piece's
//! offset in the decompressed data archive (a file's data starts at a
//! 512-byte boundary there), its length (a file's last piece is shorter,
//! padded with zeros as the file system holds it) and the disk offset.
//!
//! The `.deb` container is parsed here (an `ar` archive: an 8-byte magic
//! and 60-byte member headers, documented in deb(5)); the `ar` crate would
//! add a dependency for 30 lines. xz, zstd and gzip are the data archive
//! compressions dpkg writes (deb(5)); each is a well-kept crate.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::proto::{Hash, PAGE};

/// One page to rebuild: `len` bytes at `stream_offset` of the decompressed
/// data archive, padded with zeros to a page, whose SHA-256 is `hash`,
/// written at `disk_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub stream_offset: u64,
    pub len: u32,
    pub hash: Hash,
    pub disk_offset: u64,
}

/// Bytes of an encoded piece.
pub const PIECE_BYTES: usize = 8 + 4 + 32 + 8;

/// Most pieces in one Rebuild frame (its payload stays under the
/// protocol's limit); a file with more is sent in several frames.
pub const PIECES_PER_FRAME: usize = 16_000;

pub fn encode_pieces(pieces: &[Piece]) -> Vec<u8> {
    let mut v = Vec::with_capacity(pieces.len() * PIECE_BYTES);
    for p in pieces {
        v.extend_from_slice(&p.stream_offset.to_le_bytes());
        v.extend_from_slice(&p.len.to_le_bytes());
        v.extend_from_slice(&p.hash);
        v.extend_from_slice(&p.disk_offset.to_le_bytes());
    }
    v
}

pub fn decode_pieces(b: &[u8]) -> Result<Vec<Piece>, String> {
    if !b.len().is_multiple_of(PIECE_BYTES) {
        return Err(format!(
            "a Rebuild's pieces are {} bytes, not a multiple of {PIECE_BYTES}",
            b.len()
        ));
    }
    Ok(b.chunks_exact(PIECE_BYTES)
        .map(|c| Piece {
            stream_offset: u64::from_le_bytes(c[0..8].try_into().expect("8")),
            len: u32::from_le_bytes(c[8..12].try_into().expect("4")),
            hash: c[12..44].try_into().expect("32"),
            disk_offset: u64::from_le_bytes(c[44..52].try_into().expect("8")),
        })
        .collect())
}

/// The most memory a data archive's decompression may take: xz's default
/// preset (-6, dpkg-deb's) decodes with an 8 MiB dictionary in about
/// 9 MiB, zstd windows up to 8 MiB. A package compressed with a larger
/// dictionary is not read (its pages are sent): the helper's memory is
/// locked on a VPS that may have 512 MiB.
pub const DECODER_MEMORY: u64 = 10 << 20;

/// The decompressed data archive (`data.tar.*`) of the Debian package read
/// from R.
pub fn data_archive<'a, R: Read + 'a>(mut r: R) -> Result<Box<dyn Read + 'a>, String> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(|e| format!("not a Debian package (no ar header): {e}"))?;
    if &magic != b"!<arch>\n" {
        return Err("not a Debian package (no ar magic)".into());
    }
    loop {
        let mut h = [0u8; 60];
        r.read_exact(&mut h)
            .map_err(|e| format!("the package has no data archive: {e}"))?;
        if &h[58..60] != b"`\n" {
            return Err("the package's ar member header is damaged".into());
        }
        let name = String::from_utf8_lossy(&h[0..16]).trim_end().to_string();
        let name = name.trim_end_matches('/');
        let size: u64 = String::from_utf8_lossy(&h[48..58])
            .trim()
            .parse()
            .map_err(|_| "the package's ar member size is not a number".to_string())?;
        if let Some(kind) = name.strip_prefix("data.tar") {
            return decoder(kind, r.take(size));
        }
        // Members are padded to an even length.
        let skip = size + (size & 1);
        let n = io::copy(&mut (&mut r).take(skip), &mut io::sink())
            .map_err(|e| format!("cannot read the package: {e}"))?;
        if n != skip {
            return Err("the package ended inside a member".into());
        }
    }
}

/// How a file to rebuild pages from is packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A Debian package: the pages are in its data archive.
    Deb = 0,
    /// A file compressed whole (apt's index files, fetched by-hash): the
    /// pages are of the decompressed file.
    Xz = 1,
    Gzip = 2,
    Zstd = 3,
    Plain = 4,
}

impl Format {
    pub fn from_u8(v: u8) -> Option<Format> {
        [
            Format::Deb,
            Format::Xz,
            Format::Gzip,
            Format::Zstd,
            Format::Plain,
        ]
        .into_iter()
        .find(|f| *f as u8 == v)
    }

    /// A file compressed whole, told by its first bytes.
    pub fn sniff(head: &[u8]) -> Format {
        if head.starts_with(b"\xfd7zXZ\0") {
            Format::Xz
        } else if head.starts_with(b"\x1f\x8b") {
            Format::Gzip
        } else if head.starts_with(b"\x28\xb5\x2f\xfd") {
            Format::Zstd
        } else {
            Format::Plain
        }
    }
}

/// The stream whose pieces are named: a package's data archive, or a
/// file compressed whole, decompressed.
pub fn content<'a, R: Read + 'a>(r: R, format: Format) -> Result<Box<dyn Read + 'a>, String> {
    match format {
        Format::Deb => data_archive(r),
        Format::Xz => decoder(".xz", r),
        Format::Gzip => decoder(".gz", r),
        Format::Zstd => decoder(".zst", r),
        Format::Plain => decoder("", r),
    }
}

/// BODY decompressed as a file named with the extension KIND says (the
/// `.deb` names its data archive so).
fn decoder<'a, R: Read + 'a>(kind: &str, body: R) -> Result<Box<dyn Read + 'a>, String> {
    Ok(match kind {
        ".xz" => {
            let s = liblzma::stream::Stream::new_stream_decoder(
                DECODER_MEMORY,
                liblzma::stream::CONCATENATED,
            )
            .map_err(|e| format!("xz: {e}"))?;
            Box::new(liblzma::read::XzDecoder::new_stream(body, s))
        }
        ".zst" => {
            let mut d = zstd::stream::read::Decoder::new(body).map_err(|e| format!("zstd: {e}"))?;
            d.window_log_max(23).map_err(|e| format!("zstd: {e}"))?;
            Box::new(d)
        }
        ".gz" => Box::new(flate2::read::GzDecoder::new(body)),
        "" => Box::new(body),
        k => {
            return Err(format!(
                "data.tar{k}: a compression this helper does not read"
            ));
        }
    })
}

/// What one rebuild did: for each piece whether its page was written, and
/// why it stopped early (the pages after that are not written).
#[derive(Debug, Default)]
pub struct Outcome {
    pub written: Vec<bool>,
    pub error: Option<String>,
}

/// Read STREAM (a decompressed data archive) up to the last of PIECES
/// (sorted by `stream_offset`) and give each piece's page, padded with
/// zeros, to WRITE when its SHA-256 is the piece's. A page whose hash
/// differs is not written (the package is not the one drydock saw).
/// WRITE's own error ends everything (the disk failed).
pub fn extract(
    stream: &mut dyn Read,
    pieces: &[Piece],
    mut write: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<Outcome, String> {
    let mut out = Outcome {
        written: vec![false; pieces.len()],
        error: None,
    };
    let mut pos = 0u64;
    let mut page = vec![0u8; PAGE as usize];
    // The page last read and the offset it was read at: pieces that share
    // an offset (the same content at several places) read it once.
    let mut have: Option<(u64, u32)> = None;
    for (i, p) in pieces.iter().enumerate() {
        if p.len as u64 > PAGE || p.len == 0 {
            out.error = Some(format!("a piece of {} bytes", p.len));
            return Ok(out);
        }
        if have != Some((p.stream_offset, p.len)) {
            if p.stream_offset < pos {
                out.error = Some("the pieces are not in the archive's order".into());
                return Ok(out);
            }
            let skip = p.stream_offset - pos;
            match io::copy(&mut (&mut *stream).take(skip), &mut io::sink()) {
                Ok(n) if n == skip => {}
                Ok(_) => {
                    out.error = Some("the package's data archive ended early".into());
                    return Ok(out);
                }
                Err(e) => {
                    out.error = Some(format!("cannot read the package: {e}"));
                    return Ok(out);
                }
            }
            page.fill(0);
            if let Err(e) = stream.read_exact(&mut page[..p.len as usize]) {
                out.error = Some(format!("cannot read the package: {e}"));
                return Ok(out);
            }
            pos = p.stream_offset + p.len as u64;
            have = Some((p.stream_offset, p.len));
        }
        if crate::proto::sha256(&page) == p.hash {
            write(p.disk_offset, &page)?;
            out.written[i] = true;
        }
    }
    Ok(out)
}

/// Where a package file is fetched from: an address the VPS resolved, the
/// HTTP host and the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub addr: String,
    pub host: String,
    pub path: String,
    pub format: Format,
}

/// Seconds a connection or a read may take before the fetch gives up.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Where the host's own apt put package files it fetched over HTTPS for
/// a push (drydock's `push::https`): a source whose address is a file in
/// it is read from there.
pub const FETCHED_DIR: &str = "/run/drydock-packages/";

/// The body of an HTTP/1.1 GET of SRC: a plain HTTP mirror, as apt's
/// `http://` sources are (the package is checked page by page, as apt
/// checks it against its signed index). A redirect, a status other than
/// 200 or a connection that stalls for 30 s is an error. An address in
/// FETCHED_DIR is that file (a plain name in it, nothing else).
pub fn get(src: &Source) -> Result<Box<dyn Read + Send>, String> {
    if let Some(name) = src.addr.strip_prefix(FETCHED_DIR) {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(format!("{}: not a file drydock fetched", src.addr));
        }
        let f = std::fs::File::open(&src.addr)
            .map_err(|e| format!("cannot open {} ({}{}): {e}", src.addr, src.host, src.path))?;
        return Ok(Box::new(BufReader::with_capacity(1 << 16, f)));
    }
    let addr: SocketAddr = src
        .addr
        .parse()
        .map_err(|_| format!("{}: not an address", src.addr))?;
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|e| format!("cannot connect to {} ({addr}): {e}", src.host))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|_| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| format!("{}: {e}", src.host))?;
    let mut w = &stream;
    write!(
        w,
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: drydock-helper\r\nConnection: close\r\n\r\n",
        src.path, src.host
    )
    .map_err(|e| format!("{}: {e}", src.host))?;
    let mut r = BufReader::with_capacity(1 << 16, stream);
    // The head, line by line, up to 64 KiB.
    let mut head = Vec::new();
    loop {
        let n = r
            .read_until(b'\n', &mut head)
            .map_err(|e| format!("{}: {e}", src.host))?;
        if n == 0 || head.len() > 1 << 16 {
            return Err(format!("{}: no complete HTTP answer", src.host));
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(format!("{}: an HTTP answer that does not parse", src.host)),
    }
    let code = resp.code.unwrap_or(0);
    if code != 200 {
        return Err(format!("{}{}: HTTP {code}", src.host, src.path));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return Ok(Box::new(Chunked {
            r,
            left: 0,
            done: false,
        }));
    }
    match header("content-length").and_then(|v| v.parse::<u64>().ok()) {
        Some(n) => Ok(Box::new(r.take(n))),
        None => Ok(Box::new(r)),
    }
}

/// An HTTP/1.1 chunked body.
struct Chunked<R> {
    r: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.r.read_line(&mut line)?;
            if line.trim().is_empty() {
                // The CRLF after the previous chunk.
                line.clear();
                self.r.read_line(&mut line)?;
            }
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = u64::from_str_radix(size, 16)
                .map_err(|_| io::Error::other("a damaged chunk size"))?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left as usize);
        let n = self.r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source in FETCHED_DIR is read from there, and only a plain name
    /// in it: the workstation cannot make the helper read another file.
    #[test]
    fn a_fetched_source_is_a_plain_file_in_its_folder() {
        let src = |addr: &str| Source {
            addr: addr.into(),
            host: "m".into(),
            path: "/a.deb".into(),
            format: Format::Deb,
        };
        for bad in [
            "/run/drydock-packages/",
            "/run/drydock-packages/../../etc/shadow",
            "/run/drydock-packages/.x",
        ] {
            let e = get(&src(bad)).err().expect(bad);
            assert!(e.contains("not a file drydock fetched"), "{e}");
        }
        let e = get(&src("/run/drydock-packages/no-such-file-here"))
            .err()
            .unwrap();
        assert!(
            e.starts_with("cannot open /run/drydock-packages/no-such-file-here (m/a.deb)"),
            "{e}"
        );
    }

    #[test]
    fn pieces_round_trip() {
        let p = vec![
            Piece {
                stream_offset: 512,
                len: 4096,
                hash: [7; 32],
                disk_offset: 1 << 30,
            },
            Piece {
                stream_offset: 9000,
                len: 10,
                hash: [1; 32],
                disk_offset: 4096,
            },
        ];
        assert_eq!(decode_pieces(&encode_pieces(&p)).unwrap(), p);
        assert!(decode_pieces(&[0; 51]).is_err());
    }

    #[test]
    fn extract_writes_only_pages_whose_hash_matches() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let page = |off: usize, len: usize| {
            let mut p = vec![0u8; 4096];
            p[..len].copy_from_slice(&data[off..off + len]);
            crate::proto::sha256(&p)
        };
        let pieces = vec![
            Piece {
                stream_offset: 512,
                len: 4096,
                hash: page(512, 4096),
                disk_offset: 0,
            },
            Piece {
                stream_offset: 512,
                len: 4096,
                hash: page(512, 4096),
                disk_offset: 8192,
            },
            Piece {
                stream_offset: 5000,
                len: 4096,
                hash: [0; 32], // not this content
                disk_offset: 4096,
            },
            Piece {
                stream_offset: 19_000,
                len: 1000,
                hash: page(19_000, 1000),
                disk_offset: 12288,
            },
        ];
        let mut wrote = Vec::new();
        let out = extract(&mut &data[..], &pieces, |off, p| {
            wrote.push((off, crate::proto::sha256(p)));
            Ok(())
        })
        .unwrap();
        assert_eq!(out.written, vec![true, true, false, true]);
        assert!(out.error.is_none());
        assert_eq!(wrote.len(), 3);
        assert_eq!(wrote[2], (12288, page(19_000, 1000)));
        // An archive shorter than the pieces: the last is not written.
        let out = extract(&mut &data[..10_000], &pieces, |_, _| Ok(())).unwrap();
        assert_eq!(out.written, vec![true, true, false, false]);
        assert!(out.error.unwrap().contains("ended early"));
    }

    #[test]
    fn a_chunked_body_reads_whole() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let mut c = Chunked {
            r: &body[..],
            left: 0,
            done: false,
        };
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello world");
    }
}
