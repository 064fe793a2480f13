"""scBERT (Performer) benchmarks: our model vs performer-pytorch, scaling in the panel length,
gradient checkpointing, binned tokenization memory, and the panel alignment vs scBERT's loop.

    python benchmarks/bench_performer.py [--quick] [--device cpu|cuda] [--json out.json] [--workdir DIR]

1. Training step (forward + cross-entropy over every position + backward + AdamW) and
   inference (no-grad forward, eval mode) of our ``PerformerForMaskedLM`` and performer-pytorch
   1.1.4's ``PerformerLM`` (scBERT's settings) holding the same weights and projections
   (max |logits difference| reported), timed in alternation; ratio = theirs / ours.
2. Our training step and inference at 2,048, 8,192 and 16,907 positions (the released
   6-layer, dim-200, 10-head model, batch 1): seconds and peak memory per cell, and the
   exponent of a power law fitted to each (1 = linear in length); the 16,907-position
   training step's peak memory with gradient checkpointing and without.
3. Binned tokenization (``tokenize_binned``) of N and 10 N cells of a 30,000-gene file to a
   16,906-gene panel, each in a fresh process: peak memory.
4. Aligning a 30,000-gene file to the 16,906-gene panel for a block of cells: ours
   (:func:`align_to_panel` + ``project``) vs scBERT's preprocessing loop (for each panel gene
   ``in`` / ``list.index`` on the file's names, then a column copy into a ``lil_matrix``),
   the loop timed on the first genes of the panel and extrapolated linearly to all of them.

Peak memory on CPU: the resident-set increase during the measured call, in a child process
under ``common.MEMORY_ENV`` (see ``benchmarks/common.py``); on CUDA ``max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

RELEASED = dict(num_tokens=7, dim=200, depth=6, heads=10, dim_head=64)
PANEL_GENES = 16906
FILE_GENES = 30000


# ----------------------------------------------------------------------------- models
def build_pair(sizes: dict, seed: int = 0):
    """(ours, performer-pytorch) with the same weights and projections, projections fixed."""
    import torch
    from performer_pytorch import PerformerLM

    import transformerslocal as tl
    from transformerslocal.modeling_performer import from_performer_pytorch_state_dict

    torch.manual_seed(seed)
    ref = PerformerLM(**sizes, local_attn_heads=0, rotary_position_emb=False, qkv_bias=False, attn_out_bias=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    ours = tl.PerformerForMaskedLM(tl.PerformerConfig(**sizes), warn_random_positions=False)
    ours.load_state_dict(from_performer_pytorch_state_dict(ref.state_dict()), strict=True)
    ref.fix_projection_matrices_()
    ours.performer.fix_projection_matrices_()
    return ours, ref


def cells(batch: int, length: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (batch, length), generator=gen)
    ids[:, -1] = 0
    return ids


def train_step(model, ids, targets, *, ours: bool):
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        logits = model(ids).logits if ours else model(ids)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def infer_step(model, ids, *, ours: bool):
    import torch

    @torch.no_grad()
    def step():
        return model(ids).logits if ours else model(ids)
    return step


# ----------------------------------------------------------------------------- 1. vs performer-pytorch
def speed_cases(quick: bool) -> list[tuple[str, dict, int, int]]:
    if quick:
        return [("6L-200", RELEASED, 1, 2048), ("2L-200", {**RELEASED, "depth": 2}, 2, 2048),
                ("2L-200", {**RELEASED, "depth": 2}, 1, 8192)]
    return [("6L-200", RELEASED, 1, 2048), ("6L-200", RELEASED, 4, 2048), ("6L-200", RELEASED, 1, 8192),
            ("6L-200", RELEASED, 1, 16907)]


def bench_speed(device, quick: bool) -> list[dict]:
    import torch
    from common import interleaved_medians

    out = []
    for shape, arch, batch, length in speed_cases(quick):
        ours, ref = build_pair({**arch, "max_seq_len": length})
        ours.to(device)
        ref.to(device)
        ids, targets = cells(batch, length).to(device), cells(batch, length, seed=1).to(device)
        ours.eval()
        ref.eval()
        with torch.no_grad():
            diff = (ours(ids).logits - ref(ids)).abs().max().item()
        case = {"shape": shape, "batch": batch, "length": length, "eval_logits_max_abs_diff": diff}
        repeats = 3 if quick or length > 8192 else 5
        for mode in ("train", "inference"):
            ours.train(mode == "train")
            ref.train(mode == "train")
            if mode == "train":
                fns = {"ours": train_step(ours, ids, targets, ours=True), "ref": train_step(ref, ids, targets, ours=False)}
            else:
                fns = {"ours": infer_step(ours, ids, ours=True), "ref": infer_step(ref, ids, ours=False)}
            t = interleaved_medians(fns, device, warmup=1, repeats=repeats)
            case[mode] = {
                "ours": t["ours"], "performer_pytorch": t["ref"],
                "ratio_median": t["ref"]["median_s"] / t["ours"]["median_s"],
                "ratio_min": t["ref"]["min_s"] / t["ours"]["min_s"],
                "ratio_cpu": t["ref"]["median_cpu_s"] / t["ours"]["median_cpu_s"],
            }
            print(f"  {shape} {batch}x{length} {mode}: ours {t['ours']['median_s']:.2f} s, performer-pytorch "
                  f"{t['ref']['median_s']:.2f} s -> x{case[mode]['ratio_median']:.2f} (min x{case[mode]['ratio_min']:.2f})",
                  flush=True)
        out.append(case)
        del ours, ref
    return out


# ----------------------------------------------------------------------------- 2. scaling and memory
def child_memory(spec: dict) -> dict:
    """In a fresh process: build our released-size model at ``length`` and measure one call."""
    import torch
    from common import peak_memory

    import transformerslocal as tl

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = tl.PerformerForMaskedLM(tl.PerformerConfig(**RELEASED, max_seq_len=spec["length"]),
                                    warn_random_positions=False).to(device)
    model.performer.fix_projection_matrices_()
    ids, targets = cells(1, spec["length"]).to(device), cells(1, spec["length"], seed=1).to(device)
    if spec["mode"] == "train":
        model.train()
        if spec["checkpointing"]:
            model.gradient_checkpointing_enable()
        fn = train_step(model, ids, targets, ours=True)  # its first step: gradients and AdamW state count too
    else:
        model.eval()
        fn = infer_step(model, ids, ours=True)
    t0 = time.perf_counter()
    memory = peak_memory(fn, device)
    memory["seconds_under_memory_env"] = time.perf_counter() - t0
    return memory


def run_child(spec: dict) -> dict:
    from common import memory_env

    proc = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], capture_output=True, text=True,
                          env=memory_env(), cwd=HERE)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def power_law_exponent(xs, ys) -> float:
    import numpy as np

    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def bench_scaling(device, quick: bool) -> dict:
    import torch
    from common import interleaved_medians

    import transformerslocal as tl

    lengths = [2048, 8192, 16907]
    rows = []
    for length in lengths:
        torch.manual_seed(0)
        model = tl.PerformerForMaskedLM(tl.PerformerConfig(**RELEASED, max_seq_len=length),
                                        warn_random_positions=False).to(device)
        model.performer.fix_projection_matrices_()
        ids, targets = cells(1, length).to(device), cells(1, length, seed=1).to(device)
        row = {"length": length}
        for mode in ("train", "inference"):
            model.train(mode == "train")
            fn = train_step(model, ids, targets, ours=True) if mode == "train" else infer_step(model, ids, ours=True)
            repeats = 1 if quick and length > 2048 else 2 if length > 8192 or quick else 3
            t = interleaved_medians({"ours": fn}, device, warmup=1, repeats=repeats)["ours"]
            memory = run_child({"device": str(device), "length": length, "mode": mode, "checkpointing": False})
            row[mode] = {"seconds_per_cell": t["min_s"], "median_s": t["median_s"], "cpu_s": t["median_cpu_s"],
                         "peak_mib": memory["step_peak_mib"], "memory_method": memory["method"]}
            print(f"  {length} positions {mode}: {t['min_s']:.2f} s/cell, peak {memory['step_peak_mib']:.0f} MiB",
                  flush=True)
        rows.append(row)
        del model
    fits = {f"{mode}_{what}_exponent": power_law_exponent(lengths, [r[mode][key] for r in rows])
            for mode in ("train", "inference")
            for what, key in (("time", "seconds_per_cell"), ("cpu_time", "cpu_s"), ("memory", "peak_mib"))}
    # gradient checkpointing at the released size
    torch.manual_seed(0)
    model = tl.PerformerForMaskedLM(tl.PerformerConfig(**RELEASED, max_seq_len=16907),
                                    warn_random_positions=False).to(device).train()
    model.performer.fix_projection_matrices_()
    model.gradient_checkpointing_enable()
    ids, targets = cells(1, 16907).to(device), cells(1, 16907, seed=1).to(device)
    t = interleaved_medians({"ours": train_step(model, ids, targets, ours=True)}, device, warmup=1, repeats=1)["ours"]
    memory = run_child({"device": str(device), "length": 16907, "mode": "train", "checkpointing": True})
    plain = rows[-1]["train"]
    checkpointing = {"seconds": t["min_s"], "peak_mib": memory["step_peak_mib"],
                     "peak_ratio": memory["step_peak_mib"] / plain["peak_mib"],
                     "time_ratio": t["min_s"] / plain["seconds_per_cell"]}
    print(f"  16907 train with checkpointing: {t['min_s']:.2f} s, peak {memory['step_peak_mib']:.0f} MiB "
          f"(x{checkpointing['peak_ratio']:.2f} of {plain['peak_mib']:.0f} MiB)", flush=True)
    return {"rows": rows, "fits": fits, "checkpointing_16907": checkpointing}


# ----------------------------------------------------------------------------- 3. tokenization memory
def synthetic_names(n: int, prefix: str) -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def write_h5ad(path: Path, n_cells: int, seed: int) -> None:
    """Raw counts, 30,000 genes, ~4% non-zero (about 1,200 genes a cell), written block by block."""
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_cells, 1000):
        rows = min(1000, n_cells - start)
        block = sp.random(rows, FILE_GENES, density=0.04, format="csr", random_state=rng, dtype=np.float32)
        block.data = np.ceil(block.data * 20).astype(np.float32)
        blocks.append(block)
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(["A", "B", "C"], n_cells))},
                       index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=synthetic_names(FILE_GENES, "G"))
    anndata.AnnData(X=sp.vstack(blocks, format="csr"), obs=obs, var=var).write_h5ad(path)


def panel_names() -> list[str]:
    """16,906 names: 15,000 of the file's genes (shuffled) and 1,906 absent from it."""
    import numpy as np

    present = np.random.default_rng(1).permutation(synthetic_names(FILE_GENES, "G"))[:15000].tolist()
    return present + synthetic_names(PANEL_GENES - 15000, "ABSENT")


