"""FID exactly as the papers compute it: the Inception front-ends and the square-root rules.

* 'tf1-bilinear' (EDM / StyleGAN3 / SiD, NVIDIA's TorchScript): TensorFlow 1's legacy bilinear
  resize, checked against `tf.compat.v1.image.resize_bilinear` itself, and the whole detector
  against the network run on TensorFlow-resized input.
* 'gigagan-clean-fid' (SiD-LSG's COCO FID): clean-fid's per-channel float PIL bicubic resize,
  checked against PIL and against an independent numpy model of PIL's antialiased bicubic
  filter; `make-ref` on a folder of mixed-size images.
* The square-root rules ('real', 'pytorch-fid', 'clean-fid') on covariances where they differ.

The detector is a random-weight Inception at batch 8 on the evaluation CLI's mesh, so the CLI runs
reuse the programs compiled here (one per front-end: 'tf1-bilinear' and 'gigagan-clean-fid').
"""

import json

import jax
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from sid_jax import evaluate
from sid_jax.evaluation import features, frechet, metrics, protocols
from sid_jax.nets import inception
from tests.test_metrics import _random_inception_state_dict

SIZE = inception.FID_INPUT_SIZE


def _tf_resize(images, size=(SIZE, SIZE)):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.compat.v1.image.resize_bilinear(images, size, align_corners=False,
                                            half_pixel_centers=False).numpy()


def _float_ulps(x):
  """A few float32 units in the last place of the largest value: float32 rounding."""
  return 4 * float(np.spacing(np.float32(np.abs(x).max())))


# ---------------------------------------------------------------------------------------------
# TF1 legacy bilinear resize.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 64, 64, 3), (1, 512, 512, 3),
                                   (1, 7, 10, 3)])
def test_tf1_bilinear_resize_matches_tensorflow(shape):
  x = np.random.default_rng(shape[1]).uniform(0, 255, shape).astype(np.float32)
  expected = _tf_resize(x)
  ours = np.asarray(jax.jit(lambda v: inception.resize_bilinear_tf1(v, (SIZE, SIZE)))(x))
  assert ours.shape == expected.shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, rtol=0, atol=_float_ulps(expected))
  # pytorch-fid's resize (half-pixel centres) is another image: the front-ends differ.
  torch_style = np.asarray(inception.resize_bilinear(x, (SIZE, SIZE)))
  assert np.abs(torch_style - expected).max() > 10


def test_tf1_front_end_input_is_tensorflow_resize_then_minus_128_over_128():
  images = np.random.default_rng(1).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
  expected = (_tf_resize(images.astype(np.float32)) - 128) / 128
  ours = np.asarray(inception.front_end_input(images, "tf1-bilinear"))
  np.testing.assert_allclose(ours, expected, rtol=0, atol=_float_ulps(expected))
  with pytest.raises(TypeError, match="uint8"):
    inception.preprocess_uint8_tf1(images.astype(np.float32))
  with pytest.raises(ValueError, match="Unknown Inception front-end 'tf2'"):
    inception.front_end_input(images, "tf2")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / "inception.npz"
  np.savez(path, **_random_inception_state_dict(seed=2))
  return str(path)


@pytest.fixture(scope="module")
def clean_detector(weights_file):
  """The 'gigagan-clean-fid' extractor the CLI builds (its mesh, batch 8)."""
  mesh = evaluate._default_mesh()  # pylint: disable=protected-access
  return features.InceptionFeatures(features.load_inception_variables(weights_file), mesh,
                                    batch_size=8, front_end="gigagan-clean-fid")


def _network_pool(clean_detector, images_0_255):
  """Pool features of the network on (x - 128) / 128 of float [n, 299, 299, 3] images in
  [0, 255], through the device part of the clean-fid front-end (no host resize)."""
  # pylint: disable-next=protected-access
  outputs, n = clean_detector._dispatch(np.asarray(images_0_255, np.float32))
  return np.asarray(jax.device_get(outputs)["pool"], np.float64)[:n]


def test_clean_fid_device_part_is_minus_128_over_128():
  x = np.random.default_rng(3).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
  np.testing.assert_array_equal(inception.front_end_input(x, "gigagan-clean-fid"),
                                (x - 128) / 128)
  with pytest.raises(ValueError, match="resized to 299x299 on the host"):
    inception.front_end_input(x[:, :32, :32], "gigagan-clean-fid")


