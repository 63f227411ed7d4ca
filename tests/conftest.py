import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny GPT-2 trained on a handful of facts, with its Adafactor state, corpus and queries."""
    import tiny

    return tiny.trained_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def queries(world):
    """The tiny world's queries, read once per module."""
    from tracestar.corpus import read_queries

    return read_queries(world["queries"])
