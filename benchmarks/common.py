"""Helpers shared by the benchmark modules: machine description, timing, peak memory,
model builders (ours and ``transformers`` + ``peft`` with the same weights), batches and
the variable-length synthetic dataset.

``transformers`` and ``peft`` are imported here only, lazily, as references: the library
never imports them.

Peak memory
-----------
CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (bytes held by
tensors); reported as the peak during the step *above* what was allocated before it
(``step_peak``) and as the absolute peak (``total_peak``).

CPU: PyTorch has no allocated-bytes counter on CPU, and ``tracemalloc`` does not see
PyTorch's allocations, so the process's resident set is used: ``VmHWM`` (peak RSS) is
reset through ``/proc/self/clear_refs`` before the step and the peak minus the RSS at the
start of the step is reported ("peak RSS increase"). These measurements run in child
processes started with ``MEMORY_ENV`` (``MALLOC_MMAP_THRESHOLD_=65536``) so that glibc
returns freed tensor memory to the OS at once (otherwise freed blocks stay resident and
hide later peaks). The number therefore counts activations, gradients and temporaries of
the step, not the weights or optimizer state that existed before it; it is an
approximation to +-a few MiB (allocator pages).

Timings never run under ``MEMORY_ENV``: with a 64 KiB mmap threshold every large tensor
is freshly mapped and page-faulted, which slows allocation-heavy code severalfold (dropout
forward + backward on 4x4x512x512: 9 ms with glibc's default dynamic threshold, 19-21 ms
with it) and is not what users run with.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MiB = 2.0 ** 20

# environment of the child processes that measure CPU peak memory (see the module docstring)
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def memory_env() -> dict:
    return dict(os.environ, **MEMORY_ENV)

# Geneformer V1 shapes (Pretrain_ckpts/geneformer-{6,12}L-30M/config.json).
V1_BASE = dict(vocab_size=25426, max_position_embeddings=2048, hidden_act="relu", hidden_dropout_prob=0.02,
               attention_probs_dropout_prob=0.02, type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12,
               pad_token_id=0)
SHAPES = {
    "6L-256": dict(V1_BASE, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512),
    "12L-512": dict(V1_BASE, hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=1024),
}
ARCH_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
             "type_vocab_size", "initializer_range", "layer_norm_eps", "pad_token_id")


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_cores_visible": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    for name in ("transformers", "peft", "loralib"):
        try:
            import importlib.metadata as md
            info[name] = md.version(name)
        except Exception:  # noqa: BLE001
            info[name] = "not installed"
    return info


def resolve(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available here")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- timing
def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int,
                        repeats: int) -> dict[str, dict]:
    """Warm each function up, then time them in alternation (A B A B ...) so that load from
    other processes hits all of them alike; median and all samples per function."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(repeats):
        keys = list(fns) if rep % 2 == 0 else list(reversed(fns))
        for k in keys:
            wall, proc = timed(fns[k], device)
            samples[k].append(wall)
            cpu[k].append(proc)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "samples_s": v,
                "median_cpu_s": statistics.median(cpu[k])} for k, v in samples.items()}


# ----------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Run ``fn`` once and report its peak memory (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": "cuda.max_memory_allocated", "step_peak_mib": (peak - before) / MiB,
                "total_peak_mib": peak / MiB}
    try:
        Path("/proc/self/clear_refs").write_text("5")
        resettable = True
    except OSError:
        resettable = False
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None or not resettable:
        return {"method": "unavailable (needs Linux /proc)", "step_peak_mib": float("nan"),
                "total_peak_mib": float("nan")}
    return {"method": "peak RSS increase (VmHWM reset; MALLOC_MMAP_THRESHOLD_="
                      f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')})",
            "step_peak_mib": (peak - before) / 1024.0, "total_peak_mib": peak / 1024.0}


def memory_in_children(script: str, args, device: torch.device, cell_counts) -> tuple[list[dict], float | None]:
    """Peak memory of ``script --memory_one N`` for each N of ``cell_counts``, each in a fresh
    child process (``MEMORY_ENV`` on CPU), and the growth from the first to the last count.

    Returns
    -------
    (results, growth)
        One dict per count (the child's JSON, or ``{"n_cells": N, "error": ...}``) and
        ``peak(last) / peak(first)`` when both ran, else None.
    """
    import subprocess

    results = []
    for n in cell_counts:
        sub = Path(str(args.json) + f".mem{n}.json")
        cmd = [sys.executable, script, "--device", str(device), "--json", str(sub), "--workdir", str(args.workdir),
               "--memory_one", str(n)] + (["--quick"] if args.quick else [])
        env = memory_env() if device.type == "cpu" else os.environ.copy()
        proc = subprocess.run(cmd, cwd=Path(script).parent, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"n_cells": n, "error": proc.stderr[-2000:]})
            continue
        results.append(json.loads(sub.read_text()))
        sub.unlink()
        print(f"memory, {n} cells: peak {results[-1]['memory']['step_peak_mib']:.1f} MiB above the start", flush=True)
    ok = [m for m in results if "memory" in m]
    growth = (ok[-1]["memory"]["step_peak_mib"] / max(ok[0]["memory"]["step_peak_mib"], 1e-9)) if len(ok) == 2 else None
    return results, growth


