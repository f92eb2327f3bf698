"""Start-up hook of the fake CUDA host (tests/conftest.py puts this folder first on PYTHONPATH under
EAGLE_FAKE_CUDA_HOST=1): a Python process started by a test, the CLI or a benchmark, also sees CUDA reported
present and the Triton interpreter off, as on the GPU machine."""

import os

if os.environ.get("EAGLE_FAKE_CUDA_HOST") == "1":
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    torch.cuda.is_available = lambda: True
