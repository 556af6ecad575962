"""Run checkpoints for train.py: atomic, resumable, keep-last-N, with no pickle anywhere.

A run checkpoint is a folder `<out_dir>/checkpoints/step_000010/` holding
  policy/            the policy as a complete Hugging Face model directory (weights, config, tokenizer, chat
                     template, processor and generation configs): sample.py, eval, transformers and vLLM load it
  optimizer.safetensors + optimizer.json   AdamW state tensors, and its param_groups / step counters
  trainer_state.json step, data cursor, scheduler step, RNG states, the resolved config
It is written into a hidden temp folder and renamed into place, so a crash mid-save leaves the previous
checkpoint untouched and never a half-written one under a real name.
"""
import json
import os
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from runtime.files import write_json

STEP_PREFIX = "step_"


def checkpoint_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (temp folders start with '.' and are ignored)."""
    root = checkpoint_dir(out_dir)
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(STEP_PREFIX)
             and os.path.isfile(os.path.join(root, n, "trainer_state.json"))]
    return [os.path.join(root, n) for n in sorted(names)]


def latest_checkpoint(out_dir: str) -> str | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


# ---- optimizer state as safetensors + JSON (torch.save would pickle) ----

def optimizer_to_files(state: dict) -> tuple[dict, dict]:
    """Split an optimizer state_dict into {name: tensor} and a JSON-able remainder."""
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, pstate in state["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state = {}
    for pid, pstate in meta["state"].items():
        state[int(pid) if pid.lstrip("-").isdigit() else pid] = {
            k: (tensors[f"{pid}.{k}"] if v == "tensor" else v) for k, v in pstate.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict, dict]:
    """RNG states: tensors go to safetensors, python/numpy state to JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    v, s, g = meta["python"]
    random.setstate((v, tuple(s), g))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_checkpoint(out_dir: str, step: int, save_policy, optimizer_state: dict, trainer_state: dict,
                    keep_last: int) -> str:
    """Write step_<step> atomically. `save_policy(path)` writes the policy folder, a complete Hugging Face model
    directory (model.save with extras_from=the run's init model)."""
    root = checkpoint_dir(out_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"{STEP_PREFIX}{step:06d}")
    tmp = os.path.join(root, f".tmp-{STEP_PREFIX}{step:06d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_policy(os.path.join(tmp, "policy"))
    opt_tensors, opt_meta = optimizer_to_files(optimizer_state)
    save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    write_json(os.path.join(tmp, "optimizer.json"), opt_meta)
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, os.path.join(tmp, "rng.safetensors"))
    # trainer_state.json is written last: its presence marks a complete checkpoint
    write_json(os.path.join(tmp, "trainer_state.json"), {**trainer_state, "rng": rng_meta})
    if os.path.exists(final):  # re-saving the same step (e.g. the final save after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str, optimizer: bool = True) -> dict:
    """Read a checkpoint folder: {'policy_dir', 'optimizer', 'trainer_state'} and restore RNG states.

    optimizer=False skips the optimizer tensors ({} instead): under FSDP only rank 0 reads them and broadcasts."""
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {state_file} is missing")
    with open(state_file) as f:
        trainer_state = json.load(f)
    with open(os.path.join(path, "optimizer.json")) as f:
        opt_meta = json.load(f)
    optimizer = optimizer_from_files(load_file(os.path.join(path, "optimizer.safetensors")), opt_meta) \
        if optimizer else {}
    set_rng_state(load_file(os.path.join(path, "rng.safetensors")), trainer_state.pop("rng"))
    return {"policy_dir": os.path.join(path, "policy"), "optimizer": optimizer, "trainer_state": trainer_state}
