"""What a new user hit first (issue 23, point 4): a missing extra, a search space that varies keys
the method ignores, the training-curve star, fractional epoch and trial ticks, a one-fold spread,
a PEFT-only fold given to predict without its base."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import job_factories as jf
from geneformer_peft.cli import main

ROOT = jf.ROOT


def _search(job_data, tmp_path, *extra, space=None):
    space_path = tmp_path / "space.json"
    space_path.write_text(json.dumps(space or {"lr": {"low": 1e-3, "high": 1e-2, "log": True},
                                               "lora_r": {"choices": [2, 4]}}))
    return ["search", "--dataset_name", job_data.dataset_name, "--data_path", str(job_data.data_path),
            "--model_path", str(job_data.model_path), "--space", str(space_path), "--output_dir",
            str(tmp_path / "search"), "--folds", "0", "--n_trials", "1", *jf.FAST_FLAGS, "--epoch", "1", *extra]


def test_search_without_optuna_says_which_extra_to_install(job_data, tmp_path):
    code = ("import sys; sys.modules['optuna'] = None\n"
            "from geneformer_peft.cli import main\n"
            f"sys.exit(main({_search(job_data, tmp_path, '--prompt_type', 'lora')!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=jf._subprocess_env())
    assert out.returncode == 2, out.stderr[-2000:]
    assert "pip install 'geneformer-peft[search]'" in out.stderr and "Traceback" not in out.stderr


def test_search_refuses_a_space_key_the_method_does_not_read(job_data, tmp_path, caplog):
    """The tiny checkpoint's own method is full fine-tuning: lora_r would change nothing."""
    assert main(_search(job_data, tmp_path)) == 2
    message = caplog.records[-1].getMessage()
    assert "lora_r is a key of lora, dora, which this run does not use" in message
    assert "--prompt_type lora" in message and not (tmp_path / "search" / "study.db").exists()


def test_the_documented_search_uses_the_keys_it_varies():
    """docs/usage.md's search example names a method whose keys the example space varies."""
    from transformerslocal.peft.registry import REGISTRY

    usage = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    command = usage[usage.index("geneformer-peft search --dataset_name synthetic"):].split("```")[0]
    space = json.loads((ROOT / "docs" / "search_space_example.json").read_text(encoding="utf-8"))
    method = command.split("--prompt_type")[1].split()[0] if "--prompt_type" in command else "Gene_token_prompt"
    for name in space:
        owners = [m for m, spec in REGISTRY.items() if name in spec.config_keys]
        assert not owners or method in owners, (name, method)


def test_training_curve_star_says_it_marks_the_epoch_kept():
    pytest.importorskip("matplotlib")
    from geneformer_peft.evaluation.plots import plot_training_curves

    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": abs(e - 3) + 0.1, "val_macro_f1": f}
               for e, f in zip(range(1, 6), (0.5, 0.7, 0.8, 0.9, 0.85))]
    figure = plot_training_curves(history, None, best_epoch=3)  # lowest loss at 3, best macro-F1 at 4
    labels = [t.get_text() for axes in figure.axes if axes.get_legend() for t in axes.get_legend().get_texts()]
    assert "epoch kept: 3 (val macro-F1 0.800)" in labels
    figure.canvas.draw()
    for axes in figure.axes:  # whole epochs only
        assert all(float(t).is_integer() for t in axes.get_xticks())


def test_search_history_shows_whole_trials(tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from geneformer_peft.training import search

    study = optuna.create_study(direction="maximize")
    distribution = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)}
    for value in (0.5, 0.6, 0.55):
        study.add_trial(optuna.trial.create_trial(value=value, params={"lr": 1e-3}, distributions=distribution))
    drawn = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (drawn.append(self), real(self, *a, **k))[1])
    search.plot_search(study, tmp_path)
    history = next(f for f in drawn if f.axes and f.axes[0].get_xlabel() == "trial")
    history.canvas.draw()
    assert all(float(t).is_integer() for t in history.axes[0].get_xticks())


def test_one_fold_comparison_shows_no_spread():
    from geneformer_peft.evaluation.comparison import format_comparison_table, paired_comparison

    model = [{"macro_f1": 0.8, "accuracy": 0.9}]
    base = [{"macro_f1": 0.7, "accuracy": 0.85}]
    table = format_comparison_table(paired_comparison(model, base, [0], model_name="m", baseline_name="b"))
    assert "±" not in table and "+0.1000" in table
    two = format_comparison_table(paired_comparison(model * 2, base * 2, [0, 1], model_name="m", baseline_name="b"))
    assert "± 0.0000" in two  # two folds: a measured (here zero) spread


def test_predict_on_peft_only_weights_names_base_model(job_data, finished_runs, tmp_path, caplog):
    import shutil

    fold = tmp_path / "fold"
    shutil.copytree(finished_runs("lora") / "0", fold)
    for name in ("pytorch_model.bin", "model.safetensors"):
        (fold / name).unlink(missing_ok=True)
    assert main(["predict", "--model_path", str(fold), "--input", str(job_data.cells), "--output",
                 str(tmp_path / "p.csv")]) == 2
    assert "--base_model" in caplog.records[-1].getMessage()
