"""LoSA's dynamic loop (Huang et al., "Dynamic Low-Rank Sparse Adaptation for LLMs", ICLR 2025, §3;
algorithms.md §8.4), registered as fine-tuning method "losa":

    Y_i = the input model's block outputs on the first `rank_nsamples` calibration windows (stored once)
    for t = 1..T:   s_t = S − S(1 − t/T)³
        merge the masked adapters into W
        x = RMI rates at s_t on the current model; re-prune W with Wanda/SparseGPT at x, recording
            e_i = Σ((Y_i − Ŷ_i) / ν_i)² / hidden       (Ŷ_i: pruned model's block output; ν_i: per-unit ‖Y_i‖)
        unmerge with the new mask (pruned positions stay zero; SparseGPT's weight updates are kept)
        ranks ∝ e_i with mean r̄_t (rank_start → rank_end), each in [1, r_max]
        fine-tune the adapters on data slice t (the slices partition the data: none is used twice)
    merge: a plain model exactly as sparse as the last masks

A checkpoint is written after every step (`checkpoint.py`), and a run resumes from it. Under several
processes (`parallel.py`) every process runs every step on the same data: the training on its share of each
micro-batch, the re-prune on its share of the calibration windows with the statistics and error sums added
over all; the main process writes the checkpoint, and every process resumes from it. The last merge is
measured against the adapted model (`Job.merge_checked`: max |logit difference|).

An already-pruned input (`pruned_input.py`: e.g. an OWL or ATP model from `sparsellm prune`) keeps its masks
and per-block rates: the ramp and RMI are how LoSA reaches S from a dense model, so no step re-prunes. Each of
the T steps then fine-tunes the masked adapters on its own data slice with mean rank r̄_t, shared equally by
the blocks (there is no dense model to measure reconstruction errors against).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace


from ..allocate import resolve_allocation
from ..allocate.rmi import RMIConfig
from ..config import setting
from ..distributed import local_prefix, shard_windows, world
from ..engine import block_outputs, linear_sparsity, prune_blocks
from ..errors import UsageError
from ..lazy import lazy_import
from ..models import get_blocks
from ..registry import get, register
from .baselines import MaskedLoRAConfig
from .schedule import allocate_ranks, cubic_schedule

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")


@dataclass
class LoSAConfig(MaskedLoRAConfig):
    """LoSA's own settings: r_max (from masked LoRA), the T steps of the cubic ramp, the windows whose dense
    block outputs are kept for the rank allocation (memory: L × rank_nsamples × seqlen × hidden), the mean
    rank r̄_t from rank_start to rank_end (paper: 6 → 10), and RMI's settings for the rates at every step."""

    steps: int = setting(5, "LoSA: T steps, sparsity s_t = S − S(1 − t/T)³")
    rank_nsamples: int = setting(8, "LoSA: windows whose dense block outputs are kept for the rank allocation")
    rank_start: float = setting(6.0, "LoSA: mean rank at the first step")
    rank_end: float = setting(10.0, "LoSA: mean rank at the last step")
    rmi: RMIConfig = field(default_factory=RMIConfig)

    def validate(self, config) -> "LoSAConfig":
        """Checks against the whole FinetuneConfig `config` (validated apart from this). Raises UsageError."""
        if config.prune.nm is not None:
            raise UsageError("LoSA ramps an unstructured sparsity over its steps; for an N:M pattern use "
                             "--method masked-lora (the mask of a re-pruned N:M model never changes)")
        if self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")
        super().validate(config)
        for name in ("rank_start", "rank_end"):
            if not 1 <= getattr(self, name) <= self.r_max:
                raise UsageError(f"--{name} must be in [1, r_max = {self.r_max}], got {getattr(self, name)}")
        if self.rank_nsamples < 1:
            raise UsageError(f"--rank_nsamples must be >= 1, got {self.rank_nsamples}")
        self.rmi.validate(config.sparsity_ratio)
        if config.training.ft_nsamples < self.steps:
            raise UsageError(f"--ft_nsamples {config.training.ft_nsamples} cannot give each of the {self.steps} "
                             "LoSA steps its own slice")
        return self

    def check_examples(self, n: int) -> None:
        """UsageError unless `n` fine-tuning examples give every step its own slice."""
        data_slices(n, self.steps)

    def mean_rank(self, t: int) -> float:
        """r̄_t for step t = 1..T, linear from rank_start to rank_end (T = 1: rank_end)."""
        if self.steps == 1:
            return self.rank_end
        return self.rank_start + (self.rank_end - self.rank_start) * (t - 1) / (self.steps - 1)


