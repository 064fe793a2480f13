"""Geneformer V2-104M shape at 4,096 tokens: one LoRA training step, ours vs ``transformers``
BERT (SDPA attention) + ``peft`` LoRA with the same weights.

The shape is ``Pretrain_ckpts/geneformer-V2-104M-lora/config.json`` (12 layers, hidden 768,
12 heads, intermediate 3072, 4,096 positions, vocabulary 20,275), randomly initialised; LoRA
r=8 on query/value as in that config. One cell of 4,096 tokens (batch 1, no padding, so both
models may use fused attention). CPU: fp32, one warmup step, then ``--steps`` timed steps per
model in alternation (default 1). CUDA: bf16 autocast, attention restricted to the flash
kernel (``torch.nn.attention.sdpa_kernel(FLASH_ATTENTION)``; the run says whether it took),
warmup 2, 5 timed steps. Peak memory of a step is reported on CUDA.

    python benchmarks/bench_v2.py --json out.json [--quick] [--device cpu|cuda] [--steps N]
"""
from __future__ import annotations

import contextlib
import json

import torch

from common import (REPO, base_parser, build_hf_like, interleaved_medians, machine_info, make_train_step, resolve,
                    write_json)

CONFIG = REPO / "Pretrain_ckpts" / "geneformer-V2-104M-lora" / "config.json"


def build(length: int):
    """Our V2-104M LoRA classifier (LoRA B nonzero) and the HF + peft twin with the same weights."""
    from transformerslocal import BertConfig, BertForSequenceClassification, mark_trainable

    config = BertConfig.from_pretrained(CONFIG.parent).copy(num_labels=5, hidden_dropout_prob=0.0,
                                                             attention_probs_dropout_prob=0.0)
    assert config.max_position_embeddings >= length
    torch.manual_seed(0)
    ours = BertForSequenceClassification(config)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    mark_trainable(ours)
    hf, parity = build_hf_like(ours)
    return ours, hf, parity


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (CPU 1, CUDA 5)")
    p.add_argument("--length", type=int, default=4096)
    args = p.parse_args(argv)
    device = resolve(args.device)
    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    ours, hf, parity = build(args.length)
    ours.to(device)
    hf.to(device)
    ours.train()
    hf.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, ours.config.vocab_size, (1, args.length), generator=g)
    ids[0, 0], ids[0, -1] = 2, 3  # <cls> ... <eos>, as V2 data
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    labels = torch.tensor([1], device=device)
    steps = {"ours": make_train_step(ours, ids, mask, labels, hf=False, device=device, precision=precision),
             "hf_peft": make_train_step(hf, ids, mask, labels, hf=True, device=device, precision=precision)}
    flash = None
    context = contextlib.nullcontext()
    if cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        context = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    with context:
        if cuda:
            try:
                steps["ours"]()
                flash = True
            except RuntimeError as err:  # flash kernel refused: fall back, and say so
                flash = f"not used: {str(err)[:200]}"
                context = contextlib.nullcontext()
        repeats = args.steps or (5 if cuda else 1)
        timing = interleaved_medians(steps, device, warmup=2 if cuda else 1, repeats=repeats)
        peak = {}
        if cuda:
            for name, fn in steps.items():
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                torch.cuda.synchronize(device)
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
    result = {
        "machine": machine_info(device), "config": str(CONFIG.relative_to(REPO)), "length": args.length, "batch": 1,
        "precision": precision, "flash_attention": flash, "parity_max_abs_logit_diff": parity,
        "timing": timing, "peak_mib": peak,
        "ratio_hf_over_ours_median": timing["hf_peft"]["median_s"] / timing["ours"]["median_s"],
        "tokens_per_second_ours": args.length / timing["ours"]["median_s"],
        "trainable_parameters": sum(p.numel() for p in ours.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in ours.parameters()),
    }
    write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=1, default=float)[:3000])
    return 0


def render_section(r: dict, targets: list) -> list[str]:
    """The section of ``docs/benchmarks.md`` (called by ``run_all.py``); no target, a measurement."""
    t = r["timing"]
    return ["## Geneformer V2-104M at 4,096 tokens (one LoRA training step, batch 1)", "",
            (f"{r['precision']}, flash attention: {r['flash_attention']}; logits parity with transformers + peft: "
             f"{r['parity_max_abs_logit_diff']:.2e}; {r['trainable_parameters']:,} of {r['total_parameters']:,} "
             "parameters train."), "",
            "| model | step s (median) | tokens/s |", "|---|---:|---:|",
            f"| ours | {t['ours']['median_s']:.2f} | {r['length'] / t['ours']['median_s']:.0f} |",
            f"| transformers + peft | {t['hf_peft']['median_s']:.2f} | {r['length'] / t['hf_peft']['median_s']:.0f} |",
            "", f"transformers + peft / ours: {r['ratio_hf_over_ours_median']:.2f}x", ""]


if __name__ == "__main__":
    raise SystemExit(main())
