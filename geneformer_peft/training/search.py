"""Hyperparameter search over the fine-tuning job: Optuna's TPE sampler, a median pruner per
epoch, and the study in an SQLite database in the output folder (resumable, shareable).

The objective of a trial is the best validation macro-F1 of each chosen fold, averaged over
the folds. Only the train and val splits are read: the test split is never opened during
the search (it is read once, by :func:`refit_best`, after the search has chosen).

A study records what makes its trials' values comparable when it is created (its user attr
``settings``, :func:`study_settings`: the fixed training settings, the space, the searched
folds, the data and checkpoint fingerprints of :mod:`~geneformer_peft.training.provenance`);
adding trials or refitting with other settings is refused (:class:`SettingsChanged`, naming
every difference). Every trial sets torch's thread count by the policy of
:mod:`~geneformer_peft.training.threads` (``--num_threads``, else the free cores), as the
fine-tuning job does.

Outputs in ``output_dir`` (``docs/recipes.md``)::

    study.db                 Optuna's storage (SQLite); rerun the same command to add trials
    search.log               every trial's log
    trials.csv               every trial of the study: number, value, state, times, parameters
    best_config.json         the best trial's config.json (for --config of the fine-tuning job)
    best_flags.json          the best trial's training flags {flag: value}
    best_command.txt         the ``geneformer-peft finetune`` command that reproduces the best trial
    optimization_history.png, param_importances.png
    refit/                   --refit: the best setting on all folds (the job's run folder)
    .cache/file_hashes.json  SHA-256 of the checkpoint and dictionary files by size and mtime
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shlex
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from geneformer_peft.data.cells import EncodedCells
from geneformer_peft.checks import check_compatibility
from geneformer_peft.data.dataset_io import load_saved_dataset
from geneformer_peft.data.folds import discover_folds, fold_paths
from geneformer_peft.data.samplers import class_weights as reference_class_weights
from geneformer_peft.errors import DataError, RunInterrupted, TrainingDiverged
from geneformer_peft.evaluation.outputs import write_json
from geneformer_peft.log_format import attach_log_file, detach_log_file
from geneformer_peft.models.device import resolve_device
from geneformer_peft.models.generation import check_checkpoint_data
from geneformer_peft.models.loading import load_classifier, resolve_config
from geneformer_peft.training.arguments import LR_SCHEDULES, SAMPLERS, TrainingArguments
from geneformer_peft.training import provenance as prov
from geneformer_peft.training import threads as thread_policy
from geneformer_peft.training.cross_validation import RunOptions, check_vocabulary, run_cross_validation
from geneformer_peft.training.cross_validation import _log_to_file  # run.log's last line, here search.log's
from geneformer_peft.training.preflight import config_overrides, vocabulary_source
from geneformer_peft.training.provenance import SettingsChanged
from geneformer_peft.training.trainer import FoldTrainer, set_seed

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_PARAMETERS", "SearchSettings", "SearchSpace", "SettingsChanged", "TRAINING_PARAMETERS",
           "best_command", "check_study_settings", "load_search_space", "refit_best", "run_search", "study_settings",
           "write_search_outputs"]

#: searchable training settings -> (kind, command-line flag)
TRAINING_PARAMETERS: dict[str, tuple[str, str]] = {
    "lr": ("float", "--lr"),
    "weight_decay": ("float", "--weight_decay"),
    "warmup_ratio": ("float", "--warmup_ratio"),
    "warmup_steps": ("int", "--warmup_steps"),
    "lr_schedule": ("categorical", "--lr_schedule"),
    "batch_size": ("int", "--batch_size"),
    "layer_decay": ("float", "--layer_decay"),
    "lr_end": ("float", "--lr_end"),
    "sampler": ("categorical", "--sampler"),
}
#: searchable PEFT keys of config.json -> kind
CONFIG_PARAMETERS: dict[str, str] = {
    "lora_r": "int",
    "lora_alpha": "float",
    "lora_dropout": "float",
    "num_token": "int",
    "adapter_ratio": "float",
    "mlp_adapter_scale": "float",
    "freeze_layers": "int",
}
_SPEC_KEYS = {"type", "low", "high", "log", "step", "choices"}
_CATEGORICAL_ONLY = {"lr_schedule": LR_SCHEDULES, "sampler": SAMPLERS}


class _Pruned(Exception):
    """Raised by the epoch callback; turned into ``optuna.TrialPruned`` by the objective."""


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: ``float``/``int`` in [low, high] (log scale or step), or categorical."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def extremes(self) -> list:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


@dataclass
class SearchSpace:
    """The parameters a search varies (:func:`load_search_space`), and constants it sets."""

    dimensions: list[Dimension] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)
    source: str = "search space"

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's parameters: suggested ones and the constants."""
        return {**self.constants, **{d.name: d.suggest(trial) for d in self.dimensions}}

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions] + list(self.constants)


def split_parameters(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training settings, config.json keys) of a trial's parameters."""
    training = {k: v for k, v in params.items() if k in TRAINING_PARAMETERS}
    config = {k: v for k, v in params.items() if k in CONFIG_PARAMETERS}
    return training, config


def _bad(source: str, key: str, value: Any, expected: str) -> DataError:
    return DataError(f"{source}: {key} = {json.dumps(value, default=str)} is not valid; expected {expected}")


