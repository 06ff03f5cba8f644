"""looplm.train.kv_plot: points read exactly from kv_eval results, panels for the shared files, clear errors."""

import json
import random

import pytest

from looplm.train.kv_plot import Point, load_points, main, parse_pair, plot


def _result(rng: random.Random, T: int = 4) -> dict:
    return {"per_loop_ce": [rng.uniform(3, 7) for _ in range(T)], "last_minus_per_loop": rng.uniform(-0.01, 0.5),
            "mean_minus_per_loop": rng.uniform(-0.01, 0.5), "last_agree": rng.random()}


def _write(path, results: dict) -> dict:
    path.write_text(json.dumps({"checkpoint": "x", "results": results}))
    return results


def test_points_are_the_results(tmp_path):
    rng = random.Random(random.random())  # from the seeded stream: replayable
    res = _write(tmp_path / "a.json", {"val.bin": _result(rng), "ood.bin": _result(rng, T=3)})
    pts = load_points(tmp_path / "a.json")
    assert set(pts) == {"val.bin", "ood.bin"}
    for text, r in res.items():
        ce = r["per_loop_ce"]
        assert pts[text] == Point(ce[0] - ce[-1], r["last_minus_per_loop"], r["mean_minus_per_loop"])


def test_plot_has_a_panel_per_shared_file(tmp_path):
    rng = random.Random(random.random())  # from the seeded stream: replayable
    _write(tmp_path / "a.json", {"val.bin": _result(rng), "ood.bin": _result(rng), "only_a.bin": _result(rng)})
    _write(tmp_path / "b.json", {"ood.bin": _result(rng), "val.bin": _result(rng)})
    runs = [("a", load_points(tmp_path / "a.json")), ("b", load_points(tmp_path / "b.json"))]
    out = tmp_path / "sub" / "fig.png"
    assert plot(runs, out) == ["val.bin", "ood.bin"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli(tmp_path, capsys):
    rng = random.Random(random.random())  # from the seeded stream: replayable
    _write(tmp_path / "a.json", {"val.bin": _result(rng)})
    out = tmp_path / "fig.png"
    main(["--run", f"model v1={tmp_path / 'a.json'}", "--out", str(out), "--title", "val.bin=in domain"])
    assert out.is_file() and "1 runs on val.bin" in capsys.readouterr().out


def test_errors_name_the_problem(tmp_path):
    rng = random.Random(random.random())  # from the seeded stream: replayable
    r = _result(rng)
    del r["mean_minus_per_loop"]
    _write(tmp_path / "bad.json", {"val.bin": r})
    with pytest.raises(ValueError, match=r"bad\.json.*val\.bin.*mean_minus_per_loop"):
        load_points(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"junk\.json: not a kv_eval"):
        load_points(tmp_path / "junk.json")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_points(tmp_path / "nothing.json")
    with pytest.raises(ValueError, match="--run 'a.json': expected LABEL=kv_eval.json"):
        parse_pair("a.json")
    _write(tmp_path / "a.json", {"val.bin": _result(rng)})
    _write(tmp_path / "b.json", {"ood.bin": _result(rng)})
    with pytest.raises(ValueError, match="share no token file"):
        plot([("a", load_points(tmp_path / "a.json")), ("b", load_points(tmp_path / "b.json"))], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
