#!/usr/bin/env bash
# Installs what cross builds of the agent need, from Debian only (rustup cannot download other
# targets on the project's machines): Debian's rustc/cargo 1.96 ("-web" packages), the standard
# library of the target built by Debian (libstd-rust-web-dev of that architecture, unpacked into
# cross/sysroot/ARCH), the GNU cross compilers, and qemu-user to run what was built.
#
#   cross/setup.sh aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf
#
# Idempotent; needs root when something is missing. Never names a mirror: download URLs come
# from apt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
target=${1:?usage: cross/setup.sh aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf}
case "$target" in
    aarch64-unknown-linux-gnu) arch=arm64; gnu=aarch64-linux-gnu ;;
    armv7-unknown-linux-gnueabihf) arch=armhf; gnu=arm-linux-gnueabihf ;;
    *) echo "cross/setup.sh: unsupported target $target" >&2; exit 2 ;;
esac
export DEBIAN_FRONTEND=noninteractive
need=()
for p in rustc-web cargo-web "gcc-$gnu" "libc6-dev-$arch-cross" qemu-user-static; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "cross/setup.sh: installing ${need[*]}" >&2
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# aarch64 binaries run under `qemu-aarch64-static -L /` with Debian's multiarch libc (the
# cross libc under /usr/aarch64-linux-gnu makes qemu hang on the first thread).
if [ "$arch" = arm64 ] && ! dpkg -s libc6:arm64 >/dev/null 2>&1; then
    dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends libc6:arm64 libgcc-s1:arm64 >/dev/null
fi

rustc_version=$(dpkg-query -W -f '${Version}' rustc-web)
sysroot="$here/sysroot/$arch"
stamp="$sysroot/.version"
if [ "$(cat "$stamp" 2>/dev/null)" != "$rustc_version" ]; then
    # The arm64 package list is there once arm64 is a foreign architecture; armhf's is not (adding
    # it breaks `apt-get update` on some mirrors), so its URL is arm64's with the arch swapped:
    # the same source version is built for both.
    dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt-get update -qq; }
    uri=$(apt-get download --print-uris "libstd-rust-web-dev:arm64" | awk '{print $1}' | tr -d "'")
    [ -n "$uri" ] || { echo "cross/setup.sh: apt knows no libstd-rust-web-dev:arm64" >&2; exit 1; }
    uri=${uri/_arm64.deb/_${arch}.deb}
    deb_version=$(basename "$uri" | cut -d_ -f2 | sed 's/%2b/+/g; s/%7e/~/g')
    if [ "$deb_version" != "$rustc_version" ]; then
        echo "cross/setup.sh: libstd-rust-web-dev is $deb_version but rustc-web is $rustc_version; they must match (apt-get update, then upgrade rustc-web)" >&2
        exit 1
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "cross/setup.sh: fetching the $arch standard library ($deb_version)" >&2
    if command -v curl >/dev/null; then curl -fsSL -o "$tmp/std.deb" "$uri"; else wget -q -O "$tmp/std.deb" "$uri"; fi
    rm -rf "$sysroot"
    mkdir -p "$sysroot"
    dpkg -x "$tmp/std.deb" "$sysroot"
    echo "$rustc_version" > "$stamp"
fi
ls -d "$sysroot/usr/lib/rustlib/$target/lib" >/dev/null
