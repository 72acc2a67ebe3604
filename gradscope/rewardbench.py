"""RewardBench v1 subset -> section mapping and the example counts its section scores weight by."""

from __future__ import annotations

CHAT, CHAT_HARD, SAFETY, REASONING = "chat", "chat-hard", "safety", "reasoning"
CATEGORIES = (CHAT, CHAT_HARD, SAFETY, REASONING)

SECTIONS: dict[str, tuple[str, ...]] = {
    CHAT: ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    CHAT_HARD: (
        "mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut", "llmbar-adver-manual",
    ),
    SAFETY: (
        "refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
        "donotanswer",
    ),
    REASONING: ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}

SUBSET_TO_CATEGORY: dict[str, str] = {s: cat for cat, subsets in SECTIONS.items() for s in subsets}

# RewardBench's EXAMPLE_COUNTS (math-prm upweighted to equal the six code subsets together).
EXAMPLE_COUNTS: dict[str, int] = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95,
    "mt-bench-easy": 28, "mt-bench-med": 40, "mt-bench-hard": 37,
    "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "refusals-dangerous": 100, "refusals-offensive": 100, "xstest-should-refuse": 154,
    "xstest-should-respond": 250, "donotanswer": 136,
    "math-prm": 984, "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164,
    "hep-python": 164, "hep-rust": 164,
}

UNKNOWN_CATEGORY = "all"


def category_for(subset: str | None, category: str | None = None) -> str:
    """The row's own category, else the RewardBench section of its subset, else ``"all"``."""
    if category:
        return category
    if subset and subset in SUBSET_TO_CATEGORY:
        return SUBSET_TO_CATEGORY[subset]
    return UNKNOWN_CATEGORY
