"""MoCo, AdCo, SimCLR, BYOL: the algorithm's invariants on tiny real networks (ResNet-18 small
stem at 16 px, batch 8), built from the real recipes' small variants."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sslctl.errors import UserError
from sslctl.losses.contrastive import info_nce, keys_and_bank_similarities
from sslctl.methods import Progress, build_method
from sslctl.methods.adco import bank_gradient
from sslctl.optim import cosine_tau
from sslctl.recipes import load_recipe
from sslctl.siamese import SplitBatchNorm, ema_update, shuffled_keys, use_split_bn
from tests.conftest import fork_ranks
from tests.test_losses import info_nce_global

B = 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def method(name: str, *overrides: str):
    return build_method(load_recipe(name, variant="small", overrides=overrides))


def views(b: int = B, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)]


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ---- shared parts ---------------------------------------------------------------------------


def test_split_batchnorm_normalises_each_block_of_the_batch_and_averages_running_stats():
    bn = SplitBatchNorm(3, num_splits=2)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    out = bn(x)
    for block, normalised in zip(x.chunk(2), out.chunk(2)):
        ref = F.batch_norm(block, None, None, training=True, eps=bn.eps)
        torch.testing.assert_close(normalised, ref, rtol=1e-5, atol=1e-5)
    expected_mean = 0.1 * torch.stack([block.mean((0, 2, 3)) for block in x.chunk(2)]).mean(0)
    expected_var = 0.9 + 0.1 * torch.stack([block.var((0, 2, 3)) for block in x.chunk(2)]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    bn.eval()
    torch.testing.assert_close(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))


def test_split_batchnorm_keeps_channels_last_and_its_gradients_match_per_block_bn():
    bn = SplitBatchNorm(3, num_splits=4)
    x = (torch.randn(8, 3, 4, 4) * 2).to(memory_format=torch.channels_last).requires_grad_()
    out = bn(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.square().sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    torch.cat([F.batch_norm(b, None, None, training=True, eps=bn.eps) for b in ref_x.chunk(4)]).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-5)


def test_use_split_bn_keeps_torchvision_state_dict_keys():
    from sslctl.encoders import build_backbone

    net = build_backbone("resnet18", small_stem=True)
    keys = list(net.state_dict())
    use_split_bn(net, 4)
    assert list(net.state_dict()) == keys
    assert sum(isinstance(m, SplitBatchNorm) for m in net.modules()) == 20


def test_shuffled_keys_undo_the_shuffle():
    enc = torch.nn.Linear(5, 3)  # no BN: shuffling must not change any key
    x = torch.randn(8, 5)
    torch.testing.assert_close(shuffled_keys(enc, x), F.normalize(enc(x), dim=1))


def test_shuffle_bn_changes_which_images_share_bn_statistics():
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), SplitBatchNorm(4, 2), torch.nn.Flatten())
    x = torch.randn(8, 3, 2, 2)
    torch.manual_seed(1)
    keys = [shuffled_keys(enc, x) for _ in range(3)]
    assert not torch.allclose(keys[0], keys[1]) or not torch.allclose(keys[1], keys[2])


def test_ema_update_moves_parameters_only():
    online, target = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        online.weight.fill_(2.0)
        online.running_mean.fill_(5.0)
    ema_update(target.parameters(), online.parameters(), 0.9)
    torch.testing.assert_close(target.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    assert target.running_mean.abs().sum() == 0  # buffers untouched


# ---- MoCo -----------------------------------------------------------------------------------


def moco(*overrides: str):
    return method("moco_v2", "method.queue_size=32", "method.bn_splits=2", "optim.batch_size=8", *overrides)


def test_moco_key_encoder_starts_as_a_frozen_copy_and_sees_no_gradient():
    m = moco()
    for q, k in zip(m.online_parameters(), m.key_encoder.parameters()):
        assert torch.equal(q, k) and not k.requires_grad
    out = m.training_step(views())
    out["loss"].backward()
    assert all(p.grad is None for p in m.key_encoder.parameters())
    assert all(p.grad is not None for p in m.backbone.parameters())
    assert not m.queue.requires_grad
    ids = {id(p) for p in m.trainable_parameters()}
    assert not ids & {id(p) for p in m.key_encoder.parameters()}


def test_moco_momentum_update_happens_before_the_keys_with_the_current_online_weights():
    m = moco()
    with torch.no_grad():  # make online and key weights differ, as after some training
        for p in m.online_parameters():
            p.add_(0.01 * torch.randn_like(p))
    before_key, online = params(m.key_encoder), params(m.backbone) + params(m.projector)
    m.training_step(views())
    for k0, q, k1 in zip(before_key, online, m.key_encoder.parameters()):
        torch.testing.assert_close(k1, 0.99 * k0 + 0.01 * q)


def test_moco_logits_use_the_queue_from_before_the_batch_then_enqueue():
    m = moco()
    old_queue = m.queue.clone()
    x1, x2 = views()
    loss = m.training_step([x1, x2])["loss"]
    keys = m.queue[:, :B].T  # the batch's keys were written at the old pointer 0
    assert int(m.queue_ptr) == B
    torch.testing.assert_close(m.queue[:, B:], old_queue[:, B:])
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(B))
    q = m.query(x1)  # train-mode BN: same batch, same output
    torch.testing.assert_close(loss, info_nce(q, keys, old_queue, 0.1), rtol=1e-5, atol=1e-5)
    assert not torch.isclose(loss, info_nce(q, keys, m.queue, 0.1), rtol=1e-3)


def test_moco_queue_is_fifo_and_pointer_wraps():
    m = moco()
    batches = [F.normalize(torch.randn(B, 128), dim=1) for _ in range(5)]
    for i, k in enumerate(batches):
        m.enqueue(k)
        assert int(m.queue_ptr) == ((i + 1) * B) % 32
    # 5 batches into 4 slots: the 5th overwrote the 1st, the others stay in arrival order
    for slot, k in enumerate([batches[4], batches[1], batches[2], batches[3]]):
        torch.testing.assert_close(m.queue[:, slot * B : (slot + 1) * B], k.T)


def test_moco_queue_size_must_hold_whole_batches():
    with pytest.raises(UserError, match="queue_size = 36 must be a multiple of .* 8"):
        moco("method.queue_size=36", "optim.batch_size=8")
    with pytest.raises(UserError, match="x 2 for the symmetric loss"):
        moco("method.queue_size=24", "optim.batch_size=8", "method.symmetric=true")


def test_moco_symmetric_sums_both_directions_and_enqueues_both_key_batches():
    m = moco("method.symmetric=true")
    old_queue = m.queue.clone()
    x1, x2 = views()
    loss = m.training_step([x1, x2])["loss"]
    assert int(m.queue_ptr) == 2 * B
    k1, k2 = m.queue[:, :B].T, m.queue[:, B : 2 * B].T  # enqueued as [k1, k2]
    expected = info_nce(m.query(x1), k2, old_queue, 0.1) + info_nce(m.query(x2), k1, old_queue, 0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_moco_v1_head_is_linear_and_v2_head_is_mlp_without_bn():
    v1, v2 = method("moco_v1", "method.queue_size=32", "optim.batch_size=8"), moco()
    assert [type(l).__name__ for l in v1.projector] == ["Linear"]
    assert [type(l).__name__ for l in v2.projector] == ["Linear", "ReLU", "Linear"]
    assert v1.temperature == 0.1 and load_recipe("moco_v1")["loss"]["temperature"] == 0.07


def test_moco_rejects_a_loss_it_does_not_implement():
    with pytest.raises(UserError, match="loss.name"):
        moco("loss.name=nt_xent")


def test_moco_outputs_collapse_signal_and_projector_embedding():
    m = moco()
    out = m.training_step(views())
    assert 0 < out["z_std"].item() < 1
    assert m.embed(views()[0], "projector").shape == (B, 128)
    assert m.embed(views()[0]).shape == (B, 512)


# ---- AdCo -----------------------------------------------------------------------------------


def adco(*overrides: str):
    return method("adco", "method.bank_size=32", "method.bn_splits=2", *overrides)


def test_adco_closed_form_bank_gradient_equals_autograd_sign_included():
    g = torch.Generator().manual_seed(0)
    q, keys = F.normalize(torch.randn(6, 16, generator=g), dim=1), F.normalize(torch.randn(6, 16, generator=g), dim=1)
    bank = torch.randn(16, 40, generator=g) * torch.rand(40, generator=g) * 5  # columns of varied norm
    leaf = bank.clone().requires_grad_(True)
    loss = info_nce_global(q, keys, leaf, 0.02, torch.arange(6))
    (auto,) = torch.autograd.grad(loss, leaf)
    sims = torch.cat([q @ keys.T, q @ F.normalize(bank, dim=0)], 1)
    torch.testing.assert_close(bank_gradient(q, sims, bank, 0.02), auto, rtol=1e-4, atol=1e-6)


def random_pending(m, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random unit queries and global keys (d=128, N=B), as pending bank-step input. At this
    tiny scale real features of noise images are nearly identical, which would leave the bank
    no gradient to follow."""
    g = torch.Generator().manual_seed(seed)
    q, keys = (F.normalize(torch.randn(B, 128, generator=g), dim=1) for _ in range(2))
    m._pending[:] = [(q, keys_and_bank_similarities(q, keys, m.bank))]
    return q, keys, torch.arange(B)


