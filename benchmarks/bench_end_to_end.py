"""End to end: one cross-validation fold of our pipeline vs a reference-style pipeline.

Data: synthetic labelled cells (``geneformer_peft.data.synthetic``, 3,000 genes, median
library 1,500: about 120-950 detected genes per cell) -> vocabulary -> rank-value tokens
(``model_input_size`` 1024) -> 5 stratified folds; fold 0 is run.

Checkpoint: a tiny BERT (``--hidden``/``--layers``) written by ``save_pretrained``; with
``--pretrain_epochs`` > 0 it is first pretrained with our masked-gene objective on the
labelled cells' tokens (no labels), so LoRA has features to adapt.

Ours: ``geneformer_peft.training.cross_validation.run_cross_validation`` (what the example script
runs): class-balanced length-grouped sampler, class-weighted CE, validation each epoch,
best epoch restored, test predictions, all fold outputs written (model, plots, CSV).

Reference-style: HF ``transformers.Trainer`` on HF ``BertForSequenceClassification`` + peft
LoRA (same r/alpha/targets, pooler + classifier trainable), as in the scPEFT reference: a
``WeightedRandomSampler`` (weights 1/n_class, replacement, num_samples = train size)
overriding the Trainer's sampler, every batch padded to its longest cell, the same class
weights (1 - n_c/N)^2 in ``compute_loss``, evaluation and a checkpoint each epoch,
``load_best_model_at_end`` on validation macro-F1, then ``predict`` on test. Same epochs,
batch size, learning rate, warmup ratio, weight decay, schedule, grad clipping.

Wall time per fold: from loading the fold's datasets to test macro-F1 (ours includes
writing its fold outputs).

    python benchmarks/bench_end_to_end.py --json out.json [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import base_parser, machine_info, make_dataset, resolve, write_json

logger = logging.getLogger("bench_end_to_end")


def make_checkpoint(meta: dict, out: Path, *, hidden: int, layers: int, heads: int, max_len: int,
                    pretrain_epochs: int, device: str, seed: int = 0) -> dict:
    from transformerslocal import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=meta["vocab_size"], hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=max_len,
                        hidden_act="relu", hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02,
                        pad_token_id=0, architectures=["BertForMaskedLM"])
    t0 = time.perf_counter()
    if pretrain_epochs > 0:
        from datasets import load_from_disk

        from geneformer_peft.data.cells import EncodedCells
        from geneformer_peft.data.folds import fold_paths
        from geneformer_peft.training.pretrain import pretrain

        # unlabelled use of fold 0's train split only (no test leakage)
        ds = load_from_disk(str(fold_paths(meta["data_path"], meta["dataset_name"], 0)["train"]))
        pretrain(EncodedCells.from_dataset(ds, max_length=max_len), out, config=config,
                 epochs=pretrain_epochs, batch_size=16, lr=2e-3, seed=seed, device=device, progress=False)
    else:
        torch.manual_seed(seed)
        BertForMaskedLM(config).save_pretrained(out)
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": 2 * hidden, "pretrain_epochs": pretrain_epochs,
            "build_seconds": time.perf_counter() - t0}


def run_ours(meta, ckpt: Path, out: Path, *, epochs, batch_size, lr, device, seed, method) -> dict:
    from geneformer_peft.training.cross_validation import RunOptions, run_cross_validation
    from geneformer_peft.training.arguments import TrainingArguments

    training = TrainingArguments(epochs=epochs, batch_size=batch_size, lr=lr, early_stopping_patience=0,
                                 seed=seed, device=device, progress=False)
    overrides = dict(lora_r=8, lora_alpha=1, lora_dropout=0.0, lora_target_modules=["query", "value"])
    opts = RunOptions(dataset_name=meta["dataset_name"], data_path=Path(meta["data_path"]), output_path=out,
                      model_path=ckpt, prompt_type="lora" if method == "lora" else "", folds=[0], overwrite=True,
                      training=training, config_overrides=overrides)
    t0 = time.perf_counter()
    summary = run_cross_validation(opts)
    wall = time.perf_counter() - t0
    import json

    metrics = json.loads((Path(summary["run_dir"]) / "0" / "metrics.json").read_text())
    return {"wall_seconds": wall, "train_seconds": metrics["train_seconds"], "test_macro_f1": metrics["macro_f1"],
            "test_accuracy": metrics["accuracy"], "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"], "trainable_parameters": metrics["trainable_parameters"]}


def run_reference(meta, ckpt: Path, out: Path, *, epochs, batch_size, lr, device, seed, method) -> dict:
    import peft
    import transformers
    from datasets import load_from_disk
    from torch.utils.data import WeightedRandomSampler

    from geneformer_peft.data.folds import fold_paths
    from geneformer_peft.evaluation.metrics import macro_f1
    from transformerslocal import BertConfig
    from transformerslocal.modeling_utils import find_weights_file, read_state_dict

    t0 = time.perf_counter()
    paths = fold_paths(meta["data_path"], meta["dataset_name"], 0)
    train, val, test = (load_from_disk(str(paths[k])) for k in ("train", "val", "test"))
    names = sorted(set(train["cell_type"]) | set(val["cell_type"]) | set(test["cell_type"]))
    label2id = {n: i for i, n in enumerate(names)}

    def prep(ds):
        ds = ds.map(lambda ex: {"labels": label2id[ex["cell_type"]]})
        return ds.select_columns(["input_ids", "labels"])

    train, val, test = prep(train), prep(val), prep(test)
    ours_cfg = BertConfig.from_pretrained(ckpt)
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
            "type_vocab_size", "layer_norm_eps", "pad_token_id", "initializer_range")
    transformers.set_seed(seed)
    hf_cfg = transformers.BertConfig(**{k: getattr(ours_cfg, k) for k in keys}, num_labels=len(names),
                                     attn_implementation="sdpa")
    model = transformers.BertForSequenceClassification(hf_cfg)
    state = read_state_dict(find_weights_file(ckpt))
    model.load_state_dict({k: v for k, v in state.items() if k.startswith("bert.") and "pooler" not in k},
                          strict=False)
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=1, lora_dropout=0.0,
                                                           target_modules=["query", "value"]))
        for name, p in model.named_parameters():
            if ".pooler." in name or ".classifier." in name:
                p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    train_labels = np.asarray(train["labels"])
    counts = np.bincount(train_labels, minlength=len(names))
    class_w = torch.tensor((1.0 - counts / counts.sum()) ** 2, dtype=torch.float32)
    sample_w = 1.0 / counts[train_labels]

    def collate(items):  # pad to the longest cell of the batch
        longest = max(len(it["input_ids"]) for it in items)
        ids = torch.zeros(len(items), longest, dtype=torch.long)
        mask = torch.zeros(len(items), longest, dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = torch.as_tensor(it["input_ids"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([it["labels"] for it in items], dtype=torch.long)}

    class ReferenceTrainer(transformers.Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return WeightedRandomSampler(sample_w, num_samples=len(sample_w), replacement=True)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = torch.nn.functional.cross_entropy(outputs.logits.float(), labels,
                                                     weight=class_w.to(outputs.logits.device))
            return (loss, outputs) if return_outputs else loss

    def compute_metrics(pred):
        return {"macro_f1": macro_f1(pred.label_ids, pred.predictions.argmax(-1), num_classes=len(names))}

    args = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, learning_rate=lr, weight_decay=0.001,
        warmup_steps=int(np.ceil(0.05 * epochs * np.ceil(len(train) / batch_size))),  # ours: warmup_ratio 0.05
        lr_scheduler_type="linear", max_grad_norm=1.0, eval_strategy="epoch", save_strategy="epoch",
        save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="macro_f1", greater_is_better=True,
        logging_strategy="epoch", report_to=[], disable_tqdm=True, seed=seed, data_seed=seed,
        use_cpu=(device == "cpu"), dataloader_num_workers=0, remove_unused_columns=False)
    trainer = ReferenceTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                               data_collator=collate, compute_metrics=compute_metrics)
    t_train = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t_train
    pred = trainer.predict(test)
    f1 = macro_f1(pred.label_ids, pred.predictions.argmax(-1), num_classes=len(names))
    acc = float((pred.label_ids == pred.predictions.argmax(-1)).mean())
    wall = time.perf_counter() - t0
    # padding the reference computed in one epoch of its sampler (for the report)
    lengths = np.array([len(x) for x in train["input_ids"]])
    return {"wall_seconds": wall, "train_seconds_incl_eval_and_saves": train_seconds, "test_macro_f1": f1,
            "test_accuracy": acc, "trainable_parameters": trainable, "train_lengths_mean": float(lengths.mean())}


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (full, --quick) / 3e-3 (lora)")
    p.add_argument("--method", default=None, choices=["lora", "full"],
                   help="default: full fine-tuning in --quick CPU mode (the example script's default for its tiny "
                        "checkpoint; LoRA r=8 on a hidden-64 model learns too little in 3 epochs), lora otherwise")
    p.add_argument("--cells", type=int, default=None)
    p.add_argument("--pretrain_epochs", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = resolve(args.device)
    cpu_quick = args.quick and device.type == "cpu"
    n_cells = args.cells or (400 if cpu_quick else 2000)
    epochs = args.epochs or (3 if cpu_quick else 5)
    pretrain_epochs = args.pretrain_epochs if args.pretrain_epochs is not None else (1 if cpu_quick else 3)
    hidden, layers, heads = (64, 2, 4) if cpu_quick else (256, 6, 4)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gf_bench_"))
    meta = make_dataset(work, n_cells=n_cells, model_input_size=1024, median_library_size=1500.0)
    ckpt = work / "ckpt_e2e"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt_info = make_checkpoint(meta, ckpt, hidden=hidden, layers=layers, heads=heads, max_len=1024,
                                pretrain_epochs=pretrain_epochs, device=str(device))
    method = args.method or ("full" if cpu_quick else "lora")
    lr = args.lr or (1e-3 if method == "full" else 3e-3)
    common = dict(epochs=epochs, batch_size=args.batch_size, lr=lr, device=device.type, seed=0, method=method)
    print(f"dataset: {n_cells} cells, lengths {meta['lengths']}; checkpoint {ckpt_info}", flush=True)
    ours = run_ours(meta, ckpt, work / "out_ours", **common)
    print(f"ours: {ours}", flush=True)
    ref = run_reference(meta, ckpt, work / "out_ref", **common)
    print(f"reference-style: {ref}", flush=True)
    write_json(args.json, {
        "bench": "end_to_end", "machine": machine_info(device), "settings": dict(common, n_cells=n_cells, fold=0),
        "dataset": {k: v for k, v in meta.items() if k not in ("all_lengths", "labels")}, "checkpoint": ckpt_info,
        "ours": ours, "reference": ref, "speedup": ref["wall_seconds"] / ours["wall_seconds"],
        "macro_f1_delta": ours["test_macro_f1"] - ref["test_macro_f1"]})
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
