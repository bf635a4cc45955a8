"""Screenshots of the web page's three steps for docs/web-page.md, on the bundled toy model.

Starts ``lowmcgm ui`` in this process, drives it in headless Chromium (the tests' browser
helpers: tests/ui_browser.py) through the demo's photo: paints the dog and the cat, trains with
the ``toy-cpu`` preset (about 3 minutes on 2 idle cores), picks two poses from the library and
samples; writes docs/ui/1-subjects.png, 2-train.png and 3-sample.png.

    python tools/ui_screenshots.py [--out docs/ui] [--root runs/ui-screenshots]
    python tools/ui_screenshots.py --root runs/ui-screenshots --sample-only   # the third shot again
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ui_browser import (CHROMIUM_ARGS, chromium_path, free_port, paint_mask, set_textbox,  # noqa: E402
                        upload, wait_for_text)

from lowmcgm.data import load_mask  # noqa: E402
from lowmcgm.toy.demo import write_demo_inputs  # noqa: E402
from lowmcgm.ui.app import launch  # noqa: E402

PHOTO_PX = 128
VIEWPORT = {"width": 1300, "height": 1000}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "ui")
    p.add_argument("--root", type=Path, default=None, help="the page's run folder root (default: a temporary one)")
    p.add_argument("--timeout-min", type=float, default=40, help="give up on training after this long")
    p.add_argument("--sample-only", action="store_true",
                   help="only the third shot, from the run 'dog-and-cat' an earlier call trained under --root")
    args = p.parse_args(argv)
    if args.sample_only and not (args.root and (args.root / "dog-and-cat" / "lowmcgm.safetensors").is_file()):
        p.error("--sample-only needs --root holding the run 'dog-and-cat' trained by an earlier call")
    from playwright.sync_api import sync_playwright

    root = args.root or Path(tempfile.mkdtemp(prefix="lowmcgm-ui-"))
    inputs = write_demo_inputs(Path(tempfile.mkdtemp(prefix="lowmcgm-ui-inputs-")), PHOTO_PX)
    port = free_port()
    page_app = launch(root, port=port, base_models=("toy",), preset="toy-cpu", block=False)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            # Not "networkidle": the page's per-tab state keeps gradio's heartbeat connection open.
            page.goto(f"http://127.0.0.1:{port}", wait_until="load", timeout=60_000)
            page.locator("#photo").wait_for(timeout=60_000)
            if not args.sample_only:
                shoot_subjects_and_training(page, inputs, args)
            page.get_by_role("tab", name="3 · Pose and sample").click()
            page.locator("#refresh-runs").click()
            page.locator("#runs input").click()
            page.get_by_role("option", name="dog-and-cat").click()
            wait_for_text(page, "sample-message", "handles", 60)
            for i, pose in enumerate(("dog sitting", "cat jumping")):
                page.locator(f"#pose-pick{i} input").click()
                page.get_by_role("option", name=pose, exact=True).click()
                # The pick fills the canvas through a server round trip: sampling before it returns
                # would draw without the pose (it did once: the shot showed unposed images).
                page.wait_for_timeout(3000)
            set_textbox(page, "prompt", "a photo of <asset0> and <asset1> on the beach")
            set_textbox(page, "num-images", "4")
            set_textbox(page, "steps", "30")
            page.locator("#sample").click()
            wait_for_text(page, "sample-message", "image\\(s\\) in|error", 600)
            page.locator("#gallery img").first.wait_for(timeout=60_000)
            page.wait_for_timeout(2000)
            page.screenshot(path=str(args.out / "3-sample.png"), full_page=True)
            browser.close()
    finally:
        page_app.lowmcgm_state.jobs.stop()
        page_app.close()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"Screenshots written to {args.out}")


def shoot_subjects_and_training(page, inputs, args: argparse.Namespace) -> None:
    """Tabs 1 and 2: paint the dog and the cat, train the run 'dog-and-cat' to its end."""
    upload(page, "photo", inputs.photo)
    wait_for_text(page, "photo-message", "px", 60)
    for i, (mask, word) in enumerate(zip(inputs.masks, ("dog", "cat"))):
        set_textbox(page, f"word{i}", word)
        paint_mask(page, f"editor{i}", load_mask(mask) > 0.5)
    page.locator("#show-masks").click()
    page.locator("#mask-overlay img").wait_for(timeout=60_000)
    page.screenshot(path=str(args.out / "1-subjects.png"), full_page=True)

    page.get_by_role("tab", name="2 · Train").click()
    set_textbox(page, "run-name", "dog-and-cat")
    page.locator("#start").click()
    wait_for_text(page, "train-status", "Phase 2", args.timeout_min * 60)
    page.locator("#preview img").wait_for(timeout=120_000)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(args.out / "2-train.png"), full_page=True)
    wait_for_text(page, "train-status", "finished|failed", args.timeout_min * 60)


if __name__ == "__main__":
    main()
