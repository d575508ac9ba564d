# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""Reward functions for GSM8K GRPO: QeRL's two rewards, verified-answer variants and the CPU demo's shaped rewards.

Every reward is a pure function `<name>_reward(completions, solution, **kwargs) -> list[float | None]` as TRL's
`GRPOTrainer` calls it. A completion is either conversational (`[{"role": "assistant", "content": text}]`, read as
`completion[0]["content"]`) or a plain string. When the dataset has a `prefill` column (see
`qerl_repro.data.add_assistant_prefill`), the prefill is put back in front of each completion, so rewards always judge
the whole assistant reply. `None` means "no reward defined" (TRL turns it into NaN and ignores it).

| YAML name                   | function                           | value             | role                         |
|-----------------------------|------------------------------------|-------------------|------------------------------|
| `format`                    | `format_reward`                    | 0.2               | QeRL (paper recipes)         |
| `answer`                    | `answer_reward`                    | 2.0               | QeRL (paper recipes)         |
| `numeric_answer`            | `numeric_answer_reward`            | 2.0               | normalised-number variant    |
| `math_verify`               | `math_verify_reward`               | 2.0 / None        | math-verify variant          |
| `math_verify_latex`         | `math_verify_latex_reward`         | 2.0 / None        | Big-Math (LaTeX golds)       |
| `shaped_format`             | `shaped_format_reward`             | 0.05 per tag, 0.2 | CPU demo (no placeholders)   |
| `strict_numeric_format`     | `strict_numeric_format_reward`     | 0.2               | CPU demo, reward-hack guard  |
| `answer_starts_with_number` | `answer_starts_with_number_reward` | 0.1               | CPU demo                     |
| `exact_reply`               | `exact_reply_reward`               | 2.0               | CPU testbed (`testbed.py`)   |
| `soft_overlong`             | `get_soft_overlong_reward(...)`    | 0 to -1           | DAPO recipes (Eq. 13)        |

