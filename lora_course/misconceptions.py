"""The misconception register and the quiz mode of notebook 12.

:data:`REGISTER` lists wrong claims that common study notes make about LoRA and its
family, each with the correct statement, the paper (arXiv id) and the notebook cell that
measures or asserts the correction (``notebook`` is the notebook's slug, ``cell_id`` the
nbformat id of a code cell that asserts). ``tests/test_misconceptions.py`` checks that
every cell exists and asserts.

:func:`quiz` draws questions from the interview bank of notebook 12 (parsed from the
notebook file: a bold ``**Q...**`` line followed by a ``<details>`` answer block).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
BANK_NOTEBOOK = "12_interview_question_bank"


@dataclass(frozen=True)
class Misconception:
    """One wrong claim and where the course measures the correction.

    Attributes:
        key: short unique identifier.
        claim: what common study notes claim (paraphrased in English).
        correction: the correct statement.
        arxiv: the paper that settles it (``NNNN.NNNNN``).
        notebook: slug of the notebook that measures it, e.g. ``"01_lora_from_scratch"``.
        cell_id: nbformat id of the asserting code cell, e.g. ``"cell-42"``.
    """

    key: str
    claim: str
    correction: str
    arxiv: str
    notebook: str
    cell_id: str


REGISTER: tuple[Misconception, ...] = (
    Misconception(
        "lora-is-svd",
        "LoRA decomposes the pretrained weight by SVD and trains its top singular directions.",
        "Nothing is decomposed: A is random, B = 0, so A's row space is a random subspace "
        "(alignment with W0's top singular vectors at the random level). PiSSA (2404.02948) is the SVD-based init.",
        "2106.09685", "01_lora_from_scratch", "cell-42",
    ),
    Misconception(
        "rank-accuracy-table",
        "A fixed table maps LoRA rank to accuracy (e.g. r=8 gives a stated percentage).",
        "Accuracy at a rank depends on model, task, data, steps and seed; no universal table exists. "
        "Notebook 10 measures it (7 ranks x 2 target sets x 3 seeds): not monotone in r, neighbouring ranks "
        "mostly inside the seed spread, and the largest all-linear rank diverged for one seed.",
        "2106.09685", "10_rank_vs_accuracy", "cell-18",
    ),
    Misconception(
        "adalora-importance-magnitude",
        "AdaLoRA keeps the triplets with the largest singular values (importance = magnitude).",
        "The score is a smoothed sensitivity |w * grad| times its uncertainty, for the singular value plus the "
        "mean over its column of P and row of Q; it ranks triplets differently from the magnitude (low Spearman).",
        "2303.10512", "07_adalora", "cell-26",
    ),
    Misconception(
        "adalora-exact-orthogonality",
        "AdaLoRA keeps P and Q exactly orthogonal (projection or Gram-Schmidt after each step).",
        "Only a soft penalty ||P^T P - I|| + ||Q Q^T - I|| is added to the loss; P and Q are never exactly orthogonal.",
        "2303.10512", "07_adalora", "cell-28",
    ),
    Misconception(
        "lora-ga-gradient-accumulation",
        "LoRA-GA means LoRA with gradient accumulation.",
        "GA is Gradient Approximation: A and B are initialised from the SVD of the first-step gradient so that "
        "LoRA's first update equals the best rank-2r approximation of full fine-tuning's gradient.",
        "2407.05000", "11_lora_variants", "cell-15",
    ),
    Misconception(
        "qlora-dequantize-once",
        "QLoRA dequantizes the whole model to 16 bits once and then trains normally.",
        "Weights stay in NF4; each layer dequantizes its block on the fly in every forward and backward "
        "and frees it (counted dequantize calls per step).",
        "2305.14314", "04_double_quantization", "cell-25",
    ),
    Misconception(
        "memory-saving-one-factor",
        "LoRA cuts training memory by one fixed factor (e.g. 3x).",
        "The saving depends on the split: weights stay, gradients and optimizer states shrink, activations "
        "stay; full / LoRA peak ranges from below 1x to over 5x across model size, batch and sequence length.",
        "2106.09685", "06_memory_full_vs_lora_vs_qlora", "cell-25",
    ),
    Misconception(
        "higher-rank-better",
        "A higher rank is always better.",
        "With alpha fixed the scale alpha/r shrinks as r grows, so the learned update after the same steps "
        "gets smaller (rsLoRA 2312.03732 fixes the scale; notebook 10 section 6 measures the update size going like "
        "1/sqrt(r), flat, or sqrt(r) for the three scalings); the rank a matrix needs varies widely (notebook 07 section 1).",
        "2312.03732", "10_rank_vs_accuracy", "cell-22",
    ),
    Misconception(
        "unmerged-no-cost",
        "LoRA adds no inference cost, even unmerged.",
        "Only merged: unmerged, every adapted layer does two extra skinny matmuls; merged it is a plain Linear.",
        "2106.09685", "01_lora_from_scratch", "cell-30",
    ),
    Misconception(
        "8bit-optimizer-trains-in-8bit",
        "An 8-bit optimizer trains the model in 8 bits.",
        "Only the Adam moments are stored as 8-bit codes; parameters and gradients keep their dtype.",
        "2110.02861", "14_int8_and_8bit_optimizers", "cell-34",
    ),
    Misconception(
        "longlora-shift-between-layers",
        "LongLoRA shifts the group boundaries from one layer to the next.",
        "Inside every layer, half of the heads attend in groups and the other half in groups shifted by G/2; "
        "training only, inference keeps full attention.",
        "2309.12307", "09_longlora_shift_short_attention", "cell-10",
    ),
    Misconception(
        "alpha-convention-is-cosmetic",
        "alpha, alpha/r and alpha/sqrt(r) are naming conventions: the same r, alpha and lr train the same adapter.",
        "The scale in front of BA multiplies the learning rate: the first update grows with scale^2 x lr under SGD and "
        "scale x lr under Adam (measured 256x and 16x between alpha and alpha/r at r = 16); rescaling lr matches the "
        "first step, and the whole run only when A is frozen.",
        "2106.09685", "15_what_people_ask", "cell-03",
    ),
    Misconception(
        "merge-into-4bit-is-exact",
        "Merging a QLoRA adapter with merge_and_unload gives the model that was trained.",
        "The adapter was trained on dequant(NF4(W)): PEFT's 4-bit merge re-quantizes W + sBA and merging into the original "
        "16-bit W adds back the quantization error; only dequantize-then-merge in float reproduces the trained outputs.",
        "2305.14314", "15_what_people_ask", "cell-14",
    ),
    Misconception(
        "qlora-always-less-memory",
        "QLoRA always needs clearly less memory than LoRA.",
        "QLoRA only shrinks the frozen weights of the quantized layers and adds constants and a dequantized weight per "
        "matmul; on small models the peaks are within a few percent, so other differences between runs decide.",
        "2305.14314", "15_what_people_ask", "cell-17",
    ),
    Misconception(
        "dora-magnitude-per-input",
        "DoRA keeps one magnitude per input feature (the paper's 1 x k vector read on nn.Linear's weight).",
        "The magnitude is per output feature (row norms of the (out, in) weight), as PEFT and the official code; the "
        "per-input reading agrees at B = 0 and differs once B is non-zero.",
        "2402.09353", "15_what_people_ask", "cell-28",
    ),
    Misconception(
        "adalora-prunes-by-itself",
        "AdaLoRA lowers the ranks on its own during training.",
        "Ranks change only inside update_and_allocate, called after each optimizer step; without the call PEFT's and our "
        "AdaLoRA keep init_r in every layer.",
        "2303.10512", "15_what_people_ask", "cell-31",
    ),
    Misconception(
        "rslora-training-only",
        "use_rslora is a training trick; at inference an adapter can be applied with alpha/r.",
        "The flag sets the constant in front of BA at inference too: ignoring it makes every update sqrt(r) times too "
        "small (4x at r = 16).",
        "2312.03732", "15_what_people_ask", "cell-38",
    ),
)


def register_markdown() -> str:
    """The register as a markdown table (claim, correction, paper, where measured)."""
    lines = ["| Claim | Correction | arXiv | Measured in |", "|---|---|---|---|"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|")  # a literal pipe would end the table cell

    for m in REGISTER:
        lines.append(f"| {cell(m.claim)} | {cell(m.correction)} | {m.arxiv} | `{m.notebook}` {m.cell_id} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Question:
    """One question of the interview bank: its group (section heading), text and answer."""

    group: str
    question: str
    answer: str


_Q_RE = re.compile(r"\*\*(Q\d+\..*?)\*\*\s*\n<details><summary>Answer</summary>\s*(.*?)</details>", re.S)


def load_bank(path: str | Path | None = None) -> list[Question]:
    """The questions of notebook 12, in order, parsed from the notebook file."""
    path = Path(path) if path is not None else NOTEBOOK_DIR / f"{BANK_NOTEBOOK}.ipynb"
    cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    bank, group = [], ""
    for cell in cells:
        if cell["cell_type"] != "markdown":
            continue
        text = "".join(cell["source"])
        for line in text.splitlines():
            if line.startswith("### "):
                group = line[4:].strip()
                break
        bank += [Question(group, q.strip(), a.strip()) for q, a in _Q_RE.findall(text)]
    return bank


def quiz(n: int = 5, seed: int | None = None, path: str | Path | None = None) -> list[Question]:
    """Print ``n`` random questions of the bank (answers hidden) and return them.

    Raises:
        ValueError: if ``n`` is not between 1 and the size of the bank.
    """
    bank = load_bank(path)
    if not 1 <= n <= len(bank):
        raise ValueError(f"n={n} is out of range; allowed values: 1 to {len(bank)}")
    picked = random.Random(seed).sample(bank, n)
    for i, q in enumerate(picked, 1):
        print(f"{i}. [{q.group}] {q.question}")
    return picked