def data_slices(n: int, steps: int) -> list[tuple[int, int]]:
    """Partition range(n) into `steps` consecutive slices of (nearly) equal size. Raises UsageError if n < steps."""
    if n < steps:
        raise UsageError(f"{n} fine-tuning examples cannot give each of {steps} steps its own slice")
    return [(n * t // steps, n * (t + 1) // steps) for t in range(steps)]


def dense_outputs(model, ids: torch.Tensor, batch_size: int | None = None,
                  progress: bool = False) -> list[torch.Tensor]:
    """Every block's outputs on `ids` (k, seqlen), from the model as it is now: L tensors (k, seqlen, hidden)."""
    return [Y.clone() for _, Y in block_outputs(model, ids, batch_size, progress)]


def normalised_error(dense: torch.Tensor, pruned: torch.Tensor, rows: slice | None = None) -> float:
    """LoSA's per-block error (§8.3): Σ over tokens and units of ((Y − Ŷ) / ν)² / hidden, where ν (hidden,)
    is the L2 norm of each hidden unit of the dense output Y over all tokens. Shapes (k, seqlen, hidden).

    `rows` (several processes: the engine gives each its share of the windows): `pruned` holds only the
    windows `rows` of `dense`; each unit's squared differences are summed over the processes (a collective:
    every process calls it), so every process gets the error of all k windows."""
    Y = dense.float().reshape(-1, dense.shape[-1])
    nu = Y.norm(dim=0).clamp_min(1e-12)
    if rows is None:
        return float((((Y - pruned.to(Y.device).float().reshape(Y.shape)) / nu) ** 2).sum()) / Y.shape[1]
    from ..distributed import _reduce

    mine = dense[rows].float().reshape(-1, Y.shape[1])
    per_unit = ((mine - pruned.to(Y.device).float().reshape(mine.shape)) ** 2).sum(dim=0)
    return float((_reduce(per_unit) / nu ** 2).sum()) / Y.shape[1]


@register("finetune", "losa", LoSAConfig, needs="checkpoint")
def losa(job) -> None:
    """LoSA: cubic sparsity ramp, RMI rates and error-proportional ranks at every step"""
    from .checkpoint import examples_sha, load_checkpoint, save_checkpoint, settings_key  # these import torch
    from .masked_lora import add_masked_lora, adapter_ranks, lora_layers, merge, set_ranks, unmerge, unwrapped
    from .parallel import main_writes

    model, config, calib, report = job.model, job.config, job.calib, job.report
    own, lc, pc = config.method_config, config.lora, config.prune
    L = len(get_blocks(model))
    kept = job.pruned_input  # an already-pruned input: its masks and rates stay, no step re-prunes
    k = min(own.rank_nsamples, calib.shape[0])
    dense = None
    if kept is None:
        t0 = time.perf_counter()
        dense = dense_outputs(model, calib[:k], pc.calibration.batch_size)  # the input model's, before any step
        report["dense_outputs_seconds"] = time.perf_counter() - t0
    add_masked_lora(model, lc.lora_r, lc.lora_alpha, lc.lora_dropout, own.r_max)
    set_ranks(model, [lc.lora_r] * L)
    key = settings_key(config, job.model_id, examples_sha(job.examples), job.eval_seqlen)
    start = 0
    ckpt = job.checkpoint_dir
    if job.resume:
        state = load_checkpoint(ckpt, model, key)
        start, report["steps"] = state["step"], state["steps"]
        log.info("resumed after step %d of %d from %s", start, own.steps, ckpt)
    schedule = cubic_schedule(config.sparsity_ratio, own.steps)
    slices = data_slices(len(job.examples), own.steps)
    for t in range(start + 1, own.steps + 1):
        entry = {"step": t, "mean_rank": own.mean_rank(t)}
        if kept is None:
            entry.update(_reprune(job, dense, k, schedule[t - 1], own.mean_rank(t)))
        else:  # the input's masks and rates; no reconstruction error without a dense model: equal ranks
            unmerge(model)
            entry.update(target=config.sparsity_ratio, rates=kept.rates,
                         ranks=allocate_ranks([0.0] * L, own.mean_rank(t), own.r_max))
        set_ranks(model, entry["ranks"])
        a, b = slices[t - 1]
        entry["data_slice"] = [a, b]
        entry["train"] = job.train(model, job.examples[a:b])
        if t == own.steps:
            entry["merge"] = job.merge_checked(lambda: merge(model))
        else:
            merge(model)
        with unwrapped(model):
            entry["measured"] = linear_sparsity(model)["sparsity"]
        entry["ppl"] = job.evaluate()
        report["steps"].append(entry)
        if ckpt is not None:  # several processes: they hold the same state; the main one writes it
            main_writes(lambda: save_checkpoint(ckpt, model, {"key": key, "step": t, "ranks": adapter_ranks(model),
                                                              "steps": report["steps"]}))
        log.info("LoSA step %d/%d: target %.4f, measured %.4f, mean rank %.1f, train loss %.4f → %.4f%s", t,
                 own.steps, entry["target"], entry["measured"], entry["mean_rank"], entry["train"]["losses"][0],
                 entry["train"]["losses"][-1], f", ppl {entry['ppl']['ppl']:.3f}" if entry["ppl"] else "")


def _reprune(job, dense: list, k: int, s_t: float, mean_rank: float) -> dict:
    """One step's re-pruning: merge the adapters, RMI rates at s_t on the current model, re-prune the merged
    weights recording each block's error against the input's outputs `dense` (first `k` windows), unmerge
    with the new masks, ranks from the errors with mean `mean_rank`. Returns the step's report entries."""
    from .masked_lora import lora_layers, merge, unmerge, unwrapped  # imports torch

    model, calib, own, pc = job.model, job.calib, job.config.method_config, job.config.prune
    merge(model)
    step_pc = replace(pc, sparsity_ratio=s_t, allocation="rmi", allocator=own.rmi, diag_nsamples=0)
    errors = [0.0] * len(dense)
    n = calib.shape[0]
    # several processes: the engine gives each its share of the windows (X holds those, `part` of all n);
    # its windows among the first k are the first kl of X, and the error's sums are added over the processes
    sharded = world()[1] > 1 and get("pruner", pc.prune_method).needs != "none"
    part = shard_windows(n) if sharded else None
    kl = local_prefix(n, k, part) if sharded else k

    def record(i, X, D=None, res=None):
        if sharded:
            errors[i] = normalised_error(dense[i], X[:kl], slice(part.start, part.start + kl))
        else:
            errors[i] = normalised_error(dense[i], X[:k])

    with unwrapped(model):
        rates, alloc = resolve_allocation(model, step_pc, calib, job.progress)
        t1 = time.perf_counter()
        blocks = prune_blocks(model, calib, pc.prune_method, rates, None, options=pc.options(),
                              batch_size=pc.calibration.batch_size, progress=job.progress, on_block_end=record,
                              engine=pc.engine)
        pruned = linear_sparsity(model)["sparsity"]
    for m in lora_layers(model):
        m.refresh_mask()
    unmerge(model)
    return dict(target=s_t, rates=alloc["rates"], rmi_seconds=alloc["seconds"], prune_seconds=time.perf_counter() - t1,
                errors=errors, rel_errors=[b["rel_error"] for b in blocks],
                ranks=allocate_ranks(errors, mean_rank, own.r_max), pruned_sparsity=pruned)


__all__ = ["LoSAConfig", "losa", "data_slices", "dense_outputs", "normalised_error"]
