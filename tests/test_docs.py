"""The docs cannot drift: every figure the README quotes is recomputed from its stored result, no file cites
the developers' notes outside the repository, and every relative link in the README and docs/ resolves."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

from lab.aggregation import METHODS
from lab.verdict import verdict_from_curves

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
MAIN, SGD, SGD_EQ = (
    "fast_compare.2core.json",
    "fast_compare.sgd.2core.json",
    "fast_compare.sgd_equalized.2core.json",
)
OTHER_CPU = "fast_compare.other_cpu.summary.json"
VARIANCE = "variance_vs_length.smollm2.json"


@cache
def stored(name: str) -> dict:
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


@cache
def verdict(name: str, column: str) -> dict:
    """The verdict of a stored comparison's curves (``reward`` or ``completions/mean_length``), by lab.verdict."""
    curves: dict[str, dict[int, list]] = {label: {} for label in METHODS}
    for run in stored(name)["runs"]:
        curves[run["label"]][run["seed"]] = run["curves"][column]
    return verdict_from_curves(curves)


def pair(name: str, column: str, a: str, b: str, metric: str) -> dict:
    return next(p for p in verdict(name, column)["pairs"] if (p["a"], p["b"], p["metric"]) == (a, b, metric))


def counts(name: str, column: str = "reward") -> str:
    """ "k of n (m before correction)": Holm-corrected, then the uncorrected two-interval rule."""
    pairs = verdict(name, column)["pairs"]
    corrected = sum(p["distinguishable"] for p in pairs)
    uncorrected = sum(p["excludes_0_uncorrected"] for p in pairs)
    return f"{corrected} of {len(pairs)} (" + f"{uncorrected} of {len(pairs)} before correction)"


