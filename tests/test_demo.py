"""`ditfast demo` with the bundled digits model, and the small image utilities it uses."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import torch

from ditfast.data.classifier import DigitClassifier
from ditfast.demo import BUNDLED_MODEL, BUNDLED_RECIPE, load_bundled_model
from ditfast.imageio import make_grid, read_png, save_png

DOCUMENTED_MIN_ACCURACY = 0.90  # the README's claim for the bundled model's samples


def test_bundled_model_and_recipe_ship_with_the_package():
    import os

    assert os.path.getsize(BUNDLED_MODEL) <= 10 * 2**20
    with open(BUNDLED_RECIPE) as f:
        recipe = json.load(f)
    for key in ("command", "steps", "wall_time_s", "device", "final_loss", "description"):
        assert key in recipe, key
    model = load_bundled_model()
    assert model.num_classes == 10 and model.in_channels == 1


def test_classifier_recognises_real_digits():
    assert DigitClassifier(16).accuracy > 0.9


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "grid.png"
    res = subprocess.run([sys.executable, "-m", "ditfast", "demo", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert re.search(r"reference path .*: [\d.]+ images/s", text), text
    if torch.cuda.is_available():  # two different paths ran: both timed, and compared
        assert re.search(r"fast path .*: [\d.]+ images/s", text) and "speed-up" in text, text
    else:  # one path ran: timed once, nothing compared, and the reason said
        assert len(re.findall(r"images/s", text)) == 1 and "speed-up" not in text and "needs CUDA" in text, text
    assert "50/50" in res.stderr, f"no progress bar over the 50 DDIM steps while sampling: {res.stderr[-500:]}"
    accuracy = float(re.search(r"recognises the requested digit in ([\d.]+)%", text).group(1)) / 100
    assert accuracy >= DOCUMENTED_MIN_ACCURACY, text
    grid = read_png(str(out))
    assert grid.shape == (10 * (16 * 4 + 2) + 2, 10 * (16 * 4 + 2) + 2, 1)


def test_png_round_trip_and_grid(tmp_path):
    images = torch.randint(0, 256, (5, 3, 4, 3), dtype=torch.uint8)
    grid = make_grid(images, nrow=2, pad=1)
    assert grid.shape == (3 * 4 + 1, 2 * 5 + 1, 3)
    assert torch.equal(grid[1:4, 1:5], images[0]) and torch.equal(grid[5:8, 6:10], images[3])
    save_png(str(tmp_path / "g.png"), grid)
    assert torch.equal(read_png(str(tmp_path / "g.png")), grid)
