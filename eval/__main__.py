"""Evaluate a checkpoint on a safety benchmark: load -> generate (resumable) -> judge -> report.

    python -m eval --model DIR --benchmark figstep --data SafeBench-Tiny.csv --image_root images/ \
        --text_prompt_file figstep_prompt.txt --out runs/eval/figstep [--judge keyword] [--judge http://host:8000/v1]
    python -m eval --model runs/toy/final --benchmark toy --out runs/eval/toy   # the toy world's held-out split
Without --model it judges the outputs already saved in --out again (no regeneration). The benchmarks, judges and
metrics: docs/method.md#evaluation-protocol.
"""
import argparse
import os
import sys

from config import TOY_PRESET
from runtime.files import read_jsonl
from eval.benchmarks import LOADERS, MMSB_KINDS, VLGUARD_SUBSETS, BenchmarkError, read_prompt_file
from eval.generate import read_settings
from eval.judges import ChatClient, ChoiceJudge, JudgeError, LLMJudge, keyword_judge, run_judge
from eval.report import build_report, write_report
from eval.templates import make_router

DTYPES = ("float32", "bfloat16", "float16")
PAPER_MAX_NEW_TOKENS = 4096     # the paper's response budget


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--benchmark", required=True, choices=sorted(LOADERS), help="which benchmark")
    p.add_argument("--out", required=True, help="output folder: outputs.jsonl, judgments/, report.{json,md,png}")
    p.add_argument("--model", default=None, help="checkpoint folder (Hugging Face layout); omit to re-judge saved outputs")
    p.add_argument("--data", default=None, help="the benchmark's file or folder in its native format (not for toy)")
    p.add_argument("--image_root", default=None, help="the folder the benchmark's image paths are relative to")
    g = p.add_argument_group("benchmark options")
    g.add_argument("--split", default="test", help="SafeTag or toy split")
    g.add_argument("--toy_size", type=int, default=TOY_PRESET["toy_eval_size"],
                   help="toy: records in the split (train.py's --toy_eval_size)")
    g.add_argument("--toy_seed", type=int, default=0, help="toy: the world's seed (train.py's --seed)")
    g.add_argument("--toy_mix", default="", help="toy: the subsets' weights (train.py's --toy_mix; empty: the world's)")
    g.add_argument("--kinds", default=",".join(MMSB_KINDS), help="MM-SafetyBench image kinds, comma-separated")
    g.add_argument("--scenarios", default=None, help="MM-SafetyBench scenarios (names or 2-digit codes), comma-separated")
    g.add_argument("--ids_file", default=None, help="MM-SafetyBench TinyVersion_ID_List.json to keep the Tiny subset")
    g.add_argument("--subsets", default=",".join(VLGUARD_SUBSETS), help="VLGuard subsets, comma-separated")
    g.add_argument("--text_prompt_file", default=None, help="FigStep's fixed text prompt (a text file)")
    g.add_argument("--regenerate_images", action="store_true", help="FigStep: draw the images with data/typography.py")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    g = p.add_argument_group("generation")
    g.add_argument("--device", default="cpu", help="torch device")
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype")
    g.add_argument("--batch_size", type=int, default=8, help="records per generation batch")
    g.add_argument("--max_new_tokens", type=int, default=None,
                   help=f"response budget in tokens (default {PAPER_MAX_NEW_TOKENS}, the paper's; toy: "
                        f"{TOY_PRESET['max_new_tokens']}, as the toy world trains)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (temperature > 0)")
    g.add_argument("--top_k", type=int, default=0, help="top-k sampling, 0 = off (temperature > 0)")
    g.add_argument("--group_size", type=int, default=1,
                   help="G: responses per record, as in training (needs temperature > 0)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--no_step_guided", action="store_true",
                   help="send the bare question, without the step-guided instruction (toy: always bare, as it trains)")
    g.add_argument("--prompt_file", default=None, help="your own step-guided instruction (a text file)")
    g = p.add_argument_group("judging")
    g.add_argument("--judge", action="append", default=None, metavar="keyword|choice|URL",
                   help="repeatable; keyword lists, the multiple-choice letter parser, or an OpenAI-compatible "
                        "base URL (e.g. http://127.0.0.1:8000/v1). Default: keyword (choice for siuo-mcqa)")
    g.add_argument("--keywords", action="append", default=None, metavar="safegrpo|PATH",
                   help="repeatable; refusal keyword lists for --judge keyword (a file: a Python list as in the "
                        "authors' code, or one keyword per line). Default: safegrpo")
    g.add_argument("--judge_on", default="answer", choices=("answer", "full"),
                   help="judge the <answer> span or the full response")
    g.add_argument("--judge_model", default="gpt-4o-mini", help="model name sent to the LLM judge endpoint")
    g.add_argument("--judge_prompt_file", default=None, metavar="PATH[:VARIABLE]",
                   help="judge template instead of ours (eval/prompts/); the authors' Python files work as they are")
    g.add_argument("--judge_api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--judge_workers", type=int, default=4, help="concurrent judge requests")
    g.add_argument("--judge_timeout", type=float, default=60.0, help="seconds per judge request")
    g.add_argument("--judge_retries", type=int, default=3, help="retries on network errors, 429 and 5xx")
    g.add_argument("--judge_max_tokens", type=int, default=512, help="max tokens of a judge reply")
    g.add_argument("--no_judge_images", action="store_true", help="never attach images to judge requests")
    g.add_argument("--rejudge", action="store_true", help="discard saved judgments of these judges and judge again")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def _csv(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def load_records(args):
    """The benchmark's records, from --data and --image_root, with the options that benchmark takes."""
    if args.benchmark == "toy":    # drawn in code: no files
        records = LOADERS["toy"](args.split, args.toy_size, args.toy_seed, args.toy_mix)
        return records[:args.limit] if args.limit is not None else records
    if args.data is None:
        raise BenchmarkError(f"--data is required to generate (the {args.benchmark} file or folder)")
    if not os.path.exists(args.data):
        raise FileNotFoundError(f"--data {args.data} does not exist")
    b, root = args.benchmark, args.image_root
    if b not in ("safetag", "figstep", "vlsbench") and root is None:     # these three have a default
        raise BenchmarkError(f"{b} needs --image_root (the folder its image paths are relative to)")
    if b == "safetag":
        records = LOADERS[b](args.data, image_root=root, split=args.split)
    elif b == "mmsafetybench":
        records = LOADERS[b](args.data, root, kinds=_csv(args.kinds), scenarios=_csv(args.scenarios),
                             ids_file=args.ids_file)
    elif b == "figstep":
        if args.text_prompt_file is None:
            raise BenchmarkError("figstep needs --text_prompt_file: FigStep's fixed text prompt "
                                 "(FigStep README, section 2.1), in a text file")
        records = LOADERS[b](args.data, read_prompt_file(args.text_prompt_file), image_root=root,
                             regenerate_images=args.regenerate_images)
    elif b == "vlguard":
        records = LOADERS[b](args.data, root, subsets=_csv(args.subsets))
    else:
        records = LOADERS[b](args.data, root)
    return records[:args.limit] if args.limit is not None else records


def generate(args, path: str) -> list[dict]:
    import torch

    import model as model_lib
    from eval.generate import GenerationConfig, generate_outputs

    # The toy world trains on bare questions with short responses (config.TOY_PRESET): evaluated the same way.
    toy = args.benchmark == "toy"
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = TOY_PRESET["max_new_tokens"] if toy else PAPER_MAX_NEW_TOKENS
    step_guided = not args.no_step_guided and (TOY_PRESET["step_guided"] if toy else True)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, group_size=args.group_size, seed=args.seed,
                              step_guided=step_guided, prompt_file=args.prompt_file)
    records = load_records(args)
    print(f"{args.benchmark}: {len(records)} records", file=sys.stderr)

    def load_model():
        net = model_lib.load(args.model, device=args.device, dtype=getattr(torch, args.dtype))
        return net.eval(), model_lib.load_processor(args.model)

    return generate_outputs(load_model, records, path, config, args.benchmark,
                            model_name=os.path.abspath(args.model), batch_size=args.batch_size,
                            progress=not args.no_progress)


