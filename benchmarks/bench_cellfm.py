"""CellFM: our model against a straightforward quadratic implementation of the same formula.

Our ``RetentionAttention`` (``transformerslocal/modeling_cellfm.py``) computes each head's
``O = Q (K^T V)``: the (e, e) product ``K^T V`` first, so the cost is linear in the number of
genes. The reference written here computes the formula as it reads, ``O = (Q K^T) V``,
materialising the (N, N) matrix per head (quadratic in N), with its own code for everything
else (value encoder, masking, length scale, RMS norm, gate, DeepNorm post-norm, classifier)
from plain tensor operations on a copy of our model's weights. Before any timing, the
reference's last hidden states (cls and real genes) and logits must equal ours within 1e-4
on a padded batch (else the run stops).

Measured, for our ``CellFMForSequenceClassification`` (linear head, 5 labels) and the reference:

1. scaling: training step (forward + cross-entropy on the cls logits + backward + AdamW over
   everything but the gene embedding: ``freeze_preset: "cellfm"``, the fine-tuning recipe in
   use) and inference step (eval, no-grad forward to the logits) at 256, 512, 1,024 and 2,048
   genes, a 2-layer model of width 256 (8 heads of 32, the release's head dim), batch 4 (one
   cell at the full length, the rest 85-100% of it); every (length, model, mode) timed in one
   interleaved rotation after a warm-up; medians of wall and process CPU time; time per token,
   the fitted exponent k of time ~ genes^k, and the per-token ratio 2,048 / 256.
2. peak memory at 2,048 genes (the same steps, small shape and 80M shape), each step in a
   fresh child process under ``common.MEMORY_ENV``: peak RSS increase of the second step
   (after a warm-up step, so optimizer state is not counted; ``common.peak_memory``).
3. the released 80M shape (2 layers, 1536 dims, 48 heads of 32, 27,856 gene rows, 256 value
   slots) at batch 1 and 2,048 genes on CPU: training and inference step, ours and reference,
   interleaved.

    python benchmarks/bench_cellfm.py --json out.json [--quick] [--repeats 5] [--repeats_80m 3]

``--quick``: a tiny shape (64 dims, 2 heads) at 32-256 genes, the "80M" part at 128 dims and
256 genes: seconds, for the tests.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

#: the released 80M encoder (../shared/cellfm/README.md; configuration_cellfm.CELLFM_DEFAULTS)
SHAPE_80M = dict(vocab_size=27856, hidden_size=1536, num_hidden_layers=2, num_attention_heads=48,
                 intermediate_size=1536, value_slots=256)
#: the scaling shape: two layers of width 256, the release's head dim 32, vocabulary and slots as released
SHAPE_SMALL = dict(vocab_size=27856, hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
                   intermediate_size=256, value_slots=256)
SHAPE_TINY = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  value_slots=16)
SHAPE_TINY_LARGE = dict(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, value_slots=16)
FULL = dict(shape=SHAPE_SMALL, shape_name="2L-256 (8 heads of 32)", lengths=(256, 512, 1024, 2048), batch=4,
            large=SHAPE_80M, large_name="80M (2L-1536, 48 heads of 32)", large_length=2048)
QUICK = dict(shape=SHAPE_TINY, shape_name="2L-64 (2 heads of 32), quick", lengths=(32, 64, 128, 256), batch=2,
             large=SHAPE_TINY_LARGE, large_name="2L-128 (4 heads of 32), quick", large_length=256)
NUM_LABELS = 5
PARITY_TOL = 1e-4


# ----------------------------------------------------------------------------- models
def build_ours(shape: dict, max_genes: int, seed: int = 0):
    """Our classifier with random weights (seeded), ``freeze_preset: "cellfm"`` applied."""
    import transformerslocal as tl

    torch.manual_seed(seed)
    cfg = tl.CellFMConfig(**shape, max_genes=max_genes, num_labels=NUM_LABELS, freeze_preset="cellfm")
    model = tl.CellFMForSequenceClassification(cfg)
    with torch.no_grad():  # a nonzero value-encoder scalar and classifier, so every term is exercised
        model.value_enc.value_enc.a.fill_(0.3)
    tl.mark_trainable(model)
    return model


class QuadraticCellFM(nn.Module):
    """CellFM's forward written out from the formula, attention as ``(Q K^T) V``; holds a copy of
    ``ours``'s parameters (same names, ``.`` -> ``__``) with the same ``requires_grad``."""

    def __init__(self, ours) -> None:
        super().__init__()
        cfg = ours.config
        self.heads, self.layers = cfg.num_attention_heads, cfg.num_hidden_layers
        self.slope, self.eps = float(cfg.leaky_relu_slope), float(cfg.layer_norm_eps)
        self.alpha = (2 * cfg.num_hidden_layers) ** 0.25
        self.w = nn.ParameterDict()
        for name, p in ours.named_parameters():
            self.w[name.replace(".", "__")] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)

    def p(self, name: str) -> torch.Tensor:
        return self.w[name.replace(".", "__")]

    def forward(self, ids: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) gene rows, values and 0/1 mask -> ((B, 1 + L, d) last hidden states, (B, C) logits)."""
        p = self.p
        b = ids.shape[0]
        s = F.leaky_relu(values.unsqueeze(-1) * p("value_enc.value_enc.w1.weight").squeeze(-1), self.slope)
        s = s @ p("value_enc.value_enc.w3.weight").t() + p("value_enc.value_enc.a") * s
        tokens = p("gene_emb")[ids] + torch.softmax(s, dim=-1) @ p("value_enc.value_enc.table.weight").t()
        x = torch.cat([p("cls_token").expand(b, 1, -1), tokens], dim=1)
        m = torch.cat([torch.ones(b, 1), mask.float()], dim=1).unsqueeze(-1)  # (B, N, 1)
        x = x * m
        n_genes = (m.sum(dim=1, keepdim=True) - 1).clamp_min(1.0)  # (B, 1, 1)
        for i in range(self.layers):
            def w(name: str) -> torch.Tensor:
                return p(f"encoder.{i}.{name}.weight")

            def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, d) -> (B, h, N, e)
                return t.reshape(b, t.shape[1], self.heads, -1).permute(0, 2, 1, 3)

            e = x.shape[-1] // self.heads
            q = heads(torch.relu(x @ w("attn.q_proj").t())) / math.sqrt(e)
            k = heads(torch.relu(x @ w("attn.k_proj").t()) * m) / math.sqrt(e)
            v = heads(x @ w("attn.v_proj").t() / torch.sqrt(n_genes))
            scores = q @ k.transpose(-1, -2)  # (B, h, N, N): the quadratic matrix
            o = scores @ v
            o = o / torch.sqrt((o * o).mean(dim=-1, keepdim=True)).clamp_min(1e-12)
            o = o.permute(0, 2, 1, 3).reshape(b, -1, self.heads * e)
            gate = x @ w("attn.u_proj").t()
            attn = (o * gate * torch.sigmoid(gate)) @ w("attn.o_proj").t()
            x = F.layer_norm(self.alpha * x + attn, x.shape[-1:], p(f"encoder.{i}.post_norm1.weight"),
                             p(f"encoder.{i}.post_norm1.bias"), self.eps)
            ffn = ((x @ w("ffn.u_proj").t()) * (x @ w("ffn.v_proj").t())) @ w("ffn.o_proj").t()
            x = F.layer_norm(self.alpha * x + ffn, x.shape[-1:], p(f"encoder.{i}.post_norm2.weight"),
                             p(f"encoder.{i}.post_norm2.bias"), self.eps)
        logits = x[:, 0] @ p("classifier.out.weight").t() + p("classifier.out.bias")
        return x, logits


def make_batch(vocab_size: int, lengths, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct gene rows per cell, log1p-like values, padding to the longest cell."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    values = np.zeros((len(lengths), width), dtype=np.float32)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.choice(np.arange(1, vocab_size), size=n, replace=vocab_size - 1 < n)
        values[row, :n] = np.log1p(rng.gamma(0.6, 3.0, size=n))
    ids_t = torch.from_numpy(ids)
    return ids_t, torch.from_numpy(values), (ids_t != 0).long()


def batch_lengths(batch: int, length: int, seed: int = 0) -> list[int]:
    """One cell at ``length``, the rest uniform in [0.85 length, length] (a length-grouped batch)."""
    rng = np.random.default_rng(seed)
    return [length] + rng.integers(int(0.85 * length), length + 1, size=batch - 1).tolist()


def check_parity(ours, ref: QuadraticCellFM, *, length: int, seed: int = 1) -> dict:
    """Max |difference| of the last hidden states (cls and real genes) and logits on a padded
    batch; raises AssertionError above ``PARITY_TOL``."""
    ids, values, mask = make_batch(ours.config.vocab_size, [length, max(1, length * 2 // 3), max(1, length // 4)],
                                   seed=seed)
    was = ours.training
    ours.eval()
    with torch.no_grad():
        out = ours(ids, values, mask, output_hidden_states=True)
        ref_hidden, ref_logits = ref(ids, values, mask)
    ours.train(was)
    real = torch.cat([torch.ones(ids.shape[0], 1, dtype=torch.bool), mask.bool()], dim=1)
    d_hidden = (out.hidden_states[-1] - ref_hidden).abs()[real].max().item()
    d_logits = (out.logits - ref_logits).abs().max().item()
    result = {"length": length, "hidden_max_abs_diff": d_hidden, "logits_max_abs_diff": d_logits,
              "hidden_max_abs": out.hidden_states[-1].abs()[real].max().item(), "tolerance": PARITY_TOL}
    if not (d_hidden <= PARITY_TOL and d_logits <= PARITY_TOL):
        raise AssertionError(f"the reference differs from our model: hidden {d_hidden:.3g}, logits {d_logits:.3g} "
                             f"(tolerance {PARITY_TOL})")
    return result


def make_steps(model, batch, *, reference: bool, seed: int = 0) -> dict:
    """{"train": forward + cross-entropy + backward + AdamW, "inference": eval no-grad forward}."""
    ids, values, mask = batch
    labels = torch.from_numpy(np.random.default_rng(seed).integers(0, NUM_LABELS, size=ids.shape[0]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def logits():
        return model(ids, values, mask)[1] if reference else model(ids, values, mask).logits

    def train():
        model.train()
        loss = F.cross_entropy(logits(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def inference():
        model.eval()
        with torch.no_grad():
            logits()

    return {"train": train, "inference": inference}


def build_pair(shape: dict, max_genes: int):
    ours = build_ours(shape, max_genes)
    ref = QuadraticCellFM(ours)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    n_ref = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert n_ours == n_ref, (n_ours, n_ref)
    return ours, ref


def fit_exponent(lengths, seconds) -> float:
    """k of seconds ~ length^k, least squares in log-log."""
    return float(np.polyfit(np.log(lengths), np.log(seconds), 1)[0])


# ----------------------------------------------------------------------------- 1. scaling
def bench_scaling(plan: dict, repeats: int) -> dict:
    from common import interleaved_medians

    ours, ref = build_pair(plan["shape"], max(plan["lengths"]))
    parity = [check_parity(ours, ref, length=n) for n in (plan["lengths"][0], plan["lengths"][-1])]
    print(f"parity: hidden {max(x['hidden_max_abs_diff'] for x in parity):.2e}, logits "
          f"{max(x['logits_max_abs_diff'] for x in parity):.2e}", flush=True)
    fns = {}
    for n in plan["lengths"]:
        batch = make_batch(plan["shape"]["vocab_size"], batch_lengths(plan["batch"], n, seed=n), seed=n)
        for model_name, model in (("ours", ours), ("reference", ref)):
            for mode, fn in make_steps(model, batch, reference=model is ref).items():
                fns[(mode, model_name, n)] = fn
    keyed = {f"{m}|{who}|{n}": fn for (m, who, n), fn in fns.items()}
    t0 = time.perf_counter()
    timed = interleaved_medians(keyed, torch.device("cpu"), warmup=1, repeats=repeats)
    rows = []
    for n in plan["lengths"]:
        row = {"length": n, "tokens": sum(batch_lengths(plan["batch"], n, seed=n))}
        for mode in ("train", "inference"):
            for who in ("ours", "reference"):
                t = timed[f"{mode}|{who}|{n}"]
                row.setdefault(mode, {})[who] = {"median_s": t["median_s"], "min_s": t["min_s"],
                                                 "median_cpu_s": t["median_cpu_s"], "samples_s": t["samples_s"]}
            r = row[mode]
            r["ratio_median"] = r["reference"]["median_s"] / r["ours"]["median_s"]
            r["ratio_cpu"] = r["reference"]["median_cpu_s"] / r["ours"]["median_cpu_s"]
        rows.append(row)
    lengths = list(plan["lengths"])
    tokens = [row["tokens"] for row in rows]
    fits = {}
    for mode in ("train", "inference"):
        for who in ("ours", "reference"):
            med = [r[mode][who]["median_s"] for r in rows]
            cpu = [r[mode][who]["median_cpu_s"] for r in rows]
            fits[f"{mode}_{who}"] = {
                "exponent": fit_exponent(lengths, med), "cpu_exponent": fit_exponent(lengths, cpu),
                # time per real gene token at the longest length / at the shortest
                "per_token_ratio": (med[-1] / tokens[-1]) / (med[0] / tokens[0]),
                "cpu_per_token_ratio": (cpu[-1] / tokens[-1]) / (cpu[0] / tokens[0])}
    return {"shape": plan["shape"], "shape_name": plan["shape_name"], "batch": plan["batch"], "repeats": repeats,
            "parity": parity, "rows": rows, "fits": fits, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- 2. peak memory
def child_memory(spec: dict) -> dict:
    """One (model, mode) step's peak memory, in this (fresh) process: a warm-up step, then the measured one."""
    from common import peak_memory

    torch.set_num_threads(spec["threads"])
    ours, ref = build_pair(spec["shape"], spec["length"])
    model = ref if spec["model"] == "reference" else ours
    del ours, ref  # only the measured model stays resident
    batch = make_batch(spec["shape"]["vocab_size"], batch_lengths(spec["batch"], spec["length"], seed=spec["length"]),
                       seed=spec["length"])
    step = make_steps(model, batch, reference=spec["model"] == "reference")[spec["mode"]]
    step()
    return {**spec, "memory": peak_memory(step, torch.device("cpu"))}


