"""`lcmserve bench adapters` end to end on a tiny preset (one round): the report's rows and the same-work check."""

import json

import pytest
import torch

from lcmserve.cli import main
from lcmserve.engine.adapters import AdapterSet
from lcmserve.engine.bench_adapters import SAME_TOL, WAYS, AdapterBenchConfig, fused_copy, make_adapter
from lcmserve.engine.request import Row
from lcmserve.engine.sampler import LCMSampler
from lcmserve.errors import InvalidInputError
from lcmserve.models import load_model


def test_bench_adapters_cli_writes_report(tmp_path, capsys):
    code = main(["bench", "adapters", "--model", "preset:tiny-sd", "--iters", "1", "--steps", "1", "--rank", "4",
                 "--out", str(tmp_path), "--name", "ad"])
    assert code == 0
    result = json.loads((tmp_path / "ad.json").read_text())
    assert [r["way"] for r in result["rows"]] == list(WAYS)
    assert {r["way"]: r["batches"] for r in result["rows"]} == {"mixed": 1, "fused": 1, "separate": 4}
    assert all(r["rows"] == 8 and r["p50_ms"] > 0 and r["images_per_s_p50"] > 0 for r in result["rows"])
    assert set(result["ratios"]) == {"mixed_vs_fused", "mixed_vs_separate"}
    assert all(0 <= value <= SAME_TOL for value in result["max_abs_diff"].values())
    assert (tmp_path / "ad.png").stat().st_size > 0
    assert "mixed / separate" in capsys.readouterr().out


def test_fused_copy_equals_mixed_rows_and_leaves_base(tmp_path):
    """The fused copy and a mixed batch give the same images; the base UNet is untouched by fusing."""
    model = load_model("preset:tiny-sd", device="cpu", dtype="float32")
    adapters = AdapterSet(model)
    loaded = [adapters.load(name, str(make_adapter(model.unet, tmp_path / name, rank=4, seed=s)))
              for s, name in enumerate(("a", "b"))]
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    fused = LCMSampler(fused_copy(model, loaded[0]))
    mixed = LCMSampler(model, adapters=adapters)
    rows = [Row("a red circle", 1, 1.0, adapters={"a": 1.0}), Row("a blue square", 2, 1.0, adapters={"b": 1.0})]
    batch = mixed.run_rows(rows, 1, 64, 64).images
    alone = fused.run_rows([Row("a red circle", 1, 1.0)], 1, 64, 64).images
    assert (batch[:1] - alone).abs().max() <= SAME_TOL
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())


def test_bench_adapters_config_checks():
    with pytest.raises(InvalidInputError, match="adapters"):
        AdapterBenchConfig(adapters=5)
