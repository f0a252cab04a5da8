"""scripts/bench/gpu_step.py, the train-step benchmark prepared for a JAX-only GPU machine: it
runs at a tiny shape under KERAS_BACKEND=jax with TensorFlow made unimportable."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the script with `import tensorflow` failing, as on a machine without TensorFlow.
_WITHOUT_TENSORFLOW = """
import sys
class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("TensorFlow is not installed on this machine (test)")
sys.meta_path.insert(0, _NoTensorFlow())
sys.path.insert(0, {repo!r})
sys.path.insert(0, {bench!r})
import gpu_step
gpu_step.main(sys.argv[1:])
"""


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="jax is not installed here (the script is for a GPU machine with JAX; "
    "`pip install jax` to run this test on CPU)",
)
def test_gpu_step_runs_under_jax_without_tensorflow_at_a_tiny_shape():
    code = _WITHOUT_TENSORFLOW.format(repo=REPO, bench=os.path.join(REPO, "scripts", "bench"))
    env = dict(os.environ, KERAS_BACKEND="jax")
    out = subprocess.run(
        [sys.executable, "-c", code, "--shapes=4,32,32", "--width=4", "--steps=1", "--crop=0.75"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["benchmark"] for r in lines] == ["preprocess", "train_step"]
    for r in lines:
        assert r["backend"] == "jax" and not r["tensorflow_imported"]
        assert r["shape"] == [4, 32, 32] and r["model_input"] == [4, 24, 24]
        assert r["exams_per_s"] > 0
    assert lines[1]["loss_finite"] and lines[1]["achieved_tflops"] >= 0
