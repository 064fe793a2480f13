"""Training stage: settings, the fine-tuning loop of a fold, optimiser and schedule, the
K-fold cross-validation runner, masked-gene pretraining, the frozen-prefix cache and
data-parallel helpers.

Names are loaded on first use (``from geneformer_peft.training import X`` imports only the
module holding ``X``).
"""
from geneformer_peft._lazy import lazy_face

#: public name -> module of this package that defines it
_WHERE = {
    "CLASS_WEIGHTINGS": "arguments",
    "LR_SCHEDULES": "arguments",
    "PRECISIONS": "arguments",
    "SAMPLERS": "arguments",
    "TrainingArguments": "arguments",
    "RunOptions": "cross_validation",
    "library_versions": "cross_validation",
    "run_cross_validation": "cross_validation",
    "run_directory": "cross_validation",
    "train_fold": "cross_validation",
    "barrier": "distributed",
    "init_distributed": "distributed",
    "is_distributed": "distributed",
    "is_main_process": "distributed",
    "launched_by_torchrun": "distributed",
    "local_device": "distributed",
    "rank": "distributed",
    "world_size": "distributed",
    "FrozenPrefixCache": "frozen_cache",
    "frozen_prefix_depth": "frozen_cache",
    "PretrainResult": "pretrain",
    "frequency_baseline_loss": "pretrain",
    "pretrain": "pretrain",
    "FoldCheck": "preflight",
    "check_folds": "preflight",
    "PROVENANCE_FILE": "provenance",
    "SettingsChanged": "provenance",
    "compare_settings": "provenance",
    "read_provenance": "provenance",
    "RunLocked": "run_lock",
    "run_lock": "run_lock",
    "make_optimizer": "schedules",
    "parameter_groups": "schedules",
    "load_search_space": "search",
    "refit_best": "search",
    "run_search": "search",
    "GeneClassOptions": "gene_classification",
    "run_gene_classification": "gene_classification",
    "split_genes": "gene_classification",
    "make_scheduler": "schedules",
    "BestModel": "trainer",
    "FitResult": "trainer",
    "FoldTrainer": "trainer",
    "make_sampler": "trainer",
    "set_seed": "trainer",
    "ThreadChoice": "threads",
    "apply_num_threads": "threads",
    "choose_num_threads": "threads",
}

__getattr__, __dir__, __all__ = lazy_face(__name__, _WHERE)