def minutes_seconds(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def results_row(title: str, name: str) -> str:
    """One row of the README's results table, built from the stored comparison."""
    labels = stored(name)["verdict"]["labels"]
    finals = " | ".join(f"{labels[m]['final_reward']['mean']:.3f}" for m in METHODS)
    wall = f"{stored(name)['wall_seconds'] / 60:.1f} min"
    return f"| {title} | {finals} | {counts(name)} | {wall} | `{name}` |"


def length_gaps(name: str) -> tuple[float, float]:
    """The distinguishable length gaps between the 1/L pair {GRPO, ΔL} and the flat pair {DAPO, Dr. GRPO}."""
    gaps = [
        abs(p["mean_diff"])
        for p in verdict(name, "completions/mean_length")["pairs"]
        if p["distinguishable"]
        and ({p["a"], p["b"]} & {"grpo", "delta_l"})
        and ({p["a"], p["b"]} & {"dapo", "dr_grpo"})
    ]
    return min(gaps), max(gaps)


# Each entry: a README phrase, computed from the stored results. Change a stored result and this fails until
# the README says the new figure.
FIGURES: dict[str, Callable[[], str]] = {
    "setup time (another machine)": lambda: (
        f"{minutes_seconds(stored(OTHER_CPU)['setup_seconds'])} on a quiet 2-core"
    ),
    "main job wall time": lambda: f"{stored(MAIN)['wall_seconds'] / 60:.1f} min for\n  the 20 runs",
    "main job step and memory": lambda: (
        f"median step {stored(MAIN)['median_step_seconds']:.2f} s, peak RSS {stored(MAIN)['peak_rss_gb']:.2f} GB"
    ),
    "main job on the other machine": lambda: (
        f"the quiet machine: {minutes_seconds(stored(OTHER_CPU)['compare_wall_seconds'])}"
    ),
    "setup --dev time": lambda: f"{stored(OTHER_CPU)['setup_dev_seconds']} s there",
    "pytest count and time": lambda: (
        f"{stored(OTHER_CPU)['pytest_passed']} passed in {minutes_seconds(stored(OTHER_CPU)['pytest_seconds'])}"
    ),
    "AdamW row": lambda: results_row("AdamW 3e-4 (the main job)", MAIN),
    "SGD row": lambda: results_row("SGD 0.1", SGD),
    "SGD equalized row": lambda: results_row("SGD 0.1, equalized step size", SGD_EQ),
    "MDE of GRPO against ΔL": lambda: (
        f"{pair(MAIN, 'reward', 'grpo', 'delta_l', 'final_reward')['mde']:.3f} in final reward for GRPO against ΔL"
    ),
    "AdamW length verdict": lambda: "Under AdamW, {} length comparisons are distinguishable\n  ({}".format(
        *counts(MAIN, "completions/mean_length").split(" (", 1)
    ),
    "AdamW length gaps": lambda: "about\n  {:.1f}–{:.1f} tokens longer".format(*length_gaps(MAIN)),
    "SGD: ΔL over GRPO, final": lambda: (
        f"{-pair(SGD, 'reward', 'grpo', 'delta_l', 'final_reward')['mean_diff']:.3f} above GRPO's"
    ),
    "SGD: ΔL over GRPO, area": lambda: (
        f"(reward area +{-pair(SGD, 'reward', 'grpo', 'delta_l', 'auc')['mean_diff']:.3f})"
    ),
    "SGD: Dr. GRPO over GRPO, area": lambda: (
        f"Dr. GRPO's area {-pair(SGD, 'reward', 'grpo', 'dr_grpo', 'auc')['mean_diff']:.3f} above"
    ),
    "length spread at step 1": lambda: (
        f"a median {stored(MAIN)['length_ratio_step1']['median']:.1f}× its shortest"
    ),
    "logged cosine": lambda: "cosine {:.6f}".format(
        min(v for run in stored(MAIN)["runs"] for _, v in run["curves"]["agg_grad/cos/grpo~delta_l"])
    ),
    "measured exponent on digitsum": lambda: (
        f"median power of {stored(MAIN)['probes']['exponent_median']:.1f}"
    ),
    "other machine's rewards": lambda: (
        "final rewards GRPO {grpo:.3f}, DAPO {dapo:.3f}, Dr. GRPO {dr_grpo:.3f}, ΔL {delta_l:.3f}".format(
            **stored(OTHER_CPU)["final_reward_mean"]
        )
    ),
    "SmolLM2 slope": lambda: "{:.1f} per token [{:.1f}, {:.1f}]".format(
        stored(VARIANCE)["slope"], *stored(VARIANCE)["slope_ci"]
    ),
    "SmolLM2 exponent": lambda: "exponent is {:.2f} [{:.2f}, {:.2f}]".format(
        stored(VARIANCE)["exponent"], *stored(VARIANCE)["exponent_ci"]
    ),
    "paper world: length spread": lambda: (
        f"ratio at step 1 has median {_pw_cell()['length_ratio_step1']['median']:.1f}"
    ),
    "paper world: measured vs theoretical CV ratio": lambda: (
        f"the measured CV of Dr. GRPO is {_pw_world()['ratio_measured']['dr_grpo/delta_l']:.2f}× ΔL's, where "
        f"Var(g_i) ∝ L_i predicts {_pw_world()['ratio_theory']['dr_grpo/delta_l']:.2f}×"
    ),
    "paper world: final rewards and the pair's interval": lambda: (
        f"final reward ΔL {_pw_cell()['labels']['delta_l']['final_reward']['mean']:.3f}, Dr. GRPO "
        f"{_pw_cell()['labels']['dr_grpo']['final_reward']['mean']:.3f}; Dr. GRPO − ΔL "
        f"{_pw_pair()['mean_diff']:+.3f}".replace("-", "−")
        + ", 95% t interval ["
        + ", ".join(f"{x:+.3f}".replace("-", "−") for x in _pw_pair()["ci_t"])
        + "]"
    ),
}


@pytest.mark.parametrize("what", list(FIGURES))
def test_readme_quotes_the_stored_figure(what: str) -> None:
    phrase = " ".join(FIGURES[what]().split())  # line breaks and indentation do not count
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert phrase in text, f"README should say {phrase!r} ({what})"


def test_sgd_verdict_marks_no_dapo_pair() -> None:
    """The README says DAPO's lower SGD mean is not distinguishable from any other aggregator."""
    assert not any(
        "dapo" in (p["a"], p["b"]) and p["distinguishable"] for p in verdict(SGD, "reward")["pairs"]
    )


def test_equalized_sgd_marks_no_reward_pair() -> None:
    assert not any(p["distinguishable"] for p in verdict(SGD_EQ, "reward")["pairs"])


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    paths = [
        ROOT / n for n in names if (ROOT / n).is_file() and Path(n).suffix not in {".png", ".jpg", ".gz"}
    ]
    return [p for p in paths if p != Path(__file__).resolve()]


def test_no_file_cites_notes_outside_the_repository() -> None:
    # spelled in pieces so that this file does not match itself
    cited = re.compile("(" + "FACTS" + r"|" + "PAPER" + r")\.md|" + "shared" + "/(FACTS|PAPER|DESIGN)")
    offenders = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        offenders += [
            f"{path.relative_to(ROOT)}:{i}"
            for i, line in enumerate(text.splitlines(), 1)
            if cited.search(line)
        ]
    assert not offenders, (
        f"cite a file in the repository instead (docs/paper.md, docs/measurements.md): {offenders}"
    )


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    slugs = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip().lower()
            slugs.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading)))
    return slugs


