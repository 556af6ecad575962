"""sample.py and model/group_cache.py on tiny random Qwen3-VL / Qwen2.5-VL models (fp32, CPU): greedy parity with
the cache-free reference decode, log-probs equal to the training forward's, shared prefix == repeated prompt, one
vision pass per prompt, batch invariance, exact sampling, bad input, and the CLI.
Run: .venv/bin/python -m pytest -q tests/test_sample.py
"""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import model
import sample
import train
from model.group_cache import GroupCache
from model.processor import Processor
from model.tiny import scramble_, tiny_qwen2_5vl_config, tiny_qwen3vl_config
from model.tokenizer import build_tokenizer, vision_token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = ["What is in this image? Is it safe to use? Describe the picture.",
          "<think>\nA knife on a table. <visual_safe>safe</visual_safe>\n</think>\n"
          "<answer>A kitchen knife.</answer>"] * 20
PATCH = 8  # small patches: a 32 x 48 image is a (1, 4, 6) grid = 6 image tokens
STOP = tuple(range(40))  # ~10% of the vocabulary: random-weight rows then stop at different steps


def build_tiny(arch: str):
    """(model, processor): a tiny random Qwen-VL whose special token ids follow a tokenizer built in code."""
    tok = build_tokenizer(CORPUS, vocab_size=400)
    make, patch = {"qwen3_vl": (tiny_qwen3vl_config, PATCH), "qwen2_5_vl": (tiny_qwen2_5vl_config, 14)}[arch]
    cfg = make(vocab_size=len(tok), patch_size=patch, **vision_token_ids(tok))
    torch.manual_seed(0)
    cls = {"qwen3_vl": model.Qwen3VL, "qwen2_5_vl": model.Qwen2_5_VL}[arch]
    net = scramble_(cls(cfg), seed=1).eval()
    proc = Processor(tok, patch_size=patch, min_pixels=(2 * patch) ** 2, max_pixels=(8 * patch) ** 2)
    return net, proc


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("qwen3_vl")


def image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def make_prompts(proc):
    """Image and text prompts of different lengths (one with two images)."""
    return [proc.encode("What is in this image?", [image(32, 48, 0)]),
            proc.encode("Is it safe?"),
            proc.encode("Describe <image> and <image> in detail, please.", [image(48, 32, 1), image(32, 32, 2)]),
            proc.encode("What is in this image? Is it safe to use? Describe the picture.", [image(64, 48, 3)])]


@pytest.fixture(scope="module")
def prompts(tiny):
    return make_prompts(tiny[1])


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def arch(request, tiny, prompts):
    """Each architecture with its prompts: the parity tests run on both."""
    if request.param == "qwen3_vl":
        return tiny[0], prompts
    net, proc = build_tiny(request.param)
    return net, make_prompts(proc)


def rows_of(ro, r):
    return ro.response_ids[r][ro.response_mask[r].bool()].tolist()


# ----------------------------------------------------------------------------- parity

def test_greedy_equals_cache_free_reference(arch):
    net, prompts = arch
    stop = (sample.reference_generate(net, prompts[1:2], max_new_tokens=5)[0][4],)  # text prompt 1 emits it at step 5
    ref = sample.reference_generate(net, prompts, max_new_tokens=10, stop_token_ids=stop)
    assert len({len(r) for r in ref}) > 1  # rows stop at different steps
    ro = sample.generate(net, prompts, group_size=2, max_new_tokens=10, temperature=0.0, stop_token_ids=stop)
    assert ro.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for r in range(8):
        assert rows_of(ro, r) == ref[r // 2], f"row {r}"
        assert ro.finish_reason[r] == ("stop" if ref[r // 2][-1] in stop else "length")


def training_logprobs(net, prompts, ro, temperature):
    """The trainer's own recomputation: [left-padded prompt | right-padded response] through train.collate."""
    per_row = [prompts[int(i)] for i in ro.prompt_index]
    batch = train.collate(per_row, ro.response_ids, ro.response_mask, 0, "cpu", net.rope_index,
                          net.config.image_token_id)
    with torch.no_grad():
        logp, _ = train.response_logprobs(net, batch, ro.response_ids, temperature)
    return logp * ro.response_mask


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 50), (0.0, 1.0, 0)])
def test_logprobs_equal_training_forward(arch, temperature, top_p, top_k):
    net, prompts = arch
    ro = sample.generate(net, prompts, group_size=3, max_new_tokens=10, temperature=temperature, top_p=top_p,
                         top_k=top_k, stop_token_ids=STOP, seed=5)
    assert ro.logprobs.dtype == torch.float32 and len(set(ro.response_mask.sum(1).tolist())) > 1
    want = training_logprobs(net, prompts, ro, temperature or 1.0)  # greedy: log-softmax of the raw logits
    assert (ro.logprobs - want).abs().max() <= 1e-5
    assert bool((ro.logprobs[ro.response_mask == 0] == 0).all())


