"""The retrain flow's screening step: the registered champion scores the inbox images first.

An image the champion scores at or above its threshold looks anomalous to the best model there
is, so it must not become a normal training image: the ingest moves it to the inbox's
`rejected/` with its score and the threshold in `reasons.json`. The scoring is the library's
(anomaly_models/screening.py); this step only finds the champion in the registry.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from anomaly_models import load_model
from anomaly_models.config import Params
from anomaly_models.data.common import list_images
from anomaly_models.files import file_sha256
from anomaly_models.screening import anomalous, score_images
from tasks.registry import champion_checkpoint


@task(name="screen-inbox")
def screen_inbox(params: Params, inbox: Path) -> dict[str, str | None] | None:
    """{sha256: reason to reject, or None to accept} for each readable inbox image, by the
    champion's score; None (nothing screened) when screening is off or there is no champion."""
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
    paths = list_images(Path(inbox))
    digests = {path: file_sha256(path) for path in paths}
    scores = score_images(model, paths, params.evaluate.batch_size, params.train.device)
    reasons = anomalous(model, scores, f"champion v{version} of {name}")
    print(f"screened {len(scores)} inbox image(s) with {name} champion v{version} "
          f"(threshold {model.threshold['value']:.4g}): {len(reasons)} anomalous")
    return {digests[path]: reasons.get(path) for path in scores}
