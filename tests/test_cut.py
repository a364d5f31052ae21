"""CUT and FastCUT (translate/methods/cut.py): the PatchNCE loss, where its gradients go, real
training through the CLI (resume, 2 processes, export, apply, eval, demo), settings refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_CUT, run_cli, set_args
from PIL import Image
from safetensors.torch import load_file
from test_distributed import COMMON, assert_ranks_identical, assert_same_run, reference, worker

from translate import recipe as recipe_mod
from translate.core import noise
from translate.core.loop import set_trainable
from translate.methods import METHODS
from translate.methods.cut import gather, patch_nce, patch_positions

VARIANTS = {  # name: recipe (the demo recipes, made tiny by TINY_CUT)
    "cut": "cut_demo.toml",
    "fastcut": "fastcut_demo.toml",
}


def tiny_method(tiny_unpaired: Path, *extra: str):
    cfg = recipe_mod.load(ROOT / "recipes" / "cut_demo.toml",
                      TINY_CUT + [f'data.root="{tiny_unpaired}"', *extra])
    torch.manual_seed(0)
    return cfg, METHODS["cut"].build(cfg)


def tiny_batch(tiny_unpaired: Path, n: int = 2) -> dict[str, torch.Tensor]:
    from translate.data import build_dataset

    cfg, _ = tiny_method(tiny_unpaired)
    items = [build_dataset(cfg)[k] for k in range(n)]
    batch = {key: torch.stack([it[key] for it in items]) for key in ("a", "b")}
    return {**batch, "k": torch.arange(n)}


# ---------------------------------------------------------------------------- PatchNCE


def test_patch_nce_of_random_features_is_log_n():
    """Unrelated unit vectors: every key is as likely as the positive (uniform InfoNCE), so the
    loss is log(N) plus the spread of the logits, sigma^2 / 2 with sigma^2 = 1 / (D t^2)."""
    g = torch.Generator().manual_seed(0)
    n, d = 256, 4096
    for t in (1.0, 0.07):
        q = torch.nn.functional.normalize(torch.randn(4, n, d, generator=g), dim=-1)
        k = torch.nn.functional.normalize(torch.randn(4, n, d, generator=g), dim=-1)
        loss = patch_nce(q, k, t)
        assert loss.shape == (4,)
        expected = math.log(n) + 0.5 / (d * t * t)
        assert loss.mean().item() == pytest.approx(expected, abs=0.03), t
        assert abs(loss.mean().item() - math.log(n)) < 0.06


def test_patch_nce_never_mixes_the_images_of_a_batch():
    g = torch.Generator().manual_seed(1)
    q, k = (torch.nn.functional.normalize(torch.randn(3, 16, 8, generator=g), dim=-1)
            for _ in range(2))
    together = patch_nce(q, k, 0.07)
    alone = torch.cat([patch_nce(q[i:i + 1], k[i:i + 1], 0.07) for i in range(3)])
    torch.testing.assert_close(together, alone)
    k2 = k.clone()
    k2[1:] = k2[1:].flip(1)  # other images' keys change: the first image's loss does not
    assert patch_nce(q, k2, 0.07)[0] == together[0] and patch_nce(q, k2, 0.07)[1] != together[1]


def test_identity_mapping_scores_lower_than_shuffled_positions(tiny_unpaired):
    """On real images through the real encoder and heads: queries identical to their keys beat
    the same features at shuffled positions, and G(x) = x beats an output shifted in space."""
    cfg, method = tiny_method(tiny_unpaired)
    G, H = method.nets["G_ab"], method.nets["H"]
    batch = tiny_batch(tiny_unpaired)
    x, m = batch["a"], cfg.model
    with torch.no_grad():
        feats = G(x, list(m.nce_layers))
        keys = H([gather(f, patch_positions(batch["k"], f.shape[2] * f.shape[3],
                                            m.num_patches, 0, i))
                  for i, f in zip(m.nce_layers, feats)])
        perm = torch.randperm(m.num_patches, generator=torch.Generator().manual_seed(0))
        for k in keys:
            same, shuffled = patch_nce(k, k, m.nce_t), patch_nce(k[:, perm], k, m.nce_t)
            assert (same < shuffled).all(), (same, shuffled)
        identity = method.nce(G, H, x, x, batch["k"])
        shifted = method.nce(G, H, x, x.roll(x.shape[-1] // 2, dims=-1), batch["k"])
    assert (identity < shifted).all(), (identity, shifted)


def test_patch_positions_are_distinct_and_a_function_of_the_sample():
    keys = torch.tensor([5, 9, 5])
    idx = patch_positions(keys, 64, 16, seed=0, stream=3)
    assert idx.shape == (3, 16) and all(len(set(row.tolist())) == 16 for row in idx)
    assert torch.equal(idx[0], idx[2]) and not torch.equal(idx[0], idx[1])
    assert torch.equal(patch_positions(keys[1:2], 64, 16, 0, 3)[0], idx[1])  # batch-independent
    assert not torch.equal(patch_positions(keys, 64, 16, 0, 4), idx)  # per feature point
    # the first n of a stable argsort of the draws, ties included (4,096 24-bit draws of 8
    # images tie somewhere), so a run trains as it did when they were found by a full sort
    many = torch.arange(8)
    u = noise.uniform(many, (4096,), 0, 2)
    assert len(torch.unique(u[0])) < 4096 or len(torch.unique(u[1])) < 4096
    assert torch.equal(patch_positions(many, 4096, 64, 0, 2),
                       torch.argsort(u, dim=1, stable=True)[:, :64])


@pytest.mark.parametrize("generator", ["unet", "resnet"])
def test_the_translating_pass_gives_the_keys_of_a_pass_of_their_own(generator, tiny_unpaired):
    # CUT takes src's keys from the pass that translates it (`taps`): the same tensors as the
    # translation plus a features-only pass give, so the same PatchNCE.
    extra = [] if generator == "unet" else ['model.generator="resnet"', "model.n_blocks=2",
                                            'model.norm="instance"']
    cfg, method = tiny_method(tiny_unpaired, *extra)
    G, H, layers = method.nets["G_ab"], method.nets["H"], list(cfg.model.nce_layers)
    batch = tiny_batch(tiny_unpaired)
    x = batch["a"]
    y, taps = G(x, taps=layers)
    assert torch.equal(y, G(x))
    assert all(torch.equal(a, b) for a, b in zip(taps, G(x, layers), strict=True))
    torch.testing.assert_close(method.nce(G, H, x, y, batch["k"], feat_k=taps),
                               method.nce(G, H, x, y, batch["k"]), rtol=0, atol=0)


@pytest.mark.parametrize("apart", [True, False])
@pytest.mark.parametrize("variant", ["cut", "fastcut"])
def test_gradients_reach_g_and_the_heads_and_nothing_else(variant, apart, tiny_unpaired):
    extra = [] if variant == "cut" else ["model.nce_idt=false", "model.lambda_nce=10",
                                         "model.flip_equivariance=true"]
    _, method = tiny_method(tiny_unpaired, *extra, f"model.idt_apart={str(apart).lower()}")
    nets, batch = method.nets, tiny_batch(tiny_unpaired)
    G, H = nets["G_ab"], nets["H"]
    # PatchNCE alone, every net trainable: G and every head get gradients, D none, and the
    # source images none (the keys are constants).
    src = batch["a"].clone().requires_grad_(True)
    method.nce(G, H, src, G(src), batch["k"]).mean().backward()
    for name in ("G_ab", "H"):
        grads = [p.grad for p in nets[name].parameters()]
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    assert all(p.grad is None for p in nets["D_b"].parameters())
    for net in nets.values():
        net.zero_grad(set_to_none=True)
    # The G phase as the loop runs it (others frozen): D gets nothing, every head something.
    g_phase = method.phases[0]
    assert set(g_phase.nets) == {"G_ab", "H"}
    set_trainable(nets, g_phase.nets)
    out: dict[str, torch.Tensor] = {}
    assert len(g_phase.parts) == apart  # the identity terms (L1 in both here), a graph apart
    for loss_fn in (*g_phase.parts, g_phase.loss):  # as the loop runs them, one at a time
        part = loss_fn(nets, batch, {"progress": torch.tensor(0.0)})  # as the loop hands it
        part["loss"].backward()
        out.update(part)
    assert all(p.grad is None for p in nets["D_b"].parameters())
    for mlp in H.mlps:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())
    assert all(p.grad is not None for p in G.parameters())
    assert ("nce_idt" in out) == (variant == "cut")
    assert out["fake_b"].shape == batch["b"].shape and not out["fake_b"].requires_grad


@pytest.mark.parametrize("norm", ["none", "instance", "batch", "spectral"])
def test_d_judges_real_and_fake_in_one_call_unless_batch_norm(norm, tiny_unpaired):
    """D_b sees real and fake B in one call of twice the batch (as CycleGAN's D): the same terms
    as two calls where each image's output is its own; two calls with BatchNorm's statistics or
    spectral norm's power iteration, which depend on the call."""
    sets = (["model.spectral_norm=true", 'model.norm="none"'] if norm == "spectral"
            else [f'model.norm="{norm}"'])
    _, method = tiny_method(tiny_unpaired, *sets)
    D, g = method.nets["D_b"], torch.Generator().manual_seed(0)
    spectral = [m for m in D.modules() if hasattr(m, "parametrizations")]
    assert bool(spectral) == (norm == "spectral")
    real, fake = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    calls = []
    hook = D.register_forward_pre_hook(lambda _, args: calls.append(len(args[0])))
    out = method.d_loss(method.nets, {"b": real}, {"fake_b": fake})
    hook.remove()
    assert calls == ([2, 2] if norm in ("batch", "spectral") else [4])
    if norm == "spectral":  # each call ran its own power iteration: compare in eval mode
        return
    with torch.no_grad():
        r, f = D(real), D(fake)
    torch.testing.assert_close(out["loss"], 0.5 * ((r - 1) ** 2 + f**2).mean())


def test_diff_augment_shows_d_real_and_fake_alike_augmented_and_g_learns_through_it(
        tiny_unpaired):
    """model.diff_augment (as CycleGAN's): D's real and fake get one draw of the policy, and
    G's adversarial term judges an augmented fake, with gradients back to G."""
    _, method = tiny_method(tiny_unpaired, 'model.diff_augment="translation,cutout"')
    D = method.nets["D_b"]
    seen = []
    hook = D.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    real = torch.rand(2, 3, 16, 16) * 2 - 1
    method.d_loss(method.nets, {"b": real}, {"fake_b": real.clone()})
    (both,) = seen
    assert torch.equal(both[:2], both[2:])  # one draw for real and fake
    assert not torch.equal(both[:2], real)  # augmented
    batch = tiny_batch(tiny_unpaired)
    seen.clear()
    out = method.g_loss(method.nets, batch, {"progress": torch.tensor(0.0)})
    hook.remove()
    assert not torch.equal(seen[0], out["fake_b"])
    out["adv"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in method.nets["G_ab"].parameters())


@pytest.mark.parametrize("apart", [True, False])
@pytest.mark.parametrize("nce_idt", [True, False])
def test_l1_identity_term_falls_to_zero_by_identity_until(nce_idt, apart, tiny_unpaired):
    # lambda_idt_l1 * scale * L1(G_ab(b), b), scale falling linearly to 0 at identity_until.
    # idt_apart: in the G phase's part of its own, else in g_loss, where with the identity
    # PatchNCE G_ab(b) comes from the translation's call. Without it (FastCUT), G_ab(b) is
    # computed for this term only, and not at all once its weight is 0.
    _, method = tiny_method(tiny_unpaired, "model.lambda_idt_l1=5", "model.identity_until=0.4",
                            f"model.nce_idt={str(nce_idt).lower()}",
                            f"model.idt_apart={str(apart).lower()}")
    G, batch = method.nets["G_ab"], tiny_batch(tiny_unpaired)
    with torch.no_grad():
        l1 = float((G(batch["b"]) - batch["b"]).abs().mean())
    sizes: list[int] = []
    G.register_forward_hook(lambda mod, args, out: sizes.append(len(args[0])))
    g_phase = method.phases[0]
    for progress, scale in ((0.0, 1.0), (0.2, 0.5), (0.4, 0.0)):
        out, calls = {}, []
        for loss_fn in (*g_phase.parts, g_phase.loss):
            sizes.clear()
            with torch.no_grad():
                out.update(loss_fn(method.nets, batch, {"progress": torch.tensor(progress)}))
            calls.append(list(sizes))
        assert out["idt_l1"].item() == pytest.approx(5 * scale * l1, rel=1e-4), progress
        translations = [c[:1] for c in calls]  # the rest encode for PatchNCE
        if apart:  # G_ab(b) alone, or no pass of G once nothing needs it; then x alone
            assert translations == [[2] if nce_idt or scale > 0 else [], [2]], progress
        else:  # x and y in one call, or x, then y for the L1 term only while it counts
            assert translations == [[4 if nce_idt else 2]], progress
            assert calls[0].count(2) == (0 if nce_idt else 2 + (scale > 0)), progress
    _, plain = tiny_method(tiny_unpaired, "model.lambda_idt_l1=0")
    assert "idt_l1" not in plain.g_loss_idt(plain.nets, batch, {"progress": torch.tensor(0.0)})
    _, fastcut = tiny_method(tiny_unpaired, "model.lambda_idt_l1=0", "model.nce_idt=false")
    assert fastcut.phases[0].parts == ()  # nothing to compute: no identity part at all


@pytest.mark.parametrize("flip", [False, True])
def test_identity_terms_apart_give_the_gradients_of_one_graph(flip, tiny_unpaired):
    """idt_apart only changes when the identity terms' graph is built and freed: the G phase's
    logged values and the gradients of G and the heads are those of x and y in one pass (fp32:
    no autocast here), and two graphs are backpropagated instead of one."""
    results = []
    for apart in (True, False):
        _, method = tiny_method(tiny_unpaired, f"model.idt_apart={str(apart).lower()}",
                                f"model.flip_equivariance={str(flip).lower()}")
        nets, batch, g_phase = method.nets, tiny_batch(tiny_unpaired), method.phases[0]
        set_trainable(nets, g_phase.nets)
        logs, graphs = {}, 0
        for loss_fn in (*g_phase.parts, g_phase.loss):
            out = loss_fn(nets, batch, {"progress": torch.tensor(0.1)})
            out["loss"].backward()
            graphs += 1
            for k, v in out.items():
                if v.dim() == 0:
                    logs[k] = logs.get(k, 0.0) + v.item()
        assert graphs == (2 if apart else 1)
        results.append((logs, [p.grad for n in ("G_ab", "H") for p in nets[n].parameters()]))
    (logs_apart, grads_apart), (logs_joint, grads_joint) = results
    assert set(logs_apart) == set(logs_joint) >= {"loss", "adv", "nce", "nce_idt", "idt_l1"}
    for k in logs_joint:
        assert logs_apart[k] == pytest.approx(logs_joint[k], rel=1e-5, abs=1e-6), k
    # Other float sums: a few near-cancelling bias gradients differ by a few percent of
    # themselves, so all gradients are compared as one vector.
    flat_apart, flat_joint = (torch.cat([g.flatten() for g in gs])
                              for gs in (grads_apart, grads_joint))
    assert float((flat_apart - flat_joint).norm()) <= 1e-5 * float(flat_joint.norm())
    assert float(flat_joint.norm()) > 0


def test_flip_equivariance_compares_the_mirrored_output_mirrored_back(tiny_unpaired):
    """Feature point 0 (the image itself) is exactly flip-equivariant: outputs that are the
    mirrored source, where the sample was flipped, score as the identity once mirrored back,
    and differently without the flags."""
    _, method = tiny_method(tiny_unpaired, "model.nce_layers=[0]")
    G, H, batch = method.nets["G_ab"], method.nets["H"], tiny_batch(tiny_unpaired, 4)
    x = batch["a"]
    flipped = torch.tensor([True, False, True, False])
    with torch.no_grad():
        out = torch.where(flipped[:, None, None, None], x.flip(3), x)
        identity = method.nce(G, H, x, x, batch["k"])
        torch.testing.assert_close(method.nce(G, H, x, out, batch["k"], flipped), identity)
        unflagged = method.nce(G, H, x, out, batch["k"])
    assert torch.equal(unflagged[1::2], identity[1::2])
    assert (unflagged[::2] > identity[::2]).all()


# ---------------------------------------------------------------------------- training runs


def _train(recipe: str, data: Path, run: Path, steps: int, *flags: str):
    # A constant LR and identity weight: a linear schedule depends on the total steps, which a
    # resume changes here.
    sets = set_args(TINY_CUT + [f'data.root="{data}"', 'train.lr_schedule="constant"',
                                "model.identity_until=0"])
    return run_cli("train", f"recipes/{recipe}", *sets, "--steps", str(steps), "--run-dir",
                   str(run), "--mixed-precision", "no", "--log-every", "1", "--save-every",
                   "3", "--sample-every", "100", "--no-progress", *flags)


def _checkpoint(run: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step_{step:07d}"
    out = {f"{f.name}/{k}": v for f in sorted(ckpt.glob("*.safetensors"))
           for k, v in load_file(str(f)).items()}
    for f in sorted(ckpt.glob("optimizer*.bin")):
        for p, slots in torch.load(f, weights_only=True)["state"].items():
            out.update({f"{f.name}/{p}/{k}": v for k, v in slots.items() if torch.is_tensor(v)})
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.slow
def test_train_resume_export_apply_eval_through_the_cli(variant, tiny_unpaired, tmp_path):
    recipe = VARIANTS[variant]
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = _train(recipe, tiny_unpaired, straight, 6)
    assert "cut '" in proc.stderr and "done: 6 steps" in proc.stdout
    _train(recipe, tiny_unpaired, split, 3)
    assert "resumed from" in _train(recipe, tiny_unpaired, split, 6, "--resume", "auto").stderr
    # train(6) == train(3) + resume + train(3), bit for bit: nets (heads included), optimizers.
    a, b = _checkpoint(straight, 6), _checkpoint(split, 6)
    assert a.keys() == b.keys() and any("model_2" in k for k in a)  # G_ab, D_b, H
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    logs = [json.loads(x) for x in (split / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 7))
    assert all(math.isfinite(r["G/nce"]) and r["G/nce"] > 0 for r in logs)
    assert ("G/nce_idt" in logs[0]) == (variant == "cut")
    # Export: G_ab only (+ ONNX), then apply a folder with each backend and score the run
    # against the demo truth.
    out = run_cli("export", str(straight), "--onnx").stdout
    assert "G_ab.safetensors" in out and "G_ba" not in out
    assert sorted(p.name for p in (straight / "export").iterdir()) == [
        "G_ab.onnx", "G_ab.safetensors", "G_ab.tiles.onnx"]  # instance norms: a companion
    names = sorted(p.name for p in (tiny_unpaired / "testA").iterdir())
    outputs = []
    for model in ("G_ab.safetensors", "G_ab.onnx"):
        dest = tmp_path / f"translated_{model}"
        run_cli("apply", str(straight / "export" / model), str(tiny_unpaired / "testA"),
                str(dest), "--no-progress", "--precision", "fp32")  # as onnxruntime computes
        assert sorted(p.name for p in dest.iterdir()) == names
        outputs.append(np.asarray(Image.open(dest / names[0])).astype(int))
    assert outputs[0].shape[:2] == Image.open(tiny_unpaired / "testA" / names[0]).size[::-1]
    assert np.abs(outputs[0] - outputs[1]).max() <= 1  # torch and onnxruntime agree
    scores = json.loads(run_cli("eval", str(straight), "--json").stdout)
    assert math.isfinite(scores["psnr"]) and "cycle_psnr" not in scores


@pytest.mark.slow
@pytest.mark.parametrize("variant", [*VARIANTS, "cut apart"])
def test_2_processes_equal_1_with_twice_the_batch_across_a_resume(variant, tiny_unpaired,
                                                                  tmp_path):
    # "cut apart": the identity terms as a part of the G phase of their own (idt_apart, the
    # default outside the demo), whose backward adds to the gradients without an all-reduce.
    # norm "none": see test_distributed.CYCLEGAN (Adam and the zero gradient of a conv bias
    # in front of an instance norm). Without norms the tiny net's deeper features shrink by
    # ~0.02 per conv, and a head output near normalize's eps (1e-6 at point 3) turns float
    # summation noise into visible moment differences: the two shallow points only.
    sets = TINY_CUT + COMMON + ['model.norm="none"', "model.nce_layers=[0, 1]", "train.ema=0.9",
                                 'train.mixed_precision="no"', f'data.root="{tiny_unpaired}"',
                                 "model.identity_until=0"]  # the run's length changes at resume
    if variant == "cut apart":
        variant, sets = "cut", [*sets, "model.idt_apart=true"]
    recipe, run = VARIANTS[variant], tmp_path / "run"
    reference(recipe, tmp_path / "ref", sets + ["train.batch_size=2"])
    out = worker(tmp_path / "dump3", recipe, sets, "--batch-size", "1", "--steps", "3",
                 "--save-every", "3", "--run-dir", run)
    assert "global batch 1 x 2 processes x 1 accumulation = 2" in out
    assert_ranks_identical(tmp_path / "dump3")
    worker(tmp_path / "dump6", recipe, sets, "--batch-size", "1", "--steps", "6",
           "--save-every", "3", "--run-dir", run, "--resume", "auto")
    assert_ranks_identical(tmp_path / "dump6")
    assert_same_run(run, tmp_path / "ref", [3, 6])


@pytest.mark.slow
def test_demo_with_cut_prints_the_score_table_without_a_cycle(tmp_path):
    root, run = tmp_path / "demo", tmp_path / "run"
    proc = run_cli("demo", "--method", "cut", "--root", str(root), "--run-dir", str(run),
                   "--steps", "2", "--size", "16", "--set", "model.num_patches=4",
                   "--no-progress")
    assert "demo (cut)" in proc.stdout and "PSNR (dB)" in proc.stdout
    assert "cycle PSNR" not in proc.stdout
    scores = json.loads((run / "demo_scores.json").read_text())
    assert scores["method"] == "cut" and scores["steps"] == 2 and math.isfinite(scores["psnr"])
    assert not (run / "export" / "G_ba.safetensors").exists()
    assert json.loads((run / "config.json").read_text())["method"] == "cut"


# ---------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("sets,needle", [
    (["model.nce_layers=[0, 4]"], "model.nce_layers: 4 is beyond the encoder"),
    (['model.generator="unet"', "model.unet_downs=2", "model.nce_layers=[3]"],
     "model.nce_layers: 3 is beyond the encoder"),
    (["model.num_patches=17"], "model.num_patches: 17 is more than the 16 positions"),
    (["model.nce_layers=[]"], "model.nce_layers"),
    (["model.nce_t=0"], "model.nce_t: must be > 0"),
    (["data.channels_b=1"], "model.nce_idt"),
    (['model.diff_augment="translation,flip"'], "unknown DiffAugment policy 'flip'"),
])
def test_bad_settings_are_refused_before_training(sets, needle, tiny_unpaired, tmp_path):
    run = tmp_path / "run"
    args = set_args(TINY_CUT + [f'data.root="{tiny_unpaired}"', *sets])
    proc = run_cli("train", "recipes/cut_demo.toml", *args, "--run-dir", str(run), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not run.exists()