def test_adco_bank_step_is_sgd_ascent_with_momentum_and_decay():
    m = adco()
    m.bank_velocity.normal_()  # a non-zero momentum buffer, as mid-training
    bank0, vel0 = m.bank.clone(), m.bank_velocity.clone()
    q, keys, target = random_pending(m)
    leaf = bank0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(info_nce_global(q, keys, leaf, 0.02, target), leaf)
    m.after_optimizer_step(Progress(0, 10, 0, 10))
    G = -grad  # the bank ASCENDS its loss
    vel = 0.9 * vel0 + G + 1e-4 * bank0
    torch.testing.assert_close(m.bank_velocity, vel, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.bank, bank0 - 3.0 * vel, rtol=1e-4, atol=1e-5)
    assert not m._pending


def test_adco_one_bank_step_raises_the_bank_loss_on_the_same_batch():
    m = adco()
    q, keys, target = random_pending(m)
    before = info_nce_global(q, keys, m.bank, 0.02, target)
    m.after_optimizer_step(Progress(0, 10, 0, 10))
    after = info_nce_global(q, keys, m.bank, 0.02, target)
    assert after > before + 0.01


def test_adco_step_keeps_the_pre_step_queries_and_logs_the_bank_loss():
    m = adco()
    x1, x2 = views()
    out = m.training_step([x1, x2])
    (q, sims), = m._pending
    assert not q.requires_grad and not sims.requires_grad
    torch.testing.assert_close(q, m.query(x1))
    torch.testing.assert_close(out["bank_loss"], F.cross_entropy(sims / 0.02, torch.arange(B)))


