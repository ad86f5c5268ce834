//! A push has the host rebuild the pages that package files hold, from
//! the host's own mirror (issue 18): a real .deb built with dpkg-deb, a
//! plain HTTP server standing for the mirror, the real sshd and helper.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// An HTTP server on 127.0.0.1 answering a GET of each path of FILES with
/// its body, 404 otherwise; its port and the count of requests.
fn mirror(files: Vec<(String, Vec<u8>)>) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let asked = Arc::new(AtomicUsize::new(0));
    let n = asked.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&b[..k]),
                }
            }
            n.fetch_add(1, Ordering::SeqCst);
            let head = String::from_utf8_lossy(&req).to_string();
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            let body = files.iter().find(|(p, _)| *p == path).map(|(_, b)| b);
            let _ = match body {
                Some(d) => c
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            d.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|_| c.write_all(d)),
                None => c.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                ),
            };
        }
    });
    (port, asked)
}

/// A package file the worker VM's proxy kept in DOWNLOADS: NAME with
/// BODY, beside NAME.url.
fn keep(downloads: &std::path::Path, name: &str, body: &[u8], url: &str) {
    std::fs::create_dir_all(downloads).unwrap();
    std::fs::write(downloads.join(name), body).unwrap();
    std::fs::write(downloads.join(format!("{name}.url")), url).unwrap();
}

/// A .deb (xz, as dpkg-deb writes by default) holding BLOB as
/// /usr/share/demo/blob, built in DIR.
fn deb(dir: &std::path::Path, blob: &[u8]) -> Vec<u8> {
    let root = dir.join("pkg");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/share/demo")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: demo\nVersion: 1\nArchitecture: all\nMaintainer: t <t@example.org>\n\
         Description: a test package\n",
    )
    .unwrap();
    std::fs::write(root.join("usr/share/demo/readme"), "hello\n").unwrap();
    std::fs::write(root.join("usr/share/demo/blob"), blob).unwrap();
    let out = dir.join("demo_1_all.deb");
    let o = Command::new("dpkg-deb")
        .args(["-Zxz", "--root-owner-group", "--build"])
        .arg(&root)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

