"""polca: find hidden breakthroughs in training runs (POLCA).

``polca.Run`` opens a run (a config, a Hugging Face checkpoint series, or any PyTorch model's
state dicts) and runs the stages; it is imported on first use, so ``import polca`` stays cheap.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Run":
        from polca.api import Run

        return Run
    raise AttributeError(f"module 'polca' has no attribute {name!r}")


__all__ = ["Run", "__version__"]
