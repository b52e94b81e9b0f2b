#!/usr/bin/env bash
# Installs and fetches what building and boot-testing ARM images needs, from Debian only:
#   - the host tools: sfdisk (fdisk), mke2fs/debugfs (e2fsprogs), mkfs.vfat and mcopy (dosfstools,
#     mtools: boot partitions), cpio, kmod (modinfo), and
#     qemu-system-arm from bookworm-backports (bookworm's 7.2 conflicts with the machine's
#     qemu-utils 10 from backports; the backports suite is added to apt with the mirror the
#     existing sources already use, never a name written here);
#   - for the target (arm64 only so far): Debian's kernel, unpacked from its .deb, with an
#     initramfs that loads the virtio and ext4 modules and switches to the image's root, and
#     busybox-static, the image's shell and init.
#
#   firmware-images/setup.sh [arm64]     -> firmware-images/parts/arm64/{vmlinuz,initrd.img,busybox}
#
# Idempotent (a stamp records the kernel and busybox versions); needs root when something is
# missing. firmware-images/parts/ is git-ignored.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
arch=${1:-arm64}
[ "$arch" = arm64 ] || { echo "firmware-images/setup.sh: only arm64 images are boot-tested so far" >&2; exit 2; }
export DEBIAN_FRONTEND=noninteractive

have() { dpkg -s "$1" >/dev/null 2>&1; }
need=()
for p in fdisk e2fsprogs dosfstools mtools cpio kmod xz-utils; do have "$p" || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
    echo "firmware-images/setup.sh: installing ${need[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v qemu-system-aarch64 >/dev/null; then
    # bookworm-backports, on the mirror the bookworm suite already comes from.
    list=/etc/apt/sources.list.d/flotilla-backports.sources
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        mirror=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ {print u; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
        [ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
        [ -n "$mirror" ] || { echo "firmware-images/setup.sh: no bookworm mirror in apt's sources to take backports from" >&2; exit 1; }
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$mirror" > "$list"
        echo "firmware-images/setup.sh: added bookworm-backports from $mirror ($list)" >&2
    fi
    apt-get update -qq
    echo "firmware-images/setup.sh: installing qemu-system-arm from bookworm-backports" >&2
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-arm >/dev/null
fi

# The arm64 package lists (cross/setup.sh adds the architecture too).
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    apt-get update -qq
fi

parts="$here/parts/$arch"
kpkg=$(apt-cache depends "linux-image-$arch:$arch" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "firmware-images/setup.sh: apt knows no linux-image-$arch:$arch (apt-get update?)" >&2; exit 1; }
kver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')
bver=$(apt-cache policy "busybox-static:$arch" | awk '/Candidate:/ {print $2}')
want="$kpkg $kver busybox $bver"
if [ "$(cat "$parts/.version" 2>/dev/null)" = "$want" ]; then
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp" # apt-get download runs as _apt
echo "firmware-images/setup.sh: fetching $kpkg ($kver) and busybox-static ($bver)" >&2
(cd "$tmp" && apt-get download -qq "$kpkg" "busybox-static:$arch" >/dev/null)
dpkg -x "$tmp"/linux-image-*.deb "$tmp/kernel"
dpkg -x "$tmp"/busybox-static_*.deb "$tmp/busybox"
release=$(ls "$tmp/kernel/lib/modules")
rm -rf "$parts"
mkdir -p "$parts"
cp "$tmp/kernel/boot/vmlinuz-$release" "$parts/vmlinuz"
cp "$tmp/busybox/bin/busybox" "$parts/busybox"

# The initramfs: busybox, the modules a virtio disk and network with an ext4 root need (with
# their dependencies, in load order), and an /init that loads them and switches root.
mods="$tmp/kernel/lib/modules/$release"
order=()
add_module() {
    local name=$1 file dep
    for m in "${order[@]}"; do [ "$(basename "$m")" = "$name.ko" ] && return 0; done
    file=$(find "$mods" -name "$name.ko" -o -name "$name.ko.xz" | head -1)
    if [ -z "$file" ]; then return 0; fi # built in
    for dep in $(modinfo -F depends "$file" | tr ',' ' '); do add_module "$dep"; done
    order+=("$file")
}
for m in virtio_pci virtio_blk virtio_net crc32c_generic ext4 virtio_rng rtc_pl031; do add_module "$m"; done
root="$tmp/initrd"
mkdir -p "$root/bin" "$root/lib/modules" "$root/dev" "$root/proc" "$root/sys" "$root/newroot"
cp "$parts/busybox" "$root/bin/busybox"
for a in sh mount umount insmod switch_root sleep cat mkdir echo mknod; do ln -s busybox "$root/bin/$a"; done
: > "$root/lib/modules/order"
for f in "${order[@]}"; do
    base=$(basename "$f")
    case "$base" in
        *.xz) xz -dc "$f" > "$root/lib/modules/${base%.xz}"; base=${base%.xz} ;;
        *) cp "$f" "$root/lib/modules/$base" ;;
    esac
    echo "$base" >> "$root/lib/modules/order"
done
cat > "$root/init" <<'EOF'
#!/bin/sh
# Flotilla's initramfs: load the drivers for a virtio disk and network, mount the image's root
# partition (root=/dev/vda1 by default) and hand over to its init.
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m 2>/dev/null; done
root=/dev/vda1
init=/sbin/init
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) root=${arg#root=} ;; init=*) init=${arg#init=} ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if ! mount -t ext4 "$root" /newroot; then
    echo "initramfs: cannot mount $root; dropping to a shell"
    exec sh
fi
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot "$init"
EOF
chmod 755 "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$parts/initrd.img"
echo "$want" > "$parts/.version"
echo "firmware-images/setup.sh: kernel $release, ${#order[@]} modules in the initramfs ($(stat -c %s "$parts/initrd.img") bytes), busybox $bver" >&2
