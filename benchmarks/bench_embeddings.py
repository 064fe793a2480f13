"""Embedding extraction: ours vs a Geneformer-style extractor, same outputs, and peak memory.

Cells: the synthetic labelled cells of ``common.make_dataset`` (variable lengths, rank-value
tokens cut at ``model_input_size``). Model: a random-weight ``BertForMaskedLM`` of the V1
shape (6L-256, 12L-512) saved once and loaded by both sides.

- **Geneformer-style** (what Geneformer's EmbExtractor does): ``transformers``
  ``BertForMaskedLM`` (SDPA) called with ``output_hidden_states=True`` (every layer and the
  MLM head run), batches in dataset order padded to their longest cell, the mean over
  non-pad tokens of ``hidden_states[n_layers + emb_layer]``.
- **ours**: :func:`geneformer_peft.analysis.embeddings.embed_cells`: length-grouped batches,
  only the layers up to ``emb_layer`` run (no MLM head), SDPA; fp32 like the reference
  (``--precision bf16`` on CUDA is timed too, as an extra row).

Cells/s = cells / wall seconds of one pass over all cells (median of ``repeats`` passes,
interleaved); the outputs are compared (max |diff|, fp32). ``--quick`` (CPU): cells cut at
512 tokens with lengths like Geneformer's corpus relative to its input size (median about
half of it), 48 cells at 6L-256 and 24 at 12L-512, batch 8, one pass. Plain inference (the
full encoder, no head) of ours vs ``transformers`` (SDPA) on the same length-grouped
batches (little padding) is timed too (in ``--quick`` on the first two batches, 2 passes),
since both analyses are made of it.

Peak memory: our extraction (embed + write ``.h5ad``) of ``n`` and ``10 n`` cells, each in a
fresh process (``common.peak_memory``: CUDA allocated bytes / CPU peak RSS increase under
``common.MEMORY_ENV``).

    python benchmarks/bench_embeddings.py --json out.json [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import (SHAPES, base_parser, interleaved_medians, machine_info, make_dataset, memory_in_children, peak_memory,
                    resolve, sync, write_json)

EMB_LAYER = -1


def save_model(shape: str, directory: Path) -> Path:
    from transformerslocal import BertConfig, BertForMaskedLM

    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(**SHAPES[shape])).save_pretrained(directory)
    return directory


def load_cells(meta: dict, n_cells: int, max_length: int):
    from geneformer_peft.analysis.cells import TokenizedCells
    from geneformer_peft.data.dataset_io import load_saved_dataset

    path = Path(meta["data_path"]) / "bench" / "0" / "bench_train0.dataset"
    dataset = load_saved_dataset(path)
    rows = np.arange(min(n_cells, len(dataset)))
    return TokenizedCells(dataset, rows, max_length=max_length)


def geneformer_style(hf, cells, batch_size: int, device: torch.device) -> np.ndarray:
    """Dataset order, padded to the batch's longest cell, every hidden state, mean over non-pad."""
    from geneformer_peft.data.collator import pad_input_ids

    out = []
    k = hf.config.num_hidden_layers + EMB_LAYER
    with torch.no_grad():
        for start in range(0, len(cells), batch_size):
            idx = np.arange(start, min(start + batch_size, len(cells)))
            batch = pad_input_ids(cells.tokens(idx))
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            hidden = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[k]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * m).sum(1) / m.sum(1)).float().cpu().numpy())
    return np.concatenate(out)


def plain_inference(ours_bert, hf_bert, cells, batch_size: int, device: torch.device, repeats: int) -> dict:
    """Full encoder forward (no head) of ours and transformers on the same length-grouped batches."""
    from geneformer_peft.analysis.cells import length_grouped_batches
    from geneformer_peft.data.collator import pad_input_ids

    batches = []
    for idx in length_grouped_batches(cells.lengths, batch_size):
        b = pad_input_ids(cells.tokens(idx))
        batches.append((b["input_ids"].to(device), b["attention_mask"].to(device)))

    @torch.no_grad()
    def ours():
        for ids, mask in batches:
            ours_bert(ids, mask)

    @torch.no_grad()
    def hf():
        for ids, mask in batches:
            hf_bert(input_ids=ids, attention_mask=mask)

    t = interleaved_medians({"ours": ours, "transformers": hf}, device, warmup=1, repeats=repeats)
    return {"ours_s": t["ours"]["median_s"], "transformers_s": t["transformers"]["median_s"],
            "ratio": t["transformers"]["median_s"] / t["ours"]["median_s"]}


