"""llama.cpp itself checks the GGUF export (llama-cpp-python, `pip install 'qdylora[gguf]'`).

On a run whose base came from a GGUF (the embedded SmolLM2-135M-Instruct Q4_1: the README's
first command writes demo-run/), with the run's own ASDiv test prompts:

1. base: llama.cpp on the base GGUF (Q4_1) against our NF4 base, next-token logits at every
   position of each prompt (relative error of the centred logits, and top-1 agreement); and
   llama.cpp on our NF4 base written as a float32 GGUF against it: the floor of the check;
2. adapter: at each rank b, the logit change adapter-on minus adapter-off in llama.cpp (our
   GGUF adapter) against ours (rank b minus the base): on the NF4-base GGUF within a tolerance
   derived from its floor (`delta_check`), and on the Q4_1 base GGUF as users run it (reported: the
   change runs through a base that differs from the trained one by step 1's error);
   a control writes lora_b without llama.cpp's q/k row permutation, to show the check can fail;
3. merged: our merged model (float32) and llama.cpp on the merged GGUF answer the prompts
   greedily (16 new tokens): the share of identical answers, given our prompt tokens and with
   llama.cpp rendering the user turn through the chat template the merged file carries.

    .venv/bin/python experiments/gguf_check.py demo-run --ranks 1 8 64 --prompts 8 --answers 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))


def run_model(run: str, compute_dtype: str = "float32"):
    """The run's model (NF4 base + adapter) computing in `compute_dtype`, its tokenizer and settings."""
    from qdylora.core.loading import load_tokenizer, resolve_source
    from qdylora.core.model import prepare
    from qdylora.training.adapter_file import load_adapter
    from qdylora.training.rundir import load_run_settings

    settings, adapter = load_run_settings(run)
    model = prepare(settings.model, replace(settings.adapter, compute_dtype=compute_dtype), device="cpu")
    load_adapter(model, adapter, check_base=False)  # the run's base, only its frozen non-NF4 weights in float32
    return model.eval(), load_tokenizer(resolve_source(settings.model)), settings


def test_prompts(settings, tokenizer, n: int) -> list[list[int]]:
    """Token ids of the first `n` ASDiv test prompts, as the sweep builds them for this run."""
    from qdylora.data.rows import generation_prompts, read_rows, row_format

    rows = list(read_rows("asdiv:test"))[:n]
    rf = row_format(settings.data, rows[0].keys(), "asdiv:test")
    prompts, _ = generation_prompts(rows, tokenizer, rf, max_source_length=settings.data.max_source_length)
    return prompts


def user_turns(settings, n: int) -> list[str]:
    """The user turns of those prompts, for llama.cpp to render with the GGUF's own chat template."""
    from qdylora.data.rows import read_rows, row_format, segments_of, split_references

    rows = list(read_rows("asdiv:test"))[:n]
    rf = row_format(settings.data, rows[0].keys(), "asdiv:test")
    return [segments_of(split_references(row, i, rf)[0], i, rf)[0][0] for i, row in enumerate(rows)]


def ours(model, prompts: list[list[int]], rank: int) -> list[np.ndarray]:
    """(len, vocab) float64 logits of each prompt at `rank` (0: the NF4 base)."""
    import qdylora

    out = []
    with torch.no_grad(), qdylora.at_rank(model, rank):
        for ids in prompts:
            out.append(model(input_ids=torch.tensor([ids])).logits[0].double().numpy())
    return out


def llama(model_path: Path, prompts: list[list[int]], lora: Path | None = None) -> list[np.ndarray]:
    """(len, vocab) float64 logits of each prompt in llama.cpp (lora applied at scale 1)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, n_ctx=1024,
                logits_all=True, verbose=False, n_threads=os.cpu_count(), seed=0)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float64))
    llm.close()
    return out


def relative(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """||a - b|| / ||b|| over all prompts and positions (logits centred per position: a shift of
    all logits changes no probability)."""
    centre = lambda x: x - x.mean(axis=-1, keepdims=True)  # noqa: E731
    num = sum(float(np.sum((centre(x) - centre(y)) ** 2)) for x, y in zip(a, b))
    den = sum(float(np.sum(centre(y) ** 2)) for y in b)
    return (num / den) ** 0.5


def top1(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Share of positions where both pick the same next token."""
    same = sum(int(np.sum(x.argmax(-1) == y.argmax(-1))) for x, y in zip(a, b))
    return same / sum(len(x) for x in a)


