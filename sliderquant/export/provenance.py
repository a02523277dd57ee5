"""What every export records about how it was made (the ``sliderquant`` key of ``config.json``).

Readers ignore unknown top-level keys of ``config.json``; the formats' own ``quantization_config``
schemas are strict (compressed-tensors' pydantic models forbid extra keys), so the provenance sits
beside them, not inside.
"""

from __future__ import annotations


def provenance(model, cfg: dict, fmt: str, **details) -> dict:
    from .. import __version__
    source = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {"tool": "sliderquant", "version": __version__, "format": fmt,
            "method": cfg.get("method"), "wbits": cfg.get("wbits"), "group_size": cfg.get("group_size"),
            "symmetric": bool(cfg.get("symmetric", False)), "source_model": source,
            **details, "quant_config": dict(cfg)}
