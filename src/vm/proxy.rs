//! The network half of the seal: the worker VM's user network runs with
//! `restrict=on` (libslirp then drops every UDP packet but DHCP, DNS
//! included, and resets every TCP connection that is not a forward), and
//! its one way out is a guestfwd to this proxy: plain HTTP requests and
//! CONNECT tunnels to the hosts of the allow list (the package sources),
//! nothing else. The guest is told of it through `http_proxy` and
//! `https_proxy`, which apt, apk, nix (curl) and wget honour. Every request
//! is logged in the run log; a refused one with its destination.
//!
//! A run's proxy keeps what the guest downloads by plain HTTP that cannot
//! change under its name (Debian's and Alpine's package files, files
//! under `by-hash/`, Nix's NARs) in the run's `downloads/`, and serves it
//! from there when asked again: the real upgrade reuses what its
//! rehearsal fetched. The files stay on the workstation; the package
//! manager in the guest checks each against its signed index as it does
//! any download.
//!
//! QEMU spawns `drydock __relay SOCKET` for each connection the guest opens
//! to the proxy's address (guestfwd's `cmd:` form, one process per
//! connection), which joins it to the unix socket this proxy listens on.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The port the guest connects to, on the proxy's address in its subnet.
pub const GUEST_PORT: u16 = 3128;

type Body = BoxBody<Bytes, hyper::Error>;

struct State {
    allow: Vec<String>,
    log: Mutex<Option<std::fs::File>>,
    refused: Mutex<Vec<String>>,
    allowed: Mutex<Vec<String>>,
    client: Client<HttpConnector, Incoming>,
    /// Where downloads are kept, and what was stored and served from it.
    cache: Option<PathBuf>,
    downloads: Mutex<Downloads>,
}

/// What a proxy's download cache did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Downloads {
    /// Fetched from the package sources and kept.
    pub stored_files: u64,
    pub stored_bytes: u64,
    /// Served from what an earlier worker VM of the run fetched.
    pub reused_files: u64,
    pub reused_bytes: u64,
}

/// Largest download kept (held in memory while it passes; apt fetches a
/// few at once).
const CACHE_MAX: u64 = 256 << 20;

/// Whether a URL path names content that never changes under that name.
fn immutable(path: &str) -> bool {
    [
        ".deb", ".udeb", ".apk", ".nar", ".nar.xz", ".nar.zst", ".nar.bz2",
    ]
    .iter()
    .any(|e| path.ends_with(e))
        || path.contains("/by-hash/")
}

fn url_path(url: &str) -> String {
    url.parse::<hyper::Uri>()
        .map(|u| u.path().to_string())
        .unwrap_or_default()
}

/// Whether DATA may be kept for PATH: a `by-hash/SHA256/HEX` file must
/// hash to HEX (a damaged copy kept would be served to the real upgrade
/// again and again); other names are checked by the package manager.
fn keepable(path: &str, data: &[u8]) -> bool {
    match path.split_once("/by-hash/SHA256/") {
        Some((_, hex)) => hex::encode(crate::image::manifest::sha256(data)) == hex,
        None => true,
    }
}

fn cache_file(dir: &Path, url: &str) -> PathBuf {
    dir.join(hex::encode(crate::image::manifest::sha256(url.as_bytes())))
}

impl State {
    fn note(&self, line: &str) {
        if let Some(f) = self.log.lock().expect("log lock").as_mut() {
            let _ = writeln!(f, "network: {line}");
        }
    }
    fn allows(&self, host: &str) -> bool {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow.contains(&h)
    }
    fn refuse(&self, what: String) -> Response<Body> {
        self.note(&format!("refused {what} (not in the allow list)"));
        self.refused.lock().expect("lock").push(what.clone());
        text(
            StatusCode::FORBIDDEN,
            format!(
                "drydock: the worker VM's network is sealed; {what} is not in its allow list\n"
            ),
        )
    }
    fn allowed(&self, what: &str) {
        let mut a = self.allowed.lock().expect("lock");
        if !a.iter().any(|x| x == what) {
            self.note(&format!("allowed {what}"));
            a.push(what.to_string());
        }
    }
}

