#!/usr/bin/env bash
# Builds the guest image into $1: vmlinuz, initrd.img (tiny busybox initramfs), root.img (ext4).
# Why so hand-made: boot to ssh-ready under TCG must stay far below the ~62 s of a systemd
# Debian. Direct kernel boot + a busybox initramfs that only loads what mounting root needs +
# busybox init on the root fs (no systemd, no udev) gets there.
# Expects $1/keys/{ssh_host_ed25519_key,ssh_host_ed25519_key.pub,id_ed25519.pub} (made by
# testbed/image.py) so the host pins the guest's host key. Runs as root (mmdebstrap root mode).
set -euo pipefail
out=$(realpath "$1")
here=$(cd "$(dirname "$0")" && pwd)
SUITE=bookworm
MIRROR=${TESTBED_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,openssh-server,ndctl,daxctl,libpmem1,fio,nbdkit,nbdkit-plugin-python,nbd-client,e2fsprogs,kmod,iproute2,busybox-static
# Drivers a VM never has: dropping them halves the root disk.
DROP_MODULES="drivers/gpu drivers/media drivers/net/wireless drivers/net/ethernet drivers/infiniband
              drivers/staging drivers/bluetooth drivers/usb drivers/hid drivers/iio drivers/scsi
              drivers/isdn drivers/input/touchscreen drivers/mtd sound net/wireless net/bluetooth
              net/mac80211 fs/nfs fs/nfsd fs/ocfs2 fs/gfs2 fs/xfs fs/btrfs fs/smb fs/ceph"
# Modules the initramfs needs to mount the root disk (deps are resolved from modules.dep).
INITRD_MODULES="virtio_pci virtio_blk ext4"

step() { echo "==> $*"; }
root=$out/rootfs
rm -rf "$root"

step "mmdebstrap $SUITE minbase ($PACKAGES)"
mmdebstrap --variant=minbase --mode=root --include="$PACKAGES" \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook='chroot "$1" sh -ec "
      cd /var/tmp
      kpkg=\$(apt-cache depends linux-image-amd64 | sed -n \"s/.*Depends: \\(linux-image-[0-9].*\\)/\\1/p\" | head -n1)
      apt-get download -q \$kpkg
      apt-get clean; rm -rf /var/lib/apt/lists/*"' \
  "$SUITE" "$root" "deb $MIRROR $SUITE main"

step "kernel: unpacking the linux-image package (not installed: no initramfs-tools run)"
# Unpacked aside, not over /: the package's lib/ would replace the merged-/usr lib symlink.
kdir=$(mktemp -d -p "$out")
dpkg-deb -x "$root"/var/tmp/linux-image-*.deb "$kdir"
rm -f "$root"/var/tmp/linux-image-*.deb
kver=$(ls "$kdir/lib/modules")
mkdir -p "$root/usr/lib/modules"
mv "$kdir/lib/modules/$kver" "$root/usr/lib/modules/"
cp "$kdir/boot/vmlinuz-$kver" "$out/vmlinuz"
rm -rf "$kdir"
step "kernel $kver: trimming modules, depmod"
for d in $DROP_MODULES; do rm -rf "$root/lib/modules/$kver/kernel/$d"; done
depmod -b "$root" "$kver"

step "initramfs"
ird=$(mktemp -d -p "$out")
trap 'rm -rf "$ird"' EXIT
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$root/bin/busybox" "$ird/bin/busybox"
# modprobe --show-depends prints every dependency in load order ("insmod /path args").
for m in $INITRD_MODULES; do
  modprobe -d "$root" -S "$kver" --show-depends "$m"
done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' | while read -r ko; do
  ko=${ko#"$root"}
  name=$(basename "$ko")
  case $name in
    *.ko.xz) xz -dc "$root$ko" >"$ird/lib/modules/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$root$ko" >"$ird/lib/modules/${name%.zst}"; name=${name%.zst} ;;
    *) cp "$root$ko" "$ird/lib/modules/$name" ;;
  esac
  echo "$name" >>"$ird/lib/modules/order"
done
install -m 0755 "$here/initramfs-init" "$ird/init"
(cd "$ird" && find . | sort | cpio --quiet -o -H newc -R 0:0) >"$out/initrd.img"

step "root filesystem configuration"
cp -a "$here/rootfs/." "$root/"
ln -sf /bin/busybox "$root/sbin/init"
# ndctl ships a modprobe hook that runs `ndctl load-keys` before libnvdimm: slow, and no keys.
rm -f "$root/etc/modprobe.d/nvdimm-security.conf"
rm -f "$root"/etc/ssh/ssh_host_*
install -m 0600 "$out/keys/ssh_host_ed25519_key" "$root/etc/ssh/ssh_host_ed25519_key"
install -m 0644 "$out/keys/ssh_host_ed25519_key.pub" "$root/etc/ssh/ssh_host_ed25519_key.pub"
install -d -m 0700 "$root/root/.ssh"
install -m 0600 "$out/keys/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
echo testbed >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 testbed\n' >"$root/etc/hosts"
: >"$root/etc/fstab"
echo "$kver" >"$out/kernel-version"

step "root.img (ext4 from directory)"
mb=$(( $(du -sm "$root" | cut -f1) * 5 / 4 + 256 ))
rm -f "$out/root.img"
mkfs.ext4 -q -L testbed-root -E root_owner=0:0 -d "$root" "$out/root.img" "${mb}M"
rm -rf "$root"
step "done: $(du -sh --apparent-size "$out/root.img" | cut -f1) root.img, kernel $kver"