def test_adco_network_loss_has_batch_keys_as_negatives_with_the_positive_at_the_global_index():
    m = adco()
    x1, x2 = views()
    out = m.training_step([x1, x2])
    (q, sims), = m._pending
    assert sims.shape == (B, B + 32)
    # the keys' block: positives on the diagonal (rank 0), the other images' keys off it
    recomputed = F.cross_entropy(sims / 0.12, torch.arange(B))
    torch.testing.assert_close(out["loss"], recomputed)
    assert out["loss"].item() > F.cross_entropy(sims[:, [*range(B)]] / 0.12, torch.arange(B)).item()
    out["loss"].backward()
    assert all(p.grad is None for p in m.key_encoder.parameters())
    assert not m.bank.requires_grad and not m.bank_velocity.requires_grad


def test_adco_symmetric_halves_the_loss_and_averages_the_bank_gradient():
    m = adco("method.symmetric=true")
    bank0 = m.bank.clone()
    m.training_step(views())
    assert len(m._pending) == 2
    grads = [bank_gradient(q, s, bank0, 0.02) for q, s in m._pending]
    m.after_optimizer_step(Progress(0, 10, 0, 10))
    G = -(grads[0] + grads[1]) / 2
    torch.testing.assert_close(m.bank_velocity, G + 1e-4 * bank0, rtol=1e-4, atol=1e-6)


