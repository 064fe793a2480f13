"""Run ``embed`` then ``perturb`` (the library calls the commands make) in one process, or in
each rank under ``torchrun``; used by test_distributed_analyses.py.

    python torchrun_analyses.py CHECKPOINT CELLS OUT_DIR
"""
import sys
from pathlib import Path

from geneformer_peft.analysis.runs import run_embed, run_perturb
from geneformer_peft.training import distributed

OPTIONS = {"embed": dict(batch_size=4, device="cpu", plots=False),
           "perturb": dict(genes=["ENSGTEST0000016", "ENSGTEST0000020"], perturb_type="delete", n_null=3,
                           chunk_cells=3, batch_size=5, device="cpu", plots=False)}


def main(checkpoint: str, cells: str, out: str) -> None:
    run_embed(checkpoint, cells, Path(out) / "emb.parquet", **OPTIONS["embed"])
    run_perturb(checkpoint, cells, Path(out) / "scan", **OPTIONS["perturb"])
    if distributed.is_distributed():
        print(f"rank {distributed.rank()} of {distributed.world_size()} done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
