# Run inside a copy of the base fixture booted by vm-fixtures/build-variant
# (bash -s, VARIANT=docker|postgres|nm|cloud): installs and sets up what
# the variant runs, on that disk.
set -euo pipefail
trap 'echo "inplace: line $LINENO failed: $BASH_COMMAND" >&2' ERR
export DEBIAN_FRONTEND=noninteractive
log=/root/build.log
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
# The image's initramfs stays the one it booted with (a trigger would make
# it again for busybox or a hook, under TCG for many minutes).
conf=/etc/initramfs-tools/update-initramfs.conf
cp $conf /root/update-initramfs.conf
sed -i 's/^update_initramfs=.*/update_initramfs=no/' $conf
install() {
  { apt-get -q update && apt-get -y -q install --no-install-recommends "$@" && apt-get clean; } > $log 2>&1 \
    || { tail -20 $log >&2; echo "inplace: apt-get install $* failed" >&2; exit 1; }
}
# A bounded wait for a condition (a command), N tries a second apart.
wait_for() { local n=$1; shift; for _ in $(seq "$n"); do "$@" && return 0; sleep 1; done; echo "inplace: gave up waiting for: $*" >&2; return 1; }
tar -C / --no-overwrite-dir -xf /root/app.tar && rm /root/app.tar
case $VARIANT in
  docker)
    # apparmor: docker loads its profile with apparmor_parser on a kernel
    # with AppArmor (Debian's), or refuses to start a container.
    install docker.io apparmor busybox-static
    systemctl start docker
    img=/root/zoo-image; mkdir -p $img/bin
    cp /bin/busybox $img/bin/
    for a in sh cat tail cut sleep; do ln -s busybox $img/bin/$a; done
    tar -C $img -c . | docker import - drydock-zoo/busybox:1 > /dev/null
    rm -rf $img
    docker volume create zoo-vol > /dev/null
    docker run -d --name zoo-writer --restart=always -v zoo-vol:/data drydock-zoo/busybox:1 \
      sh -c 'n=$(tail -n 1 /data/log 2>/dev/null | cut -d" " -f1); n=${n:-0}; b=$(cat /proc/sys/kernel/random/boot_id); while :; do n=$((n + 1)); echo "$n $b" >> /data/log; sleep 1; done' > /dev/null
    wait_for 60 test -s /var/lib/docker/volumes/zoo-vol/_data/log
    systemctl is-enabled docker.service containerd.service > /dev/null
    ;;
  postgres)
    install postgresql
    systemctl start postgresql
    wait_for 120 su postgres -c 'psql -XAtqc "select 1"' > /dev/null 2>&1
    su postgres -c 'createdb zoo'
    su postgres -c "psql -Xq zoo -c 'create table ticks (n bigint primary key, boot text not null, at timestamptz not null default now())'"
    cat > /usr/local/bin/drydock-zoo-db <<'APP'
#!/bin/sh
# Inserts (n, boot id) into zoo.ticks every second, n one more than the last.
boot=$(cat /proc/sys/kernel/random/boot_id)
while :; do
  psql -Xq zoo -c "insert into ticks (n, boot) select coalesce(max(n), 0) + 1, '$boot' from ticks" || exit 1
  sleep 1