def _parse_dimension(source: str, name: str, spec: Any, kind: str) -> Dimension | Any:
    if not isinstance(spec, Mapping):
        if isinstance(spec, (list, tuple)):
            spec = {"choices": list(spec)}
        else:
            return spec  # a constant
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise _bad(source, f"{name}.{sorted(unknown)[0]}", spec[sorted(unknown)[0]],
                   f"only the keys {sorted(_SPEC_KEYS)}")
    declared = spec.get("type")
    if declared is not None and declared not in ("float", "int", "categorical"):
        raise _bad(source, f"{name}.type", declared, "'float', 'int' or 'categorical'")
    if "choices" in spec or declared == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise _bad(source, f"{name}.choices", choices, "a non-empty list of values")
        if any(not isinstance(c, (str, int, float, bool)) and c is not None for c in choices):
            raise _bad(source, f"{name}.choices", choices, "a list of numbers or strings")
        return Dimension(name, "categorical", choices=tuple(choices))
    if kind == "categorical":
        raise _bad(source, name, spec, f'{{"choices": [...]}} from {list(_CATEGORICAL_ONLY[name])}')
    for key in ("low", "high"):
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _bad(source, f"{name}.{key}", value, "a finite number")
    low, high = spec["low"], spec["high"]
    if low > high:
        raise _bad(source, f"{name}.low", low, f"a number <= {name}.high ({high})")
    kind = declared or kind
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _bad(source, f"{name}.log", log, "true or false")
    if log and low <= 0:
        raise _bad(source, f"{name}.low", low, "a number > 0 on a log scale (log: true)")
    step = spec.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        raise _bad(source, f"{name}.step", step, "a number > 0")
    if step is not None and log:
        raise _bad(source, f"{name}.step", step, "no step on a log scale (Optuna samples either)")
    if kind == "int":
        for key, value in (("low", low), ("high", high), ("step", step)):
            if value is not None and float(value) != int(value):
                raise _bad(source, f"{name}.{key}", value, "an integer (this parameter is an integer)")
    return Dimension(name, kind, low=low, high=high, log=log, step=step)


def load_search_space(path: str | Path, *, base_training: TrainingArguments | None = None) -> SearchSpace:
    """Read and check a search-space file.

    Parameters
    ----------
    path
        JSON ``{parameter: spec}``. A spec is ``{"low": a, "high": b}`` (``"log": true`` for a log
        scale, ``"step"`` for a grid, ``"type": "int"`` or ``"float"`` to override the kind),
        ``{"choices": [...]}`` (or a bare list), or a bare value (a constant of every trial).
        Parameters: training settings (:data:`TRAINING_PARAMETERS`) and PEFT keys of
        config.json (:data:`CONFIG_PARAMETERS`).
    base_training
        The fixed training settings; every end of each range is checked against them.

    Raises
    ------
    DataError
        Naming the file, the key and the value: unknown parameter, malformed spec, a range
        end that the job refuses (e.g. ``layer_decay.high = 1.5``).
    FileNotFoundError
        If the file does not exist.
    """
    path = Path(path)
    source = f"search space {path}"
    if not path.is_file():
        raise FileNotFoundError(f"--space {path} does not exist; expected a JSON file of parameter ranges, "
                                "e.g. {\"lr\": {\"low\": 1e-4, \"high\": 1e-2, \"log\": true}}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{source}: not valid JSON ({err}); expected {{parameter: spec}}") from err
    if not isinstance(raw, Mapping) or not raw:
        raise DataError(f"{source}: holds {json.dumps(raw)[:80]}; expected a non-empty object {{parameter: spec}}")
    space = SearchSpace(source=source)
    allowed = sorted(TRAINING_PARAMETERS) + sorted(CONFIG_PARAMETERS)
    for name, spec in raw.items():
        if name in TRAINING_PARAMETERS:
            kind = TRAINING_PARAMETERS[name][0]
        elif name in CONFIG_PARAMETERS:
            kind = CONFIG_PARAMETERS[name]
        else:
            raise _bad(source, "parameter", name, f"one of {allowed}")
        parsed = _parse_dimension(source, name, spec, "categorical" if name in _CATEGORICAL_ONLY else kind)
        values = parsed.extremes() if isinstance(parsed, Dimension) else [parsed]
        for value in values:
            _check_value(source, name, value, base_training or TrainingArguments())
        if isinstance(parsed, Dimension):
            space.dimensions.append(parsed)
        else:
            space.constants[name] = parsed
    return space


def _check_value(source: str, name: str, value: Any, base: TrainingArguments) -> None:
    """Refuse a value the job would refuse, naming the key of the file."""
    if name in TRAINING_PARAMETERS:
        kind = TRAINING_PARAMETERS[name][0]
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value)):
            raise _bad(source, name, value, "an integer")
        try:
            replace(base, **{name: int(value) if kind == "int" else value})
        except (TypeError, ValueError) as err:
            raise _bad(source, name, value, f"a value the job accepts ({err})") from err
        return
    kind = CONFIG_PARAMETERS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(source, name, value, "a number")
    if kind == "int" and value != int(value):
        raise _bad(source, name, value, "an integer")
    if name in ("lora_r", "num_token") and value < 1:
        raise _bad(source, name, value, "an integer >= 1")
    if name in ("freeze_layers", "lora_dropout", "adapter_ratio", "lora_alpha", "mlp_adapter_scale") and value < 0:
        raise _bad(source, name, value, "a number >= 0")
    if name in ("lora_dropout",) and value >= 1:
        raise _bad(source, name, value, "a number in [0, 1)")


