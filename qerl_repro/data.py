# Copyright 2026 The qerl_repro Authors. Licensed under the Apache License, Version 2.0.
"""GSM8K for GRPO: the Hub dataset (`openai/gsm8k`, config `main`) or local JSONL files, with QeRL's system prompt
(and Big-Math, QeRL Table 2's DAPO data: `load_bigmath`, at the end of this module).

Each example becomes a TRL conversational prompt-only row::

    {"prompt": [{"role": "system", "content": QERL_SYSTEM_PROMPT}, {"role": "user", "content": question}],
     "solution": "72",  # the number after `####`, normalised (`normalize_number`)
     "question": question}

TRL passes every column other than `prompt` to the reward functions as keyword arguments, so `solution` reaches
`qerl_repro.rewards` unchanged. Training and evaluation use the same prompt (`QERL_SYSTEM_PROMPT`).
"""

import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field


logger = logging.getLogger(__name__)

# QeRL's system prompt, verbatim from its code (`utils/data.py` and `eval/gsm8k.py`, a triple-quoted string): the
# leading newline, the 8-space indentation, the space after "</answer>:" and the closing "\n    " are part of what the
# paper's models saw, so they are kept. Paper, Appendix E: https://huggingface.co/papers/2510.11696
QERL_SYSTEM_PROMPT = (
    "\n"
    "        Solve the following math problem step by step. The reasoning process and direct answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>: \n"
    "        <think>\n"
    "        ...\n"
    "        </think>\n"
    "        <answer>\n"
    "        ...\n"
    "        </answer>\n"
    "    "
)

GSM8K_COLUMNS = ("question", "answer")
_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
# How many row numbers per skip reason are kept in the report (and logged).
_MAX_EXAMPLES = 5


def normalize_number(text: str | None) -> str | None:
    """Canonical string of a plain decimal number, or `None` if `text` is not one.

    Removes spaces, thousands commas, `$` and a leading `+`; drops trailing decimal zeros (`"3.50"` -> `"3.5"`,
    `"18.00"` -> `"18"`) and leading zeros (`"007"` -> `"7"`, `".5"` -> `"0.5"`); `"-0"` becomes `"0"`. No float
    conversion, so large integers stay exact.

    >>> normalize_number(" $1,080.00 ")
    '1080'
    """
    if text is None:
        return None
    cleaned = re.sub(r"[\s,$]", "", text)
    cleaned = cleaned.removeprefix("+")
    if not _NUMBER_RE.fullmatch(cleaned):
        return None
    sign = "-" if cleaned.startswith("-") else ""
    integer, _, fraction = cleaned.lstrip("-").partition(".")
    integer = integer.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    number = f"{integer}.{fraction}" if fraction else integer
    return "0" if number == "0" else sign + number


def extract_gsm8k_solution(answer_text: str | None) -> str | None:
    """The normalised number after `####` in a GSM8K `answer` field, or `None` if there is no number there.

    >>> extract_gsm8k_solution("Natalia sold 48+24 = <<48+24=72>>72 clips.\\n#### 72")
    '72'
    """
    if not isinstance(answer_text, str) or "####" not in answer_text:
        return None
    return normalize_number(answer_text.split("####")[-1])


