"""One rank for llama.cpp, Ollama and LM Studio: a GGUF LoRA adapter, or the rank merged into a GGUF model.

The adapter follows llama.cpp's own converter and loader (convert_lora_to_gguf.py and
src/llama-adapter.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors):

    general.type = "adapter", adapter.type = "lora", adapter.lora.alpha
    "<base tensor>.lora_a"  torch (b, in)  -> ggml ne [in, b]
    "<base tensor>.lora_b"  torch (out, b) -> ggml ne [b, out]      (base tensor: ne [in, out])

llama.cpp scales each pair by alpha / b_l (b_l: that pair's own rank, lora_b's ne[0]), or by 1 when
alpha is 0 (`llama_adapter_lora_weight::get_scale`). We write alpha = 0 and fold our scale
s(b_l) into lora_b: one file means exactly our rank b, per-layer ranks included, whatever the
scaling rule. Names are the base GGUF's (gguf's `TensorNameMap`); for the llama architecture
(Llama, Mistral, SmolLM2) llama.cpp's converter permutes the rows of q and k for its rope
(`LlamaModel.permute`), so lora_b's rows (and the merged q, k) are permuted alike.

The merged model copies every metadata key of the base GGUF (tokenizer, chat template, rope,
context length) and writes each tensor of the base, in the base's order, from our merged weights
(the dequantized NF4 base + s(b) B[:, :b] A[:b], as `merge` computes them) in the asked type;
tensors we do not hold (llama3's rope_freqs) are copied as they are.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch

from ..core.allocation import Allocation, layer_rank
from ..core.gguf_base import gguf_architecture, gguf_name, rope_permute
from ..core.model import QDyLoRAModel
from ..errors import QDyLoRAError
from ..files import atomic_write
from ..training.sampling import check_ranks

if TYPE_CHECKING:
    import gguf

ADAPTER_TYPES = ("float32", "float16", "bfloat16")
MODEL_TYPES = ("float32", "float16", "bfloat16", "q8_0")


def _gguf_type(shape: tuple[int, ...], kind: str) -> "gguf.GGMLQuantizationType":
    """The GGUF type of a tensor of (torch-order) `shape` written as `kind`: vectors (norms, biases)
    stay float32 as llama.cpp's converter keeps them; q8_0 needs rows of 32 (else float16, as there)."""
    from gguf import GGMLQuantizationType as Q

    if kind == "float32" or len(shape) == 1:
        return Q.F32
    if kind == "q8_0" and shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.BF16 if kind == "bfloat16" else Q.F16


def _encoded(array: np.ndarray, kind: str) -> tuple[np.ndarray, "Optional[gguf.GGMLQuantizationType]"]:
    """A float32 array in its GGUF type (`_gguf_type`): float arrays as numpy arrays, quantized
    ones (bf16 included, which numpy lacks) as bytes with their type."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    qtype = _gguf_type(array.shape, kind)
    if qtype in (Q.F32, Q.F16):
        return array.astype(np.float32 if qtype == Q.F32 else np.float16), None
    return quants.quantize(array.astype(np.float32), qtype), qtype


def _byte_layout(shape: tuple[int, ...], kind: str) -> tuple[tuple[int, ...], np.dtype, int,
                                                              "Optional[gguf.GGMLQuantizationType]"]:
    """(shape, numpy dtype, bytes, raw type) that `_encoded` gives a tensor of `shape`, without
    encoding it: the header is written before the data, one tensor at a time."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    qtype = _gguf_type(shape, kind)
    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize, None
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype


