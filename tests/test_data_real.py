"""The real-data pipeline (sid_jax/data/real.py): EDM image zips, EDM2 latent zips, tfds and the
digits through grain; labels, host shards, exact resumption, the global batch and flat memory."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from sid_jax import sharding
from sid_jax.data import digits
from sid_jax.data import real

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_edm_zip(path, images: np.ndarray, labels=None, *, compress=zipfile.ZIP_STORED):
  """A zip as EDM's dataset_tool writes it: 00000/img00000000.png ... and dataset.json."""
  with zipfile.ZipFile(path, "w", compression=compress) as zf:
    entries = []
    for i, img in enumerate(images):
      name = f"{i // 1000:05d}/img{i:08d}.png"  # EDM: f'{idx_str[:5]}/img{idx_str}.png'
      buf = io.BytesIO()
      Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(
          buf, format="png", compress_level=0)
      zf.writestr(name, buf.getvalue())
      entries.append([name, int(labels[i])] if labels is not None else None)
    zf.writestr("dataset.json", json.dumps(
        {"labels": entries if labels is not None else None}))
  return str(path)


def write_edm2_zip(path, mean_std: np.ndarray, labels=None):
  """A zip as EDM2's `dataset_tool.py encode` writes it: per image [2C, h, w] float32 .npy."""
  with zipfile.ZipFile(path, "w") as zf:
    entries = []
    for i, arr in enumerate(mean_std):
      name = f"{i // 1000:05d}/img-mean-std-{i:08d}.npy"
      buf = io.BytesIO()
      np.save(buf, arr.astype(np.float32))
      zf.writestr(name, buf.getvalue())
      entries.append([name, int(labels[i])] if labels is not None else None)
    zf.writestr("dataset.json", json.dumps(
        {"labels": entries if labels is not None else None}))
  return str(path)


def _images(n, h=4, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, h, c), dtype=np.uint8)


def _ids(batch) -> list[int]:
  """Record ids encoded in the first pixel of each image (written as id // 256, id % 256)."""
  x = np.rint((np.asarray(batch["images"]) + 1) * 127.5).astype(np.int64)
  x = x.reshape(x.shape[0], -1)
  return list(x[:, 0] * 256 + x[:, 1])


def _id_images(n, h=4, c=3):
  imgs = _images(n, h, c)
  flat = imgs.reshape(n, -1)
  flat[:, 0] = np.arange(n) // 256
  flat[:, 1] = np.arange(n) % 256
  return flat.reshape(imgs.shape)


def _mesh(n=1):
  return sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:n])


def _config(**data) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 7
  c.data = ml_collections.ConfigDict(dict(resolution=4, channels=3, label_dim=0))
  c.data.update(data)
  return c


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------


