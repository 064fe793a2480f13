"""``geneformer-peft pretrain``: the masked-gene loss goes down, and the checkpoint loads in
``transformers`` as a ``BertForMaskedLM`` with the same logits as ours."""
from __future__ import annotations

import pickle
import re

import pytest
import torch

import job_factories as jf


@pytest.fixture(scope="module")
def pretrained(job_data, tmp_path_factory):
    """A tiny model pretrained for a few epochs; returns (checkpoint folder, MLM loss per epoch)."""
    import contextlib
    import io

    from geneformer_peft.cli import main
    from transformerslocal import BertConfig

    root = tmp_path_factory.mktemp("pretrain")
    config = BertConfig(vocab_size=len(job_data.token_dictionary), max_position_embeddings=jf.MODEL_INPUT_SIZE,
                        **jf.TINY_SIZES)
    config.save_pretrained(root / "tiny_config")
    with open(root / "token_dictionary.pkl", "wb") as handle:
        pickle.dump({str(k): int(v) for k, v in job_data.token_dictionary.items()}, handle)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["pretrain", "--input", str(job_data.cells), "--output_dir", str(root / "ckpt"),
                       "--config", str(root / "tiny_config" / "config.json"), "--token_dictionary",
                       str(root / "token_dictionary.pkl"), "--epochs", "12", "--lr", "1e-2", "--device", "cpu"])
    assert status == 0, out.getvalue()
    losses = [float(x) for x in re.findall(r"epoch \d+: MLM loss ([0-9.]+)", out.getvalue())]
    return root / "ckpt", losses


def test_pretraining_lowers_the_mlm_loss(pretrained):
    ckpt, losses = pretrained
    assert len(losses) == 12
    # 100 cells of a 202-token vocabulary: uniform guessing is ln(202) = 5.31, gene frequencies
    # alone about 5.14; a drop well below the first epoch means the model learnt from context.
    assert sum(losses[-3:]) / 3 < losses[0] - 0.15, losses
    assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file()


def test_pretrained_checkpoint_loads_in_transformers(pretrained, job_data):
    transformers = pytest.importorskip("transformers")

    from transformerslocal import BertForMaskedLM

    ckpt, _ = pretrained
    theirs, info = transformers.BertForMaskedLM.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    ours = BertForMaskedLM.from_pretrained(ckpt).eval()
    theirs.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, len(job_data.token_dictionary), (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with torch.no_grad():
        a = ours(ids, mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits
    assert a.shape == b.shape == (3, 20, len(job_data.token_dictionary))
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=1e-4, rtol=1e-4)


def test_finetune_from_the_pretrained_checkpoint(pretrained, job_data, tmp_path):
    """The pretraining output is a valid --model_path of the fine-tuning job."""
    ckpt, _ = pretrained
    argv = job_data.finetune_argv(tmp_path, "--prompt_type", "lora", "--folds", "0", "--epoch", "1")
    argv[argv.index("--model_path") + 1] = str(ckpt)
    assert jf.run_finetune(argv) == 0
    assert (tmp_path / "lora" / job_data.dataset_name / "0" / "tokenizer.json").is_file()