def test_adco_ad_init_fills_the_bank_with_keys_then_recopies_the_key_encoder():
    m = adco()
    online0 = params(m.backbone)
    batches = iter([views(seed=s) for s in range(10)])
    used = m.setup(batches)
    assert used == 32 // B
    torch.testing.assert_close(m.bank.norm(dim=0), torch.ones(32))  # every column is a unit key
    assert len({round(c, 5) for c in m.bank[0].tolist()}) == 32
    assert any(not torch.equal(a, b) for a, b in zip(online0, m.backbone.parameters()))  # SGD steps ran
    for q, k in zip(m.online_parameters(), m.key_encoder.parameters()):
        assert torch.equal(q, k)
    assert next(batches) is not None  # the rest of the stream is left for training


def test_adco_ad_init_off_or_short_stream():
    assert adco("method.ad_init=false").setup(iter([views()])) == 0
    m = adco()
    assert m.setup(iter([views()])) == 1
    torch.testing.assert_close(m.bank[:, :B].norm(dim=0), torch.ones(B))


# ---- SimCLR ---------------------------------------------------------------------------------


def test_simclr_head_is_the_projection_head_and_v2_is_a_recipe():
    m = method("simclr")
    names = [type(l).__name__ for l in m.projector]
    assert names == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert m.projector[3].bias is None and not m.projector[4].affine
    v2 = build_method(load_recipe("simclr", variant="v2", overrides=["encoder.name=resnet18", "head.projector_hidden=[512, 512]"]))
    assert sum(isinstance(l, torch.nn.Linear) for l in v2.projector) == 3


def test_simclr_step_loss_at_init_and_gradient_reaches_the_encoder():
    m = method("simclr")
    out = m.training_step(views())
    # at initialisation the two views' features are correlated: below the equal-logit value
    assert 0 < out["loss"].item() < 2 * math.log(2 * B - 1) + 0.5
    out["loss"].backward()
    assert all(p.grad is not None for p in m.backbone.parameters())
    assert m.embed(views()[0], "projector").shape == (B, 128)


def test_simclr_fused_views_share_bn_statistics_and_unfused_views_have_their_own():
    """fused_views (default): one backbone batch of 2B, BN over both views; false: BN per view.
    Same weights, train mode: the fused step equals a manual forward of cat(v1, v2), the unfused
    one a manual forward of each view alone, and the two differ."""
    from sslctl.losses.contrastive import nt_xent

    torch.manual_seed(0)
    fused = method("simclr")
    split = method("simclr", "method.fused_views=false")
    split.load_state_dict(fused.state_dict())
    x1, x2 = views()
    ref = copy.deepcopy(fused)  # train mode: BN normalises with the batch's own statistics

    def z(x):
        return F.normalize(ref.projector(ref.backbone(x)), dim=1)

    together, apart = nt_xent(*z(torch.cat([x1, x2])).chunk(2), fused.temperature), nt_xent(z(x1), z(x2), fused.temperature)
    torch.testing.assert_close(fused.training_step([x1, x2])["loss"], together)
    torch.testing.assert_close(split.training_step([x1, x2])["loss"], apart)
    assert not torch.allclose(together, apart)


# ---- BYOL -----------------------------------------------------------------------------------


def test_byol_target_is_a_frozen_copy_without_predictor_and_gets_no_gradient():
    m = method("byol")
    assert len(list(m.target.parameters())) == len(m.online_parameters())
    out = m.training_step(views())
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.target.parameters())
    assert all(p.grad is not None for p in m.predictor.parameters())
    assert 0 <= out["loss"].item() <= 8
    assert out["z_std"].item() > 0


def test_byol_target_runs_in_train_mode_with_its_own_bn_statistics():
    m = method("byol")
    bn_t = m.target[0].bn1
    n0 = int(bn_t.num_batches_tracked)
    m.training_step(views())
    assert int(bn_t.num_batches_tracked) == n0 + 2  # one forward per view, batch statistics


