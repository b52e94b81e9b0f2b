#!/usr/bin/env python3
"""Build small, real ONNX fixtures for Flotilla from scikit-learn's bundled digits data.

Deterministic (fixed seeds, single-threaded BLAS). No network: `load_digits()` ships
inside the scikit-learn wheel.

Outputs (next to this script):
  digits_cnn.onnx            f32 CNN, input `input` [N,1,8,8], output `probabilities` [N,10]
  digits_cnn_int8_qdq.onnx   int8 QDQ version made by onnxruntime.quantization.quantize_static
  digits_test.json           20 labelled held-out samples (2 per class) with reference outputs
  digits_baseline.npy        float32 [K,1,8,8], the whole held-out set (drift baseline)
  digits_cnn_fc_retrained.onnx
                             digits_cnn.onnx with only the last layer (Gemm `fc`) fine-tuned on
                             frozen features of "drifted" training images (x' = clip(0.6x+0.35, 0, 1));
                             made last, with its own seed, so the files above do not change

Usage:
  python3 -m pip install -r examples/models/requirements.txt
  python3 examples/models/make_digits.py
"""

import os

# Single-threaded BLAS so float summation order (and hence the trained weights) is reproducible.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

OUT_DIR = os.path.dirname(os.path.abspath(__file__))
F32_PATH = os.path.join(OUT_DIR, "digits_cnn.onnx")
INT8_PATH = os.path.join(OUT_DIR, "digits_cnn_int8_qdq.onnx")
TEST_JSON = os.path.join(OUT_DIR, "digits_test.json")
BASELINE_NPY = os.path.join(OUT_DIR, "digits_baseline.npy")
FC_RETRAINED_PATH = os.path.join(OUT_DIR, "digits_cnn_fc_retrained.onnx")

SEED = 0
OPSET = 13
IR_VERSION = 7  # IR 7 is the IR version that introduced opset 13; read by onnxruntime and tract.
C1 = 8  # conv channels
EPOCHS = 30
BATCH = 32
LR = 3e-3
N_CALIB = 200
PER_CLASS = 2
# last-layer retraining after simulated camera drift (runs after everything above is written)
RETRAIN_SEED = 1
RETRAIN_EPOCHS = 10
RETRAIN_BATCH = 32
RETRAIN_LR = 1e-3
DRIFT_GAIN, DRIFT_OFFSET = 0.6, 0.35


def drift(x):
    """Simulated camera drift: brightness/contrast shift x' = clip(0.6*x + 0.35, 0, 1)."""
    return np.clip(DRIFT_GAIN * x + DRIFT_OFFSET, 0.0, 1.0)


# ----------------------------------------------------------------------------- data
def load_data():
    d = load_digits()
    x = (d.images.astype(np.float64) / 16.0).reshape(-1, 1, 8, 8)  # [0,1], NCHW
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=SEED)
    return x_tr, x_te, y_tr, y_te


# ----------------------------------------------------------------------------- numpy CNN
# Conv 3x3 (1->C1, pad 1) -> Relu -> MaxPool 2x2/2 -> Flatten -> Gemm (C1*4*4 -> 10) -> Softmax


def im2col(x):
    """x: [N,1,8,8] -> patches [N,64,9] for a 3x3 kernel with pad 1, stride 1."""
    n = x.shape[0]
    xp = np.pad(x[:, 0], ((0, 0), (1, 1), (1, 1)))
    cols = np.empty((n, 8, 8, 9), dtype=x.dtype)
    k = 0
    for di in range(3):
        for dj in range(3):
            cols[:, :, :, k] = xp[:, di : di + 8, dj : dj + 8]
            k += 1
    return cols.reshape(n, 64, 9)


