# Shared by scripts/test, scripts/demo and scripts/bench: installing
# Debian packages, and a throwaway OpenSSH
# server on a loopback port, standing in for a VPS, with its own host key
# and an authorized client key. Source it, then `start_sshd DIR`.

missing_of() {
  # missing_of CMD=PACKAGE ...: the packages whose command is not there.
  local pair cmd
  for pair in "$@"; do
    cmd=${pair%%=*}
    command -v "$cmd" >/dev/null 2>&1 || [ -e "$cmd" ] || echo "${pair#*=}"
  done | sort -u
}

need_packages() {
  # need_packages CMD=PACKAGE ...: install from Debian what is missing.
  # Two passes: installing one package can remove another (this machine's
  # qemu-utils from backports is removed by Debian 12's qemu-system-x86),
  # and the second pass puts Debian 12's back.
  local missing=() attempt made
  for attempt in 1 2; do
    mapfile -t missing < <(missing_of "$@")
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing ${missing[*]} from Debian's packages" >&2
    # Installing openssh-server must not start a system sshd on port 22.
    made=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made=1
    fi
    if [ "$attempt" = 1 ]; then apt-get update -qq; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ -n "$made" ]; then rm -f /usr/sbin/policy-rc.d; fi
  done
  mapfile -t missing < <(missing_of "$@")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "still missing after apt-get install: ${missing[*]}; install them and run again" >&2
    return 1
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# sshd_setup DIR PORT ADDRESS: a host key, a client key it authorizes, and
# DIR/sshd_config listening on ADDRESS:PORT.
sshd_setup() {
  local dir=$1 port=$2 addr=$3
  mkdir -p "$dir" /run/sshd
  rm -f "$dir/host_key" "$dir/host_key.pub" "$dir/client_key" "$dir/client_key.pub"
  ssh-keygen -q -t ed25519 -N '' -C drydock-host -f "$dir/host_key"
  ssh-keygen -q -t ed25519 -N '' -C drydock-client -f "$dir/client_key"
  cp "$dir/client_key.pub" "$dir/authorized_keys"
  cat > "$dir/sshd_config" <<CFG
Port $port
ListenAddress $addr
HostKey $dir/host_key
AuthorizedKeysFile $dir/authorized_keys
PidFile $dir/sshd.pid
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
LogLevel ERROR
# blocksync (scripts/bench-link) opens files over SFTP.
Subsystem sftp internal-sftp
CFG
}

# start_sshd DIR: sets SSHD_PID, PORT, KEY (client key), HOST.
start_sshd() {
  local dir=$1
  PORT=$(free_port)
  sshd_setup "$dir" "$PORT" 127.0.0.1
  /usr/sbin/sshd -D -e -f "$dir/sshd_config" 2>"$dir/sshd.log" &
  SSHD_PID=$!
  wait_port 127.0.0.1 "$PORT"
  KEY=$dir/client_key
  HOST=root@127.0.0.1:$PORT
}

# wait_port ADDRESS PORT: until something listens there (10 s at most).
wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
}

stop_sshd() {
  [ -n "${SSHD_PID:-}" ] || return 0
  pkill -P "$SSHD_PID" 2>/dev/null || true
  kill "$SSHD_PID" 2>/dev/null || true
  wait "$SSHD_PID" 2>/dev/null || true
}

event() {
  # event FILE TYPE [KEY]: from drydock's --json event stream in FILE (one
  # JSON object per line), the last event of TYPE as JSON, or its KEY (for
  # "result", KEY is a field of the command's result). Nothing if none.
  python3 - "$@" <<'PY'
import json, sys
path, kind = sys.argv[1], sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else None
found = None
for line in open(path):
    try:
        v = json.loads(line)
    except ValueError:
        continue
    if v.get("type") == kind:
        found = v
if found is not None:
    if kind == "result":
        found = found["result"]
    if key is None:
        print(json.dumps(found))
    elif found.get(key) is not None:
        print(found[key])
PY
}
