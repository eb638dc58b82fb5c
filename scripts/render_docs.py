"""Regenerate ``docs/``: rendered notebooks with static images, and the README's figures, in one command.

    .venv/bin/python scripts/render_docs.py                         # every notebook at full size, all figures
    .venv/bin/python scripts/render_docs.py --small                 # LAB_NOTEBOOK_SMALL=1: the CI sizes, quick
    .venv/bin/python scripts/render_docs.py --small --time-only     # SMALL run times only, copies untouched
    .venv/bin/python scripts/render_docs.py --only 01,02            # some notebooks (figures too, unless --no-figures)
    .venv/bin/python scripts/render_docs.py --runs-dir runs/demo    # notebook 04 loads these runs (LAB_RUNS_DIR)
                                                                    # and the dashboard screenshots show them

What it writes
    ``docs/notebooks/<notebook>.md`` with ``<notebook>_files/*.png``
        Each notebook in ``notebooks/`` (``NN_*.ipynb``, so a new notebook is picked up by itself) executed
        top to bottom with nbclient, every plotly figure then drawn to a PNG (kaleido + Chromium), and
        exported to Markdown by nbconvert (GitHub shows it with its images). Only
        stdout and the images are kept (warnings and progress bars on stderr are dropped). The committed
        notebooks stay clean; the executed copies go to ``build/docs-executed/`` (git-ignored), so that
        ``--reuse-executed`` can re-export them after a markdown-only edit without running anything.
    ``docs/notebooks/timings.json``
        The measured wall time of each notebook per mode (``full`` / ``small``; the kernel's execution only,
        the PNGs are drawn afterwards), with the load average before it and the date: the notebooks' "Run
        time" lines quote it.
    ``docs/figures/variance_vs_length.png``
        ``benchmarks/results/variance_vs_length.smollm2.json`` drawn by ``lab.dashboard.noise.variance_fit_figure``.
    ``docs/figures/main_job_rewards.png``, ``main_job_rewards_sgd.png``
        The main job's reward curves per aggregator (mean over seeds, 95% band), drawn from the stored results
        of ``benchmarks/fast_compare.py`` (AdamW and SGD) by the dashboard's ``reward_figure``.
    ``docs/figures/dashboard_<tab>.png``
        Screenshots of ``streamlit run app.py`` in headless Chromium (Playwright): the Estimator playground
        (no run needed) and, with ``--runs-dir``, the Overview and Gradient noise tabs of those runs.

Requires the dev and docs extras (``pip install -e .[dev,docs]``: nbclient, nbconvert, ipykernel, playwright,
kaleido >= 1) and a Chrome or Chromium (Debian: ``apt-get install chromium``; kaleido finds it on PATH, or set
``BROWSER_PATH``). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's lab package

NOTEBOOKS = ROOT / "notebooks"
DOCS = ROOT / "docs"
EXECUTED = ROOT / "build" / "docs-executed"  # executed notebooks (git-ignored), for --reuse-executed
STORED_VARIANCE = ROOT / "benchmarks" / "results" / "variance_vs_length.smollm2.json"
# the main job as measured by benchmarks/fast_compare.py: (stored result, figure name, what it ran)
STORED_COMPARISONS = (
    (ROOT / "benchmarks" / "results" / "fast_compare.2core.json", "main_job_rewards.png", "AdamW 3e-4"),
    (ROOT / "benchmarks" / "results" / "fast_compare.sgd.2core.json", "main_job_rewards_sgd.png", "SGD 0.1"),
)
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
KERNEL = "delta-l-lab-docs"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="run the notebooks with LAB_NOTEBOOK_SMALL=1")
    p.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 01,03 (default: all)")
    p.add_argument("--runs-dir", type=Path, default=None, help="runs for notebook 04 and the dashboard shots")
    p.add_argument("--no-notebooks", action="store_true", help="only the figures")
    p.add_argument("--no-figures", action="store_true", help="only the notebooks")
    p.add_argument(
        "--reuse-executed",
        action="store_true",
        help="re-export the last executed copies (build/docs-executed/) with the current markdown, no execution",
    )
    p.add_argument(
        "--time-only",
        action="store_true",
        help="execute and record run times, keep the rendered copies (e.g. --small --time-only for the SMALL column)",
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds per notebook cell (default 1800)")
    p.add_argument("--out", type=Path, default=DOCS, help="output folder (default docs/)")
    args = p.parse_args(argv)
    wanted = {x.strip() for x in args.only.split(",") if x.strip()}
    bad = [w for w in wanted if not (len(w) == 2 and w.isdigit())]
    if bad:
        p.error(f"--only takes two-digit notebook numbers such as 01,03; got {', '.join(bad)}")
    args.notebooks = [
        nb for nb in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) if not wanted or nb.name[:2] in wanted
    ]
    if wanted and {nb.name[:2] for nb in args.notebooks} != wanted:
        missing = sorted(wanted - {nb.name[:2] for nb in args.notebooks})
        p.error(f"no notebook numbered {', '.join(missing)} in {NOTEBOOKS}")
    if args.runs_dir is not None and not args.runs_dir.is_dir():
        p.error(f"--runs-dir {args.runs_dir} is not a directory")
    return args


def find_browser() -> str | None:
    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"]
    return next((c for c in CHROMIUM_CANDIDATES if Path(c).exists()), shutil.which("chromium"))


def check_requirements(args: argparse.Namespace) -> str:
    missing = []
    for module in ("nbclient", "nbconvert", "ipykernel", "kaleido", "playwright"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        sys.exit(
            f"missing Python packages: {', '.join(missing)}. Install them with: pip install -e '.[dev,docs]'"
        )
    browser = find_browser()
    if browser is None:
        sys.exit(
            "no Chrome/Chromium found: install one (Debian: apt-get install chromium) or set BROWSER_PATH"
        )
    return browser


# ------------------------------------------------------------------------------------------ notebooks
def kernel_spec_dir() -> Path:
    """A kernel spec for this interpreter in a temp dir (works without `ipykernel install`)."""
    root = Path(tempfile.mkdtemp(prefix="lab-docs-jupyter-"))
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": "ΔL Lab docs", "language": "python"}),
        encoding="utf-8",
    )  # fmt: skip
    return root


def execute(path: Path, args: argparse.Namespace) -> tuple[Any, float]:
    """Run one notebook as a reader would; returns the executed notebook and its wall time."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    env = {
        "LAB_NOTEBOOK_SMALL": "1" if args.small else "0",
        "HF_HUB_OFFLINE": "1",
        "PLOTLY_RENDERER": "plotly_mimetype",  # figures as JSON, turned into PNGs after the timed run
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    if args.runs_dir is not None:
        env["LAB_RUNS_DIR"] = str(args.runs_dir.resolve())
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=args.timeout, kernel_name=KERNEL,
                                         resources={"metadata": {"path": str(path.parent)}})  # fmt: skip
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, seconds


