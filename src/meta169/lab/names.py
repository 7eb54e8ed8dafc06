"""The lab's defaults: its name, where its state lives, how many VMs a network gets.

Constants only, importing nothing of the lab, so that the CLI can show them in
``--help`` (and ``meta169 serve`` and friends can build their command line) without
importing the lab, and so that every other lab module can take them from here
rather than from the package ``meta169.lab``, which only re-exports.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_NAME = "default"
DEFAULT_STATE_ROOT = Path("/run/meta169-lab")
STATE_FILE = "lab.json"  # in each lab's state directory
DEFAULT_VMS_PER_NETWORK = 2
MAX_VMS_PER_NETWORK = 9
