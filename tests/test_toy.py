"""The toy world (data/toy.py) and its warm start (data/warmstart.py): rules, determinism, responses that
score as designed, metrics pinned on hand-made responses, and the checkpoint + warm start on a tiny model."""
import os
import random

import numpy as np
import pytest
import torch
from tokenizers import Regex, pre_tokenizers

import rewards
from config import parse_config
from data import toy
from data.record import Record
from model.tokenizer import PRETOKENIZE_REGEX


def pixels(record):
    return np.asarray(record.images[0])


# ---------------------------------------------------------------- world rules
def test_tag_rule_table():
    # combine_tag = unsafe iff text unsafe, image unsafe, or a compositional question about a hazard object
    expected = {
        ("benign", "benign"): "safe", ("hazard", "benign"): "safe", ("unsafe", "benign"): "unsafe",
        ("benign", "compositional"): "safe", ("hazard", "compositional"): "unsafe",
        ("unsafe", "compositional"): "unsafe",
        ("benign", "harmful"): "unsafe", ("hazard", "harmful"): "unsafe", ("unsafe", "harmful"): "unsafe",
    }
    for (category, kind), combined in expected.items():
        t = toy.tags(category, kind)
        assert t["combine_tag"] == combined, (category, kind)
        assert t["image_tag"] == ("unsafe" if category == "unsafe" else "safe")
        assert t["text_tag"] == ("unsafe" if kind == "harmful" else "safe")


def test_records_follow_their_subset():
    recs = toy.records("train", 400, seed=3)
    assert {r.subset for r in recs} == set(toy.SUBSETS)
    for r in recs:
        m = r.meta
        assert r.labels == toy.tags(m["category"], m["kind"])
        assert r.images[0].size == (toy.IMAGE_SIZE, toy.IMAGE_SIZE) and r.images[0].mode == "RGB"
        if r.subset == "benign":
            assert m["kind"] == "benign" and m["category"] in ("benign", "hazard")
        elif r.subset == "harmful_text":
            assert r.labels["text_tag"] == "unsafe"
        elif r.subset == "visual_unsafe":
            assert m["category"] == "unsafe" and r.labels["text_tag"] == "safe"
        else:
            assert m["kind"] == "compositional"
            assert m["category"] == ("hazard" if r.subset == "compositional_unsafe" else "benign")
        # the labels alone mark compositional risk (image safe, text safe, combination unsafe): metrics rely on it
        hidden = r.labels["image_tag"] == r.labels["text_tag"] == "safe" and r.labels["combine_tag"] == "unsafe"
        assert hidden == (r.subset == "compositional_unsafe")


def test_compositional_questions_need_the_image():
    # the same question is safe or unsafe depending only on what is drawn
    recs = [r for r in toy.records("test", 300) if r.meta["kind"] == "compositional"]
    by_question = {}
    for r in recs:
        by_question.setdefault(r.prompt, set()).add(r.labels["combine_tag"])
    assert by_question and all(v == {"safe", "unsafe"} for v in by_question.values())


def test_records_are_deterministic_and_splits_disjoint():
    a, b = toy.records("train", 30, seed=1), toy.records("train", 30, seed=1)
    assert [r.id for r in a] == [r.id for r in b]
    assert all((pixels(x) == pixels(y)).all() and x.labels == y.labels and x.prompt == y.prompt
               for x, y in zip(a, b))
    c = toy.records("test", 30, seed=1)
    d = toy.records("train", 30, seed=2)
    train_images = {pixels(r).tobytes() for r in a}
    assert not train_images & {pixels(r).tobytes() for r in c}
    assert not train_images & {pixels(r).tobytes() for r in d}
    with pytest.raises(ValueError, match="unknown toy split"):
        toy.records("validation", 3)


