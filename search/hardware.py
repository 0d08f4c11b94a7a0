"""Device specs, for the search's readers: they live in nanorun/device.py (the runtime reads
them too, and the runtime never imports the search); this module re-exports them so that
`nanorun.search.hardware` imports keep working."""

from nanorun.device import (COLLECTIVES, DEVICES, CollectiveTable, DeviceSpec, bus_factor,
                            collective_seconds, get_device, isotonic, known_device)

__all__ = ["COLLECTIVES", "DEVICES", "CollectiveTable", "DeviceSpec", "bus_factor",
           "collective_seconds", "get_device", "isotonic", "known_device"]
