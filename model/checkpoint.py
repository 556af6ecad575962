"""Load and save models in the Hugging Face checkpoint layout: config.json + model.safetensors, or shards
listed in model.safetensors.index.json. Weights only through safetensors (never pickle), no remote code.

    model = load("/path/Qwen3-VL-8B-Thinking", device="cuda", dtype=torch.bfloat16)
    save(model, "runs/step100/policy", extras_from="/path/Qwen3-VL-8B-Thinking")   # a complete model directory

A complete model directory also holds the tokenizer, chat template, image-processor settings and generation
defaults (PROCESSOR_FILES, generation_config.json): transformers' processor and model classes, vLLM, sample.py
and `python -m eval` load it as it is. `save(..., extras_from=DIR)` copies them from the directory the model came
from (copy_model_files).
"""
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .decoder import FusedLinear
from .qwen2_5_vl import Qwen2_5_VL
from .qwen3_vl import Qwen3VL

# config.json model_type -> model class (the class knows its config parser and checkpoint key names).
ARCHITECTURES = {"qwen3_vl": Qwen3VL, "qwen2_5_vl": Qwen2_5_VL}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Non-persistent buffers some exporters saved anyway; we recompute them.
IGNORED_KEYS = re.compile(r".*(rotary_emb|rotary_pos_emb)\.inv_freq$")
# What a model directory holds besides config.json and the weights, as the Qwen-VL releases ship it: the tokenizer
# (tokenizer.json, or vocab.json + merges.txt), the chat template (inline in tokenizer_config.json, or a file of its
# own) and the image / video processor settings.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processor_config.json")
GENERATION_CONFIG = "generation_config.json"


def read_config(path):
    """(model class, config object) for a checkpoint directory, from its config.json."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no config.json (is {path} a Hugging Face checkpoint dir?)")
    d = _read_json_object(config_path)
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{config_path}: unknown model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[model_type]
    try:
        return cls, cls.config_class.from_hf_dict(d)
    except (KeyError, TypeError, ValueError) as e:  # a field missing, of the wrong type, or inconsistent
        raise ValueError(f"{config_path}: not a valid {model_type} config: {type(e).__name__}: {e}") from e


def _read_json_object(file: Path) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); the file is damaged, restore it from the "
                         f"checkpoint it came from") from e
    if not isinstance(d, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(d).__name__}")
    return d


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index = path / INDEX_NAME
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard file(s) that do not exist: {missing}")
        return [path / n for n in names]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    raise FileNotFoundError(f"{path}: neither {SINGLE_NAME} nor {INDEX_NAME} found")


def _ours(key: str, prefixes) -> str | None:
    """Our name for checkpoint key `key`: its longest matching HF prefix replaced by ours (None: no match)."""
    matches = [(hf, ours) for hf, ours in prefixes if key.startswith(hf)]
    if not matches:
        return None
    hf, ours = max(matches, key=lambda m: len(m[0]))
    return ours + key[len(hf):]


def _expected_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint must provide; a tied lm_head is provided by the embedding."""
    expected = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    return expected


def _fused_parts(model: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """Our fused tensors (FusedLinear: q/k/v, gate/up) -> [(our name for each Hugging Face part, rows), ...] in
    row order, e.g. 'language_model.layers.0.self_attn.qkv_proj.weight' -> [('...self_attn.q_proj.weight', H*D),
    ('...k_proj.weight', Hkv*D), ('...v_proj.weight', Hkv*D)]."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FusedLinear):
            parent = name.rpartition(".")[0]
            for kind in ("weight", "bias"):
                if getattr(module, kind) is not None:
                    out[f"{name}.{kind}"] = [(f"{parent}.{part}.{kind}", rows) for part, rows in module.parts]
    return out


def load(path, device="cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the model named by path/config.json and load its weights, in eval mode.

    The model is built on the meta device (no memory), each tensor is read from safetensors straight onto
    `device`, cast to `dtype` (floating tensors only) and assigned into the module: peak memory is the
    model plus one tensor, never two copies of the model.
    """
    path = Path(path)
    cls, config = read_config(path)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.device("meta"):
        model = cls(config)
    expected = _expected_params(model)
    # The checkpoint holds the parts of our fused tensors under their own names: expect those instead.
    fused = _fused_parts(model)
    for key, parts in fused.items():
        shape = expected.pop(key).shape
        expected.update({part: torch.empty((rows, *shape[1:]), device="meta") for part, rows in parts})

    state, unexpected, source = {}, [], {}
    for file in _weight_files(path):
        with _open_weights(file, device) as f:
            for key in f.keys():
                ours = _ours(key, cls.hf_key_prefixes)
                if IGNORED_KEYS.match(key) or (ours == "lm_head.weight" and ours not in expected):
                    continue  # recomputed buffer, or lm_head stored although tied to the embedding
                if ours not in expected:
                    unexpected.append(f"{key} ({file.name})")
                    continue
                if ours in state:
                    raise ValueError(f"{path}: tensor {key} appears in both {source[ours]} and {file.name}")
                shape = tuple(f.get_slice(key).get_shape())
                want = tuple(expected[ours].shape)
                if shape != want:
                    raise ValueError(f"{file}: tensor {key} has shape {list(shape)}, the model "
                                     f"(config.json) expects {list(want)}")
                try:
                    t = f.get_tensor(key)
                except SafetensorError as e:
                    raise ValueError(f"{file}: tensor {key} cannot be read ({e}); the file is damaged") from e
                state[ours] = t.to(dtype) if t.is_floating_point() else t
                source[ours] = file.name
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        raise ValueError(f"{path}: checkpoint does not match the {cls.__name__} built from config.json; "
                         f"missing keys: {missing or 'none'}; unexpected keys: {unexpected or 'none'}")
    for key, parts in fused.items():  # join the parts, one fused tensor at a time
        state[key] = torch.cat([state.pop(part) for part, _ in parts])
    # Keys were checked above; strict=False only lets a tied lm_head (absent on purpose) through.
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign=True replaced the embedding Parameter; point lm_head at the new one
    return model.eval()


def _open_weights(file: Path, device):
    """safe_open, with an error that names the file: a truncated download or a file cut short by a full disk fails
    here, when safetensors reads its header and checks that the data covers it."""
    try:
        return safe_open(str(file), framework="pt", device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}): it is truncated or corrupted; copy it "
                         f"again from its source, or save the model again") from e