def doc_pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links that do not resolve: {broken}"


def test_anchor_slugs_follow_github() -> None:
    assert anchors("## The main job (`lab compare --out runs/fast`)") == {
        "the-main-job-lab-compare---out-runsfast"
    }
    assert anchors("## Variance against length\n# Other") == {"variance-against-length", "other"}


TWO_WORLDS = "two_worlds.2core.json"


def _pw_cell() -> dict:
    return stored(TWO_WORLDS)["cells"]["paper-world/adamw"]


def _pw_world() -> dict:
    return stored(TWO_WORLDS)["worlds"]["paper-world"]


def _pw_pair() -> dict:
    return next(p for p in _pw_cell()["verdict"]["pairs"] if p["metric"] == "final_reward")


def test_paper_world_pair_is_not_marked_and_its_interval_covers_zero() -> None:
    pair = _pw_pair()
    assert not pair["distinguishable"] and pair["ci_t"][0] < 0 < pair["ci_t"][1]


# docs/measurements.md quotes these figures of stored results the same way (its paragraphs beyond the README's)
MEASUREMENTS = ROOT / "docs" / "measurements.md"
PW_VARIANCE = "paperworld_variance.2core.json"


def _minus(text: str) -> str:
    return text.replace("-", "−")


def _pwv_fit_row(name: str, key: str, spec: str) -> str:
    cells = []
    for rows in ("all", "well_formed"):
        fit = stored(PW_VARIANCE)[rows]["variance_fit"]
        cells.append(
            _minus(f"{fit[key]:{spec}} [{fit[key + '_ci'][0]:{spec}}, {fit[key + '_ci'][1]:{spec}}]")
        )
    return f"| {name} | {cells[0]} | {cells[1]} |"


def _pwv_ratio_row(name: str, pick: Callable[[dict], dict]) -> str:
    ratios = [pick(stored(PW_VARIANCE)[rows])["dr_grpo/delta_l"] for rows in ("all", "well_formed")]
    return f"| {name} | {ratios[0]:.2f} | {ratios[1]:.2f} |"


def _pwv_kind(kind: str, spec: str = ".3g") -> str:
    return f"{stored(PW_VARIANCE)['score_norms']['by_kind'][kind]['mean']:{spec}}"


def _pwv_bin(lo: int) -> dict:
    return next(b for b in stored(PW_VARIANCE)["score_norms"]["by_length"] if b["min_length"] == lo)


