"""Reference outputs for the real-ONNX-model tests (run by fetch-onnx.sh; prints JSON on stdout).

    PYTHONPATH=<dir with onnxruntime, if not installed> python3 make_onnx_reference.py MODELS_DIR > reference.json

Inputs are deterministic: a synthetic voice-like signal (harmonics of a gliding 140 Hz pitch,
amplitude-modulated at 4 Hz like syllables) after silence and before noise, the openWakeWord
features of that signal (melspectrogram -> embedding, as openwakeword.utils does), and normal
noise from a fixed seed. Outputs come from onnxruntime's CPU provider.

Each model lists its graph inputs and outputs as onnxruntime reports them (`ort_signature`), and
cases run in order on one session. Stateful models name their `feedback` pairs (input, output):
a case with `continues` takes those inputs from the previous case's outputs, exactly as the
reference run did, so a streaming sequence is checked step by step.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

DTYPES = {np.float32: "FP32", np.int64: "INT64"}
ORT_DTYPES = {"tensor(float)": "FP32", "tensor(int64)": "INT64"}
SR = 16000


def voiced(n, sr):
    """A voice-like signal in [-1, 1]: harmonics of a 140 +- 20 Hz pitch, 4 Hz syllable envelope."""
    t = np.arange(n) / sr
    f0 = 140 + 20 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum((1.5 if 3 <= k <= 6 else 1.0) / k * np.sin(k * phase) for k in range(1, 20))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return 0.1 * envelope * x


def utterance(rng, sr, chunk, silent, speech, noise):
    """`silent` chunks of zeros, `speech` chunks of voice plus a little noise, `noise` chunks of noise."""
    parts = [
        np.zeros(silent * chunk),
        voiced(speech * chunk, sr) + 0.01 * rng.standard_normal(speech * chunk),
        0.05 * rng.standard_normal(noise * chunk),
    ]
    return np.concatenate(parts).astype(np.float32)


def tensor(name, value):
    value = np.asarray(value)
    return {
        "name": name,
        "dtype": DTYPES[value.dtype.type],
        "shape": list(value.shape),
        "data": value.flatten().tolist(),
    }


class Model:
    def __init__(self, models_dir, rel, feedback=()):
        self.rel = rel
        self.session = ort.InferenceSession(str(models_dir / rel), providers=["CPUExecutionProvider"])
        self.feedback = list(feedback)
        self.cases = []

    def run(self, feed, continues=False):
        """Run one case; with `continues`, the feedback inputs are the previous case's outputs."""
        if continues:
            previous = {t["name"]: t for t in self.cases[-1]["outputs"]}
            for inp, out in self.feedback:
                p = previous[out]
                feed[inp] = np.array(p["data"], np.float32).reshape(p["shape"])
        names = [o.name for o in self.session.get_outputs()]
        outputs = self.session.run(names, feed)
        self.cases.append(
            {
                "continues": continues,
                "inputs": [tensor(i.name, feed[i.name]) for i in self.session.get_inputs()],
                "outputs": [tensor(n, v) for n, v in zip(names, outputs)],
            }
        )
        return outputs

    def doc(self):
        def spec(v):
            return {"name": v.name, "dtype": ORT_DTYPES[v.type], "shape": v.shape}

        return {
            "file": self.rel,
            "ort_signature": {
                "inputs": [spec(i) for i in self.session.get_inputs()],
                "outputs": [spec(o) for o in self.session.get_outputs()],
            },
            "feedback": self.feedback,
            "cases": self.cases,
        }


