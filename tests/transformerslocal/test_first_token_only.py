"""A classifier in eval mode computes only token 0 in its last layer (the ``"first"`` pooler,
and V2's ``"cls"``, read nothing else): the logits equal those of the full computation for
every PEFT method and combination, the last layer really runs on one row, and every other
path (training, mean pooling, hidden states or attentions requested) still runs every row."""
from __future__ import annotations

import pytest
import torch

from peft_cases import CASE_PARAMS, Case, base_model, batch, build, perturb_peft

LENGTHS = (7, 4, 6)


def rows_seen(module: torch.nn.Module) -> list[int]:
    """Record the number of positions (dim 1) of every input ``module`` gets."""
    seen: list[int] = []
    module.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    return seen


def full_logits(model, ids, mask) -> torch.Tensor:
    """Logits from the every-token last hidden state, pooled and classified directly."""
    seq = model.bert(ids, mask).last_hidden_state  # BertModel default: every token
    assert seq.shape[1] >= ids.shape[1]
    return model.classifier(model.dropout(model.bert.pooler(seq, mask)))


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_eval_logits_equal_the_full_computation(case: Case):
    model = build(case.config()).eval()
    perturb_peft(model)  # nonzero LoRA B, adapter outputs ...: the methods really act
    ids, mask, _ = batch(lengths=LENGTHS)
    last, before = model.bert.encoder.layer[-1], model.bert.encoder.layer[-2]
    last_rows, before_rows = rows_seen(last.intermediate.dense), rows_seen(before.intermediate.dense)
    with torch.no_grad():
        got = model(ids, mask).logits
        assert last_rows == [1], "the last layer should run on token 0 alone"
        assert before_rows[0] >= ids.shape[1], "earlier layers run every token"
        want = full_logits(model, ids, mask)
    assert last_rows[-1] >= ids.shape[1], "the reference path runs every token"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_training_runs_every_row():
    model = base_model(seed=0).train()
    ids, mask, labels = batch(lengths=LENGTHS)
    seen = rows_seen(model.bert.encoder.layer[-1].intermediate.dense)
    model(ids, mask, labels=labels).loss.backward()
    assert seen == [ids.shape[1]]


@pytest.mark.parametrize(("pooling", "last_rows", "atol"), [("cls", 1, 1e-6), ("mean", max(LENGTHS), 0.0)])
def test_pooling_modes(pooling: str, last_rows: int, atol: float):
    """V2's ``"cls"`` pooling reads token 0 too (its <cls>), so its last layer runs one row;
    ``"mean"`` reads every token, so every row runs (and nothing differs at all)."""
    model = base_model(seed=0, classifier_pooling=pooling).eval()
    ids, mask, _ = batch(lengths=LENGTHS)
    seen = rows_seen(model.bert.encoder.layer[-1].intermediate.dense)
    with torch.no_grad():
        got = model(ids, mask).logits
        want = full_logits(model, ids, mask)
    assert seen[0] == last_rows
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("wanted", ["output_hidden_states", "output_attentions"])
def test_hidden_states_or_attentions_run_every_row(wanted: str):
    model = base_model(seed=0).eval()
    ids, mask, _ = batch(lengths=LENGTHS)
    seen = rows_seen(model.bert.encoder.layer[-1].intermediate.dense)
    with torch.no_grad():
        out = model(ids, mask, **{wanted: True})
        plain = model(ids, mask).logits
    assert seen[0] == ids.shape[1]
    extra = out.hidden_states if wanted == "output_hidden_states" else out.attentions
    assert all(t.shape[-2] == ids.shape[1] for t in extra)
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=1e-6)


def test_resume_from_cached_layers_computes_token_zero_only():
    model = base_model(seed=0).eval()
    ids, mask, _ = batch(lengths=LENGTHS)
    seen = rows_seen(model.bert.encoder.layer[-1].intermediate.dense)
    with torch.no_grad():
        cached = model.bert.encoder(model.bert.embed(ids), mask, end_layer=1)[0]
        got = model(ids, mask, inputs_hidden=cached, start_layer=1).logits
        want = full_logits(model, ids, mask)
    assert seen[0] == 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_encoder_refuses_first_token_only_with_every_token_outputs():
    model = base_model(seed=0).eval()
    ids, mask, _ = batch(lengths=LENGTHS)
    with pytest.raises(ValueError, match="first_token_only.*output_hidden_states"):
        model.bert(ids, mask, first_token_only=True, output_hidden_states=True)
    out = model.bert(ids, mask, first_token_only=True)
    assert out.last_hidden_state.shape == (len(LENGTHS), 1, model.config.hidden_size)