done
APP
    chmod 755 /usr/local/bin/drydock-zoo-db
    printf '[Unit]\nDescription=the zoo database app: a row every second\nRequires=postgresql.service\nAfter=postgresql.service\n[Service]\nUser=postgres\nExecStart=/usr/local/bin/drydock-zoo-db\nRestart=on-failure\nRestartSec=2\n[Install]\nWantedBy=multi-user.target\n' \
      > /etc/systemd/system/drydock-zoo-db.service
    systemctl enable --now drydock-zoo-db.service 2> /dev/null
    wait_for 60 sh -c '[ "$(su postgres -c "psql -XAtq zoo -c \"select count(*) from ticks\"")" -gt 0 ]'
    ;;
  nm)
    install network-manager
    systemctl disable systemd-networkd.service systemd-networkd.socket systemd-networkd-wait-online.service 2> /dev/null
    rm -f /etc/systemd/network/50-dhcp.network
    printf '[connection]\nid=wired\ntype=ethernet\nautoconnect=true\n\n[ipv4]\nmethod=auto\n\n[ipv6]\nmethod=auto\n' \
      > /etc/NetworkManager/system-connections/wired.nmconnection
    chmod 600 /etc/NetworkManager/system-connections/wired.nmconnection
    systemctl is-enabled NetworkManager.service > /dev/null
    ;;
  cloud)
    # One apt run: systemd-resolved turns /etc/resolv.conf into its stub,
    # which answers nothing until the next boot starts it.
    install cloud-init netplan.io systemd-resolved
    rm -f /etc/systemd/network/50-dhcp.network
    # No ifupdown, as in Debian's cloud images: with it installed,
    # cloud-init renders the seed's network into
    # /etc/network/interfaces.d (its ENI renderer comes first) instead
    # of netplan, and the first run of this fixture did so.
    { apt-get -y -q purge ifupdown && apt-get -y -q autoremove --purge; } > $log 2>&1 \
      || { tail -20 $log >&2; echo "inplace: purging ifupdown failed" >&2; exit 1; }
    rm -f /etc/network/interfaces.d/50-cloud-init
    mkdir -p /var/lib/cloud/seed/nocloud
    printf 'instance-id: drydock-zoo-cloud\nlocal-hostname: drydock-vps\n' > /var/lib/cloud/seed/nocloud/meta-data
    printf '#cloud-config\ndisable_root: false\nssh_deletekeys: false\napt:\n  preserve_sources_list: true\n' > /var/lib/cloud/seed/nocloud/user-data
    printf 'version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: "52:54:00:c1:0d:01"\n    set-name: eth0\n    dhcp4: true\n' > /var/lib/cloud/seed/nocloud/network-config
    systemctl is-enabled cloud-init.service systemd-resolved.service > /dev/null
    ;;
  openrc)
    # OpenRC as the init system (Debian's openrc, run by sysvinit-core's
    # init, as Devuan and Debian without systemd do; the same OpenRC as
    # Alpine's and Gentoo's). The network by ifupdown with ISC dhclient
    # (the networking script, sysinit runlevel), the kernel's eth0 name.
    install sysvinit-core openrc ifupdown isc-dhcp-client
    rm -f /etc/systemd/network/50-dhcp.network
    printf 'source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n' > /etc/network/interfaces
    sed -i 's/^GRUB_CMDLINE_LINUX=.*/GRUB_CMDLINE_LINUX="net.ifnames=0"/' /etc/default/grub
    grep -q '^GRUB_CMDLINE_LINUX="net.ifnames=0"' /etc/default/grub || echo 'GRUB_CMDLINE_LINUX="net.ifnames=0"' >> /etc/default/grub
    update-grub > /dev/null 2>&1
    grep -q 'net.ifnames=0' /boot/grub/grub.cfg
    # The zoo's app as an OpenRC service, in the default runlevel (the
    # shell as its command: start-stop-daemon stops it by its executable).
    printf '#!/sbin/openrc-run\ndescription="the zoo app: a numbered line every second"\ncommand=/bin/sh\ncommand_args=/usr/local/bin/drydock-zoo-app\ncommand_background=yes\npidfile=/run/drydock-zoo-app.pid\n' \
      > /etc/init.d/drydock-zoo-app
    chmod 755 /etc/init.d/drydock-zoo-app
    for s in ssh cron; do [ -e /etc/runlevels/default/$s ] || rc-update add $s default > /dev/null; done
    rc-update add drydock-zoo-app default > /dev/null
    [ -e /etc/runlevels/sysinit/networking ] || [ -e /etc/runlevels/boot/networking ] || rc-update add networking boot > /dev/null
    # sysvinit's init is PID 1 at the next boot, not systemd.
    case "$(readlink -f /sbin/init)" in *systemd*) echo "inplace: /sbin/init is still systemd" >&2; exit 1;; esac
    rc-update show -v | sed 's/^/inplace: /' >&2
    ;;
  *) echo "inplace: unknown variant $VARIANT" >&2; exit 2 ;;
esac
rm -f /usr/sbin/policy-rc.d
mv /root/update-initramfs.conf $conf
sync
