"""Tiny mlx-lm models with seeded random weights, built offline, for tests and demos.

No weights can be downloaded here, so this writes a real mlx-lm model directory (config.json,
model.safetensors, a locally trained byte-level BPE tokenizer with a chat template) that
``mlx_lm.load`` reads like any checkpoint. Replies are gibberish; shapes, caches and timings are real.

    from kvstore.models.builtin import load_builtin
    model, tokenizer = load_builtin("gemma3")       # 3 sliding-window layers + 1 global layer

    python -m kvstore.models.builtin PATH --arch gemma3 --size tiny [--set sliding_window=32]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.models.builtin_families import FAMILIES, family_config
from kvstore.models.fetch import models_root

ARCHITECTURES = tuple(FAMILIES)
SIZES = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        sliding_window=64,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        intermediate_size=512,
        sliding_window=128,
    ),
    "base": dict(
        hidden_size=512,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1536,
        sliding_window=256,
    ),
}
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # dtype -> safetensors code
VOCAB_SIZE = 1024  # BPE training target, special tokens included
BUILD_FORMAT = 1  # recorded in config.json; bump when the files written change
MARKER = "KVSTORE_BUILTIN.txt"

_CHATML = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
_GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
# tokenizer style -> (special tokens, ids in this order; bos; eos; pad; chat template). The eos is the
# end-of-turn token, so generation stops at the end of a reply as with the instruct models imitated.
# Every family but gemma3 speaks ChatML (as Qwen, LFM2 and gpt-oss's MLX conversions mostly do).
_TOKENS = {
    "llama": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_start|>", "<|im_end|>", "<|endoftext|>", _CHATML),
    "gemma3": (
        ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<end_of_turn>",
        "<pad>",
        _GEMMA,
    ),
}


def _style(arch: str) -> str:
    """The tokenizer style (a key of _TOKENS) of arch."""
    return "gemma3" if arch == "gemma3" else "llama"


CORPUS = """\
The agent opened the file and read the first page. It was a report about the payment service, \
and the team wanted a short summary before the meeting. The system had been slow since Monday, \
and nobody knew why. The first agent said that the cache was too small. The second agent said that \
the database was the problem, because every request had to wait for a lock.
We asked the model to explain the error in simple words. It said: the user sends a request, the \
server checks the token, and then the server reads the account from the database. If the token is \
old, the request fails with an error. If the database is busy, the request waits. When many users \
send requests at the same time, the queue grows, the memory fills up, and the whole service becomes slow.
What should we do first? Write a test that shows the bug. Then fix the code, run the tests again, \
and check the logs. Do not change two things at once. Keep a note of what you tried, what worked, \
and what did not work. A good note is short, clear and true.
The manager asked each agent for a plan. The planner wrote a list of steps: read the logs, find the \
slow query, add an index, measure the time again, and report the result. The coder wrote the patch. \
The reviewer read the patch and asked two questions. Why is this value stored twice? What happens \
if the file is empty? The coder answered both questions and changed one line.
Memory matters for agents. An agent that forgets the conversation has to read the whole history again, \
and that takes time. An agent that keeps its memory can answer the next question at once. The store \
keeps the keys and values for every token, so a new turn only needs the new tokens. Shared prefixes \
are saved once, even when many agents use the same system prompt.
On Tuesday the team tried again. The new version was faster: the first token came after 40 ms \
instead of 900 ms, and the server handled 2000 requests per second. Everyone was happy, but the \
reviewer said we should still watch the memory. Numbers like 1, 2, 3, 10, 100 and 1024 appear in \
many reports, and so do dates like 2024-05-17 and times like 09:30.
Here is a short story. Once upon a time there was a small robot who lived in a quiet house near the \
river. Every morning the robot made tea, opened the window and read the news. One day a bird came \
to the window and asked for help. Its nest had fallen from the tree. The robot found a box, put some \
grass inside, and carried the box back to the tree. The bird said thank you, and the robot went home \
to finish its tea. That night it rained, but the nest was safe and dry.
Questions and answers help us learn. What is the capital of France? Paris. How many days are in a \
week? Seven. Which is larger, the sun or the moon? The sun is much larger. Why is the sky blue? \
Because air scatters blue light more than red light. Can you write a function that adds two numbers? \
Yes: def add(a, b): return a + b. Please be kind, be brief, and be helpful.
The user said hello and asked the assistant about the weather. The assistant said it could not see \
the weather, but it could help with other things: writing an email, fixing a bug, planning a trip, \
or explaining a new idea. The user asked for a plan for a trip to the mountains. The assistant \
listed the days, the places to sleep, the food to bring, and the time to leave each morning.
Hello, world! A critical incident hit the API on Friday: customers saw failed orders and late refunds. \
The business analyst wrote a detailed analysis of the impact on revenue, and the technical specialist \
listed the steps to fix it. Summarise the incident, explain the cause, and suggest what to monitor next.
"""


def _tokenizer_json(arch: str) -> str:
    """The byte-level BPE of arch's tokenizer style, trained on CORPUS: its tokenizer.json text."""
    return _trained_tokenizer(_style(arch))


