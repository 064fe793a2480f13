"""K-fold PEFT fine-tuning of Geneformer for cell classification (the main job).

With no arguments it runs on the shipped example: synthetic cells in example_py/data/
and a tiny checkpoint pretrained by this project (Pretrain_ckpts/geneformer-tiny-example).
On your data:

    python example_py/cell_classification_prompt_fold.py --dataset_name NSCLC \\
        --data_path ./example_py/data --output_path ./save/ --epoch 3 --batch_size 32 --lr 5e-5 \\
        --model_path /path/to/gf-12L-30M-i2048 --config Pretrain_ckpts/geneformer-12L-30M-prompt/config.json

`--help` lists every flag. This is `geneformer-peft finetune` with the example's defaults, which
differ from the command's in exactly these flags (EXAMPLE_DEFAULTS): --dataset_name synthetic,
--data_path example_py/data and --model_path Pretrain_ckpts/geneformer-tiny-example (the command
requires all three), --lr 1e-2 (the command: 5e-4, set for the Geneformer checkpoints; 1e-2
suits the tiny example checkpoint), --epoch 20 (the command: 10; on the example the best
validation epoch of 10 was the 9th or 10th, docs/example_methods.md), --early_stopping_patience 0
(the command: 5; the example's 41 validation cells make validation macro-F1 swing by up to 0.3
from one epoch to the next, which stopped runs while the learning rate was still half its peak)
and --select_epoch_by loss (the command: macro_f1; on 41 cells an early epoch with a lucky
macro-F1 was kept over later ones of lower validation loss), docs/baseline.md. Every other
default is the same.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import geneformer_peft  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from geneformer_peft.cli import run_command  # noqa: E402

EXAMPLE_DEFAULTS = {
    "dataset_name": "synthetic",
    "data_path": ROOT / "example_py" / "data",
    "model_path": ROOT / "Pretrain_ckpts" / "geneformer-tiny-example",
    "output_path": Path("save"),
    "epochs": 20,
    "lr": 1e-2,
    "early_stopping_patience": 0,
    "select_epoch_by": "loss",
    "batch_size": 32,
}


def main(argv=None) -> int:
    return run_command("finetune", argv, description=__doc__, defaults=EXAMPLE_DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