fn text(code: StatusCode, s: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(s)).map_err(|e| match e {}).boxed());
    *r.status_mut() = code;
    r
}

/// Answer one request of the sealed worker VM's proxy, to an allowed host
/// only: a CONNECT tunnel, or a plain http request served from or kept in
/// the run's downloads when its file never changes.
/// Over 80 lines: the two kinds of request side by side (CONNECT: host:port,
/// allowed host on 443 or 80, dialed within 30 s, tunneled; plain: an
/// absolute http URL, allowed host, proxy headers dropped, cache or fetch),
/// each refusing and logging in the same words; split, the two allow checks
/// would no longer read together.
async fn handle(
    mut req: Request<Incoming>,
    st: Arc<State>,
) -> Result<Response<Body>, hyper::Error> {
    if req.method() == Method::CONNECT {
        let Some(auth) = req.uri().authority().cloned() else {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                "CONNECT needs host:port\n".into(),
            ));
        };
        let (host, port) = (auth.host().to_string(), auth.port_u16().unwrap_or(443));
        let what = format!("CONNECT {host}:{port}");
        if !st.allows(&host) || !(port == 443 || port == 80) {
            return Ok(st.refuse(what));
        }
        let dial = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            tokio::net::TcpStream::connect((host.as_str(), port)),
        );
        let upstream = match dial.await.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within 30 s",
            ))
        }) {
            Ok(t) => t,
            Err(e) => {
                st.note(&format!("{what}: cannot connect: {e}"));
                return Ok(text(
                    StatusCode::BAD_GATEWAY,
                    format!("drydock: {what}: {e}\n"),
                ));
            }
        };
        st.allowed(&what);
        tokio::spawn(async move {
            if let Ok(up) = hyper::upgrade::on(req).await {
                let mut up = TokioIo::new(up);
                let mut upstream = upstream;
                let _ = tokio::io::copy_bidirectional(&mut up, &mut upstream).await;
            }
        });
        return Ok(Response::new(
            Full::new(Bytes::new()).map_err(|e| match e {}).boxed(),
        ));
    }
    let uri = req.uri().clone();
    let Some(host) = uri.host().map(str::to_string) else {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "drydock: a proxy request needs an absolute URL\n".into(),
        ));
    };
    if uri.scheme_str() != Some("http") || !st.allows(&host) {
        return Ok(st.refuse(format!("http://{host}")));
    }
    st.allowed(&format!("http://{host}"));
    req.headers_mut().remove("proxy-connection");
    req.headers_mut().remove("proxy-authorization");
    let url = uri.to_string();
    let cache = st
        .cache
        .clone()
        .filter(|_| req.method() == Method::GET && immutable(uri.path()));
    if let Some(dir) = &cache
        && let Ok(data) = std::fs::read(cache_file(dir, &url))
    {
        st.note(&format!("from the run's downloads: {url}"));
        let mut d = st.downloads.lock().expect("lock");
        d.reused_files += 1;
        d.reused_bytes += data.len() as u64;
        return Ok(Response::new(
            Full::new(Bytes::from(data)).map_err(|e| match e {}).boxed(),
        ));
    }
    match st.client.request(req).await {
        Ok(resp) => match cache {
            Some(dir) if resp.status() == StatusCode::OK => Ok(keep(resp, &dir, &url, &st).await),
            _ => Ok(resp.map(|b| b.boxed())),
        },
        Err(e) => {
            st.note(&format!("http://{host}: {e}"));
            Ok(text(
                StatusCode::BAD_GATEWAY,
                format!("drydock: http://{host}: {e}\n"),
            ))
        }
    }
}

