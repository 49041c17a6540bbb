"""Training-step throughput (samples/s): Lightning vs a plain PyTorch loop, preference vs reference.

    python benchmarks/bench_train.py [--steps 30] [--repeats 5]

For SASRec and two-tower on CPU (and CUDA when available):
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
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from rich.console import Console
from rich.table import Table

from recsys_dpo.training.preference_module import PreferenceModule
from recsys_dpo.training.reference_module import ReferenceModule, model_spec

N_ITEMS, N_USERS, BATCH, MAX_LEN, NEGATIVES = 5001, 10_000, 256, 50, 4
MODELS = {
    "sasrec": {"dim": 64, "n_layers": 2, "n_heads": 2, "max_len": MAX_LEN, "dropout": 0.2},
    "two_tower": {"dim": 64, "hidden": [128], "max_len": MAX_LEN, "dropout": 0.1},
}
RESULTS = Path(__file__).parent / "results" / "bench_train.json"


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
        "preference": lambda: plain_loop(preference_module(model, tmp), preference_step, data,
                                         device),  # fmt: skip
    }
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            seconds[name].append(run())
    rates = {name: steps * BATCH / statistics.median(s) for name, s in seconds.items()}
    rates["lightning_overhead_pct"] = 100 * (rates["plain"] / rates["lightning"] - 1)
    rates["preference_over_reference"] = rates["plain"] / rates["preference"]
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            for model in MODELS:
                rates = measure(model, device, args.steps, args.repeats, Path(tmp))
                results.append({"device": device, "model": model, **rates})
    table = Table(title=f"training step, batch {BATCH}, {N_ITEMS - 1} items, median of "
                  f"{args.repeats} x {args.steps} steps (samples/s)")  # fmt: skip
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
              "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads()}  # fmt: skip
    RESULTS.write_text(json.dumps({"config": config, "results": results}, indent=2))


if __name__ == "__main__":
    main()
