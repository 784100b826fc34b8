import pytest
import torch

from x2v.export.make_checkpoint import make_checkpoint
from x2v.runtime.config import load_model_config


@pytest.fixture(scope="session")
def tiny_cfg():
    return load_model_config("tiny")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_cfg):
    """A complete tiny checkpoint in the official layout, written once per test session."""
    return make_checkpoint(tiny_cfg, tmp_path_factory.mktemp("ckpt"), seed=0, dit_dtype=torch.float32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