def make_judges(args) -> list:
    specs = args.judge or ["choice" if args.benchmark == "siuo-mcqa" else "keyword"]
    judges = []
    for spec in specs:
        if args.benchmark == "siuo-mcqa" and spec != "choice":
            raise ValueError(f"siuo-mcqa is scored by the letter of the answer: use --judge choice, not {spec!r}")
        if spec == "choice":
            if args.benchmark != "siuo-mcqa":
                raise ValueError("--judge choice is for siuo-mcqa (multiple choice) only")
            judges.append(ChoiceJudge(on=args.judge_on))
        elif spec == "keyword":
            judges += [keyword_judge(k, on=args.judge_on) for k in (args.keywords or ["safegrpo"])]
        elif spec.startswith(("http://", "https://")):
            client = ChatClient(spec, model=args.judge_model, api_key=os.environ.get(args.judge_api_key_env),
                                timeout=args.judge_timeout, max_retries=args.judge_retries,
                                max_tokens=args.judge_max_tokens)
            router = make_router(args.benchmark, args.judge_prompt_file)
            if args.no_judge_images and router({"meta": {}}).require_image:     # fail before any generation
                raise ValueError(f"--no_judge_images: the {args.benchmark} judge must see the image")
            judges.append(LLMJudge(client, router, on=args.judge_on, images=not args.no_judge_images,
                                   prompt_file=args.judge_prompt_file))
        else:
            raise ValueError(f"--judge {spec!r}: expected keyword, choice, or an http(s):// endpoint URL")
    return judges


