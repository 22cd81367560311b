"""The misconception register and the quiz mode of notebook 12.

:data:`REGISTER` lists wrong claims that common study notes make about LoRA and its
family, each with the correct statement, the paper (arXiv id), the notebook section that
measures the correction (its number and title, as a learner sees them) and an
:class:`Evidence`: the output line(s) of that section, or a results file, from which code
decides whether the measurement supports the correction. ``tests/test_misconceptions.py``
evaluates every entry on the committed notebooks and results.

:func:`quiz` draws questions from the interview bank of notebook 12 (parsed from the
notebook file: a bold ``**Q...**`` line followed by a ``<details>`` answer block).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .notebook_tools.bank import SECTION_HEADING_RE

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
BANK_NOTEBOOK = "12_interview_question_bank"
_NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def section_title(notebook: str, section: int, notebook_dir: Path | None = None) -> str:
    """The title of ``## <section>. <title>`` in ``notebooks/<notebook>.ipynb``.

    Raises:
        LookupError: if the notebook has no such numbered section.
    """
    for cell in _cells(notebook, notebook_dir):
        if cell["cell_type"] == "markdown":
            for number, title in SECTION_HEADING_RE.findall("".join(cell["source"])):
                if int(number) == section:
                    return title
    raise LookupError(f"notebook {notebook} has no section '## {section}.'")


def section_output(notebook: str, section: int, notebook_dir: Path | None = None) -> str:
    """The printed text (stdout and plain-text results) of the code cells of one section."""
    current, seen, chunks = None, False, []
    for cell in _cells(notebook, notebook_dir):
        if cell["cell_type"] == "markdown":
            found = SECTION_HEADING_RE.findall("".join(cell["source"]))
            if found or re.match(r"^## ", "".join(cell["source"]).lstrip()):
                current = int(found[0][0]) if found else None
                seen = seen or current == section
        elif current == section:
            for out in cell.get("outputs", []):
                text = out.get("text") or out.get("data", {}).get("text/plain", "")
                chunks.append("".join(text))
    if not seen:
        raise LookupError(f"notebook {notebook} has no section '## {section}.'")
    return "\n".join(chunks)


def _cells(notebook: str, notebook_dir: Path | None) -> list[dict]:
    path = (notebook_dir or NOTEBOOK_DIR) / f"{notebook}.ipynb"
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def numbers(pattern: str, text: str) -> list[float]:
    """The numbers captured by ``pattern``'s groups (``{n}`` in it stands for a number).

    Raises:
        LookupError: if ``pattern`` does not occur in ``text``.
    """
    match = re.search(pattern.replace("{n}", f"({_NUMBER})"), text)
    if match is None:
        raise LookupError(f"no output line matches {pattern!r}")
    return [float(g) for g in match.groups()]


def all_numbers(pattern: str, text: str) -> list[float]:
    """Every number that ``pattern``'s single ``{n}`` captures, over all its occurrences."""
    found = [float(g) for g in re.findall(pattern.replace("{n}", f"({_NUMBER})"), text)]
    if not found:
        raise LookupError(f"no output line matches {pattern!r}")
    return found


@dataclass(frozen=True)
class Finding:
    """What the evidence shows: whether it supports the correction, and the measured numbers."""

    holds: bool
    measured: str


@dataclass(frozen=True)
class Misconception:
    """One wrong claim, the correction, and the measurement that decides between them.

    Attributes:
        key: short unique identifier.
        claim: what common study notes claim (paraphrased in English).
        correction: the correct statement (no measured number typed in: those come from ``evidence``).
        arxiv: the paper that settles it (``NNNN.NNNNN``).
        notebook: slug of the notebook that measures it, e.g. ``"01_lora_from_scratch"``.
        section: the number of the ``## N. Title`` section whose outputs hold the measurement.
        evidence: reads the section's committed output (:func:`section_output`) or a results
            file and returns a :class:`Finding`.
    """

    key: str
    claim: str
    correction: str
    arxiv: str
    notebook: str
    section: int
    evidence: Callable[[str], Finding]

    def evaluate(self, notebook_dir: Path | None = None) -> Finding:
        """The finding on the committed output of :attr:`section` (or the results files)."""
        return self.evidence(section_output(self.notebook, self.section, notebook_dir))

    def where(self, notebook_dir: Path | None = None) -> str:
        """``notebook NN section M (Title)``, as a learner finds it."""
        return f"notebook {self.notebook[:2]} section {self.section} ({section_title(self.notebook, self.section, notebook_dir)})"


