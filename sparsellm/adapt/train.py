"""Fine-tuning data and a plain optimiser loop for the (masked) LoRA adapters (LoSA's fine-tuning stage,
algorithms.md §8.4): AdamW, linear decay with warm-up, gradient clipping, gradient accumulation, optional
gradient checkpointing, a progress bar with loss and tokens/s.

The loop runs where the model is (its parameters' device). With `autocast_dtype` bfloat16 or float16 on a
GPU the forwards run under `torch.autocast` in that dtype while the trained parameters stay float32 (the
adapters are created in float32: master weights); float16 adds a gradient scaler. On the CPU there is no
autocast: the float32 path is what it always was.

Data:
- plain text (next-token loss on every token): `text_examples(tokenizer, source, n, seqlen, seed)`
  reuses the calibration windows (C4 or a local file);
- instruction JSONL (Alpaca-style `instruction` / `input` / `output`; loss on the response only):
  `instruction_examples(tokenizer, path, max_length)`, with the Alpaca prompt template.
Each example is (input_ids (T,), labels (T,)) with -100 where no loss is taken.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from .. import distributed
from ..errors import UsageError
from ..lazy import lazy_import
from .parallel import check_same_examples, label_tokens, row_share, sync_gradients, token_loss

torch = lazy_import("torch")

PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


def text_examples(tokenizer, source: str, n: int, seqlen: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` windows of `seqlen` tokens from `source` ("c4" or a local text file), loss on every token."""
    from ..data import calibration_windows

    ids = calibration_windows(tokenizer, source, n, seqlen, seed)
    return [(row, row.clone()) for row in ids]


