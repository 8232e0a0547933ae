"""GPU tests: run by `make gpu-test` on a CUDA machine; skipped (with this reason) elsewhere."""
import pytest
import torch

REASON = "needs a CUDA GPU: run `make gpu-test` on the GPU machine (CI has none)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if "/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=REASON))