def unquantized(model_path: str, prompts: list[list[int]]) -> list[np.ndarray]:
    """Logits of the run's base in float32 as transformers loads it, without NF4."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(input_ids=torch.tensor([ids])).logits[0].double().numpy() for ids in prompts]


def nf4_base_gguf(model, base: Path, path: Path) -> Path:
    """Our NF4 base, dequantized, as a float32 GGUF (the base GGUF's metadata): the base merged
    with an adapter whose B is zero."""
    import copy

    from qdylora.export.gguf import merge_gguf

    zero = copy.deepcopy(model)
    for layer in zero.adapter_layers().values():
        layer.lora_B.data.zero_()
    return merge_gguf(zero, 1, path, base, dtype="float32", overwrite=True)


def norm(xs: list[np.ndarray]) -> float:
    """Norm of centred logits over all prompts and positions."""
    return sum(float(np.sum((x - x.mean(-1, keepdims=True)) ** 2)) for x in xs) ** 0.5


def delta_check(model, prompts, ours_base, base_file: Path, adapters: dict, floor: float) -> dict:
    """At each rank, llama.cpp's logit change (adapter on minus off, on `base_file`) against ours.

    Tolerance: if llama.cpp's logits are off ours by `floor` (relative) both with and without the
    adapter, the change is off by at most floor (|on| + |off|) / |change|: twice that is allowed."""
    cpp_base = llama(base_file, prompts)
    out = {}
    for b, adapter in adapters.items():
        ours_on = ours(model, prompts, b)
        ours_delta = [x - y for x, y in zip(ours_on, ours_base)]
        cpp_on = llama(base_file, prompts, adapter)
        cpp_delta = [x - y for x, y in zip(cpp_on, cpp_base)]
        tolerance = 2 * floor * (norm(ours_on) + norm(ours_base)) / norm(ours_delta)
        out[b] = {"relative": relative(cpp_delta, ours_delta), "tolerance": tolerance,
                  "change_size": norm(ours_delta) / norm(ours_base), "top1_on": top1(cpp_on, ours_on)}
    return out


def base_and_adapters(run: str, ranks: list[int], n_prompts: int, work: Path, control: bool = True) -> dict:
    """Steps 1 and 2: how far llama.cpp's base is from ours, then adapter-on minus adapter-off at
    each rank, on the base GGUF (Q4_1: what users run) and on our NF4 base written as GGUF (the
    same weights in both stacks: the tight check, its tolerance derived from its own floor)."""
    from qdylora.export.gguf import base_gguf_of, export_gguf_adapter

    model, tokenizer, settings = run_model(run)
    base = base_gguf_of(settings.model)
    prompts = test_prompts(settings, tokenizer, n_prompts)
    ours_base = ours(model, prompts, 0)
    nf4 = nf4_base_gguf(model, base, work / "nf4-base.gguf")
    floors = {}
    for name, path in (("base_gguf", base), ("nf4_base_gguf", nf4)):
        cpp = llama(path, prompts)
        floors[name] = {"relative": relative(cpp, ours_base), "top1": top1(cpp, ours_base)}
    floor = floors["nf4_base_gguf"]["relative"]
    full = unquantized(settings.model, prompts)  # where both quantizations start from
    floors["unquantized_vs_base_gguf"] = {"relative": relative(llama(base, prompts), full)}
    floors["unquantized_vs_nf4"] = {"relative": relative(ours_base, full), "top1": top1(ours_base, full)}
    adapters = {b: export_gguf_adapter(model, b, work / f"rank-{b}.gguf", dtype="float32", base_gguf=base,
                                       overwrite=True) for b in ranks}
    # "nf4_*" keys: our base, whichever its format
    result = {"base_gguf": str(base), "base_format": model.qdylora_config.base_format,
              "prompts": len(prompts), "positions": sum(map(len, prompts)),
              "floor": floors,
              "on_nf4_base": delta_check(model, prompts, ours_base, nf4, adapters, floor),
              "on_base_gguf": delta_check(model, prompts, ours_base, base, adapters, floors["base_gguf"]["relative"])}
    import qdylora.core.gguf_base as g  # where rope_permute reads ROPE_PERMUTED

    if control and g.ARCHITECTURES[model.model.config.model_type] in g.ROPE_PERMUTED:  # else nothing to get wrong
        keep = g.ROPE_PERMUTED
        g.ROPE_PERMUTED = set()  # a wrong adapter: lora_b rows of q and k in transformers' order
        try:
            b = max(ranks)
            wrong = export_gguf_adapter(model, b, work / "unpermuted.gguf", dtype="float32", overwrite=True)
        finally:
            g.ROPE_PERMUTED = keep
        result["control_unpermuted"] = {"rank": b, **delta_check(model, prompts, ours_base, nf4, {b: wrong}, floor)[b]}
    return result


def greedy_pair(model, llm, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[str, str]:
    """Greedy answers to the prompt `ids`: transformers' `model` (ours) and llama.cpp's `llm`."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    mine = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    llm.reset()
    theirs = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, top_k=1)["choices"][0]["text"]
    return mine, theirs.replace(tokenizer.eos_token or "\0", "").strip()


