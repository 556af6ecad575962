"""Parity with transformers on tiny random configs of both architectures (fp32, CPU), through the parametrized
`models` fixture: logits, rope_index, the vision tower, and KV-cached decoding against the full forward.
Qwen2.5-VL's own matters (windows, contiguous M-RoPE, key names): tests/test_model_qwen2_5vl.py.
Run: .venv/bin/python -m pytest -q tests/test_model_qwen3vl.py
"""
import copy

import pytest
import torch

import model
from parity import IMG, PAD, PATCH, TOL, V_END, V_START, left_pad, make_pixels
from tiny import tiny_hf

ERRORS = {}  # name -> max abs logit diff, printed at the end (pytest -s) for the report


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def models(request, tmp_path_factory):
    """(hf, ours) of each architecture with the same scrambled weights; ours loaded through our checkpoint reader.
    The tiny Qwen2.5-VL tower attends in windows of 2 x 2 merged tokens in blocks 0 and 2, so every image here spans
    several windows, some cut short at the edges."""
    ERRORS.clear()
    hf = tiny_hf(request.param, patch_size=PATCH)
    path = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(path)
    ours = model.load(path)
    assert type(ours).__name__ == {"qwen3_vl": "Qwen3VL", "qwen2_5_vl": "Qwen2_5_VL"}[request.param]
    yield hf, ours
    if ERRORS:
        print(f"\n{request.param} max abs logit differences:", {k: f"{v:.2e}" for k, v in ERRORS.items()})
    ERRORS.clear()


