#!/usr/bin/env python3
"""Write digits_baseline_labels.npy: the true class of each image in digits_baseline.npy.

Same data and split as make_digits.py (scikit-learn's bundled digits, stratified 75/25,
random_state=0); the script checks that its held-out images equal digits_baseline.npy exactly
before writing, so the labels line up. No network, no randomness.

Usage: python3 examples/models/make_labels.py
"""
import os

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = os.path.dirname(os.path.abspath(__file__))

d = load_digits()
x = (d.images.astype(np.float64) / 16.0).reshape(-1, 1, 8, 8)
y = d.target.astype(np.int64)
_, x_te, _, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
baseline = np.load(os.path.join(HERE, "digits_baseline.npy"))
assert baseline.shape == x_te.shape and np.array_equal(baseline, x_te.astype(np.float32)), "split differs"
np.save(os.path.join(HERE, "digits_baseline_labels.npy"), y_te.astype(np.int64))
print(f"wrote {len(y_te)} labels")
