"""Shared fixtures: tiny randomly-initialised models of every supported family, a tiny offline tokenizer,
and small local text corpora. Nothing here touches the network."""

from __future__ import annotations

import contextlib
import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the kernel build gives up (and the tests skip) before pytest-timeout (600 s, pyproject.toml) fails them: a test
# failed mid-build would leave the next `ext` test to start the build again, once per test
os.environ.setdefault("SPARSELLM_KERNEL_BUILD_TIMEOUT", "300")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models are dominated by thread start-up costs on a shared 2-core machine: one thread is ~30x faster.
torch.set_num_threads(1)

VOCAB = 128

WORDS = (
    "the a of and to in is was for on that with as by at from his her it an were are which this be "
    "film series actor role television play theatre city river king war game song album band music "
    "first second new old year years time people world house church school team season league "
    "he she they we you one two three four five six seven eight nine ten . , ; : ' \" ( ) - = @"
).split()


def _common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    base.update(kw)
    return base


def make_config(family: str, **overrides):
    """A tiny transformers config of `family`. GQA everywhere it exists (4 query heads, 2 KV heads)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(**_common(tie_word_embeddings=True, **overrides))
    if family == "llama_untied":
        return LlamaConfig(**_common(tie_word_embeddings=False, **overrides))
    if family == "qwen2":
        return Qwen2Config(**_common(**overrides))
    if family == "mistral":
        return MistralConfig(**_common(**{"sliding_window": 8, **overrides}))
    if family == "gemma3":
        kw = dict(num_hidden_layers=3, head_dim=8, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        kw.update(overrides)
        return Gemma3TextConfig(**_common(**kw))
    if family == "opt":
        kw = dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, word_embed_proj_dim=32)
        kw.update(overrides)
        return OPTConfig(**kw)
    raise KeyError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gemma3", "opt"]
MODEL_TYPES = {"llama": "llama", "llama_untied": "llama", "qwen2": "qwen2", "mistral": "mistral",
               "gemma3": "gemma3_text", "opt": "opt"}


def make_model(family: str, seed: int = 0, attn: str = "eager", **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, **overrides), attn_implementation=attn)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "<pad>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tokenizer():
    """A word-level tokenizer over ~100 words (ids < 128), eos '</s>' = 1, unknown words -> '<unk>' = 0."""
    return _build_tokenizer()


def sentences(n: int, seed: int = 0) -> list[str]:
    """`n` pseudo-random sentences made from the tokenizer's words (one token per word)."""
    import random

    rng = random.Random(seed)
    words = [w for w in WORDS if w.isalpha()]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) + " ." for _ in range(n)]


@pytest.fixture
def calib_txt(tmp_path):
    """A local .txt calibration corpus of a few hundred tokens."""
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(sentences(60)), encoding="utf-8")
    return path


@pytest.fixture
def saved_model_dir(tmp_path, tokenizer):
    """A tiny llama (+ tokenizer) written with save_pretrained, as `--model` for CLI runs."""
    d = tmp_path / "model"
    make_model("llama").save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


# ------------------------------------------------------------------ optional extras and markers


def require(module: str):
    """Import an optional extra (lm_eval, onnx, onnxruntime, psutil, ...) for a test module or test.
    Outside CI a missing module skips, like `pytest.importorskip`; under CI (the environment variable CI
    set to a non-empty value) it fails instead, so a broken CI environment cannot pass by skipping."""
    if os.environ.get("CI"):
        import importlib

        try:
            return importlib.import_module(module)
        except ImportError as e:
            why = str(e)
        pytest.fail(f"optional dependency {module!r} is missing under CI (CI={os.environ['CI']!r}): {why}; "
                    f"install the extra that provides it", pytrace=False)
    return pytest.importorskip(module)