def figure_png(spec: dict) -> str:
    """A plotly figure (its JSON spec) as a base64 PNG, drawn by kaleido in Chromium."""
    import base64

    import plotly.io as pio

    fig = pio.from_json(json.dumps(spec))
    height = fig.layout.height or 450
    return base64.b64encode(fig.to_image(format="png", width=900, height=height)).decode("ascii")


def static_copy(nb: Any) -> Any:
    """Keep stdout and static images (plotly figures drawn to PNG); drop stderr and interactive JSON/html."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            kind = out.get("output_type")
            if kind == "stream" and out.get("name") == "stderr":
                continue
            if kind in ("display_data", "execute_result"):
                data = out.get("data", {})
                if "application/vnd.plotly.v1+json" in data:
                    out["data"] = {"image/png": figure_png(data["application/vnd.plotly.v1+json"])}
                elif "image/png" in data:
                    out["data"] = {"image/png": data["image/png"]}
            kept.append(out)
        cell["outputs"] = kept
    return nb


def export_markdown(nb: Any, name: str, out_dir: Path) -> Path:
    """nbconvert's Markdown with images written next to it (``<name>_files/``)."""
    from nbconvert import MarkdownExporter

    body, resources = MarkdownExporter().from_notebook_node(
        nb, resources={"output_files_dir": f"{name}_files", "unique_key": name}
    )
    files_dir = out_dir / f"{name}_files"
    if files_dir.exists():
        shutil.rmtree(files_dir)
    for rel, data in resources.get("outputs", {}).items():
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    header = (f"<!-- Rendered by scripts/render_docs.py from notebooks/{name}.ipynb; do not edit. "
              f"Regenerate: .venv/bin/python scripts/render_docs.py --only {name[:2]} -->\n\n")  # fmt: skip
    md_path = out_dir / f"{name}.md"
    md_path.write_text(header + body, encoding="utf-8")
    return md_path


def start_kaleido(browser: str) -> None:
    """One Chromium for every figure (kaleido otherwise starts one per image)."""
    import warnings

    import kaleido

    os.environ.setdefault("BROWSER_PATH", browser)
    kaleido.start_sync_server(silence_warnings=True)
    # plotly passes its own browser options, which a running server cannot take: harmless
    warnings.filterwarnings("ignore", message="The kopts argument is ignored")