def parse_size(size) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB' (GB = 10**9, GiB = 2**30, as HF)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes as int or e.g. '5GB', '500MB', '2GiB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))


def _hf_state(model: nn.Module, state_dict=None) -> dict[str, torch.Tensor]:
    """Our state dict under the HF key names `save` writes (a tied lm_head is left out, as HF does)."""
    reverse = {}
    for hf, ours in model.hf_key_prefixes:
        reverse.setdefault(ours, hf)  # first spelling = the one to write
    expected = _expected_params(model)
    if state_dict is not None:
        expected = {k: state_dict[k] for k in expected}
    fused = _fused_parts(model)
    out = {}
    for key, t in expected.items():
        pieces = zip((part for part, _ in fused[key]), t.split([rows for _, rows in fused[key]])) \
            if key in fused else [(key, t)]  # a fused tensor is written as its Hugging Face parts
        for name, piece in pieces:
            ours = next(p for p in reverse if name.startswith(p))
            out[reverse[ours] + name[len(ours):]] = piece.detach()
    return out


def save(model: nn.Module, path, max_shard_size="5GB", state_dict: dict | None = None,
         extras_from=None) -> None:
    """Write config.json + safetensors (sharded with an index above max_shard_size) to path, atomically.

    state_dict: full tensors under our names, when the model's own are sharded (e.g. gathered from FSDP).
    extras_from: the model directory the weights came from (the input checkpoint); its tokenizer, chat template,
    processor settings and generation config are copied along (copy_model_files), making path complete.

    Everything is written (and fsynced) to a temporary sibling directory that is then renamed into place:
    a crash leaves the old checkpoint (at path, or for an instant under a `.NAME.old-*` sibling) or the
    complete new one, never a mix. Other files already in path (a tokenizer, a training state) are carried
    over into the new directory.
    """
    path = Path(path)
    limit = parse_size(max_shard_size)
    state = _hf_state(model, state_dict)
    shards, current, size = [], {}, 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)

    with _new_dir(path) as tmp:
        if extras_from is not None:  # first: a source without a processor fails before the weights are written
            copy_model_files(extras_from, tmp)
        dtype = str(model.dtype).removeprefix("torch.")
        with open(tmp / "config.json", "w") as f:
            json.dump(model.config.to_hf_dict(dtype=dtype), f, indent=2)
        names = [SINGLE_NAME] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for name, shard in zip(names, shards):
            # One shard at a time on the CPU.
            save_file({k: _standalone(t) for k, t in shard.items()}, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(tmp / INDEX_NAME, "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def copy_model_files(source, path) -> None:
    """Copy the tokenizer, chat template and processor settings (PROCESSOR_FILES) of the model directory `source`
    into the directory `path`, and write generation_config.json: the source's (sampling defaults kept) with eos =
    the processor's stop tokens (<|im_end|>, <|endoftext|>) and pad = its pad token, so that transformers' generate
    stops where our sampler does (a config written by transformers from a model config may name ids the tokenizer
    does not have). A chat template kept only in tokenizer_config.json also goes to chat_template.jinja, where
    transformers' processor classes read it.

    The source must hold a processor that model.load_processor reads (errors name the missing or broken file)."""
    from .processor import CHAT_TEMPLATE_FILES, load_processor, write_chat_template  # the tokenizer stack: only here
    source, path = Path(source), Path(path)
    processor = load_processor(str(source))
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, path / name)
    if not any((source / name).is_file() for name in CHAT_TEMPLATE_FILES):
        write_chat_template(processor.tokenizer, str(path))
    generation = _read_json_object(source / GENERATION_CONFIG) if (source / GENERATION_CONFIG).is_file() else {}
    generation.pop("_from_model_config", None)  # set by transformers: "re-derive me from config.json"; not any more
    generation.update(eos_token_id=processor.stop_token_ids, pad_token_id=processor.pad_token_id)
    with open(path / GENERATION_CONFIG, "w") as f:
        json.dump(generation, f, indent=2)


@contextmanager
def _new_dir(path: Path):
    """`with _new_dir(path) as tmp:` write a model directory into tmp, a hidden sibling of path; on success it is
    synced to disk and renamed to path (_swap_into_place), on any error removed: path is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _share(tmp)
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _share(tmp: Path) -> None:
    """Permissions as for any new file (the umask's): mkdtemp makes the directory private (0700), and a model
    directory is often read by another user or a serving container."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for file in tmp.iterdir():
        os.chmod(file, 0o666 & ~umask)  # safetensors writes its files 0600


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning its storage (safetensors refuses views into a shared storage)."""
    t = t.to("cpu").contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_model_file(name: str) -> bool:
    return name in ("config.json", INDEX_NAME) or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", name)


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished temp dir to path, keeping path's non-model files."""
    if not path.exists():
        os.replace(tmp, path)
        _fsync(path.parent)
        return
    for entry in path.iterdir():
        if not _is_model_file(entry.name) and not (tmp / entry.name).exists():
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            copy(entry, tmp / entry.name)
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / path.name)  # directories cannot be renamed over a non-empty one
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