# Tests that took ~1 s or more in repeated `pytest --durations=40` runs on the 2-core dev machine (file::name,
# or file::name[params] for one parametrization); marked `slow`, so `pytest -m "not slow"` skips them. Not
# listed: a file's first test when its time is one-time imports (test_allocate's first ATP case).
SLOW = {
    "test_selfpruner.py::test_cli_search_end_to_end",
    "test_selfpruner.py::test_cli_search_unreachable_endpoint",
    "test_selfpruner.py::test_openai_backend_against_a_loopback_stub",
    "test_zeroshot.py::test_oracle_with_the_raw_answer_key_scores_one",
    "test_zeroshot.py::test_cli_prune_with_zeroshot_eval",
    "test_layerwise.py::test_objective_also_evaluated_is_flagged",
    "test_layerwise.py::test_cli_allocate_search_writes_rates_plots_and_model",
    "test_layerwise.py::test_search_scores_every_beta_and_restores_the_model",
    "test_report_speed.py::test_cli_bench_and_report",
    "test_onnx_speed.py::test_models_with_different_kv_shapes_and_a_full_context_cache",
    "test_onnx_speed.py::test_compare_reports_ratios_and_checks_against_pytorch",
    "test_onnx_speed.py::test_runner_failure_keeps_the_pytorch_results",
    "test_cli.py::test_happy_path_writes_complete_directory",
    "test_cli.py::test_reports_dir_may_contain_the_model",
    "test_layerwise.py::test_cli_search_counts_trials_on_the_models_depth",
    "test_atp_search.py::test_golden_and_grid_pick_the_same_beta_end_to_end",
    "test_zeroshot.py::test_tiny_model_runs_every_task",
    "test_zeroshot.py::test_bundled_task_loads_with_all_documents[boolq]",
    "test_onnx_speed.py::test_a_wrong_graph_is_caught_by_the_logits_check",
    "test_onnx_speed.py::test_exported_prefill_and_kv_decode_match_pytorch",
    "test_ray_search.py::test_worker_fitness_is_an_independent_perplexity_in_order",  # the Ray cluster's start
    "test_ray_search.py::test_two_workers_give_the_serial_search_and_resume_across_worker_counts",
    "test_ray_search.py::test_cli_search_workers_writes_the_serial_result",
    "test_sparse_kernels.py::test_a_build_killed_half_way_does_not_block_the_next_load",  # a real build, ~25 s
    "test_sparse_kernels.py::test_a_build_stopped_at_its_time_limit_leaves_no_compiler_running",  # 6 s of a build
}


def pytest_collection_modifyitems(config, items):
    """Markers by place and name: `cli` for tests/test_cli.py and for tests named with a `cli` word
    (test_cli_..., ..._cli_...; not "clipped"), `zeroshot` for tests/test_zeroshot.py, `slow` from SLOW."""
    for item in items:
        fname = item.path.name
        words = (getattr(item, "originalname", None) or item.name).split("_")
        if fname == "test_cli.py" or "cli" in words:
            item.add_marker(pytest.mark.cli)
        if fname == "test_zeroshot.py":
            item.add_marker(pytest.mark.zeroshot)
        if f"{fname}::{item.name}" in SLOW or f"{fname}::{getattr(item, 'originalname', item.name)}" in SLOW:
            item.add_marker(pytest.mark.slow)


def reply(handler, code: int, data: bytes, ctype: str = "application/json") -> None:
    """Send one HTTP response with `data` from a BaseHTTPRequestHandler (the tests' loopback OpenAI stubs)."""
    handler.send_response(code)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@contextlib.contextmanager
def loopback_server(handler_class):
    """An HTTPServer on 127.0.0.1 (a free port) serving `handler_class` from a daemon thread; yields the server
    and shuts it down after."""
    from http.server import HTTPServer

    srv = HTTPServer(("127.0.0.1", 0), handler_class)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def drop_unchosen(argv: list[str]) -> list[str]:
    """A `finetune` argv without the "--X value" pairs of settings that only fine-tuning methods not among its
    --method (default losa) have: the tests' helpers pass every method's settings, and a non-default setting
    of a method that does not run is refused."""
    from sparsellm.config import flat_names
    from sparsellm.registry import get, names

    last = len(argv) - 1 - argv[::-1].index("--method") if "--method" in argv else None  # argparse: the last wins
    chosen = argv[last + 1].split(",") if last is not None else ["losa"]
    mine = {k for m in chosen if m in names("finetune") for k in flat_names(get("finetune", m).config)}
    theirs = {k for m in names("finetune") if m not in chosen for k in flat_names(get("finetune", m).config)} - mine
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a.startswith("--") and a[2:] in theirs and i + 1 < len(argv):
            skip = True
        else:
            out.append(a)
    return out
