"""vargen: visual autoregressive image generation on one config system.

    import vargen
    pipe = vargen.load("runs/digits_ar")                      # generator checkpoint or run dir
    images, stats = pipe.sample(labels=[3, 3, 5], seed=0)     # (3, C, H, W) floats in [0, 1]
    run_dir = vargen.train("configs/digits_vq.yaml", train={"steps": 200})

The API is imported on first use, so ``import vargen`` loads neither torch nor any model.
``vargen.train`` is the training package made callable (see ``vargen/train/__init__.py``).
"""

__version__ = "0.1.0"
__all__ = ["Pipeline", "load", "train"]


def __getattr__(name: str):
    if name == "train":
        import importlib

        return importlib.import_module("vargen.train")  # callable: trains
    if name in ("Pipeline", "load"):
        from vargen import api

        return getattr(api, name)
    raise AttributeError(f"module 'vargen' has no attribute {name!r}")
