"""The training health monitor: each detector fires on a synthetic case made to have its problem
and stays silent on a good translation, the monitor turns a condition that holds for
train.health_patience checks in a row into one warning line, and real runs made to collapse
show the warning in their output and in log.jsonl.

The good translation is the demo data's exact answer: testB is the known colour mapping applied
to testA, so "G(testA) = testB" is what a perfectly trained generator outputs (a stand-in for a
trained one that costs no training, and is better trained than any we could afford here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_CYCLEGAN, run_cli, set_args

from translate import recipe as recipe_mod
from translate.data.demo import build_demo
from translate.eval import health
from translate.eval import monitor as health_monitor
from translate.eval.evaluate import load_folder
from translate.nets import build_net, init_weights


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, torch.Tensor]:
    """8 test images of A, their true translations, 8 other images of B (32x32)."""
    root = build_demo(tmp_path_factory.mktemp("health") / "demo32", size=32, n_train=16,
                      n_test=16)
    batch = {}
    for key, folder in (("a", "testA"), ("truth", "testB"), ("b", "trainB")):
        batch[key] = torch.cat(load_folder(root / folder, 3)[1][:8])
    return batch


def _untrained_resnet(x: torch.Tensor, upsample: str, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    G = build_net("resnet", in_channels=3, out_channels=3, ngf=16, n_blocks=3,
                  upsample=upsample)
    init_weights(G, 0.02)
    with torch.no_grad():
        return G.eval()(x)


# ---------------------------------------------------------------------------- detectors


def test_identity_collapse_fires_on_the_identity_not_on_the_translation(demo):
    a, truth, b = demo["a"], demo["truth"], demo["b"]
    bad = health.identity_collapse(a, a.clone(), b)
    assert bad.bad and bad.value == 0.0 and "mean |G(x) - x| = 0.000" in bad.detail
    nearly = health.identity_collapse(a, a + 0.01 * torch.randn_like(a), b)
    assert nearly.bad and nearly.value < 0.1
    # A blurred copy is still a copy (what a small net that learnt the identity draws).
    blurred = health.identity_collapse(a, F.avg_pool2d(a, 3, 1, 1, count_include_pad=False), b)
    assert blurred.bad
    good = health.identity_collapse(a, truth, b)
    assert not good.bad and good.value > 0.8  # it moves the colours the whole way to B
    # Domains that look alike give no verdict: there, doing nothing may be right.
    assert health.identity_collapse(a, a, a.flip(0)) is None


def test_colour_inversion_fires_on_inverted_outputs_not_on_the_translation(demo):
    truth, b = demo["truth"], demo["b"]
    bad = health.colour_inversion(-truth, b)
    assert bad.bad and bad.value > 0.5 and "closer to the target" in bad.detail
    good = health.colour_inversion(truth, b)
    assert not good.bad and good.value < -0.5
    assert not health.colour_inversion(demo["a"], b).bad  # untranslated is not inverted
    assert health.colour_inversion(torch.randn(5, 2), torch.randn(5, 2)) is None  # 2-D points


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_checkerboard_fires_on_a_transposed_conv_net_at_init_not_after_resize(demo, seed):
    a = demo["a"]
    transposed = health.checkerboard(_untrained_resnet(a, "transpose", seed), a)
    assert transposed.bad and transposed.value > 3  # > 8x the input's periodic energy
    # The remedy the warning names: the same net with nearest x2 + conv has no spike.
    assert not health.checkerboard(_untrained_resnet(a, "resize", seed), a).bad
    assert not health.checkerboard(demo["truth"], a).bad


def test_periodic_energy_sees_a_planted_checkerboard(demo):
    a = demo["a"]
    i, j = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    board = ((i + j) % 2 * 2 - 1).float()  # +-1 every other pixel: period 2
    assert health.checkerboard(a + 0.1 * board, a).bad
    assert abs(health.checkerboard(a, a).value) < 1e-9


def test_diversity_fires_on_a_constant_generator_not_on_the_translation(demo):
    a = demo["a"]
    constant = health.diversity(torch.full_like(a, 0.3), a)
    assert constant.bad and constant.value == 0.0
    good = health.diversity(demo["truth"], a)
    assert not good.bad and 0.8 < good.value < 1.2
    # Latent GANs: samples compared with real samples; 2-D toy points work alike.
    ring = torch.randn(200, 2)
    assert health.diversity(torch.zeros(200, 2) + 1.0, ring).bad
    assert not health.diversity(torch.randn(200, 2), ring).bad


def test_d_wins_fires_when_d_separates_everything_for_bounded_objectives():
    won = [{"D/real_a": 0.97, "D/fake_a": 0.03, "D/real_b": 0.6, "D/fake_b": 0.4}] * 3
    bad = health.d_wins(won, "lsgan")
    assert bad.bad and bad.value == pytest.approx(0.94) and "D_a(real)" in bad.detail
    even = [{"D/real": 0.55, "D/fake": 0.45}, {"D/real": 0.6, "D/fake": 0.35}]
    assert not health.d_wins(even, "nonsaturating").bad
    assert health.d_wins(won, "wasserstein") is None  # unbounded critic scores: no verdict
    assert health.d_wins([], "lsgan") is None


def test_loss_explosion_fires_on_a_jump_not_on_noise():
    history = [{"G/loss": v, "D/loss": 0.5} for v in (2.0, 1.8, 2.2, 1.9)]
    bad = health.loss_explosion([{"G/loss": 40.0, "D/loss": 0.5}], history)
    assert bad.bad and bad.value == pytest.approx(20.0) and "G/loss" in bad.detail
    noisy = [{"G/loss": 3.5, "D/loss": 0.9}, {"G/loss": 1.2, "D/loss": 0.2}]
    assert not health.loss_explosion(noisy, history).bad
    assert health.loss_explosion(noisy, history[:2]) is None  # too little history yet
    # A loss near 0 is measured against the floor, not against its own tiny level.
    tiny = [{"D/loss": 0.001}] * 4
    assert not health.loss_explosion([{"D/loss": 0.05}], tiny).bad


# ---------------------------------------------------------------------------- the monitor


def _monitor(demo, log: Path, patience: int = 3, interval: int = 100
             ) -> health_monitor.Monitor:
    return health_monitor.Monitor(log, {"G_ab": {"from": "A", "to": "B"}}, {"b": demo["b"]},
                                  "lsgan", patience, interval)


def _run(m: health_monitor.Monitor, log: Path, outputs: list, a: torch.Tensor, first: int = 1
         ) -> list[tuple[int, str]]:
    """Checks at steps 100, 200, ...: each writes its log record as the loop does."""
    lines = []
    for i, output in enumerate(outputs, start=first):
        record = {"step": i * 100, "G/loss": 1.0}
        m.observe(i * 100, record)
        values, warnings = m.check(i * 100, {"G_ab": (a, output)})
        with open(log, "a") as f:
            f.write(json.dumps({**record, **values, "warnings": warnings}) + "\n")
        lines += [(i * 100, w) for w in warnings]
    return lines


def test_monitor_warns_once_after_patience_checks_in_a_row_and_again_after_a_recovery(
        demo, tmp_path):
    a, truth = demo["a"], demo["truth"]
    log = tmp_path / "log.jsonl"
    lines = _run(_monitor(demo, log), log, [a, a, truth, a, a, a, a, truth, a, a, a], a)
    assert [step for step, _ in lines] == [600, 1100]  # once per episode, at its third check
    assert lines[0][1].startswith("health: identity collapse for 3 checks in a row (steps "
                                  "400-600): G_ab: mean |G(x) - x| = 0.000")
    assert "lower model.lambda_identity" in lines[0][1]
    healthy = tmp_path / "healthy.jsonl"
    assert _run(_monitor(demo, healthy, patience=1), healthy, [truth] * 4, a) == []


def test_a_resumed_monitor_rebuilds_its_streaks_from_the_log(demo, tmp_path):
    """A run stopped after two bad checks warns at the third after its resume, as the
    uninterrupted run does: the state is read back from log.jsonl."""
    a, truth = demo["a"], demo["truth"]
    straight, split = tmp_path / "straight.jsonl", tmp_path / "split.jsonl"
    outputs = [truth, a, a, a, a]
    expected = _run(_monitor(demo, straight), straight, outputs, a)
    assert _run(_monitor(demo, split), split, outputs[:3], a) == []
    assert _run(_monitor(demo, split), split, outputs[3:], a, first=4) == expected
    assert split.read_text() == straight.read_text()


def test_a_resume_reads_the_log_once(demo, tmp_path, monkeypatch):
    """The rebuild on a resume is one pass over log.jsonl (it once re-read the log for every
    record, recursively: a resume after 20 logged steps took 20 s, after 30 minutes)."""
    log = tmp_path / "log.jsonl"
    straight = _monitor(demo, tmp_path / "unused.jsonl")
    with open(log, "w") as f:
        for step in range(1, 13):
            record = {"step": step, "G/loss": float(step), "D/loss": 1.0 / step}
            straight.observe(step, record)
            f.write(json.dumps(record) + "\n")
    reads = []
    real = health_monitor.runlog.records
    monkeypatch.setattr(health_monitor.runlog, "records", lambda p: reads.append(p) or real(p))
    resumed = _monitor(demo, log)
    resumed.observe(13, {"step": 13, "G/loss": 13.0, "D/loss": 1 / 13})
    straight.observe(13, {"step": 13, "G/loss": 13.0, "D/loss": 1 / 13})
    assert len(reads) == 1
    assert list(resumed.records) == list(straight.records) and resumed.last_step == 13


def test_an_inf_loss_of_a_step_fp16_skipped_is_kept_neither_live_nor_on_a_resume(demo, tmp_path):
    """A step fp16's GradScaler skipped can log an inf loss (the string "inf" in log.jsonl, which
    a resume's rebuild passes over): the live monitor leaves it out too, so its windows match a
    resumed one's and one skipped step does not poison them."""
    log = tmp_path / "log.jsonl"
    live = _monitor(demo, tmp_path / "unused.jsonl")
    with open(log, "w") as f:
        for step in range(1, 5):
            values = {"G/loss": 1.0, "D/loss": float("inf") if step == 2 else 0.5}
            live.observe(step, values)
            f.write(json.dumps({"step": step, **{k: v if math.isfinite(v) else str(v)
                                                 for k, v in values.items()}}) + "\n")
    resumed = _monitor(demo, log)
    for m in (live, resumed):
        m.observe(5, {"G/loss": 1.0, "D/loss": 0.5})
    assert list(resumed.records) == list(live.records)
    assert [kept.get("D/loss") for _, kept in live.records] == [0.5, None, 0.5, 0.5, 0.5]