# ----------------------------------------------------------------------------- settings
@dataclass
class SearchSettings:
    """What a search runs: the job's options (its training settings are the fixed ones), the
    space, and the study."""

    run: RunOptions
    space: SearchSpace
    output_dir: Path
    n_trials: int | None = 10
    timeout: float | None = None
    study_name: str = "search"
    pruning: bool = True
    pruner_startup_trials: int = 2
    pruner_warmup_epochs: int = 0
    sampler_seed: int | None = None
    #: where the study lives: ``None`` (``output_dir/study.db``), an RDB URL
    #: (``postgresql://user:password@host:5432/db``, ``sqlite:///path.db``) or ``journal:PATH``
    storage: str | None = None

    @property
    def storage_path(self) -> Path:
        """The local SQLite file (also the creation lock's name when the study lives elsewhere)."""
        return Path(self.output_dir) / "study.db"

    @property
    def storage_name(self) -> str:
        """Where the study lives, for messages (an RDB URL's password left out)."""
        if self.storage is None:
            return str(self.storage_path)
        return _hide_password(self.storage)


#: what --storage accepts besides the default SQLite file
JOURNAL_PREFIX = "journal:"


def storage_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def _hide_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in credentials else ''}@{host}"


def check_storage(value: str) -> str:
    """Return ``value`` if it is a storage that :func:`open_study` can use, else raise.

    Accepted: an RDB URL that SQLAlchemy understands (``postgresql://...``,
    ``mysql://...``, ``sqlite:///...``) or ``journal:PATH`` (Optuna's journal file, for a
    filesystem shared by several machines).

    Raises
    ------
    DataError
        Naming the value and what was expected.
    """
    expected = ("expected an RDB URL such as postgresql://user:password@host:5432/dbname or sqlite:///path/study.db, "
                "or journal:/shared/path/study.journal")
    if value.startswith(JOURNAL_PREFIX):
        path = Path(value[len(JOURNAL_PREFIX):]).expanduser()
        if not value[len(JOURNAL_PREFIX):] or path.is_dir():
            raise DataError(f"--storage {value!r}: the journal file's path is empty or a directory; {expected}")
        if not path.parent.is_dir():
            raise DataError(f"--storage {value!r}: folder {path.parent} does not exist; {expected}")
        return value
    if "://" not in value:
        raise DataError(f"--storage {value!r} is neither a URL nor journal:PATH; {expected}")
    try:
        from sqlalchemy.engine import make_url

        url = make_url(value)
    except Exception as error:  # noqa: BLE001 (SQLAlchemy raises several types for a bad URL)
        raise DataError(f"--storage {_hide_password(value)!r} is not a valid URL ({error}); {expected}") from None
    if url.get_backend_name() not in ("postgresql", "mysql", "sqlite", "mariadb", "oracle", "mssql"):
        raise DataError(f"--storage {_hide_password(value)!r}: database {url.get_backend_name()!r} is not one "
                        f"Optuna's RDB storage supports; {expected}")
    return value


def make_storage(settings: SearchSettings):
    """The Optuna storage of ``settings``: the SQLite file in the output folder (default), an
    RDB URL (PostgreSQL for several machines), or a journal file on a shared filesystem.
    RDB storages record heartbeats, so that the trial of a killed process is failed."""
    import optuna

    if settings.storage is not None and settings.storage.startswith(JOURNAL_PREFIX):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(settings.storage[len(JOURNAL_PREFIX):]).expanduser()
        return JournalStorage(JournalFileBackend(str(path)))
    url = storage_url(settings.storage_path) if settings.storage is None else check_storage(settings.storage)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 120}}
    # processes on several machines may create the tables of a new database at once: the one that
    # loses the race sees "already exists" and retries (a lock file cannot serve across machines)
    for attempt in range(6):
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; they fail trials of killed processes
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=30,
                                                  grace_period=120)
            except ImportError as error:
                raise DataError(f"--storage {settings.storage_name!r} needs a database driver that is not installed "
                                f"({error}); for PostgreSQL: pip install 'psycopg[binary]' (SQLAlchemy >= 2.1) or "
                                "psycopg2-binary, or name the driver: postgresql+psycopg://...") from None
            except Exception as error:  # noqa: BLE001 (SQLAlchemy's and the driver's errors)
                text = str(error)
                if ("already exists" in text or "duplicate key" in text) and attempt < 5:
                    time.sleep(0.5 * (attempt + 1))
                    continue
                if "OperationalError" not in type(error).__name__:
                    raise
                raise DataError(f"--storage {settings.storage_name!r}: cannot connect ({text.splitlines()[0]}); "
                                "expected a running database server that this user may write to") from None
    raise AssertionError("unreachable")


def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError as err:
        raise DataError("geneformer-peft search needs Optuna, which is not installed; "
                        "install the 'search' extra: pip install 'geneformer-peft[search]'") from err


def check_space_fits_method(space: SearchSpace, opts: RunOptions) -> None:
    """Refuse a space that varies a PEFT key none of the run's methods reads (every trial would
    train the same model while the study records a difference)."""
    from transformerslocal.peft.registry import REGISTRY

    config = resolve_config(opts.model_path, config_path=opts.config_path, prompt_type=opts.prompt_type,
                            use_prompt=opts.use_prompt, overrides=opts.config_overrides)
    active = set(config.peft_methods)
    for name in space.names:
        owners = [m for m, method in REGISTRY.items() if name in method.config_keys]
        if owners and not active & set(owners):
            raise DataError(f"{space.source}: {name} is a key of {', '.join(owners)}, which this run does not use "
                            f"(prompt_type {config.prompt_type!r}); every trial would train the same model. "
                            f"Remove {name} from the space or pass --prompt_type {owners[0]}")


def open_study(settings: SearchSettings, *, n_existing: int | None = None, record: dict | None = None):
    """Create or load the study in ``settings``' storage (TPE sampler, median pruner).

    ``record`` (:func:`study_settings`): recorded in a new study, compared with an existing
    one's (:func:`check_study_settings`), under the same lock as the creation.
    """
    _require_optuna()
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    with _creation_lock(settings.storage_path):  # two processes starting on a new database create it once
        study = _open_study(settings, n_existing)
        if record is not None:
            check_study_settings(study, settings, record)
        return study


