"""The training prompts as train.py reads them: the records of a split, each prompt encoded as the model reads it,
overlong prompts dropped when the data is loaded, and the seeded stream of record indices that the steps consume.
"""
import torch


def load_split(cfg, split: str):
    """Records of one split: the toy world, or a SafeTag-format dataset on disk."""
    if cfg.data == "toy":
        from data import toy
        return toy.records(split, cfg.toy_train_size if split == cfg.train_split else cfg.toy_eval_size, cfg.seed,
                           toy.mix(cfg.toy_mix))
    from data.safetag import load_safetag
    return load_safetag(cfg.data, split=split, image_root=cfg.image_root or None)


def encode(processor, record, cfg) -> dict:
    """One record's prompt as the model reads it: chat-rendered (with the step-guided instruction unless
    cfg.step_guided is off), tokenized, its images as patches (Processor.encode)."""
    from data.prompt import build_prompt
    text = build_prompt(record.prompt, cfg.prompt_file or None) if cfg.step_guided else record.prompt
    return processor.encode(text, record.images)


def prompt_lengths(processor, records, cfg) -> list[int]:
    return [encode(processor, r, cfg)["input_ids"].numel() for r in records]


def drop_overlong(processor, records, cfg, log=print) -> tuple[list, int]:
    """(the records whose prompt fits cfg.max_prompt_len, the longest of their prompts); the others are dropped when
    the data is loaded (verl's filter_overlong_prompts, which the paper's launch script sets), counted and reported,
    never cut."""
    lengths = prompt_lengths(processor, records, cfg)
    kept = [r for r, n in zip(records, lengths) if n <= cfg.max_prompt_len]
    if len(kept) < len(records):
        log(f"dropped {len(records) - len(kept)} of {len(records)} records with prompts over "
            f"--max_prompt_len={cfg.max_prompt_len} tokens", flush=True)
    return kept, max((n for n in lengths if n <= cfg.max_prompt_len), default=0)


def epoch_length(n_records: int, cfg) -> int:
    """Prompts an epoch takes from the stream: whole steps only with cfg.drop_last (verl's dataloader), else all."""
    whole = n_records - n_records % cfg.prompts_per_step
    return whole if cfg.drop_last and whole else n_records


def stream_ids(start: int, count: int, n_records: int, cfg) -> list[int]:
    """Record indices at positions [start, start + count) of the prompt stream: epoch after epoch, each a seeded
    permutation of the records. Depends only on (seed, position), so every rank, and a resumed run, sees the same
    order; the position is the trainer's cursor (steps may take more than prompts_per_step with dynamic sampling)."""
    E, ids, perms = epoch_length(n_records, cfg), [], {}
    for k in range(start, start + count):
        epoch, pos = divmod(k, E)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_records, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003
                                                                                            + epoch))
        ids.append(int(perms[epoch][pos]))
    return ids