def instruction_examples(tokenizer, path, max_length: int = 1024,
                         rows: dict | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Alpaca-style rows from a JSON list or JSON-lines file. The prompt tokens get label -100, the
    response tokens (plus EOS) are learned; rows are truncated to `max_length`. Rows without an
    `instruction` and an `output`, or whose prompt alone fills `max_length`, are dropped and counted (a log
    line, and `rows` filled with `data.check_rows`'s count). Raises UsageError for a missing file, bad
    JSON, no usable row, or more than 10% of the rows dropped."""
    import logging

    from ..data import check_rows

    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"instruction data not found: {path}")
    text = p.read_text(encoding="utf-8")
    is_list = text.lstrip().startswith("[")
    try:
        items = list(enumerate(json.loads(text), 1)) if is_list else [
            (n, json.loads(ln)) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    except ValueError as e:
        raise UsageError(f"{path} is neither a JSON list nor JSON lines: {e}") from None
    out, bad, long_, first = [], 0, 0, None
    eos = tokenizer.eos_token_id
    for n, r in items:
        if not isinstance(r, dict) or not str(r.get("instruction", "")).strip() or not str(r.get("output", "")).strip():
            bad, first = bad + 1, first or n
            continue
        extra = str(r.get("input") or "").strip()
        prompt = PROMPT.format(ctx=", paired with an input that provides further context" if extra else "",
                               instruction=r["instruction"], input=f"### Input:\n{extra}\n\n" if extra else "")
        p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        r_ids = tokenizer(str(r["output"]), add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
        ids = (p_ids + r_ids)[:max_length]
        labels = ([-100] * len(p_ids) + r_ids)[:max_length]
        if all(x == -100 for x in labels):
            long_, first = long_ + 1, first or n  # the prompt alone fills max_length: nothing to learn
            continue
        out.append((torch.tensor(ids), torch.tensor(labels)))
    if not out:
        why = (f"the prompt alone fills --ft_seqlen {max_length} in {long_} of them" if long_
               else "each needs 'instruction' and 'output'")
        raise UsageError(f"{path} has no usable rows ({why})")
    why = f"{bad} without 'instruction' and 'output', {long_} with a prompt of {max_length} tokens or more"
    count = check_rows(p, len(items), bad + long_, first, why, "row" if is_list else "line")
    logging.getLogger("sparsellm").info("fine-tuning data %s: %d rows used, %d dropped%s", p, len(out), bad + long_,
                                        f" ({why})" if bad + long_ else "")
    if rows is not None:
        rows.update(count)
    return out


def _batches(examples, batch_size, pad_id):
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        T = max(len(x) for x, _ in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), T), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for k, (x, y) in enumerate(chunk):
            ids[k, :len(x)], labels[k, :len(y)], mask[k, :len(x)] = x, y, 1
        yield ids, labels, mask


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` optimiser steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def train(model, examples, lr: float = 2e-4, batch_size: int = 4, grad_accum: int = 2, epochs: int = 1,
          warmup_ratio: float = 0.03, weight_decay: float = 0.001, max_grad_norm: float = 0.3,
          gradient_checkpointing: bool = False, pad_id: int = 0, progress: bool = True, optimizer=None,
          state: dict | None = None, autocast_dtype=None) -> dict:
    """Train the parameters of `model` that require grad on `examples` (list of (input_ids, labels)), on the
    device of the model's parameters. Returns {"losses": [mean loss per optimiser step], "tokens", "seconds",
    "steps", "optimizer": state}. `optimizer` (an AdamW state dict) resumes the moments. `autocast_dtype`: the
    forward dtype under autocast on a GPU (None, float32, or any dtype on the CPU: no autocast). Raises
    UsageError for bad settings, and under several processes for examples that differ between them.

    Several processes (`accelerate launch` / `torchrun`, `parallel.py`): every process walks the same
    micro-batches of `batch_size` examples and runs its share of each one's rows; the gradients are summed
    over the processes before every optimiser step, so all of them take the single-process steps (the same
    losses, tokens and adapters up to the order of float sums)."""
    if lr <= 0 or batch_size < 1 or grad_accum < 1 or epochs < 1 or not 0 <= warmup_ratio < 1:
        raise UsageError("lr must be > 0, batch size / gradient accumulation / epochs >= 1, warm-up ratio in [0, 1)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("nothing to train: no parameter requires grad")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer is not None:
        opt.load_state_dict(optimizer)
    micro = math.ceil(len(examples) / batch_size) * epochs
    total = max(1, math.ceil(micro / grad_accum))
    warmup = int(total * warmup_ratio)
    device = params[0].device
    amp = autocast_dtype if device.type == "cuda" and autocast_dtype in (torch.bfloat16, torch.float16) else None
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None  # fp16 gradients underflow unscaled
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    dp = distributed.world()[1] > 1
    if dp:  # several processes (parallel.py): the same examples and the same starting adapters everywhere
        check_same_examples(examples)
        distributed.broadcast_(params)
    model.train()
    losses, tokens, step, acc_loss, acc_n = [], 0, 0, 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="fine-tune", unit="step", disable=not progress or not distributed.is_main(),
               leave=False)
    try:
        for _ in range(epochs):
            for k, (ids, labels, mask) in enumerate(_batches(examples, batch_size, pad_id)):
                tokens += int(mask.sum())
                if dp:  # this process's rows; the loss over the whole micro-batch's label tokens (parallel.py)
                    count, part = label_tokens(labels), row_share(ids.shape[0])
                    ids, labels, mask = ids[part], labels[part], mask[part]
                ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
                if ids.shape[0]:
                    with torch.autocast(device_type="cuda", dtype=amp) if amp is not None else contextlib.nullcontext():
                        if dp:
                            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                            full = token_loss(logits, labels, count)
                        else:
                            full = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
                    loss = full / grad_accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    acc_loss += float(full.detach())
                acc_n += 1
                if acc_n == grad_accum or (k + 1) * batch_size >= len(examples):
                    acc_loss, = sync_gradients(params, acc_loss)  # summed over the processes (none: as is)
                    for g in opt.param_groups:
                        g["lr"] = lr_at(step, total, lr, warmup)
                    if scaler is not None:
                        scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(acc_loss / acc_n)
                    acc_loss, acc_n, step = 0.0, 0, step + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
    finally:
        bar.close()
        model.eval()
        if gradient_checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    return {"losses": losses, "tokens": tokens, "seconds": time.perf_counter() - t0, "steps": step,
            "optimizer": opt.state_dict()}


def finetune_examples(tokenizer, data: str, n: int, seqlen: int, seed: int,
                      rows: dict | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fine-tuning set: `n` examples of at most `seqlen` tokens. `data` is "c4" or a local text file
    (.txt / .jsonl with `text`: next-token windows drawn with `seed`), or an instruction file (.json / .jsonl
    whose rows have `instruction` and `output`: the first n usable rows after a `seed` shuffle, loss on
    the response only). `rows`, if given, is filled with the file's row count (`data.check_rows`).
    Raises UsageError for a missing file, too little text, no usable rows, or more than 10% dropped."""
    import random

    from ..data import corpus_rows

    if n < 1:
        raise UsageError(f"--ft_nsamples must be >= 1, got {n}")
    p = Path(data).expanduser()
    if data != "c4" and p.suffix in (".json", ".jsonl") and p.is_file() and _is_instruction(p):
        examples = instruction_examples(tokenizer, p, seqlen, rows)
        random.Random(seed).shuffle(examples)
        if len(examples) < n:
            raise UsageError(f"{data} has {len(examples)} usable instruction rows, fewer than --ft_nsamples {n}")
        return examples[:n]
    examples = text_examples(tokenizer, data, n, seqlen, seed)
    if rows is not None:
        rows.update(corpus_rows(data))
    return examples


def _is_instruction(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8-sig") as f:
            head = f.read(65536).lstrip()
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    try:
        if head.startswith("["):
            row = json.loads(path.read_text(encoding="utf-8-sig"))[0]
        else:
            row = json.loads(head.splitlines()[0])
    except (ValueError, IndexError):
        return False
    return isinstance(row, dict) and "instruction" in row
