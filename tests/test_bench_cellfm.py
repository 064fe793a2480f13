"""``benchmarks/bench_cellfm.py`` (issue 24): ``--quick`` writes every figure of the CellFM section
(scaling rows, fitted exponents, peak memory per step and model, the large shape) with the
reference checked against our model first, and the check stops a reference that computes
something else."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import job_factories as jf

BENCH = jf.ROOT / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_cellfm
        yield bench_cellfm
    finally:
        sys.path.remove(str(BENCH))


def test_quick_run_writes_every_figure_and_its_section(tmp_path, bench):
    out = tmp_path / "cellfm.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_cellfm.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=jf._subprocess_env(), cwd=BENCH)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["benchmark"] == "cellfm" and r["quick"] is True and "cpu" in r["machine"]
    s = r["scaling"]
    assert [row["length"] for row in s["rows"]] == list(bench.QUICK["lengths"])
    for row in s["rows"]:
        assert row["length"] <= row["tokens"] <= row["length"] * s["batch"]
        for mode in ("train", "inference"):
            assert all(row[mode][who]["median_s"] > 0 for who in ("ours", "reference"))
            assert row[mode]["ratio_median"] > 0
    assert set(s["fits"]) == {"train_ours", "train_reference", "inference_ours", "inference_reference"}
    assert all(math.isfinite(v) for fit in s["fits"].values() for v in fit.values())
    for check in s["parity"] + [r["large"]["parity"]]:
        assert check["hidden_max_abs_diff"] <= 1e-4 and check["logits_max_abs_diff"] <= 1e-4
        assert check["hidden_max_abs"] > 0.1  # compared on states that are not trivially small
    cases = {(m["case"], m["model"], m["mode"]): m for m in r["memory"]}
    assert set(cases) == {(c, w, m) for c in ("small", "80m") for w in ("ours", "reference")
                          for m in ("train", "inference")}
    assert all(m["memory"]["step_peak_mib"] >= 0 for m in cases.values())
    assert {(m["case"], m["batch"], m["length"]) for m in cases.values()} == {
        ("small", s["batch"], bench.QUICK["lengths"][-1]), ("80m", 1, bench.QUICK["large_length"])}
    big = r["large"]
    assert big["length"] == bench.QUICK["large_length"] and big["batch"] == 1
    assert 0 < big["trainable_parameters"] < big["parameters"]  # the gene embedding stays frozen
    assert all(big[mode][who]["median_s"] > 0 for mode in ("train", "inference") for who in ("ours", "reference"))
    targets: list = []
    md = "\n".join(bench.render_section(r, targets))
    assert "## CellFM" in md and "| 256 | train |" in md and "reference / ours" in md
    assert len(targets) == 1 and "linear in genes" in targets[0][0]


def test_parity_check_stops_a_reference_that_differs(bench):
    ours, ref = bench.build_pair(bench.SHAPE_TINY, 64)
    assert bench.check_parity(ours, ref, length=48)["hidden_max_abs_diff"] <= 1e-4
    ref.slope = 0.01  # torch's LeakyReLU slope instead of CellFM's 0.2: the known porting trap
    with pytest.raises(AssertionError, match="differs from our model"):
        bench.check_parity(ours, ref, length=48)
    ref.slope = ours.config.leaky_relu_slope
    with torch.no_grad():  # (not q, k or v: the RMS norm of each head's output cancels a scale there)
        ref.p("encoder.1.ffn.o_proj.weight").mul_(1.01)
    with pytest.raises(AssertionError, match="differs from our model"):
        bench.check_parity(ours, ref, length=48)
