#!/usr/bin/env bash
# Builds the Linux test guest from Debian packages only (no other downloads), for QEMU guests
# (docs/qemu.md): Debian's cloud kernel, unpacked with dpkg-deb -x (not installed), and an
# initramfs with busybox-static and redis-server (with its libraries), which /init starts on
# port 6379 after bringing up virtio-net (QEMU user networking: 10.0.2.15, gateway 10.0.2.2).
#   out/vmlinuz, out/initrd.gz      the guest (guests/linux/out, or the directory given)
# Boots to /init in about 2 s and has redis answering PING in about 4-5 s under TCG, -m 512:
#   qemu-system-x86_64 -nodefaults -machine pc -m 512M -kernel out/vmlinuz -initrd out/initrd.gz \
#     -append "console=ttyS0 quiet" -serial stdio -display none \
#     -netdev user,id=n0,hostfwd=tcp:127.0.0.1:16379-:6379 -device virtio-net-pci,netdev=n0
# Usage: guests/linux/build.sh [OUTDIR]   (needs apt-get; the packages are fetched with apt-get download)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(mkdir -p "${1:-$here/out}" && cd "${1:-$here/out}" && pwd)"
work="$out/work"
rm -rf "$work" && mkdir -p "$work/debs" "$work/x" "$work/root"
cd "$work/debs"

# The cloud kernel's versioned package (the metapackage only depends on it).
kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -1)"
[ -n "$kernel_pkg" ] || { echo "build.sh: cannot find the cloud kernel package (apt-get update first?)" >&2; exit 1; }
packages=("$kernel_pkg" busybox-static redis-tools liblzf1 libjemalloc2 libatomic1 libstdc++6 libgcc-s1 libc6 libssl3 libsystemd0 libcap2 liblz4-1 liblzma5 libzstd1 libgcrypt20 libgpg-error0)
apt-get download -o APT::Sandbox::User=root "${packages[@]}" >/dev/null
for deb in *.deb; do dpkg-deb -x "$deb" "$work/x"; done

x="$work/x"; root="$work/root"
busybox="$x/bin/busybox"
kver="$(ls "$x/lib/modules" | head -1)"
cp "$x/boot/vmlinuz-$kver" "$out/vmlinuz"

mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,data,lib/modules,lib64,usr/bin}
cp "$busybox" "$root/bin/busybox"
# redis-server is redis-check-rdb under another name (Debian's redis-tools ships the binary).
cp "$x/usr/bin/redis-check-rdb" "$root/usr/bin/redis-server"
# Its libraries, resolved against the unpacked packages (not the host's), and the loader.
libdirs="$x/lib/x86_64-linux-gnu:$x/usr/lib/x86_64-linux-gnu"
mkdir -p "$root/lib/x86_64-linux-gnu"
while read -r lib; do
  [ -n "$lib" ] || continue
  found=""
  for d in $x/lib/x86_64-linux-gnu $x/usr/lib/x86_64-linux-gnu; do
    if [ -e "$d/$lib" ]; then cp -L "$d/$lib" "$root/lib/x86_64-linux-gnu/$lib"; found=1; break; fi
  done
  [ -n "$found" ] || { echo "build.sh: redis needs $lib, which none of the unpacked packages has (add its package above)" >&2; exit 1; }
done < <(LD_LIBRARY_PATH="$libdirs" ldd "$root/usr/bin/redis-server" | awk '/=>/ {print $1}')
cp -L "$x/lib64/ld-linux-x86-64.so.2" "$root/lib64/" 2>/dev/null || cp -L "$x/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$root/lib64/"
# virtio-net and what it needs, in dependency order (the .deb ships no modules.dep).
mods=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net)
for m in "${mods[@]}"; do
  f="$(find "$x/lib/modules/$kver" -name "$m.ko*" | head -1)"
  [ -n "$f" ] && cp "$f" "$root/lib/modules/"
done
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo 1 > /proc/sys/vm/overcommit_memory   # redis asks for it
echo "livemig-linux: init"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net; do
  for f in /lib/modules/$m.ko*; do [ -e "$f" ] || continue; case "$f" in *.xz) xz -dc "$f" > /tmp/m.ko; insmod /tmp/m.ko;; *) insmod "$f";; esac; done
done
ip link set lo up; ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
echo "livemig-linux: network up"
cd /data && /usr/bin/redis-server --bind 0.0.0.0 --port 6379 --protected-mode no --save '' --appendonly no --daemonize no &
echo "livemig-linux: redis started"
# A heartbeat on the console: after a migration it goes on counting from where it was.
i=0; while true; do i=$((i+1)); echo "livemig-linux: alive $i"; sleep 1; done
INIT
chmod +x "$root/init"
(cd "$root" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -9 > "$out/initrd.gz")
rm -rf "$work"
echo "$out/vmlinuz"
echo "$out/initrd.gz"