def _lora_is_svd(out: str) -> Finding:
    level, = numbers(r"random level sqrt\(r/n\) = {n}", out)
    trained, = numbers(r"LoRA after fine-tuning.*?mean cosine {n}", out)
    pissa, = numbers(r"PiSSA init: *mean cosine {n}", out)
    return Finding(trained < 1.5 * level and pissa > 0.99,
                   f"mean cosine with W0's top singular directions: trained LoRA {trained:g}, random level {level:g}, PiSSA {pissa:g}")


def _rank_table(out: str) -> Finding:
    from .results import chosen_lr, load, runs_of, study_file

    path = study_file("rank_sweep")
    if path is None:
        raise LookupError("no converged rank sweep yet (python -m lora_course.experiments.converged --study rank_sweep)")
    runs = runs_of(load(path), "lora_qv_r8")
    lr = chosen_lr(runs)
    tests = [r["test_accuracy"] for r in runs if r["lr"] == lr]
    return Finding(len(tests) >= 3 and max(tests) > min(tests),
                   f"LoRA q+v r=8 on MiniLM, trained to a plateau, {len(tests)} seeds at lr {lr:g}: test accuracy "
                   f"{min(tests):.4f} to {max(tests):.4f}")


def _adalora_importance(out: str) -> Finding:
    rho, = numbers(r"Spearman rank correlation {n}", out)
    return Finding(rho < 0.5, f"Spearman rank correlation of AdaLoRA's score with |singular value|: {rho:g}")


def _adalora_orthogonality(out: str) -> Finding:
    p, q = numbers(r"with penalty P {n}, Q {n}", out)
    p0, q0 = numbers(r"without P {n}, Q {n}", out)
    return Finding(p > 0 and q > 0 and p < p0 and q < q0,
                   f"||P^T P - I|| after training: {p:g} with the penalty, {p0:g} without (never 0)")


def _lora_ga(out: str) -> Finding:
    ga, = numbers(r"LoRA-GA {n}", out)
    acc, = numbers(r"gradient accumulation {n}", out)
    plain, = numbers(r"plain LoRA {n}", out)
    return Finding(ga < plain and acc == plain,
                   f"first step's relative error vs full FT's gradient: LoRA-GA {ga:g}, LoRA {plain:g}, "
                   f"LoRA with gradient accumulation {acc:g}")


def _dequantize_every_step(out: str) -> Finding:
    layers, steps, calls = numbers(r"{n} layers x {n} steps: {n} dequantizations", out)
    return Finding(calls == layers * steps * 2,
                   f"{calls:g} dequantize calls for {layers:g} layers x {steps:g} steps (forward + backward each step)")


def _memory_factor(out: str) -> Finding:
    ratios = all_numbers(r"full / LoRA = +{n}x", out)
    return Finding(min(ratios) < 1.5 and max(ratios) > 3,
                   f"full / LoRA peak from {min(ratios):g}x to {max(ratios):g}x over {len(ratios)} model, batch and "
                   "length settings")


def _scale_shrinks(out: str) -> Finding:
    slope, = numbers(r"alpha_fixed: .*?log-log slope {n}", out)
    rs, = numbers(r"rslora: .*?log-log slope {n}", out)
    return Finding(slope < -0.3 and abs(rs) < 0.15,
                   f"log-log slope of ||delta W|| against r after the same steps: {slope:+g} with alpha fixed, "
                   f"{rs:+g} with alpha/sqrt(r)")


def _unmerged_cost(out: str) -> Finding:
    unmerged, merged = numbers(r"unmerged LoRA: {n} FLOPs.*?merged: {n} FLOPs", out.replace(",", ""))
    return Finding(unmerged > merged, f"FLOPs per forward pass: unmerged {unmerged:,.0f}, merged {merged:,.0f} (the base model's)")


def _optimizer_dtypes(out: str) -> Finding:
    holds = bool(re.search(r"'parameters': 'torch.float32', 'gradients': 'torch.float32'", out)) and \
        out.count("'torch.uint8'") >= 2
    return Finding(holds, "parameters and gradients float32, both Adam moments uint8 codes")


def _shift_inside_layer(out: str) -> Finding:
    first, second = numbers(r"key comes after the query: \{'first half of the heads': {n}, 'second half \(shifted by G/2\)': {n}", out)
    return Finding(first == 0 and second > 0,
                   f"in one layer: {first:g} future-key pairs in the unshifted half of the heads, {second:g} in the "
                   "shifted half (the shift is a per-head roll, not a per-layer one)")


def _alpha_convention(out: str) -> Finding:
    alpha, = numbers(r"adam first step, same lr: .*?alpha {n}x", out)
    scale, = numbers(r"adam first step.*?scale ratios {n}", out)
    return Finding(alpha > 1 and alpha == scale,
                   f"Adam's first update with alpha instead of alpha/r at the same lr: {alpha:g}x larger")


