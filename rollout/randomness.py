"""The random numbers of a rollout: counter-based, so that a row's samples depend only on its prompt's seed and its
sample index, never on the batch it runs in. The host derives keys (Python integers); the device turns them into one
uniform number per token (rollout/step.py gathers them; rollout/sampling.py turns them into tokens). hash64 is also
the project's one seed hash (train.py seeds prompts with it, eval seeds records with it).
"""
import torch

MASK64 = (1 << 64) - 1


# Every sample draws one uniform number per token, u = hash(row key, token index), and takes the token where u falls
# in its (filtered) CDF: inverse-CDF sampling, exact for any distribution. The row key is hash(prompt key, sample
# index) and the prompt key is prompt_seeds[i] (or hash(seed, i)), so a row's numbers depend on nothing else in the
# batch; there is no torch.Generator whose stream position would shift with batch composition, and the integers are
# the same on every device. The host derives row keys once per prompt (Python integers); at admission the device
# hashes them with every token index in int64 tensor ops (same bits: two's-complement products wrap exactly like
# uint64 ones) into a table the step gathers from, so the graph needs no per-step input and no hashing. (A token
# can only change with the batch if the batch changes the logits, i.e.
# float rounding of differently-shaped kernels moves a CDF boundary across u.)

def splitmix64(x: int) -> int:
    """A 64-bit mixing function (Steele et al., SplitMix64's output step): distinct inputs -> unrelated outputs."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def hash64(*parts: int) -> int:
    """One 64-bit key from integers, stable across processes and machines (Python's hash() is not)."""
    h = 0
    for p in parts:
        h = splitmix64(h ^ (p & MASK64))
    return h


def row_keys(seed: int, num_prompts: int, group_size: int, prompt_seeds=None) -> list[int]:
    prompt_keys = [hash64(seed, i) if prompt_seeds is None else int(prompt_seeds[i]) for i in range(num_prompts)]
    return [hash64(k, j) for k in prompt_keys for j in range(group_size)]


def uniforms(keys: list[int], step: int) -> list[float]:
    """One uniform in (0, 1) per key: the top 53 bits of hash(key, step), offset by half a step (host version)."""
    return [((hash64(k, step) >> 11) + 0.5) * 2.0 ** -53 for k in keys]


def _as_int64(x: int) -> int:
    """The int64 with the same 64 bits as the unsigned x."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: mask off the copied sign bits)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64_t(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 on an int64 tensor, bit for bit."""
    x = x + _as_int64(0x9E3779B97F4A7C15)
    x = (x ^ _shr(x, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _as_int64(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def uniforms_t(mixed_keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """uniforms on the device: mixed_keys = splitmix64(key) (int64), step broadcast against it -> float64."""
    return (_shr(splitmix64_t(mixed_keys ^ step), 11).double() + 0.5) * 2.0 ** -53
