"""Installs the `engine` and `kernels` packages.

torch is a lower bound only: GPU users keep whatever CUDA build they already have.
"""

from setuptools import find_packages, setup

setup(
    name="engine",
    version="0.1.0",
    description="A Megatron-style 3D-parallel training engine for LLaMA-family models",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.3", "numpy>=1.24"],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "transformers>=4.40",
            "sentencepiece>=0.1.99",
            "safetensors>=0.4",
            "ruff>=0.5",
            "triton>=3.0; platform_system == 'Linux'",
        ],
        "triton": ["triton>=3.0"],
    },
)
