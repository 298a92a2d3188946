"""Prefix sharing (``--prefix-sharing``) on the stress server: uncompressed prompt prefixes through SGLang's radix
cache, each request's compressed copy its own.

The stress server (``tests/support/sglang_server.py``) shares prefixes with NaN-poisoned freed and evicted slots,
SGLang's strict memory checks busy and idle, forced retraction and 64-token chunks, so every output here also shows
that no freed or evicted slot is read and no page leaks. The oracles: the transformers adapter at small budgets
(selections up to near ties, DESIGN §3) and the plain radix-on server at covering budgets.
"""

from __future__ import annotations

import pytest
from support.sglang_client import (
    TIMEOUT,
    assert_same_selection_up_to_ties,
    chat_text,
    hf_reference,
    payload,
    post,
    read_records,
    selections_of,
    stats,
    wait_idle,
)
from support.sglang_server import SPARSEMM_BUDGET, SPARSEMM_MAX_BUDGET, requires_sglang

pytestmark = [pytest.mark.xdist_group("sglang"), pytest.mark.sglang, pytest.mark.slow, requires_sglang]
requests = pytest.importorskip("requests", reason="requests (the SGLang tests' HTTP client) is not installed")
#: A long shared question after the image: with the image and the template, a prefix of 200+ tokens.
COMMON = (
    "Read the image carefully. Provide all the OCR results of this image, then say which words are capitalised, "
    "which are numbers, and which letters appear most often in the whole text. "
)


def token_page(url: str) -> int:
    info = requests.get(f"{url}/get_server_info", timeout=TIMEOUT).json()
    return int(info.get("page_size") or 1)


def common_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def floor_page(n: int, page: int) -> int:
    return max(0, n) // page * page


def test_followers_prefill_only_what_the_tree_lacks_and_select_alone(sparsemm_server, sglang_server, tiny, recipe):
    """A leader, then followers with their own suffixes (one shorter than the leader's prompt, one with a share cap,
    one at a covering budget): each reports ``cached_tokens`` = the longest prefix earlier prompts put in the tree,
    capped at ``floor_page(P − w)`` and its cap; selections and ids as if it ran alone."""
    from sparsemm.models.ocr_data import heldout_samples
    from sparsemm.models.tiny_ocr import encode_ocr_batch

    url, window = sparsemm_server.url, recipe.knobs["window"]
    page = token_page(url)
    image = heldout_samples(1, start=500)[0].image
    image_id = tiny.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    cases = [  # (suffix, budget, share cap)
        ("Answer in one long sentence, then repeat it.", SPARSEMM_BUDGET, None),  # the leader
        ("Answer briefly.", SPARSEMM_BUDGET, None),
        ("Go.", 16, None),  # shorter than the leader
        ("Answer in one long sentence, then stop.", SPARSEMM_BUDGET, 100),  # shares at most 100 tokens
        ("Answer in one long sentence, then repeat it twice.", SPARSEMM_MAX_BUDGET, None),  # covering budget
    ]
    before = stats(url)["cached_prompt_tokens_total"]
    earlier: list[tuple[list[int], int]] = []  # prompts already in the tree, each up to its own share limit
    cached_total = 0
    records_seen = 0
    for i, (suffix, budget, cap) in enumerate(cases):
        prompt = COMMON + suffix
        inputs = encode_ocr_batch([image], tiny.tokenizer, tiny.image_processor, prompt=prompt)
        ids = inputs["input_ids"][0].tolist()
        body = payload(chat_text(tiny.tokenizer, prompt), image, budget)
        if cap is not None:
            body["sampling_params"]["custom_params"]["sparsemm_share_len"] = cap
        reply = post(url, body)
        assert reply.status_code == 200, reply.text
        out = reply.json()
        p = len(ids)
        assert out["meta_info"]["prompt_tokens"] == p
        limit = floor_page(min(p - window, cap if cap is not None else p), page)
        if i == 0:
            assert ids.count(image_id) == 128 and p - window > 200
            assert out["meta_info"]["cached_tokens"] <= ids.index(image_id)  # nothing past the image was cached
        else:
            want = min(limit, max(min(common_len(ids, e), lim) for e, lim in earlier))
            assert want == floor_page(cap, page) if cap is not None else want > 128  # the image is shared
            assert out["meta_info"]["cached_tokens"] == want, (suffix, out["meta_info"])
            cached_total += want
        earlier.append((ids, floor_page(p - window, page)))
        if budget == SPARSEMM_MAX_BUDGET:  # covering: the plain (radix-on) server's ids
            plain = post(sglang_server, payload(chat_text(tiny.tokenizer, prompt), image)).json()["output_ids"]
            assert out["output_ids"] == plain
            continue
        plan = recipe.build(budget)
        want_ids, seen = hf_reference(tiny, inputs, plan)
        assert out["output_ids"] == want_ids, suffix
        records = read_records(sparsemm_server.record)
        records_seen = len(records)
        rid = out["meta_info"]["id"]
        selections = selections_of(records, rid)  # every rank's heads, in head order
        assert sorted(selections) == list(range(plan.signature.num_layers))
        for layer_seen in seen:
            assert_same_selection_up_to_ties(selections[layer_seen[0]], layer_seen, plan, p)
    assert records_seen > 0
    s = wait_idle(url)
    assert s["prefix_sharing"] == 1 and s["cached_prompt_tokens_total"] - before >= cached_total
    assert s["unlocked_prefix_tokens_total"] > 0


