"""Tests for the test-checkpoint helper (tests/checkpoints.py) and elastic.demo."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch
from checkpoints import family_names, hf_greedy, hf_logits, make_checkpoint
from safetensors import safe_open

import elastic.demo as demo

FAMILIES = family_names()


def _prompts(n: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the 3 special tokens: ids 0..2.
    return [[rng.randrange(3, vocab_size) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def _safetensors_keys(path: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {family: make_checkpoint(family, root / family) for family in FAMILIES}


# ----------------------------------------------------------------------------
# make_checkpoint
# ----------------------------------------------------------------------------


def test_family_names(tmp_path: Path) -> None:
    assert FAMILIES == ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]
    with pytest.raises(ValueError, match="unknown family"):
        make_checkpoint("llama", tmp_path / "never-created")
    assert not (tmp_path / "never-created").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_files_and_reload(family: str, checkpoints: dict[str, Path]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = checkpoints[family]
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == family
    assert raw["tie_word_embeddings"] is False
    assert raw["hidden_size"] == 64
    assert "rope_parameters" in raw

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = AutoConfig.from_pretrained(str(path))
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert type(model).__name__ == raw["architectures"][0]
    ids = [5, 17, 300, 2999, 42]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0]
    ref = hf_logits(path, ids)
    assert ref.shape == (len(ids), config.vocab_size) and ref.dtype == torch.float32
    assert torch.isfinite(ref).all()
    # sdpa (default) vs eager (reference) attention: same values up to rounding.
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_family_specific_layout(checkpoints: dict[str, Path]) -> None:
    """Pins down the on-disk format the engine's loader has to handle."""
    keys = {family: _safetensors_keys(path) for family, path in checkpoints.items()}
    cfg = {family: json.loads((path / "config.json").read_text()) for family, path in checkpoints.items()}

    # qwen3_moe: head_dim 32 != 64/4, per-head q/k norm, layer 1 dense.
    q3 = keys["qwen3_moe"]
    assert cfg["qwen3_moe"]["head_dim"] == 32 and cfg["qwen3_moe"]["num_local_experts"] == 8
    assert q3["model.layers.0.self_attn.q_proj.weight"] == (4 * 32, 64)
    assert q3["model.layers.0.self_attn.q_norm.weight"] == (32,)
    assert q3["model.layers.0.mlp.experts.7.gate_proj.weight"] == (32, 64)
    assert q3["model.layers.1.mlp.gate_proj.weight"] == (96, 64)
    assert not any(k.startswith("model.layers.1.mlp.experts.") for k in q3)

    # qwen2_moe: shared expert + its scalar sigmoid gate, qkv bias.
    q2 = keys["qwen2_moe"]
    assert cfg["qwen2_moe"]["num_experts"] == 8 and "num_local_experts" not in cfg["qwen2_moe"]
    assert q2["model.layers.0.mlp.shared_expert.up_proj.weight"] == (64, 64)
    assert q2["model.layers.0.mlp.shared_expert_gate.weight"] == (1, 64)
    assert q2["model.layers.0.self_attn.q_proj.bias"] == (64,)
    assert "model.layers.0.self_attn.o_proj.bias" not in q2

    # mixtral: legacy block_sparse_moe / w1 w2 w3 names.
    mx = keys["mixtral"]
    assert mx["model.layers.0.block_sparse_moe.gate.weight"] == (8, 64)
    assert mx["model.layers.2.block_sparse_moe.experts.7.w1.weight"] == (48, 64)
    assert mx["model.layers.2.block_sparse_moe.experts.7.w2.weight"] == (64, 48)
    assert not any(".mlp." in k for k in mx)

    # olmoe: q/k norm over the whole projection (not per head), clip_qkv.
    ol = keys["olmoe"]
    assert cfg["olmoe"]["clip_qkv"] == 2.0 and cfg["olmoe"]["norm_topk_prob"] is False
    assert ol["model.layers.0.self_attn.q_norm.weight"] == (64,)
    assert ol["model.layers.0.self_attn.k_norm.weight"] == (2 * 16,)


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    a = make_checkpoint("olmoe", tmp_path / "a", seed=3)
    b = make_checkpoint("olmoe", tmp_path / "b", seed=3)
    c = make_checkpoint("olmoe", tmp_path / "c", seed=4)
    data = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert data(a) == data(b)
    assert data(a) != data(c)