def test_edm_and_sid_protocols_run_the_tf1_front_end(weights_file, clean_detector):
  for name in ("edm-fid50k", "sid-fid50k-full", "is50k", "pr50k3", "kid50k"):
    p = protocols.get(name)
    assert p.front_end == "tf1-bilinear" and p.resize == protocols.RESIZE_TF1_BILINEAR_299, name
  for name in ("edm-fid50k", "sid-fid50k-full"):
    assert protocols.get(name).param("sqrtm") == "real"
  torch_fid = protocols.get("pytorch-fid50k")
  assert torch_fid.front_end == "pytorch-fid" and torch_fid.param("sqrtm") == "pytorch-fid"
  assert torch_fid.resize == protocols.RESIZE_BILINEAR_299

  images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  variables = features.load_inception_variables(weights_file)
  mesh = evaluate._default_mesh()  # pylint: disable=protected-access
  tf1 = features.InceptionFeatures(variables, mesh, batch_size=8)  # the default: EDM's
  assert tf1.front_end == "tf1-bilinear"
  ours = tf1(images)["pool"]
  # The network on TensorFlow's resize of the images, mapped by (x - 128) / 128.
  expected = _network_pool(clean_detector, _tf_resize(images.astype(np.float32)))
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  # pytorch-fid's resize would give other features.
  torch_resized = np.asarray(inception.resize_bilinear(images.astype(np.float32), (SIZE, SIZE)))
  other = _network_pool(clean_detector, torch_resized)
  assert np.abs(other - ours).max() > 1e-2 * np.abs(ours).max()
  with pytest.raises(ValueError, match="Unknown Inception front-end"):
    features.InceptionFeatures(variables, mesh, batch_size=8, front_end="clean")


# ---------------------------------------------------------------------------------------------
# clean-fid's resize (coco2014-fid30k-clean).
# ---------------------------------------------------------------------------------------------


def _keys_cubic(x, a=-0.5):
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _pil_bicubic_matrix(in_size, out_size):
  """PIL's antialiased BICUBIC resampling along one axis, written out: output cell i averages
  the inputs around its centre (i + 0.5) * scale with the Keys cubic (a = -0.5) stretched by
  the downscale factor, weights normalised to sum to 1."""
  scale = in_size / out_size
  stretch = max(scale, 1.0)
  support = 2.0 * stretch
  m = np.zeros((out_size, in_size))
  for i in range(out_size):
    centre = (i + 0.5) * scale
    lo = max(int(centre - support + 0.5), 0)
    hi = min(int(centre + support + 0.5), in_size)
    j = np.arange(lo, hi)
    w = _keys_cubic((j - centre + 0.5) / stretch)
    m[i, lo:hi] = w / w.sum()
  return m


@pytest.mark.parametrize("height,width", [(64, 48), (512, 512), (256, 256)])
def test_clean_resize_is_pil_bicubic_on_float_channels(height, width):
  image = np.random.default_rng(height + width).integers(0, 256, (height, width, 3),
                                                          dtype=np.uint8)
  ours = features.clean_resize(image)
  assert ours.shape == (SIZE, SIZE, 3) and ours.dtype == np.float32
  # PIL itself, channel by channel on mode 'F' images.
  for c in range(3):
    pil = Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
    direct = np.asarray(pil.resize((SIZE, SIZE), Image.BICUBIC), np.float32).clip(0, 255)
    np.testing.assert_array_equal(ours[:, :, c], direct)
  # The filter PIL applies: antialiased Keys bicubic, width first then height, no quantisation.
  rows, cols = _pil_bicubic_matrix(height, SIZE), _pil_bicubic_matrix(width, SIZE)
  model = np.einsum("ih,hwc->iwc", rows, image.astype(np.float64))
  model = np.einsum("iwc,jw->ijc", model, cols).clip(0, 255)
  np.testing.assert_allclose(ours, model, rtol=0, atol=2e-3)
  assert np.abs(ours - np.round(ours)).max() > 0.1  # float output, not uint8
  # PIL's uint8 RGB resize (quantised) is not clean-fid's.
  quantised = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BICUBIC))
  assert np.abs(quantised - ours).max() > 0.4


def test_clean_resize_clips_the_bicubic_overshoot():
  image = np.zeros((40, 40, 3), np.uint8)
  image[:, ::2] = 255  # stripes: bicubic overshoots both ways
  raw = np.asarray(Image.fromarray(image[:, :, 0].astype(np.float32), mode="F").resize(
      (SIZE, SIZE), Image.BICUBIC))
  assert raw.min() < 0 and raw.max() > 255
  ours = features.clean_resize(image)
  assert ours.min() == 0 and ours.max() == 255


def test_gigagan_crop_then_lanczos_256():
  image = np.random.default_rng(7).integers(0, 256, (300, 200, 3), dtype=np.uint8)
  ours = features.gigagan_crop_resize(image)
  # The long edge (height 300) is cropped to the centre 200 rows: offset round(100 / 2) = 50.
  expected = np.asarray(Image.fromarray(image[50:250]).resize((256, 256), Image.LANCZOS))
  np.testing.assert_array_equal(ours, expected)
  wide = image.transpose(1, 0, 2)  # 200 x 300: the centre 200 columns
  np.testing.assert_array_equal(features.gigagan_crop_resize(wide), np.asarray(
      Image.fromarray(wide[:, 50:250]).resize((256, 256), Image.LANCZOS)))
  square = np.concatenate([image[:256], image[:256]], axis=1)[:, :256]  # already 256 x 256
  np.testing.assert_array_equal(features.gigagan_crop_resize(square), square)
  np.testing.assert_array_equal(features.gigagan_clean_fid_input(image),
                                features.clean_resize(expected))