def bench_memory(plan: dict) -> list[dict]:
    from common import memory_env

    out = []
    cases = [("small", plan["shape"], plan["batch"], plan["lengths"][-1]),
             ("80m", plan["large"], 1, plan["large_length"])]
    for label, shape, batch, length in cases:
        for model in ("ours", "reference"):
            for mode in ("train", "inference"):
                spec = {"case": label, "shape": shape, "batch": batch, "length": length, "model": model, "mode": mode,
                        "threads": torch.get_num_threads()}
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child_memory",
                                       json.dumps(spec)], cwd=HERE, env=memory_env(), capture_output=True, text=True)
                if proc.returncode != 0:
                    out.append({**spec, "error": proc.stderr[-2000:]})
                    print(f"memory {label} {model} {mode}: failed\n{proc.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                out.append(r)
                print(f"memory {label} {model} {mode}, batch {batch} x {length}: "
                      f"{r['memory']['step_peak_mib']:.0f} MiB", flush=True)
    return out


# ----------------------------------------------------------------------------- 3. the 80M shape
def bench_80m(plan: dict, repeats: int) -> dict:
    from common import interleaved_medians

    n = plan["large_length"]
    t0 = time.perf_counter()
    ours, ref = build_pair(plan["large"], n)
    parity = check_parity(ours, ref, length=min(n, 256))
    batch = make_batch(plan["large"]["vocab_size"], [n], seed=n)
    fns = {}
    for who, model in (("ours", ours), ("reference", ref)):
        for mode, fn in make_steps(model, batch, reference=model is ref).items():
            fns[f"{mode}|{who}"] = fn
    timed = interleaved_medians(fns, torch.device("cpu"), warmup=1, repeats=repeats)
    res = {"shape": plan["large"], "shape_name": plan["large_name"], "batch": 1, "length": n, "repeats": repeats,
           "parity": parity, "parameters": sum(p.numel() for p in ours.parameters()),
           "trainable_parameters": sum(p.numel() for p in ours.parameters() if p.requires_grad)}
    for mode in ("train", "inference"):
        res[mode] = {who: {k: timed[f"{mode}|{who}"][k] for k in ("median_s", "min_s", "median_cpu_s", "samples_s")}
                     for who in ("ours", "reference")}
        res[mode]["ratio_median"] = res[mode]["reference"]["median_s"] / res[mode]["ours"]["median_s"]
        res[mode]["ratio_cpu"] = res[mode]["reference"]["median_cpu_s"] / res[mode]["ours"]["median_cpu_s"]
        print(f"{plan['large_name']} {mode}, 1 x {n}: ours {res[mode]['ours']['median_s']:.2f} s, reference "
              f"{res[mode]['reference']['median_s']:.2f} s", flush=True)
    res["seconds"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- report (run_all.py)
#: the linear-scaling target: fitted exponent of our step time over the measured lengths
LINEAR_EXPONENT_MAX = 1.15


def render_section(r: dict, targets: list) -> list[str]:
    """The section of ``docs/benchmarks.md`` (called by ``run_all.py``)."""
    s = r["scaling"]
    lengths = [row["length"] for row in s["rows"]]
    par = s["parity"] + [r["large"]["parity"]]
    load = r["machine"].get("loadavg_at_start", [float("nan")])[0]
    md = ["## CellFM: linear attention vs the same formula computed quadratically", "",
          "Ours: `CellFMForSequenceClassification` (`transformerslocal/modeling_cellfm.py`), which computes each head's "
          "`O = Q (K^T V)`. Reference: the same forward written out in `benchmarks/bench_cellfm.py` as it reads, "
          "`O = (Q K^T) V`, materialising the (N, N) matrix per head, on a copy of our weights; its last hidden states "
          f"(cls and real genes) and logits equal ours within {PARITY_TOL:g} before anything is timed (largest "
          f"differences: hidden {max(x['hidden_max_abs_diff'] for x in par):.1e}, logits "
          f"{max(x['logits_max_abs_diff'] for x in par):.1e}). Training step = forward + cross-entropy on the cls "
          "logits + backward + AdamW over everything but the gene embedding (`freeze_preset: \"cellfm\"`); inference = "
          "eval no-grad forward. CPU, "
          f"{r['machine'].get('torch_threads')} threads, load average {load:.1f} at the start and "
          f"{r.get('loadavg_at_end', [float('nan')])[0]:.1f} at the end (the machine was shared).", "",
          f"### Step time vs genes ({s['shape_name']}, batch {s['batch']})", "",
          f"Every (length, model, mode) timed in one interleaved rotation, 1 warm-up round, {s['repeats']} timed "
          "rounds, medians; batch = one cell at the full length, the rest 85-100% of it (padded). ms/token = median "
          "wall time / real gene tokens of the batch. Ratio = reference / ours (> 1: ours faster).", "",
          "| genes | mode | ours s | reference s | ours ms/token | reference ms/token | ratio (wall) | ratio (CPU) |",
          "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in s["rows"]:
        for mode in ("train", "inference"):
            m = row[mode]
            md.append(f"| {row['length']:,} | {mode} | {m['ours']['median_s']:.3f} | {m['reference']['median_s']:.3f} | "
                      f"{m['ours']['median_s'] / row['tokens'] * 1e3:.4f} | "
                      f"{m['reference']['median_s'] / row['tokens'] * 1e3:.4f} | {m['ratio_median']:.2f} | "
                      f"{m['ratio_cpu']:.2f} |")
    f = s["fits"]
    md += ["", f"Fitted exponent k of time ~ genes^k over {lengths[0]:,}-{lengths[-1]:,} (wall median / process CPU "
               f"time), and time per token at {lengths[-1]:,} genes / at {lengths[0]:,} (1 = linear; "
               f"{lengths[-1] // lengths[0]} = quadratic):", "",
           "| step | model | k (wall) | k (CPU) | per-token ratio (wall) | per-token ratio (CPU) |",
           "|---|---|---:|---:|---:|---:|"]
    for mode in ("train", "inference"):
        for who in ("ours", "reference"):
            x = f[f"{mode}_{who}"]
            md.append(f"| {mode} | {who} | {x['exponent']:.2f} | {x['cpu_exponent']:.2f} | {x['per_token_ratio']:.2f} | "
                      f"{x['cpu_per_token_ratio']:.2f} |")
    worst = max(f[f"{m}_ours"]["exponent"] for m in ("train", "inference"))
    targets.append((f"CellFM step time linear in genes ({lengths[0]:,}-{lengths[-1]:,}; fitted exponent <= "
                    f"{LINEAR_EXPONENT_MAX})", worst <= LINEAR_EXPONENT_MAX,
                    f"train k = {f['train_ours']['exponent']:.2f}, inference k = {f['inference_ours']['exponent']:.2f} "
                    f"(reference {f['train_reference']['exponent']:.2f} / {f['inference_reference']['exponent']:.2f})"))
    md += ["", "### Peak memory", "",
           "Each step in a fresh process (`MALLOC_MMAP_THRESHOLD_=65536`): peak RSS increase during the second step "
           "(activations, gradients, temporaries; not the weights or the optimizer state that existed before it).", "",
           "| shape | batch x genes | mode | ours MiB | reference MiB | reference / ours |", "|---|---|---|---:|---:|---:|"]
    mem = {(x["case"], x["model"], x["mode"]): x for x in r["memory"]}
    names = {"small": s["shape_name"], "80m": r["large"]["shape_name"]}
    for case in ("small", "80m"):
        for mode in ("train", "inference"):
            o, q = mem.get((case, "ours", mode)), mem.get((case, "reference", mode))
            if o is None or q is None:
                continue
            cell = [x["memory"]["step_peak_mib"] if "memory" in x else float("nan") for x in (o, q)]
            md.append(f"| {names[case]} | {o['batch']} x {o['length']:,} | {mode} | {cell[0]:,.0f} | {cell[1]:,.0f} | "
                      f"{cell[1] / cell[0]:.1f} |")
    big = r["large"]

    def square_mib(shape: dict, batch: int, length: int) -> float:  # one (B, h, N, N) float32 matrix
        return batch * shape["num_attention_heads"] * (length + 1) ** 2 * 4 / 2 ** 20

    md += ["", f"The reference's (B, h, N, N) matrix alone is {square_mib(s['shape'], s['batch'], lengths[-1]):,.0f} MiB "
               f"at {s['batch']} x {s['shape']['num_attention_heads']} heads x {lengths[-1] + 1:,} positions and "
               f"{square_mib(big['shape'], 1, big['length']):,.0f} MiB at 1 x {big['shape']['num_attention_heads']} "
               "heads (one per layer, kept for backward in training); ours holds an (e, e) matrix per head instead."]
    md += ["", f"### {big['shape_name']} at batch 1 x {big['length']:,} genes, CPU", "",
           f"{big['parameters'] / 1e6:.1f}M parameters ({big['trainable_parameters'] / 1e6:.1f}M trained: all but the "
           f"gene embedding); 1 warm-up, {big['repeats']} timed rounds, interleaved, medians.", "",
           "| mode | ours s (median / min) | reference s (median / min) | ratio (wall) | ratio (CPU) |",
           "|---|---:|---:|---:|---:|"]
    for mode in ("train", "inference"):
        m = big[mode]
        md.append(f"| {mode} | {m['ours']['median_s']:.2f} / {m['ours']['min_s']:.2f} | "
                  f"{m['reference']['median_s']:.2f} / {m['reference']['min_s']:.2f} | {m['ratio_median']:.2f} | "
                  f"{m['ratio_cpu']:.2f} |")
    d, h, n = big["shape"]["hidden_size"], big["shape"]["num_attention_heads"], big["length"] + 1
    e = d // h
    proj = (5 * d * d + 3 * d * big["shape"]["intermediate_size"]) * n  # q, k, v, u, o; ffn u, v, o
    md += ["", f"Multiply-adds per layer at this shape: the projections {proj / 1e9:.1f} G, the attention products "
               f"{2 * h * n * e * e / 1e9:.1f} G in ours (2 h N e^2) and {2 * h * n * n * e / 1e9:.1f} G in the "
               "reference (2 h N^2 e): at this width the projections dominate, so the time ratio stays moderate while "
               "the memory ratio is large."]
    return md + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds of the scaling part (default 5; quick 2)")
    p.add_argument("--repeats_80m", type=int, default=None, help="timed rounds of the 80M part (default 3; quick 1)")
    p.add_argument("--only", default="scaling,memory,80m")
    p.add_argument("--device", default="cpu", help="runs on the CPU whatever is named (run_all.py passes its device)")
    p.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_child_memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child_memory:
        print(json.dumps(child_memory(json.loads(args._child_memory))))
        return 0
    if args.device != "cpu":
        print(f"--device {args.device}: this benchmark measures the CPU; running there", flush=True)
    from common import machine_info

    plan = QUICK if args.quick else FULL
    repeats = args.repeats or (2 if args.quick else 5)
    repeats_80m = args.repeats_80m or (1 if args.quick else 3)
    parts = args.only.split(",")
    result = {"benchmark": "cellfm", "machine": machine_info(torch.device("cpu")), "quick": args.quick,
              "device_requested": args.device}
    t0 = time.perf_counter()
    if "scaling" in parts:
        print(f"1. step time vs genes ({plan['shape_name']})", flush=True)
        result["scaling"] = bench_scaling(plan, repeats)
    if "memory" in parts:
        print("2. peak memory", flush=True)
        result["memory"] = bench_memory(plan)
    if "80m" in parts:
        print(f"3. {plan['large_name']}", flush=True)
        result["large"] = bench_80m(plan, repeats_80m)
    result["loadavg_at_end"] = list(os.getloadavg())
    result["seconds"] = time.perf_counter() - t0
    if all(k in result for k in ("scaling", "memory", "large")):
        targets: list = []
        print("\n".join(render_section(result, targets)))
        for label, ok, detail in targets:
            print(f"[{'MET' if ok else 'NOT MET'}] {label}: {detail}")
    text = json.dumps(result, indent=1, default=float)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
