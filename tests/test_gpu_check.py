"""``benchmarks/gpu_check.sh --dry-run`` (issue 25): every GPU check runs on the CPU at tiny
sizes, the finetune and torchrun commands parse, and the results are rendered into the
markdown file between the gpu_check markers (replacing an earlier section, keeping the rest)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import job_factories as jf

pytest.importorskip("transformers", reason="the parity reference is HuggingFace transformers")
pytest.importorskip("performer_pytorch", reason="the scBERT reference is performer-pytorch")


def test_gpu_check_dry_run_writes_json_and_its_section(tmp_path):
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nkept above\n<!-- gpu_check -->\nold section\n<!-- /gpu_check -->\nkept below\n")
    proc = subprocess.run(["bash", str(jf.ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path),
                           "--md", str(md)], capture_output=True, text=True, timeout=300, env=jf._subprocess_env(),
                          cwd=jf.ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True
    assert {k: v["ok"] for k, v in result["parity"].items()}.keys() == {
        "geneformer_vs_transformers_peft", "scbert_vs_performer_pytorch", "cellfm_vs_original_outputs"}
    assert all(v["ok"] in (True, None) for v in result["parity"].values())
    assert [r["gradient_checkpointing"] for r in result["memory"]["rows"]] == [False, True]
    assert result["step"]["rows"][0]["train_mfu"] > 0
    assert result["finetune"]["planned"][3] == "finetune" and "--device" in result["finetune"]["planned"]
    assert "torch.distributed.run" in result["torchrun"]["planned"]
    text = md.read_text()
    assert "old section" not in text and "kept above" in text and "kept below" in text
    assert text.count("<!-- gpu_check -->") == 1 and "| scbert_vs_performer_pytorch |" in text
