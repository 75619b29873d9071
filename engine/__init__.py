"""A Megatron-style 3D-parallel (tensor, pipeline, data) training engine for LLaMA models.

Importing this package has no side effects: it starts no process group and prints nothing.
"""

__version__ = "0.1.0"