# ----------------------------------------------------------------------------- models
def ours_config(shape: str | dict, **peft):
    from transformerslocal import BertConfig

    arch = SHAPES[shape] if isinstance(shape, str) else shape
    return BertConfig(**arch, **peft)


LORA = dict(prompt_type="lora", lora_r=8, lora_alpha=1, lora_dropout=0.0, lora_target_modules=["query", "value"])


def build_ours(shape: str | dict, *, num_labels: int = 5, seed: int = 0, **peft):
    """Our ``BertForSequenceClassification`` with ``requires_grad`` set by ``mark_trainable``;
    LoRA B is made nonzero so the update is really computed."""
    from transformerslocal import BertForSequenceClassification, mark_trainable

    torch.manual_seed(seed)
    model = BertForSequenceClassification(ours_config(shape, num_labels=num_labels, **peft))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    mark_trainable(model)
    return model


def build_hf_like(ours, *, attn_implementation: str = "sdpa"):
    """``transformers.BertForSequenceClassification`` (``attn_implementation``) with our
    model's base weights, wrapped by ``peft`` LoRA of the same r / alpha / targets with
    our A and B copied; pooler and classifier trainable as in ours. Returns (model,
    max |logits difference| in eval mode on a probe batch)."""
    import peft
    import transformers

    cfg = ours.config
    hf_cfg = transformers.BertConfig(**{k: getattr(cfg, k) for k in ARCH_KEYS}, num_labels=cfg.num_labels,
                                     attn_implementation=attn_implementation)
    hf = transformers.BertForSequenceClassification(hf_cfg)
    state = ours.state_dict()
    base = {k: v for k, v in state.items() if "lora_" not in k}
    missing, unexpected = hf.load_state_dict(base, strict=False)
    assert not unexpected, unexpected
    assert all("position_ids" in k or "token_type_ids" in k for k in missing), missing
    if cfg.uses("lora"):
        lcfg = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=float(cfg.lora_dropout),
                               target_modules=list(cfg.lora_target_modules))
        hf = peft.get_peft_model(hf, lcfg)
        with torch.no_grad():
            for name, module in hf.named_modules():
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    ours_name = name.replace("base_model.model.", "", 1)
                    module.lora_A["default"].weight.copy_(state[ours_name + ".lora_A"])
                    module.lora_B["default"].weight.copy_(state[ours_name + ".lora_B"])
        for name, p in hf.named_parameters():
            if ".pooler." in name or ".classifier." in name:
                p.requires_grad_(True)
    else:
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        for name, p in hf.named_parameters():
            p.requires_grad_(name in trainable)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert n_ours == n_hf, (n_ours, n_hf)
    # parity probe
    ids, mask = padded_batch(cfg.vocab_size, [16, 12, 9], seed=123)
    was = ours.training
    ours.eval()
    hf.eval()
    with torch.no_grad():
        diff = (ours(ids, mask).logits - hf(input_ids=ids, attention_mask=mask).logits).abs().max().item()
    ours.train(was)
    return hf, diff


