# Run inside the base fixture booted by vm-fixtures/build-variant (bash -s,
# LAYOUT=lvm|xfs|btrfs): lays out the blank second disk /dev/vdb as LAYOUT,
# copies the running system onto it and makes it boot on its own (as vda).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
log=/root/build.log
d=/dev/vdb n=/mnt/new
# Nothing the packages bring starts while they are installed.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
case $LAYOUT in
  lvm) pkgs=lvm2 ;;
  xfs) pkgs=xfsprogs ;;
  btrfs) pkgs=btrfs-progs ;;
  *) echo "relayout: unknown layout $LAYOUT" >&2; exit 2 ;;
esac
# The running system's initramfs is thrown away: it is made once, for the
# new root, in its chroot below (under TCG each run takes minutes).
conf=/etc/initramfs-tools/update-initramfs.conf
cp $conf /root/update-initramfs.conf
sed -i 's/^update_initramfs=.*/update_initramfs=no/' $conf
{ apt-get -q update && apt-get -y -q install --no-install-recommends rsync $pkgs && apt-get clean; } > $log 2>&1 \
  || { tail -20 $log >&2; echo "relayout: apt-get install rsync $pkgs failed" >&2; exit 1; }
tar -C / --no-overwrite-dir -xf /root/app.tar && rm /root/app.tar
mkdir -p $n
case $LAYOUT in
  lvm)
    printf 'label: dos\n1MiB,512MiB,L,*\n,,8e\n' | sfdisk -q $d; udevadm settle
    mkfs.ext4 -q -L boot ${d}1
    pvcreate -q ${d}2; vgcreate -q vps ${d}2
    lvcreate -q -y -L 256M -n swap vps; lvcreate -q -y -l 100%FREE -n root vps
    mkfs.ext4 -q -L root /dev/vps/root; mkswap -L swap /dev/vps/swap > /dev/null
    mount /dev/vps/root $n; mkdir $n/boot; mount ${d}1 $n/boot
    fstab="/dev/mapper/vps-root / ext4 errors=remount-ro 0 1
UUID=$(blkid -s UUID -o value ${d}1) /boot ext4 defaults 0 2
/dev/mapper/vps-swap none swap sw 0 0"
    want='root=/dev/mapper/vps-root' ;;
  xfs)
    printf 'label: dos\n1MiB,,L,*\n' | sfdisk -q $d; udevadm settle
    mkfs.xfs -q -L root ${d}1; mount ${d}1 $n
    u=$(blkid -s UUID -o value ${d}1)
    fstab="UUID=$u / xfs defaults 0 0"
    want="root=UUID=$u" ;;
  btrfs)
    printf 'label: dos\n1MiB,,L,*\n' | sfdisk -q $d; udevadm settle
    mkfs.btrfs -q -L root ${d}1
    mount ${d}1 $n
    btrfs subvolume create $n/@ > /dev/null; btrfs subvolume create $n/@home > /dev/null
    umount $n
    mount -o subvol=@ ${d}1 $n; mkdir $n/home; mount -o subvol=@home ${d}1 $n/home
    u=$(blkid -s UUID -o value ${d}1)
    fstab="UUID=$u / btrfs defaults,subvol=@ 0 0
UUID=$u /home btrfs defaults,subvol=@home 0 0"
    want='rootflags=subvol=@' ;;
esac
# -x: the running root only (not /proc, /run, /mnt/new, ...).
rsync -aHAXx --exclude=/root/build.log / $n/
echo "$fstab" > $n/etc/fstab
cp /root/update-initramfs.conf $n$conf; rm -f $n/root/update-initramfs.conf
rm -f /usr/sbin/policy-rc.d $n/usr/sbin/policy-rc.d
for m in dev dev/pts proc sys run; do mount --bind /$m $n/$m; done
chroot $n sh -c 'grub-install --target=i386-pc /dev/vdb && update-initramfs -u -k all && update-grub' >> $log 2>&1 \
  || { tail -30 $log >&2; echo "relayout: grub-install, update-initramfs or update-grub in the new root failed" >&2; exit 1; }
grep -q -- "$want" $n/boot/grub/grub.cfg || { echo "relayout: grub.cfg has no $want" >&2; exit 1; }
test -f $n/boot/grub/i386-pc/normal.mod
sync
umount -R $n