#[test]
fn a_push_has_the_host_rebuild_package_pages_from_its_mirror_and_sends_the_rest() {
    let sshd = Sshd::start();
    let t = tempdir();
    // 300 KiB and 1000 bytes of data that does not compress: 76 pages, the
    // last one padded with zeros on the disk as a file system holds it.
    let blob = pattern(4242, 300 * KIB as usize + 1000);
    let pages = blob.len().div_ceil(4096) as u64;
    let package = deb(t.path(), &blob);
    // An index file apt fetched by-hash (xz), kept decompressed in its
    // lists: 40 KiB of text.
    let index: Vec<u8> = (0..2000)
        .flat_map(|i| format!("Package: p{i}\nVersion: {}\n\n", i * 7919 % 10007).into_bytes())
        .take(40 * KIB as usize)
        .collect();
    std::fs::write(t.path().join("index"), &index).unwrap();
    let xz = Command::new("xz")
        .args(["-c", "-k"])
        .arg(t.path().join("index"))
        .output()
        .unwrap();
    assert!(xz.status.success());
    let index_xz = xz.stdout;
    let deb_path = "/debian/pool/main/d/demo/demo_1_all.deb";
    let index_path = "/debian/dists/x/main/binary-all/by-hash/SHA256/99aa";
    let (port, asked) = mirror(vec![
        (deb_path.into(), package.clone()),
        (index_path.into(), index_xz.clone()),
    ]);
    let downloads = t.path().join("downloads");
    keep(
        &downloads,
        "0a1b",
        &package,
        &format!("http://127.0.0.1:{port}{deb_path}"),
    );
    keep(
        &downloads,
        "0c2d",
        &index_xz,
        &format!("http://127.0.0.1:{port}{index_path}"),
    );

    // The upgrade "installed" the blob at 10 MiB, wrote the index at
    // 12 MiB and changed 64 KiB at 30 MiB that no package holds.
    let other = pattern(77, 64 * KIB as usize);
    let writes = [
        (10 * MIB, &blob[..]),
        (12 * MIB, &index),
        (30 * MIB, &other),
    ];
    let (o, j) = pushed(&sshd, t.path(), "1", &writes, &downloads);
    assert_exit(&o, 0);
    assert_helper_gone(&j, "writer_dir");
    assert_eq!(j["rebuilt"]["pages"], pages + 10, "{j}");
    assert_eq!(
        j["rebuilt"]["fetched_bytes"],
        (package.len() + index_xz.len()) as u64,
        "{j}"
    );
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    // The blob did not cross the link: the 64 KiB did (it does not
    // compress either), and frames.
    let wire = j["bytes_on_wire"].as_u64().unwrap();
    assert!(
        (64 * KIB..64 * KIB + 64 * KIB).contains(&wire),
        "bytes on the wire {wire}: {j}"
    );
    assert_eq!(j["bytes_written"], (pages + 10) * 4096 + 64 * KIB, "{j}");
    assert!(
        stderr(&o).contains("the host rebuilds them from its mirror"),
        "{}",
        stderr(&o)
    );

    // The mirror does not have it (404): every page is sent, the push is
    // exact and says why.
    let (port, _) = mirror(vec![]);
    std::fs::write(
        downloads.join("0a1b.url"),
        format!("http://127.0.0.1:{port}/debian/pool/main/d/demo/demo_1_all.deb"),
    )
    .unwrap();
    let (o, j) = pushed(&sshd, t.path(), "2", &[(10 * MIB, &blob)], &downloads);
    assert_exit(&o, 0);
    assert_eq!(j["rebuilt"]["pages"], 0, "{j}");
    let notes = j["rebuilt"]["notes"].to_string();
    assert!(notes.contains("HTTP 404"), "{notes}");
    assert!(
        j["bytes_on_wire"].as_u64().unwrap() > blob.len() as u64,
        "{j}"
    );

    // A mirror whose name the host cannot resolve: the pages are found in
    // the package, said to be sent, and sent.
    std::fs::write(
        downloads.join("0a1b.url"),
        "http://no-such-mirror.invalid/debian/pool/main/d/demo/demo_1_all.deb",
    )
    .unwrap();
    let (o, j) = pushed(&sshd, t.path(), "4", &[(10 * MIB, &blob)], &downloads);
    assert_exit(&o, 0);
    assert_eq!(j["rebuilt"]["pages"], 0, "{j}");
    assert_stderr(
        &o,
        "304.00 KiB of the pages to write are in 1 of the 2 package files the upgrade downloaded",
    );
    assert_stderr(&o, "the host cannot reach their mirror, so they are sent");
    assert_stderr(&o, "cannot resolve no-such-mirror.invalid");

    // A package whose content is not what the worker VM installed (the
    // mirror serves another build): no page of it is written, all are sent.
    let mut other = blob.clone();
    other[5000] ^= 1;
    let other_deb = deb(&t.path().join("other"), &other);
    let (port, _) = mirror(vec![(deb_path.into(), other_deb)]);
    std::fs::write(
        downloads.join("0a1b.url"),
        format!("http://127.0.0.1:{port}/debian/pool/main/d/demo/demo_1_all.deb"),
    )
    .unwrap();
    let (o, j) = pushed(&sshd, t.path(), "3", &[(10 * MIB, &blob)], &downloads);
    assert_exit(&o, 0);
    // Only the page with the flipped byte differs from the worker's copy.
    assert_eq!(j["rebuilt"]["pages"], pages - 1, "{j}");
    let notes = j["rebuilt"]["notes"].to_string();
    assert!(notes.contains("1 of 76 pages differ"), "{notes}");
}