/// RESP (a 200 for a file that never changes) passed on, and kept in DIR
/// under its URL; too large or unreadable, passed on as it comes.
async fn keep(resp: Response<Incoming>, dir: &Path, url: &str, st: &State) -> Response<Body> {
    let len = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if len.is_none_or(|l| l > CACHE_MAX) {
        return resp.map(|b| b.boxed());
    }
    let (parts, body) = resp.into_parts();
    let data = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            st.note(&format!("{url}: {e}"));
            return text(StatusCode::BAD_GATEWAY, format!("drydock: {url}: {e}\n"));
        }
    };
    if Some(data.len() as u64) == len && keepable(&url_path(url), &data) {
        let path = cache_file(dir, url);
        // NAME.url beside it: a push has the VPS fetch the package from the
        // same URL (its own mirror) to rebuild the pages it holds.
        let stored = std::fs::create_dir_all(dir).and_then(|_| {
            crate::util::write_atomic(&path.with_extension("url"), url.as_bytes())
                .and_then(|_| crate::util::write_atomic(&path, &data))
                .map_err(std::io::Error::other)
        });
        if stored.is_ok() {
            let mut d = st.downloads.lock().expect("lock");
            d.stored_files += 1;
            d.stored_bytes += data.len() as u64;
        }
    }
    Response::from_parts(parts, Full::new(data).map_err(|e| match e {}).boxed())
}