@contextlib.contextmanager
def _creation_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (start the second process after the first)
        yield
        return
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_study(settings: SearchSettings, n_existing: int | None):
    import optuna

    storage = make_storage(settings)
    # a resumed (or second) process must not replay the first one's random draws: the seed moves on
    # with the trials stored; without --sampler_seed it also differs between processes started together
    seed = settings.sampler_seed if settings.sampler_seed is not None else settings.run.training.seed + _process_salt()
    if n_existing is None:
        try:
            n_existing = len(optuna.load_study(study_name=settings.study_name, storage=storage).trials)
        except KeyError:
            n_existing = 0
    sampler = optuna.samplers.TPESampler(seed=seed + 1000 * n_existing)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                          n_warmup_steps=settings.pruner_warmup_epochs)
              if settings.pruning else optuna.pruners.NopPruner())
    return optuna.create_study(study_name=settings.study_name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


def _process_salt() -> int:
    import os

    return os.getpid() % 997


# ----------------------------------------------------------------------------- provenance
#: the study's user attr holding :func:`study_settings`
SETTINGS_ATTR = "settings"
#: RunOptions fields the search does not use: it writes no fold folder and fits no baseline
#: (a refit's run folder records them in its own provenance)
_NOT_SEARCH_FIELDS = ("save_format", "baselines", "baseline_features")


def study_settings(settings: SearchSettings, folds: list[int], data: _FoldData, device) -> dict[str, Any]:
    """What a trial's value depends on besides its parameters, as recorded in the study.

    The job's options and training settings (:func:`~geneformer_peft.training.provenance.option_settings`:
    every field that changes results, so ``--epoch``, ``--select_epoch_by``,
    ``--early_stopping_patience``, ``--seed``, ... but not ``--num_threads`` or
    ``--output_path``), less those the space varies; the space; the searched folds; the
    resolved device; the resolved base config; the checkpoint's and token dictionary's fingerprints;
    each searched fold's train and val fingerprint. File hashes are cached in
    ``<output_dir>/.cache/file_hashes.json``.
    """
    opts = settings.run
    searched = set(settings.space.names)
    options = prov.option_settings(opts)
    # the device as resolved: "auto" and "cpu" on a machine without a GPU measure the same
    training = {k: v for k, v in options.pop("training").items() if k not in searched and k != "device"}
    for name in _NOT_SEARCH_FIELDS:
        options.pop(name, None)
    options["config_overrides"] = {k: v for k, v in (options.get("config_overrides") or {}).items()
                                   if k not in searched}
    config = resolve_config(opts.model_path, config_path=opts.config_path, prompt_type=opts.prompt_type,
                            use_prompt=opts.use_prompt, overrides=opts.config_overrides).to_dict()
    hashes = prov.FileHashCache(Path(settings.output_dir) / ".cache" / "file_hashes.json")
    vocabulary = vocabulary_source(opts)
    token_dictionary = None
    if vocabulary is not None and vocabulary.is_file():
        token_dictionary = {"path": vocabulary, "size": vocabulary.stat().st_size, "sha256": hashes.sha256(vocabulary)}
    record = {"options": options, "training": training, "folds": [int(f) for f in folds], "device": str(device),
              "space": {d.name: {k: v for k, v in prov.jsonable(d).items() if k != "name"}
                        for d in settings.space.dimensions} | {k: {"constant": v}
                                                               for k, v in settings.space.constants.items()},
              "config": {k: v for k, v in config.items() if k not in searched},
              "checkpoint": prov.checkpoint_fingerprint(opts.model_path, hashes),
              "token_dictionary": token_dictionary,
              "data": {str(fold): data.fingerprint(fold) for fold in folds}}
    hashes.save()
    return json.loads(json.dumps(prov.jsonable(record)))


def check_study_settings(study, settings: SearchSettings, record: Mapping[str, Any], *,
                         action: str = "add trials to it") -> None:
    """Record ``record`` in a study that has none; refuse a study recorded with other settings.

    Raises
    ------
    SettingsChanged
        Naming the study, every differing setting with its recorded and current value, and
        the ways forward (exit code 2).
    """
    recorded = study.user_attrs.get(SETTINGS_ATTR)
    if recorded is None:
        if study.trials:
            logger.warning("study %r in %s has %d trials but no recorded settings (made by an older version): they "
                           "cannot be checked against this command's, which are recorded from now on",
                           settings.study_name, settings.storage_name, len(study.trials))
        study.set_user_attr(SETTINGS_ATTR, dict(record))
        return
    diffs = prov.compare_settings(recorded, record)
    if diffs:
        raise SettingsChanged(
            f"study {settings.study_name!r} in {settings.storage_name} was created with other settings than this "
            f"command's, and its {len(study.trials)} trials were measured with those; refusing to {action}, which "
            f"would mix values that cannot be compared ({len(diffs)} setting{'s' if len(diffs) != 1 else ''} "
            "differ):\n"
            + prov.differing_keys_message(diffs) +
            "\nEither rerun with the recorded settings, or start a new study with another --output_dir (this study "
            "and its outputs stay as they are).")


# ----------------------------------------------------------------------------- objective
class _FoldData:
    """Train and val cells of the searched folds, read once per process; never the test split."""

    def __init__(self, opts: RunOptions, max_length: int | None) -> None:
        self.opts, self.max_length = opts, max_length
        self._datasets: dict[int, tuple[dict, dict]] = {}
        self._cache: dict[int, tuple] = {}

    def datasets(self, fold: int) -> tuple[dict[str, Path], dict[str, Any]]:
        """``(paths, datasets)`` of the fold's train and val splits, label column checked."""
        if fold not in self._datasets:
            opts = self.opts
            paths = fold_paths(opts.data_path, opts.dataset_name, fold)
            paths = {s: paths[s] for s in ("train", "val")}
            missing = [str(path) for path in paths.values() if not path.exists()]
            if missing:
                raise DataError(f"fold {fold} of dataset {opts.dataset_name!r} under {opts.data_path} lacks {missing}; "
                                "the search needs the train and val splits of every --folds fold")
            datasets = {name: load_saved_dataset(path) for name, path in paths.items()}
            columns = [opts.label_column] if isinstance(opts.label_column, str) else opts.label_column
            for name, ds in datasets.items():
                for column in columns:
                    if column not in ds.column_names:
                        raise DataError(f"{paths[name]}: label column {column!r} does not exist; expected one "
                                        f"of {ds.column_names}")
            config = resolve_config(opts.model_path, config_path=opts.config_path, prompt_type=opts.prompt_type,
                                    use_prompt=opts.use_prompt, overrides=opts.config_overrides)
            check_compatibility(opts.model_path, {f"{s} split {paths[s]}": ds for s, ds in datasets.items()},
                                config=config, token_dictionary=opts.token_dictionary,
                                label_column=opts.label_column if isinstance(opts.label_column, str) else None,
                                train_split=f"train split {paths['train']}", max_length=self.max_length,
                                allow_low_gene_overlap=opts.allow_low_gene_overlap or opts.random_init, training=True,
                                data_name=f"fold {fold} of {opts.dataset_name!r} under {opts.data_path}"
                                ).raise_if_refused()
            self._datasets[fold] = (paths, datasets)
        return self._datasets[fold]

    def fingerprint(self, fold: int) -> dict[str, Any]:
        """The provenance fingerprint of the fold's train and val splits."""
        paths, datasets = self.datasets(fold)
        return prov.data_fingerprint(paths, datasets, self.opts.label_column)

    def get(self, fold: int, model_max_length: int, family=None):
        """``(label2id, cells, tasks)`` of the fold's train and val splits (``tasks``: a multi-task
        run's :class:`~geneformer_peft.training.multitask.TaskSet`, else ``None``)."""
        if fold not in self._cache and not isinstance(self.opts.label_column, str):
            from geneformer_peft.training.multitask import TaskSet

            _, datasets = self.datasets(fold)
            tasks = TaskSet.from_datasets(datasets, self.opts.label_column)
            length, values_column = self.max_length or model_max_length, None
            if family is not None:
                length, values_column = family.data_length(length), family.values_column
            cells = {}
            for name, ds in datasets.items():
                cells[name] = EncodedCells.from_dataset(ds, max_length=length, name=f"fold {fold} {name}",
                                                        values_column=values_column)
                cells[name].labels = tasks.encode(ds, name=f"fold {fold} {name}")
            self._cache[fold] = (tasks.label2id, cells, tasks)
        if fold not in self._cache:
            opts = self.opts
            _, datasets = self.datasets(fold)
            labels = set()
            for ds in datasets.values():
                labels |= set(ds.unique(opts.label_column))
            label2id = {str(v): i for i, v in enumerate(sorted(labels))}
            length = self.max_length or model_max_length
            values_column = None
            if family is not None:  # a model reading values (CellFM) takes them, and its cls is no data token
                length, values_column = family.data_length(length), family.values_column
            cells = {name: EncodedCells.from_dataset(ds, label_column=opts.label_column,
                                                     label2id={v: label2id[str(v)] for v in ds.unique(opts.label_column)},
                                                     max_length=length, name=f"fold {fold} {name}",
                                                     values_column=values_column)
                     for name, ds in datasets.items()}
            self._cache[fold] = (label2id, cells, None)
        return self._cache[fold]


def trial_options(opts: RunOptions, params: Mapping[str, Any]) -> RunOptions:
    """The job's options with a trial's parameters applied."""
    training, config = split_parameters(params)
    training = {k: int(v) if TRAINING_PARAMETERS[k][0] == "int" else v for k, v in training.items()}
    config = {k: int(v) if CONFIG_PARAMETERS[k] == "int" else v for k, v in config.items()}
    return replace(opts, training=replace(opts.training, **training),
                   config_overrides={**opts.config_overrides, **config})


def evaluate_setting(opts: RunOptions, folds: list[int], data: _FoldData, device, *,
                     report: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train each fold on train, select on val; return ``{"value": mean best val macro-F1, ...}``
(also ``train_cells`` and ``train_seconds``: the training passes' cells and seconds over the
folds, validation excluded, as the job's ``train_cells_per_second`` counts them).

    ``report(step, value)`` is called after every epoch (step counts epochs over the folds);
    it may raise to stop the trial.
    """
    args = opts.training
    per_fold, epochs_run = [], []
    train_cells, train_seconds = 0, 0.0
    for k, fold in enumerate(folds):
        set_seed(args.seed + fold)
        probe = resolve_config(opts.model_path, config_path=opts.config_path, prompt_type=opts.prompt_type,
                               use_prompt=opts.use_prompt, overrides=opts.config_overrides)
        from geneformer_peft.models.families import family_of_config

        label2id, cells, tasks = data.get(fold, probe.max_position_embeddings, family_of_config(probe))
        overrides = config_overrides(opts)
        if tasks is not None:
            overrides["tasks"] = tasks.config_value()
        config = resolve_config(opts.model_path, config_path=opts.config_path, prompt_type=opts.prompt_type,
                                use_prompt=opts.use_prompt, label2id=label2id, overrides=overrides)
        for split in cells.values():
            check_vocabulary(split, config.vocab_size, opts)
            check_checkpoint_data(split, config, opts.model_path, opts.token_dictionary)
        from transformerslocal import mark_trainable

        if opts.random_init:  # the job's ablation: the checkpoint's architecture with random weights
            from geneformer_peft.models.families import family_of_config

            model = family_of_config(config).classifier_class(config)
        else:
            model = load_classifier(opts.model_path, config)
        mark_trainable(model)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.to(device)
        objective = None
        if tasks is not None:  # multi-task: the job's loss; the trial's score is the mean of the tasks' val macro-F1
            from geneformer_peft.training.multitask import MultiTaskLoss, task_class_weights

            objective = MultiTaskLoss(tasks, weights=opts.task_weights,
                                      class_weights=task_class_weights(tasks, cells["train"].labels,
                                                                       args.class_weighting))
            weights = None
        else:
            weights = (reference_class_weights(cells["train"].labels, config.num_labels, id2label=config.id2label)
                       if args.class_weighting == "reference" else None)
        from geneformer_peft.training.frozen_cache import FrozenPrefixCache

        cache = FrozenPrefixCache.for_model(model) if args.cache_frozen_layers else None
        best = [-1.0]

        def on_epoch(epoch: int, record: dict, k=k, best=best) -> None:
            best[0] = max(best[0], record["val_macro_f1"])
            if report is not None:
                done = per_fold + [best[0]]
                report(k * args.epochs + epoch - 1, float(np.mean(done)))

        trainer = FoldTrainer(model, cells["train"], cells["val"], args, class_weights=weights, device=device,
                              checkpoint_dir=None, encoder_cache=cache, desc=f"fold {fold}", epoch_callback=on_epoch,
                              objective=objective)
        fit = trainer.fit()
        per_fold.append(float(fit.best_val_macro_f1))
        epochs_run.append(fit.epochs_run)
        train_cells += fit.train_cells
        train_seconds += fit.train_seconds
        del trainer, model
    return {"value": float(np.mean(per_fold)), "fold_val_macro_f1": per_fold, "epochs_run": epochs_run,
            "train_cells": train_cells, "train_seconds": train_seconds}


def run_search(settings: SearchSettings) -> Any:
    """Run (or resume) the study; write the outputs; return the ``optuna.Study``.

    ``settings.n_trials`` trials are added to the study (``None``: until ``timeout``). The
    study's recorded settings must equal this run's (:func:`check_study_settings`).

    Raises
    ------
    SettingsChanged
        If the study was created with other settings.
    RunInterrupted
        On Ctrl-C: the running trial is recorded as failed, the outputs are written, and the
        same command resumes the study.
    """
    _require_optuna()
    check_space_fits_method(settings.space, settings.run)
    import optuna
    import torch

    opts = settings.run
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    folds = opts.folds if opts.folds is not None else discover_folds(opts.data_path, opts.dataset_name)
    device = resolve_device(opts.training.device)
    data = _FoldData(opts, opts.training.max_length)
    handler, root_level = attach_log_file(out / "search.log")
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    thread_ceiling = torch.get_num_threads()  # the policy's upper bound for every trial, as at a job's start
    ending = _EndingTrial()
    try:
        record = study_settings(settings, folds, data, device)
        study = open_study(settings, record=record)
        study.set_user_attr("folds", list(folds))
        logger.info("search %r in %s: %d trials so far; adding %s (timeout %s s); folds %s; space %s; pruning %s",
                    settings.study_name, settings.storage_name, len(study.trials), settings.n_trials,
                    settings.timeout, folds, settings.space.names, settings.pruning)

        def objective(trial) -> float:
            params = settings.space.suggest(trial)
            logger.info("trial %d: %s", trial.number, json.dumps(params, default=str))
            t0 = time.perf_counter()

            def report(step: int, value: float) -> None:
                trial.report(value, step)
                if trial.should_prune():
                    raise _Pruned(f"step {step}, value {value:.4f}")

            try:
                threads = _trial_threads(opts.num_threads, thread_ceiling, trial.number)
                trial.set_user_attr("torch_threads", threads)
                result = evaluate_setting(trial_options(opts, params), folds, data, device, report=report)
            except _Pruned as signal:
                trial.set_user_attr("seconds", time.perf_counter() - t0)
                logger.info("trial %d pruned at %s", trial.number, signal)
                raise optuna.TrialPruned(str(signal)) from None
            except KeyboardInterrupt:
                ending.error = RunInterrupted(
                    f"search interrupted during trial {trial.number} (recorded as failed); study "
                    f"{settings.study_name!r} in {settings.storage_name} keeps its finished trials: rerun the same "
                    "command to add trials")
                raise ending.error from None
            except DataError as error:  # reported by the command as one line
                ending.error = error
                raise
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            trial.set_user_attr("fold_val_macro_f1", result["fold_val_macro_f1"])
            trial.set_user_attr("epochs_run", result["epochs_run"])
            if result.get("train_seconds"):  # the training passes' time and speed, as finetune's metrics.json
                trial.set_user_attr("train_seconds", result["train_seconds"])
                trial.set_user_attr("train_cells_per_second", result["train_cells"] / result["train_seconds"])
            logger.info("trial %d: validation macro-F1 %.4f (folds %s) in %.1f s", trial.number, result["value"],
                        [round(v, 4) for v in result["fold_val_macro_f1"]], time.perf_counter() - t0)
            return result["value"]

        stopped: BaseException | None = None
        try:
            with ending.quiet_optuna():
                study.optimize(objective, n_trials=settings.n_trials, timeout=settings.timeout,
                               catch=(TrainingDiverged,), gc_after_trial=True)
        except KeyboardInterrupt as error:  # also between trials, inside Optuna
            stopped = error if isinstance(error, RunInterrupted) else RunInterrupted(
                f"search interrupted between trials; study {settings.study_name!r} in {settings.storage_name} keeps "
                "its finished trials: rerun the same command to add trials")
            raise stopped from None
        except BaseException as error:
            stopped = error
            raise
        finally:
            write_search_outputs(study, settings)
            if stopped is not None:  # search.log's last line
                _log_to_file(handler, stopped)
        return study
    finally:
        torch.set_num_threads(thread_ceiling)
        detach_log_file(handler, root_level)


def _trial_threads(requested: int | None, ceiling: int, number: int) -> int:
    """Set torch's thread count for a trial by the job's policy (:mod:`~geneformer_peft.training.threads`):
    ``--num_threads``, else the cores free now, at most ``ceiling``; measured again for each
    trial, so that a search adapts to processes that start or stop beside it."""
    import torch

    choice = thread_policy.choose_num_threads(requested, current=ceiling)
    torch.set_num_threads(choice.num_threads)
    logger.info("trial %d: torch threads: %d (%s)", number, choice.num_threads, choice.reason)
    return choice.num_threads


class _EndingTrial:
    """The error that ends the search from inside a trial (Ctrl-C, bad data). The command
    reports it as one line, so Optuna's "Trial N failed ... because of the following error"
    warnings with their traceback are dropped once it is set."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        return self.error is None

    @contextlib.contextmanager
    def quiet_optuna(self):
        # a logger's filters apply to its own records only: set on each of Optuna's loggers
        loggers = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
                   if name == "optuna" or name.startswith("optuna.")]
        for item in loggers:
            item.addFilter(self)
        try:
            yield
        finally:
            for item in loggers:
                item.removeFilter(self)


# ----------------------------------------------------------------------------- outputs
def _completed(study) -> list:
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def best_flags(opts: RunOptions, params: Mapping[str, Any]) -> dict[str, Any]:
    """The fine-tuning flags of a setting: the fixed ones plus the trial's training parameters.

    Every training flag that changes what a fold computes is named (switches as ``True``), so
    that with ``best_config.json`` as ``--config`` the job trains what the trial trained.
    """
    t = trial_options(opts, params).training
    flags = {"--epoch": t.epochs, "--batch_size": t.batch_size, "--lr": t.lr, "--weight_decay": t.weight_decay,
             "--warmup_steps": t.warmup_steps, "--lr_schedule": t.lr_schedule, "--lr_end": t.lr_end,
             "--early_stopping_patience": t.early_stopping_patience, "--select_epoch_by": t.select_epoch_by,
             "--sampler": t.sampler, "--class_weighting": t.class_weighting, "--seed": t.seed,
             "--precision": t.precision,
             "--label_column": opts.label_column if isinstance(opts.label_column, str) else ",".join(opts.label_column)}
    if opts.task_weights is not None:
        flags["--task_weights"] = (opts.task_weights if isinstance(opts.task_weights, str)
                                   else ",".join(repr(float(w)) for w in opts.task_weights))
    if opts.pooling is not None:
        flags["--pooling"] = opts.pooling
    if t.layer_decay is not None:
        flags["--layer_decay"] = t.layer_decay
    if t.max_length is not None:
        flags["--max_length"] = t.max_length
    if t.warmup_steps == 0:
        flags["--warmup_ratio"] = t.warmup_ratio
    if t.eval_batch_size is not None:
        flags["--eval_batch_size"] = t.eval_batch_size
    if opts.token_dictionary is not None:
        flags["--token_dictionary"] = str(Path(opts.token_dictionary).resolve())
    for flag, on in (("--gradient_checkpointing", t.gradient_checkpointing),
                     ("--no_frozen_cache", not t.cache_frozen_layers), ("--random_init", opts.random_init)):
        if on:
            flags[flag] = True
    return flags


def best_command(opts: RunOptions, params: Mapping[str, Any], config_path: Path, *, folds: list[int] | None,
                 device: str, num_threads: int | None) -> list[str]:
    """The ``geneformer-peft finetune`` argument list that trains a trial's setting on
    ``folds`` exactly as the trial did: its flags (:func:`best_flags`), ``config_path`` as
    ``--config``, the device and the trial's torch thread count (the order of floating-point
    sums depends on it)."""
    command = ["geneformer-peft", "finetune", "--dataset_name", opts.dataset_name,
               "--data_path", str(Path(opts.data_path).resolve()), "--model_path", str(Path(opts.model_path).resolve()),
               "--config", str(Path(config_path).resolve())]
    for flag, value in best_flags(opts, params).items():
        command += [flag] if value is True else [flag, str(value)]
    command += ["--device", device]
    if folds is not None:
        command += ["--folds", ",".join(str(f) for f in folds)]
    if num_threads is not None:
        command += ["--num_threads", str(num_threads)]
    return command


def collect_outputs(settings: SearchSettings) -> dict[str, Path]:
    """Write this folder's outputs (:func:`write_search_outputs`) from the study as it stands,
    running no trial: on any of several machines sharing a study, after the others finished."""
    study = open_study(settings)
    logger.info("study %r in %s: %d trials", settings.study_name, settings.storage_name, len(study.trials))
    return write_search_outputs(study, settings)


def write_search_outputs(study, settings: SearchSettings) -> dict[str, Path]:
    """trials.csv, best_config.json / best_flags.json / best_command.txt, and the two plots."""
    out = Path(settings.output_dir)
    written = {"trials": out / "trials.csv"}
    frame = study.trials_dataframe(attrs=("number", "value", "state", "datetime_start", "datetime_complete",
                                          "duration", "params", "user_attrs"))
    if "duration" in frame:
        frame["seconds"] = frame["duration"].dt.total_seconds()
    tmp = written["trials"].with_suffix(".csv.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(written["trials"])
    done = _completed(study)
    if not done:
        logger.warning("no trial of study %r has finished yet; best_config.json is not written", settings.study_name)
        return written
    best = study.best_trial
    opts = settings.run
    params = best.params | settings.space.constants
    best_opts = trial_options(opts, params)
    config = resolve_config(opts.model_path, config_path=opts.config_path, prompt_type=opts.prompt_type,
                            use_prompt=opts.use_prompt, overrides=best_opts.config_overrides)
    written["config"] = write_json(out / "best_config.json", config.to_dict())
    folds = study.user_attrs.get("folds")
    written["flags"] = write_json(out / "best_flags.json", {
        "trial": best.number, "validation_macro_f1": best.value, "folds": folds,
        "params": best.params, "flags": best_flags(opts, params)})
    recorded = study.user_attrs.get(SETTINGS_ATTR) or {}
    device = recorded.get("device") or str(resolve_device(opts.training.device))
    command = best_command(opts, params, written["config"], folds=folds, device=device,
                           num_threads=best.user_attrs.get("torch_threads", opts.num_threads))
    written["command"] = out / "best_command.txt"
    tmp = written["command"].with_suffix(".txt.tmp")
    tmp.write_text(f"# trial {best.number}: validation macro-F1 {best.value!r}, the mean over folds {folds} of each "
                   "fold's best_val_macro_f1; this command reproduces it (without --folds it trains every fold)\n"
                   + shlex.join(command) + "\n", encoding="utf-8")
    tmp.replace(written["command"])
    written.update(plot_search(study, out))
    logger.info("best trial %d: validation macro-F1 %.4f with %s -> %s", best.number, best.value,
                json.dumps(best.params, default=str), written["config"])
    return written


def plot_search(study, out: Path) -> dict[str, Path]:
    """optimization_history.png (every trial's value and the best so far) and
    param_importances.png (fANOVA importances of the completed trials)."""
    from geneformer_peft.evaluation.plots import plotting_available

    if not plotting_available():
        return {}
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    import optuna

    written = {}
    trials = [t for t in study.trials if t.value is not None or t.intermediate_values]
    figure = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    done = _completed(study)
    numbers = [t.number for t in done]
    values = [t.value for t in done]
    ax.scatter(numbers, values, s=18, label="completed", color="tab:blue")
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values]
    if pruned:
        ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                   s=18, marker="x", color="tab:gray", label="pruned (last report)")
    if values:
        ax.step(numbers, np.maximum.accumulate(values), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole trials only
    ax.set_ylabel("validation macro-F1")
    ax.set_title(f"optimisation history ({len(study.trials)} trials)")
    ax.legend(loc="lower right", fontsize=8)
    written["history_plot"] = out / "optimization_history.png"
    figure.savefig(written["history_plot"], dpi=110)
    importances = {}
    if len(done) >= 2:
        try:
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (RuntimeError, ValueError) as err:  # e.g. every completed trial has the same parameters
            logger.warning("parameter importances not computed: %s", err)
    figure = Figure(figsize=(6, 0.5 + 0.4 * max(1, len(importances))), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (fANOVA)")
    else:
        ax.text(0.5, 0.5, "not enough completed trials with varied parameters", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(f"parameter importances ({len(done)} completed trials)")
    written["importance_plot"] = out / "param_importances.png"
    figure.savefig(written["importance_plot"], dpi=110)
    write_json(out / "param_importances.json", {k: float(v) for k, v in importances.items()})
    return written


def refit_best(settings: SearchSettings) -> dict[str, Any]:
    """The best setting of the study on all folds with the job (its test metrics, once).

    Returns the job's summary; the run folder is under ``output_dir/refit``.
    """
    study = open_study(settings)
    if not _completed(study):
        raise DataError(f"study {settings.study_name!r} in {settings.storage_name} has no completed trial; "
                        "run the search (--n_trials N) before --refit")
    # the best parameters are refitted with the settings they were measured with
    opts = settings.run
    recorded_folds = (study.user_attrs.get(SETTINGS_ATTR) or {}).get("folds")
    folds = recorded_folds if recorded_folds is not None else (
        opts.folds if opts.folds is not None else discover_folds(opts.data_path, opts.dataset_name))
    record = study_settings(settings, folds, _FoldData(opts, opts.training.max_length),
                            resolve_device(opts.training.device))
    check_study_settings(study, settings, record, action="refit its best trial with this command's settings")
    best = study.best_trial
    opts = trial_options(settings.run, best.params | settings.space.constants)
    opts = replace(opts, folds=None, output_path=Path(settings.output_dir) / "refit",
                   config_overrides=copy.deepcopy(opts.config_overrides))
    logger.info("refit: trial %d's setting %s on all folds (test metrics reported once)", best.number,
                json.dumps(best.params, default=str))
    summary = run_cross_validation(opts)
    write_json(Path(settings.output_dir) / "refit_summary.json", {
        "trial": best.number, "params": best.params, "validation_macro_f1": best.value,
        "run_dir": summary["run_dir"], "fold_ids": summary.get("fold_ids"),
        "test": {name: {"mean": summary["metrics"][name]["mean"], "std": summary["metrics"][name]["std"]}
                 for name in ("accuracy", "macro_f1", "micro_f1") if name in summary["metrics"]}})
    return summary
