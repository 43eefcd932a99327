"""What the benchmarks share: the tweet-complaints task and a markdown table."""

from __future__ import annotations

TEXT_COLUMN = "Tweet text"
LABEL_COLUMN = "Label"
LABEL_NAMES = ["complaint", "no complaint"]


def tweet_task(max_length: int = 64):
    """The complaints task as the PEFT guide sets it up (its template, two labels)."""
    from softprompt import Task

    return Task(
        text_column=TEXT_COLUMN,
        label_names=list(LABEL_NAMES),
        label_column=LABEL_COLUMN,
        max_length=max_length,
    )


def markdown_table(head: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 2 decimals, None as '-'."""

    def cell(x) -> str:
        return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows])
