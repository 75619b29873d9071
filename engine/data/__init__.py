"""Data pipeline: indexed datasets, tokenizers, GPT / blended / SFT datasets, samplers.

Import the submodules directly (``from engine.data.indexed_dataset import IndexedDataset``);
this package imports nothing on its own so that ``import engine`` stays cheap.
"""