def test_shared_prefix_equals_repeated_prompt(tiny, prompts):
    """One prefill shared by G rows == the prompt prefilled G times (plain KVCache): same tokens, same log-probs."""
    net, _ = tiny
    kw = dict(group_size=4, max_new_tokens=12, temperature=1.0, stop_token_ids=STOP, seed=3)
    shared = sample.generate(net, prompts, **kw)
    repeated = sample.generate(net, prompts, share_prefix=False, **kw)
    assert torch.equal(shared.response_ids, repeated.response_ids)
    assert torch.equal(shared.response_mask, repeated.response_mask)
    assert shared.finish_reason == repeated.finish_reason
    assert (shared.logprobs - repeated.logprobs).abs().max() <= 1e-5
    # the mask comes from positions: pad_token_id (0) is itself a stop token here, and the stop token is kept
    for r, reason in enumerate(shared.finish_reason):
        ids = rows_of(shared, r)
        assert not any(t in STOP for t in ids[:-1])
        assert (ids[-1] in STOP) == (reason == "stop") and (reason == "stop" or len(ids) == 12)
    assert shared.stats["kv_cache_bytes"] < repeated.stats["kv_cache_bytes"] / 2
    # finished rows leave the batch: one decode row-step per generated token after the first
    assert shared.stats["row_steps"] == int(shared.response_mask.sum()) - shared.response_mask.shape[0]
    assert shared.stats["row_steps"] < repeated.stats["row_steps"]


def test_vision_tower_runs_once_per_prompt(tiny, prompts, monkeypatch):
    net, _ = tiny
    calls = []
    encode = net.encode_images
    monkeypatch.setattr(net, "encode_images", lambda pv, grid: calls.append(pv.shape[0]) or encode(pv, grid))
    patches = sum(p["pixel_values"].shape[0] for p in prompts if p["pixel_values"] is not None)
    sample.generate(net, prompts, group_size=4, max_new_tokens=6)
    assert calls == [patches]  # one call, each prompt's patches once (not G times)
    calls.clear()
    sample.generate(net, prompts, group_size=4, max_new_tokens=6, share_prefix=False)
    assert calls == [4 * patches]  # the naive path encodes every image G times


def test_batch_invariance(tiny, prompts):
    """A prompt's samples depend on its prompt seed only: alone, batched with others, in another position."""
    net, _ = tiny
    kw = dict(group_size=3, max_new_tokens=12, temperature=1.0, top_p=0.95, stop_token_ids=STOP)
    alone = sample.generate(net, [prompts[2]], prompt_seeds=[77], **kw)
    batched = sample.generate(net, [prompts[1], prompts[3], prompts[2], prompts[0]], prompt_seeds=[5, 6, 77, 8], **kw)
    for j in range(3):
        assert rows_of(batched, 6 + j) == rows_of(alone, j)
        n = len(rows_of(alone, j))
        assert (batched.logprobs[6 + j, :n] - alone.logprobs[j, :n]).abs().max() <= 1e-5
    # the G samples of a group differ from each other; another prompt seed gives other samples
    assert len({tuple(rows_of(alone, j)) for j in range(3)}) == 3
    other = sample.generate(net, [prompts[2]], prompt_seeds=[78], **kw)
    assert [rows_of(other, j) for j in range(3)] != [rows_of(alone, j) for j in range(3)]
    # without prompt_seeds: (seed, prompt index, sample index) decide; a rerun reproduces the rollout exactly
    a = sample.generate(net, prompts, seed=1, **kw)
    b = sample.generate(net, prompts, seed=1, **kw)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)


