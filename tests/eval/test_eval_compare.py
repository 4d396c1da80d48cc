"""`lcmserve eval-compare`: several eval results in one table and plot."""

import json

import pytest

from lcmserve.cli import main
from lcmserve.errors import InvalidInputError
from lcmserve.eval.compare import compare, merge


def _row(sampler, steps, fid, clip=50.0, acc=0.5):
    return {"sampler": sampler, "steps": steps, "fid": fid, "clip_score": clip, "accuracy": acc, "shape": acc,
            "colour": acc, "size": acc, "layout": acc, "background": 1.0, "s_per_image": 0.01}


def _result(folder, model, rows, n=100, guidance=8.0):
    folder.mkdir(parents=True)
    floor = _row("real renders", 0, 1.0 + 100 / n, 93.0, 1.0)
    data = {"config": {"model": model, "guidance": guidance, "num_images": n}, "machine": {"device": "cpu"},
            "rows": [floor, *rows]}
    (folder / "eval.json").write_text(json.dumps(data))
    return folder


def test_steps_plot_merges_runs_with_labels_and_one_floor_per_n(tmp_path):
    teacher = _result(tmp_path / "t", "/x/shapes-teacher", [_row("ddim", s, 100 / s) for s in (1, 2, 4, 50)])
    lcm = _result(tmp_path / "l", "/x/shapes-lcm", [_row("lcm", s, 12 + s) for s in (1, 2, 4)])
    other_n = _result(tmp_path / "o", "/x/other", [_row("lcm", 4, 20.0)], n=500)
    result = compare([f"{teacher}=teacher", str(lcm / "eval.json"), str(other_n)], tmp_path / "out", "cmp",
                     steps=[1, 4, 50])
    labels = [(r["label"], r["sampler"], r["steps"]) for r in result["rows"]]
    assert ("teacher", "ddim", 2) not in labels and ("teacher", "ddim", 50) in labels
    assert ("shapes-lcm", "lcm", 4) in labels  # unlabelled runs take the model folder's name
    table = (tmp_path / "out" / "cmp.md").read_text()
    assert table.count("real renders (floor)") == 2  # N=100 and N=500
    assert "| teacher | heldout | ddim | 50 | 8 | 100 | 2.0 |" in table
    assert (tmp_path / "out" / "cmp.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "cmp.json").read_text())["x"] == "steps"


def test_label_plot_of_an_ablation(tmp_path, capsys):
    runs = [_result(tmp_path / f"k{k}", f"/r/lcd-k{k}", [_row("lcm", s, 10 + k / s) for s in (1, 4)]) for k in (1, 20)]
    code = main(["eval-compare", f"{runs[0]}=k=1", f"{runs[1]}=k=20", "--x", "label", "-o", str(tmp_path / "a"),
                 "--name", "k"])
    assert code == 0 and "| k=20 | heldout | lcm | 4 |" in capsys.readouterr().out
    assert (tmp_path / "a" / "k.png").is_file()


def test_bad_inputs_name_the_parameter(tmp_path, capsys):
    with pytest.raises(InvalidInputError, match="files") as info:
        merge([str(tmp_path / "missing")])
    assert info.value.param == "files"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="not an lcmserve eval result"):
        merge([str(tmp_path / "bad.json")])
    with pytest.raises(InvalidInputError):
        merge([])
    assert main(["eval-compare", str(tmp_path / "bad.json"), "-o", str(tmp_path / "x")]) == 2
    assert "files" in capsys.readouterr().err


def test_sampler_filter_keeps_the_floor_and_rejects_unknown_names(tmp_path, capsys):
    rows = [_row(s, n, 10.0) for s in ("ddim", "dpmsolver++") for n in (4, 25)]
    run = _result(tmp_path / "t", "/x/shapes-teacher", rows)
    rows = merge([str(run)], steps=[25], samplers=["ddim"])
    assert [(r["sampler"], r["steps"]) for r in rows] == [("real renders", 0), ("ddim", 25)]
    with pytest.raises(InvalidInputError, match="sampler") as info:
        merge([str(run)], samplers=["euler"])
    assert info.value.param == "sampler" and "dpmsolver++" in str(info.value)
    assert main(["eval-compare", str(run), "--sampler", "ddim", "-o", str(tmp_path / "c")]) == 0
    assert "| dpmsolver++ |" not in capsys.readouterr().out
