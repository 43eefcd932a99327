"""softprompt: prompt tuning for frozen causal language models.

from softprompt import TrainConfig, train, SoftPrompt
result = train(TrainConfig(data="train.csv", text_column="Tweet text", label_column="Label", out="runs/c"))
SoftPrompt.load("runs/c").classify(["my parcel never arrived"])
"""

from .adapters import load_adapter, save_adapter
from .config import PRESETS, TrainConfig, preset_config
from .data import DEFAULT_TEMPLATE, Task, load_table
from .errors import SoftpromptError
from .forward.kv import prompt_kv
from .forward.reference import concat_forward
from .hub import push_to_hub
from .modeling.load import load_base
from .pipeline import SoftPrompt
from .prompt import init_prompt
from .readouts.words import label_loss
from .training import TrainResult, train

__all__ = [
    "DEFAULT_TEMPLATE",
    "PRESETS",
    "SoftPrompt",
    "SoftpromptError",
    "Task",
    "TrainConfig",
    "TrainResult",
    "concat_forward",
    "init_prompt",
    "label_loss",
    "load_adapter",
    "load_base",
    "load_table",
    "prompt_kv",
    "preset_config",
    "push_to_hub",
    "save_adapter",
    "train",
]
