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


TWO_WORLDS = "two_worlds.2core.json"
PW_VARIANCE = "paperworld_variance.2core.json"
TW_TITLES = {
    "paper-world/adamw": "paper world, AdamW",
    "paper-world/sgd-equalized": "paper world, SGD equalized",
    "digitsum/adamw": "digitsum, AdamW",
    "digitsum/sgd-equalized": "digitsum, SGD equalized",
}


def _minus(text: str) -> str:
    return text.replace("-", "−")


def _tw_cell(name: str) -> dict:
    return stored(TWO_WORLDS)["cells"][name]


def _tw_ratio(world: str, key: str) -> float:
    return stored(TWO_WORLDS)["worlds"][world][key]["dr_grpo/delta_l"]


def _tw_row(name: str) -> str:
    """One row of the README's 2x2 table: final rewards, Dr. GRPO − ΔL with its interval and MDE, Holm count."""
    cell = _tw_cell(name)
    finals = " | ".join(f"{cell['labels'][m]['final_reward']['mean']:.3f}" for m in METHODS)
    p = next(p for p in cell["verdict"]["pairs"] if {p["a"], p["b"]} == {"dr_grpo", "delta_l"}
             and p["metric"] == "final_reward")  # fmt: skip
    sign = 1 if p["a"] == "dr_grpo" else -1
    lo, hi = sorted(sign * x for x in p["ci_t"])
    pair = _minus(f"{sign * p['mean_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], MDE {p['mde']:.3f}")
    marked = sum(q["distinguishable"] for q in cell["verdict"]["pairs"])
    return (f"| {TW_TITLES[name]} | {finals} | {pair} | {marked} of {len(cell['verdict']['pairs'])} | "
            f"{cell['wall_seconds'] / 60:.1f} min |")  # fmt: skip


def _tw_marked(name: str) -> tuple:
    """Count, total, gap range and MDE range of a cell's distinguishable pairs (all reward-area ones: checked)."""
    pairs = _tw_cell(name)["verdict"]["pairs"]
    marked = [p for p in pairs if p["distinguishable"]]
    assert {p["metric"] for p in marked} == {"auc"}
    for p in marked:  # each one: a 1/L-family aggregator above a flat-family one
        assert ({p["a"], p["b"]} & {"grpo", "delta_l"}) and ({p["a"], p["b"]} & {"dapo", "dr_grpo"})
        winner = p["a"] if p["mean_diff"] > 0 else p["b"]
        assert winner in {"grpo", "delta_l"}
    gaps = [abs(p["mean_diff"]) for p in marked]
    mdes = [p["mde"] for p in marked]
    return len(marked), len(pairs), min(gaps), max(gaps), min(mdes), max(mdes)


LR_SWEEP, LR_CONFIRM = "lr_sweep.paperworld.2core.json", "lr_confirm.paperworld.2core.json"
AUTO = "delta_l-aauto"


def _lr_pair(name: str, rate: str, metric: str, *, ci: bool = False) -> tuple:
    """ΔL − Dr. GRPO at one rate: (difference, raw p, Holm p over the file's tests) or (difference, t interval)."""
    p = next(p for p in stored(name)["rates"][rate]["verdict"]["pairs"] if p["metric"] == metric)
    sign = 1 if p["a"] == "delta_l" else -1
    if ci:
        return (sign * p["mean_diff"], *sorted(sign * x for x in p["ci_t"]))
    return sign * p["mean_diff"], p["p_value"], p["p_holm_sweep"]


def _auto_pair(cell: str, other: str, metric: str) -> float:
    """ΔL(auto) − ``other`` in a cell's auto-α verdict; the pair must be distinguishable (the README says so)."""
    pairs = _tw_cell(cell)["auto_alpha"]["verdict"]["pairs"]
    p = next(p for p in pairs if {p["a"], p["b"]} == {AUTO, other} and p["metric"] == metric)
    assert p["distinguishable"], (cell, other, metric)
    return p["mean_diff"] if p["a"] == AUTO else -p["mean_diff"]


def test_no_other_auto_alpha_pair_is_distinguishable() -> None:
    marked = {(cell, frozenset((p["a"], p["b"])), p["metric"])
              for cell, c in stored(TWO_WORLDS)["cells"].items() for p in c["auto_alpha"]["verdict"]["pairs"]
              if p["distinguishable"] and AUTO in (p["a"], p["b"])}  # fmt: skip
    assert marked == {
        ("digitsum/sgd-equalized", frozenset((AUTO, "delta_l")), "auc"),
        ("digitsum/sgd-equalized", frozenset((AUTO, "dr_grpo")), "auc"),
        ("paper-world/adamw", frozenset((AUTO, "dr_grpo")), "eval/heldout_reward"),
    }


