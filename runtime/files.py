"""Files that survive a crash: JSON written whole or not at all, JSONL appended line by line and synced, a torn
last line (the write a crash interrupted) dropped on reading. Used by checkpoints, the trainer's summaries, the SafeTag builder and the eval harness."""
import json
import os


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary file beside `path`, sync it, then rename it over `path`: a reader (or a restart
    after a crash) sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON, atomically; values JSON cannot hold (paths, dataclasses) are written as str."""
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode("utf-8"))


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSONL file. A torn final line (a crash mid-write) is dropped and cut from the file, so the next
    append starts on a line of its own; a bad line anywhere else is an error naming the line."""
    rows, good_bytes = [], 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for n, line in enumerate(lines):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            rows.append(json.loads(line))
            good_bytes += len(line) + 1
        except json.JSONDecodeError as e:
            if n == len(lines) - 1:        # no newline after it: the write was interrupted
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
                break
            raise ValueError(f"{path}, line {n + 1}: not valid JSON ({e}); fix or delete the file") from None
    return rows


def append_jsonl(path: str, rows: list[dict]) -> None:
    """Append one JSON line per row, then sync: a row reported written is on disk."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
