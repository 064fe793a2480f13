"""The gene vocabulary travels into fold folders; data of another vocabulary is refused clearly."""
from __future__ import annotations

import pickle

import job_factories as jf
from geneformer_peft.vocab import load_token_dictionary


def test_token_dictionary_written_into_fold_folders(job_data, tmp_path):
    vocab_file = tmp_path / "token_dictionary.pkl"
    vocab_file.write_bytes(pickle.dumps(job_data.token_dictionary))
    out = tmp_path / "out"
    code = jf.run_finetune(job_data.finetune_argv(out, "--prompt_type", "lora", "--folds", "0", "--epoch", "1",
                                                  "--token_dictionary", str(vocab_file)))
    assert code == 0
    fold_dir = jf.run_dir(out, "lora", job_data) / "0"
    assert load_token_dictionary(fold_dir / "tokenizer.json") == job_data.token_dictionary


def test_data_of_a_larger_vocabulary_is_refused(job_data, tmp_path, caplog):
    small = jf.make_tiny_checkpoint(tmp_path / "small_vocab", vocab_size=10, max_position_embeddings=64)
    argv = job_data.finetune_argv(tmp_path / "out", "--prompt_type", "lora", "--folds", "0")
    argv[argv.index("--model_path") + 1] = str(small)
    assert jf.run_finetune(argv) == 2
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "vocab_size 10" in message and "token id" in message and "tiny" in message