def _mixed_folder(root):
  """Five images of four sizes and three modes, as in COCO's val2014 (RGB, grey, palette)."""
  rng = np.random.default_rng(11)
  folder = root / "val2014"
  folder.mkdir()
  rgb = []
  for i, (h, w, mode) in enumerate([(40, 30, "RGB"), (64, 64, "L"), (20, 50, "RGB"),
                                    (33, 33, "P"), (40, 30, "RGB")]):
    if mode == "L":
      pil = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    elif mode == "P":
      pil = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).quantize(16)
    else:
      pil = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    pil.save(folder / f"COCO_val2014_{i:012d}.png")
    rgb.append(np.asarray(pil.convert("RGB")))
  return folder, rgb


def test_make_ref_of_mixed_size_images_with_the_clean_fid_protocol(tmp_path, capsys, weights_file,
                                                                    clean_detector):
  folder, rgb = _mixed_folder(tmp_path)
  weights = weights_file
  stats = str(tmp_path / "coco_ref.npz")
  # EDM's protocol resizes on the device and refuses mixed sizes, naming the file.
  with pytest.raises(evaluate.EvaluationError, match="has shape .* all images must have one"):
    evaluate.run(["sid_jax.evaluate", "make-ref", f"--images={folder}",
                  f"--inception={weights}", f"--out={stats}", "--batch=8"])
  capsys.readouterr()
  record = evaluate.run(["sid_jax.evaluate", "make-ref", f"--images={folder}",
                         f"--inception={weights}", f"--out={stats}", "--batch=8",
                         "--fid_protocol=coco2014-fid30k-clean", "--save_features"])
  out = capsys.readouterr().out
  assert json.loads(out.splitlines()[0])["protocol"] == "coco2014-fid30k-clean"
  assert "| coco2014-fid30k-clean |" in out
  assert record["num"] == 5 and record["front_end"] == "gigagan-clean-fid"
  assert record["detector_weights"]["front_end"] == "gigagan-clean-fid"
  assert any("any image sizes" in note for note in record["source"]["notes"])
  ref = metrics.load_ref_stats(stats)
  assert ref.protocol == "coco2014-fid30k-clean"
  assert ref.resize == protocols.RESIZE_GIGAGAN_CLEAN_299
  # Each image: RGB, centre crop + LANCZOS 256, PIL float bicubic to 299, (x - 128) / 128.
  network_input = np.stack([
      np.asarray(Image.fromarray(img).crop(_centre_box(img)).resize((256, 256), Image.LANCZOS))
      for img in rgb])
  network_input = np.stack([features.clean_resize(img) for img in network_input])
  expected = _network_pool(clean_detector, network_input)
  np.testing.assert_allclose(ref.features, expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())
  np.testing.assert_allclose(ref.mu, expected.mean(0), rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())
  # A reference made this way only serves its own protocol.
  with pytest.raises(ValueError, match="not comparable"):
    metrics.check_ref_fits(ref, protocols.get("edm-fid50k"), None)


def _centre_box(image):
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = int(round((h - side) / 2)), int(round((w - side) / 2))
  return (left, top, left + side, top + side)


def test_evaluate_names_the_clean_fid_protocol_and_its_sqrtm_rule(tmp_path, capsys, monkeypatch,
                                                                  weights_file, clean_detector):
  del clean_detector  # compiled already: the CLI reuses its program
  folder, _ = _mixed_folder(tmp_path)
  weights = weights_file
  rng = np.random.default_rng(0)
  ref = tmp_path / "ref.npz"
  metrics.save_ref_stats(str(ref), rng.normal(size=2048), np.eye(2048),
                         "coco2014-fid30k-clean", 10)
  calls = []

  def record(mu, sigma, ref_mu, ref_sigma, *, sqrtm_rule):
    calls.append(sqrtm_rule)
    return 7.5

  monkeypatch.setattr(metrics, "fid_from_moments", record)
  result = evaluate.run(["sid_jax.evaluate", f"--images={folder}", f"--inception={weights}",
                         f"--ref={ref}", "--batch=8", "--fid_protocol=coco2014-fid30k-clean"])
  (fid,) = result["results"]
  assert calls == ["clean-fid"] and fid["fid"] == 7.5
  assert fid["protocol"] == "coco2014-fid30k-clean[n=5]"
  assert fid["params"] == {"cov_ddof": 1, "sqrtm": "clean-fid"}
  assert fid["front_end"] == "gigagan-clean-fid" and "8.15" in fid["comparable_with"]
  table = capsys.readouterr().out
  assert "| fid | fid=7.5 | coco2014-fid30k-clean[n=5] | 5 |" in table
  assert "sqrtm=clean-fid" in table
  # One feature stream serves all Inception metrics: IS (StyleGAN3's front-end) cannot join.
  with pytest.raises(evaluate.EvaluationError, match="need different Inception front-ends"):
    evaluate.run(["sid_jax.evaluate", f"--images={folder}", f"--inception={weights}",
                  f"--ref={ref}", "--batch=8", "--fid_protocol=coco2014-fid30k-clean",
                  "--metrics=fid,is"])


