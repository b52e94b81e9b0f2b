#!/usr/bin/env bash
# Cross-build the agent for an ARM board with Debian's toolchain (see cross/README.md).
#
#   cross/build.sh aarch64-unknown-linux-gnu            # the edge-profile agent
#   cross/build.sh aarch64-unknown-linux-gnu --test     # and run the agent's unit tests under qemu-user
#   cross/build.sh armv7-unknown-linux-gnueabihf
#   cross/build.sh aarch64-unknown-linux-gnu --profile dev --test   # what CI does: the agent and
#                                                       # its tests share one build of the crates
#
# Output: target/cross/TARGET/PROFILE/flotilla-agent (edge: stripped, LTO; dev's directory is
# `debug`). Builds only the agent and the crates it needs; the target directory is separate from
# the host's so neither rebuilds the other.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
usage="usage: cross/build.sh TARGET [--profile edge|dev|release] [--test]"
target=${1:?$usage}
shift
profile=edge
mode=
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=${2:?$usage}; shift 2 ;;
        --test) mode=--test; shift ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
bash "$here/setup.sh" "$target"
case "$target" in
    aarch64-unknown-linux-gnu) arch=arm64; gnu=aarch64-linux-gnu; runner="qemu-aarch64-static -L /" ;;
    armv7-unknown-linux-gnueabihf) arch=armhf; gnu=arm-linux-gnueabihf; runner="qemu-arm-static -L /usr/arm-linux-gnueabihf" ;;
esac
# Debian's cargo and rustc, not rustup's (which has no std for these targets here).
export PATH="/usr/bin:$PATH"
unset RUSTUP_TOOLCHAIN
unset RUSTC RUSTDOC CARGO
upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
under=${target//-/_}
export "CARGO_TARGET_${upper}_LINKER=$gnu-gcc"
# --cfg flotilla_cross leaves out the agent's tests (and dev-dependencies) that need a control
# plane: only the unit tests run under qemu, and the server is not built for ARM. The agent
# itself is the same with or without it; setting it for both keeps one build of the crates.
export "CARGO_TARGET_${upper}_RUSTFLAGS=--sysroot $here/sysroot/$arch/usr --cfg flotilla_cross"
export "CARGO_TARGET_${upper}_RUNNER=$runner"
export "CC_${under}=$gnu-gcc" "AR_${under}=$gnu-ar"
export CARGO_TARGET_DIR="$root/target/cross"
cd "$root"
start=$(date +%s)
cargo build --locked --profile "$profile" --target "$target" -p flotilla-agent --bin flotilla-agent
dir=$profile
[ "$profile" = dev ] && dir=debug
bin="$CARGO_TARGET_DIR/$target/$dir/flotilla-agent"
echo "built $bin: $(stat -c %s "$bin") bytes in $(( $(date +%s) - start )) s" >&2
if [ "$mode" = "--test" ]; then
    start=$(date +%s)
    cargo test --locked --target "$target" -p flotilla-agent --lib
    echo "unit tests under $runner: $(( $(date +%s) - start )) s" >&2
fi
