"""The runner's numpy side against transformers' own: image patches, M-RoPE indices, chat prompt, decoding, and the
numpy head-paged pool."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")

import torch
from PIL import Image

from sparsemm.export.build import image_size_for, image_spec
from sparsemm.export.describe import COPIED_FILES
from sparsemm.export.engine_pool import EnginePool
from sparsemm.export.preprocess import ImageSpec, PromptCodec, mrope_positions, pixel_patches
from sparsemm.export.torch_reference import hf_inputs
from sparsemm.loading import load_model
from sparsemm.models.ocr_data import IMAGE_HEIGHT, IMAGE_WIDTH, heldout_samples
from sparsemm.models.tiny_ocr import OCR_PROMPT, encode_ocr_batch, ocr_prompt_ids
from sparsemm.resolve import resolve_spec

#: The engine's image size, from the tiny model folder's sparsemm.json (not from its name).
TINY_IMAGE_SIZE = image_size_for(resolve_spec("tiny"), None)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def spec(tiny) -> ImageSpec:
    return image_spec(tiny.image_processor, TINY_IMAGE_SIZE)


@pytest.fixture(scope="module")
def codec(tiny, tmp_path_factory) -> PromptCodec:
    folder = tmp_path_factory.mktemp("tokenizer")
    for name in COPIED_FILES:
        if (tiny.path / name).exists():
            (folder / name).write_bytes((tiny.path / name).read_bytes())
    return PromptCodec(folder)


def test_the_fixed_size_is_the_shipped_models_image_size(spec):
    assert TINY_IMAGE_SIZE == (IMAGE_WIDTH, IMAGE_HEIGHT)
    assert spec.image_tokens == 128 and spec.grid_thw == (1, 16, 32)


def test_pixel_patches_equal_the_transformers_processor(tiny, spec):
    images = [s.image for s in heldout_samples(3)] + [Image.new("L", TINY_IMAGE_SIZE, 77)]  # grey: converted
    theirs = tiny.image_processor(images=images, return_tensors="pt")
    ours = np.concatenate([pixel_patches(image, spec) for image in images])
    assert theirs["image_grid_thw"].tolist() == [list(spec.grid_thw)] * len(images)
    assert ours.shape == tuple(theirs["pixel_values"].shape)
    np.testing.assert_array_equal(ours, theirs["pixel_values"].numpy())


def test_other_image_sizes_are_resized_to_the_fixed_size(tiny, spec):
    big = heldout_samples(1)[0].image.resize((256, 128))
    resized = big.resize(TINY_IMAGE_SIZE, resample=Image.Resampling.BICUBIC)
    theirs = tiny.image_processor(images=[resized], return_tensors="pt")["pixel_values"].numpy()
    np.testing.assert_array_equal(pixel_patches(big, spec), theirs)


@pytest.mark.parametrize("prompt", [OCR_PROMPT, "Read it.", "What text is in this picture, exactly?"])
def test_chat_prompt_ids_equal_the_transformers_template(tiny, codec, prompt):
    assert codec.prompt_ids(prompt, 128) == ocr_prompt_ids(tiny.tokenizer, 128, prompt)


def test_hf_inputs_equal_encode_ocr_batch(tiny):
    images = [s.image for s in heldout_samples(2)]
    ours = hf_inputs(tiny, images, [OCR_PROMPT] * 2)
    theirs = encode_ocr_batch(images, tiny.tokenizer, tiny.image_processor)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_decode_equals_the_transformers_tokenizer(tiny, codec):
    ids = codec.prompt_ids("A1 B2", 4)[-12:] + [tiny.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert codec.decode(ids) == tiny.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_mrope_positions_equal_get_rope_index_with_left_padding(tiny, spec):
    images = [s.image for s in heldout_samples(2)]
    inputs = hf_inputs(tiny, images, [OCR_PROMPT, "Read it."])  # different lengths: row 1 is left padded
    theirs, deltas = tiny.model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    for row in range(2):
        real = inputs["attention_mask"][row].bool()
        ids = inputs["input_ids"][row][real].numpy()
        ours, delta = mrope_positions(ids, tiny.model.config.image_token_id, spec.grid_thw, spec.merge_size)
        np.testing.assert_array_equal(ours, theirs[:, row, real].numpy())
        assert delta == int(deltas[row])
    assert int(inputs["attention_mask"][1].sum()) < int(inputs["attention_mask"][0].sum())


def test_mrope_refuses_an_image_block_of_another_size(spec):
    with pytest.raises(ValueError, match="image block of 3 tokens"):
        mrope_positions(np.array([1, 6, 6, 6, 2]), 6, spec.grid_thw, spec.merge_size)


def pool_contents(pool: EnginePool, layer: int, row: int, head: int) -> np.ndarray:
    n = int(pool.lens[layer, row, head])
    pages = pool.tables[layer, row, head, : -(-n // pool.page_size)]
    return pool.k_pages[pages].reshape(-1, pool.k_pages.shape[-1])[:n]


def test_engine_pool_round_trip_reservation_and_release():
    """Prefill + 7 appends read back through the decode graph's inputs; admission takes exactly the reserved
    pages, a row past its reservation is refused, released pages are reused."""
    from sparsemm.errors import InternalError, PoolExhaustedError
    from sparsemm.plugin.budgets import make_plan
    from sparsemm.signature import ModelSignature

    rng = np.random.default_rng(0)
    layers, hkv, d, page, prompt, reserve = 2, 3, 4, 4, 9, 7  # 16 tokens: whole pages
    sig = ModelSignature(model_type="toy", num_layers=layers, num_heads=hkv, num_kv_heads=hkv, head_dim=d)
    plan = make_plan("full", window=2, kernel=1, signature=sig)
    per_row = layers * hkv * -(-(prompt + reserve) // page)
    pool = EnginePool(plan, rows=2, max_tokens=prompt + reserve, page_size=page, head_dim=d, pages=per_row + 1)
    pool.admit(1, prompt, reserve)
    assert pool.storage.allocator.num_free == 1
    with pytest.raises(PoolExhaustedError):
        pool.admit(0, prompt, reserve)  # the second row does not fit: nothing changes
    assert pool.storage.allocator.num_free == 1 and not pool.table.active_rows[0]
    keys = rng.standard_normal((layers, hkv, prompt, d)).astype(np.float32)
    lengths = np.full((layers, hkv), prompt, dtype=np.int32)
    pool.write_prefill(1, keys, keys, lengths)
    expected = {(l, h): list(keys[l, h]) for l in range(layers) for h in range(hkv)}
    for _ in range(reserve):
        new = rng.standard_normal((layers, 1, hkv, d)).astype(np.float32)
        pool.append(np.array([1]), new, new)
        for l in range(layers):
            for h in range(hkv):
                expected[l, h].append(new[l, 0, h])
    for (l, h), tokens in expected.items():
        np.testing.assert_array_equal(pool_contents(pool, l, 1, h), np.stack(tokens))
    assert (pool.k_pages[-1] == 0).all()  # the null page stays zero
    held = sum(-(-len(t) // page) for t in expected.values())
    assert pool.nbytes_held(1) == pool.nbytes_held() == held * 2 * page * d * 4
    with pytest.raises(InternalError, match="used up their reservation"):
        pool.append(np.array([1]), new, new)
    pool.release(1)
    assert pool.nbytes_held(1) == 0 and pool.storage.allocator.num_free == per_row + 1
    pool.admit(0, prompt, reserve)
    pool.write_prefill(0, keys, keys, lengths)
    np.testing.assert_array_equal(pool_contents(pool, 0, 0, 0), keys[0, 0, :9])
