"""`autoglm serve --config FILE` (e.g. autotune's best_config.json): the file's engine settings apply and
flags given explicitly override them. Runs the flag parsing in a subprocess (absl flags are global)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = """
import json, sys
from absl import flags
from autoglm_jax.cli import serve
flags.FLAGS(sys.argv)
print(json.dumps(serve.engine_settings()))
"""


def _settings(*args):
    out = subprocess.run([sys.executable, "-c", PROBE, "serve", *args], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_config_file_then_explicit_flags(tmp_path):
    path = tmp_path / "best_config.json"
    path.write_text(json.dumps({"max_batch_size": 64, "prefill_ratio": 0.6, "decode_steps_per_call": 16}))
    settings = _settings(f"--config={path}", "--max_batch_size=8")
    assert settings["max_batch_size"] == 8            # explicit flag wins
    assert settings["prefill_ratio"] == 0.6           # from the file
    assert settings["decode_steps_per_call"] == 16
    assert "max_num_batched_tokens" not in settings   # neither in the file nor given: EngineConfig's default


def test_without_config_every_flag_applies():
    settings = _settings("--max_batch_size=4")
    assert settings["max_batch_size"] == 4 and settings["prefill_ratio"] == 0.8


def test_compilation_cache_flag_reaches_the_engine(tmp_path):
    assert _settings("--compilation_cache_dir=")["compilation_cache_dir"] is None
    assert _settings(f"--compilation_cache_dir={tmp_path}")["compilation_cache_dir"] == str(tmp_path)
    path = tmp_path / "best_config.json"
    path.write_text(json.dumps({"compilation_cache_dir": ""}))
    assert _settings(f"--config={path}")["compilation_cache_dir"] is None


def test_kv_cache_dtype_flag_reaches_the_engine():
    assert _settings()["kv_cache_dtype"] == "auto"
    assert _settings("--kv_cache_dtype=fp8")["kv_cache_dtype"] == "fp8"
    assert _settings("--kv_cache_dtype=fp8_e4m3")["kv_cache_dtype"] == "fp8_e4m3"