The paper recipes use `format` + `answer` (QeRL's `utils/rewards.py`: total in {0, 0.2, 2.0, 2.2}). `soft_overlong`
needs the run's `max_completion_length` and an overlong buffer, so `get_reward_funcs` builds it from those
(`REWARD_FACTORIES`); its penalty factor is its entry in `reward_weights`.
"""

import re
import threading
from collections.abc import Callable

from qerl_repro.data import normalize_number


FORMAT_REWARD = 0.2
ANSWER_REWARD = 2.0
SHAPED_TAG_REWARD = 0.05
STRICT_FORMAT_REWARD = 0.2
NUMBER_START_REWARD = 0.1

# QeRL (utils/rewards.py, soft_format_reward_func): think block, then answer block, anywhere in the reply.
_FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_ANSWER_BLOCK_RE = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# The placeholders of QeRL's system prompt (`<think> reasoning process here </think> <answer> answer here </answer>`
# and the `...` skeleton). Copying them verbatim was the reward hack measured in the CPU demo.
_TEMPLATE_PHRASES = ("reasoning process here", "answer here")
_STARTS_WITH_NUMBER_RE = re.compile(r"[-+]?\$?\s*\d")


def _completion_texts(completions: list, prefill: list[str] | None = None) -> list[str]:
    """The assistant text of each completion (conversational or plain string), with its prefill put back in front."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    if prefill is not None:
        texts = [(p or "") + t for p, t in zip(prefill, texts, strict=True)]
    return texts


def extract_answer(text: str) -> str | None:
    """The stripped text after the last `<answer>`, up to the next `</answer>` (or the end), or `None` without a tag.

    This is QeRL's `text.split("<answer>")[-1].split("</answer>")[0].strip()` except that a reply without any
    `<answer>` tag gives `None` instead of the whole reply.

    >>> extract_answer("<think> 48 + 24 = 72 </think> <answer> 72 </answer>")
    '72'
    """
    if "<answer>" not in text:
        return None
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def format_reward(completions: list, solution: list[str] | None = None, **kwargs) -> list[float]:
    """QeRL's soft format reward: 0.2 if the reply contains `<think>...</think>` followed by `<answer>...</answer>`.

    Args:
        completions (`list`): conversational completions (`[{"role": "assistant", "content": ...}]`) or strings.
        solution (`list[str]`, *optional*): unused; accepted so every reward has the same signature.
        **kwargs: other dataset columns and trainer fields; `prefill` (a list of strings) is prepended to each reply.

    Returns:
        `list[float]`: 0.2 or 0.0 per completion.

    >>> format_reward([[{"role": "assistant", "content": "<think> 6 * 7 </think>\\n<answer> 42 </answer>"}]])
    [0.2]
    """
    texts = _completion_texts(completions, kwargs.get("prefill"))
    # QeRL (utils/rewards.py): re.search(r"<think>.*?</think>\s*<answer>.*?</answer>", DOTALL) -> 0.2
    return [FORMAT_REWARD if _FORMAT_RE.search(text) else 0.0 for text in texts]


def answer_reward(completions: list, solution: list[str], **kwargs) -> list[float]:
    """QeRL's correctness reward: 2.0 if the answer text equals the gold string exactly, else 0.0.

    Reproduces QeRL's extraction `text.split("<answer>")[-1].split("</answer>")[0].strip()` including its edge cases:
    an unclosed `<answer> 72` counts, and a reply with no `<answer>` tag is compared as a whole (`"72"` scores).
    No normalisation: `"1,080"` does not match the gold `"1080"` (see `numeric_answer_reward`).

    Args:
        completions (`list`): conversational completions or strings.
        solution (`list[str]`): the gold answers (`load_gsm8k`'s normalised `solution` column).
        **kwargs: other dataset columns; `prefill` is prepended to each reply.

    Returns:
        `list[float]`: 2.0 or 0.0 per completion.

    >>> answer_reward(["<think> 48 / 2 = 24, 48 + 24 = 72 </think> <answer> 72 </answer>"], solution=["72"])
    [2.0]
    """
    texts = _completion_texts(completions, kwargs.get("prefill"))
    # QeRL (utils/rewards.py, correctness_reward_func): exact string match of the split-extracted answer -> 2.0
    extracted = [text.split("<answer>")[-1].split("</answer>")[0].strip() for text in texts]
    return [ANSWER_REWARD if answer == gold else 0.0 for answer, gold in zip(extracted, solution, strict=True)]


def numeric_answer_reward(completions: list, solution: list[str], **kwargs) -> list[float]:
    """2.0 if the `<answer>` text is the gold number after normalisation (commas, `$`, spaces, `+`, trailing `.0`).

    Uses `extract_answer` (a reply without `<answer>` scores 0.0) and `qerl_repro.data.normalize_number` on both
    sides. Deviation from QeRL: `"1,080"`, `"$1080"` and `"1080.00"` all match the gold `"1080"`.

    Args:
        completions (`list`): conversational completions or strings.
        solution (`list[str]`): the gold answers.
        **kwargs: other dataset columns; `prefill` is prepended to each reply.

    Returns:
        `list[float]`: 2.0 or 0.0 per completion.

    >>> numeric_answer_reward(["<think> 1000 + 80 </think> <answer> $1,080 </answer>"], solution=["1080"])
    [2.0]
    """
    texts = _completion_texts(completions, kwargs.get("prefill"))
    rewards = []
    for text, gold in zip(texts, solution, strict=True):
        predicted = normalize_number(extract_answer(text))
        rewards.append(ANSWER_REWARD if predicted is not None and predicted == normalize_number(gold) else 0.0)
    return rewards


def _math_verify_timeout() -> int | None:
    # math-verify's timeouts use signal.alarm, which only works in the main thread; elsewhere run without one.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _verified_reward(gold_parsed, answer_parsed, timeout) -> float | None:
    """math-verify's score of a parsed answer: ANSWER_REWARD if it equals the gold, 0 for no or a wrong answer, None when
    verify fails (as open-r1: a verify failure means "no reward", not a crash)."""
    from math_verify import verify

    if not answer_parsed:
        return 0.0
    try:
        return ANSWER_REWARD if verify(gold_parsed, answer_parsed, timeout_seconds=timeout) else 0.0
    except Exception:  # noqa: BLE001
        return None


def math_verify_reward(completions: list, solution: list[str], **kwargs) -> list[float | None]:
    """2.0 if math-verify judges the `<answer>` text equal to the gold answer, 0.0 if not, `None` if the gold does not
    parse.

    Both sides are parsed with math-verify's default LaTeX + plain-expression extraction, so a LaTeX fraction,
    `"0.5"` and `"1/2"` agree. As in open-r1's `accuracy_reward` (QeRL's BigMath reward), an exception inside
    `verify` also gives `None`.

    Args:
        completions (`list`): conversational completions or strings.
        solution (`list[str]`): the gold answers.
        **kwargs: other dataset columns; `prefill` is prepended to each reply.

    Returns:
        `list[float | None]`: 2.0, 0.0 or None per completion.

    >>> math_verify_reward(["<think> half of 1 </think> <answer> 0.5 </answer>"], solution=["1/2"])
    [2.0]
    """
    from math_verify import parse

    timeout = _math_verify_timeout()
    texts = _completion_texts(completions, kwargs.get("prefill"))
    rewards: list[float | None] = []
    for text, gold in zip(texts, solution, strict=True):
        gold_parsed = parse(gold, parsing_timeout=timeout)
        if not gold_parsed:
            rewards.append(None)
            continue
        answer = extract_answer(text)
        answer_parsed = parse(answer, parsing_timeout=timeout) if answer else []
        rewards.append(_verified_reward(gold_parsed, answer_parsed, timeout))
    return rewards


_LATEX_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")


def _as_latex(text: str) -> str:
    """`text` inside `$...$` unless it already carries LaTeX math delimiters or a box."""
    return text if any(d in text for d in _LATEX_DELIMITERS) else f"${text}$"


def math_verify_latex_reward(completions: list, solution: list[str], **kwargs) -> list[float | None]:
    """Big-Math (QeRL Table 2): 2.0 if math-verify judges the reply's answer equal to the gold LaTeX answer, 0.0 if
    not, `None` if the gold does not parse.

    Big-Math's gold answers are bare LaTeX (`2\\sqrt{3}`, `\\frac{\\pi}{2}`, `[1,2)`, `3, 4`), which math-verify's
    default parse misreads without math delimiters (`parse("2\\sqrt{3}")` is `2`, `parse("3, 4")` is `4`,
    `\\frac{\\pi}{2}` does not parse): `math_verify_reward` (and TRL's `accuracy_reward`) would then pay a bare
    "2" for `2\\sqrt{3}`. Here both sides are parsed as LaTeX math (`$...$` added unless the text already has `$`,
    `\\(`, `\\[` or `\\boxed`). The answer is the `<answer>` text when the reply has the tag (boxed or not); a
    reply without it is searched like open-r1's / QeRL's Big-Math reward, LaTeX only (a `\\boxed{}` or math
    delimiters), so a stray number in the reasoning earns nothing.

    Args:
        completions (`list`): conversational completions or strings.
        solution (`list[str]`): the gold answers (Big-Math's `solution` column).
        **kwargs: other dataset columns; `prefill` is prepended to each reply.

    Returns:
        `list[float | None]`: 2.0, 0.0 or None per completion.

    >>> math_verify_latex_reward(["<answer> \\sqrt{12} </answer>", "<answer> 2 </answer>"], ["2\\sqrt{3}"] * 2)
    [2.0, 0.0]
    """
    from math_verify import LatexExtractionConfig, parse

    timeout = _math_verify_timeout()
    texts = _completion_texts(completions, kwargs.get("prefill"))
    rewards: list[float | None] = []
    for text, gold in zip(texts, solution, strict=True):
        gold_parsed = parse(_as_latex(gold), parsing_timeout=timeout)
        if not gold_parsed:
            rewards.append(None)
            continue
        answer = extract_answer(text)
        if answer is not None:
            answer_parsed = parse(_as_latex(answer), parsing_timeout=timeout) if answer else []
        else:
            answer_parsed = parse(text, extraction_config=[LatexExtractionConfig()], parsing_timeout=timeout)
        rewards.append(_verified_reward(gold_parsed, answer_parsed, timeout))
    return rewards


def _is_placeholder(content: str) -> bool:
    """True for block content that says nothing: empty, punctuation only (`...`, `…`, `. . .`) or the system
    prompt's template phrases (`reasoning process here`, `answer here`)."""
    lowered = content.lower()
    return not any(ch.isalnum() for ch in content) or any(phrase in lowered for phrase in _TEMPLATE_PHRASES)


def shaped_format_reward(completions: list, solution: list[str] | None = None, **kwargs) -> list[float]:
    """CPU demo: 0.05 for each of `<think>`, `</think>`, `<answer>`, `</answer>` found in this order (at most 0.2);
    a closing tag earns its 0.05 only if its block holds real content.

    The tags are searched one after the other, each after the previous match; a missing tag earns nothing and the
    search for the next one continues from the same place. `</think>` and `</answer>` pay only when the text between
    them and their opening tag is not a placeholder (empty, punctuation only such as `...`, or the system prompt's
    `reasoning process here` / `answer here`). A small model that never writes QeRL's full format (SmolLM2-135M:
    0/512 samples) gets a gradient from partial formats, and the template skeleton the first CPU demo learned
    (`<think> ... </think> <answer> ... </answer>`, 100 % of its replies after 30 steps) earns 0.1, not 0.2.

    Args:
        completions (`list`): conversational completions or strings.
        solution (`list[str]`, *optional*): unused.
        **kwargs: other dataset columns and trainer fields; `prefill` is prepended to each reply (so a `<think>`
            prefill always earns its 0.05, a constant that does not change GRPO advantages).

    Returns:
        `list[float]`: a multiple of 0.05 in [0, 0.2] per completion.

    >>> shaped_format_reward(["<think> 48 / 2 = 24 </think> The answer is 72."])
    [0.1]
    >>> shaped_format_reward(["<think> ... </think> <answer> ... </answer>"])
    [0.1]
    """
    rewards = []
    for text in _completion_texts(completions, kwargs.get("prefill")):
        position, found, block_start = 0, 0, None
        for tag in _TAGS:
            index = text.find(tag, position)
            if index < 0:
                block_start = None
                continue
            closing = tag.startswith("</")
            if not closing or (block_start is not None and not _is_placeholder(text[block_start:index])):
                found += 1
            block_start = None if closing else index + len(tag)
            position = index + len(tag)
        rewards.append(round(SHAPED_TAG_REWARD * found, 4))
    return rewards


def _is_template_copy(thinking: str, text: str) -> bool:
    lowered = text.lower()
    return _is_placeholder(thinking) or any(phrase in lowered for phrase in _TEMPLATE_PHRASES)


def strict_numeric_format_reward(completions: list, solution: list[str] | None = None, **kwargs) -> list[float]:
    """CPU demo: 0.2 for `<think>reasoning</think> <answer>NUMBER</answer>` with real reasoning and a bare number.

    Requires a `<think>` block followed by an `<answer>` block (as `format_reward`) whose content is one plain number
    (`normalize_number` accepts it), and rejects copies of the system prompt's template: a reply scores 0.0 if its
    thinking is a placeholder (empty, punctuation only such as `...`) or if it contains `reasoning process here`
    or `answer here` anywhere. This is the guard against the reward hack measured in the CPU demo, where the model
    learned to emit `<think> reasoning process here </think> <answer> answer here </answer>`.

    Args:
        completions (`list`): conversational completions or strings.
        solution (`list[str]`, *optional*): unused (correctness is another reward's job).
        **kwargs: other dataset columns; `prefill` is prepended to each reply.

    Returns:
        `list[float]`: 0.2 or 0.0 per completion.

    >>> strict_numeric_format_reward(["<think> reasoning process here </think> <answer> answer here </answer>"])
    [0.0]
    >>> strict_numeric_format_reward(["<think> 48 / 2 = 24; 48 + 24 = 72 </think> <answer> 72 </answer>"])
    [0.2]
    """
    rewards = []
    for text in _completion_texts(completions, kwargs.get("prefill")):
        match = _ANSWER_BLOCK_RE.search(text)
        ok = (
            match is not None
            and normalize_number(match.group(2)) is not None
            and not _is_template_copy(match.group(1), text)
        )
        rewards.append(STRICT_FORMAT_REWARD if ok else 0.0)
    return rewards


def answer_starts_with_number_reward(completions: list, solution: list[str] | None = None, **kwargs) -> list[float]:
    """CPU demo: 0.1 if the `<answer>` text starts with a number (`72`, `-3`, `$18`, `72 clips`), else 0.0.

    A small nudge from "answer here" or prose towards numeric answers; it does not check correctness.

    Args:
        completions (`list`): conversational completions or strings.
        solution (`list[str]`, *optional*): unused.
        **kwargs: other dataset columns; `prefill` is prepended to each reply.

    Returns:
        `list[float]`: 0.1 or 0.0 per completion.

    >>> answer_starts_with_number_reward(["<think> 6 * 3 </think> <answer> $18 dollars </answer>"])
    [0.1]
    """
    rewards = []
    for text in _completion_texts(completions, kwargs.get("prefill")):
        answer = extract_answer(text)
        rewards.append(NUMBER_START_REWARD if answer and _STARTS_WITH_NUMBER_RE.match(answer) else 0.0)
    return rewards


def exact_reply_reward(completions: list, solution: list[str], **kwargs) -> list[float]:
    """CPU testbed: 2.0 if the whole reply, stripped of surrounding whitespace, is the gold answer, else 0.0.

    For `qerl_repro.testbed`, whose replies are bare numbers (`"1234+5678="` -> `"6912"`): no tags, no number
    normalisation, no partial or format credit, so nothing pays without the right answer (a `"06912"` or `"6912 6912"`
    earns 0.0). For such replies it agrees with `answer_reward`, which the evaluation uses.

    Args:
        completions (`list`): conversational completions or strings.
        solution (`list[str]`): the gold answers.
        **kwargs: other dataset columns; `prefill` is prepended to each reply.

    Returns:
        `list[float]`: 2.0 or 0.0 per completion.

    >>> exact_reply_reward(["6912", "6911", " 6912 "], solution=["6912", "6912", "6912"])
    [2.0, 0.0, 2.0]
    """
    texts = _completion_texts(completions, kwargs.get("prefill"))
    return [ANSWER_REWARD if text.strip() == gold else 0.0 for text, gold in zip(texts, solution, strict=True)]


REWARD_FUNCS: dict[str, Callable[..., list[float | None]]] = {
    "format": format_reward,
    "answer": answer_reward,
    "numeric_answer": numeric_answer_reward,
    "math_verify": math_verify_reward,
    "math_verify_latex": math_verify_latex_reward,
    "shaped_format": shaped_format_reward,
    "strict_numeric_format": strict_numeric_format_reward,
    "answer_starts_with_number": answer_starts_with_number_reward,
    "exact_reply": exact_reply_reward,
}
"""Short names (the YAML `reward_funcs` entries) -> reward functions."""


def get_soft_overlong_reward(max_completion_length: int, buffer_length: int) -> Callable[..., list[float]]:
    """DAPO's soft overlong punishment (DAPO paper Eq. 13, https://huggingface.co/papers/2503.14476), TRL's
    `trl.rewards.get_soft_overlong_punishment`: a completion of `n` tokens earns 0 when `n <= L - B`, the linear
    penalty `(L - B - n) / B` in the buffer `L - B < n <= L`, and -1 beyond `L`, with `L = max_completion_length` and
    `B = buffer_length`. The DAPO penalty factor is this reward's weight in `reward_weights` (the reward itself stays
    in [-1, 0]). It reads TRL's `completion_ids` (token counts, EOS included), not the text.

    With `mask_truncated_completions=True` a completion that reaches `L` without EOS is masked out of the loss, so
    in practice only the buffer's linear part shapes the gradient.

    Args:
        max_completion_length (`int`): `L`, the run's `max_completion_length`.
        buffer_length (`int`): `B`, the overlong buffer, 1 <= B <= L.

    Returns:
        The reward function (logged as `soft_overlong_punishment_reward`).

    >>> get_soft_overlong_reward(100, 20)(completion_ids=[[1] * 80, [1] * 90, [1] * 100])
    [0.0, -0.5, -1.0]
    """
    if not 1 <= buffer_length <= max_completion_length:
        raise ValueError(
            f"overlong_buffer_length={buffer_length} must be between 1 and max_completion_length="
            f"{max_completion_length} (the penalty ramps from 0 at L - B tokens to -1 at L)."
        )
    from trl.rewards import get_soft_overlong_punishment

    return get_soft_overlong_punishment(max_completion_len=max_completion_length, soft_punish_cache=buffer_length)


REWARD_FACTORIES: dict[str, Callable[..., Callable[..., list[float | None]]]] = {
    "soft_overlong": get_soft_overlong_reward,
}
"""Short names of rewards built from the run's settings (see `get_reward_funcs`) -> their factories."""

QERL_REWARD_FUNCS = ["format", "answer"]
"""QeRL's GSM8K rewards, the default of the paper recipes."""


def check_reward_names(names: list[str]) -> None:
    """Raise a `ValueError` listing the valid names if any of `names` is not a reward name."""
    unknown = [name for name in names if name not in REWARD_FUNCS and name not in REWARD_FACTORIES]
    if unknown:
        raise ValueError(
            f"Unknown reward function(s) {unknown}; valid names: {sorted([*REWARD_FUNCS, *REWARD_FACTORIES])}"
        )


def get_reward_funcs(
    names: list[str], *, max_completion_length: int | None = None, overlong_buffer_length: int | None = None
) -> list[Callable[..., list[float | None]]]:
    """Reward functions for the YAML names, in order; unknown names raise a `ValueError` listing the valid ones.

    `soft_overlong` is built with `get_soft_overlong_reward(max_completion_length, overlong_buffer_length)`; asking
    for it without both raises a `ValueError`.

    >>> [f.__name__ for f in get_reward_funcs(["format", "answer"])]
    ['format_reward', 'answer_reward']
    """
    if isinstance(names, str):
        names = [names]
    check_reward_names(names)
    funcs = []
    for name in names:
        if name == "soft_overlong":
            if max_completion_length is None or overlong_buffer_length is None:
                raise ValueError(
                    "The soft_overlong reward needs max_completion_length and overlong_buffer_length (e.g. "
                    "`overlong_buffer_length: 1024` in the recipe YAML)."
                )
            funcs.append(get_soft_overlong_reward(max_completion_length, overlong_buffer_length))
        else:
            funcs.append(REWARD_FUNCS[name])
    return funcs
