"""How every bench script starts its main(): bad input (a wrong data root, an unknown setting)
ends in one line naming the file or key and exit code 2, as the `anomaly` CLI does, not in a
traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from anomaly_models.cli import bad_input
from anomaly_models.errors import AnomalyError


def run(main: Callable[[], object]) -> None:
    try:
        main()
    except AnomalyError as error:
        sys.exit(bad_input(error))