def test_a_three_turn_chat_reuses_each_earlier_turn(sparsemm_server, sglang_server, tiny, recipe):
    """Turn k reports at least ``floor_page(P_{k−1} − w)`` cached tokens (its earlier prompt, up to that turn's
    window), and at a covering budget every turn's ids are the plain server's."""
    from sparsemm.models.ocr_data import heldout_samples

    url, window = sparsemm_server.url, recipe.knobs["window"]
    page = token_page(url)
    image = heldout_samples(1, start=510)[0].image
    questions = ["Provide all the OCR results of this image.", "Say it again.", "And once more, in capitals."]
    messages: list[dict] = []
    previous = None
    for question in questions:
        content = [{"type": "text", "text": question}]
        if not messages:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        text = tiny.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ours = post(url, payload(text, image, SPARSEMM_MAX_BUDGET)).json()
        plain = post(sglang_server, payload(text, image)).json()
        assert ours["output_ids"] == plain["output_ids"]
        p = ours["meta_info"]["prompt_tokens"]
        if previous is not None:
            assert ours["meta_info"]["cached_tokens"] >= floor_page(previous - window, page), ours["meta_info"]
        previous = p
        answer = tiny.tokenizer.decode(ours["output_ids"], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    wait_idle(url)


def test_a_share_len_past_the_prompt_is_http_400(sparsemm_server, tiny):
    body = payload(chat_text(tiny.tokenizer, "OCR:", image=False))
    body["sampling_params"]["custom_params"] = {"sparsemm_share_len": 10_000}
    reply = post(sparsemm_server.url, body)
    assert reply.status_code == 400 and "at most the prompt's length" in reply.text


def test_evicted_prefixes_are_never_read(sparsemm_server, tiny, recipe):
    """Distinct prompts until the tree must evict (evicted slots are NaN-poisoned), then a follower of an evicted
    prefix: still the adapter's ids, and the pools come back whole."""
    from concurrent.futures import ThreadPoolExecutor

    from sparsemm.models.ocr_data import heldout_samples
    from sparsemm.models.tiny_ocr import encode_ocr_batch

    url = sparsemm_server.url
    first = stats(url)["evicted_prefix_tokens_total"]
    prompt = COMMON + "Answer briefly."
    samples = heldout_samples(40, start=520)
    bodies = [payload(chat_text(tiny.tokenizer, prompt), s.image, max_new=2) for s in samples]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: post(url, b), bodies))
    assert all(r.status_code == 200 for r in replies)
    assert stats(url)["evicted_prefix_tokens_total"] > first, "the tree never evicted: the test proves less"
    image = samples[0].image  # the first prompt's prefix: evicted first (least recently used)
    inputs = encode_ocr_batch([image], tiny.tokenizer, tiny.image_processor, prompt=prompt)
    out = post(url, payload(chat_text(tiny.tokenizer, prompt), image)).json()
    assert out["output_ids"] == hf_reference(tiny, inputs, recipe.build(SPARSEMM_BUDGET))[0]
    wait_idle(url)
    log = sparsemm_server.log_text()
    for failure in ("Scheduler hit an exception", "Leak Detected", "leak detected", "double free", "use-after-free"):
        assert failure not in log
