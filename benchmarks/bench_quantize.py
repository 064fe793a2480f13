"""Quantized frozen base (``finetune --quantize``): weight memory, peak training memory and
LoRA step time at the Geneformer V2-104M and V2-316M shapes, and macro-F1 of nf4 + LoRA vs
LoRA on the shipped example.

Shapes: ``Pretrain_ckpts/geneformer-V2-{104M,316M}/config.json`` with the LoRA keys of the
``-lora`` configs (r 8 on query/value), randomly initialised (LoRA B nonzero), dropout 0.
Settings, each a fresh model:

- ``fp32``: weights and compute fp32;
- ``bf16``: the job's ``--precision bf16`` (weights fp32, bf16 autocast);
- ``bf16 weights``: the frozen base cast to bf16 (LoRA and head fp32), bf16 autocast: what a
  bf16 checkpoint would hold (not a job option; the reference for weight memory);
- ``nf4``, ``nf4 + bf16``: ``--quantize nf4`` with fp32 / bf16 compute (QLoRA's recipe is the latter);
- ``int8 + bf16``: ``--quantize int8``.

Weight memory: bytes of every parameter and buffer (a quantized weight: its codes, scales and
factors). Peak training memory: each setting in its own child process (on CPU under
``common.MEMORY_ENV``); after one warmup step (AdamW state exists) the peak of one training
step, absolute above the process after its imports (CPU: peak RSS; CUDA: max allocated), so it
counts weights, optimizer state, activations and temporaries. Step time: one batch of
``--length`` tokens (CPU default 512, CUDA 4,096), the settings timed in alternation in one
process (``common.interleaved_medians``).

``--quick``: 256 tokens, 2 timed steps (the example comparison is the same).

Example: ``benchmarks/example_methods.py``'s settings (tiny Geneformer, ``synthetic``, 20 epochs,
lr 1e-2, batch 32, every epoch run, the epoch kept by validation loss, seed 0), folds 0-2, LoRA
with and without ``--quantize nf4``; paired per-fold macro-F1 difference.

    python benchmarks/bench_quantize.py --json out.json [--quick] [--device cpu|cuda] [--length N]
                                        [--shapes V2-104M,V2-316M] [--no_example] [--no_memory]
                                        [--example_folds 0,1,2] [--epochs 20]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import (MiB, REPO, autocast_ctx, base_parser, interleaved_medians, machine_info, memory_env, resolve,
                    write_json)

SHAPES = {"V2-104M": REPO / "Pretrain_ckpts" / "geneformer-V2-104M-lora",
          "V2-316M": REPO / "Pretrain_ckpts" / "geneformer-V2-316M-lora"}
#: setting -> (autocast precision, base weights dtype, --quantize)
SETTINGS = {
    "fp32": ("fp32", None, None),
    "bf16": ("bf16", None, None),
    "bf16 weights": ("bf16", torch.bfloat16, None),
    "nf4": ("fp32", None, "nf4"),
    "nf4 + bf16": ("bf16", None, "nf4"),
    "int8 + bf16": ("bf16", None, "int8"),
}
EXAMPLE = dict(model_path=REPO / "Pretrain_ckpts" / "geneformer-tiny-example", dataset_name="synthetic",
               epochs=20, lr=1e-2, batch_size=32, patience=0, select_epoch_by="loss", seed=0)


def build(shape: str, setting: str, device: torch.device):
    """The shape's LoRA classifier under ``setting``, on ``device``; (model, weight bytes)."""
    from transformerslocal import BertConfig, BertForSequenceClassification, mark_trainable
    from transformerslocal.peft.quantize import quantize_base, quantized_nbytes

    _, dtype, scheme = SETTINGS[setting]
    config = BertConfig.from_pretrained(SHAPES[shape]).copy(num_labels=5, hidden_dropout_prob=0.0,
                                                           attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    mark_trainable(model)
    if dtype is not None:
        with torch.no_grad():
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
    if scheme is not None:
        quantize_base(model, scheme)
    model.to(device).train()
    tensors = list(model.parameters()) + list(model.buffers())
    return model, sum(quantized_nbytes(t) for t in tensors)


def make_step(model, length: int, precision: str, device: torch.device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, model.config.vocab_size, (1, length), generator=g)
    ids[0, 0], ids[0, -1] = 2, 3
    ids, mask, labels = ids.to(device), torch.ones(1, length, dtype=torch.long, device=device), \
        torch.tensor([1], device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with autocast_ctx(device, precision):
            out = model(ids, mask)
        loss = torch.nn.functional.cross_entropy(out.logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def memory_one(shape: str, setting: str, length: int, device: torch.device) -> dict:
    """Child process: peak memory of one training step after a warmup step (see the docstring)."""
    from transformerslocal.peft.quantize import require_torchao

    require_torchao()  # every setting imports the same libraries before the baseline
    if device.type == "cuda":
        start = torch.cuda.memory_allocated(device) / MiB
    else:
        start = _status_mib("VmRSS")
    model, weight_bytes = build(shape, setting, device)
    step = make_step(model, length, SETTINGS[setting][0], device)
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        resident = torch.cuda.memory_allocated(device) / MiB
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / MiB
        method = "cuda.max_memory_allocated"
    else:
        resident = _status_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        step()
        peak = _status_mib("VmHWM")
        method = "peak RSS (VmHWM reset after the warmup step) above the RSS after imports"
    return {"shape": shape, "setting": setting, "weight_mib": weight_bytes / MiB,
            "held_after_warmup_mib": resident - start, "peak_training_mib": peak - start, "method": method}


def memory_table(args, device: torch.device, shapes: list[str]) -> list[dict]:
    rows = []
    for shape in shapes:
        for setting in SETTINGS:
            out = Path(tempfile.mkstemp(suffix=".json")[1])
            cmd = [sys.executable, __file__, "--device", str(device), "--json", str(out), "--memory_one",
                   f"{shape}|{setting}", "--length", str(args.length)]
            env = memory_env() if device.type == "cpu" else None
            proc = subprocess.run(cmd, cwd=Path(__file__).parent, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"shape": shape, "setting": setting, "error": proc.stderr[-1500:]})
            else:
                rows.append(json.loads(out.read_text()))
            out.unlink(missing_ok=True)
            print(f"memory {shape} {setting}: {rows[-1]}", flush=True)
    return rows


def timing_table(args, device: torch.device, shapes: list[str]) -> dict:
    out = {}
    for shape in shapes:
        steps = {}
        for setting in SETTINGS:
            model, _ = build(shape, setting, device)
            steps[setting] = make_step(model, args.length, SETTINGS[setting][0], device)
        out[shape] = interleaved_medians(steps, device, warmup=1, repeats=args.steps)
        print(f"timing {shape}: " + ", ".join(f"{k} {v['median_s']:.2f} s" for k, v in out[shape].items()), flush=True)
        del steps
    return out


def example_run(quantize: str | None, folds: list[int], epochs: int) -> dict:
    """One LoRA run of the example through the job (a worker process, one torch thread)."""
    import logging

    from geneformer_peft.training.arguments import TrainingArguments
    from geneformer_peft.training.cross_validation import RunOptions, run_cross_validation

    logging.basicConfig(level=logging.WARNING)
    e = EXAMPLE
    with tempfile.TemporaryDirectory() as tmp:
        opts = RunOptions(dataset_name=e["dataset_name"], data_path=REPO / "example_py" / "data",
                          output_path=Path(tmp), model_path=e["model_path"], prompt_type="lora", folds=folds,
                          num_threads=1, baselines="none",
                          training=TrainingArguments(epochs=epochs, lr=e["lr"], batch_size=e["batch_size"],
                                                     early_stopping_patience=e["patience"],
                                                     select_epoch_by=e["select_epoch_by"], seed=e["seed"],
                                                     quantize=quantize, progress=False))
        t0 = time.perf_counter()
        summary = run_cross_validation(opts)
    m = summary["metrics"]["macro_f1"]
    return {"quantize": quantize, "macro_f1_folds": m["values"], "macro_f1_mean": m["mean"],
            "seconds": time.perf_counter() - t0}


def example_table(folds: list[int], epochs: int) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
        plain, nf4 = pool.map(example_run, [None, "nf4"], [folds] * 2, [epochs] * 2)
    diffs = [nf4["macro_f1_folds"][k] - plain["macro_f1_folds"][k] for k in plain["macro_f1_folds"]]
    result = {"folds": folds, "epochs": epochs, "lora": plain, "nf4_lora": nf4, "diff_folds": diffs,
              "diff_mean": sum(diffs) / len(diffs)}
    print(f"example: LoRA {plain['macro_f1_mean']:.4f}, nf4 + LoRA {nf4['macro_f1_mean']:.4f}", flush=True)
    return result


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--length", type=int, default=None, help="tokens of the training batch (CPU 512, CUDA 4096)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    p.add_argument("--shapes", default="V2-104M,V2-316M")
    p.add_argument("--no_example", action="store_true")
    p.add_argument("--no_memory", action="store_true", help="no memory or timing table (the example only)")
    p.add_argument("--example_folds", default="0,1,2", help="folds of the example comparison (%(default)s)")
    p.add_argument("--epochs", type=int, default=EXAMPLE["epochs"], help="epochs of the example runs (%(default)s)")
    p.add_argument("--memory_one", default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    device = resolve(args.device)
    if args.length is None:
        args.length = 4096 if device.type == "cuda" else (256 if args.quick else 512)
    if args.quick:
        args.steps = min(args.steps, 2)
    if args.memory_one is not None:
        shape, setting = args.memory_one.split("|")
        write_json(args.json, memory_one(shape, setting, args.length, device))
        return 0
    shapes = args.shapes.split(",")
    result = {"machine": machine_info(device), "length": args.length, "batch": 1, "settings": list(SETTINGS)}
    if not args.no_memory:
        result["memory"] = memory_table(args, device, shapes)
        result["timing"] = timing_table(args, device, shapes)
    if not args.no_example:
        result["example"] = example_table([int(f) for f in args.example_folds.split(",")], args.epochs)
    write_json(args.json, result)
    return 0


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def render_section(r: dict, targets: list) -> list[str]:
    """The section of ``docs/benchmarks.md`` (called by ``run_all.py``)."""
    md = ["## Quantized frozen base (`finetune --quantize`): V2 shapes and the example", ""]
    if "memory" in r:
        md += [f"LoRA (r 8, query/value) at the V2 shapes, random weights, one training batch of {r['length']} "
               f"tokens on {r['machine']['device']}. Weight memory: bytes of all parameters and buffers (embeddings, "
               "LayerNorms, head and LoRA stay fp32 in every setting but `bf16 weights`). Held: the process after "
               "one warmup step (weights, AdamW state) above itself after its imports. Peak training memory: "
               f"{r['memory'][0].get('method', '')}, during the next step: weights, AdamW state, activations and "
               "temporaries. Step: forward, backward, AdamW, the settings timed in alternation; wall and process CPU "
               "seconds (all threads), medians. On a shared, loaded CPU the wall time varies by 2x between samples; "
               "the CPU time (work done) is the steadier measure, and the ratio is taken on it.", "",
               "| shape | setting | weight MiB | held MiB | peak training MiB | step wall s | step CPU s | "
               "CPU / fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in r["memory"]:
            if "error" in row:
                md.append(f"| {row['shape']} | {row['setting']} | failed | | | | | |")
                continue
            t = r["timing"][row["shape"]]
            ratio = t[row["setting"]]["median_cpu_s"] / t["fp32"]["median_cpu_s"]
            md.append(f"| {row['shape']} | {row['setting']} | {row['weight_mib']:.0f} | "
                      f"{row['held_after_warmup_mib']:.0f} | {row['peak_training_mib']:.0f} | "
                      f"{t[row['setting']]['median_s']:.2f} | {t[row['setting']]['median_cpu_s']:.2f} | {ratio:.2f} |")
        md.append("")
        by = {(x["shape"], x["setting"]): x for x in r["memory"] if "error" not in x}
        for shape in dict.fromkeys(x["shape"] for x in r["memory"]):
            if (shape, "fp32") in by and (shape, "nf4 + bf16") in by:
                a, b = by[(shape, "fp32")], by[(shape, "nf4 + bf16")]
                t = r["timing"][shape]
                cpu = {k: t[k]["median_cpu_s"] / t["fp32"]["median_cpu_s"] for k in ("nf4 + bf16", "nf4")}
                md.append(f"- {shape}: nf4 + bf16 holds x{b['weight_mib'] / a['weight_mib']:.2f} the fp32 weight "
                          f"memory, peaks at x{b['peak_training_mib'] / a['peak_training_mib']:.2f} the fp32 "
                          f"training memory and takes x{cpu['nf4 + bf16']:.2f} the fp32 step CPU time (nf4 with "
                          f"fp32 compute: x{cpu['nf4']:.2f}; on CPU the weights are dequantized in forward and "
                          "again in backward by plain PyTorch ops, no fused 4-bit kernel).")
        md.append("")
    if "example" in r:
        e = r["example"]
        folds = ", ".join(f"{k}: {v:.3f}" for k, v in e["nf4_lora"]["macro_f1_folds"].items())
        plain = ", ".join(f"{k}: {v:.3f}" for k, v in e["lora"]["macro_f1_folds"].items())
        md += [f"Shipped example (tiny Geneformer, `synthetic`), folds {e['folds']}, {e['epochs']} epochs, lr 1e-2, "
               "batch 32, every epoch run, epoch kept by validation loss, seed 0 (the settings of "
               "`docs/example_methods.md`):", "",
               "| method | macro-F1 mean | per fold | seconds |", "|---|---:|---|---:|",
               f"| LoRA | {e['lora']['macro_f1_mean']:.4f} | {plain} | {e['lora']['seconds']:.0f} |",
               f"| nf4 + LoRA | {e['nf4_lora']['macro_f1_mean']:.4f} | {folds} | {e['nf4_lora']['seconds']:.0f} |", "",
               f"nf4 + LoRA minus LoRA, paired per fold: {', '.join(f'{d:+.4f}' for d in e['diff_folds'])}; "
               f"mean {e['diff_mean']:+.4f}.", ""]
        ok = abs(e["diff_mean"]) <= 0.02
        targets.append(("nf4 + LoRA macro-F1 within 0.02 of LoRA on the example (folds "
                        f"{','.join(map(str, e['folds']))})", ok, f"difference {e['diff_mean']:+.4f} "
                        f"({e['nf4_lora']['macro_f1_mean']:.4f} vs {e['lora']['macro_f1_mean']:.4f})"))
    return md


if __name__ == "__main__":
    raise SystemExit(main())