def test_edm_zip_images_and_labels_match_the_pngs(tmp_path):
  imgs, labels = _images(10), np.arange(10) % 3
  src = real.EDMImageZip(write_edm_zip(tmp_path / "d.zip", imgs, labels,
                                       compress=zipfile.ZIP_DEFLATED))
  assert len(src) == 10 and src.image_shape == (4, 4, 3) and src.num_classes == 3
  for i in (0, 7):
    np.testing.assert_array_equal(src[i]["x"], imgs[i])
    assert src[i]["label"] == labels[i]
  # Through the loader: pixels / 127.5 - 1 and one-hot labels of config.data.label_dim.
  loader = real.make_loader(src, batch=10, seed=0, shuffle=False, label_dim=5)
  b = next(iter(loader))
  np.testing.assert_allclose(b["images"], imgs.astype(np.float32) / 127.5 - 1, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(b["labels"], np.eye(5, dtype=np.float32)[labels])
  # Greyscale PNGs keep a channel axis; `"labels": null` means unlabelled.
  grey = real.EDMImageZip(write_edm_zip(tmp_path / "g.zip", _images(3, c=1)))
  assert grey.image_shape == (4, 4, 1) and grey.num_classes == 0 and "label" not in grey[0]


def test_zip_source_pickles_without_its_handle_and_reopens(tmp_path):
  import pickle  # pylint: disable=import-outside-toplevel
  imgs = _images(4)
  src = real.EDMImageZip(write_edm_zip(tmp_path / "d.zip", imgs))
  assert src._zip is not None  # opened in this process
  clone = pickle.loads(pickle.dumps(src))
  assert clone._zip is None  # not pickled: opened on first read in the process that reads
  np.testing.assert_array_equal(clone[2]["x"], imgs[2])
  assert clone._zip is not None and repr(clone) == repr(src)


def test_edm2_latents_are_drawn_per_record_and_normalised(tmp_path):
  rng = np.random.default_rng(1)
  n, c, h = 6, 4, 8
  mean = rng.normal(size=(n, c, h, h)).astype(np.float32) * 3 + 1
  std = rng.uniform(0.5, 2, size=(n, c, h, h)).astype(np.float32)
  src = real.EDM2LatentZip(write_edm2_zip(tmp_path / "lat.zip",
                                          np.concatenate([mean, std], 1), np.arange(n) % 2))
  assert src.image_shape == (h, h, c) and src.num_classes == 2
  np.testing.assert_array_equal(src[3]["x"][..., :c], mean[3].transpose(1, 2, 0))
  loader = real.make_loader(src, batch=n, seed=5, shuffle=False)
  a, b = next(iter(loader)), next(iter(loader))
  np.testing.assert_array_equal(a["images"], b["images"])  # the same draw for the same position
  # Undo EDM2's normalisation and the draw: (x_raw - mean) / std is standard normal, and x_raw
  # differs in the next epoch (a new draw for the same record).
  raw_mean, raw_std = np.array(real.EDM2_RAW_MEAN), np.array(real.EDM2_RAW_STD)
  x = a["images"].astype(np.float64)
  raw = (x - 0.0) / 0.5 * raw_std + raw_mean
  eps = (raw - mean.transpose(0, 2, 3, 1)) / std.transpose(0, 2, 3, 1)
  assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1
  it = iter(loader)
  next(it)
  assert not np.allclose(next(it)["images"], a["images"])
  # EDM2's float32 formula: x * scale + bias with scale = 0.5 / raw_std.
  scale = np.float32(0.5) / raw_std.astype(np.float32)
  np.testing.assert_allclose(x, (raw.astype(np.float32) * scale - raw_mean * scale), atol=1e-5)


def test_digits_source_and_feed_labels():
  src = real.DigitsSource("all")
  images, labels = digits.load_digits()
  assert len(src) == len(images) and src.image_shape == (8, 8, 1)
  np.testing.assert_array_equal(src[5]["x"], images[5])
  c = _config(source="digits", resolution=8, channels=1, label_dim=10)
  feed = real.make_feed(c, _mesh(2), 2, 4)
  b = feed.next()
  assert b["images"].shape == (2, 4, 8, 8, 1) and b["labels"].shape == (2, 4, 10)
  assert b["images"].sharding.spec == sharding.batch_sharding(_mesh(2), 1).spec
  # Each image carries its own label: find every fed image among the digits.
  x = np.asarray(b["images"]).reshape(8, -1)
  y = np.asarray(b["labels"]).reshape(8, 10)
  for xi, yi in zip(x, y):
    (k,) = np.flatnonzero((images.reshape(len(images), -1) == xi).all(1))[:1]
    assert yi.argmax() == labels[k] and yi.sum() == 1


# ---------------------------------------------------------------------------------------------
# Order: shards, epochs, resumption.
# ---------------------------------------------------------------------------------------------


def test_two_process_shards_are_disjoint_and_cover_each_epoch(tmp_path):
  n = 24
  src = real.EDMImageZip(write_edm_zip(tmp_path / "d.zip", _id_images(n)))
  epochs = {}
  for p in range(2):
    it = iter(real.make_loader(src, batch=4, seed=3, process_index=p, process_count=2))
    seen = [i for _ in range(6) for i in _ids(next(it))]  # two epochs of 12 records
    epochs[p] = (seen[:12], seen[12:])
    assert sorted(seen[:12]) == sorted(seen[12:])  # the same shard each epoch ...
    assert seen[:12] != seen[12:]  # ... reshuffled
  assert not set(epochs[0][0]) & set(epochs[1][0])
  assert sorted(epochs[0][0] + epochs[1][0]) == list(range(n))
  # Another seed, another order.
  other = iter(real.make_loader(src, batch=12, seed=4, process_index=0, process_count=2))
  assert _ids(next(other)) != epochs[0][0]


def _feed(path, mesh, *, index=0, count=1, seed=7, label_dim=0, **kw):
  src = real.EDMImageZip(path)
  return real.RealFeed(src, mesh, 2, 4, image_shape=(4, 4, 3), label_dim=label_dim, seed=seed,
                       process_index=index, process_count=count, **kw)


def test_resumed_feed_reads_exactly_the_uninterrupted_batches(tmp_path):
  path = write_edm_zip(tmp_path / "d.zip", _id_images(21), np.arange(21) % 4)
  mesh = _mesh(1)
  full = _feed(path, mesh, label_dim=4)
  ref = [full.next_local() for _ in range(9)]  # 72 records: over 3 epochs of 21
  first = _feed(path, mesh, label_dim=4)
  for _ in range(4):
    first.next_local()
  state = json.loads(json.dumps(first.state()))  # as checkpoint metadata stores it
  resumed = _feed(path, mesh, label_dim=4)
  resumed.restore(state)
  for k in range(4, 9):
    got = resumed.next_local()
    np.testing.assert_array_equal(got["images"], ref[k]["images"])
    np.testing.assert_array_equal(got["labels"], ref[k]["labels"])
  # Another seed or another data file is refused, naming what differs.
  with pytest.raises(ValueError, match="'seed'"):
    _feed(path, mesh, seed=8, label_dim=4).restore(state)
  other = write_edm_zip(tmp_path / "e.zip", _id_images(22), np.arange(22) % 4)
  with pytest.raises(ValueError, match="'source'"):
    _feed(other, mesh, label_dim=4).restore(state)
  with pytest.raises(ValueError, match="lacks the field"):
    resumed.restore({"position": 3})


def test_any_hosts_state_resumes_every_host_and_process_count_changes_are_refused(tmp_path):
  path = write_edm_zip(tmp_path / "d.zip", _id_images(20))
  mesh = _mesh(1)
  uninterrupted = {}
  for p in range(2):
    f = _feed(path, mesh, index=p, count=2)
    uninterrupted[p] = [_ids(f.next_local()) for _ in range(6)]
  host0 = _feed(path, mesh, index=0, count=2)
  for _ in range(3):
    host0.next_local()
  state = host0.state()  # the checkpoint's metadata is written by host 0
  for p in range(2):
    f = _feed(path, mesh, index=p, count=2)
    f.restore(state)
    assert [_ids(f.next_local()) for _ in range(3)] == uninterrupted[p][3:]
  with pytest.raises(ValueError, match="written by 2 processes, this run has 1"):
    _feed(path, mesh, index=0, count=1).restore(state)
  with pytest.raises(ValueError, match="worker_count=0, this run has 1"):
    _feed(path, mesh, index=0, count=2, worker_count=1).restore(state)


def test_grain_worker_processes_read_the_zip_and_resume(tmp_path):
  # One worker process: the source is pickled without its ZipFile and reopens it there.
  path = write_edm_zip(tmp_path / "d.zip", _id_images(20))
  mesh = _mesh(1)
  full = _feed(path, mesh, worker_count=1)
  ref = [_ids(full.next_local()) for _ in range(2)]
  state = json.loads(json.dumps(full.state()))
  ref += [_ids(full.next_local()) for _ in range(3)]
  assert sorted(ref[0] + ref[1] + ref[2][:4]) == list(range(20))  # the first epoch, in order
  resumed = _feed(path, mesh, worker_count=1)
  resumed.restore(state)
  assert [_ids(resumed.next_local()) for _ in range(3)] == ref[2:]


# ---------------------------------------------------------------------------------------------
# From a config: checks with clear errors, abstract feeds.
# ---------------------------------------------------------------------------------------------


def test_make_feed_checks_the_config_against_the_data(tmp_path):
  path = write_edm_zip(tmp_path / "cifar.zip", _images(8), np.arange(8) % 3)
  mesh = _mesh(1)
  assert real.make_feed(_config(), mesh, 1, 4) is None  # no dataset configured
  with pytest.raises(ValueError, match=r"cifar.zip: the data are 4x4 with 3 channels, but "
                     r"config.data asks resolution=8"):
    real.make_feed(_config(source="edm_zip", path=path, resolution=8), mesh, 1, 4)
  with pytest.raises(ValueError, match=r"labels of 3 classes, more than config.data.label_dim=2"):
    real.make_feed(_config(source="edm_zip", path=path, label_dim=2), mesh, 1, 4)
  unlabelled = write_edm_zip(tmp_path / "u.zip", _images(4))
  with pytest.raises(ValueError, match=r"u.zip has no labels, but config.data.label_dim=10"):
    real.make_feed(_config(source="edm_zip", path=unlabelled, label_dim=10), mesh, 1, 4)
  with pytest.raises(FileNotFoundError, match="missing.zip"):
    real.make_feed(_config(source="edm_zip", path=str(tmp_path / "missing.zip")), mesh, 1, 4)
  with pytest.raises(ValueError, match=r"config.data.source='zip' is not one of"):
    real.make_feed(_config(source="zip", path=path), mesh, 1, 4)
  with pytest.raises(ValueError, match="needs config.data.path"):
    real.make_feed(_config(source="edm_zip"), mesh, 1, 4)
  with pytest.raises(ValueError, match=r"cifar.zip holds no latents"):
    real.make_feed(_config(source="edm2_latent_zip", path=path), mesh, 1, 4)
  # Labelled data feeds an unconditional run without labels; abstract feeds open nothing.
  b = real.make_feed(_config(source="edm_zip", path=path), mesh, 1, 4).next()
  assert set(b) == {"images"} and b["images"].shape == (1, 4, 4, 4, 3)
  a = real.make_feed(_config(source="edm_zip", path="nowhere.zip", label_dim=3), mesh, 2, 4,
                     abstract=True).abstract()
  assert a["images"].shape == (2, 4, 4, 4, 3) and a["labels"].shape == (2, 4, 3)


def test_edm2_latent_feed_from_config(tmp_path):
  rng = np.random.default_rng(2)
  ms = np.concatenate([rng.normal(size=(8, 4, 4, 4)), np.full((8, 4, 4, 4), 1e-3)], 1)
  path = write_edm2_zip(tmp_path / "img512-sd.zip", ms)
  c = _config(source="edm2_latent_zip", path=path, channels=4)
  c.decoder = ml_collections.ConfigDict(dict(raw_mean=[0.0] * 4, raw_std=[0.5] * 4,
                                             final_mean=0.0, final_std=0.5))
  feed = real.make_feed(c, _mesh(1), 1, 8)
  x = np.asarray(feed.next()["images"])[0]
  # With raw_std = final_std the normalised latent is the drawn one: mean +- a tiny std.
  got = sorted(map(tuple, np.round(x.reshape(8, -1), 1)))
  want = sorted(map(tuple, np.round(ms[:, :4].transpose(0, 2, 3, 1).reshape(8, -1), 1)))
  np.testing.assert_allclose(got, want, atol=0.11)
  c.decoder.raw_mean = [0.0] * 3
  with pytest.raises(ValueError, match=r"latents have 4 channels but config.decoder.raw_mean"):
    real.make_feed(c, _mesh(1), 1, 8)


def test_label_feeds_read_no_image(tmp_path, monkeypatch):
  labels = np.array([3, 1, 4, 1, 5, 9, 2, 6])
  path = write_edm_zip(tmp_path / "d.zip", _images(8), labels)
  c = _config(source="edm_zip", path=path, label_dim=10, shuffle=False)
  decoded = []
  decode = real.EDMImageZip._decode
  monkeypatch.setattr(real.EDMImageZip, "_decode",
                      lambda self, i: decoded.append(i) or decode(self, i))
  feed = real.make_label_feed(c, _mesh(1), 1, 4)
  b = feed.next()
  assert decoded == [0]  # the first image only, its shape read when the zip is opened
  assert set(b) == {"fake", "gen"} and set(b["fake"]) == {"labels"}
  np.testing.assert_array_equal(np.asarray(b["fake"]["labels"])[0].argmax(1), labels[:4])
  np.testing.assert_array_equal(np.asarray(b["gen"]["labels"])[0].argmax(1), labels[4:])
  assert feed.abstract()["gen"]["labels"].shape == (1, 4, 10)
  # EDM2's labels-only dataset.json (the official SiD-EDM2 data), and an unconditional run.
  (tmp_path / "dataset.json").write_text(json.dumps(
      {"labels": [[f"img{i}.npy", int(k)] for i, k in enumerate(labels)]}))
  c = _config(source="labels_json", path=str(tmp_path / "dataset.json"), label_dim=10,
              shuffle=False)
  b = real.make_label_feed(c, _mesh(1), 2, 2).next()
  np.testing.assert_array_equal(np.asarray(b["fake"]["labels"]).argmax(-1), [[3, 1], [4, 1]])
  c.data.label_dim = 0
  assert real.make_label_feed(c, _mesh(1), 2, 2) is None
  c.data.label_dim = 10
  with pytest.raises(ValueError, match="dataset.json holds labels only, but this run needs"):
    real.make_feed(c, _mesh(1), 2, 2)


# ---------------------------------------------------------------------------------------------
# tfds (a dataset built here, offline, in the array_record format).
# ---------------------------------------------------------------------------------------------


def test_tfds_data_source_split(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  imgs = _id_images(10)

  # Not registered: `tfds.builder` reads it back from its files alone, as a dataset prepared
  # elsewhere. No checksum path (tfds derives it through `importlib_resources`, absent here).
  class SidJaxTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=5)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(10):
        yield i, {"image": imgs[i], "label": i % 5}

  SidJaxTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  c = _config(source="tfds", path="sid_jax_tiny_images", split="train",
              data_dir=str(tmp_path), label_dim=5, shuffle=False)
  feed = real.make_feed(c, _mesh(1), 1, 10)
  b = feed.next_local()
  ids = _ids(b)
  assert sorted(ids) == list(range(10))
  np.testing.assert_array_equal(b["labels"].argmax(1), np.array(ids) % 5)
  with pytest.raises(ValueError, match="no feature 'img'"):
    real.make_feed(_config(source="tfds", path="sid_jax_tiny_images", data_dir=str(tmp_path),
                           image_feature="img"), _mesh(1), 1, 10)


# ---------------------------------------------------------------------------------------------
# Memory: flat as the dataset grows.
# ---------------------------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, ml_collections, psutil
    from sid_jax import sharding
    from sid_jax.data import real
    path, res, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    c = ml_collections.ConfigDict({"seed": 0, "data": {"source": "edm_zip", "path": path,
        "resolution": res, "channels": 3, "label_dim": 10}})
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:1])
    proc = psutil.Process()
    jax.device_put(0.0).block_until_ready()
    before = peak = proc.memory_info().rss
    feed = real.make_feed(c, mesh, 1, 16)
    for _ in range(steps):
      feed.next()
      peak = max(peak, proc.memory_info().rss)
    print(before, peak)