def _merge_4bit(out: str) -> Finding:
    exact, = numbers(r"\(b\) dequantize, then merge in float *: max \|logit diff\| vs \(a\) {n}", out)
    peft, = numbers(r"\(d\) PEFT merge_and_unload, re-quantized *: max \|logit diff\| vs \(a\) {n}", out)
    return Finding(exact < 1e-3 < peft,
                   f"max |logit diff| vs the trained model: dequantize-then-merge {exact:.3g}, PEFT's 4-bit merge {peft:.3g}")


def _qlora_memory(out: str) -> Finding:
    ratios = all_numbers(r"QLoRA / LoRA {n}", out)
    return Finding(ratios[0] > 0.98,
                   f"peak QLoRA / LoRA from {ratios[0]:g} (smallest width) to {ratios[-1]:g} (largest)")


def _dora_magnitude(out: str) -> Finding:
    ours, per_input = numbers(r"trained-looking B.*?per-output \(ours\) {n}, PEFT vs per-input {n}", out)
    return Finding(ours == 0 and per_input > 0,
                   f"with B != 0: PEFT vs per-output norm {ours:g}, PEFT vs per-input norm {per_input:g}")


def _adalora_allocate(out: str) -> Finding:
    line = re.search(r"PEFT without update_and_allocate: ranks per layer after (\d+) steps \[([\d, ]+)\] "
                     r"\(budget (\d+)", out)
    if line is None:
        raise LookupError("no output line 'PEFT without update_and_allocate: ranks per layer ...'")
    steps, ranks, init = int(line.group(1)), [int(r) for r in line.group(2).split(",")], int(line.group(3))
    return Finding(all(r == init for r in ranks),
                   f"PEFT without update_and_allocate: ranks {ranks} after {steps} steps (init_r {init})")


def _rslora_inference(out: str) -> Finding:
    ratio, = numbers(r"ignored {n} \(ratio {n}\)", out)[1:]
    return Finding(ratio > 2, f"the adapter's effect on the logits is {ratio:g}x smaller when use_rslora is ignored")


