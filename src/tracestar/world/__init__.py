"""The built-in fact world (real GeoNames facts, exact ground truth) and a tiny GPT-2 trainer for it.

`make_world` writes a corpus, queries and a fact table; `train_model` trains a small causal LM on
the corpus with Adafactor and saves it, with its optimizer state, as a local HF directory.
"""

from tracestar.world.facts import RELATIONS, WorldPaths, make_world

__all__ = ["RELATIONS", "WorldPaths", "make_world", "train_model", "first_token_accuracy"]


def __getattr__(name: str):
    """Import the trainer lazily: generating a world should not pay for importing torch."""
    if name in ("train_model", "first_token_accuracy"):
        from tracestar.world import train

        return getattr(train, name)
    raise AttributeError(name)
