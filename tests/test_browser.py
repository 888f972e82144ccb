"""The workbench in a real browser: JupyterLab and headless Chromium driven by Playwright.

``test_tree_explorer_notebook`` starts JupyterLab on 127.0.0.1 (a free port, token auth, a
temporary root holding a copy of ``notebooks/02_tree_explorer.ipynb``), runs every cell from the
Run menu, waits until the explorer's plotly figure has as many nodes as the notebook says the
tree has, clicks a node's marker with the mouse and checks the panel shows that node, and
saves a screenshot. ``test_dashboard_screenshots`` draws each dashboard from a real engine
workload into a standalone HTML page and screenshots it in the same browser.

Screenshots go to ``data/screens/`` (``DENDRITE_SCREENS_DIR`` overrides). Needs Debian's
``chromium`` (``apt-get install -y chromium``) and ``pip install playwright``; skipped when
either is missing (no ``playwright install``: the system Chromium is used).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENS = Path(os.environ.get("DENDRITE_SCREENS_DIR", ROOT / "data" / "screens"))
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
VIEWPORT = {"width": 1280, "height": 800}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="apt-get install -y chromium"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A JupyterLab server over a temporary root; yields (base url, token)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "notebooks" / "02_tree_explorer.ipynb", root)
    config = tmp_path_factory.mktemp("jupyter-config")
    (config / "labconfig").mkdir()
    (config / "labconfig" / "page_config.json").write_text(  # no news pop-up over the page
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    port, token = _free_port(), os.urandom(16).hex()
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTERLAB_SETTINGS_DIR": str(config / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(config / "workspaces"),
        "JUPYTER_RUNTIME_DIR": str(config / "runtime"),
    }
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.open_browser=False",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
    ]  # fmt: skip
    log = (root.parent / "jupyterlab.log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start; see {log.name}")
            time.sleep(0.5)
        yield url, token
    finally:
        proc.send_signal(signal.SIGINT)  # the server shuts its kernels down on SIGINT/SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the server's own process group
            proc.wait()
        log.close()


# The notebook's kernel is started and idle (Run All before that runs nothing).
KERNEL_IDLE_JS = """() => [...document.querySelectorAll('.jp-StatusBar-Item')]
  .some(e => /Python.*\\| Idle/.test(e.textContent))"""

NODES_JS = """() => {
  const gd = document.querySelector('.dendrite-explorer .js-plotly-plot');
  const t = gd && gd.data && gd.data.find(t => t.name === 'nodes');
  return t ? t.x.length : -1;
}"""

# The node marker farthest from any other (so a click at its centre can only mean it).
PICK_JS = """() => {
  const gd = document.querySelector('.dendrite-explorer .js-plotly-plot');
  const idx = gd.data.findIndex(t => t.name === 'nodes');
  const paths = [...gd.querySelectorAll('.scatterlayer .trace')][idx].querySelectorAll('.points path');
  const c = [...paths].map(p => { const b = p.getBoundingClientRect();
                                  return [b.x + b.width / 2, b.y + b.height / 2]; });
  let best = 0, far = -1;
  c.forEach((p, i) => {
    const d = Math.min(...c.filter((_, j) => j !== i).map(q => Math.hypot(p[0] - q[0], p[1] - q[1])));
    if (i > 0 && d > far) { far = d; best = i; }
  });
  const t = gd.data[idx];
  return {i: best, x: c[best][0], y: c[best][1], id: t.customdata[best], hover: t.hovertext[best],
          points: paths.length};
}"""


def test_tree_explorer_notebook(browser: Any, lab: tuple[str, str]) -> None:
    url, token = lab
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(60_000)
    page.goto(f"{url}/lab/tree/02_tree_explorer.ipynb?token={token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell")
    page.wait_for_function(KERNEL_IDLE_JS, timeout=120_000)
    page.click(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")  # fold the file browser
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

    out = page.wait_for_function(
        """() => { for (const e of document.querySelectorAll('.jp-OutputArea-output')) {
                     const m = /tree size: (\\d+) nodes/.exec(e.textContent);
                     if (m) return Number(m[1]); }
                   return 0; }""",
        timeout=240_000,
    )
    size = int(out.json_value())
    assert size > 1
    page.wait_for_function(f"() => ({NODES_JS})() === {size}", timeout=60_000)
    assert page.evaluate(NODES_JS) == size  # every node of the tree is drawn
    assert page.evaluate("document.querySelectorAll('.js-plotly-plot').length") >= 2

    page.evaluate("document.querySelector('.dendrite-explorer').scrollIntoView()")
    page.wait_for_timeout(500)
    pick = page.evaluate(PICK_JS)
    assert pick["points"] == size
    page.mouse.move(pick["x"], pick["y"])
    page.wait_for_timeout(300)
    page.mouse.click(pick["x"], pick["y"])
    panel = page.wait_for_selector(f".dendrite-panel .dendrite-node[data-node='{pick['id']}']")
    assert panel is not None
    step = re.sub(r"<br>\+\d+ hidden$", "", pick["hover"]).split("<br>", 1)[1]
    step = step.replace("⏎", "\n").strip()
    path_text = page.inner_text(".dendrite-panel .dendrite-path")
    assert step and step in path_text, (step, path_text)
    assert "tokens by log-prob" in page.inner_text(".dendrite-panel")

    page.mouse.move(5, VIEWPORT["height"] - 5)  # no hover label over the tree
    page.evaluate("document.querySelector('.dendrite-explorer').scrollIntoView()")
    page.wait_for_timeout(300)
    SCREENS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENS / "tree_explorer.png"))
    page.close()


def _dashboards() -> dict[str, Any]:
    """Each dashboard drawn from a real workload on the default model (a few seconds)."""
    import plotly.graph_objects as go
    import torch

    from dendrite.bench.fork import run as fork_run
    from dendrite.bench.widgets import synthetic_tree_json
    from dendrite.engine import Engine
    from dendrite.search.mcts import MCTSConfig, mcts
    from dendrite.search.tot import tot_bfs
    from dendrite.search.tree import SearchTree, StepConfig
    from dendrite.tasks import game24 as g24
    from dendrite.tasks.game24_eval import Game24Task, Game24Value
    from widgets import dashboards as D
    from widgets.explorer import TreeExplorer
    from widgets.frames import beam_pages_frame, refcount_frame, sharing_frame, tree_branches

    torch.set_num_threads(1)
    engine = Engine.from_pretrained(ROOT / "data" / "models" / "dendrite-24")
    puzzle, step = (1, 5, 5, 5), StepConfig(delimiter="\n", max_step_tokens=40)
    task = Game24Task(puzzle)
    figs: dict[str, Any] = {}
    with SearchTree(engine, g24.prompt(puzzle), step, seed=0) as tree:
        tot_bfs(tree, Game24Value(task), breadth=3, k=3, max_depth=5, verifier=task.verifier,
                classify=task.classify)  # fmt: skip
        figs["sharing_map"] = D.fig_sharing_map(sharing_frame(engine, tree_branches(tree)))
        figs["refcount_histogram"] = D.fig_refcount_histogram(refcount_frame(engine))
    figs["pool_occupancy"] = D.fig_pool_occupancy(
        engine.telemetry.pages_frame(), engine.pool.num_pages
    )
    with SearchTree(engine, g24.prompt((1, 2, 2, 6)), step, seed=0) as tree:
        t = Game24Task((1, 2, 2, 6))
        mcts(tree, MCTSConfig(simulations=24, children=3, max_depth=5), Game24Value(t),
             verifier=t.verifier, classify=t.classify)  # fmt: skip
        figs["mcts_iterations"] = D.fig_mcts_iterations(tree.snapshots_frame())
    beams = beam_pages_frame(engine, g24.prompt(puzzle), [2, 4, 8, 16], 96)
    figs["beam_pages"] = D.fig_beam_pages(beams)
    figs["fork_latency"] = D.fig_fork_latency(fork_run(forks=500))
    gpu = json.loads((ROOT / "data" / "benchmarks" / "h200-bench-gpu.json").read_text())
    figs["gpu_bench"] = D.fig_gpu_bench(gpu)
    cascade = json.loads((ROOT / "data" / "benchmarks" / "h200-bench-cascade.json").read_text())
    figs["cascade_crossover"] = D.fig_cascade_crossover(cascade)
    depth = json.loads((ROOT / "data" / "benchmarks" / "h200-bench-cascade-depth.json").read_text())
    figs["cascade_depth"] = D.fig_cascade_depth(depth)
    with SearchTree.from_json(synthetic_tree_json(5000), engine) as big:  # WebGL, collapsed
        figs["tree_explorer_5000"] = go.Figure(TreeExplorer(big).fig)
    return figs


def test_dashboard_screenshots(browser: Any, tmp_path: Path) -> None:
    figs = _dashboards()
    SCREENS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1000, "height": 560})
    for name, fig in figs.items():
        html = tmp_path / f"{name}.html"
        fig.write_html(html, include_plotlyjs="directory", full_html=True,
                       default_width="100%", default_height="100%")  # fmt: skip
        page.goto(html.as_uri())
        page.wait_for_selector(".js-plotly-plot .main-svg")
        drawn = page.evaluate("document.querySelector('.js-plotly-plot').data.length")
        assert drawn == len(fig.data), name
        title = page.evaluate("document.querySelector('.gtitle').textContent")
        assert title == fig.layout.title.text, name
        page.screenshot(path=str(SCREENS / f"{name}.png"))
    page.close()
