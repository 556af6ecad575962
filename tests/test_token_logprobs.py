"""Token log-probs and entropies (logprobs.py) pinned by the naive full-softmax versions (values and gradients, fp32
and bf16) and by a peak-memory bound per chunk. Run: `.venv/bin/python -m pytest -q tests/test_token_logprobs.py` (a few seconds on CPU)."""
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from logprobs import head_logprobs, token_entropy, token_logprobs, token_logprobs_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,chunk_size", [(1.0, 512), (0.7, 5), (1.3, 1), (1.0, 3)])
def test_token_logprobs_equals_naive_values_and_grads(dtype, temperature, chunk_size):
    # chunk 512 > B*T: one chunk; 5: several whole rows; 1 and 3 < T: the time axis is split too
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 1000, generator=g)).to(dtype)
    tokens = torch.randint(0, 1000, (3, 7), generator=g)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast = token_logprobs(x1, tokens, temperature, chunk_size)
    slow = token_logprobs_reference(x2, tokens, temperature)  # bf16 -> upcast to fp32 first
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)
    w = torch.randn(3, 7, generator=g)
    (fast * w).sum().backward()
    (slow * w).sum().backward()
    assert x1.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 grads: both are an fp32 grad rounded to bf16
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), rtol=tol, atol=tol)


def test_token_logprobs_on_a_sliced_view_and_2d():
    # training slices the response positions out of the full logits: a non-contiguous view
    g = torch.Generator().manual_seed(1)
    full = torch.randn(2, 9, 50, generator=g)
    logits = full[:, 3:8]
    tokens = torch.randint(0, 50, (2, 5), generator=g)
    torch.testing.assert_close(token_logprobs(logits, tokens, chunk_size=2),
                               token_logprobs_reference(logits, tokens), rtol=0, atol=1e-6)
    # (B, V) + (B,): one decode step
    torch.testing.assert_close(token_logprobs(full[:, 0], tokens[:, 0]),
                               token_logprobs_reference(full[:, 0], tokens[:, 0]), rtol=0, atol=1e-6)


