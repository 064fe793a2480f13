"""The gene vocabulary travels into fold folders; data of another vocabulary is refused clearly."""
from __future__ import annotations

import pickle

import job_factories as jf
from geneformer_peft.data.vocab import load_token_dictionary


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


def test_remap_vocab_command_keeps_shared_rows(job_data, tmp_path):
    """`geneformer-peft remap-vocab`: shared genes keep their rows, the copy loads and fine-tunes."""
    from geneformer_peft.cli import main
    from transformerslocal import BertForMaskedLM

    old = dict(job_data.token_dictionary)
    genes = [g for g in old if not g.startswith("<")]
    new = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes[:20] + ["ENSGNEW0001", "ENSGNEW0002"])}}
    old_file, new_file = tmp_path / "old.pkl", tmp_path / "new.pkl"
    old_file.write_bytes(pickle.dumps(old))
    new_file.write_bytes(pickle.dumps(new))
    out = tmp_path / "remapped"
    assert main(["remap-vocab", "--model_path", str(job_data.model_path), "--old_token_dictionary", str(old_file),
                 "--token_dictionary", str(new_file), "--output_dir", str(out)]) == 0
    before = BertForMaskedLM.from_pretrained(job_data.model_path).bert.embeddings.word_embeddings.weight
    after = BertForMaskedLM.from_pretrained(out).bert.embeddings.word_embeddings.weight
    assert after.shape[0] == 24  # 24 tokens, already a multiple of 8
    for gene in genes[:20]:
        assert after[new[gene]].tolist() == before[old[gene]].tolist()
    assert load_token_dictionary(out / "tokenizer.json") == new


def test_cells_without_genes_are_refused(job_data, tmp_path, caplog):
    """A cell with empty input_ids (no gene in the vocabulary) would make a NaN: clear error instead."""
    import shutil

    from geneformer_peft.data.dataset_io import load_saved_dataset

    data = tmp_path / "folds"
    shutil.copytree(job_data.data_path, data)
    train_file = data / job_data.dataset_name / "0" / f"{job_data.dataset_name}_train0.dataset"
    train = load_saved_dataset(train_file)
    emptied = train.map(lambda row, i: {"input_ids": [] if i == 3 else row["input_ids"]}, with_indices=True,
                        keep_in_memory=True)
    staged = tmp_path / "staged.dataset"
    emptied.save_to_disk(str(staged))
    del train, emptied
    shutil.rmtree(train_file)
    shutil.move(str(staged), str(train_file))
    argv = job_data.finetune_argv(tmp_path / "out", "--prompt_type", "lora", "--folds", "0")
    argv[argv.index("--data_path") + 1] = str(data)
    assert jf.run_finetune(argv) == 2
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "1 cells have no gene token" in message and "rows [3]" in message
