"""Training speed: the ML-1M SASRec reference epoch against the machine's GEMM bound, and the
training-step overheads (Lightning vs a plain loop, preference vs reference).

    python benchmarks/bench_train.py epoch --data artifacts/prepared/ml1m_sas \
        --before /tmp/before [--batches 16] [--repeats 3] [--threads 2]
    python benchmarks/bench_train.py steps [--steps 30] [--repeats 5]

`epoch`: the `ml1m_sasrec_dpo` reference recipe (SASRec d=64, 2 layers, 1 head, dropout 0.2,
200-item windows, batch 128, full-catalog softmax CE, AdamW, gradient clipping 1.0) on the
prepared ML-1M data, in a plain loop (Lightning's overhead is the `steps` case). Each repeat
runs, in fresh processes alternating between the code trees (`--before`: a `git worktree` of
the commit before the speed-up; the current tree is "after"), the first `--batches` batches of
epoch 0 (after one untimed warm-up step), then a torch.profiler pass over 3 more steps, then
times the epoch's matrix products on their own (the GEMM bound). The epoch time is
extrapolated from the timed batches (x steps per epoch / batches) plus the measured time of
one whole epoch of data loading. FLOPs: the matrix products a dense implementation must do
for the epoch's real (non-padding) positions, forward x 3 for forward + backward; the bound is
their time at the GEMM rate measured for the same shapes in the same process. Every time is
taken on two clocks, wall and the process's CPU time (steadier when other jobs share the
cores). Medians over repeats; the load average is recorded. JSON:
benchmarks/results/bench_train_epoch_threads<N>.json.

    python benchmarks/bench_train.py quality --data ... --before /tmp/before [--epochs 2]
        [--seeds 0 1] [--threads 2]

`quality`: trains the same recipe for whole epochs in both trees from the same seeds and
scores every epoch's weights on valid (HR@10 / NDCG@10, the training-time evaluator of this
tree for both): benchmarks/results/bench_train_quality_seeds<seeds>.json.

`steps`: for SASRec and two-tower on CPU (and CUDA when available):
  * `lightning`: `Trainer.fit` for N steps (no logger, progress bar, checkpoints or validation)
    of the ReferenceModule (full-catalog softmax CE);
  * `plain`: the same module's loss and AdamW over the SAME batches in a hand-written loop;
  * `preference`: a plain-loop PreferenceModule (DPO) step with precomputed reference
    log-probabilities in the batch, vs the `plain` reference step.
The cases run interleaved, `--repeats` times, and the median is reported. Targets: Lightning
overhead < 5 %; preference step < 1.2x the reference step. Prints a table and writes
benchmarks/results/bench_train.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

import recsys_dpo
from recsys_dpo.data.datamodule import SequenceDataModule
from recsys_dpo.models import SASRec
from recsys_dpo.training.preference_module import PreferenceModule
from recsys_dpo.training.ranking_eval import ranking_metrics
from recsys_dpo.training.reference_module import ReferenceModule, model_spec

N_ITEMS, N_USERS, BATCH, MAX_LEN, NEGATIVES = 5001, 10_000, 256, 50, 4
MODELS = {
    "sasrec": {"dim": 64, "n_layers": 2, "n_heads": 2, "max_len": MAX_LEN, "dropout": 0.2},
    "two_tower": {"dim": 64, "hidden": [128], "max_len": MAX_LEN, "dropout": 0.1},
}
RESULTS = Path(__file__).parent / "results" / "bench_train.json"
EPOCH_RESULTS = RESULTS.with_name("bench_train_epoch_threads{threads}.json")
QUALITY_RESULTS = RESULTS.with_name("bench_train_quality_seeds{seeds}.json")
# The reference recipe of recsys_dpo/conf/experiment/ml1m_sasrec_dpo.yaml (model, data.max_len,
# batch).
RECIPE = {"dim": 64, "n_layers": 2, "n_heads": 1, "max_len": 200, "dropout": 0.2}
RECIPE_BATCH, RECIPE_LR, CLIP = 128, 1e-3, 1.0
PROFILED_STEPS = 3
# Wall time, and this process's CPU time (all threads): the latter hardly counts the time other
# jobs take the cores away, so on a shared machine its ratios are the steadier ones.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# torch.profiler op name -> category of the epoch profile (self CPU time).
CATEGORIES = {
    "GEMM": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"),
    "catalog softmax": ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::exp_",
                        "aten::gather", "aten::scatter", "aten::nll_loss", "aten::amax",
                        "aten::logsumexp", "_CatalogSoftmaxCE"),
    "attention softmax": ("aten::_softmax", "aten::_softmax_backward_data",
                          "aten::_safe_softmax"),
    "dropout": ("aten::bernoulli_", "aten::native_dropout", "aten::native_dropout_backward"),
    "LayerNorm, GELU": ("aten::native_layer_norm", "aten::native_layer_norm_backward",
                        "aten::gelu", "aten::gelu_backward"),
    "optimizer, clipping": ("aten::sqrt", "aten::addcdiv_", "aten::addcmul_", "aten::lerp_",
                            "aten::linalg_vector_norm", "aten::_foreach_norm"),
    "copies, fills, indexing": ("aten::copy_", "aten::fill_", "aten::zero_", "aten::cat",
                                "aten::index", "aten::_index_put_impl_", "aten::where",
                                "aten::index_select", "aten::embedding_dense_backward",
                                "aten::masked_fill_", "aten::clone"),
}  # fmt: skip


def batches(model: str, steps: int, device: str) -> list[dict[str, torch.Tensor]]:
    """Random full-length batches with stage-1 and pair keys (reference logps included)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        context = torch.randint(1, N_ITEMS, (BATCH, MAX_LEN), generator=gen)
        batch = {
            "user_idx": torch.randint(0, N_USERS, (BATCH,), generator=gen),
            "context": context,
            "target": torch.randint(1, N_ITEMS, (BATCH,), generator=gen),
            "chosen": torch.randint(1, N_ITEMS, (BATCH,), generator=gen),
            "rejected": torch.randint(1, N_ITEMS, (BATCH, NEGATIVES), generator=gen),
            "weight": torch.ones(BATCH),
            "ref_chosen": -torch.rand(BATCH, generator=gen) - 8,
            "ref_rejected": -torch.rand(BATCH, NEGATIVES, generator=gen) - 8,
        }
        if model == "sasrec":
            batch["targets_seq"] = torch.roll(context, -1, dims=1)
        batch["rejected_mask"] = batch["rejected"] != 0
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def reference_module(model: str) -> ReferenceModule:
    torch.manual_seed(0)
    return ReferenceModule(model, MODELS[model], N_ITEMS, N_USERS, loss="ce")


