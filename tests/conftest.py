"""Shared fixtures: the repo's params, one World (the MiniLM featuriser loads once), the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
MODEL_CACHE = Path(os.environ.get("IPPO_MODEL_CACHE", REPO / "models"))
# Real data no one on the team wrote lies in shared/ beside the checkout (CI lays it there too).
SHARED_DIR = Path(os.environ.get("IPPO_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def dealornodeal_file() -> Path:
    """The real Deal-or-No-Deal validation dialogues; mandatory in CI, skipped elsewhere when absent."""
    path = SHARED_DIR / "data" / "dealornodeal" / "val.txt"
    if not path.is_file():
        message = f"{path} not found (set IPPO_SHARED_DIR to the folder holding data/dealornodeal/)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def params():
    from pipeline_steps.common.config import load_params

    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def world(params):
    from pipeline_steps.world.simulator import World

    return World(params.world)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """SmolLM2 architecture with random weights and the real tokenizer (built once, cached)."""
    from pipeline_steps.common.base_model import resolve_base_model

    return Path(resolve_base_model("tiny-random", MODEL_CACHE))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from pipeline_steps.common.base_model import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture()
def tiny_params_file(tmp_path, tiny_model_dir) -> Path:
    """A params.yaml for fast runs: the tiny model, few conversations, short generations."""
    import yaml

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["base_model"]["name_or_path"] = str(tiny_model_dir)
    data["collect"].update(conversations=8, batch_size=4, max_new_tokens=8)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
