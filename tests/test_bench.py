"""bench.py runs with the tiny preset, and its generation ratios compare totals with totals."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def bench(*args):
    p = subprocess.run([sys.executable, "bench.py", "--preset", "tiny", *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_train_table_has_a_row_per_model():
    out = bench("--what", "train", "--train-models", "tiny", "--train-vaes", "pong_fast", "--clean-copy")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("DiT-tiny", "pong_fast"))]
    assert [(r[0], " ".join(r[7:])) for r in rows] == [
        ("DiT-tiny", "eager"),
        ("DiT-tiny", "clean copy"),
        ("pong_fast", "eager"),
    ]
    assert all(float(r[4]) > 0 and float(r[5]) > 0 and r[6] == "n/a" for r in rows)  # samples/s, TFLOP/s; no MFU on CPU
    flops = [float(r[3]) * float(r[5]) for r in rows[:2]]  # ms/step x TFLOP/s: the step's counted FLOPs
    assert 1.8 < flops[1] / flops[0] < 2.6  # --clean-copy's pass runs the window twice


def test_attention_rows_time_three_kernels_in_two_dtypes():
    out = bench("--what", "attention", "--window", "4", "--train-batch", "2")
    attn, rope = out.split("RoPE")
    rows = [line.split() for line in attn.splitlines() if line.startswith(("float32", "bfloat16"))]
    assert len(rows) == 10 and {r[0] for r in rows} == {"float32", "bfloat16"}
    assert all(float(x) > 0 for r in rows for x in r[-4:-1])  # sdpa, plain, attend ms
    rows = [line.split() for line in rope.splitlines() if line.startswith(("float32", "bfloat16"))]
    assert len(rows) == 4 and all(float(x) > 0 for r in rows for x in r[-3:-1])  # textbook, ours ms


def test_forward_runs():
    out = bench("--what", "forward")
    assert "cached step" in out and "naive window" in out


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "checkpoints", "pong_dit.pt")), reason="needs the bundle")
def test_generate_ratio_is_total_over_naive_total():
    """At batch 2 the ratio column must divide the total rate by the naive total rate (it once mixed the two)."""
    out = bench("--what", "generate", "--gen-frames", "2", "--gen-batches", "1,2", "--steps", "1")
    rows = re.findall(
        r"batch (\d+) +(.+?) +([\d.]+) frames/s in total \( *([\d.]+) per stream, +([\d.]+)x naive\)", out
    )
    assert {(b, label.strip()) for b, label, *_ in rows} >= {("2", "naive"), ("2", "cached chunk")}, out
    naive = {b: float(total) for b, label, total, *_ in rows if label.strip() == "naive"}
    for b, label, total, per_stream, ratio in rows:
        assert float(total) == pytest.approx(int(b) * float(per_stream), rel=0.01, abs=0.2)
        assert float(ratio) == pytest.approx(float(total) / naive[b], rel=0.05, abs=0.06), (b, label)


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "checkpoints", "pong_dit.pt")), reason="needs the bundle")
def test_generate_times_another_patch_size_and_width():
    """--patch-size/--hidden-size time a random DiT of that shape on the bundled VAE (the speed side of lever 2)."""
    out = bench("--what", "generate", "--gen-frames", "2", "--gen-batches", "1", "--steps", "1",
                "--model", "XS", "--patch-size", "1", "--hidden-size", "64")  # fmt: skip
    assert "random DiT-XS, patch 1, width 64 + the VAE of" in out, out
    assert re.search(r"chunk\+pipeline +[\d.]+ frames/s", out), out
