"""The Python API, for notebooks: one function per command, over AnnData and datasets.

``import geneformer_peft as gp`` gives these names at the top level::

    cells = gp.tokenize(adata, token_dictionary=..., gene_median_dictionary=..., label_column="cell_type")
    folds = gp.split(cells, dataset_name="mine", output_dir="data")
    result = gp.finetune(folds, model="Pretrain_ckpts/geneformer-tiny-example", method="lora")
    gp.predict(adata, model=result.fold(0).folder)     # adata.obs["geneformer_pred"]
    gp.embed(adata, model=...)                         # adata.obsm["X_geneformer"]

Each function calls the library code its command calls, with the command's defaults and
checks; progress shows as ``tqdm.auto`` bars and a concise INFO log (:mod:`._session`).
"""
from geneformer_peft._lazy import lazy_face

#: public name -> module of this package that defines it
_WHERE = {
    "tokenize": "preparation",
    "split": "preparation",
    "finetune": "training",
    "open_run": "training",
    "FinetuneResult": "training",
    "FoldResult": "training",
    "predict": "analysis",
    "embed": "analysis",
    "perturb": "analysis",
    "check": "analysis",
    "umap": "analysis",
}

__getattr__, __dir__, __all__ = lazy_face(__name__, _WHERE)
