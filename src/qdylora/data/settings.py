"""Where the training data comes from and how it becomes tokens: `DataSettings`, the `qdylora
train` data flags (generated from these fields and their docstrings) and a run's config.json
"data" group. It lives with the data, which reads it; training and evaluation pass it on."""

from __future__ import annotations

import string
from dataclasses import dataclass, replace
from typing import Annotated, Literal, Optional

from ..core.fields import AT_LEAST_ONE, FRACTION, NOT_NEGATIVE, check_fields, shown
from ..errors import QDyLoRAError


@dataclass
class DataSettings:
    """Where the training data comes from and how it becomes tokens."""

    data: Optional[str] = None
    """Training data: a .json/.jsonl/.csv/.parquet file, a directory of them, a Hugging Face dataset name (online), or asdiv:train (default: the embedded ASDiv with its validation split and a chat prompt)."""

    format: Literal["auto", "alpaca", "input-output", "chat", "text", "template"] = "auto"
    """Row format: alpaca (instruction/input/output), input-output, chat (messages), text (loss on all tokens), template (see --prompt-template); auto detects it from the fields."""

    prompt_template: Optional[str] = None
    """Prompt made from a row's fields, e.g. "{passage} {question}" (implies --format template)."""

    response_template: Optional[str] = None
    """Response made from a row's fields, e.g. "{answer}" (with --prompt-template)."""

    chat_template: bool = False
    """Render prompt/response rows as a user turn and an assistant turn with the tokenizer's chat template (for instruct models)."""

    split: str = "train"
    """Split to read from a hub dataset or a dataset directory."""

    val_data: Optional[str] = None
    """Separate validation data (same format); default: hold out --val-fraction of the training rows."""

    val_fraction: Annotated[float, FRACTION] = 0.05
    """Fraction of the training rows held out for validation (a seeded permutation) when --val-data is not given."""

    val_max_examples: Annotated[int, NOT_NEGATIVE] = 200
    """At most this many validation rows: the cap on the held-out rows (the rest stay in training), or the first rows of --val-data; 0 = no cap."""

    max_source_length: Annotated[int, AT_LEAST_ONE] = 512
    """Prompt tokens kept (longer prompts are cut and counted); chat and text rows are cut at the sum of both lengths."""

    max_target_length: Annotated[int, AT_LEAST_ONE] = 256
    """Response tokens kept, EOS included (longer responses are cut and counted)."""

    train_on_prompt: bool = False
    """Put the loss on prompt tokens too (default: response / assistant tokens only)."""

    def __post_init__(self) -> None:
        check_fields(self)  # types, choices, finiteness and bounds (core/fields.py)
        if self.prompt_template is not None and self.format == "auto":
            self.format = "template"
        for template in (self.prompt_template, self.response_template):
            if template is not None:
                template_fields(template)  # plain {fields} only
        if self.format == "template" and not (self.prompt_template and self.response_template):
            raise QDyLoRAError(
                "format 'template' needs --prompt-template and --response-template, "
                "e.g. --prompt-template '{question}' --response-template '{answer}'"
            )

    def with_embedded_default(self) -> "DataSettings":
        """Without --data: the embedded ASDiv train split, validated on its validation split, as
        "{passage} {question}" -> "{answer}" rendered with the chat template."""
        if self.data is not None:
            return self
        return replace(
            self, data="asdiv:train", val_data=self.val_data or "asdiv:validation", format="template",
            prompt_template=self.prompt_template or "{passage} {question}",
            response_template=self.response_template or "{answer}", chat_template=True,
        )


def template_fields(template: str) -> list[str]:
    """The field names a template such as "{passage} {question}" uses. Plain fields only: a
    format spec ({n:>2000000000} pads every row before it is cut), a conversion ({n!r}) or an
    index ({n[0]}) is refused."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise QDyLoRAError(f"bad template {shown(template)}: {e}; write {{{{ and }}}} for literal braces") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name or spec or conversion or any(c in name for c in ".[]"):
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise QDyLoRAError(f"template {shown(template)}: {shown(field)} is not a plain field: use fields "
                               "such as {question} (no format specs, conversions or indexing)")
    return [name for _, name, _, _ in parts if name]
