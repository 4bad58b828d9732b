"""Real exporter output: PyTorch models exported with BN kept, at several opsets.

The reference is PyTorch itself in float64: BN layers are recalibrated one at a time in forward
order, each measured over all samples with every earlier BN already updated (biased variance) —
independent of bnfold's graph cutting, ORT and merging. bnfold must agree to 1e-4·σ (means) and
1e-4 relative (variances); the folded model must then match the unfolded one in ORT.

Skipped when torch is not installed (CI installs the pinned CPU wheel).
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import bnfold
from bnfold.folding.fold import fold_batchnorms
from bnfold.folding.verify import check_equivalent

torch = pytest.importorskip("torch")
nn = torch.nn
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter keeps BN nodes


class Net(nn.Module):
    """Conv(no bias)+BN, a residual block, grouped ConvTranspose+BN, Linear+BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.up = nn.Sequential(nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        x = self.up(x)
        return self.head(x.mean(dim=(2, 3)))


def _model() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial "old lab" statistics and affine parameters
        for bn in _batchnorms(net):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _batchnorms(net) -> list:
    return [m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]


def _export(net, opset: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        net, torch.zeros(2, 3, 8, 8), buffer, training=torch.onnx.TrainingMode.PRESERVE, dynamo=False,
        do_constant_folding=False, opset_version=opset, input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
    )
    return onnx.load_from_string(buffer.getvalue())


def _torch_exact(net, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """float64 layer-by-layer fixed point, in forward order; returns (mean, var) per BN."""
    net = _clone(net).double().eval()
    order, seen = [], []
    hooks = [bn.register_forward_pre_hook(lambda m, i: order.append(m)) for bn in _batchnorms(net)]
    with torch.no_grad():
        net(torch.from_numpy(x[:2]).double())
    for h in hooks:
        h.remove()
    for bn in order:
        if bn in seen:
            continue
        seen.append(bn)
        captured = []
        hook = bn.register_forward_pre_hook(lambda m, i: captured.append(i[0]))
        with torch.no_grad():
            net(torch.from_numpy(x).double())
        hook.remove()
        inputs = captured[0]
        axes = [0] + list(range(2, inputs.dim()))
        mean = inputs.mean(dim=axes)
        var = ((inputs - mean.view(1, -1, *[1] * (inputs.dim() - 2))) ** 2).mean(dim=axes)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return [(bn.running_mean.numpy(), bn.running_var.numpy()) for bn in seen]


def _clone(net):
    copy = Net()
    copy.load_state_dict(net.state_dict())
    return copy


@pytest.mark.parametrize("opset", [7, 8, 9, 11, 13, 17])
def test_pytorch_export_recalibrates_to_the_float64_fixed_point_and_folds(opset):
    net = _model()
    model = _export(net, opset)
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 5
    rng = np.random.default_rng(opset)
    x = (rng.standard_normal((40, 3, 8, 8)) * 1.7 + 0.4).astype(np.float32)  # a shifted "new lab"

    result = bnfold.recalibrate(model, x, batch_size=7)
    want = _torch_exact(net, x)
    got = [(layer.new_mean, layer.new_var) for layer in result.report.layers]  # graph order = forward order
    assert len(got) == len(want)
    for (gm, gv), (wm, wv) in zip(got, want):
        np.testing.assert_array_less(np.abs(gm - wm), 1e-4 * np.sqrt(wv) + 1e-9)
        np.testing.assert_array_less(np.abs(gv - wv), 1e-4 * wv + 1e-12)

    folded = fold_batchnorms(result.model)
    assert not any(n.op_type == "BatchNormalization" for n in folded.model.graph.node)
    check_equivalent(result.model, folded.model, [x[:16]])
    onnx.checker.check_model(folded.model, full_check=True)
    out = ort.InferenceSession(folded.model.SerializeToString()).run(None, {"x": x[:4]})[0]
    assert out.shape == (4, 3)


def test_a_train_mode_export_is_refused_naming_the_bn_and_the_fix():
    net = _model().train()  # BN exported with training_mode=1 and its (unused) running-stat outputs
    with pytest.raises(bnfold.UnsupportedModel, match=r"BatchNormalization '.*' runs in training mode.*model\.eval\(\)"):
        bnfold.recalibrate(_export(net, 15), np.zeros((4, 3, 8, 8), np.float32))
