"""The checks to run when a GPU is lent, in one go (``benchmarks/gpu_check.sh``), under 8 minutes:

1. parity: each model family on the device against its reference, fp32, same weights:
   Geneformer BERT + LoRA vs ``transformers`` + ``peft``; scBERT vs performer-pytorch;
   CellFM vs the original code's outputs on ``../shared/cellfm`` (skipped when absent).
2. step: one bf16 LoRA training step and one bf16 inference pass at 2,048 tokens, 6L-256 and
   12L-512 (batch 8), medians of 5 after 2 warm-ups, with MFU against the measured bf16
   matmul peak (FLOPs as in ``common.training_flops``).
3. memory: the training step's peak memory with and without gradient checkpointing.
4. finetune: ``geneformer-peft finetune`` of the shipped example, fold 0, on the device.
5. torchrun: the example script under ``torchrun --nproc_per_node <GPUs>`` (NCCL), fold 0.

Results go to ``OUT/gpu_check.json`` and are rendered into the markdown file ``--md`` (default
``docs/benchmarks.md``) between ``<!-- gpu_check -->`` markers (``run_all.py`` keeps that
section when it re-renders the file).

``--dry-run``: every check on the CPU at tiny sizes (hidden 32, 2 layers, 64 tokens), and
the two commands of 4-5 parsed and checked, not run: what the tests run on a machine
without a GPU.

    python benchmarks/gpu_check.py [--dry-run] [--out DIR] [--md FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from common import (LORA, SHAPES, build_hf_like, build_ours, interleaved_medians, machine_info,  # noqa: E402
                    make_infer_step, make_train_step, padded_batch, peak_memory, sync, training_flops)

MARK_BEGIN, MARK_END = "<!-- gpu_check -->", "<!-- /gpu_check -->"
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, hidden_act="relu", hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, pad_token_id=0)
PARITY_TOL = 1e-4
EXAMPLE = ["--dataset_name", "synthetic", "--data_path", str(REPO / "example_py" / "data"), "--model_path",
           str(REPO / "Pretrain_ckpts" / "geneformer-tiny-example"), "--prompt_type", "lora", "--folds", "0",
           "--no_progress"]


def _shapes(dry: bool) -> dict:
    return {"tiny-2L-32": TINY} if dry else {name: SHAPES[name] for name in ("6L-256", "12L-512")}


# ----------------------------------------------------------------------------- 1. parity
def parity(device: torch.device, dry: bool) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    ours = build_ours(TINY if dry else "6L-256", **LORA)
    hf, _ = build_hf_like(ours)
    ours, hf = ours.to(device).eval(), hf.to(device).eval()
    ids, mask = padded_batch(ours.config.vocab_size, [64, 57, 40] if dry else [2048, 1900, 1500], device=device)
    with torch.no_grad():
        diff = (ours(ids, mask).logits - hf(input_ids=ids, attention_mask=mask).logits).abs().max().item()
    out["geneformer_vs_transformers_peft"] = {"max_abs_logits_diff": diff, "ok": diff < PARITY_TOL}
    from bench_performer import build_pair, cells

    sizes = dict(num_tokens=7, dim=32, depth=2, heads=4, dim_head=8, max_seq_len=64) if dry else \
        dict(num_tokens=7, dim=200, depth=6, heads=10, dim_head=64, max_seq_len=2048)
    mine, ref = build_pair(sizes)
    mine, ref = mine.to(device).eval(), ref.to(device).eval()
    ids = cells(2, sizes["max_seq_len"]).to(device)
    with torch.no_grad():
        diff = (mine(ids).logits - ref(ids)).abs().max().item()
    out["scbert_vs_performer_pytorch"] = {"max_abs_logits_diff": diff, "ok": diff < PARITY_TOL}
    out["cellfm_vs_original_outputs"] = _cellfm_parity(device)
    return out


def _cellfm_parity(device: torch.device) -> dict:
    import numpy as np

    import transformerslocal as tl
    from transformerslocal.convert_cellfm import convert_cellfm_checkpoint

    shared = REPO.parent / "shared" / "cellfm"
    ckpt, io_file = shared / "cellfm_tiny.ckpt", shared / "cellfm_tiny_io.npz"
    if not (ckpt.is_file() and io_file.is_file()):
        return {"skipped": f"the CellFM reference is not at {shared}", "ok": None}
    io = dict(np.load(io_file))
    with tempfile.TemporaryDirectory() as tmp:
        convert_cellfm_checkpoint(ckpt, Path(tmp) / "tiny", num_attention_heads=int(io["config"][2]),
                                  max_genes=io["gene"].shape[1])
        model = tl.CellFMModel.from_pretrained(Path(tmp) / "tiny").to(device).eval()
    with torch.no_grad():
        got = model(torch.from_numpy(io["gene"]).long().to(device), torch.from_numpy(io["expr"]).to(device),
                    torch.from_numpy(io["zero_idx"][:, 1:]).to(device)).last_hidden_state.cpu().numpy()
    real = io["zero_idx"].astype(bool)
    diff = float(np.abs(got - io["out"])[real].max())
    return {"max_abs_hidden_diff": diff, "ok": diff < PARITY_TOL}


# ----------------------------------------------------------------------------- 2. step and 3. memory
def _batch(cfg, dry: bool, device):
    batch, length = (2, 64) if dry else (8, 2048)
    ids, mask = padded_batch(cfg.vocab_size, [length] * batch, seed=5, device=device)
    return ids, mask, torch.zeros(batch, dtype=torch.long, device=device), batch, length


def step(device: torch.device, dry: bool) -> dict:
    from bench_mfu import matmul_peak

    precision = "bf16"
    peak = matmul_peak(device, torch.bfloat16, 256 if dry else 8192, 0.2 if dry else 3.0)
    rows = []
    for name, shape in _shapes(dry).items():
        model = build_ours(shape, **LORA).to(device).train()
        ids, mask, labels, batch, length = _batch(model.config, dry, device)
        train = make_train_step(model, ids, mask, labels, hf=False, device=device, precision=precision)
        infer = make_infer_step(model, ids, mask, hf=False, device=device, precision=precision)
        t = interleaved_medians({"train": train, "infer": infer}, device, warmup=1 if dry else 2,
                                repeats=2 if dry else 5)
        cfg = model.config
        train_flops = training_flops(cfg, batch, length, full_finetune=False)
        n = cfg.num_hidden_layers * (4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.intermediate_size)
        infer_flops = 2 * n * batch * length + 4 * cfg.num_hidden_layers * batch * length ** 2 * cfg.hidden_size
        rows.append({"shape": name, "batch": batch, "length": length, "precision": precision,
                     "train_s": t["train"]["median_s"], "infer_s": t["infer"]["median_s"],
                     "train_tokens_per_s": batch * length / t["train"]["median_s"],
                     "infer_tokens_per_s": batch * length / t["infer"]["median_s"],
                     "train_mfu": train_flops / t["train"]["median_s"] / (peak["tflops"] * 1e12),
                     "infer_mfu": infer_flops / t["infer"]["median_s"] / (peak["tflops"] * 1e12)})
        del model, train, infer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"matmul_peak": peak, "rows": rows}


def memory(device: torch.device, dry: bool) -> dict:
    rows = []
    for name, shape in _shapes(dry).items():
        for ckpt in (False, True):
            model = build_ours(shape, **LORA).to(device).train()
            if ckpt:
                model.gradient_checkpointing_enable()
            ids, mask, labels, batch, length = _batch(model.config, dry, device)
            train = make_train_step(model, ids, mask, labels, hf=False, device=device, precision="bf16")
            train()  # optimizer state exists before the measurement
            rows.append({"shape": name, "gradient_checkpointing": ckpt, "batch": batch, "length": length,
                         **peak_memory(train, device)})
            del model, train
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows}


# ----------------------------------------------------------------------------- 4. finetune and 5. torchrun
def _run_or_plan(cmd: list[str], argv_for_parser: list[str], dry: bool, out: Path, timeout: int) -> dict:
    from geneformer_peft.cli import build_parser

    build_parser().parse_args(argv_for_parser)  # a wrong flag fails here, in the dry run too
    if dry:
        return {"planned": cmd, "ok": True}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    result = {"command": cmd, "seconds": time.perf_counter() - t0, "returncode": proc.returncode,
              "ok": proc.returncode == 0}
    if proc.returncode:
        result["stderr_tail"] = proc.stderr[-3000:]
    metrics = sorted(out.rglob("metrics.json"))
    if metrics:
        data = json.loads(metrics[0].read_text())
        result["metrics"] = {k: data[k] for k in ("macro_f1", "accuracy", "train_seconds") if k in data}
    return result


def finetune(device: torch.device, dry: bool, work: Path) -> dict:
    out = work / "finetune"
    argv = ["finetune", *EXAMPLE, "--device", "cpu" if dry else "cuda", "--output_path", str(out)]
    return _run_or_plan([sys.executable, "-m", "geneformer_peft.cli", *argv], argv, dry, out, 170)


def torchrun(device: torch.device, dry: bool, work: Path) -> dict:
    out = work / "torchrun"
    gpus = torch.cuda.device_count() if device.type == "cuda" else 2
    argv = [*EXAMPLE, "--device", "cpu" if dry else "cuda", "--output_path", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(max(gpus, 1)),
           str(REPO / "example_py" / "cell_classification_prompt_fold.py"), *argv]
    result = _run_or_plan(cmd, ["finetune", *argv], dry, out, 170)
    result.update(backend="gloo" if dry else "nccl", processes=max(gpus, 1))
    return result


# ----------------------------------------------------------------------------- report
def render(r: dict) -> str:
    m = r["machine"]
    md = [MARK_BEGIN, "## GPU check (`benchmarks/gpu_check.sh`)", "",
          f"{'**Dry run on the CPU at tiny sizes: not GPU figures.** ' if r['dry_run'] else ''}"
          f"Device {m.get('gpu', m.get('device'))}, torch {m.get('torch')}, measured {r['date']} UTC, "
          f"{r['seconds']:.0f} s in all.", "", "| parity (fp32, same weights) | max abs difference | ok |",
          "|---|---:|---|"]
    for name, p in r["parity"].items() if isinstance(r.get("parity"), dict) and "error" not in r["parity"] else []:
        value = p.get("max_abs_logits_diff", p.get("max_abs_hidden_diff"))
        md.append(f"| {name} | {'skipped: ' + p['skipped'] if 'skipped' in p else f'{value:.2e}'} | {p['ok']} |")
    if "rows" in r.get("step", {}):
        md += ["", f"bf16 matmul peak measured: {r['step']['matmul_peak']['tflops']:.1f} TFLOP/s.", "",
               "| shape | batch x tokens | train step s | train tokens/s | train MFU | inference s | inference MFU |",
               "|---|---|---:|---:|---:|---:|---:|"]
        for x in r["step"]["rows"]:
            md.append(f"| {x['shape']} | {x['batch']} x {x['length']} | {x['train_s']:.4f} | "
                      f"{x['train_tokens_per_s']:,.0f} | {x['train_mfu']:.1%} | {x['infer_s']:.4f} | "
                      f"{x['infer_mfu']:.1%} |")
    if "rows" in r.get("memory", {}):
        md += ["", "| shape | gradient checkpointing | step peak MiB | total peak MiB |", "|---|---|---:|---:|"]
        for x in r["memory"]["rows"]:
            md.append(f"| {x['shape']} | {x['gradient_checkpointing']} | {x['step_peak_mib']:.1f} | "
                      f"{x['total_peak_mib']:.1f} |")
    for key in ("finetune", "torchrun"):
        x = r.get(key, {})
        state = ("error: " + x["error"]) if "error" in x else ("planned (dry run)" if "planned" in x else
                                                               f"exit {x.get('returncode')} in {x.get('seconds', 0):.0f} s"
                                                               f" {x.get('metrics', '')}")
        md.append(f"\n- {key}: {state if x else 'not run (stopped before it)'}")
    for key in ("parity", "step", "memory"):
        if "error" in r.get(key, {}):
            md.append(f"- {key}: error: {r[key]['error']}")
    return "\n".join(md + ["", MARK_END]) + "\n"


def write_section(md_path: Path, section: str) -> None:
    """Put ``section`` between the markers of ``md_path`` (appended when the file has none)."""
    text = md_path.read_text() if md_path.is_file() else ""
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(MARK_END, 1)[1]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + section
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)


def _write(result: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=float))
    write_section(args.md, render(result))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes; commands parsed, not run")
    p.add_argument("--out", type=Path, default=REPO / "docs", help="folder of gpu_check.json (%(default)s)")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "benchmarks.md", help="markdown to render into")
    args = p.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        p.error("no CUDA device: run with --dry-run, or on a machine with a GPU")
    device = torch.device("cpu" if dry else "cuda")
    t0 = time.perf_counter()
    result = {"dry_run": dry, "machine": machine_info(device), "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="gf_gpu_check_") as tmp:
        checks = {"parity": lambda: parity(device, dry), "step": lambda: step(device, dry),
                  "memory": lambda: memory(device, dry), "finetune": lambda: finetune(device, dry, Path(tmp)),
                  "torchrun": lambda: torchrun(device, dry, Path(tmp))}
        for name, check in checks.items():
            t = time.perf_counter()
            try:
                result[name] = check()
            except Exception as error:  # noqa: BLE001 (one failing check must not hide the others)
                result[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-3000:]}
            print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
            result["seconds"] = time.perf_counter() - t0
            _write(result, args)  # after every check: what ran survives a later timeout
    failed = [k for k in ("parity", "step", "memory", "finetune", "torchrun") if "error" in result.get(k, {})
              or result[k].get("ok") is False]
    failed += [f"parity.{k}" for k, v in result.get("parity", {}).items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"wrote {args.out / 'gpu_check.json'} and {args.md}; {'failed: ' + ', '.join(failed) if failed else 'all ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
