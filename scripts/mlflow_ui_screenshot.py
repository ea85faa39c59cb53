"""Screenshot the MLflow UI's runs table with each pipeline execution's parent run expanded, and a stage run's
page (overview and metrics tabs) (a manual check).

Needs what the project does not install: playwright (``pip install playwright``) and a Chromium binary (e.g.
Debian's ``apt-get install chromium``). Start the UI first, then:

    mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db --port 5000 &
    python scripts/mlflow_ui_screenshot.py --url http://127.0.0.1:5000 --out mlflow_ui.png --run rlhf

Prints the run names the page shows (parent runs first, their stage runs under them once expanded). With
``--run PREFIX`` also ``<out>-run.png`` (the newest run whose name starts with PREFIX: its overview) and
``<out>-metrics.png`` (its metrics tab), and prints what the overview says.

Raises:
    SystemExit: when the experiment is not in the store or the page shows no runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request


def experiment_id(url: str, name: str) -> str:
    req = urllib.request.Request(f"{url}/ajax-api/2.0/mlflow/experiments/search", json.dumps({"max_results": 1000})
                                 .encode(), {"Content-Type": "application/json"})
    exps = json.loads(urllib.request.urlopen(req, timeout=30).read()).get("experiments", [])
    for e in exps:
        if e["name"] == name:
            return e["experiment_id"]
    sys.exit(f"mlflow_ui_screenshot: no experiment {name!r} at {url} (have: {', '.join(e['name'] for e in exps)})")


def newest_run(url: str, exp: str, prefix: str) -> str:
    body = {"experiment_ids": [exp], "filter": f"attributes.run_name LIKE '{prefix}%'", "max_results": 1,
            "order_by": ["attributes.start_time DESC"]}
    req = urllib.request.Request(f"{url}/ajax-api/2.0/mlflow/runs/search", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    runs = json.loads(urllib.request.urlopen(req, timeout=30).read()).get("runs", [])
    if not runs:
        sys.exit(f"mlflow_ui_screenshot: no run named {prefix}... in experiment {exp}")
    return runs[0]["info"]["run_id"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:5000")
    parser.add_argument("--experiment", default="llmstages")
    parser.add_argument("--out", default="mlflow_ui.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="browser binary (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1500, help="browser window width in pixels (default: %(default)s; "
                        "wider shows more of the runs table's metric and param columns)")
    parser.add_argument("--run", help="also the page of the newest run whose name starts with this (e.g. rlhf)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    exp = experiment_id(args.url, args.experiment)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": 800})
        page.goto(f"{args.url}/#/experiments/{exp}/runs", wait_until="load", timeout=120_000)
        parents = page.locator("text=/^pipeline-/")
        try:
            parents.first.wait_for(timeout=120_000)
        except Exception:  # noqa: BLE001  (playwright's TimeoutError)
            sys.exit("mlflow_ui_screenshot: the runs table shows no pipeline-<id> parent run")
        page.wait_for_timeout(2000)
        for i in range(parents.count()):  # the expand toggle sits in the same cell as the parent's name
            cell = parents.nth(i).locator("xpath=ancestor::div[@role='gridcell'][1]")
            cell.locator("button, [role=button], svg").first.click()
            page.wait_for_timeout(1500)
        page.screenshot(path=args.out)
        body = page.inner_text("body")
        print(body[body.find("Run Name"):][:1500])
        if args.run:
            run = newest_run(args.url, exp, args.run)
            stem = args.out.removesuffix(".png")
            for tab, suffix in (("", "run"), ("/model-metrics", "metrics")):
                page.set_viewport_size({"width": args.width, "height": 1400})
                page.goto(f"{args.url}/#/experiments/{exp}/runs/{run}{tab}", wait_until="load", timeout=120_000)
                page.wait_for_timeout(6000)
                page.screenshot(path=f"{stem}-{suffix}.png")
                print(f"--- {suffix} page ---\n" + page.inner_text("body")[:2500])
        browser.close()
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