def child_tokenize(spec: dict) -> dict:
    import datasets  # noqa: F401  (import cost in the baseline)
    from common import _status_kib

    from geneformer_peft.data.binned import tokenize_binned

    panel = panel_names()
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    _, stats = tokenize_binned(spec["path"], gene_panel=panel, label_column="cell_type", chunk_size=spec["chunk_size"],
                               show_progress=False, return_stats=True, cache_dir=spec["cache_dir"])
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"cells": stats.n_cells_kept, "seconds": seconds, "cells_per_s": stats.n_cells_kept / seconds,
            "baseline_rss_mib": baseline / 1024, "increase_mib": (peak - baseline) / 1024,
            "chunk_size": spec["chunk_size"], "file_mib": Path(spec["path"]).stat().st_size / 2 ** 20}


def bench_tokenization(workdir: Path, quick: bool) -> list[dict]:
    from common import memory_env

    n = 300 if quick else 1000
    out = []
    for n_cells in (n, 10 * n):
        path = workdir / f"cells_{n_cells}.h5ad"
        if not path.is_file():
            write_h5ad(path, n_cells, seed=n_cells)
        spec = {"path": str(path), "chunk_size": 256, "cache_dir": str(workdir / f"cache_{n_cells}")}
        proc = subprocess.run([sys.executable, __file__, "--_child_tokenize", json.dumps(spec)], capture_output=True,
                              text=True, env=memory_env(), cwd=HERE)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  binned tokenization {r['cells']} cells: {r['seconds']:.1f} s, peak increase {r['increase_mib']:.0f} MiB",
              flush=True)
        out.append(r)
    return out


