"""Helpers the tests share (tiny models, reference implementations, the suite's SGLang servers, stub servers);
no tests here. Test modules import them as ``support.<module>`` (``tests/`` is on the path through its conftest)."""

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
DATA = TESTS / "data"
