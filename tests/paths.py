"""Where the repository and the shared test data are, for tests at any depth."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root (tools/, examples/ and benchmarks/ are run from here)."""
SHARED_DATA = REPO.parent / "shared" / "data"
"""The LLaMA-2 tokenizer and tinyshakespeare, beside the repository when present."""
