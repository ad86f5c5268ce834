# Shared by scripts/demo and scripts/bench: a throwaway OpenSSH
# server on a loopback port, standing in for a VPS, with its own host key
# and an authorized client key. Source it, then `start_sshd DIR`.

need_packages() {
  # need_packages CMD=PACKAGE ...: install from Debian what is missing.
  local missing=() pair cmd pkg
  for pair in "$@"; do
    cmd=${pair%%=*}; pkg=${pair#*=}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "$cmd" ] || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${missing[*]} from Debian's packages" >&2
  local made=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ -n "$made" ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_sshd DIR: sets SSHD_PID, PORT, KEY (client key), HOST.
start_sshd() {
  local dir=$1
  mkdir -p "$dir" /run/sshd
  rm -f "$dir/host_key" "$dir/host_key.pub" "$dir/client_key" "$dir/client_key.pub"
  ssh-keygen -q -t ed25519 -N '' -C drydock-host -f "$dir/host_key"
  ssh-keygen -q -t ed25519 -N '' -C drydock-client -f "$dir/client_key"
  cp "$dir/client_key.pub" "$dir/authorized_keys"
  PORT=$(free_port)
  cat > "$dir/sshd_config" <<CFG
Port $PORT
ListenAddress 127.0.0.1
HostKey $dir/host_key
AuthorizedKeysFile $dir/authorized_keys
PidFile $dir/sshd.pid
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
LogLevel ERROR
CFG
  /usr/sbin/sshd -D -e -f "$dir/sshd_config" 2>"$dir/sshd.log" &
  SSHD_PID=$!
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
  done
  KEY=$dir/client_key
  HOST=root@127.0.0.1:$PORT
}

stop_sshd() {
  [ -n "${SSHD_PID:-}" ] || return 0
  pkill -P "$SSHD_PID" 2>/dev/null || true
  kill "$SSHD_PID" 2>/dev/null || true
  wait "$SSHD_PID" 2>/dev/null || true
}