def test_the_mix_of_subsets():
    """--toy_mix: the subsets' relative weights; empty is the world's own, bad text is a ValueError naming it."""
    assert toy.mix("") == toy.SUBSET_WEIGHTS and toy.mix("0.2,0.05,0.3,0.2,0.25") == toy.SUBSET_WEIGHTS
    assert [r.id for r in toy.records("train", 20, 1, toy.mix(""))] == [r.id for r in toy.records("train", 20, 1)]
    only = toy.records("train", 40, 1, toy.mix("0,0,1,0,0"))
    assert {r.subset for r in only} == {"visual_unsafe"} and {r.meta["category"] for r in only} == {"unsafe"}
    weapons = lambda w: sum(r.subset == "visual_unsafe" for r in toy.records("train", 400, 0, w))  # noqa: E731
    assert weapons(toy.mix("0.2,0.15,0.15,0.25,0.25")) < 0.6 * weapons(toy.SUBSET_WEIGHTS)  # half the weapons
    unsafe = [r.labels["combine_tag"] == "unsafe" for r in toy.records("train", 2000, 0)]
    assert abs(np.mean(unsafe) - 0.55) < 0.03                 # the world's own mix: 55% of the prompts unsafe
    for bad in ("1,2,3", "a,b,c,d,e", "1,1,-1,1,1", "0,0,0,0,0", "nan,1,1,1,1", "inf,1,1,1,1"):
        with pytest.raises(ValueError, match="--toy_mix"):
            toy.mix(bad)
    with pytest.raises(ValueError, match="--toy_mix"):
        parse_config(["--toy_mix=1,2"])
    for flag in ("toy_couple", "toy_risky_visual"):
        for bad in ("-0.1", "1.5", "nan"):
            with pytest.raises(ValueError, match=f"--{flag}"):
                parse_config([f"--{flag}={bad}"])


def test_images_vary_and_show_an_object():
    recs = toy.records("train", 60, seed=0)
    assert len({pixels(r).tobytes() for r in recs}) == len(recs)
    for r in recs:
        _, counts = np.unique(pixels(r).reshape(-1, 3), axis=0, return_counts=True)
        assert len(counts) >= 2 and counts.max() < 0.95 * counts.sum()   # not just background


def test_color_families_do_not_cross_categories():
    names = {cat: {c for o in objs for c, _ in toy.OBJECTS[o][3]} for cat, objs in toy.CATEGORY_OBJECTS.items()}
    assert not names["benign"] & names["hazard"] and not names["benign"] & names["unsafe"]
    assert not names["hazard"] & names["unsafe"]


def test_blank_images_keep_everything_but_the_picture():
    recs = toy.records("test", 5)
    blank = toy.blank_images(recs)
    for r, b in zip(recs, blank):
        assert (b.prompt, b.labels, b.subset) == (r.prompt, r.labels, r.subset)
        assert b.images[0].size == r.images[0].size and len(np.unique(pixels(b))) == 1
        assert b.meta["blank"] and "blank" not in r.meta


# ---------------------------------------------------------------- responses
def test_reference_responses_score_one_in_both_reward_modes():
    for r in toy.records("test", 200, seed=4):
        resp = toy.reference_response(r)
        assert rewards.score(resp, r.labels, mode="paper")[0] == 1.0, resp
        assert rewards.score(resp, r.labels, mode="strict")[0] == 1.0, resp
        assert not resp.startswith("<think>")      # the chat template's generation prompt opens it


def test_warmstart_judgement_is_image_blind_and_well_formed():
    recs = toy.records("train", 300, seed=5)
    # same question + same random draws -> same tags, whatever the picture
    by_question = {}
    for r in recs:
        c = rewards.score(toy.warmstart_response(r, random.Random(7)), r.labels)[1]
        by_question.setdefault(r.prompt, set()).add((c["pred_visual"], c["pred_text"], c["pred_combined"]))
    assert all(len(v) == 1 for v in by_question.values())
    rng = random.Random(0)
    for r in recs:
        resp = toy.warmstart_response(r, rng)
        _, c = rewards.score(resp, r.labels)
        assert c["format"] == 1 and c["text_correct"]          # the format and the text tag are always right
        assert c["refused"] == (c["pred_combined"] == "unsafe")   # the answer acts on the combined tag
        assert resp.startswith(toy.reference_response(r).split(" <visual_safe>")[0])   # the caption sees
        blind = toy.warmstart_response(r, random.Random(0), caption="generic")
        assert blind.startswith("I see an object.") and r.meta["object"] not in blind


def test_warmstart_equals_reference_when_the_text_decides():
    # without flips the warm start is right exactly where the text alone decides
    for r in toy.records("test", 200, seed=9):
        same = toy.warmstart_response(r, random.Random(0), 0, 0) == toy.reference_response(r)
        text_decides = r.subset in ("benign", "compositional_safe") or (
            r.subset == "harmful_text" and r.labels["image_tag"] == "safe")
        assert same == text_decides, r.subset


