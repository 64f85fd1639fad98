#!/usr/bin/env python
"""Engine benchmark: training step and greedy head masking, naive vs ours, per Prompt-CAM variant and C.

Every configuration runs in a fresh process (forked from a server that imported torch once), so its peak memory
is its own and an out-of-memory kill costs one cell only. A configuration whose estimated time or memory is over
budget is skipped and its estimate printed. Estimates come from a FLOP/byte model of the blocks (`layer_plan`,
`cost`), calibrated on a matmul, then on the same row's measurement at the previous (smaller) C.

    python bench/bench_engine.py                                   # CPU defaults: ViT-S/16 at 112 px
    python bench/bench_engine.py --device cuda --out bench/RESULTS.md   # ViT-B/16 DINO at 224 px, bf16
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from taxotrait.backbone import create_backbone  # noqa: E402
from taxotrait.masking import greedy_head_masking  # noqa: E402
from taxotrait.model import PromptCAM, PromptConfig  # noqa: E402
from taxotrait.naive import naive_forward, naive_greedy_head_masking  # noqa: E402
from taxotrait.train import TrainConfig, make_optimizer, rival_loss  # noqa: E402

# label: (variant, prompt depth k with 0 = every block, engine)
TRAIN_ROWS = {
    "naive-reference": ("reference", 0, "naive"),
    "reference": ("reference", 0, "ours"),
    "scalable k=N": ("scalable", 0, "ours"),
    "scalable k=2": ("scalable", 2, "ours"),
    "scalable k=1": ("scalable", 1, "ours"),
    "scalable k=1 cached": ("scalable", 1, "cached"),
    # contrast 'siblings' on a genus tree (`genus_tree`): each image scored against its genus only, from the inputs
    # the workflow caches (CPU: the last block's keys/values; GPU: the tokens entering it)
    "scalable k=1 siblings": ("scalable", 1, "siblings"),
}
MASK_ROWS = {
    f"{label} {engine}": (variant, depth, engine)
    for label, (variant, depth) in {
        "reference": ("reference", 0), "scalable k=N": ("scalable", 0),
        "scalable k=2": ("scalable", 2), "scalable k=1": ("scalable", 1),
    }.items()
    for engine in ("naive", "batched")
}
MASK_ROWS["scalable k=1 siblings"] = ("scalable", 1, "siblings")  # masking against the genus only
GENUS_SIZES = (2, 5)  # species per genus of the siblings rows' tree
# device: backbone, img size, batch, masking batch, dtype, CPU threads (one on CPU: on a shared machine a second
# OpenMP thread waiting on a busy core made steps 1.5-7x slower than one thread)
DEFAULTS = {
    "cpu": ("vit_small_patch16_224", 112, 4, 8, "fp32", 1),
    "cuda": ("vit_base_patch16_224.dino", 224, 32, 64, "bf16", torch.get_num_threads()),
}
QUICK = dict(backbone="vit_tiny_patch16_224", img_size=32, batch=2, mask_batch=2, classes=[10, 50], repeats=1)


# ------------------------------------------------------------------------------------------------ cost model
@dataclass(frozen=True)
class Dims:
    blocks: int
    dim: int
    heads: int
    hidden: int
    tokens: int
    prompts: int

    @classmethod
    def of(cls, args) -> "Dims":
        vit = create_backbone(args.backbone, "random", args.img_size)
        return cls(len(vit.blocks), vit.embed_dim, vit.blocks[-1].attn.num_heads, vit.blocks[-1].mlp.fc1.out_features,
                   vit.patch_embed.num_patches + vit.num_prefix_tokens, args.num_prompts)


def genus_tree(classes: int, seed: int = 0) -> list[str]:
    """The parents of `classes` species in genera of GENUS_SIZES species (uniform, seeded; none monotypic)."""
    rng, parents = random.Random(seed), []
    while len(parents) < classes:
        remaining = classes - len(parents)
        size = min(rng.randint(*GENUS_SIZES), remaining)
        if remaining - size == 1:  # leave no genus of one species
            size += 1 if size < GENUS_SIZES[1] else -1
        parents += [f"genus {len(set(parents))}"] * size
    return parents


def layer_plan(d: Dims, variant: str, depth: int, classes: int, naive: bool) -> list[tuple[int, int, bool]]:
    """The blocks one image goes through, as (query tokens, key tokens, trainable), in forward order (`classes`:
    the class prompts scored per image)."""
    k = d.blocks if variant == "reference" or depth == 0 else depth
    prompts = classes if variant == "reference" else d.prompts
    plan = [(d.tokens, d.tokens, False)] * (d.blocks - k) + [(prompts + d.tokens,) * 2 + (True,)] * (k - 1)
    if naive:  # the whole sequence [class prompts, image tokens]
        return plan + [(classes + d.tokens, classes + d.tokens, True)]
    return plan + [(classes, classes + d.tokens if variant == "reference" else d.tokens, True)]


def cost(d: Dims, plan, grad: bool, explicit: bool, images: int) -> tuple[float, float]:
    """(FLOPs, peak bytes) of `images` images through `plan`: trainable blocks keep their activations when training
    (backward = 2 forwards); other blocks only need their own working memory. Explicit attention keeps ~3 copies
    of the [heads, queries, keys] matrix (logits, scaled logits, weights)."""
    flops = saved = working = 0.0
    for queries, keys, trainable in plan:
        f = 2 * queries * (2 * d.dim**2 + 2 * d.dim * d.hidden) + 4 * keys * d.dim**2 + 4 * queries * keys * d.dim
        b = 4 * (queries * (10 * d.dim + 2 * d.hidden) + 2 * keys * d.dim) + 12 * d.heads * queries * keys * explicit
        if grad and trainable:
            flops, saved = flops + 3 * f, saved + b
        else:
            flops, working = flops + f, max(working, b)
    return flops * images, (saved + working) * images


def estimate(d: Dims, task: str, variant: str, depth: int, engine: str, classes: int, args) -> tuple[float, float]:
    """(FLOPs, peak bytes): per training step of `args.batch` images, or per image for masking."""
    naive = engine == "naive"
    scored = min(classes, GENUS_SIZES[1]) if engine == "siblings" else classes
    plan = layer_plan(d, variant, depth, scored, naive)
    if task == "train":
        if engine in ("cached", "siblings"):
            plan = [block for block in plan if block[2]]
        flops, peak = cost(d, plan, True, naive, args.batch)
        k = d.blocks if variant == "reference" or depth == 0 else depth
        trainable = ((k - 1) * (classes if variant == "reference" else d.prompts) + classes) * d.dim
        return flops, peak + 16 * trainable  # parameter, gradient and two AdamW moments
    if naive:  # H (H + 1) / 2 full forwards of one image
        flops, peak = cost(d, plan, False, True, 1)
        return flops * d.heads * (d.heads + 1) / 2, peak
    flops, _ = cost(d, plan, False, False, 1)
    chunked = plan[:-1] + [(min(scored, args.chunk_size), *plan[-1][1:])]
    return flops, cost(d, chunked, False, False, 1)[1]


def matmul_flops_per_s(device: str) -> float:
    """Measured fp32 matmul throughput, the time model's starting rate."""
    a = torch.randn(2048, 2048, device=device)
    for _ in range(3):
        a @ a
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    sync(device)
    return 5 * 2 * 2048**3 / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ worker side
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: str, repeats: int, budget_s: float) -> tuple[float, int]:
    """Median seconds of fn() after one warm-up call, and the number of timed calls: up to `repeats`, while the
    calls add up to no more than half of `budget_s` (0: the warm-up itself is the measurement)."""
    times = []
    while len(times) <= repeats:
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if sum(times) + times[-1] > budget_s / 2:
            break
    return statistics.median(times[1:] or times), len(times) - 1