def run_shape(shape: str, args, device, meta, n_cells: int, max_length: int, batch_size: int, repeats: int) -> dict:
    import transformers

    from geneformer_peft.analysis.embeddings import embed_cells
    from geneformer_peft.analysis.loading import SpecialTokens, load_analysis_model

    model_dir = save_model(shape, Path(args.workdir) / f"model_{shape}")
    am = load_analysis_model(model_dir).to(device)
    hf = transformers.BertForMaskedLM.from_pretrained(model_dir, attn_implementation="sdpa").to(device).eval()
    cells = load_cells(meta, n_cells, max_length)
    specials = SpecialTokens(pad=0)
    ref = geneformer_style(hf, cells, batch_size, device)
    mine = embed_cells(am.model, cells, specials=specials, emb_layer=EMB_LAYER, batch_size=batch_size, device=device,
                       precision="fp32")
    diff = float(np.abs(ref - mine).max())
    fns = {"geneformer_style": lambda: geneformer_style(hf, cells, batch_size, device),
           "ours": lambda: embed_cells(am.model, cells, specials=specials, emb_layer=EMB_LAYER, batch_size=batch_size,
                                       device=device, precision="fp32")}
    if device.type == "cuda":
        fns["ours_bf16"] = lambda: embed_cells(am.model, cells, specials=specials, emb_layer=EMB_LAYER,
                                               batch_size=batch_size, device=device, precision="bf16")
    t = interleaved_medians(fns, device, warmup=0, repeats=repeats)
    res = {"shape": shape, "n_cells": len(cells), "batch_size": batch_size, "max_length": max_length,
           "lengths": {"min": int(cells.lengths.min()), "median": float(np.median(cells.lengths)),
                       "max": int(cells.lengths.max())},
           "padding_fraction_dataset_order": padding(cells.lengths, batch_size, grouped=False),
           "padding_fraction_ours": padding(cells.lengths, batch_size, grouped=True),
           "max_abs_diff": diff, "layers_run": am.num_layers + EMB_LAYER, "num_hidden_layers": am.num_layers}
    for k, v in t.items():
        res[f"{k}_cells_per_s"] = len(cells) / v["median_s"]
        res[f"{k}_s"] = v["median_s"]
    res["speedup"] = res["ours_cells_per_s"] / res["geneformer_style_cells_per_s"]
    if "ours_bf16_cells_per_s" in res:
        res["speedup_bf16"] = res["ours_bf16_cells_per_s"] / res["geneformer_style_cells_per_s"]
    sample = cells.subset(np.arange(min(len(cells), 2 * batch_size))) if args.quick else cells
    # quick: 16 cells, so 7 alternating rounds stay cheap and a median of 7 is not one draw
    res["plain_inference"] = plain_inference(am.model.bert, hf.bert, sample, batch_size, device,
                                             7 if args.quick else max(repeats, 2))
    print(f"{shape}: ours {res['ours_cells_per_s']:.2f} cells/s, Geneformer-style "
          f"{res['geneformer_style_cells_per_s']:.2f} cells/s -> {res['speedup']:.2f}x (max |diff| {diff:.2e}); "
          f"plain inference ours/transformers {res['plain_inference']['ratio']:.3f}", flush=True)
    return res


def padding(lengths: np.ndarray, batch_size: int, *, grouped: bool) -> float:
    from geneformer_peft.analysis.cells import length_grouped_batches

    if grouped:
        batches = list(length_grouped_batches(lengths, batch_size))
    else:
        batches = [np.arange(s, min(s + batch_size, len(lengths))) for s in range(0, len(lengths), batch_size)]
    slots = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - float(lengths.sum()) / slots