def test_byol_ema_after_the_step_follows_the_cosine_tau_schedule():
    m = method("byol")
    with torch.no_grad():
        for p in m.online_parameters():
            p.add_(0.1)
    target0, online = params(m.target), params(m.backbone) + params(m.projector)
    m.after_optimizer_step(Progress(step=30, total_steps=100, epoch=0, steps_per_epoch=100))
    tau = cosine_tau(0.99, 30, 100)
    assert tau == pytest.approx(1 - 0.01 * (math.cos(math.pi * 0.3) + 1) / 2)
    for t0, q, t1 in zip(target0, online, m.target.parameters()):
        torch.testing.assert_close(t1, tau * t0 + (1 - tau) * q)
    assert cosine_tau(0.99, 0, 100) == pytest.approx(0.99) and cosine_tau(0.99, 100, 100) == 1.0


def test_byol_loss_is_symmetric_regression():
    m = method("byol")
    m.eval()  # deterministic BN so the two orders can be compared
    x1, x2 = views()
    a = m.training_step([x1, x2])["loss"]
    b = m.training_step([x2, x1])["loss"]
    torch.testing.assert_close(a, b)


def test_every_founding_recipe_builds_its_method_with_the_small_variant():
    for name, cls in [("adco", "AdCo"), ("moco_v1", "MoCo"), ("moco_v2", "MoCo"), ("simclr", "SimCLR"), ("byol", "BYOL")]:
        assert type(method(name)).__name__ == cls


# ---- two real processes (gloo) --------------------------------------------------------------


def _two_process_worker(rank: int, init_file: str) -> None:
    import torch.distributed as tdist

    from sslctl import distributed as dist
    from sslctl.losses.contrastive import nt_xent

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        b, n = 4, 8
        mine = slice(rank * b, (rank + 1) * b)

        def same_everywhere(t: torch.Tensor) -> bool:
            return torch.equal(dist.gather_no_grad(t[None])[0], dist.gather_no_grad(t[None])[1])

        # shuffle-BN across ranks: every rank gets the whole batch's keys in rank order, unshuffled
        torch.manual_seed(0)
        enc = torch.nn.Linear(5, 3)
        x_all = torch.randn(n, 5)
        torch.manual_seed(100 + rank)  # per-rank RNG streams, as in training
        torch.testing.assert_close(shuffled_keys(enc, x_all[mine]), F.normalize(enc(x_all), dim=1))

        # NT-Xent with gather WITH gradient: the per-rank losses average to the global loss, and
        # each rank's gradient is W x the global loss's gradient on its slice (DDP then averages)
        g = torch.Generator().manual_seed(0)
        z1_all, z2_all = (F.normalize(torch.randn(n, 6, generator=g), dim=1) for _ in range(2))
        z1, z2 = z1_all[mine].clone().requires_grad_(True), z2_all[mine].clone().requires_grad_(True)
        loss = nt_xent(z1, z2, 0.3, z1_all=dist.gather_with_grad(z1), z2_all=dist.gather_with_grad(z2), rank=rank)
        loss.backward()
        ref1, ref2 = z1_all.clone().requires_grad_(True), z2_all.clone().requires_grad_(True)
        ref = nt_xent(ref1, ref2, 0.3)
        ref.backward()
        mean = dist.all_reduce_mean(loss.detach().clone())
        torch.testing.assert_close(mean, ref.detach())
        torch.testing.assert_close(z1.grad, 2 * ref1.grad[mine], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z2.grad, 2 * ref2.grad[mine], rtol=1e-5, atol=1e-6)

        # MoCo: built with a different seed per rank, the queue is still identical (broadcast);
        # after a step both ranks hold the same queue with the GLOBAL batch enqueued.
        torch.manual_seed(rank)
        m = build_method(load_recipe("moco_v2", variant="small", overrides=["method.queue_size=16", "optim.batch_size=8"]))
        assert not any(isinstance(mod, SplitBatchNorm) for mod in m.modules())  # real shuffle-BN instead
        assert same_everywhere(m.queue)
        torch.manual_seed(0)  # identical weights, as DDP would make them
        m = build_method(load_recipe("moco_v2", variant="small", overrides=["method.queue_size=16", "optim.batch_size=8"]))
        torch.manual_seed(100 + rank)
        m.training_step([torch.randn(b, 3, 16, 16), torch.randn(b, 3, 16, 16)])
        assert int(m.queue_ptr) == n and same_everywhere(m.queue)

        # AdCo: positive at the GLOBAL index; the bank step averages over ranks, so it equals the
        # one-process step on the whole batch, and the bank stays identical on every rank
        torch.manual_seed(rank)
        a = build_method(load_recipe("adco", variant="small", overrides=["method.bank_size=16"]))
        assert same_everywhere(a.bank)
        bank0 = a.bank.clone()
        q_all = F.normalize(torch.randn(n, 128, generator=g), dim=1)
        k_all = F.normalize(torch.randn(n, 128, generator=g), dim=1)
        loss = a.contrast(q_all[mine], k_all)
        torch.testing.assert_close(dist.all_reduce_mean(loss.detach().clone()),
                                   info_nce_global(q_all, k_all, bank0, 0.12, torch.arange(n)))
        a.after_optimizer_step(Progress(0, 1, 0, 1))
        assert same_everywhere(a.bank)
        one = bank_gradient(q_all, keys_and_bank_similarities(q_all, k_all, bank0), bank0, 0.02)
        torch.testing.assert_close(a.bank, bank0 - 3.0 * (-one + 1e-4 * bank0), rtol=1e-4, atol=1e-5)

        # ad_init runs outside DDP: its gradients are averaged by hand, so the ranks stay identical
        torch.manual_seed(0)
        a = build_method(load_recipe("adco", variant="small", overrides=["method.bank_size=16", "optim.batch_size=8"]))
        torch.manual_seed(100 + rank)
        assert a.setup(iter([[torch.randn(b, 3, 16, 16) for _ in range(2)] for _ in range(3)])) == 2
        assert same_everywhere(a.bank) and same_everywhere(torch.cat([p.flatten() for p in a.parameters()]))
    finally:
        tdist.destroy_process_group()