def init_params(rng):
    w1 = rng.normal(0.0, np.sqrt(2.0 / 9.0), size=(C1, 1, 3, 3))
    b1 = np.zeros(C1)
    fan_in = C1 * 16
    w2 = rng.normal(0.0, np.sqrt(1.0 / fan_in), size=(10, fan_in))  # Gemm B, transB=1
    b2 = np.zeros(10)
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2}


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def forward(p, x, cache=False):
    n = x.shape[0]
    cols = im2col(x)  # [N,64,9]
    conv = cols @ p["w1"].reshape(C1, 9).T + p["b1"]  # [N,64,C1]
    conv = conv.transpose(0, 2, 1).reshape(n, C1, 8, 8)  # NCHW
    relu = np.maximum(conv, 0)
    win = relu.reshape(n, C1, 4, 2, 4, 2)
    pool = win.max(axis=(3, 5))  # [N,C1,4,4]
    flat = pool.reshape(n, -1)  # same (c,h,w) order as ONNX Flatten
    logits = flat @ p["w2"].T + p["b2"]
    probs = softmax(logits)
    if cache:
        return probs, (cols, conv, win, pool, flat)
    return probs


def backward(p, y, probs, cache):
    cols, conv, win, pool, flat = cache
    n = y.shape[0]
    dlogits = probs.copy()
    dlogits[np.arange(n), y] -= 1.0
    dlogits /= n  # mean cross-entropy
    g = {"w2": dlogits.T @ flat, "b2": dlogits.sum(0)}
    dflat = dlogits @ p["w2"]
    dpool = dflat.reshape(pool.shape)
    # route each window's gradient to its first max (ONNX/ORT MaxPool picks one element too)
    w4 = win.transpose(0, 1, 2, 4, 3, 5).reshape(n, C1, 4, 4, 4)
    onehot = np.eye(4, dtype=bool)[w4.argmax(-1)]  # [N,C1,4,4,4]
    mask = onehot.reshape(n, C1, 4, 4, 2, 2).transpose(0, 1, 2, 4, 3, 5)
    drelu = (mask * dpool[:, :, :, None, :, None]).reshape(n, C1, 8, 8)
    dconv = drelu * (conv > 0)
    dconv_r = dconv.reshape(n, C1, 64).transpose(0, 2, 1)  # [N,64,C1]
    g["w1"] = np.einsum("npc,npk->ck", dconv_r, cols).reshape(C1, 1, 3, 3)
    g["b1"] = dconv_r.sum(axis=(0, 1))
    return g


def train(x_tr, y_tr):
    rng = np.random.default_rng(SEED)
    p = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(v) for k, v in p.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    t = 0
    n = x_tr.shape[0]
    for epoch in range(EPOCHS):
        order = rng.permutation(n)
        loss_sum = 0.0
        for s in range(0, n, BATCH):
            idx = order[s : s + BATCH]
            probs, cache = forward(p, x_tr[idx], cache=True)
            loss_sum += -np.log(probs[np.arange(len(idx)), y_tr[idx]] + 1e-12).sum()
            g = backward(p, y_tr[idx], probs, cache)
            t += 1
            for k in p:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                mh = m[k] / (1 - b1**t)
                vh = v[k] / (1 - b2**t)
                p[k] -= LR * mh / (np.sqrt(vh) + eps)
        if epoch % 5 == 4 or epoch == EPOCHS - 1:
            acc = (forward(p, x_tr).argmax(1) == y_tr).mean()
            print(f"  epoch {epoch + 1:2d}: train loss {loss_sum / n:.4f}, train acc {acc:.4f}")
    return p


