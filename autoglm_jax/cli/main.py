"""The ``autoglm`` console script: ``autoglm <command> [--flags]``.

Owns: choosing the subcommand and handing the rest of argv to that command's absl app. Each
command is a module ``autoglm_jax.cli.<command>`` with its own flags and ``main(argv)``, so only
the chosen command's flags are defined (and ``python -m autoglm_jax.cli.<command>`` works too).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": "generate text with a model (default: the embedded SmolLM2-135M-Instruct)",
    "convert": "convert a Hugging Face directory or GGUF file to an Orbax checkpoint",
    "serve": "OpenAI-compatible HTTP server",
    "analyze": "operator analysis of the compiled prefill/decode steps (ops, fusions, FLOPs, roofline)",
    "autotune": "search engine settings for the best serving throughput under a latency bound",
}


def usage() -> str:
    lines = ["usage: autoglm <command> [--flags]   (autoglm <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        print(f"autoglm: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(f"autoglm_jax.cli.{command}")
    from absl import app

    app.run(module.main, argv=[f"autoglm {command}"] + argv[2:])


if __name__ == "__main__":
    run()