def run(args) -> dict:
    os.makedirs(args.out, exist_ok=True)
    outputs_path = os.path.join(args.out, "outputs.jsonl")
    judges = make_judges(args)          # bad judge flags fail before any generation
    if args.model is not None:
        rows = generate(args, outputs_path)
    elif os.path.exists(outputs_path):
        rows = read_jsonl(outputs_path)
        wrong = {r.get("benchmark") for r in rows} - {args.benchmark}
        if wrong:
            raise ValueError(f"{outputs_path} holds outputs of {', '.join(map(str, wrong))}, not {args.benchmark}")
    else:
        raise FileNotFoundError(f"no --model given and {outputs_path} does not exist: give --model to generate, "
                                f"or point --out at a folder with saved outputs")
    judged = {}
    for judge in judges:
        path = os.path.join(args.out, "judgments", judge.name + ".jsonl")
        if args.rejudge:
            for p in (path, path + ".settings.json"):
                if os.path.exists(p):
                    os.remove(p)
        workers = args.judge_workers if isinstance(judge, LLMJudge) else 1   # keyword lists need no threads
        judged[judge.name] = (judge.settings(), run_judge(judge, rows, path, workers=workers,
                                                          progress=not args.no_progress))
    settings_path = outputs_path + ".settings.json"
    generation = read_settings(settings_path) if os.path.exists(settings_path) else None
    report = build_report(args.benchmark, rows, judged, generation)
    paths = write_report(report, args.out)
    for name, j in report["judges"].items():
        for m in j["metrics"]:
            if m["headline"] and m["n"]:
                print(f"{name}: {m['metric']} [{m['group']}] = {100 * m['rate']:.2f}% "
                      f"({m['k']}/{m['n']}, 95% CI {100 * m['low']:.1f}-{100 * m['high']:.1f}, "
                      f"unparsed {m['unparsed']})")
    if report["reward_metrics"]:
        print("rule reward: " + " ".join(f"{k}={v:.3f}" for k, v in report["reward_metrics"].items()
                                         if isinstance(v, float)))
    print("report: " + ", ".join(paths.values()))
    return report


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (BenchmarkError, JudgeError, OSError, ValueError) as e:     # OSError: a file missing or unreadable
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