@torch.no_grad()
def test_group_cache_with_uneven_groups_matches_plain_cache(tiny, prompts):
    """Decode with GroupCache (rows dropped so groups become uneven, prompts vanish) vs a plain KVCache over the
    repeated prompts: the same logits at every step."""
    net, _ = tiny
    P, G, steps = len(prompts), 3, 6
    logits, prefix = sample.prefill(net, prompts, 0)
    group = GroupCache(prefix, G, steps)
    _, plain = sample.prefill(net, [p for p in prompts for _ in range(G)], 0, extra_slots=steps)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 300, (P * G, steps), generator=gen)
    rows = torch.arange(P * G)
    drops = {2: [1, 4, 5], 4: [0, 3, 9]}  # step -> original rows that stop (the last of prompt 1 at 4)
    for t in range(steps):
        if t in drops:
            keep = ~torch.isin(rows, torch.tensor(drops[t]))
            group.keep(keep.nonzero()[:, 0])
            rows = rows[keep]
        mask = torch.isin(torch.arange(P * G), rows)
        want = sample.decode_one_token(net, torch.where(mask, tokens[:, t], 0), plain, mask)[rows]
        got = sample.decode_one_token(net, tokens[rows, t], group)
        assert (got - want).abs().max() <= 1e-5, f"step {t}"
    assert not group.dense and group.pk.shape[1] == 3  # prompt 1 has left the prefix block


@torch.no_grad()
def check_decode_step(net, prompts, tol: float, monkeypatch) -> None:
    """model.decode_step (the sampler's fast path: TextModel.decode + GroupCache.attend_one) == model.forward on
    the same GroupCache state, the obvious path: the same logits (max |diff| <= tol * max |logit|), positions and
    cached keys/values, over padded prompts with images, dense groups first, then uneven groups after rows leave."""
    P, G, steps = len(prompts), 3, 6
    caches = []
    for _ in range(2):
        _, prefix = sample.prefill(net, prompts, 0)
        caches.append(GroupCache(prefix, G, steps))
    fast, slow = caches
    tokens = torch.randint(0, 300, (P * G, steps), generator=torch.Generator().manual_seed(0)).to(net.device)
    rows = torch.arange(P * G, device=net.device)
    attend_one_calls = []
    plain_attend_one = GroupCache.attend_one
    monkeypatch.setattr(GroupCache, "attend_one",
                        lambda self, *a: attend_one_calls.append(self) or plain_attend_one(self, *a))
    for t in range(steps):
        if t == 3:  # rows 1, 4, 5 stop: groups become uneven and prompt 1 is left with one row
            keep = ~torch.isin(rows, torch.tensor([1, 4, 5], device=rows.device))
            for c in caches:
                c.keep(keep.nonzero()[:, 0])
            rows = rows[keep]
        assert fast.dense == (t < 3)
        B = rows.numel()
        want = net(tokens[rows, t, None], position_ids=slow.next_position.view(1, B, 1).expand(3, B, 1),
                   cache=slow)[:, -1].float()
        got = net.decode_step(tokens[rows, t], fast).float()
        assert (got - want).abs().max() <= tol * want.abs().max(), f"step {t}"
        assert torch.equal(fast.next_position, slow.next_position)
    # every layer of every step went through the one-token path, and only the fast cache's
    assert len(attend_one_calls) == steps * net.config.text.num_hidden_layers
    assert all(c is fast for c in attend_one_calls)
    n = fast.length
    for a, b in ((fast.sk, slow.sk), (fast.sv, slow.sv)):
        assert (a[:, :, :, :n].float() - b[:, :, :, :n].float()).abs().max() <= tol * b.float().abs().max()


def test_decode_step_fast_path_equals_forward(arch, monkeypatch):
    net, prompts = arch
    check_decode_step(net, prompts, 1e-6, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs it)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_decode_step_on_cuda_equals_forward(dtype, tol, monkeypatch):
    net, proc = build_tiny("qwen3_vl")
    check_decode_step(net.to("cuda", dtype), make_prompts(proc), tol, monkeypatch)


def test_text_rotary_fast_path_equals_mrope():
    """rope.text_cos_sin + rotary_one_token (decode) == mrope_cos_sin + apply_rotary for text tokens (the same id
    on the three axes), for both M-RoPE layouts: bit for bit on the angles, to rounding on the rotation (addcmul
    rounds once where apply_rotary rounds twice)."""
    from model.rope import apply_rotary, mrope_cos_sin, rotary_one_token, text_cos_sin
    positions = torch.tensor([0, 5, 300, 4095])
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(0))
    for interleaved in (True, False):
        cos, sin = mrope_cos_sin(positions.view(1, 4, 1).expand(3, 4, 1), 64, 10000.0, (12, 10, 10),
                                 torch.float32, interleaved)  # (4, 1, 64)
        cos1, signed_sin = text_cos_sin(positions, 64, 10000.0, torch.float32)
        assert torch.equal(cos1, cos[:, 0]) and torch.equal(signed_sin[:, 32:], sin[:, 0, 32:])
        assert torch.equal(signed_sin[:, :32], -sin[:, 0, :32])
        want = apply_rotary(x, cos, sin)
        got = rotary_one_token(x, cos1[:, None], signed_sin[:, None])
        assert (got - want).abs().max() <= 1e-6


