"""The training layer: Ray Train `TorchTrainer` + DeepSpeed ZeRO around `CondensationForCausalLM`, MLflow on rank 0,
checkpoints through `ray.train.report`, HF export. The model itself holds no distributed code; it all lives here.

    from condensation.config import load_config
    from condensation.train import fit
    result = fit(load_config(overrides=["schedule.total_steps=50"]))
    result.hf_path   # CondensationForCausalLM.from_pretrained(result.hf_path)
"""

from .data import check_train_data, local_text_rows, rows_dataset, synthetic_rows, train_datasets
from .deepspeed_config import deepspeed_config
from .loop import param_digest, train_loop_per_worker
from .model import build_model
from .trainer import NonFiniteLossError, RepeatedFailureError, TrainResult, fit, prepare, resolved_config_dict

__all__ = [
    "NonFiniteLossError",
    "RepeatedFailureError",
    "TrainResult",
    "build_model",
    "check_train_data",
    "deepspeed_config",
    "fit",
    "local_text_rows",
    "param_digest",
    "prepare",
    "resolved_config_dict",
    "rows_dataset",
    "synthetic_rows",
    "train_datasets",
    "train_loop_per_worker",
]
