"""Checkpoint I/O round trips with transformers (single file, sharded, tied head: for both architectures, through
the arch_hf fixture; flat legacy config, legacy key names) and clear errors on bad checkpoints.
Run: .venv/bin/python -m pytest -q tests/test_checkpoint.py
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3VLConfig as HFConfig

import model
from model import checkpoint
from parity import PATCH, assert_close, logits_of
from tiny import tiny_hf

def hf_model(tie=False, seed=1):
    return tiny_hf("qwen3_vl", tie, seed, PATCH)


@pytest.fixture(scope="module")
def make_hf():
    """Qwen3-VL: make_hf(tie, seed) -> a tiny scrambled transformers model (the errors tests below)."""
    return hf_model


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def arch_hf(request):
    """Each architecture: (make_hf, the HF model) for the round trips."""
    make = lambda tie=False, seed=1: tiny_hf(request.param, tie, seed, PATCH)  # noqa: E731
    return make, make()


@pytest.fixture(scope="module")
def arch_hf_dir(arch_hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_single")
    arch_hf[1].save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(make_hf):
    return make_hf()


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_single")
    hf.save_pretrained(path)
    return path


# ---- round trips, both architectures

def test_hf_single_file_loads_into_ours(arch_hf, arch_hf_dir):
    hf, hf_dir = arch_hf[1], arch_hf_dir
    assert (hf_dir / "model.safetensors").is_file()
    assert_close(logits_of(model.load(hf_dir)), logits_of(hf))


def test_hf_sharded_loads_into_ours(arch_hf, tmp_path):
    hf = arch_hf[1]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert_close(logits_of(model.load(tmp_path)), logits_of(hf))


@pytest.mark.parametrize("shard", ["5GB", 100_000])
def test_ours_saved_loads_into_hf(arch_hf, arch_hf_dir, tmp_path, shard):
    hf, hf_dir = arch_hf[1], arch_hf_dir
    ours = model.load(hf_dir)
    model.save(ours, tmp_path / "ckpt", max_shard_size=shard)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    if shard == "5GB":
        assert files == ["config.json", "model.safetensors"]
    else:
        assert "model.safetensors.index.json" in files and len(files) > 3
    back, info = type(hf).from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_close(logits_of(back.eval()), logits_of(hf))
    assert_close(logits_of(model.load(tmp_path / "ckpt")), logits_of(hf))  # and back into ours
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]  # no temp dirs left behind


def test_tied_head_round_trip(arch_hf, tmp_path):
    hf = arch_hf[0](tie=True, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    ours = model.load(tmp_path / "hf")
    assert ours.lm_head.weight is ours.language_model.embed_tokens.weight
    assert_close(logits_of(ours), logits_of(hf))
    model.save(ours, tmp_path / "ours")
    assert "lm_head.weight" not in load_file(tmp_path / "ours" / "model.safetensors")  # as HF writes it
    assert_close(logits_of(type(hf).from_pretrained(tmp_path / "ours").eval()), logits_of(hf))


def test_flat_legacy_config_and_key_names(hf, hf_dir, tmp_path):
    """Text fields at the top level with rope_theta + rope_scaling, and Qwen2-VL-era key names."""
    nested = json.loads((hf_dir / "config.json").read_text())
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    flat.update(text)
    flat["model_type"] = "qwen3_vl"
    (tmp_path / "config.json").write_text(json.dumps(flat))
    legacy = {}
    for key, t in load_file(hf_dir / "model.safetensors").items():
        key = key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        legacy[key] = t
    save_file(legacy, tmp_path / "model.safetensors")
    ours = model.load(tmp_path)
    assert ours.config.text.rope_theta == 10000.0 and ours.config.text.mrope_section == (3, 3, 2)
    assert_close(logits_of(ours), logits_of(hf))


def test_load_casts_to_dtype(hf_dir, tmp_path):
    ours = model.load(hf_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    model.save(ours, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(tmp_path / "bf16" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16


def test_save_replaces_checkpoint_keeps_other_files(hf_dir, tmp_path):
    ours = model.load(hf_dir)
    target = tmp_path / "policy"
    model.save(ours, target, max_shard_size=100_000)
    (target / "tokenizer.json").write_text("{}")
    model.save(ours, target)  # now a single file: the old shards and index must go
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_failed_save_leaves_old_checkpoint(hf_dir, tmp_path, monkeypatch):
    ours = model.load(hf_dir)
    target = tmp_path / "policy"
    model.save(ours, target)
    before = (target / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        model.save(ours, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert list(tmp_path.iterdir()) == [target]


# ---- a complete model directory: save(..., extras_from=the model's source directory) ----

@pytest.fixture(scope="module")
def source_dir(hf_dir, tmp_path_factory):
    """hf_dir plus a processor (tokenizer with its template inline only, image settings) and a generation config as
    transformers derives it from a model config: sampling defaults, and eos / pad ids that are not the tokenizer's."""
    from model.processor import Processor
    from model.tokenizer import build_tokenizer
    path = tmp_path_factory.mktemp("source")
    for name in ("config.json", "model.safetensors"):
        (path / name).write_bytes((hf_dir / name).read_bytes())
    Processor(build_tokenizer(["What is in this image? A cup."] * 4, vocab_size=300), patch_size=PATCH).save(str(path))
    (path / "chat_template.jinja").unlink()
    (path / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 151643, "eos_token_id": 151645, "temperature": 0.7, "top_k": 20}))
    return path