def grad_check(rng):
    """Finite-difference check of the hand-written backward pass on a tiny batch."""
    p = init_params(rng)
    x = rng.random((4, 1, 8, 8))
    y = np.array([0, 3, 7, 9])

    def loss(pp):
        pr = forward(pp, x)
        return -np.log(pr[np.arange(4), y]).mean()

    probs, cache = forward(p, x, cache=True)
    g = backward(p, y, probs, cache)
    worst = 0.0
    for k in p:
        flat = p[k].reshape(-1)
        for i in range(0, flat.size, max(1, flat.size // 7)):
            old = flat[i]
            flat[i] = old + 1e-6
            lp = loss(p)
            flat[i] = old - 1e-6
            lm = loss(p)
            flat[i] = old
            num = (lp - lm) / 2e-6
            worst = max(worst, abs(num - g[k].reshape(-1)[i]))
    assert worst < 1e-6, f"gradient check failed: {worst}"
    print(f"gradient check ok (max abs err {worst:.2e})")


# ----------------------------------------------------------------------------- ONNX
def export_onnx(p, acc, path):
    f32 = {k: v.astype(np.float32) for k, v in p.items()}
    inits = [
        numpy_helper.from_array(f32["w1"], "conv.weight"),
        numpy_helper.from_array(f32["b1"], "conv.bias"),
        numpy_helper.from_array(f32["w2"], "fc.weight"),
        numpy_helper.from_array(f32["b2"], "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["conv_out"], name="conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
        helper.make_node("MaxPool", ["relu_out"], ["pool_out"], name="pool",
                         kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool_out"], ["features"], name="flatten", axis=1),
        # Last layer kept as a separate Gemm (Y = features @ fc.weight^T + fc.bias) so a
        # trainer can retrain only this layer on `features` [N,128].
        helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc",
                         alpha=1.0, beta=1.0, transA=0, transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
        doc_string="8x8 digit classifier: Conv3x3(1->8,pad1)-Relu-MaxPool2x2-Flatten-Gemm(128->10)-Softmax",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="flotilla-examples-make_digits",
        producer_version="1",
        ir_version=IR_VERSION,
        doc_string=(
            "Small CNN trained in numpy on scikit-learn load_digits (pixels/16 in [0,1]), "
            f"stratified 75/25 split seed {SEED}. Held-out accuracy {acc:.4f}."
        ),
    )
    model.model_version = 1
    helper.set_model_props(model, {
        "heldout_accuracy": f"{acc:.6f}",
        "dataset": "sklearn.datasets.load_digits, x/16, stratified 75/25 split, random_state=0",
        "input_scaling": "pixel/16.0",
        "labels": "0,1,2,3,4,5,6,7,8,9",
        "retrainable_last_layer": "fc (Gemm, input tensor 'features' [N,128], transB=1)",
    })
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return model


def ort_session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_ort(path, x):
    return ort_session(path).run(["probabilities"], {"input": x.astype(np.float32)})[0]


class DigitsReader(CalibrationDataReader):
    def __init__(self, x):
        self.items = [{"input": x[i : i + 1].astype(np.float32)} for i in range(len(x))]
        self.it = iter(self.items)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.items)


def describe(path):
    m = onnx.load(path)

    def shape(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    ops = []
    for n in m.graph.node:
        ops.append(n.op_type if not n.domain else f"{n.domain}:{n.op_type}")
    print(f"  {os.path.basename(path)}: ir_version={m.ir_version} opsets="
          f"{[(o.domain or 'ai.onnx', o.version) for o in m.opset_import]}")
    for vi in m.graph.input:
        print(f"    input  {vi.name} {TensorProto.DataType.Name(vi.type.tensor_type.elem_type)} {shape(vi)}")
    for vi in m.graph.output:
        print(f"    output {vi.name} {TensorProto.DataType.Name(vi.type.tensor_type.elem_type)} {shape(vi)}")
    print(f"    nodes ({len(ops)}): {' -> '.join(ops)}")


# ----------------------------------------------------------------------------- fc retraining
def features(p, x):
    """The frozen part of the network: Conv-Relu-MaxPool-Flatten, i.e. ONNX tensor `features` [N,128]."""
    return forward(p, x, cache=True)[1][-1]


def retrain_fc(x_tr, y_tr, x_te, y_te):
    """Fine-tune only fc.weight/fc.bias of digits_cnn.onnx on drifted training images.

    Reads the f32 model back from disk, so the frozen layers are exactly the shipped ones.
    Every node and every other initializer is copied unchanged; only the two fc tensors,
    the model doc_string and metadata_props are replaced.
    """
    print(f"retraining last layer (fc) on drifted training images (x' = clip({DRIFT_GAIN}*x + {DRIFT_OFFSET}, 0, 1)) ...")
    base = onnx.load(F32_PATH)
    inits = {i.name: numpy_helper.to_array(i) for i in base.graph.initializer}
    p32 = {"w1": inits["conv.weight"], "b1": inits["conv.bias"],
           "w2": inits["fc.weight"], "b2": inits["fc.bias"]}

    # frozen features, computed in f32 like the deployed model; the fc layer is trained in float64
    f_tr = features(p32, drift(x_tr).astype(np.float32)).astype(np.float64)
    w = p32["w2"].astype(np.float64)  # start from the current fc weights
    b = p32["b2"].astype(np.float64)
    params = {"w": w, "b": b}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    rng = np.random.default_rng(RETRAIN_SEED)
    n, t = f_tr.shape[0], 0
    for epoch in range(RETRAIN_EPOCHS):
        order = rng.permutation(n)
        loss_sum = 0.0
        for s in range(0, n, RETRAIN_BATCH):
            idx = order[s : s + RETRAIN_BATCH]
            probs = softmax(f_tr[idx] @ params["w"].T + params["b"])
            loss_sum += -np.log(probs[np.arange(len(idx)), y_tr[idx]] + 1e-12).sum()
            d = probs.copy()
            d[np.arange(len(idx)), y_tr[idx]] -= 1.0
            d /= len(idx)
            g = {"w": d.T @ f_tr[idx], "b": d.sum(0)}
            t += 1
            for k in params:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                params[k] -= RETRAIN_LR * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
        if epoch % 5 == 4 or epoch == RETRAIN_EPOCHS - 1:
            acc = (softmax(f_tr @ params["w"].T + params["b"]).argmax(1) == y_tr).mean()
            print(f"  epoch {epoch + 1:2d}: drifted train loss {loss_sum / n:.4f}, drifted train acc {acc:.4f}")

    q32 = dict(p32, w2=params["w"].astype(np.float32), b2=params["b"].astype(np.float32))
    x_clean = x_te.astype(np.float32)
    x_drift = drift(x_te).astype(np.float32)

    def acc_of(pp, x):
        return float((forward(pp, x).argmax(1) == y_te).mean())

    accs = {
        "orig_clean": acc_of(p32, x_clean), "orig_drift": acc_of(p32, x_drift),
        "fc_clean": acc_of(q32, x_clean), "fc_drift": acc_of(q32, x_drift),
    }

    model = onnx.ModelProto()
    model.CopyFrom(base)
    for init in model.graph.initializer:
        if init.name == "fc.weight":
            init.CopyFrom(numpy_helper.from_array(q32["w2"], "fc.weight"))
        elif init.name == "fc.bias":
            init.CopyFrom(numpy_helper.from_array(q32["b2"], "fc.bias"))
    model.doc_string = (
        "digits_cnn.onnx with only the last layer (Gemm 'fc': fc.weight, fc.bias) retrained after simulated "
        f"camera drift x' = clip({DRIFT_GAIN}*x + {DRIFT_OFFSET}, 0, 1): Adam on cross-entropy, {RETRAIN_EPOCHS} epochs, "
        f"lr {RETRAIN_LR}, batch {RETRAIN_BATCH}, seed {RETRAIN_SEED}, on frozen 'features' of the drifted training "
        "images, starting from the original fc weights. All other initializers and nodes are unchanged. "
        f"Held-out accuracy clean {accs['fc_clean']:.4f}, drifted {accs['fc_drift']:.4f} "
        f"(original model: clean {accs['orig_clean']:.4f}, drifted {accs['orig_drift']:.4f})."
    )
    del model.metadata_props[:]
    helper.set_model_props(model, {
        "heldout_accuracy": f"{accs['fc_clean']:.6f}",
        "heldout_accuracy_drifted": f"{accs['fc_drift']:.6f}",
        "base_model": "digits_cnn.onnx",
        "base_heldout_accuracy": f"{accs['orig_clean']:.6f}",
        "base_heldout_accuracy_drifted": f"{accs['orig_drift']:.6f}",
        "retrained_layers": "fc (fc.weight, fc.bias)",
        "drift_transform": f"x' = clip({DRIFT_GAIN}*x + {DRIFT_OFFSET}, 0, 1) on pixel/16 inputs",
        "dataset": "sklearn.datasets.load_digits, x/16, stratified 75/25 split, random_state=0",
        "input_scaling": "pixel/16.0",
        "labels": "0,1,2,3,4,5,6,7,8,9",
        "retrainable_last_layer": "fc (Gemm, input tensor 'features' [N,128], transB=1)",
    })
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, FC_RETRAINED_PATH)

    # structural check: only fc.weight / fc.bias differ from the base model
    saved = onnx.load(FC_RETRAINED_PATH)
    assert [n.SerializeToString() for n in saved.graph.node] == [n.SerializeToString() for n in base.graph.node]
    assert saved.graph.doc_string == base.graph.doc_string
    changed = [a.name for a, c in zip(base.graph.initializer, saved.graph.initializer, strict=True)
               if a.SerializeToString() != c.SerializeToString()]
    assert sorted(changed) == ["fc.bias", "fc.weight"], changed
    base_g, saved_g = onnx.GraphProto(), onnx.GraphProto()
    base_g.CopyFrom(base.graph)
    saved_g.CopyFrom(saved.graph)
    del base_g.initializer[:], saved_g.initializer[:]
    assert base_g.SerializeToString() == saved_g.SerializeToString()

    # onnxruntime vs numpy f32 forward, on clean and drifted held-out images
    worst = 0.0
    for name, x in (("clean", x_clean), ("drifted", x_drift)):
        probs_np = forward(q32, x).astype(np.float32)
        probs_ort = run_ort(FC_RETRAINED_PATH, x)
        worst = max(worst, float(np.abs(probs_ort - probs_np).max()))
        acc_ort = float((probs_ort.argmax(1) == y_te).mean())
        if acc_ort != float((probs_np.argmax(1) == y_te).mean()):
            sys.exit(f"fc-retrained: onnxruntime and numpy accuracies differ on {name} held-out")
    print(f"onnxruntime fc-retrained: max |ort - numpy| = {worst:.2e} (clean + drifted held-out)")
    if worst >= 1e-5:
        sys.exit(f"fc-retrained: onnxruntime and numpy disagree: {worst}")

    k = len(y_te)
    print(f"held-out accuracy ({k} images)     clean            drifted")
    for label, c, d in (("digits_cnn.onnx", accs["orig_clean"], accs["orig_drift"]),
                        ("digits_cnn_fc_retrained.onnx", accs["fc_clean"], accs["fc_drift"])):
        print(f"  {label:30s} {c:.4f} ({round(c * k):3d}/{k})  {d:.4f} ({round(d * k):3d}/{k})")
    if not accs["fc_drift"] > accs["orig_drift"] + 0.1:
        sys.exit("fc-retrained model does not clearly beat the original on drifted held-out images")
    return accs


# ----------------------------------------------------------------------------- main
def main():
    t0 = time.time()
    np.random.seed(SEED)
    x_tr, x_te, y_tr, y_te = load_data()
    print(f"data: train {x_tr.shape[0]}, held-out {x_te.shape[0]}")

    grad_check(np.random.default_rng(123))

    print("training numpy CNN ...")
    p = train(x_tr, y_tr)
    print(f"  trained in {time.time() - t0:.1f}s")

    # numpy f32 forward on the held-out set
    p32 = {k: v.astype(np.float32) for k, v in p.items()}
    x_te32 = x_te.astype(np.float32)
    probs_np = forward(p32, x_te32).astype(np.float32)
    acc_np = float((probs_np.argmax(1) == y_te).mean())
    print(f"numpy f32 held-out accuracy: {acc_np:.4f}")
    if acc_np < 0.95:
        sys.exit(f"held-out accuracy {acc_np:.4f} < 0.95")

    export_onnx(p, acc_np, F32_PATH)
    probs_ort = run_ort(F32_PATH, x_te32)
    diff = float(np.abs(probs_ort - probs_np).max())
    acc_f32 = float((probs_ort.argmax(1) == y_te).mean())
    print(f"onnxruntime f32: held-out accuracy {acc_f32:.4f}, max |ort - numpy| = {diff:.2e}")
    if diff >= 1e-5:
        sys.exit(f"onnxruntime and numpy disagree: {diff}")
    if acc_f32 != acc_np:
        sys.exit("onnxruntime and numpy accuracies differ")

    # int8 QDQ via onnxruntime's static quantizer, calibrated on the first 200 training images
    with tempfile.TemporaryDirectory() as tmp:
        # quantize into a temp dir so no stray calibration artefacts land in OUT_DIR
        tmp_out = os.path.join(tmp, "q.onnx")
        quantize_static(
            F32_PATH,
            tmp_out,
            DigitsReader(x_tr[:N_CALIB]),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=False,
            calibrate_method=CalibrationMethod.MinMax,
            # ORT's default would also put Q/DQ after Softmax (Softmax is in its QOperator
            # registry, which quantize_static merges into the QDQ op list). tract 0.23.9's
            # declutter then folds DequantizeLinear->Softmax->QuantizeLinear into an
            # element-wise LookupTable, so every probability comes out as 1.0. Keep Softmax in
            # float: logits are still Q/DQ'd, probabilities are exact softmax of them.
            nodes_to_exclude=["softmax"],
        )
        qmodel = onnx.load(tmp_out)
    qmodel.doc_string = (
        "int8 QDQ version of digits_cnn.onnx made by onnxruntime.quantization.quantize_static "
        f"(QDQ, QInt8 activations+weights, per-tensor, MinMax calibration on {N_CALIB} training images; "
        "node 'softmax' excluded, so Softmax runs in float on dequantized logits)."
    )
    onnx.checker.check_model(qmodel)
    onnx.save(qmodel, INT8_PATH)
    probs_q = run_ort(INT8_PATH, x_te32)
    acc_int8 = float((probs_q.argmax(1) == y_te).mean())
    agree = float((probs_q.argmax(1) == probs_ort.argmax(1)).mean())
    print(f"onnxruntime int8 QDQ: held-out accuracy {acc_int8:.4f}, top-1 agreement with f32 {agree:.4f}, "
          f"max |q - f32| = {np.abs(probs_q - probs_ort).max():.3f}")
    # record accuracy in the int8 model too
    helper.set_model_props(qmodel, {
        "heldout_accuracy": f"{acc_int8:.6f}",
        "heldout_accuracy_f32": f"{acc_f32:.6f}",
        "dataset": "sklearn.datasets.load_digits, x/16, stratified 75/25 split, random_state=0",
        "input_scaling": "pixel/16.0",
        "labels": "0,1,2,3,4,5,6,7,8,9",
    })
    onnx.checker.check_model(qmodel)
    onnx.save(qmodel, INT8_PATH)

    # labelled test samples: first two correctly classified (by ORT f32) held-out samples per class
    pred = probs_ort.argmax(1)
    picked = {c: [] for c in range(10)}
    for i in range(len(y_te)):
        c = int(y_te[i])
        if pred[i] == c and len(picked[c]) < PER_CLASS:
            picked[c].append(i)
    order = sorted(i for v in picked.values() for i in v)  # held-out order
    assert len(order) == 10 * PER_CLASS
    samples = [
        {
            "label": int(y_te[i]),
            "heldout_index": int(i),
            "input": [float(v) for v in x_te32[i].reshape(-1)],
            "reference_probabilities": [float(v) for v in probs_ort[i]],
            "reference_class": int(pred[i]),
        }
        for i in order
    ]
    doc = {
        "description": "Labelled held-out samples for digits_cnn.onnx: input is 1x1x8x8 row-major, pixel/16 in [0,1]; "
                       "reference_probabilities from onnxruntime on the f32 model.",
        "selection": "first two correctly-classified held-out samples per class",
        "input_name": "input",
        "input_shape": [1, 1, 8, 8],
        "output_name": "probabilities",
        "heldout_size": int(len(y_te)),
        "heldout_accuracy_f32": round(acc_f32, 6),
        "heldout_accuracy_int8": round(acc_int8, 6),
        "samples": samples,
    }
    with open(TEST_JSON, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")

    np.save(BASELINE_NPY, x_te32)

    print("models:")
    describe(F32_PATH)
    describe(INT8_PATH)
    # Last step, after every file above is written: its own seed, reads digits_cnn.onnx back from disk.
    retrain_fc(x_tr, y_tr, x_te, y_te)
    describe(FC_RETRAINED_PATH)

    print("files:")
    for path in (F32_PATH, INT8_PATH, TEST_JSON, BASELINE_NPY, FC_RETRAINED_PATH):
        with open(path, "rb") as f:
            h = hashlib.sha256(f.read()).hexdigest()
        print(f"  {os.path.basename(path):28s} {os.path.getsize(path):8d} bytes  sha256 {h}")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