def test_config_overrides(tmp_path: Path) -> None:
    path = make_checkpoint("qwen3_moe", tmp_path / "q", num_hidden_layers=2, mlp_only_layers=[], num_experts=4)
    raw = json.loads((path / "config.json").read_text())
    assert raw["num_hidden_layers"] == 2 and raw["num_local_experts"] == 4
    keys = _safetensors_keys(path)
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in keys
    assert not any(k.startswith("model.layers.2.") for k in keys)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_sharded(family: str, tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    path = make_checkpoint(family, tmp_path / "sharded", shard=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert not (path / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == set(_safetensors_keys(path))
    # Same seed => same weights as the single-file checkpoint.
    assert _safetensors_keys(path) == _safetensors_keys(checkpoints[family])
    ids = [7, 8, 9, 1000]
    torch.testing.assert_close(hf_logits(path, ids), hf_logits(checkpoints[family], ids), rtol=0, atol=0)


# ----------------------------------------------------------------------------
# hf_greedy and the robustness of the random init
# ----------------------------------------------------------------------------


def _manual_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    # Full recompute each step (no KV cache): independent of generate().
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(hf_logits(path, seq)[-1].argmax()))
    return seq[len(prompt) :]


def test_hf_greedy_matches_manual_loop_and_ignores_eos(tmp_path: Path) -> None:
    path = make_checkpoint("mixtral", tmp_path / "m")
    prompts = _prompts(2, 3072, seed=1)
    out = hf_greedy(path, prompts, 8)
    assert [len(o) for o in out] == [8, 8]
    assert out == [_manual_greedy(path, p, 8) for p in prompts]

    # Declare the first generated token as EOS (config + generation_config):
    # generation must still run the full length.
    eos_path = make_checkpoint("mixtral", tmp_path / "eos", eos_token_id=out[0][0])
    assert json.loads((eos_path / "generation_config.json").read_text())["eos_token_id"] == out[0][0]
    assert hf_greedy(eos_path, prompts[:1], 8) == out[:1]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_is_well_conditioned(family: str, checkpoints: dict[str, Path]) -> None:
    path = checkpoints[family]
    prompts = _prompts(4, 3072, seed=2)

    gaps = []
    for prompt in prompts:
        top2 = hf_logits(path, prompt).topk(2, dim=-1).values
        gaps.append(top2[:, 0] - top2[:, 1])
    gap = torch.cat(gaps)
    assert (gap > 1e-3).float().mean() >= 0.95, gap.min()

    outs = hf_greedy(path, prompts, 32)
    distinct = [len(set(o)) for o in outs]
    assert max(distinct) >= 8, distinct  # not collapsed onto one repeated token
    assert len({tuple(o) for o in outs}) == len(outs)  # continuations depend on the prompt


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------

_UNICODE_SAMPLES = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "你好，世界！混合专家模型",
    "emoji 😀🎉🚀 zwj 👩‍👩‍👧‍👦 flags 🇯🇵🇫🇷 skin 👍🏽",
    "combining: e\u0301 vs \u00e9, Å, ﬁ ligature, \u200b zero-width, \u00a0nbsp",
    "math ∑∫√∞ ≠ ≤, RTL: שלום مرحبا, Devanagari: नमस्ते",
    "code: def f(x):\n    return {'a': [1, 2, 3]}  # ok",
    "\x00\x01\x7f control chars and \ufffd replacement",
    "<|im_start|> is not special inside plain text? It is.",
]


@pytest.fixture(scope="module")
def tokenizer_dir(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["qwen3_moe"]


@pytest.mark.parametrize("text", _UNICODE_SAMPLES)
def test_tokenizer_roundtrip(text: str, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok.encode(text, add_special_tokens=True)
    assert tok.decode(ids) == text
    # Byte-level BPE: every id decodes on its own without error.
    assert all(isinstance(tok.decode([i]), str) for i in ids)


def test_tokenizer_specials_and_chat_template(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert 2000 <= len(tok) <= 4000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert [tok.convert_tokens_to_ids(t) for t in demo.SPECIAL_TOKENS] == [0, 1, 2]
    assert "<|im_start|>" in tok.all_special_tokens
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[:1] == [1]
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>"), skip_special_tokens=True) == "user\nhi"
    assert tok.encode("plain text", add_special_tokens=True) == tok.encode("plain text", add_special_tokens=False)

    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in cfg and cfg["tokenizer_class"] == "PreTrainedTokenizerFast"

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 你好"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi 你好<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == expected + "<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tok.encode(prompt)


def test_tokenizer_build_is_deterministic(tmp_path: Path, tokenizer_dir: Path) -> None:
    demo.build_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


# ----------------------------------------------------------------------------
# ensure_demo_model
# ----------------------------------------------------------------------------


def test_ensure_demo_model_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("ELASTIC_CACHE_DIR", str(tmp_path / "env-cache"))
    path = demo.ensure_demo_model()
    assert path == tmp_path / "env-cache" / demo.DEMO_MODEL_DIRNAME
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    assert demo.ensure_demo_model(tmp_path / "env-cache") == path
    assert weights.stat().st_mtime_ns == mtime  # not rebuilt
    assert sorted(p.name for p in path.parent.iterdir()) == [demo.DEMO_MODEL_DIRNAME]  # no temp leftovers

    cfg = json.loads((path / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(path))
    assert cfg["model_type"] == "qwen3_moe" and cfg["vocab_size"] == len(tok)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (
        256,
        4,
        16,
        4,
    )
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (8, 2, 32)
    assert cfg["eos_token_id"] == tok.eos_token_id
    with safe_open(str(weights), framework="pt") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    gen = json.loads((path / "generation_config.json").read_text())
    assert tok.eos_token_id in gen["eos_token_id"]

    model = AutoModelForCausalLM.from_pretrained(str(path))
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(ids)


def _fake_build(out: Path, seed: int) -> None:
    # Stand-in for the real (seconds-long) build: just the files _is_complete checks.
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (out / name).write_text(f"{name} {seed} {threading.get_ident()}")


def test_ensure_demo_model_concurrent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "_build_demo_model", _fake_build)
    barrier = threading.Barrier(4)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(demo.ensure_demo_model(tmp_path))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    final = tmp_path / demo.DEMO_MODEL_DIRNAME
    assert results == [final] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.DEMO_MODEL_DIRNAME]
    # All files come from one builder (no mixing of two builds).
    assert len({(final / n).read_text().split()[-1] for n in ("config.json", "model.safetensors")}) == 1


def test_ensure_demo_model_repairs_broken_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "_build_demo_model", _fake_build)
    final = tmp_path / demo.DEMO_MODEL_DIRNAME
    final.mkdir()
    (final / "config.json").write_text("{}")  # incomplete: no weights, no marker
    assert demo.ensure_demo_model(tmp_path) == final
    assert (final / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.DEMO_MODEL_DIRNAME]
