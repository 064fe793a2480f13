"""Embeddings equal a direct computation with ``transformers`` (same weights, same pooling):
max |diff| <= 1e-5 for cell, cls and gene modes at emb_layer -1 and 0; PEFT-only weights
on a base give the embeddings of the merged full model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the reference is HuggingFace transformers")

from analysis_factories import hf_checkpoint, make_cells, token_dictionary  # noqa: E402
from geneformer_peft.analysis.cells import TokenizedCells  # noqa: E402
from geneformer_peft.analysis.embeddings import embed_cells, embed_genes  # noqa: E402
from geneformer_peft.analysis.loading import SpecialTokens, load_analysis_model  # noqa: E402
from geneformer_peft.errors import DataError  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_ckpt")
    hf = hf_checkpoint(directory)
    return directory, hf


@torch.no_grad()
def hf_hidden(hf, tokens, layer_index):
    """The HF model's hidden_states[layer_index] of one unpadded cell, float64."""
    ids = torch.tensor([tokens])
    out = hf(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    return out.hidden_states[layer_index][0].double()


@pytest.mark.parametrize("emb_layer", [-1, 0])
@pytest.mark.parametrize("v2", [False, True], ids=["V1", "V2"])
def test_cell_mode_matches_transformers(reference, emb_layer, v2):
    directory, hf = reference
    am = load_analysis_model(directory)
    data = make_cells(9, v2=v2, seed=1)
    cells = TokenizedCells(data)
    specials = SpecialTokens.from_dictionary(token_dictionary())
    got = embed_cells(am.model, cells, specials=specials, mode="cell", emb_layer=emb_layer, batch_size=4)
    k = hf.config.num_hidden_layers + emb_layer
    for i, tokens in enumerate(data["input_ids"]):
        h = hf_hidden(hf, tokens, k)
        genes = h[1:-1] if v2 else h  # <cls> and <eos> are not genes
        np.testing.assert_allclose(got[i], genes.mean(0).numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("emb_layer", [-1, 0])
def test_cls_mode_matches_transformers(reference, emb_layer):
    directory, hf = reference
    am = load_analysis_model(directory)
    data = make_cells(7, v2=True, seed=2)
    got = embed_cells(am.model, TokenizedCells(data), specials=SpecialTokens.from_dictionary(token_dictionary()),
                      mode="cls", emb_layer=emb_layer, batch_size=3)
    k = hf.config.num_hidden_layers + emb_layer
    for i, tokens in enumerate(data["input_ids"]):
        np.testing.assert_allclose(got[i], hf_hidden(hf, tokens, k)[0].numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("emb_layer", [-1, 0])
def test_gene_mode_matches_transformers(reference, emb_layer):
    directory, hf = reference
    am = load_analysis_model(directory)
    data = make_cells(8, v2=True, seed=3, always=(10, 11))
    labels = np.array(data["cell_type"])
    got = embed_genes(am.model, TokenizedCells(data), specials=SpecialTokens.from_dictionary(token_dictionary()),
                      emb_layer=emb_layer, labels=labels, batch_size=3)
    k = hf.config.num_hidden_layers + emb_layer
    sums, counts, per_label = {}, {}, {}
    for tokens, label in zip(data["input_ids"], labels):
        h = hf_hidden(hf, tokens, k)
        for pos, t in enumerate(tokens[1:-1], start=1):
            sums[t] = sums.get(t, 0) + h[pos]
            counts[t] = counts.get(t, 0) + 1
            key = (label, t)
            per_label[key] = per_label.get(key, 0) + h[pos]
    assert sorted(sums) == got.tokens.tolist()
    assert 2 not in sums and 3 not in sums  # <cls> / <eos> never count as genes
    for row, t in enumerate(got.tokens):
        assert got.counts[row] == counts[t]
        np.testing.assert_allclose(got.means[row], (sums[t] / counts[t]).numpy(), atol=ATOL, rtol=0)
    assert got.counts[got.tokens.tolist().index(10)] == 8  # expressed by every cell
    for k_label, name in enumerate(got.label_names):
        for row, t in enumerate(got.tokens):
            n = sum(1 for toks, lab in zip(data["input_ids"], labels) if lab == name and t in toks)
            assert got.label_counts[k_label, row] == n
            if n:
                np.testing.assert_allclose(got.label_means[k_label, row], (per_label[(name, t)] / n).numpy(),
                                           atol=ATOL, rtol=0)
            else:
                assert np.isnan(got.label_means[k_label, row]).all()


def test_cls_mode_on_v1_inputs_is_a_clear_error(reference):
    directory, _ = reference
    am = load_analysis_model(directory)
    cells = TokenizedCells(make_cells(4, v2=False))
    with pytest.raises(DataError, match=r"do not start with <cls>"):
        embed_cells(am.model, cells, specials=SpecialTokens.from_dictionary(token_dictionary()), mode="cls")
    with pytest.raises(DataError, match=r"has no <cls> \(a V1 vocabulary\)"):
        embed_cells(am.model, cells, specials=SpecialTokens(pad=0), mode="cls")


def test_peft_weights_on_a_base_equal_the_merged_model(tmp_path):
    """A LoRA fold saved as PEFT-only weights, loaded on its base, embeds cells exactly as the
    merged full model (LoRA folded into the weights, a plain BERT) does."""
    from bert_factories import perturb_ as perturb_all
    from peft_cases import perturb_peft
    from transformerslocal import BertForMaskedLM, BertForSequenceClassification, merge_lora, save_peft_weights

    base_dir, peft_dir, merged_dir = tmp_path / "base", tmp_path / "peft", tmp_path / "merged"
    torch.manual_seed(0)
    from bert_factories import tiny_config

    base = perturb_all(BertForMaskedLM(tiny_config()), seed=1).eval()
    base.save_pretrained(base_dir)
    fold = BertForSequenceClassification.from_pretrained(base_dir, config=tiny_config(prompt_type="lora", num_labels=3))
    perturb_peft(fold)
    torch.nn.init.normal_(fold.classifier.weight)
    save_peft_weights(fold, peft_dir)
    merge_lora(fold).save_pretrained(merged_dir)
    on_base = load_analysis_model(peft_dir, base_model=base_dir)
    merged = load_analysis_model(merged_dir)
    assert on_base.kind == merged.kind == "classifier" and not merged.config.peft_methods
    cells = TokenizedCells(make_cells(6, seed=4))
    specials = SpecialTokens(pad=0)
    for emb_layer in (-1, 0):
        a = embed_cells(on_base.model, cells, specials=specials, emb_layer=emb_layer)
        b = embed_cells(merged.model, cells, specials=specials, emb_layer=emb_layer)
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
        assert np.abs(a - embed_cells(base, cells, specials=specials, emb_layer=emb_layer)).max() > 1e-3