def make_prompt(grids, gen, pre=3, between=4, post=5):
    """Token ids: text, then per image <vision_start> image_pad * (t*h*w/4) <vision_end> text."""
    rand = lambda n: torch.randint(0, 500, (n,), generator=gen).tolist()  # noqa: E731
    ids = rand(pre)
    for t, h, w in grids:
        ids += [V_START] + [IMG] * (t * h * w // 4) + [V_END] + rand(between)
    return ids + rand(post)


def hf_logits(hf, ids, mask=None, pixels=None, grids=None, position_ids=None):
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    if pixels is not None:
        kw.update(pixel_values=pixels, image_grid_thw=torch.tensor(grids), mm_token_type_ids=(ids == IMG).int())
    with torch.no_grad():
        return hf(**kw).logits


def record(name, a, b):
    err = (a - b).abs().max().item()
    ERRORS[name] = err
    assert err <= TOL, f"{name}: max abs diff {err:.3e} > {TOL}"


@torch.no_grad()
def test_text_only_parity(models):
    hf, ours = models
    ids = torch.tensor([make_prompt([], torch.Generator().manual_seed(0), post=20)])
    record("text", ours(ids), hf_logits(hf, ids))


@torch.no_grad()
def test_one_image_parity(models):
    hf, ours = models
    gen = torch.Generator().manual_seed(1)
    grids = [(1, 6, 10)]  # upsampled from the 8 x 8 position table on one axis, downsampled on the other
    ids, pixels = torch.tensor([make_prompt(grids, gen)]), make_pixels(grids, gen)
    a = ours(ids, pixel_values=pixels, image_grid_thw=torch.tensor(grids))
    record("one image", a, hf_logits(hf, ids, pixels=pixels, grids=grids))


@torch.no_grad()
def test_two_images_of_different_sizes_parity(models):
    hf, ours = models
    gen = torch.Generator().manual_seed(2)
    grids = [(1, 4, 6), (1, 12, 4)]
    ids, pixels = torch.tensor([make_prompt(grids, gen)]), make_pixels(grids, gen)
    a = ours(ids, pixel_values=pixels, image_grid_thw=torch.tensor(grids))
    record("two images", a, hf_logits(hf, ids, pixels=pixels, grids=grids))


@torch.no_grad()
def test_left_padded_batch_with_images_parity(models):
    hf, ours = models
    gen = torch.Generator().manual_seed(3)
    g0, g1 = [(1, 4, 4)], [(1, 6, 4), (1, 2, 2)]
    ids, mask = left_pad([make_prompt(g0, gen, post=2), make_prompt(g1, gen, post=9)])
    pixels, grids = torch.cat([make_pixels(g0, gen), make_pixels(g1, gen)]), g0 + g1
    a = ours(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=torch.tensor(grids))
    b = hf_logits(hf, ids, mask, pixels, grids)
    real = mask.bool()
    record("padded batch, images", a[real], b[real])


@torch.no_grad()
def test_left_padded_text_batch_parity(models):
    # HF's forward numbers text-only tokens 0..T-1 including the padding (its generate() does not);
    # give it the padding-aware positions of its own get_rope_index, which is what ours uses.
    hf, ours = models
    gen = torch.Generator().manual_seed(4)
    ids, mask = left_pad([make_prompt([], gen, post=3), make_prompt([], gen, post=17)])
    pos, _ = hf.model.get_rope_index(ids, torch.zeros_like(ids, dtype=torch.int), attention_mask=mask)
    a = ours(ids, attention_mask=mask)
    b = hf_logits(hf, ids, mask, position_ids=pos)
    real = mask.bool()
    record("padded batch, text", a[real], b[real])


@torch.no_grad()
def test_rope_index_matches_hf(models):
    hf, ours = models
    gen = torch.Generator().manual_seed(5)
    cases = []
    ids = torch.tensor([make_prompt([], gen)])
    cases.append((ids, None, None))
    grids = [(1, 4, 6), (1, 10, 2)]
    cases.append((torch.tensor([make_prompt(grids, gen)]), grids, None))
    g0, g1 = [(1, 8, 4)], [(1, 2, 6), (1, 4, 4)]
    ids, mask = left_pad([make_prompt(g0, gen, post=1), make_prompt(g1, gen, pre=6)])
    cases.append((ids, g0 + g1, mask))
    ids, mask = left_pad([make_prompt([], gen, post=12), make_prompt(g0, gen)])  # one row without image
    cases.append((ids, g0, mask))
    for ids, grids, mask in cases:
        grid = None if grids is None else torch.tensor(grids)
        pos, delta = ours.rope_index(ids, grid, mask)
        want_pos, want_delta = hf.model.get_rope_index(ids, (ids == IMG).int(), image_grid_thw=grid,
                                                       attention_mask=mask)
        assert torch.equal(pos, want_pos)
        assert torch.equal(delta.view(-1), want_delta.view(-1))


@torch.no_grad()
def test_vision_tower_matches_hf(models):
    hf, ours = models
    gen = torch.Generator().manual_seed(6)
    grids = [(1, 6, 4), (1, 2, 10)]
    pixels = make_pixels(grids, gen)
    tokens, deepstack = ours.encode_images(pixels, torch.tensor(grids))
    out = hf.model.get_image_features(pixels, torch.tensor(grids), return_dict=True)
    assert (tokens - torch.cat(out.pooler_output)).abs().max() <= TOL
    hf_deepstack = getattr(out, "deepstack_features", None) or []  # Qwen3-VL: 2 taps; Qwen2.5-VL: none
    assert len(deepstack) == len(hf_deepstack) == len(getattr(ours.config.vision, "deepstack_visual_indexes", ()))
    for ours_f, hf_f in zip(deepstack, hf_deepstack):
        assert (ours_f - torch.cat(hf_f)).abs().max() <= TOL


@torch.no_grad()
def test_eager_attention_equals_sdpa(models):
    _, ours = models
    gen = torch.Generator().manual_seed(7)
    grids = [(1, 4, 4)]
    ids, mask = left_pad([make_prompt(grids, gen), make_prompt([], gen, post=2)])
    kw = dict(attention_mask=mask, pixel_values=make_pixels(grids, gen), image_grid_thw=torch.tensor(grids))
    a = ours(ids, **kw)
    config = copy.deepcopy(ours.config)
    config.text.attn_impl = "eager"
    eager = type(ours)(config)
    eager.load_state_dict(ours.state_dict())
    b = eager(ids, **kw)
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() <= 1e-5


@torch.no_grad()
def test_training_layout_equals_unpadded_rows(models):
    """[left-padded prompt | right-padded response] rows give each row's own unpadded logits."""
    _, ours = models
    gen = torch.Generator().manual_seed(8)
    g0, g1 = [(1, 4, 6)], [(1, 2, 2)]
    prompts = [make_prompt(g0, gen, post=2), make_prompt(g1, gen, post=8)]
    responses = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (9, 3)]
    P, R = max(map(len, prompts)), max(map(len, responses))
    ids = torch.full((2, P + R), PAD)
    mask = torch.zeros(2, P + R, dtype=torch.long)
    for b in range(2):
        p, r = prompts[b], responses[b]
        ids[b, P - len(p):P + len(r)] = torch.tensor(p + r)
        mask[b, P - len(p):P + len(r)] = 1
    pix = [make_pixels(g0, gen), make_pixels(g1, gen)]
    full = ours(ids, attention_mask=mask, pixel_values=torch.cat(pix), image_grid_thw=torch.tensor(g0 + g1))
    for b, grids in enumerate((g0, g1)):
        row = torch.tensor([prompts[b] + responses[b]])
        alone = ours(row, pixel_values=pix[b], image_grid_thw=torch.tensor(grids))[0]
        assert (full[b][mask[b].bool()] - alone).abs().max() <= TOL