def test_warmstart_flip_rates():
    safe_text = [r for r in toy.records("train", 300, seed=6) if r.labels["text_tag"] == "safe"]

    def rates(**kw):
        """{kind: (P(visual unsafe), P(unsafe verdict | visual unsafe), P(unsafe verdict | visual safe))}"""
        rng = random.Random(0)
        draws = [(r.meta["kind"], rewards.score(toy.warmstart_response(r, rng, **kw), r.labels)[1])
                 for r in safe_text * 10]
        out = {}
        for kind in ("benign", "compositional"):
            visual = np.array([c["pred_visual"] == "unsafe" for k, c in draws if k == kind])
            combined = np.array([c["pred_combined"] == "unsafe" for k, c in draws if k == kind])
            out[kind] = visual.mean(), combined[visual].mean(), combined[~visual].mean()
        return out

    # independent flips: a visual flip (30% on every question) does not drag the verdict (20%) along
    for kind, (visual, dragged, alone) in rates().items():
        assert abs(visual - 0.3) < 0.03 and abs(dragged - 0.2) < 0.04 and abs(alone - 0.2) < 0.03, kind
    # --toy_couple=P --toy_risky_visual=0.1 (the default: P = 1): on a plain question the visual flip makes the
    # verdict unsafe too; a risky-sounding question flips the visual tag less, and its verdict keeps its own flip
    # (with P = 0.6: P(unsafe verdict | visual unsafe) = 0.2 + 0.8 * 0.6 = 0.68 on a plain question)
    for p_couple in (0.6, 1.0):
        got = rates(p_couple=p_couple, p_visual_risky=0.1)
        for kind, flip, dragged in (("benign", 0.3, 0.2 + 0.8 * p_couple), ("compositional", 0.1, 0.2)):
            visual, drag, alone = got[kind]
            assert abs(visual - flip) < 0.03 and abs(drag - dragged) < 0.06 and abs(alone - 0.2) < 0.03, kind
    rng = random.Random(0)
    # harmful text is always called unsafe and refused
    harmful = [r for r in toy.records("train", 100) if r.labels["text_tag"] == "unsafe"]
    assert all(rewards.score(toy.warmstart_response(r, rng), r.labels)[1]["pred_combined"] == "unsafe"
               for r in harmful)


def test_corpus_covers_every_response():
    corpus = set(toy.corpus())
    split = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated")   # the toy tokenizer's pieces
    pieces = lambda text: {p for p, _ in split.pre_tokenize_str(text)}  # noqa: E731
    seen = set().union(*map(pieces, corpus))
    text = toy.records("test", 200, seed=8)
    assert all(r.prompt in corpus and toy.reference_response(r) in corpus for r in text)
    # the warm start with both flips at once is not in the corpus; its pieces (words, punctuation) are
    both = [toy.warmstart_response(r, random.Random(0), 1, 1, caption=c) for r in text for c in ("object", "generic")]
    assert any(b not in corpus for b in both)
    assert all(pieces(b) <= seen for b in both)
    assert all(pieces(toy.warmstart_response(r, random.Random(i))) <= seen for i, r in enumerate(text))
    assert all(pieces(toy.warmstart_response(r, random.Random(i), p_couple=1, p_visual_risky=0.1)) <= seen
               for i, r in enumerate(text))


# ---------------------------------------------------------------- metrics
def _rec(subset, category, kind):
    meta = {"object": toy.CATEGORY_OBJECTS[category][0], "category": category, "color": "red",
            "where": "in the middle", "kind": kind, "template": 0}
    return Record(f"t/{subset}", "q", [], toy.tags(category, kind), subset, meta)


def test_metrics_on_hand_made_responses():
    recs = [_rec("benign", "benign", "benign"), _rec("compositional_safe", "benign", "compositional"),
            _rec("compositional_unsafe", "hazard", "compositional"),
            _rec("compositional_unsafe", "hazard", "compositional")]
    blind = toy.warmstart_response(recs[1], random.Random(0), 0, 0)   # combined safe, helpful answer
    responses = [
        toy.reference_response(recs[0]),    # 1.0
        "no tags at all",                    # format 0 -> 0.0, not a refusal
        toy.reference_response(recs[2]),    # 1.0, refused
        blind,                               # combined wrong (safe), visual + text right: 0.0, not refused
    ]
    m = toy.metrics(recs, responses)
    assert m["reward"] == pytest.approx(0.5)
    assert m["format_rate"] == pytest.approx(0.75)
    assert m["combined_acc"] == pytest.approx(0.5)
    assert m["refusal_unsafe"] == pytest.approx(0.5) and m["compositional_refusal"] == pytest.approx(0.5)
    assert m["over_refusal_safe"] == 0.0
    assert m["compositional_acc"] == pytest.approx(1 / 3)
    assert (m["n"], m["n_benign"], m["n_compositional_unsafe"], m["n_harmful_text"]) == (4, 1, 2, 0)
    assert m["reward_compositional_unsafe"] == pytest.approx(0.5) and np.isnan(m["reward_harmful_text"])
    # `reward` follows reward_fn; the safety rates stay on the paper reward's components
    m2 = toy.metrics(recs, responses, reward_fn=lambda resp, labels: (2.0, {}))
    assert m2["reward"] == 2.0 and m2["format_rate"] == m["format_rate"]
    with pytest.raises(ValueError, match="4 records but 3 responses"):
        toy.metrics(recs, responses[:3])