/// A running proxy; dropping it stops it.
pub struct Proxy {
    pub socket: PathBuf,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listen on `socket` (inside the run folder), forwarding to the hosts
    /// of `allow` only; requests are logged to `log`. With CACHE, files
    /// that never change are kept there and served from there.
    pub fn start(
        socket: &Path,
        allow: &[String],
        log: &Path,
        cache: Option<&Path>,
    ) -> Result<Proxy> {
        let socket = &super::socket_path(socket);
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .ok();
        let state = Arc::new(State {
            allow: allow.iter().map(|h| h.to_ascii_lowercase()).collect(),
            log: Mutex::new(file),
            refused: Mutex::new(Vec::new()),
            allowed: Mutex::new(Vec::new()),
            client: {
                let mut c = HttpConnector::new();
                c.set_connect_timeout(Some(std::time::Duration::from_secs(30)));
                Client::builder(TokioExecutor::new()).build(c)
            },
            cache: cache.map(Path::to_path_buf),
            downloads: Mutex::new(Downloads::default()),
        });
        state.note(&format!("sealed; the proxy allows: {}", allow.join(" ")));
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |r| handle(r, st.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(conn), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(Proxy {
            socket: socket.to_path_buf(),
            state,
            task,
        })
    }

    /// What the download cache stored and served.
    pub fn downloads(&self) -> Downloads {
        *self.state.downloads.lock().expect("lock")
    }

    /// What the guest was refused, in order.
    pub fn refused(&self) -> Vec<String> {
        self.state.refused.lock().expect("lock").clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The program QEMU runs as the relay (`PROGRAM __relay SOCKET`): this
/// very drydock, as `/proc/PID/exe`. Not the path it was started from:
/// a drydock replaced on disk during a run (an upgrade of the package, a
/// rebuild) leaves that path naming another program, or none ("… (deleted)"
/// is what the kernel then says of it), and every guest connection to the
/// proxy failed. Seen: a rehearsal of 39 minutes, drydock rebuilt
/// meanwhile, then the real upgrade's `apt-get update` got "Connection
/// failed" from every source and upgraded nothing (the verify boot caught
/// it: nothing was pushed).
pub fn relay_program() -> PathBuf {
    PathBuf::from(format!("/proc/{}/exe", std::process::id()))
}

/// `drydock __relay SOCKET`: what QEMU spawns for each guest connection to
/// the proxy; stdin and stdout are that connection.
pub fn relay(socket: &Path) -> Result<()> {
    use std::io::Read;
    let s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("cannot reach the proxy at {}", socket.display()))?;
    let mut to = s.try_clone()?;
    let up = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let mut from = s;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || out.write_all(&buf[..n]).is_err() {
            break;
        }
        let _ = out.flush();
    }
    drop(up);
    Ok(())
}

/// The hosts a worker VM may reach: those of the VPS's package sources
/// (apt's sources.list and deb822 files, apk's repositories, nix's
/// substituters), then what the user added with `--allow-host`.
pub fn allow_list(sources: &[String], os_id: &str, extra: &[String]) -> Vec<String> {
    let mut hosts: Vec<String> = Vec::new();
    for line in sources {
        for w in line.split_whitespace() {
            let w = w.trim_start_matches('[');
            if let Some(rest) = w.split_once("://").map(|x| x.1) {
                let authority = rest.split(['/', ']']).next().unwrap_or("");
                let hostport = authority.rsplit('@').next().unwrap_or(authority);
                let host = hostport.split(':').next().unwrap_or("");
                if !host.is_empty() {
                    hosts.push(host.to_ascii_lowercase());
                }
            }
        }
    }
    // Where these systems' own tools go besides the sources they list.
    match os_id {
        "nixos" => hosts.extend(
            [
                "cache.nixos.org",
                "channels.nixos.org",
                "releases.nixos.org",
                "nixos.org",
                // Sources that fixed-output derivations fetch, mirrored.
                "tarballs.nixos.org",
                "github.com",
                "api.github.com",
                "codeload.github.com",
                // Where github.com redirects release assets.
                "objects.githubusercontent.com",
                "release-assets.githubusercontent.com",
            ]
            .map(String::from),
        ),
        "ubuntu" => hosts.push("changelogs.ubuntu.com".into()),
        _ => {}
    }
    hosts.extend(extra.iter().map(|h| h.to_ascii_lowercase()));
    let mut seen = Vec::new();
    for h in hosts {
        if !seen.contains(&h) {
            seen.push(h);
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay is this very program, and /proc/PID/exe still runs a
    /// program whose file was removed or replaced while it ran, where the
    /// path it was started from does not (a copy of sleep stands for
    /// drydock).
    #[test]
    fn the_relay_program_runs_after_the_file_drydock_started_from_is_gone() {
        assert_eq!(
            std::fs::read_link(relay_program()).unwrap(),
            std::env::current_exe().unwrap()
        );
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("sleep");
        std::fs::copy("/bin/sleep", &copy).unwrap();
        let mut running = std::process::Command::new(&copy).arg("30").spawn().unwrap();
        std::fs::remove_file(&copy).unwrap();
        let by_path = std::process::Command::new(&copy).arg("0").status();
        let by_proc = std::process::Command::new(format!("/proc/{}/exe", running.id()))
            .arg("0")
            .status()
            .unwrap();
        running.kill().unwrap();
        running.wait().unwrap();
        assert!(by_path.is_err(), "the removed path still ran");
        assert!(by_proc.success());
    }

    #[test]
    fn only_files_that_never_change_are_kept_and_by_hash_ones_only_when_they_match() {
        assert!(immutable(
            "/debian/pool/main/h/hello/hello_2.10-3_amd64.deb"
        ));
        assert!(immutable(
            "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/ab12"
        ));
        assert!(!immutable("/debian/dists/bookworm/InRelease"));
        assert!(!immutable(
            "/debian/dists/bookworm/main/binary-amd64/Packages.xz"
        ));
        let data = b"Package: hello\n";
        let good = hex::encode(crate::image::manifest::sha256(data));
        assert!(keepable(&format!("/d/by-hash/SHA256/{good}"), data));
        assert!(!keepable("/d/by-hash/SHA256/00ff", data));
        assert!(keepable("/debian/pool/main/h/hello/hello.deb", data));
        assert_eq!(
            url_path("http://deb.debian.org/debian/pool/x.deb"),
            "/debian/pool/x.deb"
        );
    }

    #[test]
    fn the_allow_list_is_the_package_sources() {
        let src: Vec<String> = [
            "apt deb http://deb.debian.org/debian bookworm main",
            "apt deb [signed-by=/usr/share/keyrings/x.gpg] https://download.docker.com/linux/debian bookworm stable",
            "apt deb http://security.debian.org/debian-security bookworm-security main",
            "apt URIs: http://deb.debian.org/debian https://mirror.example:8443/debian",
            "apk https://dl-cdn.alpinelinux.org/alpine/v3.19/main",
            "nix substituters = https://cache.nixos.org https://user:pw@my.cachix.org",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            allow_list(&src, "debian", &["extra.example".into()]),
            [
                "deb.debian.org",
                "download.docker.com",
                "security.debian.org",
                "mirror.example",
                "dl-cdn.alpinelinux.org",
                "cache.nixos.org",
                "my.cachix.org",
                "extra.example"
            ]
        );
    }
}
