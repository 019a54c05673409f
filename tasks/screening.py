"""The retrain flow's screening: the registered champion scores the inbox images before they join
the training data.

An image the champion scores at or above its threshold looks anomalous to the best model there
is, so it must not become a normal training image: the ingest moves it to the inbox's
`rejected/` with its score and the threshold in `reasons.json`. The ingest calls the screen only
with the images that passed its own checks (the decoder-crash check among them), so a hostile file
never reaches the in-process decoder here. The scoring is the library's
(anomaly_models/screening.py); this module only finds the champion in the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from anomaly_models import load_model
from anomaly_models.config import Params
from anomaly_models.screening import anomalous, score_images
from tasks.registry import champion_checkpoint

Screen = Callable[[list[Path]], dict[Path, str | None]]


def champion_screen(params: Params) -> Screen | None:
    """The champion's screen for `ingest_inbox`: {path: reason to reject, or None to accept} for
    the images it is given; None (nothing screened) when screening is off, there is no champion,
    or the champion has no threshold, each said in one line."""
    name = params.registered_name()
    if not params.retrain.screen_with_champion:
        print("retrain.screen_with_champion is false: inbox images are not screened")
        return None
    found = champion_checkpoint(params)
    if found is None:
        print(f"{name} has no champion yet: inbox images are accepted without screening")
        return None
    checkpoint, version = found
    model = load_model(checkpoint)
    if not model.threshold:
        print(f"{name} champion v{version} has no threshold: inbox images are accepted without screening")
        return None

    def screen(paths: list[Path]) -> dict[Path, str | None]:
        scores = score_images(model, paths, params.evaluate.batch_size, params.train.device)
        reasons = anomalous(model, scores, f"champion v{version} of {name}")
        print(f"screened {len(scores)} inbox image(s) with {name} champion v{version} "
              f"(threshold {model.threshold['value']:.4g}): {len(reasons)} anomalous")
        return {path: reasons.get(path) for path in paths}

    return screen
