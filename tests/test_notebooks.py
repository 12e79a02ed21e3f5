"""The notebooks execute top to bottom (nbclient, CPU) and their outputs are what they should be."""

import os
import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent


def execute(name: str):
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    env_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["PYTHONPATH"] = env_path  # the kernel imports autoglm_jax from this checkout
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.get("name") == "stdout")


def test_quickstart():
    cells = execute("quickstart.ipynb")
    assert "LlamaForCausalLM" in text_of(cells[0])
    generated, reply, choices, stream = (text_of(c) for c in cells[1:5])
    assert generated.strip() not in ("", "''") and reply.strip() not in ("", "''")
    assert len(choices.strip().splitlines()) == 2  # n=2 choices, each with logprobs
    updates = int(stream.split()[0])
    assert updates >= 2 and "final:" in stream and not stream.rstrip().endswith("''")


def test_benchmarking():
    cells = execute("benchmarking.ipynb")
    rates = text_of(cells[1]).strip().splitlines()
    assert len(rates) == 3 and all("tok/s" in line for line in rates)
    plot = cells[2]
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in plot.outputs)
    assert "lines plotted: 2" in text_of(plot)
    report = text_of(cells[3])
    assert "prefill T=32 B=4" in report and "roofline on NVIDIA H100 SXM" in report
    assert "fused_qkv+fused_gate_up+folded_norm_scales" in report
