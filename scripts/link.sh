# A shaped link for benchmarks (issue 18), sourced after scripts/lib.sh:
# the "VPS" sshd runs in a network namespace of its own, joined to this
# machine by a veth pair, each direction held to a rate by tc's tbf (this
# kernel has no netem), and a relay on 127.0.0.1 that delays each direction
# by half the round trip. Only addresses inside the namespace and on the
# veth pair this script creates (10.213.0.0/30) are used; stop_link tears
# it all down.
#
#   start_link DIR DOWN UP RTT_MS   # Mbit/s VPS -> here, here -> VPS
#     sets PORT, KEY, HOST (as start_sshd), SSHD_PID, LINK_NS, LINK_DEV
#   link_bytes                      # "UP DOWN": bytes on the veth so far
#   vps_cpu                         # CPU seconds of everything the VPS's
#                                   # sshd ran (its reaped children)
#   start_mirror DOWNLOADS MBIT     # the VPS's package mirror: inside the
#                                   # namespace (its own loopback, port 80),
#                                   # serving each file of DOWNLOADS under
#                                   # the path of its NAME.url at MBIT Mbit/s;
#                                   # the URLs' host names resolve to it on
#                                   # the VPS side (LINK_HOSTS before
#                                   # start_link: "127.0.0.1 NAME..." lines)
#   start_mirror_https DOWNLOADS MBIT DIR   # the same on port 443 with TLS: a CA
#                                   # of its own made in DIR (DIR/ca.pem) and a
#                                   # certificate for every LINK_HOSTS name
#   stop_link

LINK_NS=
LINK_DEV=
LINK_RELAY_PID=

start_link() {
  local dir=$1 down=$2 up=$3 rtt=$4
  LINK_NS=drydock-link-$$
  LINK_DEV=ddl$$
  LINK_DEV=${LINK_DEV:0:15}
  local peer=ddp$$
  peer=${peer:0:15}
  ip netns add "$LINK_NS"
  ip link add "$LINK_DEV" type veth peer name "$peer"
  ip link set "$peer" netns "$LINK_NS"
  ip addr add 10.213.0.1/30 dev "$LINK_DEV"
  ip link set "$LINK_DEV" up
  ip netns exec "$LINK_NS" ip addr add 10.213.0.2/30 dev "$peer"
  ip netns exec "$LINK_NS" ip link set "$peer" up
  ip netns exec "$LINK_NS" ip link set lo up
  # Here -> VPS leaves by LINK_DEV; VPS -> here leaves by the peer.
  # Offloads off, so that tbf sees packets of the link's size.
  ethtool -K "$LINK_DEV" tso off gso off gro off >/dev/null 2>&1 || true
  ip netns exec "$LINK_NS" ethtool -K "$peer" tso off gso off gro off >/dev/null 2>&1 || true
  tc qdisc add dev "$LINK_DEV" root tbf rate "${up}mbit" burst 64kb latency 200ms
  ip netns exec "$LINK_NS" tc qdisc add dev "$peer" root tbf rate "${down}mbit" burst 64kb latency 200ms

  # Host names the VPS side resolves otherwise (`ip netns exec` puts
  # /etc/netns/NS/hosts over /etc/hosts for what it starts).
  if [ -n "${LINK_HOSTS:-}" ]; then
    mkdir -p "/etc/netns/$LINK_NS"
    { cat /etc/hosts; echo "$LINK_HOSTS"; } > "/etc/netns/$LINK_NS/hosts"
  fi
  sshd_setup "$dir" 22 10.213.0.2
  # LINK_SSHD_ENV: NAME=VALUE for the VPS side's sessions (its apt's
  # configuration, for an HTTPS mirror's CA).
  [ -n "${LINK_SSHD_ENV:-}" ] && echo "SetEnv $LINK_SSHD_ENV" >> "$dir/sshd_config"
  # `ip netns exec` runs sshd as itself: SSHD_PID is sshd's own.
  ip netns exec "$LINK_NS" /usr/sbin/sshd -D -e -f "$dir/sshd_config" 2>"$dir/sshd.log" &
  SSHD_PID=$!
  PORT=$(free_port)
  python3 - "$PORT" "$rtt" > "$dir/relay.log" 2>&1 <<'PY' &
# 127.0.0.1:PORT -> 10.213.0.2:22, each direction delayed by RTT/2 ms
# (bytes keep their order; throughput is not limited here).
import asyncio, sys, time
port, half = int(sys.argv[1]), float(sys.argv[2]) / 2000
async def pipe(r, w):
    q = asyncio.Queue()
    async def reader():
        while True:
            data = await r.read(65536)
            await q.put((time.monotonic() + half, data))
            if not data:
                return
    async def writer():
        while True:
            due, data = await q.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                try:
                    w.write_eof()
                except OSError:
                    pass
                return
            w.write(data)
            await w.drain()
    try:
        await asyncio.gather(reader(), writer())
    except (ConnectionError, OSError):
        pass
    finally:
        w.close()
async def serve(cr, cw):
    try:
        sr, sw = await asyncio.open_connection("10.213.0.2", 22)
    except OSError:
        cw.close()
        return
    await asyncio.gather(pipe(cr, sw), pipe(sr, cw))
async def main():
    srv = await asyncio.start_server(serve, "127.0.0.1", port)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
PY
  LINK_RELAY_PID=$!
  wait_port 10.213.0.2 22
  wait_port 127.0.0.1 "$PORT"
  KEY=$dir/client_key
  HOST=root@127.0.0.1:$PORT
}