def silero_v5(models_dir, rng, rel, rates):
    """silero-vad 5.x as its OnnxWrapper drives it: 512 samples at 16 kHz (256 at 8 kHz) after the
    last 64 (32) samples of the previous input, the state fed back; a stream per rate, then a
    batch of two streams at 16 kHz."""
    m = Model(models_dir, rel, feedback=[("state", "stateN")])
    has_sr = any(i.name == "sr" for i in m.session.get_inputs())
    streams = [(sr, 1) for sr in rates] + [(SR, 2)]
    for sr, batch in streams:
        chunk, context = (512, 64) if sr == 16000 else (256, 32)
        audio = np.stack([utterance(rng, sr, chunk, 3 + b, 8, 3 - b) for b in range(batch)])
        x = np.zeros((batch, context), np.float32)
        for i in range(audio.shape[1] // chunk):
            x = np.concatenate([x[:, -context:], audio[:, i * chunk : (i + 1) * chunk]], axis=1)
            feed = {"input": x, "state": np.zeros((2, batch, 128), np.float32)}
            if has_sr:
                feed["sr"] = np.array(sr, np.int64)
            m.run(feed, continues=i > 0)
    return m.doc()


def silero_v4(models_dir, rng, rel):
    """The older Silero VAD in openwakeword (h and c instead of state), as openwakeword.vad drives
    it: 480-sample frames at 16 kHz, no context."""
    m = Model(models_dir, rel, feedback=[("h", "hn"), ("c", "cn")])
    chunk = 480
    audio = utterance(rng, SR, chunk, 3, 8, 3)
    zeros = np.zeros((2, 1, 64), np.float32)
    for i in range(audio.size // chunk):
        feed = {"input": audio[None, i * chunk : (i + 1) * chunk], "sr": np.array(SR, np.int64), "h": zeros, "c": zeros}
        m.run(feed, continues=i > 0)
    return m.doc()


def openwakeword(models_dir, rng):
    """The feature models on audio of several lengths and batch sizes, then each classifier on
    the embeddings of the synthetic utterance (low scores: it is no wake word) and on noise at two
    levels (hey_jarvis scores the louder above 0.5, so its IF runs the verifier branch too)."""
    docs = []
    # openwakeword feeds 16-bit samples as floats.
    audio = 32767 * utterance(rng, SR, 1600, 0, 30, 10)  # 4 s

    mel = Model(models_dir, "openwakeword/melspectrogram.onnx")
    for batch, samples in [(1, 1280), (2, 1760), (1, 1280)]:
        mel.run({"input": audio[: batch * samples].reshape(batch, samples)})
    (spec,) = mel.session.run(None, {"input": audio[None]})
    docs.append(mel.doc())

    spec = spec.squeeze() / 10 + 2  # openwakeword.utils' transform
    windows = np.stack([spec[i : i + 76] for i in range(0, spec.shape[0] - 75, 8)])[..., None].astype(np.float32)
    emb = Model(models_dir, "openwakeword/embedding_model.onnx")
    for lo, hi in [(0, 1), (5, 8)]:
        emb.run({"input_1": windows[lo:hi]})
    (features,) = emb.session.run(None, {"input_1": windows})
    features = features.reshape(1, -1, 96)
    docs.append(emb.doc())

    classifiers = {
        "alexa_v0.1.onnx": 16,
        "hey_jarvis_v0.1.onnx": 16,  # IF op
        "hey_marvin_v0.1.onnx": 16,
        "hey_mycroft_v0.1.onnx": 16,  # LSTM, dynamic batch
        "timer_v0.1.onnx": 34,
        "weather_v0.1.onnx": 22,
    }
    for file, frames in classifiers.items():
        m = Model(models_dir, f"openwakeword/{file}")
        (inp,) = m.session.get_inputs()
        batch = 2 if isinstance(inp.shape[0], str) else 1
        m.run({inp.name: np.ascontiguousarray(features[:, :frames])})
        for scale in [1, 3]:
            m.run({inp.name: scale * rng.standard_normal((batch, frames, 96)).astype(np.float32)})
        docs.append(m.doc())
    return docs


def main(models_dir):
    rng = np.random.default_rng(20251121)
    models = [
        silero_v5(models_dir, rng, "silero_vad/silero_vad.onnx", [16000, 8000]),
        silero_v5(models_dir, rng, "silero_vad/silero_vad_half.onnx", [16000]),
        silero_v4(models_dir, rng, "openwakeword/silero_vad.onnx"),
        *openwakeword(models_dir, rng),
    ]
    doc = {"reference": f"onnxruntime {ort.__version__}, CPUExecutionProvider", "models": models}
    json.dump(doc, sys.stdout)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
