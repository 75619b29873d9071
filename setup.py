"""Installs the `engine` and `kernels` packages.

torch is a lower bound only: GPU users keep whatever CUDA build they already have.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

# The data pipeline's index builders (csrc/helpers.cpp); pybind11 comes from pyproject.toml's
# [build-system] requires, so a plain `pip install -e .` builds it.
ext_modules = [
    Pybind11Extension(
        "engine.data.helpers",
        ["csrc/helpers.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    name="engine",
    version="0.1.0",
    description="A Megatron-style 3D-parallel training engine for LLaMA-family models",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    # torch 2.5: scaled_dot_product_attention(enable_gqa=...).
    # safetensors: the checkpoint format; pyyaml: --config files.
    # xxhash: checkpoint checksums at memory speed (without it, saves fall back to CRC-32).
    install_requires=[
        "torch>=2.5",
        "numpy>=1.24",
        "pyyaml>=6",
        "safetensors>=0.4",
        "xxhash>=3",
        "jinja2>=3.1.6",  # chat templates (sandboxed); 3.1.6 closes a sandbox escape
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "transformers>=4.40",
            "peft>=0.13",  # tests/peft: the engine's LoRA against PEFT's on transformers models
            "sentencepiece>=0.1.99",
            "tensorboard>=2.14",  # torch.utils.tensorboard writes --tensorboard-dir with it
            "safetensors>=0.4",
            "ruff>=0.5",
            "import-linter>=2.1",  # `lint-imports`: the package layering ([tool.importlinter])
            "mypy>=1.11",  # types of engine/ and kernels/ ([tool.mypy])
            "triton>=3.0; platform_system == 'Linux'",
            # Data-pipeline tests only: Megatron-Core reads/writes the reference .bin/.idx
            # files; zstandard reads .zst input; tiktoken backs --tokenizer-type TikTokenizer.
            "megatron-core~=0.16.1",  # the version the reference tests were written against
            "zstandard>=0.22",
            "tiktoken>=0.7",
            # Parquet / Arrow input and output of tools/preprocess_data.py and clean_data.py.
            "pyarrow>=14",
            # benchmarks/dedup.py's reference (its test runs it small): datatrove's MinHash.
            "datatrove>=0.4",
            # Evaluation (tests/evaluation): lm-evaluation-harness as the reference and host of
            # the engine's adapter, sacrebleu for BLEU/chrF, wandb offline runs, plot PNGs.
            "lm_eval>=0.4.5",
            "sacrebleu>=2.3",
            "wandb>=0.17",
            "matplotlib>=3.7",
        ],
        # lm_eval --model engine, tools/evaluate.py --task generation --metric bleu,chrf.
        "eval": ["lm_eval>=0.4.5", "sacrebleu>=2.3"],
        # --wandb-project: the trainer's scalars to Weights & Biases (offline works).
        "wandb": ["wandb>=0.17"],
        # benchmarks/dedup.py against datatrove; Parquet in the data tools.
        "benchmark": ["datatrove>=0.4", "pyarrow>=14"],
        "triton": ["triton>=3.0"],
        # `make quickstart`: a SentencePiece tokenizer, TensorBoard logs, checkpoints, the plot.
        "quickstart": [
            "sentencepiece>=0.1.99",
            "tensorboard>=2.14",
            "safetensors>=0.4",
            "matplotlib>=3.7",  # tools/plot_run.py: the quickstart's PNG of its run
        ],
    },
)
