"""Layout search: device specs, and (next) the cost model, simulator and Optuna tuning."""

from .hardware import DEVICES, DeviceSpec, get_device

__all__ = ["DEVICES", "DeviceSpec", "get_device"]
