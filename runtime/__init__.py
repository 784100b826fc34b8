"""The x2v runtime. `x2v.runtime.Pipeline` is imported lazily so the CLI starts without torch."""

__version__ = "0.1.0"  # x2v's version, here so setup.py, engine manifests and benchmark JSON read one value


def __getattr__(name):
    if name == "Pipeline":
        from x2v.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'x2v.runtime' has no attribute {name!r}")