def _file_type(kind: str) -> "gguf.LlamaFileType":
    from gguf import LlamaFileType as F

    return {"float32": F.ALL_F32, "float16": F.MOSTLY_F16, "bfloat16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[kind]


@dataclass(frozen=True)
class BaseGGUF:
    """The base model's GGUF file: its architecture and tensor shapes, read with gguf's reader."""

    path: Path

    def reader(self) -> "gguf.GGUFReader":
        import gguf

        try:
            return gguf.GGUFReader(self.path)
        except Exception as e:  # a cut or foreign file: struct.error, ValueError
            raise QDyLoRAError(f"cannot read the base GGUF {self.path}: {e}") from None

    def check(self, arch: "gguf.MODEL_ARCH", shapes: dict[str, tuple[int, int]]) -> None:
        """Refuse a base of another architecture, or without a tensor of these (out, in) shapes."""
        reader = self.check_architecture(arch)
        held = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ne: (in, out)
        for name, (out_features, in_features) in shapes.items():
            if held.get(name) != (in_features, out_features):
                raise QDyLoRAError(f"the base GGUF {self.path} has no tensor {name} of {in_features} x {out_features} "
                                   f"(it has {held.get(name, 'none')}): pass the run's own base with --base-gguf")

    def check_architecture(self, arch: "gguf.MODEL_ARCH") -> "gguf.GGUFReader":
        """Its reader; refuses a base of another architecture."""
        import gguf

        reader = self.reader()
        kind = reader.fields.get(gguf.Keys.General.TYPE)
        if kind is not None and kind.contents() == gguf.GGUFType.ADAPTER:
            raise QDyLoRAError(f"the base GGUF {self.path} is a LoRA adapter, not a model: pass the run's own "
                               "base model's .gguf with --base-gguf")
        field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
        base_arch = field.contents() if field is not None else "?"
        if base_arch != gguf.MODEL_ARCH_NAMES[arch]:
            raise QDyLoRAError(f"the base GGUF {self.path} is a {base_arch} model, the run's base a "
                               f"{gguf.MODEL_ARCH_NAMES[arch]} one: pass the run's own base with --base-gguf")
        return reader


def adapter_tensors(model: QDyLoRAModel, rank: Union[int, Allocation]) -> dict[str, torch.Tensor]:
    """llama.cpp's LoRA tensors of `rank`: "<gguf name>.weight.lora_a" (b, in) and ".lora_b"
    (out, b) = s(b) B[:, :b], rows permuted where llama.cpp permutes the base's; float32, CPU."""
    import gguf

    hf = model.model
    arch = gguf_architecture(hf)
    names = gguf.get_tensor_name_map(arch, hf.config.num_hidden_layers)
    tensors = {}
    for path, layer in model.adapter_layers().items():
        b = layer_rank(rank, path)
        if b == 0:
            continue
        name = gguf_name(names, path)
        if name is None:
            raise QDyLoRAError(f"llama.cpp has no tensor for the adapted layer {path}: export with --format peft")
        A, B, s = layer.factors(b)  # (b, in), (out, b)
        A, B = A.float().cpu(), rope_permute(B.float().cpu() * s, path, hf.config)
        tensors[f"{name}.weight.lora_a"] = A.contiguous()
        tensors[f"{name}.weight.lora_b"] = B.contiguous()
    return tensors


def export_gguf_adapter(model: QDyLoRAModel, rank: Union[int, Allocation], out: Union[str, Path], *,
                        dtype: str = "float16", base_gguf: Optional[Union[str, Path]] = None,
                        overwrite: bool = False) -> Path:
    """Write the llama.cpp LoRA adapter of `rank` (an int, or per-layer ranks) to the file `out`,
    atomically; with `base_gguf`, its names and shapes are checked against that base first."""
    import gguf

    if dtype not in ADAPTER_TYPES:
        raise QDyLoRAError(f"a GGUF adapter is written in {', '.join(ADAPTER_TYPES)}, not {dtype}")
    c = model.qdylora_config
    check_ranks([rank] if isinstance(rank, int) else [b for _, b in rank.ranks if b > 0], c.max_rank)
    _check_output(Path(out), overwrite, Path(base_gguf) if base_gguf is not None else None)
    arch = gguf_architecture(model.model)
    tensors = adapter_tensors(model, rank)
    if base_gguf is not None:  # each pair's base tensor: name.weight of (out, in) = (lora_b rows, lora_a columns)
        BaseGGUF(Path(base_gguf)).check(arch, {n.removesuffix(".lora_a"): (tensors[n[:-1] + "b"].shape[0], t.shape[1])
                                               for n, t in tensors.items() if n.endswith(".lora_a")})
    out = _output_file(out, overwrite)
    with atomic_write(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # scale 1: s(b) is in lora_b
        writer.add_string(gguf.Keys.General.NAME, f"qdylora rank {rank if isinstance(rank, int) else 'per layer'}")
        for name, tensor in tensors.items():
            array, raw = _encoded(tensor.numpy(), dtype)
            writer.add_tensor(name, array, raw_dtype=raw)
        _write(writer)
    return out


def _write(writer: "gguf.GGUFWriter") -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _output_file(out: Union[str, Path], overwrite: bool) -> Path:
    """`out` checked as a GGUF file to write (`_check_output`), its folder made."""
    out = Path(out)
    _check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _check_output(out: Path, overwrite: bool, base: Optional[Path] = None) -> None:
    """A GGUF output is one .gguf file: an existing one is replaced only with `overwrite`, a
    directory never, the run's `base` GGUF not even then."""
    if base is not None and out.exists() and out.resolve() == base.resolve():
        raise QDyLoRAError(f"--out {out} is the run's base GGUF: writing there would replace it; choose another --out")
    if out.suffix != ".gguf":
        raise QDyLoRAError(f"--out {out} should end in .gguf: a GGUF export writes one file (llama.cpp and Ollama "
                           "read .gguf files)")
    if out.is_dir():
        raise QDyLoRAError(f"{out} is a directory: a GGUF export writes one file; choose another --out")
    if out.exists() and not overwrite:
        raise QDyLoRAError(f"{out} already exists: use --overwrite or another --out")


def merge_gguf(model: QDyLoRAModel, rank: Union[int, Allocation], out: Union[str, Path], base_gguf: Union[str, Path],
               *, dtype: str = "float16", overwrite: bool = False) -> Path:
    """Write the base merged with the adapter at `rank` as one GGUF model file `out`: the base
    GGUF's metadata (tokenizer, chat template...) and tensor list, our merged weights in `dtype`.
    `model` is consumed (`merge.merge_layers`, in float32 for a float32 file, else in 16 bits);
    tensors are encoded and written one at a time, so memory stays near the merged model's size."""
    import gguf

    from .merge import merge_layers

    if dtype not in MODEL_TYPES:
        raise QDyLoRAError(f"a GGUF model is written in {', '.join(MODEL_TYPES)}, not {dtype}")
    c = model.qdylora_config
    check_ranks([rank] if isinstance(rank, int) else [b for _, b in rank.ranks], c.max_rank,
                lowest=1 if isinstance(rank, int) else 0)
    base = BaseGGUF(Path(base_gguf))
    _check_output(Path(out), overwrite, base.path)
    hf = model.model
    arch = gguf_architecture(hf)
    reader = base.check_architecture(arch)
    tensors = _merged_tensors(hf, reader, arch, base.path)  # checked against the base before anything is merged
    merge_layers(model, rank, {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype, torch.float16))
    state = hf.state_dict()

    def ours(hf_name: str) -> np.ndarray:  # (out, in) float32 in llama.cpp's row order
        return rope_permute(state[hf_name].detach().float().cpu(), hf_name, hf.config).numpy()

    out = _output_file(out, overwrite)
    with atomic_write(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _copy_metadata(reader, writer)
        writer.add_file_type(_file_type(dtype))
        for t, hf_name in tensors:
            if hf_name is None:  # e.g. rope_freqs: the base's own bytes
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
            else:
                writer.add_tensor_info(t.name, *_byte_layout(tuple(int(n) for n in reversed(t.shape)), dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, hf_name in tensors:
            writer.write_tensor_data(t.data if hf_name is None else _encoded(ours(hf_name), dtype)[0])
        writer.close()
    return out


def _merged_tensors(hf: torch.nn.Module, reader: "gguf.GGUFReader", arch,
                    where: Path) -> list[tuple["gguf.ReaderTensor", Optional[str]]]:
    """Each tensor of the base GGUF, in its order, with the transformers tensor that fills it (None:
    copied from the base); refuses a base whose shapes differ from the run's."""
    import gguf

    names = gguf.get_tensor_name_map(arch, hf.config.num_hidden_layers)
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}  # gguf name -> (name once merged, torch shape)

    def note(hf_name: str, shape: tuple[int, ...]) -> None:
        name = gguf_name(names, hf_name)
        if name is not None and name not in shapes:
            shapes[name] = (hf_name, shape)

    # linears (adapted, NF4 or plain): their weights are packed or split now, their shapes the layers'
    layers = {path: m for path, m in hf.named_modules()
              if path and not path.endswith(".base") and hasattr(m, "in_features") and hasattr(m, "out_features")}
    for path, m in layers.items():
        note(path + ".weight", (m.out_features, m.in_features))
        if getattr(getattr(m, "base", m), "bias", None) is not None:  # an adapted layer's is its base's
            note(path + ".bias", (m.out_features,))
    inside = tuple(path + "." for path in layers)
    for hf_name, tensor in hf.state_dict().items():  # embeddings, norms
        if not hf_name.startswith(inside):
            note(hf_name, tuple(tensor.shape))
    adapted = {gguf_name(names, path + ".weight") for path, m in layers.items() if hasattr(m, "base")}
    missing = sorted(adapted - {t.name for t in reader.tensors} - {None})
    if missing:  # the merge would be dropped there without a word (an adapter GGUF, fewer layers)
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise QDyLoRAError(f"the base GGUF {where} lacks the run's adapted weights {shown}: it is another "
                           "model (fewer layers?); pass the run's own base with --base-gguf")
    out = []
    for t in reader.tensors:
        if t.name not in shapes:
            out.append((t, None))
            continue
        hf_name, shape = shapes[t.name]
        if tuple(int(n) for n in t.shape) != tuple(reversed(shape)):
            raise QDyLoRAError(f"the base GGUF's {t.name} is {tuple(int(n) for n in t.shape)} (ggml order), the "
                               f"run's base {shape}: pass the run's own base with --base-gguf")
        out.append((t, hf_name))
    return out


def _copy_metadata(reader: "gguf.GGUFReader", writer: "gguf.GGUFWriter") -> None:
    """Every key of the base (tokenizer, chat template, hyperparameters) but those the writer sets
    itself (GGUF.*, the architecture) and the file type (set for the new tensors), as gguf's own
    gguf_new_metadata script copies them."""
    import gguf

    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in (gguf.Keys.General.ARCHITECTURE,
                                                            gguf.Keys.General.FILE_TYPE):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def ollama_lines(base_gguf: Optional[Path], adapter: Optional[Path] = None, model: Optional[Path] = None) -> list[str]:
    """What to run the export with: an Ollama Modelfile and a llama-cli command line."""
    if model is not None:
        return ["Ollama Modelfile:", f"  FROM {model.resolve()}",
                f"llama.cpp: llama-cli -m {shlex.quote(str(model))} -cnv"]
    base = str(base_gguf.resolve()) if base_gguf is not None else "/path/to/the/base.gguf"
    return ["Ollama Modelfile (ollama create NAME -f Modelfile):", f"  FROM {base}", f"  ADAPTER {adapter.resolve()}",
            f"llama.cpp: llama-cli -m {shlex.quote(base)} --lora {shlex.quote(str(adapter))} -cnv"]


def base_gguf_of(model: Optional[str], given: Optional[str] = None) -> Optional[Path]:
    """The GGUF file a run's base came from: `given` (--base-gguf), the run's model when it is a
    GGUF file, or the file a cached conversion was made from (`embedded.gguf_source`: the
    embedded SmolLM2, the study models); None when there is none."""
    from ..core.loading import resolve_source
    from ..data.embedded import gguf_source, smollm2_gguf

    if given is not None:
        path = Path(given).expanduser()
        if not path.exists():
            raise QDyLoRAError(f"--base-gguf {given} does not exist: give the path of the base model's .gguf file")
        if not path.is_file() or path.suffix != ".gguf":
            raise QDyLoRAError(f"--base-gguf {given} is not a .gguf file")
        return path
    if model is None:
        return Path(smollm2_gguf())
    source = resolve_source(model)
    if not source.is_local:
        return None
    if source.gguf_file is not None:
        return Path(source.path) / source.gguf_file
    return gguf_source(Path(source.path))


def export_run_gguf(run_dir: Union[str, Path], ranks: list[int], out: Union[str, Path], *, one: bool = False,
                    overwrite: bool = False, device: Optional[str] = None, trust_remote_code: bool = False,
                    allocation=None, dtype: str = "float16", base_gguf: Optional[str] = None,
                    progress: bool = False) -> tuple[list[Path], Optional[Path]]:
    """GGUF adapters of a training run: the file `out` for `one` rank or an allocation, else
    out/rank-<b>.gguf for each; checked against the base's GGUF when it is known. Returns the
    files and that base GGUF (None: unknown)."""
    from .opening import export_targets, open_run

    targets = export_targets(out, ranks, one, allocation, ".gguf")

    def check_outputs(settings) -> Optional[Path]:
        base = base_gguf_of(settings.model, base_gguf)
        for target in targets:
            _check_output(target, overwrite, base)  # never the base GGUF, even with --overwrite
        return base

    run = open_run(run_dir, ranks, allocation, check_outputs, device=device, trust_remote_code=trust_remote_code,
                   progress=progress)
    base = run.checked
    for r, target in zip(run.entries, targets):
        export_gguf_adapter(run.model, r, target, dtype=dtype, base_gguf=base, overwrite=overwrite)
    return targets, base


def merge_run_gguf(run_dir: Union[str, Path], rank: Optional[int], out: Union[str, Path], *, dtype: str = "float16",
                   overwrite: bool = False, device: Optional[str] = None, trust_remote_code: bool = False,
                   allocation=None, base_gguf: Optional[str] = None, progress: bool = False) -> tuple[Path, Path]:
    """`merge_gguf` of a training run at `rank` (or under `allocation`) into the file `out`;
    returns it and the base GGUF its metadata came from."""
    from .opening import open_run

    if dtype not in MODEL_TYPES:
        raise QDyLoRAError(f"a GGUF model is written in {', '.join(MODEL_TYPES)}, not {dtype}")

    def check_outputs(settings) -> Path:
        base = base_gguf_of(settings.model, base_gguf)
        if base is None:
            raise QDyLoRAError(f"a merged GGUF takes its tokenizer and metadata from the base's GGUF file, and the "
                               f"run's base {settings.model} came from none: pass --base-gguf FILE (the same model "
                               "as GGUF), or merge to a directory and convert it with llama.cpp's "
                               "convert_hf_to_gguf.py")
        _check_output(Path(out), overwrite, base)
        return base

    run = open_run(run_dir, [] if allocation else [rank], allocation, check_outputs, device=device,
                   trust_remote_code=trust_remote_code, progress=progress)
    return merge_gguf(run.model, run.entries[0], out, run.checked, dtype=dtype, overwrite=overwrite), run.checked
