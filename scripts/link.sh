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

  sshd_setup "$dir" 22 10.213.0.2
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
  # Fields 16 and 17 of /proc/PID/stat: cutime and cstime, in clock ticks.
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf "%.2f\n", ($14 + $15) / hz }' "/proc/$SSHD_PID/stat"
}

stop_link() {
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
