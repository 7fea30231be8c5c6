"""AMDIM (docs/spec/methods.md §6): the encoder's maps, the multiscale NCE (1/sqrt(d), tanh clip, score
regulariser) against hand-computed values and the spec's sanity values, the shared flip, the
recipe, and a short real Fashion-MNIST run (slow).

The helpers at the top (short runs, held-out images) are shared with test_cpc.py and test_yadim.py;
the view-retrieval check is tests/realrun.py's, as for every method."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sslctl.augment import build_views
from sslctl.data import iter_shard, load_manifest, split_shards
from sslctl.encoder_io import load_encoder, save_encoder
from sslctl.encoders import build_backbone
from sslctl.errors import UserError
from sslctl.losses.local import map_nce, random_location, tanh_clip
from sslctl.methods import build_method
from sslctl.nets.amdim import AMDIMEncoder, ConvResNxN
from sslctl.recipes import load_recipe
from tests.conftest import fork_ranks
from tests.realrun import learned, retrieval_draws

# ------------------------------------------------------------------ helpers (shared)


def short_run(shards: Path, recipe: str, out: Path, steps: int, *overrides: str) -> tuple[dict, Path, list[dict]]:
    """Pretrain `recipe` (its small variant) for `steps` steps on the CPU; (cfg, run dir, loss records)."""
    from sslctl.train import pretrain

    cfg = load_recipe(recipe, image_size=28, overrides=overrides)
    run = pretrain(shards, cfg, out, device="cpu", resume="never", seed=0, workers=0, max_steps=steps, log_every=10, amp=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return cfg, run, [r for r in records if "loss" in r]


def held_out_images(shards: Path, n: int = 256) -> list[torch.Tensor]:
    images = []
    for tar in split_shards(load_manifest(shards), "test"):
        for _key, image, _label in iter_shard(tar, rgb=True):
            images.append(image)
            if len(images) == n:
                return images
    return images


def first_and_last_losses(records: list[dict]) -> tuple[float, float]:
    """Mean loss of the first two and the last two logged windows (10 steps each)."""
    losses = [r["loss"] for r in records]
    return sum(losses[:2]) / 2, sum(losses[-2:]) / 2


# ------------------------------------------------------------------ encoder

SMALL = dict(ndf=8, n_rkhs=32, depth=1)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_encoder_gives_1x1_5x5_7x7_maps_of_n_rkhs_channels(size):
    torch.manual_seed(0)
    enc = AMDIMEncoder(**SMALL, input_size=size)
    x = torch.randn(3, 3, size, size)
    maps = enc.forward_maps(x)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "1": (3, 32, 1, 1), "5": (3, 32, 5, 5), "7": (3, 32, 7, 7), "last": (3, 32, 1, 1)
    }
    assert enc.feature_dim == 32
    assert torch.allclose(enc(x), maps["1"].flatten(1))  # the pooled representation is r1


def test_encoder_has_no_bn_but_on_its_outputs_and_starts_fixup_like():
    enc = AMDIMEncoder(**SMALL, input_size=32)
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 3  # r1's final BN and one after each local RKHS MLP
    units = [m for m in enc.modules() if isinstance(m, ConvResNxN)]
    assert units and all(torch.count_nonzero(u.conv2.weight) == 0 for u in units)
    # a zero second conv makes each unit its shortcut (avg-pool, zero-padded in channels) at init
    u = ConvResNxN(4, 6, 2, 2)
    x = torch.randn(2, 4, 6, 6)
    assert torch.allclose(u(x), F.pad(F.avg_pool2d(x, 2, 2), (0, 0, 0, 0, 0, 2)))


def test_encoder_computes_only_the_maps_asked_for_and_checks_the_input_size():
    enc = AMDIMEncoder(**SMALL, input_size=32)
    out = enc.forward_maps(torch.randn(2, 3, 32, 32), ("1",))
    assert list(out) == ["1"]
    out["1"].sum().backward()
    assert all(p.grad is None for p in enc.rkhs.parameters())
    with pytest.raises(ValueError, match="32 px"):
        enc(torch.randn(2, 3, 28, 28))


def test_encoder_is_registered_and_its_file_rebuilds_it_with_its_options(tmp_path):
    from sslctl.encoders import build_encoder

    section = {"name": "amdim", "small_stem": False, **SMALL, "input_size": 32, "use_bn": False}
    enc = build_encoder(section)
    assert enc.arch == "amdim" and enc.options == {**SMALL, "input_size": 32, "use_bn": False}
    assert isinstance(build_backbone("amdim", **SMALL, input_size=32), AMDIMEncoder)
    path = save_encoder(tmp_path / "e.safetensors", enc, small_stem=False, input_size=32, mean=[0.5] * 3, std=[0.2] * 3, recipe="amdim")
    loaded, meta = load_encoder(path)  # strict load into a net rebuilt from the stored options
    assert meta["options"] == enc.options
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), enc.eval()(x))


# ------------------------------------------------------------------ loss


def test_equal_scores_give_the_spec_sanity_values():
    # §6(h): equal scores -> log(1 + (B - 1) L): 8.51 at B = 200, L = 25 and 9.19 at L = 49.
    for length, expected in ((25, 8.51), (49, 9.19)):
        loss, reg = map_nce(torch.zeros(200, 16), torch.randn(200, 16, length))
        assert loss.item() == pytest.approx(math.log(1 + 199 * length), abs=1e-4)
        assert round(loss.item(), 2) == expected and reg.item() == 0.0


def test_hand_computed_case_scales_by_sqrt_d_regularises_raw_scores_then_clips():
    # d = 4 so scores are dot / 2; B = 2 images, L = 2 target locations each.
    src = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0]])
    tgt = torch.zeros(2, 4, 2)
    tgt[0, 0, 0], tgt[0, 1, 1], tgt[1, 1, 0], tgt[1, 0, 1] = 2.0, 4.0, 2.0, 60.0
    # raw scores s[n, m, l]: n=0: own [2, 0], other [0, 60];  n=1: own [2, 0], other [0, 4]
    reg_expected = 0.05 * (2**2 + 60**2 + 4**2 + 2**2) / 8  # 22.65: the 60 is NOT clipped here
    clip = lambda s: 20 * math.tanh(s / 20)  # noqa: E731
    p2, p4, p60 = clip(2), clip(4), clip(60)  # 1.9934, 3.9475, 19.901
    terms = [
        -math.log(math.exp(p2) / (math.exp(p2) + 1 + math.exp(p60))),  # n=0, l=0
        -math.log(1 / (1 + 1 + math.exp(p60))),  # n=0, l=1 (positive score 0)
        -math.log(math.exp(p2) / (math.exp(p2) + 1 + math.exp(p4))),  # n=1, l=0
        -math.log(1 / (1 + 1 + math.exp(p4))),  # n=1, l=1
    ]
    loss, reg = map_nce(src, tgt)
    assert reg.item() == pytest.approx(reg_expected) == pytest.approx(22.65)
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-5) == pytest.approx(10.9744, abs=1e-4)
    # without the clip the score of 60 dominates the n=0 terms
    unclipped, _ = map_nce(src, tgt, clip=1e6)
    assert unclipped.item() > loss.item() + 15


def test_tanh_clip_is_soft_and_bounded():
    x = torch.tensor([0.1, 5.0, 100.0, -1e4])
    y = tanh_clip(x, 20.0)
    assert y[0].item() == pytest.approx(0.1, rel=1e-4)  # ~identity for small scores
    assert y[2].item() == pytest.approx(20 * math.tanh(5)) and y.abs().max() <= 20.0


def one_hot_targets(b: int, length: int) -> torch.Tensor:
    """Targets for which score s[n, m, l] equals src[n, m * L + l] exactly (d = b * L)."""
    d = b * length
    return (math.sqrt(d) * torch.eye(d)).view(d, b, length).permute(1, 0, 2)


def test_gradient_raises_positive_scores_and_lowers_negative_ones():
    b, length = 4, 3
    src = torch.randn(b, b * length, requires_grad=True)
    loss, _ = map_nce(src, one_hot_targets(b, length), reg_weight=0.0)
    loss.backward()
    grad = src.grad.view(b, b, length)  # d loss / d s[n, m, l]
    own = torch.eye(b, dtype=torch.bool)
    assert (grad[own] < 0).all() and (grad[~own] > 0).all()


def test_score_regulariser_gradient_is_2_w_s_over_the_count():
    b, length = 3, 2
    src = torch.randn(b, b * length, requires_grad=True)
    _, reg = map_nce(src, one_hot_targets(b, length), reg_weight=0.05)
    reg.backward()
    assert torch.allclose(src.grad, 2 * 0.05 * src.detach() / (b * b * length), atol=1e-7)


def test_targets_gathered_over_ranks_give_the_full_batch_loss():
    # rank r holds sources r*B .. r*B+B-1; the targets are everyone's (gathered); `first` = r*B.
    torch.manual_seed(0)
    src, tgt = torch.randn(6, 8), torch.randn(6, 8, 5, 5)
    full, full_reg = map_nce(src, tgt)
    halves = [map_nce(src[i : i + 3], tgt, first=i) for i in (0, 3)]
    assert full.item() == pytest.approx((halves[0][0] + halves[1][0]).item() / 2, rel=1e-6)
    assert full_reg.item() == pytest.approx((halves[0][1] + halves[1][1]).item() / 2, rel=1e-6)


def test_random_location_picks_one_real_location_per_image():
    torch.manual_seed(0)
    maps = torch.randn(64, 5, 3, 3)
    picked = random_location(maps)
    flat = maps.flatten(2)  # 64 x 5 x 9
    where = [int(((flat[n] - picked[n, :, None]).abs().sum(0) == 0).nonzero()) for n in range(64)]
    assert len(set(where)) > 3  # locations vary across images
    glob = torch.randn(4, 5, 1, 1)
    assert torch.equal(random_location(glob), glob.flatten(1))  # a 1x1 map: the global vector


# ------------------------------------------------------------------ method and recipe


def amdim(*overrides: str, recipe: str = "amdim"):
    torch.manual_seed(0)
    return build_method(load_recipe(recipe, image_size=28, overrides=["encoder.ndf=8", "encoder.n_rkhs=32", "encoder.depth=1", *overrides]))


def test_recipe_follows_the_spec_numbers():
    cfg = load_recipe("amdim", variant="none")
    assert cfg["augment"]["shared_flip"] is True and cfg["augment"]["crop_size"] == cfg["encoder"]["input_size"] == 128
    assert cfg["augment"]["crop_scale"] == [0.3, 1.0] and cfg["augment"]["crop_ratio"] == [0.7, 1.4]
    assert cfg["augment"]["jitter"] == [0.4, 0.4, 0.4, 0.1] and cfg["augment"]["grayscale_p"] == 0.25
    assert (cfg["encoder"]["ndf"], cfg["encoder"]["n_rkhs"], cfg["encoder"]["depth"]) == (320, 2560, 10)
    assert cfg["method"]["compare"] == ["1>5", "1>7", "5>5"]
    assert (cfg["loss"]["tclip"], cfg["loss"]["score_reg"]) == (20.0, 0.05)
    o, s = cfg["optim"], cfg["schedule"]
    assert (o["name"], o["lr"], o["betas"], o["weight_decay"], o["batch_size"]) == ("adam", 2e-4, [0.8, 0.999], 1e-5, 200)
    assert (s["warmup_steps"], s["milestones"], s["gamma"], s["epochs"]) == (500, [30, 45], 0.2, 50)
    small = load_recipe("amdim", image_size=28)
    assert small["augment"]["crop_size"] == small["encoder"]["input_size"] == 32
    assert (small["augment"]["translate"], small["augment"]["translate_p"]) == (4, 0.8)
    assert (small["encoder"]["n_rkhs"], small["schedule"]["milestones"]) == (1280, [250, 280])


def test_one_flip_is_shared_by_both_views():
    cfg = load_recipe("amdim", image_size=28, overrides=["augment.jitter_p=0", "augment.grayscale_p=0", "augment.translate_p=0"])
    make_views = build_views(cfg["augment"], (0.5,) * 3, (0.25,) * 3)
    image = torch.zeros(3, 28, 28, dtype=torch.uint8)
    image[:, :, :7] = 255  # bright on the left only
    flipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        v1, v2 = make_views(image)
        assert torch.equal(v1, v2)  # same flip (nothing else random is left on)
        flipped += int(v1[0, :, -1].mean() > v1[0, :, 0].mean())
    assert 5 < flipped < 35  # and the flip itself is random


def test_training_step_sums_the_three_tasks_and_their_regularisers():
    m = amdim()
    torch.manual_seed(1)
    out = m.training_step([torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)])
    parts = [out[f"{kind}_{pair}"] for pair in ("1>5", "1>7", "5>5") for kind in ("nce", "reg")]
    assert out["loss"].item() == pytest.approx(sum(p.item() for p in parts), rel=1e-6)
    out["loss"].backward()
    stem = m.backbone.layers[0].conv.weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.backbone.rkhs.parameters())  # 5x5 and 7x7 MLPs are trained


def test_compare_names_must_be_maps_of_the_encoder():
    with pytest.raises(UserError, match="no feature map '3'.*1, 5, 7, last"):
        amdim('method.compare=["1>3"]')
    with pytest.raises(UserError, match="SOURCE>TARGET"):
        amdim('method.compare=["15"]')
    with pytest.raises(UserError, match="not supported"):
        amdim("loss.similarity=cosine")


# ------------------------------------------------------------------ two processes


def _two_process_worker(rank: int, init_file: str) -> None:
    """Global negatives: each rank holds half the batch and gathers the targets with gradient.
    The per-rank losses average to the one-process loss on the whole batch, and the
    rank-averaged parameter gradients (what DDP applies) equal its gradients."""
    import torch.distributed as tdist

    from sslctl import distributed as dist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        b, n = 3, 6
        mine = slice(rank * b, (rank + 1) * b)
        g = torch.Generator().manual_seed(0)
        views = [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)]
        from tests.test_cpc import cpc

        cases = [
            # 1x1 sources: no random location, so both runs compare the same vectors; eval-mode BN
            # (running statistics) so the two halves are normalised like the whole batch
            (lambda gather: amdim('method.compare=["1>5","1>7"]', f"method.global_negatives={gather}").eval(), views),
            (lambda gather: cpc(f"method.global_negatives={gather}"), views[:1]),
        ]
        for make, xs in cases:
            ref = make("false")  # the whole batch in this process, nothing gathered
            ref_loss = ref.training_step(xs)["loss"]
            ref_loss.backward()
            m = make("true")  # same seed: the same weights on every rank, as DDP makes them
            loss = m.training_step([x[mine] for x in xs])["loss"]
            loss.backward()
            torch.testing.assert_close(dist.all_reduce_mean(loss.detach().clone()), ref_loss.detach(), rtol=1e-5, atol=1e-5)
            grads = torch.cat([p.grad.flatten() for p in m.trainable_parameters() if p.grad is not None])
            ref_grads = torch.cat([p.grad.flatten() for p in ref.trainable_parameters() if p.grad is not None])
            torch.testing.assert_close(dist.all_reduce_mean(grads), ref_grads, rtol=1e-4, atol=1e-6)
    finally:
        tdist.destroy_process_group()


def test_two_processes_with_global_negatives_equal_one_process_on_the_whole_batch(tmp_path):
    fork_ranks(_two_process_worker, str(tmp_path / "init"))


# ------------------------------------------------------------------ real run


@pytest.mark.slow
def test_short_fashion_mnist_run_learns_view_invariant_features(mini_shards, tmp_path, one_thread):
    # The encoder at ndf 16 (its CPU-sized options) and lr 2e-3: ~25 CPU-s. (ndf 32 at lr 1e-3 cost
    # ~50 for the same kind of margins: loss 27.6 -> 20.0, view retrieval 0.074 -> 0.277; ndf 16 at
    # lr 1e-3 learned too little in 100 steps: loss 24.3 -> 20.4, a fall of 3.9 against the 3 asserted.)
    shards = mini_shards
    overrides = ["encoder.ndf=16", "encoder.n_rkhs=128", "encoder.depth=2", "optim.batch_size=64", "optim.base_batch=64",
                 "optim.lr=2e-3", "schedule.warmup_steps=0"]
    cfg, run, records = short_run(shards, "amdim", tmp_path / "run", 100, *overrides)
    first, last = first_and_last_losses(records)
    assert last < first - 3.0, records  # the summed three-task loss falls (25.8 -> 19.9 / 25.4 -> 20.0, seeds 0 / 1)
    # every task ends below its equal-score value log(1 + (B - 1) L): better than chance
    assert records[-1]["nce_1>5"] < math.log(1 + 63 * 25) and records[-1]["nce_5>5"] < math.log(1 + 63 * 25)
    assert records[-1]["z_std"] > 0.5 / math.sqrt(128)  # no collapse: ~1/sqrt(D) when healthy
    trained, _ = load_encoder(run / "encoder.safetensors")
    torch.manual_seed(0)
    initial = build_backbone("amdim", **trained.options)
    before, after = retrieval_draws(initial, shards, cfg), retrieval_draws(trained, shards, cfg)
    # mean of 4 draws: 0.050 -> 0.340 / 0.050 -> 0.295 measured (seeds 0 / 1)
    assert learned(before, after) and sum(after) / 4 > sum(before) / 4 + 0.1, (before, after)
