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
                             made after the files above, with its own seed, so they do not change
  digits_cnn_wide.onnx       f32 CNN with the same input/output, whose last layer `fc` is only 1.4% of the
                             weights: 3 Conv3x3+Relu (1->32->64->128, last stride 2), GlobalAveragePool,
                             Flatten (`features` [N,128]), Gemm `fc`, Softmax. The conv weights are fixed
                             random (He init, seed 2), a stand-in for a backbone pretrained elsewhere; only
                             fc is trained (softmax regression on the frozen features)
  digits_cnn_wide_fc_retrained.onnx
                             digits_cnn_wide.onnx with only fc fine-tuned on drifted training images, same
                             recipe as digits_cnn_fc_retrained.onnx; both wide files are made after all of
                             the above, with their own seed, so the files above do not change
  digits_cnn_int8_qdq_softmax.onnx
                             a deliberately BAD fixture: digits_cnn.onnx quantized exactly like
                             digits_cnn_int8_qdq.onnx but with Softmax quantized too (ORT's default op set,
                             no nodes excluded). onnxruntime runs it correctly; tract 0.23 folds
                             DequantizeLinear->Softmax->QuantizeLinear into a LookupTable and silently returns
                             wrong probabilities (all 1.0), so a device's golden self-test must refuse it
  digits_cnn_int8_qdq_softmax_golden.json
                             JSON array of 2 golden cases for that model: a KServe v2 infer request
                             ({"inputs": [...]}, the first two samples of digits_test.json as [1,1,8,8] FP32)
                             plus "outputs": the `probabilities` [1,10] onnxruntime computes for them.
                             Both are made last, after all of the above (no randomness), so those do not change

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
WIDE_PATH = os.path.join(OUT_DIR, "digits_cnn_wide.onnx")
WIDE_FC_RETRAINED_PATH = os.path.join(OUT_DIR, "digits_cnn_wide_fc_retrained.onnx")
SOFTMAX_Q_PATH = os.path.join(OUT_DIR, "digits_cnn_int8_qdq_softmax.onnx")
SOFTMAX_Q_GOLDEN = os.path.join(OUT_DIR, "digits_cnn_int8_qdq_softmax_golden.json")
N_GOLDEN = 2  # golden cases for the Softmax-quantized model: the first samples of digits_test.json

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
# wide model whose last layer is a small share of the weights (runs after everything above is written)
WIDE_SEED = 2  # backbone init and fc training; its fc retraining reuses the RETRAIN_* settings above
WIDE_CONVS = ((32, 1), (64, 1), (128, 2))  # (out channels, stride), each 3x3 pad 1 + Relu
WIDE_FC_EPOCHS = 200
WIDE_FC_BATCH = 32
WIDE_FC_LR = 1e-2


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


def fit_fc(f, y, w0, b0, epochs, batch, lr, seed, tag, print_every):
    """Softmax regression of the last layer on frozen features `f` [n,d]: Adam on mean cross-entropy.

    Starts from w0 [10,d] / b0 [10]; trains in float64; returns (w, b) as float64.
    """
    params = {"w": w0.astype(np.float64), "b": b0.astype(np.float64)}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    rng = np.random.default_rng(seed)
    n, t = f.shape[0], 0
    for epoch in range(epochs):
        order = rng.permutation(n)
        loss_sum = 0.0
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            probs = softmax(f[idx] @ params["w"].T + params["b"])
            loss_sum += -np.log(probs[np.arange(len(idx)), y[idx]] + 1e-12).sum()
            d = probs.copy()
            d[np.arange(len(idx)), y[idx]] -= 1.0
            d /= len(idx)
            g = {"w": d.T @ f[idx], "b": d.sum(0)}
            t += 1
            for k in params:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                params[k] -= lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
        if epoch % print_every == print_every - 1 or epoch == epochs - 1:
            acc = (softmax(f @ params["w"].T + params["b"]).argmax(1) == y).mean()
            print(f"  epoch {epoch + 1:2d}: {tag} loss {loss_sum / n:.4f}, {tag} acc {acc:.4f}")
    return params["w"], params["b"]