def preference_module(model: str, tmp: Path) -> PreferenceModule:
    module = reference_module(model)
    path = tmp / f"{model}.ckpt"
    torch.save({"state_dict": module.state_dict(), "model": model_spec(module.model, "model.")},
               path)  # fmt: skip
    return PreferenceModule(str(path), N_ITEMS, N_USERS, precompute=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(module, step: Callable, data: list, device: str) -> float:
    """Seconds for one pass of a hand-written loop: loss, backward, clip, AdamW step."""
    module.to(device).train()
    optimizer = module.configure_optimizers()
    step(module, data[0])  # warm-up (allocator, kernels); not timed
    sync(device)
    start = time.perf_counter()
    for batch in data:
        loss = step(module, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
    sync(device)
    return time.perf_counter() - start


def lightning_fit(module, data: list, device: str) -> float:
    """Seconds for Trainer.fit over the same batches (everything optional switched off)."""
    trainer = Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=len(data),
        logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)
    sync(device)
    start = time.perf_counter()
    trainer.fit(module, loader)
    sync(device)
    return time.perf_counter() - start


def reference_step(module: ReferenceModule, batch: dict) -> torch.Tensor:
    return module.reference_loss(batch)


def preference_step(module: PreferenceModule, batch: dict) -> torch.Tensor:
    return module.preference_step(batch)[0]


def measure(model: str, device: str, steps: int, repeats: int, tmp: Path) -> dict[str, float]:
    """Median samples/s of each case, the cases interleaved within every repeat."""
    data = batches(model, steps, device)
    cases = {
        "lightning": lambda: lightning_fit(reference_module(model), data, device),
        "plain": lambda: plain_loop(reference_module(model), reference_step, data, device),
        "preference": lambda: plain_loop(
            preference_module(model, tmp), preference_step, data, device
        ),  # fmt: skip
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            seconds[name].append(run())
    rates = {name: steps * BATCH / statistics.median(s) for name, s in seconds.items()}
    rates["lightning_overhead_pct"] = 100 * (rates["plain"] / rates["lightning"] - 1)
    rates["preference_over_reference"] = rates["plain"] / rates["preference"]
    return rates


# ---- epoch: the ML-1M SASRec reference epoch against the GEMM bound ----


def epoch_flops(batches: list[dict[str, torch.Tensor]], n_items: int) -> dict[str, float]:
    """Forward matrix-product FLOPs of an epoch, x 3 for forward + backward.

    `useful`: what the model needs at the real positions only: per layer 24 d^2 per token
    (QKV 3d^2, output d^2, MLP 8d^2, 2 FLOPs per multiply-add) and causal attention over each
    window's own items (QK^T and AV: 2 x 2 d n(n+1)/2 per window of n items); the logits
    2 d (N - 1) per target. `padded`: the same at every position of the [B, L] batches with
    full L x L attention, what an unpacked implementation multiplies.
    """
    d, layers, width = RECIPE["dim"], RECIPE["n_layers"], RECIPE["max_len"]
    tokens = padded_tokens = attention = targets = 0
    for batch in batches:
        n = (batch["context"] != 0).sum(1).double()
        tokens += float(n.sum())
        attention += float((n * (n + 1) / 2).sum())
        padded_tokens += batch["context"].numel()
        targets += int((batch["targets_seq"] != 0).sum())
    logits = 2 * d * (n_items - 1) * targets
    useful = layers * (24 * d * d * tokens + 4 * d * attention) + logits
    padded = layers * (24 * d * d * padded_tokens + 4 * d * width * padded_tokens) + logits
    return {"useful": 3 * useful, "padded": 3 * padded, "logits": 3 * logits,
            "attention": 3 * layers * 4 * d * attention, "tokens": tokens,
            "padded_tokens": padded_tokens, "targets": targets}  # fmt: skip


def _timed(fn: Callable[[], object]) -> dict[str, float]:
    """Seconds fn takes on each clock of CLOCKS."""
    start = {name: clock() for name, clock in CLOCKS.items()}
    fn()
    return {name: clock() - start[name] for name, clock in CLOCKS.items()}


def _seconds(fn: Callable[[], object], repeats: int = 3) -> dict[str, float]:
    """Median seconds of fn on each clock (one untimed warm-up call first)."""
    fn()
    times = [_timed(fn) for _ in range(repeats)]
    return {name: statistics.median(t[name] for t in times) for name in CLOCKS}


def _products(shapes: list[tuple[int, ...]]) -> tuple[Callable[[], object], float]:
    """A function doing the (batched) products (..., m, k, n) = [m, k] x [k, n], and FLOPs."""
    operands = [(torch.randn(*lead, m, k), torch.randn(*lead, k, n)) for *lead, m, k, n in shapes]
    flops = sum(2 * torch.Size(shape).numel() for shape in shapes)
    return (lambda: [torch.matmul(a, b) for a, b in operands]), flops


def _rate(shapes: list[tuple[int, ...]]) -> dict[str, float]:
    fn, flops = _products(shapes)
    return {name: flops / seconds for name, seconds in _seconds(fn).items()}


def _with_gradients(m: int, k: int, n: int) -> list[tuple[int, int, int]]:
    """A forward [m, k] x [k, n] product and its two backward ones."""
    return [(m, k, n), (m, n, k), (k, m, n)]


def gemm_rates(tokens: int, targets: int, n_items: int) -> dict[str, dict[str, float]]:
    """FLOP/s of the epoch's matrix products, by group, at the sizes of one average batch: each
    forward product with its two backward ones, fp32, this process's threads. `logits` takes
    the faster of one [M, d] x [d, N] product and 16 MB row chunks (`catalog_softmax_ce`);
    `square_2048` is for reference: the machine's rate on a large square product."""
    d, width, N = RECIPE["dim"], RECIPE["max_len"], n_items - 1
    linear = [s for i, o in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d))
              for s in _with_gradients(tokens, i, o)]  # fmt: skip
    rows = max(1, -(-tokens // width))
    # QK^T and dO V^T are [L, d] x [d, L]; AV, dV, dQ and dK are [L, L] x [L, d].
    attention = [(rows, width, d, width)] * 2 + [(rows, width, width, d)] * 4
    chunk = max(1, (1 << 22) // N)
    blocked, whole = _rate(_with_gradients(chunk, d, N)), _rate(_with_gradients(targets, d, N))
    return {"linear": _rate(linear), "attention": _rate(attention),
            "logits": {c: max(blocked[c], whole[c]) for c in CLOCKS},
            "square_2048": _rate([(2048, 2048, 2048)])}  # fmt: skip


def _categories(prof) -> dict[str, float]:
    """Self CPU seconds per category per step, from a torch.profiler run."""
    out = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for event in prof.key_averages():
        name = next((c for c, ops in CATEGORIES.items() if event.key in ops), "other")
        out[name] += event.self_cpu_time_total / 1e6 / PROFILED_STEPS
    return out


def epoch_worker(data: str, batches: int, threads: int) -> dict:
    """One measurement in this process, of whichever recsys_dpo is first on sys.path."""
    torch.set_num_threads(threads)
    dm = SequenceDataModule(data, max_len=RECIPE["max_len"], batch_size=RECIPE_BATCH, seed=0)
    dm.setup()
    epoch: list[dict[str, torch.Tensor]] = []
    # One whole epoch of data loading and collation.
    loading = _timed(lambda: epoch.extend(dm.train_dataloader()))
    torch.manual_seed(0)
    module = ReferenceModule("sasrec", RECIPE, dm.n_items, dm.n_users, loss="ce", lr=RECIPE_LR)
    with torch.no_grad():  # the same initial network in both trees must give the same loss
        initial_loss = float(module.eval().reference_loss(epoch[0]))
    module.train()
    optimizer = module.configure_optimizers()

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = module.reference_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP)
        optimizer.step()
        return float(loss.detach())

    step(epoch[0])  # warm-up: allocator, kernels
    timed = epoch[1 : 1 + batches]
    losses: list[float] = []
    step_s = {c: t / len(timed) for c, t in _timed(lambda: losses.extend(map(step, timed))).items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in epoch[1 + batches : 1 + batches + PROFILED_STEPS]:
            step(batch)
    flops, n_steps = epoch_flops(epoch, dm.n_items), len(epoch)
    rates = gemm_rates(round(flops["tokens"] / n_steps), round(flops["targets"] / n_steps),
                       dm.n_items)  # fmt: skip
    groups = {"linear": flops["useful"] - flops["logits"] - flops["attention"],
              "attention": flops["attention"], "logits": flops["logits"]}  # fmt: skip
    bound = {c: sum(groups[g] / rates[g][c] for g in groups) for c in CLOCKS}
    epoch_s = {c: step_s[c] * n_steps + loading[c] for c in CLOCKS}
    timed_targets = sum(int((b["targets_seq"] != 0).sum()) for b in timed) / len(timed)
    return {
        "package": recsys_dpo.__file__, "initial_loss": initial_loss, "losses": losses,
        "step_s": step_s, "epoch_s": epoch_s, "loading_s": loading, "steps_per_epoch": n_steps,
        "timed_targets_over_epoch_mean": timed_targets / (flops["targets"] / n_steps),
        "profile_s_per_step": _categories(prof), "flops": flops, "gemm_flops_per_s": rates,
        "bound_s": bound, "achieved_flops_per_s": {c: flops["useful"] / epoch_s[c] for c in CLOCKS},
        "ratio_to_bound": {c: epoch_s[c] / bound[c] for c in CLOCKS},
        "loadavg_end": os.getloadavg(),
    }  # fmt: skip


def quality_worker(data: str, epochs: int, seed: int, threads: int, out: str) -> None:
    """Train the recipe `epochs` epochs from `seed` (plain loop as in `epoch_worker`) and save
    the model's weights after each epoch to out/epoch<N>.pt, for one evaluator to score."""
    torch.set_num_threads(threads)
    dm = SequenceDataModule(data, max_len=RECIPE["max_len"], batch_size=RECIPE_BATCH, seed=seed)
    dm.setup()
    torch.manual_seed(seed)
    module = ReferenceModule("sasrec", RECIPE, dm.n_items, dm.n_users, loss="ce", lr=RECIPE_LR)
    module.train()
    optimizer = module.configure_optimizers()
    loader = dm.train_dataloader()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            loss = module.reference_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP)
            optimizer.step()
        torch.save(module.model.state_dict(), Path(out) / f"epoch{epoch}.pt")


@torch.no_grad()
def valid_metrics(data: str, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """Valid HR@10 / NDCG@10 of saved SASRec weights, by this tree's training-time evaluator."""
    dm = SequenceDataModule(data, max_len=RECIPE["max_len"], batch_size=512, seed=0)
    dm.setup()
    model = SASRec(n_items=dm.n_items, n_users=dm.n_users, **RECIPE)
    model.load_state_dict(state)
    model.eval()
    sums: dict[str, float] = {}
    for batch in dm.val_dataloader():
        for name, values in ranking_metrics(model, batch, 10).items():
            sums[name] = sums.get(name, 0.0) + float(values.sum())
    return {name: total / len(dm.ranking_set) for name, total in sums.items()}


def run_quality_check(data: str, before: str, epochs: int, seeds: list[int], threads: int) -> dict:
    """Valid NDCG@10 after each of `epochs` epochs, per tree and seed; both trees' weights
    scored by the same evaluator (this tree's)."""
    trees = {"before": str(Path(before).resolve()), "after": str(Path(__file__).parents[1])}
    results: dict[str, dict[int, list[dict[str, float]]]] = {name: {} for name in trees}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name, tree in trees.items():
                out = Path(tmp) / f"{name}-{seed}"
                out.mkdir()
                env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(threads)}
                command = [sys.executable, __file__, "_quality_worker", "--data", data,
                           "--epochs", str(epochs), "--seed", str(seed),
                           "--threads", str(threads), "--out", str(out)]  # fmt: skip
                subprocess.run(command, env=env, check=True, capture_output=True)
                results[name][seed] = [
                    valid_metrics(data, torch.load(out / f"epoch{e}.pt", weights_only=True))
                    for e in range(epochs)
                ]
                print(f"{name} seed {seed}: {results[name][seed]}", flush=True)
    return {"config": {"recipe": RECIPE, "batch": RECIPE_BATCH, "epochs": epochs,
                       "seeds": seeds, "threads": threads, "trees": trees},
            "loadavg": {"start": load_start, "end": os.getloadavg()},
            "valid": results}  # fmt: skip


def _median_of(results: list[dict], key: str) -> dict[str, float]:
    return {k: statistics.median(r[key][k] for r in results) for k in results[0][key]}


def run_epoch_benchmark(data: str, before: str, batches: int, repeats: int, threads: int) -> dict:
    """Alternate before/after worker processes `repeats` times; medians per tree."""
    trees = {"before": str(Path(before).resolve()), "after": str(Path(__file__).parents[1])}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    load_start = os.getloadavg()
    for _ in range(repeats):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(threads)}
            command = [sys.executable, __file__, "_worker", "--data", data,
                       "--batches", str(batches), "--threads", str(threads)]  # fmt: skip
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.splitlines()[-1])
            if not result["package"].startswith(tree):
                raise RuntimeError(f"{name}: imported {result['package']}, not from {tree}")
            runs[name].append(result)
            print(f"{name}: step {result['step_s']} s, epoch / bound "
                  f"{result['ratio_to_bound']}, load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    summary = {}
    for name, results in runs.items():
        keys = ("step_s", "epoch_s", "loading_s", "bound_s", "achieved_flops_per_s",
                "ratio_to_bound")  # fmt: skip
        summary[name] = {k: _median_of(results, k) for k in keys}
        summary[name]["initial_loss"] = results[0]["initial_loss"]
        summary[name]["profile_s_per_step"] = _median_of(results, "profile_s_per_step")
        summary[name]["gemm_flops_per_s"] = {
            g: {c: statistics.median(r["gemm_flops_per_s"][g][c] for r in results) for c in CLOCKS}
            for g in results[0]["gemm_flops_per_s"]
        }
    pairs = list(zip(*runs.values(), strict=True))
    speedup = {c: [b["epoch_s"][c] / a["epoch_s"][c] for b, a in pairs] for c in CLOCKS}
    return {
        "config": {"recipe": RECIPE, "batch": RECIPE_BATCH, "threads": threads,
                   "timed_batches": batches, "repeats": repeats, "data": data, "trees": trees,
                   "extrapolated": "epoch_s = step_s x steps_per_epoch + one whole epoch of "
                   "data loading, step_s the mean over the timed batches of epoch 0"},
        "loadavg": {"start": load_start, "end": os.getloadavg(), "cores": os.cpu_count()},
        "flops": runs["after"][0]["flops"], "summary": summary,
        "speedup_median": {c: statistics.median(v) for c, v in speedup.items()},
        "speedup_per_repeat": speedup,
        "runs": runs,
    }  # fmt: skip


def print_epoch(result: dict) -> None:
    summary, load = result["summary"], result["loadavg"]
    table = Table(title=f"ML-1M SASRec reference epoch, {result['config']['threads']} threads "
                  f"(load average {load['start'][0]:.1f} -> {load['end'][0]:.1f}, "
                  f"{load['cores']} cores)")  # fmt: skip
    for column in ("tree", "clock", "epoch s", "step s", "GFLOP/s", "bound s", "epoch / bound"):
        table.add_column(column, justify="right")
    for name, r in summary.items():
        for c in CLOCKS:
            table.add_row(name, c, f"{r['epoch_s'][c]:.1f}", f"{r['step_s'][c]:.3f}",
                          f"{r['achieved_flops_per_s'][c] / 1e9:.1f}", f"{r['bound_s'][c]:.1f}",
                          f"{r['ratio_to_bound'][c]:.2f}x")  # fmt: skip
    Console().print(table)
    profile_table = Table(title="self CPU seconds per step (torch.profiler)")
    profile_table.add_column("category")
    for name in summary:
        profile_table.add_column(name, justify="right")
    for category in summary["after"]["profile_s_per_step"]:
        profile_table.add_row(category, *(f"{r['profile_s_per_step'][category]:.3f}"
                                          for r in summary.values()))  # fmt: skip
    Console().print(profile_table)
    print(f"speed-up (median of paired repeats): {result['speedup_median']}")


# ---- steps: Lightning overhead, preference vs reference step ----


def steps_benchmark(steps: int, repeats: int) -> None:
    """The `steps` case: Lightning overhead and preference vs reference step."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            for model in MODELS:
                rates = measure(model, device, steps, repeats, Path(tmp))
                results.append({"device": device, "model": model, **rates})
    table = Table(title=f"training step, batch {BATCH}, {N_ITEMS - 1} items, median of "
                  f"{repeats} x {steps} steps (samples/s)")  # fmt: skip
    for column in ("device", "model", "lightning", "plain", "overhead %", "preference",
                   "pref/ref time"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r["device"], r["model"], f"{r['lightning']:,.0f}", f"{r['plain']:,.0f}",
                      f"{r['lightning_overhead_pct']:.1f}", f"{r['preference']:,.0f}",
                      f"{r['preference_over_reference']:.2f}x")  # fmt: skip
    Console().print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    config = {"batch": BATCH, "n_items": N_ITEMS - 1, "max_len": MAX_LEN, "negatives": NEGATIVES,
              "steps": steps, "repeats": repeats, "threads": torch.get_num_threads()}  # fmt: skip
    RESULTS.write_text(json.dumps({"config": config, "results": results}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    steps = commands.add_parser("steps", help="Lightning overhead, preference vs reference")
    steps.add_argument("--steps", type=int, default=30)
    steps.add_argument("--repeats", type=int, default=5)
    for name in ("epoch", "_worker"):
        sub = commands.add_parser(name, help="the ML-1M reference epoch vs the GEMM bound")
        sub.add_argument("--data", required=True, help="the prepared ml1m_sas directory")
        sub.add_argument("--batches", type=int, default=16, help="timed batches per run")
        sub.add_argument("--threads", type=int, default=2)
        if name == "epoch":
            sub.add_argument("--before", required=True, help="source tree of the old code")
            sub.add_argument("--repeats", type=int, default=3)
    quality = commands.add_parser("quality", help="valid NDCG@10 after N epochs, both trees")
    worker = commands.add_parser("_quality_worker")
    for sub in (quality, worker):
        sub.add_argument("--data", required=True, help="the prepared ml1m_sas directory")
        sub.add_argument("--epochs", type=int, default=2)
        sub.add_argument("--threads", type=int, default=2)
    quality.add_argument("--before", required=True, help="source tree of the old code")
    quality.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    worker.add_argument("--seed", type=int, required=True)
    worker.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "quality":
        result = run_quality_check(args.data, args.before, args.epochs, args.seeds, args.threads)
        seeds = "_".join(map(str, args.seeds))
        Path(str(QUALITY_RESULTS).format(seeds=seeds)).write_text(json.dumps(result, indent=2))
    elif args.command == "_quality_worker":
        quality_worker(args.data, args.epochs, args.seed, args.threads, args.out)
    elif args.command == "steps":
        steps_benchmark(args.steps, args.repeats)
    elif args.command == "_worker":
        print(json.dumps(epoch_worker(args.data, args.batches, args.threads)))
    else:
        result = run_epoch_benchmark(args.data, args.before, args.batches, args.repeats,
                                     args.threads)  # fmt: skip
        print_epoch(result)
        path = Path(str(EPOCH_RESULTS).format(threads=args.threads))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