# ---------------------------------------------------------------------------------------------
# The square-root rules.
# ---------------------------------------------------------------------------------------------


def _rotation(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, -s], [s, c]])


def test_sqrtm_rules_where_they_differ():
  mu1, mu2 = np.array([1.0, 2.0]), np.array([0.5, 2.0])
  mean_term = 0.25
  r = _rotation(0.3)
  eye = np.eye(2)

  # Not positive semi-definite: sqrtm(S1 S2) = R diag(i, 2) R^T has an imaginary diagonal.
  s1 = r @ np.diag([-1.0, 4.0]) @ r.T
  real_trace = 2.0  # the real part of sqrtm's trace, i + 2
  expected = mean_term + np.trace(s1) + 2.0 - 2 * real_trace
  assert frechet.frechet_distance(mu1, s1, mu2, eye, sqrtm_rule="real") == pytest.approx(
      expected, abs=1e-9)
  assert frechet.frechet_distance(mu1, s1, mu2, eye, sqrtm_rule="clean-fid") == pytest.approx(
      expected, abs=1e-9)
  with pytest.raises(frechet.ImaginaryComponentError, match="imaginary component"):
    frechet.frechet_distance(mu1, s1, mu2, eye, sqrtm_rule="pytorch-fid")

  # A small imaginary part (1e-4 < 1e-3): pytorch-fid takes the real part too; all agree.
  s1 = r @ np.diag([-1e-8, 4.0]) @ r.T
  values = {rule: frechet.frechet_distance(mu1, s1, mu2, eye, sqrtm_rule=rule)
            for rule in frechet.SQRTM_RULES}
  assert max(values.values()) - min(values.values()) < 1e-12
  assert values["real"] == pytest.approx(mean_term + np.trace(s1) + 2.0 - 2 * 2.0, abs=1e-9)

  # No square root at all (a nilpotent product): scipy returns inf off the diagonal. EDM's rule
  # keeps the (finite) trace; pytorch-fid and clean-fid retry with eps * I on both covariances.
  s1 = np.array([[0.0, 1.0], [0.0, 0.0]])
  assert not np.isfinite(scipy.linalg.sqrtm(s1)).all()
  edm = frechet.frechet_distance(mu1, s1, mu2, eye, sqrtm_rule="real")
  assert edm == pytest.approx(mean_term + 0.0 + 2.0 - 2 * 0.0, abs=1e-12)
  eps = 1e-6
  # sqrtm((1 + eps) [[eps, 1], [0, eps]]) has the diagonal sqrt((1 + eps) eps).
  offset = mean_term + 0.0 + 2.0 - 4 * np.sqrt((1 + eps) * eps)
  for rule in ("pytorch-fid", "clean-fid"):
    value = frechet.frechet_distance(mu1, s1, mu2, eye, eps=eps, sqrtm_rule=rule)
    assert value == pytest.approx(offset, abs=1e-9) and abs(value - edm) > 1e-3
  with pytest.raises(ValueError, match="Unknown FID square-root rule 'torch'"):
    frechet.frechet_distance(mu1, eye, mu2, eye, sqrtm_rule="torch")


def test_protocol_fid_uses_the_protocol_rule():
  mu = np.zeros(2)
  s1 = _rotation(0.3) @ np.diag([-1.0, 4.0]) @ _rotation(0.3).T
  edm = protocols.get("edm-fid50k")
  assert metrics.protocol_fid(mu, s1, mu, np.eye(2), edm) == pytest.approx(
      frechet.frechet_distance(mu, s1, mu, np.eye(2), sqrtm_rule="real"))
  with pytest.raises(frechet.ImaginaryComponentError):
    metrics.protocol_fid(mu, s1, mu, np.eye(2), protocols.get("pytorch-fid50k"))
  assert "sqrtm=real" in protocols.table() and "sqrtm=pytorch-fid" in protocols.table()
  with pytest.raises(ValueError, match="not FID"):
    metrics.protocol_fid(mu, s1, mu, np.eye(2), protocols.get("is50k"))