# ----------------------------------------------------------------------------- 4. alignment
def release_loop(panel: list[str], file_genes: list[str], X, positions):
    """scBERT's preprocessing loop, run over the panel ``positions`` given (the baseline)."""
    import numpy as np
    import scipy.sparse as sp

    counts = sp.lil_matrix((X.shape[0], len(panel)), dtype=np.float32)
    for i in positions:
        if panel[i] in file_genes:
            loc = file_genes.index(panel[i])
            counts[:, i] = X[:, loc]
    return counts


def bench_alignment(workdir: Path, quick: bool) -> dict:
    import anndata
    import numpy as np

    from geneformer_peft.data.binned import align_to_panel

    path = workdir / "cells_align.h5ad"
    n_cells = 512
    if not path.is_file():
        write_h5ad(path, n_cells, seed=7)
    adata = anndata.read_h5ad(path)
    X = adata.X.tocsr()
    file_genes = list(adata.var_names)
    panel = panel_names()

    def ours():
        alignment = align_to_panel(file_genes, panel, source_name="bench")
        return alignment.project(X)

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        aligned = ours()
        times.append(time.perf_counter() - t0)
    subset = 300 if quick else 1000
    positions = np.linspace(0, len(panel) - 1, subset).astype(int)  # spread over the panel (absent genes too)
    Xc = X.tocsc()
    t0 = time.perf_counter()
    looped = release_loop(panel, file_genes, Xc, positions)
    loop_subset_s = time.perf_counter() - t0
    same = bool(np.array_equal(looped.tocsr()[:, positions].toarray(), aligned[:, positions].toarray()))
    loop_full_s = loop_subset_s * len(panel) / subset
    ratio = loop_full_s / min(times)
    print(f"  alignment of {n_cells} cells x {FILE_GENES} genes to {len(panel)}: ours {min(times) * 1e3:.1f} ms, "
          f"loop {loop_subset_s:.1f} s for {subset} panel genes -> {loop_full_s:.0f} s for all (x{ratio:.0f})", flush=True)
    return {"cells": n_cells, "file_genes": FILE_GENES, "panel_genes": len(panel), "ours_s": min(times),
            "loop_subset_genes": subset, "loop_subset_s": loop_subset_s, "loop_extrapolated_s": loop_full_s,
            "speedup": ratio, "same_values_on_subset": same}