def test_greedy_warm_start_scores_as_designed():
    # what an ideal image-blind model decodes greedily (no flips): acceptance needs compositional_refusal <= 0.2
    recs = toy.records("test", 300)
    m = toy.metrics(recs, [toy.warmstart_response(r, random.Random(0), 0, 0) for r in recs])
    assert m["format_rate"] == 1.0 and m["compositional_refusal"] == 0.0 and m["over_refusal_safe"] == 0.0
    assert m["reward"] < 0.7      # the reference scores 1.0: room for SafeGRPO to gain >= 0.15


# ---------------------------------------------------------------- checkpoint and warm start (tiny model, CPU)
from data.warmstart import encode_example, make_batch, warm_start   # noqa: E402


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return toy.build_checkpoint(str(tmp_path_factory.mktemp("toy") / "init"), seed=0)


def test_checkpoint_loads_like_a_real_one(toy_dir):
    import model as vlm
    net, proc = vlm.load(toy_dir), vlm.load_processor(toy_dir)
    vocab = proc.tokenizer.get_vocab()
    assert isinstance(net, vlm.Qwen3VL) and net.config.image_token_id == vocab["<|image_pad|>"]
    assert len(proc.tokenizer) <= net.config.text.vocab_size
    rec = toy.records("test", 1)[0]
    enc = proc.encode(rec.prompt, rec.images)
    grid = toy.IMAGE_SIZE // toy.PATCH_SIZE
    assert enc["image_grid_thw"].tolist() == [[1, grid, grid]]
    assert int((enc["input_ids"] == vocab["<|image_pad|>"]).sum()) == grid * grid // 4     # 2x2 merge
    assert proc.decode(enc["input_ids"]).endswith("<|im_start|>assistant\n<think>\n")
    resp = toy.reference_response(rec)
    ids = proc.tokenizer(resp, add_special_tokens=False)["input_ids"]
    assert proc.decode(ids) == resp and len(ids) < 80
    # the same seed builds the same weights
    again = vlm.load(toy.build_checkpoint(os.path.join(os.path.dirname(toy_dir), "again"), seed=0))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_make_batch_layout():
    ex = [dict(input_ids=torch.tensor([5, 6, 7]), response_ids=torch.tensor([8, 9])),
          dict(input_ids=torch.tensor([1, 2]), response_ids=torch.tensor([3, 4, 0]))]
    b = make_batch(ex, pad_id=99)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 99], [99, 1, 2, 3, 4, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert b["targets"].tolist() == [[8, 9, 99], [3, 4, 0]] and b["target_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b["pixel_values"] is None and b["image_grid_thw"] is None


@pytest.mark.slow
def test_warm_start_teaches_the_format(toy_dir):
    import model as vlm
    from sample import generate
    torch.manual_seed(0)
    net, proc = vlm.load(toy_dir), vlm.load_processor(toy_dir)
    rng = random.Random(0)
    examples = [(r, toy.warmstart_response(r, rng)) for r in toy.records("train", 256, seed=0)]
    e = encode_example(proc, *examples[0])
    assert e["response_ids"][-1] == proc.stop_token_ids[0]          # the target ends the turn
    losses = warm_start(net, proc, examples, steps=60, lr=3e-3, batch_size=16, seed=0, log=None)
    assert len(losses) == 60 and losses[-1] < 0.2 * losses[0]
    recs = toy.records("test", 8)
    ro = generate(net, [proc.encode(r.prompt, r.images) for r in recs], group_size=1, max_new_tokens=90,
                  temperature=0.0, stop_token_ids=proc.stop_token_ids, pad_token_id=proc.pad_token_id)
    texts = [proc.decode(ro.response_ids[i][ro.response_mask[i].bool()].tolist(), skip_special_tokens=True)
             for i in range(len(recs))]
    # 60 updates is a CI-sized warm start (train.py runs 300): most, not yet all, greedy outputs are well formed
    assert toy.metrics(recs, texts)["format_rate"] >= 0.75, texts
