"""Tests for pneumojax.gradcam: exact gradients at a stage, the CAM identity, the sign of the
NORMAL target, a stage without gradient refused, a model-randomisation sanity check, and
localisation of phantom lesions (pneumojax.localisation)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import ndimage, stats

from pneumojax import data, gradcam, inference, localisation, models
from pneumojax.data import augment
from pneumojax.models import stages
from pneumojax.models.cnn import ConvBlock


def _split(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, {"params": params, "rest": rest}


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def shallow() -> tuple[nnx.Module, nnx.GraphDef, dict]:
    """tiny_config's ShallowCNN. Models are shared: each fresh parameter shape costs seconds
    of RNG compilation on a 2-core CPU."""
    model = models.create("shallow_cnn", width=4, rngs=nnx.Rngs(0))
    return model, *_split(model)


@pytest.fixture(scope="module")
def restored(trained):
    model = inference.load(trained)
    config, graphdef, state = model.config, model.graphdef, model.state
    return config, graphdef, state


@pytest.mark.gpu
def test_normal_target_negates_the_pneumonia_gradient(restored):
    _, graphdef, state = restored
    images = _images(4)
    pre = {}
    for target in gradcam.TARGETS:
        _, a, g = jax.jit(functools.partial(gradcam.activation_gradients, graphdef,
                                            layer="block3", target=target))(state, images)
        pre[target] = np.asarray((a * g).sum(-1))
    np.testing.assert_array_equal(pre["NORMAL"], -pre["PNEUMONIA"])
    assert np.abs(pre["PNEUMONIA"]).max() > 0
    out = {t: gradcam.cams(graphdef, state, images, layer="block3", target=t, method="hirescam")
           for t in gradcam.TARGETS}
    np.testing.assert_array_equal(out["NORMAL"]["probability"], out["PNEUMONIA"]["probability"])
    np.testing.assert_array_equal(out["NORMAL"]["score"], -out["PNEUMONIA"]["score"])
    # relu(M) - relu(-M) = M: the two post-ReLU maps are the halves of one signed map.
    np.testing.assert_allclose(out["PNEUMONIA"]["raw"] - out["NORMAL"]["raw"], pre["PNEUMONIA"],
                               rtol=1e-5, atol=1e-6)


def test_maps_change_when_the_top_stage_is_randomised(restored, synthetic):
    """Adebayo et al. (2018): a map that survives re-initialising the weights it explains
    is not explaining them. The top block, hidden layer and head are re-drawn, four times.

    A re-drawn head often weighs every channel negatively, and Grad-CAM's ReLU then leaves an
    all-zero map, which has no ranks: those images count as changed, and the correlation is
    averaged over the others.
    """
    config, graphdef, state = restored
    layer = gradcam.config_layer(config)
    top = (f"['blocks'][{int(layer.removeprefix('block')) - 1}]", "['hidden']", "['head']")
    source = data.data_source(synthetic[1], "validation", data_dir=synthetic[0])
    images = np.stack([source[i]["image"] for i in range(len(source))])
    before = np.asarray(gradcam.cams(graphdef, state, images, layer=layer)["maps"])
    rho = []
    for seed in range(1, 5):
        fresh = nnx.split(inference.create_model(config, seed), nnx.Param, ...)[1]
        params = jax.tree.map_with_path(
            lambda path, old, new: new if jax.tree_util.keystr(path).startswith(top) else old,
            state["params"], fresh)
        after = np.asarray(gradcam.cams(graphdef, dict(state, params=params), images,
                                        layer=layer)["maps"])
        rho += [stats.spearmanr(b.ravel(), a.ravel())[0] if a.max() > 0 else np.nan
                for b, a in zip(before, after)]
    rho = np.array(rho)
    ranked = rho[np.isfinite(rho)]
    print(f"\nmean Spearman, original vs randomised top stage: {ranked.mean():.3f} over "
          f"{ranked.size} of {rho.size} (image, draw) pairs; the other maps vanished")
    assert (before.max((1, 2)) > 0).all()
    assert ranked.size >= 10
    assert ranked.mean() < 0.5


class _TwoBlocks(nnx.Module):
    """DeepCNN's blocks without its float32 pooling and logit casts, so the score can be
    finite-differenced in float64; `rest` recomputes the score from block1 independently.
    Parameters stay float32 (their RNG compiles are the trained DeepCNN's); compute is float64.
    """

    def __init__(self, rngs: nnx.Rngs):
        self.blocks = nnx.List([ConvBlock(1, 4, dtype=jnp.float64, rngs=rngs),
                                ConvBlock(4, 4, dtype=jnp.float64, rngs=rngs)])
        self.head = nnx.Linear(4, 1, dtype=jnp.float64, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
        out = {}
        return self.rest(stages.stage(out, "block1", self.blocks[0](x))), out

    def rest(self, block1: jax.Array) -> jax.Array:
        return self.head(self.blocks[1](block1).mean(axis=(1, 2)))[:, 0]


@pytest.mark.gpu
def test_stage_gradient_matches_central_differences():
    model = _TwoBlocks(nnx.Rngs(0))
    graphdef, state = _split(model)
    with jax.enable_x64(True):
        logits, a, g = jax.jit(functools.partial(gradcam.activation_gradients, graphdef,
                                                 layer="block1"))(state, _images(2, 16))
        assert a.dtype == g.dtype == jnp.float64
        rest = nnx.jit(_TwoBlocks.rest)
        np.testing.assert_allclose(rest(model, a), logits, rtol=1e-12)
        a, g = np.asarray(a), np.asarray(g)
        rng = np.random.default_rng(0)
        # Max-pooling zeroes 3/4 of the gradient: half the probes are where it is not.
        probes = np.r_[rng.choice(g.size, 4, replace=False),
                       rng.choice(np.flatnonzero(g), 4, replace=False)]
        eps = 1e-5
        for flat in probes:
            e = np.zeros(a.size)
            e[flat] = eps
            e = e.reshape(a.shape)
            fd = (rest(model, a + e).sum() - rest(model, a - e).sum()) / (2 * eps)
            np.testing.assert_allclose(g.flat[flat], fd, rtol=1e-3, atol=1e-10)


def test_gradcam_on_last_stage_of_a_gap_head_is_cam(shallow):
    """ShallowCNN is block3 -> GAP -> dense, so dS/dA = w / (h w) everywhere and Grad-CAM is
    CAM (Zhou et al. 2016) divided by h w: the textbook identity, exactly."""
    model, graphdef, state = shallow
    images = _images(4)
    out = gradcam.cams(graphdef, state, images, layer="block3")
    a = np.asarray(model(augment.to_float(images))[1]["block3"])
    cam = np.maximum(np.einsum("bhwc,c->bhw", a, np.asarray(model.head.kernel[...])[:, 0]), 0)
    raw = np.asarray(out["raw"])
    assert cam.max() > 0
    assert np.corrcoef(raw.ravel(), cam.ravel())[0, 1] > 0.9999
    np.testing.assert_array_equal(raw.reshape(4, -1).argmax(1), cam.reshape(4, -1).argmax(1))
    np.testing.assert_allclose(raw * (a.shape[1] * a.shape[2]), cam, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_batched_equals_one_by_one_and_compiles_once(shallow, monkeypatch):
    _, graphdef, state = shallow
    traces = []
    monkeypatch.setattr(augment, "to_float", lambda x: traces.append(1) or x / 255.0)
    images = _images(3, 40)  # a shape no other test compiles
    batched = gradcam.cams(graphdef, state, images, layer="block2", method="gradcam++")
    assert len(traces) == 1
    again = gradcam.cams(graphdef, state, images, layer="block2", method="gradcam++")
    assert len(traces) == 1
    for key in batched:
        np.testing.assert_array_equal(again[key], batched[key])
        single = np.concatenate([
            gradcam.cams(graphdef, state, images[i:i + 1], layer="block2",
                         method="gradcam++")[key] for i in range(3)])
        np.testing.assert_allclose(single, batched[key], rtol=1e-5, atol=1e-6)


def test_default_layer_and_errors(shallow):
    # The last stage with a grid of at least 7x7 at the input size.
    assert gradcam.default_layer("shallow_cnn", 64) == "block3"  # 8x8
    assert gradcam.default_layer("deep_cnn", 64) == "block3"  # block4 is 4x4
    assert gradcam.default_layer("deep_cnn", 128) == "block4"
    assert gradcam.default_layer("deep_cnn", 64, widths=(4, 8, 8)) == "block3"
    assert gradcam.default_layer("deep_cnn", 16) == "block1"  # none is fine enough: the finest
    assert gradcam.default_layer("resnet50", 224, width=4, stage_sizes=(1, 1, 1, 1)) == "stage4"
    assert gradcam.default_layer("resnet50", 128, width=4, stage_sizes=(1, 1, 1, 1)) == "stage3"
    _, graphdef, state = shallow
    with pytest.raises(ValueError, match="block1, block2, block3"):
        gradcam.cams(graphdef, state, _images(1), layer="pre_logits")
    with pytest.raises(ValueError, match="unknown method"):
        gradcam.cams(graphdef, state, _images(1), layer="block3", method="scorecam")
    with pytest.raises(ValueError, match="unknown target"):
        gradcam.cams(graphdef, state, _images(1), layer="block3", target="pneumonia")


class _Beside(nnx.Module):
    """A conv, global pooling and a dense head. Stage "conv" is the tensor the head reads;
    "copy" is recorded beside the computation (`y * 1.0`), so the logit does not depend on it."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 2, (3, 3), rngs=rngs)
        self.head = nnx.Linear(2, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
        out = {}
        y = stages.stage(out, "conv", nnx.relu(self.conv(x)))
        out["copy"] = y * 1.0
        return self.head(y.mean(axis=(1, 2)))[:, 0], out


def test_a_stage_without_gradient_is_refused_and_a_map_without_evidence_is_not():
    model = _Beside(nnx.Rngs(0))
    images = _images(2, 8)
    model.head.kernel[...] = jnp.abs(model.head.kernel[...])
    graphdef, state = _split(model)
    for method in gradcam.METHODS:
        with pytest.raises(ValueError, match=r"^stage 'copy' has no gradient: .* its activation "
                                             r"does not reach the logit .*stages\.py\)$"):
            gradcam.cams(graphdef, state, images, layer="copy", method=method)
        assert np.asarray(gradcam.cams(graphdef, state, images, layer="conv",
                                       method=method)["maps"]).max() == 1
    # Every weight negative on activations >= 0: a gradient everywhere, but no positive
    # evidence, so the maps are blank after the ReLU, as they should be: not refused.
    model.head.kernel[...] = -model.head.kernel[...]
    graphdef, state = _split(model)
    _, _, g = gradcam.activation_gradients(graphdef, state, images, layer="conv")
    assert (np.asarray(g) < 0).all()
    out = gradcam.cams(graphdef, state, images, layer="conv")
    assert not np.asarray(out["raw"]).any() and not np.asarray(out["maps"]).any()


@pytest.mark.gpu
def test_training_ends_with_a_grid_of_each_confusion_cell(restored, trained, synthetic,
                                                          monkeypatch):
    assert (trained / "plots" / "gradcam_validation.png").stat().st_size > 0
    config, graphdef, state = restored
    source = data.data_source(synthetic[1], "validation", data_dir=synthetic[0])
    labels = np.array([source[i]["label"] for i in range(len(source))])
    probs = np.random.default_rng(0).uniform(size=len(labels))
    probs[labels == 0] /= 2  # one false positive only: its row has an empty slot
    probs[np.flatnonzero(labels == 0)[0]] = 0.9
    probs[labels == 1] = 0.5 + probs[labels == 1] / 2  # no false negative: an empty row
    drawn = {}
    monkeypatch.setattr(inference.plots, "image_grid",
                        lambda images, path, **kw: drawn.update(kw, images=images))
    model = inference.Model(config, graphdef, state, 0.5, 1.0, 0, {})
    inference.gradcam_grid(model, source, labels, probs, np.arange(len(labels)),
                           trained / "unused.png", per_cell=2)
    expected, kinds = [], []
    for name, truth, pred in (("TP", 1, True), ("FN", 1, False), ("FP", 0, True),
                              ("TN", 0, False)):
        rows = [i for i in np.argsort(-probs) if labels[i] == truth and (probs[i] >= 0.5) == pred]
        rows = (rows if pred else rows[::-1])[:2]  # most confident first
        expected += rows + [None] * (2 - len(rows))  # one row per cell
        kinds += [(name, pred)] * 2
    assert drawn["titles"] == [
        f"{k} p={probs[i]:.2f}" if i is not None
        else f"no {k}" if slot == 0 else ""  # an empty cell's row is labelled once
        for slot, ((k, _), i) in zip([0, 1] * 4, zip(kinds, expected))]
    assert None not in expected[:2] and expected[2:4] == [None, None]  # full and empty rows
    assert expected[4] is not None and expected[5] is None  # and a row with one empty slot
    blank = np.full_like(source[0]["image"], 255)
    images = np.stack([source[int(i)]["image"] if i is not None else blank for i in expected])
    np.testing.assert_array_equal(drawn["images"], images)
    layer = gradcam.config_layer(config)
    for row, ((_, pred), i) in enumerate(zip(kinds, expected)):  # the predicted class's map
        if i is None:
            assert not drawn["overlays"][row].any()
            continue
        want = gradcam.cams(graphdef, state, images[row:row + 1], layer=layer,
                            target="PNEUMONIA" if pred else "NORMAL")["maps"][0]
        np.testing.assert_allclose(drawn["overlays"][row], want, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def phantom_model(tmp_path_factory) -> dict:
    """The default model of experiments/localisation.py (`localisation.phantom_config`): a
    DeepCNN trained on 320 64 px phantoms (its last stage is 8x8), with its held-out images
    and their lesion masks."""
    config = localisation.phantom_config(tmp_path_factory.mktemp("phantoms64"))
    return localisation.trained_model(config, tmp_path_factory.mktemp("localisation"))


def _scores(model: dict, what: str, method: str = gradcam.METHODS[0]) -> dict[str, float]:
    result = localisation.measure(model, method=method)
    print(f"\nlocalisation on PNEUMONIA phantoms, {what}: " + ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result


@pytest.fixture(scope="module")
def localisation_scores(phantom_model) -> dict[str, float]:
    return _scores(phantom_model, "labels only")


@pytest.fixture(scope="module")
def lesion_trained_scores(tmp_path_factory) -> dict[str, dict[str, float]]:
    """A DeepCNN whose evidence lies in the lesions by construction: its logit pools per-cell
    scores that were trained on the masks too (`--head lesion --lesion-weight 10`), on 640
    phantoms, ~1 min. Its held-out maps must find what it was taught to look at."""
    config = localisation.phantom_config(
        tmp_path_factory.mktemp("phantoms640"), count=640, widths=(16, 32), pool_r=10.0,
        head="lesion", lesion_weight=10.0)
    model = localisation.trained_model(config, tmp_path_factory.mktemp("lesion_trained"))
    return {m: _scores(model, f"trained on the masks, {m}", m) for m in gradcam.METHODS}


def test_localisation_refuses_a_workdir_of_another_run(tmp_path):
    (tmp_path / "config.json").write_text(
        localisation.phantom_config(tmp_path / "data").to_json_best_effort())
    (tmp_path / "checkpoints" / "30").mkdir(parents=True)  # a run to resume, not an empty claim
    with pytest.raises(ValueError, match=r"holds a run of another config \(train\.epochs is "
                                         r"10\.0 there, 12\.0 here\); use another workdir"):
        localisation.trained_model(localisation.phantom_config(tmp_path / "data", epochs=12),
                                   tmp_path)


def test_peaks_tell_near_misses_from_hits():
    masks = np.zeros((2, 16, 16), bool)
    masks[:, 4:8, 4:8] = True
    maps = np.zeros((2, 16, 16), np.float32)
    maps[0, 5, 6] = 1.0  # inside
    maps[1, 5, 10] = 1.0  # 3 px right of the mask's last column
    dilated = np.stack([ndimage.binary_dilation(m, iterations=2) for m in masks])
    assert localisation.peaks(maps, masks, dilated) == dict(
        pointing=0.5, peak_in_mask=0.5, peak_distance=1.5)
    dilated = np.stack([ndimage.binary_dilation(m, iterations=3) for m in masks])
    assert localisation.peaks(maps, masks, dilated)["pointing"] == 1.0


@pytest.mark.slow
def test_deletion_of_salient_pixels_costs_more_than_random_pixels(phantom_model):
    """The deletion test of experiments/deletion.py, on the phantoms: blurring the 20 % of
    pixels a map ranks highest must lower P(PNEUMONIA) more than blurring 20 % at random."""
    m = phantom_model
    p = {}
    for method in gradcam.METHODS:
        maps = gradcam.cams(m["graphdef"], m["state"], m["images"], layer=m["layer"],
                            method=method)["maps"]
        p[method] = {k: np.asarray(v) for k, v in gradcam.deletion(
            m["graphdef"], m["state"], m["images"], maps).items()}
    r = gradcam.deletion_summary(dict(p[gradcam.METHODS[0]], label=m["labels"]))
    print(f"\ndeletion on phantoms ({gradcam.METHODS[0]}): {r}")
    sick = r["PNEUMONIA"]
    assert sick["drop_salient"] > sick["drop_random"] + 0.05
    assert sick["difference_ci95"][0] > 0 and sick["share_salient_larger"] > 0.7
    # Blurring the same pixels gives the same probabilities; only the ranking differs.
    for method in gradcam.METHODS:
        np.testing.assert_array_equal(p[method]["original"], p[gradcam.METHODS[0]]["original"])
        np.testing.assert_array_equal(p[method]["random"], p[gradcam.METHODS[0]]["random"])


def test_deletion_blurs_exactly_the_top_fraction(shallow, monkeypatch):
    _, graphdef, state = shallow
    images = _images(2, 20)
    maps = np.zeros((2, 20, 20), np.float32)
    maps[:, :4, :] = 1.0  # 80 of 400 pixels: exactly the top 20 %
    seen = []
    real = gradcam._compiled_deletion.__wrapped__

    def spy(graphdef, count, sigma, intensity):
        seen.append((count, sigma))
        return real(graphdef, count, sigma, intensity)

    monkeypatch.setattr(gradcam, "_compiled_deletion", spy)
    p = gradcam.deletion(graphdef, state, images, maps, fraction=0.2)
    assert seen == [(80, 20 / 16)]
    model = nnx.merge(graphdef, state["params"], state["rest"])
    x = augment.to_float(jnp.asarray(images))
    expected = x.at[:, :4].set(gradcam.gaussian_blur(x, 20 / 16)[:, :4])
    np.testing.assert_allclose(p["salient"], jax.nn.sigmoid(model(expected)[0]), rtol=1e-5)
    np.testing.assert_allclose(p["original"], jax.nn.sigmoid(model(x)[0]), rtol=1e-5)
    assert not np.allclose(p["random"], p["salient"])
    with pytest.raises(ValueError, match="must be"):
        gradcam.deletion(graphdef, state, images, maps[:, :10])


@pytest.mark.slow
def test_gradcam_localises_phantom_lesions(localisation_scores):
    r = localisation_scores
    assert r["auc"] >= 0.9, "the model did not learn; its maps would test nothing"
    assert r["pointing"] >= max(0.5, 4 * r["area_dilated"])
    assert r["mass"] >= 2 * r["area"]


@pytest.mark.slow
@pytest.mark.parametrize("method,floor", [("hirescam", 0.8), ("gradcam", 0.75)])
def test_gradcam_meets_the_issue_localisation_goals(lesion_trained_scores, method, floor):
    """Pointing >= 90 % and >= 50 % of the map's mass in the masks, on a model trained on the
    phantoms and their masks. Over seeds 0-2 this model gives 97-100 % pointing, and 90-94 %
    of the mass with HiResCAM, 82-85 % with Grad-CAM. `floor` sits under those, and above
    what an error gives: seed 0's HiResCAM maps moved one cell (4 px) keep 53 % of the mass
    and 95 % pointing, and the NORMAL target's maps 3 % and 5 %."""
    r = lesion_trained_scores[method]
    assert r["auc"] >= 0.9, "the model did not learn; its maps would test nothing"
    assert r["layer"] == "block2" and r["grid"] == 16
    assert r["pointing"] >= 0.9 and r["mass"] >= 0.5  # the issue's goals
    assert r["mass"] >= floor


@pytest.mark.slow
def test_gradcam_pp_points_at_the_lesions_of_the_mask_trained_model(lesion_trained_scores):
    """Grad-CAM++ peaks on the lesions too, but holds only 11-14 % of its mass there (seeds
    0-2): it keeps the gradients' positive parts alone, which drops the channels that count
    against PNEUMONIA and cancel the lung around a lesion (Grad-CAM without its negative
    channel weights falls from 82 % to 13 % on seed 0). The method's doing, as defined."""
    assert lesion_trained_scores["gradcam++"]["pointing"] >= 0.9


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "labels alone do not place a model's evidence on the lesion, so its maps need not be "
    "there: this 30 s model points at ~78 % with ~11 % of its map's mass in the masks. "
    "experiments/results/localisation.json: with mean pooling no model holds 20 % (16-32-32, "
    "1,200 phantoms, 15 epochs: pointing 97.4 %, mass 17 %). Log-sum-exp pooling (pool_r=10) "
    "gives 19-62 % over the 10 of 12 seeded runs that trained, median 38 %; only 3 of 12 meet "
    "both goals; at 128 px, 3 blocks gave 24.9-58.5 % over 3 seeds and 2 blocks 49.6 and "
    "59.7 % (pointing under 90 %) with one run untrained. No seed is a fair test"))
def test_a_model_trained_on_labels_alone_meets_the_localisation_goals(localisation_scores):
    r = localisation_scores
    assert r["pointing"] >= 0.9 and r["mass"] >= 0.5