""")


def _rss_growth(path, res, steps) -> int:
  """Bytes of resident memory (sampled each step) that a fresh process adds, once its libraries are
  loaded, to open `path` and read `steps` batches of 16 records from it."""
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, path, str(res), str(steps)],
                       capture_output=True, text=True, env=env, check=True, timeout=120)
  before, peak = map(int, out.stdout.split()[-2:])
  return peak - before


def test_resident_memory_stays_flat_as_the_dataset_grows(tmp_path):
  res, n = 64, 64  # 12 KB a PNG; the 20x zip: 1,280 images, 16 MB
  rng = np.random.default_rng(0)
  small = write_edm_zip(tmp_path / "x1.zip", rng.integers(0, 256, (n, res, res, 3), np.uint8),
                        np.arange(n) % 10)
  big_images = np.concatenate([rng.integers(0, 256, (n, res, res, 3), np.uint8)
                               for _ in range(20)])
  big = write_edm_zip(tmp_path / "x20.zip", big_images, np.arange(20 * n) % 10)
  big_bytes = os.path.getsize(big)
  del big_images
  # Both runs read 1,280 records (80 batches of 16): the 20x zip once, the 1x zip 20 times over.
  small_growth = _rss_growth(small, res, 20 * n // 16)
  big_growth = _rss_growth(big, res, 20 * n // 16)
  # The 20x data add at most a quarter of their size to resident memory (measured: ~1 MB, the
  # zip's directory and names, ~1 KB a record); a reader that loaded the zip would add its 16 MB.
  assert big_growth - small_growth < 0.25 * big_bytes, (small_growth, big_growth, big_bytes)


# ---------------------------------------------------------------------------------------------
# SiD on a labelled dataset (run.build_run) and the checkpoint's position key (train.py).
# ---------------------------------------------------------------------------------------------


def test_sid_with_data_takes_the_generators_labels_from_the_data():
  from sid_jax import run as run_lib  # pylint: disable=import-outside-toplevel
  from sid_jax import train  # pylint: disable=import-outside-toplevel
  from tests import configs_util  # pylint: disable=import-outside-toplevel

  c = configs_util.load("digits_sid.py", "tiny")
  c.data.source = "digits"
  c.data.shuffle = False
  run = run_lib.build_run(c, jax.devices()[:1])
  assert isinstance(run.feed, real.LabelFeed)
  batch = run.feed.next()
  labels = digits.load_digits()[1]
  for half, records in (("fake", labels[:16]), ("gen", labels[16:32])):
    assert set(batch[half]) == {"labels"}  # SiD reads no image
    np.testing.assert_array_equal(np.asarray(batch[half]["labels"]).reshape(16, 10).argmax(1),
                                  records)
  # (steps.train_step conditions both updates on a batch's labels: tests/test_sida.py.)
  # Checkpoints keep the position under 'feed'; SiD-LSG checkpoints' older 'prompts' still read.
  assert train.feed_state({"feed": {"position": 1}, "prompts": {"position": 2}}) == {"position": 1}
  assert train.feed_state({"prompts": {"position": 2}}) == {"position": 2}
  assert train.feed_state({"step": 3}) is None