def reuse(cached: Path, source: Path) -> Any:
    """The executed copy of ``source`` with its markdown cells replaced by the current ones.

    Refuses (exits) when the code cells changed since that execution: outputs must come from this code.
    """
    import nbformat

    if not cached.exists():
        sys.exit(f"no executed copy {cached}: run without --reuse-executed first")
    executed, current = nbformat.read(cached, as_version=4), nbformat.read(source, as_version=4)
    code = [[c.source for c in nb.cells if c.cell_type == "code"] for nb in (executed, current)]
    if code[0] != code[1] or len(executed.cells) != len(current.cells):
        sys.exit(f"the code of {source.name} changed since {cached} was executed: run it again")
    for old, new in zip(executed.cells, current.cells, strict=True):
        if new.cell_type == "markdown":
            old.source = new.source
    return executed


def render_notebooks(args: argparse.Namespace) -> None:
    import nbformat

    out_dir = args.out / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    timings_path = out_dir / "timings.json"
    timings = json.loads(timings_path.read_text(encoding="utf-8")) if timings_path.exists() else {}
    mode = "small" if args.small else "full"
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(kernel_spec_dir()), os.environ.get("JUPYTER_PATH", "")])
    EXECUTED.mkdir(parents=True, exist_ok=True)
    for path in args.notebooks:
        cached = EXECUTED / f"{path.stem}.{mode}.ipynb"
        if args.reuse_executed:
            nb = reuse(cached, path)
            md_path = export_markdown(static_copy(nb), path.stem, out_dir)
            print(
                f"[{path.stem}] re-exported the executed copy {cached} with the current markdown", flush=True
            )
            continue
        load = os.getloadavg()[0]
        print(f"[{path.stem}] executing ({mode}) ...", flush=True)
        nb, seconds = execute(path, args)
        nbformat.write(nb, cached)
        md_path = None if args.time_only else export_markdown(static_copy(nb), path.stem, out_dir)
        timings.setdefault(mode, {})[path.stem] = {
            "seconds": round(seconds, 1),
            "load_before": round(load, 2),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} CPUs",
            "runs_dir": str(args.runs_dir)
            if args.runs_dir is not None and path.name.startswith("04")
            else None,
        }
        timings_path.write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"[{path.stem}] {seconds:.0f} s -> {md_path or 'timings only'}", flush=True)
    write_index(out_dir, timings)


def write_index(out_dir: Path, timings: dict[str, dict[str, Any]]) -> Path:
    """``docs/notebooks/README.md``: every rendered notebook with its first heading and measured run times."""
    import nbformat

    lines = [
        "# Rendered notebooks",
        "",
        "Executed copies of `notebooks/*.ipynb` with their outputs as static images, written by",
        "`scripts/render_docs.py` (regenerate: `.venv/bin/python scripts/render_docs.py`). Run times are",
        "measured by that script (`timings.json`; full size unless marked SMALL, on the machine named there).",
        "",
        "| notebook | run time (full) | run time (SMALL) |",
        "|---|---|---|",
    ]
    for md_path in sorted(out_dir.glob("[0-9][0-9]_*.md")):
        source = NOTEBOOKS / f"{md_path.stem}.ipynb"
        title = md_path.stem
        if source.exists():
            first = nbformat.read(source, as_version=4).cells[0].source.splitlines()[0]
            title = first.lstrip("# ").strip() or title
        cols = []
        for mode in ("full", "small"):
            entry = timings.get(mode, {}).get(md_path.stem)
            cols.append(
                f"{entry['seconds'] / 60:.1f} min (load {entry['load_before']:.1f})"
                if entry
                else "not measured"
            )
        lines.append(f"| [{title}]({md_path.name}) | {cols[0]} | {cols[1]} |")
    path = out_dir / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------------- figures
def variance_figure(out_dir: Path) -> Path:
    """The stored Var-vs-L measurement as a PNG (the same figure notebook 01 draws)."""
    import torch

    from lab.dashboard.noise import variance_fit_figure
    from lab.probes import variance_length_fit

    measured = json.loads(STORED_VARIANCE.read_text(encoding="utf-8"))
    rows = measured["rows"]
    L = torch.tensor(rows["length"], dtype=torch.float64)
    t = torch.tensor([float("nan") if v is None else v for v in rows["grad_variance"]], dtype=torch.float64)
    fit = variance_length_fit(L, t)
    lo, hi = measured["exponent_ci"]
    fig = variance_fit_figure(
        rows["length"], rows["grad_variance"], slope=measured["slope"], intercept=measured["intercept"],
        exponent=measured["exponent"], scale=fit["power_law_scale"], labels=rows["kind"],
        title=f"SmolLM2-135M, {measured['n']} completions / {measured['n_prompts']} prompts: Var(s_i) against L_i, "
        f"k = {measured['exponent']:.2f} [{lo:.2f}, {hi:.2f}]",
    )  # fmt: skip
    path = out_dir / "variance_vs_length.png"
    fig.write_image(path, width=1000, height=520)
    return path


