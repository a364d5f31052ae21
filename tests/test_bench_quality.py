"""bench/quality.py: every benchmarked method resolves to a valid config, and the remedy
methods differ from the plain GAN in exactly the key they name."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
from conftest import ROOT

from translate import config


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


Q = _bench()


def _load(method: str, toy: str) -> config.RunConfig:
    pattern, sets = Q.METHODS[method]
    return config.load(ROOT / "recipes" / pattern.format(toy=toy), list(sets))


@pytest.mark.parametrize("method", sorted(Q.METHODS))
@pytest.mark.parametrize("toy", Q.TOYS)
def test_every_method_loads_on_both_mixtures(method, toy):
    cfg = _load(method, toy)
    assert cfg.data.kind == "toy" and cfg.data.toy == toy and cfg.model.net == "mlp"


@pytest.mark.parametrize("method,key,value", [
    ("gan_pack", "pack", 2), ("gan_mbstd", "minibatch_std", 4), ("gan_unrolled", "unrolled_steps", 5)])
def test_remedies_are_the_plain_gan_plus_one_key(method, key, value):
    for toy in Q.TOYS:
        plain, remedy = _load("gan", toy), _load(method, toy)
        assert getattr(remedy.model, key) == value != getattr(plain.model, key)
        assert dataclasses.replace(remedy.model, **{key: getattr(plain.model, key)}) == plain.model
        assert remedy.train == plain.train and remedy.data == plain.data


def test_cpu_and_wall_time_are_reported(capsys, tmp_path):
    argv = ["--toy", "--seeds", "1", "--steps", "2", "--method", "pacgan", "--set",
            "model.hidden=8", "--set", "train.batch_size=8", "--runs", str(tmp_path), "--json"]
    assert Q.main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["method"] == "pacgan" and r["steps"] == 2
    for toy in Q.TOYS:
        # One thread: the CPU time cannot exceed the wall-clock time (both rounded to 0.1 s).
        assert 0 <= r[f"{toy}_cpu_seconds"] <= r[f"{toy}_seconds"] + 0.2
    assert {run["toy"] for run in r["runs"]} == set(Q.TOYS)


def test_the_default_method_is_the_one_that_meets_the_targets():
    assert Q.parse(["--toy"]).method == "pacgan"
    assert Q.parse(["--toy", "--method", "all"]).method == "all"
    with pytest.raises(SystemExit):
        Q.parse(["--toy", "--jobs", "0"])


def test_markdown_table_has_mean_and_stderr_per_cell():
    runs = [{"toy": "ring", "modes": 8, "hq": 0.99, "rkl": 0.002, "seconds": 9, "cpu_seconds": 5},
            {"toy": "ring", "modes": 7, "hq": 0.97, "rkl": 0.004, "seconds": 9, "cpu_seconds": 7}]
    table = Q.markdown([{"method": "pacgan", "seeds": 2, **Q.summarize(runs)}]).splitlines()
    assert len(table) == 3 and table[2].startswith("| pacgan | 2 | 7.5 ± 0.5 | 98.0% ± 1.0% |")
    assert "0.003 ± 0.001" in table[2] and table[2].endswith("| 6 / nan |")
