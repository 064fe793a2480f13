"""``Classifier`` (cell classification) with Geneformer's arguments, over
:func:`geneformer_peft.split`, :func:`geneformer_peft.finetune` and :func:`geneformer_peft.predict`,
plus this project's PEFT options."""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geneformer_peft.compat._options import filters_from, note_unused, refuse, refuse_unless

__all__ = ["Classifier", "TRAINING_ARGS"]

_OWNER = "Classifier"

#: Hugging Face ``TrainingArguments`` name -> the option of :func:`geneformer_peft.finetune` it sets
TRAINING_ARGS = {
    "num_train_epochs": "epochs",
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "weight_decay": "weight_decay",
    "warmup_steps": "warmup_steps",
    "warmup_ratio": "warmup_ratio",
    "lr_scheduler_type": "lr_schedule",
    "seed": "seed",
}
#: training_args keys that describe what the job does anyway: name -> the values that agree
_TRAINING_ARGS_FIXED = {
    "evaluation_strategy": ("epoch",), "eval_strategy": ("epoch",), "save_strategy": ("epoch", "no"),
    "load_best_model_at_end": (True,), "group_by_length": (True, False), "length_column_name": ("length",),
    "do_train": (True,), "do_eval": (True,),
}
#: training_args keys about where and how often a Trainer logs: accepted, without effect (logged)
_TRAINING_ARGS_UNUSED = ("output_dir", "logging_dir", "logging_steps", "disable_tqdm", "report_to",
                         "save_total_limit", "overwrite_output_dir")


