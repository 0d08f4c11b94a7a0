"""Layout search: device specs, the cost model, the plan simulator and the Optuna tuning.

    estimate_iteration(model, gpu, *, tp, prefill_tokens, decode_seqs, decode_context, layout)
        -> predicted seconds of one iteration
    nanorun tune MODEL --gpu h100   (search/cli.py) -> a tuned layout JSON and its Gantt chart
"""

from .costmodel import CostModel, CostParams
from .evaluate import Predictor, estimate_iteration
from nanorun.device import DEVICES, DeviceSpec, get_device
from .profile import Profile, ProfileError
from .workload import IterationMix, Workload

__all__ = ["DEVICES", "CostModel", "CostParams", "DeviceSpec", "IterationMix", "Predictor",
           "Profile", "ProfileError", "Workload", "estimate_iteration", "get_device"]
