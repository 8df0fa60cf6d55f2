"""tools/demo.py on a shipped Pathfinder checkpoint: Detectron2's --opts convention and the files it writes."""
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from rfpn.data.pathfinder_generator import PRESETS, render_sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("rfpn_demo_tool", os.path.join(REPO, "tools", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_draws_the_timecourse_of_each_image(demo, tmp_path):
    settings = PRESETS["cpu"].resolved()
    inputs = []
    for i in range(2):
        path = tmp_path / f"stimulus{i}.png"
        Image.fromarray(np.asarray(render_sample(settings, i).image, dtype=np.uint8)).save(path)
        inputs.append(str(path))
    config = os.path.join(REPO, "configs", "Pathfinder", "cpu", "pfcpu9_hgru_jfb.yaml")
    written = demo.main(["--config-file", config, "--input", *inputs, "--output", str(tmp_path / "out"), "--opts",
                         "MODEL.WEIGHTS", "rfpn://Pathfinder/cpu/pfcpu9_hgru_jfb.pth", "MODEL.RECURRENT.TEST_STEPS", "3"])
    assert sorted(os.path.basename(f) for f in written) == ["stimulus0_timecourse.png", "stimulus1_timecourse.png"]
    assert all(open(f, "rb").read(4) == b"\x89PNG" for f in written)
