"""The `qdylora` command: dispatch to the subcommands (`commands.py`), settings files for
`train`, and one-line errors with exit status 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from dataclasses import fields
from typing import Optional

from .console import shown_on_console
from .errors import QDyLoRAError, TrainingInterrupted

MAX_CONFIG_BYTES = 2**20

# Everything else (torch, transformers, bitsandbytes, the commands) is imported inside `main`,
# under the console it sets up: bitsandbytes logs at import time.


def _groups() -> dict:
    from .core.config import QDyLoRAConfig
    from .data.settings import DataSettings
    from .training.settings import TrainSettings

    return {"adapter": QDyLoRAConfig, "data": DataSettings, "train": TrainSettings}


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

    if os.path.exists(path) and not os.path.isfile(path):  # /dev/zero is endless, a FIFO blocks
        raise QDyLoRAError(f"config file {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise QDyLoRAError(f"cannot read config file {path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise QDyLoRAError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB: a settings file "
                           "is a few lines of flag names and values")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QDyLoRAError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise QDyLoRAError(f"config file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                           f"{str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise QDyLoRAError(f"config file {path} must hold a mapping of settings")
    from .training.settings import RunSettings

    groups = _groups()
    values = values.get("settings", values)  # a run's config.json
    if not isinstance(values, dict):
        raise QDyLoRAError(f"config file {path}: 'settings' must hold a mapping of settings, "
                           f"got {type(values).__name__}")
    top = {f.name for f in fields(RunSettings)} - set(groups)
    nested: dict = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name in groups and isinstance(value, dict):
            nested.setdefault(name, {}).update(value)
        elif name in top:
            nested[name] = value
        else:  # a flat setting ("data" is a group and the data file's setting too)
            group = next((g for g, cls in groups.items() if name in {f.name for f in fields(cls)}), None)
            if group is None and name in groups:
                raise QDyLoRAError(f"config file {path}: {key!r} must hold a mapping of its settings "
                                   f"({key}: {{{next(f.name for f in fields(groups[name]))}: ...}}), "
                                   f"got {type(value).__name__}")
            if group is None:
                raise QDyLoRAError(f"config file {path}: unknown setting {key!r}")
            nested.setdefault(group, {})[name] = value
    return nested


def _train_defaults(argv: list[str]):
    """Defaults of `qdylora train` (a `commands.Train`): a resumed run's saved settings, then a
    --config file."""
    from .commands import Train
    from .training.settings import RunSettings

    groups = _groups()
    values: dict = {}
    resume, config = _flag_value(argv, "--resume"), _flag_value(argv, "--config")
    if resume:
        from .training.rundir import RunDir

        run_config = RunDir(resume).config
        if not run_config.is_file():
            raise QDyLoRAError(f"cannot resume: {resume} is not a qdylora run directory (no config.json)")
        values = _read_settings_file(str(run_config))
        values["device"] = _usable(values.get("device"))
    if config:
        for key, value in _read_settings_file(config).items():
            if key in groups:
                values.setdefault(key, {}).update(value)
            else:
                values[key] = value
    s = RunSettings.from_dict(values, where=config or resume or "settings")
    # trust_remote_code only from the command line: a settings file may come from someone else
    return Train(model=s.model, data=s.data, adapter=s.adapter, train=s.train, device=s.device,
                 trust_remote_code=False)


def _usable(saved: Optional[str]) -> Optional[str]:
    """A resumed run's saved device, or None (the default device) where this machine lacks it:
    a run started on a GPU goes on on a CPU."""
    import torch

    from .core.devices import resolve_device

    if saved is None or not isinstance(saved, str):
        return saved  # the settings check names a wrong type
    return saved if resolve_device(saved, preference=True) == torch.device(saved) else None


@contextlib.contextmanager
def _progress_bars(shown: bool):
    """With --quiet, transformers' progress bars (loading weights) are off too, while the command
    runs."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on and not shown:
            hf_logging.enable_progress_bar()


def _command(argv: list[str]):
    """The parsed command of `argv` (one of `commands.COMMANDS`)."""
    import tyro

    from .commands import COMMANDS, Train

    if argv and argv[0] == "train":
        defaults = _train_defaults(argv[1:])
        return _parse(lambda: tyro.cli(Train, prog="qdylora train", args=argv[1:], default=defaults), "qdylora train")
    prog = f"qdylora {argv[0]}" if argv and argv[0] in COMMANDS else "qdylora"
    return _parse(lambda: tyro.extras.subcommand_cli_from_dict(COMMANDS, prog="qdylora", args=argv), prog)


def _parse(parse, prog: str):
    """Run tyro's parser; its usage errors (a box of several lines) become one QDyLoRAError line,
    its help text is printed as it is."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            return parse()
    except SystemExit as e:
        if e.code in (0, None):  # --help
            sys.stdout.write(captured.getvalue())
            raise
        raise QDyLoRAError(f"{usage_error(captured.getvalue())} (see {prog} --help)") from None


def usage_error(box: str) -> str:
    """The message inside tyro's error box ("Invalid choice / ---- / message lines / ----"),
    as one line."""
    lines = [line.strip() for line in box.splitlines()]
    rules = [i for i, line in enumerate(lines) if line and set(line) <= set("-─━")]
    body = lines[rules[0] + 1:rules[1]] if len(rules) >= 2 else lines
    body = [line.strip("│╭╮╰╯ ") for line in body]
    text = " ".join(line for line in body if line and not line.startswith("For full helptext")) or "bad usage"
    return re.sub(r"^Error parsing \w+: ", "", text)  # a flag's own check (`fields.Checked`) names the flag itself


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the `qdylora` console script."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # until the command is parsed (reading a --config may fail first)
    try:
        with shown_on_console():
            command = _command(argv)
            debug = command.debug
            with _progress_bars(not getattr(command, "quiet", False)):
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