def padded_batch(vocab_size: int, lengths, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    lengths = list(lengths)
    width = max(lengths)
    ids = torch.randint(1, vocab_size, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


def batch_lengths(batch_size: int, length: int, seed: int = 0, low: float = 0.85) -> list[int]:
    """Lengths of a length-grouped batch padded to ``length``: one cell of ``length``,
    the rest uniform in [low*length, length]."""
    rng = np.random.default_rng(seed)
    rest = rng.integers(int(low * length), length + 1, size=batch_size - 1).tolist()
    return [length] + rest


def autocast_ctx(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_train_step(model, ids, mask, labels, *, hf: bool, device: torch.device, precision: str = "fp32",
                    lr: float = 1e-4):
    """forward + cross-entropy + backward + AdamW step over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def step():
        with autocast_ctx(device, precision):
            out = model(input_ids=ids, attention_mask=mask) if hf else model(ids, mask)
        loss = torch.nn.functional.cross_entropy(out.logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def encoder_of(model, hf: bool):
    """The ``BertModel`` inside a classifier: for a ``peft`` model the wrapped transformers
    model (its LoRA layers are injected there, so they run)."""
    if hf and hasattr(model, "base_model") and hasattr(model.base_model, "model"):
        model = model.base_model.model
    return model.bert


def make_infer_step(model, ids, mask, *, hf: bool, device: torch.device, precision: str = "fp32",
                    readout: str = "logits"):
    """One no-grad forward returning ``logits`` (the classifier) or, for ``readout="tokens"``,
    the encoder's every-token last hidden state (the classifier's ``BertModel`` alone)."""
    run = model if readout == "logits" else encoder_of(model, hf)

    @torch.no_grad()
    def step():
        with autocast_ctx(device, precision):
            out = run(input_ids=ids, attention_mask=mask) if hf else run(ids, mask)
        return out.logits if readout == "logits" else out.last_hidden_state

    return step


# ----------------------------------------------------------------------------- FLOPs
def layer_matmul_params(cfg) -> int:
    d, f = cfg.hidden_size, cfg.intermediate_size
    return 4 * d * d + 2 * d * f


def training_flops(cfg, batch: int, length: int, *, full_finetune: bool = True) -> float:
    """Analytic FLOPs of one training step at (batch, length) tokens (padding counted: it is
    computed). N = n_layers * (4 d^2 + 2 d d_ff) matmul weights; per token forward 2N plus
    attention 4 * n_layers * length * d (QK^T and PV); backward = 2x forward for the
    input gradients + (full fine-tuning) 2N per token for the weight gradients, so a full
    step is 6 N B T + 12 n_layers B T^2 d. LoRA: the frozen weights get no weight gradient,
    so 4 N B T + 12 n_layers B T^2 d (LoRA's own r-sized matmuls, pooler, classifier and
    embeddings are < 1% and left out)."""
    n = cfg.num_hidden_layers * layer_matmul_params(cfg)
    tokens = batch * length
    attn_fwd = 4 * cfg.num_hidden_layers * batch * length * length * cfg.hidden_size
    linear = (6 if full_finetune else 4) * n * tokens
    return linear + 3 * attn_fwd


# ----------------------------------------------------------------------------- data
def make_dataset(workdir: Path, *, n_cells: int, model_input_size: int, n_genes: int = 3000,
                 n_cell_types: int = 5, median_library_size: float = 3000.0, seed: int = 0,
                 n_folds: int = 5) -> dict:
    """Synthetic labelled cells -> vocabulary -> rank-value tokens -> stratified folds,
    under ``workdir/data`` (reused when present). Returns paths and the length summary."""
    from geneformer_peft.data.folds import split_folds
    from geneformer_peft.data.synthetic import generate_counts
    from geneformer_peft.data.rank_value import tokenize_anndata
    from geneformer_peft.data.vocab import build_vocabulary

    workdir = Path(workdir)
    data_dir = workdir / "data"
    meta_path = workdir / "dataset.json"
    key = dict(n_cells=n_cells, model_input_size=model_input_size, n_genes=n_genes, n_cell_types=n_cell_types,
               median_library_size=median_library_size, seed=seed, n_folds=n_folds)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["key"] == key:
            return meta
    t0 = time.perf_counter()
    adata = generate_counts(n_cells=n_cells, n_genes=n_genes, n_cell_types=n_cell_types, seed=seed,
                            median_library_size=median_library_size)
    vocab, medians = build_vocabulary(adata, show_progress=False)
    cells = tokenize_anndata(adata, token_dictionary=vocab, gene_median_dictionary=medians,
                             label_column="cell_type", model_input_size=model_input_size, show_progress=False)
    lengths = np.array([len(x) for x in cells["input_ids"]])
    if data_dir.exists():
        import shutil
        shutil.rmtree(data_dir)
    split_folds(cells, dataset_name="bench", output_dir=data_dir, n_folds=n_folds, label_column="cell_type",
                seed=seed)
    meta = {"key": key, "data_path": str(data_dir), "dataset_name": "bench", "vocab_size": len(vocab),
            "lengths": {"min": int(lengths.min()), "p10": float(np.percentile(lengths, 10)),
                        "median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)),
                        "max": int(lengths.max()), "mean": float(lengths.mean()),
                        "truncated_at_max": int((lengths >= model_input_size).sum())},
            "all_lengths": lengths.tolist(),
            "labels": [str(x) for x in cells["cell_type"]],
            "build_seconds": time.perf_counter() - t0}
    workdir.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta))
    return meta


def write_json(path: Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=float))


def base_parser(description: str):
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small CPU settings")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", type=Path, required=True, help="where the JSON result goes")
    p.add_argument("--workdir", type=Path, default=None, help="scratch folder (shared dataset)")
    return p