def assert_only_fc_changed(base, saved):
    """Every node, the graph doc_string and every initializer except fc.weight/fc.bias are byte-identical."""
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
    w, b = fit_fc(f_tr, y_tr, p32["w2"], p32["b2"],  # start from the current fc weights
                  RETRAIN_EPOCHS, RETRAIN_BATCH, RETRAIN_LR, RETRAIN_SEED, "drifted train", 5)

    q32 = dict(p32, w2=w.astype(np.float32), b2=b.astype(np.float32))
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
    assert_only_fc_changed(base, saved)

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


# ----------------------------------------------------------------------------- wide model
# Conv3x3(1->32) -> Relu -> Conv3x3(32->64) -> Relu -> Conv3x3(64->128, stride 2) -> Relu
#   -> GlobalAveragePool -> Flatten (`features` [N,128]) -> Gemm `fc` (128->10) -> Softmax
# The conv weights are fixed random (He init, seeded): a stand-in for a backbone pretrained
# elsewhere. Only fc is trained here (softmax regression on the frozen features).


def conv2d(x, w, b, stride):
    """ONNX Conv with a 3x3 kernel, pads 1, the given stride. x [N,C,H,W], w [O,C,3,3] -> [N,O,H',W']."""
    n, c, h, wd = x.shape
    o = w.shape[0]
    ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.empty((n, ho, wo, c, 3, 3), dtype=x.dtype)
    for di in range(3):
        for dj in range(3):
            cols[:, :, :, :, di, dj] = xp[:, :, di : di + stride * ho : stride,
                                          dj : dj + stride * wo : stride].transpose(0, 2, 3, 1)
    out = cols.reshape(n * ho * wo, c * 9) @ w.reshape(o, c * 9).T + b
    return out.reshape(n, ho, wo, o).transpose(0, 3, 1, 2)


def wide_init_backbone(rng):
    p, cin = {}, 1
    for i, (cout, _) in enumerate(WIDE_CONVS, 1):
        p[f"conv{i}.weight"] = rng.normal(0.0, np.sqrt(2.0 / (cin * 9)), size=(cout, cin, 3, 3)).astype(np.float32)
        p[f"conv{i}.bias"] = np.zeros(cout, dtype=np.float32)
        cin = cout
    return p


def wide_features(p, x):
    """ONNX tensor `features` [N,128] of the wide model (numpy, in the dtype of p and x)."""
    h = x
    for i, (_, stride) in enumerate(WIDE_CONVS, 1):
        h = np.maximum(conv2d(h, p[f"conv{i}.weight"], p[f"conv{i}.bias"], stride), 0)
    return h.mean(axis=(2, 3))


def wide_forward(p, x):
    return softmax(wide_features(p, x) @ p["fc.weight"].T + p["fc.bias"])


def export_wide(p, acc, path):
    inits = [numpy_helper.from_array(p[k], k) for k in p]  # conv1..3 weight/bias, then fc.weight, fc.bias
    nodes, prev = [], "input"
    for i, (_, stride) in enumerate(WIDE_CONVS, 1):
        nodes.append(helper.make_node("Conv", [prev, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}_out"],
                                      name=f"conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                      strides=[stride, stride]))
        nodes.append(helper.make_node("Relu", [f"conv{i}_out"], [f"relu{i}_out"], name=f"relu{i}"))
        prev = f"relu{i}_out"
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["features"], name="flatten", axis=1),
        helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc",
                         alpha=1.0, beta=1.0, transA=0, transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn_wide",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
        doc_string="8x8 digit classifier: Conv3x3(1->32,pad1)-Relu-Conv3x3(32->64,pad1)-Relu-"
                   "Conv3x3(64->128,pad1,stride2)-Relu-GlobalAveragePool-Flatten-Gemm(128->10)-Softmax",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="flotilla-examples-make_digits",
        producer_version="1",
        ir_version=IR_VERSION,
        doc_string=(
            "Wide CNN for scikit-learn load_digits (pixels/16 in [0,1]), stratified 75/25 split seed "
            f"{SEED}. The conv weights are fixed random (He init, seed {WIDE_SEED}, zero biases), a stand-in "
            "for a backbone pretrained elsewhere; only fc was trained (softmax regression on the frozen "
            f"features, Adam, {WIDE_FC_EPOCHS} epochs, lr {WIDE_FC_LR}). Held-out accuracy {acc:.4f}."
        ),
    )
    model.model_version = 1
    helper.set_model_props(model, {
        "heldout_accuracy": f"{acc:.6f}",
        "dataset": "sklearn.datasets.load_digits, x/16, stratified 75/25 split, random_state=0",
        "input_scaling": "pixel/16.0",
        "labels": "0,1,2,3,4,5,6,7,8,9",
        "backbone": f"conv1..conv3 fixed random (He init, seed {WIDE_SEED}, zero biases), not trained",
        "retrainable_last_layer": "fc (Gemm, input tensor 'features' [N,128], transB=1)",
    })
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return model