/// An HTTP server on 127.0.0.1 that answers every GET with BODY's length
/// and then trickles it, a byte a second after the first 1000: never
/// silent long enough for a read's 30 s limit.
fn trickling_mirror(body: Vec<u8>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 1024];
                let _ = c.read(&mut b);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if c.write_all(head.as_bytes()).is_err() || c.write_all(&body[..1000]).is_err() {
                    return;
                }
                for byte in &body[1000..] {
                    std::thread::sleep(Duration::from_secs(1));
                    if c.write_all(std::slice::from_ref(byte)).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// A mirror that trickles (a byte a second, so no read times out) does
/// not hold the push: once everything else is written the host waits for
/// the rebuild at most its limit (120 s; 3 s here, through the sshd's
/// environment), then gives up, and the pages it did not rebuild are sent.
#[test]
fn a_mirror_that_trickles_is_given_up_on_and_its_pages_sent() {
    let sshd = Sshd::start_with(&["SetEnv=DRYDOCK_HELPER_REBUILD_WAIT=3"]);
    let t = tempdir();
    let blob = pattern(4243, 200 * KIB as usize);
    let package = deb(t.path(), &blob);
    let port = trickling_mirror(package.clone());
    let downloads = t.path().join("downloads");
    keep(
        &downloads,
        "0a1b",
        &package,
        &format!("http://127.0.0.1:{port}/debian/pool/main/d/demo/demo_1_all.deb"),
    );
    let started = Instant::now();
    let (o, j) = pushed(&sshd, t.path(), "1", &[(10 * MIB, &blob)], &downloads);
    assert_exit(&o, 0);
    assert_eq!(j["rebuilt"]["pages"], 0, "{j}");
    let notes = j["rebuilt"]["notes"].to_string();
    assert!(
        notes.contains("the mirror was too slow: gave up after 3 s of waiting"),
        "{notes}"
    );
    assert!(
        j["bytes_on_wire"].as_u64().unwrap() > blob.len() as u64,
        "every page was sent: {j}"
    );
    // The pull and the push, not the 120 s wait nor the trickle's 3 days.
    assert!(
        started.elapsed() < Duration::from_secs(100),
        "{:?}",
        started.elapsed()
    );
}

/// A disk pulled, WRITES (offset, data) made to its image, pushed with the
/// package files of DOWNLOADS; the push's output and JSON, the disk
/// checked to be the image.
fn pushed(
    sshd: &Sshd,
    dir: &std::path::Path,
    name: &str,
    writes: &[(u64, &[u8])],
    downloads: &std::path::Path,
) -> (std::process::Output, serde_json::Value) {
    let dev = dir.join(format!("disk{name}"));
    let img = dir.join(format!("image{name}"));
    standard_disk(&dev);
    assert_exit(&pull(sshd, &dev, &img), 0);
    for (at, data) in writes {
        write_at(&img, data, *at);
    }
    let o = push(
        sshd,
        &img,
        &dev,
        &[
            "--yes",
            "--transfer",
            "helper",
            "--packages",
            downloads.to_str().unwrap(),
        ],
    );
    let j = json(&o);
    assert_eq!(
        sha256_file(&dev),
        sha256_file(&img),
        "the disk is the image"
    );
    (o, j)
}

#[test]
fn packages_must_be_a_folder() {
    let sshd = Sshd::start();
    let t = tempdir();
    let dev = t.path().join("disk");
    let img = t.path().join("image");
    standard_disk(&dev);
    assert_exit(&pull(&sshd, &dev, &img), 0);
    let before = sha256_file(&dev);
    let o = push(
        &sshd,
        &img,
        &dev,
        &[
            "--yes",
            "--packages",
            t.path().join("none").to_str().unwrap(),
        ],
    );
    assert_exit(&o, 2);
    assert_stderr(&o, "not a folder; give the folder of package files");
    assert_eq!(sha256_file(&dev), before);
}

/// An HTTPS server on 127.0.0.1 serving DIR, with a certificate for
/// 127.0.0.1 signed by a CA of its own (openssl); its port, the CA's
/// file, and the file where it logs each path asked. Python's http.server
/// with ssl: a real TLS server that apt's https method speaks to.
struct HttpsMirror {
    child: std::process::Child,
    port: u16,
    ca: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Drop for HttpsMirror {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn https_mirror(dir: &std::path::Path, tls: &std::path::Path) -> HttpsMirror {
    std::fs::create_dir_all(tls).unwrap();
    let sh = |cmd: &str| {
        let o = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(tls)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
        -subj /CN=drydock-test-ca -addext basicConstraints=critical,CA:TRUE \
        -addext keyUsage=critical,keyCertSign,cRLSign",
    );
    sh("openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=127.0.0.1");
    sh(
        "printf 'subjectAltName=IP:127.0.0.1\\n' > ext && openssl x509 -req -in srv.csr -CA ca.pem \
        -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext",
    );
    let log = tls.join("asked");
    let server = r#"
import http.server, ssl, sys, os
root, cert, key, log = sys.argv[1:5]
class H(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=root, **k)
    def log_message(self, fmt, *a):
        with open(log, "a") as f:
            f.write(self.path + "\n")
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(server)
        .arg(dir)
        .arg(tls.join("srv.pem"))
        .arg(tls.join("srv.key"))
        .arg(&log)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    HttpsMirror {
        child,
        port: line.trim().parse().expect("the server's port"),
        ca: tls.join("ca.pem"),
        log,
    }
}

/// A package the upgrade fetched over HTTPS (issue 32): kept with its URL
/// and hash, the host's own apt (`apt-helper download-file`, its own TLS
/// configuration: here a CA of its own in its APT_CONFIG) fetches it from
/// its mirror before the helper writes, and the pages it holds are rebuilt
/// from it, not sent. The host's apt refusing the mirror's certificate,
/// and a host without apt-helper: the pages are sent and the push says
/// why. The folder it fetched into is gone afterwards.
#[test]
fn a_push_has_the_hosts_apt_fetch_https_package_files_and_rebuild_their_pages() {
    let t = tempdir();
    let blob = pattern(4343, 200 * KIB as usize + 100);
    let pages = blob.len().div_ceil(4096) as u64;
    let package = deb(t.path(), &blob);
    let deb_path = "debian/pool/main/d/demo/demo_1_all.deb";
    let root = t.path().join("mirror");
    std::fs::create_dir_all(root.join("debian/pool/main/d/demo")).unwrap();
    std::fs::write(root.join(deb_path), &package).unwrap();
    let m = https_mirror(&root, &t.path().join("tls"));
    let downloads = t.path().join("downloads");
    keep(
        &downloads,
        "0e3f",
        &package,
        &format!("https://127.0.0.1:{}/{deb_path}", m.port),
    );
    let hash = sha256_file(&downloads.join("0e3f"));
    std::fs::write(downloads.join("0e3f.sha256"), &hash).unwrap();
    let apt_conf = t.path().join("apt.conf");
    std::fs::write(
        &apt_conf,
        format!("Acquire::https::CaInfo \"{}\";\n", m.ca.display()),
    )
    .unwrap();

    let env = format!("SetEnv=APT_CONFIG={}", apt_conf.display());
    let sshd = Sshd::start_with(&[&env]);

    // Not confirmed (no --yes, no terminal): refused, and the host's apt
    // fetched nothing (the question comes before anything changes there).
    let (dev, img) = (t.path().join("disk0"), t.path().join("image0"));
    standard_disk(&dev);
    assert_exit(&pull(&sshd, &dev, &img), 0);
    write_at(&img, &blob, 10 * MIB);
    let o = push(
        &sshd,
        &img,
        &dev,
        &[
            "--transfer",
            "helper",
            "--packages",
            downloads.to_str().unwrap(),
        ],
    );
    assert_exit(&o, 3);
    assert_stderr(&o, "this needs confirmation");
    assert!(
        !m.log.exists(),
        "the host's apt fetched before the push was confirmed: {}",
        std::fs::read_to_string(&m.log).unwrap_or_default()
    );
    assert!(!std::path::Path::new("/run/drydock-packages").exists());
    let other = pattern(78, 32 * KIB as usize);
    let (o, j) = pushed(
        &sshd,
        t.path(),
        "1",
        &[(10 * MIB, &blob[..]), (30 * MIB, &other)],
        &downloads,
    );
    assert_exit(&o, 0);
    assert_eq!(j["rebuilt"]["pages"], pages, "{j}\n{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&m.log).unwrap(),
        format!("/{deb_path}\n"),
        "the host's apt fetched the package once"
    );
    let wire = j["bytes_on_wire"].as_u64().unwrap();
    assert!(wire < 32 * KIB + 64 * KIB, "bytes on the wire {wire}: {j}");
    assert_stderr(&o, "the host rebuilds them from its mirror");
    assert!(
        !std::path::Path::new("/run/drydock-packages").exists(),
        "the folder the host's apt fetched into is removed"
    );

    // Its apt does not trust the mirror's certificate: sent, and said.
    let sshd = Sshd::start();
    let (o, j) = pushed(&sshd, t.path(), "2", &[(10 * MIB, &blob[..])], &downloads);
    assert_exit(&o, 0);
    assert_eq!(j["rebuilt"]["pages"], 0, "{j}");
    assert_stderr(&o, "could not fetch https://127.0.0.1:");
    assert!(wire < j["bytes_on_wire"].as_u64().unwrap(), "{j}");

    // No apt-helper on the host.
    let sshd = Sshd::start_without(&["/usr/lib/apt/apt-helper"]);
    let (o, j) = pushed(&sshd, t.path(), "3", &[(10 * MIB, &blob[..])], &downloads);
    assert_exit(&o, 0);
    assert_eq!(j["rebuilt"]["pages"], 0, "{j}");
    assert_stderr(
        &o,
        "has no /usr/lib/apt/apt-helper to fetch the 1 package file(s)",
    );
    assert!(!std::path::Path::new("/run/drydock-packages").exists());
}