# ----------------------------------------------------------------------------- report (run_all.py)
def render_section(r: dict, targets: list) -> list[str]:
    """Markdown of one run's results and its targets (used by ``run_all.py``)."""
    md = ["## 8. scBERT (Performer): ours vs performer-pytorch, length scaling, tokenization", "",
          "Our `PerformerForMaskedLM` and performer-pytorch 1.1.4's `PerformerLM` (scBERT's settings) with the same "
          "weights and projections; training step = forward + cross-entropy over all positions + backward + AdamW, "
          "inference = no-grad forward. Timed in alternation after one warm-up; ratio = performer-pytorch time / ours "
          "(> 1: ours faster), of the medians, of the minima and of process CPU time.", "",
          "| shape | batch x length | mode | ours s (median / min) | performer-pytorch s (median / min) | "
          "ratio (median) | ratio (min) | ratio (CPU) | logits diff |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    worst = {}
    for c in r["speed"]:
        for mode in ("train", "inference"):
            m = c[mode]
            md.append(f"| {c['shape']} | {c['batch']} x {c['length']} | {mode} | {m['ours']['median_s']:.2f} / "
                      f"{m['ours']['min_s']:.2f} | {m['performer_pytorch']['median_s']:.2f} / "
                      f"{m['performer_pytorch']['min_s']:.2f} | {m['ratio_median']:.2f} | {m['ratio_min']:.2f} | "
                      f"{m['ratio_cpu']:.2f} | {c['eval_logits_max_abs_diff']:.1e} |")
            key = min(m["ratio_median"], m["ratio_min"])
            if mode not in worst or key < worst[mode][0]:
                worst[mode] = (key, f"{c['shape']} {c['batch']}x{c['length']}")
    targets.append(("scBERT training step >= 1.2x performer-pytorch at every shape", worst["train"][0] >= 1.2,
                    f"worst (lower of median and min ratios) x{worst['train'][0]:.2f} at {worst['train'][1]}"))
    targets.append(("scBERT inference not slower than performer-pytorch at any shape", worst["inference"][0] >= 1.0,
                    f"worst x{worst['inference'][0]:.2f} at {worst['inference'][1]}"))
    s = r["scaling"]
    md += ["", "Ours at the released size (6 layers, dim 200, 10 heads of 64, 266 features), batch 1 (one cell):", "",
           "| positions | train s/cell | train peak MiB | inference s/cell | inference peak MiB |", "|---:|---:|---:|---:|---:|"]
    for row in s["rows"]:
        md.append(f"| {row['length']:,} | {row['train']['seconds_per_cell']:.2f} | {row['train']['peak_mib']:.0f} | "
                  f"{row['inference']['seconds_per_cell']:.2f} | {row['inference']['peak_mib']:.0f} |")
    f = s["fits"]
    ck = s["checkpointing_16907"]
    md += ["", f"Fitted exponents (time or memory ~ length^k over 2,048-16,907): training wall time k = "
               f"{f['train_time_exponent']:.2f} (process CPU time {f.get('train_cpu_time_exponent', float('nan')):.2f}), "
               f"training memory k = {f['train_memory_exponent']:.2f}, inference wall time k = "
               f"{f['inference_time_exponent']:.2f} (CPU time {f.get('inference_cpu_time_exponent', float('nan')):.2f}), "
               f"inference memory k = {f['inference_memory_exponent']:.2f}. On a shared CPU, load from other processes "
               "changes wall times between lengths; CPU time is the steadier measure there.",
           "", f"16,907-position training step with gradient checkpointing: {ck['seconds']:.1f} s, peak "
               f"{ck['peak_mib']:.0f} MiB = x{ck['peak_ratio']:.2f} of the peak without ({s['rows'][-1]['train']['peak_mib']:.0f} "
               f"MiB), time x{ck['time_ratio']:.2f}.", ""]
    judged = {k: v for k, v in f.items() if "cpu_time" in k or "memory" in k} if any("cpu_time" in k for k in f) else f
    targets.append(("scBERT time and memory linear in length (fitted exponent <= 1.15; time as CPU time)",
                    max(judged.values()) <= 1.15,
                    ", ".join(f"{k.replace('_exponent', '')} {v:.2f}" for k, v in f.items())))
    targets.append(("scBERT 16,907-position training step: checkpointing peak memory <= 1/2 of without",
                    ck["peak_ratio"] <= 0.5, f"x{ck['peak_ratio']:.2f}"))
    t = r["tokenization"]
    md += ["Binned tokenization (30,000-gene file, 16,906-gene panel, chunk 256), each file in a fresh process:", "",
           "| cells | file MiB | seconds | cells/s | peak RSS increase MiB |", "|---:|---:|---:|---:|---:|"]
    md += [f"| {x['cells']:,} | {x['file_mib']:.0f} | {x['seconds']:.1f} | {x['cells_per_s']:.0f} | "
           f"{x['increase_mib']:.0f} |" for x in t]
    growth = t[-1]["increase_mib"] / max(t[0]["increase_mib"], 1e-9)
    targets.append((f"Binned tokenization memory flat in the number of cells ({t[-1]['cells'] // t[0]['cells']}x cells)",
                    growth < 2.0, f"peak increase x{growth:.2f}"))
    a = r["alignment"]
    md += ["", f"Alignment of {a['cells']} cells x {a['file_genes']:,} genes to the {a['panel_genes']:,}-gene panel: ours "
               f"{a['ours_s'] * 1e3:.1f} ms; scBERT's loop {a['loop_subset_s']:.1f} s for {a['loop_subset_genes']:,} panel "
               f"genes spread evenly over the panel (absent ones included), extrapolated linearly to "
               f"{a['loop_extrapolated_s']:.0f} s for all {a['panel_genes']:,}; x{a['speedup']:.0f}; values equal on "
               f"those genes: {a['same_values_on_subset']}.", ""]
    targets.append(("Panel alignment >= 100x scBERT's loop", a["speedup"] >= 100, f"x{a['speedup']:.0f} (loop extrapolated)"))
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--only", default="speed,scaling,tokenization,alignment")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_child_tokenize", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        print(json.dumps(child_memory(json.loads(args._child))))
        return 0
    if args._child_tokenize:
        print(json.dumps(child_tokenize(json.loads(args._child_tokenize))))
        return 0
    import datasets
    from common import machine_info, resolve

    datasets.disable_progress_bars()
    device = resolve(args.device)
    tmp = tempfile.TemporaryDirectory(prefix="bench_performer_")
    workdir = Path(args.workdir or tmp.name) / "performer"
    workdir.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "performer", "machine": machine_info(device), "quick": args.quick}
    parts = args.only.split(",")
    t0 = time.perf_counter()
    if "speed" in parts:
        print("1. ours vs performer-pytorch", flush=True)
        result["speed"] = bench_speed(device, args.quick)
    if "scaling" in parts:
        print("2. length scaling", flush=True)
        result["scaling"] = bench_scaling(device, args.quick)
    if "tokenization" in parts:
        print("3. binned tokenization memory", flush=True)
        result["tokenization"] = bench_tokenization(workdir, args.quick)
    if "alignment" in parts:
        print("4. panel alignment", flush=True)
        result["alignment"] = bench_alignment(workdir, args.quick)
    result["seconds"] = time.perf_counter() - t0
    if all(k in result for k in ("speed", "scaling", "tokenization", "alignment")):
        targets: list = []
        print("\n".join(render_section(result, targets)))
        for label, ok, detail in targets:
            print(f"[{'MET' if ok else 'NOT MET'}] {label}: {detail}")
    text = json.dumps(result, indent=1, default=float)
    if args.json:
        args.json.write_text(text)
    else:
        print(text)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