def check_ort(path, p, x, y, label):
    """onnxruntime vs the numpy f32 forward pass; returns the onnxruntime accuracy."""
    probs_np = wide_forward(p, x).astype(np.float32)
    probs_ort = run_ort(path, x)
    diff = float(np.abs(probs_ort - probs_np).max())
    acc = float((probs_ort.argmax(1) == y).mean())
    print(f"  onnxruntime {os.path.basename(path)} {label}: accuracy {acc:.4f}, max |ort - numpy| = {diff:.2e}")
    if diff >= 1e-5:
        sys.exit(f"{path}: onnxruntime and numpy disagree: {diff}")
    if acc != float((probs_np.argmax(1) == y).mean()):
        sys.exit(f"{path}: onnxruntime and numpy accuracies differ on {label} held-out")
    return acc


def initializer_bytes(path):
    """Per-initializer payload bytes and the fc share of them."""
    m = onnx.load(path)
    total = sum(len(i.raw_data) for i in m.graph.initializer)
    n_params = sum(int(np.prod(i.dims)) for i in m.graph.initializer)
    print(f"  {os.path.basename(path)}: {os.path.getsize(path)} bytes file, {total} bytes of initializers, "
          f"{n_params} parameters")
    for i in m.graph.initializer:
        print(f"    {i.name:12s} {str(list(i.dims)):16s} {len(i.raw_data):8d} bytes  {100 * len(i.raw_data) / total:6.2f}%")
    fc = sum(len(i.raw_data) for i in m.graph.initializer if i.name.startswith("fc."))
    print(f"    fc.weight + fc.bias: {fc} bytes = {100 * fc / total:.2f}% of initializer bytes, "
          f"{100 * fc / os.path.getsize(path):.2f}% of the file")
    return fc, total


def fc_delta(base_path, new_path):
    """How many bytes a last-layer retrain really changes (payload, and file with doc/metadata restored)."""
    base, new = onnx.load(base_path), onnx.load(new_path)
    for name in ("fc.weight", "fc.bias"):
        a = next(i for i in base.graph.initializer if i.name == name)
        c = next(i for i in new.graph.initializer if i.name == name)
        nb = sum(x != y for x, y in zip(a.raw_data, c.raw_data, strict=True))
        nf = int((numpy_helper.to_array(a) != numpy_helper.to_array(c)).sum())
        print(f"  {name}: {nb} of {len(a.raw_data)} payload bytes differ ({nf} of {len(a.raw_data) // 4} floats)")
    new.doc_string = base.doc_string
    del new.metadata_props[:]
    new.metadata_props.extend(base.metadata_props)
    rb = new.SerializeToString()
    with open(base_path, "rb") as f:
        bb = f.read()
    assert len(rb) == len(bb)
    nd = sum(x != y for x, y in zip(rb, bb, strict=True))
    print(f"  {os.path.basename(new_path)} is {os.path.getsize(new_path)} bytes vs {len(bb)}; with the base "
          f"doc_string/metadata put back it is {len(rb)} bytes and differs from the base file in {nd} bytes")