def build_model(job: dict) -> PromptCAM:
    torch.manual_seed(0)
    vit = create_backbone(job["backbone"], "random", job["img_size"])
    depth = job["depth"] or len(vit.blocks)
    classes = [f"class {i}" for i in range(job["classes"])]
    parents = genus_tree(job["classes"]) if job["engine"] == "siblings" else None
    return PromptCAM(vit, classes, PromptConfig(job["variant"], depth, job["num_prompts"]),
                     class_parents=parents).to(job["device"])


def train_step(model: PromptCAM, job: dict, images: torch.Tensor, autocast):
    """One forward + cross-entropy over all classes (siblings rows: over each image's genus, `rival_loss`) +
    backward + AdamW step (as `train` makes it: `make_optimizer`), as a closure."""
    labels = torch.randint(model.num_classes, (len(images),), device=images.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = make_optimizer(params, TrainConfig(optimizer="adamw", lr=1e-3), images.device)
    inputs, forward = images, model
    if job["engine"] == "naive":
        forward = lambda x: naive_forward(model, x)[0]  # noqa: E731
    elif job["engine"] == "cached":
        inputs, forward = model.frozen_tokens(images), model.forward_tokens
    elif job["engine"] == "siblings":  # what the training loop feeds (`taxotrait.train._with_keys_values`)
        inputs, forward = model.frozen_tokens(images), model.forward_tokens
        if job["device"] == "cpu":
            inputs, forward = model.image_keys_values(model.last_block_input(inputs)), model.forward_keys_values

    def loss_of_batch():
        if job["engine"] == "siblings":
            losses, counted, _ = rival_loss(model, forward, inputs, labels)
            return losses[counted].mean()
        return F.cross_entropy(forward(inputs).float(), labels)

    def step():
        with autocast:
            loss = loss_of_batch()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step


def masking_run(model: PromptCAM, job: dict, images: torch.Tensor, autocast):
    """Greedy head masking of all `images`, or one naive forward of one candidate (`extrapolate`), as a closure
    (run under no_grad, the naive way included)."""
    rival = model.has_rival.nonzero().squeeze(1)  # the workflow masks only classes with a rival
    classes = rival[torch.randint(len(rival), (len(images),), device=rival.device)]
    if job["engine"] in ("batched", "siblings"):
        def run():
            with autocast:
                greedy_head_masking(model, model.frozen_tokens(images), classes, chunk_size=job["chunk_size"])
    elif job["extrapolate"]:
        blur = torch.zeros(1, model.num_classes, model.num_heads, dtype=torch.bool)
        blur[0, int(classes[0]), 0] = True
        run = lambda: naive_forward(model, images[:1], blur)  # noqa: E731
    else:
        run = lambda: naive_greedy_head_masking(model, images, classes)  # noqa: E731
    return run


def worker(job: dict) -> dict:
    """Run one configuration and return its median time and peak memory."""
    device = job["device"]
    torch.set_num_threads(job["threads"])
    model = build_model(job).train(job["task"] == "train")
    images = torch.randn(job["batch"], 3, job["img_size"], job["img_size"], device=device)
    bf16 = job["dtype"] == "bf16" and job["engine"] != "naive"  # the naive baseline stays fp32
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext()
    fn = (train_step if job["task"] == "train" else masking_run)(model, job, images, autocast)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad() if job["task"] == "mask" else nullcontext():
        seconds, timed = measure(fn, device, job["repeats"], job["budget_s"])
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024
    result = {"seconds": seconds, "timed": timed, "peak_bytes": peak}
    if job["extrapolate"]:  # the H (H + 1) / 2 forwards of a greedy run, all alike
        result["forwards"] = model.num_heads * (model.num_heads + 1) // 2
        result["seconds"] *= result["forwards"]
    elif job["task"] == "mask":
        result["seconds"] /= job["batch"]
    return result


# ------------------------------------------------------------------------------------------------ parent side
def child(job: dict, connection) -> None:
    """Process entry point: run `job`, send back its result or its error."""
    try:
        result = worker(job)
    except Exception as err:  # e.g. CUDA out of memory: one failed cell
        result = {"error": f"failed: {type(err).__name__}: {err}"[:100]}
    connection.send(result)


def run_job(job: dict) -> dict:
    """Run `job` in a fresh process forked from a server that has imported torch once; {"error": why} when it
    fails or is killed."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["timm", "taxotrait.backbone", "taxotrait.masking", "taxotrait.naive"])
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=child, args=(job, sender), daemon=True)
    process.start()
    sender.close()
    timeout_s = 10 * job["budget_s"] + 60
    process.join(timeout_s)
    if process.is_alive():
        process.kill()
        process.join()
        return {"error": f"failed: timed out after {timeout_s:.0f} s"}
    if receiver.poll():
        return receiver.recv()
    killed = process.exitcode == -9
    return {"error": "failed: killed (out of memory?)" if killed else f"failed: exit {process.exitcode}"}


def plan_job(d: Dims, rate: float, previous, task: str, spec, classes: int, args) -> tuple[dict, float, str | None]:
    """The job for one cell, its FLOPs per table unit (a step, or an image for masking), and why it is skipped
    (None: it runs).

    The time estimate scales the row's previous measurement (FLOPs, seconds) by FLOPs when there is one, else
    divides by the calibrated rate. Naive masking runs on one image, or times single forwards and extrapolates
    when the whole run is over budget; batched masking runs on as many images (up to `--mask-batch`) as fit.
    """
    variant, depth, engine = spec
    flops, peak = estimate(d, task, variant, depth, engine, classes, args)
    seconds = previous[1] * flops / previous[0] if previous else flops / rate
    settings = ("device", "threads", "backbone", "img_size", "dtype", "num_prompts", "chunk_size", "repeats",
                "budget_s")
    job = dict(task=task, variant=variant, depth=depth, engine=engine, classes=classes, batch=args.batch,
               extrapolate=False, **{key: getattr(args, key) for key in settings})
    memory, call = args.mem_gb * 2**30, seconds  # `call`: the one call the job times
    if task == "mask" and engine == "naive":
        job["batch"] = 1
        if seconds > args.budget_s:
            job["extrapolate"], call = True, seconds / (d.heads * (d.heads + 1) / 2)
    elif task == "mask":
        job["batch"] = max(1, min(args.mask_batch, int(args.budget_s / seconds), int(memory / peak)))
        call, peak = seconds * job["batch"], peak * job["batch"]
    skip = f"skipped: est. {seconds:.3g} s / {size(peak)}" if call > args.budget_s or peak > memory else None
    return job, flops, skip


def size(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.3g} GB" if num_bytes >= 1000 * 2**20 else f"{num_bytes / 2**20:.0f} MB"


def cell_text(result: dict, job: dict, baseline: float | None, args) -> str:
    """A table cell: time per unit, peak memory, speed-up over the naive row, and flags."""
    if "error" in result:
        return result["error"]
    seconds = result["seconds"]
    rate = f" ({job['batch'] / seconds:.3g} img/s)" if job["task"] == "train" else ""
    text = f"{seconds:.3g} s{rate} · {size(result['peak_bytes'])}"
    if baseline and job["engine"] != "naive":
        ratio = baseline / seconds
        text += f" · ×{ratio:.0f}" if ratio >= 100 else f" · ×{ratio:.3g}"
    if job["task"] == "mask" and job["engine"] in ("batched", "siblings") and job["batch"] != args.mask_batch:
        text += f" (B={job['batch']})"
    if job["extrapolate"]:
        text += f" (extrapolated: {result['forwards']} × one forward)"
    return text + (" (cold)" if result["timed"] == 0 else "")


def run_all(args) -> tuple[dict[str, dict[str, dict[int, str]]], dict[tuple[str, str, int], float]]:
    """Every (task, row, C) cell, run in order of increasing C so each estimate can build on the last: the tables'
    text and the seconds of every cell measured, by (task, row, C)."""
    torch.set_num_threads(args.threads)
    d, rate = Dims.of(args), 0.5 * matmul_flops_per_s(args.device)
    tables, seconds_of = {}, {}
    started = time.perf_counter()
    for task in args.tasks:
        rows = {label: spec for label, spec in (TRAIN_ROWS if task == "train" else MASK_ROWS).items()
                if not args.rows or label in args.rows}
        tables[task] = {label: {} for label in rows}
        for label, spec in rows.items():
            previous = None
            for classes in sorted(args.classes):
                job, flops, text = plan_job(d, rate, previous, task, spec, classes, args)
                naive_label = "naive-reference" if task == "train" else label.replace("batched", "naive")
                baseline = seconds_of.get((task, naive_label, classes))
                if text is None:
                    result = run_job(job)
                    text = cell_text(result, job, baseline, args)
                    if "error" not in result:
                        seconds_of[(task, label, classes)] = result["seconds"]
                        previous = (flops, result["seconds"])
                tables[task][label][classes] = text
                print(f"[{time.perf_counter() - started:5.0f} s] {task} {label} C={classes}: {text}", file=sys.stderr)
    return tables, seconds_of


def sibling_cost(seconds_of: dict, args) -> list[str]:
    """The sibling-cost lines (issue 15): each siblings row's time at the largest C over its time at the smallest,
    the training step's against its goal of 1.5x."""
    small, large = min(args.classes), max(args.classes)
    lines = []
    for task in args.tasks:
        both = [seconds_of.get((task, "scalable k=1 siblings", c)) for c in (small, large)]
        if None not in both and small < large:
            ratio = both[1] / both[0]
            goal = f" (goal at most 1.5x: {'met' if ratio <= 1.5 else 'MISSED'})" if task == "train" else ""
            lines.append(f"- sibling cost, {task}: C={large} takes {ratio:.2f}x the C={small} time{goal}")
    return lines


def machine(device: str) -> str:
    """CPU model, cores, memory, GPU and library versions."""
    with open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown CPU")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none used"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {ram:.0f} GB RAM "
            f"(load average at the end {load}); GPU: {gpu}; torch {torch.__version__}, timm {timm.__version__}")


