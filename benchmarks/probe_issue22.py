"""Issue 22's cases run as a user would, against one copy of the code: what each command does
with bad inputs and faults (the "before" column of docs/run_safety.md's table of cases).

Usage::

    git worktree add /tmp/before22 96feb63          # the code before the issue-22 work
    python benchmarks/probe_issue22.py --code /tmp/before22 --json before.json
    python benchmarks/probe_issue22.py --code . --json now.json

Inputs (tiny: 100 cells, a BERT of hidden size 32, 2 layers) are made with this checkout's
test factories; every case runs the command line (or, where the fault has to be injected, a
few lines around ``cli.main``) of the copy given by ``--code`` in a subprocess, and is
reported as ``traceback``, ``exit N: <last line>`` and what went wrong besides the exit status
(a lost fold, a replaced output, code run from a pickle, ...). A full disk and a read-only
folder are private tmpfs mounts (``unshare -rm``); the huge configs run under a 6 GiB address
space limit so that the old code's allocation fails instead of exhausting the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

EXAMPLE_CKPT = ROOT / "Pretrain_ckpts" / "geneformer-tiny-example"
EXAMPLE_TEST0 = ROOT / "example_py" / "data" / "synthetic" / "0" / "synthetic_test0.dataset"


class Marker:
    """Unpickling this creates a file (the code a crafted pickle runs)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.path)}",))