MEASUREMENT_FIGURES: dict[str, Callable[[], str]] = {
    "paper world variance: run": lambda: (
        f"{stored(PW_VARIANCE)['rows']} completions, {stored(PW_VARIANCE)['wall_seconds']:.0f} s at load "
        f"{stored(PW_VARIANCE)['load_average_before'][0]:.1f} → {stored(PW_VARIANCE)['load_average_after'][0]:.1f}"
    ),
    "paper world variance: miscounts": lambda: (
        f"breaks the count on {stored(PW_VARIANCE)['miscount_rate']:.2%} of the tokens after the length choice; "
        f"{stored(PW_VARIANCE)['off_rows']} of {stored(PW_VARIANCE)['rows']} completions hold an off token, and "
        f"they carry {stored(PW_VARIANCE)['off_variance_share']:.1%} of Σ Var(g_i)"
    ),
    "paper world variance: norms by kind": lambda: (
        f"off token is {_pwv_kind('off')}, a well-formed filler's {_pwv_kind('filler_ok')} (the answer "
        f"{_pwv_kind('answer')}, the length choice {_pwv_kind('length')}, an `<eos>` {_pwv_kind('eos', '.1g')})"
    ),
    "paper world variance: off share by length": lambda: (
        f"{_pwv_bin(2)['off_token_share']:.1%} of the tokens at L = 2–3, {_pwv_bin(8)['off_token_share']:.1%} at "
        f"8–15, {_pwv_bin(16)['off_token_share']:.1%} at 16–31 and {_pwv_bin(32)['off_token_share']:.1%} at L ≥ 32"
    ),
    "paper world variance: rows": lambda: (
        f"| | all {stored(PW_VARIANCE)['all']['rows']} rows | "
        f"{stored(PW_VARIANCE)['well_formed']['rows']} well-formed rows |"
    ),
    "paper world variance: exponent": lambda: _pwv_fit_row("k of Var(g_i) ≈ c·L^k", "exponent", ".2f"),
    "paper world variance: intercept": lambda: _pwv_fit_row("a of Var(g_i) ≈ a + V·L", "intercept", ".1f"),
    "paper world variance: slope": lambda: _pwv_fit_row("V of Var(g_i) ≈ a + V·L", "slope", ".2f"),
    "paper world variance: measured ratio": lambda: _pwv_ratio_row(
        "CV Dr. GRPO / ΔL, measured", lambda s: s["ratio_measured"]
    ),
    "paper world variance: theory ∝ L": lambda: _pwv_ratio_row(
        "theory, Var ∝ L", lambda s: s["ratio_theory"]["linear"]
    ),
    "paper world variance: theory c·L^k": lambda: _pwv_ratio_row(
        "theory, Var ∝ L^k (fitted k)", lambda s: s["ratio_theory"]["fitted_exponent"]
    ),
    "paper world variance: theory a + V·L": lambda: _pwv_ratio_row(
        "theory, Var = a + V·L (fitted)", lambda s: s["ratio_theory"]["fitted_line"]
    ),
}


@pytest.mark.parametrize("what", list(MEASUREMENT_FIGURES))
def test_measurements_quote_the_stored_figure(what: str) -> None:
    phrase = " ".join(MEASUREMENT_FIGURES[what]().split())
    text = " ".join(MEASUREMENTS.read_text(encoding="utf-8").split())
    assert phrase in text, f"docs/measurements.md should say {phrase!r} ({what})"


def test_paper_world_variance_is_the_two_worlds_batch() -> None:
    """docs/measurements.md says the all-rows column is two_worlds' large-batch measurement, redone."""
    mine, theirs = stored(PW_VARIANCE)["all"], _pw_world()
    assert mine["ratio_measured"] == pytest.approx(theirs["ratio_measured"])
    assert mine["variance_fit"]["exponent_ci"] == pytest.approx(theirs["variance_fit"]["exponent_ci"])