@torch.no_grad()
def test_kv_cache_decode_equals_full_forward(models):
    """Prefill a left-padded batch with images, decode 16 tokens one at a time (one step with a padding
    hole in row 0), and compare every step's logits with one full forward over the whole sequence."""
    _, ours = models
    gen = torch.Generator().manual_seed(9)
    g0, g1 = [(1, 6, 4)], [(1, 2, 4), (1, 4, 4)]
    ids, mask = left_pad([make_prompt(g0, gen, post=2), make_prompt(g1, gen, post=6)])
    pixels, grid = torch.cat([make_pixels(g0, gen), make_pixels(g1, gen)]), torch.tensor(g0 + g1)
    steps = 16
    new_ids = torch.randint(0, 500, (2, steps), generator=gen)
    new_mask = torch.ones(2, steps, dtype=torch.long)
    new_mask[0, 5] = 0  # e.g. a row that skips a step: its slot must be ignored by later tokens

    cache = ours.new_cache(batch_size=2, max_len=ids.shape[1] + steps)
    prefill = ours(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, cache=cache)
    decoded = [ours(new_ids[:, i:i + 1], attention_mask=new_mask[:, i:i + 1], cache=cache) for i in range(steps)]

    all_ids, all_mask = torch.cat([ids, new_ids], 1), torch.cat([mask, new_mask], 1)
    full = ours(all_ids, attention_mask=all_mask, pixel_values=pixels, image_grid_thw=grid)
    cached = torch.cat([prefill] + decoded, dim=1)
    real = all_mask.bool()
    record("kv cache vs full", cached[real], full[real])
    # The positions the cache handed out continue after the image prompt (rope_deltas).
    pos, _ = ours.rope_index(all_ids, grid, all_mask)
    assert torch.equal(cache.next_position, pos.amax(dim=(0, 2)) + 1)

    # Multi-token appends (chunks of 4, e.g. a forced suffix) give the same logits as well.
    cache = ours.new_cache(batch_size=2, max_len=ids.shape[1] + steps)
    chunks = [ours(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, cache=cache)]
    for i in range(0, steps, 4):
        chunks.append(ours(new_ids[:, i:i + 4], attention_mask=new_mask[:, i:i + 4], cache=cache))
    assert (torch.cat(chunks, dim=1)[real] - full[real]).abs().max() <= TOL
    with pytest.raises(ValueError, match="KVCache is full"):
        ours(new_ids[:, :1], cache=cache)


@torch.no_grad()
def test_logits_to_keep_and_errors(models):
    _, ours = models
    gen = torch.Generator().manual_seed(10)
    grids = [(1, 4, 4)]
    ids, pixels = torch.tensor([make_prompt(grids, gen)]), make_pixels(grids, gen)
    full = ours(ids, pixel_values=pixels, image_grid_thw=torch.tensor(grids))
    last = ours(ids, pixel_values=pixels, image_grid_thw=torch.tensor(grids), logits_to_keep=1)
    # Equal up to float rounding: a 1-row matmul may round differently from the same row of a T-row one.
    assert last.shape == (1, 1, 512) and (last[0, 0] - full[0, -1]).abs().max() <= 1e-5
    one_short = ids[:, torch.arange(ids.shape[1]) != (ids[0] == IMG).nonzero()[0, 0]]  # drop one image pad
    with pytest.raises(ValueError, match="image tokens"):
        ours(one_short, pixel_values=pixels, image_grid_thw=torch.tensor(grids))
    with pytest.raises(ValueError, match="pixel_values has 16 patches"):
        ours(ids, pixel_values=pixels, image_grid_thw=torch.tensor([(1, 2, 8), (1, 2, 8)]))
    with pytest.raises(ValueError, match="image_grid_thw has 2 entries"):
        ours.rope_index(ids, torch.tensor([(1, 4, 4), (1, 4, 4)]))


def test_every_parameter_gets_a_gradient_and_bf16_runs(models):
    """Training path: a padded image batch back-propagates into every parameter (Qwen3-VL: DeepStack mergers
    and the position table included); the same model in bf16 gives finite logits close to fp32."""
    _, ours = models
    gen = torch.Generator().manual_seed(11)
    g0, g1 = [(1, 4, 4)], [(1, 2, 6)]
    ids, mask = left_pad([make_prompt(g0, gen), make_prompt(g1, gen, post=9)])
    kw = dict(attention_mask=mask, pixel_values=torch.cat([make_pixels(g0, gen), make_pixels(g1, gen)]),
              image_grid_thw=torch.tensor(g0 + g1))
    trainee = type(ours)(ours.config)
    trainee.load_state_dict(ours.state_dict())
    logits = trainee(ids, **kw)
    logits[mask.bool()].logsumexp(-1).mean().backward()
    no_grad = [n for n, p in trainee.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad
    half = trainee.to(torch.bfloat16)
    with torch.no_grad():
        low = half(ids, **kw).float()
    real = mask.bool()
    assert torch.isfinite(low).all()
    assert (low[real] - logits[real].detach()).abs().max() <= 0.05 * logits.abs().max()