link_bytes() {
  echo "$(cat "/sys/class/net/$LINK_DEV/statistics/tx_bytes") $(cat "/sys/class/net/$LINK_DEV/statistics/rx_bytes")"
}

vps_cpu() {
  # A session's CPU reaches sshd's cutime only once sshd has reaped it,
  # which can be a moment after the client is gone: wait (10 s at most)
  # for sshd to have no child left, else a row's CPU lands in the next.
  local i
  for i in $(seq 100); do
    pgrep -P "$SSHD_PID" >/dev/null || break
    sleep 0.1
  done
  # Fields 16 and 17 of /proc/PID/stat: cutime and cstime, in clock ticks.
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf "%.2f\n", ($14 + $15) / hz }' "/proc/$SSHD_PID/stat"
}

LINK_MIRROR_PID=
LINK_MIRROR_HTTPS_PID=
start_mirror_https() {
  local downloads=$1 mbit=$2 tls=$3
  mkdir -p "$tls"
  local names san=
  names=$(echo "$LINK_HOSTS" | tr ' ' '\n' | grep -v '^127\.0\.0\.1$' | grep . || true)
  for n in $names; do san="${san:+$san,}DNS:$n"; done
  ( cd "$tls" &&
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=drydock-bench-ca \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null &&
    openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=mirror 2>/dev/null &&
    printf 'subjectAltName=%s\n' "$san" > ext &&
    openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext 2>/dev/null ) \
    || { echo "cannot make the HTTPS mirror's CA and certificate in $tls (openssl)" >&2; return 1; }
  MIRROR_PORT=443 MIRROR_CERT=$tls/srv.pem MIRROR_KEY=$tls/srv.key start_mirror "$downloads" "$mbit"
  LINK_MIRROR_HTTPS_PID=$LINK_MIRROR_PID
  LINK_MIRROR_PID=
}

start_mirror() {
  local downloads=$1 mbit=$2 port=${MIRROR_PORT:-80}
  ip netns exec "$LINK_NS" python3 - "$downloads" "$mbit" "$port" "${MIRROR_CERT:-}" "${MIRROR_KEY:-}" \
    > "$downloads.mirror.log" 2>&1 <<'PY' &
# Serves each file NAME of DOWNLOADS under the path of NAME.url, at most
# MBIT Mbit/s per connection, on PORT (with TLS when CERT and KEY).
import http.server, os, ssl, sys, time, urllib.parse
d, mbit, port, cert, key = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
paths = {}
for n in os.listdir(d):
    if n.endswith(".url"):
        url = open(os.path.join(d, n)).read().strip()
        paths[urllib.parse.urlsplit(url).path] = os.path.join(d, n[:-4])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        f = paths.get(self.path)
        if not f or not os.path.exists(f):
            self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers(); return
        size = os.path.getsize(f)
        self.send_response(200); self.send_header("Content-Length", str(size)); self.end_headers()
        start, sent = time.monotonic(), 0
        with open(f, "rb") as fh:
            while True:
                b = fh.read(1 << 16)
                if not b:
                    break
                self.wfile.write(b); sent += len(b)
                ahead = sent * 8 / (mbit * 1e6) - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
if cert:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
s.serve_forever()
PY
  LINK_MIRROR_PID=$!
  local i
  for i in $(seq 50); do
    ip netns exec "$LINK_NS" bash -c "exec 3<>/dev/tcp/127.0.0.1/$port" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "the mirror in the namespace did not start: $(cat "$downloads.mirror.log")" >&2
  return 1
}

stop_link() {
  [ -n "$LINK_MIRROR_PID" ] && kill "$LINK_MIRROR_PID" 2>/dev/null || true
  [ -n "$LINK_MIRROR_HTTPS_PID" ] && kill "$LINK_MIRROR_HTTPS_PID" 2>/dev/null || true
  LINK_MIRROR_PID=; LINK_MIRROR_HTTPS_PID=
  [ -n "$LINK_NS" ] && rm -rf "/etc/netns/$LINK_NS"
  [ -n "$LINK_RELAY_PID" ] && kill "$LINK_RELAY_PID" 2>/dev/null || true
  LINK_RELAY_PID=
  if [ -n "${SSHD_PID:-}" ]; then
    pkill -P "$SSHD_PID" 2>/dev/null || true
    kill "$SSHD_PID" 2>/dev/null || true
    wait "$SSHD_PID" 2>/dev/null || true
    SSHD_PID=
  fi
  [ -n "$LINK_DEV" ] && ip link del "$LINK_DEV" 2>/dev/null || true
  [ -n "$LINK_NS" ] && ip netns del "$LINK_NS" 2>/dev/null || true
  LINK_DEV=; LINK_NS=
}
