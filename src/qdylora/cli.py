"""The `qdylora` command: dispatch to the subcommands (`commands.py`), settings files for
`train`, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import tyro

from .commands import COMMANDS, Train
from .console import shown_on_console
from .core.config import QDyLoRAConfig
from .errors import QDyLoRAError
from .training.settings import DataSettings, RunSettings, TrainSettings
from .training.trainer import TrainingInterrupted


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
    # trust_remote_code only from the command line: a settings file may come from someone else
    return Train(model=s.model, data=s.data, adapter=s.adapter, train=s.train, device=s.device,
                 trust_remote_code=False)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `qdylora` console script."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # until the command is parsed (reading a --config may fail first)
    try:
        if argv and argv[0] == "train":
            command = tyro.cli(Train, prog="qdylora train", args=argv[1:], default=_train_defaults(argv[1:]))
        else:
            command = tyro.extras.subcommand_cli_from_dict(COMMANDS, prog="qdylora", args=argv)
        debug = command.debug
        with shown_on_console():
            command.run()
    except TrainingInterrupted as e:  # Ctrl-C, SIGTERM, SIGHUP: a checkpoint was written
        print(f"qdylora: {e}", file=sys.stderr)
        return 128 + e.signum  # 130 for Ctrl-C, 143 for SIGTERM: what a shell reports for them
    except QDyLoRAError as e:
        if debug:
            raise
        print(f"qdylora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qdylora: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # unwritable or missing paths, full disks: one line, not a traceback
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"qdylora: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
