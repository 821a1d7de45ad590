"""Prune a model with the llmcompressor baseline (Wanda / SparseGPT) for timing.

Runs INSIDE bench/.venv-llmc (create it with `bash bench/llmc_env.sh`):

    bench/.venv-llmc/bin/python bench/llmc_prune.py --model_dir DIR \
        --calib_pt calib.pt --method wanda --sparsity 0.5 --mask_structure 0:0 \
        --out_dir OUT --result_json result.json

`--calib_pt` is a torch.save'd int64 tensor [nsamples, seqlen] of token ids (the
same windows our pruner uses); they are fed to `llmcompressor.oneshot` as an
already-tokenized `datasets.Dataset`, in order. Only the Linear layers of the
decoder blocks are pruned (lm_head is ignored). The model is loaded in float32 on
CPU and saved dense (uncompressed safetensors with exact zeros), so vanilla
transformers loads it. The JSON holds the timing of the oneshot call alone, of
the whole script, peak RSS and the measured sparsity of the decoder Linears.
"""
import argparse
import json
import resource
import time

T_START = time.perf_counter()

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import llmcompressor  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier  # noqa: E402


def decoder_sparsity(model) -> float:
    """Fraction of exact zeros over all Linear weights inside model.model.layers."""
    zeros = total = 0
    for m in model.model.layers.modules():
        if isinstance(m, torch.nn.Linear):
            zeros += (m.weight == 0).sum().item()
            total += m.weight.numel()
    return zeros / total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--calib_pt", required=True)
    p.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--mask_structure", default="0:0", help='"0:0" unstructured, "2:4" ...')
    p.add_argument("--out_dir", required=True)
    p.add_argument("--result_json", required=True)
    a = p.parse_args()

    ids = torch.load(a.calib_pt).to(torch.int64)
    nsamples, seqlen = ids.shape
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )

    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model_dir)

    common = dict(
        sparsity=a.sparsity,
        mask_structure=a.mask_structure,
        targets=["Linear"],
        ignore=["re:.*lm_head"],
    )
    if a.method == "wanda":
        recipe = WandaPruningModifier(**common)
    else:
        recipe = SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)

    t0 = time.perf_counter()
    oneshot(
        model=model,
        processor=tok,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
    )
    oneshot_s = time.perf_counter() - t0

    # save_compressed=False -> dense safetensors that vanilla transformers loads
    model.save_pretrained(a.out_dir, save_compressed=False)
    tok.save_pretrained(a.out_dir)

    result = {
        "tool": "llmcompressor",
        "version": llmcompressor.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "method": a.method,
        "sparsity": a.sparsity,
        "mask_structure": a.mask_structure,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "oneshot_seconds": round(oneshot_s, 3),
        "total_seconds": round(time.perf_counter() - T_START, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "measured_sparsity": decoder_sparsity(model),
        "threads": torch.get_num_threads(),
    }
    with open(a.result_json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
