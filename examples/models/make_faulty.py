#!/usr/bin/env python3
"""Write digits_cnn_faulty.onnx: digits_cnn.onnx with a defect that only live data shows.

For inputs whose largest pixel is below 2 (every image the model was trained on, and every
golden case) it computes exactly what digits_cnn.onnx computes. An image with a pixel of 2 or
more (a camera whose gain is off) makes a Gather index run out of range, and the runtime fails
the inference. A bundle of it passes its self-test on every device and then raises the error
rate: what a rollout's error-rate gate is for.

Usage: python3 examples/models/make_faulty.py
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
m = onnx.load(os.path.join(HERE, "digits_cnn.onnx"))
g = m.graph
out = g.output[0].name  # "probabilities"
last = next(n for n in g.node if out in n.output)
last.output[:] = ["probabilities_raw"]
g.initializer.extend([
    numpy_helper.from_array(np.zeros(2, dtype=np.float32), "faulty_table"),
    numpy_helper.from_array(np.array([1], dtype=np.int64), "faulty_shape"),
])
g.node.extend([
    helper.make_node("ReduceMax", ["input"], ["faulty_max"], keepdims=0, name="faulty_max"),
    helper.make_node("Floor", ["faulty_max"], ["faulty_floor"], name="faulty_floor"),
    helper.make_node("Cast", ["faulty_floor"], ["faulty_index_scalar"], to=TensorProto.INT64, name="faulty_cast"),
    helper.make_node("Reshape", ["faulty_index_scalar", "faulty_shape"], ["faulty_index"], name="faulty_reshape"),
    helper.make_node("Gather", ["faulty_table", "faulty_index"], ["faulty_zero"], axis=0, name="faulty_gather"),
    helper.make_node("Add", ["probabilities_raw", "faulty_zero"], [out], name="faulty_add"),
])
m.doc_string = "digits_cnn.onnx plus a Gather that fails for inputs with a pixel >= 2 (see make_faulty.py)"
onnx.checker.check_model(m)
onnx.save(m, os.path.join(HERE, "digits_cnn_faulty.onnx"))
print("wrote digits_cnn_faulty.onnx")
