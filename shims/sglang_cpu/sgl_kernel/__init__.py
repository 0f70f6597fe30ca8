"""Placeholder for the CUDA-only ``sgl_kernel`` package on CPU installs.

SGLang imports it unconditionally; on a CPU without AMX none of its ops runs. Any
attribute resolves to a callable that raises and names the op, so a code path that
does need a kernel fails loudly instead of silently.
"""

__version__ = "0.0.0+srft-cpu-placeholder"


def _unavailable(op_name):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{op_name} is not available in the CPU install of srft_mcore; "
            "this code path needs a GPU install of SGLang")

    op.__name__ = op_name
    return op


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable(name)