def merged_answers(run: str, rank: int, n_answers: int, work: Path, dtype: str = "float16",
                   max_new_tokens: int = 16) -> dict:
    """Step 3: greedy answers of our merged model (float32) and of llama.cpp on the merged GGUF."""
    from llama_cpp import Llama

    from qdylora.export.gguf import base_gguf_of, merge_gguf
    from qdylora.export.merge import merge_layers

    model, tokenizer, settings = run_model(run)
    prompts = test_prompts(settings, tokenizer, n_answers)
    base = base_gguf_of(settings.model)
    path = merge_gguf(model, rank, work / f"merged-{rank}.gguf", base, dtype=dtype, overwrite=True)
    model, _, _ = run_model(run)
    merged = merge_layers(model, rank, torch.float32).eval()
    llm = Llama(model_path=str(path), n_ctx=1024, verbose=False, n_threads=os.cpu_count(), seed=0)
    same, chat_same, ours_text, cpp_text = 0, 0, [], []
    chat = settings.data.chat_template and settings.data.format != "chat"
    turns = user_turns(settings, n_answers) if chat else [None] * len(prompts)
    for ids, turn in zip(prompts, turns):
        mine, theirs = greedy_pair(merged, llm, tokenizer, ids, max_new_tokens)
        same += mine == theirs
        if chat:  # llama.cpp renders the conversation itself, with the chat template the merged file carries
            llm.reset()
            reply = llm.create_chat_completion([{"role": "user", "content": turn}], max_tokens=max_new_tokens,
                                               temperature=0.0, top_k=1)["choices"][0]["message"]["content"]
            chat_same += mine == reply.strip()
        ours_text.append(mine)
        cpp_text.append(theirs)
    llm.close()
    return {"rank": rank, "dtype": dtype, "file_bytes": path.stat().st_size, "answers": len(prompts),
            "identical": same, "identical_with_its_chat_template": chat_same if chat else None,
            "examples": list(zip(ours_text, cpp_text))[:3]}


def adapter_answers(run: str, rank: int, n_answers: int, work: Path, max_new_tokens: int = 16) -> dict:
    """Step 4: greedy answers of our model at `rank` and of llama.cpp on the original base GGUF
    with our exported adapter (`llama-cli -m BASE --lora ADAPTER`): the share of identical answers.
    Exact only where our base is that file's blocks (--base-format gguf)."""
    from llama_cpp import Llama

    import qdylora
    from qdylora.export.gguf import base_gguf_of, export_gguf_adapter

    model, tokenizer, settings = run_model(run)
    prompts = test_prompts(settings, tokenizer, n_answers)
    base = base_gguf_of(settings.model)
    adapter = export_gguf_adapter(model, rank, work / f"answers-rank-{rank}.gguf", dtype="float32", base_gguf=base,
                                  overwrite=True)
    llm = Llama(model_path=str(base), lora_path=str(adapter), n_ctx=1024, verbose=False,
                n_threads=os.cpu_count(), seed=0)
    same, pairs = 0, []
    for ids in prompts:
        with qdylora.at_rank(model, rank):
            mine, theirs = greedy_pair(model.model, llm, tokenizer, ids, max_new_tokens)
        same += mine == theirs
        pairs.append((mine, theirs))
    llm.close()
    return {"rank": rank, "base_format": settings.adapter.base_format, "answers": len(prompts), "identical": same,
            "examples": [p for p in pairs if p[0] != p[1]][:3]}


def main() -> None:
    import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--answers", type=int, default=50)
    parser.add_argument("--merge-rank", type=int, default=8)
    parser.add_argument("--answers-only", action="store_true",
                        help="only step 4: greedy answers with the adapter on the original file, at --ranks")
    parser.add_argument("--out", default="experiments/gguf-check.json")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.answers_only:
        with tempfile.TemporaryDirectory(prefix="qdylora-gguf-check-") as tmp:
            result = {"run": args.run, "adapter_on_base_gguf": [adapter_answers(args.run, b, args.answers, Path(tmp))
                                                                for b in args.ranks]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(result, indent=1))
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        return
    with tempfile.TemporaryDirectory(prefix="qdylora-gguf-check-") as tmp:
        result = {"machine": machine.facts(), "run": args.run,
                  **base_and_adapters(args.run, args.ranks, args.prompts, Path(tmp))}
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1), flush=True)
        result["merged"] = [merged_answers(args.run, args.merge_rank, args.answers, Path(tmp), dtype)
                            for dtype in ("float16", "q8_0")]
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result["merged"], indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