REGISTER: tuple[Misconception, ...] = (
    Misconception(
        "lora-is-svd",
        "LoRA decomposes the pretrained weight by SVD and trains its top singular directions.",
        "Nothing is decomposed: A is random and B = 0, so A's row space is a random subspace, and training does not "
        "align it with W0's top singular directions. PiSSA (2404.02948) is the SVD-based initialisation.",
        "2106.09685", "01_lora_from_scratch", 9, _lora_is_svd,
    ),
    Misconception(
        "rank-accuracy-table",
        "A fixed table maps LoRA rank to accuracy (e.g. r=8 gives a stated percentage).",
        "Accuracy at a rank depends on model, task, data, training budget and seed; even one rank, one task and one "
        "learning rate give a different test accuracy per seed. Notebook 10 measures rank against accuracy at "
        "convergence.",
        "2106.09685", "10_rank_vs_accuracy", 3, _rank_table,
    ),
    Misconception(
        "adalora-importance-magnitude",
        "AdaLoRA keeps the triplets with the largest singular values (importance = magnitude).",
        "The score is a smoothed sensitivity |w * grad| times its uncertainty, for the singular value plus the "
        "mean over its column of P and row of Q; it ranks triplets differently from the magnitude.",
        "2303.10512", "07_adalora", 8, _adalora_importance,
    ),
    Misconception(
        "adalora-exact-orthogonality",
        "AdaLoRA keeps P and Q exactly orthogonal (projection or Gram-Schmidt after each step).",
        "Only a soft penalty ||P^T P - I|| + ||Q Q^T - I|| is added to the loss; P and Q are never exactly orthogonal.",
        "2303.10512", "07_adalora", 9, _adalora_orthogonality,
    ),
    Misconception(
        "lora-ga-gradient-accumulation",
        "LoRA-GA means LoRA with gradient accumulation.",
        "GA is Gradient Approximation: A and B are initialised from the SVD of the first-step gradient so that "
        "LoRA's first update equals the best rank-2r approximation of full fine-tuning's gradient.",
        "2407.05000", "11_lora_variants", 7, _lora_ga,
    ),
    Misconception(
        "qlora-dequantize-once",
        "QLoRA dequantizes the whole model to 16 bits once and then trains normally.",
        "Weights stay in NF4; each layer dequantizes its weight on the fly in every forward and again in the backward, "
        "and frees it.",
        "2305.14314", "04_double_quantization", 9, _dequantize_every_step,
    ),
    Misconception(
        "memory-saving-one-factor",
        "LoRA cuts training memory by one fixed factor (e.g. 3x).",
        "The saving depends on the split: weights stay, gradients and optimizer states shrink, activations stay; "
        "the ratio of peaks moves with model size, batch and sequence length.",
        "2106.09685", "06_memory_full_vs_lora_vs_qlora", 8, _memory_factor,
    ),
    Misconception(
        "higher-rank-better",
        "A higher rank is always better.",
        "With alpha fixed the scale alpha/r shrinks as r grows, so the update learned in the same steps gets "
        "smaller (rsLoRA, 2312.03732, fixes the scale at alpha/sqrt(r)); and the rank a task needs is measured, not "
        "assumed (notebook 10).",
        "2312.03732", "10_rank_vs_accuracy", 6, _scale_shrinks,
    ),
    Misconception(
        "unmerged-no-cost",
        "LoRA adds no inference cost, even unmerged.",
        "Only merged: unmerged, every adapted layer does two extra skinny matmuls; merged it is a plain Linear.",
        "2106.09685", "01_lora_from_scratch", 6, _unmerged_cost,
    ),
    Misconception(
        "8bit-optimizer-trains-in-8bit",
        "An 8-bit optimizer trains the model in 8 bits.",
        "Only the Adam moments are stored as 8-bit codes; parameters and gradients keep their dtype.",
        "2110.02861", "14_int8_and_8bit_optimizers", 6, _optimizer_dtypes,
    ),
    Misconception(
        "longlora-shift-between-layers",
        "LongLoRA shifts the group boundaries from one layer to the next.",
        "Inside every layer, half of the heads attend in groups and the other half in groups shifted by G/2; "
        "training only, inference keeps full attention.",
        "2309.12307", "09_longlora_shift_short_attention", 3, _shift_inside_layer,
    ),
    Misconception(
        "alpha-convention-is-cosmetic",
        "alpha, alpha/r and alpha/sqrt(r) are naming conventions: the same r, alpha and lr train the same adapter.",
        "The scale in front of BA multiplies the learning rate: the first update grows with scale^2 x lr under SGD and "
        "scale x lr under Adam; rescaling lr matches the first step, and the whole run only when A is frozen.",
        "2106.09685", "15_what_people_ask", 1, _alpha_convention,
    ),
    Misconception(
        "merge-into-4bit-is-exact",
        "Merging a QLoRA adapter with merge_and_unload gives the model that was trained.",
        "The adapter was trained on dequant(NF4(W)): PEFT's 4-bit merge re-quantizes W + sBA and merging into the original "
        "16-bit W adds back the quantization error; only dequantize-then-merge in float reproduces the trained outputs.",
        "2305.14314", "15_what_people_ask", 2, _merge_4bit,
    ),
    Misconception(
        "qlora-always-less-memory",
        "QLoRA always needs clearly less memory than LoRA.",
        "QLoRA only shrinks the frozen weights of the quantized layers and adds constants and a dequantized weight per "
        "matmul; on small models the peaks are within a few percent, so other differences between runs decide.",
        "2305.14314", "15_what_people_ask", 3, _qlora_memory,
    ),
    Misconception(
        "dora-magnitude-per-input",
        "DoRA keeps one magnitude per input feature (the paper's 1 x k vector read on nn.Linear's weight).",
        "The magnitude is per output feature (row norms of the (out, in) weight), as PEFT and the official code; the "
        "per-input reading agrees at B = 0 and differs once B is non-zero.",
        "2402.09353", "15_what_people_ask", 6, _dora_magnitude,
    ),
    Misconception(
        "adalora-prunes-by-itself",
        "AdaLoRA lowers the ranks on its own during training.",
        "Ranks change only inside update_and_allocate, called after each optimizer step; without the call PEFT's and our "
        "AdaLoRA keep init_r in every layer.",
        "2303.10512", "15_what_people_ask", 7, _adalora_allocate,
    ),
    Misconception(
        "rslora-training-only",
        "use_rslora is a training trick; at inference an adapter can be applied with alpha/r.",
        "The flag sets the constant in front of BA at inference too: ignoring it makes every update sqrt(r) times too "
        "small.",
        "2312.03732", "15_what_people_ask", 9, _rslora_inference,
    ),
)


def register_markdown(notebook_dir: Path | None = None) -> str:
    """The register as a markdown table: claim, correction, paper, where it is measured and what
    was measured there (evaluated from the committed outputs by :meth:`Misconception.evaluate`)."""
    lines = ["| Claim | Correction | arXiv | Measured in | Measured |", "|---|---|---|---|---|"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|")  # a literal pipe would end the table cell

    for m in REGISTER:
        finding = m.evaluate(notebook_dir)
        measured = finding.measured if finding.holds else f"DOES NOT SUPPORT THE CORRECTION: {finding.measured}"
        lines.append(f"| {cell(m.claim)} | {cell(m.correction)} | {m.arxiv} | {cell(m.where(notebook_dir))} | "
                     f"{cell(measured)} |")
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
