"""Encoders through the registry: the offline models for real, hub specs with random weights."""

import numpy as np
import pytest
from PIL import Image

from indexer.encoders.image import load_image_encoder, parse_image_spec
from indexer.encoders.registry import ModelRegistry, load_text_encoder
from indexer.encoders.text import TfidfEncoder, strip_boilerplate
from indexer.errors import ModelSpecError
from tests.support.offline import IMAGE_WEIGHTS, TEXT_MODEL, offline_settings


def test_registry_loads_each_model_once(registry, settings):
    a = registry.text()
    assert registry.text() is a
    assert registry.image() is registry.get("image", settings.image_model)


def test_offline_text_model_embeds_meaningfully(registry):
    enc = registry.text()
    e = enc.encode(["analog wrist watch for men", "men's chronograph watch",
                    "cotton door curtain"])
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_offline_image_model(registry, catalog):
    from indexer.images import decode_image, read_image_bytes

    enc = registry.image()
    imgs = [decode_image(read_image_bytes(x.image)) for x in catalog[:3] if x.image]
    e = enc.encode(imgs)
    assert e.shape == (len(imgs), 1280)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)


def test_hub_text_path_with_random_weights(tmp_path):
    """A sentence-transformers model directory built from a random tiny BERT: the same
    ``SentenceTransformer(spec)`` path a hub id such as all-mpnet-base-v2 takes."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(TEXT_MODEL))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64)
    d = tmp_path / "tiny"
    BertModel(cfg).save_pretrained(d / "raw")
    tok.save_pretrained(d / "raw")
    word = models.Transformer(str(d / "raw"))
    SentenceTransformer(modules=[word, models.Pooling(32)]).save(str(d / "st"))
    enc = load_text_encoder(str(d / "st"))
    assert enc.encode(["a", "b c"]).shape == (2, 32)


HUB_IMAGE_SPECS = [
    ("open_clip:ViT-B-32@random", 512),
    ("timm:legacy_xception@random", 2048),
    ("torchvision:resnet18@random", 512),
]


@pytest.fixture(scope="module")
def random_image_encoders():  # type: ignore[no-untyped-def]
    """Each family's random-weight encoder, built once for this module's tests."""
    built: dict[str, object] = {}

    def get(spec: str):  # type: ignore[no-untyped-def]
        if spec not in built:
            built[spec] = load_image_encoder(spec, batch_size=2)
        return built[spec]

    yield get
    built.clear()


@pytest.mark.parametrize("spec, dim", HUB_IMAGE_SPECS)
def test_hub_image_paths_with_random_weights(spec, dim, random_image_encoders):
    enc = random_image_encoders(spec)
    e = enc.encode([Image.new("RGB", (300, 200), (i * 40, 90, 200)) for i in range(3)])
    assert e.shape == (3, dim)
    assert np.isfinite(e).all()


@pytest.mark.parametrize("spec", [s for s, _ in HUB_IMAGE_SPECS])
def test_every_family_letterboxes_photos_on_white(spec, random_image_encoders):
    """A wide photo keeps its whole width (both ends) and is padded above and below with
    white, normalised as the model normalises it: letterboxed, not centre-cropped."""
    pre = random_image_encoders(spec).preprocess

    def colour(rgb):  # a plain colour as the model sees it, (3,) normalised
        return pre(Image.new("RGB", (64, 64), rgb))[:, 0, 0]

    blue, red, green, white = (0, 0, 255), (255, 0, 0), (0, 255, 0), (255, 255, 255)
    photo = Image.new("RGB", (360, 120), red)  # 3:1, a blue end on the left, a green one right
    photo.paste(Image.new("RGB", (40, 120), blue), (0, 0))
    photo.paste(Image.new("RGB", (40, 120), green), (320, 0))
    x = pre(photo)
    size = x.shape[-1]
    assert x.shape == (3, size, size)
    band = size // 3  # the photo fills the middle third of the rows
    for rows in (x[:, : band - 2], x[:, -(band - 2):]):  # the bars, clear of the edge
        np.testing.assert_allclose(rows.numpy(), np.broadcast_to(
            colour(white).numpy()[:, None, None], rows.shape), atol=1e-4)
    mid = x[:, size // 2]
    for col, rgb in ((2, blue), (size // 2, red), (size - 3, green)):  # both ends are kept
        np.testing.assert_allclose(mid[:, col].numpy(), colour(rgb).numpy(), atol=0.05)


def test_inference_rewrite_is_exact_and_folds_batch_norm(catalog):
    """MobileNetV2 on PyTorch has its batch norms folded into the convolutions and runs
    channels-last (about 2x faster on CPU); its vectors equal the model as built."""
    import torch

    from indexer.images import decode_image, read_image_bytes

    fast = load_image_encoder(f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}")
    plain = load_image_encoder(f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}", optimize=False)
    bn = torch.nn.modules.batchnorm._BatchNorm
    assert any(isinstance(m, bn) for m in plain.model.modules())
    assert not any(isinstance(m, bn) for m in fast.model.modules())
    imgs = [decode_image(read_image_bytes(x.image)) for x in catalog[:4] if x.image]
    np.testing.assert_allclose(fast.encode(imgs), plain.encode(imgs), atol=1e-4)


def test_local_torchvision_weights_and_bad_specs(tmp_path):
    enc = load_image_encoder(f"torchvision:mobilenet_v2@{IMAGE_WEIGHTS}")
    assert enc.dim == 1280
    assert parse_image_spec("open_clip:ViT-B-32@laion2b_s34b_b79k") == (
        "open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    for bad, msg in [
        ("resnet", "must look like"),
        ("caffe:alexnet@x", "unknown image model family"),
        ("torchvision:nonet@random", "unknown torchvision architecture"),
        ("torchvision:mobilenet_v2@" + str(tmp_path / "missing.safetensors"), "not found"),
        ("open_clip:ViT-B-32", "name the weights"),
        ("open_clip:NoSuchArch@random", "unknown OpenCLIP"),
    ]:
        with pytest.raises(ModelSpecError, match=msg):
            load_image_encoder(bad)
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_text_encoder(str(tmp_path / "no-model"))


def test_tfidf_encoder_and_boilerplate():
    texts = ["steel coffee mug", "ceramic coffee mug", "cotton bath towel", "soft bath towel"]
    enc = TfidfEncoder(dim=3).fit(texts)
    e = enc.encode(texts)
    assert e.shape == (4, enc.dim)
    assert e[0] @ e[1] > e[0] @ e[2]
    s = strip_boilerplate("Buy Elephant Lid for Rs.450 online. Only Genuine Products. "
                          "30 Day Replacement Guarantee.")
    assert "Rs" not in s and "Genuine" not in s and "Elephant Lid" in s


def test_torch_threads_setting_applies():
    import torch

    reg = ModelRegistry(offline_settings(torch_threads=1, image_model="none"))
    reg.text()
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
