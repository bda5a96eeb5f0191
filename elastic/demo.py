"""Built-in demo model for ``elastic serve`` when no MODEL is given.

Nothing here touches the network: the tokenizer is trained locally on text that
ships with Python (stdlib docstrings) plus a small embedded multilingual sample,
and the model is a randomly initialised Qwen3-MoE built with transformers' own
classes, so the resulting directory is an ordinary Hugging Face checkpoint that
any loader (ours or transformers') can read.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CHAT_TEMPLATE",
    "DEMO_MODEL_DIRNAME",
    "EOS_TOKEN",
    "IM_START_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "default_cache_dir",
    "ensure_demo_model",
]

# Bump the suffix whenever the tokenizer, config or init changes: caches built by
# an older version then simply stay unused instead of being silently mixed in.
DEMO_MODEL_DIRNAME = "demo-qwen3-moe-v1"

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
# Order fixes the ids: the BPE trainer assigns 0, 1, 2 in this order.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN)

TOKENIZER_VOCAB_SIZE = 3072  # multiple of 128: friendly to GPU GEMM tiles for lm_head
TOKENIZER_MAX_LENGTH = 4096

# ChatML. `content` may be a plain string or a list of OpenAI-style parts; only
# text parts are rendered (the demo model has no other modality).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- elif message['content'] is not none %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Qwen2-style pre-tokenisation: single digits, words with an optional leading
# non-letter, punctuation runs and whitespace runs. Splitting before the
# byte-level mapping keeps merges from crossing word boundaries.
_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# Stdlib modules whose docstrings form the bulk of the training text. They are
# read from source with `ast`, never imported, so gathering has no side effects.
# Modules missing from a given Python install are skipped.
_CORPUS_MODULES: tuple[str, ...] = (
    "_pydecimal", "argparse", "cmd", "codecs", "configparser", "contextlib",
    "difflib", "doctest", "fractions", "ftplib", "functools", "heapq",
    "ipaddress", "os", "random", "shutil", "smtplib", "socketserver",
    "statistics", "string", "subprocess", "tempfile", "textwrap", "threading",
    "timeit", "turtle", "typing", "uuid",
)

# Always part of the corpus: gives CJK/Cyrillic/emoji some merges (so multi-byte
# tokens exist and streaming detokenisation gets exercised) and guarantees a
# usable tokenizer even where the stdlib sources are not installed.
_EMBEDDED_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. A mixture-of-experts model "
    "routes every token to a few experts chosen by a learned gate, so only a "
    "fraction of the parameters is used for each token.",
    "You are a helpful assistant. Answer the question as briefly as possible.\n"
    "User: What is the capital of France?\nAssistant: The capital of France is Paris.",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += values[i] * weights[i]; }",
    '{"model": "demo", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}',
    "今天天气很好，我们去公园散步吧。机器学习模型需要大量的数据来训练。"
    "你好，世界！请问有什么可以帮您？混合专家模型把每个词元路由到少数几个专家。",
    "こんにちは、世界。今日はいい天気ですね。東京は日本の首都です。",
    "안녕하세요, 세계! 오늘 날씨가 좋네요.",
    "Привет, мир! Сегодня хорошая погода. Москва — столица России.",
    "Hola, mundo. ¿Cómo estás? Mañana será un día soleado en España.",
    "Grüß Gott! Die Straße ist heute sehr ruhig. Äpfel, Öl und Übung.",
    "Bonjour le monde ! Ça va très bien, merci. Où est la bibliothèque ?",
    "Emoji: 😀 😂 🎉 👍 ❤️ 🚀 🔥 ✨ 🤖 👩‍💻 🇫🇷 — symbols: © ® ™ € £ ¥ ° ± × ÷ ≤ ≥ ≠ ∞ → ←",
    "Numbers and dates: 2024-01-31, 3.14159, 1,000,000, 42%, $19.99, 0x1F, 1e-6.",
)

_COMPLETE_MARKER = ".elastic-complete"
# Temp build dirs older than this are leftovers of crashed builders (a build
# takes seconds), so they are safe to delete.
_STALE_TMP_SECONDS = 3600.0


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def _training_corpus() -> list[str]:
    # A fixed module list in a fixed order + deterministic ast walk => the same
    # corpus (and therefore the same tokenizer) for a given Python version.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = list(_EMBEDDED_CORPUS)
    for name in _CORPUS_MODULES:
        for candidate in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
            if candidate.is_file():
                texts.extend(_docstrings(candidate))
                break
    return texts


def build_tokenizer(out_dir: str | Path) -> None:
    """Train a byte-level BPE tokenizer offline and save it to ``out_dir``.

    The result loads with ``transformers.AutoTokenizer.from_pretrained(out_dir)``:
    ChatML chat template (in ``tokenizer_config.json``), eos ``<|im_end|>``,
    pad ``<|endoftext|>``, no bos. Byte-level BPE over the full 256-byte
    alphabet with no normaliser, so any Unicode text round-trips exactly.
    """
    # Imported lazily: `elastic serve MODEL` should not pay for these imports.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets must cover the leading space a token carries.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols up front: nothing is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _training_corpus()
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    if tok.get_vocab_size() != TOKENIZER_VOCAB_SIZE:
        # Only when the stdlib sources are missing; still a valid tokenizer.
        logger.warning(
            "Demo tokenizer has %d tokens instead of %d (small training corpus)",
            tok.get_vocab_size(),
            TOKENIZER_VOCAB_SIZE,
        )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        extra_special_tokens=[IM_START_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=TOKENIZER_MAX_LENGTH,
        # Default cleanup rewrites " ." -> "." etc. and would break round-trips.
        clean_up_tokenization_spaces=False,
    )
    # save_jinja_files=False keeps the template inside tokenizer_config.json
    # rather than a separate chat_template.jinja.
    fast.save_pretrained(str(out), save_jinja_files=False)
    _make_tokenizer_config_portable(out / "tokenizer_config.json")


def _make_tokenizer_config_portable(config_path: Path) -> None:
    # transformers 5 writes its internal class name ("TokenizersBackend") and the
    # v5-only list form of "extra_special_tokens". The classic spellings load in
    # both 4.x and 5.x (v5 maps them onto the new names).
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.pop("extra_special_tokens", None)
    if extra:
        config["additional_special_tokens"] = list(extra)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$ELASTIC_CACHE_DIR``, else ``$XDG_CACHE_HOME/elastic``, else ``~/.cache/elastic``."""
    env = os.environ.get("ELASTIC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "elastic"


def _is_complete(model_dir: Path) -> bool:
    # The marker is written last, just before the atomic rename, so its presence
    # means every other file was fully written.
    required = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
    return (
        (model_dir / _COMPLETE_MARKER).is_file()
        and all((model_dir / name).is_file() for name in required)
        and (
            (model_dir / "model.safetensors").is_file()
            or (model_dir / "model.safetensors.index.json").is_file()
        )
    )


def init_random_weights(model: torch.nn.Module, seed: int, norm_std: float = 0.1, router_gain: float = 1.0,
                        lm_head_gain: float = 3.0) -> None:
    """Deterministic random init, larger than Hugging Face's default (std 0.02).

    With std 0.02 the logits of a small random model are nearly flat, so greedy decoding degenerates
    into one repeated token (and two implementations' rounding can flip the argmax). Fan-in scaled
    weights keep activations O(1) and make next-token choices depend on the context; embeddings N(0, 1)
    keep token identity visible through the residual stream.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Sorted names: the values must not depend on module registration order.
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.ndim == 1 and name.endswith("norm.weight"):
                param.normal_(1.0, norm_std, generator=gen)
            elif param.ndim == 1:
                param.normal_(0.0, 0.1, generator=gen)
            elif "embed_tokens" in name:
                param.normal_(0.0, 1.0, generator=gen)
            else:
                # nn.Linear layout [..., out, in] (also fused 3-D expert tensors): the last dim is the fan-in.
                if name.startswith("lm_head"):
                    gain = lm_head_gain
                elif name.endswith("mlp.gate.weight"):  # the router (not an expert's gate_proj)
                    gain = router_gain
                else:
                    gain = 1.0
                param.normal_(0.0, gain / param.shape[-1] ** 0.5, generator=gen)


def _build_demo_model(out: Path, seed: int) -> None:
    from transformers import AutoTokenizer, GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    t0 = time.perf_counter()
    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    logger.info("Demo tokenizer ready (%d tokens) in %.1fs", len(tokenizer), time.perf_counter() - t0)

    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,  # dense-MLP width; unused since every layer is MoE
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    model = Qwen3MoeForCausalLM(config)
    init_random_weights(model, seed)
    # bf16 on disk like real Qwen3 releases (and half the bytes).
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id
    )
    model.save_pretrained(str(out), safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Demo model written (%.1fM params) in %.1fs", n_params / 1e6, time.perf_counter() - t0)


def _remove_stale_tmp_dirs(parent: Path, prefix: str) -> None:
    now = time.time()
    for entry in parent.glob(f"{prefix}*"):
        try:
            if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass  # raced with another cleaner


def ensure_demo_model(cache_dir: str | Path | None = None) -> Path:
    """Return the demo checkpoint directory, building it on first use.

    Location: ``<cache_dir>/demo-qwen3-moe-v1`` where ``cache_dir`` defaults to
    :func:`default_cache_dir`. Safe against concurrent callers (threads or
    processes): each builds into a private temp dir next to the target and
    publishes it with an atomic rename; losers of the race discard their copy
    and return the winner's. An incomplete directory left at the target (no
    completion marker or missing files) is replaced.
    """
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).absolute()
    final = root / DEMO_MODEL_DIRNAME
    if _is_complete(final):
        return final

    root.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{DEMO_MODEL_DIRNAME}.tmp-"
    _remove_stale_tmp_dirs(root, tmp_prefix)
    logger.info("Building demo model in %s (first use only)", final)
    # Same parent as `final`: rename is atomic only within one filesystem.
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=root))
    try:
        _build_demo_model(tmp, seed=0)
        (tmp / _COMPLETE_MARKER).write_text(DEMO_MODEL_DIRNAME + "\n", encoding="utf-8")
        for _ in range(3):
            try:
                os.rename(tmp, final)
                logger.info("Demo model ready at %s", final)
                return final
            except OSError:
                # `final` exists: another process won the race, or it is a
                # broken leftover (e.g. a file deleted by hand) to replace.
                if _is_complete(final):
                    return final
                if not final.exists():
                    raise
                _discard(final)
        raise RuntimeError(f"could not publish demo model at {final}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _discard(path: Path) -> None:
    # Rename first (atomic) so no reader ever sees a half-deleted directory.
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
    if _is_complete(path):
        return  # a concurrent builder just published a good copy
    try:
        os.rename(path, trash)
    except OSError:
        return  # already gone (someone else discarded it)
    shutil.rmtree(trash, ignore_errors=True)
