"""``ModelSignature`` lives in the base layer (``sparsemm.signature``); re-exported here for old imports."""

from sparsemm.signature import ModelSignature, config_hash

__all__ = ["ModelSignature", "config_hash"]