def make_wide(x_tr, y_tr, x_te, y_te):
    """digits_cnn_wide.onnx (random frozen backbone, trained fc) and its fc-only drift retrain."""
    print("wide model: fixed random conv backbone, training fc only ...")
    p = wide_init_backbone(np.random.default_rng(WIDE_SEED))
    # frozen features computed in f32 like the deployed model; fc is trained in float64
    f_tr = wide_features(p, x_tr.astype(np.float32)).astype(np.float64)
    w, b = fit_fc(f_tr, y_tr, np.zeros((10, f_tr.shape[1])), np.zeros(10),
                  WIDE_FC_EPOCHS, WIDE_FC_BATCH, WIDE_FC_LR, WIDE_SEED, "train", 50)
    p["fc.weight"], p["fc.bias"] = w.astype(np.float32), b.astype(np.float32)
    x_clean = x_te.astype(np.float32)
    x_drift = drift(x_te).astype(np.float32)
    acc = float((wide_forward(p, x_clean).argmax(1) == y_te).mean())
    if acc < 0.85:
        sys.exit(f"wide model held-out accuracy {acc:.4f} < 0.85")
    export_wide(p, acc, WIDE_PATH)

    # fc-only retraining on drifted training images: same recipe as retrain_fc, on the model read back from disk
    print(f"wide model: retraining fc on drifted training images (x' = clip({DRIFT_GAIN}*x + {DRIFT_OFFSET}, 0, 1)) ...")
    base = onnx.load(WIDE_PATH)
    p32 = {i.name: numpy_helper.to_array(i) for i in base.graph.initializer}
    f_tr = wide_features(p32, drift(x_tr).astype(np.float32)).astype(np.float64)
    w, b = fit_fc(f_tr, y_tr, p32["fc.weight"], p32["fc.bias"],
                  RETRAIN_EPOCHS, RETRAIN_BATCH, RETRAIN_LR, RETRAIN_SEED, "drifted train", 5)
    q32 = dict(p32, **{"fc.weight": w.astype(np.float32), "fc.bias": b.astype(np.float32)})

    def acc_of(pp, x):
        return float((wide_forward(pp, x).argmax(1) == y_te).mean())

    accs = {
        "orig_clean": acc_of(p32, x_clean), "orig_drift": acc_of(p32, x_drift),
        "fc_clean": acc_of(q32, x_clean), "fc_drift": acc_of(q32, x_drift),
    }
    model = onnx.ModelProto()
    model.CopyFrom(base)
    for init in model.graph.initializer:
        if init.name in ("fc.weight", "fc.bias"):
            init.CopyFrom(numpy_helper.from_array(q32[init.name], init.name))
    model.doc_string = (
        "digits_cnn_wide.onnx with only the last layer (Gemm 'fc': fc.weight, fc.bias) retrained after simulated "
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
        "base_model": "digits_cnn_wide.onnx",
        "base_heldout_accuracy": f"{accs['orig_clean']:.6f}",
        "base_heldout_accuracy_drifted": f"{accs['orig_drift']:.6f}",
        "retrained_layers": "fc (fc.weight, fc.bias)",
        "drift_transform": f"x' = clip({DRIFT_GAIN}*x + {DRIFT_OFFSET}, 0, 1) on pixel/16 inputs",
        "dataset": "sklearn.datasets.load_digits, x/16, stratified 75/25 split, random_state=0",
        "input_scaling": "pixel/16.0",
        "labels": "0,1,2,3,4,5,6,7,8,9",
        "backbone": f"conv1..conv3 fixed random (He init, seed {WIDE_SEED}, zero biases), not trained",
        "retrainable_last_layer": "fc (Gemm, input tensor 'features' [N,128], transB=1)",
    })
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, WIDE_FC_RETRAINED_PATH)
    assert_only_fc_changed(base, onnx.load(WIDE_FC_RETRAINED_PATH))

    # onnxruntime vs numpy, both models, clean and drifted held-out images
    got = {
        "orig_clean": check_ort(WIDE_PATH, p32, x_clean, y_te, "clean"),
        "orig_drift": check_ort(WIDE_PATH, p32, x_drift, y_te, "drifted"),
        "fc_clean": check_ort(WIDE_FC_RETRAINED_PATH, q32, x_clean, y_te, "clean"),
        "fc_drift": check_ort(WIDE_FC_RETRAINED_PATH, q32, x_drift, y_te, "drifted"),
    }
    assert got == accs, (got, accs)
    k = len(y_te)
    print(f"held-out accuracy ({k} images)          clean            drifted")
    for label, c, d in (("digits_cnn_wide.onnx", accs["orig_clean"], accs["orig_drift"]),
                        ("digits_cnn_wide_fc_retrained.onnx", accs["fc_clean"], accs["fc_drift"])):
        print(f"  {label:35s} {c:.4f} ({round(c * k):3d}/{k})  {d:.4f} ({round(d * k):3d}/{k})")
    if not accs["fc_drift"] > accs["orig_drift"] + 0.1:
        sys.exit("wide fc-retrained model does not clearly beat the original on drifted held-out images")

    print("initializer bytes:")
    initializer_bytes(F32_PATH)
    initializer_bytes(WIDE_PATH)
    print("fc-only retrain deltas:")
    fc_delta(F32_PATH, FC_RETRAINED_PATH)
    fc_delta(WIDE_PATH, WIDE_FC_RETRAINED_PATH)
    return accs