def comparison_figure(stored: Path, out_path: Path, what: str) -> Path | None:
    """The reward curves of a stored comparison (mean over seeds, 95% band), drawn by the dashboard's own
    ``reward_figure`` from run dirs rebuilt out of the stored per-step curves (``benchmarks/fast_compare.py``)."""
    from lab.dashboard.data import RunStore, group_by_label
    from lab.dashboard.overview import reward_figure
    from lab.runlog import RunWriter

    if not stored.exists():
        print(f"skipped {out_path.name}: {stored.relative_to(ROOT)} is missing", flush=True)
        return None
    summary = json.loads(stored.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="lab-docs-cmp-") as tmp:
        dirs = []
        for run in summary["runs"]:
            writer = RunWriter(Path(tmp) / run["run"])
            writer.write_config({"label": run["label"], "seed": run["seed"], "aggregator": run["label"]})
            for step, reward in run["curves"]["reward"]:
                writer.log_metrics({"step": step, "reward": reward})
            writer.set_status("finished", run["steps"], run["steps"])
            dirs.append((".", writer.dir))
        groups = group_by_label(RunStore().load(dirs))
        fig = reward_figure(groups, window=5)
    seeds = summary["verdict"]["seeds"] if summary.get("verdict") else "?"
    fig.update_layout(
        title=f"The main job ({what}): reward per step, mean over {seeds} seeds with a 95% band "
        f"(5-step moving average); {summary['wall_seconds'] / 60:.1f} min on {summary['cpus']} cores"
    )
    fig.write_image(out_path, width=1000, height=480)
    return out_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dashboard_screenshots(out_dir: Path, runs_dir: Path | None, browser: str) -> list[Path]:
    """Screenshots of the Streamlit dashboard, served on localhost only while they are taken."""
    from playwright.sync_api import sync_playwright

    empty = Path(tempfile.mkdtemp(prefix="lab-docs-runs-"))
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
           "--", "--runs-dir", str((runs_dir or empty).resolve())]  # fmt: skip
    tabs = {"Estimator playground": 3} | (
        {"Overview": 1, "Gradient noise": 1} if runs_dir is not None else {}
    )
    url, shots = f"http://127.0.0.1:{port}", []
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 60
            while True:
                try:
                    urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read()
                    break
                except OSError as err:
                    if time.time() > deadline or proc.poll() is not None:
                        log.seek(0)
                        output = log.read().decode(errors="replace")
                        raise RuntimeError(f"streamlit did not start:\n{output}") from err
                    time.sleep(0.3)
            with sync_playwright() as pw:
                chromium = pw.chromium.launch(executable_path=browser, args=CHROMIUM_ARGS)
                try:
                    page = chromium.new_page(viewport={"width": 1400, "height": 1200})
                    page.goto(url, timeout=60_000)
                    for tab, n_charts in tabs.items():
                        page.get_by_role("tab", name=tab).click()
                        page.wait_for_function(
                            "n => Array.from(document.querySelectorAll('[data-testid=stMain] .js-plotly-plot'))"
                            "  .filter(e => e.offsetParent !== null && e.querySelector('g.trace')).length >= n",
                            arg=n_charts, timeout=60_000,
                        )  # fmt: skip
                        page.wait_for_timeout(1000)
                        path = out_dir / f"dashboard_{tab.lower().replace(' ', '_')}.png"
                        page.screenshot(path=str(path), full_page=True)
                        shots.append(path)
                finally:
                    chromium.close()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            shutil.rmtree(empty, ignore_errors=True)
    return shots


def render_figures(args: argparse.Namespace, browser: str) -> None:
    out_dir = args.out / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    comparisons = [
        comparison_figure(stored, out_dir / name, what) for stored, name, what in STORED_COMPARISONS
    ]
    paths = [variance_figure(out_dir), *comparisons, *dashboard_screenshots(out_dir, args.runs_dir, browser)]
    for path in paths:
        if path is not None:
            print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    browser = check_requirements(args)
    start_kaleido(browser)
    if not args.no_notebooks:
        render_notebooks(args)
    if args.reuse_executed:
        return
    if not args.no_figures:
        render_figures(args, browser)


if __name__ == "__main__":
    main()
