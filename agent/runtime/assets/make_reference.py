"""Reference outputs for the TFLite backend tests (run by fetch.sh; prints JSON on stdout).

    PYTHONPATH=<dir with ai_edge_litert> python3 make_reference.py MODELS_DIR > reference.json

Each model gets a signature (from the model's own shape_signature; -1 dims become symbols) and a
few cases: inputs drawn from a fixed seed and the outputs of Google's TFLite interpreter
(ai-edge-litert) with its built-in CPU kernels and no default delegate (no XNNPACK). Cases run in
order on one interpreter, so stateful models (micro-wakeword keeps its streaming state in
resource variables) are checked over a sequence of calls. A case may use another input shape than
the one before; the interpreter is resized, as the Rust backends must do per request.
"""

import json
import sys
from pathlib import Path

import numpy as np
from ai_edge_litert import __version__ as litert_version
from ai_edge_litert.interpreter import Interpreter, OpResolverType

DTYPES = {np.float32: "FP32", np.int8: "INT8", np.uint8: "UINT8", np.int32: "INT32", np.int64: "INT64"}

# model file (relative to MODELS_DIR) -> one list of input shapes per case (single-input models)
CASES = {
    # dynamic [-1, -1] audio input: three lengths on one interpreter, back and forth
    "openwakeword/melspectrogram.tflite": [[1, 1280], [1, 640], [1, 1280]],
    # dynamic batch
    "openwakeword/embedding_model.tflite": [[1, 76, 32, 1], [2, 76, 32, 1]],
    "openwakeword/alexa.tflite": [[1, 16, 96]],
    "openwakeword/hey_jarvis.tflite": [[1, 16, 96]],  # has an IF op
    "openwakeword/hey_mycroft.tflite": [[1, 16, 96]],
    "openwakeword/hey_rhasspy.tflite": [[1, 16, 96]],
    "openwakeword/okay_nabu.tflite": [[1, 16, 96]],
    # int8 in, uint8 out, streaming state in resource variables: three calls in a row
    "microwakeword/alexa.tflite": [[1, 3, 40], [1, 3, 40], [1, 3, 40]],
}


def spec(detail, symbol_prefix):
    shape = [int(d) if d >= 0 else f"{symbol_prefix}_{i}" for i, d in enumerate(detail["shape_signature"])]
    return {"name": detail["name"], "dtype": DTYPES[detail["dtype"]], "shape": shape}


def random_input(rng, dtype, shape, case):
    if dtype == np.float32:
        return rng.standard_normal(shape).astype(np.float32)
    info = np.iinfo(dtype)
    if case == 0:
        # Quiet features first: micro-wakeword's output is non-zero here, zero on noise.
        return np.full(shape, info.min, dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


def tensor(detail_name, value):
    return {
        "name": detail_name,
        "dtype": DTYPES[value.dtype.type],
        "shape": list(value.shape),
        "data": value.flatten().tolist(),
    }


def main(models_dir):
    rng = np.random.default_rng(20251121)
    models = []
    for rel, cases in CASES.items():
        it = Interpreter(
            model_path=str(models_dir / rel),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        (inp,) = it.get_input_details()
        outs = it.get_output_details()
        signature = {
            "format": "tflite",
            "inputs": [spec(inp, "in0")],
            "outputs": [spec(o, f"out{i}") for i, o in enumerate(outs)],
        }
        runs = []
        current = None  # melspectrogram cannot even allocate at its placeholder shape [1, 1]
        for case, shape in enumerate(cases):
            if shape != current:
                it.resize_tensor_input(inp["index"], shape)
                it.allocate_tensors()
                current = shape
            x = random_input(rng, inp["dtype"], shape, case)
            it.set_tensor(inp["index"], x)
            it.invoke()
            runs.append(
                {
                    "inputs": [tensor(inp["name"], x)],
                    "outputs": [tensor(o["name"], it.get_tensor(o["index"])) for o in outs],
                }
            )
        models.append({"file": rel, "signature": signature, "cases": runs})
    doc = {
        "reference": f"ai-edge-litert {litert_version}, built-in CPU kernels, no default delegates",
        "models": models,
    }
    json.dump(doc, sys.stdout)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