def _auto_final_alpha() -> tuple[float, float]:
    """The smallest and largest per-cell median of ΔL(auto)'s last α."""
    import statistics

    medians = [
        statistics.median(r["alpha"][-1][1] for r in c["auto_alpha"]["runs"] if r["label"] == AUTO)
        for c in stored(TWO_WORLDS)["cells"].values()
    ]
    return min(medians), max(medians)


PW_PRESET = "paper_world_compare.2core.json"


def _pw_preset_marked() -> dict:
    (p,) = [p for p in stored(PW_PRESET)["verdict"]["pairs"] if p["distinguishable"]]
    assert (p["a"], p["b"], p["metric"]) == ("dr_grpo", "delta_l", "eval/heldout_reward")
    return p


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
    "two worlds: wall time": lambda: (
        f"({stored(TWO_WORLDS)['wall_seconds'] / 60:.1f} min on the 2-core machine"
    ),
    "two worlds: paper-world length spread": lambda: (
        f"step-1 length spread: median\n{_tw_cell('paper-world/adamw')['length_ratio_step1']['median']:.1f}×"
    ),
    "two worlds: corr(A, L) digitsum": lambda: (
        f"corr(A_i, L_i) = {_tw_cell('digitsum/adamw')['advantage_by_length']['corr']:.2f})"
    ),
    "two worlds: corr(A, L) paper world": lambda: _minus(
        f"corr(A_i, L_i) = {_tw_cell('paper-world/adamw')['advantage_by_length']['corr']:.2f}, and"
    ),
    **{f"two worlds row: {name}": (lambda name=name: _tw_row(name)) for name in TW_TITLES},
    "two worlds: CV ratios": lambda: (
        f"measured CV of Dr. GRPO is {_tw_ratio('paper-world', 'ratio_measured'):.2f}× ΔL's in the paper world "
        f"(Var(g_i) ∝ L_i predicts {_tw_ratio('paper-world', 'ratio_theory'):.2f}×) and "
        f"{_tw_ratio('digitsum', 'ratio_measured'):.2f}× in digitsum (predicted {_tw_ratio('digitsum', 'ratio_theory'):.2f}×)"
    ),
    "two worlds: well-formed rows": lambda: (
        f"the ratio is {stored(PW_VARIANCE)['well_formed']['ratio_measured']['dr_grpo/delta_l']:.2f} against a "
        f"predicted {stored(PW_VARIANCE)['well_formed']['ratio_theory']['fitted_line']['dr_grpo/delta_l']:.2f}"
    ),
    "two worlds: digitsum AdamW marks": lambda: (
        "marks {} of {}, all in reward area: GRPO and ΔL above DAPO and Dr. GRPO by {:.3f}–{:.3f} (MDEs "
        "{:.3f}–{:.3f})".format(*_tw_marked("digitsum/adamw"))
    ),
    "lr sweep: the lead at 3": lambda: (
        "at 3 ΔL led by {:+.3f} in final reward (raw p {:.3f}, Holm {:.3f})".format(
            *_lr_pair(LR_SWEEP, "3", "final_reward")
        )
    ),
    "lr confirmation: reward area": lambda: (
        _minus(
            "ΔL's reward area is {:+.3f} [{:+.3f}, {:+.3f}] above".format(
                *_lr_pair(LR_CONFIRM, "3", "auc", ci=True)
            )
        )
        + " Dr. GRPO's, distinguishable (Holm over its 3 tests: p {:.3f})".format(
            _lr_pair(LR_CONFIRM, "3", "auc")[2]
        )
    ),
    "lr confirmation: the others": lambda: "final reward ({:+.3f}) and held-out ({:+.3f}) are not".format(
        _lr_pair(LR_CONFIRM, "3", "final_reward")[0], _lr_pair(LR_CONFIRM, "3", "eval/heldout_reward")[0]
    ),
    "lr confirmation: ΔL's final reward": lambda: (
        f"ΔL's final reward {stored(LR_CONFIRM)['rates']['3']['labels']['delta_l']['final_reward']['mean']:.3f})"
    ),
    "auto α: final values": lambda: "its final value has a median of {:.2f} to {:.2f}".format(
        *_auto_final_alpha()
    ),
    "auto α: digitsum SGD": lambda: (
        "its reward area is {:.3f} above ΔL(α=1)'s and {:.3f} above Dr. GRPO's".format(
            _auto_pair("digitsum/sgd-equalized", "delta_l", "auc"),
            _auto_pair("digitsum/sgd-equalized", "dr_grpo", "auc"),
        )
    ),
    "auto α: paper world AdamW": lambda: "its held-out reward is {:.3f} below Dr. GRPO's".format(
        -_auto_pair("paper-world/adamw", "dr_grpo", "eval/heldout_reward")
    ),
    "paper-world preset run": lambda: (
        f"5 seeds × 60 steps,\n  {stored(PW_PRESET)['wall_seconds'] / 60:.1f} min; `paper_world_compare.2core.json`) marks "
        f"{['no', 'one'][sum(p['distinguishable'] for p in stored(PW_PRESET)['verdict']['pairs'])]} test, against ΔL: Dr. GRPO's "
        f"held-out reward is {_pw_preset_marked()['mean_diff']:+.3f} above ΔL's (Holm p {_pw_preset_marked()['p_holm']:.3f})"
    ),
    "probe cost in the README": lambda: (
        "a probed step takes {:.2f} s against {:.2f} s".format(
            stored(PROBE_COST)["tasks"]["paperworld"]["median_step_s_with_probe"],
            stored(PROBE_COST)["tasks"]["paperworld"]["median_step_s_without_probe"],
        )
        + ", mostly the α fit's bootstrap interval, so a probe every 3 steps makes a run about {:.0f}× slower".format(
            1 + stored(PROBE_COST)["tasks"]["paperworld"]["step_overhead_at_every"]["3"]
        )
        + "; on SmolLM2 a probe costs {:.1f} s beside a {:.1f} s step".format(
            stored(PROBE_COST)["tasks"]["countdown (smollm2-135m)"]["median_probe_s"],
            stored(PROBE_COST)["tasks"]["countdown (smollm2-135m)"]["median_step_s_without_probe"],
        )
    ),
    "Qwen projection in the README": lambda: "{:.1f}–{:.1f}%\nper step at a probe every 3 steps".format(
        *_qwen_overhead_percent()
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


def _pw_world() -> dict:
    return stored(TWO_WORLDS)["worlds"]["paper-world"]


def test_paper_world_pairs_are_not_marked_and_the_theory_pair_covers_zero() -> None:
    for name in ("paper-world/adamw", "paper-world/sgd-equalized"):
        pairs = _tw_cell(name)["verdict"]["pairs"]
        assert not any(p["distinguishable"] for p in pairs), name
        theory = next(
            p for p in pairs if {p["a"], p["b"]} == {"dr_grpo", "delta_l"} and p["metric"] == "final_reward"
        )
        assert theory["ci_t"][0] < 0 < theory["ci_t"][1], name


PROBE_COST = "probe_cost.2core.json"
COST_ROWS = {
    "paperworld": "paper world (10 runs, 64 rows a probe)",
    "digitsum": "digitsum (10 runs, 64 rows)",
    "countdown (smollm2-135m)": "SmolLM2 CountDown (1 run, 16 rows)",
}


def _cost_row(task: str, title: str) -> str:
    t = stored(PROBE_COST)["tasks"][task]
    probe = t["median_probe_s"]
    probe_text = f"{probe:.1f} s" if probe > 10 else f"{probe:.2f} s"
    fmt = ".1f" if t["median_step_s_without_probe"] > 10 else ".2f"
    return (f"| {title} | {probe_text} | {t['median_step_s_without_probe']:{fmt}} s | "
            f"{t['median_step_s_with_probe']:{fmt}} s | {t['step_overhead_at_every']['1']:.2f} |")  # fmt: skip


def _qwen_overhead_percent() -> tuple[float, float]:
    q = stored(PROBE_COST)["qwen2.5-1.5b_projection"]
    return 100 * q["overhead_lower_bound_at_every"]["3"], 100 * q["overhead_at_cpu_ratio_at_every"]["3"]


# docs/measurements.md quotes these figures of stored results the same way (its paragraphs beyond the README's)
MEASUREMENTS = ROOT / "docs" / "measurements.md"


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
    "two worlds: paper-world corr": lambda: _minus(
        f"corr(A_i, L_i) is {_tw_adv('paper-world/adamw')['corr']:.2f} (AdamW) and "
        f"{_tw_adv('paper-world/sgd-equalized')['corr']:.2f} (SGD)"
    ),
    "two worlds: paper-world E[A²]": lambda: (
        "E[A_i²] stays between {:.2f} and {:.2f} in every length bin".format(
            *_tw_big_bins_a2("paper-world/adamw")
        )
    ),
    "two worlds: digitsum corr and advantages": lambda: _minus(
        f"In digitsum corr(A_i, L_i) is {_tw_adv('digitsum/adamw')['corr']:.2f} (AdamW): the short answers "
        f"(L = 2–3) have a mean advantage of {_tw_bin('digitsum/adamw', 2)['mean_a']:.2f}, the thinking ones "
        f"(8–15) {_tw_bin('digitsum/adamw', 8)['mean_a']:+.2f}"
    ),
    "two worlds: step-1 fits": lambda: (
        f"({_tw_cell('paper-world/adamw')['variance_fit_step1']['rows']} rows), the paper world's fit runs to the "
        f"edge of its range (k = {_tw_cell('paper-world/adamw')['variance_fit_step1']['exponent']:.2f}, interval "
        f"from {_tw_cell('paper-world/adamw')['variance_fit_step1']['exponent_ci'][0]:.2f}), digitsum's gives k = "
        + _fit_k(_tw_cell("digitsum/adamw")["variance_fit_step1"])
        + "; the large batch: digitsum "
        + _fit_k(stored(TWO_WORLDS)["worlds"]["digitsum"]["variance_fit"])
    ),
    "two worlds: probe CVs": lambda: (
        f"{_tw_ratio('digitsum', 'ratio_measured'):.2f}× ΔL's in digitsum, while the training probes' median CVs put Dr. GRPO below ΔL there "
        f"({_tw_probe('digitsum/adamw', 'dr_grpo'):.2f} against {_tw_probe('digitsum/adamw', 'delta_l'):.2f}, "
        f"AdamW); in the paper world both agree in direction (probes: {_tw_probe('paper-world/adamw', 'dr_grpo'):.2f} "
        f"against {_tw_probe('paper-world/adamw', 'delta_l'):.2f})"
    ),
    "lr sweep: wall": lambda: (
        f"(`lr_sweep.paperworld.2core.json`, {stored(LR_SWEEP)['wall_seconds'] / 60:.1f} min)"
    ),
    "lr confirmation: wall": lambda: (
        f"(`lr_confirm.paperworld.2core.json`, {stored(LR_CONFIRM)['wall_seconds'] / 60:.1f} min)"
    ),
    **{
        f"probe cost: {task}": (lambda task=task, title=title: _cost_row(task, title))
        for task, title in COST_ROWS.items()
    },
    "probe cost: Qwen projection": lambda: (
        "at least one batched forward + backward ({probe_s_lower_bound:.3f} s) and at the SmolLM2 ratio "
        "{probe_s_at_cpu_ratio:.2f} s, against a {step_s:.1f} s step".format(
            **stored(PROBE_COST)["qwen2.5-1.5b_projection"]
        )
        + ", so {:.1f}–{:.1f}% per step at a probe every 3 steps".format(*_qwen_overhead_percent())
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


def _tw_adv(cell: str) -> dict:
    return _tw_cell(cell)["advantage_by_length"]


def _tw_bin(cell: str, lo: int) -> dict:
    return next(b for b in _tw_adv(cell)["bins"] if b["min_length"] == lo)


def _tw_big_bins_a2(cell: str) -> tuple[float, float]:
    values = [b["mean_a2"] for b in _tw_adv(cell)["bins"] if b["n"] >= 2000]
    return min(values), max(values)


def _tw_probe(cell: str, method: str) -> float:
    return _tw_cell(cell)["probes"]["cv_measured_median"][method]


def _fit_k(fit: dict) -> str:
    return "{:.2f} [{:.2f}, {:.2f}]".format(fit["exponent"], *fit["exponent_ci"])


def test_the_sweeps_first_rate_repeats_the_equalized_sgd_cell() -> None:
    """docs/measurements.md: the sweep's rate-0.1 runs are the 2x2 cell's Dr. GRPO and ΔL runs, number for number."""
    cell = {(r["label"], r["seed"]): r["reward"] for r in _tw_cell("paper-world/sgd-equalized")["runs"]}
    sweep = stored(LR_SWEEP)["rates"]["0.1"]["runs"]
    assert len(sweep) == 20
    for run in sweep:
        assert run["reward"] == cell[(run["label"], run["seed"])], run["run"]
