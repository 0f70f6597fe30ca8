"""Let the CUDA build of torchvision import next to a CPU-only torch.

Loaded from a .pth file. Before the first ``import torchvision`` it defines the
``torchvision::nms`` and ``torchvision::qnms`` op schemas when the compiled extension
could not register them, so torchvision's fake-tensor registrations do not fail.
"""
import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None


class _DefineTorchvisionSchemas(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        global _library
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        try:
            torch.ops.torchvision.nms
        except (AttributeError, RuntimeError):
            _library = torch.library.Library("torchvision", "FRAGMENT")
            for schema in _SCHEMAS:
                try:
                    _library.define(schema)
                except RuntimeError:
                    pass
        return None


sys.meta_path.insert(0, _DefineTorchvisionSchemas())
