"""Shared test configuration.

Tests marked ``gpu`` need CUDA. The default run (``make test``, CI) deselects them with ``-m``; a plain
``pytest`` on a machine without CUDA skips them with the reason instead of failing deep inside torch.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)
