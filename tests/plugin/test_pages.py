"""The page table (``plugin/pages.py``): importable without torch; after any sequence of admissions, reservations,
appends, in-row page reuse, releases and AdaKV splits its counts equal a recount from its own arrays and the
allocator's; running out is atomic; and nothing outside ``pages.py`` / ``runtime.py`` touches the private state of
``PageTable`` or ``RaggedKV``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sparsemm.errors import PoolExhaustedError
from sparsemm.plugin.pages import NumpyKVPool, PageTable, cdiv, pages_for
from sparsemm.plugin.plan import BudgetPlan
from sparsemm.signature import ModelSignature

ROOT = Path(__file__).resolve().parents[2]
LAYERS, HEADS, PAGE, ROWS, MAX_TOKENS = 2, 3, 4, 4, 48
SIG = ModelSignature("t", LAYERS, HEADS, HEADS, 8)
STATIC = BudgetPlan("sparsemm", 10, 4, 1, SIG, caps=((0, 3, 9), (5, 1, 20)), floor=0)
ADAPTIVE = BudgetPlan("adakv", 10, 4, 1, SIG, layer_totals=(18, 9), floor=0)


def test_pages_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import sparsemm.plugin.pages as pages\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
        "print(pages.PageTable.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "PageTable", done.stderr


class PageTableMachine(RuleBasedStateMachine):
    """Random operations on a small table; every invariant is a recount that does not trust the table's caches."""

    def __init__(self):
        super().__init__()
        self.storage = NumpyKVPool(60, PAGE, 8)
        # the table's own plan is AdaKV (which per-request plans cannot be); static rows bring theirs
        self.table = PageTable(ADAPTIVE, self.storage, max_rows=ROWS, max_tokens=MAX_TOKENS)
        self.epoch = self.table.epoch
        self.adaptive_split: dict[int, set[int]] = {}  # AdaKV rows: layers split so far

    # -- helpers -------------------------------------------------------------------------------------------------
    def active(self) -> list[int]:
        return [int(r) for r in np.flatnonzero(self.table.active_rows)]

    def static_rows(self) -> list[int]:
        return [r for r in self.active() if r not in self.adaptive_split]

    def split_rows(self) -> list[int]:
        """Rows whose every layer has pages (static rows, AdaKV rows split at every layer)."""
        return [r for r in self.active() if len(self.adaptive_split.get(r, range(LAYERS))) == LAYERS]

    # -- operations ----------------------------------------------------------------------------------------------
    @rule(row=st.integers(0, ROWS - 1), prompt=st.integers(0, 30), reserve=st.integers(0, 12), ada=st.booleans())
    def admit(self, row, prompt, reserve, ada):
        if self.table.active_rows[row]:
            return
        plan = ADAPTIVE if ada else STATIC
        need = pages_for(plan, prompt, reserve, PAGE)  # what admission asks of the pool
        free = self.storage.allocator.num_free
        before = (self.table.page_ids.copy(), self.table.held_tokens.copy())
        try:
            self.table.admit(row, prompt, reserve, plan)
        except PoolExhaustedError:
            assert need > free or prompt + reserve > MAX_TOKENS  # only when it cannot fit, and nothing changed
            assert self.storage.allocator.num_free == free
            assert np.array_equal(self.table.page_ids, before[0]) and np.array_equal(self.table.held_tokens, before[1])
            return
        assert self.storage.allocator.num_free == free - need
        if ada:
            self.adaptive_split[row] = set()

    @precondition(lambda self: any(len(s) < LAYERS for s in self.adaptive_split.values()))
    @rule(data=st.data())
    def split_adaptive_layer(self, data):
        row = data.draw(st.sampled_from([r for r, s in self.adaptive_split.items() if len(s) < LAYERS]))
        layer = data.draw(st.sampled_from([l for l in range(LAYERS) if l not in self.adaptive_split[row]]))
        prompt = self.table.prompt_len(row)
        total = int(ADAPTIVE.layer_kept(prompt)[layer])
        cuts = sorted(data.draw(st.lists(st.integers(0, total), min_size=HEADS - 1, max_size=HEADS - 1)))
        lengths = np.minimum(np.diff([0, *cuts, total]), prompt)
        self.table.assign_from_stash(row, layer, lengths)
        self.adaptive_split[row].add(layer)
        assert np.array_equal(self.table.held_tokens[row, layer], lengths)

    @precondition(lambda self: bool(self.static_rows()))
    @rule(data=st.data())
    def prefill(self, data):
        row = data.draw(st.sampled_from(self.static_rows()))
        layer = data.draw(st.integers(0, LAYERS - 1))
        kept = self.table.kept_tokens[row, layer]
        self.table.set_selected(np.array([row]), layer, kept[None])

    @precondition(lambda self: bool(self.split_rows()))
    @rule(data=st.data(), planned=st.booleans())
    def advance_all_layers(self, data, planned):
        row = data.draw(st.sampled_from(self.split_rows()))
        if self.table.room(np.array([row])) < 1:
            return
        held = self.table.held_tokens[row]
        opened = int((held % PAGE == 0).sum()) if planned else None  # pages the new tokens start
        rows = slice(row, row + 1) if planned else np.array([row])
        self.table.advance(rows, opened_pages=opened)
        if planned:
            assert self.table.epoch == self.epoch, "a planned step's advance must keep the epoch"

    @precondition(lambda self: bool(self.split_rows()))
    @rule(data=st.data(), tokens=st.integers(1, 5))
    def append_one_layer(self, data, tokens):
        row = data.draw(st.sampled_from(self.split_rows()))
        layer = data.draw(st.integers(0, LAYERS - 1))
        tokens = min(tokens, self.table.room(np.array([row]), layer))
        if tokens > 0:
            self.table.advance(np.array([row]), tokens, layer=layer)

    @precondition(lambda self: bool(self.split_rows()))
    @rule(data=st.data(), extra=st.integers(1, 10))
    def reserve_more(self, data, extra):
        row = data.draw(st.sampled_from(self.split_rows()))
        free = self.storage.allocator.num_free
        before = self.table.pages_of(row)
        try:
            self.table.reserve_more(row, extra)
        except PoolExhaustedError:
            assert self.storage.allocator.num_free == free and self.table.pages_of(row) == before
            return
        assert self.table.room(np.array([row])) >= extra
        assert self.table.pages_of(row) - before == free - self.storage.allocator.num_free

    @precondition(lambda self: bool(self.split_rows()))
    @rule(data=st.data())
    def slide_and_reuse(self, data):
        """A sliding window moving on: skip some front tokens, then reuse the fully skipped pages in the row."""
        row = data.draw(st.sampled_from(self.split_rows()))
        layer = data.draw(st.integers(0, LAYERS - 1))
        held, skip = self.table.held_tokens[row, layer], self.table.skipped_tokens[row, layer]
        tokens = np.array([data.draw(st.integers(0, int(n))) for n in held - skip])
        self.table.skip_front(row, layer, tokens)
        pages_before = self.table.page_ids[row, layer].copy()
        room_before = self.table.room(np.array([row]), layer)
        free = self.storage.allocator.num_free
        moved = self.table.reuse_front_pages(row, layer)
        assert self.storage.allocator.num_free == free, "in-row reuse must not touch the pool"
        for head in range(HEADS):  # the same pages, rotated
            assert sorted(self.table.page_ids[row, layer, head]) == sorted(pages_before[head])
        assert (self.table.skipped_tokens[row, layer] < PAGE).all()
        assert self.table.room(np.array([row]), layer) >= room_before
        assert set(moved.tolist()) <= set(pages_before[pages_before >= 0].tolist())

    @precondition(lambda self: bool(self.active()))
    @rule(data=st.data())
    def release(self, data):
        row = data.draw(st.sampled_from(self.active()))
        pages = self.table.pages_of(row)
        free = self.storage.allocator.num_free
        self.table.release(row)
        self.adaptive_split.pop(row, None)
        assert self.storage.allocator.num_free == free + pages

    # -- recounts ------------------------------------------------------------------------------------------------
    @invariant()
    def counts_equal_a_recount(self):
        t = self.table
        active = t.active_rows
        ids, npages = t.page_ids, t.pages_assigned
        columns = np.arange(t.width)
        assigned = (ids >= 0).sum(axis=-1)
        assert np.array_equal(assigned, npages), "pages assigned per head"
        assert ((ids >= 0) == (columns < npages[..., None])).all(), "assigned pages are a head's first columns"
        held, skip = t.held_tokens, t.skipped_tokens
        assert (held <= npages * PAGE).all() and (skip <= held).all() and (held >= 0).all()
        assert not held[~active].any() and not npages[~active].any()
        held_pages = int((cdiv(held[active], PAGE) - skip[active] // PAGE).sum())
        assert t.held_pages() == held_pages
        assert t.nbytes_held() == held_pages * self.storage.page_nbytes
        unsplit = sum(int(t.pages_of(r) - npages[r].sum()) for r in self.active())  # AdaKV stash not yet assigned
        assert t.reserved_pages() == int(npages[active].sum()) + unsplit
        assert t.nbytes_reserved() == t.reserved_pages() * self.storage.page_nbytes
        for r in self.static_rows():  # static rows hold their whole reservation from admission on
            assert t.pages_of(r) == int(npages[r].sum())
        # every page is free or held by exactly one head (or one stash), never both, never twice
        out = ids[ids >= 0].astype(np.int64)
        assert np.unique(out).size == out.size, "a page is assigned twice"
        free = self.storage.allocator.free_ids()
        assert not np.intersect1d(out, free).size, "an assigned page is on the free list"
        assert free.size + t.reserved_pages() == self.storage.allocator.num_pages
        assert t.epoch >= self.epoch
        self.epoch = t.epoch


PageTableMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, suppress_health_check=[HealthCheck.too_slow], deadline=None
)
test_page_table_counts_equal_a_recount = PageTableMachine.TestCase


def test_a_pool_too_small_fails_at_admission_in_the_runtime():
    """``RaggedKV`` admits through the page table: one page short fails before any token, nothing held."""
    pytest.importorskip("torch")
    from sparsemm.plugin.kvpool import KVPool
    from sparsemm.plugin.runtime import RaggedKV

    need = pages_for(STATIC, 20, 6, PAGE)
    runtime = RaggedKV(STATIC, KVPool(need - 1, PAGE, 8), max_rows=2, max_tokens=MAX_TOKENS, attention="torch")
    with pytest.raises(PoolExhaustedError, match=f"{need} pages needed, {need - 1} of {need - 1} free"):
        runtime.admit(0, 20, decode_reserve=6)
    assert not runtime.is_active(0) and runtime.pool.num_free == need - 1 and runtime.nbytes_reserved() == 0


# -- nobody else touches the private state --------------------------------------------------------------------
OWNERS = {ROOT / "plugin" / "pages.py", ROOT / "plugin" / "runtime.py"}
SCANNED = ("plugin", "serving", "export", "sparsemm", "tests", "benchmarks")


def private_names() -> set[str]:
    """Private attributes and methods of ``PageTable`` and ``RaggedKV`` (read from their source)."""
    names = set()
    for path in OWNERS:
        tree = ast.parse(path.read_text())
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("PageTable", "RaggedKV")):
            for node in ast.walk(cls):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                    names.add(node.attr)
                if isinstance(node, ast.FunctionDef):
                    names.add(node.name)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_only_pages_and_runtime_touch_the_page_tables_private_state():
    names = private_names()
    assert {"_held", "_pages", "_epoch", "_tables", "_lens"} <= names  # the scan sees what it must protect
    offences = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path in OWNERS or "__pycache__" in path.parts:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr in names:
                    owner = node.value
                    if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                        continue  # a class's own attribute of the same name
                    offences.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "setattr", "hasattr")
                    and len(node.args) > 1
                    and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in names
                ):
                    offences.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}(…, {node.args[1].value!r})")
    assert not offences, "private state of PageTable/RaggedKV touched outside them:\n" + "\n".join(offences)