# ----------------------------------------------------------------------------- Softmax-quantized (bad) fixture
def make_int8_softmax(x_tr, x_te32, y_te, probs_f32):
    """digits_cnn_int8_qdq_softmax.onnx and its golden cases (onnxruntime's outputs).

    Same quantize_static call as digits_cnn_int8_qdq.onnx except that no node is excluded, so
    onnxruntime's default op set also puts Q/DQ after Softmax. onnxruntime computes that model
    correctly; tract 0.23 does not (it returns wrong probabilities without an error), which is
    what the golden self-test has to catch. Deterministic, no randomness; reads only files
    already written (digits_cnn.onnx, digits_test.json).
    """
    print("int8 QDQ with Softmax quantized too (deliberately bad fixture for tract) ...")
    with tempfile.TemporaryDirectory() as tmp:
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
            # no nodes_to_exclude: ORT's default, Softmax is quantized as well
        )
        qmodel = onnx.load(tmp_out)
    ops = [n.op_type for n in qmodel.graph.node]
    sm = [n for n in qmodel.graph.node if n.op_type == "Softmax"]
    assert len(sm) == 1
    consumers = [n.op_type for n in qmodel.graph.node if sm[0].output[0] in n.input]
    if consumers != ["QuantizeLinear"]:
        sys.exit(f"expected Softmax to be followed by QuantizeLinear, got {consumers} (ops: {ops})")
    outs = [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in qmodel.graph.output]
    assert outs == [("probabilities", ["N", 10])], outs
    assert [i.name for i in qmodel.graph.input] == ["input"]

    qmodel.doc_string = (
        "DELIBERATELY BAD FIXTURE for runtimes that mis-handle quantized Softmax. int8 QDQ version of "
        "digits_cnn.onnx made by onnxruntime.quantization.quantize_static with the same settings as "
        f"digits_cnn_int8_qdq.onnx (QDQ, QInt8 activations+weights, per-tensor, MinMax calibration on {N_CALIB} "
        "training images) but with no nodes excluded, so Softmax is quantized too (QuantizeLinear/"
        "DequantizeLinear after it). onnxruntime runs it correctly; tract 0.23 folds "
        "DequantizeLinear->Softmax->QuantizeLinear into a LookupTable and returns wrong probabilities "
        "without an error. A golden self-test must refuse it on such a runtime."
    )
    onnx.checker.check_model(qmodel)
    onnx.save(qmodel, SOFTMAX_Q_PATH)
    probs_q = run_ort(SOFTMAX_Q_PATH, x_te32)
    acc_q = float((probs_q.argmax(1) == y_te).mean())
    acc_f32 = float((probs_f32.argmax(1) == y_te).mean())
    agree = float((probs_q.argmax(1) == probs_f32.argmax(1)).mean())
    k = len(y_te)
    print(f"  onnxruntime {os.path.basename(SOFTMAX_Q_PATH)}: held-out accuracy {acc_q:.4f} "
          f"({round(acc_q * k)}/{k}; f32 {acc_f32:.4f}), top-1 agreement with f32 {agree:.4f}, "
          f"max |q - f32| = {np.abs(probs_q - probs_f32).max():.3f}")
    if acc_q < acc_f32 - 0.02:
        sys.exit(f"Softmax-quantized model accuracy {acc_q:.4f} is not close to f32 {acc_f32:.4f}")
    helper.set_model_props(qmodel, {
        "heldout_accuracy": f"{acc_q:.6f}",
        "heldout_accuracy_f32": f"{acc_f32:.6f}",
        "dataset": "sklearn.datasets.load_digits, x/16, stratified 75/25 split, random_state=0",
        "input_scaling": "pixel/16.0",
        "labels": "0,1,2,3,4,5,6,7,8,9",
        "fixture_purpose": "bad on tract 0.23 (quantized Softmax computed wrongly, no error); "
                           "golden self-test must refuse it",
    })
    onnx.checker.check_model(qmodel)
    onnx.save(qmodel, SOFTMAX_Q_PATH)

    # golden cases: the first N_GOLDEN samples of digits_test.json, each its own [1,1,8,8] batch,
    # with the outputs onnxruntime (the reference runtime) computes for this model
    with open(TEST_JSON) as f:
        samples = json.load(f)["samples"][:N_GOLDEN]
    sess = ort_session(SOFTMAX_Q_PATH)
    cases = []
    for s in samples:
        x = np.asarray(s["input"], dtype=np.float32).reshape(1, 1, 8, 8)
        (y,) = sess.run(["probabilities"], {"input": x})
        assert y.shape == (1, 10) and y.dtype == np.float32, (y.shape, y.dtype)
        # single-image run equals the batched run on the held-out set
        assert np.array_equal(y[0], probs_q[s["heldout_index"]]), s["heldout_index"]
        cases.append({
            "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                        "data": [float(v) for v in x.reshape(-1)]}],
            "outputs": [{"name": "probabilities", "shape": [1, 10], "datatype": "FP32",
                         "data": [float(v) for v in y.reshape(-1)]}],
        })
        print(f"  golden case: heldout_index {s['heldout_index']}, label {s['label']}, onnxruntime class "
              f"{int(y.argmax())}, probabilities {[round(float(v), 6) for v in y[0]]}")
    with open(SOFTMAX_Q_GOLDEN, "w") as f:
        json.dump(cases, f, indent=1)
        f.write("\n")
    return acc_q


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
    # After that, again with its own seed: the wide model and its fc-only retrain.
    make_wide(x_tr, y_tr, x_te, y_te)
    describe(WIDE_PATH)
    describe(WIDE_FC_RETRAINED_PATH)
    # Last of all (no randomness): the deliberately bad Softmax-quantized model and its golden cases.
    make_int8_softmax(x_tr, x_te32, y_te, probs_ort)
    describe(SOFTMAX_Q_PATH)

    print("files:")
    for path in (F32_PATH, INT8_PATH, TEST_JSON, BASELINE_NPY, FC_RETRAINED_PATH, WIDE_PATH, WIDE_FC_RETRAINED_PATH,
                 SOFTMAX_Q_PATH, SOFTMAX_Q_GOLDEN):
        with open(path, "rb") as f:
            h = hashlib.sha256(f.read()).hexdigest()
        print(f"  {os.path.basename(path):39s} {os.path.getsize(path):8d} bytes  sha256 {h}")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