def make_prompt(question: str, system_prompt: str | None = QERL_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The conversational prompt of one question: QeRL's system message (unless `system_prompt` is None) + the user."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return system + [{"role": "user", "content": question}]


@dataclass
class GSM8KLoadReport:
    """What `load_gsm8k` read, kept and skipped.

    `skipped` counts rows per reason (`"missing_keys"`, `"empty_question"`, `"no_####"`, `"non_numeric_answer"`);
    `examples` holds up to five row numbers per reason: 1-based line numbers for JSONL files, 0-based row indices for
    Hub datasets. `num_returned` is the size of the returned dataset (after `limit`).
    """

    source: str
    split: str
    num_read: int = 0
    num_valid: int = 0
    num_returned: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def _skip(self, reason: str, row: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        rows = self.examples.setdefault(reason, [])
        if len(rows) < _MAX_EXAMPLES:
            rows.append(row)


def _resolve_jsonl(dataset_path: str, split: str) -> str:
    if os.path.isdir(dataset_path):
        path = os.path.join(dataset_path, f"{split}.jsonl")
        if not os.path.isfile(path):
            found = sorted(name for name in os.listdir(dataset_path) if name.endswith(".jsonl"))
            raise FileNotFoundError(f"No {split}.jsonl in {dataset_path} (JSONL files there: {found or 'none'})")
        return path
    if os.path.isfile(dataset_path):
        return dataset_path
    raise FileNotFoundError(f"GSM8K dataset_path {dataset_path!r} is neither a folder with {split}.jsonl nor a file")


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    """Rows of a JSONL file as `(line_number, object)`; blank lines are allowed, anything else must be a JSON object."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSONL: line {line_number} is not JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path} is not valid JSONL for GSM8K: line {line_number} is a JSON {type(row).__name__}, "
                    "expected an object with 'question' and 'answer'"
                )
            rows.append((line_number, row))
    return rows


def _convert_rows(rows: Iterable[tuple[int, dict]], report: GSM8KLoadReport, system_prompt: str | None) -> list[dict]:
    examples = []
    for row_number, row in rows:
        report.num_read += 1
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str):
            report._skip("missing_keys", row_number)
        elif not question.strip():
            report._skip("empty_question", row_number)
        elif "####" not in answer:
            report._skip("no_####", row_number)
        elif (solution := extract_gsm8k_solution(answer)) is None:
            report._skip("non_numeric_answer", row_number)
        else:
            question = question.strip()
            examples.append(
                {"prompt": make_prompt(question, system_prompt), "solution": solution, "question": question}
            )
    report.num_valid = len(examples)
    return examples


def _load_hub_rows(dataset_name: str, dataset_config: str | None, split: str) -> list[tuple[int, dict]]:
    import datasets

    where = f"{dataset_name!r} (config {dataset_config!r}, split {split!r})"
    hint = (
        "Load the local copy instead, e.g. `--dataset_path ../shared/data/gsm8k` (a folder with train.jsonl and "
        "test.jsonl, or one .jsonl file)."
    )
    try:
        hub = datasets.load_dataset(dataset_name, dataset_config, split=split)
    except ConnectionError as exc:
        raise ConnectionError(
            f"Could not load {where} from the Hugging Face Hub: {exc}. The Hub is unreachable or offline mode is on "
            f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). {hint}"
        ) from exc
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise FileNotFoundError(f"{where} was not found on the Hugging Face Hub: {exc}. {hint}") from exc
    missing = [column for column in GSM8K_COLUMNS if column not in hub.column_names]
    if missing:
        raise ValueError(f"{dataset_name!r} split {split!r} lacks column(s) {missing}; it has {hub.column_names}")
    return list(enumerate(hub.select_columns(list(GSM8K_COLUMNS))))


def load_gsm8k(
    split: str = "train",
    *,
    dataset_path: str | None = None,
    dataset_name: str = "openai/gsm8k",
    dataset_config: str | None = "main",
    limit: int | None = None,
    system_prompt: str | None = QERL_SYSTEM_PROMPT,
    seed: int | None = None,
    return_report: bool = False,
):
    """Load GSM8K as a TRL conversational prompt-only dataset with columns `prompt`, `solution` and `question`.

    Rows without a usable question or a number after `####` are skipped, counted per reason and logged with example
    row numbers (see `GSM8KLoadReport`).

    Args:
        split (`str`, *optional*, defaults to `"train"`):
            `"train"` or `"test"`.
        dataset_path (`str`, *optional*):
            A local folder holding `{split}.jsonl` or a path to one `.jsonl` file (fields `question`, `answer`). When
            unset, the dataset is loaded from the Hub.
        dataset_name (`str`, *optional*, defaults to `"openai/gsm8k"`):
            The Hub dataset, used only without `dataset_path`.
        dataset_config (`str`, *optional*, defaults to `"main"`):
            Its configuration.
        limit (`int`, *optional*):
            Keep only the first `limit` valid rows (after shuffling when `seed` is given).
        system_prompt (`str` or `None`, *optional*, defaults to `QERL_SYSTEM_PROMPT`):
            The system message; `None` leaves the prompt with the user turn only.
        seed (`int`, *optional*):
            Shuffle the rows with this seed (before `limit`); `None` keeps the file order.
        return_report (`bool`, *optional*, defaults to `False`):
            Also return the `GSM8KLoadReport`.

    Returns:
        `datasets.Dataset`, or `(datasets.Dataset, GSM8KLoadReport)` with `return_report=True`.

    Raises:
        ValueError: the file is not JSONL (the message names the line) or has no `question`/`answer` columns.
        ConnectionError: the Hub is unreachable; the message suggests `--dataset_path`.
        FileNotFoundError: `dataset_path` has no `{split}.jsonl`, or the Hub has no such dataset.
    """
    import datasets

    if dataset_path is not None:
        source = _resolve_jsonl(dataset_path, split)
        rows = _read_jsonl(source)
        present = set().union(*(row.keys() for _, row in rows)) if rows else set()
        missing = [column for column in GSM8K_COLUMNS if column not in present]
        if missing:
            found = sorted(present) if present else "no rows"
            raise ValueError(f"{source} is not a GSM8K file: no row has column(s) {missing} (found: {found})")
    else:
        source = f"{dataset_name} ({dataset_config}) on the Hub"
        rows = _load_hub_rows(dataset_name, dataset_config, split)

    report = GSM8KLoadReport(source=source, split=split)
    examples = _convert_rows(rows, report, system_prompt)
    if report.num_skipped:
        logger.warning(
            "GSM8K %s (%s): skipped %d of %d rows: %s; example rows: %s",
            split,
            source,
            report.num_skipped,
            report.num_read,
            report.skipped,
            report.examples,
        )
    if not examples:
        raise ValueError(f"{source}: no usable GSM8K rows in split {split!r} ({report.num_read} read, all skipped)")

    dataset = datasets.Dataset.from_list(examples)
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    report.num_returned = len(dataset)
    logger.info("GSM8K %s: %d rows from %s", split, len(dataset), source)
    return (dataset, report) if return_report else dataset


def add_assistant_prefill(dataset, tokenizer, prefill: str = "<think>"):
    """Start every assistant reply with `prefill` (the CPU demo's `<think>`), in a form GRPOTrainer generates from.

    TRL 1.16's `GRPOTrainer._tokenize_prompts` renders conversational prompts with `add_generation_prompt=True` and
    never `continue_final_message`, so a prompt ending in an assistant message `{"role": "assistant", "content":
    "<think>"}` is rendered as a *closed* assistant turn followed by a new, empty one: the model never continues the
    prefill. (Passing `continue_final_message` through `chat_template_kwargs` raises in transformers, which rejects it
    together with `add_generation_prompt`.) Plain-text prompts are supported end to end, so this renders each prompt
    with the tokenizer's chat template and `continue_final_message=True` (what TRL's own `maybe_apply_chat_template`
    does for a final assistant turn) and stores the text. The result is a *standard* (non-conversational) dataset:
    completions reach the rewards as strings, and a `prefill` column tells the rewards in `qerl_repro.rewards` to
    score `prefill + completion`, the whole assistant reply.

    Evaluation must apply the same function to the test split so that it sees the prompts training saw.

    Args:
        dataset (`datasets.Dataset`):
            Rows with a conversational `prompt` (as from `load_gsm8k`).
        tokenizer (`PreTrainedTokenizerBase`):
            The policy's tokenizer; its chat template renders the prompts.
        prefill (`str`, *optional*, defaults to `"<think>"`):
            Text the assistant turn starts with. It must survive the template unchanged (trailing whitespace may not).

    Returns:
        `datasets.Dataset`: `prompt` is now a string ending in `prefill`; a `prefill` column is added.
    """

    def render(prompt: list[dict[str, str]]) -> str:
        if prompt and prompt[-1]["role"] == "assistant":
            raise ValueError("The prompt already ends in an assistant message; add the prefill only once")
        text = tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": prefill}], tokenize=False, continue_final_message=True
        )
        if not text.endswith(prefill):
            raise ValueError(f"The chat template did not keep the prefill {prefill!r} at the end of the prompt")
        return text

    first = render(dataset[0]["prompt"])
    # TRL tokenizes plain-text prompts with `tokenizer(text=...)`, i.e. with special tokens: a tokenizer that adds a
    # BOS would double the one the template already wrote.
    if tokenizer(first)["input_ids"] != tokenizer(first, add_special_tokens=False)["input_ids"]:
        raise ValueError(
            f"{type(tokenizer).__name__} adds special tokens to plain text, which TRL would add on top of the chat "
            "template's own: the prefilled prompts would not match the conversational ones"
        )
    return dataset.map(lambda row: {"prompt": render(row["prompt"]), "prefill": prefill})


# ---------------------------------------------------------------------------------------------------------------------
# Big-Math (QeRL Table 2)
# ---------------------------------------------------------------------------------------------------------------------

BIGMATH_DATASET = "open-r1/Big-Math-RL-Verified-Processed"
# Columns of open-r1's processed Big-Math (its create_dataset.py renames SynthLabsAI/Big-Math-RL-Verified's `problem`
# and `answer` to `prompt` and `solution`; `source`, `domain` and `llama8b_solve_rate` are kept and not needed here).
BIGMATH_COLUMNS = ("prompt", "solution")
# QeRL (qerl.py get_dataset): Big-Math problems longer than 1024 characters are dropped.
BIGMATH_MAX_PROMPT_CHARS = 1024
_TABLE_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _resolve_table_files(dataset_path: str, split: str) -> tuple[str, list[str]]:
    """`(builder, files)` of a local copy: one `.jsonl` / `.json` / `.parquet` file, or a folder holding
    `<split>.<ext>` or `<split>-*.<ext>` files (the Hub's parquet layout, e.g. `level_3_4_5/train-00000-of-00001.parquet`)."""
    if os.path.isfile(dataset_path):
        ext = os.path.splitext(dataset_path)[1]
        if ext not in _TABLE_EXTENSIONS:
            raise ValueError(
                f"{dataset_path}: expected a {'/'.join(_TABLE_EXTENSIONS)} file, got {ext or 'no extension'!r}"
            )
        return _TABLE_EXTENSIONS[ext], [dataset_path]
    if not os.path.isdir(dataset_path):
        raise FileNotFoundError(f"dataset_path {dataset_path!r} is neither a file nor a folder")
    names = sorted(os.listdir(dataset_path))
    for ext, builder in _TABLE_EXTENSIONS.items():
        files = [n for n in names if n.endswith(ext) and (n == f"{split}{ext}" or n.startswith(f"{split}-"))]
        if files:
            return builder, [os.path.join(dataset_path, n) for n in files]
    raise FileNotFoundError(
        f"No {split}.jsonl / {split}.parquet / {split}-*.parquet in {dataset_path} (files there: {names or 'none'})"
    )


def load_bigmath(
    split: str = "train",
    *,
    dataset_path: str | None = None,
    dataset_name: str = BIGMATH_DATASET,
    dataset_config: str | None = "level_3_4_5",
    limit: int | None = None,
    max_prompt_chars: int | None = BIGMATH_MAX_PROMPT_CHARS,
    system_prompt: str | None = QERL_SYSTEM_PROMPT,
    seed: int | None = None,
):
    """Load Big-Math (QeRL Table 2: DAPO on `open-r1/Big-Math-RL-Verified-Processed`) as a TRL conversational
    prompt-only dataset with columns `prompt` (QeRL's system prompt + the problem), `solution` (the gold answer, a
    LaTeX or plain expression for `math_verify`) and `question`.

    As QeRL's `get_dataset`: configuration `level_3_4_5` (7B / 14B; `level_4_5` for 32B), split `train`, problems of
    at most 1024 characters. Rows with an empty problem or answer are dropped too.

    Args:
        split (`str`, *optional*, defaults to `"train"`): the split (the Hub dataset has only `train`).
        dataset_path (`str`, *optional*): a local copy with the same columns (`prompt`, `solution`): a `.jsonl`,
            `.json` or `.parquet` file, or a folder with `<split>.jsonl`, `<split>.parquet` or `<split>-*.parquet`.
            Unset: the Hub dataset `dataset_name` / `dataset_config`.
        dataset_name (`str`, *optional*), dataset_config (`str`, *optional*, defaults to `"level_3_4_5"`): the Hub
            dataset and its difficulty configuration.
        limit (`int`, *optional*): keep the first `limit` rows (after shuffling when `seed` is given).
        max_prompt_chars (`int` or `None`, *optional*, defaults to 1024): drop longer problems; `None` keeps all.
        system_prompt (`str` or `None`, *optional*): the system message (`QERL_SYSTEM_PROMPT`); `None`: user only.
        seed (`int`, *optional*): shuffle with this seed before `limit`.

    Raises:
        ValueError: a column is missing (the message names it and lists the columns found), or no row is left.
        FileNotFoundError: `dataset_path` holds no file for `split`.
        ConnectionError: the Hub is unreachable; the message suggests `--dataset_path`.
    """
    import datasets

    if dataset_path is not None:
        builder, files = _resolve_table_files(dataset_path, split)
        source = ", ".join(files)
        table = datasets.load_dataset(builder, data_files=files, split="train")
    else:
        source = f"{dataset_name} ({dataset_config}) on the Hub"
        try:
            table = datasets.load_dataset(dataset_name, dataset_config, split=split)
        except ConnectionError as exc:
            raise ConnectionError(
                f"Could not load {dataset_name!r} ({dataset_config}) from the Hugging Face Hub: {exc}. Load a local "
                "copy with `--dataset_path <folder with train.jsonl or train-*.parquet, columns prompt, solution>`."
            ) from exc
    missing = [column for column in BIGMATH_COLUMNS if column not in table.column_names]
    if missing:
        raise ValueError(
            f"{source} is not in the Big-Math format: missing column(s) {missing} (found: {table.column_names}); "
            f"expected {list(BIGMATH_COLUMNS)} as in {BIGMATH_DATASET}"
        )
    num_read = len(table)

    def keep(row) -> bool:
        problem, answer = row["prompt"], row["solution"]
        if not isinstance(problem, str) or not problem.strip() or not isinstance(answer, str) or not answer.strip():
            return False
        return max_prompt_chars is None or len(problem) <= max_prompt_chars

    table = table.filter(keep)
    if not len(table):
        raise ValueError(f"{source}: no usable Big-Math rows in split {split!r} ({num_read} read, all dropped)")
    table = table.map(
        lambda row: {
            "prompt": make_prompt(row["prompt"].strip(), system_prompt),
            "solution": row["solution"].strip(),
            "question": row["prompt"].strip(),
        },
        remove_columns=table.column_names,
    )
    if seed is not None:
        table = table.shuffle(seed=seed)
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    logger.info("Big-Math %s: %d of %d rows from %s", split, len(table), num_read, source)
    return table
