"""``benchmarks/bench_search_speed.py --quick`` (issue 25): a finetune and a one-point search
of the same setting run as commands, their training speeds are read from metrics.json and
trials.csv, and the section with the target row is rendered."""
from __future__ import annotations

import json
import subprocess
import sys

import job_factories as jf


def test_bench_search_speed_quick(job_data, tmp_path):
    out = tmp_path / "search_speed.json"
    proc = subprocess.run([sys.executable, "bench_search_speed.py", "--quick", "--json", str(out), "--dataset_name",
                           job_data.dataset_name, "--data_path", str(job_data.data_path), "--model_path",
                           str(job_data.model_path)], cwd=jf.ROOT / "benchmarks", env=jf._subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["finetunes"]) == 1 and [len(s["trials"]) for s in result["searches"]] == [2]
    assert result["same_value"], "the trials train what finetune trains"
    assert result["finetune_train_cells_per_second"] > 0 and result["trial_train_cells_per_second"] > 0
    assert result["ratio"] == result["trial_train_cells_per_second"] / result["finetune_train_cells_per_second"]
    sys.path.insert(0, str(jf.ROOT / "benchmarks"))
    try:
        import bench_search_speed
    finally:
        sys.path.pop(0)
    targets = []
    section = "\n".join(bench_search_speed.render_section(result, targets))
    assert "Ratio (trials / finetune)" in section
    assert [t[0] for t in targets] == ["Search trials >= 0.9x the training cells/s of finetune of the same setting"]