def test_token_logprobs_errors_name_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 4\)"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), temperature=0.0)


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by ATen ops inside the `with` block, alive at once.

    How: every op output whose storage is new (not an input created before the block, not a view of one
    already counted) is recorded with a weak reference; after each op, storages freed since are dropped
    and the live total is compared with the peak. Exact and deterministic for tensor allocations, on CPU
    or GPU, forward and backward (autograd runs the backward ops on this thread for CPU tensors). Not
    counted: scratch a kernel allocates internally. Process-level numbers (RSS, psutil) are too noisy
    for this, and torch.cuda.max_memory_allocated exists only on GPU.
    """

    def __init__(self):
        super().__init__()
        self.live, self.outside, self.peak = {}, set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in self.live:
                    self.outside.add(ref)  # existed before the block: not ours
        out = func(*args, **(kwargs or {}))
        self.live = {r: n for r, n in self.live.items() if not r.expired()}
        self.outside = {r for r in self.outside if not r.expired()}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref not in self.live and ref not in self.outside:
                    self.live[ref] = t.untyped_storage().nbytes()
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def test_peak_tracker_counts_what_it_should():
    x = torch.randn(1000)
    with PeakTensorBytes() as m:
        a = x * 2  # 4000 bytes
        b = a[:10]  # a view: nothing new
        del a, b
        c = torch.zeros(500)  # 2000 bytes; a already freed
        d = x[:100]  # a view of an outside tensor
        del c, d
    assert m.peak == 4000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_peak_memory_is_per_chunk(dtype):
    B, T, V, chunk = 2, 64, 16384, 32  # fp32 (B, T, V) = 8 MiB; one fp32 chunk = 2 MiB
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    full_fp32, chunk_fp32 = B * T * V * 4, chunk * V * 4
    small = 4 * B * T * 4  # (B, T) outputs and grad_outs

    def peak(fn, grad):
        x = logits.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad), PeakTensorBytes() as m:
            out = fn(x)
            if grad:
                out.sum().backward()
        return m.peak

    fast = lambda x: token_logprobs(x, tokens, chunk_size=chunk)
    slow = lambda x: token_logprobs_reference(x, tokens, temperature=1.0)
    # inference (old / ref log-probs): at most two fp32 chunks alive, vs >= 2 full fp32 tensors
    assert peak(fast, False) <= 2 * chunk_fp32 + small
    assert peak(slow, False) >= 2 * full_fp32
    # training: the logits' own gradient (unavoidable) + two fp32 chunks, vs + a saved full fp32 softmax
    assert peak(fast, True) <= logits.nbytes + 2 * chunk_fp32 + small
    assert peak(slow, True) >= logits.nbytes + full_fp32
    # the entropy stat / bonus: the same per-chunk bound (z, p and p * z of one chunk)
    assert peak(lambda x: token_entropy(x, chunk_size=chunk), False) <= 3 * chunk_fp32 + small
    assert peak(lambda x: token_entropy(x, chunk_size=chunk), True) <= logits.nbytes + 3 * chunk_fp32 + small


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_entropy_equals_naive_values_and_grads(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(2, 5, 30, generator=g)).to(dtype)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast = token_entropy(x1, 0.8, chunk_size=3)
    z = x2.float() / 0.8
    slow = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)  # (B, T)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    w = torch.randn(2, 5, generator=g)
    (fast * w).sum().backward()
    (slow * w).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- from hidden states, through the head

@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("temperature,chunk,entropy_grad", [(1.0, 512, False), (0.7, 5, True), (1.3, 1, True)])
def test_head_logprobs_equal_the_head_then_token_logprobs(autocast, temperature, chunk, entropy_grad):
    """head_logprobs(h, W) == token_logprobs / token_entropy of lm_head(h) in values and in the gradients of h and W
    (fp32: to float rounding; under bf16 autocast, where the head's product runs in bf16 on both sides: within the
    rounding of bf16 gradients), the entropies with a gradient only when asked."""
    g = torch.Generator().manual_seed(0)
    B, T, C, V = 3, 7, 24, 300
    h0, w0 = torch.randn(B, T, C, generator=g), torch.randn(V, C, generator=g) / C ** 0.5
    tokens = torch.randint(0, V, (B, T), generator=g)
    wl, we = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    results = []
    for fused in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                logp, ent = head_logprobs(h, w, tokens, temperature, chunk_size=chunk, entropy_grad=entropy_grad)
            else:
                logits = torch.nn.functional.linear(h, w)
                logp = token_logprobs(logits, tokens, temperature)
                with torch.set_grad_enabled(entropy_grad):
                    ent = token_entropy(logits, temperature)
        loss = (logp * wl).sum() + ((ent * we).sum() if entropy_grad else 0.0)
        loss.backward()
        assert ent.requires_grad == entropy_grad
        results.append((logp.detach(), ent.detach(), h.grad, w.grad))
    tol = 1e-5 if not autocast else 3e-2
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_head_logprobs_never_hold_the_whole_logits():
    """Forward and backward from hidden states: a few chunks of fp32 logits alive at a time, never the (B, T, V)
    logits or their gradient (what the trainer's forward held before: logits, their gradient, a saved copy)."""
    B, T, C, V, chunk = 4, 256, 32, 16384, 16
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(B, T, C, generator=g, requires_grad=True), torch.randn(V, C, generator=g, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    full, chunk_fp32 = B * T * V * 4, chunk * V * 4
    with PeakTensorBytes() as m:
        logp, _ = head_logprobs(h, w, tokens, chunk_size=chunk)
        logp.sum().backward()
    # the weight's gradient (V x C, fp32) is unavoidable; then a handful of fp32 buffers: forward chunks, and in
    # backward vocabulary slices of ~4 chunks' size each
    assert m.peak <= w.nbytes * 2 + 24 * chunk_fp32 + 64 * B * T
    assert m.peak < full / 3


def test_head_logprobs_skip_masked_positions():
    """With a mask, only real positions go through the head: the same values there (0 elsewhere) and the same
    gradients as the whole product masked afterwards."""
    g = torch.Generator().manual_seed(2)
    B, T, C, V = 3, 6, 16, 200
    h0, w0 = torch.randn(B, T, C, generator=g), torch.randn(V, C, generator=g) / 4
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([6, 2, 4])[:, None]).float()
    out = []
    for m in (mask, None):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        logp, ent = head_logprobs(h, w, tokens, 0.9, mask=m, chunk_size=4, entropy_grad=True)
        ((logp * mask).sum() + (ent * mask).sum()).backward()
        out.append((logp * mask, ent * mask, h.grad, w.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (out[0][0][mask == 0] == 0).all()
