"""Shared fixtures: tiny random checkpoints of every family (built once per session) and engines on them."""
from __future__ import annotations

import os

# Triton (when installed) runs in interpreter mode in the test process: it must be set before anything
# imports triton (torch and transformers may). CPU tensors still take the torch references unless a
# kernel test also sets ELASTIC_TRITON_ON_CPU=1.
os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
from pathlib import Path

import pytest
from checkpoints import family_names, make_checkpoint

FAMILIES = family_names()


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory):
    """checkpoint_dir(family, **overrides) -> Path, cached per (family, overrides) for the session."""
    cache: dict[tuple, Path] = {}

    def build(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            name = family + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
            cache[key] = make_checkpoint(family, tmp_path_factory.mktemp(name), **overrides)
        return cache[key]

    return build


def random_prompts(lengths: tuple[int, ...] = (3, 9, 17, 30, 46), seed: int = 0, vocab: int = 1000) -> list[list[int]]:
    """Token-id prompts of different lengths (ids above the special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(n)] for n in lengths]