def test_save_with_extras_from_writes_a_complete_directory(hf_dir, source_dir, tmp_path):
    ours = model.load(hf_dir)
    target = tmp_path / "policy"
    model.save(ours, target, extras_from=source_dir)
    assert sorted(os.listdir(target)) == ["chat_template.jinja", "config.json", "generation_config.json",
                                          "model.safetensors", "preprocessor_config.json", "tokenizer.json",
                                          "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):  # copied as they are
        assert (target / name).read_bytes() == (source_dir / name).read_bytes()
    processor = model.load_processor(str(target))
    assert (target / "chat_template.jinja").read_text() == processor.tokenizer.chat_template
    generation = json.loads((target / "generation_config.json").read_text())   # eos / pad: the stop tokens
    assert generation == {"bos_token_id": 151643, "eos_token_id": processor.stop_token_ids,
                          "pad_token_id": processor.pad_token_id, "temperature": 0.7, "top_k": 20}
    assert oct((target / "model.safetensors").stat().st_mode & 0o044) == oct(0o044 & ~_umask())   # readable by others
    assert_close(logits_of(model.load(target)), logits_of(ours))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_with_extras_from_a_dir_without_processor_fails_first(hf_dir, tmp_path):
    """The source is checked before any weight is written: nothing appears at the target."""
    with pytest.raises(FileNotFoundError, match=str(hf_dir / "preprocessor_config.json")):
        model.save(model.load(hf_dir), tmp_path / "policy", extras_from=hf_dir)
    assert list(tmp_path.iterdir()) == []


# ---- bad checkpoints: errors that name the file / key ----

@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_file_is_named(hf_dir, tmp_path, damage):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    data = (hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\x00junk" * 9)
    with pytest.raises(ValueError, match=f"{tmp_path / 'model.safetensors'} is not a readable safetensors file"):
        model.load(tmp_path)


def test_malformed_config_json_is_named(hf_dir, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_vl",')
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} is not valid JSON"):
        model.load(tmp_path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["text_config"]["num_attention_heads"] = "four"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: not a valid qwen3_vl config: TypeError"):
        model.load(tmp_path)

def test_missing_shard_is_named(hf, tmp_path):
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        model.load(tmp_path)


def test_wrong_shape_is_named(hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    state = load_file(hf_dir / "model.safetensors")
    key = "model.language_model.layers.1.self_attn.k_proj.weight"
    state[key] = torch.zeros(16, 64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"{key} has shape \[16, 64\].*expects \[32, 64\]"):
        model.load(tmp_path)


def test_missing_and_unexpected_keys_are_named(hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    state = load_file(hf_dir / "model.safetensors")
    del state["model.visual.merger.linear_fc2.bias"]
    state["model.language_model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: \['visual.merger.linear_fc2.bias'\].*layers.9.mlp"):
        model.load(tmp_path)


def test_unknown_model_type_lists_supported(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "llava_next"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    supported = r"supported: \['qwen2_5_vl', 'qwen3_vl'\]"
    with pytest.raises(ValueError, match=r"config.json: unknown model_type 'llava_next'; " + supported):
        model.load(tmp_path)


def test_no_config_or_weights(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        model.load(tmp_path)
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        model.load(tmp_path)


def test_released_style_config_parses_like_transformers():
    """The config.json layout of the released Qwen3-VL checkpoints (nested, but rope_theta + rope_scaling in
    text_config, vision rope theta implicit, vision model_type 'qwen3_vl') reads the same as transformers."""
    d = {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
        "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": True,
        "text_config": {
            "attention_bias": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
            "intermediate_size": 6144, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
            "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "rope_theta": 5000000, "tie_word_embeddings": True, "vocab_size": 151936},
        "vision_config": {
            "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1024, "in_channels": 3, "intermediate_size": 4096, "model_type": "qwen3_vl",
            "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2},
    }
    ours = model.Qwen3VLConfig.from_hf_dict(d)
    theirs = HFConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    t, ht = ours.text, theirs.text_config
    assert (t.rope_theta, list(t.mrope_section)) == (ht.rope_parameters["rope_theta"],
                                                     ht.rope_parameters["mrope_section"])
    assert (t.num_key_value_heads, t.head_dim, t.vocab_size) == (ht.num_key_value_heads, ht.head_dim, ht.vocab_size)
    assert ours.vision.rope_theta == theirs.vision_config.rope_parameters["rope_theta"]
    assert ours.vision.deepstack_visual_indexes == (5, 11, 17) and ours.tie_word_embeddings
    # And what we write back is what transformers reads.
    again = HFConfig(**{k: v for k, v in ours.to_hf_dict().items() if k not in ("architectures", "model_type")})
    assert again.text_config.rope_parameters == ht.rope_parameters | {"mrope_interleaved": True}
    assert again.vision_config.deepstack_visual_indexes == [5, 11, 17]