class Probe:
    """Runs commands of the copy of the code at ``code`` on inputs under ``work``."""

    def __init__(self, code: Path, work: Path) -> None:
        self.code, self.work = code.resolve(), work
        self.n = 0

    def env(self) -> dict:
        env = dict(os.environ, PYTHONPATH=str(self.code), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return env

    def scratch(self, name: str) -> Path:
        self.n += 1
        path = self.work / f"{self.n:02d}-{name}"
        path.mkdir(parents=True)
        return path

    def _limits(self, fsize=None, memory=None):
        if fsize is None and memory is None:
            return None

        def apply() -> None:
            import resource

            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))
            if memory is not None:
                resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

        return apply

    def cli(self, argv, *, mount=None, options="", fsize=None, memory=None, timeout=600):
        command = [sys.executable, "-m", "geneformer_peft.cli", *map(str, argv)]
        return self._run(command, mount=mount, options=options, fsize=fsize, memory=memory, timeout=timeout)

    def script(self, code: str, *args, timeout=600):
        return self._run([sys.executable, "-c", code, *map(str, args)], timeout=timeout)

    def _run(self, command, *, mount=None, options="", fsize=None, memory=None, timeout=600):
        if mount is not None:
            command = ["unshare", "-rm", "sh", "-c",
                       f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount))} && exec {shlex.join(command)}"]
        return subprocess.run(command, cwd=self.work, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, preexec_fn=self._limits(fsize, memory))

    def popen(self, argv):
        return subprocess.Popen([sys.executable, "-m", "geneformer_peft.cli", *map(str, argv)], cwd=self.work,
                                env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def outcome(proc) -> str:
    """``traceback (<last line>)`` or ``exit N: <last line>``."""
    stderr = proc.stderr if isinstance(proc.stderr, str) else ""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    last = last.split(": ", 1)[1] if last[:4].isdigit() and ": " in last else last  # log prefix
    last = last if len(last) <= 160 else last[:157] + "..."
    status = proc.returncode
    if "Traceback (most recent call last)" in stderr or "Logging error" in stderr:
        return f"traceback, exit {status} ({last})"
    return f"exit {status}: {last}" if last else f"exit {status}"


# ----------------------------------------------------------------------------- inputs


def make_inputs(work: Path) -> dict:
    import datasets

    import job_factories as jf
    from data_factories import make_adata, make_vocab

    datasets.disable_progress_bars()
    job = jf.make_job_data(work / "job")
    adata = make_adata(30, 20, seed=5)
    adata.write_h5ad(work / "cells.h5ad")
    tokens, medians = make_vocab(list(adata.var_names), seed=5)
    (work / "tokens.pkl").write_bytes(pickle.dumps(tokens))
    (work / "medians.pkl").write_bytes(pickle.dumps(medians))
    genes = sorted(g for g in job.token_dictionary if not g.startswith("<"))
    (work / "classes.json").write_text(json.dumps({"a": genes[0:40:2], "b": genes[1:40:2]}))
    (work / "job_tokens.pkl").write_bytes(pickle.dumps({str(k): int(v) for k, v in job.token_dictionary.items()}))
    (work / "space.json").write_text(json.dumps({"lr": {"low": 1e-3, "high": 1e-2, "log": True}}))
    (work / "space2.json").write_text(json.dumps({"lr": {"low": 1e-4, "high": 1e-3, "log": True}}))
    return {"job": job, "jf": jf}


def finetune_argv(i, out, *extra):
    return ["finetune", *i["job"].finetune_argv(out, "--prompt_type", "lora", "--folds", "0", "--epoch", "1",
                                                "--baselines", "none", *extra)]


def run_dir(i, out):
    return i["jf"].run_dir(out, "lora", i["job"])


def tokenize_argv(i, out, *extra):
    w = i["job"].cells.parent.parent
    return ["tokenize", "--input", w / "cells.h5ad", "--output", out, "--token_dictionary", w / "tokens.pkl",
            "--gene_median_dictionary", w / "medians.pkl", "--label_column", "cell_type", "--model_input_size", "16",
            "--no_progress", *extra]


def embed_argv(i, out, *extra, model=EXAMPLE_CKPT, data=EXAMPLE_TEST0):
    return ["embed", "--model_path", model, "--input", data, "--output", out, "--device", "cpu", "--no_plots",
            *extra]


def perturb_argv(i, out, *extra, model=EXAMPLE_CKPT, data=EXAMPLE_TEST0):
    return ["perturb", "--model_path", model, "--input", data, "--output_dir", out, "--genes", "all",
            "--perturb_type", "delete", "--device", "cpu", "--no_plots", "--max_ncells", "2", *extra]


def split_argv(i, out, *extra):
    return ["split", "--input", i["job"].cells, "--dataset_name", out.name, "--output_dir", out.parent,
            "--n_folds", "2", *extra]


def a_fold(p: Probe, i) -> Path:
    """A fine-tuned fold made by the probed code (for predict)."""
    if "fold" not in i:
        out = p.scratch("fold")
        proc = p.cli(finetune_argv(i, out))
        assert proc.returncode == 0, proc.stderr[-2000:]
        i["fold"] = run_dir(i, out) / "0"
    return i["fold"]


def predict_argv(p, i, out, *extra):
    return ["predict", "--model_path", a_fold(p, i), "--input", i["job"].fold_file(0, "test"), "--output", out,
            "--device", "cpu", *extra]


# ----------------------------------------------------------------------------- cases

CASES: dict[str, callable] = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


INTERRUPT_OVERWRITE = r"""
import errno, sys
from geneformer_peft.cli import main
from geneformer_peft.training import trainer
how = sys.argv[1]
def fit(self):
    if how == "ctrl-c":
        raise KeyboardInterrupt
    if how == "diverged":
        from geneformer_peft.errors import TrainingDiverged
        raise TrainingDiverged("fold 0: loss is nan")
    raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")
trainer.FoldTrainer.fit = fit
sys.exit(main(sys.argv[2:]))
"""


def _overwrite_interrupted(p, i, how):
    out = p.scratch("overwrite")
    assert p.cli(finetune_argv(i, out)).returncode == 0
    run = run_dir(i, out)
    proc = p.script(INTERRUPT_OVERWRITE, how, *finetune_argv(i, out, "--overwrite"))
    lost = not (run / "0" / "fold_done.json").is_file()
    reported = "0" in json.dumps(json.loads((run / "summary.json").read_text()).get("folds", "")) \
        if (run / "summary.json").is_file() else False
    return outcome(proc) + ("; finished fold 0 deleted" + (", summary still reports it" if reported else "")
                            if lost else "; fold 0 kept")


@case("finetune --overwrite, Ctrl-C during the retraining")
def _(p, i):
    return _overwrite_interrupted(p, i, "ctrl-c")


@case("finetune --overwrite, divergence during the retraining")
def _(p, i):
    return _overwrite_interrupted(p, i, "diverged")


@case("finetune --overwrite, full disk during the retraining")
def _(p, i):
    return _overwrite_interrupted(p, i, "full")


RACE = r"""
import importlib, sys
from pathlib import Path
from geneformer_peft.cli import main
target, other, is_dir = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
module_name, attr = target.rsplit(".", 1)
module = importlib.import_module(module_name)
real = getattr(module, attr)
def wrapped(*args, **kwargs):
    result = real(*args, **kwargs)
    if is_dir:
        other.mkdir(parents=True)
        (other / "theirs").write_text("theirs")
    else:
        other.write_text("theirs")
    return result
setattr(module, attr, wrapped)
sys.exit(main(sys.argv[4:]))
"""


def _race(p, i, name, argv_of, target, is_dir):
    out = p.scratch("race") / name
    proc = p.script(RACE, target, out, "1" if is_dir else "0", *argv_of(out)[0:])
    theirs = (out / "theirs").is_file() if is_dir else out.is_file() and out.read_bytes() == b"theirs"
    if proc.returncode == 0 and theirs:
        return outcome(proc) + "; exit 0, but its result is not there (the other job's output is)"
    return outcome(proc) + ("; the other job's output kept" if theirs else "; the other job's output replaced")


@case("two tokenize runs on one output")
def _(p, i):
    return _race(p, i, "cells.dataset", lambda o: tokenize_argv(i, o), "geneformer_peft.data.rank_value.tokenize_anndata",
                 True)


@case("two embed runs on one output")
def _(p, i):
    return _race(p, i, "e.csv", lambda o: embed_argv(i, o), "geneformer_peft.analysis.runs.run_embed", False)


@case("two split runs on one output")
def _(p, i):
    return _race(p, i, "toy", lambda o: split_argv(i, o), "geneformer_peft.data.folds.split_folds", True)


def _genes_argv(i, out, *extra, cells=None):
    w = i["job"].cells.parent.parent
    return ["classify-genes", "--gene_classes", w / "classes.json", "--input", cells or i["job"].cells,
            "--model_path", i["job"].model_path, "--output_path", out, "--n_folds", "3", "--folds", "0",
            "--epoch", "1", "--lr", "3e-3", "--prompt_type", "lora", "--no_progress", "--device", "cpu",
            "--token_dictionary", w / "job_tokens.pkl", *extra]


def _genes_rerun(p, i, change):
    out = p.scratch("genes")
    first = p.cli(_genes_argv(i, out))
    if first.returncode:
        return "first run: " + outcome(first)
    return outcome(p.cli(change(out)))


@case("classify-genes rerun with another --lr")
def _(p, i):
    r = _genes_rerun(p, i, lambda out: _genes_argv(i, out, "--lr", "1e-2"))
    return r + ("; the finished fold reused as the result" if r.startswith("exit 0") else "")


@case("classify-genes rerun with another --input")
def _(p, i):
    cells = i["job"].fold_file(0, "train")
    r = _genes_rerun(p, i, lambda out: _genes_argv(i, out, cells=cells))
    return r + ("; the finished fold reused as the result" if r.startswith("exit 0") else "")


def _search_argv(i, out, space="space.json", *extra):
    job, w = i["job"], i["job"].cells.parent.parent
    return ["search", "--dataset_name", job.dataset_name, "--data_path", job.data_path, "--model_path",
            job.model_path, "--prompt_type", "lora", "--space", w / space, "--output_dir", out, "--folds", "0",
            *i["jf"].FAST_FLAGS, "--epoch", "1", "--n_trials", "1", *extra]


def _search_twice(p, i, space, *second):
    out = p.scratch("search") / "s"
    first = p.cli(_search_argv(i, out))
    if first.returncode:
        return "first run: " + outcome(first)
    r = outcome(p.cli(_search_argv(i, out, space, *second)))
    return r + ("; trials of other settings added to the study" if r.startswith("exit 0") else "")


@case("search adds trials with another --epoch")
def _(p, i):
    return _search_twice(p, i, "space.json", "--epoch", "2")


@case("search adds trials with another --space")
def _(p, i):
    return _search_twice(p, i, "space2.json")


@case("best_command.txt, pasted, reproduces the best trial (--select_epoch_by loss)")
def _(p, i):
    out = p.scratch("best") / "s"
    proc = p.cli(_search_argv(i, out, "space.json", "--n_trials", "2", "--epoch", "3", "--select_epoch_by", "loss",
                              "--early_stopping_patience", "1", "--seed", "3", "--no_pruning"))
    if proc.returncode:
        return "search: " + outcome(proc)
    best = json.loads((out / "best_flags.json").read_text())
    line = [x for x in (out / "best_command.txt").read_text().splitlines() if not x.startswith("#")][0]
    argv = shlex.split(line)
    rerun = out.parent / "rerun"
    if argv[0] == "geneformer-peft":  # pasted as written
        proc = p.cli([*argv[1:], "--output_path", rerun, "--baselines", "none"])
    else:  # python SCRIPT ..., from the code's folder
        proc = subprocess.run([sys.executable, *argv[1:], "--output_path", str(rerun), "--baselines", "none"],
                              cwd=p.code, env=p.env(), capture_output=True, text=True, timeout=600)
    if proc.returncode:
        return "the command: " + outcome(proc)
    metrics = json.loads(next(rerun.rglob("0/metrics.json")).read_text())
    same = metrics["best_val_macro_f1"] == best["validation_macro_f1"]
    flag = "--select_epoch_by" in line
    return (f"exit 0; {'' if flag else 'no --select_epoch_by in it; '}validation macro-F1 "
            f"{metrics['best_val_macro_f1']:.6f} vs the trial's {best['validation_macro_f1']:.6f}"
            + (" (same)" if same else " (differs)"))


def _tokenize_planted(p, i, which):
    d = p.scratch("planted")
    marker = d / "ran"
    w = i["job"].cells.parent.parent
    tokens, medians = pickle.loads((w / "tokens.pkl").read_bytes()), pickle.loads((w / "medians.pkl").read_bytes())
    if which == "token":
        tokens = {**tokens, "<extra>": Marker(marker)}
    else:
        medians = {**medians, "ENSGX": Marker(marker)}
    (d / "tokens.pkl").write_bytes(pickle.dumps(tokens))
    (d / "medians.pkl").write_bytes(pickle.dumps(medians))
    argv = tokenize_argv(i, d / "out.dataset")
    argv[argv.index("--token_dictionary") + 1] = d / "tokens.pkl"
    argv[argv.index("--gene_median_dictionary") + 1] = d / "medians.pkl"
    r = outcome(p.cli(argv))
    return r + ("; the pickle's code ran" if marker.exists() else "; nothing ran")


@case("malicious token dictionary pickle (tokenize)")
def _(p, i):
    return _tokenize_planted(p, i, "token")


@case("malicious gene median dictionary pickle (tokenize)")
def _(p, i):
    return _tokenize_planted(p, i, "median")


def _interrupted_fold(p, i, out, sig=signal.SIGINT, wait_for="checkpoint"):
    """Start a long fold 0 and stop it with ``sig`` once its first epoch checkpoint exists."""
    argv = finetune_argv(i, out, "--epoch", "60", "--early_stopping_patience", "0")
    run = run_dir(i, out)
    checkpoint = run / ".resume" / "0" / "epoch_checkpoint.pt"
    proc = p.popen(argv)
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(sig)
    proc.stderr_text = proc.communicate(timeout=120)[1]
    return argv, run, checkpoint, proc


@case("planted resume checkpoint (.resume/0/epoch_checkpoint.pt)")
def _(p, i):
    import torch

    out = p.scratch("planted_resume")
    run = run_dir(i, out)
    marker = out / "ran"
    # a run interrupted after an epoch, then its checkpoint replaced by a crafted one
    argv, run, checkpoint, proc = _interrupted_fold(p, i, out)
    if not checkpoint.is_file():
        return "no checkpoint to plant into: " + proc.stderr_text[-200:]
    torch.save({"model": Marker(marker)}, checkpoint)
    r = outcome(p.cli(argv[:argv.index("--epoch")] + ["--epoch", "1"] + argv[argv.index("--epoch") + 2:]))
    return r + ("; the pickle's code ran" if marker.exists() else "; nothing ran")


def _faulty(p, i, command, fault):
    d = p.scratch("fault")
    out_parent = d / "mnt"
    out_parent.mkdir()
    name = {"finetune": "run", "tokenize": "cells.dataset", "embed": "e.csv", "predict": "p.csv"}[command]
    out = out_parent / name
    argv = {"finetune": lambda: finetune_argv(i, out), "tokenize": lambda: tokenize_argv(i, out),
            "embed": lambda: embed_argv(i, out), "predict": lambda: predict_argv(p, i, out)}[command]()
    if fault == "read-only":
        proc = p.cli(argv, mount=out_parent, options="size=1m,ro")
    elif fault == "full disk":
        proc = p.cli(argv, mount=out_parent, options="size=4k")
    else:
        proc = p.cli(argv, fsize=1024)
    return outcome(proc)


for _command in ("finetune", "tokenize", "embed", "predict"):
    for _fault in ("read-only", "full disk", "ulimit -f"):
        CASES[f"{_fault} output folder: {_command}"] = (lambda c, f: lambda p, i: _faulty(p, i, c, f))(_command,
                                                                                                     _fault)


def _bad_weights(p, i, command, how):
    d = p.scratch("weights")
    ckpt = d / "ckpt"
    shutil.copytree(EXAMPLE_CKPT, ckpt)
    weights = ckpt / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.write_bytes(bytes(range(256)) * 64)  # not a weight file at all
    argv = (embed_argv(i, d / "e.csv", model=ckpt) if command == "embed" else perturb_argv(i, d / "p", model=ckpt))
    return outcome(p.cli(argv))


for _command in ("embed", "perturb"):
    for _how in ("truncated", "foreign"):
        CASES[f"{_how} weight file: {_command}"] = (lambda c, h: lambda p, i: _bad_weights(p, i, c, h))(_command, _how)


def _beyond_vocab(p, i, command):
    import datasets

    d = p.scratch("beyond")
    cells = datasets.load_from_disk(str(EXAMPLE_TEST0)).to_dict()
    for ids in cells["input_ids"]:
        ids[5] = 5000
    datasets.Dataset.from_dict(cells).save_to_disk(str(d / "cells.dataset"))
    data = d / "cells.dataset"
    argv = {"embed": lambda: embed_argv(i, d / "e.csv", data=data),
            "perturb": lambda: perturb_argv(i, d / "p", data=data),
            "pretrain": lambda: ["pretrain", "--model_path", EXAMPLE_CKPT, "--input", data, "--output_dir", d / "o",
                                 "--max_steps", "1", "--device", "cpu"]}[command]()
    return outcome(p.cli(argv))


for _command in ("embed", "perturb", "pretrain"):
    CASES[f"token ids beyond the vocabulary: {_command}"] = (lambda c: lambda p, i: _beyond_vocab(p, i, c))(_command)


def _rewritten_job(p, i, change, fold=1, split="test"):
    d = p.scratch("data")
    data = i["jf"].copy_job_data(i["job"], d)
    i["jf"].rewrite_split(data, fold, split, change)
    return data, d


@case("mixed str/int labels (finetune; ints in fold 1's test split)")
def _(p, i):
    ids = {name: k for k, name in enumerate(i["job"].labels)}
    data, d = _rewritten_job(p, i, lambda cols: cols.update(cell_type=[ids[v] for v in cols["cell_type"]]))
    argv = ["finetune", *data.finetune_argv(d / "out", "--prompt_type", "lora", "--baselines", "none", "--epoch", "1")]
    r = outcome(p.cli(argv))
    trained = list((d / "out").rglob("fold_done.json"))
    return r + (f"; {len(trained)} fold(s) trained first" if trained and not r.startswith("exit 0") else "")


@case('vocab_size "2002" in config.json (embed)')
def _(p, i):
    d = p.scratch("config")
    ckpt = d / "ckpt"
    shutil.copytree(EXAMPLE_CKPT, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["vocab_size"] = "2002"
    (ckpt / "config.json").write_text(json.dumps(config))
    return outcome(p.cli(embed_argv(i, d / "e.csv", model=ckpt)))


def _huge(p, i, key, value):
    d = p.scratch("huge")
    config = json.loads((EXAMPLE_CKPT / "config.json").read_text())
    if key == "hidden_size":
        ckpt = d / "ckpt"
        shutil.copytree(EXAMPLE_CKPT, ckpt)
        config.update(hidden_size=value, intermediate_size=4 * value)
        (ckpt / "config.json").write_text(json.dumps(config))
        extra = ["--model_path", ckpt, "--prompt_type", "lora"]
    else:
        config.update({key: value, "prompt_type": "lora" if key == "lora_r" else "prefix_prompt"})
        (d / "method.json").write_text(json.dumps(config))
        extra = ["--config", d / "method.json"]
    argv = ["finetune", "--dataset_name", "synthetic", "--data_path", ROOT / "example_py" / "data", "--model_path",
            EXAMPLE_CKPT, "--output_path", d / "out", "--folds", "0", "--epoch", "1", "--device", "cpu",
            "--no_progress", "--baselines", "none", *extra]
    return outcome(p.cli(argv, memory=6 * 2**30))


CASES["huge hidden_size in config.json (finetune)"] = lambda p, i: _huge(p, i, "hidden_size", 10**6)
CASES["huge num_token in --config (finetune)"] = lambda p, i: _huge(p, i, "num_token", 10**9)
CASES["huge lora_r in --config (finetune)"] = lambda p, i: _huge(p, i, "lora_r", 10**8)


def _truncated_resume(p, i, overwrite):
    out = p.scratch("truncated_resume")
    argv, run, checkpoint, proc = _interrupted_fold(p, i, out)
    if not checkpoint.is_file():
        return "no checkpoint: " + outcome(proc)
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    argv = argv[:argv.index("--epoch")] + ["--epoch", "1"] + argv[argv.index("--epoch") + 2:]
    return outcome(p.cli([*argv, "--overwrite"] if overwrite else argv))


CASES["truncated resume checkpoint: rerun"] = lambda p, i: _truncated_resume(p, i, False)
CASES["truncated resume checkpoint: --overwrite"] = lambda p, i: _truncated_resume(p, i, True)


@case("Ctrl-C in search")
def _(p, i):
    out = p.scratch("search_ctrl_c") / "s"
    argv = _search_argv(i, out, "space.json", "--epoch", "1000", "--early_stopping_patience", "0", "--no_pruning")
    proc = p.popen(argv)
    log = out / "search.log"
    deadline = time.monotonic() + 200
    while not (log.is_file() and "epoch 1" in log.read_text()) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.stderr = proc.communicate(timeout=120)[1]
    return outcome(proc)


@case("single-class data (finetune)")
def _(p, i):
    first = i["job"].labels[0]
    d = p.scratch("single")
    data = i["jf"].copy_job_data(i["job"], d)
    for split in ("train", "val", "test"):
        i["jf"].rewrite_split(data, 0, split, lambda cols: cols.update(cell_type=[first] * len(cols["cell_type"])))
    argv = ["finetune", *data.finetune_argv(d / "out", "--prompt_type", "lora", "--baselines", "none", "--folds", "0")]
    return outcome(p.cli(argv))


@case("NaN labels (finetune; labels coded as numbers, one NaN)")
def _(p, i):
    ids = {name: float(k) for k, name in enumerate(i["job"].labels)}
    d = p.scratch("data")
    data = i["jf"].copy_job_data(i["job"], d)
    for split in ("train", "val", "test"):
        def coded(cols, split=split):
            cols["cell_type"] = [ids[v] for v in cols["cell_type"]]
            if split in ("train", "test"):
                cols["cell_type"][0] = float("nan")

        i["jf"].rewrite_split(data, 0, split, coded)
    argv = ["finetune", *data.finetune_argv(d / "out", "--prompt_type", "lora", "--baselines", "none", "--folds", "0")]
    return outcome(p.cli(argv))


@case("SIGTERM during finetune (message, run.log, lock)")
def _(p, i):
    out = p.scratch("sigterm")
    argv, run, checkpoint, proc = _interrupted_fold(p, i, out, sig=signal.SIGTERM)
    proc.stderr = proc.stderr_text
    r = outcome(proc)
    log = (run / "run.log").read_text() if (run / "run.log").is_file() else ""
    logged = "run stopped" in (log.strip().splitlines() or [""])[-1]
    return (r + ("; run.log's last line says why" if logged else "; nothing in run.log")
            + ("; the lock left behind" if (run / ".lock").exists() else "; lock released"))


@case("--seed -1 (finetune)")
def _(p, i):
    return outcome(p.cli(finetune_argv(i, p.scratch("seed"), "--seed", "-1")))


@case("--folds 0,0 (finetune)")
def _(p, i):
    d = p.scratch("folds")
    argv = ["finetune", *i["job"].finetune_argv(d, "--prompt_type", "lora", "--folds", "0,0", "--epoch", "1",
                                                "--baselines", "none")]
    r = outcome(p.cli(argv))
    trained = list(d.rglob("fold_done.json"))
    return r + ("; refused only after fold 0 trained" if trained else "")


@case("a file where a folder is expected (finetune --data_path)")
def _(p, i):
    d = p.scratch("kind")
    (d / "data.h5ad").write_text("x")
    argv = finetune_argv(i, d / "out")
    argv[argv.index("--data_path") + 1] = d / "data.h5ad"
    return outcome(p.cli(argv))


@case("a folder where a file is expected (tokenize --input)")
def _(p, i):
    d = p.scratch("kind")
    (d / "cells.h5ad").mkdir()
    argv = tokenize_argv(i, d / "out.dataset")
    argv[argv.index("--input") + 1] = d / "cells.h5ad"
    return outcome(p.cli(argv))


@case('perturb --filter selecting a label that holds a comma')
def _(p, i):
    import datasets

    d = p.scratch("filter")
    cells = datasets.load_from_disk(str(EXAMPLE_TEST0)).to_dict()
    label = "CD4+, naive T cell"
    cells["cell_type"] = [label if k < 3 else v for k, v in enumerate(cells["cell_type"])]
    datasets.Dataset.from_dict(cells).save_to_disk(str(d / "cells.dataset"))
    argv = perturb_argv(i, d / "p", "--filter", f'cell_type="{label}"', data=d / "cells.dataset")
    proc = p.cli(argv)
    r = outcome(proc)
    scanned = json.loads((d / "p" / "summary.json").read_text())["n_cells"] if proc.returncode == 0 else 0
    return (r.split(": ", 1)[0] + f": {scanned} cells of that label scanned (--max_ncells 2)") if proc.returncode == 0 else r


@case("orphan <fold>.tmp-* folders after a SIGKILL (finetune)")
def _(p, i):
    out = p.scratch("sigkill")
    argv = finetune_argv(i, out, "--epoch", "3")
    run = run_dir(i, out)
    proc = p.popen(argv)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not any(
            ".tmp" in q.name for q in (run.iterdir() if run.is_dir() else [])):
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    left = [q.name for q in run.iterdir() if ".tmp" in q.name] if run.is_dir() else []
    if not left:
        return "(no temporary folder caught before the kill)"
    r = outcome(p.cli(argv))
    still = [q.name for q in run.iterdir() if ".tmp" in q.name]
    return r + (f"; {still[0]} left behind" if still else "; the dead job's temporary removed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, required=True, help="root of the copy of the code to probe")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--json", type=Path, required=True, help="write {case: outcome} here")
    parser.add_argument("--only", default=None, help="run the cases whose name holds this text")
    args = parser.parse_args(argv)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="probe22_"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs(work / f"inputs-{os.getpid()}")
    probe = Probe(args.code, work / f"runs-{os.getpid()}")
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for name, fn in CASES.items():
        if args.only and args.only not in name:
            continue
        start = time.monotonic()
        try:
            results[name] = fn(probe, inputs)
        except Exception as error:  # the probe's own failure, reported as such
            results[name] = f"(probe failed: {type(error).__name__}: {error})"
        print(f"{time.monotonic() - start:6.1f}s  {name}: {results[name]}", flush=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
