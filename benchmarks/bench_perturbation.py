"""In silico perturbation throughput: ours vs a Geneformer-style loop, same cosines, and
peak memory.

Scan: ``--genes all``, ``delete``, cell embeddings at ``emb_layer -1`` (the cosine of each
cell's mean embedding before and after deleting each of its genes), on a few cells of the
synthetic data of ``common.make_dataset``, with a random-weight V1-shape model (6L-256)
loaded by both sides.

- **Geneformer-style** (what Geneformer's InSilicoPerturber does): one cell at a time; its
  unperturbed embedding, then all its single-gene deletions in batches of a fixed size
  through the full ``transformers`` ``BertForMaskedLM`` (SDPA) with
  ``output_hidden_states=True`` (every layer and the MLM head run).
- **ours**: :class:`geneformer_peft.analysis.perturbation.PerturbationScan`: the deletions of
  all cells sorted by length into batches of the same size, only the layers up to
  ``emb_layer`` run, results written to parquet chunks (included in the time).

Perturbed cells/s = perturbations / wall seconds (median of ``repeats`` interleaved runs);
the cosines are compared pair by pair (max |diff|).

Peak memory: our scan of 5 listed genes (+5 random-gene null perturbations per cell) on
``n`` and ``10 n`` cells, each in a fresh process (``common.peak_memory``).

    python benchmarks/bench_perturbation.py --json out.json [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench_embeddings import load_cells, save_model
from common import base_parser, interleaved_medians, machine_info, make_dataset, memory_in_children, peak_memory, resolve, \
    write_json

EMB_LAYER = -1


def geneformer_style(hf, cells, batch_size: int, device: torch.device) -> dict[tuple[int, int], float]:
    k = hf.config.num_hidden_layers + EMB_LAYER
    out = {}
    with torch.no_grad():
        for i in range(len(cells)):
            tokens = cells.tokens([i])[0]
            ids = torch.as_tensor(tokens, device=device)[None]
            original = hf(input_ids=ids, attention_mask=torch.ones_like(ids),
                          output_hidden_states=True).hidden_states[k][0].mean(0)
            perturbed = [np.delete(tokens, j) for j in range(len(tokens))]
            for b in range(0, len(perturbed), batch_size):
                batch = torch.as_tensor(np.stack(perturbed[b:b + batch_size]), device=device)
                hidden = hf(input_ids=batch, attention_mask=torch.ones_like(batch),
                            output_hidden_states=True).hidden_states[k]
                cos = torch.nn.functional.cosine_similarity(hidden.mean(1), original[None], dim=-1).cpu().numpy()
                for j, c in enumerate(cos):
                    out[(int(cells.rows[i]), int(tokens[b + j]))] = float(c)
    return out


def ours_scan(am, cells, batch_size: int, device, workdir: Path, *, genes=None, n_null: int = 0):
    from geneformer_peft.analysis.loading import SpecialTokens
    from geneformer_peft.analysis.perturbation import PerturbationScan, PerturbationSettings

    out = Path(tempfile.mkdtemp(dir=workdir))
    settings = PerturbationSettings(perturb_type="delete", genes=genes, emb_layer=EMB_LAYER, n_null=n_null,
                                    batch_size=batch_size, chunk_cells=max(1, min(len(cells), 50)))
    scan = PerturbationScan(am, cells, specials=SpecialTokens(pad=0), settings=settings, output_dir=out,
                            device=device, precision="fp32")
    scan.run()
    return scan


def memory_one(args, device, meta, n_cells: int, max_length: int, batch_size: int) -> dict:
    from geneformer_peft.analysis.loading import load_analysis_model

    am = load_analysis_model(save_model("6L-256", Path(args.workdir) / "model_6L-256")).to(device)
    cells = load_cells(meta, n_cells, max_length)
    first = cells.tokens([0])[0]
    genes = tuple(int(t) for t in first[:5])  # highly ranked in the first cell; absent from some others
    ours_scan(am, cells.subset(np.arange(2)), batch_size, device, Path(args.workdir), genes=genes, n_null=5)  # warm-up
    return {"n_cells": len(cells), "memory": peak_memory(
        lambda: ours_scan(am, cells, batch_size, device, Path(args.workdir), genes=genes, n_null=5), device)}


def main(argv=None) -> int:
    import transformers

    from geneformer_peft.analysis.loading import load_analysis_model

    p = base_parser(__doc__)
    p.add_argument("--memory_one", type=int, default=None, help="internal: measure the memory of N cells")
    args = p.parse_args(argv)
    device = resolve(args.device)
    cpu_quick = args.quick and device.type == "cpu"
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gf_bench_"))
    meta = make_dataset(args.workdir / "emb_data", n_cells=400 if cpu_quick else 2000,
                        model_input_size=512 if cpu_quick else 2048,
                        median_library_size=900.0 if cpu_quick else 3000.0)
    max_length = 128 if cpu_quick else 2048
    batch_size = 32 if cpu_quick else 100  # Geneformer's forward_batch_size default is 100
    if args.memory_one:
        res = memory_one(args, device, meta, args.memory_one, 256 if cpu_quick else 2048, 16 if cpu_quick else 100)
        Path(args.json).write_text(json.dumps(res))
        return 0
    n_cells = 3 if cpu_quick else 10
    model_dir = save_model("6L-256", args.workdir / "model_6L-256")
    am = load_analysis_model(model_dir).to(device)
    hf = transformers.BertForMaskedLM.from_pretrained(model_dir, attn_implementation="sdpa").to(device).eval()
    cells = load_cells(meta, n_cells, max_length)
    ref = geneformer_style(hf, cells, batch_size, device)
    results = ours_scan(am, cells, batch_size, device, args.workdir).results()
    tokens = results["perturbed"].str.replace("token_", "").astype(int)
    mine = {(int(c), int(t)): float(v) for c, t, v in zip(results["cell"], tokens, results["cosine_sim"])}
    assert set(mine) == set(ref), "both must perturb the same (cell, gene) pairs"
    diff = max(abs(mine[k] - ref[k]) for k in ref)
    repeats = 1 if cpu_quick else 3
    t = interleaved_medians({"geneformer_style": lambda: geneformer_style(hf, cells, batch_size, device),
                             "ours": lambda: ours_scan(am, cells, batch_size, device, args.workdir)},
                            device, warmup=0, repeats=repeats)
    n = len(ref)
    res = {"shape": "6L-256", "n_cells": len(cells), "perturbations": n, "batch_size": batch_size,
           "max_length": max_length, "lengths": cells.lengths.tolist(), "max_abs_diff": diff,
           "geneformer_style_per_s": n / t["geneformer_style"]["median_s"], "ours_per_s": n / t["ours"]["median_s"],
           "geneformer_style_s": t["geneformer_style"]["median_s"], "ours_s": t["ours"]["median_s"]}
    res["speedup"] = res["ours_per_s"] / res["geneformer_style_per_s"]
    print(f"perturbation: ours {res['ours_per_s']:.1f} perturbed cells/s, Geneformer-style "
          f"{res['geneformer_style_per_s']:.1f} -> {res['speedup']:.2f}x (max |cos diff| {diff:.2e})", flush=True)
    memory, growth = memory_in_children(__file__, args, device, (10, 100) if cpu_quick else (100, 1000))
    write_json(args.json, {"bench": "perturbation", "machine": machine_info(device), "emb_layer": EMB_LAYER,
                           "throughput": res, "memory": memory, "memory_growth": growth})
    return 0


def render_section(r: dict, targets: list) -> list[str]:
    """The section of ``docs/benchmarks.md`` (called by ``run_all.py``)."""
    t = r["throughput"]
    md = ["## In silico perturbation: ours vs a Geneformer-style loop", "",
          f"`--genes all`, delete, cell embeddings at emb_layer {r['emb_layer']}, {t['shape']}, {t['n_cells']} cells "
          f"(lengths {t['lengths']}), batches of {t['batch_size']}. Geneformer-style = one cell at a time, its "
          "deletions in fixed-size batches through the full transformers BertForMaskedLM (SDPA) with all hidden "
          "states; ours = `PerturbationScan` (deletions of all cells length-grouped, layers up to emb_layer only, "
          "parquet chunks written).", "",
          "| perturbations | Geneformer-style /s | ours /s | speedup | max abs cosine diff |",
          "|---:|---:|---:|---:|---:|",
          f"| {t['perturbations']} | {t['geneformer_style_per_s']:.1f} | {t['ours_per_s']:.1f} | {t['speedup']:.2f}x | "
          f"{t['max_abs_diff']:.1e} |"]
    targets.append(("Perturbation throughput >= 1.5x a Geneformer-style loop (identical cosines, 1e-5)",
                    t["speedup"] >= 1.5 and t["max_abs_diff"] <= 1e-5,
                    f"{t['speedup']:.2f}x, max abs diff {t['max_abs_diff']:.1e}"))
    mem = [m for m in r["memory"] if "memory" in m]
    md += ["", "Peak memory of our scan (5 listed genes + 5 null perturbations per cell, fresh process each):", "",
           "| cells | peak increase MiB |", "|---:|---:|"]
    md += [f"| {m['n_cells']} | {m['memory']['step_peak_mib']:.1f} |" for m in mem]
    if r.get("memory_growth") is not None:
        targets.append((f"Perturbation peak memory flat for {mem[-1]['n_cells'] // mem[0]['n_cells']}x cells",
                        r["memory_growth"] < 1.5, f"x{r['memory_growth']:.2f} ({mem[0]['memory']['step_peak_mib']:.1f}"
                                                  f" -> {mem[-1]['memory']['step_peak_mib']:.1f} MiB)"))
    return md + [""]


if __name__ == "__main__":
    raise SystemExit(main())
