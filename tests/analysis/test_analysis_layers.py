"""The truncated forward: exactly the model's own hidden states, and nothing after them runs."""
from __future__ import annotations

import pytest
import torch

from geneformer_peft.analysis.layers import LayerReader, resolve_emb_layer, truncated_encoder
from geneformer_peft.errors import DataError
from peft_cases import PEFT_CASE_PARAMS, batch, build, perturb_peft
from transformerslocal import BertForMaskedLM, BertForSequenceClassification


def _model(case, cls=BertForSequenceClassification):
    model = build(case.config(), seed=3, model_class=cls)
    perturb_peft(model)
    return model.eval()


@pytest.mark.parametrize("case", PEFT_CASE_PARAMS)
def test_truncated_view_equals_the_models_hidden_states(case):
    """Every PEFT method (prompts inserted / removed, gene-token adapter, LoRA ...): the view
    after k layers equals the full model's ``hidden_states[k]``, for every k, padding included."""
    model = _model(case)
    ids, mask, _ = batch(seed=1, lengths=(7, 4, 6))
    with torch.no_grad():
        full = model(ids, mask, output_hidden_states=True).hidden_states
        n = model.config.num_hidden_layers
        for emb_layer in range(-n, 1):
            k = resolve_emb_layer(emb_layer, n)
            got, logits = LayerReader(model, emb_layer)(ids, mask)
            assert logits is None
            assert got.shape == full[k].shape
            torch.testing.assert_close(got, full[k], atol=1e-6, rtol=0)


def test_view_shares_weights_and_leaves_the_model_whole():
    model = _model(PEFT_CASE_PARAMS[0].values[0])
    view = truncated_encoder(model, 1)
    assert len(view.encoder.layer) == 1 and len(model.bert.encoder.layer) == 2
    assert view.pooler is None and model.bert.pooler is not None
    assert view.encoder.layer[0] is model.bert.encoder.layer[0]
    assert view.embeddings.word_embeddings.weight is model.bert.embeddings.word_embeddings.weight


def test_later_layers_and_heads_never_run():
    model = _model(PEFT_CASE_PARAMS[0].values[0], cls=BertForMaskedLM)
    calls = []
    hooks = [m.register_forward_hook(lambda *a, name=name: calls.append(name))
             for name, m in (("layer1", model.bert.encoder.layer[1]), ("layer0", model.bert.encoder.layer[0]),
                             ("mlm_head", model.cls))]
    ids, mask, _ = batch(seed=2)
    LayerReader(model, -1)(ids, mask)
    for h in hooks:
        h.remove()
    assert calls == ["layer0"]


@pytest.mark.parametrize("case", PEFT_CASE_PARAMS)
@pytest.mark.parametrize("emb_layer", [-2, -1, 0])
def test_logits_reader_equals_the_full_classifier(case, emb_layer):
    """Hidden states and logits as one full forward gives them, for every method; without
    prompts and below the last layer the run continues from the read layer, so the last layer
    computes token 0 alone."""
    model = _model(case)
    ids, mask, _ = batch(seed=4)
    rows: list[int] = []
    hook = model.bert.encoder.layer[-1].intermediate.dense.register_forward_hook(
        lambda _m, args, _o: rows.append(args[0].shape[1]))
    hidden, logits = LayerReader(model, emb_layer, logits=True)(ids, mask)
    hook.remove()
    prompts = any(layer.prompt_embeddings is not None for layer in model.bert.encoder.layer)
    assert len(rows) == 1, "the last layer runs once"
    if not prompts and emb_layer < 0:
        assert rows == [1]
    else:
        assert rows[0] >= ids.shape[1]
    with torch.no_grad():
        out = model(ids, mask, output_hidden_states=True)
    n = model.config.num_hidden_layers
    torch.testing.assert_close(logits, out.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden, out.hidden_states[n + emb_layer], atol=1e-6, rtol=0)


@pytest.mark.parametrize("emb_layer", [1, -3, 5])
def test_emb_layer_out_of_range_is_a_clear_error(emb_layer):
    with pytest.raises(DataError, match=r"--emb_layer .* model of 2 layers"):
        resolve_emb_layer(emb_layer, 2)