def training_options(training_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options of :func:`geneformer_peft.finetune` from Hugging Face ``TrainingArguments`` names."""
    options: dict[str, Any] = {}
    for key, value in dict(training_args or {}).items():
        if key in TRAINING_ARGS:
            if key == "num_train_epochs":
                if float(value) != int(value):
                    refuse(_OWNER, f"training_args['{key}']", value, "whole epochs only")
                value = int(value)
            options[TRAINING_ARGS[key]] = value
        elif key in ("bf16", "fp16"):
            if value:
                options["precision"] = key
        elif key in _TRAINING_ARGS_FIXED:
            refuse_unless(_OWNER, {f"training_args['{key}']": value},
                          {f"training_args['{key}']": (_TRAINING_ARGS_FIXED[key], "the job evaluates and keeps the "
                                                       "best epoch on the validation split each epoch")})
        elif key in _TRAINING_ARGS_UNUSED:
            note_unused(_OWNER, f"training_args['{key}']", value, "the run folder is output_directory")
        else:
            refuse(_OWNER, f"training_args['{key}']", value,
                   f"the training_args keys that map are {sorted(TRAINING_ARGS) + ['bf16', 'fp16']}; other options "
                   "of geneformer_peft.finetune can be passed to Classifier(...) by name")
    return options


class Classifier:
    """Cell classification under Geneformer's ``Classifier`` argument names, with PEFT.

    Parameters
    ----------
    classifier
        ``"cell"`` only (gene classification: ``geneformer-peft classify-genes``).
    cell_state_dict
        ``{"state_key": obs column of the labels, "states": "all" or [labels to keep]}``.
    filter_data
        ``{column: [values]}``: keep only these cells.
    training_args
        Hugging Face ``TrainingArguments`` names (a dict): ``num_train_epochs``,
        ``learning_rate``, ``per_device_train_batch_size``, ``per_device_eval_batch_size``,
        ``weight_decay``, ``warmup_steps``, ``warmup_ratio``, ``lr_scheduler_type``, ``seed``,
        ``bf16``/``fp16`` map (:data:`TRAINING_ARGS`); others are refused by name.
    num_crossval_splits, split_sizes
        1: one train/valid/test split in ``split_sizes`` proportions (the test share must be
        1/k for a whole k, as fold 0 of a k-fold split); k > 1: k-fold cross-validation (each test
        share 1/k), validation cells ``valid / (train + valid)`` of the rest.
    forward_batch_size
        Cells per evaluation batch.
    token_dictionary_file
        The data's token dictionary, written into each fold folder.
    nproc, ngpu
        Accepted; without effect here (logged when given).
    quantize, gene_class_dict, rare_threshold, max_ncells, max_ncells_per_class, ray_config, \
freeze_layers, stratify_splits_col, no_eval
        Refused unless at Geneformer's defaults, naming the argument.
    prompt_type, config, **finetune_options
        This project's options (not Geneformer's): the PEFT method(s) (``"lora"``,
        ``"Gene_token_prompt,lora"``, ``""`` for full fine-tuning; default: the config's), a
        ``config.json`` of PEFT keys, and any option of :func:`geneformer_peft.finetune`.
    """

    def __init__(self, classifier: str = "cell", quantize: bool = False, cell_state_dict: Mapping | None = None,
                 gene_class_dict: Mapping | None = None, filter_data: Mapping | None = None, rare_threshold: float = 0,
                 max_ncells: int | None = None, max_ncells_per_class: int | None = None,
                 training_args: Mapping | None = None, ray_config: Any = None, freeze_layers: int = 0,
                 num_crossval_splits: int = 1, split_sizes: Mapping[str, float] | None = None,
                 stratify_splits_col: str | None = None, no_eval: bool = False, forward_batch_size: int = 100,
                 token_dictionary_file: Any = None, nproc: int = 4, ngpu: int = 1, *, prompt_type: Any = None,
                 config: Any = None, **finetune_options: Any) -> None:
        given = dict(classifier=classifier, quantize=quantize, gene_class_dict=gene_class_dict,
                     rare_threshold=rare_threshold, max_ncells=max_ncells, max_ncells_per_class=max_ncells_per_class,
                     ray_config=ray_config, freeze_layers=freeze_layers, stratify_splits_col=stratify_splits_col,
                     no_eval=no_eval)
        refuse_unless(_OWNER, given, {
            "classifier": (("cell",), "gene classification is `geneformer-peft classify-genes`"),
            "quantize": ((False,), "models are not quantized here"),
            "gene_class_dict": ((None,), "gene classification is `geneformer-peft classify-genes`"),
            "rare_threshold": ((0, 0.0), "rare classes are kept and reported by name; filter them with filter_data"),
            "max_ncells": ((None,), "every selected cell is used; select fewer with filter_data"),
            "max_ncells_per_class": ((None,), "classes are balanced by sampling during training instead"),
            "ray_config": ((None,), "hyperparameter search is `geneformer-peft search` (Optuna)"),
            "freeze_layers": ((0,), "freezing layers is the config.json key freeze_layers of full fine-tuning "
                                    "(pass config= a config.json with it and prompt_type='')"),
            "stratify_splits_col": ((None,), "splits are stratified by the label column (state_key)"),
            "no_eval": ((False,), "every fold keeps a validation split, which picks the epoch kept"),
        })
        if not isinstance(cell_state_dict, Mapping) or "state_key" not in cell_state_dict:
            refuse(_OWNER, "cell_state_dict", cell_state_dict,
                   "expected {'state_key': <label column>, 'states': 'all' or [labels]}")
        states = cell_state_dict.get("states", "all")
        if states != "all" and (isinstance(states, str) or not list(states)):
            refuse(_OWNER, "cell_state_dict", cell_state_dict, "'states' must be 'all' or a list of labels")
        if int(num_crossval_splits) < 1:
            refuse(_OWNER, "num_crossval_splits", num_crossval_splits, "expected 1 or more")
        sizes = dict(split_sizes or {"train": 0.8, "valid": 0.1, "test": 0.1})
        if set(sizes) != {"train", "valid", "test"} or abs(sum(sizes.values()) - 1) > 1e-6:
            refuse(_OWNER, "split_sizes", split_sizes, "expected {'train': a, 'valid': b, 'test': c} summing to 1")
        self.n_folds = int(num_crossval_splits) if num_crossval_splits > 1 else round(1 / sizes["test"])
        if num_crossval_splits == 1 and abs(self.n_folds * sizes["test"] - 1) > 1e-6:
            refuse(_OWNER, "split_sizes", split_sizes, "with num_crossval_splits=1 the test share must be 1/k "
                   "(the test split is fold 0 of a k-fold split), e.g. 0.1, 0.2 or 0.25")
        self.folds = None if num_crossval_splits > 1 else [0]
        self.val_fraction = sizes["valid"] / (sizes["train"] + sizes["valid"])
        for name, value in (("nproc", nproc), ("ngpu", ngpu)):
            if value != {"nproc": 4, "ngpu": 1}[name]:
                note_unused(_OWNER, name, value, "the device comes from device= (default: auto)")
        self.state_key = str(cell_state_dict["state_key"])
        self.states = states
        self.filters = filters_from(_OWNER, filter_data)
        self.options: dict[str, Any] = {"eval_batch_size": int(forward_batch_size), **training_options(training_args),
                                        **finetune_options}
        if token_dictionary_file is not None:
            self.options["token_dictionary"] = Path(token_dictionary_file)
        self.prompt_type = prompt_type
        self.config = config
        self.result = None

    def prepare_data(self, input_data_file: str | Path, output_directory: str | Path, output_prefix: str,
                     split_id_dict: Any = None, test_size: Any = None, attr_to_split: Any = None,
                     attr_to_balance: Any = None, max_trials: int = 100, pval_threshold: float = 0.1):
        """Select the cells (``filter_data``, the ``states``) and save
        ``<output_prefix>_labeled.dataset`` and ``<output_prefix>_id_class_dict.pkl`` ({id: label}).

        Returns
        -------
        datasets.Dataset
            The selected cells (the label stays in the ``state_key`` column).
        """
        from geneformer_peft.analysis.runs import select_rows
        from geneformer_peft.api.preparation import as_dataset
        from geneformer_peft.data.dataset_io import save_dataset_atomically

        refuse_unless(_OWNER, dict(split_id_dict=split_id_dict, test_size=test_size, attr_to_split=attr_to_split,
                                   attr_to_balance=attr_to_balance), {
            name: ((None,), "splits are stratified k-fold splits of the label; see num_crossval_splits")
            for name in ("split_id_dict", "test_size", "attr_to_split", "attr_to_balance")})
        del max_trials, pval_threshold  # used by Geneformer only with attr_to_balance, refused above
        dataset = as_dataset(input_data_file, what="input_data_file")
        if self.state_key not in dataset.column_names:
            refuse(_OWNER, "cell_state_dict", {"state_key": self.state_key},
                   f"{input_data_file} has no column {self.state_key!r}; it has "
                   f"{[c for c in dataset.column_names if c != 'input_ids']}")
        filters = list(self.filters)
        if self.states != "all":
            filters.append(f"{self.state_key}={','.join(str(s) for s in self.states)}")
        rows = select_rows(dataset, filters=filters, source=str(input_data_file))
        dataset = dataset.select(rows) if len(rows) < len(dataset) else dataset
        output_directory = Path(output_directory)
        save_dataset_atomically(dataset, output_directory / f"{output_prefix}_labeled.dataset")
        classes = sorted({str(v) for v in dataset[self.state_key]})
        with open(output_directory / f"{output_prefix}_id_class_dict.pkl", "wb") as handle:
            pickle.dump(dict(enumerate(classes)), handle)
        return dataset

    def validate(self, model_directory: str | Path, prepared_input_data_file: str | Path,
                 id_class_dict_file: str | Path, output_directory: str | Path, output_prefix: str,
                 split_id_dict: Any = None, attr_to_split: Any = None, attr_to_balance: Any = None,
                 gene_balance: bool = False, max_trials: int = 100, pval_threshold: float = 0.1,
                 save_eval_output: bool = True, predict_eval: bool = True, predict_trainer: bool = False,
                 n_hyperopt_trials: int = 0, save_gene_split_datasets: bool = True,
                 debug_gene_split_datasets: bool = False) -> dict[str, Any]:
        """Split the prepared cells into folds and fine-tune each (:func:`geneformer_peft.finetune`).

        Folds go to ``<output_directory>/<output_prefix>_folds/``, the run to
        ``<output_directory>/<method>/<output_prefix>/`` (every fold writes predictions, metrics
        and model, so ``save_eval_output`` and ``predict_eval`` are always on).

        Returns
        -------
        dict
            ``macro_f1`` and ``acc`` (one value per fold), ``conf_matrix`` (a DataFrame summed over
            the folds, true x predicted) and ``result`` (the :class:`~geneformer_peft.FinetuneResult`).
        """
        import pandas as pd

        from geneformer_peft.api import finetune, split
        from geneformer_peft.data.safe_pickle import load_plain_pickle

        refuse_unless(_OWNER, dict(split_id_dict=split_id_dict, attr_to_split=attr_to_split,
                                   attr_to_balance=attr_to_balance, gene_balance=gene_balance,
                                   predict_trainer=predict_trainer, n_hyperopt_trials=n_hyperopt_trials,
                                   save_eval_output=save_eval_output, predict_eval=predict_eval), {
            "split_id_dict": ((None,), "splits are stratified k-fold splits; see num_crossval_splits"),
            "attr_to_split": ((None,), "splits are stratified k-fold splits; see num_crossval_splits"),
            "attr_to_balance": ((None,), "splits are stratified by the label"),
            "gene_balance": ((False,), "gene classification is `geneformer-peft classify-genes`"),
            "predict_trainer": ((False,), "there is no Hugging Face Trainer here; each fold writes predictions.csv"),
            "n_hyperopt_trials": ((0,), "hyperparameter search is `geneformer-peft search`"),
            "save_eval_output": ((True,), "every fold writes its outputs"),
            "predict_eval": ((True,), "every fold predicts its test split"),
        })
        del max_trials, pval_threshold, save_gene_split_datasets, debug_gene_split_datasets  # gene classifier only
        classes = load_plain_pickle(id_class_dict_file) if Path(id_class_dict_file).suffix == ".pkl" else None
        output_directory = Path(output_directory)
        folds_dir = split(prepared_input_data_file, dataset_name=output_prefix,
                          output_dir=output_directory / f"{output_prefix}_folds", n_folds=self.n_folds,
                          label_column=self.state_key, seed=int(self.options.get("seed", 0)),
                          val_fraction=self.val_fraction, overwrite=bool(self.options.get("overwrite", False)))
        result = finetune(folds_dir, model=model_directory, method=self.prompt_type, folds=self.folds,
                          output=output_directory, config=self.config, label_column=self.state_key, **self.options)
        if classes is not None:
            labels = result.fold(result.fold_ids[0]).metrics.get("labels") or []
            if sorted(map(str, classes.values())) != sorted(map(str, labels)):
                refuse(_OWNER, "id_class_dict_file", str(id_class_dict_file),
                       f"its classes {sorted(map(str, classes.values()))} are not the data's {sorted(labels)}")
        self.result = result
        matrices = []
        for fold in result.fold_ids:
            m = result.fold(fold).metrics
            matrices.append(pd.DataFrame(m["confusion_matrix"], index=m["labels"], columns=m["labels"]))
        return {"macro_f1": list(result.summary["macro_f1"]), "acc": list(result.summary["accuracy"]),
                "conf_matrix": sum(matrices[1:], matrices[0]), "result": result}

    def evaluate_saved_model(self, model_directory: str | Path, id_class_dict_file: str | Path,
                             test_data_file: str | Path, output_directory: str | Path, output_prefix: str,
                             predict: bool = True) -> dict[str, Any]:
        """Predict ``test_data_file`` with a fine-tuned fold (:func:`geneformer_peft.predict`).

        Returns
        -------
        dict
            ``macro_f1``, ``acc``, ``conf_matrix`` (a DataFrame) and ``predictions`` (a DataFrame;
            with ``predict`` also written to ``<output_directory>/<output_prefix>_pred.csv``).
        """
        import pandas as pd

        from geneformer_peft.api import predict as gp_predict

        del id_class_dict_file  # the fold's config.json carries its labels
        output = Path(output_directory) / f"{output_prefix}_pred.csv" if predict else None
        frame = gp_predict(test_data_file, model=model_directory, label_column=self.state_key, output=output,
                           batch_size=int(self.options.get("eval_batch_size") or 64))
        metrics = frame.attrs["metrics"]
        if metrics is None:
            refuse(_OWNER, "test_data_file", str(test_data_file), f"it has no label column {self.state_key!r}")
        labels = metrics.get("labels") or sorted(set(frame["gt_celltype"].astype(str)))
        matrix = pd.DataFrame(metrics["confusion_matrix"], index=labels, columns=labels) \
            if "confusion_matrix" in metrics else pd.crosstab(frame["gt_celltype"], frame["pred_celltype"])
        return {"macro_f1": metrics["macro_f1"], "acc": metrics["accuracy"], "conf_matrix": matrix,
                "predictions": frame}