@cache
def _trained_tokenizer(arch: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, bos = _TOKENS[arch][:2]
    tok = Tokenizer(models.BPE())
    # Byte-level pieces cover every string, so decode(encode(s)) == s with no unknown token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer)
    if arch == "gemma3":  # Gemma's tokenizer starts every encoded text with <bos>
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, specials.index(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str(pretty=True)


def _model_module(model_type: str):
    """The mlx_lm.models module implementing model_type."""
    return importlib.import_module(f"mlx_lm.models.{model_type}")


def _check(arch: str, size: str, dtype: str) -> None:
    """Raise ValueError for an unknown arch, size or dtype."""
    for what, value, choices in (("arch", arch, ARCHITECTURES), ("size", size, SIZES), ("dtype", dtype, DTYPES)):
        if value not in choices:
            raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


def _config(arch: str, size: str, dtype: str, vocab_size: int, overrides: dict) -> dict:
    """The config.json contents for arch and size, with overrides applied."""
    specials, bos, eos, pad, _ = _TOKENS[_style(arch)]
    ids = {t: i for i, t in enumerate(specials)}
    c: dict[str, Any] = dict(
        vocab_size=vocab_size,
        max_position_embeddings=32768,
        bos_token_id=ids[bos],
        eos_token_id=ids[eos],
        pad_token_id=ids[pad],
        torch_dtype=dtype,
    )
    c.update(family_config(arch, SIZES[size]))
    if arch in ("llama", "gemma3"):
        c["tie_word_embeddings"] = True
    if arch == "gemma3":
        c["eos_token_id"] = [ids[eos], ids["<eos>"]]  # both stop generation, as in Gemma's config
    if "text_config" in c:  # llama4: the language model's fields are nested
        c["text_config"] = dict(c["text_config"], vocab_size=vocab_size)
    fields = {f.name for f in dataclasses.fields(_model_module(c["model_type"]).ModelArgs)}
    unknown = set(overrides) - fields - set(c)
    if unknown:  # a misspelt override would otherwise be ignored and build a different model
        raise ValueError(f"unknown config fields for {arch}: {sorted(unknown)}")
    c.update(overrides)
    if arch == "gemma3":
        pattern, n = c["sliding_window_pattern"], c["num_hidden_layers"]
        if n < pattern:  # gemma3_text takes the global mask from layer pattern-1
            raise ValueError(f"gemma3 needs num_hidden_layers >= sliding_window_pattern ({n} < {pattern})")
        c["layer_types"] = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    return dict(sorted(c.items()))


def _weights(config: dict, seed: int, dtype: str) -> dict:
    """Seeded random weights, named exactly as mlx_lm.load expects: {name: (shape, raw bytes)}."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    module = _model_module(config["model_type"])
    # Some 1-D initial values are random (qwen3_next's A_log, dt_bias): seed them too, and let the
    # caller's random stream go on from a draw of its own rather than from our seed.
    follow = int(mx.random.randint(0, 2**31 - 1, shape=()).item())  # type: ignore[arg-type]  # .item() of an int array
    mx.random.seed(seed)
    try:
        model = module.Model(module.ModelArgs.from_dict(config))  # only names, shapes and norm values are read
    finally:
        mx.random.seed(follow)
    params = dict(tree_flatten(model.parameters()))
    if config.get("tie_word_embeddings"):  # gemma3_text's sanitize ties lm_head when it is absent
        params.pop("lm_head.weight", None)
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(params):  # a fixed order fixes the random stream, and so the bytes
        p = params[name]
        if p.ndim >= 2:
            value = mx.array(rng.standard_normal(p.shape, dtype=np.float32) * np.float32(0.02))
        else:  # norm scales keep the architecture's own initial value
            value = p
        value = value.astype(getattr(mx, dtype))
        raw = value.view(mx.uint16) if dtype == "bfloat16" else value  # numpy has no bfloat16
        out[name] = (list(p.shape), np.array(raw).tobytes())
    return out


def _write_safetensors(path: Path, tensors: dict, dtype: str) -> None:
    """Write a safetensors file by hand: sorted names and a fixed header make it byte-reproducible."""
    header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for name, (shape, data) in sorted(tensors.items()):
        header[name] = {"dtype": DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format allows space padding; it keeps the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for _, (_, data) in sorted(tensors.items()):
            f.write(data)


def _write_files(d: Path, arch: str, size: str, seed: int, dtype: str, overrides: dict) -> None:
    """Write every file of the model directory into the existing directory d."""
    _check(arch, size, dtype)
    tok_json = _tokenizer_json(arch)
    config = _config(arch, size, dtype, len(json.loads(tok_json)["model"]["vocab"]), overrides)
    params: dict[str, Any] = dict(
        arch=arch, size=size, seed=seed, dtype=dtype, overrides=dict(sorted(overrides.items())), format=BUILD_FORMAT
    )
    config["kvstore_builtin"] = params
    _write_safetensors(d / "model.safetensors", _weights(config, seed, dtype), dtype)
    specials, bos, eos, pad, template = _TOKENS[_style(arch)]
    special = dict(bos_token=bos, eos_token=eos, pad_token=pad, **({"unk_token": "<unk>"} if arch == "gemma3" else {}))
    added = {
        str(i): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
        for i, t in enumerate(specials)
    }
    tok_config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        **special,
        added_tokens_decoder=added,
        model_max_length=config["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        add_bos_token=arch == "gemma3",
        add_eos_token=False,
        chat_template=template,
    )
    files = {
        "config.json": json.dumps(config, indent=2),
        "tokenizer.json": tok_json,
        "tokenizer_config.json": json.dumps(tok_config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
        MARKER: (
            "Random weights, generated by kvstore, for tests and demos. Not a trained model: its text is "
            f"gibberish.\nRebuild: python -m kvstore.models.builtin PATH --arch {arch} --size {size} "
            f"--seed {seed} --dtype {dtype}"
            + "".join(f" --set {k}={json.dumps(v, separators=(',', ':'))}" for k, v in params["overrides"].items())
            + f"\nParameters: {json.dumps(params, sort_keys=True)}"
        ),
    }
    for name, text in files.items():
        (d / name).write_text(text + "\n", encoding="utf-8")
    d.chmod(0o755)  # mkdtemp makes it private; a model cache should be readable like any download


def _replace_files(src: Path, dest: Path) -> None:
    """Move src's files over dest's one at a time (other files in dest stay), config.json last."""
    # Readers take config.json as the sign of a complete build, so it lands after the weights.
    for f in sorted(src.iterdir(), key=lambda f: f.name == "config.json"):
        os.replace(f, dest / f.name)


def build_model(path, arch="llama", size="tiny", seed=0, dtype="float32", **overrides) -> Path:
    """Write the model directory at path (created; existing files overwritten atomically enough: write into a temp dir in the same parent and os.replace/rename) and return it."""
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_files(tmp, arch, size, int(seed), dtype, overrides)
        try:  # a new directory appears complete, in one rename
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            _replace_files(tmp, path)
        return path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_current(path: Path) -> bool:
    """Whether path holds a complete build written by this version of the module."""
    try:
        return json.loads((path / "config.json").read_text())["kvstore_builtin"]["format"] == BUILD_FORMAT
    except (OSError, ValueError, KeyError, TypeError):
        return False


def builtin_model_path(arch="llama", size="tiny", seed=0, dtype="float32", root=None) -> Path:
    """Path of a cached build under root (default $KVSTORE_MODELS or ~/.cache/kvstore/models), building it if missing. Name like f"{arch}-{size}-s{seed}-{dtype}". Safe when two processes call it at once (build into a temp dir, then rename; if the rename loses the race, use the winner's)."""
    if root is None:
        root = models_root()
    _check(arch, size, dtype)  # before the name is used as a path
    final = Path(root).expanduser().absolute() / f"{arch}-{size}-s{int(seed)}-{dtype}"
    if _is_current(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _write_files(tmp, arch, size, int(seed), dtype, {})
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_current(final):  # not a rival's fresh build but a broken or outdated one: replace it
                _replace_files(tmp, final)
        return final  # ours, or the identical build of a process that renamed first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_builtin(arch="llama", size="tiny", seed=0, dtype="float32", root=None):
    """(model, tokenizer) via mlx_lm.load(builtin_model_path(...))."""
    import mlx_lm

    return mlx_lm.load(str(builtin_model_path(arch=arch, size=size, seed=seed, dtype=dtype, root=root)))


def _parse_override(text: str) -> tuple:
    """KEY=VALUE, with VALUE read as JSON when it parses (numbers, booleans, lists), else as a string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        prog="python -m kvstore.models.builtin",
        description="Write an mlx-lm model directory with random weights (tests, demos).",
    )
    ap.add_argument("path")
    ap.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    ap.add_argument("--size", choices=tuple(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    ap.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        type=_parse_override,
        action="append",
        default=[],
        help="override a config field, e.g. --set sliding_window=32",
    )
    a = ap.parse_args()
    print(build_model(a.path, arch=a.arch, size=a.size, seed=a.seed, dtype=a.dtype, **dict(a.overrides)))