# ----------------------------------------------------------------------------- sampling

def test_inverse_cdf_sampling_is_exact():
    """With n evenly spaced uniforms, token v is drawn n * p_v times (+-1): the sampler is the exact CDF inverse,
    after temperature, top-k and top-p (worked by hand: probs .5 .3 .15 .05)."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 1000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n

    def counts(temperature, top_k=0, top_p=1.0):
        logits = probs.log().expand(n, 4)
        tokens, _ = sample.sample(logits, u, temperature, top_k, top_p)
        return torch.bincount(tokens, minlength=4).tolist()

    assert counts(1.0) == [500, 300, 150, 50]
    assert counts(1.0, top_p=0.8) == [625, 375, 0, 0]        # .5 + .3 reaches .8: keep 2, renormalise
    assert counts(1.0, top_p=0.81) == [526, 316, 158, 0]    # needs the third token too
    assert counts(1.0, top_k=1) == [1000, 0, 0, 0]
    sharp = probs ** 2 / (probs ** 2).sum()                 # temperature 0.5 squares the probabilities
    assert all(abs(c - n * p) <= 1 for c, p in zip(counts(0.5), sharp.tolist()))
    _, lp = sample.sample(probs.log().expand(2, 4), u[:2], 1.0, top_k=1)
    assert torch.allclose(lp, probs.log()[0].expand(2))     # log-prob of the unfiltered distribution


def test_uniforms_are_uniform_and_independent():
    keys = sample.row_keys(seed=0, num_prompts=50, group_size=8)
    assert len(set(keys)) == 400
    u = torch.tensor([sample.uniforms(keys, step) for step in range(50)], dtype=torch.float64)  # (steps, rows)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert float(hist.min()) > 0.9 * 2000 and float(hist.max()) < 1.1 * 2000
    a, b = u[:-1].flatten(), u[1:].flatten()  # consecutive steps of a row, and neighbouring rows
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.03
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.03
    # prompt seeds: row (i, j) depends on (prompt_seeds[i], j) only
    assert sample.row_keys(0, 2, 3, prompt_seeds=[9, 4])[3:] == sample.row_keys(123, 1, 3, prompt_seeds=[4])


# ----------------------------------------------------------------------------- bad input

def test_bad_input_fails_before_any_compute(tiny, prompts, monkeypatch):
    net, _ = tiny
    monkeypatch.setattr(type(net), "forward", lambda *a, **k: pytest.fail("the model ran"))
    p0, p1 = prompts[0], prompts[1]

    def check(match, ps=(p0, p1), **kw):
        args = dict(group_size=2, max_new_tokens=4) | kw
        with pytest.raises(ValueError, match=match):
            sample.generate(net, list(ps), **args)

    check("group_size", group_size=0)
    check("max_new_tokens", max_new_tokens=0)
    check("non-empty list", ps=())
    check("temperature", temperature=-1.0)
    check("top_p", top_p=0.0)
    check("prompt_seeds", prompt_seeds=[1])
    monkeypatch.setattr(net.config.text, "max_position_embeddings", 20)
    check("prompt 0 has 32 tokens, longer than the model's context of 20")
    monkeypatch.setattr(net.config.text, "max_position_embeddings", p0["input_ids"].numel() + 2)
    check("prompt 0: .* exceed the model's context", max_new_tokens=5)
    monkeypatch.undo()
    monkeypatch.setattr(type(net), "forward", lambda *a, **k: pytest.fail("the model ran"))
    check("do not fit the KV cache of 10 slots", max_cache_len=10)
    ids = p0["input_ids"]
    first_pad = int((ids == net.config.image_token_id).nonzero()[0])
    one_short = dict(p0, input_ids=ids[torch.arange(ids.numel()) != first_pad])
    check("prompt 1 holds 5 image placeholder tokens but its images give 6 features", ps=(p1, one_short))
    check("image placeholder tokens but no image", ps=(dict(p0, pixel_values=None, image_grid_thw=None),))
    check("together", ps=(dict(p0, image_grid_thw=None),))
    check("patches", ps=(dict(p0, pixel_values=p0["pixel_values"][:-1]),))
    check("token ids", ps=(dict(p1, input_ids=p1["input_ids"] + 10_000),))
    check("pad_token_id", pad_token_id=-1)


def test_group_cache_full_is_an_error(tiny, prompts):
    net, _ = tiny
    _, prefix = sample.prefill(net, prompts[:2], 0)
    cache = GroupCache(prefix, group_size=2, max_new_tokens=1)
    sample.decode_one_token(net, torch.zeros(4, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="GroupCache is full"):
        sample.decode_one_token(net, torch.zeros(4, dtype=torch.long), cache)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    net, proc = tiny
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save(net, path)
    proc.save(str(path))
    img = path.parent / "cat.png"
    image(48, 64, 7).save(img)
    return str(path), str(img)


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_end_to_end(checkpoint):
    path, img = checkpoint
    out = run_cli("--model", path, "--image", img, "--prompt", "Is this safe?", "--n", "2", "--max_new_tokens", "6",
                  "--seed", "1", "--labels", "image_tag=safe,text_tag=unsafe,combine_tag=unsafe")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("=== sample ") == 2 and out.stdout.count("--- reward ") == 2
    missing = run_cli("--model", path, "--image", img + ".nope", "--prompt", "Is this safe?")
    assert missing.returncode == 2 and "file not found" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_errors(checkpoint, tmp_path, capsys):
    path, img = checkpoint
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for name in os.listdir(path):
        if not name.startswith("tokenizer"):
            (no_tok / name).write_bytes(open(os.path.join(path, name), "rb").read())
    assert sample.main(["--model", str(no_tok), "--image", img, "--prompt", "hi"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert sample.main(["--model", path, "--image", img, "--prompt", "hi", "--labels", "image_tag=safe"]) == 2
    assert "missing text_tag, combine_tag" in capsys.readouterr().err
    assert sample.main(["--model", path, "--image", img, "--prompt", "hi", "--n", "0"]) == 2
    assert "group_size" in capsys.readouterr().err
    assert sample.main(["--model", path, "--prompt", "hi", "--no_step_guided", "--n", "2", "--temperature", "0",
                        "--max_new_tokens", "3"]) == 0  # text only, greedy: both samples equal
    printed = capsys.readouterr().out.split("=== sample ")
    assert printed[1].split("\n", 1)[1] == printed[2].split("\n", 1)[1]


@torch.no_grad()
def test_attend_one_masks_suffix_holes():
    """A suffix slot that holds no real token (a row that skipped a step) is masked: attend_one gives exactly
    attend's result, (B, H, 1, D) flattened to (B, H * D), and both equal attention written out row by row over
    [the row's prompt keys | its real response keys]."""
    from model.kv_cache import KVCache
    torch.manual_seed(0)
    L, P, Hkv, H, Tp, D, G = 1, 2, 2, 4, 5, 8, 3
    prefix = KVCache(L, P, Hkv, Tp, D)
    prefix.append(torch.ones(P, Tp, dtype=torch.bool), torch.full((P,), Tp))
    prefix.k.normal_()
    prefix.v.normal_()
    caches = [GroupCache(prefix, G, 4) for _ in range(2)]
    B = P * G
    hole = torch.ones(B, 1, dtype=torch.bool)
    hole[2] = False
    step1 = torch.randn(B, H, 1, D), torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D)
    for c in caches:  # step 1: row 2 has no token; step 2: every row has one
        c.append(hole, c.next_position + 1)
        c.attend(0, *step1)
    q, k, v = torch.randn(B, H, D), torch.randn(B, Hkv, D), torch.randn(B, Hkv, D)
    for c in caches:
        c.append(torch.ones(B, 1, dtype=torch.bool), c.next_position + 1)
    got = caches[0].attend_one(0, q, k, v)
    want = caches[1].attend(0, q[:, :, None], k[:, :, None], v[:, :, None])
    assert got.shape == (B, H * D) and torch.equal(got, want.flatten(1))
    c, rep = caches[1], H // Hkv
    for b in range(B):
        slots = [0, 1] if b != 2 else [1]  # row 2 had no token at step 1
        keys = torch.cat([prefix.k[0, b // G], c.sk[0, b, :, slots]], dim=1)  # (Hkv, Tp + n, D)
        vals = torch.cat([prefix.v[0, b // G], c.sv[0, b, :, slots]], dim=1)
        kk, vv = keys.repeat_interleave(rep, 0), vals.repeat_interleave(rep, 0)  # (H, ., D)
        ref = torch.softmax((q[b, :, None] @ kk.transpose(1, 2)) * D ** -0.5, -1) @ vv  # (H, 1, D)
        assert (got[b] - ref.flatten()).abs().max() <= 1e-5, f"row {b}"