def memory_one(args, device, meta, n_cells: int, max_length: int, batch_size: int) -> dict:
    from geneformer_peft.analysis.embeddings import CellEmbeddings, embed_cells, write_cell_embeddings
    from geneformer_peft.analysis.loading import SpecialTokens, load_analysis_model

    am = load_analysis_model(save_model("6L-256", Path(args.workdir) / "model_6L-256")).to(device)
    cells = load_cells(meta, n_cells, max_length)
    out = Path(tempfile.mkdtemp(dir=args.workdir)) / "emb.h5ad"

    def run():
        emb = embed_cells(am.model, cells, specials=SpecialTokens(pad=0), emb_layer=EMB_LAYER, batch_size=batch_size,
                          device=device, precision="fp32")
        write_cell_embeddings(CellEmbeddings(emb, cells.obs(), {}), out)

    embed_cells(am.model, cells.subset(np.arange(min(4, len(cells)))), specials=SpecialTokens(pad=0),
                batch_size=batch_size, device=device)  # warm-up outside the measurement
    sync(device)
    return {"n_cells": len(cells), "memory": peak_memory(run, device)}


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--memory_one", type=int, default=None, help="internal: measure the memory of N cells")
    args = p.parse_args(argv)
    device = resolve(args.device)
    cpu_quick = args.quick and device.type == "cpu"
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gf_bench_"))
    model_input_size = 512 if cpu_quick else 2048
    # lengths like Geneformer's corpus relative to the input size (median about half of it)
    meta = make_dataset(args.workdir / "emb_data", n_cells=400 if cpu_quick else 2000,
                        model_input_size=model_input_size, median_library_size=900.0 if cpu_quick else 3000.0)
    mem_cells = (20, 200) if cpu_quick else (200, 2000)
    mem_length = 256 if cpu_quick else model_input_size
    if args.memory_one:
        res = memory_one(args, device, meta, args.memory_one, mem_length, 8 if cpu_quick else 64)
        Path(args.json).write_text(json.dumps(res))
        return 0
    plan = {"6L-256": (48 if cpu_quick else 1000, 8 if cpu_quick else 64),
            "12L-512": (24 if cpu_quick else 1000, 8 if cpu_quick else 64)}
    repeats = 1 if cpu_quick else 3
    shapes = [run_shape(s, args, device, meta, n, model_input_size, bs, repeats) for s, (n, bs) in plan.items()]
    memory, growth = memory_in_children(__file__, args, device, mem_cells)
    write_json(args.json, {"bench": "embeddings", "machine": machine_info(device), "emb_layer": EMB_LAYER,
                           "shapes": shapes, "memory": memory, "memory_growth": growth,
                           "memory_max_length": mem_length})
    return 0


def render_section(r: dict, targets: list) -> list[str]:
    """The section of ``docs/benchmarks.md`` (called by ``run_all.py``)."""
    md = ["## Embedding extraction: ours vs a Geneformer-style extractor", "",
          f"Cell embeddings at emb_layer {r['emb_layer']} (mean over genes) of synthetic variable-length cells; "
          "Geneformer-style = transformers BertForMaskedLM (SDPA), output_hidden_states=True, batches in dataset "
          "order padded to their longest cell; ours = `embed_cells` (length-grouped, layers up to emb_layer only, "
          "fp32). Plain inference = full encoder without head, ours / transformers (SDPA), same length-grouped "
          "batches, the median of alternating rounds (7 with --quick).", "",
          "| shape | cells | lengths (min / median / max) | padding: dataset order / ours | Geneformer-style cells/s | "
          "ours cells/s | speedup | max abs diff | plain inference ours/transformers |",
          "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for x in r["shapes"]:
        ln = x["lengths"]
        md.append(f"| {x['shape']} | {x['n_cells']} | {ln['min']} / {ln['median']:.0f} / {ln['max']} | "
                  f"{x['padding_fraction_dataset_order']:.0%} / {x['padding_fraction_ours']:.0%} | "
                  f"{x['geneformer_style_cells_per_s']:.2f} | {x['ours_cells_per_s']:.2f} | {x['speedup']:.2f}x | "
                  f"{x['max_abs_diff']:.1e} | {x['plain_inference']['ratio']:.2f}x |")
        targets.append((f"Embedding extraction >= 2x a Geneformer-style extractor at {x['shape']} (same outputs)",
                        x["speedup"] >= 2.0 and x["max_abs_diff"] <= 1e-5,
                        f"{x['speedup']:.2f}x, max abs diff {x['max_abs_diff']:.1e}"))
    mem = [m for m in r["memory"] if "memory" in m]
    md += ["", "Peak memory of our extraction (embed + write .h5ad, fresh process each, cells cut at "
               f"{r['memory_max_length']} tokens):", "", "| cells | peak increase MiB |", "|---:|---:|"]
    md += [f"| {m['n_cells']} | {m['memory']['step_peak_mib']:.1f} |" for m in mem]
    if r.get("memory_growth") is not None:
        targets.append((f"Embedding extraction peak memory flat for {mem[-1]['n_cells'] // mem[0]['n_cells']}x cells",
                        r["memory_growth"] < 1.5, f"x{r['memory_growth']:.2f} ({mem[0]['memory']['step_peak_mib']:.1f}"
                                                  f" -> {mem[-1]['memory']['step_peak_mib']:.1f} MiB)"))
    return md + [""]


if __name__ == "__main__":
    raise SystemExit(main())