def heading(title: str, script: str, machine_note: str = "") -> list[str]:
    """The first lines of a CPU benchmark's section: its dated title, the machine (`machine_note` appended) and the
    command (`python bench/<script>` with this process's arguments)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"## {title}, {stamp}", "", f"- machine: {machine('cpu')}{machine_note}",
            f"- command: `python bench/{script} {' '.join(sys.argv[1:])}`"]


def publish(section: str, out) -> None:
    """Print a benchmark's markdown section and, when `out` is a path, append it to that file (bench/RESULTS.md)."""
    print(section)
    if out:
        with open(out, "a") as handle:
            handle.write("\n" + section)


def markdown(tables: dict, seconds_of: dict, args) -> str:
    """The results as a dated markdown section: machine, command, settings and one table per task."""
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## {date}, {args.device}", "",
        f"- machine: {machine(args.device)}",
        f"- command: `{' '.join(['python', 'bench/bench_engine.py', *sys.argv[1:]])}`",
        f"- settings: backbone `{args.backbone}` (random weights) at {args.img_size} px, {args.dtype}, "
        f"{args.threads} torch thread(s), {args.num_prompts} class-agnostic prompts, masking chunk "
        f"{args.chunk_size} classes, median of up to {args.repeats} runs after a warm-up (cold: one run, no "
        f"warm-up); skipped when estimated above {args.budget_s:.0f} s or {args.mem_gb:.0f} GB",
        "- cells: time (training: and images/s) · peak memory (CPU: max-RSS increase; GPU: max allocated) · "
        "speed-up over the naive row",
        f"- siblings rows: contrast 'siblings' on a seeded tree of {GENUS_SIZES[0]}-{GENUS_SIZES[1]} species per "
        "genus, each image scored against its genus only (training: `rival_loss` on the inputs the workflow "
        "caches; masking: `greedy_head_masking`)",
        *sibling_cost(seconds_of, args),
    ]
    titles = {"train": f"training step, B={args.batch} (s/step)",
              "mask": f"greedy head masking, batched B={args.mask_batch} (s/image)"}
    for task, rows in tables.items():
        lines += ["", f"| {titles[task]} | " + " | ".join(f"C={c}" for c in sorted(args.classes)) + " |",
                  "|---" * (len(args.classes) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(cells[c] for c in sorted(cells)) + " |" for label, cells in rows.items()]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", help="timm ViT (default: per device, see DEFAULTS)")
    parser.add_argument("--img-size", type=int)
    parser.add_argument("--batch", type=int, help="training batch")
    parser.add_argument("--mask-batch", type=int, help="images per batched greedy head masking call")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="bf16: autocast (not for the naive rows)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--classes", type=int, nargs="+", default=[200, 2000, 10000])
    parser.add_argument("--tasks", nargs="+", choices=("train", "mask"), default=["train", "mask"])
    parser.add_argument("--rows", nargs="+", help="only these rows (labels of TRAIN_ROWS and MASK_ROWS)")
    parser.add_argument("--num-prompts", type=int, default=8, help="class-agnostic prompts per block (scalable)")
    parser.add_argument("--chunk-size", type=int, default=1000, help="classes per chunk in batched masking")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=60.0, help="skip a configuration estimated slower")
    parser.add_argument("--mem-gb", type=float, help="skip a configuration estimated larger (CPU: 12, GPU: 90%%)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check")
    parser.add_argument("--out", help="append the results as markdown to this file (e.g. bench/RESULTS.md)")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) in (None, parser.get_default(key)):
                setattr(args, key, value)
    for key, value in zip(("backbone", "img_size", "batch", "mask_batch", "dtype", "threads"), DEFAULTS[args.device]):
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mem_gb is None:
        args.mem_gb = 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30 if args.device == "cuda" else 12.0
    return args


def main() -> None:
    args = parse_args()
    publish(markdown(*run_all(args), args), args.out)


if __name__ == "__main__":
    main()
