"""Geneformer-PEFT: parameter-efficient fine-tuning of Geneformer for cell classification."""
from setuptools import find_packages, setup

setup(
    name="geneformer-peft",
    version="0.1.0",
    description="Parameter-efficient fine-tuning (LoRA, prompts, adapters) of Geneformer for cell classification",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["transformerslocal", "transformerslocal.*", "geneformer_peft", "geneformer_peft.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "loralib>=0.1.2",
        "datasets>=2.14",
        "scikit-learn>=1.2",
        "scipy>=1.9",
        "numpy>=1.23",
        "pandas>=1.5",
        "tokenizers>=0.13",
        "safetensors>=0.3",
        "tqdm>=4.60",
        "anndata>=0.9",
    ],
    extras_require={
        "test": ["pytest>=7", "transformers>=4.30", "peft>=0.6", "hypothesis>=6", "anndata>=0.9", "matplotlib>=3.5",
                 "optuna>=3.0", "performer-pytorch==1.1.4", "umap-learn>=0.5", "torchao>=0.18", "psycopg>=3.1", "psycopg-binary>=3.1",
                 "nbclient>=0.7", "nbformat>=5", "ipykernel>=6"],  # the tutorial notebook runs in the tests
        "search": ["optuna>=3.0", "matplotlib>=3.5"],
        "postgres": ["optuna>=3.0", "psycopg>=3.1", "psycopg-binary>=3.1"],
        "plot": ["matplotlib>=3.5"],
        "quant": ["torchao>=0.18"],  # finetune --quantize (nf4 / int8 frozen base); pure PyTorch, CPU or CUDA
        "loom": ["loompy>=3.0"],
        "umap": ["umap-learn>=0.5"],
        "notebook": ["ipywidgets>=7", "matplotlib>=3.5", "umap-learn>=0.5"],  # tqdm.auto's widget bars in Jupyter
        "bench": ["transformers>=4.30", "peft>=0.6", "psutil>=5", "performer-pytorch==1.1.4", "optuna>=3.0"],
    },
    entry_points={"console_scripts": ["geneformer-peft=geneformer_peft.cli:main"]},
)
