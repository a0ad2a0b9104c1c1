"""lorakit: memory-efficient low-rank fine-tuning (LoRA, LoRA-FA, LoRS) for dense and pruned models.

```python
import lorakit as lk
cfg = lk.LoRAConfig(method="lora", rank=16, alpha=32, targets="all-linear")
model = lk.inject(model, cfg)
lk.save_adapter(model, "out/adapter")       # PEFT format
model = lk.merge(model)                     # plain layers again
summary = lk.train(model="smollm2-135m", data="rotten-tomatoes", max_steps=10, output="out")
```
"""

from .adapters import load_adapter, save_adapter
from .api import train  # lk.train(...); the loop itself stays importable from lorakit.train
from .config import LoRAConfig, TrainConfig
from .gradient_init import gradient_svd_init
from .inject import (
    active_adapter,
    adapted_layers,
    adapter_names,
    count_parameters,
    delete_adapter,
    disable_adapters,
    inject,
    match_targets,
    merge,
    set_adapter,
    unload,
)
from .layers import AdaptedLayer
from .memory import reduce_activation_memory
from .models import dequantize, load_model, quantize
from .planner import plan
from .profile import count_saved, profile_steps
from .prune import prune

__version__ = "0.1.0"

__all__ = [
    "AdaptedLayer",
    "LoRAConfig",
    "TrainConfig",
    "active_adapter",
    "adapted_layers",
    "adapter_names",
    "count_parameters",
    "count_saved",
    "delete_adapter",
    "dequantize",
    "disable_adapters",
    "gradient_svd_init",
    "inject",
    "load_adapter",
    "load_model",
    "match_targets",
    "merge",
    "plan",
    "profile_steps",
    "prune",
    "quantize",
    "reduce_activation_memory",
    "save_adapter",
    "set_adapter",
    "train",
    "unload",
]