def test_monitor_reads_d_and_losses_from_the_log_records(demo, tmp_path):
    m = _monitor(demo, tmp_path / "log.jsonl", patience=2, interval=1)
    warnings = []
    for step in range(1, 7):
        m.observe(step, {"G/loss": 1.0, "D/loss": 0.01, "D/real_b": 0.99, "D/fake_b": 0.01,
                         "lr/G": 2e-4})
        warnings += m.check(step, {})[1]
    assert len(warnings) == 1 and warnings[0].startswith("health: D wins for 2 checks")
    assert "D_b(real) - D_b(fake) = 0.98" in warnings[0] and "TTUR" in warnings[0]


def test_health_keys_make_one_plot_panel_and_warnings_are_no_curve(tmp_path):
    from translate.explore.plot import group_keys, parse_log

    lines = [json.dumps({"step": 1, "G/loss": 1.0, "health/identity": 0.5}),
             json.dumps({"step": 2, "G/loss": 1.0, "health/identity": 0.1,
                         "warnings": ["health: identity collapse ..."]})]
    log = parse_log(lines)
    assert group_keys(list(log.series)) == {"G": ["G/loss"], "health": ["health/identity"]}
    assert log.skipped == 0


# ---------------------------------------------------------------------------- real runs


def _tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"",
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
def test_a_run_made_to_collapse_warns_in_its_output_and_log_and_doctor_reads_it(
        tiny_unpaired, tmp_path):
    """G's learning rate ~0 (G stays as initialised) against a fast D: D wins, the untrained
    generators' outputs look alike and carry the transposed convolutions' checkerboard."""
    run = tmp_path / "run"
    sets = ["data.load_size=16", "data.crop_size=16", "train.batch_size=2", "model.pool_size=4",
            "model.ngf=8", "model.ndf=8", "model.n_layers_d=1", "train.lr_g=1e-12",
            "train.lr_d=2e-3", 'train.lr_schedule="constant"',
            'model.norm="instance"']  # the untrained nets' outputs alike: InstanceNorm's doing
    proc = run_cli("train", "recipes/cyclegan_demo.toml", *set_args(sets),
                   "--data", str(tiny_unpaired), "--steps", "60", "--sample-every", "10",
                   "--log-every", "10", "--mixed-precision", "no", "--run-dir", str(run),
                   "--no-progress")
    printed = [line for line in proc.stderr.splitlines() if line.startswith("warning: health:")]
    logged = [(r["step"], w) for r in map(json.loads, (run / "log.jsonl").read_text()
                                          .splitlines()) for w in r.get("warnings", [])]
    assert printed == [f"warning: {w}" for _, w in logged]
    d_wins = [(s, w) for s, w in logged if w.startswith("health: D wins for 3 checks in a row")]
    assert len(d_wins) == 1 and "TTUR" in d_wins[0][1]
    assert any(w.startswith("health: mode collapse") for _, w in logged)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "health/d_wins" in r] == list(range(10, 61, 10))
    assert all(r["health/diversity"] < health.DIVERSITY_RATIO for r in records)

    # translate doctor reads it back, and leaves the run exactly as it was.
    before = _tree(run)
    out = run_cli("doctor", str(run)).stdout
    assert _tree(run) == before
    assert f"step {d_wins[0][0]}: {d_wins[0][1]}" in out
    assert "health timeline" in out and "eval/psnr: best" in out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["60"])
    assert row.count("!") >= 2  # D wins and mode collapse past their thresholds at step 60
    report = json.loads(run_cli("doctor", str(run), "--json").stdout)
    assert [w["line"] for w in report["warnings"]] == [w for _, w in logged]
    assert report["scores"]["eval/psnr"]["direction"] == "higher"
    assert _tree(run) == before


def test_health_can_be_switched_off_and_has_its_own_interval(tiny_unpaired, tmp_path):
    from translate.runner import train

    def logged(*sets: str) -> list[dict]:
        run = tmp_path / str(len(list(tmp_path.iterdir())))
        cfg = recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml", TINY_CYCLEGAN + [
            f'data.root="{tiny_unpaired}"', f'run_dir="{run}"', "train.steps=6",
            "train.log_every=3", "train.sample_every=100", *sets])
        train(cfg, progress=False)
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

    off = logged("train.health=false")
    assert [r["step"] for r in off] == [3, 6] and not any("health/" in k for r in off for k in r)
    every2 = logged("train.health_every=2")
    assert [r["step"] for r in every2 if "health/diversity" in r] == [2, 4, 6]
    assert [r["step"] for r in every2] == [2, 3, 4, 6]  # a check makes a log record
