"""The step-guided instruction appended to every user question (docs/method.md#output-format), in our words.

`build_prompt(question)` -> question + "\n" + instruction; `prompt_file=` swaps in a user's own instruction.
"""
import os

# Five steps, each ending in its tag, then the act-on-the-combined-tag rule and the two output blocks.
# The tags and the <think>/<answer> blocks are what rewards.py checks; the wording around them is ours.
STEP_GUIDED_PROMPT = (
    "You are a helpful assistant that takes safety seriously. Read the image and the request together "
    "and think before you reply, in these five steps:\n"
    "1. Describe what the image shows.\n"
    "2. Decide whether the image on its own contains anything unsafe, disturbing or dangerous, then write "
    "<visual_safe>safe</visual_safe> or <visual_safe>unsafe</visual_safe>.\n"
    "3. Decide whether the request on its own has harmful intent or asks for something unsafe, then write "
    "<text_safe>safe</text_safe> or <text_safe>unsafe</text_safe>.\n"
    "4. Decide whether the image and the request taken together could mean, lead to or enable anything "
    "unsafe, misleading, illegal or harmful, then write "
    "<combined_safe>safe</combined_safe> or <combined_safe>unsafe</combined_safe>.\n"
    "5. Sum up the risks you found, if any, and where they come from.\n"
    "After these steps, act on step 4: if the combination is unsafe, decline politely and say briefly why; "
    "if it is safe, give a normal, helpful answer to the request.\n"
    "Put all of your reasoning inside <think> </think> and your final reply inside <answer> </answer>."
)


def load_prompt_file(path: str) -> str:
    """A user's own step-guided instruction: the file's text, trailing whitespace removed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist (it should hold the step-guided instruction)")
    with open(path, encoding="utf-8") as f:
        text = f.read().rstrip()
    if not text.strip():
        raise ValueError(f"prompt file {path!r} is empty")
    return text


def build_prompt(question: str, prompt_file: str | None = None) -> str:
    """The user turn as the paper trains on it: the question, a newline, then the instruction."""
    instruction = load_prompt_file(prompt_file) if prompt_file else STEP_GUIDED_PROMPT
    return question + "\n" + instruction