def test_two_processes_shuffle_bn_gather_with_grad_queue_and_bank(tmp_path):
    fork_ranks(_two_process_worker, str(tmp_path / "init"))


# ---- CUDA (skipped without a GPU) ---------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["moco_v1", "moco_v2", "adco", "simclr", "byol"])
def test_cuda_bf16_channels_last_steps(name):
    """What the engine does on a GPU: channels_last, bf16 autocast, the recipe's optimizer. Losses
    stay fp32, method state stays fp32 on the device, and a few steps change the weights."""
    from sslctl.optim import build_optimizer

    cfg = load_recipe(name, variant="small", overrides=["optim.batch_size=32"] + (
        ["method.queue_size=128"] if name.startswith("moco") else ["method.bank_size=64"] if name == "adco" else []))
    m = build_method(cfg).cuda().to(memory_format=torch.channels_last)
    opt = build_optimizer(m, cfg["optim"], 0.05)
    w0 = m.backbone.conv1.weight.detach().clone()
    batches = [[v.cuda().to(memory_format=torch.channels_last) for v in views(32, seed=s)] for s in range(4)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        m.setup(iter(batches))
    for step, vs in enumerate(batches):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m.training_step(vs)
        assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        m.after_optimizer_step(Progress(step, 4, 0, 4))
    for buf in ("queue", "bank", "bank_velocity"):
        if hasattr(m, buf):
            assert getattr(m, buf).dtype == torch.float32 and getattr(m, buf).is_cuda
            assert torch.isfinite(getattr(m, buf)).all()
    assert not torch.equal(w0, m.backbone.conv1.weight)


@pytest.mark.parametrize("recipe", ["moco_v2", "adco", "simclr", "byol"])
def test_every_method_builds_a_custom_encoder_with_its_section_options(recipe):
    """[encoder] keys a custom net takes (the AMDIM encoder's ndf, n_rkhs, depth) reach it in
    every method, not only in the local-feature ones."""
    cfg = load_recipe(recipe, variant="small")
    cfg["encoder"] = {"name": "amdim", "small_stem": False, "ndf": 8, "n_rkhs": 32, "depth": 1, "input_size": 32}
    backbone = build_method(cfg).backbone
    assert backbone.arch == "amdim"
    assert backbone.options == {"ndf": 8, "n_rkhs": 32, "depth": 1, "input_size": 32}
    assert backbone.feature_dim == 32
